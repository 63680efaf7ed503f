"""PAdES CMS signatures from a template: encode the constant parts once, join per document.

pyHanko builds every ``SignedData`` with asn1crypto, which re-encodes the certificates and
attributes each time (about 15 ms); the RSA signature itself takes 0.3 ms. For a PAdES
signature (no signing-time attribute, SHA-256) the signed attributes differ between documents
only in the 32-byte message digest, so :class:`TemplateSigner` asks pyHanko once for a
signature over a placeholder digest, keeps its encoded parts, and afterwards only substitutes
the digest, signs, and appends the signature time-stamp token. Anything else (another digest
algorithm, Adobe revocation attributes, CAdES attributes, a dry run) goes to pyHanko's
generic code unchanged. The output is byte for byte what pyHanko builds (tested).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import threading
from dataclasses import dataclass
from typing import Any

from asn1crypto import cms
from pyhanko.sign.signers import Signer
from pyhanko.sign.signers.pdf_cms import PdfCMSSignedAttributes
from pyhanko.sign.timestamps import TimeStamper

from timestamp._der import tlv

__all__ = ["CmsTemplate", "TemplateSigner"]

_DIGEST = "sha256"


@dataclass(frozen=True)
class CmsTemplate:
    """Encoded parts of one signer's PAdES ``SignedData``."""

    attrs_before: bytes  # signed attributes up to the message digest value
    attrs_after: bytes  # … after it
    si_head: bytes  # SignerInfo version, sid, digestAlgorithm
    si_signature_algorithm: bytes
    sd_head: bytes  # SignedData version, digestAlgorithms, encapContentInfo, certificates
    signed_data_oid: bytes
    timestamp_attr_oid: bytes
    #: Length of the DER without unsigned attributes (with an RSA signature of this key).
    base_size: int

    @classmethod
    def from_sample(cls, content_info: cms.ContentInfo, placeholder: bytes) -> CmsTemplate:
        """Split a pyHanko signature made over ``placeholder`` (random, so it occurs once)."""
        signed_data = content_info["content"]
        [signer_info] = list(signed_data["signer_infos"])
        if signer_info["unsigned_attrs"].native is not None:
            raise ValueError("the sample must carry no unsigned attributes")
        attrs = _content(signer_info["signed_attrs"].dump())
        where = attrs.find(placeholder)
        if where < 0 or attrs.find(placeholder, where + 1) >= 0:
            raise ValueError("placeholder digest not found exactly once")
        head = b"".join(
            signer_info[name].dump() for name in ("version", "sid", "digest_algorithm")
        )
        sd_head = b"".join(
            signed_data[name].dump()
            for name in ("version", "digest_algorithms", "encap_content_info", "certificates")
        )
        return cls(
            attrs_before=attrs[:where],
            attrs_after=attrs[where + len(placeholder) :],
            si_head=head,
            si_signature_algorithm=signer_info["signature_algorithm"].dump(),
            sd_head=sd_head,
            signed_data_oid=content_info["content_type"].dump(),
            timestamp_attr_oid=cms.CMSAttributeType("signature_time_stamp_token").dump(),
            base_size=len(content_info.dump()),
        )

    def signed_attributes(self, document_digest: bytes) -> bytes:
        """The content octets of the signed attributes (without the SET header)."""
        return self.attrs_before + document_digest + self.attrs_after

    def assemble(self, attributes: bytes, signature: bytes, token_der: bytes | None) -> bytes:
        unsigned = b""
        if token_der is not None:
            attribute = tlv(0x30, self.timestamp_attr_oid, tlv(0x31, token_der))
            unsigned = tlv(0xA1, attribute)  # [1] IMPLICIT SET OF Attribute
        signer_info = tlv(
            0x30,
            self.si_head,
            tlv(0xA0, attributes),  # [0] IMPLICIT SET OF Attribute
            self.si_signature_algorithm,
            tlv(0x04, signature),
            unsigned,
        )
        signed_data = tlv(0x30, self.sd_head, tlv(0x31, signer_info))
        return tlv(0x30, self.signed_data_oid, tlv(0xA0, signed_data))


def _content(der: bytes) -> bytes:
    """The content octets of a DER element."""
    first = der[1]
    if first < 0x80:
        return der[2:]
    return der[2 + (first & 0x7F) :]


class TemplateSigner(Signer):
    """A pyHanko :class:`Signer` that signs PAdES SHA-256 signatures from a
    :class:`CmsTemplate`, delegating the raw signature to ``inner`` (a key in memory or a
    PKCS#11 token alike)."""

    def __init__(self, inner: Signer) -> None:
        self.inner = inner
        super().__init__(
            signing_cert=inner.signing_cert,
            cert_registry=inner.cert_registry,
            signature_mechanism=inner.signature_mechanism,
            prefer_pss=inner.prefer_pss,
            embed_roots=inner.embed_roots,
            attribute_certs=inner.attribute_certs,
        )
        self._template: CmsTemplate | None = None
        self._lock = threading.Lock()

    async def async_sign_raw(
        self, data: bytes, digest_algorithm: str, dry_run: bool = False
    ) -> bytes:
        result: bytes = await self.inner.async_sign_raw(data, digest_algorithm, dry_run)
        return result

    def template(self) -> CmsTemplate:
        """The template, made on first use.

        :raises SigningError: (pyHanko's) the signer cannot sign.
        """
        with self._lock:
            if self._template is None:
                placeholder = secrets.token_bytes(32)
                sample = asyncio.run(
                    super().async_sign(
                        placeholder, _DIGEST, use_pades=True,
                        signed_attr_settings=PdfCMSSignedAttributes(),
                    )
                )
                self._template = CmsTemplate.from_sample(sample, placeholder)
            return self._template

    async def async_sign(
        self,
        data_digest: bytes,
        digest_algorithm: str,
        dry_run: bool = False,
        use_pades: bool = False,
        timestamper: TimeStamper | None = None,
        signed_attr_settings: PdfCMSSignedAttributes | None = None,
        is_pdf_sig: bool = True,
        encap_content_info: Any = None,
    ) -> cms.ContentInfo:
        if not self._template_applies(
            digest_algorithm, dry_run, use_pades, signed_attr_settings, is_pdf_sig,
            encap_content_info,
        ):
            result: cms.ContentInfo = await super().async_sign(
                data_digest, digest_algorithm, dry_run=dry_run, use_pades=use_pades,
                timestamper=timestamper, signed_attr_settings=signed_attr_settings,
                is_pdf_sig=is_pdf_sig, encap_content_info=encap_content_info,
            )
            return result
        return cms.ContentInfo.load(await self.sign_der(data_digest, timestamper))

    async def sign_der(self, document_digest: bytes, timestamper: TimeStamper | None) -> bytes:
        """The DER ``ContentInfo`` of a PAdES signature over ``document_digest`` (SHA-256),
        with a signature time-stamp token from ``timestamper`` if given.

        :raises TimestampError: the timestamper gave no token.
        """
        template = self._template
        if template is None:  # made outside the event loop: it runs one of its own
            template = await asyncio.to_thread(self.template)
        attributes = template.signed_attributes(document_digest)
        signature = await self.async_sign_raw(tlv(0x31, attributes), _DIGEST)
        token_der = None
        if timestamper is not None:
            # as pyHanko: the token's imprint is the digest of the signature value
            imprint = hashlib.new(_DIGEST, signature).digest()
            token = await timestamper.async_timestamp(imprint, _DIGEST)
            token_der = token.dump()
        return template.assemble(attributes, signature, token_der)

    def _template_applies(
        self,
        digest_algorithm: str,
        dry_run: bool,
        use_pades: bool,
        settings: PdfCMSSignedAttributes | None,
        is_pdf_sig: bool,
        encap_content_info: Any,
    ) -> bool:
        return (
            digest_algorithm.lower() == _DIGEST
            and not dry_run
            and use_pades
            and is_pdf_sig
            and encap_content_info is None
            and not self.attribute_certs
            and self.unsigned_attr_prov_spec is None
            and self.signed_attr_prov_spec is None
            and (
                settings is None
                or (settings.adobe_revinfo_attr is None and settings.cades_signed_attrs is None)
            )
        )

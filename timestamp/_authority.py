"""An RFC 3161 time-stamping authority over a pyHanko :class:`Signer`."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asn1crypto import cms, core, tsp
from asn1crypto import x509 as asn1_x509
from pyhanko.sign.general import as_signing_certificate_v2
from pyhanko.sign.signers import Signer

from keys import KeyStore, Role

from ._asn1 import (
    IMPRINT_DIGEST_SIZES,
    TimeStampResp,
    has_critical_time_stamping_eku,
    is_void,
    rejection,
)
from ._der import der_integer, tlv
from ._serial import SerialNumberAllocator
from .errors import TimestampError

__all__ = [
    "DEFAULT_ACCURACY",
    "DEMO_POLICY_OID",
    "STATE_FILE_NAME",
    "TimeStampAuthority",
]

log = logging.getLogger(__name__)

#: TSA policy of the demo installation (RFC 3161 §2.4.2 ``policy``). A UUID-based OID under
#: ``2.25`` (ITU-T X.667), which anyone may mint without registration and which collides with
#: no one's arc. A production TSA passes the OID of its published TSA policy instead.
DEMO_POLICY_OID = "2.25.149313554496188706591531738018231863899"

#: How far ``genTime`` may be off from UTC, as promised in every token.
DEFAULT_ACCURACY = dt.timedelta(seconds=1)

#: Name of the serial-number state file inside the ``state_dir`` of :meth:`from_key_store`.
STATE_FILE_NAME = "tsa-serial"

#: PKIStatusInfo of a granted request, DER.
_GRANTED = tsp.PKIStatusInfo({"status": "granted"}).dump()

_SIGNER_DIGESTS = ("sha256", "sha384", "sha512")
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")


def _attribute(attribute_type: str, value: Any) -> Any:
    return cms.CMSAttribute({"type": attribute_type, "values": (value,)})


def _cms_time(moment: dt.datetime) -> Any:
    # RFC 5652 §11.3: UTCTime for 1950-2049, GeneralizedTime otherwise.
    if 1950 <= moment.year < 2050:
        return cms.Time({"utc_time": moment})
    return cms.Time({"generalized_time": moment})


def _accuracy(accuracy: dt.timedelta) -> Any:
    micros_total = accuracy // dt.timedelta(microseconds=1)
    seconds, rest = divmod(micros_total, 1_000_000)
    millis, micros = divmod(rest, 1000)
    fields = {"seconds": seconds, "millis": millis, "micros": micros}
    # Absent fields mean zero; millis and micros must be 1..999 when present (RFC 3161).
    return tsp.Accuracy({name: value for name, value in fields.items() if value})


class TimeStampAuthority:
    """An RFC 3161 TSA: checks ``TimeStampReq`` values and signs ``TSTInfo`` tokens.

    ``genTime`` is the system clock (UTC): this object *is* the time source, so the host must
    keep its clock synchronised (NTP) within ``accuracy``.

    The signer's digest algorithm is fixed per TSA (``signer_digest``, default SHA-256) rather
    than following each request's imprint algorithm: the strength of the TSA's own signature
    is TSA policy, independent of the requester's hash (RFC 3161 does not couple them); one
    algorithm works with every key, including PKCS#11 tokens and signers with a pinned
    mechanism; SHA-256 is also what signing-certificate-v2 uses and what every validator
    accepts.

    >>> tsa = TimeStampAuthority.from_key_store(store, home / "state")   # doctest: +SKIP
    >>> response_der = tsa.respond(request_der)                         # doctest: +SKIP
    """

    def __init__(
        self,
        signer: Signer,
        chain: Sequence[asn1_x509.Certificate],
        state_file: Path,
        *,
        policy: str = DEMO_POLICY_OID,
        accuracy: dt.timedelta = DEFAULT_ACCURACY,
        signer_digest: str = "sha256",
        serial_block: int = 256,
    ) -> None:
        """
        :param signer: signs the tokens; its ``signing_cert`` is the TSA certificate. Only its
            ``async_sign_raw`` is used, so a PKCS#11 signer fits.
        :param chain: CA certificates above the TSA certificate (the root may be included; it
            is never embedded in tokens).
        :param state_file: where the serial-number high-water mark is kept.
        :param policy: the TSA policy OID put into every token.
        :param accuracy: the accuracy promised in every token.
        :param signer_digest: digest algorithm of the token signature.
        :param serial_block: how many serial numbers to reserve per state-file write.
        :raises TimestampError: the signer has no certificate, or the certificate lacks the
            critical timeStamping extended key usage.
        :raises ValueError: an invalid ``policy``, ``accuracy``, ``signer_digest`` or
            ``serial_block``.
        """
        certificate = signer.signing_cert
        if certificate is None:
            raise TimestampError(
                "TSA の署名鍵に証明書がありません。", "The TSA signer has no certificate."
            )
        if not has_critical_time_stamping_eku(certificate):
            raise TimestampError(
                "TSA 証明書には critical な timeStamping 拡張鍵用途だけが必要です(RFC 3161)。",
                "The TSA certificate needs exactly the critical timeStamping EKU (RFC 3161).",
                subject=certificate.subject.human_friendly,
            )
        if not _OID.fullmatch(policy):
            raise ValueError(f"not a dotted OID: {policy!r}")
        if accuracy <= dt.timedelta(0):
            raise ValueError("accuracy must be positive")
        if signer_digest not in _SIGNER_DIGESTS:
            raise ValueError(f"signer_digest must be one of {', '.join(_SIGNER_DIGESTS)}")
        self.signer = signer
        self.certificate = certificate
        self.chain = tuple(chain)
        self.policy = policy
        self.accuracy = accuracy
        self.signer_digest = signer_digest
        self._accuracy_value = _accuracy(accuracy)
        self._serials = SerialNumberAllocator(state_file, serial_block)
        self._template: _TokenTemplate | None = None
        # certReq: the TSA certificate and the CAs up to, not including, the self-signed root.
        seen = {certificate.dump()}
        self._embedded_certs = [certificate]
        for ca in self.chain:
            if ca.self_signed == "no" and ca.dump() not in seen:
                seen.add(ca.dump())
                self._embedded_certs.append(ca)

    @classmethod
    def from_key_store(
        cls,
        store: KeyStore,
        state_dir: Path,
        *,
        policy: str = DEMO_POLICY_OID,
        accuracy: dt.timedelta = DEFAULT_ACCURACY,
        signer_digest: str = "sha256",
        serial_block: int = 256,
    ) -> TimeStampAuthority:
        """The TSA of an installation: the key of :attr:`keys.Role.TSA`, serial numbers in
        ``state_dir`` / :data:`STATE_FILE_NAME`.

        :raises KeyStoreError: the TSA key cannot be loaded.
        :raises TimestampError: the TSA certificate is unfit (see :meth:`__init__`).
        :raises ValueError: see :meth:`__init__`.
        """
        credentials = store.credentials(Role.TSA)
        return cls(
            credentials.signer,
            credentials.chain,
            state_dir / STATE_FILE_NAME,
            policy=policy,
            accuracy=accuracy,
            signer_digest=signer_digest,
            serial_block=serial_block,
        )

    def respond(self, request_der: bytes) -> bytes:
        """Answer a DER ``TimeStampReq`` with a DER ``TimeStampResp``.

        Never raises for bad input: a malformed or unacceptable request gets a *rejection*
        response with the matching failInfo, an internal failure one with ``systemFailure``.

        :raises RuntimeError: called from a thread with a running event loop (use
            :meth:`async_respond` there).
        """
        try:
            request = tsp.TimeStampReq.load(request_der, strict=True)
            request.native  # noqa: B018  # asn1crypto parses lazily: parse everything now
        except Exception:  # asn1crypto raises ValueError, TypeError, OverflowError… on garbage
            log.info("TSA: rejected a malformed request (%d bytes)", len(request_der))
            return bytes(
                rejection("bad_data_format", "Malformed request: not a DER TimeStampReq.").dump()
            )
        response = asyncio.run(self.async_respond(request))
        return bytes(response.dump())

    async def async_respond(self, request: tsp.TimeStampReq) -> tsp.TimeStampResp:
        """Answer a ``TimeStampReq`` with a ``TimeStampResp`` (status granted or rejection).

        Never raises: see :meth:`respond`. The response is returned as parsed from its DER
        encoding, exactly as a remote client would see it.
        """
        try:
            refusal = self._refusal(request)
        except Exception:  # a lazily parsed request that turns out to be malformed
            refusal = rejection("bad_data_format", "Malformed request.")
        if refusal is not None:
            log.info("TSA: rejected a request: %s", refusal["status"]["status_string"].native)
            return TimeStampResp.load(refusal.dump())
        try:
            token_der = await self._issue(request)
        except Exception:
            log.exception("TSA: failed to issue a time-stamp token")
            response = rejection("system_failure", "The TSA failed to issue a token.")
            return TimeStampResp.load(response.dump())
        return TimeStampResp.load(tlv(0x30, _GRANTED, token_der))

    def _refusal(self, request: Any) -> Any | None:
        """The rejection response for an unacceptable request, ``None`` if acceptable."""
        # Raises on malformed content; asn1crypto also refuses SHA-2 AlgorithmIdentifiers with
        # parameters other than absent/NULL, so those end up as bad_data_format.
        request.native  # noqa: B018
        if request["version"].native != "v1":
            return rejection("bad_request", "Unsupported request version; expected 1.")
        algorithm = request["message_imprint"]["hash_algorithm"]
        name = algorithm["algorithm"].native
        size = IMPRINT_DIGEST_SIZES.get(name)
        if size is None:
            return rejection(
                "bad_alg",
                f"Unsupported message imprint hash algorithm {name}; "
                "use SHA-256, SHA-384 or SHA-512.",
            )
        if len(request["message_imprint"]["hashed_message"].native) != size:
            return rejection(
                "bad_data_format", f"The message imprint is not a {size}-byte {name} digest."
            )
        requested_policy = request["req_policy"]
        if not is_void(requested_policy) and requested_policy.dotted != self.policy:
            return rejection(
                "unaccepted_policy",
                f"Policy {requested_policy.dotted} is not supported; this TSA uses {self.policy}.",
            )
        extensions = request["extensions"]
        if not is_void(extensions) and len(extensions) > 0:
            return rejection("unaccepted_extensions", "Request extensions are not supported.")
        return None

    async def _issue(self, request: Any) -> bytes:
        serial_number = self._serials.next()
        now = dt.datetime.now(dt.UTC)
        # Millisecond precision (RFC 3161 allows fractions, DER without trailing zeros), so
        # truncation eats next to nothing of the promised accuracy; microseconds only when
        # the accuracy is finer than a millisecond.
        if self.accuracy >= dt.timedelta(milliseconds=1):
            now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        token_der = await self.token_der(request, serial_number, now)
        log.debug("TSA: issued serial number %d", serial_number)
        return token_der

    async def token_der(self, request: Any, serial_number: int, gen_time: dt.datetime) -> bytes:
        """The DER ``TimeStampToken`` (a CMS ``ContentInfo``) answering ``request``.

        Built by joining pre-encoded parts (see :class:`_TokenTemplate`): asn1crypto would
        re-encode the TSA's certificates and every attribute for each token, which costs far
        more than the signature itself. The result is byte for byte what asn1crypto builds
        from the same fields (tested).
        """
        template = self._template
        if template is None:
            template = self._template = _TokenTemplate.build(self)
        return await template.token(self, request, serial_number, gen_time)



class _TokenTemplate:
    """The parts of a time-stamp token that are the same in every token of one TSA, encoded
    once: policy, accuracy, TSA name, the signingCertificateV2 attribute, the signer
    identifier and algorithms, and the certificates."""

    def __init__(self, parts: dict[str, bytes]) -> None:
        self.parts = parts

    @classmethod
    def build(cls, tsa: TimeStampAuthority) -> _TokenTemplate:
        sample_time = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
        tst_info = tsp.TSTInfo(
            {
                "version": "v1",
                "policy": tsa.policy,
                "message_imprint": {
                    "hash_algorithm": {"algorithm": "sha256"},
                    "hashed_message": bytes(32),
                },
                "serial_number": 1,
                "gen_time": sample_time,
                "accuracy": tsa._accuracy_value,
                "ordering": False,
                "tsa": asn1_x509.GeneralName(name="directory_name", value=tsa.certificate.subject),
            }
        )
        signer_info = tsa.signer.signer_info(
            tsa.signer_digest, cms.CMSAttributes([]), b"\x00"
        )
        certificates = cms.CertificateSet(
            [cms.CertificateChoices(name="certificate", value=c) for c in tsa._embedded_certs]
        )
        parts = {
            "version": tst_info["version"].dump(),
            "policy": tst_info["policy"].dump(),
            "accuracy": tst_info["accuracy"].dump(),
            # ordering BOOLEAN DEFAULT FALSE: DER leaves a default value out
            "ordering": b"",
            "tsa": tst_info["tsa"].dump(),
            "content_type_attr": _attribute("content_type", "tst_info").dump(),
            "signing_cert_attr": _attribute(
                "signing_certificate_v2", as_signing_certificate_v2(tsa.certificate, "sha256")
            ).dump(),
            "message_digest_oid": cms.CMSAttributeType("message_digest").dump(),
            "si_version": signer_info["version"].dump(),
            "si_sid": signer_info["sid"].dump(),
            "si_digest_algorithm": signer_info["digest_algorithm"].dump(),
            "si_signature_algorithm": signer_info["signature_algorithm"].dump(),
            "sd_version": cms.CMSVersion("v3").dump(),
            "tst_info_oid": cms.ContentType("tst_info").dump(),
            "signed_data_oid": cms.ContentType("signed_data").dump(),
            # [0] IMPLICIT SET OF CertificateChoices
            "certificates": b"\xa0" + certificates.dump()[1:],
        }
        return cls(parts)

    async def token(
        self,
        tsa: TimeStampAuthority,
        request: Any,
        serial_number: int,
        gen_time: dt.datetime,
    ) -> bytes:
        parts = self.parts
        nonce = request["nonce"]
        tst_info = tlv(
            0x30,
            parts["version"],
            parts["policy"],
            request["message_imprint"].dump(),
            der_integer(serial_number),
            core.GeneralizedTime(gen_time).dump(),
            parts["accuracy"],
            parts["ordering"],
            b"" if is_void(nonce) else der_integer(nonce.native),
            parts["tsa"],
        )
        digest = hashlib.new(tsa.signer_digest, tst_info).digest()
        attributes = (
            parts["content_type_attr"]
            + _attribute("signing_time", _cms_time(gen_time)).dump()
            + tlv(0x30, parts["message_digest_oid"], tlv(0x31, tlv(0x04, digest)))
            + parts["signing_cert_attr"]
        )
        signature = await tsa.signer.async_sign_raw(tlv(0x31, attributes), tsa.signer_digest)
        signer_info = tlv(
            0x30,
            parts["si_version"],
            parts["si_sid"],
            parts["si_digest_algorithm"],
            tlv(0xA0, attributes),
            parts["si_signature_algorithm"],
            tlv(0x04, signature),
        )
        signed_data = tlv(
            0x30,
            parts["sd_version"],
            tlv(0x31, parts["si_digest_algorithm"]),
            tlv(0x30, parts["tst_info_oid"], tlv(0xA0, tlv(0x04, tst_info))),
            # RFC 3161 §2.4.1: certificates only on request
            parts["certificates"] if request["cert_req"].native else b"",
            tlv(0x31, signer_info),
        )
        return tlv(0x30, parts["signed_data_oid"], tlv(0xA0, signed_data))

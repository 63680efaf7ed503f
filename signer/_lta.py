"""Long-term validation of signed PDFs: bring a file to PAdES B-LTA and keep it there.

A signature stays verifiable after its certificates expire only if the file carries what a
verifier needs (certificates and CRLs, in the document security store, DSS) and a document
timestamp proves that all of it existed while it was still valid. That proof expires with the
TSA's certificate, so before it does, a new document timestamp is added over everything,
including the previous timestamp and its own validation data (ETSI EN 319 142-1 B-LTA, the
archive-timestamp chain of EN 319 102-1 §5.6.3).

:func:`extend_lta` does one such step as incremental updates (the earlier bytes stay a prefix):
one revision with the DSS (every certificate chain of every signature and timestamp in the file,
the new TSA's included, and our CRLs), then one with a new document timestamp.
:func:`inspect_lta` says what a file holds and when its newest timestamp stops proving anything.
Neither touches a database or the network beyond the given TSA.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from asn1crypto import cms, tsp
from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.fields import enumerate_sig_fields
from pyhanko.sign.general import extract_certificate_info
from pyhanko.sign.signers.pdf_signer import PdfTimeStamper
from pyhanko.sign.timestamps import TimeStamper
from pyhanko.sign.validation.dss import DocumentSecurityStore
from pyhanko.sign.validation.errors import NoDSSFoundError
from pyhanko.sign.validation.generic_cms import extract_tst_data_iter
from pyhanko.sign.validation.pdf_embedded import EmbeddedPdfSignature
from pyhanko_certvalidator import ValidationContext

from ._pdf_input import open_for_signing
from ._sign import TrustMaterial
from .errors import InvalidPdfError, LtaError

__all__ = [
    "DIGEST_ALGORITHMS",
    "LtaResult",
    "LtaState",
    "TimestampFacts",
    "WeakAlgorithms",
    "extend_lta",
    "inspect_lta",
    "timestamp_facts",
]

#: Digests a renewal may use, strongest last; the first one not configured as weak is used.
DIGEST_ALGORITHMS = ("sha256", "sha384", "sha512")
_KNOWN_DIGESTS = frozenset({"md5", "sha1", "sha224", *DIGEST_ALGORITHMS})
_KEY_KINDS = ("rsa", "ec", "dsa")
FIELD_PREFIX = "KoinArchiveTimestamp"


@dataclass(frozen=True)
class TimestampFacts:
    """What matters about one RFC 3161 timestamp for keeping a file verifiable."""

    time: dt.datetime  # genTime
    tsa_subject: str
    tsa_serial: str  # hex
    #: Until when this timestamp proves anything: the end of its TSA certificate's validity.
    tsa_not_after: dt.datetime
    #: Hash of the message imprint, e.g. ``sha256``.
    digest_algorithm: str
    #: Key of the TSA: ``rsa``, ``ec``, ``dsa`` … and its size in bits.
    key_algorithm: str
    key_bits: int

    @property
    def algorithms(self) -> str:
        """E.g. ``sha256,rsa2048``."""
        return f"{self.digest_algorithm},{self.key_algorithm}{self.key_bits}"


def timestamp_facts(token: bytes | cms.ContentInfo | cms.SignedData) -> TimestampFacts:
    """The facts of an RFC 3161 time-stamp token (DER ``ContentInfo``, or its ``SignedData``).

    :raises LtaError: the token cannot be read, or does not name its TSA certificate.
    """
    try:
        if isinstance(token, bytes):
            token = cms.ContentInfo.load(token)
        signed_data = token["content"] if isinstance(token, cms.ContentInfo) else token
        info = signed_data["encap_content_info"]["content"].parsed
        if not isinstance(info, tsp.TSTInfo):
            raise ValueError("not a TSTInfo")
        certificate = extract_certificate_info(signed_data).signer_cert
        public_key = certificate.public_key
        return TimestampFacts(
            time=info["gen_time"].native,
            tsa_subject=certificate.subject.human_friendly,
            tsa_serial=f"{certificate.serial_number:x}",
            tsa_not_after=certificate["tbs_certificate"]["validity"]["not_after"].native,
            digest_algorithm=str(info["message_imprint"]["hash_algorithm"]["algorithm"].native),
            key_algorithm=str(public_key.algorithm),
            key_bits=int(public_key.bit_size),
        )
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise LtaError(
            "タイムスタンプトークンを読み取れません。",
            f"The time-stamp token cannot be read ({type(exc).__name__}: {exc}).",
            reason="unreadable_token",
        ) from exc


@dataclass(frozen=True)
class WeakAlgorithms:
    """Algorithms no longer trusted to protect anything (``KOIN_LTA_WEAK_ALGORITHMS``).

    Digests by name (``sha1``); keys as ``rsaN`` / ``ecN`` / ``dsaN`` meaning that kind of key
    of at most N bits (``rsa1024`` makes RSA-1024 and smaller weak).
    """

    digests: frozenset[str] = frozenset()
    keys: tuple[tuple[str, int], ...] = ()

    @classmethod
    def parse(cls, text: str) -> WeakAlgorithms:
        """``"sha1,rsa1024"`` (commas or spaces, any case).

        :raises LtaError: an entry is neither a known digest nor ``rsaN``/``ecN``/``dsaN``.
        """
        digests: set[str] = set()
        keys: list[tuple[str, int]] = []
        for raw in text.replace(",", " ").split():
            entry = raw.strip().lower().replace("-", "")
            kind = next((k for k in _KEY_KINDS if entry.startswith(k)), None)
            if entry in _KNOWN_DIGESTS:
                digests.add(entry)
            elif kind is not None and entry[len(kind):].isdigit():
                keys.append((kind, int(entry[len(kind):])))
            else:
                raise LtaError(
                    f"弱い暗号アルゴリズムの指定 {raw!r} を解釈できません"
                    "(例: sha1,rsa1024)。",
                    f"Cannot understand the weak algorithm {raw!r} (e.g. sha1,rsa1024; digests: "
                    f"{', '.join(sorted(_KNOWN_DIGESTS))}; keys: rsaN, ecN, dsaN).",
                    reason="weak_algorithms",
                )
        return cls(frozenset(digests), tuple(sorted(set(keys))))

    def is_weak(self, digest: str | None, key_algorithm: str | None, key_bits: int | None) -> bool:
        if digest is not None and digest.lower() in self.digests:
            return True
        if key_algorithm is None or key_bits is None:
            return False
        return any(
            kind == key_algorithm.lower() and key_bits <= bits for kind, bits in self.keys
        )

    def weakens(self, facts: TimestampFacts) -> bool:
        return self.is_weak(facts.digest_algorithm, facts.key_algorithm, facts.key_bits)

    def renewal_digest(self) -> str:
        """The digest a renewal uses: the first of :data:`DIGEST_ALGORITHMS` not weak.

        :raises LtaError: every one of them is configured as weak.
        """
        for name in DIGEST_ALGORITHMS:
            if name not in self.digests:
                return name
        raise LtaError(
            "使える強いハッシュ関数がありません(すべて弱いと設定されています)。",
            f"Every digest koin can use ({', '.join(DIGEST_ALGORITHMS)}) is configured as weak.",
            reason="weak_algorithms",
        )

    def __str__(self) -> str:
        return ",".join([*sorted(self.digests), *(f"{k}{b}" for k, b in self.keys)])


@dataclass(frozen=True)
class LtaState:
    """What a signed PDF holds for the long term."""

    size: int
    signatures: int  # regular signatures
    document_timestamps: int
    has_dss: bool
    #: The newest document timestamp, if any.
    newest: TimestampFacts | None
    #: The newest document timestamp covers every signature and a DSS (PAdES B-LTA).
    covers_everything: bool

    @property
    def is_lta(self) -> bool:
        return self.newest is not None and self.covers_everything


@dataclass(frozen=True)
class LtaResult:
    """One renewal: the new file and what its new document timestamp is worth."""

    data: bytes = field(repr=False)
    sha256: str
    previous_size: int
    previous_sha256: str
    newest: TimestampFacts
    #: Certificates and CRLs this renewal added to the DSS.
    certificates_added: int
    crls_added: int
    #: Certificates whose chain could not be completed from the file and our trust material
    #: (their validation data is as complete as it can be; listed for the log).
    unresolved: tuple[str, ...] = ()


def _read(source: bytes | Path) -> bytes:
    if isinstance(source, bytes):
        return source
    try:
        return source.read_bytes()
    except OSError as exc:
        raise LtaError(
            f"ファイル {source} を読めません。", f"Cannot read {source}: {exc.strerror}",
            reason="unreadable",
        ) from exc


def _open(data: bytes) -> PdfFileReader:
    """:raises InvalidPdfError: not a usable PDF (see :func:`open_for_signing`)."""
    return open_for_signing(io.BytesIO(data)).prev


def _doc_timestamp_revisions(reader: PdfFileReader) -> list[tuple[int, EmbeddedPdfSignature]]:
    return sorted(
        ((emb.signed_revision, emb) for emb in reader.embedded_timestamp_signatures),
        key=lambda pair: pair[0],
    )


def _first_dss_revision(reader: PdfFileReader) -> int | None:
    for revision in range(reader.xrefs.total_revisions):
        if "/DSS" in reader.get_historical_root(revision):
            return revision
    return None


def inspect_lta(source: bytes | Path) -> LtaState:
    """What ``source`` holds for the long term (no validation: see ``verify_pdf``).

    :raises InvalidPdfError: not a usable PDF.
    :raises LtaError: it carries no signature, or a timestamp cannot be read.
    """
    data = _read(source)
    try:
        reader = _open(data)
        regular = list(reader.embedded_regular_signatures)
        stamps = _doc_timestamp_revisions(reader)
        dss_revision = _first_dss_revision(reader)
    except InvalidPdfError:
        raise
    except Exception as exc:  # pyHanko raises assorted errors on damaged signatures
        raise LtaError(
            "署名を読み取れません。", f"The signatures cannot be read ({type(exc).__name__}).",
            reason="unreadable_signatures",
        ) from exc
    if not regular and not stamps:
        raise LtaError(
            "この PDF には署名がありません。", "This PDF carries no signature.",
            reason="unsigned",
        )
    newest = None
    covers = False
    if stamps:
        newest_revision, newest_stamp = stamps[-1]
        newest = timestamp_facts(newest_stamp.signed_data)
        covers = (
            dss_revision is not None
            and dss_revision <= newest_revision  # pyHanko adds a B-LTA's DSS with its timestamp
            and all(emb.signed_revision < newest_revision for emb in regular)
        )
    return LtaState(
        size=len(data),
        signatures=len(regular),
        document_timestamps=len(stamps),
        has_dss=dss_revision is not None,
        newest=newest,
        covers_everything=covers,
    )


def _signed_data_in(emb: EmbeddedPdfSignature) -> Iterable[cms.SignedData]:
    """The signature (or document timestamp) itself and every timestamp token inside it."""
    yield emb.signed_data
    for signed in (False, True):
        yield from extract_tst_data_iter(emb.signer_info, signed=signed)


def _key(certificate: asn1_x509.Certificate) -> bytes:
    return hashlib.sha256(certificate.dump()).digest()


async def _chains(
    signed_data: Sequence[cms.SignedData], trust: TrustMaterial
) -> tuple[list[asn1_x509.Certificate], list[str]]:
    """Every certificate of every chain from the signers of ``signed_data`` to our roots
    (roots included), and the subjects whose chain ends nowhere we know."""
    found: dict[bytes, asn1_x509.Certificate] = {}
    unresolved: list[str] = []
    for item in signed_data:
        info = extract_certificate_info(item)
        # Path building only (no validation): expired certificates still need their chain.
        context = ValidationContext(
            trust_roots=list(trust.roots),
            other_certs=[*trust.intermediates, *info.other_certs],
            allow_fetching=False,
        )
        leaf = info.signer_cert
        found.setdefault(_key(leaf), leaf)
        for other in info.other_certs:
            found.setdefault(_key(other), other)
        try:
            paths = await context.path_builder.async_build_paths(leaf)
        except Exception:  # no path (a foreign CA): keep what the token itself carries
            paths = []
        if not paths:
            unresolved.append(leaf.subject.human_friendly)
        for path in paths:
            for certificate in path:
                found.setdefault(_key(certificate), certificate)
    return list(found.values()), sorted(set(unresolved))


def _free_field_name(reader: PdfFileReader) -> str:
    taken = {name for name, _, _ in enumerate_sig_fields(reader)}
    number = 1
    while f"{FIELD_PREFIX}{number}" in taken:
        number += 1
    return f"{FIELD_PREFIX}{number}"


def _existing_dss(reader: PdfFileReader) -> tuple[set[bytes], set[bytes]]:
    try:
        dss = DocumentSecurityStore.read_dss(reader)
    except NoDSSFoundError:
        return set(), set()
    certificates = {_key(c) for c in dss.load_certs()}
    crls: set[bytes] = set()
    for ref in dss.crls:
        stream = ref.get_object()
        crls.add(hashlib.sha256(stream.data).digest())
    return certificates, crls


def _write_dss(
    data: bytes,
    certificates: Sequence[asn1_x509.Certificate],
    crls: Sequence[asn1_crl.CertificateList],
) -> tuple[bytes, int, int]:
    """``data`` plus one revision adding to the DSS whatever of ``certificates`` and ``crls``
    it lacks (``data`` unchanged if it lacks nothing)."""
    reader = _open(data)
    known_certs, known_crls = _existing_dss(reader)
    new_certs = [c for c in certificates if _key(c) not in known_certs]
    new_crls = [c for c in crls if hashlib.sha256(c.dump()).digest() not in known_crls]
    if not new_certs and not new_crls:
        return data, 0, 0
    writer = IncrementalPdfFileWriter(io.BytesIO(data), strict=True)
    DocumentSecurityStore.supply_dss_in_writer(writer, None, certs=new_certs, crls=new_crls)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue(), len(new_certs), len(new_crls)


async def _extend(
    data: bytes, timestamper: TimeStamper, trust: TrustMaterial, md_algorithm: str
) -> LtaResult:
    reader = _open(data)
    try:
        embedded = list(reader.embedded_signatures)
        tokens = [item for emb in embedded for item in _signed_data_in(emb)]
    except Exception as exc:
        raise LtaError(
            "署名を読み取れません。", f"The signatures cannot be read ({type(exc).__name__}).",
            reason="unreadable_signatures",
        ) from exc
    if not embedded:
        raise LtaError(
            "この PDF には署名がありません。", "This PDF carries no signature.",
            reason="unsigned",
        )
    # The TSA that will make the new timestamp: its chain goes into the DSS before it, so that
    # the new timestamp covers its own validation data too.
    probe: cms.ContentInfo = await timestamper.async_dummy_response(md_algorithm)
    certificates, unresolved = await _chains([*tokens, probe["content"]], trust)
    with_dss, certs_added, crls_added = _write_dss(data, certificates, list(trust.crls))

    writer = IncrementalPdfFileWriter(io.BytesIO(with_dss), strict=True)
    stamper = PdfTimeStamper(timestamper, field_name=_free_field_name(writer.prev))
    out = io.BytesIO()
    await stamper.async_timestamp_pdf(writer, md_algorithm, output=out)
    result = out.getvalue()

    reader = _open(result)
    newest_emb = _doc_timestamp_revisions(reader)[-1][1]
    newest = timestamp_facts(newest_emb.signed_data)
    # A TSA may sign with another certificate than the probe's (load balancing): then add
    # that chain too, in a DSS revision after the timestamp.
    extra, more_unresolved = await _chains([newest_emb.signed_data], trust)
    result, more_certs, more_crls = _write_dss(result, extra, list(trust.crls))
    return LtaResult(
        data=result,
        sha256=hashlib.sha256(result).hexdigest(),
        previous_size=len(data),
        previous_sha256=hashlib.sha256(data).hexdigest(),
        newest=newest,
        certificates_added=certs_added + more_certs,
        crls_added=crls_added + more_crls,
        unresolved=tuple(sorted({*unresolved, *more_unresolved})),
    )


def extend_lta(
    source: bytes | Path,
    timestamper: TimeStamper,
    trust: TrustMaterial,
    *,
    md_algorithm: str = "sha256",
) -> LtaResult:
    """Bring a signed PDF to PAdES B-LTA, or keep it there: add the validation data of every
    signature and timestamp in it (certificate chains, the CRLs of ``trust``) to the DSS, and a
    new document timestamp over everything, as incremental updates — ``source`` stays a byte
    prefix of the result.

    :param timestamper: the TSA of the new document timestamp (never the local clock).
    :param trust: our roots, CA certificates and current CRLs.
    :param md_algorithm: digest of the new timestamp (see :meth:`WeakAlgorithms.renewal_digest`).
    :raises InvalidPdfError: ``source`` is not a usable PDF (encrypted, broken, truncated).
    :raises LtaError: it carries no signature, or one cannot be read.
    :raises TimestampError: no TSA returned a valid timestamp (nothing was changed).
    """
    data = _read(source)
    return asyncio.run(_extend(data, timestamper, trust, md_algorithm))


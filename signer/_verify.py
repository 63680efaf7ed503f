"""Verification of signed PDFs: a fail-closed verdict per signature and document timestamp.

Built on pyHanko's validation and difference analysis. What koin adds:

* verdicts as EN 319 102-1 indications with sub-indications and reasons in Japanese and English;
* strict ``/ByteRange`` sanity checks (the gap is exactly the hex ``/Contents``, inside the file,
  not overlapping another signature);
* every revision after a signature classified on its own, and anything that is not a DSS
  update, a document timestamp, form filling / signing, or (amber) annotations makes the
  signature FAILED — never "valid with a note";
* no network access at all: revocation data comes only from the file and our own CRLs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils.decode_limits import DecodeLimits
from pyhanko.pdf_utils.generic import ArrayObject, DictionaryObject, IndirectObject, Reference
from pyhanko.pdf_utils.misc import PdfDecodeLimitError, PdfError
from pyhanko.pdf_utils.reader import HistoricalResolver, PdfFileReader, RawPdfPath
from pyhanko.sign.ades.report import AdESSubIndic
from pyhanko.sign.diff_analysis import (
    DEFAULT_DIFF_POLICY,
    ModificationLevel,
    QualifiedWhitelistRule,
    ReferenceUpdate,
    StandardDiffPolicy,
)
from pyhanko.sign.diff_analysis.commons import compare_dicts
from pyhanko.sign.diff_analysis.policy_api import SuspiciousModification
from pyhanko.sign.diff_analysis.rules_api import RelativeContext
from pyhanko.sign.fields import MDPPerm, enumerate_sig_fields
from pyhanko.sign.validation import pdf_embedded
from pyhanko.sign.validation.dss import DocumentSecurityStore
from pyhanko.sign.validation.errors import SignatureValidationError
from pyhanko.sign.validation.pdf_embedded import EmbeddedPdfSignature
from pyhanko.sign.validation.status import PdfSignatureStatus, TimestampSignatureStatus
from pyhanko_certvalidator import ValidationContext

from ._pdf_input import READ_ERRORS
from .errors import VerifyInputError

__all__ = [
    "Change",
    "ChangeKind",
    "CertificateInfo",
    "Indication",
    "Report",
    "SignatureReport",
    "SubIndication",
    "VerifyPolicy",
    "verify_pdf",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
#: A claimed signing time may run ahead of the TSA's time by this much (clock skew).
SIGNING_TIME_TOLERANCE = dt.timedelta(minutes=5)


class Indication(StrEnum):
    PASSED = "PASSED"
    FAILED = "FAILED"
    INDETERMINATE = "INDETERMINATE"


class SubIndication(StrEnum):
    """EN 319 102-1 sub-indications, plus NO_SIGNATURE (koin: the file holds none)."""

    FORMAT_FAILURE = "FORMAT_FAILURE"
    HASH_FAILURE = "HASH_FAILURE"
    SIG_CRYPTO_FAILURE = "SIG_CRYPTO_FAILURE"
    REVOKED = "REVOKED"
    EXPIRED = "EXPIRED"
    NOT_YET_VALID = "NOT_YET_VALID"
    SIG_CONSTRAINTS_FAILURE = "SIG_CONSTRAINTS_FAILURE"
    CHAIN_CONSTRAINTS_FAILURE = "CHAIN_CONSTRAINTS_FAILURE"
    CERTIFICATE_CHAIN_GENERAL_FAILURE = "CERTIFICATE_CHAIN_GENERAL_FAILURE"
    CRYPTO_CONSTRAINTS_FAILURE = "CRYPTO_CONSTRAINTS_FAILURE"
    TIMESTAMP_ORDER_FAILURE = "TIMESTAMP_ORDER_FAILURE"
    NO_SIGNING_CERTIFICATE_FOUND = "NO_SIGNING_CERTIFICATE_FOUND"
    NO_CERTIFICATE_CHAIN_FOUND = "NO_CERTIFICATE_CHAIN_FOUND"
    REVOKED_NO_POE = "REVOKED_NO_POE"
    REVOKED_CA_NO_POE = "REVOKED_CA_NO_POE"
    OUT_OF_BOUNDS_NO_POE = "OUT_OF_BOUNDS_NO_POE"
    OUT_OF_BOUNDS_NOT_REVOKED = "OUT_OF_BOUNDS_NOT_REVOKED"
    REVOCATION_OUT_OF_BOUNDS_NO_POE = "REVOCATION_OUT_OF_BOUNDS_NO_POE"
    CRYPTO_CONSTRAINTS_FAILURE_NO_POE = "CRYPTO_CONSTRAINTS_FAILURE_NO_POE"
    NO_POE = "NO_POE"
    TRY_LATER = "TRY_LATER"
    SIGNED_DATA_NOT_FOUND = "SIGNED_DATA_NOT_FOUND"
    NO_SIGNATURE = "NO_SIGNATURE"


# Plain-language reasons: (Japanese, English).
_REASONS: dict[SubIndication, tuple[str, str]] = {
    SubIndication.FORMAT_FAILURE: (
        "署名の形式が壊れているか、規格に沿っていません。",
        "The signature is malformed or does not follow the standard.",
    ),
    SubIndication.HASH_FAILURE: (
        "署名後に文書の内容が変更されています(ハッシュ値が一致しません)。",
        "The document was altered after signing (the hash does not match).",
    ),
    SubIndication.SIG_CRYPTO_FAILURE: (
        "署名値の検証に失敗しました(鍵と署名が一致しません)。",
        "The signature value does not verify with the signer's key.",
    ),
    SubIndication.REVOKED: (
        "署名者の証明書は署名の時点より前に失効しています。",
        "The signer's certificate was revoked before the signature was made.",
    ),
    SubIndication.EXPIRED: (
        "署名者の証明書の有効期限が切れた後に署名されています。",
        "The signature was made after the signer's certificate had expired.",
    ),
    SubIndication.NOT_YET_VALID: (
        "署名者の証明書の有効期間が始まる前に署名されています。",
        "The signature was made before the signer's certificate became valid.",
    ),
    SubIndication.SIG_CONSTRAINTS_FAILURE: (
        "署名後に許されない変更が加えられています。",
        "The document was changed after signing in a way that is not allowed.",
    ),
    SubIndication.CHAIN_CONSTRAINTS_FAILURE: (
        "証明書チェーンが制約を満たしていません。",
        "The certificate chain does not satisfy its constraints.",
    ),
    SubIndication.CERTIFICATE_CHAIN_GENERAL_FAILURE: (
        "証明書チェーンを検証できませんでした。",
        "The certificate chain could not be validated.",
    ),
    SubIndication.CRYPTO_CONSTRAINTS_FAILURE: (
        "安全でない暗号アルゴリズムが使われています。",
        "The signature uses a cryptographic algorithm considered unsafe.",
    ),
    SubIndication.TIMESTAMP_ORDER_FAILURE: (
        "署名時刻とタイムスタンプの時刻の順序が矛盾しています。",
        "The claimed signing time and the timestamps are in an impossible order.",
    ),
    SubIndication.NO_SIGNING_CERTIFICATE_FOUND: (
        "署名者の証明書が見つかりません。",
        "The signer's certificate could not be found.",
    ),
    SubIndication.NO_CERTIFICATE_CHAIN_FOUND: (
        "署名者の証明書は信頼できる認証局につながっていません。",
        "The signer's certificate does not chain to a trusted authority.",
    ),
    SubIndication.REVOKED_NO_POE: (
        "署名者の証明書は失効しており、失効前に署名された証拠がありません。",
        "The signer's certificate is revoked and there is no proof the signature predates it.",
    ),
    SubIndication.REVOKED_CA_NO_POE: (
        "認証局の証明書が失効しています。",
        "A CA certificate in the chain is revoked.",
    ),
    SubIndication.OUT_OF_BOUNDS_NO_POE: (
        "署名者の証明書は有効期間外で、期間内に署名された証拠(タイムスタンプ)がありません。",
        "The signer's certificate is outside its validity period and no timestamp proves the "
        "signature was made within it.",
    ),
    SubIndication.OUT_OF_BOUNDS_NOT_REVOKED: (
        "署名者の証明書は有効期間外です。",
        "The signer's certificate is outside its validity period.",
    ),
    SubIndication.REVOCATION_OUT_OF_BOUNDS_NO_POE: (
        "失効情報が古く、署名時点の状態を確認できません。",
        "The revocation information is outdated; the status at signing time cannot be shown.",
    ),
    SubIndication.CRYPTO_CONSTRAINTS_FAILURE_NO_POE: (
        "弱くなった暗号アルゴリズムが使われ、その前に存在した証拠がありません。",
        "A weakened algorithm is used and there is no proof of existence before that.",
    ),
    SubIndication.NO_POE: (
        "署名の存在時刻を示す証拠がありません。",
        "There is no proof of when the signature existed.",
    ),
    SubIndication.TRY_LATER: (
        "失効情報を確認できませんでした。時間をおいて再度確認してください。",
        "Revocation status could not be checked now; try again later.",
    ),
    SubIndication.SIGNED_DATA_NOT_FOUND: (
        "署名の対象データが見つかりません。",
        "The signed data could not be found.",
    ),
    SubIndication.NO_SIGNATURE: (
        "この PDF には電子署名がありません。",
        "This PDF carries no electronic signature.",
    ),
}

SUMMARY_PASSED = (
    "署名済みであり、すべての署名が有効です。",
    "Signed, and all signatures are valid.",
)
SUMMARY_FAILED = (
    "無効な署名があるか、署名後に文書が改ざんされています。",
    "At least one signature is invalid, or the document was altered after signing.",
)
SUMMARY_INDETERMINATE = (
    "署名の有効性を確定できませんでした。",
    "The validity of at least one signature could not be established.",
)


class ChangeKind(StrEnum):
    NONE = "none"
    DSS = "dss"
    DOCUMENT_TIMESTAMP = "document_timestamp"
    FORM_FILL_OR_SIGNING = "form_fill_or_signing"
    ANNOTATIONS = "annotations"
    OTHER = "other"


_CHANGE_TEXT: dict[ChangeKind, tuple[str, str]] = {
    ChangeKind.NONE: ("変更なし", "no change"),
    ChangeKind.DSS: ("検証情報(DSS)の追加", "validation data (DSS) added"),
    ChangeKind.DOCUMENT_TIMESTAMP: ("文書タイムスタンプの追加", "document timestamp added"),
    ChangeKind.FORM_FILL_OR_SIGNING: ("フォーム入力または署名の追加", "form filling or signing"),
    ChangeKind.ANNOTATIONS: ("注釈の追加・変更", "annotations added or changed"),
    ChangeKind.OTHER: ("内容または構造の変更", "content or structure changed"),
}


@dataclass(frozen=True)
class CertificateInfo:
    subject: str
    common_name: str | None
    organization: str | None
    title: str | None
    issuer: str
    serial_number: str
    not_before: dt.datetime
    not_after: dt.datetime
    sha256_fingerprint: str

    @classmethod
    def of(cls, certificate: asn1_x509.Certificate) -> CertificateInfo:
        subject = certificate.subject.native
        return cls(
            subject=certificate.subject.human_friendly,
            common_name=_first(subject.get("common_name")),
            organization=_first(subject.get("organization_name")),
            title=_first(subject.get("title")),
            issuer=certificate.issuer.human_friendly,
            serial_number=f"{certificate.serial_number:x}",
            not_before=certificate["tbs_certificate"]["validity"]["not_before"].native,
            not_after=certificate["tbs_certificate"]["validity"]["not_after"].native,
            sha256_fingerprint=hashlib.sha256(certificate.dump()).hexdigest(),
        )


def _first(value: Any) -> str | None:
    if isinstance(value, list):
        return str(value[0]) if value else None
    return None if value is None else str(value)


@dataclass(frozen=True)
class Change:
    """One revision after a signature and what it did."""

    revision: int  # 1-based
    kind: ChangeKind
    allowed: bool
    description_ja: str
    description_en: str


@dataclass
class SignatureReport:
    index: int  # 1-based, in file order
    kind: str  # "signature" or "document_timestamp"
    field_name: str
    indication: Indication
    subindication: SubIndication | None
    reason_ja: str
    reason_en: str
    signer: CertificateInfo | None = None
    chain: list[CertificateInfo] = field(default_factory=list)
    position: str | None = None
    claimed_signing_time: dt.datetime | None = None
    timestamp_time: dt.datetime | None = None
    best_signature_time: dt.datetime | None = None
    tsa_name: str | None = None
    pades_level: str | None = None
    subfilter: str | None = None
    digest_algorithm: str | None = None
    signed_revision: int | None = None  # 1-based
    total_revisions: int | None = None
    covers_whole_document: bool = False
    changes_after: list[Change] = field(default_factory=list)
    certification: str | None = None  # DocMDP permission of a certification signature
    byte_range: list[int] | None = None
    reason: str | None = None
    location: str | None = None
    details: list[str] = field(default_factory=list)  # English technical notes

    @property
    def coverage_ja(self) -> str:
        if self.covers_whole_document:
            return "文書全体"
        return f"版 {self.signed_revision} / {self.total_revisions}"

    @property
    def coverage_en(self) -> str:
        if self.covers_whole_document:
            return "whole document"
        return f"revision {self.signed_revision} of {self.total_revisions}"


@dataclass
class Report:
    indication: Indication
    subindication: SubIndication | None
    summary_ja: str
    summary_en: str
    signatures: list[SignatureReport]
    revisions: int
    sha256: str
    size: int
    validation_time: dt.datetime

    @property
    def passed(self) -> bool:
        return self.indication is Indication.PASSED

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (datetimes as ISO 8601 strings)."""
        data = _jsonable(asdict(self))
        for sig_data, sig in zip(data["signatures"], self.signatures, strict=True):
            sig_data["coverage_ja"] = sig.coverage_ja
            sig_data["coverage_en"] = sig.coverage_en
        return data  # type: ignore[no-any-return]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, StrEnum):
        return value.value
    return value


@dataclass(frozen=True)
class VerifyPolicy:
    """What a verification trusts and how much work it accepts.

    Revocation data comes only from the file itself and ``crls`` (our own CRLs); nothing is
    ever fetched from URLs inside an upload.
    """

    trust_roots: Sequence[asn1_x509.Certificate]
    other_certs: Sequence[asn1_x509.Certificate] = ()
    crls: Sequence[asn1_crl.CertificateList] = ()
    max_bytes: int = DEFAULT_MAX_BYTES
    decode_limits: DecodeLimits = field(default_factory=DecodeLimits)
    #: Verify as of this moment (an auditor's "was it valid on …"); None = now.
    validation_time: dt.datetime | None = None

    def validation_context(
        self,
        dss: DocumentSecurityStore | None,
        moment: dt.datetime | None = None,
        *,
        retroactive_revinfo: bool = False,
    ) -> ValidationContext:
        """:param retroactive_revinfo: accept revocation data issued after ``moment`` (used
            when validating at a time proven by a timestamp, EN 319 102-1 past validation)."""
        kwargs: dict[str, Any] = {
            "trust_roots": list(self.trust_roots),
            "other_certs": list(self.other_certs),
            "crls": list(self.crls),
            "allow_fetching": False,
            "revocation_mode": "hard-fail",
            "retroactive_revinfo": retroactive_revinfo,
        }
        moment = moment or self.validation_time
        if moment is not None:
            kwargs["moment"] = moment
        if dss is not None:
            return dss.as_validation_context(kwargs)
        return ValidationContext(**kwargs)


def verify_pdf(source: bytes | Path, policy: VerifyPolicy) -> Report:
    """Verify every signature and document timestamp in a PDF.

    :raises VerifyInputError: the input is too large, not a PDF, unreadable or encrypted
        (the reason is in the message; map it to a 4xx in web code).
    """
    data = _read_input(source, policy.max_bytes)
    reader = _open(data, policy)
    now = policy.validation_time or dt.datetime.now(dt.UTC)
    try:
        dss: DocumentSecurityStore | None = DocumentSecurityStore.read_dss(reader)
    except Exception:  # no DSS, or a malformed one (then it simply adds nothing)
        dss = None
    total = reader.xrefs.total_revisions

    signature_reports: list[SignatureReport] = []
    embedded: list[tuple[SignatureReport, EmbeddedPdfSignature | None]] = []
    try:
        fields = list(enumerate_sig_fields(reader, filled_status=True))
    except Exception as exc:
        raise _unreadable(exc) from exc
    classifier = _RevisionClassifier(reader)
    archive = _build_archive(reader, data, fields, policy, dss)
    for index, (name, _value, field_ref) in enumerate(fields, start=1):
        report, emb = _verify_one(
            reader, data, index, name, field_ref, policy, dss, total, now, classifier, archive
        )
        signature_reports.append(report)
        embedded.append((report, emb))
    _check_gaps_do_not_overlap(embedded)
    _check_timestamp_order(embedded)
    _assign_pades_levels(reader, embedded)

    return _overall(signature_reports, total, data, now)


# -- input ----------------------------------------------------------------------------------


def _read_input(source: bytes | Path, max_bytes: int) -> bytes:
    if isinstance(source, Path):
        try:
            size = source.stat().st_size
        except OSError as exc:
            raise VerifyInputError(
                f"ファイル {source} を読めません。", f"Cannot read {source}: {exc}",
                reason="unreadable",
            ) from exc
        if size > max_bytes:
            raise _too_large(size, max_bytes)
        data = source.read_bytes()
    else:
        data = source
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes)
    if not data:
        raise VerifyInputError(
            "ファイルが空です。", "The file is empty.", reason="empty", status=400
        )
    if b"%PDF-" not in data[:1024]:
        raise VerifyInputError(
            "PDF ファイルではありません。", "Not a PDF file.", reason="not_pdf", status=415
        )
    return data


def _too_large(size: int, limit: int) -> VerifyInputError:
    return VerifyInputError(
        f"ファイルが大きすぎます({size // (1024 * 1024)} MiB、"
        f"上限 {limit // (1024 * 1024)} MiB)。",
        f"The file is too large ({size} bytes; the limit is {limit} bytes).",
        reason="too_large",
        status=413,
    )


def _unreadable(exc: BaseException) -> VerifyInputError:
    if isinstance(exc, PdfDecodeLimitError):
        return VerifyInputError(
            "PDF 内の圧縮データを展開すると大きくなりすぎるため、検証を中止しました。",
            f"The PDF holds compressed data that expands beyond the safety limit ({exc}).",
            reason="decompression_limit",
            status=422,
        )
    return VerifyInputError(
        "PDF の構造が壊れているため読めません。",
        f"The PDF structure is broken and cannot be read ({type(exc).__name__}: {exc}).",
        reason="broken_structure",
        status=422,
    )


def _open(data: bytes, policy: VerifyPolicy) -> PdfFileReader:
    try:
        reader = PdfFileReader(io.BytesIO(data), strict=False, decode_limits=policy.decode_limits)
        encrypted = reader.encrypted
        if not isinstance(reader.root, DictionaryObject):  # parse the trailer and catalog now
            raise PdfError("the document catalog is not a dictionary")
    except READ_ERRORS as exc:
        raise _unreadable(exc) from exc
    if encrypted:
        raise VerifyInputError(
            "暗号化された PDF は検証できません。暗号化を解除したファイルを指定してください。",
            "Encrypted PDFs cannot be verified; upload the file without encryption.",
            reason="encrypted",
            status=422,
        )
    return reader


# -- one signature --------------------------------------------------------------------------


def _failed(
    report: SignatureReport, sub: SubIndication, indication: Indication = Indication.FAILED
) -> None:
    """Downgrade ``report`` to ``indication``/``sub`` unless it is already worse."""
    rank = {Indication.PASSED: 0, Indication.INDETERMINATE: 1, Indication.FAILED: 2}
    if rank[indication] < rank[report.indication]:
        return
    if rank[indication] == rank[report.indication] and report.subindication is not None:
        return
    report.indication = indication
    report.subindication = sub
    report.reason_ja, report.reason_en = _REASONS[sub]


def _verify_one(
    reader: PdfFileReader,
    data: bytes,
    index: int,
    name: str,
    field_ref: Any,
    policy: VerifyPolicy,
    dss: DocumentSecurityStore | None,
    total: int,
    now: dt.datetime,
    classifier: _RevisionClassifier,
    archive: _Archive,
) -> tuple[SignatureReport, EmbeddedPdfSignature | None]:
    report = SignatureReport(
        index=index, kind="signature", field_name=name, indication=Indication.PASSED,
        subindication=None, reason_ja="署名は有効です。", reason_en="The signature is valid.",
        total_revisions=total,
    )
    try:
        field_dict = field_ref.get_object()
        sig_object = field_dict["/V"].get_object()
        if not isinstance(sig_object, DictionaryObject):
            raise ValueError("/V is not a dictionary")
        if sig_object.get("/Type") == "/DocTimeStamp" or (
            sig_object.get("/SubFilter") == "/ETSI.RFC3161"
        ):
            report.kind = "document_timestamp"
        report.subfilter = str(sig_object.get("/SubFilter", "")).lstrip("/") or None
        report.reason = _text(sig_object.get("/Reason"))
        report.location = _text(sig_object.get("/Location"))
        problem = _byte_range_problem(sig_object, data)
        if problem:
            report.details.append(problem)
            _failed(report, SubIndication.FORMAT_FAILURE)
            return report, None
        emb = EmbeddedPdfSignature(reader, field_dict, name)
    except Exception as exc:  # missing /Contents, CMS that does not parse, no signer …
        report.details.append(f"cannot read the signature: {type(exc).__name__}: {exc}")
        _failed(report, SubIndication.FORMAT_FAILURE)
        return report, None

    report.byte_range = [int(v) for v in emb.byte_range]
    report.signed_revision = emb.signed_revision + 1
    report.digest_algorithm = emb.md_algorithm
    try:
        signer_cert = emb.signer_cert
        report.signer = CertificateInfo.of(signer_cert)
        report.position = _position(report.signer)
    except Exception as exc:
        report.details.append(f"no signer certificate: {exc}")
        _failed(report, SubIndication.NO_SIGNING_CERTIFICATE_FOUND, Indication.INDETERMINATE)
        return report, emb

    try:
        status = archive.current.get(name) or _validate(
            emb, report.kind, policy.validation_context(dss)
        )
        if _needs_proof_of_existence(status):
            status = _past_validation(emb, report, status, policy, dss, archive)
    except SignatureValidationError as exc:
        report.details.append(f"validation error: {exc}")
        sub = _from_ades(exc.ades_subindication) or SubIndication.FORMAT_FAILURE
        _failed(report, sub, _indication_of(sub))
        return report, emb
    except Exception as exc:
        report.details.append(f"validation error: {type(exc).__name__}: {exc}")
        _failed(report, SubIndication.FORMAT_FAILURE)
        return report, emb

    try:
        _apply_status(report, emb, status, now)
        _classify_changes(classifier, emb, report, total)
    except Exception as exc:  # e.g. a certificate of the path with an impossible date
        report.details.append(f"cannot evaluate the signature: {type(exc).__name__}: {exc}")
        _failed(report, SubIndication.FORMAT_FAILURE)
    return report, emb


def _validate(
    emb: EmbeddedPdfSignature, kind: str, context: ValidationContext
) -> PdfSignatureStatus | TimestampSignatureStatus:
    if kind == "document_timestamp":
        return asyncio.run(
            pdf_embedded.async_validate_pdf_timestamp(emb, validation_context=context)
        )
    return asyncio.run(
        pdf_embedded.async_validate_pdf_signature(
            emb, signer_validation_context=context, ts_validation_context=context,
            skip_diff=True,  # we classify each later revision ourselves
        )
    )


_OUT_OF_BOUNDS = ("OUT_OF_BOUNDS_NO_POE", "OUT_OF_BOUNDS_NOT_REVOKED", "EXPIRED")


def _out_of_bounds(status: PdfSignatureStatus | TimestampSignatureStatus) -> bool:
    indic = status.trust_problem_indic
    return indic is not None and getattr(indic, "name", "") in _OUT_OF_BOUNDS


def _needs_proof_of_existence(status: PdfSignatureStatus | TimestampSignatureStatus) -> bool:
    """The certificate of the signature, or of its signature timestamp, is out of bounds now
    (expired, typically) while everything else checks out."""
    if not (status.intact and status.valid):
        return False
    if _out_of_bounds(status):
        return True
    if isinstance(status, PdfSignatureStatus):
        tst = status.timestamp_validity
        return tst is not None and tst.intact and tst.valid and _out_of_bounds(tst)
    return False


def _fully_valid(status: PdfSignatureStatus | TimestampSignatureStatus) -> bool:
    if not (status.intact and status.valid) or status.trust_problem_indic is not None:
        return False
    if isinstance(status, PdfSignatureStatus):
        tst = status.timestamp_validity
        return tst is None or (tst.intact and tst.valid and tst.trust_problem_indic is None)
    return True


@dataclass
class _Archive:
    """Times proven by the chain of document timestamps, the evidence record of PAdES
    (EN 319 102-1 §5.6.3): a document timestamp that validates now proves that everything it
    covers existed at its time; an older one, validated as of a time proven by a later one,
    proves its own time in turn. A timestamp never proves its own time."""

    #: ``(0-based signed revision, proven time)`` of each document timestamp established.
    proven: list[tuple[int, dt.datetime]] = field(default_factory=list)
    #: Current-time validation of each document timestamp, by field name (done once).
    current: dict[str, TimestampSignatureStatus] = field(default_factory=dict)

    def poe_for(self, revision: int) -> dt.datetime | None:
        """The earliest proven time of a document timestamp that covers ``revision`` (one
        that signs a later revision), or None."""
        return min((time for signed, time in self.proven if signed > revision), default=None)


def _build_archive(
    reader: PdfFileReader,
    data: bytes,
    fields: Sequence[tuple[str, Any, Any]],
    policy: VerifyPolicy,
    dss: DocumentSecurityStore | None,
) -> _Archive:
    """Establish the document timestamps' times, newest first (see :class:`_Archive`).
    Anything unreadable or invalid simply proves nothing; its own verdict comes later."""
    stamps: list[tuple[str, EmbeddedPdfSignature]] = []
    for name, _value, field_ref in fields:
        try:
            field_dict = field_ref.get_object()
            sig_object = field_dict["/V"].get_object()
            if not isinstance(sig_object, DictionaryObject) or not (
                sig_object.get("/Type") == "/DocTimeStamp"
                or sig_object.get("/SubFilter") == "/ETSI.RFC3161"
            ):
                continue
            if _byte_range_problem(sig_object, data):
                continue
            stamps.append((name, EmbeddedPdfSignature(reader, field_dict, name)))
        except Exception:
            continue
    archive = _Archive()
    for name, emb in sorted(stamps, key=lambda pair: pair[1].signed_revision, reverse=True):
        try:
            status = _validate(emb, "document_timestamp", policy.validation_context(dss))
            assert isinstance(status, TimestampSignatureStatus)
            archive.current[name] = status
            if emb.evaluate_signature_coverage().name not in ("ENTIRE_FILE", "ENTIRE_REVISION"):
                continue
            if _fully_valid(status):
                archive.proven.append((emb.signed_revision, status.timestamp))
                continue
            later = archive.poe_for(emb.signed_revision)
            if later is None or not _needs_proof_of_existence(status):
                continue
            past = _validate(
                emb, "document_timestamp",
                policy.validation_context(dss, later, retroactive_revinfo=True),
            )
            assert isinstance(past, TimestampSignatureStatus)
            if _fully_valid(past) and past.timestamp <= later + SIGNING_TIME_TOLERANCE:
                archive.proven.append((emb.signed_revision, past.timestamp))
        except Exception:  # it proves nothing; _verify_one gives it its verdict
            continue
    return archive


def _past_validation(
    emb: EmbeddedPdfSignature,
    report: SignatureReport,
    status: PdfSignatureStatus | TimestampSignatureStatus,
    policy: VerifyPolicy,
    dss: DocumentSecurityStore | None,
    archive: _Archive,
) -> PdfSignatureStatus | TimestampSignatureStatus:
    """Validate as of a time when the signature provably existed (EN 319 102-1 past
    signature validation), if a certificate is out of bounds now: the time proven by the
    signature's own timestamp (if that validates now), else the earliest time proven by the
    document timestamps after it — and, when the signer's certificate had expired by then, the
    time of its own timestamp, validated as of that proven time. A timestamp never proves
    its own time. Returns ``status`` unchanged if no proof helps."""
    signer = report.signer

    def within(moment: dt.datetime) -> bool:
        return signer is None or signer.not_before <= moment <= signer.not_after

    def as_of(moment: dt.datetime) -> PdfSignatureStatus | TimestampSignatureStatus:
        context = policy.validation_context(dss, moment, retroactive_revinfo=True)
        return _validate(emb, report.kind, context)

    own = _proven_time(status) if report.kind == "signature" else None
    if own is not None and within(own):
        past = as_of(own)
        if _fully_valid(past):
            report.details.append(
                f"validated as of {own.isoformat()}, the time proven by its timestamp"
            )
            return past
    archived = archive.poe_for(emb.signed_revision)
    if archived is None:
        return status
    past = as_of(archived)
    if _fully_valid(past):
        report.details.append(
            f"validated as of {archived.isoformat()}, the time proven by the document "
            "timestamps after it"
        )
        return past
    earlier = _proven_time(past) if report.kind == "signature" else None
    if earlier is not None and earlier < archived and within(earlier):
        past = as_of(earlier)
        if _fully_valid(past):
            report.details.append(
                f"validated as of {earlier.isoformat()}, the time proven by its timestamp "
                f"(itself validated as of {archived.isoformat()}, proven by the document "
                "timestamps after it)"
            )
            return past
    return status


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _position(signer: CertificateInfo) -> str | None:
    if signer.title and signer.common_name:
        return f"{signer.title} — {signer.common_name}"
    return signer.title or signer.common_name


_HEX = re.compile(rb"^<[0-9A-Fa-f\s]*>$")


def _byte_range_problem(sig_object: DictionaryObject, data: bytes) -> str | None:
    """Why ``/ByteRange`` and ``/Contents`` are unacceptable, or None.

    Required: four non-negative integers ``[0 a b c]``, ``a < b``, ``b + c`` within the file,
    and the gap ``[a, b)`` holding exactly the hex string of ``/Contents``.
    """
    if "/ByteRange" not in sig_object or "/Contents" not in sig_object:
        return "/ByteRange or /Contents is missing"
    raw = sig_object.raw_get("/ByteRange")
    try:
        values = [int(v) for v in raw]
    except (TypeError, ValueError):
        return "/ByteRange is not an array of integers"
    if len(values) != 4 or any(
        not isinstance(v, int) or isinstance(v, bool) for v in raw
    ):
        return f"/ByteRange must hold four integers, got {len(values)} values"
    start1, length1, start2, length2 = values
    if start1 != 0 or min(values) < 0 or length1 == 0 or start2 <= length1:
        return f"/ByteRange {values} does not start at 0 with a gap"
    if start2 + length2 > len(data):
        return f"/ByteRange {values} extends past the end of the file ({len(data)} bytes)"
    gap = data[length1:start2]
    if not _HEX.match(gap):
        return "the /ByteRange gap is not exactly the hex string of /Contents"
    contents = sig_object.get("/Contents")
    gap_bytes = bytes.fromhex(re.sub(rb"\s", b"", gap[1:-1]).decode("ascii"))
    if not isinstance(contents, bytes) or gap_bytes != bytes(contents):
        return "/Contents is not the value found in the /ByteRange gap"
    if not contents.strip(b"\x00"):
        return "/Contents is empty"
    return None


def _from_ades(sub: AdESSubIndic | None) -> SubIndication | None:
    if sub is None:
        return None
    name = str(getattr(sub, "name", ""))
    if name in SubIndication.__members__:
        return SubIndication[name]
    # pyHanko's GENERIC: a validation error it could not classify; the structure is at fault.
    return SubIndication.FORMAT_FAILURE


def _indication_of(sub: SubIndication) -> Indication:
    failed = {
        SubIndication.FORMAT_FAILURE, SubIndication.HASH_FAILURE,
        SubIndication.SIG_CRYPTO_FAILURE, SubIndication.REVOKED, SubIndication.EXPIRED,
        SubIndication.NOT_YET_VALID,
    }
    return Indication.FAILED if sub in failed else Indication.INDETERMINATE


def _apply_status(
    report: SignatureReport,
    emb: EmbeddedPdfSignature,
    status: PdfSignatureStatus | TimestampSignatureStatus,
    now: dt.datetime,
) -> None:
    if status.validation_path is not None:
        report.chain = [
            CertificateInfo.of(c) for c in list(status.validation_path)[:-1][::-1]
        ]
    if isinstance(status, TimestampSignatureStatus):
        report.timestamp_time = status.timestamp
        report.tsa_name = report.signer.common_name if report.signer else None
        report.best_signature_time = status.timestamp
    else:
        report.claimed_signing_time = status.signer_reported_dt
        tst = status.timestamp_validity
        if tst is not None:
            report.timestamp_time = tst.timestamp
            report.tsa_name = tst.signing_cert.subject.native.get("common_name")
    if report.kind == "signature":
        perm = emb.docmdp_level
        if perm is not None:
            report.certification = perm.name
    if not status.intact:
        _failed(report, SubIndication.HASH_FAILURE)
        return
    if not status.valid:
        _failed(report, SubIndication.SIG_CRYPTO_FAILURE)
        return
    if status.trust_problem_indic is not None:
        sub = _from_ades(status.trust_problem_indic) or SubIndication.NO_CERTIFICATE_CHAIN_FOUND
        report.details.append(f"signer trust: {status.trust_problem_indic}")
        _failed(report, *_time_aware(sub, report, _proven_time(status)))
    if isinstance(status, PdfSignatureStatus):
        tst = status.timestamp_validity
        if tst is not None:
            if not tst.intact:
                report.details.append("the signature timestamp does not cover this signature")
                _failed(report, SubIndication.HASH_FAILURE)
            elif not tst.valid:
                report.details.append("the signature timestamp's own signature is invalid")
                _failed(report, SubIndication.SIG_CRYPTO_FAILURE)
            elif tst.trust_problem_indic is not None:
                report.details.append(f"TSA trust: {tst.trust_problem_indic}")
                _failed(report, SubIndication.NO_POE, Indication.INDETERMINATE)
            else:
                report.best_signature_time = tst.timestamp
        if report.best_signature_time is None:
            report.best_signature_time = now
        claimed = report.claimed_signing_time
        if (
            claimed is not None
            and report.timestamp_time is not None
            and claimed > report.timestamp_time + SIGNING_TIME_TOLERANCE
        ):
            report.details.append("the claimed signing time is later than the timestamp")
            _failed(report, SubIndication.TIMESTAMP_ORDER_FAILURE, Indication.INDETERMINATE)
        if status.docmdp_ok is False:
            _failed(report, SubIndication.SIG_CONSTRAINTS_FAILURE)


def _proven_time(status: PdfSignatureStatus | TimestampSignatureStatus) -> dt.datetime | None:
    """The time of a timestamp that covers the signature, verifies and chains to a trusted TSA
    (a document timestamp: its own time), or None."""
    if isinstance(status, TimestampSignatureStatus):
        return status.timestamp
    tst = status.timestamp_validity
    if tst is None or not (tst.intact and tst.valid) or tst.trust_problem_indic is not None:
        return None
    return tst.timestamp


def _time_aware(
    sub: SubIndication, report: SignatureReport, proven: dt.datetime | None
) -> tuple[SubIndication, Indication]:
    """Turn an 'out of bounds' trust problem into NOT_YET_VALID (FAILED) when a verified,
    trusted timestamp (``proven``, see :func:`_proven_time`) shows the signature existed
    before the certificate became valid.

    A timestamp after expiry proves nothing of the kind: it bounds the signing time from
    above only, so an expired certificate stays INDETERMINATE / OUT_OF_BOUNDS_NO_POE.
    """
    signer = report.signer
    if signer is not None and proven is not None and sub in (
        SubIndication.OUT_OF_BOUNDS_NO_POE, SubIndication.OUT_OF_BOUNDS_NOT_REVOKED,
        SubIndication.EXPIRED, SubIndication.NOT_YET_VALID,
    ):
        if proven < signer.not_before:
            return SubIndication.NOT_YET_VALID, Indication.FAILED
        if proven > signer.not_after:
            return SubIndication.OUT_OF_BOUNDS_NO_POE, Indication.INDETERMINATE
    return sub, _indication_of(sub)


# -- what happened after the signature -------------------------------------------------------


def _classify_changes(
    classifier: _RevisionClassifier,
    emb: EmbeddedPdfSignature,
    report: SignatureReport,
    total: int,
) -> None:
    coverage = emb.evaluate_signature_coverage()
    report.covers_whole_document = coverage.name == "ENTIRE_FILE"
    if coverage.name not in ("ENTIRE_FILE", "ENTIRE_REVISION"):
        report.details.append(f"byte range coverage: {coverage.name}")
        _failed(report, SubIndication.FORMAT_FAILURE)
        return
    signed = emb.signed_revision
    docmdp = emb.docmdp_level if report.kind == "signature" else None
    for revision in range(signed + 1, total):
        kind, detail = classifier.classify(revision, docmdp)
        allowed = kind in (
            ChangeKind.NONE, ChangeKind.DSS, ChangeKind.DOCUMENT_TIMESTAMP,
            ChangeKind.FORM_FILL_OR_SIGNING,
        ) or (kind is ChangeKind.ANNOTATIONS and docmdp is MDPPerm.ANNOTATE)
        if kind is ChangeKind.FORM_FILL_OR_SIGNING and docmdp is MDPPerm.NO_CHANGES:
            allowed = False
        ja, en = _CHANGE_TEXT[kind]
        report.changes_after.append(Change(revision + 1, kind, allowed, ja, en))
        if detail:
            report.details.append(f"revision {revision + 1}: {detail}")
        if allowed:
            continue
        if kind is ChangeKind.ANNOTATIONS and docmdp is None:
            _failed(report, SubIndication.SIG_CONSTRAINTS_FAILURE, Indication.INDETERMINATE)
            report.reason_ja = (
                "署名後に注釈が追加・変更されています。内容が隠されていないか確認してください。"
            )
            report.reason_en = (
                "Annotations were added or changed after signing; check that they hide nothing."
            )
        else:
            _failed(report, SubIndication.SIG_CONSTRAINTS_FAILURE)


def _signature_kinds_by_revision(reader: PdfFileReader) -> dict[int, str]:
    kinds: dict[int, str] = {}
    try:
        for _name, value, _ref in enumerate_sig_fields(reader, filled_status=True):
            sig = value.get_object() if value is not None else None
            ref = getattr(value, "reference", None)
            if sig is None or ref is None:
                continue
            revision = reader.xrefs.get_introducing_revision(ref)
            is_ts = sig.get("/Type") == "/DocTimeStamp"
            kinds[revision] = "document_timestamp" if is_ts else "signature"
    except Exception:  # classification falls back to the diff policy alone
        pass
    return kinds


class _AnnotationAdditionRule(QualifiedWhitelistRule):
    """Clear, at level ANNOTATIONS, pages whose only change is new (non-widget) annotations.

    pyHanko's standard policy never reports ``ModificationLevel.ANNOTATIONS``: its form rule
    explains new signature widgets only, so an added comment would count as "other". Cleared
    here: the page (changed in ``/Annots`` alone, nothing removed), its ``/Annots`` array, and
    the fresh objects of each new annotation. An annotation that reuses an existing object
    number, or is a widget or a field, is left unexplained (and so stays "other").
    """

    def apply_qualified(
        self, old: HistoricalResolver, new: HistoricalResolver
    ) -> Iterator[tuple[ModificationLevel, ReferenceUpdate]]:
        pages = _page_refs(new)
        if pages != _page_refs(old):
            return  # page tree changes are for the other rules to reject
        for page_ref in pages:
            old_page, new_page = old(page_ref), new(page_ref)
            old_annots, new_annots = _annot_refs(old_page), _annot_refs(new_page)
            if old_annots is None or new_annots is None or not old_annots < new_annots:
                continue  # nothing added, something removed, or not an array of references
            added = new_annots - old_annots
            if not compare_dicts(old_page, new_page, frozenset({"/Annots"}), raise_exc=False):
                continue
            fresh: set[Reference] = set()
            for ref in added:
                annot = new(ref)
                if (
                    not old.is_ref_unassignable(ref)
                    or not isinstance(annot, DictionaryObject)
                    or annot.get("/Subtype") in (None, "/Widget")
                    or "/FT" in annot
                    or "/Parent" in annot
                ):
                    break
                fresh.add(ref)
                fresh |= new.collect_dependencies(annot, since_revision=new.revision)
            else:
                level = ModificationLevel.ANNOTATIONS
                yield level, ReferenceUpdate(page_ref)  # only /Annots differs (checked above)
                array = new_page.raw_get("/Annots")
                if isinstance(array, IndirectObject):
                    context = RelativeContext(page_ref, RawPdfPath("/Annots"))
                    yield level, ReferenceUpdate(array.reference, context)
                for ref in fresh:
                    if old.is_ref_unassignable(ref):
                        yield level, ReferenceUpdate(ref)


def _page_refs(resolver: HistoricalResolver) -> list[Reference]:
    """Page object references in document order (at most 10,000 page tree nodes)."""
    pages: list[Reference] = []
    pending = [resolver.root.raw_get("/Pages")]
    seen: set[Reference] = set()
    while pending and len(seen) < 10_000:
        node = pending.pop()
        if not isinstance(node, IndirectObject) or node.reference in seen:
            return []
        seen.add(node.reference)
        value = node.get_object()
        if not isinstance(value, DictionaryObject):
            return []
        if value.get("/Type") == "/Page":
            pages.append(node.reference)
            continue
        kids = value.raw_get("/Kids") if "/Kids" in value else None
        kids = kids.get_object() if isinstance(kids, IndirectObject) else kids
        if not isinstance(kids, ArrayObject):
            return []
        pending.extend(reversed(list(kids)))
    return pages


def _annot_refs(page: Any) -> set[Reference] | None:
    """The annotations of ``page`` as references (empty without ``/Annots``), None if odd."""
    if not isinstance(page, DictionaryObject):
        return None
    if "/Annots" not in page:
        return set()
    annots = page.raw_get("/Annots")
    annots = annots.get_object() if isinstance(annots, IndirectObject) else annots
    if not isinstance(annots, ArrayObject) or not all(
        isinstance(a, IndirectObject) for a in annots
    ):
        return None
    return {a.reference for a in annots}


#: pyHanko's default policy plus the recognition of added annotations (amber, not "other").
_DIFF_POLICY = StandardDiffPolicy(
    global_rules=[*DEFAULT_DIFF_POLICY.global_rules, _AnnotationAdditionRule()],
    form_rule=DEFAULT_DIFF_POLICY.form_rule,
)


class _RevisionClassifier:
    """Classifies revisions of one file, each (revision, DocMDP) pair once: every signature
    asks about all revisions after its own, and the diff is the costly part."""

    def __init__(self, reader: PdfFileReader) -> None:
        self.reader = reader
        # Signature dictionaries by the revision that introduced them, to name timestamps.
        self.sig_kinds = _signature_kinds_by_revision(reader)
        self._seen: dict[tuple[int, MDPPerm | None], tuple[ChangeKind, str | None]] = {}

    def classify(self, revision: int, docmdp: MDPPerm | None) -> tuple[ChangeKind, str | None]:
        key = (revision, docmdp)
        if key not in self._seen:
            self._seen[key] = _classify_revision(self.reader, revision, docmdp, self.sig_kinds)
        return self._seen[key]


def _classify_revision(
    reader: PdfFileReader, revision: int, docmdp: MDPPerm | None, sig_kinds: dict[int, str]
) -> tuple[ChangeKind, str | None]:
    try:
        result = _DIFF_POLICY.apply(
            reader.get_historical_resolver(revision - 1),
            reader.get_historical_resolver(revision),
            field_mdp_spec=None,
            doc_mdp=docmdp,
        )
    except SuspiciousModification as exc:
        return ChangeKind.OTHER, str(exc)
    except Exception as exc:  # the diff could not be computed: fail closed
        return ChangeKind.OTHER, f"difference analysis failed: {type(exc).__name__}: {exc}"
    level = result.modification_level
    if level is ModificationLevel.NONE:
        return ChangeKind.NONE, None
    if level is ModificationLevel.LTA_UPDATES:
        if sig_kinds.get(revision) == "document_timestamp":
            return ChangeKind.DOCUMENT_TIMESTAMP, None
        return ChangeKind.DSS, None
    if level is ModificationLevel.FORM_FILLING:
        return ChangeKind.FORM_FILL_OR_SIGNING, None
    if level is ModificationLevel.ANNOTATIONS:
        return ChangeKind.ANNOTATIONS, None
    return ChangeKind.OTHER, None


# -- checks across signatures -----------------------------------------------------------------


def _check_gaps_do_not_overlap(
    embedded: list[tuple[SignatureReport, EmbeddedPdfSignature | None]],
) -> None:
    gaps = [
        (report, (report.byte_range[1], report.byte_range[2]))
        for report, _ in embedded
        if report.byte_range
    ]
    for i, (report_a, (a1, a2)) in enumerate(gaps):
        for report_b, (b1, b2) in gaps[i + 1 :]:
            if a1 < b2 and b1 < a2:
                for report in (report_a, report_b):
                    report.details.append("its /Contents gap overlaps another signature's")
                    _failed(report, SubIndication.FORMAT_FAILURE)


def _check_timestamp_order(
    embedded: list[tuple[SignatureReport, EmbeddedPdfSignature | None]],
) -> None:
    """A document timestamp must not predate a timestamp of a revision it covers."""
    ordered = sorted(
        (r for r, _ in embedded if r.signed_revision is not None and r.timestamp_time),
        key=lambda r: r.signed_revision or 0,
    )
    latest: dt.datetime | None = None
    for report in ordered:
        assert report.timestamp_time is not None
        if latest is not None and report.timestamp_time + SIGNING_TIME_TOLERANCE < latest:
            report.details.append("its timestamp predates a timestamp of an earlier revision")
            _failed(report, SubIndication.TIMESTAMP_ORDER_FAILURE, Indication.INDETERMINATE)
        latest = max(latest, report.timestamp_time) if latest else report.timestamp_time


def _assign_pades_levels(
    reader: PdfFileReader, embedded: list[tuple[SignatureReport, EmbeddedPdfSignature | None]]
) -> None:
    dss_revision = _first_dss_revision(reader)
    doc_ts_revisions = [
        r.signed_revision for r, _ in embedded
        if r.kind == "document_timestamp" and r.signed_revision
    ]
    for report, emb in embedded:
        if report.kind != "signature" or emb is None or report.subfilter != "ETSI.CAdES.detached":
            continue
        if report.timestamp_time is None:
            has_doc_ts = any(rev > (report.signed_revision or 0) for rev in doc_ts_revisions)
            report.pades_level = "B-T" if has_doc_ts else "B-B"
            continue
        level = "B-T"
        signed = report.signed_revision or 0
        if dss_revision is not None and dss_revision + 1 > signed:
            level = "B-LT"
            if any(rev >= dss_revision + 1 for rev in doc_ts_revisions):
                level = "B-LTA"
        report.pades_level = level


def _first_dss_revision(reader: PdfFileReader) -> int | None:
    """0-based revision that introduced the /DSS, if any."""
    for revision in range(reader.xrefs.total_revisions):
        try:
            root = reader.get_historical_root(revision)
        except Exception:
            continue
        if "/DSS" in root:
            return revision
    return None


def _overall(
    signatures: list[SignatureReport], revisions: int, data: bytes, now: dt.datetime
) -> Report:
    digest = hashlib.sha256(data).hexdigest()
    if not signatures:
        ja, en = _REASONS[SubIndication.NO_SIGNATURE]
        return Report(
            Indication.FAILED, SubIndication.NO_SIGNATURE, ja, en, [], revisions, digest,
            len(data), now,
        )
    indications = {s.indication for s in signatures}
    if Indication.FAILED in indications:
        indication, (ja, en) = Indication.FAILED, SUMMARY_FAILED
    elif Indication.INDETERMINATE in indications:
        indication, (ja, en) = Indication.INDETERMINATE, SUMMARY_INDETERMINATE
    else:
        indication, (ja, en) = Indication.PASSED, SUMMARY_PASSED
    worst = next((s.subindication for s in signatures if s.indication is indication), None)
    return Report(indication, worst, ja, en, signatures, revisions, digest, len(data), now)

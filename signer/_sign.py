"""PAdES signing: ``sign_pdf`` adds one signature (B-B … B-LTA) as an incremental update."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.misc import PdfError
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign import fields, signers
from pyhanko.sign.fields import MDPPerm, SigFieldSpec, SigSeedSubFilter
from pyhanko.sign.general import SigningError as PyHankoSigningError
from pyhanko.sign.signers import Signer
from pyhanko.sign.timestamps import TimeStamper
from pyhanko.sign.validation import read_certification_data
from pyhanko_certvalidator import ValidationContext
from pyhanko_certvalidator.errors import PathBuildingError, PathValidationError

from ._docid import new_document_id
from ._era import format_japanese_datetime
from ._pdf_input import open_for_signing, page_box, resolve_page_index
from ._stamp import Box, StampAppearance, check_box, default_box
from .errors import PlacementError, SigningError

__all__ = [
    "Placement",
    "SignOptions",
    "SignResult",
    "SignatureLevel",
    "SigningContext",
    "TrustMaterial",
    "sign_pdf",
]

log = logging.getLogger(__name__)


def _not_the_no_fetching_notice(record: logging.LogRecord) -> bool:
    # pyHanko warns on every B-LT signature that fetching is off; for us that is by design
    # (all CRLs and certificates come from our own PKI), so the warning would only be noise.
    return "fetching is not allowed" not in record.getMessage()


logging.getLogger("pyhanko.sign.signers.pdf_signer").addFilter(_not_the_no_fetching_notice)

DEFAULT_REASON = "公印に代わる電子署名"
DEFAULT_LOCATION = "Ibaraki Prefecture"
FIELD_PREFIX = "KoinSignature"


class SignatureLevel(StrEnum):
    """PAdES baseline levels (ETSI EN 319 142-1)."""

    B_B = "B-B"
    B_T = "B-T"  # + signature timestamp
    B_LT = "B-LT"  # + certificates and CRLs in the DSS
    B_LTA = "B-LTA"  # + document timestamp over the DSS

    @property
    def needs_timestamp(self) -> bool:
        return self is not SignatureLevel.B_B

    @property
    def embeds_validation_data(self) -> bool:
        return self in (SignatureLevel.B_LT, SignatureLevel.B_LTA)


@dataclass(frozen=True)
class TrustMaterial:
    """What a B-LT signature embeds and checks: trust anchors, CA certificates and CRLs."""

    roots: Sequence[asn1_x509.Certificate]
    intermediates: Sequence[asn1_x509.Certificate] = ()
    crls: Sequence[asn1_crl.CertificateList] = ()

    def validation_context(self, moment: dt.datetime | None = None) -> ValidationContext:
        # Never fetch: every certificate and CRL is ours and already on disk.
        return ValidationContext(
            trust_roots=list(self.roots),
            other_certs=list(self.intermediates),
            crls=list(self.crls),
            allow_fetching=False,
            revocation_mode="hard-fail",
            moment=moment,
        )


@dataclass(frozen=True)
class Placement:
    """Where the visible stamp goes. ``page`` is 1-based (negative from the end, None = last);
    ``box`` is ``(x1, y1, x2, y2)`` in PDF points from the bottom-left corner (None = the
    default bottom-right box)."""

    page: int | None = None
    box: Box | None = None


@dataclass(frozen=True)
class SignOptions:
    level: SignatureLevel = SignatureLevel.B_T
    #: None signs without a visible stamp.
    placement: Placement | None = field(default_factory=Placement)
    #: Certification signature allowing only form filling and further signatures (DocMDP P=2).
    certify: bool = False
    reason: str = DEFAULT_REASON
    location: str = DEFAULT_LOCATION
    document_id: str | None = None
    field_name: str | None = None
    #: Print a QR code linking to ``{verify_base_url}/verify/{document_id}`` on the stamp.
    verify_base_url: str | None = None

    def verify_url(self, document_id: str) -> str | None:
        if not self.verify_base_url:
            return None
        return f"{self.verify_base_url.rstrip('/')}/verify/{document_id}"


@dataclass(frozen=True)
class SigningContext:
    """The parts of signing that live for a whole process: key, TSA client, stamp assets."""

    signer: Signer
    timestamper: TimeStamper | None
    appearance: StampAppearance | None
    trust: TrustMaterial | None = None


@dataclass(frozen=True)
class SignResult:
    document_id: str
    level: SignatureLevel
    field_name: str
    signed_at: dt.datetime
    sha256: str  # of the signed output
    page: int | None  # 1-based page of the stamp, None when invisible
    box: Box | None
    output: Path | None
    data: bytes | None = field(default=None, repr=False)


def sign_pdf(
    source: bytes | Path | BinaryIO,
    context: SigningContext,
    options: SignOptions | None = None,
    *,
    output: Path | None = None,
) -> SignResult:
    """Sign a PDF as an incremental update, keeping earlier signatures valid.

    With ``output`` the result is written to a temporary file beside it and renamed into place,
    so a failure never leaves a partial file; without it the signed bytes are in
    ``SignResult.data``.

    :raises InvalidPdfError: the input is not a usable PDF (see its subclasses).
    :raises PlacementError: page or box do not fit the document.
    :raises SigningError: the level needs a TSA that is not configured, the certificate is not
        valid now, or pyHanko refused (e.g. certifying an already signed PDF).
    :raises TimestampError: no TSA returned a valid timestamp.
    :raises KeyStoreError: the signing key could not be used.
    """
    options = options or SignOptions()
    _check_context(context, options)
    signed_at = dt.datetime.now(dt.UTC)
    _check_certificate_validity(context.signer, signed_at)
    document_id = options.document_id or new_document_id()

    with ExitStack() as stack:
        stream: BinaryIO
        if isinstance(source, bytes):
            stream = io.BytesIO(source)
        elif isinstance(source, Path):
            try:
                stream = stack.enter_context(source.open("rb"))
            except OSError as exc:
                raise SigningError(
                    f"入力ファイル {source} を開けません。", f"Cannot open {source}: {exc}"
                ) from exc
        else:
            stream = source
        writer = open_for_signing(stream)
        reader = writer.prev
        _check_certification(reader, options)
        field_name = options.field_name or _free_field_name(reader)

        page_number: int | None = None
        box: Box | None = None
        if options.placement is not None and context.appearance is not None:
            index = resolve_page_index(reader, options.placement.page)
            page_number = index + 1
            visible = page_box(reader, index)
            qr = options.verify_base_url is not None
            box = check_box(
                options.placement.box or default_box(visible, qr=qr), visible, page_number
            )
        elif options.placement is not None:
            raise SigningError(
                "印影の設定がないため見える署名を付けられません。",
                "No stamp appearance is configured; sign with --no-stamp or run `koin init`.",
            )

        pdf_signer = _pdf_signer(context, options, field_name, page_number, box)
        text_params = None
        if box is not None and context.appearance is not None:
            text_params = {
                "stamp_text": context.appearance.text(
                    format_japanese_datetime(signed_at), document_id
                )
            }
            url = options.verify_url(document_id)
            if url:
                text_params["url"] = url

        if output is None:
            buffer = io.BytesIO()
            _run(pdf_signer, writer, buffer, text_params)
            data = buffer.getvalue()
            digest = hashlib.sha256(data).hexdigest()
            return SignResult(
                document_id, options.level, field_name, signed_at, digest, page_number, box,
                None, data,
            )
        digest = _write_atomically(output, lambda out: _run(pdf_signer, writer, out, text_params))
        return SignResult(
            document_id, options.level, field_name, signed_at, digest, page_number, box, output
        )


def _check_context(context: SigningContext, options: SignOptions) -> None:
    if options.level.needs_timestamp and context.timestamper is None:
        raise SigningError(
            f"{options.level.value} には TSA(タイムスタンプ局)が必要ですが、設定されていません。",
            f"Level {options.level.value} needs a time-stamping authority, none is configured.",
        )
    if options.level.embeds_validation_data and context.trust is None:
        raise SigningError(
            f"{options.level.value} には信頼点と CRL が必要ですが、設定されていません。",
            f"Level {options.level.value} needs trust roots and CRLs to embed; none configured.",
        )


def _check_certificate_validity(signer: Signer, moment: dt.datetime) -> None:
    certificate = signer.signing_cert
    if certificate is None:
        raise SigningError("署名用の証明書がありません。", "The signer has no certificate.")
    validity = certificate["tbs_certificate"]["validity"]
    not_before = validity["not_before"].native
    not_after = validity["not_after"].native
    if not not_before <= moment <= not_after:
        raise SigningError(
            f"署名用証明書の有効期間({not_before:%Y-%m-%d}〜{not_after:%Y-%m-%d})外です。",
            f"The signing certificate is not valid now (valid {not_before:%Y-%m-%d} to "
            f"{not_after:%Y-%m-%d}).",
        )


def _check_certification(reader: PdfFileReader, options: SignOptions) -> None:
    """Refuse changes that an existing certification signature (DocMDP) forbids.

    :raises SigningError: the document allows no changes, or only changes that exclude a new
        visible signature field (P=2 permits signing, but Adobe and pyHanko flag a newly
        created visible field as a modification).
    """
    certification = read_certification_data(reader)
    if certification is None:
        if options.certify and any(
            value is not None for _, value, _ in fields.enumerate_sig_fields(reader)
        ):
            raise SigningError(
                "既に署名がある PDF には認証署名(DocMDP)を付けられません。",
                "A certification signature must be the first signature; this PDF is "
                "already signed.",
            )
        return
    if options.certify:
        raise SigningError(
            "既に認証署名がある PDF に認証署名は付けられません。",
            "The PDF already carries a certification signature; a certification signature "
            "must be the first signature.",
        )
    if certification.permission is MDPPerm.NO_CHANGES:
        raise SigningError(
            "この PDF は認証署名により一切の変更が禁止されているため、署名を追加できません。",
            "The PDF's certification signature forbids any change; no signature can be added.",
        )
    if options.placement is not None:
        raise PlacementError(
            "認証署名のある PDF には見える印影を追加できません"
            "(署名は --no-stamp で付けてください)。",
            "The PDF is certified; a new visible stamp would count as a forbidden change. "
            "Sign without a stamp (--no-stamp).",
        )


def _free_field_name(reader: PdfFileReader) -> str:
    taken = {name for name, _, _ in fields.enumerate_sig_fields(reader)}
    number = 1
    while f"{FIELD_PREFIX}{number}" in taken:
        number += 1
    return f"{FIELD_PREFIX}{number}"


def _pdf_signer(
    context: SigningContext,
    options: SignOptions,
    field_name: str,
    page_number: int | None,
    box: Box | None,
) -> signers.PdfSigner:
    level = options.level
    meta = signers.PdfSignatureMetadata(
        field_name=field_name,
        md_algorithm="sha256",
        subfilter=SigSeedSubFilter.PADES,
        reason=options.reason,
        location=options.location,
        certify=options.certify,
        docmdp_permissions=MDPPerm.FILL_FORMS,
        embed_validation_info=level.embeds_validation_data,
        use_pades_lta=level is SignatureLevel.B_LTA,
        validation_context=(
            context.trust.validation_context() if level.embeds_validation_data and context.trust
            else None
        ),
    )
    field_spec = SigFieldSpec(
        sig_field_name=field_name,
        on_page=(page_number - 1) if page_number else 0,
        box=box,  # type: ignore[arg-type]  # pyHanko accepts floats here
    )
    return signers.PdfSigner(
        meta,
        signer=context.signer,
        timestamper=context.timestamper if level.needs_timestamp else None,
        stamp_style=(
            context.appearance.style_for(box, qr=options.verify_base_url is not None)
            if box and context.appearance
            else None
        ),
        new_field_spec=field_spec,
    )


def _run(
    pdf_signer: signers.PdfSigner,
    writer: IncrementalPdfFileWriter,
    out: BinaryIO,
    text_params: dict[str, str] | None,
) -> None:
    try:
        pdf_signer.sign_pdf(
            writer,
            output=out,
            appearance_text_params=text_params,
        )
    except (PathBuildingError, PathValidationError) as exc:
        raise SigningError(
            "署名用証明書の検証に失敗しました(信頼点・CRL を確認してください)。",
            f"The signing certificate chain could not be validated: {exc}",
        ) from exc
    except (PyHankoSigningError, PdfError) as exc:
        message = str(exc)
        raise SigningError(
            f"署名できませんでした: {message}", f"Signing failed: {message}"
        ) from exc


def _write_atomically(output: Path, write: Callable[[BinaryIO], None]) -> str:
    """Call ``write(stream)`` on a temporary file beside ``output``; rename it into place only
    when complete. Returns the SHA-256 of what was written."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w+b") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            handle.seek(0)
            digest = hashlib.sha256()
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, output)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return digest.hexdigest()

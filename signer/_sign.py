"""PAdES signing: ``sign_pdf`` adds one signature (B-B … B-LTA) as an incremental update."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign import fields, signers
from pyhanko.sign.fields import MDPPerm, SigFieldSpec, SigSeedSubFilter
from pyhanko.sign.general import SigningError as PyHankoSigningError
from pyhanko.sign.signers import Signer
from pyhanko.sign.signers.pdf_signer import PdfTBSDocument
from pyhanko.sign.timestamps import TimeStamper
from pyhanko.sign.validation import read_certification_data
from pyhanko_certvalidator import ValidationContext
from pyhanko_certvalidator.errors import PathBuildingError, PathValidationError

from ._cms_template import TemplateSigner
from ._docid import new_document_id
from ._era import format_japanese_datetime
from ._pdf_input import (
    READ_ERRORS,
    broken_structure,
    open_for_signing,
    page_box,
    resolve_page_index,
)
from ._prebuilt import StampNotCovered
from ._stamp import Box, StampAppearance, check_box, default_box
from .errors import (
    InvalidPdfError,
    PlacementError,
    SigningError,
    UnsignablePdfError,
    VerifyInputError,
)

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


class _FastState:
    """What the fast path of one :class:`SigningContext` prepares once: the CMS template
    signer and the size of a time-stamp token."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.template_signer: TemplateSigner | None = None
        self.token_size: int | None = None


@dataclass(frozen=True)
class SigningContext:
    """The parts of signing that live for a whole process: key, TSA client, stamp assets.

    Hold one per process (or per worker) and reuse it: with ``fast`` (the default) the first
    signature prepares a CMS template, the stamp's font subset and seal image, and later ones
    only fill in what changes (see ``docs`` in ``bench/README.md``). ``fast=False`` signs with
    pyHanko's stock pipeline; both give equivalent signatures.
    """

    signer: Signer
    timestamper: TimeStamper | None
    appearance: StampAppearance | None
    trust: TrustMaterial | None = None
    fast: bool = True
    _fast: _FastState = field(
        default_factory=_FastState, init=False, repr=False, compare=False
    )

    def without_stamp(self) -> SigningContext:
        """The same context without a stamp appearance, sharing what the fast path
        prepared (key, CMS template, token size)."""
        context = SigningContext(self.signer, self.timestamper, None, self.trust, self.fast)
        object.__setattr__(context, "_fast", self._fast)
        return context

    def template_signer(self) -> TemplateSigner:
        state = self._fast
        with state.lock:
            if state.template_signer is None:
                state.template_signer = TemplateSigner(self.signer)
            return state.template_signer


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
    :raises UnsignablePdfError: an existing signature fails verification, or the document's
        certification signature forbids the change.
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
    if context.fast:
        try:
            return _sign(source, context, options, output, signed_at, document_id, fast=True)
        except StampNotCovered as exc:
            # a stamp text with a glyph outside the prepared font subset: sign the plain way
            log.info("stamp needs a glyph outside the prepared subset (%s); plain path", exc)
    return _sign(source, context, options, output, signed_at, document_id, fast=False)


#: Bytes read or hashed at a time when copying and digesting large files.
CHUNK_SIZE = 1 << 20
#: Room left in ``/Contents`` beyond the computed CMS size, plus a quarter of the token size
#: (a remote TSA's tokens may vary); a CMS that still does not fit is retried with more.
CONTENTS_MARGIN = 1024
MAX_ATTEMPTS = 3


class _ContentsTooSmall(Exception):
    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


def _sign(
    source: bytes | Path | BinaryIO,
    context: SigningContext,
    options: SignOptions,
    output: Path | None,
    signed_at: dt.datetime,
    document_id: str,
    *,
    fast: bool,
) -> SignResult:
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
        page_number: int | None = None
        box: Box | None = None
        try:
            _check_certification(reader, options)
            _check_existing_signatures(reader, source, stream, context)
            field_name = options.field_name or _free_field_name(reader)
            if options.placement is not None and context.appearance is not None:
                index = resolve_page_index(reader, options.placement.page)
                page_number = index + 1
                visible = page_box(reader, index)
                qr = options.verify_base_url is not None
                box = check_box(
                    options.placement.box or default_box(visible, qr=qr), visible, page_number
                )
        except SigningError:
            raise
        except READ_ERRORS as exc:  # an object the first walk did not reach is malformed
            raise broken_structure(exc) from exc
        if options.placement is not None and context.appearance is None:
            raise SigningError(
                "印影の設定がないため見える署名を付けられません。",
                "No stamp appearance is configured; sign with --no-stamp or run `koin init`.",
            )

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

        def write(out: BinaryIO) -> None:
            if not fast:
                pdf_signer = _pdf_signer(context, options, field_name, page_number, box)
                _run(pdf_signer, writer, out, text_params)
                return
            reserve = _contents_size(context, options.level)
            current = writer
            for attempt in range(1, MAX_ATTEMPTS + 1):
                pdf_signer = _pdf_signer(
                    context, options, field_name, page_number, box, fast=True
                )
                try:
                    _run_fast(context, pdf_signer, current, out, text_params, reserve)
                    return
                except _ContentsTooSmall as too_small:
                    if attempt == MAX_ATTEMPTS:
                        raise SigningError(
                            "署名データが予約した領域に収まりませんでした。",
                            f"The signature ({too_small.needed} bytes) did not fit into the "
                            f"space reserved for it ({reserve // 2} bytes).",
                        ) from too_small
                    log.warning(
                        "CMS of %d bytes did not fit into %d reserved; retrying",
                        too_small.needed, reserve // 2,
                    )
                    reserve = max(2 * reserve, 2 * (too_small.needed + CONTENTS_MARGIN))
                    out.seek(0)
                    out.truncate()
                    current = open_for_signing(stream)

        if output is None:
            buffer = io.BytesIO()
            write(buffer)
            data = buffer.getvalue()
            digest = hashlib.sha256(data).hexdigest()
            return SignResult(
                document_id, options.level, field_name, signed_at, digest, page_number, box,
                None, data,
            )
        digest = _write_atomically(output, write)
        return SignResult(
            document_id, options.level, field_name, signed_at, digest, page_number, box, output
        )


def _contents_size(context: SigningContext, level: SignatureLevel) -> int:
    """Hex digits to reserve for ``/Contents``: the CMS from the template (its size is known
    exactly) plus a time-stamp token as large as the TSA's last one, with a margin.

    PAdES puts certificates and CRLs of B-LT into the DSS, not into the CMS, so the level does
    not change the size.
    """
    template = context.template_signer().template()
    size = template.base_size + CONTENTS_MARGIN
    if level.needs_timestamp:
        token = _token_size(context)
        size += token + token // 4 + 64  # + the unsignedAttrs wrapping
    return 2 * size


def _token_size(context: SigningContext) -> int:
    state = context._fast
    if state.token_size is None:
        assert context.timestamper is not None
        # pyHanko's dummy response: one real token per timestamper, cached by pyHanko
        token = asyncio.run(context.timestamper.async_dummy_response("sha256"))
        state.token_size = len(token.dump())
    return state.token_size


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
            raise UnsignablePdfError(
                "既に署名がある PDF には認証署名(DocMDP)を付けられません。",
                "A certification signature must be the first signature; this PDF is "
                "already signed.",
            )
        return
    if options.certify:
        raise UnsignablePdfError(
            "既に認証署名がある PDF に認証署名は付けられません。",
            "The PDF already carries a certification signature; a certification signature "
            "must be the first signature.",
        )
    if certification.permission is MDPPerm.NO_CHANGES:
        raise UnsignablePdfError(
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


def _check_existing_signatures(
    reader: PdfFileReader,
    source: bytes | Path | BinaryIO,
    stream: BinaryIO,
    context: SigningContext,
) -> None:
    """Refuse to sign over a signature that fails verification.

    A seal added over a tampered or forged document would make readers show the prefecture's
    valid signature on top of it. Only FAILED counts (altered, forged, malformed, revoked, a
    change the signer did not allow); INDETERMINATE — e.g. a signer from a CA we do not
    trust, or annotations added later — does not. Unsigned inputs cost nothing here.

    :raises UnsignablePdfError: an existing signature or document timestamp is FAILED.
    :raises InvalidPdfError: the verifier cannot read the document.
    """
    if not any(value is not None for _, value, _ in fields.enumerate_sig_fields(reader)):
        return
    from ._verify import Indication, VerifyPolicy, verify_pdf

    trust = context.trust
    policy = VerifyPolicy(
        trust_roots=list(trust.roots) if trust else [],
        other_certs=list(trust.intermediates) if trust else [],
        crls=list(trust.crls) if trust else [],
        max_bytes=sys.maxsize,
    )
    if isinstance(source, bytes | Path):
        data: bytes | Path = source
    else:
        stream.seek(0)
        data = stream.read()
    try:
        report = verify_pdf(data, policy)
    except VerifyInputError as exc:
        raise InvalidPdfError(
            exc.message, exc.message_en or exc.message, reason=exc.reason
        ) from exc
    failed = [s for s in report.signatures if s.indication is Indication.FAILED]
    if not failed:
        return
    first = failed[0]
    sub = first.subindication.value if first.subindication else "FAILED"
    raise UnsignablePdfError(
        f"この PDF の署名 #{first.index}({first.field_name})は検証に失敗します"
        f"({sub}: {first.reason_ja})。改ざんや偽造のおそれがある文書には署名しません。",
        f"Signature #{first.index} ({first.field_name}) of this PDF fails verification "
        f"({sub}: {first.reason_en}); koin does not sign over a tampered or forged document.",
        reason="existing_signature_failed",
        subindication=sub,
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
    *,
    fast: bool = False,
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
        signer=context.template_signer() if fast else context.signer,
        timestamper=context.timestamper if level.needs_timestamp else None,
        stamp_style=(
            context.appearance.style_for(
                box, qr=options.verify_base_url is not None, prebuilt=fast
            )
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
    except PyHankoSigningError as exc:
        message = str(exc)
        raise SigningError(
            f"署名できませんでした: {message}", f"Signing failed: {message}"
        ) from exc
    except READ_ERRORS as exc:  # pyHanko met a malformed object while writing the update
        raise broken_structure(exc) from exc


def _run_fast(
    context: SigningContext,
    pdf_signer: signers.PdfSigner,
    writer: IncrementalPdfFileWriter,
    out: BinaryIO,
    text_params: dict[str, str] | None,
    reserve: int,
) -> None:
    """pyHanko's ``PdfSigner.sign_pdf`` step by step, with ``/Contents`` reserved from a
    computed size instead of a dry-run signature, the CMS from the template, and large files
    copied and hashed in :data:`CHUNK_SIZE` pieces.

    :raises _ContentsTooSmall: the CMS is larger than ``reserve`` (nothing usable written).
    """
    writer.IO_CHUNK_SIZE = CHUNK_SIZE  # copying the original: pyHanko's default is 4 KiB
    signer = context.template_signer()

    async def steps() -> None:
        validation_context = pdf_signer.signature_meta.validation_context
        try:
            session = pdf_signer.init_signing_session(writer)
            validation_info = await session.perform_presign_validation(writer)
            tbs = session.prepare_tbs_document(
                validation_info=validation_info,
                bytes_reserved=reserve,
                appearance_text_params=text_params,
            )
            prepared, written = tbs.digest_tbs_document(output=out, chunk_size=CHUNK_SIZE)
            cms_der = await signer.sign_der(prepared.document_digest, session.timestamper)
            if 2 * len(cms_der) > reserve:
                raise _ContentsTooSmall(len(cms_der))
            post_sign = PdfTBSDocument.resume_signing(
                written,
                prepared,
                cms_der,
                post_sign_instr=tbs.post_sign_instructions,
                validation_context=tbs.validation_context,
            )
            await post_sign.post_signature_processing(written, chunk_size=CHUNK_SIZE)
        finally:
            if validation_context is not None:
                await validation_context.aclose()

    try:
        asyncio.run(steps())
    except (PathBuildingError, PathValidationError) as exc:
        raise SigningError(
            "署名用証明書の検証に失敗しました(信頼点・CRL を確認してください)。",
            f"The signing certificate chain could not be validated: {exc}",
        ) from exc
    except PyHankoSigningError as exc:
        message = str(exc)
        raise SigningError(
            f"署名できませんでした: {message}", f"Signing failed: {message}"
        ) from exc
    except READ_ERRORS as exc:  # pyHanko met a malformed object while writing the update
        raise broken_structure(exc) from exc


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
            for chunk in iter(lambda: handle.read(CHUNK_SIZE), b""):
                digest.update(chunk)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, output)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return digest.hexdigest()

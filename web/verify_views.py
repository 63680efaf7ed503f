"""Public verify pages: anyone can check a signed PDF, or a document ID printed on a stamp."""

from __future__ import annotations

import hashlib

from flask import Blueprint, current_app, render_template
from werkzeug.exceptions import RequestEntityTooLarge

import contracts
from contracts import metrics
from contracts.lta import lta_file_of_document
from signer import Report, VerifyInputError, verify_pdf_isolated

from . import services
from .errors import page_error
from .security import client_address, rate_limited
from .uploads import uploaded_pdf

__all__ = ["bp", "run_verification", "verify_rate_limited"]

bp = Blueprint("verify", __name__)


def run_verification(data: bytes) -> Report:
    """Verify in an isolated process under this app's limits.

    :raises VerifyInputError: the file cannot be verified (the message says why).
    """
    try:
        report = verify_pdf_isolated(
            data,
            services.verify_policy(),
            time_limit=float(current_app.config["KOIN_VERIFY_TIME_LIMIT"]),
        )
    except VerifyInputError:
        metrics.count_verification("rejected")
        raise
    metrics.count_verification(report.indication.value)
    return report


def verify_rate_limited() -> int | None:
    """Charge one verification to this client address; the seconds to wait if over the limit
    (:mod:`web.security`), else None."""
    return rate_limited(("verify_ip", client_address()))


def _too_many(wait: int, template: str = "verify.html", **context: object
              ) -> tuple[str, int, dict[str, str]]:
    page, status = page_error(
        429,
        f"検証の依頼が多すぎます。{wait} 秒ほど待ってから、もう一度お試しください。",
        f"Too many verifications from your address; wait {wait} seconds and try again.",
        template=template, **context,
    )
    return page, status, {"Retry-After": str(wait)}


def _too_large() -> tuple[str, int]:
    limit = int(current_app.config["KOIN_MAX_UPLOAD_BYTES"]) // (1024 * 1024)
    return page_error(
        413,
        f"ファイルが大きすぎます(上限 {limit} MiB)。",
        f"The file is too large (limit {limit} MiB).",
        template="verify.html",
    )


@bp.get("/verify")
def verify_form() -> str:
    return render_template("verify.html")


@bp.post("/verify")
def verify_upload() -> str | tuple[str, int] | tuple[str, int, dict[str, str]]:
    """:raise 400/413/415/422: the upload cannot be verified (shown on the page).
    :raise 429: too many verifications from this address (``Retry-After``).
    """
    wait = verify_rate_limited()
    if wait is not None:
        return _too_many(wait)
    try:
        data, file_name = uploaded_pdf()
        report = run_verification(data)
    except RequestEntityTooLarge:
        return _too_large()
    except VerifyInputError as exc:
        return page_error(exc.status, exc.message, exc.message_en, template="verify.html")
    return render_template("verify.html", report=report, file_name=file_name)


@bp.get("/verify/<doc_id>")
def document(doc_id: str) -> str | tuple[str, int]:
    """The record of a document signed here, with a form to check a copy against it.

    :raise 404: unknown document ID.
    """
    record = services.find_document(doc_id)
    if record is None:
        return page_error(
            404,
            f"文書番号 {doc_id} の記録はありません。番号をご確認ください。",
            f"No document with ID {doc_id} was signed here. Check the number.",
        )
    return render_template("document.html", record=record, lta=_lta_record(record.document_id))


@bp.post("/verify/<doc_id>")
def document_check(doc_id: str) -> str | tuple[str, int] | tuple[str, int, dict[str, str]]:
    """Check an uploaded copy against the record: same bytes, and valid signatures.

    :raise 404: unknown document ID.
    :raise 400/413/415/422: the upload cannot be verified.
    :raise 429: too many verifications from this address (``Retry-After``).
    """
    record = services.find_document(doc_id)
    if record is None:
        return document(doc_id)
    wait = verify_rate_limited()
    if wait is not None:
        return _too_many(wait, template="document.html", record=record)
    lta = _lta_record(record.document_id)
    try:
        data, file_name = uploaded_pdf()
        copy = _check_copy(record, data)
        report = run_verification(data)
    except RequestEntityTooLarge:
        return _too_large()
    except VerifyInputError as exc:
        return page_error(
            exc.status, exc.message, exc.message_en, template="document.html", record=record,
            lta=lta,
        )
    return render_template(
        "document.html", record=record, report=report, matches=copy.matches, copy=copy.value,
        file_name=file_name, lta=lta,
    )


def _check_copy(record: contracts.SignedDocument, data: bytes) -> contracts.CopyMatch:
    """Whether ``data`` is this document: as signed, or as kept since with long-term
    validation data appended (see :func:`contracts.check_copy`)."""
    if hashlib.sha256(data).hexdigest() == record.sha256:
        return contracts.CopyMatch.SIGNED
    with contracts.session_scope(services.session_factory()) as session:
        return contracts.check_copy(session, services.installation().home, record, data)


def _lta_record(document_id: str) -> contracts.LtaFile | None:
    """The long-term record of the stored file, once it has been renewed (else None)."""
    with contracts.session_scope(services.session_factory()) as session:
        row = lta_file_of_document(session, document_id)
        if row is None or row.renewed_at is None:
            return None
        session.expunge(row)
        return row

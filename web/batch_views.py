"""The signing staff's pages (署名・一括署名・署名履歴): sign one PDF now, or thousands as a batch,
watch it, download the results, and look through everything signed.

- ``GET /sign``, ``POST /sign`` (role signer): a stamp template and one PDF, many PDFs or ZIPs.
  One PDF is signed right away (then ``GET /sign/<document id>`` shows it, ``…/file`` downloads
  it for a day); anything more becomes a started batch and the browser goes to its page.
- ``GET /batches``: the user's batches (an administrator's: everyone's), newest first.
- ``GET /batches/<id>``: progress, the documents (``?state=``, ``?page=``) with their errors,
  files skipped at upload; ``…/progress`` the same as JSON for the page's script;
  ``…/archive.zip`` every signed file and ``manifest.csv``; ``…/documents/<n>`` one file;
  ``POST …/retry`` and ``POST …/cancel``.
- ``GET /history``: every signed document (an administrator's: everyone's), searched and
  filtered.

Batches and documents of somebody else answer 404, exactly like ones that do not exist. The
sign page reads uploads of up to :data:`MAX_SIGN_UPLOAD_BYTES` (more than the site-wide
limit), so it checks its CSRF token itself after raising the limit for that request.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import IO, Any, TypeVar

from flask import (
    Blueprint,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser, default_stream_factory
from werkzeug.wrappers import Response

import contracts
from contracts import (
    Batch,
    BatchDocument,
    BatchNotFound,
    BatchStatus,
    DocumentNotFound,
    DocumentState,
    InvalidBatchData,
    InvalidBatchState,
    SigningChannel,
    TemplateNotFound,
    User,
    UserRole,
    session_scope,
)
from contracts.batch_files import SkippedEntry, archive_members, manifest_csv, stream_zip
from contracts.batches import MAX_INPUT_BYTES
from contracts.history import (
    STANDARD_STAMP,
    HistoryQuery,
    history_signers,
    search_signed_documents,
)
from contracts.staff_signing import (
    COPY_TTL,
    Upload,
    batch_from_uploads,
    purge_signed_copies,
    sign_for_staff,
    signed_copy,
    skipped_entries,
    upload_kind,
)
from keys import KoinError
from timestamp import TimestampError

from . import services
from .api_batches import batch_json, document_json
from .auth import csrf, current_user, login_required
from .errors import api_error, page_error
from .i18n import localized

__all__ = ["MAX_SIGN_UPLOAD_BYTES", "bp"]

log = logging.getLogger(__name__)

bp = Blueprint("batches_web", __name__)

F = TypeVar("F", bound=Callable[..., Any])

#: One upload on the sign page (many PDFs, or ZIPs) may carry this much.
MAX_SIGN_UPLOAD_BYTES = 2 * 2**30
#: Files and fields of one upload (Werkzeug's default is 1000); more files: use a ZIP.
MAX_FORM_PARTS = 5000
DOCUMENTS_PAGE = 100
BATCHES_PAGE = 30
HISTORY_PAGE = 50

_STAFF = (UserRole.SIGNER, UserRole.ADMIN)


class _FormInputError(KoinError):
    """The form itself is incomplete or malformed (before any service is asked)."""



def _user() -> User:
    user = current_user()
    assert user is not None  # login_required ran first
    return user


def _is_admin(user: User) -> bool:
    return UserRole.ADMIN in user.roles


def _home() -> Path:
    return services.installation().home


def _public_url() -> str:
    return str(current_app.config["KOIN_PUBLIC_URL"]).rstrip("/")


def _page_number() -> int:
    try:
        return max(1, min(int(request.args.get("page", "1")), 1_000_000))
    except ValueError:
        return 1


@bp.errorhandler(BatchNotFound)
def _batch_not_found(exc: BatchNotFound) -> tuple[str, int]:
    return page_error(404, "この一括署名は見つかりません。", "This signing batch was not found.")


@bp.errorhandler(DocumentNotFound)
def _document_not_found(exc: DocumentNotFound) -> tuple[str, int]:
    return page_error(
        404,
        "この署名済み文書はダウンロードできません(保存期間を過ぎたか、見つかりません)。",
        "This signed document cannot be downloaded (it is no longer kept, or was not found).",
    )


@bp.after_request
def _no_store(response: Response) -> Response:
    """File names and signed documents of the staff: never kept in any cache."""
    response.headers["Cache-Control"] = "no-store"
    return response


# -- the sign page --------------------------------------------------------------------------------


def _templates() -> list[contracts.StampTemplate]:
    with services.session_factory()() as db:
        templates = contracts.list_templates(db)
        db.expunge_all()
    return templates


def _sign_page(
    *,
    error: KoinError | None = None,
    status: int = 200,
    skipped: list[SkippedEntry] | None = None,
    template: str = "",
    name: str = "",
) -> tuple[str, int]:
    page = render_template(
        "sign.html",
        templates=_templates(),
        chosen_template=template,
        batch_name=name,
        error=localized(error.message, error.message_en) if error is not None else None,
        skipped=skipped or [],
        max_upload=_size_text(MAX_SIGN_UPLOAD_BYTES),
    )
    return page, status


class _ClosingFormDataParser(FormDataParser):
    """Werkzeug's parser, but the files it has spooled are closed (and so deleted) at once
    when it stops at a limit, rather than left to the garbage collector."""

    def __init__(self, stream_factory: Any = None, *args: Any, **kwargs: Any) -> None:
        opened: list[IO[bytes]] = []
        inner = stream_factory or default_stream_factory

        def tracked(total_content_length: int | None, content_type: str | None,
                    filename: str | None, content_length: int | None = None) -> IO[bytes]:
            stream: IO[bytes] = inner(total_content_length, content_type, filename,
                                      content_length)
            opened.append(stream)
            return stream

        super().__init__(tracked, *args, **kwargs)
        self._opened = opened

    def parse(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().parse(*args, **kwargs)
        except BaseException:
            for stream in self._opened:
                stream.close()
            raise


def _size_text(size: int) -> str:
    return f"{size // 2**30} GiB" if size % 2**30 == 0 else f"{size // 2**20} MiB"


@bp.get("/sign")
@login_required(UserRole.SIGNER)
def sign_form() -> tuple[str, int]:
    return _sign_page()


def _too_large() -> tuple[str, int]:
    limit, files = _size_text(MAX_SIGN_UPLOAD_BYTES), MAX_FORM_PARTS - 10
    error = _FormInputError(
        f"一度に送れるのは合計 {limit}、{files} ファイルまでです。ファイルが多いときは ZIP に"
        "まとめ、大きいときは分けて送ってください。",
        f"One upload may carry at most {limit} and {files} files; put many files into a ZIP, "
        "and split a large one.",
    )
    return _sign_page(error=error, status=413)


@bp.post("/sign")
@login_required(UserRole.SIGNER)
def sign_submit() -> Response | tuple[str, int]:
    """Sign one PDF now, or make a batch of several files (PDFs and ZIPs) and start it.

    :raise 400: no file, no valid CSRF token, an unknown template, an over-long batch name.
    :raise 413: more than :data:`MAX_SIGN_UPLOAD_BYTES`.
    :raise 422: the single PDF cannot be signed (not a PDF, encrypted, stamp does not fit), or
        no file of the upload could be taken (each with its reason).
    :raise 503: no time-stamping authority answered (single PDF).
    """
    request.max_content_length = MAX_SIGN_UPLOAD_BYTES
    request.max_form_parts = MAX_FORM_PARTS
    request.form_data_parser_class = _ClosingFormDataParser
    try:
        if (request.content_length or 0) > MAX_SIGN_UPLOAD_BYTES:
            raise RequestEntityTooLarge()
        if current_app.config.get("WTF_CSRF_ENABLED", True):
            csrf.protect()
        files = [upload for upload in request.files.getlist("file") if upload.filename]
    except RequestEntityTooLarge:
        return _too_large()
    template = request.form.get("template", "").strip()[:100]
    name = request.form.get("name", "")[:1000]
    user = _user()
    if not files:
        error = _FormInputError("署名する PDF または ZIP を選択してください。",
                                "Choose the PDF or ZIP files to sign.")
        return _sign_page(error=error, status=400, template=template, name=name)
    uploads = [
        Upload(upload.filename or "document.pdf", upload.mimetype, upload.stream)
        for upload in files
    ]
    try:
        if len(uploads) == 1 and upload_kind(uploads[0]) == "pdf":
            return _sign_one(uploads[0], user, template or None)
        intake = batch_from_uploads(
            services.session_factory(), uploads, home=_home(), user_id=user.id,
            template=template or None, name=name or None,
        )
    except TemplateNotFound as exc:
        return _sign_page(error=exc, status=400, name=name)
    except InvalidBatchData as exc:
        skipped = exc.fields.get("skipped") or []
        status = 422 if exc.field == "files" else 400
        return _sign_page(error=exc, status=status, skipped=skipped, template=template,
                          name=name)
    services.batch_executor().kick()
    flash(
        localized(f"{intake.added} 件の PDF の一括署名を始めました。",
                  f"Signing of {intake.added} PDF{'s' if intake.added != 1 else ''} has started."),
        "batch",
    )
    return redirect(url_for(".batch_page", public_id=intake.public_id), code=303)


# The token is checked in the view, once the larger upload limit of this page is in force.
csrf.exempt(f"{__name__}.sign_submit")


def _sign_one(upload: Upload, user: User, template: str | None) -> Response | tuple[str, int]:
    data = upload.stream.read(MAX_INPUT_BYTES + 1)
    if len(data) > MAX_INPUT_BYTES or not data:
        limit = MAX_INPUT_BYTES // 2**20
        error = _FormInputError(
            f"ファイルが空か、大きすぎます({limit} MiB まで)。",
            f"The file is empty or too large (at most {limit} MiB).",
        )
        return _sign_page(error=error, status=422, template=template or "")
    try:
        context = services.signing_context(stamp=True)
        result = sign_for_staff(
            services.session_factory(), data, context, home=_home(), user_id=user.id,
            file_name=upload.name, template=template, public_url=_public_url(),
        )
    except TimestampError as exc:
        log.warning("page signing failed: no time stamp (%s)", exc.message_en)
        error = _FormInputError(
            "タイムスタンプ局に接続できないため署名できませんでした。しばらくしてから"
            "もう一度お試しください。",
            "The time-stamping authority is unavailable; try again later.",
        )
        return _sign_page(error=error, status=503, template=template or "")
    except TemplateNotFound:
        raise
    except KoinError as exc:
        return _sign_page(error=exc, status=422, template=template or "")
    purge_signed_copies(_home())
    log.info("page signed document %s for user %s", result.document_id, user.id)
    return redirect(url_for(".signed_page", document_id=result.document_id), code=303)


@bp.get("/sign/<document_id>")
@login_required(*_STAFF)
def signed_page(document_id: str) -> str:
    """The document just signed on the sign page, with its download.

    :raise 404: not signed on the page for this user, or no longer kept.
    """
    with services.session_factory()() as db:
        _, record = signed_copy(db, _home(), document_id, _user())
        template = _template_titles(db).get(record.template or "", record.template)
    return render_template(
        "signed.html", record=record, template_title=template,
        verify_url=f"{_public_url()}/verify/{record.document_id}",
        keep_hours=int(COPY_TTL.total_seconds() // 3600),
    )


@bp.get("/sign/<document_id>/file")
@login_required(*_STAFF)
def signed_file(document_id: str) -> Response:
    """:raise 404: not signed on the page for this user, no longer kept, or changed."""
    with services.session_factory()() as db:
        data, record = signed_copy(db, _home(), document_id, _user())
    response = send_file(
        io.BytesIO(data), mimetype="application/pdf", as_attachment=True,
        download_name=record.file_name or f"{record.document_id}.pdf", max_age=0,
    )
    response.headers["X-Koin-Document-Id"] = record.document_id
    return response


# -- batches --------------------------------------------------------------------------------------


def _template_titles(db: Session) -> dict[str, str]:
    return {t.name: t.title for t in contracts.list_templates(db, include_inactive=True)}


@dataclass(frozen=True)
class BatchRow:
    batch: Batch
    progress: contracts.Progress
    creator: str
    template_title: str | None


@bp.get("/batches")
@login_required(*_STAFF)
def batch_list() -> str:
    """The user's batches (an administrator's: everyone's), newest first."""
    user = _user()
    page = _page_number()
    with services.session_factory()() as db:
        found = contracts.list_batches(
            db, created_by=None if _is_admin(user) else user.id,
            limit=BATCHES_PAGE + 1, offset=(page - 1) * BATCHES_PAGE,
        )
        ids = {batch.created_by for batch in found}
        names = dict(db.execute(select(User.id, User.display_name).where(User.id.in_(ids))).all())
        titles = _template_titles(db)
        rows = [
            BatchRow(batch, contracts.batch_progress(db, batch), names.get(batch.created_by, "?"),
                     titles.get(batch.template or "", batch.template))
            for batch in found[:BATCHES_PAGE]
        ]
    return render_template(
        "batches.html", rows=rows, page=page, more=len(found) > BATCHES_PAGE,
        sees_all=_is_admin(user), can_sign=UserRole.SIGNER in user.roles,
    )


def _state_filter() -> DocumentState | None:
    wanted = request.args.get("state", "")
    return DocumentState(wanted) if wanted in {s.value for s in DocumentState} else None


def _documents_json(batch: Batch, documents: list[BatchDocument]) -> list[dict[str, Any]]:
    shown = []
    for document in documents:
        body = document_json(batch, document)
        if body["download"]:
            body["download"] = url_for(
                ".document_file", public_id=batch.public_id, position=document.position
            )
        shown.append(body)
    return shown


def _batch_page(
    public_id: str, *, error: KoinError | None = None, status: int = 200
) -> tuple[str, int]:
    """:raises BatchNotFound: no such batch, or not the user's."""
    user = _user()
    state = _state_filter()
    page = _page_number()
    with services.session_factory()() as db:
        batch = contracts.batch_of_user(db, public_id, user)
        progress = contracts.batch_progress(db, batch)
        documents = contracts.list_documents_page(
            db, batch, state=state, limit=DOCUMENTS_PAGE + 1,
            offset=(page - 1) * DOCUMENTS_PAGE,
        )
        creator = db.get(User, batch.created_by)
        template_title = _template_titles(db).get(batch.template or "", batch.template)
        db.expunge_all()
    body = render_template(
        "batch.html",
        batch=batch,
        progress=progress,
        documents=documents[:DOCUMENTS_PAGE],
        state=state,
        states=[DocumentState.DONE, DocumentState.FAILED, DocumentState.WAITING,
                DocumentState.RUNNING],
        page=page,
        more=len(documents) > DOCUMENTS_PAGE,
        creator=creator.display_name if creator else "?",
        template_title=template_title,
        skipped=skipped_entries(_home(), batch),
        error=localized(error.message, error.message_en) if error is not None else None,
        can_retry=progress.failed > 0
        and batch.status in (BatchStatus.RUNNING, BatchStatus.FINISHED),
        can_cancel=batch.status in (BatchStatus.DRAFT, BatchStatus.RUNNING),
    )
    return body, status


@bp.get("/batches/<public_id>")
@login_required(*_STAFF)
def batch_page(public_id: str) -> tuple[str, int]:
    """:raise 404: no such batch, or someone else's."""
    return _batch_page(public_id)


def _json_login_required(view: F) -> F:
    """Like :func:`login_required` for the staff roles, but answered in JSON (the page's
    script shows the message instead of following a redirect to the login page)."""

    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        user = current_user()
        if user is None:
            return api_error(
                401, "login_required", "ログインの有効期限が切れました。再読み込みしてください。",
                "Your login has expired; reload the page.",
            )
        if not set(_STAFF) & user.roles:
            return api_error(403, "forbidden", "権限がありません。", "Permission denied.")
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


@bp.get("/batches/<public_id>/progress")
@_json_login_required
def batch_progress(public_id: str) -> Response | tuple[Response, int]:
    """The batch (as in the REST API) and the documents of the page the browser shows
    (``state``, ``page``), for the batch page's script.

    :raise 401: not logged in. :raise 404: no such batch, or someone else's.
    """
    state = _state_filter()
    page = _page_number()
    try:
        with services.session_factory()() as db:
            batch = contracts.batch_of_user(db, public_id, _user())
            body = batch_json(db, batch)
            documents = contracts.list_documents_page(
                db, batch, state=state, limit=DOCUMENTS_PAGE, offset=(page - 1) * DOCUMENTS_PAGE
            )
            body["documents"] = _documents_json(batch, documents)
    except BatchNotFound:
        return api_error(404, "not_found", "この一括署名は見つかりません。",
                         "This signing batch was not found.")
    body["links"] = {
        "self": url_for(".batch_progress", public_id=public_id),
        "page": url_for(".batch_page", public_id=public_id),
        "archive": url_for(".archive", public_id=public_id),
    }
    return jsonify(body)


def _confirmed() -> bool:
    return request.form.get("confirm") == "yes"


@bp.post("/batches/<public_id>/retry")
@login_required(*_STAFF)
def retry(public_id: str) -> Response | tuple[str, int]:
    """Sign the failed documents once more.

    :raise 400: not confirmed. :raise 404: no such batch, or someone else's.
    :raise 409: the batch is cancelled or not started.
    """
    if not _confirmed():
        error = _FormInputError(
            "再試行するには確認のチェックを入れてください。", "Tick the box to confirm the retry."
        )
        return _batch_page(public_id, error=error, status=400)
    try:
        with session_scope(services.session_factory()) as db:
            batch = contracts.batch_of_user(db, public_id, _user())
            count = contracts.retry_failed(db, batch)
    except InvalidBatchState:
        error = _FormInputError(
            "取り消された一括署名は再試行できません。",
            "A cancelled batch cannot be retried.",
        )
        return _batch_page(public_id, error=error, status=409)
    services.batch_executor().kick()
    again = localized(f"失敗した {count} 件をもう一度署名します。",
                      f"{count} failed file{'s' if count != 1 else ''} will be signed again.")
    flash(again, "batch")
    return redirect(url_for(".batch_page", public_id=public_id), code=303)


@bp.post("/batches/<public_id>/cancel")
@login_required(*_STAFF)
def cancel(public_id: str) -> Response | tuple[str, int]:
    """Stop the batch: files not yet signed are not signed (one being signed right now still
    finishes).

    :raise 400: not confirmed. :raise 404: no such batch, or someone else's.
    :raise 409: the batch has finished or is cancelled already.
    """
    if not _confirmed():
        error = _FormInputError(
            "取り消すには確認のチェックを入れてください。",
            "Tick the box to confirm the cancellation.",
        )
        return _batch_page(public_id, error=error, status=400)
    try:
        with session_scope(services.session_factory()) as db:
            batch = contracts.batch_of_user(db, public_id, _user())
            contracts.cancel_batch(db, batch)
    except InvalidBatchState:
        error = _FormInputError(
            "この一括署名は終了しているため取り消せません。",
            "This batch has ended and cannot be cancelled.",
        )
        return _batch_page(public_id, error=error, status=409)
    log.info("batch %s cancelled by user %s", public_id, _user().id)
    flash(localized("一括署名を取り消しました。署名済みのファイルはそのままダウンロードできます。",
                    "The batch was cancelled; the files signed so far can still be downloaded."),
          "batch")
    return redirect(url_for(".batch_page", public_id=public_id), code=303)


@bp.get("/batches/<public_id>/archive.zip")
@login_required(*_STAFF)
def archive(public_id: str) -> Response:
    """Every signed file of the batch so far and ``manifest.csv`` (all documents, their state,
    hashes, document IDs and errors), streamed.

    :raise 404: no such batch, or someone else's.
    """
    language = "en" if g.get("lang") == "en" else "ja"
    with services.session_factory()() as db:
        batch = contracts.batch_of_user(db, public_id, _user())
        members, rows = archive_members(db, batch, _home())
        manifest = manifest_csv(rows, language)
        download = f"koin-batch-{batch.public_id}.zip"
    response = Response(stream_zip(members, [("manifest.csv", manifest)]),
                        mimetype="application/zip")
    response.headers["Content-Disposition"] = f'attachment; filename="{download}"'
    return response


@bp.get("/batches/<public_id>/documents/<int:position>")
@login_required(*_STAFF)
def document_file(public_id: str, position: int) -> Response | tuple[str, int]:
    """The signed file of document ``position``.

    :raise 404: no such batch (or someone else's), no such document, or not signed.
    :raise 500: the stored file no longer has the recorded SHA-256.
    """
    with services.session_factory()() as db:
        batch = contracts.batch_of_user(db, public_id, _user())
        document = contracts.get_batch_document(db, batch, position)
    if document is None or document.document_state is not DocumentState.DONE or not (
        document.output_path and document.output_sha256
    ):
        return page_error(404, "この文書はまだ署名されていません。",
                          "This document has not been signed.")
    path = _home() / document.output_path
    try:
        data = path.read_bytes()
    except OSError:
        log.error("batch output %s is missing", path)
        return page_error(404, "ファイルが見つかりません。", "The file was not found.")
    if hashlib.sha256(data).hexdigest() != document.output_sha256:
        log.error("batch output %s does not match its recorded SHA-256", path)
        return page_error(
            500,
            "保存されているファイルが記録されたハッシュ値と一致しません。管理者に連絡してください。",
            "The stored file does not match its recorded SHA-256. Contact an administrator.",
        )
    response = send_file(
        io.BytesIO(data), mimetype="application/pdf", as_attachment=True,
        download_name=document.file_name,
        max_age=0,
    )
    response.headers["X-Koin-Document-Id"] = document.document_id or ""
    return response


# -- history --------------------------------------------------------------------------------------


_DATE = re.compile(r"(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})")


def _date_arg(name: str) -> dt.date | None:
    """:raises _FormInputError: not a date."""
    text = unicodedata.normalize("NFKC", request.args.get(name, "")).strip()
    if not text:
        return None
    match = _DATE.fullmatch(text)
    try:
        if match is None:
            raise ValueError(text)
        return dt.date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        raise _FormInputError(
            f"日付「{text[:20]}」を読み取れません(例: 2026-11-23)。",
            f"Cannot read the date “{text[:20]}” (e.g. 2026-11-23).",
        ) from None


@bp.get("/history")
@login_required(*_STAFF)
def history() -> tuple[str, int]:
    """Every signed document (a signer's own; an administrator's: everyone's), newest first,
    searched by document ID, file name or SHA-256 and filtered by date, template, channel and
    (administrators) signer.

    :raise 400: an unreadable date or a range that ends before it starts (shown on the page;
        that filter is not applied).
    """
    user = _user()
    admin = _is_admin(user)
    args = request.args
    error: KoinError | None = None
    try:
        date_from, date_to = _date_arg("from"), _date_arg("to")
        if date_from and date_to and date_from > date_to:
            raise _FormInputError("期間の終わりが始まりより前です。",
                                  "The end of the period is before its start.")
    except _FormInputError as exc:
        error, date_from, date_to = exc, None, None
    channel_text = args.get("channel", "")
    channel = (
        SigningChannel(channel_text) if channel_text in {c.value for c in SigningChannel}
        else None
    )
    template_text = args.get("template", "").strip()[:100]
    template = None if not template_text else (
        STANDARD_STAMP if template_text == "-" else template_text
    )
    signer: int | None = user.id
    if admin:
        signer_text = args.get("signer", "")
        signer = int(signer_text) if signer_text.isdigit() and len(signer_text) < 10 else None
    query = HistoryQuery(
        text=args.get("q", "")[:200], date_from=date_from, date_to=date_to, template=template,
        channel=channel, signed_by=signer,
    )
    page = _page_number()
    with services.session_factory()() as db:
        found = search_signed_documents(
            db, query, limit=HISTORY_PAGE, offset=(page - 1) * HISTORY_PAGE
        )
        titles = _template_titles(db)
        signers = history_signers(db) if admin else []
        db.expunge_all()
    filters = {
        "q": query.text or None,
        "from": date_from.isoformat() if date_from else None,
        "to": date_to.isoformat() if date_to else None,
        "template": template_text or None,
        "channel": channel.value if channel else None,
        "signer": str(signer) if admin and signer is not None else None,
    }
    body = render_template(
        "history.html",
        found=found,
        page=page,
        filters=filters,
        active=any(value for value in filters.values()),
        titles=titles,
        channels=list(SigningChannel),
        signers=signers,
        sees_all=admin,
        error=localized(error.message, error.message_en) if error is not None else None,
    )
    return body, 400 if error is not None else 200

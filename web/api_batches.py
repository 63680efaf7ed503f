"""REST API v1 for batch signing (scope ``sign``): build a batch, upload its PDFs (one by one,
many per multipart request, or as a ZIP), start it, watch its progress, download the signed
files one by one or all at once as a ZIP with a manifest. Documented in
``openapi/batches.json``.

A batch is visible to the staff member who created it and to administrators; to everyone
else it does not exist (404).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any, TypeVar

from flask import Blueprint, Response, current_app, jsonify, request, send_file, url_for
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import RequestEntityTooLarge

import contracts
from contracts import Batch, BatchDocument, DocumentState
from contracts.apikeys import ApiScope
from contracts.batch_files import (
    SkippedEntry,
    archive_members,
    manifest_csv,
    read_zip_pdfs,
    stream_zip,
)

from . import services
from .apiauth import api_user, require_api_key
from .errors import api_error

__all__ = ["MAX_BATCH_UPLOAD_BYTES", "batch_json", "bp", "document_json"]

bp = Blueprint("api_batches", __name__, url_prefix="/api/v1/batches")

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: One upload request to a batch (many PDFs, or a ZIP) may carry this much.
MAX_BATCH_UPLOAD_BYTES = 2 * 2**30
_ZIP_TYPES = ("application/zip", "application/x-zip-compressed")
#: Uploaded files stored together (one filesystem sync); bounds what is held in memory.
_STORE_GROUP = 200


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def batch_json(session: Any, batch: Batch) -> dict[str, Any]:
    progress = contracts.batch_progress(session, batch)
    return {
        "id": batch.public_id,
        "name": batch.name,
        "template": batch.template,
        "status": batch.status,
        "created_at": _iso(batch.created_at),
        "started_at": _iso(batch.started_at),
        "finished_at": _iso(batch.finished_at),
        "progress": {
            "total": progress.total,
            "done": progress.done,
            "failed": progress.failed,
            "waiting": progress.waiting,
            "running": progress.running,
            "complete": progress.complete,
        },
        "links": {
            "self": url_for("api_batches.get_batch", public_id=batch.public_id),
            "documents": url_for("api_batches.documents", public_id=batch.public_id),
            "archive": url_for("api_batches.archive", public_id=batch.public_id),
        },
    }


def document_json(batch: Batch, document: BatchDocument) -> dict[str, Any]:
    done = document.document_state is DocumentState.DONE
    public_url = str(current_app.config["KOIN_PUBLIC_URL"]).rstrip("/")
    return {
        "position": document.position,
        "file_name": document.file_name,
        "state": document.state,
        "input_sha256": document.input_sha256,
        "output_sha256": document.output_sha256 if done else None,
        "document_id": document.document_id if done else None,
        "attempts": document.attempts,
        "error": document.error,
        "error_en": document.error_en,
        "updated_at": _iso(document.updated_at),
        "download": url_for(
            "api_batches.document_file", public_id=batch.public_id, position=document.position
        ) if done else None,
        "verify_url": f"{public_url}/verify/{document.document_id}" if done else None,
    }


def _refusal(exc: contracts.ContractsError) -> tuple[Response, int]:
    if isinstance(exc, contracts.BatchNotFound):
        return api_error(404, "not_found", exc.message, exc.message_en or exc.message)
    if isinstance(exc, contracts.InvalidBatchState):
        return api_error(409, "invalid_state", exc.message, exc.message_en or exc.message)
    if isinstance(exc, contracts.TemplateNotFound):
        return api_error(400, "unknown_template", exc.message, exc.message_en or exc.message)
    field = getattr(exc, "field", "data")
    return api_error(400, f"invalid_{field}", exc.message, exc.message_en or exc.message)


def _refusals_as_json(view: F) -> F:
    """Answer the batch service's refusals as JSON errors (one place for all views)."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return view(*args, **kwargs)
        except (contracts.BatchError, contracts.TemplateError) as exc:
            return _refusal(exc)
        except _BadArgument as exc:
            return api_error(
                400, f"invalid_{exc.name}",
                f"{exc.name} は {exc.low}〜{exc.high} の整数にしてください。",
                f"{exc.name} must be a whole number from {exc.low} to {exc.high}.",
            )

    return wrapper  # type: ignore[return-value]


def _home() -> Any:
    return services.installation().home


@bp.post("")
@require_api_key(ApiScope.SIGN)
@_refusals_as_json
def create() -> ResponseReturnValue:
    """Create a draft batch: JSON or form fields ``template`` (a stamp template's name;
    default: the standard stamp) and ``name``.

    :raise 400: unknown template, over-long name, malformed JSON.
    """
    values = _values()
    if values is None:
        return api_error(400, "invalid_json", "JSON を解釈できません。", "The JSON is malformed.")
    template, name = values.get("template") or None, values.get("name") or None
    if not isinstance(template, str | None) or not isinstance(name, str | None):
        return api_error(
            400, "invalid_json", "template と name は文字列です。",
            "template and name must be strings.",
        )
    with contracts.session_scope(services.session_factory()) as session:
        batch = contracts.create_batch(
            session, home=_home(), user_id=api_user().id, template=template, name=name
        )
        body = batch_json(session, batch)
    response = jsonify(body)
    response.headers["Location"] = body["links"]["self"]
    return response, 201


def _values() -> dict[str, Any] | None:
    if request.mimetype == "application/json":
        data = request.get_json(silent=True)
        return data if isinstance(data, dict) else None
    return {key: value for key, value in request.values.items()}


@bp.get("")
@require_api_key(ApiScope.SIGN)
@_refusals_as_json
def list_all() -> ResponseReturnValue:
    """The key owner's batches (an administrator's: everyone's), newest first;
    ``limit`` (≤ 500) and ``offset``."""
    limit, offset = _int_arg("limit", 50, 1, 500), _int_arg("offset", 0, 0, MAX_OFFSET)
    user = api_user()
    with contracts.session_scope(services.session_factory()) as session:
        mine = None if contracts.has_role(user, contracts.UserRole.ADMIN) else user.id
        batches = contracts.list_batches(session, created_by=mine, limit=limit, offset=offset)
        body = {"batches": [batch_json(session, batch) for batch in batches]}
    return jsonify(body)


MAX_OFFSET = 1_000_000_000


class _BadArgument(Exception):
    def __init__(self, name: str, low: int, high: int) -> None:
        super().__init__(name)
        self.name, self.low, self.high = name, low, high


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    """The query argument ``name`` as a whole number from ``low`` to ``high``.

    :raises _BadArgument: it is something else.
    """
    text = request.args.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 10 and low <= int(text) <= high):
        raise _BadArgument(name, low, high)
    return int(text)


@bp.get("/<public_id>")
@require_api_key(ApiScope.SIGN)
@_refusals_as_json
def get_batch(public_id: str) -> ResponseReturnValue:
    """The batch and its progress.

    :raise 404: no such batch (or not the caller's).
    """
    with contracts.session_scope(services.session_factory()) as session:
        batch = contracts.batch_of_user(session, public_id, api_user())
        body = batch_json(session, batch)
    return jsonify(body)


@bp.post("/<public_id>/documents")
@require_api_key(ApiScope.SIGN)
@_refusals_as_json
def add_documents(public_id: str) -> ResponseReturnValue:
    """Add PDFs to a draft batch: one ``application/pdf`` body (name in ``?name=``), one
    ``application/zip`` body (its ``*.pdf`` entries), or ``multipart/form-data`` with any
    number of ``file`` fields, each a PDF or a ZIP. Files are not checked here: a file that
    is not a usable PDF fails alone when the batch runs.

    :raise 400: nothing uploaded, empty or over-long file, unreadable ZIP.
    :raise 404: no such batch. :raise 409: the batch has started.
    :raise 413: larger than the upload limit. :raise 415: another content type.
    """
    request.max_content_length = MAX_BATCH_UPLOAD_BYTES
    if (request.content_length or 0) > MAX_BATCH_UPLOAD_BYTES:
        return _too_large()
    user = api_user()
    try:
        uploads = list(_uploads())
    except RequestEntityTooLarge:
        return _too_large()
    except _UnsupportedUpload as exc:
        return api_error(exc.status, exc.code, exc.message, exc.message_en)
    try:
        return _add_uploads(public_id, user, uploads)
    finally:
        for _, payload, _ in uploads:
            if hasattr(payload, "close"):
                payload.close()


def _add_uploads(
    public_id: str, user: contracts.User, uploads: list[tuple[str, Any, str]]
) -> ResponseReturnValue:
    added: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    with contracts.session_scope(services.session_factory()) as session:
        batch = contracts.batch_of_user(session, public_id, user)
        pending: list[tuple[str, bytes]] = []

        def flush() -> None:
            documents = contracts.add_documents(session, batch, home=_home(), files=pending)
            added.extend(document_json(batch, document) for document in documents)
            pending.clear()

        for name, payload, kind in uploads:
            if kind == "zip":
                for entry in read_zip_pdfs(payload):
                    if isinstance(entry, SkippedEntry):
                        skipped.append(
                            {"name": entry.name, "reason": entry.reason,
                             "reason_en": entry.reason_en}
                        )
                    else:
                        pending.append((entry.name, entry.data))
                        if len(pending) >= _STORE_GROUP:
                            flush()
            else:
                pending.append((name, payload.read() if hasattr(payload, "read") else payload))
                if len(pending) >= _STORE_GROUP:
                    flush()
        flush()
        body = {"added": added, "skipped": skipped, "batch": batch_json(session, batch)}
    return jsonify(body), 201


class _UnsupportedUpload(Exception):
    def __init__(self, status: int, code: str, message: str, message_en: str) -> None:
        super().__init__(code)
        self.status, self.code = status, code
        self.message, self.message_en = message, message_en


def _uploads() -> Iterator[tuple[str, Any, str]]:
    """(file name, bytes or a stream, ``pdf`` or ``zip``) of each uploaded file.

    :raises _UnsupportedUpload: nothing uploaded, or another content type.
    """
    if request.mimetype == "application/pdf":
        yield request.args.get("name") or "document.pdf", request.get_data(cache=False), "pdf"
        return
    if request.mimetype in _ZIP_TYPES:
        # zipfile needs to seek; the body is spooled to disk beyond a few megabytes
        spool = tempfile.SpooledTemporaryFile(max_size=8 * 2**20)  # noqa: SIM115
        shutil.copyfileobj(request.stream, spool, 2**20)
        spool.seek(0)
        yield "upload.zip", spool, "zip"
        return
    if request.mimetype == "multipart/form-data":
        files = request.files.getlist("file")
        if not files:
            raise _UnsupportedUpload(
                400, "no_file", "ファイルが選択されていません。", "No file was uploaded."
            )
        for upload in files:
            name = upload.filename or "document.pdf"
            is_zip = upload.mimetype in _ZIP_TYPES or name.lower().endswith(".zip")
            yield name, upload.stream, "zip" if is_zip else "pdf"
        return
    raise _UnsupportedUpload(
        415, "unsupported_media_type",
        "PDF か ZIP を application/pdf、application/zip、multipart/form-data(file)で送って"
        "ください。",
        "Send PDFs or a ZIP as application/pdf, application/zip or multipart/form-data "
        "field 'file'.",
    )


def _too_large() -> tuple[Response, int]:
    limit = MAX_BATCH_UPLOAD_BYTES // 2**20
    return api_error(
        413, "too_large", f"一度に送れるのは {limit} MiB までです。分けて送ってください。",
        f"One upload may carry at most {limit} MiB; send the files in several requests.",
    )


@bp.post("/<public_id>/start")
@require_api_key(ApiScope.SIGN)
@_refusals_as_json
def start(public_id: str) -> ResponseReturnValue:
    """Start a draft batch; its documents are signed by the workers.

    :raise 404: no such batch. :raise 409: not a draft, or no documents.
    """
    with contracts.session_scope(services.session_factory()) as session:
        batch = contracts.batch_of_user(session, public_id, api_user())
        batch = contracts.start_batch(session, batch)
    services.batch_executor().kick()
    with contracts.session_scope(services.session_factory()) as session:
        body = batch_json(session, contracts.require_batch(session, public_id))
    return jsonify(body), 202


@bp.post("/<public_id>/retry")
@require_api_key(ApiScope.SIGN)
@_refusals_as_json
def retry(public_id: str) -> ResponseReturnValue:
    """Put the failed documents back to waiting (e.g. after replacing nothing but the TSA).

    :raise 404: no such batch. :raise 409: a draft or cancelled batch.
    """
    with contracts.session_scope(services.session_factory()) as session:
        batch = contracts.batch_of_user(session, public_id, api_user())
        count = contracts.retry_failed(session, batch)
    services.batch_executor().kick()
    with contracts.session_scope(services.session_factory()) as session:
        body = batch_json(session, contracts.require_batch(session, public_id))
    body["retried"] = count
    return jsonify(body), 202


@bp.post("/<public_id>/cancel")
@require_api_key(ApiScope.SIGN)
@_refusals_as_json
def cancel(public_id: str) -> ResponseReturnValue:
    """Cancel a draft or running batch (documents being signed right now still finish).

    :raise 404: no such batch. :raise 409: finished or cancelled already.
    """
    with contracts.session_scope(services.session_factory()) as session:
        batch = contracts.batch_of_user(session, public_id, api_user())
        batch = contracts.cancel_batch(session, batch)
        body = batch_json(session, batch)
    return jsonify(body)


@bp.get("/<public_id>/documents")
@require_api_key(ApiScope.SIGN)
@_refusals_as_json
def documents(public_id: str) -> ResponseReturnValue:
    """The batch's documents in upload order: ``state`` filter, ``limit`` (≤ 1000), ``offset``.

    :raise 400: unknown state. :raise 404: no such batch.
    """
    state_text = request.args.get("state")
    state = None
    if state_text:
        try:
            state = DocumentState(state_text)
        except ValueError:
            names = ", ".join(s.value for s in DocumentState)
            return api_error(
                400, "invalid_state_filter", f"state は {names} のいずれかです。",
                f"state must be one of {names}.",
            )
    limit, offset = _int_arg("limit", 100, 1, 1000), _int_arg("offset", 0, 0, MAX_OFFSET)
    with contracts.session_scope(services.session_factory()) as session:
        batch = contracts.batch_of_user(session, public_id, api_user())
        rows = contracts.list_documents_page(
            session, batch, state=state, limit=limit, offset=offset
        )
        body = {"documents": [document_json(batch, row) for row in rows]}
    return jsonify(body)


@bp.get("/<public_id>/documents/<int:position>")
@require_api_key(ApiScope.SIGN)
@_refusals_as_json
def document_file(public_id: str, position: int) -> ResponseReturnValue:
    """The signed PDF of document ``position``.

    :raise 404: no such batch or document. :raise 409: not signed (yet).
    """
    with contracts.session_scope(services.session_factory()) as session:
        batch = contracts.batch_of_user(session, public_id, api_user())
        document = contracts.get_batch_document(session, batch, position)
        if document is None:
            return api_error(
                404, "not_found", f"文書 {position} はありません。",
                f"The batch has no document {position}.",
            )
        if document.document_state is not DocumentState.DONE or not document.output_path:
            return api_error(
                409, "not_signed", f"文書 {position} はまだ署名されていません({document.state})。",
                f"Document {position} is not signed ({document.state}).",
            )
        path = _home() / document.output_path
        name, document_id, digest = (
            document.file_name, document.document_id, document.output_sha256
        )
    response = send_file(path, mimetype="application/pdf", as_attachment=True,
                         download_name=name)
    response.headers["X-Koin-Document-Id"] = document_id or ""
    response.headers["X-Koin-SHA256"] = digest or ""
    return response


@bp.get("/<public_id>/archive")
@require_api_key(ApiScope.SIGN)
@_refusals_as_json
def archive(public_id: str) -> ResponseReturnValue:
    """A ZIP of every signed file so far plus ``manifest.csv`` (every document with its
    state, hashes, document ID and error). ``X-Koin-Batch-Complete`` says whether nothing
    is waiting any more.

    :raise 404: no such batch.
    """
    language = "en" if request.args.get("lang") == "en" else "ja"
    with contracts.session_scope(services.session_factory()) as session:
        batch = contracts.batch_of_user(session, public_id, api_user())
        members, rows = archive_members(session, batch, _home())
        manifest = manifest_csv(rows, language)
        complete = contracts.batch_progress(session, batch).complete
        download = f"koin-batch-{batch.public_id}.zip"
    response = Response(stream_zip(members, [("manifest.csv", manifest)]),
                        mimetype="application/zip")
    response.headers["Content-Disposition"] = f'attachment; filename="{download}"'
    response.headers["X-Koin-Batch-Complete"] = "true" if complete else "false"
    return response


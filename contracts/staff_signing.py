"""Signing on the staff pages: one PDF signed right away (its copy kept for a day so the page
can offer it for download), and uploads of many PDFs or ZIPs turned into a started batch.

The signed copies of the signing page live at ``KOIN_HOME/signed/<document ID>.pdf`` for
:data:`COPY_TTL`; only the staff member they were signed for (or an administrator) may fetch
them, and only while they still have the recorded SHA-256.

An upload becomes a batch in one transaction: files that cannot be taken (neither a PDF nor a
ZIP, empty, too large, a ZIP that cannot be read, ZIP entries that are not PDFs) are skipped
with their reason, which is kept beside the batch (``batches/<id>/skipped.json``) for its
page; if nothing can be taken, no batch is made. Files that look like PDFs but are not usable
(encrypted, broken) are taken and fail alone when the batch runs, with the signer's reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, BinaryIO, cast

from sqlalchemy.orm import Session, sessionmaker

from keys import Role, atomic_write
from signer import SigningContext, SignOptions, SignResult, new_document_id

from ._db import aware_utc, session_scope
from .accounts import User, UserRole, has_role
from .batch_files import SkippedEntry, ZipPdf, read_zip_pdfs
from .batches import (
    MAX_INPUT_BYTES,
    Batch,
    add_documents,
    checked_data,
    checked_file_name,
    create_batch,
    start_batch,
)
from .documents import get_document, normalize_document_id
from .errors import DocumentNotFound, InvalidBatchData
from .models import SignedDocument, SigningChannel
from .signing import sign_and_record
from .templates import template_options

__all__ = [
    "COPY_TTL",
    "Intake",
    "Upload",
    "batch_from_uploads",
    "purge_signed_copies",
    "sign_for_staff",
    "signed_copy",
    "skipped_entries",
    "stamp_options",
    "upload_kind",
]

log = logging.getLogger(__name__)

#: How long the signing page keeps a signed copy for download.
COPY_TTL = dt.timedelta(hours=24)
COPIES_FOLDER = "signed"
SKIPPED_FILE = "skipped.json"
_ZIP_MAGIC = b"PK\x03\x04"
#: Files stored together (one filesystem sync); bounds what is held in memory.
_STORE_GROUP = 200
_ZIP_TYPES = ("application/zip", "application/x-zip-compressed")


def stamp_options(session: Session, template: str | None, *, public_url: str | None) -> SignOptions:
    """The signing options of the active stamp template ``template``, or of the standard stamp
    (bottom right, with the verification QR code) when None — what a batch uses too.

    :raises TemplateNotFound: ``template`` does not name an active template.
    """
    return template_options(session, template, public_url=public_url)


def _copy_path(home: Path, document_id: str) -> Path:
    return home / COPIES_FOLDER / f"{document_id}.pdf"


def sign_for_staff(
    sessions: sessionmaker[Session],
    data: bytes,
    context: SigningContext,
    *,
    home: Path,
    user_id: int,
    file_name: str | None,
    template: str | None,
    public_url: str | None,
) -> SignResult:
    """Sign one uploaded PDF with the position key for ``user_id`` (channel web) and keep the
    signed copy below ``home`` for :data:`COPY_TTL` (see :func:`signed_copy`).

    :raises TemplateNotFound: ``template`` does not name an active template.
    :raises KoinError: as :func:`contracts.sign_and_record` (not a usable PDF, stamp does not
        fit, no time stamp, …).
    """
    with session_scope(sessions) as session:
        options = stamp_options(session, template, public_url=public_url)
    document_id = new_document_id()
    output = _copy_path(home, document_id)
    output.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    return sign_and_record(
        sessions, data, context, replace(options, document_id=document_id), role=Role.POSITION,
        file_name=file_name, output=output, signed_by=user_id, template=template,
        channel=SigningChannel.WEB,
    )


def signed_copy(
    session: Session, home: Path, document_id: str, user: User, *, now: dt.datetime | None = None
) -> tuple[bytes, SignedDocument]:
    """The kept copy of a document signed on the signing page, for ``user``: its bytes and
    its record.

    :raises DocumentNotFound: no such document, not signed on the page, someone else's (unless
        ``user`` is an administrator), no longer kept (older than :data:`COPY_TTL`), or
        changed since it was signed.
    """
    canonical = normalize_document_id(document_id)
    record = get_document(session, canonical) if canonical else None
    if record is None or record.channel != SigningChannel.WEB.value or not (
        record.signed_by == user.id or has_role(user, UserRole.ADMIN)
    ):
        raise DocumentNotFound(document_id[:40])
    path = _copy_path(home, record.document_id)
    try:
        if path.stat().st_mtime < (aware_utc(now) - COPY_TTL).timestamp():
            raise DocumentNotFound(record.document_id)
        data = path.read_bytes()
    except OSError:
        raise DocumentNotFound(record.document_id) from None
    if hashlib.sha256(data).hexdigest() != record.sha256:
        log.error("signed copy %s does not match its recorded SHA-256", path)
        raise DocumentNotFound(record.document_id)
    return data, record


def purge_signed_copies(home: Path, *, now: dt.datetime | None = None) -> int:
    """Remove the signing page's copies older than :data:`COPY_TTL`; how many."""
    limit = (aware_utc(now) - COPY_TTL).timestamp()
    count = 0
    for path in (home / COPIES_FOLDER).glob("*.pdf"):
        try:
            if path.stat().st_mtime < limit:
                path.unlink()
                count += 1
        except FileNotFoundError:
            continue
    return count


# -- uploads to a batch ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """An uploaded file: the name the browser gave, its content type and its bytes (a stream
    that can seek, as Werkzeug's spooled uploads can)."""

    name: str
    content_type: str
    stream: IO[bytes]


@dataclass(frozen=True)
class Intake:
    """The batch made from an upload: its public ID, how many PDFs it holds, what was
    skipped."""

    public_id: str
    added: int
    skipped: list[SkippedEntry]


def upload_kind(upload: Upload) -> str | None:
    """``zip``, ``pdf`` or None (neither), by name, content type and first bytes."""
    name = upload.name.lower()
    head = upload.stream.read(1024)
    upload.stream.seek(0)
    if name.endswith(".zip") or upload.content_type in _ZIP_TYPES or head.startswith(_ZIP_MAGIC):
        return "zip"
    if name.endswith(".pdf") or upload.content_type == "application/pdf" or b"%PDF-" in head:
        return "pdf"
    return None


def _skip(name: str, error: InvalidBatchData) -> SkippedEntry:
    return SkippedEntry(name, error.message, error.message_en)


def _entries(upload: Upload) -> Iterable[ZipPdf | SkippedEntry]:
    kind = upload_kind(upload)
    if kind is None:
        yield SkippedEntry(
            upload.name, "PDF でも ZIP でもないため取り込みませんでした。",
            "Not taken: neither a PDF nor a ZIP file.",
        )
    elif kind == "pdf":
        data = upload.stream.read(MAX_INPUT_BYTES + 1)
        yield ZipPdf(upload.name, data)
    else:
        try:
            for entry in read_zip_pdfs(cast(BinaryIO, upload.stream)):
                if isinstance(entry, SkippedEntry):
                    yield replace(entry, name=f"{upload.name}: {entry.name}")
                else:
                    yield entry
        except InvalidBatchData as exc:
            yield _skip(upload.name, exc)


def batch_from_uploads(
    sessions: sessionmaker[Session],
    uploads: Iterable[Upload],
    *,
    home: Path,
    user_id: int,
    template: str | None = None,
    name: str | None = None,
) -> Intake:
    """Make a batch of every PDF in ``uploads`` (PDFs and ZIPs of PDFs) and start it, in one
    transaction; the caller then wakes the workers. Files that cannot be taken are skipped
    with their reason (kept for the batch's page, :func:`skipped_entries`).

    :raises InvalidBatchData: nothing could be taken (``field`` is ``files``; the skipped
        files are in ``fields["skipped"]``), or an over-long name.
    :raises TemplateNotFound: ``template`` does not name an active template.
    """
    skipped: list[SkippedEntry] = []
    folder: Path | None = None
    try:
        with session_scope(sessions) as session:
            batch = create_batch(session, home=home, user_id=user_id, template=template,
                                 name=name)
            folder = home / "batches" / batch.public_id
            added = 0
            pending: list[tuple[str, bytes]] = []
            for upload in uploads:
                for entry in _entries(upload):
                    if isinstance(entry, SkippedEntry):
                        skipped.append(entry)
                        continue
                    try:  # checked here, so that a bad one is skipped alone
                        pending.append(
                            (checked_file_name(entry.name), checked_data(entry.data))
                        )
                    except InvalidBatchData as exc:
                        skipped.append(_skip(entry.name, exc))
                        continue
                    if len(pending) >= _STORE_GROUP:
                        added += len(add_documents(session, batch, home=home, files=pending))
                        pending = []
            added += len(add_documents(session, batch, home=home, files=pending))
            if added == 0:
                error = InvalidBatchData(
                    "files",
                    "署名できる PDF がありませんでした。",
                    "There was no PDF that could be signed.",
                )
                error.fields["skipped"] = skipped
                raise error
            start_batch(session, batch)
            _keep_skipped(home, batch, skipped)
            public_id = batch.public_id
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    log.info("batch %s: %d PDF(s) taken, %d skipped, for user %s", public_id, added,
             len(skipped), user_id)
    return Intake(public_id, added, skipped)


def _keep_skipped(home: Path, batch: Batch, skipped: list[SkippedEntry]) -> None:
    if not skipped:
        return
    body = [{"name": s.name, "reason": s.reason, "reason_en": s.reason_en} for s in skipped]
    atomic_write(
        home / "batches" / batch.public_id / SKIPPED_FILE,
        json.dumps(body, ensure_ascii=False).encode("utf-8"),
        mode=0o640,
    )


def skipped_entries(home: Path, batch: Batch) -> list[SkippedEntry]:
    """The files skipped when ``batch`` was made on the signing page (empty for batches made
    otherwise)."""
    path = home / "batches" / batch.public_id / SKIPPED_FILE
    try:
        body = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        log.warning("cannot read %s", path)
        return []
    return [
        SkippedEntry(str(item.get("name", "")), str(item.get("reason", "")),
                     str(item.get("reason_en", "")))
        for item in body if isinstance(item, dict)
    ]

"""Batch signing (一括署名): many PDFs signed with the position key, each exactly once.

The database is the source of truth. A batch is built in ``draft`` (:func:`create_batch`,
:func:`add_document`), started (:func:`start_batch`) and then worked off by any number of
workers in any number of processes (:class:`BatchWorker`, ``koin sign-batch``, later a Celery
task around :meth:`BatchWorker.execute`).

States::

    batch     draft ──start──▶ running ──(no document waiting/running)──▶ finished
              draft/running ──cancel──▶ cancelled          finished ──retry_failed──▶ running
    document  waiting ──claim──▶ running ──▶ done
                                         ├─▶ failed   (the file is not a usable PDF; no retry)
                                         └─▶ waiting  (TSA down etc.: attempts+1, back-off)
              running, lease expired ──claim / reconcile──▶ running (new owner) / waiting
              failed ──retry_failed──▶ waiting

Guarantees:

* **Claiming** works like the mail outbox (:mod:`contracts.mail`): on PostgreSQL the rows
  are picked with ``SELECT … FOR UPDATE SKIP LOCKED`` and leased in the same transaction; on
  SQLite one ``UPDATE … WHERE id IN (SELECT …)`` holds the write lock. A claim sets
  ``lease_owner`` and ``lease_until``; a row whose lease has expired can be claimed again.
* **At most one signature per document.** Each row reserves its document ID before its first
  signature and has a fixed output path (``batches/<public id>/out/<position>-<name>``). The
  signed file is created exclusively (a hard link, never overwriting), and the record in
  ``signed_documents`` is written in the same transaction as the conditional ``UPDATE`` that
  marks the row done (``WHERE lease_owner = me AND state = 'running'``). A worker that lost
  its lease therefore records nothing; a file left by a crashed or overtaken attempt is
  verified (starts with the input, exactly one signature, ours, cryptographically valid) and
  recorded instead of signing again.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import io
import logging
import os
import re
import secrets
import socket
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pyhanko.pdf_utils.reader import PdfFileReader
from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    String,
    UniqueConstraint,
    and_,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from keys import KoinError, Role, atomic_write
from signer import (
    Installation,
    InvalidPdfError,
    PlacementError,
    SignatureLevel,
    SigningContext,
    SignOptions,
    UnsignablePdfError,
    VerifyPolicy,
    new_document_id,
    sign_pdf,
    verify_pdf,
)

from ._db import Base, aware_utc, claim_predicate, rowcount, session_scope, utcnow
from ._periodic import PeriodicWorker
from .accounts import User, UserRole, has_role
from .documents import get_document, record_signed_document
from .errors import BatchNotFound, InvalidBatchData, InvalidBatchState
from .mail import retry_delay
from .models import SigningChannel
from .templates import require_template, sign_options

__all__ = [
    "DEFAULT_BATCH_INTERVAL",
    "LEASE",
    "MAX_INPUT_BYTES",
    "Batch",
    "BatchDocument",
    "BatchStatus",
    "BatchWorker",
    "DocumentState",
    "Progress",
    "add_document",
    "batch_of_user",
    "get_batch_document",
    "list_batches",
    "list_documents_page",
    "batch_progress",
    "cancel_batch",
    "claim_documents",
    "create_batch",
    "finish_if_complete",
    "get_batch",
    "list_documents",
    "reconcile",
    "require_batch",
    "retry_failed",
    "sign_document",
    "start_batch",
]

log = logging.getLogger(__name__)

#: How long a claimed document is reserved for the worker that claimed it.
LEASE = dt.timedelta(minutes=5)
#: Largest input file accepted by :func:`add_document`.
MAX_INPUT_BYTES = 50 * 2**20
MAX_FILE_NAME = 200
MAX_BATCH_NAME = 200
MAX_ERROR = 1000
#: Seconds between two rounds of :class:`BatchWorker` when there is nothing to do.
DEFAULT_BATCH_INTERVAL = 5.0

_UNSAFE_NAME = re.compile(r"[^\w.\-]+")


class BatchStatus(enum.StrEnum):
    DRAFT = "draft"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"


class DocumentState(enum.StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


def _one_of(column: str, values: type[enum.StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Batch(Base):
    """A set of PDFs to be signed with the position key and one stamp template."""

    __tablename__ = "batches"
    __table_args__ = (CheckConstraint(_one_of("status", BatchStatus), name="status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    #: Random, URL-safe; the batch's name in URLs and folders (never the integer id).
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    created_by: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    #: Name of the stamp template (``stamp_templates.name``); None = the default stamp.
    template: Mapped[str | None] = mapped_column(String(64))
    #: What the staff member called it (e.g. 令和8年11月分 建設業許可通知書), for the lists.
    name: Mapped[str | None] = mapped_column(String(MAX_BATCH_NAME))
    status: Mapped[str] = mapped_column(String(12), index=True, default=BatchStatus.DRAFT.value)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]

    @property
    def batch_status(self) -> BatchStatus:
        return BatchStatus(self.status)

    def __repr__(self) -> str:
        return f"Batch(public_id={self.public_id!r}, status={self.status!r})"


class BatchDocument(Base):
    """One PDF of a batch, from upload to its signed copy."""

    __tablename__ = "batch_documents"
    __table_args__ = (
        UniqueConstraint("batch_id", "position", name="uq_batch_documents_batch_id_position"),
        CheckConstraint(_one_of("state", DocumentState), name="state"),
        CheckConstraint("attempts >= 0", name="attempts"),
        Index("ix_batch_documents_due", "state", "lease_until"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"), index=True)
    #: 1-based order of upload.
    position: Mapped[int]
    #: The name the file was uploaded with (for display and the output name).
    file_name: Mapped[str] = mapped_column(String(255))
    #: Relative to ``KOIN_HOME``: ``batches/<public id>/in/<position>.pdf``.
    input_path: Mapped[str] = mapped_column(String(255))
    input_sha256: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(12), default=DocumentState.WAITING.value)
    #: Failed attempts that will be retried (TSA down, …).
    attempts: Mapped[int] = mapped_column(default=0)
    #: The worker that holds the document (random per worker), and until when. A waiting
    #: document with ``lease_until`` in the future is backing off after a failure.
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[dt.datetime | None]
    #: Relative to ``KOIN_HOME``: ``batches/<public id>/out/<position>-<name>``, set when done.
    output_path: Mapped[str | None] = mapped_column(String(255))
    output_sha256: Mapped[str | None] = mapped_column(String(64))
    #: Reserved before the first signature; recorded in ``signed_documents`` when done.
    document_id: Mapped[str | None] = mapped_column(String(19), unique=True)
    #: Why the document failed (or why the last attempt did), in Japanese and English.
    error: Mapped[str | None] = mapped_column(String(MAX_ERROR))
    error_en: Mapped[str | None] = mapped_column(String(MAX_ERROR))
    #: When the document was last handed to the task queue (Celery); the reconciler hands
    #: it over again if it is still waiting long after that (a lost message, a dead worker).
    queued_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    @property
    def document_state(self) -> DocumentState:
        return DocumentState(self.state)

    def __repr__(self) -> str:
        return f"BatchDocument(batch_id={self.batch_id}, position={self.position}, {self.state})"


@dataclass(frozen=True)
class Progress:
    done: int
    failed: int
    waiting: int
    running: int
    total: int

    @property
    def complete(self) -> bool:
        """No document is waiting or being signed."""
        return self.waiting == 0 and self.running == 0


# -- helpers ------------------------------------------------------------------------------------




def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _home_file(home: Path, relative: str) -> Path:
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"not a path inside KOIN_HOME: {relative!r}")
    return home / path


def _checked_file_name(file_name: str) -> str:
    name = file_name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name or len(name) > MAX_FILE_NAME or any(ord(ch) < 32 for ch in name):
        raise InvalidBatchData(
            "file_name",
            f"ファイル名は 1〜{MAX_FILE_NAME} 文字で指定してください。",
            f"The file name must be 1 to {MAX_FILE_NAME} characters.",
        )
    return name


def output_relative(batch: Batch, document: BatchDocument) -> str:
    """The fixed output path of ``document``: ``batches/<public id>/out/<position>-<name>``
    with the name reduced to letters (any script), digits, ``.``, ``-`` and ``_``."""
    stem = _UNSAFE_NAME.sub("_", document.file_name.rsplit(".", 1)[0]).strip("._") or "document"
    return f"batches/{batch.public_id}/out/{document.position}-{stem[:100]}.pdf"


def _state_error(batch: Batch, action: str) -> InvalidBatchState:
    return InvalidBatchState(batch.public_id, batch.status, action)


# -- building a batch ---------------------------------------------------------------------------


def create_batch(
    session: Session,
    *,
    home: Path,
    user_id: int,
    template: str | None = None,
    name: str | None = None,
) -> Batch:
    """Create an empty draft batch (and its folder below ``home``) in the session's
    transaction (the caller commits).

    :param name: what the staff member calls the batch (optional, at most 200 characters).
    :raises InvalidBatchData: no such user, or an over-long name.
    :raises TemplateNotFound: ``template`` does not name an active stamp template.
    """
    if session.get(User, user_id) is None:
        raise InvalidBatchData("user_id", "職員が見つかりません。", f"There is no user {user_id}.")
    name = " ".join(name.split()) if name else None
    if name is not None and (len(name) > MAX_BATCH_NAME or any(ord(ch) < 32 for ch in name)):
        raise InvalidBatchData(
            "name",
            f"一括署名の名前は {MAX_BATCH_NAME} 文字までです。",
            f"The batch name must be at most {MAX_BATCH_NAME} characters.",
        )
    if template is not None:
        template = require_template(session, template).name
    public_id = secrets.token_urlsafe(16)
    (home / "batches" / public_id / "in").mkdir(mode=0o750, parents=True)
    batch = Batch(
        public_id=public_id,
        created_by=user_id,
        template=template,
        name=name or None,
        status=BatchStatus.DRAFT.value,
        created_at=utcnow(),
    )
    session.add(batch)
    session.flush()
    return batch


def get_batch(session: Session, public_id: str) -> Batch | None:
    """The batch with this public ID, or None."""
    if not public_id or len(public_id) > 32:
        return None
    return session.scalar(select(Batch).where(Batch.public_id == public_id))


def require_batch(session: Session, public_id: str) -> Batch:
    """:raises BatchNotFound: there is no batch ``public_id``."""
    batch = get_batch(session, public_id)
    if batch is None:
        raise BatchNotFound(public_id)
    return batch


def batch_of_user(session: Session, public_id: str, user: User) -> Batch:
    """The batch ``public_id`` if ``user`` may see it: its creator, or an administrator.

    :raises BatchNotFound: there is no such batch, or it is someone else's (the same answer,
        so that nobody learns which batch IDs exist).
    """
    batch = get_batch(session, public_id)
    if batch is None or not (batch.created_by == user.id or has_role(user, UserRole.ADMIN)):
        raise BatchNotFound(public_id)
    return batch


def list_batches(
    session: Session,
    *,
    created_by: int | None = None,
    status: BatchStatus | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[Batch]:
    """Batches, newest first; only ``created_by``'s when given, only of ``status`` when given."""
    query = select(Batch).order_by(Batch.created_at.desc(), Batch.id.desc())
    if created_by is not None:
        query = query.where(Batch.created_by == created_by)
    if status is not None:
        query = query.where(Batch.status == status.value)
    return list(session.scalars(query.limit(max(1, min(limit, 500))).offset(max(0, offset))))


def list_documents_page(
    session: Session,
    batch: Batch,
    *,
    state: DocumentState | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[BatchDocument]:
    """A page of ``batch``'s documents in upload order, only those in ``state`` when given."""
    query = select(BatchDocument).where(BatchDocument.batch_id == batch.id)
    if state is not None:
        query = query.where(BatchDocument.state == state.value)
    query = query.order_by(BatchDocument.position).limit(max(1, min(limit, 1000)))
    return list(session.scalars(query.offset(max(0, offset))))


def get_batch_document(session: Session, batch: Batch, position: int) -> BatchDocument | None:
    """Document number ``position`` (1-based upload order) of ``batch``, or None."""
    return session.scalar(
        select(BatchDocument).where(
            BatchDocument.batch_id == batch.id, BatchDocument.position == position
        )
    )


def _lock_batch(session: Session, batch: Batch) -> Batch:
    """Re-read ``batch`` with a row lock (PostgreSQL; SQLite's write lock is taken by the
    caller's first write)."""
    locked = session.scalars(
        select(Batch).where(Batch.id == batch.id).with_for_update().execution_options(
            populate_existing=True
        )
    ).one()
    return locked


def add_document(
    session: Session, batch: Batch, *, home: Path, file_name: str, data: bytes
) -> BatchDocument:
    """Store ``data`` (atomically, at ``batches/<public id>/in/<position>.pdf``) and add it to
    the draft ``batch`` in the session's transaction (the caller commits). The file is not
    checked here: a file that is not a usable PDF fails alone when it is signed.

    :raises InvalidBatchState: the batch is no longer a draft.
    :raises InvalidBatchData: empty or over-long file name, empty or too large file.
    """
    name = _checked_file_name(file_name)
    if not data or len(data) > MAX_INPUT_BYTES:
        raise InvalidBatchData(
            "data",
            f"ファイルが空か、大きすぎます({MAX_INPUT_BYTES // 2**20} MiB まで)。",
            f"The file is empty or too large (at most {MAX_INPUT_BYTES // 2**20} MiB).",
        )
    batch = _lock_batch(session, batch)
    if batch.status != BatchStatus.DRAFT:
        raise _state_error(batch, "add")
    last = session.scalar(
        select(func.max(BatchDocument.position)).where(BatchDocument.batch_id == batch.id)
    )
    position = (last or 0) + 1
    relative = f"batches/{batch.public_id}/in/{position}.pdf"
    path = _home_file(home, relative)
    atomic_write(path, data, mode=0o640)
    try:
        document = BatchDocument(
            batch_id=batch.id,
            position=position,
            file_name=name,
            input_path=relative,
            input_sha256=_sha256(data),
            state=DocumentState.WAITING.value,
            attempts=0,
            updated_at=utcnow(),
        )
        session.add(document)
        session.flush()
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return document


def start_batch(session: Session, batch: Batch, *, now: dt.datetime | None = None) -> Batch:
    """Start a draft batch: its documents wait for workers.

    :raises InvalidBatchState: the batch is not a draft, or has no documents.
    """
    moment = aware_utc(now)
    result = session.execute(
        update(Batch)
        .where(
            Batch.id == batch.id,
            Batch.status == BatchStatus.DRAFT.value,
            exists().where(BatchDocument.batch_id == Batch.id),
        )
        .values(status=BatchStatus.RUNNING.value, started_at=moment)
    )
    batch = _lock_batch(session, batch)
    if rowcount(result) != 1:
        raise _state_error(batch, "start")
    return batch


def cancel_batch(session: Session, batch: Batch, *, now: dt.datetime | None = None) -> Batch:
    """Cancel a draft or running batch: documents not yet claimed are no longer signed (one
    being signed right now still finishes).

    :raises InvalidBatchState: the batch is finished or already cancelled.
    """
    moment = aware_utc(now)
    result = session.execute(
        update(Batch)
        .where(
            Batch.id == batch.id,
            Batch.status.in_([BatchStatus.DRAFT.value, BatchStatus.RUNNING.value]),
        )
        .values(status=BatchStatus.CANCELLED.value, finished_at=moment)
    )
    batch = _lock_batch(session, batch)
    if rowcount(result) != 1:
        raise _state_error(batch, "cancel")
    return batch


def retry_failed(session: Session, batch: Batch, *, now: dt.datetime | None = None) -> int:
    """Put the failed documents of a running or finished batch back to waiting (a finished
    batch runs again). Returns how many.

    :raises InvalidBatchState: the batch is a draft or cancelled.
    """
    moment = aware_utc(now)
    batch = _lock_batch(session, batch)
    if batch.status not in (BatchStatus.RUNNING, BatchStatus.FINISHED):
        raise _state_error(batch, "retry")
    result = session.execute(
        update(BatchDocument)
        .where(
            BatchDocument.batch_id == batch.id,
            BatchDocument.state == DocumentState.FAILED.value,
        )
        .values(
            state=DocumentState.WAITING.value, attempts=0, lease_owner=None, lease_until=None,
            error=None, error_en=None, queued_at=None, updated_at=moment,
        )
    )
    count = rowcount(result)
    if count and batch.status == BatchStatus.FINISHED:
        batch.status = BatchStatus.RUNNING.value
        batch.finished_at = None
        session.flush()
    return count


def list_documents(session: Session, batch: Batch) -> list[BatchDocument]:
    """The documents of ``batch`` in upload order."""
    return list(
        session.scalars(
            select(BatchDocument)
            .where(BatchDocument.batch_id == batch.id)
            .order_by(BatchDocument.position)
        )
    )


def batch_progress(session: Session, batch: Batch) -> Progress:
    """How many documents of ``batch`` are in each state."""
    rows = session.execute(
        select(BatchDocument.state, func.count())
        .where(BatchDocument.batch_id == batch.id)
        .group_by(BatchDocument.state)
    ).all()
    counts = {DocumentState(state): int(count) for state, count in rows}
    return Progress(
        done=counts.get(DocumentState.DONE, 0),
        failed=counts.get(DocumentState.FAILED, 0),
        waiting=counts.get(DocumentState.WAITING, 0),
        running=counts.get(DocumentState.RUNNING, 0),
        total=sum(counts.values()),
    )


def finish_if_complete(session: Session, batch: Batch, *, now: dt.datetime | None = None) -> bool:
    """Mark a running batch finished if none of its documents is waiting or running (one
    conditional ``UPDATE``). Call it in a transaction of its own, after the documents' changes
    have committed. Returns whether this call finished it."""
    return _finish_where(session, Batch.id == batch.id, aware_utc(now)) == 1


def _finish_where(session: Session, condition: Any, moment: dt.datetime) -> int:
    pending = exists().where(
        BatchDocument.batch_id == Batch.id,
        BatchDocument.state.in_([DocumentState.WAITING.value, DocumentState.RUNNING.value]),
    )
    result = session.execute(
        update(Batch)
        .where(condition, Batch.status == BatchStatus.RUNNING.value, ~pending)
        .values(status=BatchStatus.FINISHED.value, finished_at=moment),
        execution_options={"synchronize_session": False},
    )
    return rowcount(result)


# -- working off a batch ------------------------------------------------------------------------


def _due(now: dt.datetime) -> Any:
    running_batches = select(Batch.id).where(Batch.status == BatchStatus.RUNNING.value)
    return and_(
        BatchDocument.batch_id.in_(running_batches),
        or_(
            and_(
                BatchDocument.state == DocumentState.WAITING.value,
                or_(BatchDocument.lease_until.is_(None), BatchDocument.lease_until <= now),
            ),
            and_(
                BatchDocument.state == DocumentState.RUNNING.value,
                BatchDocument.lease_until <= now,
            ),
        ),
    )


def claim_documents(
    sessions: sessionmaker[Session],
    *,
    owner: str,
    limit: int,
    lease: dt.timedelta = LEASE,
    now: dt.datetime | None = None,
    ids: Sequence[int] | None = None,
) -> list[int]:
    """Lease up to ``limit`` documents of running batches to ``owner``: waiting ones (past
    their back-off) and running ones whose lease has expired (their worker died), in upload
    order; with ``ids``, only among those rows (a queued task claiming its documents; the
    ones that are done or held by another worker are left out). Safe with concurrent
    workers: no document is held by two owners at once.

    :raises ValueError: ``limit`` below 1, empty ``owner`` or naive ``now``.
    """
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    if not owner or len(owner) > 64:
        raise ValueError("owner must be 1 to 64 characters")
    moment = aware_utc(now)
    due = _due(moment)
    if ids is not None:
        if not ids:
            return []
        due = and_(due, BatchDocument.id.in_(list(ids)))
    first_due = (
        select(BatchDocument.id)
        .where(due)
        .order_by(BatchDocument.batch_id, BatchDocument.position)
        .limit(limit)
    )
    with session_scope(sessions) as session:
        chosen = claim_predicate(session, BatchDocument.id, first_due)
        if chosen is None:
            return []
        claimed = session.scalars(
            update(BatchDocument)
            .where(chosen, due)
            .values(
                state=DocumentState.RUNNING.value,
                lease_owner=owner,
                lease_until=moment + lease,
                updated_at=moment,
            )
            .returning(BatchDocument.id),
            execution_options={"synchronize_session": False},
        ).all()
    return sorted(claimed)


def reconcile(sessions: sessionmaker[Session], *, now: dt.datetime | None = None) -> int:
    """Put documents whose worker's lease has expired back to waiting, and finish running
    batches with nothing left to do. Returns how many documents were put back."""
    moment = aware_utc(now)
    with session_scope(sessions) as session:
        result = session.execute(
            update(BatchDocument)
            .where(
                BatchDocument.state == DocumentState.RUNNING.value,
                BatchDocument.lease_until <= moment,
            )
            .values(
                state=DocumentState.WAITING.value, lease_owner=None, lease_until=None,
                queued_at=None, updated_at=moment,
            ),
            execution_options={"synchronize_session": False},
        )
        count = rowcount(result)
    with session_scope(sessions) as session:
        _finish_where(session, Batch.id.is_not(None), moment)
    if count:
        log.warning("batch signing: %d document(s) with an expired lease put back", count)
    return count


class _LeaseLost(Exception):
    """The row is no longer ours (lease expired and taken over, or reset)."""


class _OutputUnusable(KoinError):
    """An output file exists but is not a signature of this document's input by us."""


class _InputUnusable(KoinError):
    """The stored input file is missing or changed since upload."""


@dataclass(frozen=True)
class _Job:
    row_id: int
    batch_id: int
    file_name: str
    input_path: Path
    input_sha256: str
    output_relative: str
    output_path: Path
    document_id: str
    options: SignOptions
    created_by: int
    template: str | None


def _prepare(
    sessions: sessionmaker[Session],
    row_id: int,
    *,
    home: Path,
    owner: str,
    public_url: str | None,
    moment: dt.datetime,
) -> _Job | DocumentState:
    """Check the row is ours; reserve its document ID. The row's state if it is not ours."""
    with session_scope(sessions) as session:
        row = session.get(BatchDocument, row_id)
        if row is None:
            raise ValueError(f"no batch document {row_id}")
        if row.state != DocumentState.RUNNING or row.lease_owner != owner:
            return DocumentState(row.state)
        batch = session.get_one(Batch, row.batch_id)
        if row.document_id is None:
            reserved = new_document_id()
            result = session.execute(
                update(BatchDocument)
                .where(*_ours(row_id, owner), BatchDocument.document_id.is_(None))
                .values(document_id=reserved, updated_at=moment),
                execution_options={"synchronize_session": False},
            )
            if rowcount(result) != 1:
                return DocumentState(row.state)
            document_id = reserved
        else:
            document_id = row.document_id
        if batch.template is not None:
            template = require_template(session, batch.template, active=False)
            options = sign_options(template, public_url=public_url or "")
            if not public_url:
                options = replace(options, verify_base_url=None)
        else:
            options = SignOptions(verify_base_url=public_url)
        relative = output_relative(batch, row)
        return _Job(
            row_id=row.id,
            batch_id=batch.id,
            file_name=row.file_name,
            input_path=_home_file(home, row.input_path),
            input_sha256=row.input_sha256,
            output_relative=relative,
            output_path=_home_file(home, relative),
            document_id=document_id,
            options=replace(options, document_id=document_id),
            created_by=batch.created_by,
            template=batch.template,
        )


def _ours(row_id: int, owner: str) -> tuple[Any, ...]:
    return (
        BatchDocument.id == row_id,
        BatchDocument.lease_owner == owner,
        BatchDocument.state == DocumentState.RUNNING.value,
    )


def _read_input(job: _Job) -> bytes:
    try:
        data = job.input_path.read_bytes()
    except OSError as exc:
        raise _InputUnusable(
            "アップロードされたファイルが見つかりません。",
            f"The uploaded file cannot be read: {exc.strerror}",
        ) from exc
    if _sha256(data) != job.input_sha256:
        raise _InputUnusable(
            "アップロードされたファイルが変更されています。",
            "The uploaded file has changed since it was uploaded.",
        )
    return data


def _create_exclusively(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` completely or not at all, never replacing an existing file.

    :raises FileExistsError: ``path`` exists.
    """
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o640)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


@dataclass(frozen=True)
class _Signed:
    sha256: str
    level: SignatureLevel
    signed_at: dt.datetime


def _check_existing(job: _Job, source: bytes, data: bytes, context: SigningContext) -> _Signed:
    """Accept an output file left by an earlier attempt only if it is the input plus exactly
    one signature, made with our key and valid.

    :raises _OutputUnusable: it is not.
    """

    def unusable(reason: str) -> _OutputUnusable:
        return _OutputUnusable(
            f"既存の出力ファイルを検証できません({reason})。",
            f"The existing output file cannot be accepted ({reason}).",
            path=job.output_relative,
        )

    if len(data) <= len(source) or not data.startswith(source):
        raise unusable("not an incremental update of the input")
    try:
        signatures = PdfFileReader(io.BytesIO(data), strict=False).embedded_signatures
        certificate = signatures[0].signer_cert if len(signatures) == 1 else None
    except Exception as exc:
        raise unusable(f"unreadable: {exc.__class__.__name__}") from exc
    ours = context.signer.signing_cert
    if certificate is None or ours is None or certificate.dump() != ours.dump():
        raise unusable("not exactly one signature by the position key")
    if context.trust is None:
        raise unusable("no trust material to verify with")
    trust = context.trust
    report = verify_pdf(data, VerifyPolicy(trust.roots, trust.intermediates, trust.crls))
    if not report.passed or len(report.signatures) != 1:
        raise unusable(report.summary_en)
    found = report.signatures[0]
    signed_at = found.claimed_signing_time or found.best_signature_time or utcnow()
    return _Signed(_sha256(data), job.options.level, signed_at)


def _mark_done(
    sessions: sessionmaker[Session],
    job: _Job,
    signed: _Signed,
    context: SigningContext,
    *,
    owner: str,
    moment: dt.datetime,
) -> None:
    """Mark the row done and record the signed document, in one transaction.

    :raises _LeaseLost: the row is no longer ours (nothing is recorded).
    :raises DuplicateDocument: the document ID is recorded for another file.
    """
    certificate = context.signer.signing_cert
    subject = certificate.subject.human_friendly if certificate is not None else "?"
    with session_scope(sessions) as session:
        result = session.execute(
            update(BatchDocument)
            .where(*_ours(job.row_id, owner))
            .values(
                state=DocumentState.DONE.value, output_path=job.output_relative,
                output_sha256=signed.sha256, lease_owner=None, lease_until=None,
                error=None, error_en=None, updated_at=moment,
            ),
            execution_options={"synchronize_session": False},
        )
        if rowcount(result) != 1:
            raise _LeaseLost
        known = get_document(session, job.document_id)
        if known is None or known.sha256 != signed.sha256:
            record_signed_document(
                session,
                document_id=job.document_id,
                sha256=signed.sha256,
                signer_role=Role.POSITION.value,
                signer_subject=subject,
                level=signed.level,
                signed_at=signed.signed_at,
                file_name=job.file_name[-255:],
                signed_by=job.created_by,
                template=job.template,
                channel=SigningChannel.BATCH,
            )


def _release(
    sessions: sessionmaker[Session],
    row_id: int,
    *,
    owner: str,
    moment: dt.datetime,
    error: KoinError | Exception,
    final: bool,
) -> bool:
    """Fail the row (``final``) or put it back to waiting with a back-off."""
    if isinstance(error, KoinError):
        message, message_en = error.message, error.message_en
    else:
        message = "一時的な障害のため署名できませんでした。自動で再試行します。"
        message_en = f"{error.__class__.__name__}: {error}"
    values: dict[str, Any] = {
        "lease_owner": None, "error": message[:MAX_ERROR], "error_en": message_en[:MAX_ERROR],
        "updated_at": moment,
    }
    with session_scope(sessions) as session:
        if final:
            values.update(state=DocumentState.FAILED.value, lease_until=None)
        else:
            attempts = session.scalar(
                select(BatchDocument.attempts).where(BatchDocument.id == row_id)
            ) or 0
            values.update(
                state=DocumentState.WAITING.value,
                attempts=BatchDocument.attempts + 1,
                lease_until=moment + retry_delay(attempts + 1),
                queued_at=None,  # queue it again once the back-off has passed
            )
        result = session.execute(
            update(BatchDocument).where(*_ours(row_id, owner)).values(**values),
            execution_options={"synchronize_session": False},
        )
        return rowcount(result) == 1


def _current_state(sessions: sessionmaker[Session], row_id: int) -> DocumentState:
    with sessions() as session:
        state = session.scalars(
            select(BatchDocument.state).where(BatchDocument.id == row_id)
        ).one()
    return DocumentState(state)


def sign_document(
    sessions: sessionmaker[Session],
    document_id: int,
    context: SigningContext,
    *,
    home: Path,
    owner: str,
    public_url: str | None = None,
    now: dt.datetime | None = None,
) -> DocumentState:
    """Sign the batch document ``document_id`` (a row id) that ``owner`` has claimed, record
    it, and mark it done. Idempotent: a done row is left alone, and a complete output file of
    an earlier attempt that was never marked is verified and recorded instead of signing
    again. Returns the row's state afterwards (unchanged if the row is not ``owner``'s).

    A file that is not a usable PDF (not a PDF, encrypted, broken, an existing signature that
    fails verification, stamp does not fit) fails the document with the signer's reason; any
    other error (TSA down, database hiccup, …) puts it back to waiting with ``attempts`` + 1
    and a back-off (:func:`retry_delay`).

    :param context: the position key's signing context, loaded once per process.
    :param home: ``KOIN_HOME``, below which the batch's files live.
    :param public_url: base of the verification URL for templates with a QR code.
    :raises ValueError: there is no such row.
    """
    moment = aware_utc(now)
    prepared = _prepare(
        sessions, document_id, home=home, owner=owner, public_url=public_url, moment=moment
    )
    if isinstance(prepared, DocumentState):
        return prepared
    job = prepared
    try:
        source = _read_input(job)
        if job.output_path.exists():
            signed = _check_existing(job, source, job.output_path.read_bytes(), context)
        else:
            result = sign_pdf(source, context, job.options)
            assert result.data is not None
            try:
                _create_exclusively(job.output_path, result.data)
                signed = _Signed(result.sha256, result.level, result.signed_at)
            except FileExistsError:  # an overtaken worker was faster: take its file
                signed = _check_existing(job, source, job.output_path.read_bytes(), context)
        _mark_done(sessions, job, signed, context, owner=owner, moment=aware_utc(now))
    except _LeaseLost:
        log.warning("batch document %d: lease lost before it was marked done", document_id)
    except (
        InvalidPdfError, UnsignablePdfError, PlacementError, _InputUnusable, _OutputUnusable
    ) as exc:
        log.info("batch document %d failed: %s", document_id, exc.message_en)
        _release(sessions, document_id, owner=owner, moment=aware_utc(now), error=exc, final=True)
    except Exception as exc:
        log.warning("batch document %d not signed, will retry: %s", document_id, exc,
                    exc_info=not isinstance(exc, KoinError))
        _release(sessions, document_id, owner=owner, moment=aware_utc(now), error=exc, final=False)
    state = _current_state(sessions, document_id)
    if state in (DocumentState.DONE, DocumentState.FAILED):
        with session_scope(sessions) as session:
            _finish_where(session, Batch.id == job.batch_id, aware_utc(now))
    return state


# -- executor -----------------------------------------------------------------------------------


def _new_owner() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(6)}"


class BatchWorker(PeriodicWorker[int]):
    """Works off running batches in this process: each round runs :func:`reconcile`, claims up
    to ``2 × threads`` documents and signs them on a pool of ``threads`` threads, with one
    signing context (the position key) loaded once when the worker is made.

    :meth:`execute` is a plain callable ``execute(document_id)`` for a row this worker has
    claimed, so that a Celery task can wrap it later (claim with :attr:`owner`, then enqueue
    ``execute`` per id). Errors are logged; nothing escapes the thread.
    """

    thread_name = "koin-batches"

    def __init__(
        self,
        sessions: sessionmaker[Session],
        installation: Installation,
        *,
        home: Path | None = None,
        threads: int = 2,
        public_url: str | None = None,
        tsa_urls: Sequence[str] = (),
        context: SigningContext | None = None,
        lease: dt.timedelta = LEASE,
        interval: float = DEFAULT_BATCH_INTERVAL,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        """:param home: where the batches' files live (default: the installation's home).
        :param context: a signing context to use instead of the installation's position
            context (tests).
        :raises ValueError: ``threads`` or ``interval`` is not positive.
        :raises KeyStoreError: the position key cannot be loaded.
        """
        super().__init__(interval)
        if threads < 1:
            raise ValueError(f"threads must be positive, got {threads}")
        self.sessions = sessions
        self.home = home or installation.home
        self.threads = threads
        self.public_url = public_url
        self.lease = lease
        self.clock = clock
        self.owner = _new_owner()
        self.context = context or installation.signing_context(Role.POSITION, tsa_urls=tsa_urls)

    def execute(self, document_id: int) -> DocumentState:
        """Sign one claimed document (see :func:`sign_document`)."""
        return sign_document(
            self.sessions, document_id, self.context, home=self.home, owner=self.owner,
            public_url=self.public_url, now=self.clock(),
        )

    def run_once(self) -> int | None:
        """One round; the number of documents claimed, or None if it failed (logged)."""
        try:
            reconcile(self.sessions, now=self.clock())
            ids = claim_documents(
                self.sessions, owner=self.owner, limit=2 * self.threads, lease=self.lease,
                now=self.clock(),
            )
            if ids:
                with ThreadPoolExecutor(self.threads, thread_name_prefix="koin-sign") as pool:
                    list(pool.map(self.execute, ids))
            return len(ids)
        except Exception:
            log.exception("batch signing round failed; trying again in %.0f s", self.interval)
            return None

    def more_due(self, result: int | None) -> bool:
        return result is not None and result == 2 * self.threads

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
    Table,
    UniqueConstraint,
    and_,
    bindparam,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from keys import KoinError, Role
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
from timestamp import TimestampError

from . import lta, metrics
from ._db import Base, aware_utc, claim_predicate, rowcount, session_scope, utcnow
from ._durable import stage_file, sync_filesystem
from ._periodic import PeriodicWorker
from .accounts import User, UserRole, has_role
from .documents import record_signed_documents
from .errors import BatchNotFound, InvalidBatchData, InvalidBatchState
from .mail import retry_delay
from .models import SignedDocument, SigningChannel
from .public_ids import new_public_id
from .templates import require_template, template_options
from .webhooks import WebhookEvent, batch_finished_data, enqueue_event

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
    "add_documents",
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
    "sign_documents",
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
#: Documents one thread or task signs together (one transaction, one filesystem sync).
DEFAULT_CHUNK = 10

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


def checked_file_name(file_name: str) -> str:
    """The name a batch keeps for an uploaded file: its last path part, stripped.

    :raises InvalidBatchData: empty, too long, or with control characters.
    """
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
    public_id = new_public_id()
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


def checked_data(data: bytes) -> bytes:
    """``data`` if a batch may hold it.

    :raises InvalidBatchData: empty, or larger than :data:`MAX_INPUT_BYTES`.
    """
    if not data or len(data) > MAX_INPUT_BYTES:
        raise InvalidBatchData(
            "data",
            f"ファイルが空か、大きすぎます({MAX_INPUT_BYTES // 2**20} MiB まで)。",
            f"The file is empty or too large (at most {MAX_INPUT_BYTES // 2**20} MiB).",
        )
    return data


def add_documents(
    session: Session, batch: Batch, *, home: Path, files: Sequence[tuple[str, bytes]]
) -> list[BatchDocument]:
    """Store the ``(file name, data)`` of ``files`` at ``batches/<public id>/in/<position>.pdf``
    and add them to the draft ``batch`` in upload order, in the session's transaction (the
    caller commits). The files are written under temporary names, made durable with one
    filesystem sync for all of them, and then given their names. They are not checked here:
    a file that is not a usable PDF fails alone when it is signed.

    :raises InvalidBatchState: the batch is no longer a draft.
    :raises InvalidBatchData: an empty or over-long file name, an empty or too large file
        (nothing of ``files`` is added then).
    """
    checked = [(checked_file_name(name), checked_data(data)) for name, data in files]
    if not checked:
        return []
    batch = _lock_batch(session, batch)
    if batch.status != BatchStatus.DRAFT:
        raise _state_error(batch, "add")
    last = session.scalar(
        select(func.max(BatchDocument.position)).where(BatchDocument.batch_id == batch.id)
    ) or 0
    folder = _home_file(home, f"batches/{batch.public_id}/in")
    written: list[Path] = []
    staged: list[Path] = []
    try:
        staged = [stage_file(folder, f"{last + i}.pdf", data) for i, (_, data) in
                  enumerate(checked, start=1)]
        sync_filesystem(folder)
        for position, temporary in enumerate(staged, start=last + 1):
            path = folder / f"{position}.pdf"
            os.replace(temporary, path)
            written.append(path)
        sync_filesystem(folder)
        moment = utcnow()
        documents = [
            BatchDocument(
                batch_id=batch.id,
                position=position,
                file_name=name,
                input_path=f"batches/{batch.public_id}/in/{position}.pdf",
                input_sha256=_sha256(data),
                state=DocumentState.WAITING.value,
                attempts=0,
                updated_at=moment,
            )
            for position, (name, data) in enumerate(checked, start=last + 1)
        ]
        session.add_all(documents)
        session.flush()
    except BaseException:
        for path in [*staged, *written]:
            path.unlink(missing_ok=True)
        raise
    return documents


def add_document(
    session: Session, batch: Batch, *, home: Path, file_name: str, data: bytes
) -> BatchDocument:
    """Add one file to the draft ``batch`` (see :func:`add_documents`).

    :raises InvalidBatchState: the batch is no longer a draft.
    :raises InvalidBatchData: empty or over-long file name, empty or too large file.
    """
    [document] = add_documents(session, batch, home=home, files=[(file_name, data)])
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


def finish_if_complete(
    session: Session, batch: Batch, *, now: dt.datetime | None = None,
    public_url: str | None = None,
) -> bool:
    """Mark a running batch finished if none of its documents is waiting or running (one
    conditional ``UPDATE``), and announce it (webhook ``batch.finished``, archive URL below
    ``public_url``). Call it in a transaction of its own, after the documents' changes have
    committed. Returns whether this call finished it."""
    return _finish_where(session, Batch.id == batch.id, aware_utc(now), public_url) == 1


def _finish_where(
    session: Session, condition: Any, moment: dt.datetime, public_url: str | None
) -> int:
    """Finish the running batches matching ``condition`` that have nothing left to do, and
    queue a ``batch.finished`` webhook for each in the same transaction. How many."""
    pending = exists().where(
        BatchDocument.batch_id == Batch.id,
        BatchDocument.state.in_([DocumentState.WAITING.value, DocumentState.RUNNING.value]),
    )
    finished = session.execute(
        update(Batch)
        .where(condition, Batch.status == BatchStatus.RUNNING.value, ~pending)
        .values(status=BatchStatus.FINISHED.value, finished_at=moment)
        .returning(Batch.id, Batch.public_id),
        execution_options={"synchronize_session": False},
    ).all()
    for batch_id, public_id in finished:
        counts = dict(
            session.execute(
                select(BatchDocument.state, func.count())
                .where(BatchDocument.batch_id == batch_id)
                .group_by(BatchDocument.state)
            ).all()
        )
        enqueue_event(
            session, WebhookEvent.BATCH_FINISHED,
            batch_finished_data(
                batch_id=public_id, done=int(counts.get(DocumentState.DONE.value, 0)),
                failed=int(counts.get(DocumentState.FAILED.value, 0)), finished_at=moment,
                public_url=public_url or "",
            ),
            now=moment,
        )
    return len(finished)


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


def reconcile(
    sessions: sessionmaker[Session], *, now: dt.datetime | None = None,
    public_url: str | None = None,
) -> int:
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
        _finish_where(session, Batch.id.is_not(None), moment, public_url)
    if count:
        log.warning("batch signing: %d document(s) with an expired lease put back", count)
    return count


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


def _prepare_many(
    sessions: sessionmaker[Session],
    row_ids: Sequence[int],
    *,
    home: Path,
    owner: str,
    public_url: str | None,
    moment: dt.datetime,
) -> list[_Job]:
    """The jobs of those rows of ``row_ids`` that ``owner`` holds, with their document IDs
    reserved (in one transaction); rows that are not ours are left out.

    :raises ValueError: one of the rows does not exist.
    """
    jobs: list[_Job] = []
    with session_scope(sessions) as session:
        rows = {
            row.id: row
            for row in session.scalars(
                select(BatchDocument).where(BatchDocument.id.in_(list(row_ids)))
            )
        }
        missing = set(row_ids) - set(rows)
        if missing:
            raise ValueError(f"no batch documents {sorted(missing)}")
        ours = [
            rows[row_id] for row_id in row_ids
            if rows[row_id].state == DocumentState.RUNNING and rows[row_id].lease_owner == owner
        ]
        document_ids = _reserve_document_ids(session, ours, owner=owner, moment=moment)
        options_of: dict[int, tuple[Batch, SignOptions]] = {}
        for row in ours:
            document_id = document_ids.get(row.id)
            if document_id is None:  # taken over by another worker meanwhile
                continue
            if row.batch_id not in options_of:
                batch = session.get_one(Batch, row.batch_id)
                options = template_options(
                    session, batch.template, public_url=public_url, active=False
                )
                options_of[row.batch_id] = (batch, options)
            batch, options = options_of[row.batch_id]
            relative = output_relative(batch, row)
            jobs.append(
                _Job(
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
            )
    return jobs


def _update_each_of_ours(
    session: Session,
    owner: str,
    values: dict[str, Any],
    rows: list[dict[str, Any]],
    *,
    only_without_document_id: bool = False,
) -> None:
    """One UPDATE executed for each of ``rows`` (bind ``row_id`` plus the parameters that
    ``values`` names), each guarded like :func:`_ours`: a row no longer ``owner``'s running
    one is left alone."""
    table = BatchDocument.__table__
    assert isinstance(table, Table)
    conditions = [
        table.c.id == bindparam("row_id"),
        table.c.lease_owner == owner,
        table.c.state == DocumentState.RUNNING.value,
    ]
    if only_without_document_id:
        conditions.append(table.c.document_id.is_(None))
    session.connection().execute(update(table).where(*conditions).values(**values), rows)


def _reserve_document_ids(
    session: Session, rows: Sequence[BatchDocument], *, owner: str, moment: dt.datetime
) -> dict[int, str]:
    """Row id → document ID for ``rows`` that are still ``owner``'s: those without one get a
    new one (one UPDATE for all, guarded like a single claim), then one SELECT reads back
    which rows carry what, so a row taken over meanwhile is left out."""
    fresh = {row.id: new_document_id() for row in rows if row.document_id is None}
    if fresh:
        _update_each_of_ours(
            session, owner,
            {"document_id": bindparam("reserved"), "updated_at": moment},
            [{"row_id": row_id, "reserved": reserved} for row_id, reserved in fresh.items()],
            only_without_document_id=True,
        )
    held = {
        row_id: document_id
        for row_id, document_id in session.execute(
            select(BatchDocument.id, BatchDocument.document_id).where(
                BatchDocument.id.in_([row.id for row in rows]),
                BatchDocument.lease_owner == owner,
                BatchDocument.state == DocumentState.RUNNING.value,
            )
        )
        if document_id is not None
    }
    # A fresh row whose document ID is not the one reserved here was reserved by another.
    return {
        row.id: held[row.id] for row in rows
        if row.id in held and (row.id not in fresh or held[row.id] == fresh[row.id])
    }


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
    finished: Sequence[tuple[_Job, _Signed]],
    context: SigningContext,
    *,
    owner: str,
    moment: dt.datetime,
) -> None:
    """Mark the rows done and record the signed documents, in one transaction; a row that is
    no longer ours is left alone and nothing is recorded for it (its new owner finds the
    file and records it).

    :raises DuplicateDocument: a document ID is recorded for another file.
    """
    certificate = context.signer.signing_cert
    subject = certificate.subject.human_friendly if certificate is not None else "?"
    with session_scope(sessions) as session:
        # A handful of statements for the whole chunk, whatever its size: the rows still
        # ours (locked until the commit), one UPDATE executed for all of them, the documents
        # not yet recorded, one INSERT each for the records and the B-LTA registrations.
        ours = set(session.scalars(
            select(BatchDocument.id)
            .where(
                BatchDocument.id.in_([job.row_id for job, _ in finished]),
                BatchDocument.lease_owner == owner,
                BatchDocument.state == DocumentState.RUNNING.value,
            )
            .with_for_update()
        ))
        for job, _ in finished:
            if job.row_id not in ours:
                log.warning(
                    "batch document %d: lease lost before it was marked done", job.row_id
                )
        mine = [(job, signed) for job, signed in finished if job.row_id in ours]
        if not mine:
            return
        _update_each_of_ours(
            session, owner,
            {
                "state": DocumentState.DONE.value, "output_path": bindparam("done_path"),
                "output_sha256": bindparam("done_sha256"), "lease_owner": None,
                "lease_until": None, "error": None, "error_en": None, "updated_at": moment,
            },
            [{"row_id": job.row_id, "done_path": job.output_relative,
              "done_sha256": signed.sha256} for job, signed in mine],
        )
        recorded = {document_id: sha256 for document_id, sha256 in session.execute(
            select(SignedDocument.document_id, SignedDocument.sha256)
            .where(SignedDocument.document_id.in_([job.document_id for job, _ in mine]))
        )}
        new = [(job, signed) for job, signed in mine
               if recorded.get(job.document_id) != signed.sha256]
        record_signed_documents(session, [
            {
                "document_id": job.document_id, "sha256": signed.sha256,
                "signer_role": Role.POSITION.value, "signer_subject": subject,
                "level": signed.level, "signed_at": signed.signed_at,
                "file_name": job.file_name[-255:], "signed_by": job.created_by,
                "template": job.template, "channel": SigningChannel.BATCH,
            }
            for job, signed in new
        ])
        lta.register_stored_files(
            session, lta.LtaKind.BATCH_DOCUMENT,
            [(job.output_relative, signed.sha256, job.document_id) for job, signed in mine],
            now=moment,
        )
    for _, signed in new:  # committed: each document counts once
        metrics.count_signed(Role.POSITION, signed.level)


def _release(
    sessions: sessionmaker[Session],
    failures: Sequence[tuple[int, KoinError | Exception, bool]],
    *,
    owner: str,
    moment: dt.datetime,
) -> None:
    """Fail the rows whose error is final, put the others back to waiting with a back-off
    (``(row id, error, final)`` each), in one transaction; rows no longer ours are left."""
    if not failures:
        return
    with session_scope(sessions) as session:
        attempts_of = dict(
            session.execute(
                select(BatchDocument.id, BatchDocument.attempts).where(
                    BatchDocument.id.in_([row_id for row_id, _, _ in failures])
                )
            ).all()
        )
        for row_id, error, final in failures:
            if isinstance(error, KoinError):
                message, message_en = error.message, error.message_en
            else:
                message = "一時的な障害のため署名できませんでした。自動で再試行します。"
                message_en = f"{error.__class__.__name__}: {error}"
            values: dict[str, Any] = {
                "lease_owner": None, "error": message[:MAX_ERROR],
                "error_en": message_en[:MAX_ERROR], "updated_at": moment,
            }
            if final:
                values.update(state=DocumentState.FAILED.value, lease_until=None)
            else:
                attempts = (attempts_of.get(row_id) or 0) + 1
                values.update(
                    state=DocumentState.WAITING.value,
                    attempts=BatchDocument.attempts + 1,
                    lease_until=moment + retry_delay(attempts),
                    queued_at=None,  # queue it again once the back-off has passed
                )
            session.execute(
                update(BatchDocument).where(*_ours(row_id, owner)).values(**values),
                execution_options={"synchronize_session": False},
            )


def _states(sessions: sessionmaker[Session], row_ids: Sequence[int]) -> dict[int, DocumentState]:
    with sessions() as session:
        rows = session.execute(
            select(BatchDocument.id, BatchDocument.state).where(
                BatchDocument.id.in_(list(row_ids))
            )
        )
        return {row_id: DocumentState(state) for row_id, state in rows}


_FINAL_ERRORS = (
    InvalidPdfError, UnsignablePdfError, PlacementError, _InputUnusable, _OutputUnusable
)


def sign_documents(
    sessions: sessionmaker[Session],
    document_ids: Sequence[int],
    context: SigningContext,
    *,
    home: Path,
    owner: str,
    public_url: str | None = None,
    now: dt.datetime | None = None,
) -> dict[int, DocumentState]:
    """Sign the batch documents ``document_ids`` (row ids) that ``owner`` has claimed, record
    them, and mark them done; the rows' states afterwards (unchanged for rows that are not
    ``owner``'s). Idempotent: a done row is left alone, and a complete output file of an
    earlier attempt that was never marked is verified and recorded instead of signing again.

    The database work is done for all the documents together (one transaction to reserve
    their document IDs, one to mark them done and record them, one for failures), and the
    output files are made durable together: each is written under a temporary name, the
    filesystem is synced once, the files get their final names (never replacing a file), and
    it is synced once more before any row is marked done — so a final name never points at a
    half-written file.

    A file that is not a usable PDF (not a PDF, encrypted, broken, stamp does not fit) fails
    its document with the signer's reason; any other error (TSA down, database hiccup, …)
    puts it back to waiting with ``attempts`` + 1 and a back-off (:func:`retry_delay`); once
    the TSA has failed, the rest of the documents go back to waiting without trying.

    :param context: the position key's signing context, loaded once per process.
    :param home: ``KOIN_HOME``, below which the batch's files live.
    :param public_url: base of the verification URL for templates with a QR code.
    :raises ValueError: one of the rows does not exist.
    """
    moment = aware_utc(now)
    jobs = _prepare_many(
        sessions, document_ids, home=home, owner=owner, public_url=public_url, moment=moment
    )
    finished: list[tuple[_Job, _Signed]] = []
    staged: list[tuple[_Job, bytes, Path, _Signed]] = []
    failures: list[tuple[int, KoinError | Exception, bool]] = []
    tsa_down: Exception | None = None
    for job in jobs:
        if tsa_down is not None:
            failures.append((job.row_id, tsa_down, False))
            continue
        try:
            source = _read_input(job)
            if job.output_path.exists():
                finished.append(
                    (job, _check_existing(job, source, job.output_path.read_bytes(), context))
                )
                continue
            with metrics.timed_signature(Role.POSITION):
                result = sign_pdf(source, context, job.options)
            assert result.data is not None
            temporary = stage_file(job.output_path.parent, job.output_path.name, result.data)
            signed = _Signed(result.sha256, result.level, result.signed_at)
            staged.append((job, source, temporary, signed))
        except _FINAL_ERRORS as exc:
            log.info("batch document %d failed: %s", job.row_id, exc.message_en)
            failures.append((job.row_id, exc, True))
        except TimestampError as exc:
            log.warning("batch document %d not signed, will retry: %s", job.row_id, exc)
            failures.append((job.row_id, exc, False))
            tsa_down = exc
        except Exception as exc:
            log.warning("batch document %d not signed, will retry: %s", job.row_id, exc,
                        exc_info=not isinstance(exc, KoinError))
            failures.append((job.row_id, exc, False))
    try:
        if staged:
            folders = {job.output_path.parent for job, _, _, _ in staged}
            for folder in folders:
                sync_filesystem(folder)
            for job, source, temporary, signed in staged:
                try:
                    os.link(temporary, job.output_path)
                    finished.append((job, signed))
                except FileExistsError:  # an overtaken worker was faster: take its file
                    try:
                        existing = job.output_path.read_bytes()
                        finished.append((job, _check_existing(job, source, existing, context)))
                    except _OutputUnusable as exc:
                        failures.append((job.row_id, exc, True))
            for folder in folders:
                sync_filesystem(folder)
    except Exception as exc:  # the disk: nothing is marked done, all of it is retried
        log.warning("batch documents not stored, will retry: %s", exc)
        failures.extend((job.row_id, exc, False) for job, _, _, _ in staged)
        finished = [(job, signed) for job, signed in finished
                    if all(job is not other for other, _, _, _ in staged)]
    finally:
        for _, _, temporary, _ in staged:
            temporary.unlink(missing_ok=True)
    try:
        if finished:
            _mark_done(sessions, finished, context, owner=owner, moment=aware_utc(now))
        _release(sessions, failures, owner=owner, moment=aware_utc(now))
    except Exception:
        # The files are stored; whoever holds the rows next finds and records them.
        log.exception("batch documents signed but not marked; they are taken up again later")
    states = _states(sessions, document_ids)
    done_batches = {
        job.batch_id for job in jobs
        if states.get(job.row_id) in (DocumentState.DONE, DocumentState.FAILED)
    }
    if done_batches:
        with session_scope(sessions) as session:
            _finish_where(session, Batch.id.in_(done_batches), aware_utc(now), public_url)
    return states


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
    """Sign one claimed batch document (a row id); see :func:`sign_documents`.

    :raises ValueError: there is no such row.
    """
    return sign_documents(
        sessions, [document_id], context, home=home, owner=owner, public_url=public_url,
        now=now,
    )[document_id]


# -- executor -----------------------------------------------------------------------------------


def _new_owner() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(6)}"


class BatchWorker(PeriodicWorker[int]):
    """Works off running batches in this process: each round runs :func:`reconcile`, claims up
    to ``threads × chunk`` documents and signs them on a pool of ``threads`` threads, ``chunk``
    documents at a time (:func:`sign_documents`), with one signing context (the position key)
    loaded once when the worker is made.

    :meth:`execute_many` signs rows this worker has claimed (a Celery task claims with
    :attr:`owner`, then calls it). Errors are logged; nothing escapes the thread.
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
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        """:param home: where the batches' files live (default: the installation's home).
        :param chunk: documents signed together by one thread (one transaction and one
            filesystem sync for all of them).
        :param context: a signing context to use instead of the installation's position
            context (tests).
        :raises ValueError: ``threads`` or ``interval`` is not positive.
        :raises KeyStoreError: the position key cannot be loaded.
        """
        super().__init__(interval)
        if threads < 1 or chunk < 1:
            raise ValueError(f"threads and chunk must be positive, got {threads}, {chunk}")
        self.chunk = chunk
        self.sessions = sessions
        self.home = home or installation.home
        self.threads = threads
        self.public_url = public_url
        self.lease = lease
        self.clock = clock
        self.owner = _new_owner()
        self.context = context or installation.signing_context(Role.POSITION, tsa_urls=tsa_urls)

    @property
    def claim_size(self) -> int:
        """Documents claimed per round."""
        return self.threads * self.chunk

    def execute(self, document_id: int) -> DocumentState:
        """Sign one claimed document (see :func:`sign_document`)."""
        return self.execute_many([document_id])[document_id]

    def execute_many(self, document_ids: Sequence[int]) -> dict[int, DocumentState]:
        """Sign claimed documents together (see :func:`sign_documents`)."""
        return sign_documents(
            self.sessions, document_ids, self.context, home=self.home, owner=self.owner,
            public_url=self.public_url, now=self.clock(),
        )

    def run_once(self) -> int | None:
        """One round; the number of documents claimed, or None if it failed (logged)."""
        try:
            reconcile(self.sessions, now=self.clock(), public_url=self.public_url)
            ids = claim_documents(
                self.sessions, owner=self.owner, limit=self.claim_size, lease=self.lease,
                now=self.clock(),
            )
            if ids:
                parts = [ids[i :: self.threads] for i in range(self.threads)]
                with ThreadPoolExecutor(self.threads, thread_name_prefix="koin-sign") as pool:
                    list(pool.map(self.execute_many, [part for part in parts if part]))
            return len(ids)
        except Exception:
            log.exception("batch signing round failed; trying again in %.0f s", self.interval)
            return None

    def more_due(self, result: int | None) -> bool:
        return result is not None and result == self.claim_size

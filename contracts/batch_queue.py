"""Handing batch documents to workers, sooner rather than later.

The database decides what is to be signed (:mod:`contracts.batches`); an executor only makes
it happen without waiting for the next poll:

* **In-process** (one machine, no broker; the embedded default): a :class:`BatchWorker`
  thread of the web process claims due documents itself; :meth:`InProcessExecutor.kick`
  wakes it.
* **Celery on Redis** (``KOIN_BROKER_URL``): :func:`queue_due` sends the row ids of due
  documents, in chunks, as tasks (:mod:`contracts.tasks`) and notes when
  (``batch_documents.queued_at``). The periodic reconciler (:meth:`CeleryExecutor.reconcile`)
  returns expired leases and sends again whatever still waits long after it was queued, once
  the queue has drained: a lost message or a killed worker costs time, never a document, and
  a task that arrives twice finds its documents claimed or done (claims are conditional).
"""

from __future__ import annotations

import datetime as dt
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from ._db import aware_utc, session_scope
from .batches import DEFAULT_CHUNK as DEFAULT_BATCH_CHUNK
from .batches import Batch, BatchDocument, BatchStatus, DocumentState, reconcile

if TYPE_CHECKING:
    from .batches import BatchWorker

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_REQUEUE_AFTER",
    "BatchExecutor",
    "InProcessExecutor",
    "NoExecutor",
    "queue_due",
]

log = logging.getLogger(__name__)

#: Documents per queued task: large enough to keep the broker's and the database's per-task
#: cost small, small enough that two worker processes share a batch evenly.
DEFAULT_CHUNK = DEFAULT_BATCH_CHUNK
#: A document still waiting this long after it was queued is queued again (when the queue is
#: empty): its message was lost, or the worker holding it died.
DEFAULT_REQUEUE_AFTER = dt.timedelta(minutes=2)
#: Rows looked at per round of :func:`queue_due`.
_ROUND = 5000


class BatchExecutor(ABC):
    """Something that gets due batch documents signed."""

    #: Shown on status pages: "in-process" or "celery".
    name = "executor"

    @abstractmethod
    def kick(self) -> None:
        """Documents became due (a batch started, failed ones retried): get going. Never
        raises: if the hand-over fails, the reconciler hands them over later."""


class NoExecutor(BatchExecutor):
    """Nothing runs in this process (tests, command-line tools): documents wait for a worker
    elsewhere (``koin worker``, ``koin serve``)."""

    name = "none"

    def kick(self) -> None:
        pass


class InProcessExecutor(BatchExecutor):
    """The embedded default: a :class:`BatchWorker` thread in this process."""

    name = "in-process"

    def __init__(self, worker: BatchWorker) -> None:
        self.worker = worker

    def kick(self) -> None:
        self.worker.wake()


def _chunks(ids: Sequence[int], size: int) -> list[list[int]]:
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


def queue_due(
    sessions: sessionmaker[Session],
    send: Callable[[list[int]], None],
    *,
    chunk: int = DEFAULT_CHUNK,
    requeue_after: dt.timedelta | None = DEFAULT_REQUEUE_AFTER,
    now: dt.datetime | None = None,
) -> int:
    """Send the ids of the waiting, due documents of running batches that were never queued
    (or, with ``requeue_after``, were queued longer ago than that) with ``send``, ``chunk``
    at a time, in upload order, and note when. Returns how many were sent.

    A chunk that ``send`` refuses (broker down) and everything after it stays unqueued; the
    next call tries again. Two concurrent calls may send a document twice, which is
    harmless (see the module's docstring).

    :raises ValueError: ``chunk`` below 1 or a naive ``now``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    moment = aware_utc(now)
    not_queued: Any = BatchDocument.queued_at.is_(None)
    if requeue_after is not None:
        not_queued = or_(not_queued, BatchDocument.queued_at <= moment - requeue_after)
    running = select(Batch.id).where(Batch.status == BatchStatus.RUNNING.value)
    due = and_(
        BatchDocument.batch_id.in_(running),
        BatchDocument.state == DocumentState.WAITING.value,
        or_(BatchDocument.lease_until.is_(None), BatchDocument.lease_until <= moment),
        not_queued,
    )
    total = 0
    while True:
        # Note the documents as queued and commit before sending: a worker that takes a task
        # at once must find its rows unlocked (claims skip locked rows; a task sent while this
        # transaction still held them claimed nothing, and its documents waited for the
        # reconciler's requeue, minutes later).
        with session_scope(sessions) as session:
            query = (
                select(BatchDocument.id)
                .where(due)
                .order_by(BatchDocument.batch_id, BatchDocument.position)
                .limit(_ROUND)
            )
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            ids = list(session.scalars(query))
            if ids:
                session.execute(
                    update(BatchDocument)
                    .where(BatchDocument.id.in_(ids))
                    .values(queued_at=moment),
                    execution_options={"synchronize_session": False},
                )
        sent: list[int] = []
        for part in _chunks(ids, chunk):
            try:
                send(part)
            except Exception as exc:
                log.warning(
                    "batch queue: %d document(s) not handed over (%s: %s); the "
                    "reconciler tries again", len(ids) - len(sent),
                    exc.__class__.__name__, exc,
                )
                break
            sent.extend(part)
        total += len(sent)
        unsent = ids[len(sent):]
        if unsent:
            _forget_queued(sessions, unsent, moment)
            return total
        if len(ids) < _ROUND:
            return total


def _forget_queued(
    sessions: sessionmaker[Session], ids: Sequence[int], moment: dt.datetime
) -> None:
    """Clear ``queued_at`` of documents that could not be sent, so the next call sends them
    (if this fails too, they are sent again once ``requeue_after`` has passed)."""
    try:
        with session_scope(sessions) as session:
            session.execute(
                update(BatchDocument)
                .where(BatchDocument.id.in_(list(ids)), BatchDocument.queued_at == moment)
                .values(queued_at=None),
                execution_options={"synchronize_session": False},
            )
    except Exception as exc:
        log.warning("batch queue: could not note %d unsent document(s) (%s: %s)",
                    len(ids), exc.__class__.__name__, exc)


def reconcile_and_queue(
    sessions: sessionmaker[Session],
    send: Callable[[list[int]], None],
    *,
    backlog: int | None,
    chunk: int = DEFAULT_CHUNK,
    requeue_after: dt.timedelta = DEFAULT_REQUEUE_AFTER,
    now: dt.datetime | None = None,
    public_url: str | None = None,
) -> int:
    """One round of the reconciler: put documents with expired leases back to waiting, finish
    batches with nothing left, and queue what is due; documents queued long ago are queued
    again only when the broker's queue is known to be empty (``backlog == 0``), so that a
    long queue is not flooded with copies. Returns how many documents were sent."""
    reconcile(sessions, now=now, public_url=public_url)
    return queue_due(
        sessions, send, chunk=chunk, requeue_after=requeue_after if backlog == 0 else None,
        now=now,
    )

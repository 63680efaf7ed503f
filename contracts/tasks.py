"""Celery on Redis (``KOIN_BROKER_URL``): batch signing spread over worker processes.

Tasks:

* ``koin.batches.sign(ids)`` claims those batch documents that are still due (a copy of a
  task that arrives twice, or late, finds them claimed or done and does nothing) and signs
  them with the position key, which each worker process loads once, on its first task.
* ``koin.batches.reconcile()``, sent by the scheduler (``koin worker`` embeds it; ``koin
  scheduler`` runs it alone) every ``reconcile_interval`` seconds: expired leases back to
  waiting, finished batches marked, due documents queued (see :mod:`contracts.batch_queue`).
* the other periodic work, also sent by the scheduler, so that the web tier (gunicorn) runs
  no background threads in the many-machine layout: ``koin.mail.deliver`` (the outbox, to
  ``KOIN_SMTP_URL``), ``koin.contracts.run_due`` (reminders, expiry, unfinished
  completions), ``koin.webhooks.deliver`` and ``koin.lta.renew``. Each claims its work in the
  database, so running them beside ``koin serve``'s threads, or twice, is safe.

Messages are acknowledged when a task starts (``acks_late`` off): a worker that dies while
signing loses the message, not the document; its lease expires and the reconciler queues the
document again. Only the row ids travel through the broker; the database stays the truth.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from celery import Celery
from kombu.exceptions import ChannelError
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from signer import Installation

from ._db import make_engine, make_session_factory
from .batch_queue import (
    DEFAULT_CHUNK,
    DEFAULT_REQUEUE_AFTER,
    BatchExecutor,
    queue_due,
    reconcile_and_queue,
)
from .batches import LEASE, BatchWorker, claim_documents

__all__ = [
    "BATCH_QUEUE",
    "CeleryExecutor",
    "WorkerConfig",
    "celery_app",
    "configure",
    "reconcile_task",
    "sign_task",
]

log = logging.getLogger(__name__)

#: The broker queue of batch signing tasks.
BATCH_QUEUE = "koin.batches"

celery_app = Celery("koin", set_as_current=False)
celery_app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_ignore_result=True,
    task_acks_late=False,
    task_default_queue=BATCH_QUEUE,
    # One message reserved per process beyond the one it runs: a dying worker strands few.
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    timezone="UTC",
)


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker process needs to know about the installation."""

    home: str
    database_url: str
    public_url: str
    tsa_urls: tuple[str, ...] = ()
    lease_seconds: float = LEASE.total_seconds()
    requeue_seconds: float = DEFAULT_REQUEUE_AFTER.total_seconds()
    reconcile_interval: float = 15.0
    chunk: int = DEFAULT_CHUNK
    #: Broker queue of this installation's tasks (several installations may share a Redis).
    queue: str = BATCH_QUEUE
    #: Outgoing mail server and sender; None: no mail task (mail stays queued).
    smtp_url: str | None = None
    mail_from: str | None = None
    #: Seconds between runs of the periodic tasks; 0 leaves one out of the schedule.
    mail_interval: float = 10.0
    jobs_interval: float = 60.0
    webhooks_interval: float = 10.0
    lta_interval: float = 3600.0
    lta_margin_days: float = 365.0
    lta_weak_algorithms: str = ""


def configure(broker_url: str, config: WorkerConfig) -> Celery:
    """Point :data:`celery_app` at ``broker_url`` and this installation (before a worker or
    the scheduler starts, or before the web process sends tasks)."""
    periodic = {
        "koin.batches.reconcile": config.reconcile_interval,
        "koin.mail.deliver": config.mail_interval if config.smtp_url else 0,
        "koin.contracts.run_due": config.jobs_interval,
        "koin.webhooks.deliver": config.webhooks_interval,
        "koin.lta.renew": config.lta_interval,
    }
    celery_app.conf.update(
        broker_url=broker_url,
        task_default_queue=config.queue,
        koin=asdict(config),
        beat_schedule={
            name: {
                "task": name,
                "schedule": interval,
                # a round that could not run in time is dropped; the next one does its work
                "options": {"expires": interval, "queue": config.queue},
            }
            for name, interval in periodic.items()
            if interval > 0
        },
    )
    return celery_app


def _config() -> WorkerConfig:
    values = dict(celery_app.conf.get("koin") or {})
    if not values:
        raise RuntimeError("contracts.tasks.configure() was not called in this process")
    values["tsa_urls"] = tuple(values.get("tsa_urls") or ())
    return WorkerConfig(**values)


class _Process:
    """What one worker process keeps between tasks: its database engine and its batch
    worker (whose signing context, with the position key, is built on first use)."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.engine: Engine = make_engine(config.database_url)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)
        self.installation = Installation(Path(config.home), public_url=config.public_url)
        self._worker: BatchWorker | None = None
        self._lock = threading.Lock()

    @property
    def lease(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.config.lease_seconds)

    def worker(self) -> BatchWorker:
        """:raises KeyStoreError: the position key cannot be loaded."""
        with self._lock:
            if self._worker is None:
                self._worker = BatchWorker(
                    self.sessions, self.installation, threads=1,
                    public_url=self.config.public_url, tsa_urls=self.config.tsa_urls,
                    lease=self.lease,
                )
            return self._worker


_process: tuple[int, _Process] | None = None
_process_lock = threading.Lock()


def _this_process() -> _Process:
    """This process's state, made after fork (a forked child never shares its parent's
    database connections)."""
    global _process
    with _process_lock:
        if _process is None or _process[0] != os.getpid():
            _process = (os.getpid(), _Process(_config()))
        return _process[1]


@celery_app.task(name="koin.batches.sign")
def sign_task(ids: list[int]) -> int:
    """Claim and sign those of the batch documents ``ids`` that are still due; the number
    signed or failed by this task."""
    process = _this_process()
    worker = process.worker()
    claimed = claim_documents(
        process.sessions, owner=worker.owner, limit=max(1, len(ids)), lease=process.lease,
        ids=[int(i) for i in ids],
    )
    if claimed:
        worker.execute_many(claimed)
    return len(claimed)


@celery_app.task(name="koin.batches.reconcile")
def reconcile_task() -> int:
    """One round of the reconciler (see :func:`contracts.batch_queue.reconcile_and_queue`)."""
    process = _this_process()
    return CeleryExecutor(process.sessions, process.config).reconcile()


@celery_app.task(name="koin.mail.deliver")
def deliver_mail_task() -> int:
    """Send the queued mail that is due; how many were sent."""
    from .mail import SmtpTransport, deliver_due

    process = _this_process()
    if not process.config.smtp_url:
        log.warning("mail task without KOIN_SMTP_URL: mail stays queued")
        return 0
    report = deliver_due(
        process.sessions, SmtpTransport.from_url(process.config.smtp_url),
        sender=process.config.mail_from,
    )
    return len(report.sent)


@celery_app.task(name="koin.contracts.run_due")
def run_due_task() -> int:
    """Reminders, expiry and unfinished completions of contracts; how many contracts failed."""
    from .workflow import run_due

    process = _this_process()
    report = run_due(
        process.sessions, process.installation, public_url=process.config.public_url,
        tsa_urls=process.config.tsa_urls,
    )
    for public_id, _, message_en in report.failed:
        log.warning("contract %s: %s", public_id, " ".join(message_en.split()))
    return len(report.failed)


@celery_app.task(name="koin.webhooks.deliver")
def deliver_webhooks_task() -> int:
    """POST the webhook deliveries that are due; how many were delivered."""
    from .webhooks import deliver_webhooks

    return len(deliver_webhooks(_this_process().sessions).delivered)


@celery_app.task(name="koin.lta.renew")
def renew_lta_task() -> int:
    """Keep stored signed files at B-LTA (a new document timestamp where due); how many
    were renewed."""
    from .lta import LtaPolicy, renew_due

    process = _this_process()
    report = renew_due(
        process.sessions, process.installation,
        policy=LtaPolicy.from_settings(
            process.config.lta_margin_days, process.config.lta_weak_algorithms
        ),
        tsa_urls=process.config.tsa_urls,
    )
    return len(report.renewed)


class CeleryExecutor(BatchExecutor):
    """Hands due documents to Celery workers through the broker."""

    name = "celery"

    def __init__(self, sessions: sessionmaker[Session], config: WorkerConfig) -> None:
        self.sessions = sessions
        self.config = config

    def _send(self, ids: list[int]) -> None:
        sign_task.apply_async(args=[ids], queue=self.config.queue, retry=False)

    def backlog(self) -> int | None:
        """Messages waiting in the batch queue (0 when the broker has no such queue: Redis
        drops empty lists), or None if the broker cannot be asked."""
        try:
            with celery_app.connection_for_write() as connection:
                declared = connection.default_channel.queue_declare(
                    queue=self.config.queue, passive=True
                )
                return int(declared.message_count)
        except ChannelError:
            return 0
        except Exception as exc:  # the broker is down
            log.warning("batch queue: backlog unknown (%s)", exc.__class__.__name__)
            return None

    def kick(self) -> None:
        try:
            queue_due(self.sessions, self._send, chunk=self.config.chunk, requeue_after=None)
        except Exception:
            log.exception("batch queue: handing over failed; the reconciler tries again")

    def reconcile(self) -> int:
        return reconcile_and_queue(
            self.sessions, self._send, backlog=self.backlog(), chunk=self.config.chunk,
            requeue_after=dt.timedelta(seconds=self.config.requeue_seconds),
            public_url=self.config.public_url,
        )

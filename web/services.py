"""Long-lived objects of the web process: the installation, the verify policy, the database."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from flask import Flask, current_app
from sqlalchemy.orm import Session, sessionmaker

import contracts
from keys import Role
from signer import Installation, SigningContext, VerifyPolicy

__all__ = [
    "attach_batch_worker",
    "close",
    "batch_executor",
    "find_document",
    "init_app",
    "installation",
    "session_factory",
    "signing_context",
    "verify_policy",
]

#: Rebuild the verify policy this often, so re-issued CRLs are picked up.
POLICY_TTL = 3600.0


class _Services:
    def __init__(self, app: Flask) -> None:
        self.installation = Installation(
            Path(app.config["KOIN_HOME"]), public_url=app.config["KOIN_PUBLIC_URL"]
        )
        self._policy: tuple[float, VerifyPolicy] | None = None
        self._lock = threading.Lock()
        self.max_bytes = int(app.config["KOIN_MAX_UPLOAD_BYTES"])
        self._database_url: str = app.config["KOIN_DATABASE_URL"] or contracts.database_url(
            Path(app.config["KOIN_HOME"])
        )
        self._session_factory: sessionmaker[Session] | None = None
        self.tsa_urls: tuple[str, ...] = tuple(app.config.get("KOIN_TSA_URLS") or ())
        self.config = app.config
        self._executor: contracts.BatchExecutor | None = None

    def batch_executor(self) -> contracts.BatchExecutor:
        with self._lock:
            if self._executor is None:
                broker_url = self.config.get("KOIN_BROKER_URL")
                if broker_url:
                    from contracts import tasks

                    config = tasks.WorkerConfig(
                        home=str(self.installation.home.resolve()),
                        database_url=self._database_url,
                        public_url=self.installation.public_url,
                        tsa_urls=self.tsa_urls,
                        lease_seconds=float(self.config["KOIN_BATCH_LEASE"]),
                        requeue_seconds=float(self.config["KOIN_BATCH_REQUEUE"]),
                        reconcile_interval=float(self.config["KOIN_RECONCILE_INTERVAL"]),
                        queue=str(self.config["KOIN_BATCH_QUEUE"]),
                    )
                    tasks.configure(broker_url, config)
                    self._executor = tasks.CeleryExecutor(self._session_factory_unlocked(), config)
                else:
                    self._executor = contracts.NoExecutor()
            return self._executor

    def close(self) -> None:
        with self._lock:
            if self._session_factory is not None:
                bind = self._session_factory.kw.get("bind")
                if bind is not None:
                    bind.dispose()
                self._session_factory = None

    def attach_batch_worker(self, worker: contracts.BatchWorker) -> None:
        with self._lock:
            self._executor = contracts.InProcessExecutor(worker)

    def session_factory(self) -> sessionmaker[Session]:
        with self._lock:
            return self._session_factory_unlocked()

    def _session_factory_unlocked(self) -> sessionmaker[Session]:
        if self._session_factory is None:
            engine = contracts.make_engine(self._database_url)
            self._session_factory = contracts.make_session_factory(engine)
        return self._session_factory

    def signing_context(self, *, stamp: bool) -> SigningContext:
        # Installation caches the context (key loaded once per process); the lock keeps two
        # first requests from loading the key twice.
        with self._lock:
            return self.installation.signing_context(
                Role.POSITION, tsa_urls=self.tsa_urls, stamp=stamp
            )

    def verify_policy(self) -> VerifyPolicy:
        with self._lock:
            now = time.monotonic()
            if self._policy is None or now - self._policy[0] > POLICY_TTL:
                policy = self.installation.verify_policy(max_bytes=self.max_bytes)
                self._policy = (now, policy)
            return self._policy[1]


def init_app(app: Flask) -> None:
    app.extensions["koin"] = _Services(app)


def _services() -> _Services:
    services: _Services = current_app.extensions["koin"]
    return services


def installation() -> Installation:
    return _services().installation


def verify_policy() -> VerifyPolicy:
    return _services().verify_policy()


def signing_context(*, stamp: bool = True) -> SigningContext:
    """The position key's signing context with this installation's TSAs, built once per process.

    :raises KeyStoreError: the position key cannot be loaded.
    """
    return _services().signing_context(stamp=stamp)


def session_factory() -> sessionmaker[Session]:
    return _services().session_factory()


def find_document(doc_id: str) -> contracts.SignedDocument | None:
    """The record of a document signed by this installation, or None."""
    with contracts.session_scope(session_factory()) as session:
        record = contracts.get_document(session, doc_id)
        if record is not None:
            session.expunge(record)
        return record


def batch_executor() -> contracts.BatchExecutor:
    """What gets started batches signed from this process: Celery workers (``KOIN_BROKER_URL``),
    the in-process worker of ``koin serve``, or nothing (documents wait for a worker)."""
    return _services().batch_executor()


def attach_batch_worker(worker: contracts.BatchWorker) -> None:
    """Use ``worker`` (a thread of this process, started by ``koin serve``) for batches."""
    _services().attach_batch_worker(worker)


def close(app: Flask) -> None:
    """Close the database connections of ``app`` (tests, and servers that stop)."""
    services: _Services = app.extensions["koin"]
    services.close()

"""Health of the service: ``GET /healthz`` (the process is up) and ``GET /readyz`` (it can do
its work now), for load balancers, orchestrators and the admin status page.

``/readyz`` checks four parts, at the same time, each with a short time limit:

* ``database``: ``SELECT 1`` through the app's own connection pool (2 s statement limit on
  PostgreSQL);
* ``broker``: with ``KOIN_BROKER_URL``, a Redis ``PING`` (1 s); without one, batches run in
  this process and there is nothing to check;
* ``keystore``: the position and witness keys load from the key store (opened afresh, as a new
  process would) and their certificates are valid now; a success is kept for
  :data:`KEYSTORE_CACHE` seconds;
* ``tsa``: a real RFC 3161 request with a nonce to the configured TSAs (``KOIN_TSA_URLS``, in
  order, until one answers; 2 s each) or to the embedded TSA, and the reply checked like a
  signing's (granted, our nonce and digest, signature, chain to our trust anchors); a success
  is kept for :data:`TSA_CACHE` seconds.

(The app setting ``KOIN_READYZ_CACHE``, a mapping of check name to seconds, overrides these
cache times; tests set them to 0.)

The answer is ``{"status": "ok"|"fail", "checks": {name: {"ok": bool, "detail": str}},
"failing": [names]}`` with HTTP 200 when every check passed, else 503. Details are English,
for operators; they name hosts and ports but never passwords or query strings.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, current_app, jsonify
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

import contracts
from keys import KeyStore, KoinError, Role

__all__ = [
    "CHECKS",
    "KEYSTORE_CACHE",
    "TSA_CACHE",
    "Check",
    "bp",
    "readiness",
    "redact_url",
]

bp = Blueprint("health", __name__)

#: The checks of ``/readyz``, in this order.
CHECKS = ("database", "broker", "keystore", "tsa")
#: Seconds a passed key store or TSA check is reused.
KEYSTORE_CACHE = 30.0
TSA_CACHE = 10.0
DATABASE_TIMEOUT = 2.0
BROKER_TIMEOUT = 1.0
TSA_TIMEOUT = 2.0
#: Longest the whole ``/readyz`` waits for its checks.
DEADLINE = 6.0
#: The keys a signature of this service needs.
SIGNING_ROLES = (Role.POSITION, Role.WITNESS)


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


def redact_url(url: str) -> str:
    """``url`` as shown in details: scheme, host, port and path; never user, password or
    query."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def _reason(exc: BaseException, *secrets: str) -> str:
    """A one-line reason for ``exc`` without any of ``secrets``."""
    if isinstance(exc, KoinError):
        text_ = exc.message_en
    else:
        inner = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
        first = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
        text_ = f"{type(inner).__name__}: {first}" if first else type(inner).__name__
    for secret in secrets:
        if secret:
            text_ = text_.replace(secret, "***")
    return " ".join(text_.split())[:300]


def _ms(started: float) -> str:
    return f"{(time.perf_counter() - started) * 1000:.0f} ms"


# -- the checks ---------------------------------------------------------------------------------


def _check_database(app: Flask) -> Check:
    services = app.extensions["koin"]
    url = app.config["KOIN_DATABASE_URL"] or contracts.database_url(Path(app.config["KOIN_HOME"]))
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    shown = backend if backend == "sqlite" else (
        f"{backend} {parsed.host or 'localhost'}:{parsed.port or 5432}/{parsed.database or ''}"
    )
    started = time.perf_counter()
    try:
        with services.session_factory()() as session:
            if backend == "postgresql":
                session.execute(
                    text(f"SET LOCAL statement_timeout = {int(DATABASE_TIMEOUT * 1000)}")
                )
            session.execute(text("SELECT 1")).scalar_one()
    except SQLAlchemyError as exc:
        return Check(False, f"{shown}: {_reason(exc, parsed.password or '')}")
    return Check(True, f"{shown}: SELECT 1 in {_ms(started)}")


def _check_broker(app: Flask) -> Check:
    url = str(app.config.get("KOIN_BROKER_URL") or "")
    if not url:
        return Check(True, "in-process executor (no KOIN_BROKER_URL)")
    shown = redact_url(url)
    password = urlsplit(url).password or ""
    started = time.perf_counter()
    try:
        if urlsplit(url).scheme in ("redis", "rediss", "unix"):
            import redis

            client = redis.Redis.from_url(
                url, socket_connect_timeout=BROKER_TIMEOUT, socket_timeout=BROKER_TIMEOUT
            )
            try:
                client.ping()
            finally:
                client.close()
        else:
            from kombu import Connection  # type: ignore[attr-defined]

            with Connection(  # type: ignore[no-untyped-call]
                url, connect_timeout=BROKER_TIMEOUT
            ) as connection:
                connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT)
    except Exception as exc:  # any failure of the broker's client means: not ready
        return Check(False, f"{shown}: {_reason(exc, password)}")
    return Check(True, f"{shown}: PING in {_ms(started)}")


def _check_keystore(app: Flask) -> Check:
    home = Path(app.config["KOIN_HOME"])
    now = dt.datetime.now(dt.UTC)
    try:
        store = KeyStore.open(home)  # afresh: files, passphrase, token as a new process sees
        problems = []
        for role in SIGNING_ROLES:
            certificate = store.certificate_for(role)
            not_after = certificate["tbs_certificate"]["validity"]["not_after"].native
            if not_after <= now:
                problems.append(f"the {role.value} certificate expired on {not_after:%Y-%m-%d}")
    except KoinError as exc:
        return Check(False, _reason(exc))
    except (OSError, ValueError) as exc:
        return Check(False, f"cannot read the key store ({type(exc).__name__})")
    if problems:
        return Check(False, "; ".join(problems))
    return Check(True, ", ".join(role.value for role in SIGNING_ROLES) + " keys load")


def _check_tsa(app: Flask) -> Check:
    from timestamp import TimestampError, TsaClient

    services = app.extensions["koin"]
    installation = services.installation
    urls: tuple[str, ...] = tuple(app.config.get("KOIN_TSA_URLS") or ())
    digest = hashlib.sha256(f"koin readiness {time.time_ns()}".encode()).digest()
    if not urls:
        started = time.perf_counter()
        try:
            stamper = installation.timestamper(())
            asyncio.run(stamper.async_timestamp(digest, "sha256"))
        except KoinError as exc:
            return Check(False, f"embedded TSA: {_reason(exc)}")
        return Check(True, f"embedded TSA: valid token in {_ms(started)}")
    failures = []
    try:
        roots = installation.key_store.trust_roots()
    except (KoinError, OSError, ValueError) as exc:
        return Check(False, f"no trust anchors for the TSA ({type(exc).__name__})")
    for url in urls:
        shown = redact_url(url)
        started = time.perf_counter()
        try:
            client = TsaClient([url], trust_roots=roots, timeout=TSA_TIMEOUT)
            asyncio.run(client.async_timestamp(digest, "sha256"))
        except TimestampError as exc:
            reasons = exc.fields.get("attempts") or {}
            reason = "; ".join(str(r) for r in reasons.values()) or exc.message_en
            failures.append(f"{shown}: {reason}")
            continue
        answered = f"{shown}: valid token in {_ms(started)}"
        return Check(True, "; ".join([*failures, answered]))
    return Check(False, "; ".join(failures))


_CHECKERS: dict[str, tuple[Callable[[Flask], Check], float]] = {
    "database": (_check_database, 0.0),
    "broker": (_check_broker, 0.0),
    "keystore": (_check_keystore, KEYSTORE_CACHE),
    "tsa": (_check_tsa, TSA_CACHE),
}


class _Cache:
    """Passed checks of one app, reused for their cache time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.passed: dict[str, tuple[float, Check]] = {}

    def get(self, name: str, ttl: float) -> Check | None:
        with self.lock:
            kept = self.passed.get(name)
        if kept is None or time.monotonic() - kept[0] > ttl:
            return None
        return kept[1]

    def put(self, name: str, check: Check) -> None:
        with self.lock:
            if check.ok:
                self.passed[name] = (time.monotonic(), check)
            else:
                self.passed.pop(name, None)


def _run(app: Flask, name: str) -> Check:
    checker, _ = _CHECKERS[name]
    try:
        return checker(app)
    except Exception as exc:  # a check that breaks reports its part as failing
        return Check(False, f"check failed ({type(exc).__name__})")


def readiness(app: Flask) -> dict[str, Any]:
    """Run the checks of ``/readyz`` for ``app`` (concurrently, :data:`DEADLINE` s at most).

    :returns: ``{"status": "ok"|"fail", "checks": {name: {"ok", "detail"}}, "failing":
        [names]}``.
    """
    cache: _Cache = app.extensions.setdefault("koin_health", _Cache())
    results: dict[str, Check] = {}
    pending = {}
    pool = ThreadPoolExecutor(max_workers=len(CHECKS), thread_name_prefix="koin-readyz")
    try:
        overrides = app.config.get("KOIN_READYZ_CACHE") or {}
        for name in CHECKS:
            ttl = float(overrides.get(name, _CHECKERS[name][1]))
            kept = cache.get(name, ttl) if ttl else None
            if kept is not None:
                results[name] = kept
            else:
                pending[name] = pool.submit(_run, app, name)
        deadline = time.monotonic() + DEADLINE
        for name, future in pending.items():
            try:
                results[name] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                results[name] = Check(False, f"no answer within {DEADLINE:g} s")
            cache.put(name, results[name])
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    failing = [name for name in CHECKS if not results[name].ok]
    return {
        "status": "fail" if failing else "ok",
        "checks": {name: results[name].as_dict() for name in CHECKS},
        "failing": failing,
    }


# -- views --------------------------------------------------------------------------------------


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    """:raise: never; the process is up."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """The readiness checks as JSON.

    :raise 503: a check failed (``failing`` names it).
    """
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    result = readiness(app)
    return jsonify(result), 200 if result["status"] == "ok" else 503

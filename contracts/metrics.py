"""Prometheus metrics of the services (no Flask, no HTTP): counters and a histogram that the
signing services update where a document is signed, and the verification counter.

The web tier exposes them at ``/metrics`` (:mod:`web.metrics`), together with gauges computed
from the database when it is scraped (:mod:`contracts.operations`). Under gunicorn with several
worker processes, set ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder (prometheus_client's
multiprocess mode): each process then writes its values there and ``/metrics`` adds them up.
Batches signed by Celery workers count in the worker processes, whose sum ``koin worker
--metrics-port`` serves (:mod:`web._worker_metrics`).

Metric names (``koin_`` prefix):

* ``koin_documents_signed_total{role,level}``: documents signed and recorded (position:
  signing page, API, CLI, batches; witness: completed contracts), once each;
* ``koin_signing_seconds{role}``: how long one signature took, timestamp included;
* ``koin_tsa_errors_total``: signatures and timestamps not made because no TSA gave a valid
  token;
* ``koin_verify_requests_total{verdict}``: verifications on the verify page and the API, by
  verdict (``passed``, ``failed``, ``indeterminate``; ``rejected``: the file could not be
  verified at all).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Histogram

from timestamp import TimestampError

__all__ = [
    "DOCUMENTS_SIGNED",
    "MULTIPROC_ENV",
    "SIGNING_SECONDS",
    "TSA_ERRORS",
    "VERIFY_REQUESTS",
    "count_signed",
    "count_tsa_error",
    "count_verification",
    "timed_signature",
]

#: prometheus_client's multiprocess mode opens a file there as soon as a metric is made (at
#: import): a missing folder must not stop every koin command.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
if os.environ.get(MULTIPROC_ENV):
    os.makedirs(os.environ[MULTIPROC_ENV], mode=0o700, exist_ok=True)

DOCUMENTS_SIGNED = Counter(
    "koin_documents_signed",
    "Documents signed and recorded by the service, by key role and PAdES level.",
    ["role", "level"],
)
SIGNING_SECONDS = Histogram(
    "koin_signing_seconds",
    "Seconds one PDF signature took (timestamp included), by key role.",
    ["role"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
)
TSA_ERRORS = Counter(
    "koin_tsa_errors",
    "Signatures or timestamps not made because no TSA returned a valid token.",
)
VERIFY_REQUESTS = Counter(
    "koin_verify_requests",
    "Verifications on the verify page and the API, by verdict.",
    ["verdict"],
)


def _label(value: object) -> str:
    return str(getattr(value, "value", value))


@contextmanager
def timed_signature(role: object) -> Iterator[None]:
    """Time the signature made in the block (``koin_signing_seconds``); a
    :class:`~timestamp.TimestampError` out of it counts in ``koin_tsa_errors_total``.

    :raises Exception: whatever the block raised, unchanged.
    """
    started = time.perf_counter()
    try:
        yield
    except TimestampError:
        TSA_ERRORS.inc()
        raise
    SIGNING_SECONDS.labels(role=_label(role)).observe(time.perf_counter() - started)


def count_tsa_error() -> None:
    """One timestamp that no TSA gave (outside a signature, e.g. an audit chain head)."""
    TSA_ERRORS.inc()


def count_signed(role: object, level: object, count: int = 1) -> None:
    """``count`` documents of ``role`` at ``level`` were signed and their records committed."""
    if count > 0:
        DOCUMENTS_SIGNED.labels(role=_label(role), level=_label(level)).inc(count)


def count_verification(verdict: str) -> None:
    """One verification ended with ``verdict`` (lower case)."""
    VERIFY_REQUESTS.labels(verdict=verdict.lower()).inc()

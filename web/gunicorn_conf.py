"""gunicorn settings for koin's metrics in multiprocess mode: ``gunicorn -c
python:web.gunicorn_conf …`` (other settings can still be given on the command line).

With ``PROMETHEUS_MULTIPROC_DIR`` set (an empty folder of its own, e.g. ``/run/koin-metrics``),
every worker writes its counters there and ``/metrics`` answers with their sum
(:mod:`web.metrics`). The master empties the folder when it starts (values of an earlier run
would be added otherwise) and tells prometheus_client when a worker has died (its gauges
of live processes are dropped; its counters stay counted). Logging follows ``KOIN_LOG_FORMAT``
and ``KOIN_LOG_LEVEL`` (:func:`web.logs.configure_logging`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from web.logs import configure_logging

configure_logging()

#: As in contracts.metrics (not imported here: the master need not load koin).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def on_starting(server: Any) -> None:
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.glob("*.db"):  # only the files prometheus_client writes
        entry.unlink(missing_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]

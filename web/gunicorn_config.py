"""gunicorn settings of the web tier: ``gunicorn -c python:web.gunicorn_config``.

Read from the environment, so that a container, a systemd unit and ``deploy/run-local.sh``
start it alike (command-line options still override them):

* ``KOIN_BIND_HOST`` / ``KOIN_WEB_PORT``: where to listen (default ``127.0.0.1:8000``);
* ``KOIN_WEB_WORKERS``: worker processes (default: one per CPU);
* ``KOIN_ACCESS_LOG``: the access log, a file or ``-`` for stdout (default; none with
  ``KOIN_LOG_FORMAT=json``, whose ``koin.access`` lines carry the request ID), ``off`` for none;
* ``KOIN_LOG_FORMAT`` / ``KOIN_LOG_LEVEL``: koin's own log lines (:mod:`web.logs`);
* ``PROMETHEUS_MULTIPROC_DIR``: a folder of its own for the metrics of all workers
  (:mod:`web.metrics`); emptied when gunicorn starts, dead workers are marked.

Link tokens in ``/c/…`` and ``/d/…`` paths are replaced in the access and error logs by a
prefix of their SHA-256 (:class:`web.party_views.TokenRedactor`): a log never holds a link.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .logs import configure_logging
from .party_views import TokenRedactor

#: As in contracts.metrics (not imported here: the master need not load prometheus_client).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

wsgi_app = "web.wsgi:app"
bind = [f"{os.environ.get('KOIN_BIND_HOST') or '127.0.0.1'}:"
        f"{os.environ.get('KOIN_WEB_PORT') or '8000'}"]
workers = int(os.environ.get("KOIN_WEB_WORKERS") or os.cpu_count() or 1)
# A party's last consent makes the witness signature (with its timestamp) in the request, and
# a verification may take KOIN_VERIFY_TIME_LIMIT (30 s): give a request more than that.
timeout = 120
graceful_timeout = 30
_json = os.environ.get("KOIN_LOG_FORMAT", "").strip().lower() == "json"
_access = os.environ.get("KOIN_ACCESS_LOG") or ("off" if _json else "-")
accesslog = None if _access == "off" else _access
errorlog = "-"
# gunicorn ≥ 25.1 opens a control socket under $HOME by default; a service needs none (and
# its user may have no writable home).
control_socket_disable = True

for _name in ("gunicorn.access", "gunicorn.error"):
    _logger = logging.getLogger(_name)
    if not any(isinstance(existing, TokenRedactor) for existing in _logger.filters):
        _logger.addFilter(TokenRedactor())

configure_logging()


def on_starting(server: Any) -> None:
    """Empty the metrics folder: values of an earlier run would be added otherwise."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return
    path = Path(folder)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in path.glob("*.db"):  # only the files prometheus_client writes
        entry.unlink(missing_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    """A worker ended: prometheus_client drops its live gauges (its counters stay)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]

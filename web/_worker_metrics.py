"""``koin worker --metrics-port``: the Prometheus metrics of a Celery worker's processes.

Batch documents are signed in the worker's prefork processes, which serve no ``/metrics`` of
their own; without this, ``koin_documents_signed_total`` and ``koin_signing_seconds`` at the
web tier would leave out the bulk of the signatures, and ``koin_tsa_errors_total`` the TSA
failures of batches. Each signing process writes its values to ``PROMETHEUS_MULTIPROC_DIR``
(prometheus_client's multiprocess mode, as under gunicorn); the worker's main process serves
their sum over HTTP from a thread. The database gauges (queue depth, outbox, contracts) stay
with the web tier's ``/metrics``: scraping both would count them twice.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess

from contracts.metrics import MULTIPROC_ENV
from keys import KoinError

from .metrics import scraper_allowed

__all__ = ["serve_worker_metrics"]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (wsgiref's name)
        """Scrapes every few seconds are not worth a log line each."""


def _with_token(app: Callable[..., Iterable[bytes]], token: str | None) -> Callable[..., Any]:
    """The web tier's rule for scrapers (:func:`web.metrics.scraper_allowed`) around ``app``."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not scraper_allowed(environ.get("HTTP_AUTHORIZATION", ""), token):
            start_response("401 Unauthorized", [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("WWW-Authenticate", 'Bearer realm="koin metrics"'),
            ])
            return [b"401 Unauthorized\n"]
        return app(environ, start_response)

    return guarded


def serve_worker_metrics(host: str, port: int, token: str | None) -> WSGIServer:
    """Empty ``PROMETHEUS_MULTIPROC_DIR`` (values of an earlier run) and serve the sum of the
    values its processes write there at ``http://host:port/metrics``, from a daemon thread;
    with ``token``, only to ``Authorization: Bearer <token>``.

    Call before the signing processes start (they write their values from their first
    signature on).

    :raises KoinError: ``PROMETHEUS_MULTIPROC_DIR`` is not set (it must be set before koin
        starts: prometheus_client reads it at import), or the address cannot be bound.
    """
    directory = os.environ.get(MULTIPROC_ENV, "").strip()
    if not directory:
        raise KoinError(
            f"--metrics-port には環境変数 {MULTIPROC_ENV} が必要です(この worker だけが使う空の"
            "フォルダー。web の /metrics とは別のもの)。",
            f"--metrics-port needs {MULTIPROC_ENV} set to an empty folder that only this "
            "worker uses (not the one of the web tier's /metrics).",
        )
    folder = Path(directory)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))  # type: ignore[no-untyped-call]
    try:
        server = make_server(
            host, port, _with_token(make_wsgi_app(registry), token),
            server_class=_ThreadingServer, handler_class=_QuietHandler,
        )
    except OSError as exc:
        raise KoinError(
            f"メトリクスの待ち受け {host}:{port} を開けません({exc.strerror})。",
            f"Cannot listen for metrics on {host}:{port} ({exc.strerror}).",
        ) from exc
    threading.Thread(
        target=server.serve_forever, name="koin-worker-metrics", daemon=True
    ).start()
    return server

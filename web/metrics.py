"""``GET /metrics``: Prometheus metrics of this installation.

The counters and the signing histogram live in :mod:`contracts.metrics`; the gauges are read
from the database when the page is scraped (:mod:`contracts.operations`):
``koin_queue_depth{state}`` (documents of started batches, waiting or running),
``koin_mail_outbox_backlog`` (messages due and not yet sent), ``koin_contracts{state}`` and
``koin_database_up`` (0 when the database could not be read for the gauges).

One process (``koin serve``): the process's own values. Several processes (gunicorn
``--workers N``): start them with ``PROMETHEUS_MULTIPROC_DIR`` set to an empty folder that only
koin writes to, and ``--config python:web.gunicorn_config`` (it empties the folder at start
and marks dead workers); every worker then answers with the sum over all workers.

With ``KOIN_METRICS_TOKEN`` set, scrapers must send ``Authorization: Bearer <token>``;
otherwise the page is open to whoever reaches the service (keep it behind the reverse proxy).
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Iterator

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from sqlalchemy.exc import SQLAlchemyError

import contracts
from contracts.metrics import MULTIPROC_ENV
from contracts.operations import operation_figures

__all__ = ["bp", "metrics_text", "scraper_allowed"]

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)



class _DatabaseGauges:
    """The gauges read from the database at scrape time."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "koin_database_up", "1 if the database could be read for these gauges, else 0."
        )
        try:
            sessions = self.app.extensions["koin"].session_factory()
            with contracts.session_scope(sessions) as session:
                figures = operation_figures(session)
        except SQLAlchemyError as exc:
            log.warning("metrics: cannot read the database (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        queue = GaugeMetricFamily(
            "koin_queue_depth", "Documents of started batches waiting or being signed.",
            labels=["state"],
        )
        for state, count in sorted(figures.queue_depth.items()):
            queue.add_metric([state], count)
        yield queue
        yield GaugeMetricFamily(
            "koin_mail_outbox_backlog", "Mail messages due and not yet sent.",
            value=figures.mail_backlog,
        )
        by_state = GaugeMetricFamily("koin_contracts", "Contracts by state.", labels=["state"])
        for state, count in sorted(figures.contracts.items()):
            by_state.add_metric([state], count)
        yield by_state


class _Together:
    """Several collectors as one (``generate_latest`` takes anything with ``collect``)."""

    def __init__(self, *parts: object) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        for part in self.parts:
            yield from part.collect()  # type: ignore[attr-defined]


def metrics_text(app: Flask) -> bytes:
    """The exposition text of ``app``'s installation: this process's counters (or every
    process's, in multiprocess mode) and the database gauges."""
    gauges = _DatabaseGauges(app)
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(_Together(registry, gauges))
    return generate_latest(_Together(REGISTRY, gauges))


def scraper_allowed(authorization: str, token: str | None) -> bool:
    """Whether a scrape with this ``Authorization`` header may read the metrics: any, without
    a ``token``; else only ``Bearer <token>`` (compared in constant time)."""
    if not token:
        return True
    scheme, _, value = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode("utf-8"), token.encode("utf-8")
    )


def _authorized() -> bool:
    return scraper_allowed(
        request.headers.get("Authorization", ""),
        str(current_app.config.get("KOIN_METRICS_TOKEN") or ""),
    )


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format.

    :raise 401: ``KOIN_METRICS_TOKEN`` is set and the request does not carry it.
    """
    if not _authorized():
        return Response(
            "metrics: a bearer token is required\n", status=401, mimetype="text/plain",
            headers={"WWW-Authenticate": 'Bearer realm="koin metrics"'},
        )
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    return Response(metrics_text(app), content_type=CONTENT_TYPE_LATEST)

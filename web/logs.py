"""Logging of the service: one line per request with a request ID, and JSON lines for log
collectors.

``KOIN_LOG_FORMAT``: ``text`` (the default: ``LEVEL logger: message``, for people and the test
suite) or ``json`` (one JSON object per line with ``time``, ``level``, ``logger``,
``message`` and, inside a request, ``request_id``, ``method``, ``path``; the access line of
each request adds ``status`` and ``duration_ms``; production layouts set it). ``KOIN_LOG_LEVEL``
(DEBUG, INFO, WARNING …) says how much is written; the default is WARNING for text and INFO
for JSON (so that the access lines are there).

Every request gets an ID: the ``X-Request-ID`` header of the request if it is sane (1–128
characters of ``A-Z a-z 0-9 . _ : -``: what proxies and load balancers send), else a new
random one; the response carries it back in ``X-Request-ID``. No secret is ever logged: the
path is logged without its query string, and the link tokens of party pages (``/c/…``,
``/d/…``) are replaced by ``sha256:`` and 12 hex digits of their hash (as
:class:`web.party_views.TokenRedactor` does for werkzeug's lines).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import sys
import time
import uuid
from typing import Any

from flask import Flask, Response, g, has_request_context, request

__all__ = [
    "LOG_FORMAT_ENV",
    "LOG_LEVEL_ENV",
    "REQUEST_ID_HEADER",
    "JsonFormatter",
    "RequestFields",
    "configure_logging",
    "init_app",
    "redacted_path",
    "request_id",
]

LOG_FORMAT_ENV = "KOIN_LOG_FORMAT"
LOG_LEVEL_ENV = "KOIN_LOG_LEVEL"
REQUEST_ID_HEADER = "X-Request-ID"
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"

access_log = logging.getLogger("koin.access")

_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_TOKEN_IN_PATH = re.compile(r"^(/[cd]/)([^/]+)")
#: Polled by orchestrators and scrapers every few seconds: their access lines are DEBUG.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_REQUEST_FIELDS = ("request_id", "method", "path", "status", "duration_ms")


def redacted_path(path: str) -> str:
    """``path`` as it may be logged: a party link's token replaced by a hash prefix."""

    def _hash(match: re.Match[str]) -> str:
        digest = hashlib.sha256(match.group(2).encode("utf-8", "replace")).hexdigest()
        return f"{match.group(1)}sha256:{digest[:12]}"

    return _TOKEN_IN_PATH.sub(_hash, path)[:512]


def request_id() -> str:
    """The ID of the current request (taken from ``X-Request-ID`` or made up once)."""
    current: str | None = g.get("koin_request_id")
    if current is None:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        current = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        g.koin_request_id = current
    return current


class RequestFields(logging.Filter):
    """Adds ``request_id``, ``method`` and ``path`` of the current request to each record
    (on a handler: records of every logger pass through it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if has_request_context() and getattr(record, "request_id", None) is None:
            try:
                record.request_id = request_id()
                record.method = request.method
                record.path = redacted_path(request.path)
            except Exception:  # logging must never fail a request
                pass
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line (UTF-8, no ASCII escapes)."""

    def format(self, record: logging.LogRecord) -> str:
        moment = dt.datetime.fromtimestamp(record.created, dt.UTC)
        entry: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _REQUEST_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _KoinHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The JSON handler koin puts on the root logger (found again so it is put once)."""


def configure_logging(fmt: str | None = None, level: str | None = None) -> None:
    """Set up the root logger from ``KOIN_LOG_FORMAT`` and ``KOIN_LOG_LEVEL`` (or the
    arguments). Text: :func:`logging.basicConfig` (nothing changes if the root logger has
    handlers already). JSON: a stderr handler of koin's replaces the root's handlers.
    Unless a level is given, pyHanko logs errors only (koin's own messages say what failed;
    pyHanko warns with a traceback about every chain or timestamp problem it meets)."""
    fmt = (fmt if fmt is not None else os.environ.get(LOG_FORMAT_ENV, "")).strip().lower()
    name = (level if level is not None else os.environ.get(LOG_LEVEL_ENV, "")).strip().upper()
    known = name in logging.getLevelNamesMapping()
    root = logging.getLogger()
    if fmt == "json":
        handler = _KoinHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(RequestFields())
        for existing in list(root.handlers):
            root.removeHandler(existing)
        root.addHandler(handler)
        root.setLevel(name if known else logging.INFO)
        # koin.access has each request's line, without the query string
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    else:
        logging.basicConfig(level=name if known else logging.WARNING, format=TEXT_FORMAT)
    if not name:
        logging.getLogger("pyhanko").setLevel(logging.ERROR)


def _start() -> None:
    g.koin_started = time.perf_counter()
    request_id()


def _finish(response: Response) -> Response:
    rid = request_id()
    response.headers[REQUEST_ID_HEADER] = rid
    started: float | None = g.get("koin_started")
    duration = round((time.perf_counter() - started) * 1000, 1) if started else None
    path = redacted_path(request.path)
    access_log.log(
        logging.DEBUG if request.path in _QUIET_PATHS else logging.INFO,
        "%s %s %s%s", request.method, path, response.status_code,
        f" {duration} ms" if duration is not None else "",
        extra={"request_id": rid, "method": request.method, "path": path,
               "status": response.status_code, "duration_ms": duration},
    )
    return response


def init_app(app: Flask) -> None:
    """Request IDs and access lines for ``app``; JSON logging when ``KOIN_LOG_FORMAT=json``
    is set and nobody set up koin's logging yet (e.g. gunicorn without
    ``web.gunicorn_config``)."""
    app.before_request_funcs.setdefault(None, []).insert(0, _start)
    app.after_request(_finish)
    if os.environ.get(LOG_FORMAT_ENV, "").strip().lower() == "json" and not any(
        isinstance(h, _KoinHandler) for h in logging.getLogger().handlers
    ):
        configure_logging()

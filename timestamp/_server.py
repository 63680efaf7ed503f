"""RFC 3161 over HTTP (§3.4): a plain WSGI application and a small threaded server."""

from __future__ import annotations

import logging
import socketserver
import threading
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from ._authority import TimeStampAuthority

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "BackgroundServer",
    "make_wsgi_app",
    "serve",
    "serve_in_background",
]

log = logging.getLogger(__name__)

#: A TimeStampReq is about a hundred bytes; leave room for extensions, refuse the rest.
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024

QUERY_TYPE = "application/timestamp-query"
REPLY_TYPE = "application/timestamp-reply"


def make_wsgi_app(
    authority: TimeStampAuthority, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
) -> WSGIApplication:
    """A WSGI application answering ``POST`` ``application/timestamp-query`` on any path.

    Every well-formed HTTP exchange gets ``200`` with an ``application/timestamp-reply`` body,
    including rejections of bad requests (RFC 3161 reports those in the ``TimeStampResp``).

    :raise 405: not a ``POST``.
    :raise 415: the Content-Type is not ``application/timestamp-query``.
    :raise 411: no Content-Length.
    :raise 413: the body is longer than ``max_request_bytes``.
    :raise 400: the body is shorter than its Content-Length.
    """

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST":
            return _text(start_response, "405 Method Not Allowed", "Use POST.", [("Allow", "POST")])
        content_type = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
        if content_type != QUERY_TYPE:
            return _text(
                start_response, "415 Unsupported Media Type", f"Content-Type must be {QUERY_TYPE}."
            )
        try:
            length = int(environ.get("CONTENT_LENGTH") or "")
        except ValueError:
            return _text(start_response, "411 Length Required", "Content-Length is required.")
        if length < 0:
            return _text(start_response, "400 Bad Request", "Invalid Content-Length.")
        if length > max_request_bytes:
            return _text(
                start_response,
                "413 Content Too Large",
                f"A time-stamp query is at most {max_request_bytes} bytes.",
            )
        body = environ["wsgi.input"].read(length)
        if len(body) != length:
            return _text(start_response, "400 Bad Request", "Truncated request body.")
        reply = authority.respond(body)
        start_response(
            "200 OK", [("Content-Type", REPLY_TYPE), ("Content-Length", str(len(reply)))]
        )
        return [reply]

    return app


def _text(
    start_response: StartResponse,
    status: str,
    text: str,
    extra_headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    body = (text + "\n").encode("utf-8")
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    start_response(status, headers + (extra_headers or []))
    return [body]


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck client never blocks shutdown


class _LoggingHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


def _make_server(
    authority: TimeStampAuthority, host: str, port: int, max_request_bytes: int
) -> WSGIServer:
    return make_server(
        host,
        port,
        make_wsgi_app(authority, max_request_bytes),
        server_class=_ThreadingWSGIServer,
        handler_class=_LoggingHandler,
    )


def serve(
    authority: TimeStampAuthority,
    host: str = "127.0.0.1",
    port: int = 3161,
    *,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> None:
    """Serve the TSA over HTTP, one thread per request, until interrupted (blocks).

    wsgiref is enough for a TSA on loopback or behind a reverse proxy; put TLS and access
    control in the proxy.

    :raises OSError: the address cannot be bound.
    """
    with _make_server(authority, host, port, max_request_bytes) as server:
        log.info("TSA listening on %s", _url(server))
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            log.info("TSA stopped")


class BackgroundServer(NamedTuple):
    """A TSA server running in a daemon thread: its URL and how to stop it."""

    url: str
    stop: Callable[[], None]


def serve_in_background(
    authority: TimeStampAuthority,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> BackgroundServer:
    """Start :func:`serve` in a background thread; ``port=0`` picks a free port.

    ``stop()`` shuts the server down, closes its socket and joins the thread; it may be
    called more than once.

    :raises OSError: the address cannot be bound.
    """
    server = _make_server(authority, host, port, max_request_bytes)
    thread = threading.Thread(
        target=server.serve_forever,
        args=(0.1,),  # poll interval: how long stop() may wait
        name=f"koin-tsa-{server.server_port}",
        daemon=True,
    )
    thread.start()
    stopped = threading.Lock()

    def stop() -> None:
        if not stopped.acquire(blocking=False):
            return
        server.shutdown()
        server.server_close()
        thread.join()

    return BackgroundServer(_url(server), stop)


def _url(server: WSGIServer) -> str:
    host = str(server.server_address[0])
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{server.server_port}/"

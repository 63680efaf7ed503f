"""Real servers on loopback for tests: our own processes and deliberately broken TSAs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def closed_port_url() -> str:
    """A URL on loopback where nothing listens."""
    return f"http://127.0.0.1:{free_port()}/"


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@contextmanager
def wsgi_server(app: WsgiApp, port: int = 0) -> Iterator[str]:
    """Serve ``app`` on loopback (on ``port``, or any free one) until the block ends."""
    server = make_server("127.0.0.1", port, app, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port}")


@contextmanager
def koin_process(
    home: Path, *args: str, port: int, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``koin ARGS`` (a server) as a real process until the block ends. Its output goes to
    ``HOME/koin-<command>-<port>.log`` (a file, not a pipe: a pipe nobody reads would block a
    server that logs a lot)."""
    koin = Path(sys.executable).parent / "koin"
    env = {**os.environ, "KOIN_HOME": str(home), **(env or {})}
    log_path = home / f"koin-{args[0] if args else 'process'}-{port}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [str(koin), *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for_port(port, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class CollectedMail:
    """Messages received by :func:`smtp_collector`, parsed with the modern email policy."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        with self._lock:
            self.messages.append(message)
        return "250 OK"

    def wait_for(
        self, predicate: Callable[[EmailMessage], bool], count: int = 1, timeout: float = 60
    ) -> list[EmailMessage]:
        """Wait until ``count`` received messages satisfy ``predicate``; return them."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = [m for m in self.messages if predicate(m)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                subjects = [str(m["Subject"]) for m in self.messages]
                raise TimeoutError(f"expected {count} matching mail(s); got {subjects}")
            time.sleep(0.2)


@contextmanager
def smtp_collector() -> Iterator[tuple[str, CollectedMail]]:
    """A real SMTP server (aiosmtpd) on loopback that keeps what it receives."""
    from aiosmtpd.controller import Controller

    collected = CollectedMail()
    port = free_port()
    controller = Controller(collected, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield f"smtp://127.0.0.1:{port}", collected
    finally:
        controller.stop()

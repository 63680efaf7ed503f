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


CHROMIUM = "/usr/bin/chromium"


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium under Playwright (a failure, never a skip, when it is missing).

    Start it after the fixtures that sign or build PDFs: Playwright's sync API keeps an event
    loop on this thread, and pyHanko's sync API calls asyncio.run.
    """
    import pytest
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed; run `bash .ci/setup`")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def served_with_staff(
    koin_home: Path, folder: Path, password: str, staff: Iterable[tuple[str, str, str]]
) -> Iterator[str]:
    """``koin serve`` on a copy of ``koin_home`` (without its database) in ``folder``, with the
    accounts ``(email, role, display name)`` made by ``koin users create``, all with
    ``password``; yields its URL."""
    import shutil

    home = folder / "home"
    shutil.copytree(koin_home, home, ignore=shutil.ignore_patterns("koin.db*"))
    password_file = folder / "password"
    password_file.write_text(password)
    koin = Path(sys.executable).parent / "koin"
    env = {"PATH": "/usr/bin:/bin", "KOIN_HOME": str(home)}
    commands = [["db", "upgrade"]] + [
        ["users", "create", email, "--role", role, "--name", name,
         "--password-file", str(password_file)]
        for email, role, name in staff
    ]
    for args in commands:
        done = subprocess.run([str(koin), *args], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
    port = free_port()
    with koin_process(home, "serve", "--port", str(port), port=port,
                      env={"KOIN_PUBLIC_URL": f"http://127.0.0.1:{port}"}):
        yield f"http://127.0.0.1:{port}"

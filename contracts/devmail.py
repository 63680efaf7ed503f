"""The development mailbox: a real SMTP server (aiosmtpd) on loopback that files every message
it receives as ``KOIN_HOME/mail/<timestamp>-<id>.eml`` instead of delivering it.

``koin serve`` runs it when no ``KOIN_SMTP_URL`` is configured, and the page ``/dev/mailbox``
(development mode only) shows what arrived. Mail takes the same path as in production —
outbox, worker, SMTP — only the last hop ends in a folder.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import secrets
import threading
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope
from aiosmtpd.smtp import Session as SmtpSession

from keys import atomic_write

from ._db import utcnow
from ._smtp import SmtpTransport
from .errors import MailError

__all__ = [
    "DEFAULT_DEV_SMTP_PORT",
    "DevMail",
    "DevMailServer",
    "list_mailbox",
    "mailbox_dir",
    "read_mail",
    "read_raw_mail",
]

DEFAULT_DEV_SMTP_PORT = 8025
MAILBOX = "mail"
_STAMP = "%Y%m%dT%H%M%S%fZ"
_NAME = re.compile(r"^(\d{8}T\d{12}Z)-([0-9a-f]{8})$")
_MAX_MESSAGE = 10 * 1024 * 1024


def mailbox_dir(home: Path) -> Path:
    """The folder of the development mailbox of the installation at ``home``."""
    return home / MAILBOX


class _FileHandler:
    """aiosmtpd handler: write each message, with its envelope in ``X-MailFrom`` and
    ``X-RcptTo`` headers on top, atomically into the mailbox folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    async def handle_DATA(  # noqa: N802 — the name aiosmtpd calls
        self, server: SMTP, session: SmtpSession, envelope: Envelope
    ) -> str:
        content = envelope.original_content or b""
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        recipients = ", ".join(envelope.rcpt_tos)
        envelope_headers = f"X-MailFrom: {envelope.mail_from}\r\nX-RcptTo: {recipients}\r\n"
        name = f"{utcnow():{_STAMP}}-{secrets.token_hex(4)}.eml"
        atomic_write(self.folder / name, envelope_headers.encode() + content, mode=0o600)
        return "250 Message accepted for delivery"


class DevMailServer:
    """An SMTP server on ``host``:``port`` (0: any free port) that files mail under
    ``home/mail``. Use :meth:`start` and :meth:`stop`, or ``with``."""

    def __init__(
        self, home: Path, host: str = "127.0.0.1", port: int = DEFAULT_DEV_SMTP_PORT
    ) -> None:
        self.folder = mailbox_dir(home)
        self.host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (known after :meth:`start` when 0 was asked for)."""
        return self._port

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def transport(self) -> SmtpTransport:
        """A transport that sends to this server."""
        return SmtpTransport(self.host, self.port, timeout=10.0)

    def start(self) -> None:
        """Listen and serve in a background thread.

        :raises MailError: the address is taken or cannot be bound.
        :raises RuntimeError: it is already running.
        """
        if self._thread is not None:
            raise RuntimeError("the development mail server is already running")
        self.folder.mkdir(parents=True, exist_ok=True)
        # aiosmtpd logs every line of every message at DEBUG ("DATA readline: …"): mail bodies
        # carry party links and one-time codes, which must never reach a log. Its INFO lines
        # (peers, commands) stay.
        aiosmtpd_log = logging.getLogger("mail.log")
        if aiosmtpd_log.level < logging.INFO:  # unset or DEBUG
            aiosmtpd_log.setLevel(logging.INFO)
        loop = asyncio.new_event_loop()
        handler = _FileHandler(self.folder)

        def protocol() -> SMTP:
            return SMTP(
                handler,
                hostname="koin-devmail",
                ident="koin development mailbox",
                data_size_limit=_MAX_MESSAGE,
                loop=loop,
            )

        try:
            server = loop.run_until_complete(
                loop.create_server(protocol, host=self.host, port=self._port)
            )
        except OSError as exc:
            loop.close()
            raise MailError(
                f"開発用メールサーバーを {self.host}:{self._port} で開始できません（{exc}）。"
                "KOIN_DEV_SMTP_PORT で別のポートを指定してください。",
                f"Cannot start the development mail server on {self.host}:{self._port} "
                f"({exc}); choose another port with KOIN_DEV_SMTP_PORT.",
                host=self.host,
                port=self._port,
            ) from exc
        self._port = int(server.sockets[0].getsockname()[1])
        self._loop, self._server = loop, server
        self._thread = threading.Thread(target=loop.run_forever, name="koin-devmail", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening, end open sessions and wait for the thread. Idempotent."""
        loop, server, thread = self._loop, self._server, self._thread
        if loop is None or server is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.run_until_complete(self._shutdown(server))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        self._loop = self._server = self._thread = None

    @staticmethod
    async def _shutdown(server: asyncio.Server) -> None:
        server.close()
        sessions = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)
        await server.wait_closed()

    def __enter__(self) -> DevMailServer:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


@dataclass(frozen=True)
class DevMail:
    """One message in the development mailbox."""

    #: File name without ``.eml``; the key for :func:`read_mail`.
    name: str
    received_at: dt.datetime
    sender: str
    to: str
    subject: str
    #: The plain text body with ``\n`` line breaks, or None if the message has none.
    text: str | None
    #: The whole message, parsed (``email.policy.default``).
    message: EmailMessage = field(compare=False, repr=False)


def _received_at(name: str) -> dt.datetime | None:
    match = _NAME.match(name)
    if match is None:
        return None
    return dt.datetime.strptime(match.group(1), _STAMP).replace(tzinfo=dt.UTC)


def _parse(name: str, data: bytes) -> DevMail | None:
    received_at = _received_at(name)
    if received_at is None:
        return None
    message = message_from_bytes(data, policy=default_policy)
    assert isinstance(message, EmailMessage)  # the default policy makes EmailMessage
    body = message.get_body(preferencelist=("plain",))
    text = body.get_content() if body is not None else None
    return DevMail(
        name=name,
        received_at=received_at,
        sender=str(message.get("From", "")),
        to=str(message.get("To", "")),
        subject=str(message.get("Subject", "")),
        text=text.replace("\r\n", "\n") if isinstance(text, str) else None,
        message=message,
    )


def read_raw_mail(home: Path, name: str) -> bytes | None:
    """The stored bytes of message ``name`` (as received, plus the envelope headers), or None
    if there is no such message (names other than ``<timestamp>-<id>`` never touch the disk)."""
    if _NAME.match(name) is None:
        return None
    path = mailbox_dir(home) / f"{name}.eml"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def read_mail(home: Path, name: str) -> DevMail | None:
    """Message ``name`` of the mailbox, parsed, or None if there is none."""
    data = read_raw_mail(home, name)
    return None if data is None else _parse(name, data)


def list_mailbox(home: Path, limit: int = 200) -> list[DevMail]:
    """The newest ``limit`` messages of the development mailbox, newest first."""
    folder = mailbox_dir(home)
    if not folder.is_dir():
        return []
    names = sorted(
        (path.stem for path in folder.glob("*.eml") if _NAME.match(path.stem)), reverse=True
    )
    found = [read_mail(home, name) for name in names[:limit]]
    return [mail for mail in found if mail is not None]

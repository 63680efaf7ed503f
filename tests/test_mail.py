"""Outgoing mail: the outbox on SQLite and PostgreSQL, delivered to real SMTP servers (aiosmtpd
on loopback), retried with back-off, never sent twice by concurrent workers; the development
mailbox, its page and ``koin mail deliver``."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import ipaddress
import shutil
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword
from aiosmtpd.smtp import Session as SmtpSession
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from contracts import (
    MailError,
    MailWorker,
    OutboxMessage,
    SmtpTransport,
    deliver_due,
    enqueue_mail,
    normalize_address,
    session_scope,
    utcnow,
)
from contracts.devmail import DevMailServer, list_mailbox, read_mail
from contracts.mail import (
    DEFAULT_MAIL_FROM,
    LEASE,
    SmtpSecurity,
    build_email,
    retry_delay,
    validate_sender,
)
from tests.servers import free_port, koin_process
from web import create_app
from web.cli import cli

SUBJECT = "【茨城県】電子契約への署名のお願い（契約番号 0GSC-8XWZ）"
TEXT = (
    "山田 太郎 様\n\n茨城県から電子契約の署名依頼が届いています。\n"
    "下記のリンクから内容をご確認ください。\n"
)
HTML = "<p>山田 太郎 様</p><p>茨城県から電子契約の署名依頼が届いています。</p>"


# -- a real SMTP server -----------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.data, policy=default_policy)
        assert isinstance(parsed, EmailMessage)
        return parsed


class Collector:
    """aiosmtpd handler keeping every message; ``delay`` slows each DATA down (races), and
    ``refuse`` answers RCPT with 550."""

    def __init__(self, delay: float = 0.0, refuse: bool = False) -> None:
        self.delay = delay
        self.refuse = refuse
        self.received: list[Received] = []
        self._lock = threading.Lock()

    async def handle_RCPT(  # noqa: N802
        self, server: SMTP, session: SmtpSession, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        if self.refuse:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802
        self, server: SMTP, session: SmtpSession, envelope: Envelope
    ) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        data = envelope.original_content
        assert isinstance(data, bytes)
        with self._lock:
            self.received.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos), data))
        return "250 OK"

    def message_ids(self) -> list[str]:
        with self._lock:
            return [str(r.message["Message-ID"]) for r in self.received]


@contextmanager
def smtp_server(
    handler: Collector, port: int | None = None, **options: Any
) -> Iterator[Controller]:
    controller = Controller(
        handler, hostname="127.0.0.1", port=port or free_port(), server_hostname="test-smtp",
        **options,
    )
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


@pytest.fixture
def collector() -> Collector:
    return Collector()


@pytest.fixture
def smtp(collector: Collector) -> Iterator[SmtpTransport]:
    """A transport to a running collecting SMTP server."""
    with smtp_server(collector) as controller:
        yield SmtpTransport.from_url(f"smtp://127.0.0.1:{controller.port}?timeout=10")


def queue(sessions: sessionmaker[Session], to: str = "taro@example.jp", **fields: Any) -> str:
    """Enqueue one message in its own committed transaction; its Message-ID."""
    values: dict[str, Any] = {"subject": SUBJECT, "text": TEXT, "html": HTML, **fields}
    with session_scope(sessions) as session:
        return enqueue_mail(session, to=to, **values).message_id


def outbox(sessions: sessionmaker[Session]) -> list[OutboxMessage]:
    with sessions() as session:
        return list(session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def count(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(OutboxMessage)) or 0


# -- delivery ---------------------------------------------------------------------------------


def test_enqueue_and_deliver(
    sessions: sessionmaker[Session], smtp: SmtpTransport, collector: Collector
) -> None:
    message_id = queue(sessions, to=" Taro.Yamada@Example.JP ", tag="invitation")
    [row] = outbox(sessions)
    assert row.to_address == "Taro.Yamada@example.jp"
    assert row.sent_at is None and row.attempts == 0 and row.tag == "invitation"
    assert row.created_at.tzinfo is dt.UTC and row.next_attempt_at == row.created_at

    report = deliver_due(sessions, smtp)

    assert report.sent == (message_id,) and report.failed == ()
    [received] = collector.received
    assert received.mail_from == "noreply@koin.local"
    assert received.rcpt_tos == ["Taro.Yamada@example.jp"]
    assert received.data.isascii(), "non-ASCII is encoded: no 8BITMIME or SMTPUTF8 needed"
    assert b"Subject: =?utf-8?" in received.data
    message = received.message
    assert message["Subject"] == SUBJECT
    assert message["From"] == DEFAULT_MAIL_FROM
    assert message["From"].addresses[0].display_name == "koin"
    assert message["To"] == "Taro.Yamada@example.jp"
    assert message["Message-ID"] == message_id
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Date"].datetime == row.created_at.replace(microsecond=0)
    assert message["Date"].datetime.utcoffset() == dt.timedelta(hours=9)  # JST
    assert message.get_content_type() == "multipart/alternative"
    text_part = message.get_body(preferencelist=("plain",))
    html_part = message.get_body(preferencelist=("html",))
    assert text_part is not None and html_part is not None
    assert text_part.get_content_charset() == "utf-8"
    # canonical text: CRLF line breaks, also inside base64 (RFC 2045)
    assert text_part.get_content() == TEXT.replace("\n", "\r\n")
    assert html_part.get_content().strip() == HTML

    [row] = outbox(sessions)
    assert row.sent_at is not None and row.attempts == 0 and row.last_error is None
    assert deliver_due(sessions, smtp).attempted == 0, "sent once, never again"
    assert len(collector.received) == 1


def test_text_only_message_is_not_multipart(
    sessions: sessionmaker[Session], smtp: SmtpTransport, collector: Collector
) -> None:
    queue(sessions, html=None, subject="Your code", text="Your code: 123456\n")
    deliver_due(sessions, smtp, sender="茨城県 電子契約 <keiyaku@pref.ibaraki.example>")
    message = collector.received[0].message
    assert message.get_content_type() == "text/plain"
    assert message.get_content().splitlines() == ["Your code: 123456"]
    assert message["From"].addresses[0].display_name == "茨城県 電子契約"
    assert collector.received[0].mail_from == "keiyaku@pref.ibaraki.example"


def test_smtp_down_backs_off_and_delivers_when_it_returns(
    sessions: sessionmaker[Session], collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens here yet
    transport = SmtpTransport.from_url(f"smtp://127.0.0.1:{port}?timeout=5")
    message_id = queue(sessions, tag="reminder")
    start = utcnow()

    report = deliver_due(sessions, transport, now=start)

    assert report.sent == () and report.failed == (message_id,)
    [row] = outbox(sessions)
    assert row.sent_at is None
    assert row.attempts == 1
    assert row.next_attempt_at == start + dt.timedelta(seconds=30)
    assert row.last_error is not None and f"127.0.0.1:{port}" in row.last_error
    assert "ConnectionRefusedError" in row.last_error
    assert any(
        message_id in r.getMessage() and r.levelname == "WARNING" for r in caplog.records
    )

    with smtp_server(collector, port=port):
        # Not due yet: nothing is tried before the back-off ends.
        assert deliver_due(sessions, transport, now=start + dt.timedelta(seconds=29)).attempted == 0
        assert collector.received == []

        report = deliver_due(sessions, transport, now=start + dt.timedelta(seconds=31))

    assert report.sent == (message_id,)
    assert collector.message_ids() == [message_id]
    [row] = outbox(sessions)
    assert row.sent_at == start + dt.timedelta(seconds=31)
    assert row.attempts == 1


def test_failures_back_off_exponentially_and_never_give_up(
    sessions: sessionmaker[Session],
) -> None:
    transport = SmtpTransport.from_url(f"smtp://127.0.0.1:{free_port()}")
    queue(sessions)
    moment = utcnow()
    waits = []
    for _ in range(10):
        deliver_due(sessions, transport, now=moment)
        [row] = outbox(sessions)
        waits.append(row.next_attempt_at - moment)
        moment = row.next_attempt_at
    minutes = [w.total_seconds() / 60 for w in waits]
    assert minutes == [0.5, 1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert row.attempts == 10 and row.sent_at is None


def test_retry_delay() -> None:
    assert retry_delay(1) == dt.timedelta(seconds=30)
    assert retry_delay(2) == dt.timedelta(minutes=1)
    assert retry_delay(3) == dt.timedelta(minutes=2)
    assert retry_delay(8) == dt.timedelta(hours=1)
    assert retry_delay(10_000) == dt.timedelta(hours=1)


def test_refused_recipient_is_kept_and_retried(
    sessions: sessionmaker[Session],
) -> None:
    with smtp_server(Collector(refuse=True)) as controller:
        transport = SmtpTransport(controller.hostname, controller.port)
        queue(sessions)
        report = deliver_due(sessions, transport)
    assert len(report.failed) == 1
    [row] = outbox(sessions)
    assert row.attempts == 1 and row.sent_at is None
    assert row.last_error is not None and "550 5.1.1 No such user here" in row.last_error


def test_mail_of_a_rolled_back_transaction_is_never_sent(
    sessions: sessionmaker[Session], smtp: SmtpTransport, collector: Collector
) -> None:
    with pytest.raises(RuntimeError), session_scope(sessions) as session:
        enqueue_mail(session, to="taro@example.jp", subject=SUBJECT, text=TEXT)
        raise RuntimeError("the business change failed")

    assert count(sessions) == 0
    assert deliver_due(sessions, smtp).attempted == 0
    assert collector.received == []


def test_concurrent_workers_never_send_a_message_twice(
    sessions: sessionmaker[Session],
) -> None:
    messages = 40
    workers = 4
    expected = {queue(sessions, to=f"user{n}@example.jp") for n in range(messages)}
    slow = Collector(delay=0.02)  # widen the window between claiming and marking sent
    start = threading.Barrier(workers)

    with smtp_server(slow) as controller:
        transport = SmtpTransport(controller.hostname, controller.port)

        def work() -> int:
            start.wait(timeout=30)
            return len(deliver_due(sessions, transport).sent)

        with ThreadPoolExecutor(workers) as pool:
            sent_counts = [f.result(timeout=120) for f in [pool.submit(work) for _ in range(4)]]

    received = slow.message_ids()
    assert len(received) == messages, "every message once, none twice"
    assert set(received) == expected
    assert sum(sent_counts) == messages
    assert sum(1 for c in sent_counts if c) > 1, "the work was shared"
    assert all(row.sent_at is not None for row in outbox(sessions))


def test_a_claim_is_leased_and_taken_over_after_a_crash(
    sessions: sessionmaker[Session], smtp: SmtpTransport, collector: Collector
) -> None:
    """A worker that dies after claiming holds the message for LEASE, then it is sent."""
    from contracts.mail import _claim  # the first half of deliver_due, as a crash leaves it

    message_id = queue(sessions)
    start = utcnow()
    [claimed] = _claim(sessions, start, 10)
    assert claimed.message_id == message_id

    assert deliver_due(sessions, smtp, now=start + LEASE - dt.timedelta(seconds=1)).attempted == 0
    report = deliver_due(sessions, smtp, now=start + LEASE)
    assert report.sent == (message_id,)
    assert collector.message_ids() == [message_id]


def test_limit(sessions: sessionmaker[Session], smtp: SmtpTransport) -> None:
    ids = [queue(sessions, to=f"user{n}@example.jp") for n in range(13)]
    assert deliver_due(sessions, smtp, limit=12).sent == tuple(ids[:12])  # oldest first
    assert deliver_due(sessions, smtp).sent == (ids[12],)
    with pytest.raises(ValueError):
        deliver_due(sessions, smtp, limit=0)


def test_a_message_that_breaks_does_not_hold_up_the_others(
    sessions: sessionmaker[Session], collector: Collector, smtp: SmtpTransport
) -> None:
    class Flaky:
        def send(self, message: EmailMessage) -> None:
            if message["To"] == "broken@example.jp":
                raise RuntimeError("bug in a transport")
            smtp.send(message)

    broken = queue(sessions, to="broken@example.jp")
    fine = queue(sessions)
    report = deliver_due(sessions, Flaky())
    assert report.failed == (broken,) and report.sent == (fine,)
    rows = {row.message_id: row for row in outbox(sessions)}
    assert rows[broken].last_error == "RuntimeError: bug in a transport"


# -- enqueueing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("to", "not an address"),
        ("to", "taro@"),
        ("to", "taro@localhost"),
        ("to", "太郎@example.jp"),
        ("to", "a@example.jp, b@example.jp"),
        ("to", "taro@example.jp\r\nBcc: x@example.jp"),
        ("subject", ""),
        ("subject", "line one\nBcc: x@example.jp"),
        ("subject", "長" * 256),
        ("text", " \n"),
        ("tag", "t" * 65),
    ],
)
def test_malformed_mail_is_refused(
    sessions: sessionmaker[Session], field: str, value: str
) -> None:
    values = {"to": "taro@example.jp", "subject": SUBJECT, "text": TEXT, field: value}
    with pytest.raises(ValueError), session_scope(sessions) as session:
        enqueue_mail(session, **values)
    assert count(sessions) == 0


def test_normalize_address() -> None:
    assert normalize_address("  Taro@Example.JP\n") == "Taro@example.jp"
    assert normalize_address("first.last+tag@sub.pref.ibaraki.lg.jp") == (
        "first.last+tag@sub.pref.ibaraki.lg.jp"
    )
    for bad in ["", "taro", "Taro <taro@example.jp>", "taro@@example.jp", "taro@example..jp",
                "a" * 250 + "@e.jp"]:
        assert normalize_address(bad) is None, bad


def test_sender_setting(monkeypatch: pytest.MonkeyPatch, sessions: sessionmaker[Session]) -> None:
    monkeypatch.setenv("KOIN_MAIL_FROM", "茨城県 <noreply@pref.ibaraki.example>")
    assert validate_sender() == "茨城県 <noreply@pref.ibaraki.example>"
    message_id = queue(sessions)
    assert message_id.endswith("@pref.ibaraki.example>")
    message = build_email(outbox(sessions)[0])
    assert message["From"].addresses[0].addr_spec == "noreply@pref.ibaraki.example"

    monkeypatch.setenv("KOIN_MAIL_FROM", "not an address")
    with pytest.raises(MailError) as caught:
        validate_sender()
    assert "KOIN_MAIL_FROM" in caught.value.message
    with pytest.raises(MailError):
        deliver_due(sessions, SmtpTransport("127.0.0.1", free_port()))
    assert outbox(sessions)[0].attempts == 0, "a bad setting is not the message's fault"


# -- transports -------------------------------------------------------------------------------


def test_smtp_url_parsing(tmp_path: Path) -> None:
    plain = SmtpTransport.from_url("smtp://relay.pref.example")
    assert (plain.host, plain.port) == ("relay.pref.example", 25)
    assert plain.security is SmtpSecurity.PLAIN
    assert plain.username is None and plain.timeout == 30

    cafile = tmp_path / "ca.pem"
    cafile.write_text("")
    starttls = SmtpTransport.from_url(
        f"smtp://koin%40pref:p%40ss%3Aword@mail.example:587?starttls=1&timeout=5&cafile={cafile}"
    )
    assert starttls.security is SmtpSecurity.STARTTLS and starttls.port == 587
    assert (starttls.username, starttls.password) == ("koin@pref", "p@ss:word")
    assert starttls.timeout == 5 and starttls.cafile == cafile
    assert "p@ss" not in repr(starttls) and "ss%3Aword" not in starttls.url
    assert starttls.url == "smtp://koin%40pref@mail.example:587?starttls=1"

    implicit = SmtpTransport.from_url("SMTPS://user:secret@[::1]")
    assert (implicit.host, implicit.port, implicit.security) == ("::1", 465, SmtpSecurity.TLS)
    assert implicit.url == "smtps://user@[::1]:465"

    for bad in [
        "http://mail.example",
        "smtp://",
        "smtp://mail.example:99999",
        "smtp://mail.example/path",
        "smtp://mail.example?tls=1",
        "smtp://mail.example?starttls=maybe",
        "smtp://mail.example?timeout=0",
        "smtp://mail.example?timeout=soon",
        "smtps://mail.example?starttls=1",
        "smtp://mail.example?cafile=/no/such/file.pem",
        "smtp://user:secret@mail.example",  # a password in clear text
    ]:
        with pytest.raises(MailError) as caught:
            SmtpTransport.from_url(bad)
        assert "KOIN_SMTP_URL" in caught.value.message
        assert "secret" not in str(caught.value)


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1: (ca.pem, server.pem, server.key)."""
    now = dt.datetime.now(dt.UTC)

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
        signer: ec.EllipticCurvePrivateKey, ca: bool,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
            )
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "koin test mail CA")])
    ca_cert = certificate("koin test mail CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = certificate("127.0.0.1", server_key, ca_name, ca_key, ca=False)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def _server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def test_starttls_with_login(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    ca, cert, key = _tls_files(tmp_path)
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(
        server: SMTP, session: SmtpSession, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        logins.append((data.login, data.password))
        return AuthResult(success=data.password == b"p@ss:word", handled=False)

    collector = Collector()
    with smtp_server(
        collector, tls_context=_server_tls(cert, key), require_starttls=True,
        authenticator=authenticator, auth_required=True,
    ) as controller:
        base = f"127.0.0.1:{controller.port}?starttls=1&cafile={ca}"
        message_id = queue(sessions)
        good = SmtpTransport.from_url(f"smtp://koin%40pref:p%40ss%3Aword@{base}")
        assert deliver_due(sessions, good).sent == (message_id,)

        queue(sessions)
        wrong = SmtpTransport.from_url(f"smtp://koin%40pref:wrong@{base}")
        assert len(deliver_due(sessions, wrong).failed) == 1
        untrusted = SmtpTransport.from_url(
            f"smtp://koin%40pref:p%40ss%3Aword@127.0.0.1:{controller.port}?starttls=1"
        )
        with pytest.raises(MailError) as caught:
            untrusted.send(build_email(outbox(sessions)[1]))
        assert "CERTIFICATE_VERIFY_FAILED" in caught.value.message_en

    assert collector.message_ids() == [message_id]
    assert logins[0] == (b"koin@pref", b"p@ss:word")
    assert outbox(sessions)[1].last_error is not None
    assert "535" in (outbox(sessions)[1].last_error or "")
    assert "wrong" not in (outbox(sessions)[1].last_error or "")


def test_implicit_tls(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    ca, cert, key = _tls_files(tmp_path)
    collector = Collector()
    with smtp_server(collector, ssl_context=_server_tls(cert, key)) as controller:
        transport = SmtpTransport.from_url(f"smtps://127.0.0.1:{controller.port}?cafile={ca}")
        message_id = queue(sessions)
        assert deliver_due(sessions, transport).sent == (message_id,)
    assert collector.received[0].message["Subject"] == SUBJECT


# -- the background worker --------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


def test_worker_delivers_in_the_background_and_survives_errors(
    sessions: sessionmaker[Session], smtp: SmtpTransport, collector: Collector,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken_sessions = sessionmaker()  # bound to nothing: every round fails
    with MailWorker(broken_sessions, smtp, interval=0.05) as failing:
        wait_for(lambda: "mail delivery round failed" in caplog.text)
        assert failing.running, "an error does not end the thread"
    assert not failing.running

    with MailWorker(sessions, smtp, interval=0.05) as worker:
        message_id = queue(sessions)
        wait_for(lambda: collector.message_ids() == [message_id])
    assert not worker.running
    assert outbox(sessions)[0].sent_at is not None


# -- the development mailbox ------------------------------------------------------------------


def test_dev_mail_server_files_messages(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    with DevMailServer(home, port=0) as server:
        assert server.port > 0 and server.url == f"smtp://127.0.0.1:{server.port}"
        first = queue(sessions, to="first@example.jp")
        second = queue(sessions, to="second@example.jp", html=None)
        assert len(deliver_due(sessions, server.transport()).sent) == 2

    files = sorted((home / "mail").glob("*.eml"))
    assert len(files) == 2
    assert all(f.stat().st_mode & 0o077 == 0 for f in files)
    parsed = email.message_from_bytes(files[0].read_bytes(), policy=default_policy)
    assert parsed["X-RcptTo"] == "first@example.jp"
    assert parsed["X-MailFrom"] == "noreply@koin.local"
    assert parsed["Message-ID"] == first and parsed["Subject"] == SUBJECT

    newest, oldest = list_mailbox(home)
    assert (newest.to, oldest.to) == ("second@example.jp", "first@example.jp")
    assert newest.message["Message-ID"] == second
    assert oldest.subject == SUBJECT and oldest.text == TEXT
    assert oldest.received_at <= newest.received_at
    assert abs(oldest.received_at - utcnow()) < dt.timedelta(minutes=1)
    assert read_mail(home, oldest.name) == oldest
    assert read_mail(home, "../secret") is None
    assert read_mail(home, "20260101T000000000000Z-deadbeef") is None


def test_dev_mail_server_port_taken(tmp_path: Path) -> None:
    with DevMailServer(tmp_path, port=0) as first:
        with pytest.raises(MailError) as caught:
            DevMailServer(tmp_path, port=first.port).start()
        assert "KOIN_DEV_SMTP_PORT" in caught.value.message
    first.stop()  # idempotent


@pytest.fixture
def mailbox_home(tmp_path: Path) -> Path:
    """A KOIN_HOME whose development mailbox holds one message."""
    home = tmp_path / "home"
    home.mkdir()
    message = EmailMessage()
    message["From"] = DEFAULT_MAIL_FROM
    message["To"] = "taro@example.jp"
    message["Subject"] = SUBJECT
    message.set_content(TEXT + "<script>alert(1)</script>\n")
    message.add_alternative(HTML, subtype="html")
    with DevMailServer(home, port=0) as server:
        server.transport().send(message)
    return home


def _app(home: Path, dev_mode: bool) -> Any:
    return create_app(
        {"KOIN_HOME": str(home), "KOIN_DEV_MODE": dev_mode, "TESTING": True,
         "SECRET_KEY": "test-secret-key-not-secret-at-all-0123456789"}
    )


def test_mailbox_page_does_not_exist_in_production(mailbox_home: Path) -> None:
    client = _app(mailbox_home, dev_mode=False).test_client()
    [mail] = list_mailbox(mailbox_home)
    for path in ["/dev/mailbox", f"/dev/mailbox/{mail.name}", f"/dev/mailbox/{mail.name}/raw"]:
        assert client.get(path).status_code == 404, path


def test_mailbox_page_in_development_mode(mailbox_home: Path) -> None:
    client = _app(mailbox_home, dev_mode=True).test_client()
    [mail] = list_mailbox(mailbox_home)

    page = client.get("/dev/mailbox")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "開発用メールボックス" in html and SUBJECT in html and "taro@example.jp" in html
    assert f'href="/dev/mailbox/{mail.name}"' in html

    detail = client.get(f"/dev/mailbox/{mail.name}").get_data(as_text=True)
    assert "茨城県から電子契約の署名依頼が届いています。" in detail
    assert "<script>alert(1)</script>" not in detail, "bodies are escaped text"
    assert "&lt;script&gt;" in detail

    raw = client.get(f"/dev/mailbox/{mail.name}/raw")
    assert raw.mimetype == "message/rfc822"
    assert email.message_from_bytes(raw.data, policy=default_policy)["Subject"] == SUBJECT

    assert client.get("/dev/mailbox/20260101T000000000000Z-deadbeef").status_code == 404
    assert client.get("/dev/mailbox/..%2F..%2Fkeys").status_code == 404
    english = client.get("/dev/mailbox?lang=en").get_data(as_text=True)
    assert "Development mailbox" in english and "Subject" in english


def test_empty_mailbox_page(tmp_path: Path) -> None:
    client = _app(tmp_path, dev_mode=True).test_client()
    assert "メールはまだありません。" in client.get("/dev/mailbox").get_data(as_text=True)


# -- the command line -------------------------------------------------------------------------


def test_koin_mail_deliver(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    collector: Collector,
) -> None:
    from contracts import make_engine, make_session_factory
    from contracts.migrate import upgrade

    monkeypatch.setenv("KOIN_HOME", str(tmp_path))
    monkeypatch.setenv("KOIN_DATABASE_URL", db_url)
    monkeypatch.delenv("KOIN_LANG", raising=False)
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        sessions = make_session_factory(engine)
        first = queue(sessions)
        with smtp_server(collector) as controller:
            monkeypatch.setenv("KOIN_SMTP_URL", f"smtp://127.0.0.1:{controller.port}")
            result = CliRunner().invoke(cli, ["mail", "deliver"])
            assert result.exit_code == 0, result.output
            assert "1 件" in result.output
        assert collector.message_ids() == [first]

        queue(sessions)
        monkeypatch.setenv("KOIN_SMTP_URL", f"smtp://127.0.0.1:{free_port()}")
        result = CliRunner().invoke(cli, ["mail", "deliver"])
        assert result.exit_code == 0, result.output
        assert "失敗 1 件" in result.output

        # Without KOIN_SMTP_URL the mail goes to the development mailbox.
        monkeypatch.delenv("KOIN_SMTP_URL")
        result = CliRunner().invoke(
            cli, ["mail", "deliver"], catch_exceptions=False
        )
        assert result.exit_code == 0
        assert "0 件" in result.output, "the failed one waits for its back-off"
        english = CliRunner().invoke(cli, ["mail", "deliver"], env={"KOIN_LANG": "en"})
        assert english.exit_code == 0 and english.output == "Sent 0 message(s)\n"
        third = queue(sessions)
        result = CliRunner().invoke(cli, ["mail", "deliver"])
        assert result.exit_code == 0 and "1 件" in result.output
        assert [m.message["Message-ID"] for m in list_mailbox(tmp_path)] == [third]

        monkeypatch.setenv("KOIN_SMTP_URL", "smtp://user:secret@mail.example")
        result = CliRunner().invoke(cli, ["mail", "deliver"])
        assert result.exit_code == 1
        assert "KOIN_SMTP_URL" in result.output and "secret" not in result.output
    finally:
        engine.dispose()


@pytest.mark.slow
def test_koin_serve_runs_the_dev_mailbox_and_delivers(
    koin_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contracts import database_url, make_engine, make_session_factory
    from contracts.migrate import upgrade

    home = tmp_path / "home"
    shutil.copytree(koin_home, home)
    url = database_url(home)
    upgrade(url)
    port, smtp_port = free_port(), free_port()
    monkeypatch.delenv("KOIN_SMTP_URL", raising=False)
    monkeypatch.delenv("KOIN_DEV_MODE", raising=False)
    monkeypatch.setenv("KOIN_DEV_SMTP_PORT", str(smtp_port))
    engine = make_engine(url)
    try:
        with koin_process(home, "serve", "--no-init", "--port", str(port), port=port):
            message_id = queue(make_session_factory(engine))
            wait_for(lambda: len(list_mailbox(home)) == 1)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/dev/mailbox") as response:
                assert SUBJECT in response.read().decode()
    finally:
        engine.dispose()
    assert list_mailbox(home)[0].message["Message-ID"] == message_id

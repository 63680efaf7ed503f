"""Outgoing mail that is never lost: a transactional outbox, delivered and retried forever.

A service queues a message with :func:`enqueue_mail` in its own transaction, so a mail goes out
if and only if the business change it announces commits. :func:`deliver_due` (run by
:class:`MailWorker` in ``koin serve``, or by ``koin mail deliver``) sends what is due.

Delivery guarantees:

* **Claiming.** A worker claims up to :data:`CLAIM_BATCH` due messages by moving their
  ``next_attempt_at`` :data:`LEASE` into the future (``UPDATE … RETURNING``), commits, and
  sends them outside any transaction. On PostgreSQL the rows are first picked and locked with
  ``SELECT … FOR UPDATE SKIP LOCKED`` in the same transaction, so concurrent claimers skip
  each other's rows instead of waiting; on SQLite the claim is a single ``UPDATE … WHERE id
  IN (SELECT …)``, which holds SQLite's database write lock from its start. Either way no two
  workers hold the same message at once, so concurrent workers never both send it.
* **At least once.** A message is marked sent only after the SMTP server accepted it. If a
  worker dies (or loses the database) between that acceptance and the mark, the message is
  due again when its lease ends and is sent a second time — at most once more per such crash.
  A worker that outlives its lease (more than :data:`LEASE` on one batch) may also let another
  worker send a message again. Message-IDs stay the same, so mail clients can de-duplicate.
* **Retries forever.** A failed attempt counts in ``attempts`` and waits
  :func:`retry_delay` (30 s, 1 min, 2 min … capped at 1 h) before the next one; the message is
  never dropped. ``last_error`` keeps the server's last answer (never credentials).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import secrets
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY

from sqlalchemy import Index, String, Text, func, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from signer import JST

from ._db import Base, claim_predicate, session_scope, utcnow
from ._periodic import PeriodicWorker
from ._smtp import SMTP_URL_ENV, MailTransport, SmtpSecurity, SmtpTransport
from .errors import MailError

__all__ = [
    "CLAIM_BATCH",
    "DEFAULT_MAIL_FROM",
    "LEASE",
    "MAIL_FROM_ENV",
    "SMTP_URL_ENV",
    "DeliveryReport",
    "MailTransport",
    "MailWorker",
    "OutboxMessage",
    "SmtpSecurity",
    "SmtpTransport",
    "build_email",
    "default_sender",
    "deliver_due",
    "enqueue_mail",
    "normalize_address",
    "retry_delay",
    "validate_sender",
]

log = logging.getLogger(__name__)

#: Environment variable with the ``From`` of every message.
MAIL_FROM_ENV = "KOIN_MAIL_FROM"
DEFAULT_MAIL_FROM = "koin <noreply@koin.local>"
#: How long a claimed message is reserved for the worker that claimed it.
LEASE = dt.timedelta(minutes=15)
#: Messages claimed per round trip; small, so a slow server does not outlast the lease.
CLAIM_BATCH = 10
FIRST_RETRY = dt.timedelta(seconds=30)
MAX_RETRY = dt.timedelta(hours=1)

MAX_ADDRESS = 254  # RFC 5321 path limit
MAX_SUBJECT = 255
MAX_TAG = 64
MAX_ERROR = 1000

# Non-ASCII is encoded (RFC 2047 headers, base64 or quoted-printable bodies), so any SMTP
# server takes the message without 8BITMIME or SMTPUTF8. Text is in canonical form: CRLF line
# breaks, also inside base64 (RFC 2045 6.8), so a parser gives bodies back with "\r\n".
_POLICY = SMTP_POLICY.clone(cte_type="7bit")
_LINE_BREAK = re.compile(r"[\r\n]")


class OutboxMessage(Base):
    """One outgoing message, from the moment it is queued until (and after) it is sent."""

    __tablename__ = "mail_outbox"
    __table_args__ = (Index("ix_mail_outbox_due", "sent_at", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    #: RFC 5322 ``Message-ID`` with its angle brackets; the same on every attempt.
    message_id: Mapped[str] = mapped_column(String(255), unique=True)
    #: One recipient, a plain ``local@domain`` address.
    to_address: Mapped[str] = mapped_column(String(MAX_ADDRESS))
    subject: Mapped[str] = mapped_column(String(MAX_SUBJECT))
    text_body: Mapped[str] = mapped_column(Text)
    #: HTML alternative of ``text_body``, if any.
    html_body: Mapped[str | None] = mapped_column(Text)
    #: Free label of the caller (e.g. ``invitation``), for logs and searching.
    tag: Mapped[str | None] = mapped_column(String(MAX_TAG))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, server_default=func.now())
    #: Failed delivery attempts so far.
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    #: When the message is next due: now when queued, later after a failure or while claimed.
    next_attempt_at: Mapped[dt.datetime]
    #: When the SMTP server accepted the message; None while it is still to be sent.
    sent_at: Mapped[dt.datetime | None]
    #: Why the last attempt failed (the server's answer; never credentials).
    last_error: Mapped[str | None] = mapped_column(String(MAX_ERROR))

    def __repr__(self) -> str:
        state = "sent" if self.sent_at else f"pending, {self.attempts} failed attempts"
        return f"OutboxMessage(message_id={self.message_id!r}, tag={self.tag!r}, {state})"


@dataclass(frozen=True)
class DeliveryReport:
    """What one :func:`deliver_due` run did, as Message-IDs."""

    #: Accepted by the SMTP server and marked sent.
    sent: tuple[str, ...] = ()
    #: Failed this time; each waits for its back-off and is tried again.
    failed: tuple[str, ...] = ()

    @property
    def attempted(self) -> int:
        return len(self.sent) + len(self.failed)


def default_sender() -> str:
    """``KOIN_MAIL_FROM``, or :data:`DEFAULT_MAIL_FROM` if it is unset or empty."""
    return os.environ.get(MAIL_FROM_ENV, "").strip() or DEFAULT_MAIL_FROM


def validate_sender(sender: str | None = None) -> str:
    """``sender`` (default :func:`default_sender`) after checking it is one address, as in
    ``茨城県 <noreply@pref.ibaraki.jp>``.

    :raises MailError: it is not.
    """
    text = sender or default_sender()
    _parse_sender(text)
    return text


def _parse_sender(sender: str) -> Address:
    """:raises MailError: ``sender`` is not one address like ``Name <local@domain>``."""
    message = EmailMessage(policy=_POLICY)
    try:
        message["From"] = sender
        addresses = message["From"].addresses
    except (HeaderParseError, ValueError, IndexError):
        addresses = ()
    if len(addresses) != 1 or not addresses[0].domain or not addresses[0].username:
        raise MailError(
            f"差出人アドレス（KOIN_MAIL_FROM）が正しくありません: {sender!r}",
            f"The sender address (KOIN_MAIL_FROM) is not valid: {sender!r}",
            sender=sender,
        )
    address: Address = addresses[0]
    return address


def normalize_address(text: str) -> str | None:
    """``text`` as a plain ``local@domain`` address (surrounding space removed, domain in
    lower case), or None if it is not one ASCII address of at most 254 characters."""
    candidate = text.strip()
    if not candidate or len(candidate) > MAX_ADDRESS or not candidate.isascii():
        return None
    if any(ch.isspace() or ch in "<>,;\"()[]\\" for ch in candidate) or _LINE_BREAK.search(
        candidate
    ):
        return None
    try:
        address = Address(addr_spec=candidate)
    except (HeaderParseError, ValueError, IndexError):
        return None
    domain = address.domain.lower()
    labels = domain.split(".")
    if not address.username or len(labels) < 2 or not all(labels):
        return None
    return f"{address.username}@{domain}"


def _new_message_id(domain: str, now: dt.datetime) -> str:
    return f"<{now:%Y%m%d%H%M%S}.{secrets.token_hex(12)}@{domain}>"


def enqueue_mail(
    session: Session,
    *,
    to: str,
    subject: str,
    text: str,
    html: str | None = None,
    tag: str | None = None,
) -> OutboxMessage:
    """Queue a message in the session's transaction (the caller commits): it is delivered if
    and only if that transaction commits. Delivery is :func:`deliver_due`'s business.

    :param to: one recipient address (see :func:`normalize_address`).
    :param subject: one line; Japanese is fine (RFC 2047 encoded when sent).
    :param text: the plain text body; ``html`` an optional HTML alternative of it.
    :param tag: a free label for logs, e.g. ``invitation`` (at most 64 characters).
    :raises ValueError: ``to`` is not an address; ``subject`` is empty, over 255 characters or
        has a line break; ``text`` is empty; ``tag`` is empty or over 64 characters.
    :raises MailError: ``KOIN_MAIL_FROM`` is not a valid address (its domain names the
        Message-ID).
    """
    address = normalize_address(to)
    if address is None:
        raise ValueError(f"not an email address: {to!r}")
    if not subject.strip() or len(subject) > MAX_SUBJECT or _LINE_BREAK.search(subject):
        raise ValueError(f"subject must be one line of 1 to {MAX_SUBJECT} characters")
    if not text.strip():
        raise ValueError("the text body must not be empty")
    if tag is not None and not 0 < len(tag) <= MAX_TAG:
        raise ValueError(f"tag must be 1 to {MAX_TAG} characters")
    now = utcnow()
    message = OutboxMessage(
        message_id=_new_message_id(_parse_sender(default_sender()).domain, now),
        to_address=address,
        subject=subject,
        text_body=text,
        html_body=html,
        tag=tag,
        created_at=now,
        attempts=0,
        next_attempt_at=now,
    )
    session.add(message)
    session.flush()
    return message


def build_email(message: OutboxMessage, sender: str | None = None) -> EmailMessage:
    """The RFC 5322 message for an outbox row: UTF-8 text (and HTML alternative), ``From``
    ``sender`` (default :func:`default_sender`), ``Date`` of queueing in JST, the stored
    ``Message-ID``, and ``Auto-Submitted: auto-generated`` so that auto-replies stay away.

    :raises MailError: ``sender`` is not a valid address.
    """
    from_address = _parse_sender(sender or default_sender())
    email = EmailMessage(policy=_POLICY)
    email["From"] = from_address
    email["To"] = message.to_address
    email["Subject"] = message.subject
    email["Date"] = message.created_at.astimezone(JST)
    email["Message-ID"] = message.message_id
    email["Auto-Submitted"] = "auto-generated"
    email.set_content(message.text_body, charset="utf-8")
    if message.html_body is not None:
        email.add_alternative(message.html_body, subtype="html", charset="utf-8")
    return email


def retry_delay(attempts: int) -> dt.timedelta:
    """How long to wait after the ``attempts``-th failure: 30 s, 1 min, 2 min, 4 min … at
    most 1 h."""
    if attempts < 1:
        return dt.timedelta(0)
    exponent = min(attempts - 1, 16)  # 30 s * 2**7 is already past the cap
    return min(FIRST_RETRY * (1 << exponent), MAX_RETRY)


def _claim(sessions: sessionmaker[Session], now: dt.datetime, count: int) -> list[OutboxMessage]:
    """Lease up to ``count`` due messages, oldest first; detached rows as they were claimed."""
    due = (OutboxMessage.sent_at.is_(None), OutboxMessage.next_attempt_at <= now)
    oldest_due = (
        select(OutboxMessage.id)
        .where(*due)
        .order_by(OutboxMessage.next_attempt_at, OutboxMessage.id)
        .limit(count)
    )
    with session_scope(sessions) as session:
        chosen = claim_predicate(session, OutboxMessage.id, oldest_due)
        if chosen is None:
            return []
        claim = (
            update(OutboxMessage)
            .where(chosen, *due)
            .values(next_attempt_at=now + LEASE)
            .returning(OutboxMessage)
        )
        rows = session.scalars(claim, execution_options={"synchronize_session": False}).all()
        session.expunge_all()  # before the commit, so nothing is expired
    return sorted(rows, key=lambda row: row.id)


def _mark_sent(sessions: sessionmaker[Session], row_id: int, now: dt.datetime) -> None:
    with session_scope(sessions) as session:
        session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id == row_id, OutboxMessage.sent_at.is_(None))
            .values(sent_at=now)
        )


def _mark_failed(
    sessions: sessionmaker[Session], row: OutboxMessage, now: dt.datetime, error: str
) -> dt.datetime:
    retry_at = now + retry_delay(row.attempts + 1)
    with session_scope(sessions) as session:
        session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id == row.id, OutboxMessage.sent_at.is_(None))
            .values(
                attempts=OutboxMessage.attempts + 1,
                next_attempt_at=retry_at,
                last_error=error[:MAX_ERROR],
            )
        )
    return retry_at


def deliver_due(
    sessions: sessionmaker[Session],
    transport: MailTransport,
    *,
    now: dt.datetime | None = None,
    limit: int = 100,
    sender: str | None = None,
) -> DeliveryReport:
    """Send the queued messages that are due, oldest first, at most ``limit`` of them.

    Each is claimed (see the module docstring), sent through ``transport`` outside any
    transaction, and then marked sent — or, if sending failed, counted and put back with a
    longer wait (:func:`retry_delay`) and a warning in the log. Safe to run in several
    threads or processes at once.

    :param now: the time to act at (tests); default: the clock, read at each step.
    :param sender: the ``From`` (default ``KOIN_MAIL_FROM``).
    :raises ValueError: ``limit`` is below 1.
    :raises MailError: ``sender`` is not a valid address (checked before anything is claimed).
    :raises sqlalchemy.exc.SQLAlchemyError: the database failed; messages already claimed
        wait for their lease to end.
    """
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    sender = validate_sender(sender)

    def clock() -> dt.datetime:
        return now if now is not None else utcnow()

    sent: list[str] = []
    failed: list[str] = []
    while len(sent) + len(failed) < limit:
        batch = _claim(sessions, clock(), min(CLAIM_BATCH, limit - len(sent) - len(failed)))
        if not batch:
            break
        for row in batch:
            try:
                transport.send(build_email(row, sender))
            except Exception as exc:  # one bad message must not hold up the others
                if isinstance(exc, MailError):
                    error = exc.message_en
                else:
                    error = f"{exc.__class__.__name__}: {exc}"
                retry_at = _mark_failed(sessions, row, clock(), error)
                log.warning(
                    "mail %s (%s) not sent, attempt %d, next at %s: %s",
                    row.message_id, row.tag or "-", row.attempts + 1,
                    retry_at.isoformat(timespec="seconds"), error,
                    exc_info=not isinstance(exc, MailError),
                )
                failed.append(row.message_id)
            else:
                _mark_sent(sessions, row.id, clock())
                sent.append(row.message_id)
    return DeliveryReport(sent=tuple(sent), failed=tuple(failed))


class MailWorker(PeriodicWorker[DeliveryReport]):
    """A background thread that runs :func:`deliver_due` every ``interval`` seconds until
    :meth:`stop`, in batches of :data:`CLAIM_BATCH` so that stopping waits for one batch at
    most. Errors are logged and the next round goes on; nothing escapes the thread."""

    thread_name = "koin-mail"

    def __init__(
        self,
        sessions: sessionmaker[Session],
        transport: MailTransport,
        *,
        interval: float = 5.0,
        sender: str | None = None,
    ) -> None:
        """:raises ValueError: ``interval`` is not positive."""
        super().__init__(interval)
        self.sessions = sessions
        self.transport = transport
        self.sender = sender

    def run_once(self, limit: int = CLAIM_BATCH) -> DeliveryReport | None:
        """One round of at most ``limit`` messages; None if it failed (the error is logged)."""
        try:
            return deliver_due(self.sessions, self.transport, limit=limit, sender=self.sender)
        except Exception:
            log.exception("mail delivery round failed; trying again in %.0f s", self.interval)
            return None

    def more_due(self, result: DeliveryReport | None) -> bool:
        return result is not None and result.attempted == CLAIM_BATCH  # more may be due now


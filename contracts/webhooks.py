"""Outgoing webhooks: koin tells other systems (document management, RPA) when things finish.

An administrator registers an *endpoint* (an http(s) URL, the event types it wants, a
description); koin generates its signing secret (256 bits, shown once). A service announces an
event with :func:`enqueue_event` in its own transaction, which adds one *delivery* per active
endpoint subscribed to that type: a transactional outbox, so an event is delivered if and only
if the change that caused it commits. :func:`deliver_webhooks` (run by :class:`WebhookWorker` in
``koin serve``, or by ``koin webhooks deliver``) POSTs what is due.

Event types (:class:`WebhookEvent`, the one list): ``batch.finished``, ``contract.completed``,
``contract.declined``, ``contract.expired``. The body of every delivery is the JSON envelope
``{"id": event id, "type": …, "created_at": …, "data": {…}}``; ``data`` comes from
:func:`contract_event_data` or :func:`batch_finished_data`.

Each POST carries ``Content-Type: application/json``, ``X-Koin-Event`` (the type),
``X-Koin-Delivery`` (unique per delivery, the same on every retry, so receivers can
de-duplicate), ``X-Koin-Timestamp`` (unix seconds of this attempt) and ``X-Koin-Signature:
sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``; the key is the secret string as
shown, UTF-8. Receivers check it like :func:`verify_webhook_signature`.

Delivery guarantees (like :mod:`contracts.mail`):

* **Claiming.** A worker claims up to :data:`CLAIM_BATCH` due deliveries by setting
  ``lease_owner`` and moving ``next_attempt_at`` :data:`LEASE` ahead, and commits before
  sending (PostgreSQL: ``SELECT … FOR UPDATE SKIP LOCKED`` first; SQLite: one ``UPDATE … WHERE
  id IN (SELECT …)``; see :func:`contracts._db.claim_predicate`). No two workers hold the same
  delivery at once. The result is recorded only by the lease's owner.
* **At least once.** A delivery is marked delivered after a 2xx answer. A worker that dies
  between the answer and the mark (or outlives its lease) lets the delivery go out once more,
  with the same ``X-Koin-Delivery``.
* **Retries.** Anything but 2xx (another status, a timeout, a refused connection, an unknown
  host, a TLS error) is a failed attempt: counted, and tried again after
  :func:`contracts.mail.retry_delay` (30 s, 1 min, 2 min … then hourly). After
  :data:`MAX_ATTEMPTS` attempts (about three days) the delivery is ``failed``; an
  administrator may redeliver it (:func:`redeliver`). Redirects are never followed (a 3xx is a
  failure). Deliveries of a disabled endpoint wait until it is enabled again.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import http.client
import json
import logging
import re
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, Text, func, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship, sessionmaker

from ._db import Base, aware_utc, claim_predicate, rowcount, session_scope, utcnow
from ._periodic import PeriodicWorker
from .accounts import User
from .errors import (
    InvalidWebhookData,
    InvalidWebhookState,
    WebhookNotFound,
    WebhookSignatureInvalid,
)
from .mail import retry_delay

__all__ = [
    "CLAIM_BATCH",
    "DEFAULT_TIMEOUT",
    "EVENT_TYPES",
    "LEASE",
    "MAX_ATTEMPTS",
    "SIGNATURE_TOLERANCE",
    "DeliveryState",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookEvent",
    "WebhookReport",
    "WebhookWorker",
    "batch_finished_data",
    "contract_event_data",
    "create_endpoint",
    "deliver_webhooks",
    "delivery_counts",
    "enqueue_event",
    "list_deliveries",
    "list_endpoints",
    "redeliver",
    "require_delivery",
    "require_endpoint",
    "set_endpoint_active",
    "sign_payload",
    "verify_webhook_signature",
]

log = logging.getLogger(__name__)


class WebhookEvent(enum.StrEnum):
    """Every event type koin announces (the one list of them)."""

    #: A signing batch has no document left to sign: ``data`` from :func:`batch_finished_data`.
    BATCH_FINISHED = "batch.finished"
    #: A contract was signed by the witness: ``data`` from :func:`contract_event_data`.
    CONTRACT_COMPLETED = "contract.completed"
    #: A party declined a contract.
    CONTRACT_DECLINED = "contract.declined"
    #: A contract passed its deadline unanswered.
    CONTRACT_EXPIRED = "contract.expired"


#: The event type names, in the order shown on pages.
EVENT_TYPES: tuple[str, ...] = tuple(event.value for event in WebhookEvent)


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


#: How long a claimed delivery is reserved for the worker that claimed it.
LEASE = dt.timedelta(minutes=5)
#: Deliveries claimed per round trip; with :data:`DEFAULT_TIMEOUT` each, well within the lease.
CLAIM_BATCH = 10
#: Seconds one network operation of a POST may take (connect, send, each read of the answer).
DEFAULT_TIMEOUT = 10.0
#: Attempts before a delivery is given up as failed: with retry_delay's 30 s … 1 h back-off,
#: 80 attempts span a little over three days.
MAX_ATTEMPTS = 80
#: What receivers should accept between X-Koin-Timestamp and their clock (seconds).
SIGNATURE_TOLERANCE = 300
#: Bytes of a receiver's answer read (and at most 200 characters of it kept) for last_error.
_ANSWER_PEEK = 1024

MAX_URL = 2000
MAX_DESCRIPTION = 200
MAX_ERROR = 300
MAX_PAYLOAD = 64 * 1024
_SECRET_PREFIX = "whsec_"
_SECRET_BYTES = 32  # 256 bits
_SIGNATURE = re.compile(r"^sha256=([0-9a-f]{64})$")
_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")
_USER_AGENT = "koin-webhooks/1"


def _one_of(column: str, values: Iterable[str]) -> str:
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


class WebhookEndpoint(Base):
    """A URL that wants to hear about some event types, with its signing secret."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(primary_key=True)
    #: ``http://`` or ``https://``, without user name or password.
    url: Mapped[str] = mapped_column(String(MAX_URL))
    description: Mapped[str] = mapped_column(String(MAX_DESCRIPTION), default="")
    #: Space-separated, sorted :class:`WebhookEvent` values.
    events: Mapped[str] = mapped_column(String(255))
    #: The HMAC key, ``whsec_`` and 43 URL-safe characters (256 random bits). koin needs it to
    #: sign, so it is stored as it is; it is shown to people once, when created.
    secret: Mapped[str] = mapped_column(String(64))
    active: Mapped[bool] = mapped_column(default=True)
    #: The administrator who added it; None when added with ``koin webhooks add``.
    created_by: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    creator: Mapped[User | None] = relationship(lazy="selectin")

    @property
    def event_list(self) -> list[str]:
        return self.events.split()

    def subscribes(self, event_type: str) -> bool:
        return event_type in self.events.split()

    def __repr__(self) -> str:  # never the secret
        state = "active" if self.active else "disabled"
        return f"WebhookEndpoint(id={self.id!r}, url={self.url!r}, events={self.events!r}, {state})"


class WebhookDelivery(Base):
    """One event for one endpoint, from the moment it is queued until (and after) it is
    delivered or given up."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(_one_of("state", DeliveryState), name="state"),
        CheckConstraint("attempts >= 0", name="attempts"),
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    #: ``X-Koin-Delivery``: a UUID, the same on every attempt.
    delivery_id: Mapped[str] = mapped_column(String(36), unique=True)
    #: The envelope's ``id``: the same for every endpoint that hears of the event.
    event_id: Mapped[str] = mapped_column(String(36), index=True)
    event_type: Mapped[str] = mapped_column(String(40))
    endpoint_id: Mapped[int] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), index=True
    )
    #: The exact body sent (UTF-8 JSON), the same on every attempt.
    payload: Mapped[str] = mapped_column(Text)
    #: A :class:`DeliveryState` value.
    state: Mapped[str] = mapped_column(String(12))
    #: Attempts made so far (the successful one included).
    attempts: Mapped[int] = mapped_column(default=0)
    #: When the delivery is next due (later while claimed); None once delivered or failed.
    next_attempt_at: Mapped[dt.datetime | None]
    #: The worker holding the claim, if any.
    lease_owner: Mapped[str | None] = mapped_column(String(32))
    #: HTTP status of the last answer; None if there was none (timeout, refused …).
    last_status: Mapped[int | None]
    #: Why the last attempt failed, short (never the secret or the URL).
    last_error: Mapped[str | None] = mapped_column(String(MAX_ERROR))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_attempt_at: Mapped[dt.datetime | None]
    delivered_at: Mapped[dt.datetime | None]

    endpoint: Mapped[WebhookEndpoint] = relationship(lazy="selectin")

    @property
    def delivery_state(self) -> DeliveryState:
        return DeliveryState(self.state)

    def __repr__(self) -> str:
        return (
            f"WebhookDelivery(delivery_id={self.delivery_id!r}, event_type={self.event_type!r}, "
            f"state={self.state!r}, attempts={self.attempts!r})"
        )


@dataclass(frozen=True)
class WebhookReport:
    """What one :func:`deliver_webhooks` run did, as delivery IDs."""

    #: Answered with 2xx and marked delivered.
    delivered: tuple[str, ...] = ()
    #: Failed this time; each waits for its back-off and is tried again.
    retrying: tuple[str, ...] = ()
    #: Failed for the last allowed time: now ``failed``.
    failed: tuple[str, ...] = ()

    @property
    def attempted(self) -> int:
        return len(self.delivered) + len(self.retrying) + len(self.failed)


# -- endpoints ----------------------------------------------------------------------------------


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _checked_url(url: str) -> str:
    """:raises InvalidWebhookData: not an absolute http(s) URL koin can POST to."""
    text = (url or "").strip()

    def refuse(message: str, message_en: str) -> InvalidWebhookData:
        return InvalidWebhookData("url", message, message_en)

    if not text:
        raise refuse("URL を入力してください。", "Enter the URL.")
    if len(text) > MAX_URL:
        raise refuse(f"URL は {MAX_URL} 文字以内にしてください。",
                     f"The URL must be at most {MAX_URL} characters.")
    if not text.isascii() or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise refuse(
            "URL に空白や ASCII 以外の文字は使えません(日本語のドメイン名は xn-- 形式で)。",
            "The URL must not contain spaces or non-ASCII characters (write an "
            "internationalised domain name in its xn-- form).",
        )
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https"):
        raise refuse("URL は http:// か https:// で始めてください。",
                     "The URL must start with http:// or https://.")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or port == 0:
        raise refuse("URL のホスト名かポート番号が正しくありません。",
                     "The URL's host name or port is not valid.")
    if "@" in parts.netloc:
        raise refuse("URL にユーザー名やパスワードは含めないでください(署名で認証します)。",
                     "The URL must not contain a user name or password (deliveries are "
                     "authenticated by their signature).")
    if parts.fragment or text.endswith("#"):
        raise refuse("URL に # 以降(フラグメント)は含めないでください。",
                     "The URL must not contain a fragment (#…).")
    return text


def _checked_events(events: Iterable[WebhookEvent | str]) -> str:
    """:raises InvalidWebhookData: none, or one that is not an event type."""
    chosen: set[str] = set()
    for event in events:
        name = str(event).strip()
        if name not in EVENT_TYPES:
            allowed = ", ".join(EVENT_TYPES)
            raise InvalidWebhookData(
                "events",
                f"イベント {name!r} はありません({allowed} のいずれか)。",
                f"There is no event type {name!r} (one of {allowed}).",
            )
        chosen.add(name)
    if not chosen:
        raise InvalidWebhookData(
            "events", "イベントを一つ以上選んでください。", "Choose at least one event type."
        )
    return " ".join(sorted(chosen))


def _checked_description(description: str) -> str:
    text = " ".join((description or "").split())
    if len(text) > MAX_DESCRIPTION:
        raise InvalidWebhookData(
            "description",
            f"説明は {MAX_DESCRIPTION} 文字以内にしてください。",
            f"The description must be at most {MAX_DESCRIPTION} characters.",
        )
    return text


def _new_secret() -> str:
    return _SECRET_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)


def create_endpoint(
    session: Session,
    url: str,
    *,
    events: Iterable[WebhookEvent | str],
    description: str = "",
    created_by: int | None = None,
    now: dt.datetime | None = None,
) -> tuple[WebhookEndpoint, str]:
    """Register an endpoint (active) and generate its signing secret; returns both. Show the
    secret to the person once; pages and lists never show it again.

    :raises InvalidWebhookData: the URL is not http(s) (or has a password, a fragment, spaces),
        no or unknown event types, a description over 200 characters, or an unknown user.
    """
    moment = aware_utc(now)
    checked_url = _checked_url(url)
    checked_events = _checked_events(events)
    checked_description = _checked_description(description)
    if created_by is not None and session.get(User, created_by) is None:
        raise InvalidWebhookData(
            "created_by", "登録者のアカウントが見つかりません。", f"There is no user {created_by}."
        )
    secret = _new_secret()
    endpoint = WebhookEndpoint(
        url=checked_url, description=checked_description, events=checked_events,
        secret=secret, active=True, created_by=created_by, created_at=moment, updated_at=moment,
    )
    session.add(endpoint)
    session.flush()
    return endpoint, secret


def list_endpoints(session: Session) -> list[WebhookEndpoint]:
    """Every endpoint, active and disabled, oldest first."""
    return list(session.scalars(select(WebhookEndpoint).order_by(WebhookEndpoint.id)))


def require_endpoint(session: Session, endpoint_id: int) -> WebhookEndpoint:
    """:raises WebhookNotFound: there is no such endpoint."""
    endpoint = session.get(WebhookEndpoint, endpoint_id) if endpoint_id > 0 else None
    if endpoint is None:
        raise WebhookNotFound("endpoint", str(endpoint_id))
    return endpoint


def set_endpoint_active(
    session: Session, endpoint_id: int, active: bool, *, now: dt.datetime | None = None
) -> WebhookEndpoint:
    """Disable an endpoint (no new deliveries; its pending ones wait) or enable it again
    (pending ones go out). Idempotent.

    :raises WebhookNotFound: there is no such endpoint.
    """
    endpoint = require_endpoint(session, endpoint_id)
    if endpoint.active != active:
        endpoint.active = active
        endpoint.updated_at = aware_utc(now)
        session.flush()
    return endpoint


# -- events ---------------------------------------------------------------------------------------


def contract_event_data(
    *, contract_id: str, title: str, status: str, time: dt.datetime, public_url: str
) -> dict[str, Any]:
    """``data`` of the ``contract.*`` events::

        {"contract_id": public id, "title": …, "status": "completed" | "declined" | "expired",
         "time": ISO 8601 UTC of the change,
         "final_pdf_url": "{public}/api/v1/contracts/{id}/final.pdf" (completed; else null),
         "audit_url": "{public}/api/v1/contracts/{id}/audit"}
    """
    base = public_url.strip().rstrip("/")
    api = f"{base}/api/v1/contracts/{contract_id}"
    return {
        "contract_id": contract_id,
        "title": title,
        "status": status,
        "time": _iso(time),
        "final_pdf_url": f"{api}/final.pdf" if status == "completed" else None,
        "audit_url": f"{api}/audit",
    }


def batch_finished_data(
    *, batch_id: str, done: int, failed: int, finished_at: dt.datetime, public_url: str
) -> dict[str, Any]:
    """``data`` of ``batch.finished``::

        {"batch_id": public id, "done": signed documents, "failed": failed documents,
         "finished_at": ISO 8601 UTC, "archive_url": "{public}/api/v1/batches/{id}/archive"}
    """
    base = public_url.strip().rstrip("/")
    return {
        "batch_id": batch_id,
        "done": done,
        "failed": failed,
        "finished_at": _iso(finished_at),
        "archive_url": f"{base}/api/v1/batches/{batch_id}/archive",
    }


def enqueue_event(
    session: Session,
    event_type: WebhookEvent | str,
    data: Mapping[str, Any],
    *,
    now: dt.datetime | None = None,
) -> list[WebhookDelivery]:
    """Announce an event in the session's transaction (the caller commits): one delivery per
    active endpoint subscribed to ``event_type``, delivered if and only if that transaction
    commits. Returns them (none if nobody listens).

    :param data: the event's ``data`` (a JSON object; see :func:`contract_event_data`,
        :func:`batch_finished_data`).
    :param now: when the event happened (tests); the deliveries are due from then.
    :raises ValueError: ``event_type`` is not one of :data:`EVENT_TYPES`, or ``data`` is not a
        JSON object of at most 64 KiB.
    """
    name = str(event_type)
    if name not in EVENT_TYPES:
        raise ValueError(f"not a webhook event type: {name!r} (one of {', '.join(EVENT_TYPES)})")
    if not isinstance(data, Mapping):
        raise ValueError("webhook event data must be a mapping (a JSON object)")
    moment = aware_utc(now)
    event_id = str(uuid.uuid4())
    envelope = {"id": event_id, "type": name, "created_at": _iso(moment), "data": dict(data)}
    try:
        body = json.dumps(envelope, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"webhook event data is not JSON: {exc}") from None
    if len(body.encode("utf-8")) > MAX_PAYLOAD:
        raise ValueError(f"webhook event data is larger than {MAX_PAYLOAD} bytes")
    endpoints = session.scalars(
        select(WebhookEndpoint).where(WebhookEndpoint.active.is_(True)).order_by(WebhookEndpoint.id)
    ).all()
    deliveries = [
        WebhookDelivery(
            delivery_id=str(uuid.uuid4()), event_id=event_id, event_type=name,
            endpoint_id=endpoint.id, payload=body, state=DeliveryState.PENDING.value,
            attempts=0, next_attempt_at=moment, created_at=moment,
        )
        for endpoint in endpoints
        if endpoint.subscribes(name)
    ]
    session.add_all(deliveries)
    session.flush()
    return deliveries


# -- signatures -----------------------------------------------------------------------------------


def sign_payload(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Koin-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of
    ``"<timestamp>.<body>"`` keyed with the secret (UTF-8)."""
    message = timestamp.encode("ascii") + b"." + body
    return "sha256=" + hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def verify_webhook_signature(
    secret: str,
    timestamp: str | None,
    body: bytes,
    header: str | None,
    tolerance: float = SIGNATURE_TOLERANCE,
    *,
    now: float | None = None,
) -> None:
    """Check a delivery as a receiver should: the ``X-Koin-Signature`` ``header`` must be the
    HMAC of ``X-Koin-Timestamp`` and the raw ``body`` under ``secret`` (compared in constant
    time), and the timestamp at most ``tolerance`` seconds away from ``now`` (default: the
    clock), so a captured request cannot be replayed later.

    :raises WebhookSignatureInvalid: missing or malformed headers, a timestamp too old or too
        far ahead, or a signature that does not match (``reason`` says which).
    """
    if not timestamp or not _TIMESTAMP.match(timestamp):
        raise WebhookSignatureInvalid("timestamp")
    if not header or not _SIGNATURE.match(header.strip().lower()):
        raise WebhookSignatureInvalid("format")
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance:
        raise WebhookSignatureInvalid("stale")
    expected = sign_payload(secret, timestamp, body)
    if not hmac.compare_digest(expected.encode("ascii"), header.strip().lower().encode("ascii")):
        raise WebhookSignatureInvalid("mismatch")


# -- delivery -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    row_id: int
    delivery_id: str
    event_type: str
    payload: str
    attempts: int
    url: str
    secret: str


class _AttemptFailed(Exception):
    def __init__(self, error: str, status: int | None = None) -> None:
        super().__init__(error)
        self.error = error[:MAX_ERROR]
        self.status = status


def _claim(
    sessions: sessionmaker[Session], owner: str, now: dt.datetime, count: int
) -> list[_Job]:
    """Lease up to ``count`` due deliveries of active endpoints, oldest first."""
    active = select(WebhookEndpoint.id).where(WebhookEndpoint.active.is_(True))
    due = (
        WebhookDelivery.state == DeliveryState.PENDING.value,
        WebhookDelivery.next_attempt_at <= now,
        WebhookDelivery.endpoint_id.in_(active),
    )
    oldest_due = (
        select(WebhookDelivery.id)
        .where(*due)
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(count)
    )
    with session_scope(sessions) as session:
        chosen = claim_predicate(session, WebhookDelivery.id, oldest_due)
        if chosen is None:
            return []
        claimed = session.execute(
            update(WebhookDelivery)
            .where(chosen, *due)
            .values(next_attempt_at=now + LEASE, lease_owner=owner)
            .returning(
                WebhookDelivery.id, WebhookDelivery.delivery_id, WebhookDelivery.event_type,
                WebhookDelivery.payload, WebhookDelivery.attempts, WebhookDelivery.endpoint_id,
            ),
            execution_options={"synchronize_session": False},
        ).all()
        if not claimed:
            return []
        targets = {
            row.id: (row.url, row.secret)
            for row in session.execute(
                select(WebhookEndpoint.id, WebhookEndpoint.url, WebhookEndpoint.secret).where(
                    WebhookEndpoint.id.in_({row.endpoint_id for row in claimed})
                )
            )
        }
    return sorted(
        (
            _Job(row.id, row.delivery_id, row.event_type, row.payload, row.attempts,
                 *targets[row.endpoint_id])
            for row in claimed
        ),
        key=lambda job: job.row_id,
    )


def _printable(text: str, limit: int = 200) -> str:
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(cleaned.split())[:limit]


def _post(job: _Job, timeout: float) -> int:
    """POST the delivery once, signed now; the status if it is 2xx.

    :raises _AttemptFailed: anything else, with a short reason.
    """
    parts = urlsplit(job.url)
    body = job.payload.encode("utf-8")
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": _USER_AGENT,
        "X-Koin-Event": job.event_type,
        "X-Koin-Delivery": job.delivery_id,
        "X-Koin-Timestamp": timestamp,
        "X-Koin-Signature": sign_payload(job.secret, timestamp, body),
    }
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname or ""
    connection: http.client.HTTPConnection
    if parts.scheme.lower() == "https":
        connection = http.client.HTTPSConnection(
            host, parts.port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        connection = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    try:
        connection.request("POST", target, body=body, headers=headers)
        answer = connection.getresponse()
        status = answer.status
        peek = answer.read(_ANSWER_PEEK) if not 200 <= status < 300 else b""
    except socket.gaierror as exc:
        raise _AttemptFailed(f"host name not resolved ({exc.strerror or exc})") from None
    except TimeoutError:
        raise _AttemptFailed(f"timed out after {timeout:g} s") from None
    except ConnectionRefusedError:
        raise _AttemptFailed("connection refused") from None
    except ssl.SSLError as exc:
        raise _AttemptFailed(f"TLS: {exc.reason or exc.__class__.__name__}") from None
    except (OSError, http.client.HTTPException) as exc:
        detail = getattr(exc, "strerror", None) or str(exc)
        reason = f"{exc.__class__.__name__}: {detail}" if detail else exc.__class__.__name__
        raise _AttemptFailed(_printable(reason)) from None
    finally:
        connection.close()
    if 200 <= status < 300:
        return status
    text = _printable(peek.decode("utf-8", "replace"))
    location = " (redirects are not followed)" if 300 <= status < 400 else ""
    raise _AttemptFailed(f"HTTP {status}{location}" + (f": {text}" if text else ""), status)


def _finish(
    sessions: sessionmaker[Session], job: _Job, owner: str, now: dt.datetime, **values: Any
) -> bool:
    """Record an attempt's outcome if the claim is still ours."""
    with session_scope(sessions) as session:
        result = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == job.row_id,
                WebhookDelivery.state == DeliveryState.PENDING.value,
                WebhookDelivery.lease_owner == owner,
            )
            .values(attempts=WebhookDelivery.attempts + 1, last_attempt_at=now,
                    lease_owner=None, **values)
            .execution_options(synchronize_session=False)
        )
        return rowcount(result) == 1


def deliver_webhooks(
    sessions: sessionmaker[Session],
    *,
    now: dt.datetime | None = None,
    limit: int = 100,
    timeout: float = DEFAULT_TIMEOUT,
) -> WebhookReport:
    """POST the deliveries that are due, oldest first, at most ``limit`` of them; safe to run
    in several threads or processes at once (see the module docstring).

    :param now: the time to act at (tests): which deliveries are due and when a retry is due.
        The signature's ``X-Koin-Timestamp`` is always the real clock, which receivers check.
    :param timeout: seconds each network operation of a POST may take.
    :raises ValueError: ``limit`` is below 1 or ``timeout`` not positive.
    :raises sqlalchemy.exc.SQLAlchemyError: the database failed; deliveries already claimed
        wait for their lease to end.
    """
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")

    def clock() -> dt.datetime:
        return aware_utc(now)

    delivered: list[str] = []
    retrying: list[str] = []
    failed: list[str] = []
    while (done := len(delivered) + len(retrying) + len(failed)) < limit:
        owner = secrets.token_hex(16)
        batch = _claim(sessions, owner, clock(), min(CLAIM_BATCH, limit - done))
        if not batch:
            break
        for job in batch:
            try:
                status = _post(job, timeout)
            except _AttemptFailed as exc:
                attempts = job.attempts + 1
                moment = clock()
                give_up = attempts >= MAX_ATTEMPTS
                retry_at = None if give_up else moment + retry_delay(attempts)
                recorded = _finish(
                    sessions, job, owner, moment, last_status=exc.status, last_error=exc.error,
                    next_attempt_at=retry_at,
                    state=(DeliveryState.FAILED if give_up else DeliveryState.PENDING).value,
                )
                log.warning(
                    "webhook %s (%s) to endpoint %s failed, attempt %d, %s: %s",
                    job.delivery_id, job.event_type, urlsplit(job.url).hostname, attempts,
                    "given up" if give_up else f"next at {retry_at:%Y-%m-%dT%H:%M:%SZ}",
                    exc.error,
                )
                if recorded:
                    (failed if give_up else retrying).append(job.delivery_id)
            except Exception:  # a bug must not hold up the others; the lease runs out
                log.exception("webhook %s: unexpected error", job.delivery_id)
            else:
                moment = clock()
                if _finish(
                    sessions, job, owner, moment, state=DeliveryState.DELIVERED.value,
                    delivered_at=moment, last_status=status, last_error=None,
                    next_attempt_at=None,
                ):
                    delivered.append(job.delivery_id)
                else:
                    log.warning("webhook %s: delivered, but the claim had run out",
                                job.delivery_id)
    return WebhookReport(tuple(delivered), tuple(retrying), tuple(failed))


# -- what administrators see and do ---------------------------------------------------------------


def list_deliveries(
    session: Session,
    *,
    endpoint_id: int | None = None,
    state: DeliveryState | str | None = None,
    limit: int = 100,
) -> list[WebhookDelivery]:
    """The most recent deliveries first, optionally of one endpoint and in one state.

    :raises ValueError: ``state`` is not a :class:`DeliveryState`.
    """
    query = select(WebhookDelivery).order_by(WebhookDelivery.id.desc()).limit(limit)
    if endpoint_id is not None:
        query = query.where(WebhookDelivery.endpoint_id == endpoint_id)
    if state is not None:
        query = query.where(WebhookDelivery.state == DeliveryState(state).value)
    return list(session.scalars(query))


def delivery_counts(session: Session) -> dict[int, dict[str, int]]:
    """Per endpoint ID, how many of its deliveries are in each state."""
    counts: dict[int, dict[str, int]] = {}
    rows = session.execute(
        select(WebhookDelivery.endpoint_id, WebhookDelivery.state, func.count()).group_by(
            WebhookDelivery.endpoint_id, WebhookDelivery.state
        )
    )
    for endpoint_id, state, count in rows:
        counts.setdefault(endpoint_id, {})[state] = int(count)
    return counts


def require_delivery(session: Session, delivery_pk: int) -> WebhookDelivery:
    """:raises WebhookNotFound: there is no such delivery."""
    delivery = session.get(WebhookDelivery, delivery_pk) if delivery_pk > 0 else None
    if delivery is None:
        raise WebhookNotFound("delivery", str(delivery_pk))
    return delivery


def redeliver(
    session: Session, delivery_pk: int, *, now: dt.datetime | None = None
) -> WebhookDelivery:
    """Put a failed delivery back in the queue, due now, with its attempts counted afresh and
    the same ``X-Koin-Delivery`` (the receiver never accepted it).

    :raises WebhookNotFound: there is no such delivery.
    :raises InvalidWebhookState: it is not failed (pending ones are retried anyway; delivered
        ones were accepted).
    """
    delivery = require_delivery(session, delivery_pk)
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id,
               WebhookDelivery.state == DeliveryState.FAILED.value)
        .values(state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=aware_utc(now),
                lease_owner=None)
        .execution_options(synchronize_session=False)
    )
    session.refresh(delivery)
    if rowcount(result) != 1:
        raise InvalidWebhookState(delivery.delivery_id, delivery.state)
    return delivery


class WebhookWorker(PeriodicWorker[WebhookReport]):
    """A background thread that runs :func:`deliver_webhooks` every ``interval`` seconds until
    :meth:`stop`, in batches of :data:`CLAIM_BATCH` so that stopping waits for one batch at
    most. Errors are logged and the next round goes on; nothing escapes the thread."""

    thread_name = "koin-webhooks"

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        interval: float = 5.0,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """:raises ValueError: ``interval`` is not positive."""
        super().__init__(interval)
        self.sessions = sessions
        self.timeout = timeout

    def run_once(self, limit: int = CLAIM_BATCH) -> WebhookReport | None:
        """One round of at most ``limit`` deliveries; None if it failed (the error is
        logged)."""
        try:
            return deliver_webhooks(self.sessions, limit=limit, timeout=self.timeout)
        except Exception:
            log.exception("webhook delivery round failed; trying again in %.0f s", self.interval)
            return None

    def more_due(self, result: WebhookReport | None) -> bool:
        return result is not None and result.attempted == CLAIM_BATCH


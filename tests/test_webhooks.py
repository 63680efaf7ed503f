"""Outgoing webhooks on SQLite and PostgreSQL, delivered to a real HTTP receiver on loopback that
checks every signature with :func:`contracts.verify_webhook_signature`: events from the real
contract workflow, the outbox's transaction, retries with back-off, a receiver that is down, a
redirect, a timeout, concurrent workers, giving up and redelivering; the administrator's pages
and ``koin webhooks``."""

from __future__ import annotations

import base64
import datetime as dt
import html
import http
import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from contracts import (
    EVENT_TYPES,
    ContractStatus,
    DeliveryState,
    InvalidWebhookData,
    InvalidWebhookState,
    UserRole,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookNotFound,
    WebhookSignatureInvalid,
    WebhookWorker,
    batch_finished_data,
    complete_contract,
    contract_event_data,
    create_endpoint,
    create_user,
    decline,
    deliver_webhooks,
    enqueue_event,
    list_deliveries,
    redeliver,
    run_due,
    session_scope,
    set_endpoint_active,
    utcnow,
    verify_webhook_signature,
)
from contracts.mail import retry_delay
from contracts.webhooks import MAX_ATTEMPTS, sign_payload
from signer import Installation
from tests.cli_language import assert_english, assert_japanese
from tests.conftest import PUBLIC_URL
from tests.servers import free_port, koin_process, wsgi_server
from tests.test_workflow import TARO, _all_consent, _contract, _create, _identify
from web import create_app, services
from web.cli import cli

PASSWORD = "correct horse battery staple"
ADMIN = "admin@pref.ibaraki.example"
OFFICER = "keiyaku@pref.ibaraki.example"
SECRET_KEY = "test-secret-key-0123456789abcdef-not-for-production"
OTHER_URL = "https://koin.pref.ibaraki.example"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_SECRET = re.compile(r'class="webhook-secret"[^>]*>(whsec_[A-Za-z0-9_-]{43})<')


# -- a real receiver ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    path: str
    content_type: str
    event: str
    delivery: str
    timestamp: str
    signature: str
    body: bytes
    #: The signature checked out (verify_webhook_signature with the receiver's secret).
    verified: bool
    status: int

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """A webhook receiver as an integrator would write it: verifies the signature (401 if it
    does not check out) and records every request. ``answers`` are the statuses of the next
    requests (then 200); ``delay`` seconds of sleep before answering."""

    def __init__(self, answers: Iterable[int] = (), delay: float = 0.0) -> None:
        self.secret = ""
        self.answers = list(answers)
        self.delay = delay
        self.received: list[Received] = []
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        timestamp = environ.get("HTTP_X_KOIN_TIMESTAMP", "")
        signature = environ.get("HTTP_X_KOIN_SIGNATURE", "")
        try:
            verify_webhook_signature(self.secret, timestamp, body, signature, tolerance=300)
            verified = True
        except WebhookSignatureInvalid:
            verified = False
        with self._lock:
            status = self.answers.pop(0) if self.answers else (200 if verified else 401)
            self.received.append(Received(
                path=environ["PATH_INFO"], content_type=environ.get("CONTENT_TYPE", ""),
                event=environ.get("HTTP_X_KOIN_EVENT", ""),
                delivery=environ.get("HTTP_X_KOIN_DELIVERY", ""), timestamp=timestamp,
                signature=signature, body=body, verified=verified, status=status,
            ))
        if self.delay:
            time.sleep(self.delay)
        headers = [("Content-Type", "text/plain; charset=utf-8")]
        if 300 <= status < 400:
            headers.append(("Location", "/elsewhere"))
        start_response(f"{status} {http.HTTPStatus(status).phrase}", headers)
        return [f"answer {status}".encode()]

    def by_delivery(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.received:
            counts[item.delivery] = counts.get(item.delivery, 0) + 1
        return counts


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    app = Receiver()
    with wsgi_server(app) as base:
        yield app, f"{base}hooks/koin?source=test"


def _endpoint(
    sessions: sessionmaker[Session], url: str, events: Iterable[str] = EVENT_TYPES, **options: Any
) -> tuple[int, str]:
    with session_scope(sessions) as db:
        endpoint, secret = create_endpoint(db, url, events=events, **options)
        return endpoint.id, secret


def _listening(
    sessions: sessionmaker[Session],
    receiver: tuple[Receiver, str],
    events: Iterable[str] = EVENT_TYPES,
) -> tuple[Receiver, int]:
    app, url = receiver
    endpoint_id, app.secret = _endpoint(sessions, url, events)
    return app, endpoint_id


def _deliveries(sessions: sessionmaker[Session]) -> list[WebhookDelivery]:
    with sessions() as db:
        return list(db.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def _delivery(sessions: sessionmaker[Session], delivery_id: str) -> WebhookDelivery:
    with sessions() as db:
        row = db.scalar(select(WebhookDelivery).where(WebhookDelivery.delivery_id == delivery_id))
        assert row is not None
        return row


def _event(sessions: sessionmaker[Session], now: dt.datetime | None = None) -> WebhookDelivery:
    """One ``batch.finished`` event, with one delivery (one endpoint listening)."""
    with session_scope(sessions) as db:
        data = batch_finished_data(batch_id="B1", done=3, failed=1,
                                   finished_at=now or utcnow(), public_url=PUBLIC_URL)
        [delivery] = enqueue_event(db, "batch.finished", data, now=now)
        db.expunge(delivery)
        return delivery


@pytest.fixture
def officer(sessions: sessionmaker[Session]) -> int:
    with session_scope(sessions) as session:
        user, _ = create_user(
            session, "keiyaku@pref.ibaraki.example", [UserRole.OFFICER],
            display_name="契約 担当", password=PASSWORD,
        )
        return user.id


# -- events from the contract workflow ----------------------------------------------------------


def test_declined_and_expired_contracts_deliver_one_signed_event_each(
    sessions: sessionmaker[Session],
    installation: Installation,
    permit_pdf: bytes,
    officer: int,
    receiver: tuple[Receiver, str],
) -> None:
    app, endpoint_id = _listening(
        sessions, receiver, ["contract.declined", "contract.expired", "contract.completed"]
    )
    # Nobody else hears of them: an endpoint for batches only, a disabled one for everything.
    batches_only = Receiver()
    with wsgi_server(batches_only) as other:
        _endpoint(sessions, other, ["batch.finished"])
        disabled, _ = _endpoint(sessions, other)
        with session_scope(sessions) as db:
            set_endpoint_active(db, disabled, False)

        declined_id = _create(sessions, installation, officer, permit_pdf)
        taro = _identify(sessions, TARO.email)
        before = utcnow()
        with session_scope(sessions) as db:
            decline(db, taro.party_id, "工期が短すぎるため", ip=None, user_agent=None,
                    public_url=OTHER_URL + "/")
        start = utcnow() - dt.timedelta(days=10)
        expired_id = _create(sessions, installation, officer, permit_pdf, now=start,
                             expires_in=dt.timedelta(days=7))
        expired_at = start + dt.timedelta(days=7, seconds=1)
        report = run_due(sessions, installation, public_url=PUBLIC_URL, now=expired_at)
        assert report.expired == [_contract(sessions, expired_id).public_id]

        rows = _deliveries(sessions)
        assert [(r.event_type, r.endpoint_id, r.state) for r in rows] == [
            ("contract.declined", endpoint_id, "pending"),
            ("contract.expired", endpoint_id, "pending"),
        ]
        delivered = deliver_webhooks(sessions)
        assert sorted(delivered.delivered) == sorted(r.delivery_id for r in rows)
        assert delivered.retrying == delivered.failed == ()
        assert deliver_webhooks(sessions).attempted == 0  # nothing more is due
    assert batches_only.received == []

    assert len(app.received) == 2 and all(item.verified for item in app.received)
    by_type = {item.event: item for item in app.received}
    declined, expired = by_type["contract.declined"], by_type["contract.expired"]
    assert {item.path for item in app.received} == {"/hooks/koin"}
    assert all(item.content_type == "application/json" for item in app.received)

    contract = _contract(sessions, declined_id)
    body = declined.json
    assert set(body) == {"id", "type", "created_at", "data"} and body["type"] == "contract.declined"
    api = f"{OTHER_URL}/api/v1/contracts/{contract.public_id}"
    assert body["data"] == {
        "contract_id": contract.public_id, "title": contract.title, "status": "declined",
        "time": body["data"]["time"], "final_pdf_url": None, "audit_url": f"{api}/audit",
    }
    when = dt.datetime.fromisoformat(body["data"]["time"])
    assert before - dt.timedelta(seconds=1) <= when <= utcnow()
    row = _delivery(sessions, declined.delivery)
    assert row.event_id == body["id"] and row.payload.encode() == declined.body
    assert (row.state, row.attempts, row.last_status, row.last_error) == ("delivered", 1, 200, None)
    assert row.delivered_at is not None and row.next_attempt_at is None

    contract = _contract(sessions, expired_id)
    assert contract.status == ContractStatus.EXPIRED
    data = expired.json["data"]
    assert data["status"] == "expired" and data["contract_id"] == contract.public_id
    # run_due's time; the URLs under run_due's public URL
    assert data["time"] == expired_at.isoformat(timespec="seconds").replace("+00:00", "Z")
    assert data["audit_url"] == f"{PUBLIC_URL}/api/v1/contracts/{contract.public_id}/audit"


def test_a_declined_contract_without_a_public_url_uses_the_one_it_was_sent_under(
    sessions: sessionmaker[Session],
    installation: Installation,
    permit_pdf: bytes,
    officer: int,
    receiver: tuple[Receiver, str],
) -> None:
    app, _ = _listening(sessions, receiver)
    contract_id = _create(sessions, installation, officer, permit_pdf)
    taro = _identify(sessions, TARO.email)
    with session_scope(sessions) as db:
        decline(db, taro.party_id, "", ip=None, user_agent=None)
    deliver_webhooks(sessions)
    [item] = app.received
    public_id = _contract(sessions, contract_id).public_id
    assert item.json["data"]["audit_url"] == f"{PUBLIC_URL}/api/v1/contracts/{public_id}/audit"


def test_a_completed_contract_announces_its_final_pdf(
    sessions: sessionmaker[Session],
    installation: Installation,
    permit_pdf: bytes,
    officer: int,
    receiver: tuple[Receiver, str],
) -> None:
    app, _ = _listening(sessions, receiver, ["contract.completed"])
    contract_id = _create(sessions, installation, officer, permit_pdf)
    _all_consent(sessions, contract_id)
    assert _deliveries(sessions) == []  # completing is not completed
    complete_contract(sessions, contract_id, installation, public_url=PUBLIC_URL)
    complete_contract(sessions, contract_id, installation, public_url=PUBLIC_URL)  # no-op
    assert deliver_webhooks(sessions).attempted == 1
    [item] = app.received
    contract = _contract(sessions, contract_id)
    api = f"{PUBLIC_URL}/api/v1/contracts/{contract.public_id}"
    data = item.json["data"]
    assert item.verified and item.event == "contract.completed"
    assert (data["status"], data["final_pdf_url"], data["audit_url"]) == (
        "completed", f"{api}/final.pdf", f"{api}/audit",
    )
    assert contract.completed_at is not None
    assert data["time"] == contract.completed_at.isoformat(timespec="seconds").replace(
        "+00:00", "Z"
    )


def test_an_event_in_a_rolled_back_transaction_is_never_delivered(
    sessions: sessionmaker[Session],
    installation: Installation,
    permit_pdf: bytes,
    officer: int,
    receiver: tuple[Receiver, str],
) -> None:
    app, _ = _listening(sessions, receiver)
    contract_id = _create(sessions, installation, officer, permit_pdf)
    taro = _identify(sessions, TARO.email)
    with pytest.raises(RuntimeError), session_scope(sessions) as db:
        decline(db, taro.party_id, "", ip=None, user_agent=None)
        assert db.scalar(select(func.count()).select_from(WebhookDelivery)) == 1
        raise RuntimeError("the request failed after the decline")
    with pytest.raises(RuntimeError), session_scope(sessions) as db:
        enqueue_event(db, "batch.finished", {"batch_id": "B1"})
        raise RuntimeError("rolled back")
    assert _deliveries(sessions) == []
    assert _contract(sessions, contract_id).status == ContractStatus.SENT
    assert deliver_webhooks(sessions).attempted == 0 and app.received == []


def test_batch_finished_payload(
    sessions: sessionmaker[Session], receiver: tuple[Receiver, str]
) -> None:
    app, _ = _listening(sessions, receiver, ["batch.finished"])
    finished = dt.datetime(2026, 11, 30, 9, 15, 30, 123456, tzinfo=dt.UTC)
    with session_scope(sessions) as db:
        data = batch_finished_data(batch_id="Zq3xT0", done=118, failed=2, finished_at=finished,
                                   public_url=OTHER_URL)
        enqueue_event(db, "batch.finished", data)
        assert enqueue_event(db, "contract.declined", {"contract_id": "x"}) == []  # not subscribed
    deliver_webhooks(sessions)
    [item] = app.received
    assert item.event == "batch.finished" and item.json["data"] == {
        "batch_id": "Zq3xT0", "done": 118, "failed": 2, "finished_at": "2026-11-30T09:15:30Z",
        "archive_url": f"{OTHER_URL}/api/v1/batches/Zq3xT0/archive",
    }


def test_bad_events_are_refused(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as db:
        with pytest.raises(ValueError, match="not a webhook event type"):
            enqueue_event(db, "contract.signed", {})
        with pytest.raises(ValueError, match="not JSON"):
            enqueue_event(db, "batch.finished", {"when": dt.datetime.now(dt.UTC)})
        with pytest.raises(ValueError, match="not JSON"):
            enqueue_event(db, "batch.finished", {"ratio": float("nan")})
        with pytest.raises(ValueError, match="larger than"):
            enqueue_event(db, "batch.finished", {"blob": "x" * 70_000})
        with pytest.raises(ValueError, match="mapping"):
            enqueue_event(db, "batch.finished", [1, 2])  # type: ignore[arg-type]


# -- retries ------------------------------------------------------------------------------------


def test_a_500_is_retried_with_the_same_delivery_id_and_delivered_once(
    sessions: sessionmaker[Session], receiver: tuple[Receiver, str]
) -> None:
    app, _ = _listening(sessions, receiver)
    app.answers = [500]
    t0 = utcnow()
    queued = _event(sessions, t0)

    first = deliver_webhooks(sessions, now=t0)
    assert first.retrying == (queued.delivery_id,) and first.delivered == ()
    row = _delivery(sessions, queued.delivery_id)
    assert (row.state, row.attempts, row.last_status) == ("pending", 1, 500)
    assert row.last_error == "HTTP 500: answer 500"
    assert row.next_attempt_at == t0 + retry_delay(1) == t0 + dt.timedelta(seconds=30)
    assert row.lease_owner is None

    assert deliver_webhooks(sessions, now=t0 + dt.timedelta(seconds=29)).attempted == 0
    second = deliver_webhooks(sessions, now=t0 + dt.timedelta(seconds=30))
    assert second.delivered == (queued.delivery_id,)
    assert deliver_webhooks(sessions, now=t0 + dt.timedelta(hours=2)).attempted == 0

    assert [item.status for item in app.received] == [500, 200]
    assert {item.delivery for item in app.received} == {queued.delivery_id}
    assert app.received[0].body == app.received[1].body  # the same bytes each time
    assert all(item.verified for item in app.received)
    row = _delivery(sessions, queued.delivery_id)
    assert (row.state, row.attempts, row.last_status, row.last_error) == ("delivered", 2, 200, None)


def test_a_receiver_that_is_down_is_retried_with_back_off_until_it_comes_up(
    sessions: sessionmaker[Session],
) -> None:
    port = free_port()
    app = Receiver()
    endpoint_id, app.secret = _endpoint(sessions, f"http://127.0.0.1:{port}/hook")
    t0 = utcnow()
    queued = _event(sessions, t0)

    assert deliver_webhooks(sessions, now=t0).retrying == (queued.delivery_id,)
    row = _delivery(sessions, queued.delivery_id)
    assert (row.state, row.attempts, row.last_status) == ("pending", 1, None)
    assert row.last_error == "connection refused"
    assert row.next_attempt_at == t0 + dt.timedelta(seconds=30)
    t1 = t0 + dt.timedelta(seconds=30)
    assert deliver_webhooks(sessions, now=t1).retrying == (queued.delivery_id,)
    row = _delivery(sessions, queued.delivery_id)
    assert row.attempts == 2 and row.next_attempt_at == t1 + dt.timedelta(minutes=1)

    with wsgi_server(app, port=port):
        assert deliver_webhooks(sessions, now=t1 + dt.timedelta(seconds=59)).attempted == 0
        done = deliver_webhooks(sessions, now=t1 + dt.timedelta(minutes=1))
    assert done.delivered == (queued.delivery_id,)
    assert len(app.received) == 1 and app.received[0].verified
    assert app.received[0].delivery == queued.delivery_id
    row = _delivery(sessions, queued.delivery_id)
    assert (row.state, row.attempts, row.last_status) == ("delivered", 3, 200)
    assert row.endpoint_id == endpoint_id


def test_unknown_host_timeout_and_redirect_are_failed_attempts(
    sessions: sessionmaker[Session],
) -> None:
    slow = Receiver(delay=2.0)
    moved = Receiver(answers=[302])
    with wsgi_server(slow) as slow_url, wsgi_server(moved) as moved_url:
        urls = {
            "dns": "http://koin-webhook-test.invalid/hook",
            "slow": f"{slow_url}hook",
            "moved": f"{moved_url}hook",
        }
        ids = {name: _endpoint(sessions, url, ["batch.finished"])[0] for name, url in urls.items()}
        _event_to_all(sessions)
        report = deliver_webhooks(sessions, timeout=0.5)
        assert report.attempted == 3 and report.delivered == ()
    errors = {row.endpoint_id: row for row in _deliveries(sessions)}
    assert errors[ids["dns"]].last_error is not None
    assert errors[ids["dns"]].last_error.startswith("host name not resolved")
    assert errors[ids["slow"]].last_error == "timed out after 0.5 s"
    assert errors[ids["moved"]].last_status == 302
    assert errors[ids["moved"]].last_error == (
        "HTTP 302 (redirects are not followed): answer 302"
    )
    assert [item.path for item in moved.received] == ["/hook"]  # /elsewhere never asked
    assert all(row.state == "pending" and row.attempts == 1 for row in errors.values())


def _event_to_all(sessions: sessionmaker[Session]) -> list[WebhookDelivery]:
    with session_scope(sessions) as db:
        rows = enqueue_event(db, "batch.finished", {"batch_id": "B1"})
        db.expunge_all()
        return rows


def test_retries_span_three_days_then_fail_and_an_admin_can_redeliver(
    sessions: sessionmaker[Session], receiver: tuple[Receiver, str]
) -> None:
    waits = sum((retry_delay(n) for n in range(1, MAX_ATTEMPTS)), dt.timedelta())
    assert dt.timedelta(days=3) <= waits < dt.timedelta(days=3, hours=2)

    app, _ = _listening(sessions, receiver)
    app.answers = [503]
    queued = _event(sessions)
    with session_scope(sessions) as db:  # as if it had failed all but once already
        db.execute(update(WebhookDelivery).values(attempts=MAX_ATTEMPTS - 1))
    report = deliver_webhooks(sessions)
    assert report.failed == (queued.delivery_id,) and report.retrying == ()
    row = _delivery(sessions, queued.delivery_id)
    assert (row.state, row.attempts, row.next_attempt_at) == ("failed", MAX_ATTEMPTS, None)
    assert deliver_webhooks(sessions, now=utcnow() + dt.timedelta(days=30)).attempted == 0

    with session_scope(sessions) as db:
        again = redeliver(db, row.id)
        assert (again.state, again.attempts) == ("pending", 0)
    assert deliver_webhooks(sessions).delivered == (queued.delivery_id,)
    assert [item.delivery for item in app.received] == [queued.delivery_id] * 2
    with pytest.raises(InvalidWebhookState) as caught, session_scope(sessions) as db:
        redeliver(db, row.id)
    assert "再配信できません" in caught.value.message and "delivered" in caught.value.message_en
    with pytest.raises(WebhookNotFound), session_scope(sessions) as db:
        redeliver(db, 999_999)


def test_a_disabled_endpoint_keeps_its_deliveries_until_enabled(
    sessions: sessionmaker[Session], receiver: tuple[Receiver, str]
) -> None:
    app, endpoint_id = _listening(sessions, receiver)
    queued = _event(sessions)
    with session_scope(sessions) as db:
        set_endpoint_active(db, endpoint_id, False)
        assert enqueue_event(db, "batch.finished", {"batch_id": "B2"}) == []  # none new
    assert deliver_webhooks(sessions).attempted == 0
    with session_scope(sessions) as db:
        set_endpoint_active(db, endpoint_id, True)
    assert deliver_webhooks(sessions).delivered == (queued.delivery_id,)
    assert len(app.received) == 1


def test_concurrent_workers_deliver_each_delivery_exactly_once(
    sessions: sessionmaker[Session], receiver: tuple[Receiver, str]
) -> None:
    app, _ = _listening(sessions, receiver)
    with session_scope(sessions) as db:
        queued = [
            enqueue_event(db, "batch.finished", {"batch_id": f"B{n}"})[0].delivery_id
            for n in range(40)
        ]
    start = threading.Barrier(4)

    def worker() -> tuple[str, ...]:
        start.wait(timeout=30)
        return deliver_webhooks(sessions).delivered

    with ThreadPoolExecutor(4) as pool:
        results = [future.result(timeout=120) for future in [pool.submit(worker) for _ in range(4)]]
    delivered = [delivery for result in results for delivery in result]
    assert sorted(delivered) == sorted(queued)  # each reported by exactly one worker
    assert app.by_delivery() == {delivery: 1 for delivery in queued}  # each POSTed once
    assert all(item.verified for item in app.received)
    assert {row.state for row in _deliveries(sessions)} == {"delivered"}


def test_the_worker_thread_delivers(
    sessions: sessionmaker[Session], receiver: tuple[Receiver, str]
) -> None:
    app, _ = _listening(sessions, receiver)
    queued = _event(sessions)
    with WebhookWorker(sessions, interval=0.2):
        deadline = time.monotonic() + 20
        while not app.received and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [item.delivery for item in app.received] == [queued.delivery_id]
    assert _delivery(sessions, queued.delivery_id).state == "delivered"


# -- signatures and endpoints -------------------------------------------------------------------


def test_signatures_verify_only_with_the_right_secret_and_a_fresh_timestamp(
    sessions: sessionmaker[Session], receiver: tuple[Receiver, str]
) -> None:
    app, endpoint_id = _listening(sessions, receiver)
    right = app.secret
    app.secret = "whsec_" + "A" * 43  # the receiver was given a wrong secret
    queued = _event(sessions)
    deliver_webhooks(sessions)
    [request] = app.received
    assert not request.verified and request.status == 401
    row = _delivery(sessions, queued.delivery_id)
    assert (row.state, row.last_status) == ("pending", 401)

    sent_at = int(request.timestamp)
    assert abs(sent_at - time.time()) < 60
    assert request.signature == sign_payload(right, request.timestamp, request.body)
    verify_webhook_signature(right, request.timestamp, request.body, request.signature)

    def reason(*args: Any, **kwargs: Any) -> str:
        with pytest.raises(WebhookSignatureInvalid) as caught:
            verify_webhook_signature(*args, **kwargs)
        assert caught.value.message != caught.value.message_en
        return caught.value.reason

    body, ts, header = request.body, request.timestamp, request.signature
    assert reason(app.secret, ts, body, header) == "mismatch"
    assert reason(right, ts, body.replace(b"B1", b"B2"), header) == "mismatch"
    assert reason(right, str(sent_at + 1), body, header) == "mismatch"
    # a captured request replayed ten minutes later, or from the future
    assert reason(right, ts, body, header, 300, now=sent_at + 600) == "stale"
    assert reason(right, ts, body, header, 300, now=sent_at - 600) == "stale"
    verify_webhook_signature(right, ts, body, header, 300, now=sent_at + 299)
    assert reason(right, None, body, header) == "timestamp"
    assert reason(right, "12.5", body, header) == "timestamp"
    assert reason(right, ts, body, None) == "format"
    assert reason(right, ts, body, header.removeprefix("sha256=")) == "format"
    assert reason(right, ts, body, "sha1=" + "0" * 40) == "format"
    assert endpoint_id > 0


def test_endpoints_get_a_fresh_256_bit_secret_and_bad_values_are_refused(
    sessions: sessionmaker[Session],
) -> None:
    first_id, first = _endpoint(sessions, "https://bunsho.pref.ibaraki.example/koin",
                                ["contract.completed", "batch.finished", "batch.finished"],
                                description="  文書管理   システム ")
    _, second = _endpoint(sessions, "http://10.0.0.8:8080/rpa")
    for secret in (first, second):
        assert secret.startswith("whsec_")
        assert len(base64.urlsafe_b64decode(secret.removeprefix("whsec_") + "=")) == 32
    assert first != second
    with sessions() as db:
        endpoint = db.get(WebhookEndpoint, first_id)
        assert endpoint is not None
        assert endpoint.events == "batch.finished contract.completed"
        assert endpoint.description == "文書管理 システム" and endpoint.active
        assert first not in repr(endpoint)

    hook, batch = "https://example.org/hook", ["batch.finished"]
    bad: list[tuple[str, dict[str, Any], str]] = [
        ("url", {"url": "ftp://example.org/hook"}, "http:// or https://"),
        ("url", {"url": "https:///hook"}, "host name"),
        ("url", {"url": "https://example.org:99999/hook"}, "port"),
        ("url", {"url": "https://user:pass@example.org/hook"}, "password"),
        ("url", {"url": "https://example.org/hook#top"}, "fragment"),
        ("url", {"url": "https://example.org/my hook"}, "spaces"),
        ("url", {"url": "https://例え.jp/hook"}, "non-ASCII"),
        ("url", {"url": "https://example.org/" + "a" * 2000}, "2000"),
        ("url", {"url": "  "}, "Enter the URL"),
        ("events", {"events": []}, "at least one"),
        ("events", {"events": ["contract.signed"]}, "contract.signed"),
        ("description", {"description": "x" * 201}, "200"),
    ]
    for field, values, words in bad:
        arguments: dict[str, Any] = {"url": hook, "events": batch, **values}
        with pytest.raises(InvalidWebhookData) as caught, session_scope(sessions) as db:
            create_endpoint(db, arguments.pop("url"), **arguments)
        assert caught.value.field == field, values
        assert words in caught.value.message_en, (values, caught.value.message_en)
        assert caught.value.message != caught.value.message_en
    with pytest.raises(InvalidWebhookData) as caught, session_scope(sessions) as db:
        create_endpoint(db, "https://example.org/h", events=["batch.finished"], created_by=4242)
    assert caught.value.field == "created_by"
    with sessions() as db:
        assert db.scalar(select(func.count()).select_from(WebhookEndpoint)) == 2
    with pytest.raises(WebhookNotFound), session_scope(sessions) as db:
        set_endpoint_active(db, 4242, False)


# -- the administrator's pages ------------------------------------------------------------------


@pytest.fixture
def app(koin_home: Path, db_url: str, sessions: sessionmaker[Session]) -> Iterator[Flask]:
    """The web app on the test's database (SQLite or PostgreSQL), with an admin and an
    officer."""
    with session_scope(sessions) as db:
        create_user(db, ADMIN, ["admin"], password=PASSWORD, display_name="管理 太郎")
        create_user(db, OFFICER, ["officer"], password=PASSWORD, display_name="officer")
    flask_app = create_app({
        "KOIN_HOME": str(koin_home),
        "KOIN_DATABASE_URL": db_url,
        "KOIN_PUBLIC_URL": PUBLIC_URL,
        "SECRET_KEY": SECRET_KEY,
        "TESTING": True,
    })
    yield flask_app
    with flask_app.app_context():  # close its connections before the schema is dropped
        services.session_factory().kw["bind"].dispose()


def _token(client: FlaskClient, path: str = "/login") -> str:
    found = _CSRF.search(client.get(path).get_data(as_text=True))
    assert found, path
    return found.group(1)


def _logged_in(app: Flask, email: str) -> FlaskClient:
    client = app.test_client()
    response = client.post(
        "/login", data={"csrf_token": _token(client), "email": email, "password": PASSWORD}
    )
    assert response.status_code == 302
    return client


def test_pages_are_for_administrators_only(app: Flask, sessions: sessionmaker[Session]) -> None:
    endpoint_id, _ = _endpoint(sessions, "https://example.org/hook")
    delivery = _event(sessions)
    with sessions() as db:
        pk = db.scalar(select(WebhookDelivery.id))
    anonymous = app.test_client()
    response = anonymous.get("/admin/webhooks")
    assert response.status_code == 302 and "/login" in response.headers["Location"]
    officer = _logged_in(app, OFFICER)
    for path in ("/admin/webhooks", "/admin/webhooks/new", "/admin/webhooks/deliveries",
                 f"/admin/webhooks/deliveries/{pk}"):
        assert officer.get(path).status_code == 403, path
    assert "nav-webhooks" not in officer.get("/contracts").get_data(as_text=True)
    token = _token(officer, "/contracts/new")
    for path in ("/admin/webhooks/new", f"/admin/webhooks/{endpoint_id}/disable",
                 f"/admin/webhooks/deliveries/{pk}/redeliver"):
        response = officer.post(path, data={"csrf_token": token, "url": "https://x.example/",
                                            "events": "batch.finished"})
        assert response.status_code == 403, path
    with sessions() as db:
        assert db.scalar(select(func.count()).select_from(WebhookEndpoint)) == 1
        assert db.scalar(select(WebhookEndpoint.active))
    assert _delivery(sessions, delivery.delivery_id).state == "pending"


def test_create_shows_the_secret_once(app: Flask, sessions: sessionmaker[Session]) -> None:
    admin = _logged_in(app, ADMIN)
    page = admin.get("/admin/webhooks").get_data(as_text=True)
    assert 'id="nav-webhooks"' in page and "送信先はまだありません" in page
    form = admin.get("/admin/webhooks/new")
    assert form.headers["Cache-Control"] == "no-store"
    assert form.get_data(as_text=True).count('type="checkbox" name="events"') == len(EVENT_TYPES)

    data = {
        "csrf_token": _token(admin, "/admin/webhooks/new"),
        "url": "https://bunsho.pref.ibaraki.example/koin/webhook",
        "description": "文書管理システム",
        "events": ["contract.completed", "batch.finished"],
    }
    assert admin.post("/admin/webhooks/new", data={**data, "csrf_token": ""}).status_code == 400
    response = admin.post("/admin/webhooks/new", data=data)
    assert response.status_code == 303 and response.headers["Location"].endswith("/admin/webhooks")
    shown = admin.get("/admin/webhooks")
    assert shown.headers["Cache-Control"] == "no-store"
    html = shown.get_data(as_text=True)
    found = _SECRET.search(html)
    assert found and "を登録しました" in html and "文書管理システム" in html
    with sessions() as db:
        [endpoint] = db.scalars(select(WebhookEndpoint)).all()
        assert endpoint.secret == found.group(1)
        assert endpoint.events == "batch.finished contract.completed"
        assert endpoint.creator is not None and endpoint.creator.email == ADMIN
    again = admin.get("/admin/webhooks").get_data(as_text=True)
    assert found.group(1) not in again and "webhook-secret" not in again  # once only
    assert "管理 太郎" in again and "bunsho.pref.ibaraki.example" in again
    english = admin.get("/admin/webhooks?lang=en").get_data(as_text=True)
    assert "Contract completed" in english and "Deliveries" in english
    admin.get("/admin/webhooks?lang=ja")  # the choice is remembered in a cookie

    refused = admin.post("/admin/webhooks/new", data={
        **data, "csrf_token": _token(admin, "/admin/webhooks/new"), "url": "ftp://x.example/",
    })
    body = refused.get_data(as_text=True)
    assert refused.status_code == 422 and "http:// か https://" in body
    assert 'value="ftp://x.example/"' in body and "whsec_" not in body
    none = admin.post("/admin/webhooks/new", data={
        "csrf_token": _token(admin, "/admin/webhooks/new"), "url": "https://x.example/",
    })
    assert none.status_code == 422 and "イベントを一つ以上" in none.get_data(as_text=True)
    with sessions() as db:
        assert db.scalar(select(func.count()).select_from(WebhookEndpoint)) == 1


def test_disable_enable_deliveries_and_redeliver_pages(
    app: Flask, sessions: sessionmaker[Session], receiver: tuple[Receiver, str]
) -> None:
    receiving, endpoint_id = _listening(sessions, receiver)
    down_id, _ = _endpoint(sessions, f"http://127.0.0.1:{free_port()}/down",
                           description="停止中の RPA")
    good, bad = _event_to_all(sessions)
    assert (good.endpoint_id, bad.endpoint_id) == (endpoint_id, down_id)
    deliver_webhooks(sessions)
    with session_scope(sessions) as db:  # the one that is down has given up
        db.execute(update(WebhookDelivery).where(WebhookDelivery.id == bad.id).values(
            state="failed", next_attempt_at=None))

    admin = _logged_in(app, ADMIN)
    page = admin.get("/admin/webhooks/deliveries").get_data(as_text=True)
    assert f'data-delivery="{good.delivery_id}" data-state="delivered"' in page
    assert f'data-delivery="{bad.delivery_id}" data-state="failed"' in page
    assert "connection refused" in page and "HTTP 200" in page and "再配信" in page
    only_failed = admin.get("/admin/webhooks/deliveries?state=failed").get_data(as_text=True)
    assert bad.delivery_id in only_failed and good.delivery_id not in only_failed
    mine = admin.get(f"/admin/webhooks/deliveries?endpoint_id={endpoint_id}").get_data(as_text=True)
    assert good.delivery_id in mine and bad.delivery_id not in mine
    assert admin.get("/admin/webhooks/deliveries?state=lost").status_code == 400
    assert admin.get("/admin/webhooks/deliveries?endpoint_id=abc").status_code == 400
    assert admin.get("/admin/webhooks/deliveries?endpoint_id=4242").status_code == 404
    assert admin.get("/admin/webhooks/deliveries/4242").status_code == 404
    detail = html.unescape(admin.get(f"/admin/webhooks/deliveries/{good.id}").get_data(True))
    assert good.delivery_id in detail and '"batch_id": "B1"' in detail
    assert 'id="redeliver"' not in detail  # delivered: nothing to redeliver
    failed = admin.get(f"/admin/webhooks/deliveries/{bad.id}").get_data(as_text=True)
    assert 'id="redeliver"' in failed and "connection refused" in failed

    token = _token(admin, "/admin/webhooks")
    assert admin.post(f"/admin/webhooks/deliveries/{bad.id}/redeliver").status_code == 400
    response = admin.post(f"/admin/webhooks/deliveries/{bad.id}/redeliver",
                          data={"csrf_token": token})
    assert response.status_code == 303
    assert "再配信を予約しました" in admin.get(response.headers["Location"]).get_data(as_text=True)
    assert _delivery(sessions, bad.delivery_id).state == "pending"
    twice = admin.post(f"/admin/webhooks/deliveries/{bad.id}/redeliver",
                       data={"csrf_token": token}, follow_redirects=True)
    assert twice.status_code == 200 and "再配信できません" in twice.get_data(as_text=True)
    assert admin.post("/admin/webhooks/deliveries/4242/redeliver",
                      data={"csrf_token": token}).status_code == 404

    assert admin.post(f"/admin/webhooks/{down_id}/disable").status_code == 400  # no CSRF
    assert admin.post(f"/admin/webhooks/{down_id}/disable",
                      data={"csrf_token": token}).status_code == 303
    listed = admin.get("/admin/webhooks").get_data(as_text=True)
    assert "への配信を停止しました" in listed and "停止中" in listed and "再開する" in listed
    with sessions() as db:
        assert not db.get(WebhookEndpoint, down_id).active  # type: ignore[union-attr]
    assert deliver_webhooks(sessions).attempted == 0  # the redelivery waits for the endpoint
    assert admin.post(f"/admin/webhooks/{down_id}/enable",
                      data={"csrf_token": token}).status_code == 303
    assert admin.post("/admin/webhooks/4242/enable", data={"csrf_token": token}).status_code == 404
    with sessions() as db:
        assert [d.delivery_id for d in list_deliveries(db, state=DeliveryState.PENDING)] == [
            bad.delivery_id
        ]
    assert len(receiving.received) == 1


# -- the command line ---------------------------------------------------------------------------


@pytest.fixture
def runner(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("KOIN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KOIN_DATABASE_URL", db_url)
    monkeypatch.setenv("KOIN_LANG", "en")
    return CliRunner()


def test_cli_add_list_disable_and_deliver(
    runner: CliRunner, sessions: sessionmaker[Session], receiver: tuple[Receiver, str]
) -> None:
    app, url = receiver
    empty = runner.invoke(cli, ["webhooks", "list"]).output
    assert empty == "There are no webhook endpoints.\n"
    added = runner.invoke(cli, ["webhooks", "add", url, "--event", "batch.finished",
                                "--event", "contract.declined,contract.expired",
                                "--description", "RPA 連携"])
    assert added.exit_code == 0, added.output
    assert_english(added.output)
    assert "Registered the webhook endpoint: " in added.output
    found = re.search(
        r"^Signing secret \(shown this once only; set it on the receiving side\): "
        r"(whsec_[A-Za-z0-9_-]{43})$", added.output.strip(), re.MULTILINE,
    )
    assert found
    app.secret = found.group(1)
    with sessions() as db:
        endpoint = db.scalars(select(WebhookEndpoint)).one()
        assert endpoint.secret == app.secret and endpoint.created_by is None
        assert endpoint.events == "batch.finished contract.declined contract.expired"

    listed = runner.invoke(cli, ["webhooks", "list"])
    assert listed.exit_code == 0 and app.secret not in listed.output
    assert listed.output.rstrip("\n").endswith("\tRPA 連携")
    assert_english(listed.output, "RPA 連携")
    assert listed.output.split("\t")[:4] == [
        str(endpoint.id), "active", "batch.finished,contract.declined,contract.expired", url,
    ]
    _event(sessions)
    delivered = runner.invoke(cli, ["webhooks", "deliver"])
    assert delivered.exit_code == 0 and delivered.output == "Delivered 1 webhook(s)\n"
    assert len(app.received) == 1 and app.received[0].verified

    disabled = runner.invoke(cli, ["webhooks", "disable", str(endpoint.id)])
    assert disabled.exit_code == 0
    assert disabled.output == f"Disabled the webhook endpoint {endpoint.id}: {url}\n"
    assert "\tdisabled\t" in runner.invoke(cli, ["webhooks", "list"]).output
    enabled = runner.invoke(cli, ["webhooks", "enable", str(endpoint.id)])
    assert enabled.exit_code == 0
    assert enabled.output == f"Enabled the webhook endpoint {endpoint.id}: {url}\n"
    missing = runner.invoke(cli, ["webhooks", "disable", "4242"])
    assert missing.exit_code == 1 and "There is no webhook endpoint 4242" in missing.output
    bad = runner.invoke(cli, ["webhooks", "add", "ftp://x.example/", "--event", "batch.finished"])
    assert bad.exit_code == 1 and "http:// or https://" in bad.output
    unknown = runner.invoke(cli, ["webhooks", "add", url, "--event", "contract.signed"])
    assert unknown.exit_code == 1 and "contract.signed" in unknown.output
    assert runner.invoke(cli, ["webhooks", "add", url]).exit_code == 2  # --event is required


def test_cli_speaks_japanese_by_default(
    runner: CliRunner, receiver: tuple[Receiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KOIN_LANG")
    _, url = receiver
    assert runner.invoke(cli, ["webhooks", "list"]).output == "Webhook の送信先はありません。\n"
    added = runner.invoke(cli, ["webhooks", "add", url, "--event", "batch.finished"])
    assert added.exit_code == 0, added.output
    assert "Webhook の送信先を登録しました: " in added.output
    assert re.search(
        r"^署名用シークレット\(この一度だけ表示します。受信側に設定してください\): whsec_\S+$",
        added.output, re.MULTILINE,
    )
    delivered = runner.invoke(cli, ["webhooks", "deliver"])
    assert delivered.output == "Webhook を配信しました: 0 件\n"
    assert_japanese(delivered.output)


def test_openapi_describes_every_event(app: Flask) -> None:
    document = app.test_client().get("/api/v1/openapi.json").get_json()
    assert sorted(document["webhooks"]) == sorted(EVENT_TYPES)
    envelope = document["components"]["schemas"]["WebhookEnvelope"]
    assert envelope["properties"]["type"]["enum"] == list(EVENT_TYPES)
    for name, hook in document["webhooks"].items():
        headers = {p["name"] for p in hook["post"]["parameters"]}
        assert headers == {"X-Koin-Event", "X-Koin-Delivery", "X-Koin-Timestamp",
                           "X-Koin-Signature"}, name
    contract = document["components"]["schemas"]["WebhookContractData"]["required"]
    batch = document["components"]["schemas"]["WebhookBatchData"]["required"]
    sample = contract_event_data(contract_id="c", title="t", status="completed",
                                 time=utcnow(), public_url=PUBLIC_URL)
    assert sorted(contract) == sorted(sample)
    assert sorted(batch) == sorted(batch_finished_data(
        batch_id="b", done=1, failed=0, finished_at=utcnow(), public_url=PUBLIC_URL))


def test_the_readme_receiver_check_accepts_a_real_delivery_and_refuses_tampering(
    sessions: sessionmaker[Session], receiver: tuple[Receiver, str]
) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text("utf-8")
    section = readme[readme.index("## Webhooks"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code
    namespace: dict[str, Any] = {}
    exec(code.group(1), namespace)  # noqa: S102 - our own README
    check = namespace["koin_signature_ok"]

    app, _ = _listening(sessions, receiver)
    _event(sessions)
    deliver_webhooks(sessions)
    [request] = app.received
    headers = {"X-Koin-Timestamp": request.timestamp, "X-Koin-Signature": request.signature}
    assert check(app.secret, headers, request.body)
    assert not check("whsec_" + "B" * 43, headers, request.body)
    assert not check(app.secret, headers, request.body + b" ")
    old = str(int(request.timestamp) - 600)
    resigned = {"X-Koin-Timestamp": old,
                "X-Koin-Signature": sign_payload(app.secret, old, request.body)}
    assert not check(app.secret, resigned, request.body)  # stale, though correctly signed
    assert not check(app.secret, {}, request.body)


@pytest.mark.slow
def test_koin_serve_delivers_webhooks(
    koin_home: Path,
    tmp_path: Path,
    db_url: str,
    sessions: sessionmaker[Session],
    receiver: tuple[Receiver, str],
) -> None:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home)
    app, _ = _listening(sessions, receiver)
    port = free_port()
    env = {"KOIN_DATABASE_URL": db_url, "KOIN_DEV_SMTP_PORT": "0", "KOIN_JOBS_INTERVAL": "0"}
    with koin_process(home, "serve", "--no-init", "--port", str(port), port=port, env=env):
        queued = _event(sessions)
        deadline = time.monotonic() + 30
        while not app.received and time.monotonic() < deadline:
            time.sleep(0.1)
    assert [item.delivery for item in app.received] == [queued.delivery_id]
    assert app.received[0].verified
    assert _delivery(sessions, queued.delivery_id).state == "delivered"

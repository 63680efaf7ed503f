"""Contracts REST API v1 (``web/api_contracts.py``) with contracts keys, on SQLite and PostgreSQL:
a contract created, completed by its parties (real outbox mail, the party services) and
downloaded; who may see what; every refused input with its status and code; and every answer
checked against the OpenAPI document (``web/openapi/contracts.json``)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import x509 as asn1_x509
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

from contracts import (
    CodeOutcome,
    CompletionOutcome,
    Contract,
    OutboxMessage,
    User,
    complete_contract,
    consent,
    create_api_key,
    create_user,
    open_link,
    revoke_api_key,
    session_scope,
    verify_code,
)
from keys import Role
from signer import Installation, SignOptions, sign_pdf
from tests.conftest import PUBLIC_URL
from tests.hostile import password_protected_pdf
from tests.validators import openssl, pyhanko_status
from web import create_app, services
from web.api import openapi_document

SECRET = "test-secret-key-0123456789abcdef-not-for-production"
PASSWORD = "correct horse battery staple"
OFFICER = "keiyaku@pref.ibaraki.example"
OTHER_OFFICER = "other@pref.ibaraki.example"
ADMIN = "admin@pref.ibaraki.example"
SIGNER = "hisho@pref.ibaraki.example"
TITLE = "県道123号線 道路改良工事 請負契約書"
HANAKO = {
    "name": "茨城 花子", "organisation": "茨城県 土木部", "email": "hanako@pref.ibaraki.example",
    "role": "prefecture", "identification": "email_otp",
}
TARO = {
    "name": "常陸 太郎", "organisation": "株式会社 水戸建設", "email": "taro@mito-kensetsu.example",
    "role": "contractor", "identification": "access_code",
}
UA = "Mozilla/5.0 (koin tests)"
WITNESS_CN = "koin Witness Signing Service"
BASE = "/api/v1/contracts"
_LINK = re.compile(r"/c/([A-Za-z0-9_-]{43})\b")
_OTP = re.compile(r"確認コード: (\d{6})")
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')

OPENAPI = openapi_document()


# -- the OpenAPI document as the judge of every answer ------------------------------------------


def _template(path: str) -> str:
    """``/api/v1/contracts/abc/send`` → ``/api/v1/contracts/{id}/send``."""
    rest = path.split("?", 1)[0].removeprefix(BASE)
    if not rest:
        return BASE
    parts = rest.split("/")  # "", id, action…
    return "/".join([BASE, "{id}", *parts[2:]])


def _check_documented(response: TestResponse, method: str, path: str) -> None:
    """The status is documented for the operation, and a JSON body matches its schema."""
    operation = OPENAPI["paths"][_template(path)][method.lower()]
    status = str(response.status_code)
    assert status in operation["responses"], f"{method} {path}: {status} is not documented"
    content = operation["responses"][status]["content"]
    assert response.mimetype in content, f"{method} {path}: {response.mimetype} undocumented"
    if response.mimetype == "application/json":
        schema = {**content["application/json"]["schema"], "components": OPENAPI["components"]}
        Draft202012Validator(schema).validate(response.get_json())
    assert response.headers["Cache-Control"] == "no-store"


@dataclass
class Api:
    """The test client with one API key; every answer is checked against the OpenAPI document."""

    client: FlaskClient
    key: str | None

    def call(self, method: str, path: str, **options: Any) -> TestResponse:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        response = self.client.open(path, method=method, headers=headers, **options)
        _check_documented(response, method, path)
        return response

    def create(
        self, pdf: bytes | None, metadata: Any, *, raw_metadata: str | None = None
    ) -> TestResponse:
        data: dict[str, Any] = {}
        if pdf is not None:
            data["file"] = (io.BytesIO(pdf), "契約書.pdf")
        if raw_metadata is not None:
            data["metadata"] = raw_metadata
        elif metadata is not None:
            data["metadata"] = json.dumps(metadata, ensure_ascii=False)
        return self.call("POST", BASE, data=data, content_type="multipart/form-data")

    def refused(self, response: TestResponse, status: int, code: str) -> dict[str, str]:
        body = response.get_json()
        assert response.status_code == status, body
        error: dict[str, str] = body["error"]
        assert error["code"] == code, error
        assert error["message"] and error["message_en"]
        assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", error["message"]), error["message"]
        return error


# -- fixtures -------------------------------------------------------------------------------------


@dataclass
class People:
    officer: int
    officer_key: str
    other_key: str
    admin_key: str
    sign_key: str
    verify_key: str


@pytest.fixture
def people(sessions: sessionmaker[Session]) -> People:
    keys: dict[str, str] = {}
    ids: dict[str, int] = {}
    with session_scope(sessions) as session:
        for email, roles, scopes in (
            (OFFICER, ["officer"], ["contracts"]),
            (OTHER_OFFICER, ["officer"], ["contracts"]),
            (ADMIN, ["admin", "officer"], ["contracts"]),
            (SIGNER, ["signer"], ["sign"]),
        ):
            user, _ = create_user(session, email, roles, password=PASSWORD, display_name=email[:5])
            ids[email] = user.id
            keys[email] = create_api_key(session, user, name="基幹システム", scopes=scopes)[1]
        officer = session.get_one(User, ids[OFFICER])
        verify_only = create_api_key(session, officer, name="verify", scopes=["verify"])[1]
    return People(
        ids[OFFICER], keys[OFFICER], keys[OTHER_OFFICER], keys[ADMIN], keys[SIGNER], verify_only
    )


@pytest.fixture
def app(koin_home: Path, db_url: str, sessions: sessionmaker[Session]) -> Iterator[Flask]:
    # The shared demo installation as KOIN_HOME (its witness key signs completed contracts);
    # each test has its own database (SQLite file or PostgreSQL schema).
    app = create_app(
        {
            "KOIN_HOME": str(koin_home),
            "KOIN_DATABASE_URL": db_url,
            "KOIN_PUBLIC_URL": PUBLIC_URL,
            "SECRET_KEY": SECRET,
            "TESTING": True,
            # many requests per test; the rate limit itself is tested in test_apikeys.py
            "KOIN_API_RATE": 1000.0,
            "KOIN_API_BURST": 1000,
        }
    )
    yield app
    with app.app_context():  # the app's own engine: close its connections
        services.session_factory().kw["bind"].dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def api(client: FlaskClient, people: People) -> Api:
    return Api(client, people.officer_key)


@pytest.fixture(scope="module")
def signed_pdf(installation: Installation, permit_pdf: bytes) -> bytes:
    data = sign_pdf(permit_pdf, installation.signing_context(Role.POSITION), SignOptions()).data
    assert data is not None
    return data


def _mails(sessions: sessionmaker[Session], to: str, tag: str) -> list[OutboxMessage]:
    with sessions() as session:
        return list(
            session.scalars(
                select(OutboxMessage)
                .where(OutboxMessage.to_address == to, OutboxMessage.tag == tag)
                .order_by(OutboxMessage.id)
            )
        )


def _consent_by_mail(sessions: sessionmaker[Session], email: str, access_code: str | None) -> str:
    """The party opens the link of its invitation mail, identifies (the access code, or the
    one-time code mailed on opening) and consents; the contract's status afterwards."""
    [invitation] = _mails(sessions, email, "contract-invitation")
    token = _LINK.search(invitation.text_body)
    assert token, invitation.text_body
    with session_scope(sessions) as session:
        opened = open_link(session, token.group(1), ip="192.0.2.10", user_agent=UA)
    code = access_code
    if code is None:
        otp = _OTP.search(_mails(sessions, email, "contract-otp")[-1].text_body)
        assert otp
        code = otp.group(1)
    with session_scope(sessions) as session:
        checked = verify_code(session, opened.party_id, code, ip="192.0.2.10", user_agent=UA)
    assert checked.outcome is CodeOutcome.VERIFIED
    with session_scope(sessions) as session:
        result = consent(
            session, opened.party_id, document_sha256_seen=opened.original_sha256,
            ip="192.0.2.10", user_agent=UA, public_url=PUBLIC_URL,
        )
        return result.status.value


def _row_id(sessions: sessionmaker[Session], public_id: str) -> int:
    with sessions() as session:
        row = session.scalar(select(Contract.id).where(Contract.public_id == public_id))
    assert row is not None
    return row


def _contract_count(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Contract)) or 0)


def _draft(api: Api, pdf: bytes, parties: list[dict[str, str]] | None = None) -> str:
    response = api.create(pdf, {"title": TITLE, "parties": [HANAKO, TARO] if parties is None
                                else parties})
    assert response.status_code == 201, response.get_json()
    return str(response.get_json()["id"])


# -- the whole way --------------------------------------------------------------------------------


def test_contract_through_the_api_to_a_signed_pdf(
    app: Flask,
    client: FlaskClient,
    api: Api,
    sessions: sessionmaker[Session],
    installation: Installation,
    permit_pdf: bytes,
    root_cert: asn1_x509.Certificate,
    root_pem: Path,
    chain_pem: Path,
    tmp_path: Path,
) -> None:
    # A draft with one party, the other added afterwards.
    created = api.create(
        permit_pdf,
        {"title": TITLE, "order": "sequential", "expires_in_days": 30,
         "reminder_interval_days": 0, "parties": [HANAKO]},
    )
    assert created.status_code == 201, created.get_json()
    contract = created.get_json()
    public_id = contract["id"]
    assert created.headers["Location"] == f"{BASE}/{public_id}"
    assert contract["status"] == "draft" and contract["status_label"] == "下書き"
    assert contract["title"] == TITLE and contract["signing_order"] == "sequential"
    assert contract["original_sha256"] == hashlib.sha256(permit_pdf).hexdigest()
    assert contract["page_count"] == 2 and contract["reminder_interval_days"] == 0
    expires = dt.datetime.fromisoformat(contract["expires_at"])
    created_at = dt.datetime.fromisoformat(contract["created_at"])
    assert round((expires - created_at).total_seconds()) == 30 * 86400
    assert [p["email"] for p in contract["parties"]] == [HANAKO["email"]]
    assert "access_code" not in contract["parties"][0]  # email_otp: no code

    added = api.call("POST", f"{BASE}/{public_id}/parties", json=TARO)
    assert added.status_code == 201, added.get_json()
    parties = added.get_json()["parties"]
    assert [(p["position"], p["name"]) for p in parties] == [(1, HANAKO["name"]), (2, TARO["name"])]
    assert "access_code" not in parties[0]
    access_code = parties[1]["access_code"]
    assert re.fullmatch(r"\d{8}", access_code)

    # Shown once: never again, and nowhere in the database in plain text.
    shown = api.call("GET", f"{BASE}/{public_id}")
    assert shown.status_code == 200
    assert access_code not in shown.get_data(as_text=True)
    assert all("access_code" not in p for p in shown.get_json()["parties"])

    sent = api.call("POST", f"{BASE}/{public_id}/send")
    assert sent.status_code == 200, sent.get_json()
    body = sent.get_json()
    assert body["status"] == "sent" and body["sent_at"] is not None
    # sequential: only the first party is invited now
    assert body["parties"][0]["invited_at"] is not None and body["parties"][1]["invited_at"] is None
    assert _mails(sessions, TARO["email"], "contract-invitation") == []

    assert _consent_by_mail(sessions, HANAKO["email"], None) == "partially_agreed"
    progress = api.call("GET", f"{BASE}/{public_id}").get_json()
    assert progress["status"] == "partially_agreed" and progress["parties_consented"] == 1
    assert progress["parties"][0]["status"] == "consented"
    assert progress["parties"][0]["acted_at"] is not None
    assert progress["parties"][1]["invited_at"] is not None  # now Taro's turn

    assert _consent_by_mail(sessions, TARO["email"], access_code) == "completing"
    not_yet = api.call("GET", f"{BASE}/{public_id}/final.pdf")
    api.refused(not_yet, 409, "not_completed")
    outcome = complete_contract(
        sessions, _row_id(sessions, public_id), installation, public_url=PUBLIC_URL
    )
    assert outcome is CompletionOutcome.COMPLETED

    done = api.call("GET", f"{BASE}/{public_id}").get_json()
    assert done["status"] == "completed" and done["completed_at"] is not None
    assert done["parties_total"] == done["parties_consented"] == 2
    assert done["links"]["final_pdf"] == f"{BASE}/{public_id}/final.pdf"

    final = api.call("GET", f"{BASE}/{public_id}/final.pdf")
    assert final.status_code == 200 and final.mimetype == "application/pdf"
    signed = final.get_data()
    assert hashlib.sha256(signed).hexdigest() == done["final_sha256"]
    assert final.headers["X-Koin-SHA256"] == done["final_sha256"]
    assert signed.startswith(permit_pdf), "the original is kept byte for byte"
    status = pyhanko_status(signed, root_cert)
    assert status.bottom_line and status.timestamp_validity is not None
    assert status.signing_cert.subject.native["common_name"] == WITNESS_CN

    original = api.call("GET", f"{BASE}/{public_id}/original.pdf")
    assert original.status_code == 200 and original.get_data() == permit_pdf

    audit_answer = api.call("GET", f"{BASE}/{public_id}/audit")
    assert audit_answer.status_code == 200
    audit = audit_answer.get_json()
    assert audit["chain_check"]["ok"] is True and audit["chain_check"]["broken_seq"] is None
    kinds = [event["kind"] for event in audit["events"]]
    assert kinds[:2] == ["created", "sent"] and kinds.count("consented") == 2
    signed_at = kinds.index("signed")
    assert kinds[signed_at : signed_at + 3] == ["signed", "completed", "chain_timestamped"]
    sent_event = audit["events"][1]
    assert [p["email"] for p in sent_event["details"]["parties"]] == [
        HANAKO["email"], TARO["email"]
    ]
    assert access_code not in audit_answer.get_data(as_text=True)
    # The RFC 3161 token covers the chain head (openssl, trusting only our root).
    head = audit["chain_head"]
    assert head["sha256"] == done["chain_head_sha256"]
    token = tmp_path / "chain-head.tsr"
    token.write_bytes(base64.b64decode(head["timestamp_token_base64"]))
    verified = openssl(
        "ts", "-verify", "-digest", head["sha256"], "-in", str(token), "-token_in",
        "-CAfile", str(root_pem), "-untrusted", str(chain_pem),
    )
    assert "Verification: OK" in verified.stdout, verified.stdout + verified.stderr

    # The same document as the officer's page downloads.
    page_csrf = _CSRF.search(client.get("/login").get_data(as_text=True))
    assert page_csrf
    login = client.post(
        "/login", data={"csrf_token": page_csrf.group(1), "email": OFFICER, "password": PASSWORD}
    )
    assert login.status_code == 302
    page_audit = client.get(f"/contracts/{public_id}/audit.json")
    assert page_audit.status_code == 200 and page_audit.get_json() == audit

    listed = api.call("GET", f"{BASE}?status=completed").get_json()
    assert [c["id"] for c in listed["contracts"]] == [public_id] and listed["more"] is False
    assert listed["contracts"][0]["parties_consented"] == 2
    assert "parties" not in listed["contracts"][0]
    assert api.call("GET", f"{BASE}?status=draft").get_json()["contracts"] == []


def test_metadata_as_a_json_file_part_and_an_absolute_deadline(
    api: Api, permit_pdf: bytes
) -> None:
    deadline = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=7)
    metadata = {"title": TITLE, "expires_at": deadline.astimezone(
        dt.timezone(dt.timedelta(hours=9))).isoformat(), "parties": [HANAKO, TARO]}
    response = api.call(
        "POST", BASE, content_type="multipart/form-data",
        data={
            "file": (io.BytesIO(permit_pdf), "contract.pdf", "application/pdf"),
            "metadata": (io.BytesIO(json.dumps(metadata).encode()), "metadata.json",
                         "application/json"),
        },
    )
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert dt.datetime.fromisoformat(body["expires_at"]) == deadline
    assert body["signing_order"] == "parallel" and body["reminder_interval_days"] == 3
    [code] = [p["access_code"] for p in body["parties"] if "access_code" in p]
    assert body["parties"][1]["access_code"] == code


# -- who may see what -----------------------------------------------------------------------------


def _every_endpoint(public_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        ("GET", f"{BASE}/{public_id}", {}),
        ("GET", f"{BASE}/{public_id}/original.pdf", {}),
        ("GET", f"{BASE}/{public_id}/final.pdf", {}),
        ("GET", f"{BASE}/{public_id}/audit", {}),
        ("POST", f"{BASE}/{public_id}/parties",
         {"json": {**TARO, "email": "third@example.jp", "identification": "email_otp"}}),
        ("POST", f"{BASE}/{public_id}/send", {}),
        ("POST", f"{BASE}/{public_id}/cancel", {"json": {"reason": "誤り"}}),
    ]


def test_scopes_owners_and_revoked_keys(
    client: FlaskClient,
    api: Api,
    people: People,
    sessions: sessionmaker[Session],
    permit_pdf: bytes,
) -> None:
    public_id = _draft(api, permit_pdf)

    # A key without the contracts scope: 403 everywhere, also for listing and creating.
    for key in (people.sign_key, people.verify_key):
        other = Api(client, key)
        for method, path, options in [
            *_every_endpoint(public_id), ("GET", BASE, {}),
            ("POST", BASE, {"data": {"file": (io.BytesIO(permit_pdf), "c.pdf"),
                                     "metadata": json.dumps({"title": "t"})}}),
        ]:
            other.refused(other.call(method, path, **options), 403, "forbidden")

    # Another officer's contracts key: 404, exactly like a contract that does not exist.
    stranger = Api(client, people.other_key)
    for method, path, options in _every_endpoint(public_id):
        error = stranger.refused(stranger.call(method, path, **options), 404, "not_found")
        unknown = api.call(method, path.replace(public_id, "AAAAAAAAAAAAAAAAAAAAAA"), **options)
        assert api.refused(unknown, 404, "not_found")["message_en"] == error[
            "message_en"
        ].replace(public_id, "AAAAAAAAAAAAAAAAAAAAAA")
    assert stranger.call("GET", BASE).get_json()["contracts"] == []

    # An administrator (also an officer) sees every contract.
    admin = Api(client, people.admin_key)
    assert admin.call("GET", f"{BASE}/{public_id}").status_code == 200
    assert [c["id"] for c in admin.call("GET", BASE).get_json()["contracts"]] == [public_id]

    # Nothing of the refused requests happened.
    mine = api.call("GET", f"{BASE}/{public_id}").get_json()
    assert mine["status"] == "draft" and len(mine["parties"]) == 2

    # No key, a malformed one, a revoked one: 401 with WWW-Authenticate.
    with session_scope(sessions) as session:
        revoke_api_key(session, people.officer_key.split("_")[1])
    for key in (None, "koin_garbage", people.officer_key):
        response = Api(client, key).call("GET", f"{BASE}/{public_id}")
        Api(client, key).refused(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_an_officer_who_loses_the_role_loses_the_api(
    client: FlaskClient, api: Api, people: People, sessions: sessionmaker[Session]
) -> None:
    with session_scope(sessions) as session:
        user = session.get_one(User, people.officer)
        user.grants = [grant for grant in user.grants if grant.role != "officer"]
    api.refused(api.call("GET", BASE), 403, "forbidden")


# -- refused input --------------------------------------------------------------------------------


def test_bad_uploads_are_refused_with_json(
    app: Flask,
    api: Api,
    sessions: sessionmaker[Session],
    permit_pdf: bytes,
    signed_pdf: bytes,
) -> None:
    good = {"title": TITLE, "parties": [HANAKO, TARO]}
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).isoformat()
    cases: list[tuple[str, bytes | None, Any, int, str]] = [
        ("no file", None, good, 400, "no_file"),
        ("empty file", b"", good, 400, "empty_file"),
        ("not a PDF", "契約書です".encode(), good, 415, "not_pdf"),
        ("truncated", permit_pdf[: len(permit_pdf) // 2], good, 422, "invalid_pdf"),
        ("broken", b"%PDF-1.7\n" + b"0" * 1000 + b"\n%%EOF\n", good, 422, "invalid_pdf"),
        ("encrypted", password_protected_pdf(), good, 422, "encrypted"),
        ("signed", signed_pdf, good, 422, "already_signed"),
        ("no metadata", permit_pdf, None, 400, "no_metadata"),
        ("metadata an array", permit_pdf, [good], 400, "invalid_json"),
        ("unknown field", permit_pdf, {**good, "colour": "red"}, 400, "unknown_field"),
        ("unknown party field", permit_pdf,
         {**good, "parties": [HANAKO, {**TARO, "access_code": "12345678"}]}, 400,
         "unknown_field"),
        ("party not an object", permit_pdf, {**good, "parties": ["taro"]}, 400,
         "invalid_parties"),
        ("parties not an array", permit_pdf, {**good, "parties": HANAKO}, 400,
         "invalid_parties"),
        ("no title", permit_pdf, {"parties": [HANAKO]}, 400, "missing_field"),
        ("blank title", permit_pdf, {**good, "title": "   "}, 400, "invalid_title"),
        ("title a number", permit_pdf, {**good, "title": 42}, 400, "invalid_title"),
        ("party without email", permit_pdf,
         {**good, "parties": [{k: v for k, v in HANAKO.items() if k != "email"}]}, 400,
         "missing_field"),
        ("bad email", permit_pdf, {**good, "parties": [HANAKO, {**TARO, "email": "taro@"}]},
         400, "invalid_email"),
        ("same email twice", permit_pdf,
         {**good, "parties": [HANAKO, {**TARO, "email": HANAKO["email"].upper()}]}, 400,
         "invalid_email"),
        ("bad role", permit_pdf, {**good, "parties": [{**HANAKO, "role": "mayor"}]}, 400,
         "invalid_role"),
        ("bad identification", permit_pdf,
         {**good, "parties": [{**HANAKO, "identification": "sms"}]}, 400,
         "invalid_identification"),
        ("21 parties", permit_pdf,
         {**good, "parties": [{**TARO, "email": f"p{n}@example.jp"} for n in range(21)]}, 400,
         "invalid_parties"),
        ("bad order", permit_pdf, {**good, "order": "random"}, 400, "invalid_order"),
        ("days and date", permit_pdf, {**good, "expires_in_days": 3, "expires_at": past}, 400,
         "invalid_deadline"),
        ("zero days", permit_pdf, {**good, "expires_in_days": 0}, 400, "invalid_deadline"),
        ("days as text", permit_pdf, {**good, "expires_in_days": "14"}, 400,
         "invalid_expires_in_days"),
        ("days true", permit_pdf, {**good, "expires_in_days": True}, 400,
         "invalid_expires_in_days"),
        ("date in the past", permit_pdf, {**good, "expires_at": past}, 400, "invalid_deadline"),
        ("date without zone", permit_pdf, {**good, "expires_at": "2030-01-01T00:00:00"}, 400,
         "invalid_deadline"),
        ("not a date", permit_pdf, {**good, "expires_at": "来週"}, 400, "invalid_deadline"),
        ("reminders 61 days", permit_pdf, {**good, "reminder_interval_days": 61}, 400,
         "invalid_reminder_interval_days"),
        ("reminders 1.5 days", permit_pdf, {**good, "reminder_interval_days": 1.5}, 400,
         "invalid_reminder_interval_days"),
    ]
    for name, pdf, metadata, status, code in cases:
        response = api.create(pdf, metadata)
        assert response.status_code == status, (name, response.get_json())
        assert response.get_json()["error"]["code"] == code, (name, response.get_json())
        api.refused(response, status, code)
    for raw, name in (("{title: 1}", "not JSON"), ('{"title": NaN}', "NaN"), ("   ", "blank")):
        response = api.create(permit_pdf, None, raw_metadata=raw)
        expected = "no_metadata" if name == "blank" else "invalid_json"
        assert response.status_code == 400, name
        api.refused(response, 400, expected)
    wrong_type = api.call("POST", BASE, data=permit_pdf, content_type="application/pdf")
    api.refused(wrong_type, 415, "unsupported_media_type")
    app.config["MAX_CONTENT_LENGTH"] = 4096
    too_large = api.create(b"%PDF-1.7\n" + b"0" * 8192 + b"\n%%EOF\n", good)
    api.refused(too_large, 413, "too_large")
    assert _contract_count(sessions) == 0


def test_actions_in_the_wrong_state_and_bad_bodies(
    api: Api, sessions: sessionmaker[Session], permit_pdf: bytes
) -> None:
    # Sending without (enough) parties.
    empty = _draft(api, permit_pdf, parties=[])
    assert api.call("GET", f"{BASE}/{empty}").get_json()["parties"] == []
    api.refused(api.call("POST", f"{BASE}/{empty}/send"), 409, "parties_incomplete")
    api.call("POST", f"{BASE}/{empty}/parties", json=HANAKO)
    one_side = api.call("POST", f"{BASE}/{empty}/parties", json={**HANAKO, "email": "b@x.jp"})
    assert one_side.status_code == 201
    refusal = api.refused(api.call("POST", f"{BASE}/{empty}/send"), 409, "parties_incomplete")
    assert "茨城県側と契約相手方" in refusal["message"]
    assert _mails(sessions, HANAKO["email"], "contract-invitation") == []

    # Adding parties: bad bodies, a repeated address, the 21st party.
    add = f"{BASE}/{empty}/parties"
    for options, status, code in [
        ({"data": "{}", "content_type": "text/plain"}, 415, "unsupported_media_type"),
        ({"data": "{name:", "content_type": "application/json"}, 400, "invalid_json"),
        ({"json": [HANAKO]}, 400, "invalid_json"),
        ({"json": {}}, 400, "missing_field"),
        ({}, 400, "missing_field"),
        ({"json": {**TARO, "access_code": "12345678"}}, 400, "unknown_field"),
        ({"json": {**TARO, "name": ["x"]}}, 400, "invalid_name"),
        ({"json": {**TARO, "email": "B@X.JP"}}, 400, "invalid_email"),
        ({"json": {**TARO, "name": "x" * 201}}, 400, "invalid_name"),
    ]:
        api.refused(api.call("POST", add, **options), status, code)
    for n in range(18):
        response = api.call("POST", add, json={**TARO, "email": f"p{n}@example.jp"})
        assert response.status_code == 201
    assert len(response.get_json()["parties"]) == 20
    api.refused(api.call("POST", add, json={**TARO, "email": "p21@example.jp"}), 409,
                "too_many_parties")
    assert api.call("POST", f"{BASE}/{empty}/send").status_code == 200

    # A sent contract: no more parties, no second sending; no final PDF yet.
    api.refused(api.call("POST", add, json={**TARO, "email": "late@example.jp"}), 409,
                "invalid_state")
    api.refused(api.call("POST", f"{BASE}/{empty}/send"), 409, "invalid_state")
    api.refused(api.call("GET", f"{BASE}/{empty}/final.pdf"), 409, "not_completed")

    # Cancelling needs a reason; then the invited parties are told; twice is refused.
    cancel = f"{BASE}/{empty}/cancel"
    for options, status, code in [
        ({}, 400, "missing_field"),
        ({"json": {"reason": "  "}}, 400, "missing_field"),
        ({"json": {"reason": 3}}, 400, "invalid_reason"),
        ({"json": {"reason": "x", "notify": False}}, 400, "unknown_field"),
        ({"json": {"reason": "x" * 1001}}, 400, "invalid_reason"),
        ({"data": "reason=x", "content_type": "application/x-www-form-urlencoded"}, 415,
         "unsupported_media_type"),
    ]:
        api.refused(api.call("POST", cancel, **options), status, code)
    cancelled = api.call("POST", cancel, json={"reason": "金額の誤り"})
    assert cancelled.status_code == 200 and cancelled.get_json()["status"] == "cancelled"
    assert len(_mails(sessions, HANAKO["email"], "contract-cancelled")) == 1
    api.refused(api.call("POST", cancel, json={"reason": "again"}), 409, "invalid_state")
    audit = api.call("GET", f"{BASE}/{empty}/audit").get_json()
    [cancel_event] = [e for e in audit["events"] if e["kind"] == "cancelled"]
    assert cancel_event["details"]["reason"] == "金額の誤り"

    # A draft whose deadline passed cannot be sent.
    late = _draft(api, permit_pdf)
    with session_scope(sessions) as session:
        session.execute(
            update(Contract).where(Contract.public_id == late)
            .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
        )
    api.refused(api.call("POST", f"{BASE}/{late}/send"), 409, "deadline_passed")

    # Listing: filters and pages.
    for query, code in [
        ("status=unknown", "invalid_status"), ("status=", "invalid_status"),
        ("page=0", "invalid_page"),
        ("page=x", "invalid_page"), ("per_page=101", "invalid_per_page"),
        ("per_page=-1", "invalid_per_page"), ("page=１", "invalid_page"),
    ]:
        api.refused(api.call("GET", f"{BASE}?{query}"), 400, code)
    first = api.call("GET", f"{BASE}?per_page=1").get_json()
    second = api.call("GET", f"{BASE}?per_page=1&page=2").get_json()
    assert first["more"] is True and second["more"] is False
    assert [first["contracts"][0]["id"], second["contracts"][0]["id"]] == [late, empty]
    assert api.call("GET", f"{BASE}?status=cancelled").get_json()["contracts"][0]["id"] == empty


def test_every_route_is_documented(koin_home: Path, tmp_path: Path) -> None:
    app = create_app(
        {"KOIN_HOME": str(koin_home), "KOIN_DATABASE_URL": f"sqlite:///{tmp_path}/unused.db",
         "SECRET_KEY": SECRET}
    )
    routes = {
        (re.sub(r"<[^>]+>", "{id}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith(BASE)
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    documented = {
        (path, method)
        for path, operations in OPENAPI["paths"].items()
        if path.startswith(BASE)
        for method in operations
    }
    assert routes == documented
    for path, method in documented:
        operation = OPENAPI["paths"][path][method]
        assert operation["security"] == [{"bearerApiKey": []}]
        assert {"401", "403", "429"} <= set(operation["responses"])


def test_wrong_method_is_json_405_with_allow(api: Api) -> None:
    response = api.client.get(
        f"{BASE}/AAAA/send", headers={"Authorization": f"Bearer {api.key}"}
    )
    assert response.status_code == 405 and "POST" in response.headers["Allow"]
    assert response.get_json()["error"]["code"] == "method_not_allowed"

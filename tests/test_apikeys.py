"""API keys: the services on SQLite and PostgreSQL, ``POST /api/v1/sign`` with a bearer key
(scopes, revocation, rate limit, bad uploads), and the ``koin apikeys`` commands."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import x509 as asn1_x509
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import contracts
from contracts import (
    ApiKey,
    ApiKeyInvalid,
    ApiKeyNotFound,
    ApiKeyScope,
    ApiScope,
    InvalidApiKeyData,
    User,
    authenticate_api_key,
    create_api_key,
    create_user,
    list_api_keys,
    make_engine,
    make_session_factory,
    migrate,
    revoke_api_key,
    session_scope,
)
from tests.cli_language import assert_english, assert_japanese
from tests.hostile import password_protected_pdf
from tests.validators import pyhanko_status
from web import create_app
from web.cli import cli
from web.ratelimit import TokenBucketLimiter

T0 = dt.datetime(2026, 4, 1, 9, 0, tzinfo=dt.UTC)
SIGNER = "hisho@pref.ibaraki.example"
OFFICER = "tanaka@pref.ibaraki.example"


def _user(sessions: sessionmaker[Session], email: str, *roles: str) -> User:
    with session_scope(sessions) as session:
        user, _ = create_user(session, email, roles)
    return user


def _key(
    sessions: sessionmaker[Session], user: User, *scopes: str, name: str = "batch"
) -> tuple[ApiKey, str]:
    with session_scope(sessions) as session:
        return create_api_key(session, session.get_one(User, user.id), name=name, scopes=scopes)


def _auth(
    sessions: sessionmaker[Session], raw: str, scope: str, now: dt.datetime = T0
) -> User:
    with session_scope(sessions) as session:
        return authenticate_api_key(session, raw, scope=scope, now=now)


def _reload(sessions: sessionmaker[Session], key_id: int) -> ApiKey:
    with session_scope(sessions) as session:
        return session.get_one(ApiKey, key_id)


# -- services (SQLite and PostgreSQL) ---------------------------------------------------------


def test_key_is_random_shown_once_and_stored_as_hash(sessions: sessionmaker[Session]) -> None:
    user = _user(sessions, SIGNER, "signer")
    key, raw = _key(sessions, user, "sign", "verify", name="  文書管理   システム ")
    match = re.fullmatch(r"koin_([0-9a-f]{8})_([A-Za-z0-9_-]{43})", raw)
    assert match is not None and match[1] == key.prefix
    assert key.key_sha256 == hashlib.sha256(raw.encode()).hexdigest()
    assert key.scopes == "sign verify" and key.scope_set == {ApiScope.SIGN, ApiScope.VERIFY}
    assert key.name == "文書管理 システム"
    stored = _reload(sessions, key.id)
    assert raw not in repr(vars(stored)) and match[2] not in stored.key_sha256
    assert stored.last_used_at is None and stored.revoked_at is None
    _, other = _key(sessions, user, "sign")
    assert other != raw


def test_authenticate_checks_scope_and_records_use_once_a_minute(
    sessions: sessionmaker[Session],
) -> None:
    user = _user(sessions, SIGNER, "signer")
    key, raw = _key(sessions, user, "sign")
    assert _auth(sessions, raw, "sign").id == user.id
    assert _reload(sessions, key.id).last_used_at == T0
    _auth(sessions, raw, "sign", now=T0 + dt.timedelta(seconds=59))
    assert _reload(sessions, key.id).last_used_at == T0
    later = T0 + dt.timedelta(seconds=61)
    _auth(sessions, raw, ApiScope.SIGN, now=later)
    assert _reload(sessions, key.id).last_used_at == later
    with pytest.raises(ApiKeyScope) as refused:
        _auth(sessions, raw, "contracts")
    assert refused.value.scope == "contracts"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda raw: raw[:-1] + ("A" if raw[-1] != "A" else "B"),  # unknown secret
        lambda raw: raw[:-1],  # malformed
        lambda raw: raw.upper(),
        lambda raw: "",
        lambda raw: "Bearer " + raw,
    ],
)
def test_unknown_or_malformed_keys_are_invalid(
    sessions: sessionmaker[Session], mangle: Any
) -> None:
    user = _user(sessions, SIGNER, "signer")
    _, raw = _key(sessions, user, "sign")
    with pytest.raises(ApiKeyInvalid):
        _auth(sessions, mangle(raw), "sign")


def test_revoked_key_and_disabled_account_are_invalid(sessions: sessionmaker[Session]) -> None:
    user = _user(sessions, SIGNER, "signer")
    key, raw = _key(sessions, user, "sign")
    with session_scope(sessions) as session:
        revoked = revoke_api_key(session, key.prefix.upper(), now=T0)
    assert revoked.revoked_at == T0
    with session_scope(sessions) as session:  # again: the first time is kept
        assert revoke_api_key(session, key.prefix, now=T0 + dt.timedelta(days=1)).revoked_at == T0
    with pytest.raises(ApiKeyInvalid):
        _auth(sessions, raw, "sign")
    _, other = _key(sessions, user, "sign")
    with session_scope(sessions) as session:
        session.get_one(User, user.id).is_active = False
    with pytest.raises(ApiKeyInvalid):
        _auth(sessions, other, "sign")
    with session_scope(sessions) as session, pytest.raises(ApiKeyNotFound):
        revoke_api_key(session, "00000000")


def test_scopes_need_the_owners_roles(sessions: sessionmaker[Session]) -> None:
    officer = _user(sessions, OFFICER, "officer")
    with pytest.raises(InvalidApiKeyData) as refused:
        _key(sessions, officer, "sign")
    assert refused.value.field == "scopes" and "signer" in (refused.value.message_en or "")
    for scopes in [(), ("admin",)]:
        with pytest.raises(InvalidApiKeyData):
            _key(sessions, officer, *scopes)
    with pytest.raises(InvalidApiKeyData) as unnamed:
        _key(sessions, officer, "verify", name="   ")
    assert unnamed.value.field == "name"
    _, raw = _key(sessions, officer, "contracts", "verify")
    assert _auth(sessions, raw, "verify").id == officer.id
    # losing the role takes the scope from existing keys too
    signer = _user(sessions, SIGNER, "signer", "officer")
    _, signing = _key(sessions, signer, "sign")
    with session_scope(sessions) as session:
        user = session.get_one(User, signer.id)
        user.grants = [grant for grant in user.grants if grant.role != "signer"]
    with pytest.raises(ApiKeyScope):
        _auth(sessions, signing, "sign")


def test_list_keys_of_one_user(sessions: sessionmaker[Session]) -> None:
    user = _user(sessions, SIGNER, "signer")
    other = _user(sessions, OFFICER, "officer")
    first, _ = _key(sessions, user, "sign", name="one")
    second, _ = _key(sessions, user, "verify", name="two")
    _key(sessions, other, "verify")
    with session_scope(sessions) as session:
        revoke_api_key(session, first.prefix)
        listed = list_api_keys(session, session.get_one(User, user.id))
    assert [key.id for key in listed] == [first.id, second.id]
    assert listed[0].is_revoked and not listed[1].is_revoked


def test_deleting_a_user_deletes_their_keys(sessions: sessionmaker[Session]) -> None:
    user = _user(sessions, SIGNER, "signer")
    _key(sessions, user, "sign")
    with session_scope(sessions) as session:
        session.delete(session.get_one(User, user.id))
    with session_scope(sessions) as session:
        assert session.scalars(select(ApiKey)).all() == []


# -- the token bucket -------------------------------------------------------------------------


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = TokenBucketLimiter(2.0, 3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0
    now[0] = 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    with pytest.raises(ValueError):
        TokenBucketLimiter(0, 1)


# -- the web API (SQLite) ---------------------------------------------------------------------


@pytest.fixture
def home(koin_home: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home)
    for leftover in home.glob("koin.db*"):
        leftover.unlink()
    migrate.upgrade(contracts.database_url(home))
    return home


@pytest.fixture
def home_sessions(home: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(contracts.database_url(home))
    yield make_session_factory(engine)
    engine.dispose()


def _app(home: Path, **config: Any) -> Flask:
    return create_app({"KOIN_HOME": str(home), "TESTING": True, **config})


@pytest.fixture
def app(home: Path) -> Flask:
    return _app(home)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def sign_key(home_sessions: sessionmaker[Session]) -> str:
    user = _user(home_sessions, SIGNER, "signer")
    return _key(home_sessions, user, "sign")[1]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_api_signs_with_a_sign_key(
    client: FlaskClient,
    sign_key: str,
    one_page_permit: bytes,
    root_cert: asn1_x509.Certificate,
    home_sessions: sessionmaker[Session],
) -> None:
    response = client.post(
        "/api/v1/sign?page=1&box=300,40,560,140",
        data=one_page_permit,
        content_type="application/pdf",
        headers=_bearer(sign_key),
    )
    assert response.status_code == 200, response.get_json()
    assert response.mimetype == "application/pdf"
    signed = response.get_data()
    assert response.headers["X-Koin-SHA256"] == hashlib.sha256(signed).hexdigest()
    status = pyhanko_status(signed, root_cert)
    assert status.bottom_line and status.timestamp_validity is not None
    document_id = response.headers["X-Koin-Document-Id"]
    with session_scope(home_sessions) as session:
        record = contracts.get_document(session, document_id)
        assert record is not None and record.sha256 == hashlib.sha256(signed).hexdigest()
        assert record.signer_role == "position" and record.level == "B-T"
        [key] = session.scalars(select(ApiKey)).all()
        assert key.last_used_at is not None
    # and the public verify API (no key) says so
    verdict = client.post("/api/v1/verify", data=signed, content_type="application/pdf")
    assert verdict.get_json()["indication"] == "PASSED"


def test_api_signs_multipart_without_stamp_at_level_b_b(
    client: FlaskClient, sign_key: str, one_page_permit: bytes, root_cert: asn1_x509.Certificate
) -> None:
    response = client.post(
        "/api/v1/sign",
        data={"file": (io.BytesIO(one_page_permit), "permit.pdf"), "level": "B-B",
              "no_stamp": "true"},
        content_type="multipart/form-data",
        headers=_bearer(sign_key),
    )
    assert response.status_code == 200, response.get_json()
    status = pyhanko_status(response.get_data(), root_cert)
    assert status.bottom_line and status.timestamp_validity is None


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer"}, 401),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401),
        ({"Authorization": "Bearer koin_00000000_" + "A" * 43}, 401),
        ({"Authorization": "Bearer garbage"}, 401),
    ],
)
def test_api_sign_without_a_valid_key_is_401(
    client: FlaskClient, one_page_permit: bytes, headers: dict[str, str], status: int
) -> None:
    response = client.post(
        "/api/v1/sign", data=one_page_permit, content_type="application/pdf", headers=headers
    )
    assert response.status_code == status
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.get_json()["error"]["code"] == "unauthorized"


def test_api_sign_needs_the_sign_scope_and_an_unrevoked_key(
    client: FlaskClient,
    home_sessions: sessionmaker[Session],
    sign_key: str,
    one_page_permit: bytes,
) -> None:
    user = _user(home_sessions, OFFICER, "officer", "signer")
    _, verify_only = _key(home_sessions, user, "verify")
    response = client.post(
        "/api/v1/sign", data=one_page_permit, content_type="application/pdf",
        headers=_bearer(verify_only),
    )
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "forbidden"
    with session_scope(home_sessions) as session:
        revoke_api_key(session, sign_key.split("_")[1])
    response = client.post(
        "/api/v1/sign", data=one_page_permit, content_type="application/pdf",
        headers=_bearer(sign_key),
    )
    assert response.status_code == 401
    with session_scope(home_sessions) as session:
        assert session.scalars(select(contracts.SignedDocument)).all() == []


@pytest.mark.parametrize(
    ("body", "query", "status", "code"),
    [
        (b"this is not a PDF", "", 422, "invalid_pdf"),
        (b"%PDF-1.7\n" + b"0" * 1000, "", 422, "invalid_pdf"),
        (None, "", 422, "encrypted"),
        (b"", "?level=B-X", 400, "invalid_level"),
        (b"", "?page=first", 400, "invalid_page"),
        (b"", "?box=1,2,3", 400, "invalid_box"),
        (b"", "?box=1,2,3,nan", 400, "invalid_box"),
        (b"", "?no_stamp=maybe", 400, "invalid_no_stamp"),
        (b"", "?no_stamp=1&page=1", 400, "invalid_no_stamp"),
        (b"", "?page=9", 422, "placement"),
        (b"", "?box=0,0,5000,5000", 422, "placement"),
    ],
)
def test_api_sign_refuses_bad_input_with_json(
    client: FlaskClient,
    sign_key: str,
    one_page_permit: bytes,
    body: bytes | None,
    query: str,
    status: int,
    code: str,
) -> None:
    if body is None:
        body = password_protected_pdf()
    response = client.post(
        f"/api/v1/sign{query}", data=body or one_page_permit, content_type="application/pdf",
        headers=_bearer(sign_key),
    )
    assert response.status_code == status
    error = response.get_json()["error"]
    assert error["code"] == code and error["message"] and error["message_en"]


def test_api_sign_wrong_media_type_is_415(client: FlaskClient, sign_key: str) -> None:
    response = client.post(
        "/api/v1/sign", data="x", content_type="text/plain", headers=_bearer(sign_key)
    )
    assert response.status_code == 415
    assert response.get_json()["error"]["code"] == "unsupported_media_type"


def test_api_sign_rate_limit_per_key(
    home: Path, sign_key: str, home_sessions: sessionmaker[Session]
) -> None:
    client = _app(home, KOIN_API_RATE=0.01, KOIN_API_BURST=2).test_client()
    statuses = [
        client.post(
            "/api/v1/sign", data=b"not a pdf", content_type="application/pdf",
            headers=_bearer(sign_key),
        )
        for _ in range(3)
    ]
    assert [r.status_code for r in statuses] == [422, 422, 429]
    assert statuses[2].get_json()["error"]["code"] == "rate_limited"
    assert 1 <= int(statuses[2].headers["Retry-After"]) <= 100
    # another key has its own bucket
    other = _key(home_sessions, _user(home_sessions, OFFICER, "signer"), "sign")[1]
    response = client.post(
        "/api/v1/sign", data=b"not a pdf", content_type="application/pdf",
        headers=_bearer(other),
    )
    assert response.status_code == 422


def test_api_sign_without_tsa_is_503(
    home: Path, sign_key: str, one_page_permit: bytes, home_sessions: sessionmaker[Session]
) -> None:
    client = _app(home, KOIN_TSA_URLS=["http://127.0.0.1:9/tsa"]).test_client()
    response = client.post(
        "/api/v1/sign", data=one_page_permit, content_type="application/pdf",
        headers=_bearer(sign_key),
    )
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "tsa_unavailable"
    with session_scope(home_sessions) as session:
        assert session.scalars(select(contracts.SignedDocument)).all() == []


def test_openapi_describes_sign_and_bearer(client: FlaskClient) -> None:
    document = client.get("/api/v1/openapi.json").get_json()
    sign = document["paths"]["/api/v1/sign"]["post"]
    assert sign["security"] == [{"bearerApiKey": []}]
    assert {"200", "401", "403", "429", "503"} <= set(sign["responses"])
    assert document["components"]["securitySchemes"]["bearerApiKey"]["scheme"] == "bearer"
    assert "security" not in document["paths"]["/api/v1/verify"]["post"]


# -- the command line -------------------------------------------------------------------------


@pytest.fixture
def cli_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KOIN_HOME", str(home))
    monkeypatch.setenv("KOIN_LANG", "en")
    monkeypatch.delenv("KOIN_DATABASE_URL", raising=False)
    return home


def test_cli_create_list_revoke(
    cli_home: Path,
    home_sessions: sessionmaker[Session],
    one_page_permit: bytes,
) -> None:
    _user(home_sessions, SIGNER, "signer")
    created = CliRunner().invoke(
        cli, ["apikeys", "create", "--user", SIGNER.upper(), "--scope", "sign,verify",
              "--name", "文書管理"]
    )
    assert created.exit_code == 0, created.output
    [raw] = re.findall(
        r"^API key \(shown this once only; keep it somewhere safe\): (koin_\S+)$",
        created.output, re.MULTILINE,
    )
    prefix = raw.split("_")[1]
    assert f"Created the API key: {prefix} (sign,verify) for {SIGNER}" in created.output
    assert_english(created.output)

    client = _app(cli_home).test_client()
    response = client.post(
        "/api/v1/sign", data=one_page_permit, content_type="application/pdf",
        headers=_bearer(raw),
    )
    assert response.status_code == 200

    listed = CliRunner().invoke(cli, ["apikeys", "list", "--user", SIGNER])
    assert listed.exit_code == 0, listed.output
    assert prefix in listed.output and "sign,verify" in listed.output
    assert "active" in listed.output and "文書管理" in listed.output
    assert_english(listed.output, "文書管理")
    assert raw not in listed.output and raw.split("_", 2)[2] not in listed.output

    revoked = CliRunner().invoke(cli, ["apikeys", "revoke", prefix])
    assert revoked.exit_code == 0, revoked.output
    assert revoked.output.startswith(f"Revoked the API key: {prefix} (")
    assert_english(revoked.output)
    assert "revoked" in CliRunner().invoke(cli, ["apikeys", "list", "--user", SIGNER]).output
    response = client.post(
        "/api/v1/sign", data=one_page_permit, content_type="application/pdf",
        headers=_bearer(raw),
    )
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["create", "--user", "nobody@pref.ibaraki.example", "--scope", "verify"],
         "There is no account"),
        (["create", "--user", OFFICER, "--scope", "sign"], "does not hold the role signer"),
        (["create", "--user", OFFICER, "--scope", "everything"], "There is no scope"),
        (["list", "--user", "nobody@pref.ibaraki.example"], "There is no account"),
        (["revoke", "abcdef01"], "no API key with the prefix abcdef01"),
    ],
)
def test_cli_refusals_exit_1_with_one_line(
    cli_home: Path, home_sessions: sessionmaker[Session], args: list[str], reason: str
) -> None:
    _user(home_sessions, OFFICER, "officer")
    result = CliRunner().invoke(cli, ["apikeys", *args])
    assert result.exit_code == 1, result.output
    assert reason in result.output and "koin_" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_list_without_keys(cli_home: Path, home_sessions: sessionmaker[Session]) -> None:
    _user(home_sessions, OFFICER, "officer")
    result = CliRunner().invoke(cli, ["apikeys", "list", "--user", OFFICER])
    assert result.exit_code == 0 and f"{OFFICER} has no API keys." in result.output
    assert_english(result.output)


def test_cli_speaks_japanese_by_default(
    cli_home: Path, home_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KOIN_LANG")
    _user(home_sessions, OFFICER, "officer")
    empty = CliRunner().invoke(cli, ["apikeys", "list", "--user", OFFICER])
    assert empty.exit_code == 0 and "API キーがありません" in empty.output
    created = CliRunner().invoke(
        cli, ["apikeys", "create", "--user", OFFICER, "--scope", "contracts"]
    )
    assert created.exit_code == 0, created.output
    assert "API キーを作成しました: " in created.output
    [raw] = re.findall(
        r"^API キー\(この一度だけ表示します。安全な場所に控えてください\): (koin_\S+)$",
        created.output, re.MULTILINE,
    )
    revoked = CliRunner().invoke(cli, ["apikeys", "revoke", raw.split("_")[1]])
    assert revoked.exit_code == 0 and "API キーを無効にしました: " in revoked.output
    assert_japanese(revoked.output)


def test_rate_limit_from_environment(
    home: Path, sign_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOIN_API_RATE", "0.5")
    monkeypatch.setenv("KOIN_API_BURST", "1")
    client = _app(home).test_client()
    statuses = [
        client.post(
            "/api/v1/sign", data=b"not a pdf", content_type="application/pdf",
            headers=_bearer(sign_key),
        ).status_code
        for _ in range(2)
    ]
    assert statuses == [422, 429]

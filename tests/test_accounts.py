"""Staff accounts: the services on SQLite and PostgreSQL, the login pages, the session cookie,
CSRF, role-protected pages, and the ``koin users`` / ``koin init`` commands."""

from __future__ import annotations

import datetime as dt
import logging
import re
import shutil
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from flask import Blueprint, Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, Table, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

import contracts
from contracts import (
    AccountDisabled,
    AccountLocked,
    Base,
    InvalidAccountData,
    LoginFailed,
    User,
    UserExists,
    UserRole,
    authenticate,
    create_first_admin,
    create_user,
    get_user,
    get_user_by_email,
    has_role,
    make_engine,
    make_session_factory,
    session_scope,
    set_password,
)
from contracts import accounts as accounts_module
from contracts.migrate import alembic_config, upgrade
from keys import KoinError
from tests.cli_language import assert_english, assert_japanese
from web import create_app
from web.auth import login_required, resolve_secret_key, safe_next
from web.cli import cli

T0 = dt.datetime(2026, 4, 1, 9, 0, tzinfo=dt.UTC)
PASSWORD = "correct horse battery staple"
SECRET = "test-secret-key-0123456789abcdef-not-for-production"


def _new(
    sessions: sessionmaker[Session],
    email: str = "tanaka@pref.ibaraki.example",
    roles: tuple[str, ...] = ("officer",),
    password: str | None = PASSWORD,
    **options: Any,
) -> User:
    with session_scope(sessions) as session:
        user, _ = create_user(session, email, roles, password=password, **options)
    return user


def _login(sessions: sessionmaker[Session], email: str, password: str, **options: Any) -> User:
    with session_scope(sessions) as session:
        return authenticate(session, email, password, **options)


def _reload(sessions: sessionmaker[Session], user_id: int) -> User:
    with sessions() as session:
        user = get_user(session, user_id)
        assert user is not None
        return user


# -- schema -----------------------------------------------------------------------------------


def _tables_in(entry: Any) -> set[str]:
    """Names of the tables an alembic ``compare_metadata`` entry is about."""
    names: set[str] = set()
    for operation in entry if isinstance(entry, list) else [entry]:
        for item in operation:
            if isinstance(item, str):
                names.add(item)
            elif isinstance(item, Table):
                names.add(item.name)
            elif isinstance(getattr(item, "table", None), Table):
                names.add(item.table.name)
    return names


def test_models_match_the_migration(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        diff = compare_metadata(context, Base.metadata)

    ours = {"users", "user_roles"}
    assert [entry for entry in diff if _tables_in(entry) & ours] == []
    inspector = inspect(engine)
    assert {"users", "user_roles"} <= set(inspector.get_table_names())
    assert [c["name"] for c in inspector.get_unique_constraints("users")] == ["uq_users_email"]
    assert inspector.get_pk_constraint("user_roles")["constrained_columns"] == ["user_id", "role"]
    [fk] = inspector.get_foreign_keys("user_roles")
    assert fk["referred_table"] == "users" and fk["options"].get("ondelete") == "CASCADE"


def test_downgrade_removes_the_tables(db_url: str) -> None:
    upgrade(db_url, "0002")
    config = alembic_config(db_url)
    command.downgrade(config, "0001")
    engine = make_engine(db_url)
    try:
        names = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert "users" not in names and "user_roles" not in names and "signed_documents" in names


def test_the_database_refuses_bad_rows(sessions: sessionmaker[Session]) -> None:
    user = _new(sessions)
    with pytest.raises(IntegrityError), session_scope(sessions) as session:
        session.execute(
            text("INSERT INTO user_roles (user_id, role) VALUES (:id, 'root')"), {"id": user.id}
        )
    with pytest.raises(IntegrityError), session_scope(sessions) as session:
        session.execute(text("UPDATE users SET email = 'Tanaka@Example.jp'"))
    with pytest.raises(IntegrityError), session_scope(sessions) as session:
        session.execute(text("UPDATE users SET failed_logins = -1"))
    with session_scope(sessions) as session:  # deleting a user deletes its roles
        session.execute(text("DELETE FROM users"))
    with sessions() as session:
        assert session.scalar(text("SELECT count(*) FROM user_roles")) == 0


# -- creating accounts ------------------------------------------------------------------------


def test_create_user_generates_a_password_shown_once(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as session:
        user, password = create_user(
            session, "  Tanaka.Taro@Pref.Ibaraki.EXAMPLE ", ["signer", UserRole.OFFICER]
        )
    assert password is not None
    assert re.fullmatch(r"([a-z2-9]{5}-){3}[a-z2-9]{5}", password)
    assert not set(password) & set("01ilo")

    stored = _reload(sessions, user.id)
    assert stored.email == "tanaka.taro@pref.ibaraki.example"
    assert stored.display_name == "tanaka.taro"
    assert stored.roles == {UserRole.OFFICER, UserRole.SIGNER}
    assert stored.password_hash.startswith("scrypt:") and password not in stored.password_hash
    assert stored.failed_logins == 0 and stored.locked_until is None
    assert stored.is_active and stored.last_login_at is None
    assert stored.created_at.tzinfo is dt.UTC
    assert has_role(stored, "officer") and has_role(stored, UserRole.SIGNER)
    assert not has_role(stored, UserRole.ADMIN)
    with pytest.raises(ValueError):
        has_role(stored, "root")

    with session_scope(sessions) as session:
        other, none = create_user(
            session, "suzuki@example.jp", ["admin"], display_name=" 鈴木  花子 ", password=PASSWORD
        )
    assert none is None and other.display_name == "鈴木 花子"
    assert _login(sessions, "suzuki@example.jp", PASSWORD).id == other.id
    assert _login(sessions, "TANAKA.taro@pref.ibaraki.example", password).id == user.id


def test_duplicate_email_any_case_is_refused_without_spoiling_the_transaction(
    sessions: sessionmaker[Session],
) -> None:
    _new(sessions, "dup@example.jp")
    with session_scope(sessions) as session:
        with pytest.raises(UserExists) as caught:
            create_user(session, "DUP@example.jp", ["signer"])
        create_user(session, "fresh@example.jp", ["signer"])
    assert caught.value.email == "dup@example.jp"
    assert "既にあります" in caught.value.message and "already exists" in caught.value.message_en
    with sessions() as session:
        assert get_user_by_email(session, "fresh@example.jp") is not None
        assert get_user_by_email(session, "dup@example.jp").roles == {UserRole.OFFICER}  # type: ignore[union-attr]
        assert get_user_by_email(session, "not an email") is None


@pytest.mark.parametrize(
    ("email", "roles", "options", "field"),
    [
        ("no-at-sign", ["officer"], {}, "email"),
        ("田中@example.jp", ["officer"], {}, "email"),
        ("a b@example.jp", ["officer"], {}, "email"),
        ("x" * 250 + "@e.jp", ["officer"], {}, "email"),
        ("ok@example.jp", [], {}, "roles"),
        ("ok@example.jp", ["root"], {}, "roles"),
        ("ok@example.jp", ["officer"], {"password": "short"}, "password"),
        ("ok@example.jp", ["officer"], {"display_name": "名" * 101}, "display_name"),
    ],
)
def test_unusable_account_data_is_refused(
    sessions: sessionmaker[Session],
    email: str,
    roles: list[str],
    options: dict[str, Any],
    field: str,
) -> None:
    with pytest.raises(InvalidAccountData) as caught, session_scope(sessions) as session:
        create_user(session, email, roles, **options)
    assert caught.value.field == field and caught.value.message and caught.value.message_en
    with sessions() as session:
        assert session.scalar(text("SELECT count(*) FROM users")) == 0


def test_first_admin_is_created_once(sessions: sessionmaker[Session]) -> None:
    _new(sessions, "officer@example.jp")
    with session_scope(sessions) as session, pytest.raises(UserExists):
        create_first_admin(session, "officer@example.jp")
    with session_scope(sessions) as session:
        created = create_first_admin(session, "admin@koin.local")
    assert created is not None
    admin, password = created
    assert admin.roles == {UserRole.ADMIN}
    assert _login(sessions, "admin@koin.local", password).id == admin.id
    with session_scope(sessions) as session:
        assert create_first_admin(session, "other-admin@koin.local") is None
        assert create_first_admin(session, "officer@example.jp") is None


# -- logging in -------------------------------------------------------------------------------


def test_login_success_records_the_time(sessions: sessionmaker[Session]) -> None:
    user = _new(sessions)
    logged_in = _login(sessions, "Tanaka@pref.ibaraki.example", PASSWORD, now=T0)
    assert logged_in.id == user.id and logged_in.last_login_at == T0
    assert _reload(sessions, user.id).last_login_at == T0
    with pytest.raises(ValueError):
        _login(sessions, user.email, PASSWORD, now=dt.datetime(2026, 4, 1))


def test_unknown_email_and_wrong_password_give_the_same_error(
    sessions: sessionmaker[Session],
) -> None:
    user = _new(sessions)
    with pytest.raises(LoginFailed) as unknown:
        _login(sessions, "nobody@pref.ibaraki.example", PASSWORD)
    with pytest.raises(LoginFailed) as wrong:
        _login(sessions, user.email, PASSWORD + "x")
    with pytest.raises(LoginFailed) as garbage:
        _login(sessions, "", "")
    assert unknown.value.message == wrong.value.message == garbage.value.message
    assert unknown.value.message_en == wrong.value.message_en
    assert unknown.value.fields == wrong.value.fields == {}
    # the failure was counted although the caller's transaction rolled back
    assert _reload(sessions, user.id).failed_logins == 1


def test_lockout_after_five_failures_and_unlock_after_the_period(
    sessions: sessionmaker[Session],
) -> None:
    user = _new(sessions)
    for attempt in range(1, 5):
        with pytest.raises(LoginFailed):
            _login(sessions, user.email, "wrong password", now=T0 + dt.timedelta(seconds=attempt))
    with pytest.raises(AccountLocked) as locked:
        _login(sessions, user.email, "wrong password", now=T0 + dt.timedelta(seconds=5))
    until = T0 + dt.timedelta(seconds=5) + accounts_module.LOCKOUT_PERIOD
    assert locked.value.locked_until == until
    assert "15 分" in locked.value.message and "15 minutes" in locked.value.message_en
    stored = _reload(sessions, user.id)
    assert stored.failed_logins == 5 and stored.locked_until == until

    # while locked, even the right password is refused, and nothing is counted
    with pytest.raises(AccountLocked) as still:
        _login(sessions, user.email, PASSWORD, now=until - dt.timedelta(seconds=1))
    assert "1 分" in still.value.message and "1 minute." in still.value.message_en
    assert _reload(sessions, user.id).failed_logins == 5

    # afterwards the right password works and resets the count
    assert _login(sessions, user.email, PASSWORD, now=until).id == user.id
    stored = _reload(sessions, user.id)
    assert stored.failed_logins == 0 and stored.locked_until is None


def test_an_expired_lock_allows_five_more_attempts(sessions: sessionmaker[Session]) -> None:
    user = _new(sessions)
    now = T0
    for _ in range(5):
        with pytest.raises((LoginFailed, AccountLocked)):
            _login(sessions, user.email, "wrong password", now=now)
    now += accounts_module.LOCKOUT_PERIOD
    for _ in range(4):
        with pytest.raises(LoginFailed):
            _login(sessions, user.email, "wrong password", now=now)
    with pytest.raises(AccountLocked):
        _login(sessions, user.email, "wrong password", now=now)
    assert _reload(sessions, user.id).failed_logins == 10


def test_disabled_account(sessions: sessionmaker[Session]) -> None:
    user = _new(sessions)
    with session_scope(sessions) as session:
        session.execute(text("UPDATE users SET is_active = :no"), {"no": False})
    with pytest.raises(LoginFailed):
        _login(sessions, user.email, "wrong password")
    with pytest.raises(AccountDisabled):
        _login(sessions, user.email, PASSWORD)


def test_set_password_replaces_it_and_lifts_the_lock(sessions: sessionmaker[Session]) -> None:
    user = _new(sessions)
    for _ in range(5):
        with pytest.raises((LoginFailed, AccountLocked)):
            _login(sessions, user.email, "wrong password", now=T0)
    with session_scope(sessions) as session:
        stored = get_user(session, user.id)
        assert stored is not None
        with pytest.raises(InvalidAccountData):
            set_password(session, stored, "too short")
        set_password(session, stored, "a brand new passphrase")
    with pytest.raises(LoginFailed):
        _login(sessions, user.email, PASSWORD, now=T0)
    assert _login(sessions, user.email, "a brand new passphrase", now=T0).id == user.id


def test_change_password_needs_the_current_one_and_counts_wrong_ones(
    sessions: sessionmaker[Session],
) -> None:
    user = _new(sessions)

    def change(current: str, new: str, **options: Any) -> None:
        with session_scope(sessions) as session:
            stored = get_user(session, user.id)
            assert stored is not None
            contracts.change_password(session, stored, current, new, **options)

    unusable = [("short", "12"), (PASSWORD, "同じ"), (user.email.upper(), "メールアドレス")]
    for new, reason in unusable:
        with pytest.raises(InvalidAccountData) as refused:
            change(PASSWORD, new, now=T0)
        assert reason in refused.value.message
    assert _reload(sessions, user.id).failed_logins == 0  # the right current password
    for attempt in range(4):
        with pytest.raises(contracts.WrongCurrentPassword) as wrong:
            change("not my password", "a brand new passphrase", now=T0)
        assert wrong.value.message_en == "The current password is not correct."
        assert _reload(sessions, user.id).failed_logins == attempt + 1
    with pytest.raises(AccountLocked):  # the fifth wrong one locks, as at the login
        change("not my password", "a brand new passphrase", now=T0)
    with pytest.raises(AccountLocked):  # and while locked even the right one is refused
        change(PASSWORD, "a brand new passphrase", now=T0 + dt.timedelta(minutes=1))
    later = T0 + accounts_module.LOCKOUT_PERIOD + dt.timedelta(seconds=1)
    change(PASSWORD, "a brand new passphrase", now=later)
    with pytest.raises(LoginFailed):
        _login(sessions, user.email, PASSWORD, now=later)
    assert _login(sessions, user.email, "a brand new passphrase", now=later).id == user.id


# -- concurrency ------------------------------------------------------------------------------


def _attempt_all_at_once(
    sessions: sessionmaker[Session], email: str, password: str, count: int
) -> list[BaseException | None]:
    start = threading.Barrier(count)

    def attempt() -> None:
        start.wait(timeout=30)
        _login(sessions, email, password)

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(attempt) for _ in range(count)]
        return [future.exception(timeout=120) for future in futures]


def test_concurrent_failures_are_counted_exactly(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accounts_module, "MAX_FAILED_LOGINS", 1000)
    user = _new(sessions)
    for _ in range(2):
        errors = _attempt_all_at_once(sessions, user.email, "wrong password", 12)
        assert all(isinstance(error, LoginFailed) for error in errors), errors
    assert _reload(sessions, user.id).failed_logins == 24


def test_concurrent_failures_lock_exactly_once(sessions: sessionmaker[Session]) -> None:
    user = _new(sessions)
    errors = _attempt_all_at_once(sessions, user.email, "wrong password", 4)
    assert all(isinstance(error, LoginFailed) for error in errors), errors
    assert _reload(sessions, user.id).failed_logins == 4

    # one more failure locks; those racing with it are refused as locked and not counted
    errors = _attempt_all_at_once(sessions, user.email, "wrong password", 6)
    assert all(isinstance(error, AccountLocked) for error in errors), errors
    stored = _reload(sessions, user.id)
    assert stored.failed_logins == 5 and stored.is_locked()
    errors = _attempt_all_at_once(sessions, user.email, PASSWORD, 3)
    assert all(isinstance(error, AccountLocked) for error in errors), errors


# -- the web pages ----------------------------------------------------------------------------


probe = Blueprint("probe", __name__)


@probe.get("/probe/officer")
@login_required(UserRole.OFFICER)
def officer_page() -> str:
    return "officer page"


@probe.get("/probe/any")
@login_required()
def any_staff_page() -> str:
    return "any staff page"


@pytest.fixture
def web_db(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path}/koin.db"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    _new(sessions, "officer@example.jp", ("officer",), display_name="田中 太郎")
    _new(sessions, "signer@example.jp", ("signer",))
    yield sessions
    engine.dispose()


def _app(tmp_path: Path, **config: Any) -> Flask:
    app = create_app(
        {
            "KOIN_HOME": str(tmp_path),
            "KOIN_DATABASE_URL": f"sqlite:///{tmp_path}/koin.db",
            "SECRET_KEY": SECRET,
            "TESTING": True,
            **config,
        }
    )
    app.register_blueprint(probe)
    return app


@pytest.fixture
def app(tmp_path: Path, web_db: sessionmaker[Session]) -> Flask:
    return _app(tmp_path)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _csrf_token(client: FlaskClient, path: str = "/login") -> str:
    page = client.get(path).get_data(as_text=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, page
    return match.group(1)


def _post_login(
    client: FlaskClient,
    email: str = "officer@example.jp",
    password: str = PASSWORD,
    query: str = "",
    **form: str,
) -> TestResponse:
    token = _csrf_token(client)
    data = {"csrf_token": token, "email": email, "password": password, **form}
    return client.post(f"/login{query}", data=data)


def _session_cookie(response: TestResponse) -> str:
    [header] = [h for h in response.headers.getlist("Set-Cookie") if h.startswith("koin_session=")]
    return header


def test_login_page_in_japanese_and_english(client: FlaskClient) -> None:
    page = client.get("/login").get_data(as_text=True)
    assert "職員ログイン" in page and 'autocomplete="current-password"' in page
    assert 'name="csrf_token"' in page and "ログアウト" not in page
    english = client.get("/login?lang=en").get_data(as_text=True)
    assert "Staff login" in english and "Email address" in english and "Log in" in english


def test_login_sets_a_fresh_hardened_session_cookie(client: FlaskClient) -> None:
    client.get("/login")
    with client.session_transaction() as session:
        session["planted"] = "by an attacker"
    before = client.get_cookie("koin_session")
    assert before is not None

    response = _post_login(client)
    assert response.status_code == 302 and response.headers["Location"] == "/"
    header = _session_cookie(response)
    assert "HttpOnly" in header and "SameSite=Lax" in header and "Secure" not in header
    assert "Expires=" in header  # a permanent session, ended by the lifetime
    after = client.get_cookie("koin_session")
    assert after is not None and after.value != before.value
    with client.session_transaction() as session:
        assert "planted" not in session and session["user_id"]

    page = client.get("/").get_data(as_text=True)
    assert re.search(r'id="current-user"[^>]*>田中 太郎<', page) and 'id="logout-button"' in page
    assert client.get("/probe/officer").get_data(as_text=True) == "officer page"

    # the cookie from before the login does not carry the login
    other = client.application.test_client()
    other.set_cookie("koin_session", before.value)
    assert other.get("/probe/any").status_code == 302


def test_session_cookie_is_secure_behind_https(
    tmp_path: Path, web_db: sessionmaker[Session]
) -> None:
    client = _app(tmp_path, KOIN_PUBLIC_URL="https://koin.pref.ibaraki.example").test_client()
    response = _post_login(client)
    assert response.status_code == 302
    assert "Secure" in _session_cookie(response)


def test_failed_logins_show_one_message(client: FlaskClient) -> None:
    wrong = _post_login(client, password="wrong password")
    unknown = _post_login(client, email="nobody@example.jp")
    assert wrong.status_code == unknown.status_code == 401
    message = "メールアドレスまたはパスワードが正しくありません。"
    assert message in wrong.get_data(as_text=True) and message in unknown.get_data(as_text=True)
    assert 'value="nobody@example.jp"' in unknown.get_data(as_text=True)
    assert client.get("/probe/any").status_code == 302
    english = _post_login(client, password="wrong password", query="?lang=en")
    assert "The email address or password is incorrect." in english.get_data(as_text=True)


def test_locked_account_answers_429(client: FlaskClient) -> None:
    for _ in range(4):
        assert _post_login(client, password="wrong password").status_code == 401
    locked = _post_login(client, password="wrong password")
    assert locked.status_code == 429
    assert 0 < int(locked.headers["Retry-After"]) <= 15 * 60
    assert "ロックされています" in locked.get_data(as_text=True)
    assert _post_login(client).status_code == 429


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/probe/officer?x=1", "/probe/officer?x=1"),
        ("https://evil.example/", "/"),
        ("//evil.example/path", "/"),
        ("/\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("http:/evil.example", "/"),
        ("/ok\r\nSet-Cookie: x=1", "/"),
        ("", "/"),
    ],
)
def test_next_must_be_a_local_path(client: FlaskClient, target: str, expected: str) -> None:
    response = _post_login(client, next=target)
    assert response.status_code == 302
    assert response.headers["Location"] == expected


def test_safe_next() -> None:
    assert safe_next("/a/b?c=d#e") == "/a/b?c=d#e"
    for bad in [None, "", "a/b", "//x", "/\\x", "\\\\x", "https://x/", "/a\\b", "/a\x00"]:
        assert safe_next(bad) is None, bad


def test_protected_page_redirects_to_login_and_back(client: FlaskClient) -> None:
    response = client.get("/probe/officer?x=1")
    assert response.status_code == 302
    location = urlsplit(response.headers["Location"])
    assert location.path == "/login"
    assert parse_qs(location.query) == {"next": ["/probe/officer?x=1"]}

    form = client.get(response.headers["Location"]).get_data(as_text=True)
    assert 'name="next" value="/probe/officer?x=1"' in form
    login = _post_login(client, next="/probe/officer?x=1")
    assert login.headers["Location"] == "/probe/officer?x=1"
    assert client.get("/probe/officer?x=1").status_code == 200


def test_wrong_role_gets_403(client: FlaskClient) -> None:
    _post_login(client, email="signer@example.jp")
    assert client.get("/probe/any").status_code == 200
    forbidden = client.get("/probe/officer")
    assert forbidden.status_code == 403
    assert "権限がありません" in forbidden.get_data(as_text=True)
    english = client.get("/probe/officer?lang=en")
    assert "You do not have permission" in english.get_data(as_text=True)


def test_unknown_role_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        login_required("oficer")


def test_missing_csrf_token_answers_400(client: FlaskClient) -> None:
    response = client.post(
        "/login", data={"email": "officer@example.jp", "password": PASSWORD}
    )
    assert response.status_code == 400
    page = response.get_data(as_text=True)
    assert "フォームの有効期限が切れたか" in page and 'role="alert"' in page
    assert "Traceback" not in page
    forged = {"csrf_token": "forged", "email": "x", "password": "y"}
    bad = client.post("/login?lang=en", data=forged)
    assert bad.status_code == 400 and "Reload the page" in bad.get_data(as_text=True)
    assert client.get("/probe/any").status_code == 302  # not logged in


def test_logout(client: FlaskClient) -> None:
    _post_login(client)
    assert client.post("/logout").status_code == 400  # no CSRF token: refused
    assert client.get("/probe/any").status_code == 200
    token = _csrf_token(client, "/")
    response = client.post("/logout", data={"csrf_token": token})
    assert response.status_code == 302 and response.headers["Location"] == "/login"
    assert "ログアウトしました" in client.get("/login").get_data(as_text=True)
    assert client.get("/probe/any").status_code == 302


def test_password_change_ends_other_sessions(
    client: FlaskClient, app: Flask, web_db: sessionmaker[Session]
) -> None:
    _post_login(client)
    assert client.get("/probe/any").status_code == 200
    with session_scope(web_db) as session:
        user = get_user_by_email(session, "officer@example.jp")
        assert user is not None
        set_password(session, user, "another long password")
    assert client.get("/probe/any").status_code == 302
    fresh = app.test_client()
    _post_login(fresh, password="another long password")
    assert fresh.get("/probe/any").status_code == 200


def _change_on_the_page(client: FlaskClient, current: str, new: str, again: str | None = None,
                        **environ: Any) -> TestResponse:
    token = _csrf_token(client, "/account/password")
    return client.post("/account/password", data={
        "csrf_token": token, "current_password": current, "new_password": new,
        "new_password_again": new if again is None else again,
    }, **environ)


def test_own_password_change_on_the_page(
    client: FlaskClient, app: Flask, web_db: sessionmaker[Session]
) -> None:
    assert client.get("/account/password").status_code == 302  # login first
    other_device = app.test_client()
    _post_login(other_device)
    _post_login(client)
    page = client.get("/account/password").get_data(as_text=True)
    assert "パスワードの変更" in page and "officer@example.jp" in page
    # the name in the header leads here from every page
    assert 'id="current-user" href="/account/password"' in page
    differs = _change_on_the_page(client, PASSWORD, "a brand new passphrase", "a brand new typo")
    assert differs.status_code == 400 and "一致しません" in differs.get_data(as_text=True)
    wrong = _change_on_the_page(client, "not my password", "a brand new passphrase")
    assert wrong.status_code == 401 and "現在のパスワードが正しくありません" in wrong.get_data(
        as_text=True)
    short = _change_on_the_page(client, PASSWORD, "short")
    assert short.status_code == 400 and "12 文字以上" in short.get_data(as_text=True)
    done = _change_on_the_page(client, PASSWORD, "a brand new passphrase")
    assert done.status_code == 303 and done.headers["Location"].endswith("/account/password")
    assert "パスワードを変更しました" in client.get("/account/password").get_data(as_text=True)
    # this session goes on; the other device's has ended; the new password logs in
    assert client.get("/probe/any").status_code == 200
    assert other_device.get("/probe/any").status_code == 302
    assert _post_login(other_device, password=PASSWORD).status_code == 401
    assert _post_login(other_device, password="a brand new passphrase").status_code == 302
    english = client.get("/account/password?lang=en").get_data(as_text=True)
    assert "Change password" in english and "Current password" in english


def test_wrong_current_passwords_on_the_page_lock_the_account(client: FlaskClient) -> None:
    _post_login(client)
    answers = [_change_on_the_page(client, f"guess number {i}", "a brand new passphrase")
               for i in range(6)]
    assert [a.status_code for a in answers] == [401] * 4 + [429, 429]
    assert int(answers[-1].headers["Retry-After"]) > 60
    # the lock is the account's: the right password does not log in elsewhere either
    assert _post_login(client.application.test_client()).status_code == 429


def test_disabled_user_is_logged_out(client: FlaskClient, web_db: sessionmaker[Session]) -> None:
    _post_login(client)
    with session_scope(web_db) as session:
        session.execute(text("UPDATE users SET is_active = :no"), {"no": False})
    assert client.get("/probe/any").status_code == 302


def test_session_ends_after_its_lifetime(client: FlaskClient) -> None:
    _post_login(client)
    with client.session_transaction() as session:
        session["logged_in_at"] -= 8 * 3600 - 60
    assert client.get("/probe/any").status_code == 200
    with client.session_transaction() as session:
        session["logged_in_at"] -= 120
    assert client.get("/probe/any").status_code == 302


def test_public_pages_need_no_token(client: FlaskClient) -> None:
    # the stateless verification page and API are exempt from CSRF (and need no login)
    response = client.post("/api/v1/verify", data=b"x", content_type="text/plain")
    assert response.status_code == 415
    page = client.post("/verify", data={}, content_type="multipart/form-data")
    assert page.status_code == 400 and "ファイルが選択されていません" in page.get_data(as_text=True)


# -- the secret key ---------------------------------------------------------------------------


def test_secret_key_file_is_created_once_and_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KOIN_SECRET_KEY", raising=False)
    first = create_app({"KOIN_HOME": str(tmp_path)}).secret_key
    path = tmp_path / "secret_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert isinstance(first, str) and len(first) == 64
    assert create_app({"KOIN_HOME": str(tmp_path)}).secret_key == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".secret_key")]

    path.chmod(0o644)
    with pytest.raises(KoinError) as caught:
        resolve_secret_key(tmp_path)
    assert "chmod 600" in caught.value.message_en

    monkeypatch.setenv("KOIN_SECRET_KEY", "x" * 40)
    assert create_app({"KOIN_HOME": str(tmp_path)}).secret_key == "x" * 40
    monkeypatch.setenv("KOIN_SECRET_KEY", "short")
    with pytest.raises(KoinError):
        create_app({"KOIN_HOME": str(tmp_path)})


def test_concurrent_starts_agree_on_one_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KOIN_SECRET_KEY", raising=False)
    start = threading.Barrier(8)

    def resolve() -> str:
        start.wait(timeout=30)
        return resolve_secret_key(tmp_path)

    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: resolve(), range(8)))
    assert len(keys) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret_key"]


# -- the command line -------------------------------------------------------------------------


@pytest.fixture
def cli_home(
    koin_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home)
    for leftover in home.glob("koin.db*"):
        leftover.unlink()
    (home / "secret_key").unlink(missing_ok=True)
    monkeypatch.setenv("KOIN_HOME", str(home))
    monkeypatch.setenv("KOIN_LANG", "en")
    monkeypatch.delenv("KOIN_DATABASE_URL", raising=False)
    monkeypatch.delenv("KOIN_SECRET_KEY", raising=False)
    return home


def _cli_sessions(home: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(contracts.database_url(home))
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


@pytest.fixture
def cli_db(cli_home: Path) -> Iterator[sessionmaker[Session]]:
    yield from _cli_sessions(cli_home)


def _printed_password(output: str) -> str:
    [password] = re.findall(
        r"^(?:初期パスワード\(この一度だけ表示します。|Initial password \(shown this once only;)"
        r".*: (\S+)$", output, re.MULTILINE,
    )
    return password


def _everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


def test_init_creates_the_first_admin_once(
    cli_home: Path, cli_db: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    result = CliRunner().invoke(cli, ["init", "--admin-email", "Kanri@Pref.Ibaraki.example"])
    assert result.exit_code == 0, result.output
    password = _printed_password(result.stdout)
    assert result.stdout.count(password) == 1 and password not in result.stderr
    assert password not in _everything_logged(caplog)
    assert "Created the administrator account: kanri@pref.ibaraki.example" in result.stdout
    assert_english(result.output)
    assert stat.S_IMODE((cli_home / "secret_key").stat().st_mode) == 0o600
    admin = _login(cli_db, "kanri@pref.ibaraki.example", password)
    assert admin.roles == {UserRole.ADMIN}

    again = CliRunner().invoke(cli, ["init"])
    assert again.exit_code == 0, again.output
    assert "An administrator account already exists." in again.stdout
    assert "Initial password" not in again.stdout
    assert_english(again.output)
    with cli_db() as session:
        assert session.scalar(select(text("count(*)")).select_from(User)) == 1


def test_init_refuses_an_admin_email_taken_by_a_non_admin(
    cli_home: Path, cli_db: sessionmaker[Session]
) -> None:
    created = CliRunner().invoke(cli, ["users", "create", "admin@koin.local", "--role", "officer"])
    assert created.exit_code == 0, created.output
    result = CliRunner().invoke(cli, ["init"])
    assert result.exit_code == 1
    assert result.stderr == (
        "koin: The account admin@koin.local is not an administrator; give another --admin-email.\n"
    )


def test_users_create_prints_the_password_once(
    cli_home: Path, cli_db: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    result = CliRunner().invoke(
        cli,
        ["users", "create", "Sato@Pref.Ibaraki.example", "--role", "officer", "--role", "signer",
         "--name", "佐藤 一郎"],
    )
    assert result.exit_code == 0, result.output
    password = _printed_password(result.stdout)
    assert result.stdout.count(password) == 1 and password not in result.stderr
    assert password not in _everything_logged(caplog)
    assert "Created the account: sato@pref.ibaraki.example (officer, signer)" in result.stdout
    assert_english(result.output)
    user = _login(cli_db, "sato@pref.ibaraki.example", password)
    assert user.roles == {UserRole.OFFICER, UserRole.SIGNER} and user.display_name == "佐藤 一郎"

    # the same request again changes nothing and shows no password
    again = CliRunner().invoke(
        cli, ["users", "create", "sato@pref.ibaraki.example", "--role", "signer", "--role",
              "officer"],
    )
    assert again.exit_code == 0
    assert "The account already exists (unchanged): sato@pref.ibaraki.example" in again.stdout
    assert "Initial password" not in again.stdout
    assert_english(again.output)
    # other roles for an existing account are refused with one line
    other = CliRunner().invoke(cli, ["users", "create", "sato@pref.ibaraki.example", "--role",
                                     "admin"])
    assert other.exit_code == 1 and other.stderr.count("\n") == 1
    assert "already exists" in other.stderr
    assert _login(cli_db, "sato@pref.ibaraki.example", password).roles == user.roles


def test_users_create_with_a_password_file(
    cli_home: Path, cli_db: sessionmaker[Session], tmp_path: Path
) -> None:
    password_file = tmp_path / "password.txt"
    password_file.write_text("given long password\n")
    result = CliRunner().invoke(
        cli, ["users", "create", "ito@example.jp", "--role", "signer", "--password-file",
              str(password_file)],
    )
    assert result.exit_code == 0, result.output
    assert "Initial password" not in result.stdout and "given long password" not in result.output
    assert_english(result.output)
    assert _login(cli_db, "ito@example.jp", "given long password").email == "ito@example.jp"

    password_file.write_text("short\n")
    refused = CliRunner().invoke(
        cli, ["users", "create", "kato@example.jp", "--role", "signer", "--password-file",
              str(password_file)],
    )
    assert refused.exit_code == 1
    assert refused.stderr == "koin: A password must have 12 to 1024 characters.\n"


@pytest.mark.parametrize(
    ("args", "exit_code"),
    [
        (["users", "create", "not-an-email", "--role", "officer"], 1),
        (["users", "create", "a@example.jp"], 2),
        (["users", "create", "a@example.jp", "--role", "root"], 2),
    ],
)
def test_users_create_refusals(cli_home: Path, args: list[str], exit_code: int) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == exit_code
    if exit_code == 1:
        assert result.stderr.count("\n") == 1 and "cannot be used" in result.stderr



def test_users_reset_password_prints_a_new_one_once(
    cli_home: Path, cli_db: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    created = CliRunner().invoke(cli, ["users", "create", "sato@pref.ibaraki.example",
                                       "--role", "signer"])
    old = _printed_password(created.stdout)
    result = CliRunner().invoke(cli, ["users", "reset-password", "Sato@Pref.Ibaraki.example"])
    assert result.exit_code == 0, result.output
    new = _printed_password(result.stdout)
    assert new != old and result.stdout.count(new) == 1 and new not in result.stderr
    assert "Issued a new password: sato@pref.ibaraki.example" in result.stdout
    assert_english(result.output)
    assert new not in _everything_logged(caplog)
    assert _login(cli_db, "sato@pref.ibaraki.example", new).email == "sato@pref.ibaraki.example"
    with pytest.raises(LoginFailed):
        _login(cli_db, "sato@pref.ibaraki.example", old)
    unknown = CliRunner().invoke(cli, ["users", "reset-password", "nobody@example.jp"])
    assert unknown.exit_code == 1 and unknown.stderr.count("\n") == 1
    assert "nobody@example.jp" in unknown.stderr


def test_init_and_users_speak_japanese_by_default(
    cli_home: Path, cli_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KOIN_LANG")
    init = CliRunner().invoke(cli, ["init"])
    assert init.exit_code == 0, init.output
    assert "管理者のアカウントを作成しました: admin@koin.local" in init.stdout
    _printed_password(init.stdout)
    assert_japanese(init.output)
    created = CliRunner().invoke(cli, ["users", "create", "sato@pref.ibaraki.example",
                                       "--role", "signer"])
    assert created.exit_code == 0, created.output
    assert "アカウントを作成しました: sato@pref.ibaraki.example (signer)" in created.stdout
    old = _printed_password(created.stdout)
    again = CliRunner().invoke(cli, ["users", "create", "sato@pref.ibaraki.example",
                                     "--role", "signer"])
    assert "アカウントは既にあります(変更なし): sato@pref.ibaraki.example" in again.stdout
    reset = CliRunner().invoke(cli, ["users", "reset-password", "sato@pref.ibaraki.example"])
    assert reset.exit_code == 0, reset.output
    assert "パスワードを再発行しました: sato@pref.ibaraki.example" in reset.stdout
    assert _printed_password(reset.stdout) != old

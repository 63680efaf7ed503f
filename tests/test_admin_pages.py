"""The administrator's pages (``web/admin_views.py``): the index, staff accounts and the audit
search. Flask's test client on SQLite and PostgreSQL (roles and CSRF enforced), and an
administrator in Debian's Chromium on a real ``koin serve`` who creates an account whose
password then works."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from playwright.sync_api import Browser
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

from contracts import (
    InvalidAccountData,
    User,
    UserRole,
    create_contract,
    create_user,
    send_contract,
    session_scope,
)
from contracts.accounts import set_user_active
from tests.conftest import PUBLIC_URL
from tests.servers import chromium, served_with_staff
from tests.test_workflow import HANAKO, TARO
from web import admin_views, create_app, services

SECRET = "test-secret-key-0123456789abcdef-not-for-production"
PASSWORD = "correct horse battery staple"
ADMIN = "kanri@pref.ibaraki.example"
OFFICER = "keiyaku@pref.ibaraki.example"
SIGNER = "hisho@pref.ibaraki.example"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_PASSWORD = re.compile(r'<code id="new-password">([a-z2-9-]+)</code>')
_ADMIN_GETS = ("/admin", "/admin/users", "/admin/audit")
_ADMIN_POSTS = ("/admin/users", "/admin/users/roles", "/admin/users/active",
                "/admin/users/password")


# -- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def people(sessions: sessionmaker[Session]) -> dict[str, int]:
    ids = {}
    with session_scope(sessions) as session:
        for email, roles, name in (
            (ADMIN, ["admin"], "管理 者"),
            (OFFICER, ["officer"], "契約 担当"),
            (SIGNER, ["signer"], "秘書 課"),
        ):
            user, _ = create_user(session, email, roles, password=PASSWORD, display_name=name)
            ids[email] = user.id
    return ids


@pytest.fixture
def app(
    koin_home: Path, db_url: str, sessions: sessionmaker[Session], people: dict[str, int]
) -> Iterator[Flask]:
    app = create_app({
        "KOIN_HOME": str(koin_home), "KOIN_DATABASE_URL": db_url, "KOIN_PUBLIC_URL": PUBLIC_URL,
        "SECRET_KEY": SECRET, "TESTING": True,
    })
    yield app
    services.close(app)


def _csrf(client: FlaskClient, path: str = "/login") -> str:
    page = client.get(path).get_data(as_text=True)
    found = _CSRF.search(page)
    assert found, page
    return found.group(1)


def _login(client: FlaskClient, email: str, password: str = PASSWORD) -> TestResponse:
    return client.post(
        "/login", data={"csrf_token": _csrf(client), "email": email, "password": password}
    )


def _client(app: Flask, email: str) -> FlaskClient:
    client = app.test_client()
    assert _login(client, email).status_code == 302
    return client


def _post(client: FlaskClient, path: str, **form: object) -> TestResponse:
    return client.post(path, data={"csrf_token": _csrf(client, "/admin/users"), **form})


def _user(sessions: sessionmaker[Session], email: str) -> User:
    with sessions() as session:
        user = session.scalars(select(User).where(User.email == email)).one()
        session.expunge(user)
        return user


def _row(page: str, email: str) -> str:
    found = re.search(rf'<tr data-email="{re.escape(email)}".*?</tr>', page, re.S)
    assert found, f"no row for {email}"
    return found.group(0)


# -- who may ------------------------------------------------------------------------------------


def test_only_administrators_get_in(app: Flask) -> None:
    anonymous = app.test_client()
    for path in _ADMIN_GETS:
        answer = anonymous.get(path)
        assert answer.status_code == 302 and "/login" in answer.headers["Location"], path
    for email in (OFFICER, SIGNER):
        client = _client(app, email)
        assert 'id="nav-admin"' not in client.get("/").get_data(as_text=True)
        for path in _ADMIN_GETS:
            assert client.get(path).status_code == 403, (email, path)
        token = _csrf(client, "/")
        for path in _ADMIN_POSTS:
            answer = client.post(path, data={"csrf_token": token, "user_id": "1",
                                              "role": "admin", "active": "no",
                                              "email": "x@pref.ibaraki.example"})
            assert answer.status_code == 403, (email, path)

    admin = _client(app, ADMIN)
    assert 'id="nav-admin"' in admin.get("/").get_data(as_text=True)
    index = admin.get("/admin")
    page = index.get_data(as_text=True)
    assert index.status_code == 200 and index.headers["Cache-Control"] == "no-store"
    for href in ('href="/admin/users"', 'href="/admin/apikeys"', 'href="/admin/webhooks"',
                 'href="/admin/audit"', 'href="/admin/status"', 'href="/admin/templates"'):
        assert href in page, href
    assert "Staff accounts" in admin.get("/admin?lang=en").get_data(as_text=True)


def test_every_form_needs_its_csrf_token(
    app: Flask, sessions: sessionmaker[Session], people: dict[str, int]
) -> None:
    admin = _client(app, ADMIN)
    other = _csrf(app.test_client())  # a token of another session
    forms = {
        "/admin/users": {"email": "new@pref.ibaraki.example", "role": "signer"},
        "/admin/users/roles": {"user_id": str(people[SIGNER]), "role": "admin"},
        "/admin/users/active": {"user_id": str(people[SIGNER]), "active": "no"},
    }
    for path, form in forms.items():
        for token in ({}, {"csrf_token": "forged"}, {"csrf_token": other}):
            answer = admin.post(path, data={**form, **token})
            assert answer.status_code == 400, (path, token)
            assert "フォームの有効期限" in answer.get_data(as_text=True)
    signer = _user(sessions, SIGNER)
    assert signer.is_active and signer.roles == {UserRole.SIGNER}
    with sessions() as session:
        assert session.scalar(select(User).where(User.email == "new@pref.ibaraki.example")) is None


# -- accounts -----------------------------------------------------------------------------------


def test_create_shows_the_password_once_and_it_works(
    app: Flask, sessions: sessionmaker[Session]
) -> None:
    admin = _client(app, ADMIN)
    listing = admin.get("/admin/users").get_data(as_text=True)
    for email in (ADMIN, OFFICER, SIGNER):
        assert email in _row(listing, email)
    assert "未ログイン" in _row(listing, SIGNER) and "未ログイン" not in _row(listing, ADMIN)
    assert "toggle-active" not in _row(listing, ADMIN)  # not oneself
    assert "toggle-active" in _row(listing, SIGNER)

    created = _post(admin, "/admin/users", email=" Mito.Taro@Pref.Ibaraki.example ",
                    display_name="水戸  太郎", role=["officer", "signer"])
    assert created.status_code == 303 and created.headers["Location"] == "/admin/users"
    shown = admin.get("/admin/users")
    page = shown.get_data(as_text=True)
    assert shown.headers["Cache-Control"] == "no-store"
    password = _PASSWORD.search(page)
    assert password, page
    assert 'id="new-user-email">mito.taro@pref.ibaraki.example<' in page
    row = _row(page, "mito.taro@pref.ibaraki.example")
    assert "水戸 太郎" in row and row.count("checked") == 2
    again = admin.get("/admin/users").get_data(as_text=True)
    assert password.group(1) not in again and 'id="new-password"' not in again

    newcomer = app.test_client()
    assert _login(newcomer, "mito.taro@pref.ibaraki.example", password.group(1)).status_code == 302
    assert _user(sessions, "mito.taro@pref.ibaraki.example").roles == {
        UserRole.OFFICER, UserRole.SIGNER}

    for form, status, message in (
        ({"email": OFFICER, "role": "signer"}, 409, "既にあります"),
        ({"email": "not an address", "role": "signer"}, 422, "使えません"),
        ({"email": "norole@pref.ibaraki.example"}, 422, "役割を一つ以上"),
        ({"email": "x@pref.ibaraki.example", "role": "root"}, 422, "のいずれか"),
    ):
        refused = _post(admin, "/admin/users", **form)
        body = refused.get_data(as_text=True)
        assert refused.status_code == status, (form, body)
        assert 'id="error"' in body and message in body, (form, body)
        assert 'id="new-password"' not in body


def test_roles_and_deactivation(
    app: Flask, sessions: sessionmaker[Session], people: dict[str, int]
) -> None:
    admin = _client(app, ADMIN)
    signer = _client(app, SIGNER)
    assert signer.get("/account/apikeys").status_code == 200

    changed = _post(admin, "/admin/users/roles", user_id=people[SIGNER],
                    role=["signer", "officer"])
    assert changed.status_code == 303
    assert _user(sessions, SIGNER).roles == {UserRole.SIGNER, UserRole.OFFICER}
    assert signer.get("/contracts").status_code == 200  # the new role works at once
    message = admin.get("/admin/users").get_data(as_text=True)
    assert 'id="message"' in message and "officer, signer" in message

    # Deactivated: the open session ends and logging in is refused; reactivated: works again.
    assert _post(admin, "/admin/users/active", user_id=people[SIGNER],
                 active="no").status_code == 303
    assert not _user(sessions, SIGNER).is_active
    assert 'data-active="false"' in _row(admin.get("/admin/users").get_data(as_text=True), SIGNER)
    assert signer.get("/account/apikeys").status_code == 302
    assert _login(app.test_client(), SIGNER).status_code == 401
    assert _post(admin, "/admin/users/active", user_id=people[SIGNER],
                 active="yes").status_code == 303
    assert _login(app.test_client(), SIGNER).status_code == 302

    # Never oneself, never the last administrator.
    refusals: list[tuple[str, dict[str, object], str]] = [
        ("/admin/users/active", {"user_id": people[ADMIN], "active": "no"},
         "自分のアカウントは無効にできません"),
        ("/admin/users/roles", {"user_id": people[ADMIN], "role": "officer"},
         "最後の管理者は外せません"),
        ("/admin/users/roles", {"user_id": people[OFFICER]}, "役割を一つ以上"),
    ]
    for path, form, text_ in refusals:
        refused = _post(admin, path, **form)
        assert refused.status_code == 422 and text_ in refused.get_data(as_text=True), form
    assert _user(sessions, ADMIN).roles == {UserRole.ADMIN} and _user(sessions, ADMIN).is_active
    assert _user(sessions, OFFICER).roles == {UserRole.OFFICER}
    with sessions() as session:  # the service refuses it whoever asks (rolled back)
        only_admin = session.get_one(User, people[ADMIN])
        officer = session.get_one(User, people[OFFICER])
        with pytest.raises(InvalidAccountData, match="last administrator"):
            set_user_active(session, only_admin, False, actor=officer)

    # With a second administrator, the first may give up the role.
    assert _post(admin, "/admin/users/roles", user_id=people[OFFICER],
                 role=["officer", "admin"]).status_code == 303
    assert _post(admin, "/admin/users/roles", user_id=people[ADMIN],
                 role=["signer"]).status_code == 303
    assert admin.get("/admin/users").status_code == 403

    for bad, status in (({"user_id": "x", "active": "no"}, 400),
                        ({"user_id": "999999", "active": "no"}, 404),
                        ({"user_id": str(people[SIGNER]), "active": "maybe"}, 400)):
        officer_admin = _client(app, OFFICER)
        answer = officer_admin.post("/admin/users/active", data={
            "csrf_token": _csrf(officer_admin, "/admin/users"), **bad})
        assert answer.status_code == status, bad
    assert _user(sessions, SIGNER).is_active


# -- audit search -------------------------------------------------------------------------------


@pytest.fixture
def contracts_sent(
    tmp_path: Path, sessions: sessionmaker[Session], people: dict[str, int],
    one_page_permit: bytes,
) -> list[tuple[str, str]]:
    """Two contracts sent to their parties: ``(public_id, document_id)`` each."""
    sent = []
    with session_scope(sessions) as session:
        for title in ("県道改良工事", "橋梁補修工事"):
            contract = create_contract(
                session, home=tmp_path, officer_id=people[OFFICER], title=title,
                pdf=one_page_permit, parties=[HANAKO, TARO],
            )
            send_contract(session, contract, public_url=PUBLIC_URL)
            sent.append((contract.public_id, contract.document_id))
    return sent


def _events(page: str) -> list[tuple[str, str]]:
    return re.findall(r'<tr data-kind="(\w+)" data-seq="\d+" data-contract="([\w-]+)"', page)


def test_audit_search(
    app: Flask, sessions: sessionmaker[Session], contracts_sent: list[tuple[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (first, first_doc), (second, _) = contracts_sent
    admin = _client(app, ADMIN)
    everything = admin.get("/admin/audit").get_data(as_text=True)
    all_events = _events(everything)
    assert {c for _, c in all_events} == {first, second}
    assert 'id="chain-check"' not in everything

    one = admin.get(f"/admin/audit?contract={first}").get_data(as_text=True)
    assert {c for _, c in _events(one)} == {first}
    assert 'id="chain-check" data-ok="true"' in one and "県道改良工事" in one
    by_document_id = admin.get(f"/admin/audit?contract={first_doc.lower()}")
    assert _events(by_document_id.get_data(as_text=True)) == _events(one)

    by_party = _events(admin.get(f"/admin/audit?actor={TARO.email.upper()}").get_data(
        as_text=True))
    assert by_party and all(kind == "email_queued" for kind, _ in by_party)
    by_officer = _events(admin.get(f"/admin/audit?actor={OFFICER}").get_data(as_text=True))
    assert sorted(by_officer) == sorted([("created", first), ("created", second)])
    created_row = re.search(
        rf'<tr data-kind="created" data-seq="1" data-contract="{first}".*?</tr>', one, re.S)
    assert created_row and "契約 担当" in created_row.group(0)  # the officer, by name
    assert {k for k, _ in _events(admin.get("/admin/audit?kind=sent").get_data(
        as_text=True))} == {"sent"}

    with sessions() as session:
        from contracts import Contract

        original = session.scalars(select(Contract.original_sha256).where(
            Contract.public_id == first)).one()
    by_sha = _events(admin.get(f"/admin/audit?document={original}").get_data(as_text=True))
    assert by_sha and {c for _, c in by_sha} <= {first, second}

    today = dt.datetime.now(dt.UTC).astimezone(dt.timezone(dt.timedelta(hours=9))).date()
    assert len(_events(admin.get(f"/admin/audit?from={today}&to={today}").get_data(
        as_text=True))) == len(all_events)
    empty = admin.get("/admin/audit?from=2001-01-01&to=2001-01-31").get_data(as_text=True)
    assert _events(empty) == [] and 'id="empty"' in empty
    unknown = admin.get("/admin/audit?contract=no-such-contract").get_data(as_text=True)
    assert _events(unknown) == [] and 'id="chain-check"' not in unknown

    for query, message in (("from=yesterday", "日付「yesterday」を読み取れません"),
                           ("from=2026-12-01&to=2026-11-01", "期間の終わりが始まりより前です"),
                           ("document=abc", "SHA-256(16 進 64 桁)か文書番号"),
                           ("actor=someone", "メールアドレスか IP アドレス"),
                           ("kind=hacked", "イベントの種類の指定が正しくありません"),
                           ("contract=%3Cscript%3E", "契約 ID か文書番号")):
        refused = admin.get(f"/admin/audit?{query}")
        assert refused.status_code == 400 and message in refused.get_data(as_text=True), query
    english = admin.get("/admin/audit?kind=hacked&lang=en").get_data(as_text=True)
    assert "Unknown event type." in english

    # Pages: newest first, each event once.
    monkeypatch.setattr(admin_views, "AUDIT_PAGE", 3)
    seen: list[tuple[str, str]] = []
    page_number = 1
    while True:
        page = admin.get(f"/admin/audit?page={page_number}").get_data(as_text=True)
        seen += _events(page)
        if 'id="next-page"' not in page:
            break
        page_number += 1
    assert page_number > 1 and seen == all_events

    # A row altered behind koin's back: the chain check says so.
    with sessions() as session, session.begin():
        session.execute(text(
            "UPDATE audit_events SET email = 'mallory@example.com' WHERE seq = 1 AND "
            "contract_id = (SELECT id FROM contracts WHERE public_id = :p)"), {"p": first})
    broken = admin.get(f"/admin/audit?contract={first}").get_data(as_text=True)
    assert 'id="chain-check" data-ok="false" data-broken-seq="1"' in broken


# -- in a browser -------------------------------------------------------------------------------


@pytest.fixture
def server(koin_home: Path, tmp_path: Path) -> Iterator[str]:
    with served_with_staff(koin_home, tmp_path, PASSWORD, [(ADMIN, "admin", "管理 者")]) as url:
        yield url


@pytest.fixture
def browser() -> Iterator[Browser]:
    with chromium() as instance:
        yield instance


def test_users_page_in_chromium(server: str, browser: Browser, tmp_path: Path) -> None:
    context = browser.new_context(viewport={"width": 1100, "height": 900}, locale="ja-JP")
    page = context.new_page()
    errors: list[str] = []  # failed requests (but the favicon, which koin has none of)
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}")
            if r.status >= 400 and not r.url.endswith("/favicon.ico") else None)
    page.goto(f"{server}/login")
    page.fill("input[name=email]", ADMIN)
    page.fill("input[name=password]", PASSWORD)
    page.click("#login-button")
    page.wait_for_selector("#nav-admin")
    with page.expect_navigation():
        page.click("#nav-admin")
    with page.expect_navigation():
        page.click("#admin-users")
    assert page.url.endswith("/admin/users")

    page.fill("#new-email", "hitachi.jiro@pref.ibaraki.example")
    page.fill("#new-name", "常陸 次郎")
    page.check("#create-form input[value=signer]")
    with page.expect_navigation():
        page.click("#create-user")
    password = page.locator("#new-password").inner_text()
    assert re.fullmatch(r"[a-z2-9]{5}(-[a-z2-9]{5}){3}", password), password
    row = page.locator('tr[data-email="hitachi.jiro@pref.ibaraki.example"]')
    assert "常陸 次郎" in row.inner_text()
    page.screenshot(path=str(tmp_path / "admin-users.png"), full_page=True)

    # Give the new account the officer role too, then switch it off.
    row.locator("input[name=role][value=officer]").check()
    with page.expect_navigation():
        row.locator("button.save-roles").click()
    assert "officer, signer" in page.locator("#message").inner_text()
    row = page.locator('tr[data-email="hitachi.jiro@pref.ibaraki.example"]')
    with page.expect_navigation():
        row.locator("button.toggle-active").click()
    assert page.locator('tr[data-email="hitachi.jiro@pref.ibaraki.example"]').get_attribute(
        "data-active") == "false"
    assert page.locator("#new-password").count() == 0  # shown once only
    with page.expect_navigation():
        page.locator('tr[data-email="hitachi.jiro@pref.ibaraki.example"] button.toggle-active'
                     ).click()

    # The new person logs in with the password shown.
    other = browser.new_context(locale="ja-JP").new_page()
    other.goto(f"{server}/login")
    other.fill("input[name=email]", "hitachi.jiro@pref.ibaraki.example")
    other.fill("input[name=password]", password)
    other.click("#login-button")
    other.wait_for_selector("#current-user")
    assert other.locator("#current-user").inner_text() == "常陸 次郎"
    assert other.locator("#nav-contracts").count() == 1 and other.locator("#nav-admin").count() == 0
    assert errors == []
    context.close()


def test_a_forgotten_password_is_reissued_once(
    app: Flask, sessions: sessionmaker[Session], people: dict[str, int]
) -> None:
    admin = _client(app, ADMIN)
    signer = _client(app, SIGNER)
    assert signer.get("/sign").status_code == 200
    with session_scope(sessions) as session:  # locked out after too many wrong passwords
        user = session.get(User, people[SIGNER])
        assert user is not None
        user.failed_logins = 5
        user.locked_until = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=15)
    answer = _post(admin, "/admin/users/password", user_id=people[SIGNER])
    assert answer.status_code == 303
    page = admin.get("/admin/users").get_data(as_text=True)
    found = _PASSWORD.search(page)
    assert found and SIGNER in page
    new_password = found.group(1)
    assert _PASSWORD.search(admin.get("/admin/users").get_data(as_text=True)) is None  # once
    assert signer.get("/sign").status_code == 302  # the old session ended with the old hash
    assert _login(app.test_client(), SIGNER).status_code != 302  # old password refused
    assert _login(app.test_client(), SIGNER, new_password).status_code == 302  # lockout lifted
    own = _post(admin, "/admin/users/password", user_id=people[ADMIN])
    assert own.status_code == 422 and "reset-password" in own.get_data(as_text=True)
    assert _post(admin, "/admin/users/password", user_id=999999).status_code == 404
    assert _post(admin, "/admin/users/password", user_id="x").status_code == 400

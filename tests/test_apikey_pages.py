"""API key pages (``web/apikey_views.py``): staff create, see once and revoke their own keys;
administrators manage everyone's. Flask's test client on SQLite and PostgreSQL, and one signer in
Debian's Chromium on a real ``koin serve`` who creates a ``sign`` key, copies it from the page and
signs a PDF with it through ``POST /api/v1/sign``."""

from __future__ import annotations

import hashlib
import html
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from asn1crypto import x509 as asn1_x509
from flask import Flask
from flask.testing import FlaskClient
from playwright.sync_api import Browser, Page
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

from contracts import ApiKey, User, create_api_key, create_user, session_scope
from tests.conftest import PUBLIC_URL
from tests.servers import chromium, free_port, koin_process
from tests.validators import pyhanko_status
from web import create_app, services

SECRET = "test-secret-key-0123456789abcdef-not-for-production"
PASSWORD = "correct horse battery staple"
SIGNER = "hisho@pref.ibaraki.example"
OFFICER = "keiyaku@pref.ibaraki.example"
ADMIN = "admin@pref.ibaraki.example"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_NEW_KEY = re.compile(r'<textarea id="new-key"[^>]*>(koin_[0-9a-f]{8}_[A-Za-z0-9_-]{43})<')
_ANY_KEY = re.compile(r"koin_[0-9a-f]{8}_[A-Za-z0-9_-]{43}")


# -- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def people(sessions: sessionmaker[Session]) -> dict[str, int]:
    ids = {}
    with session_scope(sessions) as session:
        for email, roles, name in (
            (SIGNER, ["signer"], "秘書 課"),
            (OFFICER, ["officer"], "契約 担当"),
            (ADMIN, ["admin"], "管理 者"),
        ):
            user, _ = create_user(session, email, roles, password=PASSWORD, display_name=name)
            ids[email] = user.id
    return ids


@pytest.fixture
def app(
    koin_home: Path, db_url: str, sessions: sessionmaker[Session], people: dict[str, int]
) -> Iterator[Flask]:
    app = create_app(
        {
            "KOIN_HOME": str(koin_home),
            "KOIN_DATABASE_URL": db_url,
            "KOIN_PUBLIC_URL": PUBLIC_URL,
            "SECRET_KEY": SECRET,
            "TESTING": True,
        }
    )
    yield app
    with app.app_context():  # the app's own engine: close its connections
        services.session_factory().kw["bind"].dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _csrf(client: FlaskClient, path: str = "/login") -> str:
    page = client.get(path).get_data(as_text=True)
    found = _CSRF.search(page)
    assert found, page
    return found.group(1)


def _login(client: FlaskClient, email: str) -> None:
    response = client.post(
        "/login", data={"csrf_token": _csrf(client), "email": email, "password": PASSWORD}
    )
    assert response.status_code == 302, response.get_data(as_text=True)


def _post(client: FlaskClient, path: str, page: str, **form: object) -> TestResponse:
    return client.post(path, data={"csrf_token": _csrf(client, page), **form})


def _keys(sessions: sessionmaker[Session]) -> list[ApiKey]:
    with sessions() as session:
        return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def _row(page: str, prefix: str) -> str:
    found = re.search(rf'<tr data-prefix="{prefix}".*?</tr>', page, re.S)
    assert found, f"no row for {prefix}"
    return found.group(0)


def _sign_with(client: FlaskClient, key: str, pdf: bytes) -> TestResponse:
    return client.post(
        "/api/v1/sign?no_stamp=true&level=B-B", data=pdf, content_type="application/pdf",
        headers={"Authorization": f"Bearer {key}"},
    )


# -- one's own keys -------------------------------------------------------------------------------


def test_create_shows_the_key_once_and_it_works(
    client: FlaskClient, sessions: sessionmaker[Session], one_page_permit: bytes
) -> None:
    _login(client, SIGNER)
    home = client.get("/")
    assert 'id="nav-apikeys"' in home.get_data(as_text=True)
    empty = client.get("/account/apikeys")
    page = empty.get_data(as_text=True)
    assert empty.status_code == 200 and empty.headers["Cache-Control"] == "no-store"
    assert 'id="no-keys"' in page and 'name="csrf_token"' in page
    # a signer may choose sign and verify, not contracts
    assert re.findall(r'name="scope" value="(\w+)"', page) == ["sign", "verify"]
    assert 'id="all-keys"' not in page  # not an administrator

    created = _post(client, "/account/apikeys", "/account/apikeys",
                    name="  文書管理   システム ", scope=["sign"])
    assert created.status_code == 303 and created.headers["Location"] == "/account/apikeys"
    with client.session_transaction() as cookie_session:  # encrypted in the session, never plain
        assert not any(_ANY_KEY.search(str(v)) for v in cookie_session.values())

    shown = client.get("/account/apikeys").get_data(as_text=True)
    found = _NEW_KEY.search(shown)
    assert found, shown
    raw = found.group(1)
    assert "このキーは今だけ表示されます。" in shown and 'id="copy-key"' in shown
    [key] = _keys(sessions)
    assert key.prefix == raw.split("_")[1] and key.name == "文書管理 システム"
    assert key.scopes == "sign" and key.key_sha256 == hashlib.sha256(raw.encode()).hexdigest()
    row = _row(shown, key.prefix)
    assert f"koin_{key.prefix}_…" in row and "未使用" in row and "有効" in row

    # Never again: not on the next display, not in the database in plain text.
    again = client.get("/account/apikeys").get_data(as_text=True)
    assert raw not in again and 'id="new-key"' not in again
    assert f"koin_{key.prefix}_…" in again
    with sessions() as session:
        for table in ("api_keys", "users"):
            dump = " ".join(str(row) for row in session.execute(text(f"SELECT * FROM {table}")))
            assert raw.split("_", 2)[2] not in dump, table

    # The key signs through the API, and the page then shows when it was last used.
    signed = _sign_with(client, raw, one_page_permit)
    assert signed.status_code == 200, signed.get_json()
    used = _row(client.get("/account/apikeys").get_data(as_text=True), key.prefix)
    assert "未使用" not in used


def test_refused_keys_show_the_form_again(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    _login(client, SIGNER)
    for form, message in [
        ({"name": "x", "scope": ["contracts"]}, "役割 officer がないため"),  # forged checkbox
        ({"name": "x", "scope": ["admin"]}, "スコープ 'admin' はありません"),
        ({"name": "x"}, "スコープを一つ以上指定してください。"),
        ({"name": "   ", "scope": ["sign"]}, "API キーの名前は 1 文字以上 100 文字以下"),
        ({"name": "x" * 101, "scope": ["sign"]}, "API キーの名前は 1 文字以上 100 文字以下"),
    ]:
        response = _post(client, "/account/apikeys", "/account/apikeys", **form)
        page = html.unescape(response.get_data(as_text=True))
        assert response.status_code == 422, (form, page)
        assert message in page and 'id="error"' in page, form
        assert 'id="new-key"' not in page
    kept = _post(client, "/account/apikeys", "/account/apikeys", name="残す名前", scope=["admin"])
    assert 'value="残す名前"' in kept.get_data(as_text=True)
    english = client.post(
        "/account/apikeys?lang=en",
        data={"csrf_token": _csrf(client, "/account/apikeys"), "name": "x"},
    )
    assert english.status_code == 422
    assert "Give at least one scope." in english.get_data(as_text=True)
    assert _keys(sessions) == []


def test_revoke_needs_confirmation_and_only_ones_own(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    people: dict[str, int],
    one_page_permit: bytes,
) -> None:
    with session_scope(sessions) as session:
        mine, raw = create_api_key(
            session, session.get_one(User, people[SIGNER]), name="mine", scopes=["sign"]
        )
        theirs, _ = create_api_key(
            session, session.get_one(User, people[OFFICER]), name="theirs", scopes=["contracts"]
        )
        mine_prefix, theirs_prefix = mine.prefix, theirs.prefix
    _login(client, SIGNER)
    page = client.get("/account/apikeys").get_data(as_text=True)
    assert theirs_prefix not in page  # only one's own keys
    assert f'action="/account/apikeys/{mine_prefix}/revoke"' in page

    unconfirmed = _post(client, f"/account/apikeys/{mine_prefix}/revoke", "/account/apikeys")
    assert unconfirmed.status_code == 400
    assert "「この API キーを失効させます」にチェックを入れてください" in unconfirmed.get_data(
        as_text=True
    )
    foreign = _post(client, f"/account/apikeys/{theirs_prefix}/revoke", "/account/apikeys",
                    confirm="yes")
    assert foreign.status_code == 404
    unknown = _post(client, "/account/apikeys/00000000/revoke", "/account/apikeys", confirm="yes")
    assert unknown.status_code == 404
    assert all(key.revoked_at is None for key in _keys(sessions))

    revoked = _post(client, f"/account/apikeys/{mine_prefix}/revoke", "/account/apikeys",
                    confirm="yes")
    assert revoked.status_code == 303
    after = client.get("/account/apikeys").get_data(as_text=True)
    assert f"API キー koin_{mine_prefix}_… を失効させました。" in after
    row = _row(after, mine_prefix)
    assert 'class="revoked"' in row and "失効" in row and "/revoke" not in row
    response = _sign_with(client, raw, one_page_permit)
    assert response.status_code == 401


def test_forms_without_csrf_token_are_refused(
    client: FlaskClient, sessions: sessionmaker[Session], people: dict[str, int]
) -> None:
    with session_scope(sessions) as session:
        key, _ = create_api_key(
            session, session.get_one(User, people[SIGNER]), name="k", scopes=["sign"]
        )
        prefix = key.prefix
    _login(client, SIGNER)
    created = client.post("/account/apikeys", data={"name": "x", "scope": "sign"})
    assert created.status_code == 400
    assert "フォームの有効期限が切れたか" in created.get_data(as_text=True)
    revoked = client.post(f"/account/apikeys/{prefix}/revoke", data={"confirm": "yes"})
    assert revoked.status_code == 400
    [only] = _keys(sessions)
    assert only.revoked_at is None


def test_pages_need_a_login(client: FlaskClient) -> None:
    response = client.get("/account/apikeys")
    assert response.status_code == 302 and "/login?next=/account/apikeys" in response.headers[
        "Location"
    ]
    assert client.get("/admin/apikeys").status_code == 302
    assert 'id="nav-apikeys"' not in client.get("/login").get_data(as_text=True)


# -- the administrator's page ---------------------------------------------------------------------


def test_only_administrators_see_everyones_keys(
    client: FlaskClient, sessions: sessionmaker[Session], people: dict[str, int]
) -> None:
    _login(client, OFFICER)
    assert client.get("/admin/apikeys").status_code == 403
    token = _csrf(client, "/account/apikeys")
    forged = client.post(
        "/admin/apikeys",
        data={"csrf_token": token, "user_id": people[SIGNER], "name": "x", "scope": "sign"},
    )
    assert forged.status_code == 403
    with session_scope(sessions) as session:
        key, _ = create_api_key(
            session, session.get_one(User, people[SIGNER]), name="k", scopes=["sign"]
        )
        prefix = key.prefix
    forged = client.post(
        f"/admin/apikeys/{prefix}/revoke", data={"csrf_token": token, "confirm": "yes"}
    )
    assert forged.status_code == 403
    assert _keys(sessions)[0].revoked_at is None


def test_administrator_creates_and_revokes_anyones_key(
    client: FlaskClient, sessions: sessionmaker[Session], people: dict[str, int]
) -> None:
    with session_scope(sessions) as session:
        signer_key, _ = create_api_key(
            session, session.get_one(User, people[SIGNER]), name="文書管理", scopes=["sign"]
        )
        signer_prefix = signer_key.prefix
    _login(client, ADMIN)
    own = client.get("/account/apikeys").get_data(as_text=True)
    assert 'id="all-keys"' in own
    assert re.findall(r'name="scope" value="(\w+)"', own) == ["verify"]  # admin: no sign role

    page = client.get("/admin/apikeys").get_data(as_text=True)
    assert "文書管理" in _row(page, signer_prefix) and SIGNER in _row(page, signer_prefix)
    assert re.findall(r'name="scope" value="(\w+)"', page) == ["sign", "contracts", "verify"]
    assert f'<option value="{people[OFFICER]}"' in page

    # A scope the chosen user's roles do not allow; no user; an unknown user.
    refused = _post(client, "/admin/apikeys", "/admin/apikeys",
                    user_id=people[OFFICER], name="x", scope=["sign"])
    assert refused.status_code == 422
    assert "役割 signer がないため" in refused.get_data(as_text=True)
    for user_id in ("", "999999", "abc"):
        response = _post(client, "/admin/apikeys", "/admin/apikeys",
                         user_id=user_id, name="x", scope=["verify"])
        assert response.status_code == 400, user_id
        assert "API キーを発行する職員を選んでください。" in response.get_data(as_text=True)

    created = _post(client, "/admin/apikeys", "/admin/apikeys",
                    user_id=people[OFFICER], name="契約システム", scope=["contracts"])
    assert created.status_code == 303 and created.headers["Location"] == "/admin/apikeys"
    # shown once, on the admin page only
    assert 'id="new-key"' not in client.get("/account/apikeys").get_data(as_text=True)
    created = _post(client, "/admin/apikeys", "/admin/apikeys",
                    user_id=people[OFFICER], name="契約システム 2", scope=["contracts"])
    shown = client.get("/admin/apikeys").get_data(as_text=True)
    found = _NEW_KEY.search(shown)
    assert found
    with sessions() as session:
        officer_keys = list(session.scalars(
            select(ApiKey).where(ApiKey.user_id == people[OFFICER]).order_by(ApiKey.id)
        ))
    assert [k.name for k in officer_keys] == ["契約システム", "契約システム 2"]
    assert officer_keys[1].prefix == found.group(1).split("_")[1]
    assert found.group(1) not in client.get("/admin/apikeys").get_data(as_text=True)

    revoked = _post(client, f"/admin/apikeys/{signer_prefix}/revoke", "/admin/apikeys",
                    confirm="yes")
    assert revoked.status_code == 303
    with sessions() as session:
        key = session.scalar(select(ApiKey).where(ApiKey.prefix == signer_prefix))
        assert key is not None and key.revoked_at is not None
    assert _post(client, "/admin/apikeys/ffffffff/revoke", "/admin/apikeys",
                 confirm="yes").status_code == 404


# -- in the browser -------------------------------------------------------------------------------


def _koin(home: Path, *args: str) -> None:
    koin = Path(sys.executable).parent / "koin"
    result = subprocess.run(
        [str(koin), *args], capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "KOIN_HOME": str(home)},
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def server(koin_home: Path, tmp_path: Path) -> Iterator[str]:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home, ignore=shutil.ignore_patterns("koin.db*"))
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD)
    _koin(home, "db", "upgrade")
    for email, role, name in ((SIGNER, "signer", "秘書 課"), (ADMIN, "admin", "管理 者")):
        _koin(home, "users", "create", email, "--role", role, "--name", name,
              "--password-file", str(password_file))
    port = free_port()
    with koin_process(home, "serve", "--port", str(port), port=port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def browser(one_page_permit: bytes) -> Iterator[Browser]:
    # The PDF fixture is made first: Playwright's sync API keeps an event loop on this thread,
    # and pyHanko's sync API calls asyncio.run.
    with chromium() as instance:
        yield instance


def _browser_login(page: Page, server: str, email: str) -> None:
    page.goto(f"{server}/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", PASSWORD)
    with page.expect_navigation():
        page.click("#login-button")


def test_signer_creates_a_key_in_the_browser_and_signs_with_it(
    server: str,
    browser: Browser,
    one_page_permit: bytes,
    root_cert: asn1_x509.Certificate,
    tmp_path: Path,
) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, locale="ja-JP")
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server)
    page = context.new_page()
    _browser_login(page, server, SIGNER)
    with page.expect_navigation():
        page.click("#nav-apikeys")
    assert page.locator("h1").inner_text() == "API キー"
    page.fill("#key-name", "文書管理システム")
    page.check("input[name=scope][value=sign]")
    with page.expect_navigation():
        page.click("#create-key")
    assert "このキーは今だけ表示されます。" in page.locator("#new-key-section").inner_text()
    page.screenshot(path=str(tmp_path / "apikeys-new-phone.png"), full_page=True)

    page.click("#copy-key")
    page.wait_for_selector("#copy-key:has-text('コピーしました')")
    key = page.evaluate("navigator.clipboard.readText()")
    assert re.fullmatch(r"koin_[0-9a-f]{8}_[A-Za-z0-9_-]{43}", key), key
    assert key == page.input_value("#new-key")

    page.reload()
    assert page.locator("#new-key").count() == 0 and key not in page.content()
    assert page.locator("#keys tbody tr").count() == 1

    response = requests.post(
        f"{server}/api/v1/sign", data=one_page_permit,
        headers={"Content-Type": "application/pdf", "Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Koin-SHA256"] == hashlib.sha256(response.content).hexdigest()
    with ThreadPoolExecutor(1) as pool:  # pyHanko's sync API may not run on Playwright's loop
        status = pool.submit(pyhanko_status, response.content, root_cert).result()
    assert status.bottom_line and status.timestamp_validity is not None

    page.reload()
    assert "未使用" not in page.locator("#keys tbody tr").inner_text()
    page.screenshot(path=str(tmp_path / "apikeys-phone.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})
    page.screenshot(path=str(tmp_path / "apikeys-desktop.png"), full_page=True)

    # Revoked on the page (after ticking the confirmation), the key no longer signs.
    page.click("#keys details.revoke summary")
    page.screenshot(path=str(tmp_path / "apikeys-revoke-desktop.png"), full_page=True)
    page.check("#keys details.revoke input[name=confirm]")
    with page.expect_navigation():
        page.click("#keys details.revoke button")
    assert "を失効させました" in page.locator("#message").inner_text()
    page.goto(f"{server}/account/apikeys?lang=en")
    assert page.locator("#keys tbody tr .status").inner_text() == "Revoked"
    page.screenshot(path=str(tmp_path / "apikeys-revoked-en-desktop.png"), full_page=True)
    refused = requests.post(
        f"{server}/api/v1/sign", data=one_page_permit,
        headers={"Content-Type": "application/pdf", "Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert refused.status_code == 401

    # The administrator's page, at both widths, with the signer's key.
    admin_context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="ja-JP")
    admin = admin_context.new_page()
    _browser_login(admin, server, ADMIN)
    admin.goto(f"{server}/admin/apikeys")
    assert "文書管理システム" in admin.locator("#keys").inner_text()
    admin.screenshot(path=str(tmp_path / "admin-apikeys-desktop.png"), full_page=True)
    admin.set_viewport_size({"width": 390, "height": 844})
    admin.screenshot(path=str(tmp_path / "admin-apikeys-phone.png"), full_page=True)
    admin_context.close()
    context.close()

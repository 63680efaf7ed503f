"""Security of the web service: CSRF on every form, cookie flags, security headers on every
page (and no inline script anywhere, checked in Chromium under the policy too), rate limits of
the public forms, and no secret in any log line of a whole flow in real ``koin`` processes.

The pages are walked on one installation holding everything a page can show: staff of each
role, a completed contract and one waiting for its parties, a stamp template, a signed
document, API keys, a batch and the development mailbox.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html.parser
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.routing import Rule
from werkzeug.test import TestResponse

import contracts
import keys
from contracts import (
    OutboxMessage,
    PartySpec,
    SigningChannel,
    create_api_key,
    create_contract,
    create_user,
    deliver_due,
    send_contract,
    session_scope,
    sign_and_record,
)
from contracts.devmail import DevMailServer
from contracts.migrate import upgrade
from contracts.templates import create_template
from keys import Role
from signer import Installation, SignOptions
from tests.conftest import PUBLIC_URL
from tests.servers import chromium, free_port, wait_for_port, wsgi_server
from web import auth, create_app, security, services

SECRET = "test-secret-key-0123456789abcdef-not-for-production"
PASSWORD = "correct horse battery staple"
ACCESS_CODE = "73920418"
TITLE = "県道123号線 道路改良工事 請負契約書"
ADMIN, OFFICER, SIGNER = (
    "kanri@pref.ibaraki.example", "keiyaku@pref.ibaraki.example", "shomei@pref.ibaraki.example"
)
HANAKO = PartySpec(
    name="茨城 花子", organisation="茨城県 土木部", email="hanako@pref.ibaraki.example",
    role="prefecture", identification="access_code", access_code=ACCESS_CODE,
)
TARO = PartySpec(
    name="常陸 太郎", organisation="株式会社 水戸建設", email="taro@mito-kensetsu.example",
    role="contractor", identification="email_otp",
)
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_LINK = re.compile(r"/c/([A-Za-z0-9_-]{43})\b")
_DOWNLOAD = re.compile(r"/d/([A-Za-z0-9_-]{43})\b")
_OTP = re.compile(r"確認コード: (\d{6})")
#: Blueprints and views that take POSTs without a CSRF token, and why (web/__init__.py):
#: the API (keys in a header, no cookies), the public verification (no side effects), the TSA.
CSRF_EXEMPT_BLUEPRINTS = {"api", "api_batches", "api_contracts", "verify"}
CSRF_EXEMPT_VIEWS = {"web.pki.tsa"}
#: Views exempted from the global check because they call ``csrf.protect()`` themselves (e.g.
#: after raising an upload limit): still posted to without a token below. A staff member of
#: every role is refused with 400; a client without a login may be sent to /login first.
CSRF_CHECKED_IN_VIEW = {"web.batch_views.sign_submit"}
NO_LIMITS = {name: (1000.0, 1000) for name in security.DEFAULT_RATE_LIMITS}


# -- the installation with everything a page can show --------------------------------------------


@dataclass
class World:
    app: Flask
    sessions: sessionmaker[Session]
    home: Path
    #: logged-in staff, by role; "anonymous"; "party" (identified, waiting); "party_done"
    clients: dict[str, FlaskClient]
    values: dict[str, str]  # URL parameters
    api_key: str  # scopes sign and contracts (officer + signer)
    secrets: dict[str, str] = field(default_factory=dict)
    log_records: list[str] = field(default_factory=list)


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(self.format(record))


def _csrf(response: TestResponse | str) -> str:
    text = response if isinstance(response, str) else response.get_data(as_text=True)
    found = _CSRF.search(text)
    assert found, text[:500]
    return found.group(1)


def _login(client: FlaskClient, email: str) -> None:
    token = _csrf(client.get("/login"))
    done = client.post("/login", data={"csrf_token": token, "email": email, "password": PASSWORD})
    assert done.status_code == 302, done.get_data(as_text=True)


def _mail_bodies(sessions: sessionmaker[Session], to: str, tag: str | None = None
                 ) -> list[str]:
    query = select(OutboxMessage).where(OutboxMessage.to_address == to)
    if tag is not None:
        query = query.where(OutboxMessage.tag == tag)
    with sessions() as session:
        return [m.text_body for m in session.scalars(query.order_by(OutboxMessage.id))]


def _mail_text(sessions: sessionmaker[Session], to: str, pattern: re.Pattern[str]) -> str:
    bodies = _mail_bodies(sessions, to)
    found = [pattern.search(body) for body in bodies]
    matches = [m for m in found if m]
    assert matches, f"nothing matching {pattern.pattern} mailed to {to}"
    return matches[-1].group(1)


def _identify(client: FlaskClient, sessions: sessionmaker[Session], token: str,
              party: PartySpec) -> str:
    """Open the link and enter the right code; the review page."""
    opened = client.get(f"/c/{token}")
    assert opened.status_code == 200, opened.get_data(as_text=True)[:500]
    code = ACCESS_CODE if party is HANAKO else _mail_text(sessions, party.email, _OTP)
    done = client.post(f"/c/{token}/code", data={"csrf_token": _csrf(opened), "code": code})
    assert done.status_code == 303, done.get_data(as_text=True)[:500]
    review = client.get(f"/c/{token}").get_data(as_text=True)
    assert 'id="consent-form"' in review
    return review


def _consent(client: FlaskClient, token: str, review: str) -> None:
    sha = re.search(r'name="document_sha256" value="([0-9a-f]{64})"', review)
    assert sha
    done = client.post(f"/c/{token}/consent", data={
        "csrf_token": _csrf(review), "agree": "yes", "document_sha256": sha.group(1)})
    assert done.status_code == 303, done.get_data(as_text=True)[:500]


@pytest.fixture(scope="module")
def world(koin_home: Path, tmp_path_factory: pytest.TempPathFactory, permit_pdf: bytes
          ) -> Iterator[World]:
    home = tmp_path_factory.mktemp("security") / "home"
    shutil.copytree(koin_home, home, ignore=shutil.ignore_patterns("koin.db*"))
    url = f"sqlite:///{home}/koin.db"
    upgrade(url)
    records: list[str] = []
    collector = _Collect(records)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(collector)
    root.setLevel(logging.DEBUG)
    try:
        app = create_app({
            "KOIN_HOME": str(home), "KOIN_DATABASE_URL": url, "KOIN_PUBLIC_URL": PUBLIC_URL,
            "SECRET_KEY": SECRET, "TESTING": True, "KOIN_DEV_MODE": True,
            "KOIN_RATE_LIMITS": NO_LIMITS,
        })
        with app.app_context():
            sessions = services.session_factory()
        world = _populate(app, sessions, home, permit_pdf)
    finally:
        root.removeHandler(collector)
        root.setLevel(old_level)
    world.log_records = records
    yield world
    services.close(app)


def _populate(app: Flask, sessions: sessionmaker[Session], home: Path, pdf: bytes) -> World:
    with session_scope(sessions) as session:
        users = {}
        for email, roles in ((ADMIN, ["admin"]), (OFFICER, ["officer"]), (SIGNER, ["signer"]),
                             ("both@pref.ibaraki.example", ["officer", "signer"]),
                             ("every-role@pref.ibaraki.example", ["admin", "officer", "signer"])):
            users[email], _ = create_user(session, email, roles, password=PASSWORD,
                                          display_name=email[:6])
        _, api_key = create_api_key(session, users["both@pref.ibaraki.example"], name="walk",
                                    scopes=["sign", "contracts"])
        create_api_key(session, users[SIGNER], name="listed", scopes=["sign"])
        create_template(session, "kensetsu-kyoka", title="建設業許可通知書", qr=True)
        completed = create_contract(session, home=home, officer_id=users[OFFICER].id,
                                    title=TITLE, pdf=pdf, parties=[HANAKO, TARO])
        send_contract(session, completed, public_url=PUBLIC_URL)
        waiting = create_contract(session, home=home, officer_id=users[OFFICER].id,
                                  title=TITLE + "(第2号)", pdf=pdf, parties=[HANAKO, TARO])
        send_contract(session, waiting, public_url=PUBLIC_URL)
        completed_id, waiting_id = completed.public_id, waiting.public_id
    with app.app_context():
        installation = services.installation()
        signed = sign_and_record(
            sessions, pdf, installation.signing_context(Role.POSITION), SignOptions(),
            role=Role.POSITION, file_name="permit.pdf", channel=SigningChannel.WEB,
        )
    clients = {"anonymous": app.test_client()}
    for role, email in (("admin", ADMIN), ("officer", OFFICER), ("signer", SIGNER)):
        clients[role] = app.test_client()
        _login(clients[role], email)

    # Both parties of the first contract consent in their browsers: it is signed at once.
    tokens: dict[str, list[str]] = {}
    for party in (HANAKO, TARO):
        bodies = _mail_bodies(sessions, party.email, "contract-invitation")
        tokens[party.email] = [m.group(1) for b in bodies if (m := _LINK.search(b))]
    done_client = app.test_client()
    _consent(done_client, tokens[HANAKO.email][0],
             _identify(done_client, sessions, tokens[HANAKO.email][0], HANAKO))
    taro_client = app.test_client()
    _consent(taro_client, tokens[TARO.email][0],
             _identify(taro_client, sessions, tokens[TARO.email][0], TARO))
    clients["party_done"] = done_client
    # Hanako's link of the second contract: identified, the review page with 合意する.
    clients["party"] = app.test_client()
    _identify(clients["party"], sessions, tokens[HANAKO.email][1], HANAKO)
    download = _mail_text(sessions, HANAKO.email, _DOWNLOAD)

    # The outbox into the development mailbox, for its pages.
    with DevMailServer(home, port=0) as mailbox:
        deliver_due(sessions, mailbox.transport())
    mail_name = sorted(p.stem for p in (home / "mail").glob("*.eml"))[0]

    auth_header = {"Authorization": f"Bearer {api_key}"}
    batch = clients["anonymous"].post("/api/v1/batches", json={"name": "walk"},
                                      headers=auth_header).get_json()["id"]
    with sessions() as session:
        prefix = session.scalars(select(contracts.ApiKey)).first()
        assert prefix is not None
    with session_scope(sessions) as session:  # a webhook endpoint and one delivery
        from contracts.webhooks import WebhookEvent, create_endpoint, enqueue_event

        endpoint, webhook_secret = create_endpoint(
            session, "http://127.0.0.1:9/koin-hook", events=[WebhookEvent.BATCH_FINISHED],
            created_by=users[ADMIN].id,
        )
        [delivery] = enqueue_event(session, WebhookEvent.BATCH_FINISHED, {"walk": True})
        endpoint_id, delivery_pk = endpoint.id, delivery.id
    with app.app_context():  # a PDF signed on the staff signing page, kept a day
        from contracts.staff_signing import sign_for_staff

        page_signed = sign_for_staff(
            sessions, pdf, services.installation().signing_context(Role.POSITION),
            home=home, user_id=users[SIGNER].id, file_name="page.pdf", template=None,
            public_url=PUBLIC_URL,
        )
    values = {
        "endpoint_id": str(endpoint_id), "delivery_pk": str(delivery_pk),
        "document_id": page_signed.document_id,
        "doc_id": signed.document_id, "contract": completed_id, "waiting": waiting_id,
        "batch": batch, "template": "kensetsu-kyoka", "mail": mail_name, "ca": "root-ca",
        "token_done": tokens[HANAKO.email][0], "token": tokens[HANAKO.email][1],
        "download": download, "number": "1", "position": "1", "prefix": prefix.prefix,
    }
    world = World(app, sessions, home, clients, values, api_key)
    world.secrets = {
        "webhook secret": webhook_secret,
        "session secret": SECRET, "password": PASSWORD, "access code": ACCESS_CODE,
        "API key": api_key, **{f"link {i}": t for i, t in enumerate(
            [*tokens[HANAKO.email], *tokens[TARO.email], download])},
        "one-time code": _mail_text(sessions, TARO.email, _OTP),
    }
    return world


# -- CSRF -----------------------------------------------------------------------------------------


def test_csrf_exemptions_are_exactly_the_stateless_endpoints(world: World) -> None:
    exempt = {getattr(b, "name", b) for b in auth.csrf._exempt_blueprints}
    assert exempt == CSRF_EXEMPT_BLUEPRINTS
    assert auth.csrf._exempt_views == CSRF_EXEMPT_VIEWS | CSRF_CHECKED_IN_VIEW


def _post_rules(app: Flask) -> list[Rule]:
    return sorted((r for r in app.url_map.iter_rules() if "POST" in (r.methods or ())),
                  key=lambda r: r.rule)


def _view_name(app: Flask, rule: Rule) -> str:
    view = app.view_functions[rule.endpoint]
    return f"{view.__module__}.{view.__name__}"


def _is_exempt(app: Flask, rule: Rule) -> bool:
    blueprint = rule.endpoint.rsplit(".", 1)[0] if "." in rule.endpoint else None
    return blueprint in CSRF_EXEMPT_BLUEPRINTS or _view_name(app, rule) in CSRF_EXEMPT_VIEWS


def test_every_form_refuses_a_post_without_csrf_token(world: World) -> None:
    """Every POST route of the app except the declared exemptions: without a token, with a
    forged one, and with another session's; as a staff member holding every role, a party
    and an anonymous visitor."""
    protected = [r for r in _post_rules(world.app) if not _is_exempt(world.app, r)]
    assert len(protected) >= 15, [r.rule for r in protected]
    other = _csrf(world.app.test_client().get("/login"))  # a token of another session
    staff = world.app.test_client()
    _login(staff, "every-role@pref.ibaraki.example")
    for rule in protected:
        path = _url(rule, world.values)
        in_view = _view_name(world.app, rule) in CSRF_CHECKED_IN_VIEW
        for who, client in (("staff", staff), ("party", world.clients["party"]),
                            ("anonymous", world.clients["anonymous"])):
            for data in ({}, {"csrf_token": "forged"}, {"csrf_token": other}):
                response = client.post(path, data=data)
                if in_view and who != "staff" and response.status_code == 302:
                    assert "/login" in response.headers["Location"], (rule.rule, who)
                    continue
                assert response.status_code == 400, (rule.rule, who, data, response.status_code)
                text = response.get_data(as_text=True)
                assert "送信元を確認できませんでした" in text, (rule.rule, text[:300])


# -- cookies ------------------------------------------------------------------------------------


def _set_cookies(response: TestResponse, name: str) -> list[str]:
    return [v for v in response.headers.getlist("Set-Cookie") if v.startswith(f"{name}=")]


@pytest.mark.parametrize("public_url", ["http://127.0.0.1:8000", "https://koin.pref.example"])
def test_cookie_flags(world: World, public_url: str) -> None:
    app = create_app({
        "KOIN_HOME": str(world.home), "KOIN_DATABASE_URL": f"sqlite:///{world.home}/koin.db",
        "KOIN_PUBLIC_URL": public_url, "SECRET_KEY": SECRET, "TESTING": True,
        "KOIN_RATE_LIMITS": NO_LIMITS,
    })
    https = public_url.startswith("https")
    client = app.test_client()
    page = client.get("/login?lang=en")
    [language] = _set_cookies(page, "koin_lang")
    token = _csrf(page)
    login = client.post("/login", data={"csrf_token": token, "email": OFFICER,
                                        "password": PASSWORD})
    assert login.status_code == 302
    [session_cookie] = _set_cookies(login, "koin_session")
    for cookie in (session_cookie, language):
        flags = {part.strip().split("=")[0].lower(): part for part in cookie.split(";")[1:]}
        assert "httponly" in flags and flags["samesite"].strip().lower() == "samesite=lax"
        assert ("secure" in flags) is https, cookie
    assert ("Strict-Transport-Security" in login.headers) is https
    if https:
        assert "max-age=" in login.headers["Strict-Transport-Security"]
    services.close(app)


# -- headers on every page ------------------------------------------------------------------------


def _value(rule: Rule, name: str, values: dict[str, str]) -> str:
    endpoint = rule.endpoint
    if name == "name":
        if endpoint.startswith("pki."):
            return values["ca"]
        if endpoint.startswith("devmail."):
            return values["mail"]
        return values["template"]
    if name == "public_id":
        return values["batch"] if endpoint.startswith("api_batches.") else values["contract"]
    if name == "token":
        return values["download"] if rule.rule.startswith("/d/") else values["token"]
    assert name in values, f"no value for <{name}> of {rule.rule}: add one in _populate"
    return values[name]


def _url(rule: Rule, values: dict[str, str], **override: str) -> str:
    arguments = {name: override.get(name) or _value(rule, name, values)
                 for name in rule.arguments}
    path = rule.rule
    for name, value in arguments.items():
        path = re.sub(rf"<(?:[a-z]+:)?{name}>", value, path)
    return path


class _InlineFinder(html.parser.HTMLParser):
    """Inline scripts, event handler attributes, ``javascript:`` URLs and inline styles."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "script":
            source = attributes.get("src")
            if not source:
                self.found.append("<script> without src")
            else:
                self.scripts.append(source)
            self._in_script = True
        if tag == "style":
            self.found.append("<style> element")
        for name, value in attrs:
            if name.startswith("on"):
                self.found.append(f"<{tag} {name}=…>")
            if name == "style":
                self.found.append(f"<{tag} style=…>")
            if value and value.strip().lower().startswith("javascript:"):
                self.found.append(f"<{tag} {name}=javascript:…>")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.found.append("script content")


def _check_headers(path: str, response: TestResponse, endpoint: str | None) -> None:
    headers = response.headers
    where = f"{path} ({response.status_code})"
    csp = headers.get("Content-Security-Policy", "")
    assert csp == security.CONTENT_SECURITY_POLICY, where
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp
    assert headers.get("X-Frame-Options") == "DENY", where
    assert headers.get("X-Content-Type-Options") == "nosniff", where
    link_page = path.startswith(("/c/", "/d/"))
    assert headers.get("Referrer-Policy") == ("no-referrer" if link_page else "strict-origin"), (
        where)
    if endpoint in ("static", "pki.crl", "pki.ca_certificate"):
        assert "no-store" not in headers.get("Cache-Control", ""), where
    else:
        assert headers.get("Cache-Control") == "no-store", where
    assert "Strict-Transport-Security" not in headers, where  # http installation
    if response.mimetype == "text/html":
        finder = _InlineFinder()
        finder.feed(response.get_data(as_text=True))
        assert finder.found == [], (where, finder.found)
        assert all(s.startswith("/static/") for s in finder.scripts), (where, finder.scripts)


#: Who requests which pages: party links only from the party's own browser (anyone else
#: opening them would open the link anew); everything else from everyone.
_VIEWERS = ("anonymous", "admin", "officer", "signer")


def test_security_headers_on_every_page(world: World) -> None:
    visited: set[str] = set()
    statuses: dict[str, set[int]] = {}
    rules = [r for r in world.app.url_map.iter_rules() if "GET" in (r.methods or ())]
    for rule in rules:
        if rule.endpoint == "static":
            requests_ = [("anonymous", f"/static/{name}", {})
                         for name in ("style.css", "party.js", "verify.js")]
        elif rule.rule.startswith("/c/"):
            requests_ = [("party", _url(rule, world.values), {}),
                         ("party_done", _url(rule, world.values,
                                             token=world.values["token_done"]), {}),
                         ("anonymous", _url(rule, world.values, token="x" * 43), {})]
        elif rule.rule.startswith("/api/"):
            header = {"Authorization": f"Bearer {world.api_key}"}
            requests_ = [("anonymous", _url(rule, world.values), header),
                         ("anonymous", _url(rule, world.values), {})]
        else:
            requests_ = [(who, _url(rule, world.values), {}) for who in _VIEWERS]
        for who, path, headers in requests_:
            with world.clients[who].get(path, headers=headers) as response:
                _check_headers(path, response, rule.endpoint)
                assert response.status_code < 500, (who, path, response.status_code)
                statuses.setdefault(rule.rule, set()).add(response.status_code)
        visited.add(rule.rule)
    assert visited == {r.rule for r in rules}
    # The walk reached the real pages, not only refusals:
    for page in ("/", "/verify", "/contracts", "/contracts/<public_id>", "/admin/templates",
                 "/account/apikeys", "/admin/apikeys", "/c/<token>", "/c/<token>/done",
                 "/c/<token>/pages/<int:number>.png", "/d/<token>", "/dev/mailbox/<name>",
                 "/verify/<doc_id>", "/admin/templates/<name>/edit"):
        assert 200 in statuses[page], (page, statuses[page])


def test_headers_on_error_answers_and_posts(world: World) -> None:
    client = world.clients["anonymous"]
    for response, path in (
        (client.get("/no/such/page"), "/no/such/page"),
        (client.post("/verify", data={}), "/verify"),
        (client.post("/api/v1/verify", data=b"x", content_type="text/plain"), "/api/v1/verify"),
        (client.get("/c/" + "y" * 43), "/c/" + "y" * 43),
    ):
        assert 400 <= response.status_code < 500
        _check_headers(path, response, None)


def test_https_installation_sends_hsts_everywhere(world: World) -> None:
    app = create_app({
        "KOIN_HOME": str(world.home), "KOIN_DATABASE_URL": f"sqlite:///{world.home}/koin.db",
        "KOIN_PUBLIC_URL": "https://koin.pref.example", "SECRET_KEY": SECRET, "TESTING": True,
    })
    client = app.test_client()
    for path in ("/", "/verify", "/login", "/c/" + "z" * 43, "/static/style.css", "/nope"):
        with client.get(path) as response:
            hsts = response.headers.get("Strict-Transport-Security", "")
        assert hsts.startswith("max-age=63072000"), path
    services.close(app)


def test_trusted_proxy_gives_the_client_address(world: World) -> None:
    """Behind KOIN_TRUSTED_PROXIES reverse proxies, the rate limits count the client's
    address (X-Forwarded-For), not the proxy's; without it, the header is ignored."""
    limits = {**NO_LIMITS, "verify_ip": (0.001, 1)}
    for hops, expected in ((1, [400, 400, 429]), (0, [400, 429, 429])):
        app = create_app({
            "KOIN_HOME": str(world.home), "KOIN_DATABASE_URL": f"sqlite:///{world.home}/koin.db",
            "KOIN_PUBLIC_URL": PUBLIC_URL, "SECRET_KEY": SECRET, "TESTING": True,
            "KOIN_TRUSTED_PROXIES": hops, "KOIN_RATE_LIMITS": limits,
        })
        client = app.test_client()
        got = [client.post("/api/v1/verify", data={}, content_type="multipart/form-data",
                           headers={"X-Forwarded-For": forwarded}).status_code
               for forwarded in ("198.51.100.1", "198.51.100.2", "198.51.100.2")]
        assert got == expected, hops
        services.close(app)


# -- the pages in Chromium, under the policy --------------------------------------------------


def test_pages_work_under_the_policy_in_chromium(world: World, tmp_path: Path) -> None:
    """Chromium enforces the policy: the scripts of the verify page, the new-contract form,
    the API key page and a party's consent page run, and nothing is refused."""
    _send_contract(world, TITLE + "(第3号)")
    token = _last_link(world.sessions, HANAKO.email)
    with wsgi_server(world.app.wsgi_app) as base, chromium() as browser:
        context = browser.new_context(viewport={"width": 390, "height": 844}, locale="ja-JP")
        context.add_init_script(
            "window.__violations = [];"
            "document.addEventListener('securitypolicyviolation', e => "
            "window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));"
        )
        page = context.new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        base = base.rstrip("/")

        page.goto(f"{base}/verify")
        assert page.locator("#drop").count() == 1
        page.goto(f"{base}/login")
        page.fill("input[name=email]", OFFICER)
        page.fill("input[name=password]", PASSWORD)
        page.click("#login-button")
        page.wait_for_selector("#current-user")
        page.goto(f"{base}/contracts/new")
        assert page.locator("#add-party").is_visible()  # contract_form.js ran
        page.goto(f"{base}/account/apikeys")
        page.fill("#key-name", "CSP check")
        page.locator("#create-form input[name=scope]").first.check()
        page.click("#create-key")
        page.wait_for_selector("#copy-key", state="visible")  # apikeys.js ran
        violations = page.evaluate("window.__violations")
        page.click("#logout-button")

        page.goto(f"{base}/c/{token}")
        page.fill("input[name=code]", ACCESS_CODE)
        page.locator("#code-form button[type=submit]").click()
        page.wait_for_selector("#consent-form")
        button = page.locator("#consent-form button[type=submit]")
        assert button.is_disabled()  # party.js ran: 合意する waits for the box
        page.check("#consent-form input[name=agree]")
        assert button.is_enabled()
        page.screenshot(path=str(tmp_path / "party-review.png"), full_page=True)
        violations += page.evaluate("window.__violations")
        context.close()
    assert violations == [], violations
    assert not [m for m in console if "Content Security Policy" in m], console


def _send_contract(world: World, title: str) -> None:
    """A one-page contract with Hanako (access code) and Taro (one-time code), sent."""
    sessions = world.sessions
    with session_scope(sessions) as session:
        contract = create_contract(
            session, home=world.home, officer_id=_user_id(sessions, OFFICER), title=title,
            pdf=_original(world), parties=[HANAKO, TARO],
        )
        send_contract(session, contract, public_url=PUBLIC_URL)


def _user_id(sessions: sessionmaker[Session], email: str) -> int:
    with sessions() as session:
        user = contracts.get_user_by_email(session, email)
        assert user is not None
        return user.id


def _original(world: World) -> bytes:
    from signer.samples import make_permit_pdf

    return make_permit_pdf(Installation(world.home).font_file, pages=1)


def _last_link(sessions: sessionmaker[Session], email: str) -> str:
    """The link of the latest invitation to ``email``."""
    found = _LINK.search(_mail_bodies(sessions, email, "contract-invitation")[-1])
    assert found
    return found.group(1)


# -- rate limits ----------------------------------------------------------------------------------


@pytest.fixture
def limited(world: World) -> Iterator[Flask]:
    """The world's installation with small rate limits (fresh buckets)."""
    app = create_app({
        "KOIN_HOME": str(world.home), "KOIN_DATABASE_URL": f"sqlite:///{world.home}/koin.db",
        "KOIN_PUBLIC_URL": PUBLIC_URL, "SECRET_KEY": SECRET, "TESTING": True,
        "KOIN_RATE_LIMITS": {
            "login_ip": (0.001, 5), "login_account": (0.001, 3),
            "code_ip": (0.001, 3), "code_link": (0.001, 2), "verify_ip": (0.001, 2),
        },
    })
    yield app
    services.close(app)


def _from(ip: str) -> dict[str, Any]:
    return {"environ_base": {"REMOTE_ADDR": ip}}


def _retry_after(response: TestResponse) -> int:
    assert response.status_code == 429, response.get_data(as_text=True)[:300]
    wait = int(response.headers["Retry-After"])
    assert 1 <= wait <= 3600
    return wait


def test_login_is_limited_per_account_and_per_address(limited: Flask) -> None:
    client = limited.test_client()
    token = _csrf(client.get("/login"))

    def login(email: str, ip: str, password: str = "wrong") -> TestResponse:
        return client.post("/login", data={"csrf_token": token, "email": email,
                                           "password": password}, **_from(ip))

    # one account from ever new addresses: 3 tries, then 429 — even with the right password
    assert [login(SIGNER, f"192.0.2.{i}").status_code for i in range(3)] == [401] * 3
    refused = login(SIGNER, "192.0.2.50", PASSWORD)
    _retry_after(refused)
    again = login(SIGNER.upper(), "192.0.2.51")  # the same account, however it is spelt
    assert _retry_after(again) and "ログインの試行が多すぎます" in again.get_data(as_text=True)
    assert "ログインの試行が多すぎます" in refused.get_data(as_text=True)
    assert "koin_session" not in refused.headers.get("Set-Cookie", "")
    # one address trying many accounts: 5 tries, then 429
    got = [login(f"nobody{i}@pref.ibaraki.example", "203.0.113.9").status_code
           for i in range(6)]
    assert got == [401] * 5 + [429]
    # another address and another account are not affected
    assert login(OFFICER, "198.51.100.7", PASSWORD).status_code == 302


def test_party_codes_are_limited_per_link_and_per_address(limited: Flask, world: World) -> None:
    sessions = world.sessions
    tokens: list[str] = []
    for number in range(2):
        _send_contract(world, f"{TITLE}(制限 {number})")
        tokens += [_last_link(sessions, HANAKO.email), _last_link(sessions, TARO.email)]

    def opened(token: str) -> tuple[FlaskClient, str]:
        client = limited.test_client()
        page = client.get(f"/c/{token}", **_from("192.0.2.1"))
        assert page.status_code == 200
        return client, _csrf(page)

    def enter(client: FlaskClient, csrf: str, token: str, ip: str) -> TestResponse:
        return client.post(f"/c/{token}/code", data={"csrf_token": csrf, "code": "00000000"},
                           **_from(ip))

    # one link from ever new addresses: 2 codes, then 429
    client, csrf = opened(tokens[0])
    assert [enter(client, csrf, tokens[0], f"198.51.100.{i}").status_code
            for i in range(2)] == [400, 400]
    refused = enter(client, csrf, tokens[0], "198.51.100.99")
    _retry_after(refused)
    assert 'data-kind="RateLimited"' in refused.get_data(as_text=True)
    # one address on many links: 3 codes, then 429
    statuses = []
    for token in tokens[1:]:
        client, csrf = opened(token)
        statuses.append(enter(client, csrf, token, "203.0.113.77").status_code)
    client, csrf = opened(tokens[1])
    statuses.append(enter(client, csrf, tokens[1], "203.0.113.77").status_code)
    assert statuses == [400, 400, 400, 429]
    # the right code from elsewhere still works on a link that was not hammered
    _send_contract(world, f"{TITLE}(制限 ok)")
    fresh = _last_link(sessions, HANAKO.email)
    client, csrf = opened(fresh)
    done = client.post(f"/c/{fresh}/code", data={"csrf_token": csrf, "code": ACCESS_CODE},
                       **_from("192.0.2.200"))
    assert done.status_code == 303


def test_verification_uploads_are_limited_per_address(limited: Flask, world: World) -> None:
    client = limited.test_client()
    doc = world.values["doc_id"]
    first = [client.post("/verify", data={}, content_type="multipart/form-data",
                         **_from("192.0.2.8")).status_code,
             client.post("/api/v1/verify", data=b"", content_type="application/pdf",
                         **_from("192.0.2.8")).status_code]
    assert first == [400, 400]
    page = client.post("/verify", data={}, content_type="multipart/form-data",
                       **_from("192.0.2.8"))
    _retry_after(page)
    assert page.mimetype == "text/html" and "検証の依頼が多すぎます" in page.get_data(as_text=True)
    api = client.post("/api/v1/verify", data=b"%PDF-", content_type="application/pdf",
                      **_from("192.0.2.8"))
    _retry_after(api)
    assert api.get_json()["error"]["code"] == "rate_limited"
    _retry_after(client.post(f"/verify/{doc}", data={}, content_type="multipart/form-data",
                             **_from("192.0.2.8")))
    other = client.post("/api/v1/verify", data=b"", content_type="application/pdf",
                        **_from("192.0.2.9"))
    assert other.status_code == 400


def test_api_keys_are_limited(world: World) -> None:
    """The limit per API key of web.apiauth, for completeness: 429 with Retry-After."""
    app = create_app({
        "KOIN_HOME": str(world.home), "KOIN_DATABASE_URL": f"sqlite:///{world.home}/koin.db",
        "KOIN_PUBLIC_URL": PUBLIC_URL, "SECRET_KEY": SECRET, "TESTING": True,
        "KOIN_API_RATE": 0.001, "KOIN_API_BURST": 2,
    })
    client = app.test_client()
    header = {"Authorization": f"Bearer {world.api_key}"}
    got = [client.get("/api/v1/batches", headers=header) for _ in range(3)]
    assert [r.status_code for r in got] == [200, 200, 429]
    _retry_after(got[2])
    services.close(app)



def _login_limited_app(world: World, store: str, secret: str) -> Flask:
    """One more server process of the world's installation: login limits of 3 per account."""
    return create_app({
        "KOIN_HOME": str(world.home), "KOIN_DATABASE_URL": f"sqlite:///{world.home}/koin.db",
        "KOIN_PUBLIC_URL": PUBLIC_URL, "SECRET_KEY": secret, "TESTING": True,
        "KOIN_RATE_LIMIT_STORE": store,
        "KOIN_RATE_LIMITS": {"login_ip": (0.001, 100), "login_account": (0.001, 3)},
    })


def _failed_logins(apps: list[Flask], email: str) -> list[int]:
    """A wrong password for ``email`` through each app in turn, from fresh addresses."""
    got = []
    for number, app in enumerate(apps):
        client = app.test_client()
        token = _csrf(client.get("/login"))
        answer = client.post("/login", data={"csrf_token": token, "email": email,
                                             "password": "wrong"},
                             **_from(f"192.0.2.{100 + number}"))
        got.append(answer.status_code)
    return got


def test_login_limits_are_shared_by_processes_through_redis(
    world: World, redis_url: str
) -> None:
    """Two server processes (two apps) on one Redis count one account's tries together; each
    in its own memory lets the account be tried twice as often."""
    import redis

    secret = f"{SECRET}-{secrets.token_hex(8)}"  # a fresh installation: fresh buckets
    # an address no account has: the database's lockout after 5 failures stays out of it
    email = f"nobody-{secrets.token_hex(4)}@pref.ibaraki.example"
    shared = [_login_limited_app(world, redis_url, secret) for _ in range(2)]
    # 3 tries for the account in all: the fourth, on either process, is refused
    assert _failed_logins([shared[0], shared[1], shared[0], shared[1]], email) == [
        401, 401, 401, 429]
    separate = [_login_limited_app(world, "memory", secret) for _ in range(2)]
    assert _failed_logins([separate[0], separate[1], separate[0], separate[1]], email) == [
        401, 401, 401, 401]
    # Redis holds hashes of the address and account, and each bucket expires
    client = redis.Redis.from_url(redis_url)
    tag = hashlib.sha256(b"koin rate limits\0" + secret.encode()).hexdigest()[:16]
    names = [name.decode() for name in client.scan_iter(f"koin:rl:{tag}:*")]
    assert {name.split(":")[3] for name in names} == {"login_ip", "login_account"}
    assert not [name for name in names if "@" in name or "192.0.2" in name]
    # a bucket lives until it would be full again: burst / rate seconds (3 / 0.001, 100 / 0.001)
    # (+ 1), less the seconds this test has taken since
    lives = {name.split(":")[3]: client.ttl(name) for name in names}
    assert 2900 < lives["login_account"] <= 3001 and 99_900 < lives["login_ip"] <= 100_001, lives
    for app in shared + separate:
        services.close(app)


def test_an_unreachable_rate_limit_store_counts_in_the_process_and_says_so(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down: the limits still hold, per process, and the log says why (once)."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = _login_limited_app(world, dead, f"{SECRET}-{secrets.token_hex(8)}")
    with caplog.at_level(logging.WARNING, logger="web.ratelimit"):
        email = f"nobody-{secrets.token_hex(4)}@pref.ibaraki.example"
        assert _failed_logins([app] * 4, email) == [401, 401, 401, 429]
    warnings = [r.getMessage() for r in caplog.records if r.name == "web.ratelimit"]
    assert len([w for w in warnings if "login_account" in w]) == 1, warnings
    assert "unreachable" in warnings[0] and "ConnectionError" in warnings[0]
    services.close(app)


def test_a_mistyped_rate_limit_store_stops_the_start(world: World) -> None:
    with pytest.raises(ValueError, match="KOIN_RATE_LIMIT_STORE"):
        _login_limited_app(world, "memcached://127.0.0.1:11211", SECRET)


# -- no secret in any log --------------------------------------------------------------------------


def _forms(secret: str) -> set[str]:
    """A secret as it could appear in a log: as is, base64 (standard and URL-safe, with and
    without padding) and hex of its bytes, and of the bytes it encodes (tokens)."""
    raw = [secret.encode()]
    for decode in (lambda s: base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)),
                   bytes.fromhex):
        try:
            decoded = decode(secret)
        except (ValueError, binascii.Error):
            continue
        if len(decoded) >= 8:
            raw.append(decoded)
    forms = {secret}
    for data in raw:
        forms |= {base64.b64encode(data).decode(), base64.urlsafe_b64encode(data).decode(),
                  data.hex()}
        forms |= {f.rstrip("=") for f in list(forms)}
    return {f for f in forms if len(f) >= 6}


_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")


def _decoded_views(text: str) -> list[str]:
    """``text`` plus what its base64 runs decode to: single runs, and runs on consecutive
    lines joined (a MIME body wrapped at 76 characters), at each of the four alignments."""
    runs_by_line = [_BASE64_RUN.findall(line) for line in text.splitlines()]
    candidates = [run for runs in runs_by_line for run in runs]
    block: list[str] = []
    for runs in [*runs_by_line, []]:
        if len(runs) == 1 and len(runs[0]) >= 40:
            block.append(runs[0])
            continue
        if len(block) > 1:
            candidates.append("".join(block))
        block = [runs[0]] if len(runs) == 1 and len(runs[0]) >= 40 else []
    views = [text]
    for run in candidates:
        for shift in range(4):
            chunk = run[shift:]
            chunk = chunk[: len(chunk) - len(chunk) % 4]
            for decode in (base64.b64decode, base64.urlsafe_b64decode):
                try:
                    views.append(decode(chunk).decode("utf-8", "ignore"))
                except (ValueError, binascii.Error):
                    pass
    return views


def _leaks(text: str, secrets_: dict[str, str]) -> list[str]:
    found = []
    views = _decoded_views(text)
    for label, secret in secrets_.items():
        for form in _forms(secret):
            # digits-only codes: only as a whole word (not inside a hash or a timestamp)
            pattern = re.compile(rf"(?<![0-9A-Za-z]){re.escape(form)}(?![0-9A-Za-z])"
                                 if form.isdigit() else re.escape(form))
            if any(pattern.search(view) for view in views):
                found.append(f"{label} ({form[:6]}…)")
    return sorted(set(found))


def test_the_leak_finder_finds_secrets_in_every_form() -> None:
    """The search itself, on a mail body as the SMTP server's debug log showed it."""
    token = secrets.token_urlsafe(32)
    body = base64.encodebytes(f"契約書はこちら: https://koin.example/c/{token}\n".encode() * 3)
    log = "\n".join(f"DEBUG mail.log: DATA readline: b'{line}\\r\\n'"
                     for line in body.decode().splitlines())
    assert _leaks(log, {"link": token}) == [f"link ({token[:6]}…)"]
    assert _leaks("serial 9123456789, sha 0a12345678f", {"c": "12345678"}) == []
    assert _leaks("code 12345678.", {"c": "12345678"}) == ["c (123456…)"]
    assert _leaks(f"hex {b'pass-word-1'.hex()}", {"p": "pass-word-1"}) == ["p (706173…)"]


def test_no_secret_in_the_python_log_of_the_page_flows(world: World) -> None:
    """Everything logged (root logger at DEBUG) while the world was built: logins, contracts,
    both parties identifying and consenting, the witness signature, mail, API calls."""
    assert len(world.log_records) > 5
    assert _leaks("\n".join(world.log_records), world.secrets) == []


def _run(args: list[str], env: dict[str, str], stderr: list[str],
         **kwargs: Any) -> subprocess.CompletedProcess[str]:
    koin = Path(sys.executable).parent / "koin"
    done = subprocess.run([str(koin), *args], env=env, capture_output=True, text=True,
                          timeout=300, **kwargs)
    stderr.append(f"$ koin {' '.join(args)}\n{done.stderr}")
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


def test_no_secret_in_the_logs_of_real_koin_processes(
    tmp_path: Path, permit_pdf: bytes, one_page_permit: bytes
) -> None:
    """init, sign, a PKCS#11 token, API keys, ``koin serve`` with API signing and a batch, a
    contract with an access code and a one-time code, both parties' consent, the download
    link — all with KOIN_LOG_LEVEL=DEBUG; then every line of every process's stderr is
    searched for every secret of the flow."""
    home = tmp_path / "home"
    passphrase = "pass-" + secrets.token_urlsafe(18)
    pin = "pin-" + secrets.token_hex(8)
    port, smtp_port = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KOIN_")},
           "KOIN_HOME": str(home), "KOIN_KEY_PASSPHRASE": passphrase, "KOIN_LOG_LEVEL": "DEBUG",
           "KOIN_PUBLIC_URL": f"http://127.0.0.1:{port}", "KOIN_LANG": "en",
           "KOIN_DEV_SMTP_PORT": str(smtp_port), "KOIN_JOBS_INTERVAL": "1",
           "PYTHONWARNINGS": "ignore"}
    logs: list[str] = []
    found: dict[str, str] = {"key passphrase": passphrase, "PKCS#11 PIN": pin}

    init = _run(["init"], env, logs)
    found["admin password"] = _printed_password(init.stdout)
    found["session secret"] = (home / "secret_key").read_text().strip()
    key, _, _ = keys.read_pkcs12(keys.PkiLayout(home).role_key(Role.POSITION),
                                 passphrase.encode())
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    found["private key (PEM body)"] = base64.b64encode(der).decode()[40:104]
    found["private key (hex)"] = der.hex()[80:144]
    users = _run(["users", "create", OFFICER, "--role", "officer", "--role", "signer"], env,
                 logs)
    found["officer password"] = _printed_password(users.stdout)
    created = _run(["apikeys", "create", "--user", OFFICER, "--scope", "sign,contracts",
                    "--name", "log test"], env, logs)
    api_key = re.search(r"koin_[A-Za-z0-9]+_[A-Za-z0-9_-]+", created.stdout)
    assert api_key, created.stdout
    found["API key"] = api_key.group(0)
    found["API key secret"] = api_key.group(0).split("_", 2)[2]
    (tmp_path / "in.pdf").write_bytes(one_page_permit)
    _run(["sign", str(tmp_path / "in.pdf"), str(tmp_path / "out.pdf")], env, logs)

    # the same installation's keys in a SoftHSM2 token, and a signature made there
    token_home = tmp_path / "token-home"
    shutil.copytree(home, token_home)
    token_env = _softhsm(tmp_path, pin, {**env, "KOIN_HOME": str(token_home)})
    pin_file = tmp_path / "pin"
    keys.write_private_file(pin_file, pin.encode() + b"\n")
    _run(["keys", "init-token", "--token", "koin-log", "--pin-file", str(pin_file)],
         token_env, logs)
    _run(["sign", str(tmp_path / "in.pdf"), str(tmp_path / "token.pdf")], token_env, logs)

    server_log = tmp_path / "serve.log"
    with server_log.open("w") as stderr:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "koin"), "serve", "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )
        try:
            wait_for_port(port, process, timeout=60)
            found.update(_web_flow(f"http://127.0.0.1:{port}", home, api_key.group(0),
                                   found["officer password"], permit_pdf, one_page_permit))
        finally:
            process.terminate()
            process.wait(timeout=30)
    served = server_log.read_text()
    assert "GET /c/sha256:" in served, "the request lines are logged (redacted)"
    assert "DEBUG" in served, "the server logged at DEBUG"
    logs.append(served)
    text = "\n".join(logs)
    assert set(found) == {
        "key passphrase", "PKCS#11 PIN", "admin password", "officer password",
        "session secret", "private key (PEM body)", "private key (hex)", "API key",
        "API key secret", "access code", "one-time code", f"link of {HANAKO.email}",
        f"link of {TARO.email}", "download link",
    }
    assert _leaks(text, found) == []


def _printed_password(stdout: str) -> str:
    match = re.search(r"(?:password|パスワード)[^:：\n]*[:：]\s*(\S+)", stdout, re.IGNORECASE)
    assert match, stdout
    return match.group(1)


def _softhsm(tmp_path: Path, pin: str, env: dict[str, str]) -> dict[str, str]:
    folder = tmp_path / "softhsm"
    (folder / "tokens").mkdir(parents=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {folder / 'tokens'}\n"
                    "objectstore.backend = file\nlog.level = ERROR\n")
    token_env = {**env, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "koin-log", "--pin",
                    pin, "--so-pin", "so-" + pin], check=True, capture_output=True,
                   env=token_env)
    return token_env


def _web_flow(base: str, home: Path, api_key: str, password: str, contract_pdf: bytes,
              permit: bytes) -> dict[str, str]:
    """What a day of the service looks like over HTTP; the secrets it involved."""
    auth_header = {"Authorization": f"Bearer {api_key}"}
    signed = requests.post(f"{base}/api/v1/sign", data=permit, headers={
        **auth_header, "Content-Type": "application/pdf"}, timeout=60)
    assert signed.status_code == 200, signed.text
    batch = requests.post(f"{base}/api/v1/batches", json={"name": "log"}, headers=auth_header,
                          timeout=30).json()["id"]
    requests.post(f"{base}/api/v1/batches/{batch}/documents?name=a.pdf", data=permit,
                  headers={**auth_header, "Content-Type": "application/pdf"}, timeout=30)
    requests.post(f"{base}/api/v1/batches/{batch}/start", headers=auth_header, timeout=30)
    _wait(lambda: requests.get(f"{base}/api/v1/batches/{batch}", headers=auth_header,
                               timeout=30).json()["status"] == "finished")

    officer = requests.Session()
    page = officer.get(f"{base}/login", timeout=30).text
    assert officer.post(f"{base}/login", data={
        "csrf_token": _csrf(page), "email": OFFICER, "password": password}, timeout=30).ok
    form = officer.get(f"{base}/contracts/new", timeout=30).text
    fields = {"csrf_token": _csrf(form), "title": TITLE, "order": "parallel",
              "expires_days": "14", "reminder_days": "3"}
    for index, party in enumerate((HANAKO, TARO)):
        fields.update({f"party-{index}-name": party.name, f"party-{index}-email": party.email,
                       f"party-{index}-organisation": party.organisation or "",
                       f"party-{index}-role": party.role,
                       f"party-{index}-identification": party.identification})
    created = officer.post(f"{base}/contracts/new", data=fields,
                           files={"file": ("contract.pdf", contract_pdf, "application/pdf")},
                           timeout=60)
    codes = re.findall(r'<code class="access-code" data-position="\d+">(\d{8})</code>',
                       created.text)
    assert len(codes) == 1, created.text[:2000]
    public_id = created.url.rsplit("/", 1)[1]
    detail = officer.get(f"{base}/contracts/{public_id}", timeout=30).text
    assert officer.post(f"{base}/contracts/{public_id}/send",
                        data={"csrf_token": _csrf(detail)}, timeout=30).ok

    mail = home / "mail"
    links = {}
    for party in (HANAKO, TARO):
        body = _wait_for_mail(mail, party.email, _LINK)
        links[party.email] = _LINK.search(body).group(1)  # type: ignore[union-attr]
    found = {"access code": codes[0]}
    for party in (HANAKO, TARO):
        browser = requests.Session()
        token = links[party.email]
        opened = browser.get(f"{base}/c/{token}", timeout=30).text
        wrong = browser.post(f"{base}/c/{token}/code",
                             data={"csrf_token": _csrf(opened), "code": "12345678"}, timeout=30)
        assert wrong.status_code == 400
        if party is TARO:
            code = _OTP.search(_wait_for_mail(mail, party.email, _OTP)).group(1)  # type: ignore[union-attr]
            found["one-time code"] = code
        else:
            code = codes[0]
        review = browser.post(f"{base}/c/{token}/code",
                              data={"csrf_token": _csrf(opened), "code": code}, timeout=30).text
        sha = re.search(r'name="document_sha256" value="([0-9a-f]{64})"', review)
        assert sha, review[:2000]
        browser.get(f"{base}/c/{token}/pages/1.png", timeout=30)
        done = browser.post(f"{base}/c/{token}/consent", data={
            "csrf_token": _csrf(review), "agree": "yes", "document_sha256": sha.group(1)},
            timeout=120)
        assert done.ok, done.text[:1000]
        found[f"link of {party.email}"] = token
    download = _DOWNLOAD.search(_wait_for_mail(mail, HANAKO.email, _DOWNLOAD))
    assert download
    found["download link"] = download.group(1)
    fetched = requests.get(f"{base}/d/{download.group(1)}", timeout=30)
    assert fetched.status_code == 200 and fetched.content.startswith(b"%PDF-")
    return found


def _wait(condition: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def _wait_for_mail(folder: Path, to: str, pattern: re.Pattern[str], timeout: float = 60) -> str:
    from email import message_from_bytes, policy

    deadline = time.monotonic() + timeout
    while True:
        bodies = []
        for path in sorted(folder.glob("*.eml")):
            message = message_from_bytes(path.read_bytes(), policy=policy.default)
            if to in str(message["To"]):
                part = message.get_body(("plain",))  # type: ignore[attr-defined]
                bodies.append(part.get_content() if part is not None else "")
        matches = [b for b in bodies if pattern.search(b)]
        if matches:
            return matches[-1]
        assert time.monotonic() < deadline, f"no mail to {to} matching {pattern.pattern}"
        time.sleep(0.3)



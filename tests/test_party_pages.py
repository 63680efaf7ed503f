"""A party's pages (``/c/<token>``, ``/d/<token>``) with Flask's test client: contracts created and
sent through the services, links and one-time codes read from the outbox, every bad link
state a clear page with the right status; and the job thread of ``koin serve``."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

import contracts
from contracts import (
    AuditEvent,
    Contract,
    ContractStatus,
    EventKind,
    JobWorker,
    OutboxMessage,
    PartySpec,
    PartyStatus,
    UserRole,
    cancel_contract,
    create_contract,
    create_user,
    list_parties,
    resend_invitations,
    send_contract,
    session_scope,
)
from contracts.migrate import upgrade
from signer import Installation
from tests.conftest import PUBLIC_URL
from web import create_app, services
from web.config import Settings
from web.party_views import TokenRedactor

SECRET = "test-secret-key-0123456789abcdef-not-for-production"
ACCESS_CODE = "20260401"
TITLE = "県道123号線 道路改良工事 請負契約書"
HANAKO = PartySpec(
    name="茨城 花子", organisation="茨城県 土木部", email="hanako@pref.ibaraki.example",
    role="prefecture", identification="access_code", access_code=ACCESS_CODE,
)
TARO = PartySpec(
    name="常陸 太郎", organisation="株式会社 水戸建設", email="taro@mito-kensetsu.example",
    role="contractor", identification="email_otp",
)
_LINK = re.compile(r"/c/([A-Za-z0-9_-]{43})\b")
_DOWNLOAD = re.compile(r"/d/([A-Za-z0-9_-]{43})\b")
_OTP = re.compile(r"確認コード: (\d{6})")
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


# -- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def app(koin_home: Path, tmp_path: Path) -> Iterator[Flask]:
    url = f"sqlite:///{tmp_path}/koin.db"
    upgrade(url)
    app = create_app(
        {
            "KOIN_HOME": str(koin_home),
            "KOIN_DATABASE_URL": url,
            "KOIN_PUBLIC_URL": PUBLIC_URL,
            "SECRET_KEY": SECRET,
            "TESTING": True,
        }
    )
    yield app
    with app.app_context():
        services.session_factory().kw["bind"].dispose()


@pytest.fixture
def db(app: Flask) -> sessionmaker[Session]:
    with app.app_context():
        return services.session_factory()


@pytest.fixture
def officer(db: sessionmaker[Session]) -> int:
    with session_scope(db) as session:
        user, _ = create_user(
            session, "keiyaku@pref.ibaraki.example", [UserRole.OFFICER],
            display_name="契約 担当", password="correct horse battery staple",
        )
        return user.id


def _create(
    db: sessionmaker[Session],
    installation: Installation,
    officer: int,
    pdf: bytes,
    *,
    now: dt.datetime | None = None,
    **options: Any,
) -> int:
    with session_scope(db) as session:
        contract = create_contract(
            session, home=installation.home, officer_id=officer, title=TITLE, pdf=pdf,
            parties=options.pop("parties", [HANAKO, TARO]), now=now, **options,
        )
        send_contract(session, contract, public_url=PUBLIC_URL, now=now)
        return contract.id


@pytest.fixture
def contract_id(
    db: sessionmaker[Session], installation: Installation, officer: int, permit_pdf: bytes
) -> int:
    return _create(db, installation, officer, permit_pdf)


def _mails(
    db: sessionmaker[Session], *, to: str | None = None, tag: str | None = None
) -> list[OutboxMessage]:
    query = select(OutboxMessage).order_by(OutboxMessage.id)
    if to is not None:
        query = query.where(OutboxMessage.to_address == to)
    if tag is not None:
        query = query.where(OutboxMessage.tag == tag)
    with db() as session:
        return list(session.scalars(query))


def _link(db: sessionmaker[Session], email: str, pattern: re.Pattern[str] = _LINK) -> str:
    found = [m for m in _mails(db, to=email) if pattern.search(m.text_body)]
    assert found, f"no link mailed to {email}"
    match = pattern.search(found[-1].text_body)
    assert match
    return match.group(1)


def _otp(db: sessionmaker[Session], email: str) -> str:
    found = _OTP.search(_mails(db, to=email, tag="contract-otp")[-1].text_body)
    assert found
    return found.group(1)


def _contract(db: sessionmaker[Session], contract_id: int) -> Contract:
    with db() as session:
        contract = session.get(Contract, contract_id)
        assert contract is not None
        session.expunge(contract)
        return contract


def _statuses(db: sessionmaker[Session], contract_id: int) -> list[str]:
    with db() as session:
        return [p.status for p in list_parties(session, _contract(db, contract_id))]


def _party_ids(db: sessionmaker[Session], contract_id: int) -> list[int]:
    with db() as session:
        return [p.id for p in list_parties(session, _contract(db, contract_id))]


def _events(db: sessionmaker[Session], contract_id: int, kind: EventKind) -> list[AuditEvent]:
    with db() as session:
        return list(
            session.scalars(
                select(AuditEvent).where(
                    AuditEvent.contract_id == contract_id, AuditEvent.kind == kind.value
                )
            )
        )


def _text(response: TestResponse) -> str:
    return response.get_data(as_text=True)


def _csrf(page: TestResponse | str) -> str:
    match = _CSRF.search(page if isinstance(page, str) else _text(page))
    assert match, page
    return match.group(1)


class PartyBrowser:
    """One party's browser: a test client with its own cookies."""

    def __init__(self, app: Flask, db: sessionmaker[Session], email: str) -> None:
        self.client: FlaskClient = app.test_client()
        self.db = db
        self.email = email
        self.token = _link(db, email)
        self.csrf = ""

    @property
    def base(self) -> str:
        return f"/c/{self.token}"

    def open(self, query: str = "") -> TestResponse:
        response = self.client.get(self.base + query)
        if 'name="csrf_token"' in _text(response):
            self.csrf = _csrf(response)
        return response

    def code(self) -> str:
        return ACCESS_CODE if self.email == HANAKO.email else _otp(self.db, self.email)

    def post(self, action: str, **form: str) -> TestResponse:
        return self.client.post(f"{self.base}/{action}", data={"csrf_token": self.csrf, **form})

    def identify(self) -> TestResponse:
        """Open the link, enter the right code; the review page."""
        assert self.open().status_code == 200
        response = self.post("code", code=self.code())
        assert response.status_code == 303, _text(response)
        assert response.headers["Location"].endswith(self.base)
        review = self.open()
        assert review.status_code == 200 and 'id="consent-form"' in _text(review)
        return review

    def consent(self, sha256: str | None = None) -> TestResponse:
        if sha256 is None:
            page = _text(self.open())
            match = re.search(r'name="document_sha256" value="([0-9a-f]{64})"', page)
            assert match, page
            sha256 = match.group(1)
        return self.post("consent", agree="yes", document_sha256=sha256)


def _browser(app: Flask, db: sessionmaker[Session], party: PartySpec) -> PartyBrowser:
    return PartyBrowser(app, db, party.email)


# -- the whole way ------------------------------------------------------------------------------


def test_access_code_and_otp_parties_consent_to_a_signed_contract(
    app: Flask, db: sessionmaker[Session], contract_id: int, permit_pdf: bytes,
    installation: Installation,
) -> None:
    sha256 = hashlib.sha256(permit_pdf).hexdigest()

    # The prefecture's signer: an access code from the officer.
    hanako = _browser(app, db, HANAKO)
    opened = hanako.open()
    page = _text(opened)
    assert opened.status_code == 200
    assert "担当者から電話または書面でお知らせしたアクセスコードを入力してください" in page
    assert TITLE in page and "茨城県" in page and HANAKO.name in page
    assert 'id="resend-button"' not in page
    assert hanako.token not in opened.headers.get("Set-Cookie", "")
    assert opened.headers["Cache-Control"] == "no-store"
    assert opened.headers["Referrer-Policy"] == "no-referrer"
    # typed as people do: full-width digits and a hyphen
    response = hanako.post("code", code="２０２６-０４０１")
    assert response.status_code == 303
    review = _text(hanako.open())
    assert "内容を確認し、合意します" in review and "合意する" in review
    assert f'<code class="hash" id="document-sha256">{sha256}</code>' in review
    assert "certutil -hashfile" in review and "shasum -a 256" in review
    assert f'name="document_sha256" value="{sha256}"' in review
    assert review.count('<figure class="page">') == 2
    assert f'{hanako.base}/pages/1.png' in review and f'{hanako.base}/pages/2.png' in review
    assert f"{hanako.base}/document.pdf" in review
    assert 'name="reason"' in review and "同意しない" in review
    original = hanako.client.get(f"{hanako.base}/document.pdf")
    assert original.status_code == 200 and original.data == permit_pdf
    assert original.headers["Content-Disposition"].startswith("attachment")
    assert hanako.consent().status_code == 303
    done = hanako.client.get(f"{hanako.base}/done")
    assert done.status_code == 200
    assert "合意を受け付けました。すべての当事者の合意が揃うと、署名済みの契約書をメールでお送り" \
        "します。" in _text(done)
    assert _contract(db, contract_id).status == ContractStatus.PARTIALLY_AGREED
    # The used link, in the browser that answered: the result page again.
    again = hanako.client.get(hanako.base)
    assert again.status_code == 303 and again.headers["Location"].endswith("/done")

    # The contractor: a one-time code by mail, sent when the link is opened.
    taro = _browser(app, db, TARO)
    page = _text(taro.open())
    assert "メールで送信した 6 桁の確認コードを入力してください" in page
    assert 'id="code-sent"' in page and 'id="resend-button"' in page
    assert len(_mails(db, to=TARO.email, tag="contract-otp")) == 1
    assert taro.post("code", code=taro.code()).status_code == 303
    assert taro.consent().status_code == 303  # the witness signature is made right away
    contract = _contract(db, contract_id)
    assert contract.status == ContractStatus.COMPLETED and contract.final_sha256
    done = _text(taro.client.get(f"{taro.base}/done"))
    assert "すべての当事者の合意が揃い、契約が締結されました。" in done
    assert f"{taro.base}/signed.pdf" in done
    signed = taro.client.get(f"{taro.base}/signed.pdf")
    assert signed.status_code == 200 and signed.mimetype == "application/pdf"
    assert hashlib.sha256(signed.data).hexdigest() == contract.final_sha256
    assert signed.data.startswith(permit_pdf)
    assert "_signed.pdf" in signed.headers["Content-Disposition"]
    # Hanako's result page now offers the signed contract too.
    assert f"{hanako.base}/signed.pdf" in _text(hanako.client.get(f"{hanako.base}/done"))

    # The download link of the completion mail, in any browser.
    token = _link(db, HANAKO.email, _DOWNLOAD)
    download = app.test_client().get(f"/d/{token}")
    assert download.status_code == 200 and download.mimetype == "application/pdf"
    assert download.headers["Content-Disposition"].startswith("attachment")
    assert hashlib.sha256(download.data).hexdigest() == contract.final_sha256
    assert len(_events(db, contract_id, EventKind.DOWNLOADED)) == 2
    consents = _events(db, contract_id, EventKind.CONSENTED)
    assert [e.document_sha256 for e in consents] == [sha256, sha256]
    assert all(e.ip == "127.0.0.1" and e.user_agent for e in consents)


def test_page_images_only_for_the_identified_party(
    app: Flask, db: sessionmaker[Session], contract_id: int
) -> None:
    hanako = _browser(app, db, HANAKO)
    image = f"{hanako.base}/pages/1.png"
    assert hanako.client.get(image).status_code == 403  # not opened
    hanako.open()
    assert hanako.client.get(image).status_code == 403  # opened, not identified
    assert hanako.client.get(f"{hanako.base}/document.pdf").status_code == 403
    hanako.identify()
    shown = hanako.client.get(image)
    assert shown.status_code == 200 and shown.mimetype == "image/png"
    assert shown.data.startswith(b"\x89PNG")
    assert shown.headers["Cache-Control"] == "no-store"
    assert hanako.client.get(f"{hanako.base}/pages/3.png").status_code == 404
    assert hanako.client.get(f"{hanako.base}/pages/0.png").status_code == 404
    # Another browser with the same link, and the other party's link: nothing.
    assert app.test_client().get(image).status_code == 403
    taro_token = _link(db, TARO.email)
    assert hanako.client.get(f"/c/{taro_token}/pages/1.png").status_code == 403
    # Opening the link in another browser ends this browser's identification.
    other = app.test_client()
    assert other.get(hanako.base).status_code == 200
    assert hanako.client.get(image).status_code == 403
    page = hanako.open()
    assert page.status_code == 200 and 'id="code-form"' in _text(page)


def test_five_wrong_codes_lock_the_party(
    app: Flask, db: sessionmaker[Session], contract_id: int
) -> None:
    taro = _browser(app, db, TARO)
    taro.open()
    right = taro.code()
    wrong = "000000" if right != "000000" else "111111"
    for left in (4, 3, 2, 1):
        response = taro.post("code", code=wrong)
        assert response.status_code == 400
        assert f"確認コードが正しくありません(あと {left} 回)。" in _text(response)
        assert 'id="code-form"' in _text(response)
    locked = taro.post("code", code=wrong)
    assert locked.status_code == 403
    assert "ロックされました" in _text(locked)
    assert "県の担当者にお問い合わせください" in _text(locked)
    # Now even the right code and a new opening are refused.
    assert taro.post("code", code=right).status_code == 403
    assert app.test_client().get(taro.base).status_code == 403
    english = app.test_client().get(f"{taro.base}?lang=en")
    assert english.status_code == 403 and "locked" in _text(english)
    assert _mails(db, to="keiyaku@pref.ibaraki.example", tag="contract-locked")


def test_wrong_code_in_english(app: Flask, db: sessionmaker[Session], contract_id: int) -> None:
    hanako = _browser(app, db, HANAKO)
    page = _text(hanako.open("?lang=en"))
    assert "Enter the access code the officer gave you by phone or letter." in page
    response = hanako.post("code", code="99999999")
    assert response.status_code == 400
    assert "The code is not correct (4 attempts left)." in _text(response)


def test_reloading_the_code_page_sends_no_new_code(
    app: Flask, db: sessionmaker[Session], contract_id: int
) -> None:
    taro = _browser(app, db, TARO)
    taro.open()
    assert taro.open().status_code == 200
    assert len(_mails(db, to=TARO.email, tag="contract-otp")) == 1
    assert len(_events(db, contract_id, EventKind.OPENED)) == 1
    resent = taro.post("resend")  # within a minute of the last code: none sent
    assert resent.status_code == 200 and 'id="code-recent"' in _text(resent)
    assert len(_mails(db, to=TARO.email, tag="contract-otp")) == 1
    assert taro.post("code", code=taro.code()).status_code == 303


# -- refusals -----------------------------------------------------------------------------------


def test_forged_and_malformed_links_are_404(app: Flask, contract_id: int) -> None:
    client = app.test_client()
    for path in ("/c/" + "A" * 43, "/c/short", "/d/" + "B" * 43, "/d/x"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "このリンクは無効です" in _text(response)
        assert "Traceback" not in _text(response)
    english = client.get("/c/" + "A" * 43 + "?lang=en")
    assert "This link is not valid." in _text(english)


def test_replaced_link_is_410(app: Flask, db: sessionmaker[Session], contract_id: int) -> None:
    old = _link(db, HANAKO.email)
    with session_scope(db) as session:
        contract = session.get(Contract, contract_id)
        assert contract is not None
        assert resend_invitations(session, contract, public_url=PUBLIC_URL) == 2
    response = app.test_client().get(f"/c/{old}")
    assert response.status_code == 410 and "有効期限が切れています" in _text(response)
    assert app.test_client().get(f"/c/{_link(db, HANAKO.email)}").status_code == 200


def test_used_link_is_409(app: Flask, db: sessionmaker[Session], contract_id: int) -> None:
    hanako = _browser(app, db, HANAKO)
    hanako.identify()
    assert hanako.consent().status_code == 303
    response = app.test_client().get(hanako.base)
    assert response.status_code == 409
    assert "このリンクは既に使用されました" in _text(response)


def test_cancelled_contract_is_410(
    app: Flask, db: sessionmaker[Session], contract_id: int, officer: int
) -> None:
    hanako = _browser(app, db, HANAKO)
    hanako.identify()
    with session_scope(db) as session:
        contract = session.get(Contract, contract_id)
        assert contract is not None
        cancel_contract(session, contract, officer_id=officer, reason="金額の誤り")
    for response in (
        app.test_client().get(hanako.base),
        hanako.client.get(hanako.base),
        hanako.consent(sha256=_contract(db, contract_id).original_sha256),
        hanako.client.get(f"{hanako.base}/pages/1.png"),
    ):
        assert response.status_code == 410
        assert "この契約は「取消し」のため、確認・回答はできません。" in _text(response)
    english = app.test_client().get(f"{hanako.base}?lang=en")
    assert "This contract is cancelled" in _text(english)
    assert _statuses(db, contract_id) == ["pending", "pending"]


def test_expired_contract_is_410(
    app: Flask, db: sessionmaker[Session], installation: Installation, officer: int,
    permit_pdf: bytes,
) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    _create(db, installation, officer, permit_pdf, now=past, expires_in=dt.timedelta(hours=1))
    response = app.test_client().get(f"/c/{_link(db, TARO.email)}")
    assert response.status_code == 410 and "期限切れ" in _text(response)
    assert not _mails(db, to=TARO.email, tag="contract-otp")


def test_sequential_contract_next_party_waits(
    app: Flask, db: sessionmaker[Session], installation: Installation, officer: int,
    permit_pdf: bytes,
) -> None:
    contract_id = _create(db, installation, officer, permit_pdf, order="sequential")
    assert not [m for m in _mails(db, to=TARO.email) if _LINK.search(m.text_body)]
    hanako = _browser(app, db, HANAKO)
    hanako.identify()
    assert hanako.consent().status_code == 303
    taro = _browser(app, db, TARO)  # invited now
    taro.identify()
    assert taro.consent().status_code == 303
    assert _contract(db, contract_id).status == ContractStatus.COMPLETED


def test_a_session_cannot_act_for_another_link(
    app: Flask, db: sessionmaker[Session], contract_id: int
) -> None:
    hanako = _browser(app, db, HANAKO)
    hanako.identify()
    taro_token = _link(db, TARO.email)
    # Hanako's identified browser, with Taro's link: not identified there.
    refused = hanako.client.post(
        f"/c/{taro_token}/consent",
        data={"csrf_token": hanako.csrf, "agree": "yes",
              "document_sha256": _contract(db, contract_id).original_sha256},
    )
    assert refused.status_code == 403 and "本人確認が済んでいません" in _text(refused)
    assert hanako.client.get(f"/c/{taro_token}/document.pdf").status_code == 403
    # A session entry claiming Hanako's party for Taro's link (as if planted): the service
    # refuses the pair.
    hanako_id, _ = _party_ids(db, contract_id)
    digest = hashlib.sha256(taro_token.encode()).hexdigest()[:32]
    with hanako.client.session_transaction() as cookie:
        links = dict(cookie["party"])
        links[digest] = {"p": hanako_id, "o": int(time.time()), "i": int(time.time())}
        cookie["party"] = links
    assert hanako.client.get(f"/c/{taro_token}").status_code == 404
    planted = hanako.client.post(
        f"/c/{taro_token}/consent",
        data={"csrf_token": hanako.csrf, "agree": "yes",
              "document_sha256": _contract(db, contract_id).original_sha256},
    )
    assert planted.status_code == 404
    assert _statuses(db, contract_id) == ["pending", "pending"]


def test_consent_needs_the_checkbox(
    app: Flask, db: sessionmaker[Session], contract_id: int
) -> None:
    hanako = _browser(app, db, HANAKO)
    hanako.identify()
    sha256 = _contract(db, contract_id).original_sha256
    response = hanako.post("consent", document_sha256=sha256)
    assert response.status_code == 400
    message = "合意する場合は「内容を確認し、合意します」にチェックを入れてください。"
    assert message in _text(response)
    assert 'id="consent-form"' in _text(response)
    assert hanako.post("consent", agree="on", document_sha256=sha256).status_code == 400
    assert _statuses(db, contract_id) == ["pending", "pending"]


def test_consent_to_another_document_is_refused(
    app: Flask, db: sessionmaker[Session], contract_id: int
) -> None:
    hanako = _browser(app, db, HANAKO)
    hanako.identify()
    response = hanako.consent(sha256="0" * 64)
    assert response.status_code == 409
    assert "確認した文書が、この契約の契約書と一致しません" in _text(response)
    assert _statuses(db, contract_id) == ["pending", "pending"]
    assert hanako.consent().status_code == 303  # the page's own hash is accepted


def test_double_consent_is_one_consent(
    app: Flask, db: sessionmaker[Session], contract_id: int
) -> None:
    hanako = _browser(app, db, HANAKO)
    hanako.identify()
    sha256 = _contract(db, contract_id).original_sha256
    first = hanako.post("consent", agree="yes", document_sha256=sha256)
    second = hanako.post("consent", agree="yes", document_sha256=sha256)
    assert first.status_code == second.status_code == 303
    assert second.headers["Location"].endswith("/done")
    assert len(_events(db, contract_id, EventKind.CONSENTED)) == 1
    assert _statuses(db, contract_id) == ["consented", "pending"]


def test_decline_with_a_reason(app: Flask, db: sessionmaker[Session], contract_id: int) -> None:
    taro = _browser(app, db, TARO)
    taro.identify()
    empty = taro.post("decline", reason="  ")
    assert empty.status_code == 400 and "同意しない理由を入力してください。" in _text(empty)
    reason = "工期の記載が事前の協議内容と異なるため"
    confirm = taro.post("decline", reason=reason)
    assert confirm.status_code == 200
    page = _text(confirm)
    assert "同意しないことの確認" in page and reason in page
    assert _statuses(db, contract_id) == ["pending", "pending"]  # not yet
    done = taro.post("decline", reason=reason, confirm="yes")
    assert done.status_code == 303
    result = _text(taro.client.get(f"{taro.base}/done"))
    assert "同意しないとの回答を受け付けました。" in result and "不同意" in result
    assert _contract(db, contract_id).status == ContractStatus.DECLINED
    assert _statuses(db, contract_id) == ["pending", "declined"]
    [event] = _events(db, contract_id, EventKind.DECLINED)
    assert event.details["reason"] == reason
    assert _mails(db, to="keiyaku@pref.ibaraki.example", tag="contract-declined")
    # The other party's link now says the contract was declined.
    other = app.test_client().get(f"/c/{_link(db, HANAKO.email)}")
    assert other.status_code == 410 and "不同意" in _text(other)


def test_forms_need_the_csrf_token(
    app: Flask, db: sessionmaker[Session], contract_id: int
) -> None:
    hanako = _browser(app, db, HANAKO)
    hanako.open()
    response = hanako.client.post(f"{hanako.base}/code", data={"code": ACCESS_CODE})
    assert response.status_code == 400
    assert "ページを再読み込みして" in _text(response)
    hanako.identify()
    sha256 = _contract(db, contract_id).original_sha256
    forged = hanako.client.post(
        f"{hanako.base}/consent",
        data={"csrf_token": "forged", "agree": "yes", "document_sha256": sha256},
    )
    assert forged.status_code == 400
    assert _statuses(db, contract_id) == ["pending", "pending"]


def test_forms_opened_directly_go_back_to_the_link(
    app: Flask, db: sessionmaker[Session], contract_id: int
) -> None:
    token = _link(db, HANAKO.email)
    response = app.test_client().get(f"/c/{token}/consent?lang=en")
    assert response.status_code == 303
    assert response.headers["Location"].endswith(f"/c/{token}?lang=en")


def test_expired_download_link_is_410(
    app: Flask, db: sessionmaker[Session], contract_id: int
) -> None:
    for party in (HANAKO, TARO):
        browser = _browser(app, db, party)
        browser.identify()
        assert browser.consent().status_code == 303
    token = _link(db, TARO.email, _DOWNLOAD)
    with session_scope(db) as session:
        link = session.scalar(
            select(contracts.AccessLink).where(
                contracts.AccessLink.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
            )
        )
        assert link is not None
        link.expires_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    response = app.test_client().get(f"/d/{token}")
    assert response.status_code == 410 and "有効期限が切れています" in _text(response)


# -- completion left to the job -----------------------------------------------------------------


def test_failed_completion_is_left_to_the_job_worker(
    app: Flask, db: sessionmaker[Session], contract_id: int, installation: Installation,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("TSA down")

    hanako = _browser(app, db, HANAKO)
    hanako.identify()
    assert hanako.consent().status_code == 303
    taro = _browser(app, db, TARO)
    taro.identify()
    with monkeypatch.context() as patch:
        patch.setattr(contracts, "complete_contract", broken)
        with caplog.at_level(logging.ERROR, logger="web.party_views"):
            response = taro.consent()
    assert response.status_code == 303
    assert any("completing contract" in r.getMessage() for r in caplog.records)
    assert taro.token not in caplog.text
    done = _text(taro.client.get(f"{taro.base}/done"))
    assert "合意を受け付けました。" in done and "締結処理中" in done
    assert _contract(db, contract_id).status == ContractStatus.COMPLETING

    worker = JobWorker(db, installation, public_url=PUBLIC_URL, interval=0.05)
    with worker:
        deadline = time.monotonic() + 60
        while _contract(db, contract_id).status != ContractStatus.COMPLETED:
            assert time.monotonic() < deadline, "the job worker did not complete the contract"
            time.sleep(0.1)
        assert worker.running
    assert not worker.running
    assert "/signed.pdf" in _text(taro.client.get(f"{taro.base}/done"))


def test_job_worker_survives_errors(
    installation: Installation, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    engine = contracts.make_engine(f"sqlite:///{tmp_path}/missing/koin.db")
    worker = JobWorker(
        contracts.make_session_factory(engine), installation, public_url=PUBLIC_URL,
        interval=0.05,
    )
    try:
        with caplog.at_level(logging.ERROR, logger="contracts.jobs"):
            assert worker.run_once() is None
            with worker:
                time.sleep(0.3)
                assert worker.running
        assert "periodic contract jobs failed" in caplog.text
        with pytest.raises(RuntimeError):
            worker.start()
            worker.start()
    finally:
        worker.stop()
        engine.dispose()
    with pytest.raises(ValueError):
        JobWorker(contracts.make_session_factory(engine), installation, public_url=PUBLIC_URL,
                  interval=0)


def test_jobs_interval_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KOIN_JOBS_INTERVAL", raising=False)
    assert Settings().jobs_interval == 60
    monkeypatch.setenv("KOIN_JOBS_INTERVAL", "15")
    assert Settings().jobs_interval == 15
    monkeypatch.setenv("KOIN_JOBS_INTERVAL", "0")
    assert Settings().jobs_interval == 0


# -- logs ---------------------------------------------------------------------------------------


def test_tokens_are_redacted_from_logs(app: Flask) -> None:
    token = "Ab3_-" + "x" * 38
    record = logging.LogRecord(
        "werkzeug", logging.INFO, __file__, 1, '%s - - "%s" %s -',
        ("127.0.0.1", f"GET /c/{token}/pages/1.png?lang=en HTTP/1.1", "200"), None,
    )
    assert TokenRedactor().filter(record)
    message = record.getMessage()
    assert token not in message
    digest = hashlib.sha256(token.encode()).hexdigest()[:12]
    assert f"GET /c/sha256:{digest}/pages/1.png?lang=en HTTP/1.1" in message
    assert any(isinstance(f, TokenRedactor) for f in logging.getLogger("werkzeug").filters)
    assert any(isinstance(f, TokenRedactor) for f in app.logger.filters)
    plain = logging.LogRecord("werkzeug", logging.INFO, __file__, 1, "GET /verify", None, None)
    assert TokenRedactor().filter(plain) and plain.getMessage() == "GET /verify"


def test_status_words_after_consent(
    app: Flask, db: sessionmaker[Session], contract_id: int
) -> None:
    hanako = _browser(app, db, HANAKO)
    hanako.identify()
    hanako.consent()
    page = _text(hanako.client.get(f"{hanako.base}/done?lang=en"))
    assert "Consent received." in page and "Partially agreed" in page
    with db() as session:
        statuses = {p.status for p in list_parties(session, _contract(db, contract_id))}
    assert statuses == {PartyStatus.CONSENTED.value, PartyStatus.PENDING.value}


# -- the services behind the pages, on SQLite and PostgreSQL ------------------------------------


def test_resume_link_party_answer_and_signed_copy(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes
) -> None:
    with session_scope(sessions) as session:
        user, _ = create_user(session, "keiyaku@pref.ibaraki.example", [UserRole.OFFICER],
                              password="correct horse battery staple")
        officer = user.id
    contract_id = _create(sessions, installation, officer, permit_pdf)
    hanako_token, taro_token = _link(sessions, HANAKO.email), _link(sessions, TARO.email)
    client = {"ip": "192.0.2.10", "user_agent": "tests"}

    def run(action: Any) -> Any:
        with session_scope(sessions) as session:
            return action(session)

    opened = run(lambda s: contracts.open_link(s, hanako_token, **client))
    hanako_id, taro_id = _party_ids(sessions, contract_id)
    events = len(_events(sessions, contract_id, EventKind.OPENED))
    with pytest.raises(contracts.IdentificationRequired):
        run(lambda s: contracts.resume_link(s, hanako_token, hanako_id))
    resumed = run(lambda s: contracts.resume_link(
        s, hanako_token, hanako_id, require_identification=False))
    assert resumed.identified_at is None and resumed.link_id == opened.link_id
    with pytest.raises(contracts.LinkInvalid):  # another party's link
        run(lambda s: contracts.resume_link(s, taro_token, hanako_id,
                                            require_identification=False))
    with pytest.raises(contracts.LinkInvalid):
        run(lambda s: contracts.party_answer(s, taro_token, hanako_id))
    assert run(lambda s: contracts.verify_code(s, hanako_id, ACCESS_CODE, **client)).verified
    resumed = run(lambda s: contracts.resume_link(s, hanako_token, hanako_id))
    assert resumed.identified_at is not None
    assert len(_events(sessions, contract_id, EventKind.OPENED)) == events  # nothing recorded
    answer = run(lambda s: contracts.party_answer(s, hanako_token, hanako_id))
    assert answer.party_status is PartyStatus.PENDING and not answer.signed_copy_available

    def consent(party_id: int) -> contracts.ConsentResult:
        return run(lambda s: contracts.consent(
            s, party_id, document_sha256_seen=resumed.original_sha256, public_url=PUBLIC_URL,
            **client))

    with pytest.raises(contracts.ContractNotOpen):  # nothing signed yet
        run(lambda s: contracts.open_signed_copy(s, hanako_token, hanako_id, **client))
    assert not consent(hanako_id).completing
    run(lambda s: contracts.open_link(s, taro_token, **client))
    code = _otp(sessions, TARO.email)
    assert run(lambda s: contracts.verify_code(s, taro_id, code, **client)).verified
    result = consent(taro_id)
    assert result.completing
    contracts.complete_contract(sessions, contract_id, installation, public_url=PUBLIC_URL)
    with pytest.raises(contracts.LinkAlreadyUsed):
        run(lambda s: contracts.resume_link(s, hanako_token, hanako_id))
    answer = run(lambda s: contracts.party_answer(s, hanako_token, hanako_id))
    assert answer.signed_copy_available and answer.contract_status is ContractStatus.COMPLETED
    download = run(lambda s: contracts.open_signed_copy(s, hanako_token, hanako_id, **client))
    assert download.sha256 == _contract(sessions, contract_id).final_sha256
    with pytest.raises(contracts.LinkInvalid):
        run(lambda s: contracts.open_signed_copy(s, hanako_token, taro_id, **client))
    [event] = _events(sessions, contract_id, EventKind.DOWNLOADED)
    assert event.party_id == hanako_id and event.details["link_purpose"] == "sign"
    with session_scope(sessions) as session:
        assert contracts.verify_chain(session, session.get(Contract, contract_id)).ok

"""The contract officer's pages (``web/contract_views.py``) with Flask's test client on SQLite
(the services underneath are tested on PostgreSQL too, in ``test_workflow.py``): creating with
access codes shown once, the list, send / resend / cancel, who may see what, CSRF, refused
uploads, downloads, the audit log and its chain check, and the "add party" button in Chromium."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

from contracts import (
    CodeOutcome,
    CompletionOutcome,
    Contract,
    OutboxMessage,
    Party,
    complete_contract,
    consent,
    contract_file,
    create_user,
    make_engine,
    make_session_factory,
    open_link,
    session_scope,
    verify_code,
)
from contracts.audit import timestamp_imprint
from contracts.migrate import upgrade
from keys import Role
from signer import Installation, SignOptions, sign_pdf
from tests.conftest import PUBLIC_URL
from tests.hostile import password_protected_pdf
from web import create_app

SECRET = "test-secret-key-0123456789abcdef-not-for-production"
PASSWORD = "correct horse battery staple"
OFFICER = "keiyaku@pref.ibaraki.example"
OTHER_OFFICER = "other@pref.ibaraki.example"
ADMIN = "admin@pref.ibaraki.example"
SIGNER = "signer@pref.ibaraki.example"
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
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_CODE = re.compile(r'<code class="access-code" data-position="(\d+)">(\d{8})</code>')
_LINK = re.compile(r"/c/([A-Za-z0-9_-]{43})\b")
_OTP = re.compile(r"確認コード: (\d{6})")


# -- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path}/koin.db"
    upgrade(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        for email, roles in (
            (OFFICER, ["officer"]),
            (OTHER_OFFICER, ["officer"]),
            (ADMIN, ["admin", "officer"]),
            (SIGNER, ["signer"]),
        ):
            create_user(session, email, roles, password=PASSWORD, display_name=email[:5])
    yield factory
    engine.dispose()


@pytest.fixture
def app(koin_home: Path, tmp_path: Path, sessions: sessionmaker[Session]) -> Flask:
    # The shared demo installation as KOIN_HOME (its keys sign completed contracts); each test
    # has its own database. Contract files go to KOIN_HOME/contracts/<random id>/.
    return create_app(
        {
            "KOIN_HOME": str(koin_home),
            "KOIN_DATABASE_URL": f"sqlite:///{tmp_path}/koin.db",
            "KOIN_PUBLIC_URL": PUBLIC_URL,
            "SECRET_KEY": SECRET,
            "TESTING": True,
        }
    )


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _csrf(client: FlaskClient, path: str = "/login") -> str:
    page = client.get(path).get_data(as_text=True)
    found = _CSRF.search(page)
    assert found, page
    return found.group(1)


def _login(client: FlaskClient, email: str = OFFICER) -> None:
    token = _csrf(client)
    response = client.post(
        "/login", data={"csrf_token": token, "email": email, "password": PASSWORD}
    )
    assert response.status_code == 302, response.get_data(as_text=True)


def _form(
    pdf: bytes | None,
    parties: list[dict[str, str]] | None = None,
    *,
    rows: int = 4,
    **fields: Any,
) -> dict[str, Any]:
    """The new-contract form as a browser without JavaScript sends it: ``rows`` party rows,
    the unused ones empty."""
    data: dict[str, Any] = {
        "title": TITLE, "order": "parallel", "expires_days": "14", "reminder_days": "3",
    }
    chosen = [HANAKO, TARO] if parties is None else parties
    for index in range(max(rows, len(chosen))):
        party = chosen[index] if index < len(chosen) else {}
        for name in ("name", "organisation", "email"):
            data[f"party-{index}-{name}"] = party.get(name, "")
        data[f"party-{index}-role"] = party.get("role", "contractor")
        data[f"party-{index}-identification"] = party.get("identification", "access_code")
    if pdf is not None:
        data["file"] = (io.BytesIO(pdf), "契約書.pdf")
    data.update(fields)
    return data


def _post_new(client: FlaskClient, data: dict[str, Any], query: str = "") -> TestResponse:
    data = {"csrf_token": _csrf(client, "/contracts/new"), **data}
    return client.post(f"/contracts/new{query}", data=data, content_type="multipart/form-data")


def _create(client: FlaskClient, pdf: bytes, **options: Any) -> tuple[str, str]:
    """Create a contract through the form: its public ID and the page shown next."""
    response = _post_new(client, _form(pdf, **options))
    assert response.status_code == 303, response.get_data(as_text=True)
    location = response.headers["Location"]
    public_id = location.rsplit("/", 1)[1]
    page = client.get(location)
    assert page.status_code == 200
    return public_id, page.get_data(as_text=True)


def _post(client: FlaskClient, public_id: str, action: str, **form: str) -> TestResponse:
    token = _csrf(client, f"/contracts/{public_id}")
    return client.post(f"/contracts/{public_id}/{action}", data={"csrf_token": token, **form})


def _contract(sessions: sessionmaker[Session], public_id: str) -> Contract:
    with sessions() as session:
        contract = session.scalars(select(Contract).where(Contract.public_id == public_id)).one()
        session.expunge(contract)
        return contract


def _mails(sessions: sessionmaker[Session], tag: str | None = None) -> list[OutboxMessage]:
    query = select(OutboxMessage).order_by(OutboxMessage.id)
    if tag is not None:
        query = query.where(OutboxMessage.tag == tag)
    with sessions() as session:
        return list(session.scalars(query))


def _attribute(page: str, element_id: str, name: str) -> str | None:
    found = re.search(rf'<[^>]*\bid="{element_id}"[^>]*>', page)
    assert found, f"no #{element_id}"
    value = re.search(rf'\b{name}="([^"]*)"', found.group(0))
    return value.group(1) if value else None


def _answer_all(sessions: sessionmaker[Session], public_id: str, access_code: str) -> int:
    """Both parties open their link, identify and consent; returns the contract's row id."""
    invitations = _mails(sessions, "contract-invitation")
    for party in (HANAKO, TARO):
        [mail] = [m for m in invitations if m.to_address == party["email"]]
        found = _LINK.search(mail.text_body)
        assert found
        with session_scope(sessions) as session:
            opened = open_link(session, found.group(1), ip="192.0.2.10", user_agent=UA)
        if party is TARO:
            code = access_code
        else:
            otp = _OTP.search(_mails(sessions, "contract-otp")[-1].text_body)
            assert otp
            code = otp.group(1)
        with session_scope(sessions) as session:
            result = verify_code(session, opened.party_id, code, ip="192.0.2.10", user_agent=UA)
        assert result.outcome is CodeOutcome.VERIFIED
        with session_scope(sessions) as session:
            consent(
                session, opened.party_id, document_sha256_seen=opened.original_sha256,
                ip="192.0.2.10", user_agent=UA, public_url=PUBLIC_URL,
            )
    return _contract(sessions, public_id).id


# -- creating, and the access codes shown once ---------------------------------------------------


def test_create_shows_the_access_code_once(
    client: FlaskClient, sessions: sessionmaker[Session], permit_pdf: bytes
) -> None:
    _login(client)
    form = client.get("/contracts/new").get_data(as_text=True)
    assert form.count('<fieldset class="party"') == 4 and 'id="add-party" hidden' in form
    assert 'name="csrf_token"' in form and 'enctype="multipart/form-data"' in form

    public_id, page = _create(client, permit_pdf)
    assert TITLE in page and _attribute(page, "status", "data-status") == "draft"
    assert "契約を作成しました(下書き)。" in page
    assert "電話または書面で各当事者に伝えてください" in page
    [(position, code)] = _CODE.findall(page)
    assert position == "2"  # 常陸 太郎, the party identified by access code

    again = client.get(f"/contracts/{public_id}").get_data(as_text=True)
    assert "access-codes" not in again and code not in again
    with client.session_transaction() as cookie_session:
        assert not any(code in str(value) for value in cookie_session.values())

    contract = _contract(sessions, public_id)
    assert contract.status == "draft" and contract.title == TITLE
    assert contract.original_sha256 == hashlib.sha256(permit_pdf).hexdigest()
    with sessions() as session:  # the code is nowhere in the database in plain text
        parties = list(session.scalars(select(Party).order_by(Party.position)))
        assert [p.name for p in parties] == [HANAKO["name"], TARO["name"]]
        assert [p.identification for p in parties] == ["email_otp", "access_code"]
        assert parties[1].access_code_hash and code not in parties[1].access_code_hash
        for table in ("parties", "audit_events", "contracts", "mail_outbox"):
            dump = " ".join(str(row) for row in session.execute(text(f"SELECT * FROM {table}")))
            assert code not in dump, table

    # The code shown is the one that works.
    assert _post(client, public_id, "send").status_code == 303
    _answer_all(sessions, public_id, code)
    assert _contract(sessions, public_id).status == "completing"


def test_codes_in_the_session_are_encrypted_and_only_for_their_contract(
    client: FlaskClient, permit_pdf: bytes
) -> None:
    _login(client)
    first, _ = _create(client, permit_pdf)
    response = _post_new(client, _form(permit_pdf, title="二件目の契約"))
    with client.session_transaction() as cookie_session:
        stored = cookie_session["koin_new_access_codes"]
    assert not re.search(r"\d{8}", base64.urlsafe_b64decode(stored + "==").decode("latin-1"))
    # Another contract's page drops them without showing them.
    assert "access-codes" not in client.get(f"/contracts/{first}").get_data(as_text=True)
    second = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "access-codes" not in second


def test_email_otp_only_contract_shows_no_codes(client: FlaskClient, permit_pdf: bytes) -> None:
    _login(client)
    taro_otp = {**TARO, "identification": "email_otp"}
    _, page = _create(client, permit_pdf, parties=[HANAKO, taro_otp])
    assert "access-codes" not in page


def test_more_rows_than_the_form_shows_and_sequential_order(
    client: FlaskClient, sessions: sessionmaker[Session], permit_pdf: bytes
) -> None:
    _login(client)
    parties = [HANAKO, TARO] + [
        {**TARO, "name": f"当事者 {n}", "email": f"p{n}@example.jp"} for n in range(3, 7)
    ]
    public_id, page = _create(
        client, permit_pdf, parties=parties, order="sequential", expires_days="３０",
        reminder_days="0",
    )
    assert len(_CODE.findall(page)) == 5
    contract = _contract(sessions, public_id)
    assert contract.signing_order == "sequential" and contract.reminder_interval_days == 0
    assert round((contract.expires_at - contract.created_at).total_seconds()) == 30 * 86400
    with sessions() as session:
        assert session.scalar(
            select(Party.name).where(Party.contract_id == contract.id, Party.position == 6)
        ) == "当事者 6"


# -- refused input --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signed_pdf(installation: Installation, permit_pdf: bytes) -> bytes:
    data = sign_pdf(permit_pdf, installation.signing_context(Role.POSITION), SignOptions()).data
    assert data is not None
    return data


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("not_pdf", 422, "PDF ファイルではありません"),
        ("truncated", 422, "PDF が途中で切れています"),
        ("encrypted", 422, "暗号化"),
        ("signed", 422, "この PDF には既に電子署名があります"),
        ("no_file", 400, "契約書の PDF ファイルを選択してください。"),
        ("bad_email", 422, "メールアドレス「taro@」の形式が正しくありません。"),
        ("one_party", 422, "当事者は 2 〜 20 名にしてください。"),
        ("no_party", 422, "当事者は 2 〜 20 名にしてください。"),
        ("no_prefecture", 422, "茨城県側と契約相手方の両方が必要です。"),
        ("name_missing", 400, "当事者 2: 氏名とメールアドレスを入力してください。"),
        ("same_email", 422, "複数の当事者に指定されています"),
        ("days_not_a_number", 400, "回答期限は日数を数字で入力してください。"),
        ("days_too_many", 400, "回答期限は 1〜365 日にしてください。"),
        ("reminder_out_of_range", 422, "督促の間隔は 0〜60 日にしてください。"),
        ("bad_order", 422, "order は sequential, parallel のいずれかにしてください。"),
        ("no_title", 422, "title を入力してください。"),
    ],
)
def test_bad_input_shows_the_form_again(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    permit_pdf: bytes,
    signed_pdf: bytes,
    case: str,
    status: int,
    message: str,
) -> None:
    pdf: bytes | None = permit_pdf
    parties = [dict(HANAKO), dict(TARO)]
    fields: dict[str, Any] = {}
    if case == "not_pdf":
        pdf = "契約書です".encode()
    elif case == "truncated":
        pdf = permit_pdf[: len(permit_pdf) // 2]
    elif case == "encrypted":
        pdf = password_protected_pdf()
    elif case == "signed":
        pdf = signed_pdf
    elif case == "no_file":
        pdf = None
    elif case == "bad_email":
        parties[1]["email"] = "taro@"
    elif case == "one_party":
        parties = parties[:1]
    elif case == "no_party":
        parties = []
    elif case == "no_prefecture":
        parties[0]["role"] = "contractor"
    elif case == "name_missing":
        parties[1]["name"] = ""
    elif case == "same_email":
        parties[1]["email"] = HANAKO["email"].upper()
    elif case == "days_not_a_number":
        fields["expires_days"] = "二週間"
    elif case == "days_too_many":
        fields["expires_days"] = "99999999"
    elif case == "reminder_out_of_range":
        fields["reminder_days"] = "61"
    elif case == "bad_order":
        fields["order"] = "random"
    elif case == "no_title":
        fields["title"] = "   "
    _login(client)
    response = _post_new(client, _form(pdf, parties, **fields))
    page = response.get_data(as_text=True)
    assert response.status_code == status, page
    assert message in page and 'id="error"' in page
    # what was typed is kept, except the file
    if case != "no_title":
        assert f'value="{fields.get("title", TITLE)}"' in page
    assert f'value="{parties[0]["email"]}"' in page if parties else True
    assert "ファイルをもう一度選択してください。" in page
    with sessions() as session:
        assert session.scalar(select(Contract.id)) is None


def test_bad_input_in_english(client: FlaskClient) -> None:
    _login(client)
    response = _post_new(client, _form(b"not a pdf"), query="?lang=en")
    page = response.get_data(as_text=True)
    assert response.status_code == 422
    assert "Not a PDF file (no %PDF- header)." in page and "Please choose the file again." in page


def test_too_large_upload(app: Flask, client: FlaskClient) -> None:
    _login(client)
    app.config["MAX_CONTENT_LENGTH"] = 4096
    response = _post_new(client, _form(b"%PDF-1.7\n" + b"0" * 8192 + b"\n%%EOF\n"))
    assert response.status_code == 413
    assert "ファイルが大きすぎます" in response.get_data(as_text=True)


# -- the list -------------------------------------------------------------------------------------


def test_list_filters_and_search(
    client: FlaskClient, sessions: sessionmaker[Session], permit_pdf: bytes
) -> None:
    _login(client)
    empty = client.get("/contracts").get_data(as_text=True)
    assert 'id="empty"' in empty and "新しい契約" in empty
    road, _ = _create(client, permit_pdf)
    bridge, _ = _create(client, permit_pdf, title="橋梁補修工事 100%_完了 契約書")
    assert _post(client, bridge, "send").status_code == 303

    page = client.get("/contracts").get_data(as_text=True)
    assert page.index(bridge) < page.index(road)  # most recently changed first
    assert "0/2 合意" in page and "令和" in page
    assert 'class="status status-draft"' in page and 'class="status status-sent"' in page
    assert re.search(r'data-status="draft"[^>]*>下書き <span class="count">1</span>', page)

    drafts = client.get("/contracts?status=draft").get_data(as_text=True)
    assert road in drafts and bridge not in drafts
    sent = client.get("/contracts?status=sent").get_data(as_text=True)
    assert bridge in sent and road not in sent
    assert 'id="empty"' in client.get("/contracts?status=completed").get_data(as_text=True)
    found = client.get("/contracts?q=橋梁").get_data(as_text=True)
    assert bridge in found and road not in found
    literal = client.get("/contracts?q=100%_").get_data(as_text=True)  # no LIKE wildcards
    assert bridge in literal and road not in literal
    assert road not in client.get("/contracts?q=0%").get_data(as_text=True)
    assert bridge in client.get("/contracts?status=bogus&page=x").get_data(as_text=True)

    english = client.get("/contracts?lang=en").get_data(as_text=True)
    assert "New contract" in english and "0/2 agreed" in english and ">Sent <" in english


def test_officers_see_their_own_contracts_and_admins_all(
    client: FlaskClient, app: Flask, permit_pdf: bytes
) -> None:
    _login(client)
    public_id, _ = _create(client, permit_pdf)

    other = app.test_client()
    _login(other, OTHER_OFFICER)
    assert public_id not in other.get("/contracts").get_data(as_text=True)
    for path in ("", "/original.pdf", "/final.pdf", "/audit.json"):
        response = other.get(f"/contracts/{public_id}{path}")
        assert response.status_code == 404, path
        assert TITLE not in response.get_data(as_text=True)
    assert other.get("/contracts/no-such-contract").status_code == 404
    for action in ("send", "resend", "cancel"):
        token = _csrf(other, "/contracts")
        response = other.post(
            f"/contracts/{public_id}/{action}", data={"csrf_token": token, "confirm": "yes"}
        )
        assert response.status_code == 404, action

    admin = app.test_client()
    _login(admin, ADMIN)
    listing = admin.get("/contracts").get_data(as_text=True)
    assert public_id in listing and "担当" in listing
    assert admin.get(f"/contracts/{public_id}").status_code == 200
    assert _post(admin, public_id, "send").status_code == 303


def test_login_and_role_required(app: Flask, client: FlaskClient, permit_pdf: bytes) -> None:
    for path in ("/contracts", "/contracts/new", "/contracts/x", "/contracts/x/audit.json"):
        response = client.get(path)
        assert response.status_code == 302, path
        assert response.headers["Location"].startswith("/login?next=")
    assert "/contracts/x" not in client.get("/").get_data(as_text=True)

    signer = app.test_client()
    _login(signer, SIGNER)
    assert signer.get("/contracts").status_code == 403
    assert 'id="nav-contracts"' not in signer.get("/").get_data(as_text=True)
    _login(client)
    assert 'id="nav-contracts"' in client.get("/").get_data(as_text=True)


def test_forms_need_the_csrf_token(
    client: FlaskClient, sessions: sessionmaker[Session], permit_pdf: bytes
) -> None:
    _login(client)
    response = client.post(
        "/contracts/new", data=_form(permit_pdf), content_type="multipart/form-data"
    )
    assert response.status_code == 400
    assert "フォームの有効期限が切れたか" in response.get_data(as_text=True)
    public_id, _ = _create(client, permit_pdf)
    for action in ("send", "resend", "cancel"):
        forged = client.post(f"/contracts/{public_id}/{action}", data={"csrf_token": "forged"})
        assert forged.status_code == 400
    assert _contract(sessions, public_id).status == "draft" and _mails(sessions) == []


# -- send, resend, cancel -------------------------------------------------------------------------


def test_send_resend_and_cancel(
    client: FlaskClient, sessions: sessionmaker[Session], permit_pdf: bytes
) -> None:
    _login(client)
    public_id, page = _create(client, permit_pdf)
    assert 'id="send-button"' in page and 'id="resend-button"' not in page
    assert 'id="cancel-button"' in page

    response = _post(client, public_id, "send")
    assert response.status_code == 303
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert _attribute(page, "status", "data-status") == "sent"
    assert "契約を送付しました。" in page
    assert 'id="send-button"' not in page and 'id="resend-button"' in page
    invitations = _mails(sessions, "contract-invitation")
    assert sorted(m.to_address for m in invitations) == sorted([HANAKO["email"], TARO["email"]])
    assert all(f"{PUBLIC_URL}/c/" in m.text_body for m in invitations)
    assert "メール送信(招待)" in page and "送付" in page

    again = _post(client, public_id, "send")
    assert again.status_code == 409
    assert "「送付済み」のため、この操作(send)はできません" in again.get_data(as_text=True)

    resent = client.post(
        f"/contracts/{public_id}/resend",
        data={"csrf_token": _csrf(client, f"/contracts/{public_id}")},
        follow_redirects=True,
    )
    assert "2 名に招待メールを再送しました。" in resent.get_data(as_text=True)
    assert len(_mails(sessions, "contract-invitation")) == 4

    unconfirmed = _post(client, public_id, "cancel", reason="発注取りやめ")
    assert unconfirmed.status_code == 400
    assert "チェックを入れてください" in unconfirmed.get_data(as_text=True)
    assert _contract(sessions, public_id).status == "sent"
    too_long = _post(client, public_id, "cancel", reason="長" * 1500, confirm="yes")
    assert too_long.status_code == 422

    cancelled = _post(client, public_id, "cancel", reason="発注取りやめのため", confirm="yes")
    assert cancelled.status_code == 303
    page = client.get(f"/contracts/{public_id}").get_data(as_text=True)
    assert _attribute(page, "status", "data-status") == "cancelled"
    assert "契約を取り消しました。" in page and "発注取りやめのため" in page
    assert 'id="actions"' not in page
    assert len(_mails(sessions, "contract-cancelled")) == 2

    for action in ("resend", "cancel", "send"):
        refused = _post(client, public_id, action, confirm="yes")
        assert refused.status_code == 409, action
        assert "「取消し」のため" in refused.get_data(as_text=True)


# -- downloads, the audit log and its check -------------------------------------------------------


def _recomputed(event: dict[str, Any]) -> str:
    hashed = {key: value for key, value in event.items() if key != "sha256"}
    canonical = json.dumps(hashed, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def test_audit_json_and_chain_check(
    client: FlaskClient, sessions: sessionmaker[Session], permit_pdf: bytes
) -> None:
    _login(client)
    public_id, page = _create(client, permit_pdf)
    _post(client, public_id, "send")
    page = client.get(f"/contracts/{public_id}").get_data(as_text=True)
    assert _attribute(page, "chain-check", "data-ok") == "true"
    assert "改ざんは検出されませんでした" in page

    response = client.get(f"/contracts/{public_id}/audit.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.headers["Content-Disposition"] == (
        f'attachment; filename="audit-{public_id}.json"'
    )
    assert response.headers["Cache-Control"] == "no-store"
    body = response.get_json()
    assert body["contract"]["title"] == TITLE and body["contract"]["status"] == "sent"
    assert [p["name"] for p in body["parties"]] == [HANAKO["name"], TARO["name"]]
    events = body["events"]
    assert [e["kind"] for e in events[:2]] == ["created", "sent"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    prev = "0" * 64
    for event in events:  # anyone can recompute the chain from the file
        assert event["prev_sha256"] == prev and _recomputed(event) == event["sha256"]
        prev = event["sha256"]
    assert body["chain_check"] == {
        "ok": True, "events": len(events), "head_sha256": prev, "broken_seq": None,
        "reason": None, "reason_ja": None,
    }
    assert body["chain_head"]["timestamp_token_base64"] is None
    queued = [e for e in events if e["kind"] == "email_queued"]
    assert {e["email"] for e in queued} == {HANAKO["email"], TARO["email"]}
    assert {e["identification"] for e in events if e["party"]} >= {"email_otp"}

    contract = _contract(sessions, public_id)
    with session_scope(sessions) as session:
        session.execute(
            text("UPDATE audit_events SET ip = '203.0.113.66' WHERE contract_id = :c AND seq = 2"),
            {"c": contract.id},
        )
    page = client.get(f"/contracts/{public_id}").get_data(as_text=True)
    assert _attribute(page, "chain-check", "data-ok") == "false"
    assert _attribute(page, "chain-check", "data-broken-seq") == "2"
    assert "改ざんが検出されました" in page and "記録番号 2:" in page
    assert "イベント 2 が改変されています" in page
    assert re.search(r'<li class="event broken" data-seq="2"', page)
    english = client.get(f"/contracts/{public_id}?lang=en").get_data(as_text=True)
    assert "Tampering detected" in english and "event 2 was altered" in english
    check = client.get(f"/contracts/{public_id}/audit.json").get_json()["chain_check"]
    assert check["ok"] is False and check["broken_seq"] == 2


def test_downloads_of_a_completed_contract(
    client: FlaskClient,
    sessions: sessionmaker[Session],
    installation: Installation,
    permit_pdf: bytes,
) -> None:
    _login(client)
    public_id, page = _create(client, permit_pdf)
    [(_, code)] = _CODE.findall(page)
    original = client.get(f"/contracts/{public_id}/original.pdf")
    assert original.status_code == 200 and original.mimetype == "application/pdf"
    assert original.data == permit_pdf
    disposition = original.headers["Content-Disposition"]
    assert disposition.startswith("attachment;")
    assert unquote(disposition.split("filename*=UTF-8''")[1]) == f"{TITLE}.pdf"
    assert client.get(f"/contracts/{public_id}/final.pdf").status_code == 404

    _post(client, public_id, "send")
    contract_id = _answer_all(sessions, public_id, code)
    outcome = complete_contract(sessions, contract_id, installation, public_url=PUBLIC_URL)
    assert outcome is CompletionOutcome.COMPLETED
    contract = _contract(sessions, public_id)

    page = client.get(f"/contracts/{public_id}").get_data(as_text=True)
    assert _attribute(page, "status", "data-status") == "completed"
    assert "2/2 合意" in page and 'id="download-final"' in page and 'id="actions"' not in page
    assert _attribute(page, "chain-check", "data-ok") == "true"
    assert "締結時の監査証跡タイムスタンプ" in page and "立会人署名" in page
    assert page.count('data-status="consented"') == 2 and "IP 192.0.2.10" in page

    final = client.get(f"/contracts/{public_id}/final.pdf")
    assert final.status_code == 200 and final.mimetype == "application/pdf"
    assert hashlib.sha256(final.data).hexdigest() == contract.final_sha256
    disposition = final.headers["Content-Disposition"]
    assert unquote(disposition.split("filename*=UTF-8''")[1]) == f"{TITLE}(締結済み).pdf"

    body = client.get(f"/contracts/{public_id}/audit.json").get_json()
    head = body["chain_head"]
    assert head["sha256"] == contract.chain_head_sha256
    token = base64.b64decode(head["timestamp_token_base64"])
    assert token == contract.chain_head_timestamp
    assert timestamp_imprint(token) == ("sha256", bytes.fromhex(head["sha256"]))
    assert head["timestamp_time"].endswith("Z")
    assert body["chain_check"]["ok"] is True
    kinds = [e["kind"] for e in body["events"]]
    assert kinds.index("signed") < kinds.index("completed") < kinds.index("chain_timestamped")


def test_a_changed_stored_file_is_not_served(
    client: FlaskClient, sessions: sessionmaker[Session], installation: Installation,
    permit_pdf: bytes,
) -> None:
    _login(client)
    public_id, _ = _create(client, permit_pdf)
    path = contract_file(installation.home, _contract(sessions, public_id).original_path)
    path.write_bytes(permit_pdf.replace(b"%%EOF", b"%%EOF\n%changed", 1))
    response = client.get(f"/contracts/{public_id}/original.pdf")
    assert response.status_code == 500
    assert "記録されたハッシュ値と一致しません" in response.get_data(as_text=True)
    path.unlink()
    assert client.get(f"/contracts/{public_id}/original.pdf").status_code == 404


# -- in a browser: the "add party" button ---------------------------------------------------------


def test_add_party_button_in_chromium(
    app: Flask, sessions: sessionmaker[Session], permit_pdf: bytes, tmp_path: Path
) -> None:
    from tests.servers import chromium, wsgi_server

    pdf = tmp_path / "契約書.pdf"
    pdf.write_bytes(permit_pdf)
    with wsgi_server(app) as base, chromium() as browser:
        page = browser.new_page(viewport={"width": 390, "height": 844}, locale="ja-JP")
        page.goto(f"{base}login?next=/contracts/new")
        page.fill("input[name=email]", OFFICER)
        page.fill("input[name=password]", PASSWORD)
        page.click("#login-button")
        page.wait_for_url("**/contracts/new")
        assert page.locator("fieldset.party:visible").count() == 2
        for _ in range(3):  # two hidden rows, then a new one
            page.click("#add-party")
        assert page.locator("fieldset.party:visible").count() == 5
        assert page.locator("#party-4 legend .n").inner_text() == "5"
        page.fill("input[name=title]", TITLE)
        page.set_input_files("input[name=file]", str(pdf))
        for index, party in enumerate(
            [HANAKO, TARO, {**TARO, "name": "第三 者", "email": "third@example.jp"}]
        ):
            prefix = f"input[name=party-{index if index < 2 else 4}-"
            page.fill(prefix + "name]", party["name"])
            page.fill(prefix + "email]", party["email"])
        page.select_option("select[name=party-0-role]", "prefecture")
        page.select_option("select[name=party-0-identification]", "email_otp")
        page.click("#create-button")
        page.wait_for_selector("#access-codes")
        assert page.locator("code.access-code").count() == 2
        assert page.locator("#parties > li").count() == 3
    with sessions() as session:
        assert session.scalar(select(Party.name).where(Party.position == 3)) == "第三 者"

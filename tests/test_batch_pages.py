"""The signing staff's pages (``web/batch_views.py``) with Flask's test client on SQLite and
PostgreSQL: one PDF signed at once, many PDFs and ZIPs made into a batch worked off by a real
``BatchWorker``, bad files failing alone with their reason, the progress JSON, the ZIP of the
signed files, retry and cancel, who may see what, CSRF; and the history search service."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import x509 as asn1_x509
from flask import Flask
from flask.testing import FlaskClient
from pyhanko.pdf_utils.reader import PdfFileReader
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import TestResponse, encode_multipart

import contracts
from contracts import (
    Batch,
    BatchWorker,
    SignedDocument,
    SigningChannel,
    create_template,
    create_user,
    record_signed_document,
    session_scope,
)
from contracts.history import (
    STANDARD_STAMP,
    HistoryQuery,
    history_signers,
    search_signed_documents,
)
from contracts.staff_signing import purge_signed_copies, signed_copy
from signer import Installation, new_document_id
from signer.samples import make_permit_pdf
from tests.conftest import PUBLIC_URL
from tests.hostile import password_protected_pdf
from tests.permits import numbered_copies
from tests.validators import pyhanko_status
from web import create_app, services

SECRET = "test-secret-key-0123456789abcdef-not-for-production"
PASSWORD = "correct horse battery staple"
SIGNER = "hisho@pref.ibaraki.example"
OTHER = "tanaka@pref.ibaraki.example"
ADMIN = "admin@pref.ibaraki.example"
OFFICER = "keiyaku@pref.ibaraki.example"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


# -- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def home(koin_home: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home, ignore=shutil.ignore_patterns("koin.db*"))
    return home


@pytest.fixture
def users(sessions: sessionmaker[Session]) -> dict[str, int]:
    ids = {}
    with session_scope(sessions) as session:
        for email, roles, name in (
            (SIGNER, ["signer"], "秘書 一郎"),
            (OTHER, ["signer"], "田中 二郎"),
            (ADMIN, ["admin"], "管理 三郎"),
            (OFFICER, ["officer"], "契約 四郎"),
        ):
            user, _ = create_user(session, email, roles, password=PASSWORD, display_name=name)
            ids[email] = user.id
    return ids


@pytest.fixture
def app(home: Path, db_url: str, engine: Engine, users: dict[str, int]) -> Iterator[Flask]:
    app = create_app(
        {"KOIN_HOME": str(home), "TESTING": True, "KOIN_DATABASE_URL": db_url,
         "KOIN_PUBLIC_URL": PUBLIC_URL, "SECRET_KEY": SECRET}
    )
    yield app
    services.close(app)


@pytest.fixture
def worker(app: Flask, home: Path) -> BatchWorker:
    """The embedded executor, attached but not started: the tests run its rounds themselves
    (``_work_off``), so they see each state in between."""
    with app.app_context():
        batch_worker = BatchWorker(
            services.session_factory(), Installation(home, public_url=PUBLIC_URL), threads=2,
            interval=30, public_url=PUBLIC_URL,
        )
        services.attach_batch_worker(batch_worker)
    return batch_worker


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="module")
def permits(installation: Installation) -> list[bytes]:
    permit = make_permit_pdf(installation.font_file, number=1)
    return list(numbered_copies(permit, 6))


def _csrf(client: FlaskClient, path: str = "/login") -> str:
    page = client.get(path).get_data(as_text=True)
    found = _CSRF.search(page)
    assert found, page
    return found.group(1)


def _login(client: FlaskClient, email: str = SIGNER) -> None:
    response = client.post(
        "/login", data={"csrf_token": _csrf(client), "email": email, "password": PASSWORD}
    )
    assert response.status_code == 302, response.get_data(as_text=True)


def _sign(client: FlaskClient, files: list[tuple[bytes, str]], query: str = "",
          **fields: str) -> TestResponse:
    data: dict[str, Any] = {"csrf_token": _csrf(client, "/sign"), **fields}
    data["file"] = [(io.BytesIO(content), name) for content, name in files]
    return client.post(f"/sign{query}", data=data, content_type="multipart/form-data")


def _new_batch(client: FlaskClient, files: list[tuple[bytes, str]], **fields: str) -> str:
    response = _sign(client, files, **fields)
    assert response.status_code == 303, response.get_data(as_text=True)
    location = response.headers["Location"]
    assert location.startswith("/batches/")
    return location.rsplit("/", 1)[1]


def _work_off(worker: BatchWorker, client: FlaskClient, batch_id: str) -> dict[str, Any]:
    for _ in range(100):
        body = _progress(client, batch_id)
        if body["status"] != "running":
            return body
        worker.run_once()
    raise AssertionError(f"batch {batch_id} did not finish: {body}")


def _progress(client: FlaskClient, batch_id: str, query: str = "") -> dict[str, Any]:
    response = client.get(f"/batches/{batch_id}/progress{query}")
    assert response.status_code == 200, response.get_data(as_text=True)
    body: dict[str, Any] = response.get_json()
    return body


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return out.getvalue()


def _page(client: FlaskClient, path: str) -> str:
    response = client.get(path)
    assert response.status_code == 200, (path, response.status_code)
    return response.get_data(as_text=True)


# -- one PDF ------------------------------------------------------------------------------------


def test_one_pdf_is_signed_at_once_and_recorded_as_web(
    client: FlaskClient, permits: list[bytes], sessions: sessionmaker[Session],
    users: dict[str, int], root_cert: asn1_x509.Certificate, home: Path,
) -> None:
    with session_scope(sessions) as session:
        create_template(session, "kensetsu-kyoka", title="建設業許可通知書", page=1, qr=True)
    _login(client)
    form = _page(client, "/sign")
    assert 'value="kensetsu-kyoka"' in form and "建設業許可通知書" in form
    assert 'id="nav-sign"' in form and 'id="nav-history"' in form
    assert "<script>" not in form and " onclick=" not in form and " style=" not in form

    response = _sign(client, [(permits[0], "許可書-1.pdf")], template="kensetsu-kyoka")
    assert response.status_code == 303, response.get_data(as_text=True)
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    document_id = re.search(r'id="document-id">([0-9A-Z-]{19})<', page)
    assert document_id, page
    doc_id = document_id.group(1)
    assert f'href="/verify/{doc_id}"' in page and "建設業許可通知書" in page

    with client.get(f"/sign/{doc_id}/file") as download:
        assert download.status_code == 200 and download.mimetype == "application/pdf"
        assert "filename*=UTF-8''%E8%A8%B1" in download.headers["Content-Disposition"]
        signed = download.get_data()
    digest = hashlib.sha256(signed).hexdigest()
    assert f'id="sha256">{digest}<' in page
    assert pyhanko_status(signed, root_cert).bottom_line
    assert len(PdfFileReader(io.BytesIO(signed)).embedded_signatures) == 1
    with session_scope(sessions) as session:
        record = contracts.require_document(session, doc_id)
        assert record.channel == SigningChannel.WEB.value
        assert record.signed_by == users[SIGNER]
        assert record.template == "kensetsu-kyoka"
        assert record.sha256 == digest and record.file_name == "許可書-1.pdf"
    # nobody else fetches the copy; it is gone once no longer kept, or if it was changed
    other = client.application.test_client()
    _login(other, OTHER)
    assert other.get(f"/sign/{doc_id}/file").status_code == 404
    assert other.get(f"/sign/{doc_id}").status_code == 404
    copy = home / "signed" / f"{doc_id}.pdf"
    copy.write_bytes(signed + b"\n")
    assert client.get(f"/sign/{doc_id}/file").status_code == 404
    copy.write_bytes(signed)
    assert client.get(f"/sign/{doc_id}/file").status_code == 200
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=25)
    with session_scope(sessions) as session, pytest.raises(contracts.DocumentNotFound):
        user = contracts.get_user(session, users[SIGNER])
        assert user is not None
        signed_copy(session, home, doc_id, user, now=later)
    assert purge_signed_copies(home) == 0
    assert purge_signed_copies(home, now=later) == 1
    assert client.get(f"/sign/{doc_id}/file").status_code == 404


@pytest.mark.parametrize(
    ("content", "name", "japanese", "english"),
    [
        (None, "locked.pdf", "パスワードで保護", "password-protected"),
        (b"%PDF-1.7 not really a PDF", "broken.pdf", "途中で切れています", "truncated"),
        (b"just some notes", "notes.txt", "PDF でも ZIP でもない", "neither a PDF nor a ZIP"),
    ],
)
def test_one_bad_file_gets_its_reason_not_a_500(
    client: FlaskClient, sessions: sessionmaker[Session], content: bytes | None, name: str,
    japanese: str, english: str,
) -> None:
    _login(client)
    data = content if content is not None else password_protected_pdf()
    response = _sign(client, [(data, name)])
    assert response.status_code == 422
    assert japanese in response.get_data(as_text=True)
    response = _sign(client, [(data, name)], query="?lang=en")
    assert response.status_code == 422
    assert english in response.get_data(as_text=True)
    with session_scope(sessions) as session:
        assert session.scalars(select(SignedDocument)).all() == []
        assert session.scalars(select(Batch)).all() == []


def test_refused_forms(client: FlaskClient, permits: list[bytes], home: Path) -> None:
    _login(client)
    # no file, unknown template, over-long batch name
    empty = client.post("/sign", data={"csrf_token": _csrf(client, "/sign")},
                        content_type="multipart/form-data")
    assert empty.status_code == 400 and "選択してください" in empty.get_data(as_text=True)
    unknown = _sign(client, [(permits[0], "a.pdf")], template="no-such-template")
    assert unknown.status_code == 400 and "no-such-template" in unknown.get_data(as_text=True)
    long_name = _sign(client, [(permits[0], "a.pdf"), (permits[1], "b.pdf")], name="長" * 201)
    assert long_name.status_code == 400 and "200 文字" in long_name.get_data(as_text=True)
    # nothing usable at all: no batch is made, and no folder is left
    nothing = _sign(client, [(b"hello", "a.txt"), (b"PK\x03\x04broken", "b.zip")])
    text = nothing.get_data(as_text=True)
    assert nothing.status_code == 422 and "署名できる PDF がありませんでした" in text
    assert "a.txt" in text and "b.zip" in text and "ZIP ファイルとして読めません" in text
    assert not (home / "batches").exists() or not any((home / "batches").iterdir())


# -- batches ------------------------------------------------------------------------------------


def test_several_files_become_a_batch_bad_ones_fail_alone(
    client: FlaskClient, worker: BatchWorker, permits: list[bytes],
    root_cert: asn1_x509.Certificate, sessions: sessionmaker[Session], users: dict[str, int],
) -> None:
    _login(client)
    batch_id = _new_batch(client, [
        (permits[0], "許可書-1.pdf"), (permits[1], "許可書-2.pdf"),
        (password_protected_pdf(), "locked.pdf"), (b"not a pdf at all", "notes.pdf"),
        (b"hello", "readme.txt"),
    ], name="令和8年11月分 建設業許可通知書")
    page = _page(client, f"/batches/{batch_id}")
    assert "令和8年11月分 建設業許可通知書" in page and "4 件の PDF の一括署名を始めました" in page
    assert 'id="skipped"' in page and "readme.txt" in page and "PDF でも ZIP でもない" in page
    assert 'http-equiv="refresh"' in page  # without JavaScript the page reloads itself
    before = _progress(client, batch_id)
    assert before["status"] == "running"
    assert before["progress"] == {"total": 4, "done": 0, "failed": 0, "waiting": 4,
                                  "running": 0, "complete": False}

    body = _work_off(worker, client, batch_id)
    assert body["status"] == "finished"
    assert body["progress"] == {"total": 4, "done": 2, "failed": 2, "waiting": 0,
                                "running": 0, "complete": True}
    assert body["links"]["archive"] == f"/batches/{batch_id}/archive.zip"
    by_name = {d["file_name"]: d for d in body["documents"]}
    assert by_name["許可書-1.pdf"]["download"] == f"/batches/{batch_id}/documents/1"
    assert by_name["locked.pdf"]["download"] is None
    assert "パスワード" in by_name["locked.pdf"]["error"]
    assert "password" in by_name["locked.pdf"]["error_en"]

    page = _page(client, f"/batches/{batch_id}")
    assert "パスワードで保護されています" in page and "PDF ファイルではありません" in page
    assert 'http-equiv="refresh"' not in page
    english = _page(client, f"/batches/{batch_id}?lang=en")
    assert "password-protected" in english and "Not a PDF file" in english
    failed_only = _page(client, f"/batches/{batch_id}?state=failed&lang=ja")
    assert "locked.pdf" in failed_only and "許可書-1.pdf" not in failed_only
    assert [d["file_name"] for d in _progress(client, batch_id, "?state=done")["documents"]] == [
        "許可書-1.pdf", "許可書-2.pdf"
    ]

    with client.get(f"/batches/{batch_id}/documents/2") as one:
        assert one.status_code == 200 and one.mimetype == "application/pdf"
        assert pyhanko_status(one.get_data(), root_cert).bottom_line
    assert client.get(f"/batches/{batch_id}/documents/3").status_code == 404
    assert client.get(f"/batches/{batch_id}/documents/99").status_code == 404

    listing = _page(client, "/batches")
    assert batch_id in listing and "署名済み 2 / 4" in listing and "失敗 2" in listing
    with session_scope(sessions) as session:
        records = session.scalars(select(SignedDocument)).all()
        assert {r.channel for r in records} == {"batch"} and len(records) == 2
        assert {r.signed_by for r in records} == {users[SIGNER]}


def test_zip_upload_and_the_zip_of_signed_files(
    client: FlaskClient, worker: BatchWorker, permits: list[bytes],
    root_cert: asn1_x509.Certificate,
) -> None:
    _login(client)
    archive_in = _zip([
        ("permits/許可書-1.pdf", permits[0]), ("permits/許可書-2.pdf", permits[1]),
        ("permits/許可書-3.pdf", permits[2]), ("readme.txt", b"hello"),
        ("__MACOSX/permits/._許可書-1.pdf", b"junk"),
    ])
    batch_id = _new_batch(client, [(archive_in, "通知書.zip")])
    page = _page(client, f"/batches/{batch_id}")
    assert "3 件の PDF" in page and "通知書.zip: readme.txt" in page and "__MACOSX" not in page
    body = _work_off(worker, client, batch_id)
    assert body["progress"]["done"] == 3 and body["progress"]["failed"] == 0

    response = client.get(f"/batches/{batch_id}/archive.zip")
    assert response.status_code == 200 and response.mimetype == "application/zip"
    assert response.is_streamed
    with zipfile.ZipFile(io.BytesIO(response.get_data())) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        assert names == ["manifest.csv", "permits_許可書-1.pdf", "permits_許可書-2.pdf",
                         "permits_許可書-3.pdf"]
        manifest = list(csv.DictReader(io.StringIO(
            archive.read("manifest.csv").decode("utf-8-sig")
        )))
        for name in names[1:]:
            signed = archive.read(name)
            assert len(PdfFileReader(io.BytesIO(signed)).embedded_signatures) == 1
            assert pyhanko_status(signed, root_cert).bottom_line, name
    assert [row["status"] for row in manifest] == ["signed"] * 3
    assert all(re.fullmatch(r"[0-9A-Z]{4}(-[0-9A-Z]{4}){3}", row["document_id"])
               for row in manifest)


def test_retry_failed_and_cancel(
    client: FlaskClient, worker: BatchWorker, permits: list[bytes],
) -> None:
    _login(client)
    batch_id = _new_batch(client, [(permits[0], "ok.pdf"), (b"%PDF-1.7 broken", "bad.pdf")])
    assert _work_off(worker, client, batch_id)["progress"]["failed"] == 1
    page = _page(client, f"/batches/{batch_id}")
    assert 'id="retry"' in page and 'id="retry" hidden' not in page
    assert 'id="cancel" hidden' in page  # a finished batch cannot be cancelled

    token = _csrf(client, f"/batches/{batch_id}")
    unconfirmed = client.post(f"/batches/{batch_id}/retry", data={"csrf_token": token})
    assert unconfirmed.status_code == 400 and "チェック" in unconfirmed.get_data(as_text=True)
    retried = client.post(f"/batches/{batch_id}/retry",
                          data={"csrf_token": token, "confirm": "yes"})
    assert retried.status_code == 303
    assert "失敗した 1 件をもう一度署名します" in _page(client, f"/batches/{batch_id}")
    body = _progress(client, batch_id)
    assert body["status"] == "running"
    assert body["progress"]["failed"] == 0 and body["progress"]["waiting"] == 1
    again = _work_off(worker, client, batch_id)  # the file is still broken: it fails again
    assert again["status"] == "finished" and again["progress"]["failed"] == 1

    # cancel: a batch not yet worked off stops; its waiting files are never signed
    second = _new_batch(client, [(permits[1], "a.pdf"), (permits[2], "b.pdf")])
    token = _csrf(client, f"/batches/{second}")
    cancelled = client.post(f"/batches/{second}/cancel",
                            data={"csrf_token": token, "confirm": "yes"})
    assert cancelled.status_code == 303
    assert _progress(client, second)["status"] == "cancelled"
    worker.run_once()
    assert _progress(client, second)["progress"]["done"] == 0
    twice = client.post(f"/batches/{second}/cancel", data={"csrf_token": token, "confirm": "yes"})
    assert twice.status_code == 409 and "取り消せません" in twice.get_data(as_text=True)
    no_retry = client.post(f"/batches/{second}/retry",
                           data={"csrf_token": token, "confirm": "yes"})
    assert no_retry.status_code == 409


def test_who_may_see_what(
    app: Flask, client: FlaskClient, permits: list[bytes], worker: BatchWorker,
) -> None:
    _login(client)
    batch_id = _new_batch(client, [(permits[0], "a.pdf"), (permits[1], "b.pdf")])
    _work_off(worker, client, batch_id)

    other = app.test_client()
    _login(other, OTHER)
    for path in (f"/batches/{batch_id}", f"/batches/{batch_id}/archive.zip",
                 f"/batches/{batch_id}/documents/1", "/batches/no-such-batch"):
        assert other.get(path).status_code == 404, path
    progress = other.get(f"/batches/{batch_id}/progress")
    assert progress.status_code == 404 and progress.get_json()["error"]["code"] == "not_found"
    token = _csrf(other, "/sign")
    for action in ("retry", "cancel"):
        answer = other.post(f"/batches/{batch_id}/{action}",
                            data={"csrf_token": token, "confirm": "yes"})
        assert answer.status_code == 404, action
    assert batch_id not in _page(other, "/batches")

    admin = app.test_client()
    _login(admin, ADMIN)
    assert batch_id in _page(admin, f"/batches/{batch_id}")
    assert batch_id in _page(admin, "/batches")
    assert admin.get("/sign").status_code == 403  # administrators oversee; signers sign

    officer = app.test_client()
    _login(officer, OFFICER)
    for path in ("/sign", "/batches", f"/batches/{batch_id}", "/history"):
        assert officer.get(path).status_code == 403, path
    assert officer.get(f"/batches/{batch_id}/progress").status_code == 403
    assert 'id="nav-sign"' not in _page(officer, "/verify")

    anonymous = app.test_client()
    for path in ("/sign", "/batches", "/history", f"/batches/{batch_id}"):
        answer = anonymous.get(path)
        assert answer.status_code == 302 and "/login" in answer.headers["Location"], path
    expired = anonymous.get(f"/batches/{batch_id}/progress")
    assert expired.status_code == 401 and expired.get_json()["error"]["code"] == "login_required"


def test_forms_without_csrf_token_are_refused(
    client: FlaskClient, permits: list[bytes], worker: BatchWorker,
    sessions: sessionmaker[Session],
) -> None:
    _login(client)
    no_token = client.post("/sign", data={"file": (io.BytesIO(permits[0]), "a.pdf")},
                           content_type="multipart/form-data")
    assert no_token.status_code == 400 and "再読み込み" in no_token.get_data(as_text=True)
    batch_id = _new_batch(client, [(permits[0], "a.pdf"), (permits[1], "b.pdf")])
    for action in ("retry", "cancel"):
        answer = client.post(f"/batches/{batch_id}/{action}", data={"confirm": "yes"})
        assert answer.status_code == 400, action
    assert _progress(client, batch_id)["status"] == "running"
    with session_scope(sessions) as session:
        assert session.scalars(select(SignedDocument)).all() == []


# -- history ------------------------------------------------------------------------------------


def test_history_page_lists_searches_and_filters(
    app: Flask, client: FlaskClient, permits: list[bytes], worker: BatchWorker,
    users: dict[str, int], sessions: sessionmaker[Session],
) -> None:
    _login(client)
    signed = _sign(client, [(permits[0], "単独の許可書.pdf")])
    assert signed.status_code == 303
    web_id = signed.headers["Location"].rsplit("/", 1)[1]
    batch_id = _new_batch(client, [(permits[1], "一括-1.pdf"), (permits[2], "一括-2.pdf")])
    _work_off(worker, client, batch_id)
    other = app.test_client()
    _login(other, OTHER)
    assert _sign(other, [(permits[3], "田中の文書.pdf")]).status_code == 303

    page = _page(client, "/history")
    assert "単独の許可書.pdf" in page and "一括-2.pdf" in page and "田中の文書.pdf" not in page
    assert "3 件中 1〜3 件" in page and "署名画面" in page and "一括署名" in page
    assert f'href="/verify/{web_id}"' in page and "秘書 一郎" in page
    typed = web_id.replace("-", "").lower().replace("0", "o")
    found = _page(client, f"/history?q={typed}")
    assert "単独の許可書.pdf" in found and "一括-1.pdf" not in found
    with session_scope(sessions) as session:
        digest = contracts.require_document(session, web_id).sha256
    assert "単独の許可書.pdf" in _page(client, f"/history?q={digest[:10]}")
    by_channel = _page(client, "/history?channel=batch")
    assert "一括-1.pdf" in by_channel and "単独の許可書.pdf" not in by_channel
    assert "条件に合う文書はありません" in _page(client, "/history?channel=api")
    assert "一括-1" in _page(client, "/history?q=一括&template=-")
    bad = client.get("/history?from=2026-13-40")
    assert bad.status_code == 400 and "日付" in bad.get_data(as_text=True)
    assert "一括-1.pdf" in bad.get_data(as_text=True)  # the other filters still apply
    # a signer never sees others' documents, even when asking for them
    assert "田中の文書.pdf" not in _page(client, f"/history?signer={users[OTHER]}")

    admin = app.test_client()
    _login(admin, ADMIN)
    everything = _page(admin, "/history")
    assert "田中の文書.pdf" in everything and "単独の許可書.pdf" in everything
    assert 'id="filter-signer"' in everything and "田中 二郎" in everything
    only_other = _page(admin, f"/history?signer={users[OTHER]}")
    assert "田中の文書.pdf" in only_other and "単独の許可書.pdf" not in only_other


def _record(session: Session, *, file_name: str, signed_at: dt.datetime, signed_by: int | None,
            template: str | None = None, channel: SigningChannel | None = SigningChannel.WEB,
            ) -> SignedDocument:
    return record_signed_document(
        session, document_id=new_document_id(),
        sha256=hashlib.sha256(file_name.encode() + signed_at.isoformat().encode()).hexdigest(),
        signer_role="position", signer_subject="CN=Governor of Ibaraki Prefecture",
        level="B-T", signed_at=signed_at, file_name=file_name, signed_by=signed_by,
        template=template, channel=channel,
    )


def test_history_service_search_and_filters(
    sessions: sessionmaker[Session], users: dict[str, int]
) -> None:
    jst = dt.timezone(dt.timedelta(hours=9))
    with session_scope(sessions) as session:
        create_template(session, "kensetsu-kyoka", title="建設業許可通知書")
        late = _record(session, file_name="許可書_100%.pdf",
                       signed_at=dt.datetime(2026, 11, 23, 23, 30, tzinfo=jst),
                       signed_by=users[SIGNER], template="kensetsu-kyoka")
        early = _record(session, file_name="通知書_a.pdf",
                        signed_at=dt.datetime(2026, 11, 24, 0, 10, tzinfo=jst),
                        signed_by=users[SIGNER], channel=SigningChannel.BATCH)
        others = _record(session, file_name="通知書_b.pdf",
                         signed_at=dt.datetime(2026, 11, 1, 9, 0, tzinfo=jst),
                         signed_by=users[OTHER], channel=SigningChannel.API)
        server = _record(session, file_name="cli.pdf",
                         signed_at=dt.datetime(2026, 10, 1, 9, 0, tzinfo=jst),
                         signed_by=None, channel=SigningChannel.CLI)
        ids = {r.file_name: r.document_id for r in (late, early, others, server)}
        digests = {r.file_name: r.sha256 for r in (late, early, others, server)}

    def names(query: HistoryQuery, **page: int) -> list[str | None]:
        with sessions() as session:
            found = search_signed_documents(session, query, **page)
            return [row.document.file_name for row in found.rows]

    # newest first; the signer's display name comes along (None for the server)
    with sessions() as session:
        everything = search_signed_documents(session, HistoryQuery())
        assert everything.total == 4 and not everything.has_more
        assert [r.document.file_name for r in everything.rows] == [
            "通知書_a.pdf", "許可書_100%.pdf", "通知書_b.pdf", "cli.pdf"]
        assert [r.signer_name for r in everything.rows] == ["秘書 一郎", "秘書 一郎", "田中 二郎",
                                                           None]
    # document IDs as people type them, whole or in part
    typed = ids["通知書_b.pdf"].replace("-", " ").lower().replace("0", "o")
    assert names(HistoryQuery(text=typed)) == ["通知書_b.pdf"]
    assert names(HistoryQuery(text=ids["cli.pdf"][5:14])) == ["cli.pdf"]
    # SHA-256, whole or its start; file names in part, % and _ taken literally
    assert names(HistoryQuery(text=digests["許可書_100%.pdf"].upper())) == ["許可書_100%.pdf"]
    assert names(HistoryQuery(text=digests["通知書_a.pdf"][:8])) == ["通知書_a.pdf"]
    assert names(HistoryQuery(text="通知書")) == ["通知書_a.pdf", "通知書_b.pdf"]
    assert names(HistoryQuery(text="100%")) == ["許可書_100%.pdf"]
    assert names(HistoryQuery(text="書_")) == ["通知書_a.pdf", "許可書_100%.pdf", "通知書_b.pdf"]
    assert names(HistoryQuery(text="%")) == ["許可書_100%.pdf"]
    # days in Japan time, both ends included (23:30 JST on the 23rd is 14:30 UTC)
    day = dt.date(2026, 11, 23)
    assert names(HistoryQuery(date_from=day, date_to=day)) == ["許可書_100%.pdf"]
    assert names(HistoryQuery(date_from=day + dt.timedelta(days=1))) == ["通知書_a.pdf"]
    assert names(HistoryQuery(date_to=dt.date(2026, 11, 1))) == ["通知書_b.pdf", "cli.pdf"]
    with sessions() as session, pytest.raises(ValueError):
        search_signed_documents(session, HistoryQuery(date_from=day, date_to=dt.date(2026, 1, 1)))
    # template (the standard stamp is its own choice), channel, signer
    assert names(HistoryQuery(template="kensetsu-kyoka")) == ["許可書_100%.pdf"]
    assert names(HistoryQuery(template=STANDARD_STAMP)) == [
        "通知書_a.pdf", "通知書_b.pdf", "cli.pdf"]
    assert names(HistoryQuery(channel=SigningChannel.API)) == ["通知書_b.pdf"]
    assert names(HistoryQuery(signed_by=users[SIGNER])) == ["通知書_a.pdf", "許可書_100%.pdf"]
    assert names(HistoryQuery(signed_by=users[SIGNER], channel=SigningChannel.BATCH,
                              text="通知")) == ["通知書_a.pdf"]
    # pages
    with sessions() as session:
        second = search_signed_documents(session, HistoryQuery(), limit=3, offset=3)
        assert [r.document.file_name for r in second.rows] == ["cli.pdf"]
        assert second.total == 4 and not second.has_more
        first = search_signed_documents(session, HistoryQuery(), limit=3)
        assert first.has_more
        # by name in the database's collation; the administrators and officers signed nothing
        assert sorted(history_signers(session)) == sorted(
            [(users[OTHER], "田中 二郎"), (users[SIGNER], "秘書 一郎")]
        )


def test_too_large_or_too_many_files_answer_413(
    client: FlaskClient, permits: list[bytes], monkeypatch: pytest.MonkeyPatch,
    sessions: sessionmaker[Session],
) -> None:
    from web import batch_views

    _login(client)
    monkeypatch.setattr(batch_views, "MAX_FORM_PARTS", 12)
    many = _sign(client, [(b"%PDF-1.7 tiny", f"{n}.pdf") for n in range(20)])
    assert many.status_code == 413 and "ZIP に" in many.get_data(as_text=True)
    monkeypatch.setattr(batch_views, "MAX_SIGN_UPLOAD_BYTES", 2**20)
    # the body as bytes: the test client would spool a multipart body over 500 kB to a
    # temporary file that nobody closes when the server answers without reading it
    boundary, body = encode_multipart(MultiDict([
        ("csrf_token", _csrf(client, "/sign")),
        ("file", FileStorage(io.BytesIO(permits[0] + b"\0" * 2**20), "large.pdf")),
    ]))
    large = client.post("/sign", data=body,
                        content_type=f"multipart/form-data; boundary={boundary}")
    assert large.status_code == 413 and "1 MiB" in large.get_data(as_text=True)
    with session_scope(sessions) as session:
        assert session.scalars(select(Batch)).all() == []

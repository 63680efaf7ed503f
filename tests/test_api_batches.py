"""The batch REST API on SQLite and PostgreSQL: a batch built from single PDFs, multipart
uploads and a ZIP (with junk, a Shift_JIS name and bad files), started, worked off by the
in-process worker of the web process, and downloaded as a ZIP with a manifest; scopes,
ownership and wrong states answered with JSON errors."""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import x509 as asn1_x509
from flask import Flask
from flask.testing import FlaskClient
from pyhanko.pdf_utils.reader import PdfFileReader
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

import contracts
from contracts import (
    BatchWorker,
    SignedDocument,
    User,
    create_api_key,
    create_user,
    revoke_api_key,
    session_scope,
)
from contracts.webhooks import create_endpoint, deliver_webhooks, verify_webhook_signature
from signer import Installation
from signer.samples import make_permit_pdf
from tests.conftest import PUBLIC_URL
from tests.hostile import password_protected_pdf
from tests.servers import wsgi_server
from tests.validators import pyhanko_status
from web import create_app, services

SIGNER = "hisho@pref.ibaraki.example"
OTHER = "tanaka@pref.ibaraki.example"


@pytest.fixture
def home(koin_home: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home)
    for leftover in home.glob("koin.db*"):
        leftover.unlink()
    return home


@pytest.fixture
def app(home: Path, db_url: str, engine: Engine) -> Iterator[Flask]:
    app = create_app(
        {"KOIN_HOME": str(home), "TESTING": True, "KOIN_DATABASE_URL": db_url,
         "KOIN_PUBLIC_URL": PUBLIC_URL, "KOIN_API_BURST": 1000, "KOIN_API_RATE": 1000}
    )
    yield app
    services.close(app)


@pytest.fixture
def worker(app: Flask, sessions: sessionmaker[Session], installation: Installation,
           home: Path) -> Iterator[BatchWorker]:
    """The embedded executor: a batch worker thread of the web process, woken on start."""
    with app.app_context():
        batch_worker = BatchWorker(
            services.session_factory(), Installation(home, public_url=PUBLIC_URL), threads=2,
            interval=30, public_url=PUBLIC_URL,
        )
        services.attach_batch_worker(batch_worker)
    batch_worker.start()
    yield batch_worker
    batch_worker.stop()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _user(sessions: sessionmaker[Session], email: str, *roles: str) -> User:
    with session_scope(sessions) as session:
        user, _ = create_user(session, email, roles)
    return user


def _key(sessions: sessionmaker[Session], email: str, *scopes: str, roles: tuple[str, ...] = (
        "signer",)) -> str:
    with session_scope(sessions) as session:
        user = contracts.get_user_by_email(session, email)
        if user is None:
            user, _ = create_user(session, email, roles)
        _, raw = create_api_key(session, user, name="test", scopes=list(scopes))
    return raw


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def key(sessions: sessionmaker[Session]) -> str:
    return _key(sessions, SIGNER, "sign", "verify")


@pytest.fixture(scope="module")
def permits(installation: Installation) -> list[bytes]:
    return [make_permit_pdf(installation.font_file, number=i) for i in range(1, 9)]


class _RawNameInfo(zipfile.ZipInfo):
    """An entry whose name is written as the given bytes, without the UTF-8 flag."""

    __slots__ = ("raw_name",)

    def _encodeFilenameFlags(self) -> tuple[bytes, int]:  # noqa: N802 (zipfile's name)
        return self.raw_name, self.flag_bits


def _zip(entries: list[tuple[str | bytes, bytes]]) -> bytes:
    """A ZIP; a ``bytes`` name is written raw without the UTF-8 flag (as Japanese Windows
    writes Shift_JIS names)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in entries:
            if isinstance(name, bytes):
                info: zipfile.ZipInfo = _RawNameInfo(name.decode("cp437"))
                info.raw_name = name  # type: ignore[attr-defined]
            else:
                info = zipfile.ZipInfo(name)
            archive.writestr(info, data)
    return out.getvalue()


def _wait_finished(client: FlaskClient, key: str, batch_id: str, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/api/v1/batches/{batch_id}", headers=_auth(key)).get_json()
        if body["status"] == "finished":
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.3)


def _webhook_receiver(secret_box: list[str], received: list[dict[str, Any]]) -> Any:
    """A WSGI app that checks the HMAC like a real receiver and keeps the payloads."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        verify_webhook_signature(
            secret_box[0], environ.get("HTTP_X_KOIN_TIMESTAMP"), body,
            environ.get("HTTP_X_KOIN_SIGNATURE"),
        )
        received.append(json.loads(body))
        start_response("204 No Content", [])
        return [b""]

    return app


@pytest.fixture
def webhook_events(sessions: sessionmaker[Session]) -> Iterator[list[dict[str, Any]]]:
    """The batch.finished events a subscribed receiver got (signatures checked)."""
    secret: list[str] = []
    received: list[dict[str, Any]] = []
    with wsgi_server(_webhook_receiver(secret, received)) as url:
        with session_scope(sessions) as session:
            _, raw_secret = create_endpoint(
                session, url, events=["batch.finished"], description="文書管理システム"
            )
            secret.append(raw_secret)
        yield received


def test_batch_through_the_api(
    client: FlaskClient,
    key: str,
    worker: BatchWorker,
    permits: list[bytes],
    sessions: sessionmaker[Session],
    root_cert: asn1_x509.Certificate,
    home: Path,
    webhook_events: list[dict[str, Any]],
) -> None:
    created = client.post(
        "/api/v1/batches", json={"name": "令和8年11月分 建設業許可通知書"}, headers=_auth(key)
    )
    assert created.status_code == 201, created.get_json()
    batch = created.get_json()
    batch_id = batch["id"]
    assert batch["status"] == "draft" and batch["name"] == "令和8年11月分 建設業許可通知書"
    assert created.headers["Location"] == f"/api/v1/batches/{batch_id}"

    one = client.post(
        f"/api/v1/batches/{batch_id}/documents?name=許可書-1.pdf", data=permits[0],
        content_type="application/pdf", headers=_auth(key),
    )
    assert one.status_code == 201 and one.get_json()["added"][0]["file_name"] == "許可書-1.pdf"
    several = client.post(
        f"/api/v1/batches/{batch_id}/documents",
        data={"file": [(io.BytesIO(permits[1]), "permit-2.pdf"),
                       (io.BytesIO(password_protected_pdf()), "locked.pdf"),
                       (io.BytesIO(b"not a pdf at all"), "notes.pdf")]},
        content_type="multipart/form-data", headers=_auth(key),
    )
    assert several.status_code == 201 and len(several.get_json()["added"]) == 3
    archive_in = _zip([
        ("permits/permit-3.pdf", permits[2]),
        ("permits/permit-4.pdf", permits[3]),
        ("許可書-5.pdf".encode("cp932"), permits[4]),  # Shift_JIS name, no UTF-8 flag
        ("readme.txt", b"hello"),
        ("__MACOSX/permits/._permit-3.pdf", b"junk"),
        (".DS_Store", b"junk"),
    ])
    zipped = client.post(
        f"/api/v1/batches/{batch_id}/documents", data=archive_in,
        content_type="application/zip", headers=_auth(key),
    )
    assert zipped.status_code == 201, zipped.get_json()
    body = zipped.get_json()
    assert [d["file_name"] for d in body["added"]] == [
        "permits_permit-3.pdf", "permits_permit-4.pdf", "許可書-5.pdf",
    ]
    assert [s["name"] for s in body["skipped"]] == ["readme.txt"]
    assert body["batch"]["progress"]["total"] == 7

    started = client.post(f"/api/v1/batches/{batch_id}/start", headers=_auth(key))
    assert started.status_code == 202 and started.get_json()["status"] == "running"
    assert client.post(f"/api/v1/batches/{batch_id}/start", headers=_auth(key)).status_code == 409
    late = client.post(
        f"/api/v1/batches/{batch_id}/documents", data=permits[5],
        content_type="application/pdf", headers=_auth(key),
    )
    assert late.status_code == 409 and late.get_json()["error"]["code"] == "invalid_state"

    finished = _wait_finished(client, key, batch_id)
    assert finished["progress"] == {
        "total": 7, "done": 5, "failed": 2, "waiting": 0, "running": 0, "complete": True,
    }
    failed = client.get(
        f"/api/v1/batches/{batch_id}/documents?state=failed", headers=_auth(key)
    ).get_json()["documents"]
    assert {d["file_name"] for d in failed} == {"locked.pdf", "notes.pdf"}
    assert all(d["error"] and d["error_en"] and d["download"] is None for d in failed)
    locked = next(d for d in failed if d["file_name"] == "locked.pdf")
    assert "encrypt" in locked["error_en"].lower() or "password" in locked["error_en"].lower()

    done = client.get(
        f"/api/v1/batches/{batch_id}/documents?state=done", headers=_auth(key)
    ).get_json()["documents"]
    assert len(done) == 5
    with client.get(done[0]["download"], headers=_auth(key)) as first:
        assert first.status_code == 200 and first.mimetype == "application/pdf"
        assert first.headers["X-Koin-Document-Id"] == done[0]["document_id"]
        assert pyhanko_status(first.get_data(), root_cert).bottom_line
    assert done[0]["verify_url"] == f"{PUBLIC_URL}/verify/{done[0]['document_id']}"

    response = client.get(f"/api/v1/batches/{batch_id}/archive", headers=_auth(key))
    assert response.status_code == 200 and response.mimetype == "application/zip"
    assert response.headers["X-Koin-Batch-Complete"] == "true"
    with zipfile.ZipFile(io.BytesIO(response.get_data())) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        assert names[0] == "manifest.csv" and len(names) == 6
        manifest_text = archive.read("manifest.csv").decode("utf-8-sig")
        manifest = list(csv.DictReader(io.StringIO(manifest_text)))
        for name in names[1:]:
            signed = archive.read(name)
            assert pyhanko_status(signed, root_cert).bottom_line, name
            assert len(PdfFileReader(io.BytesIO(signed)).embedded_signatures) == 1
    assert "許可書-5.pdf" in names
    assert [row["status"] for row in manifest].count("signed") == 5
    assert {row["input_name"] for row in manifest if row["status"] == "failed"} == {
        "locked.pdf", "notes.pdf"
    }
    with session_scope(sessions) as session:
        signer = contracts.get_user_by_email(session, SIGNER)
        assert signer is not None
        records = session.scalars(select(SignedDocument)).all()
        assert len(records) == 5
        assert {r.channel for r in records} == {"batch"}
        assert {r.signed_by for r in records} == {signer.id}
    # the batch.finished webhook, signed with the endpoint's secret, reaches the receiver once
    assert len(deliver_webhooks(sessions).delivered) == 1
    assert deliver_webhooks(sessions).attempted == 0
    [event] = webhook_events
    assert event["type"] == "batch.finished"
    assert event["data"]["batch_id"] == batch_id
    assert (event["data"]["done"], event["data"]["failed"]) == (5, 2)
    assert event["data"]["archive_url"] == f"{PUBLIC_URL}/api/v1/batches/{batch_id}/archive"


def test_retry_after_failures_and_cancel(
    client: FlaskClient, key: str, worker: BatchWorker, permits: list[bytes]
) -> None:
    batch_id = client.post("/api/v1/batches", json={}, headers=_auth(key)).get_json()["id"]
    client.post(
        f"/api/v1/batches/{batch_id}/documents",
        data={"file": [(io.BytesIO(b"%PDF-1.7 broken"), "broken.pdf"),
                       (io.BytesIO(permits[0]), "good.pdf")]},
        content_type="multipart/form-data", headers=_auth(key),
    )
    client.post(f"/api/v1/batches/{batch_id}/start", headers=_auth(key))
    assert _wait_finished(client, key, batch_id)["progress"]["failed"] == 1
    retried = client.post(f"/api/v1/batches/{batch_id}/retry", headers=_auth(key))
    assert retried.status_code == 202 and retried.get_json()["retried"] == 1
    again = _wait_finished(client, key, batch_id)
    assert again["progress"]["failed"] == 1 and again["progress"]["done"] == 1
    cancelled = client.post(f"/api/v1/batches/{batch_id}/cancel", headers=_auth(key))
    assert cancelled.status_code == 409  # finished batches cannot be cancelled
    draft = client.post("/api/v1/batches", json={}, headers=_auth(key)).get_json()["id"]
    assert client.post(f"/api/v1/batches/{draft}/start", headers=_auth(key)).status_code == 409
    gone = client.post(f"/api/v1/batches/{draft}/cancel", headers=_auth(key))
    assert gone.status_code == 200 and gone.get_json()["status"] == "cancelled"


def test_scopes_ownership_and_bad_requests(
    client: FlaskClient, key: str, sessions: sessionmaker[Session], permits: list[bytes]
) -> None:
    batch_id = client.post("/api/v1/batches", json={}, headers=_auth(key)).get_json()["id"]
    verify_only = _key(sessions, "kensa@pref.ibaraki.example", "verify", roles=("officer",))
    assert client.post("/api/v1/batches", json={}, headers=_auth(verify_only)).status_code == 403
    assert client.get(f"/api/v1/batches/{batch_id}", headers=_auth(verify_only)).status_code == 403
    assert client.get(f"/api/v1/batches/{batch_id}").status_code == 401
    other = _key(sessions, OTHER, "sign")
    hidden = client.get(f"/api/v1/batches/{batch_id}", headers=_auth(other))
    assert hidden.status_code == 404 and hidden.get_json()["error"]["code"] == "not_found"
    assert client.get("/api/v1/batches", headers=_auth(other)).get_json() == {"batches": []}
    admin = _key(sessions, "kanri@pref.ibaraki.example", "sign", roles=("admin", "signer"))
    assert client.get(f"/api/v1/batches/{batch_id}", headers=_auth(admin)).status_code == 200

    with session_scope(sessions) as session:
        prefix = next(k.prefix for k in session.scalars(select(contracts.ApiKey))
                      if other.startswith(f"koin_{k.prefix}_"))
        revoke_api_key(session, prefix)
    assert client.get("/api/v1/batches", headers=_auth(other)).status_code == 401

    def post(path: str, **kwargs: Any) -> Any:
        return client.post(f"/api/v1/batches{path}", headers=_auth(key), **kwargs)

    assert post("", json={"template": "no-such-template"}).get_json()["error"]["code"] == (
        "unknown_template"
    )
    assert post("", data="{", content_type="application/json").status_code == 400
    assert post("", json={"name": "x" * 201}).status_code == 400
    assert post(f"/{batch_id}/documents", data=b"x", content_type="text/plain").status_code == 415
    no_file = post(f"/{batch_id}/documents", data={}, content_type="multipart/form-data")
    assert no_file.status_code == 400 and no_file.get_json()["error"]["code"] == "no_file"
    empty = post(f"/{batch_id}/documents", data=b"", content_type="application/pdf")
    assert empty.status_code == 400 and empty.get_json()["error"]["code"] == "invalid_data"
    not_zip = post(f"/{batch_id}/documents", data=b"PK\x03\x04 nope",
                   content_type="application/zip")
    assert not_zip.status_code == 400 and not_zip.get_json()["error"]["code"] == "invalid_zip"
    bad_state = client.get(f"/api/v1/batches/{batch_id}/documents?state=lost",
                           headers=_auth(key))
    assert bad_state.status_code == 400
    post(f"/{batch_id}/documents", data=permits[0], content_type="application/pdf")
    unsigned = client.get(f"/api/v1/batches/{batch_id}/documents/1", headers=_auth(key))
    assert unsigned.status_code == 409 and unsigned.get_json()["error"]["code"] == "not_signed"
    assert client.get(f"/api/v1/batches/{batch_id}/documents/9",
                      headers=_auth(key)).status_code == 404
    assert client.get("/api/v1/batches/nope", headers=_auth(key)).status_code == 404
    with session_scope(sessions) as session:
        assert session.scalar(select(func.count()).select_from(SignedDocument)) == 0


def test_zip_bomb_and_oversized_entries_are_refused_alone(permits: list[bytes]) -> None:
    from contracts.batch_files import SkippedEntry, ZipPdf, read_zip_pdfs

    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb.pdf", b"\0" * (64 * 2**20))
        archive.writestr("ok.pdf", permits[0])
        archive.writestr("../../etc/evil.pdf", permits[1])
    entries = list(read_zip_pdfs(bomb.getvalue(), max_file_bytes=8 * 2**20))
    assert isinstance(entries[0], SkippedEntry) and "8 MiB" in entries[0].reason_en
    assert isinstance(entries[1], ZipPdf) and entries[1].data == permits[0]
    assert isinstance(entries[2], ZipPdf) and entries[2].name == "etc_evil.pdf"
    with pytest.raises(contracts.InvalidBatchData):
        list(read_zip_pdfs(bomb.getvalue(), max_total_bytes=len(permits[0]) // 2))
    many = _zip([(f"{i}.pdf", b"%PDF") for i in range(30)])
    with pytest.raises(contracts.InvalidBatchData):
        list(read_zip_pdfs(many, max_entries=20))


def test_sign_api_with_a_template(
    client: FlaskClient, key: str, sessions: sessionmaker[Session], permits: list[bytes],
    root_cert: asn1_x509.Certificate,
) -> None:
    with session_scope(sessions) as session:
        contracts.create_template(
            session, "kensetsu-kyoka", title="建設業許可通知書", page=1,
            box=(300.0, 40.0, 560.0, 120.0), qr=True, level="B-LT",
        )
    response = client.post(
        "/api/v1/sign?template=kensetsu-kyoka", data=permits[0],
        content_type="application/pdf", headers=_auth(key),
    )
    assert response.status_code == 200, response.get_json()
    status = pyhanko_status(response.get_data(), root_cert)
    assert status.bottom_line
    with session_scope(sessions) as session:
        record = contracts.get_document(session, response.headers["X-Koin-Document-Id"])
        assert record is not None
        assert (record.template, record.channel, record.level) == ("kensetsu-kyoka", "api", "B-LT")
    combined = client.post(
        "/api/v1/sign?template=kensetsu-kyoka&box=1,2,3,4", data=permits[0],
        content_type="application/pdf", headers=_auth(key),
    )
    assert combined.status_code == 400
    assert combined.get_json()["error"]["code"] == "invalid_template"
    unknown = client.post(
        "/api/v1/sign?template=nope", data=permits[0], content_type="application/pdf",
        headers=_auth(key),
    )
    assert unknown.status_code == 400

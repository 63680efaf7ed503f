"""The public verify page and JSON API: real verdicts, and a clear 4xx for every bad upload."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import EnvironBuilder, TestResponse

from keys import Role
from signer import Installation, SignatureLevel, SignOptions, sign_pdf
from tests.hostile import decompression_bomb, password_protected_pdf
from web import create_app


@pytest.fixture(scope="module")
def app(koin_home: Path) -> Iterator[Flask]:
    import contracts
    from contracts import migrate

    migrate.upgrade(contracts.database_url(koin_home))  # as `koin serve` does
    yield create_app({"KOIN_HOME": str(koin_home), "TESTING": True})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="module")
def signed(installation: Installation, permit_pdf: bytes) -> bytes:
    data = sign_pdf(permit_pdf, installation.signing_context(Role.POSITION)).data
    assert data is not None
    return data


@pytest.fixture(scope="module")
def tampered(signed: bytes) -> bytes:
    position = signed.index(b"stream", 200) + 20
    return signed[:position] + bytes([signed[position] ^ 1]) + signed[position + 1 :]


def _multipart(data: bytes, name: str = "permit.pdf") -> dict[str, Any]:
    return {"file": (io.BytesIO(data), name)}


def _post_multipart(client: FlaskClient, path: str, data: bytes) -> TestResponse:
    """POST a file as multipart. werkzeug's test client spools bodies over 500 KB to a
    temporary file it never closes; build the environ ourselves and close that stream."""
    builder = EnvironBuilder(path=path, method="POST", data=_multipart(data))
    environ = builder.get_environ()
    try:
        return client.open(environ)
    finally:
        environ["wsgi.input"].close()
        builder.close()


def test_api_verifies_raw_pdf_body(client: FlaskClient, signed: bytes) -> None:
    response = client.post("/api/v1/verify", data=signed, content_type="application/pdf")
    assert response.status_code == 200
    report = response.get_json()
    assert report["indication"] == "PASSED"
    assert report["summary_ja"] == "署名済みであり、すべての署名が有効です。"
    [sig] = report["signatures"]
    assert sig["pades_level"] == "B-T" and sig["signer"]["common_name"] == (
        "Governor of Ibaraki Prefecture"
    )
    assert sig["coverage_en"] == "whole document"


def test_api_reports_tampering(client: FlaskClient, tampered: bytes) -> None:
    response = client.post(
        "/api/v1/verify", data=_multipart(tampered), content_type="multipart/form-data"
    )
    assert response.status_code == 200
    report = response.get_json()
    assert report["indication"] == "FAILED"
    assert report["signatures"][0]["subindication"] == "HASH_FAILURE"


def test_page_shows_green_and_red_verdicts(
    client: FlaskClient, signed: bytes, tampered: bytes
) -> None:
    ok = client.post("/verify", data=_multipart(signed), content_type="multipart/form-data")
    assert ok.status_code == 200
    page = ok.get_data(as_text=True)
    assert 'data-indication="PASSED"' in page and "すべての署名が有効です" in page
    assert "令和" in page  # times in the Japanese era, JST
    bad = client.post("/verify", data=_multipart(tampered), content_type="multipart/form-data")
    assert 'id="verdict" data-indication="FAILED"' in bad.get_data(as_text=True)


def test_english_page(client: FlaskClient, signed: bytes) -> None:
    response = client.post(
        "/verify?lang=en", data=_multipart(signed), content_type="multipart/form-data"
    )
    page = response.get_data(as_text=True)
    assert '<html lang="en">' in page and "Signed, and all signatures are valid." in page
    assert "Signature level" in page
    assert "koin_lang=en" in response.headers.get("Set-Cookie", "")


BAD_UPLOADS = [
    ("not_pdf", b"<html>not a pdf</html>", 415, "not_pdf"),
    ("empty", b"", 400, "empty"),
    ("encrypted", password_protected_pdf(), 422, "encrypted"),
    ("bomb", decompression_bomb(), 422, "decompression_limit"),
    ("truncated_garbage", b"%PDF-1.7\n" + b"\x00" * 100, 422, "broken_structure"),
]


@pytest.mark.parametrize(("name", "data", "status", "code"), BAD_UPLOADS)
def test_bad_uploads_get_clear_4xx(
    client: FlaskClient, name: str, data: bytes, status: int, code: str
) -> None:
    api = client.post("/api/v1/verify", data=data, content_type="application/pdf")
    assert api.status_code == status, api.get_data(as_text=True)
    error = api.get_json()["error"]
    assert error["code"] == code and error["message"] and error["message_en"]
    page = _post_multipart(client, "/verify", data)
    assert page.status_code == status
    assert 'role="alert"' in page.get_data(as_text=True)


def test_no_file_chosen(client: FlaskClient) -> None:
    response = client.post("/verify", data={}, content_type="multipart/form-data")
    assert response.status_code == 400
    assert "ファイルが選択されていません" in response.get_data(as_text=True)


def test_wrong_content_type(client: FlaskClient) -> None:
    response = client.post("/api/v1/verify", data=b"x", content_type="text/plain")
    assert response.status_code == 415


def test_over_size_upload(koin_home: Path, signed: bytes) -> None:
    small = create_app({"KOIN_HOME": str(koin_home), "KOIN_MAX_UPLOAD_BYTES": 10_000})
    client = small.test_client()
    api = client.post("/api/v1/verify", data=signed, content_type="application/pdf")
    assert api.status_code == 413 and api.get_json()["error"]["code"] == "too_large"
    page = _post_multipart(client, "/verify", signed)
    assert page.status_code == 413 and "大きすぎます" in page.get_data(as_text=True)


def test_api_method_not_allowed_is_json(client: FlaskClient) -> None:
    response = client.get("/api/v1/verify")
    assert response.status_code == 405 and "error" in response.get_json()


def test_openapi_document_describes_verify(client: FlaskClient) -> None:
    document = client.get("/api/v1/openapi.json").get_json()
    operation = document["paths"]["/api/v1/verify"]["post"]
    assert set(operation["requestBody"]["content"]) == {"application/pdf", "multipart/form-data"}
    assert {"200", "400", "413", "415", "422"} <= set(operation["responses"])


def test_two_signatures_reported(
    client: FlaskClient, installation: Installation, signed: bytes
) -> None:
    from signer import Placement

    twice = sign_pdf(
        signed,
        installation.signing_context(Role.WITNESS),
        SignOptions(level=SignatureLevel.B_T, placement=Placement(page=1, box=(72, 60, 300, 130))),
    ).data
    report = client.post("/api/v1/verify", data=twice, content_type="application/pdf").get_json()
    assert report["indication"] == "PASSED"
    assert [s["signer"]["common_name"] for s in report["signatures"]] == [
        "Governor of Ibaraki Prefecture",
        "koin Witness Signing Service",
    ]
    assert report["signatures"][0]["changes_after"][0]["kind"] == "form_fill_or_signing"


def test_document_record_page_checks_a_copy(
    app: Flask, client: FlaskClient, installation: Installation, koin_home: Path,
    permit_pdf: bytes, signed: bytes,
) -> None:
    import contracts

    url = contracts.database_url(koin_home)
    engine = contracts.make_engine(url)
    try:
        result = contracts.sign_and_record(
            contracts.make_session_factory(engine),
            permit_pdf,
            installation.signing_context(Role.POSITION),
            SignOptions(verify_base_url="http://127.0.0.1:5000"),
            role=Role.POSITION,
            file_name="許可書.pdf",
        )
    finally:
        engine.dispose()
    assert result.data is not None
    doc_id = result.document_id
    page = client.get(f"/verify/{doc_id.lower().replace('-', '')}").get_data(as_text=True)
    assert doc_id in page and result.sha256 in page and "PAdES B-T" in page

    same = _post_multipart(client, f"/verify/{doc_id}", result.data).get_data(as_text=True)
    assert 'id="match"' in same and "同一です" in same and 'data-indication="PASSED"' in same
    other = _post_multipart(client, f"/verify/{doc_id}", signed).get_data(as_text=True)
    assert "一致しません" in other


@pytest.mark.parametrize("doc_id", ["ZZZZ-ZZZZ-ZZZZ-ZZZZ", "not-an-id", "%3Cscript%3E"])
def test_unknown_document_id_is_404(client: FlaskClient, doc_id: str) -> None:
    response = client.get(f"/verify/{doc_id}")
    assert response.status_code == 404
    assert "<script>" not in response.get_data(as_text=True)

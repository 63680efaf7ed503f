"""The service publishes what its certificates point at: CRLs, CA certificates, the TSA."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from flask.testing import FlaskClient

from tests.validators import openssl
from web import create_app


@pytest.fixture
def client(koin_home: Path) -> FlaskClient:
    app = create_app({"KOIN_HOME": str(koin_home), "TESTING": True})
    return app.test_client()


def test_crl_distribution_point_urls_resolve(client: FlaskClient, key_store: object) -> None:
    from keys import KeyStore, Role

    assert isinstance(key_store, KeyStore)
    certificate = x509.load_der_x509_certificate(key_store.certificate_for(Role.POSITION).dump())
    cdp = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    url = cdp[0].full_name[0].value  # type: ignore[index]
    path = url.removeprefix("http://127.0.0.1:8000")
    response = client.get(path)
    assert response.status_code == 200 and response.mimetype == "application/pkix-crl"
    crl = x509.load_der_x509_crl(response.data)
    assert crl.issuer == certificate.issuer


@pytest.mark.parametrize("path", ["/pki/../keys/position.crl", "/pki/nope.crl", "/pki/x.pem"])
def test_unknown_pki_paths_404(client: FlaskClient, path: str) -> None:
    assert client.get(path).status_code == 404


def test_root_certificate_download(client: FlaskClient, root_pem: Path) -> None:
    response = client.get("/pki/root-ca.pem")
    assert response.status_code == 200 and response.data == root_pem.read_bytes()


def test_tsa_endpoint_answers_openssl(
    client: FlaskClient, tmp_path: Path, root_pem: Path, chain_pem: Path
) -> None:
    data = tmp_path / "d.txt"
    data.write_text("許可書")
    query = tmp_path / "q.tsq"
    subprocess.run(
        ["openssl", "ts", "-query", "-data", str(data), "-sha256", "-cert", "-out", str(query)],
        check=True,
    )
    response = client.post(
        "/tsa", data=query.read_bytes(), content_type="application/timestamp-query"
    )
    assert response.status_code == 200 and response.mimetype == "application/timestamp-reply"
    (tmp_path / "r.tsr").write_bytes(response.data)
    verified = openssl("ts", "-verify", "-queryfile", str(query), "-in", str(tmp_path / "r.tsr"),
                       "-CAfile", str(root_pem), "-untrusted", str(chain_pem))
    assert "Verification: OK" in verified.stdout


def test_tsa_endpoint_refuses_wrong_content_type(client: FlaskClient) -> None:
    assert client.post("/tsa", data=b"x", content_type="text/plain").status_code == 415


def test_index_page_is_japanese(client: FlaskClient) -> None:
    page = client.get("/").get_data(as_text=True)
    assert '<html lang="ja">' in page and "ルート証明書" in page


def test_healthz(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}

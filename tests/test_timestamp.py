"""The TSA and its clients against real servers on loopback, openssl and rfc3161ng."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import logging
import re
import subprocess
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from wsgiref.types import StartResponse, WSGIEnvironment

import pytest
import requests
import rfc3161ng
from asn1crypto import algos, cms, tsp
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.writer import PageObject, PdfFileWriter
from pyhanko.sign import signers

import keys
from keys import Role
from tests.servers import WsgiApp, closed_port_url, wsgi_server
from tests.validators import pyhanko_status
from timestamp import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEMO_POLICY_OID,
    LocalTimeStamper,
    TimeStampAuthority,
    TimestampError,
    TsaClient,
    serve_in_background,
)

QUERY = "application/timestamp-query"
REPLY = "application/timestamp-reply"
DATA = "茨城県 道路占用許可証 第42号".encode()


class Resp(tsp.TimeStampResp):  # type: ignore[misc]
    """RFC 3161 TimeStampResp; asn1crypto's own makes the token mandatory (no rejections)."""

    _fields = [
        ("status", tsp.PKIStatusInfo),
        ("time_stamp_token", cms.ContentInfo, {"optional": True}),
    ]


# --- helpers ---------------------------------------------------------------------------------


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)


def _post(url: str, body: bytes, content_type: str = QUERY) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=10)


def _request(
    algorithm: str = "sha256",
    *,
    digest: bytes | None = None,
    nonce: int | None = 0x1234_5678_9ABC_DEF0,
    cert_req: bool = True,
    policy: str | None = None,
    version: int = 1,
    extensions: list[dict[str, Any]] | None = None,
) -> bytes:
    fields: dict[str, Any] = {
        "version": version,
        "message_imprint": {
            "hash_algorithm": {"algorithm": algorithm},
            "hashed_message": digest
            if digest is not None
            else hashlib.new(algorithm, DATA).digest(),
        },
        "cert_req": cert_req,
    }
    if nonce is not None:
        fields["nonce"] = nonce
    if policy is not None:
        fields["req_policy"] = policy
    if extensions is not None:
        fields["extensions"] = extensions
    return bytes(tsp.TimeStampReq(fields).dump())


def _der(tag: int, content: bytes) -> bytes:
    assert len(content) < 128
    return bytes([tag, len(content)]) + content


def _request_with_hash_parameters() -> bytes:
    """SHA-256 with an INTEGER as AlgorithmIdentifier parameters (asn1crypto cannot build it)."""
    algorithm = _der(0x30, algos.DigestAlgorithmId("sha256").dump() + _der(0x02, b"\x01"))
    imprint = _der(0x30, algorithm + _der(0x04, hashlib.sha256(DATA).digest()))
    return _der(0x30, _der(0x02, b"\x01") + imprint + _der(0x01, b"\xff"))


def _parse(der: bytes) -> Any:
    response = Resp.load(der, strict=True)
    response.native  # noqa: B018  # parse everything
    return response


def _tst_info(response: Any) -> Any:
    return response["time_stamp_token"]["content"]["encap_content_info"]["content"].parsed


def _status(der: bytes) -> tuple[str, set[str], str]:
    status = _parse(der)["status"]
    texts = status["status_string"].native or []
    return status["status"].native, set(status["fail_info"].native or ()), "; ".join(texts)


def _timestamp(stamper: Any, data: bytes = DATA, algorithm: str = "sha256") -> Any:
    return asyncio.run(stamper.async_timestamp(hashlib.new(algorithm, data).digest(), algorithm))


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authority(key_store: keys.KeyStore, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return TimeStampAuthority.from_key_store(key_store, tmp_path_factory.mktemp("tsa-state"))


@pytest.fixture(scope="module")
def tsa_url(authority: TimeStampAuthority) -> Iterator[str]:
    server = serve_in_background(authority)
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> tuple[TimeStampAuthority, Any]:
    """A TSA with a well-formed chain of its own, to a same-named root we do not trust."""
    home = tmp_path_factory.mktemp("rogue-pki")
    passphrase = b"rogue-passphrase"
    keys.generate_demo_pki(home, passphrase, "http://127.0.0.1:9")
    layout = keys.PkiLayout(home)
    store = keys.KeyStore(
        home, {Role.TSA: keys.Pkcs12Backend(layout.role_key(Role.TSA), passphrase)}
    )
    [root] = keys.load_certificates([layout.root_cert])
    return TimeStampAuthority.from_key_store(store, home / "state"), root


# --- the TSA, checked by openssl -------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "sha384", "sha512"])
def test_openssl_verifies_reply(
    algorithm: str, tsa_url: str, root_pem: Path, chain_pem: Path, tmp_path: Path
) -> None:
    data = tmp_path / "permit.txt"
    data.write_bytes(DATA)
    query = tmp_path / "req.tsq"
    result = _openssl(
        "ts", "-query", "-data", str(data), f"-{algorithm}", "-cert", "-out", str(query)
    )
    assert result.returncode == 0, result.stderr

    reply = _post(tsa_url, query.read_bytes())
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == REPLY
    tsr = tmp_path / "resp.tsr"
    tsr.write_bytes(reply.content)

    result = _openssl(
        "ts",
        "-verify",
        "-queryfile",
        str(query),
        "-in",
        str(tsr),
        "-CAfile",
        str(root_pem),
        "-untrusted",
        str(chain_pem),
    )
    assert "Verification: OK" in result.stdout, result.stdout + result.stderr
    result = _openssl(
        "ts",
        "-verify",
        "-data",
        str(data),
        "-in",
        str(tsr),
        "-CAfile",
        str(root_pem),
        "-untrusted",
        str(chain_pem),
    )
    assert "Verification: OK" in result.stdout, result.stdout + result.stderr

    text = _openssl("ts", "-reply", "-in", str(tsr), "-text").stdout
    query_nonce = re.search(
        r"Nonce: (0x[0-9A-F]+)", _openssl("ts", "-query", "-in", str(query), "-text").stdout
    )
    assert query_nonce is not None
    assert "Status: Granted." in text
    assert f"Policy OID: {DEMO_POLICY_OID}" in text
    assert f"Hash Algorithm: {algorithm}" in text
    assert f"Nonce: {query_nonce.group(1)}" in text
    assert "Accuracy: 0x01 seconds, unspecified millis, unspecified micros" in text
    assert "Ordering: no" in text
    assert "TSA: DirName:/C=JP/O=Ibaraki Prefecture/CN=koin Time-Stamping Authority" in text


def test_openssl_sha1_query_rejected_bad_alg(tsa_url: str, tmp_path: Path) -> None:
    data = tmp_path / "permit.txt"
    data.write_bytes(DATA)
    query = tmp_path / "req.tsq"
    assert _openssl("ts", "-query", "-data", str(data), "-sha1", "-out", str(query)).returncode == 0
    reply = _post(tsa_url, query.read_bytes())
    assert reply.status_code == 200 and reply.headers["Content-Type"] == REPLY
    status, fail_info, _ = _status(reply.content)
    assert (status, fail_info) == ("rejection", {"bad_alg"})
    assert _parse(reply.content)["time_stamp_token"].native is None
    tsr = tmp_path / "resp.tsr"
    tsr.write_bytes(reply.content)
    text = _openssl("ts", "-reply", "-in", str(tsr), "-text").stdout
    assert "Status: Rejected." in text
    assert "unrecognized or unsupported algorithm identifier" in text


# --- rejections ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fail_info"),
    [
        pytest.param(b"this is not DER", "bad_data_format", id="garbage"),
        pytest.param(b"", "bad_data_format", id="empty"),
        pytest.param(_request() + b"\x00", "bad_data_format", id="trailing-bytes"),
        pytest.param(_request()[:-3], "bad_data_format", id="truncated"),
        pytest.param(
            _request("sha256", digest=b"\x01" * 20), "bad_data_format", id="short-imprint"
        ),
        pytest.param(
            _request("sha512", digest=b"\x01" * 32), "bad_data_format", id="long-imprint-alg"
        ),
        pytest.param(_request("md5"), "bad_alg", id="md5"),
        pytest.param(_request("sha1"), "bad_alg", id="sha1"),
        pytest.param(_request_with_hash_parameters(), "bad_data_format", id="hash-parameters"),
        pytest.param(_request(policy="1.2.3.4.5"), "unaccepted_policy", id="foreign-policy"),
        pytest.param(_request(version=2), "bad_request", id="version-2"),
        pytest.param(
            _request(
                extensions=[{"extn_id": "1.2.3.4", "critical": False, "extn_value": b"\x05\x00"}]
            ),
            "unaccepted_extensions",
            id="extension",
        ),
    ],
)
def test_bad_requests_get_a_rejection_response(tsa_url: str, body: bytes, fail_info: str) -> None:
    reply = _post(tsa_url, body)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == REPLY
    status, fail_infos, text = _status(reply.content)
    assert status == "rejection"
    assert fail_infos == {fail_info}
    assert text


def test_our_policy_may_be_requested(tsa_url: str) -> None:
    reply = _post(tsa_url, _request(policy=DEMO_POLICY_OID))
    assert _status(reply.content)[0] == "granted"
    assert _tst_info(_parse(reply.content))["policy"].dotted == DEMO_POLICY_OID


@pytest.mark.parametrize(
    ("method", "content_type", "body", "status"),
    [
        ("GET", None, b"", 405),
        ("PUT", QUERY, _request(), 405),
        ("POST", "application/octet-stream", _request(), 415),
        ("POST", None, _request(), 415),
        ("POST", QUERY, b"\x30" * (DEFAULT_MAX_REQUEST_BYTES + 1), 413),
    ],
)
def test_http_errors(
    tsa_url: str, method: str, content_type: str | None, body: bytes, status: int
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    reply = requests.request(method, tsa_url, data=body, headers=headers, timeout=10)
    assert reply.status_code == status
    assert reply.headers["Content-Type"].startswith("text/plain")
    assert 0 < len(reply.text) < 100
    if status == 405:
        assert reply.headers["Allow"] == "POST"


# --- token contents --------------------------------------------------------------------------


def test_nonce_echoed_and_certificates_only_on_request(authority: TimeStampAuthority) -> None:
    big_nonce = 2**100 + 7
    with_certs = _parse(authority.respond(_request("sha512", nonce=big_nonce, cert_req=True)))
    info = _tst_info(with_certs)
    assert info["nonce"].native == big_nonce
    assert info["version"].native == "v1"
    assert info["ordering"].native is False
    assert info["tsa"].chosen.native == authority.certificate.subject.native
    signed = with_certs["time_stamp_token"]["content"]
    subjects = [c.chosen.subject.native["common_name"] for c in signed["certificates"]]
    assert sorted(subjects) == [
        "Ibaraki Prefecture Demo Issuing CA",
        "koin Time-Stamping Authority",
    ]
    signer_info = signed["signer_infos"][0]
    attrs = {a["type"].native: a["values"][0] for a in signer_info["signed_attrs"]}
    assert set(attrs) == {
        "content_type",
        "message_digest",
        "signing_certificate_v2",
        "signing_time",
    }
    assert attrs["content_type"].native == "tst_info"
    [ess_cert_id] = attrs["signing_certificate_v2"]["certs"]
    assert ess_cert_id["hash_algorithm"]["algorithm"].native == "sha256"
    assert ess_cert_id["cert_hash"].native == hashlib.sha256(authority.certificate.dump()).digest()
    assert (
        ess_cert_id["issuer_serial"]["serial_number"].native == authority.certificate.serial_number
    )
    # The signer digest is the TSA's (SHA-256), not the imprint's (SHA-512).
    assert signer_info["digest_algorithm"]["algorithm"].native == "sha256"

    without = _parse(authority.respond(_request(nonce=None, cert_req=False)))
    assert _tst_info(without)["nonce"].native is None
    assert without["time_stamp_token"]["content"]["certificates"].native is None


def test_gen_time_is_now(authority: TimeStampAuthority) -> None:
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    gen_time = _tst_info(_parse(authority.respond(_request())))["gen_time"].native
    after = dt.datetime.now(dt.UTC)
    assert before <= gen_time <= after


# --- serial numbers --------------------------------------------------------------------------


def _serial(authority: TimeStampAuthority) -> int:
    response = Resp.load(authority.respond(_request(cert_req=False)))
    return int(_tst_info(response)["serial_number"].native)


def test_serial_numbers_never_repeat(key_store: keys.KeyStore, tmp_path: Path) -> None:
    credentials = key_store.credentials(Role.TSA)

    def new_authority() -> TimeStampAuthority:
        return TimeStampAuthority(
            credentials.signer, credentials.chain, tmp_path / "serial", serial_block=5
        )

    first = [_serial(new_authority()), _serial(new_authority())]  # two short-lived instances
    before_restart = new_authority()
    first += [_serial(before_restart) for _ in range(12)]  # crosses two block boundaries
    after_restart = new_authority()  # a restart: same state file, fresh process state
    second = [_serial(after_restart) for _ in range(7)]
    assert len(set(first + second)) == len(first + second)
    assert min(second) > max(first)

    # Two instances on one state file (two processes, as far as flock is concerned), 8 threads.
    instances = [new_authority(), new_authority()]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda i: _serial(instances[i % 2]), range(80)))
    everything = first + second + concurrent
    assert len(set(everything)) == len(everything)
    assert all(0 < s < 2**159 for s in everything)


def test_corrupt_serial_state_refuses_to_issue(
    key_store: keys.KeyStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "tsa-serial").write_text("not a number\n")
    authority = TimeStampAuthority.from_key_store(key_store, tmp_path)
    with caplog.at_level(logging.CRITICAL, logger="timestamp"):
        reply = _parse(authority.respond(_request()))
    assert reply["status"]["status"].native == "rejection"
    assert reply["status"]["fail_info"].native == {"system_failure"}
    assert reply["time_stamp_token"].native is None


def test_authority_refuses_a_certificate_without_time_stamping_eku(
    key_store: keys.KeyStore, tmp_path: Path
) -> None:
    with pytest.raises(TimestampError, match="timeStamping"):
        TimeStampAuthority(key_store.signer_for(Role.WITNESS), (), tmp_path / "serial")


# --- clients ---------------------------------------------------------------------------------


def _blank_pdf() -> bytes:
    writer = PdfFileWriter()
    content = writer.add_object(generic.StreamObject(stream_data=b""))
    writer.insert_page(PageObject(content, (0, 0, 595, 842), generic.DictionaryObject()))
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_client_plugs_into_pdf_signer(
    tsa_url: str, key_store: keys.KeyStore, root_cert: asn1_x509.Certificate
) -> None:
    client = TsaClient([tsa_url], trust_roots=[root_cert])
    pdf_signer = signers.PdfSigner(
        signers.PdfSignatureMetadata(field_name="Signature1", md_algorithm="sha256"),
        key_store.signer_for(Role.POSITION),
        timestamper=client,
    )
    signed = pdf_signer.sign_pdf(IncrementalPdfFileWriter(io.BytesIO(_blank_pdf())))
    status = pyhanko_status(signed.getvalue(), root_cert)
    assert status.bottom_line
    assert status.timestamp_validity is not None
    assert status.timestamp_validity.intact and status.timestamp_validity.valid
    assert status.timestamp_validity.trusted


def test_client_returns_token_for_our_digest(
    tsa_url: str, root_cert: asn1_x509.Certificate
) -> None:
    token = _timestamp(TsaClient([tsa_url], trust_roots=[root_cert]), algorithm="sha384")
    imprint = token["content"]["encap_content_info"]["content"].parsed["message_imprint"]
    assert imprint["hash_algorithm"]["algorithm"].native == "sha384"
    assert imprint["hashed_message"].native == hashlib.sha384(DATA).digest()


def test_client_falls_back_to_the_next_url(
    tsa_url: str, root_cert: asn1_x509.Certificate, caplog: pytest.LogCaptureFixture
) -> None:
    down = closed_port_url()
    with caplog.at_level(logging.WARNING, logger="timestamp"):
        token = _timestamp(TsaClient([down, tsa_url], trust_roots=[root_cert]))
    assert token["content_type"].native == "signed_data"
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert down in warning.getMessage() and "Connection refused" in warning.getMessage()


def test_client_with_every_url_down_raises(root_cert: asn1_x509.Certificate) -> None:
    urls = [closed_port_url(), closed_port_url()]
    client = TsaClient(urls, trust_roots=[root_cert], timeout=2)
    with pytest.raises(TimestampError) as caught:
        _timestamp(client)
    error = caught.value
    assert list(error.fields["attempts"]) == urls
    for url in urls:
        assert url in error.message and url in error.message_en
        assert "cannot connect" in error.fields["attempts"][url]
    assert "どの TSA からも" in error.message


def test_credentials_in_urls_stay_out_of_errors(root_cert: asn1_x509.Certificate) -> None:
    url = closed_port_url().replace("http://", "http://user:s3cret@") + "?apikey=s3cret"
    with pytest.raises(TimestampError) as caught:
        _timestamp(TsaClient([url], trust_roots=[root_cert], timeout=2))
    assert "s3cret" not in str(caught.value) and "s3cret" not in repr(caught.value.fields)


def _constant_app(status: str, content_type: str, body: bytes) -> WsgiApp:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    return app


@pytest.mark.parametrize(
    ("app", "reason"),
    [
        (_constant_app("200 OK", REPLY, b"\x30\x03garbage"), "not a DER TimeStampResp"),
        (_constant_app("200 OK", "text/html", b"<html>maintenance</html>"), "Content-Type"),
        (_constant_app("503 Service Unavailable", "text/plain", b"busy"), "HTTP status 503"),
    ],
    ids=["garbage", "html", "http-503"],
)
def test_broken_tsa_is_rejected(
    app: WsgiApp, reason: str, root_cert: asn1_x509.Certificate
) -> None:
    with wsgi_server(app) as url, pytest.raises(TimestampError) as caught:
        _timestamp(TsaClient([url], trust_roots=[root_cert]))
    assert reason in caught.value.fields["attempts"][url]


def _tampering_app(authority: TimeStampAuthority, tamper: Callable[[Any], None]) -> WsgiApp:
    """A TSA that forwards a modified request to the real authority: validly signed tokens
    that do not answer the request that was sent."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = tsp.TimeStampReq.load(environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"])))
        tamper(request)
        body = authority.respond(request.dump(force=True))
        start_response("200 OK", [("Content-Type", REPLY), ("Content-Length", str(len(body)))])
        return [body]

    return app


def _other_digest(request: Any) -> None:
    request["message_imprint"]["hashed_message"] = hashlib.sha256(b"another document").digest()


def _other_nonce(request: Any) -> None:
    request["nonce"] = request["nonce"].native + 1


def _no_certificates(request: Any) -> None:
    request["cert_req"] = False


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_other_digest, "message imprint"),
        (_other_nonce, "nonce mismatch"),
        (_no_certificates, "cannot validate the token signature"),
    ],
    ids=["other-imprint", "other-nonce", "no-certificates"],
)
def test_valid_token_for_another_request_is_rejected(
    authority: TimeStampAuthority,
    root_cert: asn1_x509.Certificate,
    tamper: Callable[[Any], None],
    reason: str,
) -> None:
    app = _tampering_app(authority, tamper)
    with wsgi_server(app) as url, pytest.raises(TimestampError) as caught:
        _timestamp(TsaClient([url], trust_roots=[root_cert]))
    assert reason in caught.value.fields["attempts"][url]


def test_tsa_chaining_to_an_untrusted_root_is_rejected(
    rogue: tuple[TimeStampAuthority, Any], root_cert: asn1_x509.Certificate
) -> None:
    rogue_authority, rogue_root = rogue
    server = serve_in_background(rogue_authority)
    try:
        with pytest.raises(TimestampError) as caught:
            _timestamp(TsaClient([server.url], trust_roots=[root_cert]))
        assert "does not chain to a trusted root" in caught.value.fields["attempts"][server.url]
        # Control: the same tokens pass once the rogue root is trusted.
        assert _timestamp(TsaClient([server.url], trust_roots=[rogue_root])) is not None
    finally:
        server.stop()


def test_local_timestamper(authority: TimeStampAuthority) -> None:
    stamper = LocalTimeStamper(authority)
    token = _timestamp(stamper, algorithm="sha512")
    info = token["content"]["encap_content_info"]["content"].parsed
    assert info["message_imprint"]["hashed_message"].native == hashlib.sha512(DATA).digest()
    assert info["nonce"].native is not None
    with pytest.raises(TimestampError, match="bad_alg"):
        _timestamp(stamper, algorithm="sha1")


def test_rfc3161ng_client_accepts_our_tokens(tsa_url: str, authority: TimeStampAuthority) -> None:
    """An independent client (pyasn1, its own request and signature check) against our TSA."""
    stamper = rfc3161ng.RemoteTimestamper(
        tsa_url,
        certificate=authority.certificate.dump(),
        hashname="sha256",
        include_tsa_certificate=True,
    )
    token = stamper.timestamp(data=DATA, nonce=424242)  # checks signature, imprint and nonce
    assert stamper.check(token, data=DATA)
    gen_time = rfc3161ng.get_timestamp(token, naive=False)
    assert abs(gen_time - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)

"""Signing against TSAs over HTTP: our standalone `koin tsa serve`, fallbacks, and TSAs that
are down or lie. A failed timestamp never produces a file and never uses the local clock."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import tsp

from keys import KeyStore
from signer import Installation, SignOptions, sign_pdf
from tests.servers import closed_port_url, free_port, koin_process, wsgi_server
from tests.validators import extract_signatures, openssl, pdfsig, pdfsig_signatures
from timestamp import TimeStampAuthority, TimestampError


@pytest.fixture(scope="module")
def standalone_tsa(koin_home: Path) -> Iterator[str]:
    """`koin tsa serve` as its own process, as deployed beside the web service."""
    port = free_port()
    with koin_process(koin_home, "tsa", "serve", "--port", str(port), port=port):
        yield f"http://127.0.0.1:{port}/"


def _koin(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    koin = Path(sys.executable).parent / "koin"
    return subprocess.run(
        [str(koin), *args],
        capture_output=True,
        text=True,
        env={"KOIN_HOME": str(home), "KOIN_LANG": "en", "PATH": "/usr/bin:/bin"},
    )


def test_sign_with_standalone_tsa_and_fallback(
    koin_home: Path,
    standalone_tsa: str,
    permit_pdf: bytes,
    tmp_path: Path,
    nss_db: Path,
    root_pem: Path,
    chain_pem: Path,
) -> None:
    source = tmp_path / "in.pdf"
    source.write_bytes(permit_pdf)
    out = tmp_path / "out.pdf"
    result = _koin(
        koin_home, "sign", str(source), str(out), "--tsa", closed_port_url(), "--tsa",
        standalone_tsa,
    )
    assert result.returncode == 0, result.stderr
    assert "Signature is Valid." in pdfsig_signatures(pdfsig(out, nss_db))[0]
    [signature] = extract_signatures(out.read_bytes())
    assert signature.timestamp_token_der is not None
    (tmp_path / "tok.der").write_bytes(signature.timestamp_token_der)
    (tmp_path / "sig.bin").write_bytes(signature.signature_value)
    verified = openssl(
        "ts", "-verify", "-data", str(tmp_path / "sig.bin"), "-in", str(tmp_path / "tok.der"),
        "-token_in", "-CAfile", str(root_pem), "-untrusted", str(chain_pem),
    )
    assert "Verification: OK" in verified.stdout


def test_openssl_query_against_standalone_tsa(
    standalone_tsa: str, tmp_path: Path, root_pem: Path, chain_pem: Path
) -> None:
    import requests

    data = tmp_path / "doc.txt"
    data.write_text("通知書")
    query = tmp_path / "q.tsq"
    assert openssl("ts", "-query", "-data", str(data), "-sha256", "-cert", "-out",
                   str(query)).returncode == 0
    reply = requests.post(
        standalone_tsa, data=query.read_bytes(),
        headers={"Content-Type": "application/timestamp-query"}, timeout=10,
    )
    assert reply.headers["Content-Type"] == "application/timestamp-reply"
    (tmp_path / "r.tsr").write_bytes(reply.content)
    verified = openssl("ts", "-verify", "-queryfile", str(query), "-in", str(tmp_path / "r.tsr"),
                       "-CAfile", str(root_pem), "-untrusted", str(chain_pem))
    assert "Verification: OK" in verified.stdout


def test_tsa_unreachable_is_refused_and_writes_nothing(
    koin_home: Path, permit_pdf: bytes, tmp_path: Path
) -> None:
    source = tmp_path / "in.pdf"
    source.write_bytes(permit_pdf)
    dead = [closed_port_url(), closed_port_url()]
    result = _koin(koin_home, "sign", str(source), str(tmp_path / "out.pdf"),
                   "--tsa", dead[0], "--tsa", dead[1])
    assert result.returncode == 1
    # one warning per failed TSA, then the reason as the single final line
    *warnings, reason = result.stderr.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("WARNING") for w in warnings)
    assert reason.startswith("koin: No TSA returned a valid timestamp.")
    for url in dead:
        assert url.rstrip("/") in reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pdf"]


def _garbage_app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
    start("200 OK", [("Content-Type", "application/timestamp-reply")])
    return [b"\x30\x03garbage"]


def _other_imprint_app(
    authority: TimeStampAuthority,
) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    """A TSA that signs a genuine token, but over a different imprint than asked."""

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        body = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
        request = tsp.TimeStampReq.load(body)
        forged = tsp.TimeStampReq(
            {
                "version": 1,
                "message_imprint": {
                    "hash_algorithm": {"algorithm": "sha256"},
                    "hashed_message": hashlib.sha256(b"another document").digest(),
                },
                "nonce": request["nonce"].native,
                "cert_req": True,
            }
        )
        start("200 OK", [("Content-Type", "application/timestamp-reply")])
        return [authority.respond(forged.dump())]

    return app


@pytest.mark.parametrize("kind", ["garbage", "other-imprint"])
def test_lying_tsa_is_refused(
    kind: str,
    installation: Installation,
    key_store: KeyStore,
    permit_pdf: bytes,
    tmp_path: Path,
) -> None:
    authority = TimeStampAuthority.from_key_store(key_store, tmp_path / "state")
    app = _garbage_app if kind == "garbage" else _other_imprint_app(authority)
    with wsgi_server(app) as url:
        context = installation.signing_context(tsa_urls=[url])
        out = tmp_path / "out" / "signed.pdf"
        with pytest.raises(TimestampError) as info:
            sign_pdf(permit_pdf, context, SignOptions(), output=out)
    error = info.value
    assert url.rstrip("/") in error.message_en and url.rstrip("/") in error.message
    reason = " ".join(error.fields["attempts"].values())
    expected = "imprint" if kind == "other-imprint" else "not a der timestampresp"
    assert expected in reason.lower(), reason
    assert not out.exists() and list(out.parent.iterdir()) == []

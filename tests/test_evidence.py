"""The evidence package of a contract, checked the way its VERIFY.md tells a reader to: every
``sh`` block run as written, offline, with nothing but bash, OpenSSL and coreutils."""

from __future__ import annotations

import datetime as dt
import io
import re
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from contracts import (
    CompletionOutcome,
    Contract,
    LtaPolicy,
    UserRole,
    complete_contract,
    create_user,
    renew_due,
    session_scope,
)
from contracts.evidence import EvidencePackage, build_evidence_package
from signer import Installation
from tests.conftest import PUBLIC_URL
from tests.lta_homes import rotate_tsa, short_lived_installation
from tests.test_workflow import _all_consent, _contract, _create, officer  # noqa: F401
from web import create_app
from web.cli import cli

#: The reader's environment: the shell and the system's tools, nothing of koin's.
READER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent"}


def _completed(
    sessions: sessionmaker[Session], installation: Installation, officer_id: int, pdf: bytes
) -> Contract:
    contract_id = _create(sessions, installation, officer_id, pdf)
    _all_consent(sessions, contract_id)
    assert complete_contract(sessions, contract_id, installation) is CompletionOutcome.COMPLETED
    return _contract(sessions, contract_id)


def _package(
    sessions: sessionmaker[Session], installation: Installation, contract: Contract
) -> EvidencePackage:
    with sessions() as session:
        fresh = session.get(Contract, contract.id)
        assert fresh is not None
        return build_evidence_package(
            session, installation.home, fresh, installation.trust_material()
        )


def _unpack(package: EvidencePackage, where: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(package.data)) as archive:
        archive.extractall(where)
    [folder] = list(where.iterdir())
    return folder


def _blocks(folder: Path) -> list[str]:
    text = (folder / "VERIFY.md").read_text(encoding="utf-8")
    return re.findall(r"^```sh\n(.*?)^```$", text, flags=re.S | re.M)


def _run(block: str, folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/bash", "-c", block], cwd=folder, env=READER_ENV, capture_output=True, text=True,
        timeout=120,
    )


@pytest.fixture
def renewed_contract(
    sessions: sessionmaker[Session],
    koin_home: Path,
    permit_pdf: bytes,
    officer: int,  # noqa: F811
    tmp_path: Path,
) -> tuple[Installation, Contract]:
    """A contract completed under a TSA certificate valid one day, then kept up: the TSA got a
    new certificate and the renewer added a document timestamp and a second chain-head token."""
    first = short_lived_installation(tmp_path / "home", koin_home, lifetime=dt.timedelta(days=1))
    contract = _completed(sessions, first, officer, permit_pdf)
    later = rotate_tsa(first)
    report = renew_due(sessions, later, policy=LtaPolicy(margin=dt.timedelta(days=30)))
    assert report.failed == [] and len(report.renewed) == 2, report
    return later, contract


def test_every_documented_check_passes(
    sessions: sessionmaker[Session], renewed_contract: tuple[Installation, Contract], tmp_path: Path
) -> None:
    installation, contract = renewed_contract
    package = _package(sessions, installation, contract)
    folder = _unpack(package, tmp_path / "unpacked")
    blocks = _blocks(folder)
    assert len(blocks) == 6
    for block in blocks:
        result = _run(block, folder)
        assert result.returncode == 0, (block, result.stdout, result.stderr)
        assert "OK" in result.stdout, result.stdout



def test_tampering_makes_the_documented_checks_fail(
    sessions: sessionmaker[Session], renewed_contract: tuple[Installation, Contract], tmp_path: Path
) -> None:
    installation, contract = renewed_contract
    package = _package(sessions, installation, contract)
    chain, head, tokens, documents, witness, _revocation = range(6)

    # One changed character in one JSONL line (an IP address of a consent).
    folder = _unpack(package, tmp_path / "edited-line")
    audit = folder / "audit.jsonl"
    lines = audit.read_bytes().splitlines(keepends=True)
    number = next(i for i, line in enumerate(lines) if b'"ip":"192.0.2.10"' in line)
    lines[number] = lines[number].replace(b'"ip":"192.0.2.10"', b'"ip":"192.0.2.11"')
    audit.write_bytes(b"".join(lines))
    result = _run(_blocks(folder)[chain], folder)
    assert result.returncode == 1 and "NG" in result.stdout, result.stdout
    assert f"event {number + 2} does not link" in result.stdout

    # The last line changed too (nothing after it links to it): the recorded SHA-256s differ.
    folder = _unpack(package, tmp_path / "edited-last")
    audit = folder / "audit.jsonl"
    lines = audit.read_bytes().splitlines(keepends=True)
    lines[-1] = lines[-1].replace(b'"renewal":1', b'"renewal":2')
    audit.write_bytes(b"".join(lines))
    result = _run(_blocks(folder)[chain], folder)
    assert result.returncode == 1 and "differ from the record" in result.stdout

    # A consistently rewritten completed event: its hash is no longer the timestamped head.
    folder = _unpack(package, tmp_path / "rewritten")
    audit = folder / "audit.jsonl"
    text = audit.read_text(encoding="utf-8")
    audit.write_text(
        text.replace('"kind":"completed"', '"kind":"completed","note":"x"', 1), encoding="utf-8"
    )
    result = _run(_blocks(folder)[head], folder)
    assert result.returncode == 1 and "the chain head differs" in result.stdout
    blocks = _blocks(folder)
    without_record = blocks[head].replace(f'[ "$head" = "{contract.chain_head_sha256}" ]', "true")
    assert without_record != blocks[head]
    result = _run(without_record, folder)  # even without comparing: the token does not match
    assert result.returncode != 0 and "Verification: OK" not in result.stdout

    # A changed byte in the original, or in the signed part of the final PDF.
    folder = _unpack(package, tmp_path / "original")
    original = bytearray((folder / "original.pdf").read_bytes())
    original[200] ^= 1
    (folder / "original.pdf").write_bytes(bytes(original))
    result = _run(_blocks(folder)[documents], folder)
    assert result.returncode == 1 and "original.pdf differs" in result.stdout
    folder = _unpack(package, tmp_path / "final")
    final = bytearray((folder / "final.pdf").read_bytes())
    final[300] ^= 1
    (folder / "final.pdf").write_bytes(bytes(final))
    blocks = _blocks(folder)
    assert _run(blocks[documents], folder).returncode == 1
    result = _run(blocks[witness], folder)
    assert result.returncode != 0 and "Verification successful" not in result.stderr

    # A token that is not over the previous one.
    folder = _unpack(package, tmp_path / "tokens")
    second = (folder / "chain-head-token-2.tst").read_bytes()
    (folder / "chain-head-token-1.tst").write_bytes(second)
    assert _run(_blocks(folder)[tokens], folder).returncode != 0


def test_koin_evidence_export(
    sessions: sessionmaker[Session],
    renewed_contract: tuple[Installation, Contract],
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    installation, contract = renewed_contract
    monkeypatch.setenv("KOIN_HOME", str(installation.home))
    monkeypatch.setenv("KOIN_DATABASE_URL", db_url)
    monkeypatch.setenv("KOIN_LANG", "en")
    runner = CliRunner()
    out = tmp_path / "evidence.zip"
    result = runner.invoke(cli, ["evidence", "export", contract.public_id, str(out)])
    assert result.exit_code == 0, result.output
    assert "Evidence package written" in result.output
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
    folder = f"koin-evidence-{contract.public_id}"
    for name in ("VERIFY.md", "final.pdf", "original.pdf", "audit.jsonl", "chain-head-token-1.tst",
                 "chain-head-token-2.tst", "witness-signature.p7s", "certs/root-ca.pem",
                 "certs/issuing-ca.pem", "certs/witness.pem", "crls/issuing-ca.crl",
                 "crls/root-ca.crl"):
        assert f"{folder}/{name}" in names, names
    assert sum(name.startswith(f"{folder}/certs/tsa-") for name in names) == 2

    unknown = runner.invoke(cli, ["evidence", "export", "no-such-contract", str(out)])
    assert unknown.exit_code == 1 and "There is no contract no-such-contract" in unknown.output
    unwritable = runner.invoke(
        cli, ["evidence", "export", contract.public_id, str(out / "x.zip")]  # under a file
    )
    assert unwritable.exit_code == 1 and "Cannot write" in unwritable.output


# -- the officer's contract page -----------------------------------------------------------------

SECRET = "test-secret-key-0123456789abcdef-not-for-production"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def _login(client: FlaskClient, email: str) -> None:
    page = client.get("/login").get_data(as_text=True)
    found = _CSRF.search(page)
    assert found, page
    response = client.post("/login", data={
        "csrf_token": found.group(1), "email": email, "password": "correct horse battery staple",
    })
    assert response.status_code == 302, response.get_data(as_text=True)


@pytest.fixture
def officer_client(
    renewed_contract: tuple[Installation, Contract], db_url: str
) -> Iterator[FlaskClient]:
    from web import services

    installation, _ = renewed_contract
    app = create_app({
        "KOIN_HOME": str(installation.home), "KOIN_DATABASE_URL": db_url,
        "KOIN_PUBLIC_URL": PUBLIC_URL, "SECRET_KEY": SECRET, "TESTING": True,
    })
    client = app.test_client()
    _login(client, "keiyaku@pref.ibaraki.example")  # tests.test_workflow.officer
    yield client
    services.close(app)


def test_the_contract_page_offers_the_evidence_package(
    officer_client: FlaskClient,
    renewed_contract: tuple[Installation, Contract],
    sessions: sessionmaker[Session],
    permit_pdf: bytes,
    tmp_path: Path,
) -> None:
    installation, contract = renewed_contract
    page = officer_client.get(f"/contracts/{contract.public_id}").get_data(as_text=True)
    assert 'id="download-evidence"' in page and "証拠パッケージ (ZIP)" in page
    assert 'id="lta-status"' in page and "PAdES B-LTA" in page
    assert "長期検証のためのタイムスタンプ" in page  # the renewals on the timeline

    response = officer_client.get(f"/contracts/{contract.public_id}/evidence.zip")
    assert response.status_code == 200 and response.mimetype == "application/zip"
    assert f"koin-evidence-{contract.public_id}.zip" in response.headers["Content-Disposition"]
    folder = _unpack(EvidencePackage("x.zip", response.get_data(), ()), tmp_path / "web")
    for block in _blocks(folder):
        assert _run(block, folder).returncode == 0

    with session_scope(sessions) as session:
        other, _ = create_user(session, "other@pref.ibaraki.example", [UserRole.OFFICER],
                               password="correct horse battery staple")
        other_id = other.id
    draft = _create(sessions, installation, other_id, permit_pdf, send=False)
    draft_contract = _contract(sessions, draft)
    response = officer_client.get(f"/contracts/{draft_contract.public_id}/evidence.zip")
    assert response.status_code == 404  # another officer's: as if it did not exist
    english = officer_client.get(f"/contracts/{contract.public_id}?lang=en").get_data(as_text=True)
    assert "Evidence package (ZIP)" in english

    owner = officer_client.application.test_client()
    _login(owner, "other@pref.ibaraki.example")
    response = owner.get(f"/contracts/{draft_contract.public_id}/evidence.zip")
    assert response.status_code == 404
    assert "締結済みの契約についてのみ" in response.get_data(as_text=True)
    page = owner.get(f"/contracts/{draft_contract.public_id}").get_data(as_text=True)
    assert 'id="download-evidence"' not in page

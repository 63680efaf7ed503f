"""``koin --server URL --api-key-file F sign-batch``: RPA signing through a real ``koin serve``
(its REST API and in-process batch worker): manifest, bad files, a run killed with SIGKILL and
resumed without any input uploaded or signed twice, and the refusals of a bad key."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils.reader import PdfFileReader
from sqlalchemy import func, select

import contracts
from contracts import BatchDocument, SignedDocument, migrate, session_scope
from signer import Installation
from signer.samples import make_permit_pdf, numbered_copies
from tests.servers import free_port, koin_process
from tests.validators import pyhanko_status

KOIN = str(Path(sys.executable).parent / "koin")


@pytest.fixture(scope="module")
def server(koin_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[str, Path, Path]]:
    """A koin serve (SQLite, embedded worker) and a 0600 file with a signer's API key."""
    home = tmp_path_factory.mktemp("remote") / "home"
    shutil.copytree(koin_home, home)
    for leftover in home.glob("koin.db*"):
        leftover.unlink()
    url = contracts.database_url(home)
    migrate.upgrade(url)
    engine = contracts.make_engine(url)
    with session_scope(contracts.make_session_factory(engine)) as session:
        user, _ = contracts.create_user(session, "rpa@pref.ibaraki.example", ["signer"])
        _, key = contracts.create_api_key(session, user, name="RPA", scopes=["sign"])
    engine.dispose()
    key_file = home.parent / "api-key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    port = free_port()
    with koin_process(
        home, "serve", "--no-init", "--port", str(port), port=port,
        env={"KOIN_JOBS_INTERVAL": "0", "KOIN_DEV_SMTP_PORT": "0",
             "KOIN_PUBLIC_URL": f"http://127.0.0.1:{port}", "KOIN_API_BURST": "1000",
             "KOIN_API_RATE": "1000"},
    ):
        yield f"http://127.0.0.1:{port}", key_file, home


@pytest.fixture(scope="module")
def permit(installation: Installation) -> bytes:
    return make_permit_pdf(installation.font_file)


def _koin(server: str, key_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KOIN, "--server", server, "--api-key-file", str(key_file), *args],
        capture_output=True, text=True, timeout=600,
    )


def _manifest(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text("utf-8-sig"))))


def _records(home: Path, names: set[str]) -> int:
    engine = contracts.make_engine(contracts.database_url(home))
    try:
        with contracts.make_session_factory(engine)() as session:
            return int(session.scalar(
                select(func.count()).select_from(SignedDocument)
                .where(SignedDocument.file_name.in_(names))
            ) or 0)
    finally:
        engine.dispose()


def test_remote_batch_with_a_bad_file(
    server: tuple[str, Path, Path], permit: bytes, tmp_path: Path,
    root_cert: asn1_x509.Certificate,
) -> None:
    url, key_file, home = server
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    for number, data in enumerate(numbered_copies(permit, 12), start=1):
        (in_dir / f"建設業許可-{number:03d}.pdf").write_bytes(data)
    (in_dir / "memo.pdf").write_bytes(b"not a pdf")

    result = _koin(url, key_file, "sign-batch", str(in_dir), str(out_dir))
    assert result.returncode == 1, result.stderr
    assert "memo.pdf" in result.stderr and "13 件" in result.stdout
    rows = {row["input_name"]: row for row in _manifest(out_dir / "manifest.csv")}
    assert len(rows) == 13
    assert rows["memo.pdf"]["status"] == "failed" and rows["memo.pdf"]["error"]
    signed = [name for name, row in rows.items() if row["status"] == "signed"]
    assert len(signed) == 12
    for name in signed:
        data = (out_dir / name).read_bytes()
        assert data.startswith((in_dir / name).read_bytes())
        assert len(PdfFileReader(io.BytesIO(data)).embedded_signatures) == 1
    assert pyhanko_status((out_dir / signed[0]).read_bytes(), root_cert).bottom_line
    assert not (out_dir / ".koin-remote.json").exists()

    again = _koin(url, key_file, "sign-batch", str(in_dir), str(out_dir))
    assert again.returncode == 1  # memo.pdf fails again; the rest is skipped, not re-sent
    assert "スキップ 12 件" in again.stdout
    assert _records(home, set(signed)) == 12


def test_killed_remote_run_resumes_without_sending_anything_twice(
    server: tuple[str, Path, Path], permit: bytes, tmp_path: Path
) -> None:
    url, key_file, home = server
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    total = 150
    names = set()
    for number, data in enumerate(numbered_copies(permit, total, start=1000), start=1):
        name = f"permit-{number:04d}.pdf"
        (in_dir / name).write_bytes(data)
        names.add(name)
    process = subprocess.Popen(
        [KOIN, "--server", url, "--api-key-file", str(key_file), "sign-batch", str(in_dir),
         str(out_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    manifest = out_dir / "manifest.csv"
    deadline = time.monotonic() + 300
    while not (manifest.exists() and len(_manifest(manifest)) >= 5):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (out_dir / ".koin-remote.json").exists()
    assert len(_manifest(manifest)) < total

    result = _koin(url, key_file, "sign-batch", str(in_dir), str(out_dir), "--workers", "4")
    assert result.returncode == 0, result.stderr
    rows = _manifest(manifest)
    assert len(rows) == total and {row["status"] for row in rows} == {"signed"}
    assert {row["input_name"] for row in rows} == names
    # every input reached the server once and was signed once
    engine = contracts.make_engine(contracts.database_url(home))
    try:
        with contracts.make_session_factory(engine)() as session:
            uploads = session.scalar(
                select(func.count()).select_from(BatchDocument)
                .where(BatchDocument.file_name.in_(names))
            )
    finally:
        engine.dispose()
    assert uploads == total
    assert _records(home, names) == total
    for row in rows:
        data = (out_dir / row["input_name"]).read_bytes()
        assert len(PdfFileReader(io.BytesIO(data)).embedded_signatures) == 1


def test_remote_sign_and_refusals(
    server: tuple[str, Path, Path], permit: bytes, tmp_path: Path,
    root_cert: asn1_x509.Certificate,
) -> None:
    url, key_file, _ = server
    source = tmp_path / "permit.pdf"
    source.write_bytes(permit)
    signed = tmp_path / "signed.pdf"
    result = _koin(url, key_file, "sign", str(source), str(signed), "--level", "B-B")
    assert result.returncode == 0, result.stderr
    assert pyhanko_status(signed.read_bytes(), root_cert).bottom_line

    open_key = tmp_path / "open-key"
    open_key.write_text(key_file.read_text())
    open_key.chmod(0o644)
    refused = _koin(url, open_key, "sign", str(source), str(tmp_path / "x.pdf"))
    assert refused.returncode == 1 and "chmod 600" in refused.stderr
    bad_key = tmp_path / "bad-key"
    bad_key.write_text("koin_00000000_" + "A" * 43)
    bad_key.chmod(0o600)
    unauthorized = _koin(url, bad_key, "sign-batch", str(tmp_path), str(tmp_path / "o"))
    assert unauthorized.returncode == 1 and "401" in unauthorized.stderr
    assert "Traceback" not in unauthorized.stderr
    down = _koin("http://127.0.0.1:9", key_file, "sign", str(source), str(tmp_path / "y.pdf"))
    assert down.returncode == 1 and "接続できません" in down.stderr
    usage = subprocess.run([KOIN, "--server", url, "verify", str(signed)], capture_output=True,
                           text=True)
    assert usage.returncode == 2

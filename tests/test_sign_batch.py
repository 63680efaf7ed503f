"""`koin sign-batch`: a folder signed for RPA robots, resumable after an interruption."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from click.testing import CliRunner
from sqlalchemy import select

import contracts
from signer import Installation
from signer.samples import make_permit_pdf
from tests.hostile import password_protected_pdf
from tests.validators import pyhanko_status
from web.cli import cli

# Documents recorded in a home before the test (the shared installation may hold some, made
# by tests that ran before in the same process); _recorded leaves them out.
_RECORDED_BEFORE: dict[Path, set[tuple[str, str | None]]] = {}


@pytest.fixture
def home(koin_home: Path, tmp_path: Path) -> Path:
    target = tmp_path / "home"
    shutil.copytree(koin_home, target)
    database = target / "koin.db"
    _RECORDED_BEFORE[target] = set(_all_recorded(target)) if database.exists() else set()
    return target


@pytest.fixture
def runner(home: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("KOIN_HOME", str(home))
    monkeypatch.setenv("KOIN_LANG", "en")
    return CliRunner()


def _permits(folder: Path, installation: Installation, count: int) -> list[str]:
    """``count`` distinct one-page permits: one drawn, the rest with a comment after %%EOF."""
    folder.mkdir(parents=True, exist_ok=True)
    base = make_permit_pdf(installation.font_file, number=1)
    names = [f"許可書-{i:04d}.pdf" for i in range(count)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(base + b"%% copy %d\n" % i)
    return names


def _manifest(path: Path) -> list[dict[str, str]]:
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf"), "UTF-8 with BOM, for Excel"
    return list(csv.DictReader(raw.decode("utf-8-sig").splitlines()))


def _signature_count(pdf: Path) -> int:
    return pdf.read_bytes().count(b"/ByteRange")


def _recorded(home: Path) -> list[tuple[str, str | None]]:
    """The documents recorded in ``home`` since the test began."""
    before = _RECORDED_BEFORE.get(home, set())
    return [record for record in _all_recorded(home) if record not in before]


def _all_recorded(home: Path) -> list[tuple[str, str | None]]:
    engine = contracts.make_engine(contracts.database_url(home))
    try:
        with contracts.session_scope(contracts.make_session_factory(engine)) as session:
            return [
                (d.sha256, d.file_name)
                for d in session.scalars(select(contracts.SignedDocument))
            ]
    finally:
        engine.dispose()


def test_batch_signs_fails_bad_files_alone_and_resumes(
    runner: CliRunner, home: Path, tmp_path: Path, installation: Installation,
    root_cert: asn1_x509.Certificate,
) -> None:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    names = _permits(in_dir, installation, 20)
    (in_dir / "not-a-pdf.pdf").write_bytes(b"hello")
    (in_dir / "encrypted.pdf").write_bytes(password_protected_pdf())
    (in_dir / "notes.txt").write_text("ignored")

    result = runner.invoke(cli, ["sign-batch", str(in_dir), str(out_dir)])
    assert result.exit_code == 1, result.output
    assert "22 file(s): 20 signed, 0 skipped, 2 failed" in result.stdout
    assert "[22/22]" in result.stderr
    rows = _manifest(out_dir / "manifest.csv")
    assert [r["input_name"] for r in rows] == sorted([*names, "not-a-pdf.pdf", "encrypted.pdf"])
    failed = {r["input_name"]: r["error"] for r in rows if r["status"] == "failed"}
    assert set(failed) == {"not-a-pdf.pdf", "encrypted.pdf"}
    assert "Not a PDF file" in failed["not-a-pdf.pdf"]
    assert "password-protected" in failed["encrypted.pdf"]
    for name, reason in failed.items():
        assert f"{name} failed: {reason}" in result.stderr
        assert not (out_dir / name).exists()
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*names, "manifest.csv"])
    for name in names[:3]:
        status = pyhanko_status((out_dir / name).read_bytes(), root_cert)
        assert status.bottom_line, status.pretty_print_details()
    recorded = _recorded(home)
    assert len(recorded) == 20
    by_name = {r["input_name"]: r for r in rows}
    assert sorted(recorded) == sorted((by_name[n]["output_sha256"], n) for n in names)

    before = {name: (out_dir / name).read_bytes() for name in names}
    again = runner.invoke(cli, ["sign-batch", str(in_dir), str(out_dir), "--quiet"])
    assert again.exit_code == 1
    assert "22 file(s): 0 signed, 20 skipped, 2 failed" in again.stdout
    assert "skipped" not in again.stderr, "--quiet shows only failures"
    assert again.stderr.count("\n") == 2
    assert {name: (out_dir / name).read_bytes() for name in names} == before
    assert all(_signature_count(out_dir / name) == 1 for name in names)
    assert len(_recorded(home)) == 20
    assert _manifest(out_dir / "manifest.csv") == rows, "status and IDs kept"


def test_workers_2_gives_the_same_results_as_1(
    runner: CliRunner, home: Path, tmp_path: Path, installation: Installation
) -> None:
    in_dir = tmp_path / "in"
    names = _permits(in_dir, installation, 6)
    (in_dir / "bad.pdf").write_bytes(b"%PDF-1.7\n1 0 obj")
    results = {}
    for workers in ("1", "2"):
        out_dir = tmp_path / f"out{workers}"
        result = runner.invoke(
            cli, ["sign-batch", str(in_dir), str(out_dir), "--workers", workers, "--level", "B-B"]
        )
        assert result.exit_code == 1, result.output
        rows = _manifest(out_dir / "manifest.csv")
        results[workers] = [
            (r["input_name"], r["input_sha256"], r["status"], r["error"], bool(r["document_id"]))
            for r in rows
        ]
        assert all(_signature_count(out_dir / name) == 1 for name in names)
    assert results["1"] == results["2"]
    assert len(_recorded(home)) == 12


def test_template_and_usage_errors(runner: CliRunner, tmp_path: Path) -> None:
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    missing = runner.invoke(cli, ["sign-batch", str(tmp_path / "nope"), str(tmp_path / "o")])
    assert missing.exit_code == 2
    same = runner.invoke(cli, ["sign-batch", str(in_dir), str(in_dir)])
    assert same.exit_code == 2
    assert runner.invoke(cli, ["sign-batch", str(in_dir), str(tmp_path / "o"),
                               "--workers", "0"]).exit_code == 2
    unknown = runner.invoke(cli, ["sign-batch", str(in_dir), str(tmp_path / "o"),
                                  "--template", "nope"])
    assert unknown.exit_code == 1 and unknown.stderr.count("\n") == 1
    empty = runner.invoke(cli, ["sign-batch", str(in_dir), str(tmp_path / "o")])
    assert empty.exit_code == 0 and "0 file(s)" in empty.stdout


def test_template_options_are_used(
    runner: CliRunner, tmp_path: Path, installation: Installation
) -> None:
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    names = _permits(in_dir, installation, 2)
    added = runner.invoke(cli, ["templates", "add", "kyoka", "--title", "許可書", "--page", "1",
                                "--level", "B-B", "--box", "20,20,100,45", "--units", "mm"])
    assert added.exit_code == 0, added.output
    result = runner.invoke(cli, ["sign-batch", str(in_dir), str(out_dir), "--template", "kyoka"])
    assert result.exit_code == 0, result.output
    signed = (out_dir / names[0]).read_bytes()
    assert b"/ETSI.CAdES.detached" in signed and b"/ETSI.RFC3161" not in signed


@pytest.mark.slow
def test_killed_run_resumes_without_signing_twice(
    home: Path, tmp_path: Path, installation: Installation
) -> None:
    """The real console script, killed with SIGKILL mid-batch, then run again to the end."""
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    names = _permits(in_dir, installation, 200)
    koin = Path(sys.executable).parent / "koin"
    env = {**os.environ, "KOIN_HOME": str(home), "KOIN_LANG": "en"}
    command = [str(koin), "sign-batch", str(in_dir), str(out_dir), "--level", "B-B", "--quiet"]
    manifest = out_dir / "manifest.csv"

    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") > 20:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    done_before = len(_manifest(manifest))
    assert 20 <= done_before < 200

    again = subprocess.run([*command, "--workers", "2"], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    rows = _manifest(manifest)
    assert [r["input_name"] for r in rows] == names
    assert all(r["status"] == "signed" for r in rows)
    assert all(_signature_count(out_dir / name) == 1 for name in names)
    assert not [p for p in out_dir.iterdir() if p.name.endswith(".tmp")]
    outputs = {r["output_sha256"]: r["input_name"] for r in rows}
    recorded = [(sha, name) for sha, name in _recorded(home) if sha in outputs]
    assert sorted(recorded) == sorted(outputs.items())

"""The `koin` command line as RPA robots and staff use it: exit codes and one-line reasons."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.cli_language import assert_english, assert_japanese
from tests.conftest import PASSPHRASE
from web.cli import cli


@pytest.fixture
def home(koin_home: Path, tmp_path: Path) -> Path:
    target = tmp_path / "home"
    shutil.copytree(koin_home, target)
    return target


@pytest.fixture
def runner(home: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("KOIN_HOME", str(home))
    monkeypatch.setenv("KOIN_LANG", "en")
    return CliRunner()


@pytest.fixture
def permit_file(tmp_path: Path, permit_pdf: bytes) -> Path:
    path = tmp_path / "permit.pdf"
    path.write_bytes(permit_pdf)
    return path


def test_init_on_a_fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "fresh"
    monkeypatch.setenv("KOIN_HOME", str(home))
    monkeypatch.delenv("KOIN_KEY_PASSPHRASE", raising=False)
    monkeypatch.delenv("KOIN_LANG", raising=False)
    result = CliRunner().invoke(cli, ["init"])
    assert result.exit_code == 0, result.output
    assert "passphrase" in result.output
    assert_japanese(result.output)
    assert "デモ PKI と鍵ストアを作成しました" in result.output
    assert "初期パスワード(この一度だけ表示します。安全な場所に控えてください): " in result.output
    secret = (home / "keys" / "passphrase").read_text().strip()
    assert secret and secret not in result.output, "the passphrase is never printed"
    for path in ("keys/keystore.json", "assets/seal.png", "assets/NotoSansCJKjp-Regular.otf",
                 "pki/root-ca.pem", "pki/issuing-ca.crl"):
        assert (home / path).is_file(), path
    again = CliRunner().invoke(cli, ["init"])
    assert again.exit_code == 0 and "既にあります" in again.output


def test_init_in_english(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "fresh"
    monkeypatch.setenv("KOIN_HOME", str(home))
    monkeypatch.delenv("KOIN_KEY_PASSPHRASE", raising=False)
    monkeypatch.setenv("KOIN_LANG", "en")
    result = CliRunner().invoke(cli, ["init"])
    assert result.exit_code == 0, result.output
    assert_english(result.output)
    assert f"Created the demo PKI and key store: {home.resolve() / 'keys'}" in result.output
    assert f"Saved the key passphrase in {home.resolve() / 'keys' / 'passphrase'}" in result.output
    assert "Initial password (shown this once only; keep it somewhere safe): " in result.output
    again = CliRunner().invoke(cli, ["init"])
    assert again.exit_code == 0, again.output
    assert_english(again.output)
    assert "The key store already exists" in again.output
    assert "An administrator account already exists." in again.output


def test_sign_prints_json_summary(
    runner: CliRunner, permit_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "signed.pdf"
    result = runner.invoke(
        cli, ["sign", str(permit_file), str(out), "--level", "B-B", "--page", "1",
              "--box", "20,20,100,45", "--units", "mm", "--json"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["level"] == "B-B" and summary["page"] == 1
    assert summary["box"] == pytest.approx([56.69, 56.69, 283.46, 127.56], abs=0.01)
    assert out.is_file()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"hello", "Not a PDF file"),
        (b"%PDF-1.7\n1 0 obj", "The PDF is truncated"),
    ],
)
def test_refused_input_exits_1_with_one_line(
    runner: CliRunner, tmp_path: Path, content: bytes, expected: str
) -> None:
    source = tmp_path / "bad.pdf"
    source.write_bytes(content)
    out = tmp_path / "out.pdf"
    result = runner.invoke(cli, ["sign", str(source), str(out), "--level", "B-B"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and expected in result.stderr
    assert not out.exists()


def test_missing_input_exits_1(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["sign", str(tmp_path / "nope.pdf"), str(tmp_path / "o.pdf")])
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_page_out_of_range_exits_1(
    runner: CliRunner, permit_file: Path, tmp_path: Path
) -> None:
    result = runner.invoke(
        cli, ["sign", str(permit_file), str(tmp_path / "o.pdf"), "--level", "B-B", "--page", "9"]
    )
    assert result.exit_code == 1
    assert result.stderr.strip() == "koin: Page 9 does not exist; the PDF has 2 page(s)."


@pytest.mark.parametrize(
    "args",
    [
        ["--level", "B-X"],
        ["--box", "1,2,3"],
        ["--no-stamp", "--page", "1"],
        ["--units", "inch"],
    ],
)
def test_usage_errors_exit_2(
    runner: CliRunner, permit_file: Path, tmp_path: Path, args: list[str]
) -> None:
    result = runner.invoke(cli, ["sign", str(permit_file), str(tmp_path / "o.pdf"), *args])
    assert result.exit_code == 2


def test_japanese_messages_by_default(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOIN_HOME", str(home))
    monkeypatch.delenv("KOIN_LANG", raising=False)
    source = tmp_path / "bad.pdf"
    source.write_bytes(b"hello")
    result = CliRunner().invoke(cli, ["sign", str(source), str(tmp_path / "o.pdf")])
    assert result.exit_code == 1 and "PDF ファイルではありません" in result.stderr


def test_wrong_passphrase_exits_1(
    runner: CliRunner, permit_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KOIN_KEY_PASSPHRASE", "Zq9-not-it")
    result = runner.invoke(cli, ["sign", str(permit_file), str(tmp_path / "o.pdf")])
    assert result.exit_code == 1 and "wrong passphrase" in result.stderr
    assert "Zq9-not-it" not in result.output + result.stderr


def test_export_roots(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["pki", "export-roots", str(tmp_path / "trust")])
    assert result.exit_code == 0
    assert (tmp_path / "trust" / "root.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE")


def test_keys_import_cli(runner: CliRunner, tmp_path: Path, home: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    import keys
    from keys import Role

    other = keys.generate_demo_pki(tmp_path / "other", b"x", "http://other.test")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = keys.issue_role_certificate(other.issuing, Role.WITNESS, key.public_key())
    p12 = tmp_path / "w.p12"
    p12.write_bytes(keys.write_pkcs12("w", key, cert, [other.issuing.certificate], b"pw"))
    pass_file = tmp_path / "pw.txt"
    pass_file.write_text("pw\n")
    result = runner.invoke(
        cli, ["keys", "import", "witness", str(p12), "--passphrase-file", str(pass_file)]
    )
    assert result.exit_code == 0, result.output
    assert "koin Witness Signing Service" in result.output
    assert result.output.startswith("Imported the witness key: ")
    assert_english(result.output)


def test_installed_console_script(home: Path, permit_file: Path, tmp_path: Path) -> None:
    """The real `koin` entry point, as an RPA robot calls it."""
    koin = Path(sys.executable).parent / "koin"
    env = {**os.environ, "KOIN_HOME": str(home), "KOIN_LANG": "en"}
    env.pop("KOIN_KEY_PASSPHRASE", None)
    ok = subprocess.run(
        [str(koin), "sign", str(permit_file), str(tmp_path / "o.pdf"), "--level", "B-B"],
        capture_output=True, text=True, env=env,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [str(koin), "sign", str(tmp_path / "o.pdf"), str(tmp_path / "o2.pdf"), "--page", "7",
         "--level", "B-B"],
        capture_output=True, text=True, env=env,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip() == "koin: Page 7 does not exist; the PDF has 2 page(s)."
    assert PASSPHRASE not in ok.stdout + ok.stderr + bad.stderr


def test_verify_exit_codes(
    runner: CliRunner, home: Path, permit_file: Path, tmp_path: Path
) -> None:
    signed = tmp_path / "signed.pdf"
    result = runner.invoke(cli, ["sign", str(permit_file), str(signed)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Signed: {signed} (document ID ")
    assert_english(result.output)
    ok = runner.invoke(cli, ["verify", str(signed)])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("PASSED: Signed, and all signatures are valid.")
    assert "Governor of Ibaraki Prefecture; B-T; whole document" in ok.stdout

    data = bytearray(signed.read_bytes())
    position = data.index(b"stream", 200) + 20
    data[position] ^= 1
    tampered = tmp_path / "tampered.pdf"
    tampered.write_bytes(bytes(data))
    failed = runner.invoke(cli, ["verify", str(tampered), "--json"])
    assert failed.exit_code == 1
    report = json.loads(failed.stdout)
    assert report["indication"] == "FAILED"
    assert report["signatures"][0]["subindication"] == "HASH_FAILURE"

    unsigned = runner.invoke(cli, ["verify", str(permit_file)])
    assert unsigned.exit_code == 1 and "carries no electronic signature" in unsigned.stdout

    not_pdf = tmp_path / "x.pdf"
    not_pdf.write_text("hello")
    refused = runner.invoke(cli, ["verify", str(not_pdf)])
    assert refused.exit_code == 2 and refused.stderr.strip() == "koin: Not a PDF file."
    assert runner.invoke(cli, ["verify", str(tmp_path / "missing.pdf")]).exit_code == 2


def test_sign_records_the_document(
    runner: CliRunner, home: Path, permit_file: Path, tmp_path: Path
) -> None:
    import contracts

    out = tmp_path / "signed.pdf"
    result = runner.invoke(cli, ["sign", str(permit_file), str(out), "--qr", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    engine = contracts.make_engine(contracts.database_url(home))
    try:
        with contracts.session_scope(contracts.make_session_factory(engine)) as session:
            record = contracts.get_document(session, summary["document_id"])
            assert record is not None
            assert record.sha256 == summary["sha256"] and record.signer_role == "position"
            assert record.file_name == "permit.pdf" and record.level == "B-T"
    finally:
        engine.dispose()


def test_db_upgrade(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    result = runner.invoke(cli, ["db", "upgrade"])
    assert result.exit_code == 0 and "The database is up to date: " in result.stdout
    assert_english(result.output)
    monkeypatch.delenv("KOIN_LANG")
    result = runner.invoke(cli, ["db", "upgrade"])
    assert result.exit_code == 0 and "データベースは最新です" in result.stdout

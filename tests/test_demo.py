"""``koin demo``: the demo data is made through the services, once, and the pages show it."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

import contracts
from contracts import demo as demo_data
from signer import Installation, verify_pdf
from tests.cli_language import assert_english, assert_japanese
from web import create_app, services
from web.cli import cli

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_PASSWORD = re.compile(r"^  (\S+@\S+)  (\S+)$", re.MULTILINE)
PUBLIC_URL = "http://127.0.0.1:8000"

pytestmark = pytest.mark.slow


@pytest.fixture
def home(koin_home: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home, ignore=shutil.ignore_patterns("koin.db*"))
    return home


@pytest.fixture
def demo_run(
    home: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, str]]:
    """``koin demo`` run twice on a fresh installation: the two outputs."""
    monkeypatch.setenv("KOIN_HOME", str(home))
    monkeypatch.setenv("KOIN_DATABASE_URL", db_url)
    monkeypatch.setenv("KOIN_PUBLIC_URL", PUBLIC_URL)
    first = CliRunner().invoke(cli, ["demo"])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(cli, ["demo"])
    assert second.exit_code == 0, second.output
    yield first.output, second.output


@pytest.fixture
def app(home: Path, db_url: str, demo_run: tuple[str, str]) -> Iterator[Flask]:
    app = create_app({"KOIN_HOME": str(home), "TESTING": True, "KOIN_DATABASE_URL": db_url,
                      "KOIN_PUBLIC_URL": PUBLIC_URL, "SECRET_KEY": "demo-test"})
    yield app
    services.close(app)


def _login(client: FlaskClient, email: str, password: str) -> None:
    page = client.get("/login").get_data(as_text=True)
    found = _CSRF.search(page)
    assert found, page
    response = client.post(
        "/login", data={"csrf_token": found.group(1), "email": email, "password": password}
    )
    assert response.status_code == 302, response.get_data(as_text=True)


def test_demo_runs_twice_without_duplicates_and_the_pages_show_it(
    demo_run: tuple[str, str], db_url: str, home: Path, app: Flask
) -> None:
    first, second = demo_run
    passwords = dict(_PASSWORD.findall(first))
    assert set(passwords) == {
        demo_data.ADMIN_EMAIL, demo_data.OFFICER_EMAIL,
        *(email for email, _, _ in demo_data.SIGNERS),
    }
    assert "アクセスコード: 令和8年度 道路維持補修業務委託契約 / 小林 誠: " in first
    assert "初期パスワード(この一度だけ表示します。安全な場所に控えてください):" in first
    assert_japanese(second)
    # the second run makes nothing and shows no password or code
    assert "デモデータは既にそろっています。" in second
    assert "作成:" not in second and not _PASSWORD.search(second) and "アクセスコード" not in second

    engine = contracts.make_engine(db_url)
    try:
        with contracts.make_session_factory(engine)() as session:
            def count(model: type[contracts.Base]) -> int:
                return int(session.scalar(select(func.count()).select_from(model)) or 0)

            assert count(contracts.User) == 4
            assert count(contracts.StampTemplate) == len(demo_data.TEMPLATES)
            assert count(contracts.Batch) == 1
            assert count(contracts.Contract) == len(demo_data.CONTRACTS)
            # 3 permits + 19 batch outputs + the witness signature of the completed contract
            assert count(contracts.SignedDocument) == 3 + 19 + 1
            batch = session.scalars(select(contracts.Batch)).one()
            assert batch.status == "finished"
            states = sorted(d.state for d in contracts.list_documents(session, batch))
            assert states == ["done"] * 19 + ["failed"]
            by_title = {c.title: c.status for c in session.scalars(select(contracts.Contract))}
            assert sorted(by_title.values()) == sorted(
                ["sent", "partially_agreed", "completed", "declined", "draft"]
            )
            completed = session.scalars(
                select(contracts.Contract).where(contracts.Contract.status == "completed")
            ).one()
            assert completed.final_path is not None
            final = contracts.contract_file(home, completed.final_path).read_bytes()
    finally:
        engine.dispose()
    # the completed contract carries a valid witness signature
    assert verify_pdf(final, Installation(home, public_url=PUBLIC_URL).verify_policy()).passed

    # the pages list it
    officer = app.test_client()
    _login(officer, demo_data.OFFICER_EMAIL, passwords[demo_data.OFFICER_EMAIL])
    page = officer.get("/contracts").get_data(as_text=True)
    for spec in demo_data.CONTRACTS:
        assert spec.title in page

    signer = app.test_client()
    _login(signer, "sato.hanako@koin.local", passwords["sato.hanako@koin.local"])
    batches = signer.get("/batches").get_data(as_text=True)
    assert demo_data.BATCH_NAME in batches
    history = signer.get("/history").get_data(as_text=True)
    assert "産業廃棄物処理業許可証_環境第08-0042号.pdf" in history

    admin = app.test_client()
    _login(admin, demo_data.ADMIN_EMAIL, passwords[demo_data.ADMIN_EMAIL])
    templates = admin.get("/admin/templates").get_data(as_text=True)
    for template in demo_data.TEMPLATES:
        assert template.title in templates


def _demo_data() -> list[str]:
    """The Japanese of the demo data itself: names, titles, file names."""
    return [
        *(name for _, name, _ in (*demo_data.SIGNERS, demo_data.OFFICER)),
        *(template.title for template in demo_data.TEMPLATES),
        *(file_name for file_name, _, _ in demo_data.PERMITS),
        demo_data.BATCH_NAME, demo_data._PREFECTURE[0],
        *(text for spec in demo_data.CONTRACTS for text in (spec.title, spec.contractor)),
    ]


def test_demo_in_english(home: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOIN_HOME", str(home))
    monkeypatch.setenv("KOIN_DATABASE_URL", db_url)
    monkeypatch.setenv("KOIN_PUBLIC_URL", PUBLIC_URL)
    monkeypatch.setenv("KOIN_LANG", "en")
    first = CliRunner().invoke(cli, ["demo"])
    assert first.exit_code == 0, first.output
    assert_english(first.output, *_demo_data())
    assert "Initial passwords (shown this once only; keep them somewhere safe):" in first.output
    assert len(_PASSWORD.findall(first.output)) == 4
    assert "Created: staff member 田中 太郎 <tanaka.taro@koin.local> (signer)" in first.output
    assert "Created: contract 令和8年度 道路維持補修業務委託契約 (sent, ID " in first.output
    assert "Access code: 令和8年度 道路維持補修業務委託契約 / 小林 誠: " in first.output
    assert f"Log in: {PUBLIC_URL}/login" in first.output
    second = CliRunner().invoke(cli, ["demo"])
    assert second.exit_code == 0, second.output
    assert_english(second.output)
    assert "The demo data is all there already." in second.output
    assert "Already there (unchanged): " in second.output

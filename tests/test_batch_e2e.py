"""Batch signing as a signer does it: Debian's Chromium (Playwright) on a real `koin serve`
whose in-process worker signs; a ZIP of 20 permits uploaded on the sign page, the progress
followed on the batch page without reloading, the ZIP of signed files downloaded through the
page's button and checked with pyHanko, then the history; on SQLite and on PostgreSQL.

Screenshots (phone 390 px and desktop) of each page go to the test's folder, and also to
``$KOIN_SCREENSHOTS`` when that is set."""

from __future__ import annotations

import csv
import io
import os
import shutil
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from playwright.sync_api import Browser, BrowserContext, Page
from pyhanko.pdf_utils.reader import PdfFileReader

from contracts import create_user, make_engine, make_session_factory, session_scope
from contracts.migrate import upgrade
from signer import Installation
from signer.samples import make_permit_pdf
from tests.permits import numbered_copies
from tests.servers import chromium, free_port, koin_process
from tests.validators import pyhanko_status

SIGNER = "hisho@pref.ibaraki.example"
PASSWORD = "correct-horse-battery-staple"
COUNT = 20
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


@dataclass
class Service:
    url: str
    home: Path


@pytest.fixture
def service(koin_home: Path, tmp_path: Path, db_url: str) -> Iterator[Service]:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home, ignore=shutil.ignore_patterns("koin.db*"))
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            create_user(session, SIGNER, ["signer"], password=PASSWORD, display_name="秘書 一郎")
    finally:
        engine.dispose()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"KOIN_DATABASE_URL": db_url, "KOIN_PUBLIC_URL": url, "KOIN_DEV_SMTP_PORT": "0",
           "KOIN_JOBS_INTERVAL": "0"}
    with koin_process(home, "serve", "--port", str(port), port=port, env=env):
        yield Service(url, home)


@pytest.fixture(scope="module")
def permits_zip(installation: Installation, tmp_path_factory: pytest.TempPathFactory) -> Path:
    permit = make_permit_pdf(installation.font_file, number=1)
    path = tmp_path_factory.mktemp("upload") / "令和8年11月分_許可書.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for number, copy in enumerate(numbered_copies(permit, COUNT), start=1):
            archive.writestr(f"許可書_{number:03d}.pdf", copy)
    return path


@pytest.fixture
def browser(permits_zip: Path) -> Iterator[Browser]:
    # The PDFs are made first: Playwright's sync API keeps an event loop on this thread, and
    # pyHanko's sync API calls asyncio.run.
    with chromium() as instance:
        yield instance


class Shots:
    """Screenshots of the same page at phone and desktop width."""

    def __init__(self, browser: Browser, phone: BrowserContext, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(exist_ok=True)
        self.desktop = browser.new_context(
            viewport=DESKTOP, locale="ja-JP", storage_state=phone.storage_state()
        ).new_page()
        keep = os.environ.get("KOIN_SCREENSHOTS")
        self.keep = Path(keep) if keep else None

    def take(self, page: Page, name: str, *, desktop: bool = True) -> None:
        paths = [self.folder / f"{name}-phone.png"]
        page.screenshot(path=str(paths[0]), full_page=True)
        if desktop:
            self.desktop.goto(page.url)
            self.desktop.wait_for_load_state("load")
            paths.append(self.folder / f"{name}-desktop.png")
            self.desktop.screenshot(path=str(paths[1]), full_page=True)
        if self.keep is not None:
            self.keep.mkdir(parents=True, exist_ok=True)
            for path in paths:
                shutil.copy(path, self.keep / path.name)


def _check_signed(data: bytes, root: asn1_x509.Certificate) -> bool:
    signatures = PdfFileReader(io.BytesIO(data)).embedded_signatures
    return len(signatures) == 1 and bool(pyhanko_status(data, root).bottom_line)


def test_signer_uploads_a_zip_watches_it_and_downloads_the_signed_files(
    service: Service,
    browser: Browser,
    permits_zip: Path,
    tmp_path: Path,
    root_cert: asn1_x509.Certificate,
) -> None:
    context = browser.new_context(viewport=PHONE, locale="ja-JP", accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []  # script errors, and failed requests other than the favicon
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("response", lambda response: errors.append(f"{response.status} {response.url}")
            if response.status >= 400 and not response.url.endswith("/favicon.ico") else None)

    # Log in on the way to the sign page.
    page.goto(f"{service.url}/sign")
    page.fill("input[name=email]", SIGNER)
    page.fill("input[name=password]", PASSWORD)
    with page.expect_navigation():
        page.click("#login-button")
    assert page.url.endswith("/sign")
    assert page.locator("#nav-sign").is_visible() and page.locator("#nav-history").is_visible()
    shots = Shots(browser, context, tmp_path / "screenshots")
    shots.take(page, "sign")

    # The ZIP of 20 permits: chosen, listed, uploaded; the browser lands on the batch page.
    page.set_input_files("#file", str(permits_zip))
    assert page.locator("#chosen li").count() == 1
    page.fill("#batch-name", "令和8年11月分 建設業許可通知書")
    with page.expect_navigation():
        page.click("#sign-button")
    assert "/batches/" in page.url
    assert "20 件の PDF の一括署名を始めました" in page.locator("#message").inner_text()
    page.evaluate("window.koinNotReloaded = true")  # gone if the page were reloaded
    shots.take(page, "batch-running")

    # The page's script follows the progress to 20 / 20 without reloading.
    page.wait_for_function(  # a function, not an expression: the CSP forbids eval
        "() => document.getElementById('processed').textContent === '20'"
        " && document.getElementById('batch-status').dataset.status === 'finished'",
        timeout=180_000,
    )
    assert page.evaluate("window.koinNotReloaded") is True
    assert page.locator("#count-done").inner_text() == str(COUNT)
    assert page.locator("#count-failed").inner_text() == "0"
    assert page.locator("#batch-status").inner_text() == "完了"
    assert page.locator("#live-note").is_hidden() and page.locator("#cancel").is_hidden()
    assert page.locator("#progress-bar").evaluate("bar => bar.value") == COUNT
    rows = page.locator("#documents tbody tr[data-state=done]")
    assert rows.count() == COUNT
    assert rows.first.locator("a.docid").inner_text().count("-") == 3
    shots.take(page, "batch-finished")

    # 「すべてダウンロード (ZIP)」: 20 signed PDFs, one signature each, and the manifest.
    with page.expect_download() as info:
        page.click("#download-zip")
    download = tmp_path / "signed.zip"
    info.value.save_as(download)
    with zipfile.ZipFile(download) as archive:
        names = archive.namelist()
        assert names[0] == "manifest.csv"
        assert sorted(names[1:]) == [f"許可書_{n:03d}.pdf" for n in range(1, COUNT + 1)]
        manifest = list(csv.DictReader(io.StringIO(
            archive.read("manifest.csv").decode("utf-8-sig")
        )))
        signed = [archive.read(name) for name in names[1:]]
    assert len(manifest) == COUNT and {row["status"] for row in manifest} == {"signed"}
    with ThreadPoolExecutor(2) as pool:  # pyHanko's sync API may not run on Playwright's loop
        valid = list(pool.map(lambda data: _check_signed(data, root_cert), signed))
    assert valid == [True] * COUNT
    document_ids = {row["document_id"] for row in manifest}
    assert len(document_ids) == COUNT

    # The history lists them, with their document IDs and the channel in words.
    with page.expect_navigation():
        page.click("#nav-history")
    history = page.locator("#history tbody tr")
    assert history.count() == COUNT
    shown = {row.get_attribute("data-document-id") for row in history.all()}
    assert shown == document_ids
    assert page.locator("#result-count").inner_text() == "20 件中 1〜20 件"
    assert page.locator("#history .channel").first.inner_text() == "一括署名"
    page.locator("button.copy").first.wait_for(state="visible")
    shots.take(page, "history")

    # The list of batches shows it finished.
    page.goto(f"{service.url}/batches")
    assert "署名済み 20 / 20" in page.locator("#batches").inner_text()
    shots.take(page, "batches")
    assert errors == []

"""A person's view: Debian's Chromium (headless, via Playwright) on a real `koin serve`."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, Page, sync_playwright

from keys import Role
from signer import Installation, SignOptions
from tests.servers import free_port, koin_process

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(koin_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("served") / "home"
    shutil.copytree(koin_home, home)
    port = free_port()
    with koin_process(home, "serve", "--port", str(port), port=port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def browser(pdfs: dict[str, Path]) -> Iterator[Browser]:
    # Playwright's sync API runs an event loop on this thread, and pyHanko's sync API calls
    # asyncio.run: so the PDFs (``pdfs``) are made before the browser starts.
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed; run `bash .ci/setup`")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield instance
        instance.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 390, "height": 844}, locale="ja-JP")
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture(scope="module")
def pdfs(
    installation: Installation, permit_pdf: bytes, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    from signer import sign_pdf

    folder = tmp_path_factory.mktemp("pdfs")
    signed = sign_pdf(permit_pdf, installation.signing_context(Role.POSITION), SignOptions()).data
    assert signed is not None
    position = signed.index(b"stream", 200) + 20
    tampered = signed[:position] + bytes([signed[position] ^ 1]) + signed[position + 1 :]
    paths = {"valid": folder / "許可書.pdf", "tampered": folder / "tampered.pdf"}
    paths["valid"].write_bytes(signed)
    paths["tampered"].write_bytes(tampered)
    return paths


@pytest.mark.parametrize(
    ("which", "indication", "text"),
    [
        ("valid", "PASSED", "署名済みであり、すべての署名が有効です。"),
        ("tampered", "FAILED", "無効な署名があるか、署名後に文書が改ざんされています。"),
    ],
)
def test_upload_on_verify_page_shows_verdict_like_the_api(
    server: str,
    page: Page,
    pdfs: dict[str, Path],
    which: str,
    indication: str,
    text: str,
    tmp_path: Path,
) -> None:
    page.goto(f"{server}/verify")
    assert page.locator("h1").inner_text() == "署名の検証"
    page.set_input_files("#file", str(pdfs[which]))
    page.click("#verify-button")
    verdict = page.locator("#verdict")
    verdict.wait_for()
    assert verdict.get_attribute("data-indication") == indication
    assert text in verdict.inner_text()
    page.screenshot(path=str(tmp_path / f"verify-{which}.png"), full_page=True)

    api = requests.post(
        f"{server}/api/v1/verify", data=pdfs[which].read_bytes(),
        headers={"Content-Type": "application/pdf"}, timeout=30,
    ).json()
    assert api["indication"] == indication
    shown = page.locator("article.signature").first.get_attribute("data-indication")
    assert shown == api["signatures"][0]["indication"]


def test_language_switch(server: str, page: Page) -> None:
    page.goto(f"{server}/verify")
    page.click("text=English")
    assert page.locator("h1").inner_text() == "Verify signatures"
    page.goto(f"{server}/verify")  # remembered in a cookie
    assert page.locator("html").get_attribute("lang") == "en"

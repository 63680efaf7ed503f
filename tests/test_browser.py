"""A person's view: Debian's Chromium (headless, via Playwright) on a real `koin serve`."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, Page

from keys import Role
from signer import Installation, SignOptions
from tests.servers import chromium, free_port, koin_process, served_with_staff


@pytest.fixture(scope="module")
def server(koin_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("served") / "home"
    shutil.copytree(koin_home, home)
    port = free_port()
    with koin_process(home, "serve", "--port", str(port), port=port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def browser(pdfs: dict[str, Path]) -> Iterator[Browser]:
    # the PDFs (``pdfs``) are made before the browser starts (see tests.servers.chromium)
    with chromium() as instance:
        yield instance


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
    paths = {"valid": folder / "許可書.pdf", "tampered": folder / "tampered.pdf",
             "unsigned": folder / "契約書.pdf"}
    paths["valid"].write_bytes(signed)
    paths["tampered"].write_bytes(tampered)
    paths["unsigned"].write_bytes(permit_pdf)
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


# -- layout: what a person sees on a phone and on a desktop --------------------------------------

ADMIN = "admin@pref.ibaraki.example"
OFFICER = "officer@pref.ibaraki.example"
STAFF_PASSWORD = "correct horse battery staple"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}

#: Characters per line of an element's text, from where each character is drawn.
LINE_LENGTHS = """(element) => {
  const text = element.firstChild, range = document.createRange(), lines = [];
  for (let i = 0; i < text.length; i++) {
    range.setStart(text, i); range.setEnd(text, i + 1);
    const top = Math.round(range.getBoundingClientRect().top);
    if (!lines.length || lines[lines.length - 1][0] !== top) lines.push([top, 0]);
    lines[lines.length - 1][1] += 1;
  }
  return lines.map((line) => line[1]);
}"""
#: How far the page can be scrolled sideways (0: nothing sticks out of the viewport).
SIDEWAYS = "() => document.documentElement.scrollWidth - window.innerWidth"


@pytest.fixture(scope="module")
def staffed_server(koin_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A served KOIN_HOME with an administrator and a contract officer."""
    staff = [(ADMIN, "admin", "管理 者"), (OFFICER, "officer", "契約 担当")]
    with served_with_staff(koin_home, tmp_path_factory.mktemp("staffed"), STAFF_PASSWORD,
                           staff) as url:
        yield url


def _log_in(browser: Browser, server: str, email: str, viewport: dict[str, int]) -> Page:
    page = browser.new_context(viewport=viewport, locale="ja-JP").new_page()
    page.goto(f"{server}/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", STAFF_PASSWORD)
    with page.expect_navigation():
        page.click("#login-button")
    return page


def test_pages_fit_a_phone_and_the_english_admin_header_one_line(
    staffed_server: str, browser: Browser, pdfs: dict[str, Path]
) -> None:
    """A contract's SHA-256 is two lines of 32 digits on a phone (it was 58 + 6, and 63 + 1 on a
    desktop); the staff table does not widen a phone's page (it was 461 px wide); in English an
    administrator's header is one line at 1280 px (its links took a second line); the audit
    search for one contract does not repeat the contract's title on every row."""
    officer = _log_in(browser, staffed_server, OFFICER, PHONE)
    officer.goto(f"{staffed_server}/contracts/new")
    officer.fill("input[name=title]", "令和8年度 県庁舎電気設備保守点検業務委託契約")
    officer.set_input_files("input[name=file]", str(pdfs["unsigned"]))
    for index, (name, email) in enumerate([("茨城 花子", "hanako@pref.ibaraki.example"),
                                           ("常陸 太郎", "taro@example.jp")]):
        officer.fill(f"input[name=party-{index}-name]", name)
        officer.fill(f"input[name=party-{index}-email]", email)
    officer.select_option("select[name=party-0-role]", "prefecture")
    officer.select_option("select[name=party-1-role]", "contractor")
    with officer.expect_navigation():
        officer.click("#create-button")
    digest = officer.locator("#original-sha256")
    assert len(digest.inner_text()) == 64
    assert digest.evaluate(LINE_LENGTHS) == [32, 32]
    assert officer.evaluate(SIDEWAYS) == 0
    public_id = officer.url.rstrip("/").rsplit("/", 1)[-1]
    officer.set_viewport_size(DESKTOP)
    assert digest.evaluate(LINE_LENGTHS) in ([64], [32, 32])

    admin = _log_in(browser, staffed_server, ADMIN, PHONE)
    admin.goto(f"{staffed_server}/admin/users")
    assert admin.locator("#users tr[data-email]").count() == 2
    assert admin.evaluate(SIDEWAYS) == 0

    admin.set_viewport_size(DESKTOP)
    admin.goto(f"{staffed_server}/admin/audit?contract={public_id}&lang=en")
    assert admin.locator("html").get_attribute("lang") == "en"
    brand = admin.locator("header.site .brand").bounding_box()
    nav = admin.locator("header.site nav").bounding_box()
    assert brand and nav
    assert nav["height"] < 1.5 * brand["height"]  # one line of links
    assert abs((nav["y"] + nav["height"] / 2) - (brand["y"] + brand["height"] / 2)) < 4  # beside
    assert admin.locator("#contract-check h2").inner_text().startswith("令和8年度")
    rows = admin.locator("#events tbody tr")
    assert rows.count() >= 1 and admin.locator("#events td.title").count() == 0
    assert rows.first.locator("td.seq").inner_text().startswith("#")

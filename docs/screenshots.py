"""Make the documentation's screenshots from a fresh demo instance, so that they stay current.

    .venv/bin/python docs/screenshots.py            # writes docs/{ja,en}/img/*.png
    .venv/bin/python docs/screenshots.py --keep     # and keeps the demo instance (path printed)

Starts ``koin init`` + ``koin demo`` + ``koin serve`` on a free port in a temporary KOIN_HOME
(SQLite, embedded TSA, development mailbox), logs in as each role with the passwords those
commands print, and captures each page with Debian's Chromium through Playwright: first in
Japanese, then in English after clicking the header's language switch. The party's pages are
taken on a phone-sized viewport. The images are reduced to a 256-colour palette (small files,
sharp text) and listed in ``docs/screenshots.json`` with how each was made; the suite checks
that every image the docs show is listed there (tests/test_docs.py).

Needs /usr/bin/chromium (``bash .ci/setup``); takes about two minutes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
CHROMIUM = "/usr/bin/chromium"
LANGUAGES = ("ja", "en")
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
MAX_HEIGHT = 2200  # px of a full-page capture; longer pages are cut

_PASSWORD = re.compile(r"^  (\S+@\S+)  (\S+)$", re.MULTILINE)
_ADMIN_PASSWORD = re.compile(r"初期パスワード[^:]*: (\S+)")
_CODE = re.compile(r"^アクセスコード: (.+) / (.+): (\w+)$", re.MULTILINE)
_CONTRACT = re.compile(r"^作成: 契約 (.+)\((.+)、ID ([\w-]+)\)$", re.MULTILINE)
_BATCH = re.compile(r"^作成: 一括署名 .+ID ([\w-]+)\)$", re.MULTILINE)
_DOCUMENT = re.compile(r"文書番号 ([0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4})")
_LINK = re.compile(r"https?://\S+/c/[A-Za-z0-9_-]{43}")

SIGNER = "sato.hanako@koin.local"
OFFICER = "suzuki.ichiro@koin.local"
ADMIN = "admin@koin.local"
WAITING = "令和8年度 道路維持補修業務委託契約"  # sent; the contractor 小林 誠 has not answered
PARTLY = "令和8年度 水戸土木事務所管内 橋梁点検業務委託契約"  # the contractor 高橋 美咲 is last
COMPLETED = "令和8年度 県庁舎電気設備保守点検業務委託契約"
CONTRACTOR_EMAIL = "kobayashi.makoto@hitachi-doro.example.jp"
LAST_EMAIL = "takahashi@nakagawa-c.example.jp"
#: The webhook endpoint an administrator registers, per language: URL, description, events.
NEW_ENDPOINTS = {
    "ja": ("https://bunsho.pref.ibaraki.example/koin/webhook", "文書管理システム",
           ("contract.completed", "contract.declined", "contract.expired")),
    "en": ("https://rpa.pref.ibaraki.example/koin/batches", "RPA", ("batch.finished",)),
}
#: The account an administrator creates on /admin/users, per language (one each: an address is
#: taken once).
NEW_USERS = {"ja": ("watanabe.kenji@koin.local", "渡辺 健二"),
             "en": ("ito.yuki@koin.local", "伊藤 由紀")}


@dataclass
class Demo:
    """The running demo instance and what its setup printed."""

    url: str
    home: Path
    passwords: dict[str, str]
    codes: dict[tuple[str, str], str]
    contracts: dict[str, str]  # title → public ID
    batch: str
    document_id: str
    permit: Path
    signed_pdf: Path


@dataclass
class Manifest:
    entries: list[dict[str, Any]] = field(default_factory=list)

    def add(self, file: str, **how: Any) -> None:
        self.entries.append({"file": file, **how})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _koin(env: dict[str, str], *args: str) -> str:
    koin = Path(sys.executable).parent / "koin"
    done = subprocess.run([str(koin), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"koin {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


@contextmanager
def demo_instance(keep: bool) -> Iterator[Demo]:
    """``koin init``, ``koin demo`` and ``koin serve`` in a temporary KOIN_HOME."""
    from signer import Installation
    from signer.samples import make_permit_pdf

    folder = Path(tempfile.mkdtemp(prefix="koin-docs-"))
    home = folder / "home"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("KOIN_")}
    env.update({"KOIN_HOME": str(home), "KOIN_PUBLIC_URL": url, "KOIN_MAIL_INTERVAL": "1"})
    init = _koin(env, "init")
    demo = _koin(env, "demo")
    passwords = dict(_PASSWORD.findall(demo))
    found = _ADMIN_PASSWORD.search(init)
    if found:
        passwords[ADMIN] = found.group(1)
    codes = {(title, party): code for title, party, code in _CODE.findall(demo)}
    contracts = {title: public_id for title, _, public_id in _CONTRACT.findall(demo)}
    batch = _BATCH.search(demo)
    document = _DOCUMENT.search(demo)
    if batch is None or document is None or not contracts:
        raise SystemExit(f"koin demo did not print what was expected:\n{demo}")
    # Drawn before the browser starts (pyHanko and Playwright's sync API each want the loop).
    permit = folder / "建設業許可通知書_土木第00122号.pdf"
    permit.write_bytes(make_permit_pdf(Installation(home).font_file, number=122))
    signed_pdf = sorted((home / "batches" / batch.group(1) / "out").glob("*.pdf"))[0]
    log = (folder / "serve.log").open("wb")
    koin = Path(sys.executable).parent / "koin"
    server = subprocess.Popen([str(koin), "serve", "--port", str(port)], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise SystemExit(f"koin serve exited; see {folder / 'serve.log'}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("koin serve did not start") from None
                time.sleep(0.2)
        yield Demo(url, home, passwords, codes, contracts, batch.group(1), document.group(1),
                   permit, signed_pdf)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        if keep:
            print(f"demo instance kept in {folder} (KOIN_HOME={home})")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def _optimise(png: bytes) -> bytes:
    """A 256-colour palette PNG, at most :data:`MAX_HEIGHT` px high."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    if image.height > MAX_HEIGHT:
        image = image.crop((0, 0, image.width, MAX_HEIGHT))
    small = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=True)
    return out.getvalue()


class Shooter:
    def __init__(self, browser: Any, demo: Demo, out: Path, manifest: Manifest) -> None:
        self.browser = browser
        self.demo = demo
        self.out = out
        self.manifest = manifest

    def context(self, phone: bool = False) -> Any:
        if phone:
            return self.browser.new_context(viewport=PHONE, device_scale_factor=2,
                                            locale="ja-JP", is_mobile=True, has_touch=True)
        return self.browser.new_context(viewport=DESKTOP, locale="ja-JP")

    def login(self, page: Any, email: str) -> None:
        page.goto(f"{self.demo.url}/login")
        page.fill("input[name=email]", email)
        page.fill("input[name=password]", self.demo.passwords[email])
        with page.expect_navigation():
            page.click("#login-button")

    def shot(self, page: Any, language: str, name: str, *, role: str, steps: str,
             full_page: bool = True, selector: str | None = None) -> None:
        path = self.out / language / "img" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        page.wait_for_load_state("networkidle")
        if selector:
            data = page.locator(selector).screenshot()
        else:
            data = page.screenshot(full_page=full_page)
        path.write_bytes(_optimise(data))
        viewport = page.viewport_size
        self.manifest.add(
            f"{language}/img/{name}.png", language=language, url=_path(page.url), role=role,
            viewport=f"{viewport['width']}x{viewport['height']}", steps=steps,
        )
        print(f"  {path}")

    def both(self, page: Any, take: Callable[[str], None]) -> None:
        """``take`` in Japanese, then again after the header's language switch."""
        take("ja")
        _switch(page)
        take("en")
        page.goto(f"{self.demo.url}/?lang=ja")


_PLACEHOLDERS = (
    (re.compile(r"/c/[A-Za-z0-9_-]{43}"), "/c/<link>"),
    (re.compile(r"/(batches|contracts)/(?!new\b)[A-Za-z0-9_-]{16,32}"), r"/\1/<id>"),
    (re.compile(r"/(sign|verify)/[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}"),
     r"/\1/<document-id>"),
    (re.compile(r"/dev/mailbox/[\w.-]+"), "/dev/mailbox/<message>"),
    (re.compile(r"([?&]contract=)[A-Za-z0-9_-]{16,32}"), r"\1<id>"),
)


def _path(url: str) -> str:
    """The page's path with random IDs as placeholders (the manifest stays the same)."""
    path = re.sub(r"^https?://[^/]+", "", url)
    for pattern, placeholder in _PLACEHOLDERS:
        path = pattern.sub(placeholder, path)
    return path


def capture(shooter: Shooter) -> None:
    demo = shooter.demo
    url = demo.url

    # -- anyone: login and the verify pages
    context = shooter.context()
    page = context.new_page()
    page.goto(f"{url}/login")

    def public(language: str) -> None:
        page.goto(f"{url}/login")
        shooter.shot(page, language, "login", role="-", steps="open /login", full_page=False)
        page.goto(f"{url}/verify")
        page.set_input_files("#file", str(demo.signed_pdf))
        page.click("#verify-button")
        page.locator("#verdict").wait_for()
        shooter.shot(page, language, "verify-result", role="-",
                     steps="open /verify, drop a permit signed by the demo batch, 検証する")
        page.goto(f"{url}/verify/{demo.document_id}")
        shooter.shot(page, language, "verify-document", role="-",
                     steps="open /verify/<document ID> (the QR code's link) of a demo permit")
        page.goto(f"{url}/verify")

    shooter.both(page, public)
    context.close()

    # -- a signer: signing page, signed result, batches, history, own API keys
    context = shooter.context()
    page = context.new_page()
    shooter.login(page, SIGNER)

    def signer(language: str) -> None:
        page.goto(f"{url}/sign")
        page.select_option("#template", "kensetsu-kyoka")
        page.set_input_files("#file", str(demo.permit))
        shooter.shot(page, language, "sign", role="signer 佐藤 花子",
                     steps="/sign, template 建設業許可通知書, one permit chosen")
        with page.expect_navigation():
            page.click("#sign-button")
        page.locator("#signed").wait_for()
        shooter.shot(page, language, "signed", role="signer 佐藤 花子",
                     steps="/sign → 署名する: the signed permit, ready to download")
        page.goto(f"{url}/batches")
        shooter.shot(page, language, "batches", role="signer 佐藤 花子", steps="open /batches")
        page.goto(f"{url}/batches/{demo.batch}")
        shooter.shot(page, language, "batch", role="signer 佐藤 花子",
                     steps="open the demo batch (19 signed, one broken file failed)")
        page.goto(f"{url}/history")
        shooter.shot(page, language, "history", role="signer 佐藤 花子", steps="open /history")
        page.goto(f"{url}/account/apikeys")
        shooter.shot(page, language, "apikeys", role="signer 佐藤 花子",
                     steps="open /account/apikeys")
        page.goto(f"{url}/account/password")
        shooter.shot(page, language, "password", role="signer 佐藤 花子",
                     steps="click one's name in the header: /account/password", full_page=False)
        page.goto(f"{url}/sign")

    shooter.both(page, signer)
    context.close()

    # -- an officer: contract list, new contract, a contract in progress and a completed one
    context = shooter.context()
    page = context.new_page()
    shooter.login(page, OFFICER)

    def officer(language: str) -> None:
        page.goto(f"{url}/contracts")
        shooter.shot(page, language, "contracts", role="officer 鈴木 一郎",
                     steps="open /contracts")
        page.goto(f"{url}/contracts/new")
        shooter.shot(page, language, "contract-new", role="officer 鈴木 一郎",
                     steps="open /contracts/new")
        page.goto(f"{url}/contracts/{demo.contracts[WAITING]}")
        shooter.shot(page, language, "contract-sent", role="officer 鈴木 一郎",
                     steps=f"open the sent contract {WAITING}")
        page.goto(f"{url}/contracts/{demo.contracts[COMPLETED]}")
        shooter.shot(page, language, "contract-completed", role="officer 鈴木 一郎",
                     steps=f"open the completed contract {COMPLETED}")
        page.goto(f"{url}/contracts")

    shooter.both(page, officer)
    context.close()

    # -- an administrator: templates, API keys of everyone, webhooks
    context = shooter.context()
    page = context.new_page()
    shooter.login(page, ADMIN)

    def admin(language: str) -> None:
        page.goto(f"{url}/admin/templates")
        shooter.shot(page, language, "templates", role="admin", steps="open /admin/templates")
        page.goto(f"{url}/admin/templates/sanpai-kyoka/edit")
        page.click("#preview-button")
        page.locator("#preview-image").wait_for()
        shooter.shot(page, language, "template-edit", role="admin",
                     steps="/admin/templates/sanpai-kyoka/edit → プレビュー (built-in sample)")
        page.goto(f"{url}/admin/apikeys")
        shooter.shot(page, language, "admin-apikeys", role="admin", steps="open /admin/apikeys")
        endpoint, description, events = NEW_ENDPOINTS[language]
        page.goto(f"{url}/admin/webhooks/new")
        page.fill("#endpoint-form input[name=url]", endpoint)
        page.fill("#endpoint-form input[name=description]", description)
        for box in page.locator("#endpoint-form input[name=events]").all():
            box.set_checked(box.get_attribute("value") in events)
        with page.expect_navigation():
            page.click("#create-endpoint")
        page.locator("#new-secret").wait_for()
        shooter.shot(page, language, "webhooks", role="admin",
                     steps=f"/admin/webhooks/new → register {endpoint}: the list and the "
                           "endpoint's secret, shown once")
        page.goto(f"{url}/admin")
        shooter.shot(page, language, "admin", role="admin", steps="open /admin",
                     full_page=False)
        email, name = NEW_USERS[language]
        page.goto(f"{url}/admin/users")
        page.fill("#new-email", email)
        page.fill("#new-name", name)
        page.check("#create-form input[name=role][value=signer]")
        with page.expect_navigation():
            page.click("#create-user")
        page.locator("#new-password").wait_for()
        shooter.shot(page, language, "admin-users", role="admin",
                     steps=f"/admin/users → create {email} (署名担当): the list and the "
                           "initial password, shown once")
        page.goto(f"{url}/admin/audit?contract={demo.contracts[COMPLETED]}")
        page.locator("#chain-check").wait_for()
        shooter.shot(page, language, "admin-audit", role="admin",
                     steps=f"/admin/audit, 契約 = the contract ID of {COMPLETED}: its events "
                           "and the chain check")
        page.goto(f"{url}/admin/status")
        shooter.shot(page, language, "admin-status", role="admin",
                     steps="open /admin/status (embedded TSA, demo key store)")
        page.goto(f"{url}/admin/templates")

    shooter.both(page, admin)
    context.close()

    # -- the contractor, on a phone: the invitation mail, the code, the review, the answer
    context = shooter.context(phone=True)
    page = context.new_page()
    links = {email: _invitation(page, url, email) for email in (CONTRACTOR_EMAIL, LAST_EMAIL)}
    context.close()
    for language in LANGUAGES:
        # a browser of its own per language: the link asks for the code once per browser
        context = shooter.context(phone=True)
        page = context.new_page()
        page.goto(f"{url}/dev/mailbox")
        if language == "en":
            _switch(page)
        page.click(f"tr:has(td.to:text-is('{CONTRACTOR_EMAIL}')) a")
        shooter.shot(page, language, "party-mail", role="contractor 小林 誠 (phone)",
                     steps="the invitation mail in the development mailbox /dev/mailbox",
                     full_page=False)
        page.goto(links[CONTRACTOR_EMAIL])  # in English too: the switch set a cookie
        shooter.shot(page, language, "party-code", role="contractor 小林 誠 (phone)",
                     steps="open the link of the invitation mail", full_page=False)
        page.fill("#code", demo.codes[(WAITING, "小林 誠")])
        page.click("#code-button")
        page.locator("#agree").wait_for()
        shooter.shot(page, language, "party-review", role="contractor 小林 誠 (phone)",
                     steps="enter the access code → the contract, page by page",
                     full_page=False)
        shooter.shot(page, language, "party-answer", role="contractor 小林 誠 (phone)",
                     steps="the end of the same page: consent, or decline with a reason",
                     selector="#answer")
        context.close()

    # the last party consents: the service signs and the page offers the signed contract
    context = shooter.context(phone=True)
    page = context.new_page()
    page.goto(links[LAST_EMAIL])
    page.fill("#code", demo.codes[(PARTLY, "高橋 美咲")])
    page.click("#code-button")
    page.check("#agree")
    with page.expect_navigation():
        page.click("#consent-button")
    page.locator("#result").first.wait_for()
    for language in LANGUAGES:
        if language == "en":
            _switch(page)
        shooter.shot(page, language, "party-done", role="contractor 高橋 美咲 (phone)",
                     steps=f"the last party of {PARTLY} consents (合意する)")
    context.close()


def _switch(page: Any) -> None:
    """Click the header's language switch to English."""
    with page.expect_navigation():
        page.click("header.site a[lang=en]")
    page.wait_for_load_state("networkidle")


def _invitation(page: Any, url: str, email: str) -> str:
    """The link of the newest invitation to ``email`` in the development mailbox."""
    deadline = time.monotonic() + 90
    while True:
        page.goto(f"{url}/dev/mailbox")
        row = page.locator(f"tr:has(td.to:text-is('{email}')) a")
        if row.count():
            row.first.click()
            found = _LINK.search(page.locator("#body").inner_text())
            if found:
                return found.group(0)
        if time.monotonic() > deadline:
            raise SystemExit(f"no invitation to {email} arrived in the development mailbox")
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the demo instance")
    parser.add_argument("--out", type=Path, default=DOCS, help="docs folder (default: docs/)")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing: run `bash .ci/setup`", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(ROOT))
    manifest = Manifest()
    with demo_instance(args.keep) as demo, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            capture(Shooter(browser, demo, args.out, manifest))
        finally:
            browser.close()
    body = {
        "generated_by": "docs/screenshots.py",
        "how": "koin init + koin demo + koin serve in a temporary KOIN_HOME; Chromium via "
               "Playwright; English after clicking the header's language switch; 256-colour "
               "PNG",
        "screenshots": sorted(manifest.entries, key=lambda entry: entry["file"]),
    }
    (args.out / "screenshots.json").write_text(
        json.dumps(body, ensure_ascii=False, indent=2) + "\n", "utf-8"
    )
    print(f"{len(manifest.entries)} screenshots; manifest {args.out / 'screenshots.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Witness-type contract end to end, as people do it: an officer in a browser, two parties
reading real mail from an SMTP server, a real `koin serve`; on SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
import requests
from asn1crypto import x509 as asn1_x509
from playwright.sync_api import Browser, Page

from tests.servers import CollectedMail, chromium, free_port, koin_process, smtp_collector
from tests.validators import openssl, pdfsig, pdfsig_signatures, pyhanko_status

OFFICER = "officer@pref.ibaraki.example"
OFFICER_PASSWORD = "correct-horse-battery-staple"
GOVERNOR_OFFICE = ("茨城 花子", "茨城県 土木部", "hanako@pref.ibaraki.example")
CONTRACTOR = ("常陸 太郎", "株式会社 水戸建設", "taro@mito-kensetsu.example")
LINK = re.compile(r"http://127\.0\.0\.1:\d+/[cd]/[A-Za-z0-9_-]+")


@dataclass
class Service:
    url: str
    home: Path
    mail: CollectedMail


def _koin(home: Path, env: dict[str, str], *args: str) -> None:
    koin = Path(sys.executable).parent / "koin"
    result = subprocess.run(
        [str(koin), *args], capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "KOIN_HOME": str(home), **env},
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def service(
    koin_home: Path, tmp_path: Path, db_url: str, permit_pdf: bytes
) -> Iterator[Service]:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home, ignore=shutil.ignore_patterns("koin.db*"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"KOIN_DATABASE_URL": db_url, "KOIN_PUBLIC_URL": url}
    password_file = tmp_path / "password"
    password_file.write_text(OFFICER_PASSWORD)
    _koin(home, env, "db", "upgrade")
    _koin(home, env, "users", "create", OFFICER, "--role", "officer", "--name", "契約 担当",
          "--password-file", str(password_file))
    with smtp_collector() as (smtp_url, mail), koin_process(
        home, "serve", "--port", str(port), port=port,
        env={**env, "KOIN_SMTP_URL": smtp_url, "KOIN_JOBS_INTERVAL": "2"},
    ):
        yield Service(url, home, mail)


@pytest.fixture
def browser(permit_pdf: bytes) -> Iterator[Browser]:
    # The fixtures that sign or build PDFs run first: Playwright's sync API keeps an event loop
    # on this thread, and pyHanko's sync API calls asyncio.run.
    with chromium() as instance:
        yield instance


def _phone(browser: Browser) -> Page:
    return browser.new_context(viewport={"width": 390, "height": 844}, locale="ja-JP").new_page()


def _link_in(message: EmailMessage) -> str:
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    match = LINK.search(body.get_content())
    assert match, body.get_content()
    return match.group(0)


def _to(address: str, subject_part: str) -> object:
    return lambda m: address in str(m["To"]) and subject_part in str(m["Subject"])


def test_officer_sends_two_parties_consent_service_signs(
    service: Service,
    browser: Browser,
    permit_pdf: bytes,
    tmp_path: Path,
    nss_db: Path,
    root_cert: asn1_x509.Certificate,
    root_pem: Path,
    chain_pem: Path,
) -> None:
    contract_pdf = tmp_path / "工事請負契約書.pdf"
    contract_pdf.write_bytes(permit_pdf)

    # The officer logs in, creates the contract with two parties and sends it.
    officer = _phone(browser)
    officer.goto(f"{service.url}/contracts/new")
    officer.fill("input[name=email]", OFFICER)
    officer.fill("input[name=password]", OFFICER_PASSWORD)
    officer.click("#login-button")
    officer.wait_for_url("**/contracts/new")
    officer.fill("input[name=title]", "県道改良工事 請負契約")
    officer.set_input_files("input[name=file]", str(contract_pdf))
    for index, (name, organisation, email), role, method in (
        (0, GOVERNOR_OFFICE, "prefecture", "access_code"),
        (1, CONTRACTOR, "contractor", "email_otp"),
    ):
        officer.fill(f"input[name=party-{index}-name]", name)
        officer.fill(f"input[name=party-{index}-organisation]", organisation)
        officer.fill(f"input[name=party-{index}-email]", email)
        officer.select_option(f"select[name=party-{index}-role]", role)
        officer.select_option(f"select[name=party-{index}-identification]", method)
    with officer.expect_navigation():
        officer.click("#create-button")
    access_code = officer.locator("#access-codes code.access-code").first.inner_text()
    detail_url = officer.url
    officer.screenshot(path=str(tmp_path / "officer-detail.png"), full_page=True)
    with officer.expect_navigation():
        officer.click("#send-button")

    # Each party gets its own invitation mail with its own link.
    invitations = {
        email: service.mail.wait_for(_to(email, "同意のお願い"))[0]  # type: ignore[arg-type]
        for _, _, email in (GOVERNOR_OFFICE, CONTRACTOR)
    }
    links = {email: _link_in(message) for email, message in invitations.items()}
    assert len(set(links.values())) == 2

    # The prefecture's signer: access code passed on by phone, then consent.
    first = _phone(browser)
    first.goto(links[GOVERNOR_OFFICE[2]])
    first.fill("#code", access_code)
    first.click("#code-button")
    first.wait_for_selector("#agree")  # the review page, after the code step's redirect
    assert "内容を確認し、合意します" in first.content()
    assert first.locator("img").count() >= 2  # the PDF, page by page
    first.check("#agree")
    first.click("#consent-button")
    first.wait_for_selector("text=合意を受け付けました")

    # The contractor: a one-time code arrives by mail when the link is opened.
    second = _phone(browser)
    second.goto(links[CONTRACTOR[2]])
    otp_mail = service.mail.wait_for(_to(CONTRACTOR[2], "確認コード"))[0]  # type: ignore[arg-type]
    otp_body = otp_mail.get_body(preferencelist=("plain",))
    assert otp_body is not None
    otp = re.search(r"\b(\d{6})\b", otp_body.get_content())
    assert otp
    second.fill("#code", otp.group(1))
    second.click("#code-button")
    second.wait_for_selector("#agree")
    second.screenshot(path=str(tmp_path / "party-review.png"), full_page=True)
    second.check("#agree")
    with second.expect_navigation():
        second.click("#consent-button")

    # Both are mailed a download link (not an attachment) to the signed contract.
    done = service.mail.wait_for(lambda m: "締結されました" in str(m["Subject"]), count=2)
    assert all(not list(m.iter_attachments()) for m in done)
    download = _link_in(service.mail.wait_for(_to(CONTRACTOR[2], "締結されました"))[0])  # type: ignore[arg-type]
    final = requests.get(download, timeout=30)
    assert final.status_code == 200 and final.headers["Content-Type"] == "application/pdf"
    final_pdf = tmp_path / "final.pdf"
    final_pdf.write_bytes(final.content)

    # Independent validators: pdfsig (NSS), pyHanko, openssl ts over the audit chain head.
    assert final.content.startswith(permit_pdf), "the original is kept byte for byte"
    [block] = pdfsig_signatures(pdfsig(final_pdf, nss_db))
    assert "Signature is Valid." in block and "Certificate is Trusted." in block
    assert "Signer Certificate Common Name: koin Witness Signing Service" in block
    with ThreadPoolExecutor(1) as pool:  # pyHanko's sync API may not run on Playwright's loop
        status = pool.submit(pyhanko_status, final.content, root_cert).result()
    assert status.bottom_line and status.timestamp_validity is not None
    assert status.signing_cert.subject.native["common_name"] == "koin Witness Signing Service"
    text = subprocess.run(
        ["pdftotext", "-layout", str(final_pdf), "-"], capture_output=True, text=True, check=True
    ).stdout
    certificate_page = text.split("\f")[-2] if text.endswith("\f") else text.split("\f")[-1]
    for name, organisation, email in (GOVERNOR_OFFICE, CONTRACTOR):
        assert name in certificate_page and organisation in certificate_page
        assert email in certificate_page

    audit = officer.request.get(detail_url.rstrip("/") + "/audit.json").json()
    head = audit["chain_head"]
    token = tmp_path / "chain-head.tsr"
    token.write_bytes(base64.b64decode(head["timestamp_token_base64"]))
    verified = openssl(
        "ts", "-verify", "-digest", head["sha256"], "-in", str(token), "-token_in",
        "-CAfile", str(root_pem), "-untrusted", str(chain_pem),
    )
    assert "Verification: OK" in verified.stdout, verified.stdout + verified.stderr
    kinds = [event["kind"] for event in audit["events"]]
    assert kinds.count("consented") == 2 and kinds.count("signed") == 1

    officer.goto(detail_url)
    assert "改ざんは検出されませんでした" in officer.content()

"""The pages of a party (the prefecture's signer or the contractor; no account) reached from the
emailed links: identification, review of the PDF, consent or decline, the signed contract.

``/c/<token>`` is the invitation link. Its first opening in a browser calls
:func:`contracts.open_link` (recorded; one-time-code parties get a code by mail) and shows the
identification form; after the access code or the one-time code, the same address shows the
contract page by page, its SHA-256, the original PDF, and the consent and decline forms.

The browser's progress lives in the signed session cookie, one entry per link keyed by a digest
of the token (never the token itself): ``session["party"][digest] = {"p": party id, "o": opened,
"i": identified}`` (Unix times; ``i`` 0 until identified). The database stays the authority:
every request checks the link and the party again (:func:`contracts.resume_link`), and the
services refuse a party who has not identified since the link was last opened, in any browser.
Another link's entry never lets a browser act for this one.

Tokens never reach the logs: :class:`TokenRedactor` replaces them in the request lines of the
development server and in Flask's error log with the start of their SHA-256 (as stored in
``access_links.token_sha256``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import struct
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from flask import (
    Blueprint,
    current_app,
    g,
    redirect,
    render_template,
    request,
    send_file,
    session,
    url_for,
)
from flask.blueprints import BlueprintSetupState
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response

import contracts
from contracts import (
    AlreadyResponded,
    CodeOutcome,
    CodeResult,
    ContractNotOpen,
    DocumentMismatch,
    IdentificationRequired,
    InvalidContractData,
    LinkAlreadyUsed,
    LinkExpired,
    LinkInvalid,
    NotYourTurn,
    PartyLocked,
    PartySession,
    PartyStatus,
    WorkflowError,
)

from . import services
from .errors import page_error
from .i18n import localized
from .previews import PreviewError, page_images
from .security import client_address, rate_limited

__all__ = ["IDENTIFIED_LIFETIME", "REOPEN_AFTER", "TokenRedactor", "bp"]

log = logging.getLogger(__name__)

bp = Blueprint("party", __name__)

#: The session entry of a link (see the module docstring).
SESSION_KEY = "party"
#: Links remembered per browser; the oldest entry goes first.
MAX_LINKS = 8
#: A browser that opened a link this recently (and has not identified) shows the code form
#: again instead of opening the link anew, so that a phone reloading the tab while its owner
#: reads the mail does not send a second code. Equal to the one-time code's validity.
REOPEN_AFTER = int(contracts.workflow.OTP_LIFETIME.total_seconds())
#: How long an identification in this browser lasts (the session cookie ends with the browser).
IDENTIFIED_LIFETIME = 2 * 3600
MAX_CODE_CHARS = 100
MAX_REASON_CHARS = 1000

#: HTTP status of each refusal of the workflow.
_STATUS: tuple[tuple[type[WorkflowError], int], ...] = (
    (LinkInvalid, 404),
    (LinkExpired, 410),
    (ContractNotOpen, 410),
    (LinkAlreadyUsed, 409),
    (AlreadyResponded, 409),
    (NotYourTurn, 409),
    (DocumentMismatch, 409),
    (PartyLocked, 403),
    (IdentificationRequired, 403),
    (InvalidContractData, 400),
)


# -- the browser's progress ---------------------------------------------------------------------


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:32]


@dataclass(frozen=True)
class _Progress:
    party_id: int
    opened: float
    identified: float = 0.0

    @property
    def is_identified(self) -> bool:
        return 0 <= time.time() - self.identified <= IDENTIFIED_LIFETIME

    @property
    def recently_opened(self) -> bool:
        return 0 <= time.time() - self.opened <= REOPEN_AFTER


def _links() -> dict[str, Any]:
    links = session.get(SESSION_KEY)
    return dict(links) if isinstance(links, dict) else {}


def _progress(token: str) -> _Progress | None:
    entry = _links().get(_digest(token))
    if not isinstance(entry, dict):
        return None
    party_id, opened, identified = entry.get("p"), entry.get("o"), entry.get("i")
    if (
        not isinstance(party_id, int)
        or not isinstance(opened, int | float)
        or not isinstance(identified, int | float)
    ):
        return None
    return _Progress(party_id, float(opened), float(identified))


def _remember(token: str, progress: _Progress) -> None:
    links = _links()
    links[_digest(token)] = {
        "p": progress.party_id, "o": int(progress.opened), "i": int(progress.identified)
    }
    while len(links) > MAX_LINKS:
        del links[min(links, key=lambda key: _opened_at(links[key]))]
    session[SESSION_KEY] = links


def _opened_at(entry: Any) -> float:
    opened = entry.get("o") if isinstance(entry, dict) else None
    return float(opened) if isinstance(opened, int | float) else 0.0


def _identified(token: str) -> _Progress | None:
    """This browser's progress on the link if it identified (recently enough), else None."""
    progress = _progress(token)
    return progress if progress is not None and progress.is_identified else None


# -- helpers ------------------------------------------------------------------------------------



@contextmanager
def _db() -> Iterator[Session]:
    with contracts.session_scope(services.session_factory()) as db:
        yield db


class _Client(TypedDict):
    ip: str | None
    user_agent: str | None


def _client() -> _Client:
    """Where the request came from, for the audit chain (cut to the columns' sizes)."""
    agent = request.user_agent.string or None
    return {
        "ip": (request.remote_addr or "")[:45] or None,
        "user_agent": agent[:512] if agent else None,
    }


def _home() -> Path:
    return Path(current_app.config["KOIN_HOME"])


def _refused(exc: WorkflowError, token: str | None = None) -> tuple[str, int]:
    """The page for a refusal of the workflow, with the right status.

    :raise 404: unknown or forged link.
    :raise 410: expired link; the contract is cancelled, expired, declined or completed.
    :raise 409: link already used, party already answered, not its turn, document changed.
    :raise 403: the party is locked, or has not identified.
    :raise 400: unusable input (e.g. a decline reason that is too long).
    """
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 409)
    return page_error(
        status, exc.message, exc.message_en, template="party_error.html",
        kind=type(exc).__name__, token=token,
    )


def _file_name(title: str, suffix: str = "") -> str:
    cleaned = "".join(
        "_" if char in '\\/:*?"<>|' or unicodedata.category(char).startswith("C") else char
        for char in unicodedata.normalize("NFC", title)
    ).strip(" .") or "contract"
    return f"{cleaned[:100]}{suffix}.pdf"


def _send_pdf(relative: str, sha256: str, download_name: str) -> Response | tuple[str, int]:
    """The PDF ``relative`` (below KOIN_HOME) as a download, if it still has its SHA-256.

    :raise 500: the file is missing or was changed.
    """
    try:
        data = contracts.contract_file(_home(), relative).read_bytes()
    except (OSError, ValueError):
        data = b""
    if hashlib.sha256(data).hexdigest() != sha256:
        log.error("stored PDF %s is missing or does not match its SHA-256", relative)
        return _broken_file()
    return send_file(
        io.BytesIO(data), mimetype="application/pdf", as_attachment=True,
        download_name=download_name,
    )


def _broken_file() -> tuple[str, int]:
    return page_error(
        500,
        "保存されている契約書を確認できませんでした。お手数ですが、県の担当者にお問い合わせ"
        "ください。",
        "The stored contract could not be checked. Please contact the prefecture's officer.",
        template="party_error.html", kind="Broken",
    )


class _Changed(Exception):
    """The stored original no longer has the SHA-256 recorded for the contract."""


def _page_files(found: PartySession) -> list[Path]:
    """PNG images of the contract's pages (rendered once, cached under KOIN_HOME/previews).

    :raises PreviewError: the PDF could not be rendered.
    :raises _Changed: the stored original is not the recorded one.
    """
    files = page_images(
        contracts.contract_file(_home(), found.original_path), _home() / "previews"
    )
    if files and files[0].parent.name != found.original_sha256:
        log.error("stored original of contract %s does not match its SHA-256",
                  found.contract_public_id)
        raise _Changed()
    return files


def _png_size(path: Path) -> tuple[int, int] | None:
    with path.open("rb") as handle:
        head = handle.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


# -- pages --------------------------------------------------------------------------------------


def _code_page(
    token: str,
    found: PartySession,
    *,
    code_sent: bool | None = None,
    result: CodeResult | None = None,
    status: int = 200,
) -> tuple[str, int]:
    error = None
    if result is not None and not result.verified:
        error = result.message_en if g.get("lang") == "en" else result.message
    page = render_template(
        "party_code.html", token=token, found=found, code_sent=code_sent, error=error,
        expired=result is not None and result.outcome is CodeOutcome.EXPIRED,
        otp=found.identification is contracts.Identification.EMAIL_OTP,
    )
    return page, status


def _review_page(
    token: str,
    found: PartySession,
    *,
    consent_error: str | None = None,
    decline_error: str | None = None,
    reason: str = "",
    status: int = 200,
) -> tuple[str, int]:
    try:
        files = _page_files(found)
        preview_failed = not files
    except PreviewError as exc:
        log.warning("no page images of contract %s: %s", found.contract_public_id, exc)
        files, preview_failed = [], True
    except _Changed:
        return _broken_file()
    page = render_template(
        "party_review.html", token=token, found=found, sizes=[_png_size(f) for f in files],
        preview_failed=preview_failed, consent_error=consent_error,
        decline_error=decline_error, reason=reason,
        file_name=_file_name(found.contract_title),
    )
    return page, status


def _back_to_link(token: str) -> Response:
    return redirect(url_for(".party", token=token), 303)


@bp.get("/c/<token>")
def party(token: str) -> Response | tuple[str, int]:
    """The invitation link: the identification form, or (identified in this browser) the review
    and consent page. The first opening in a browser is recorded and mails a one-time code.

    :raise 404/410/409/403: see :func:`_refused`.
    """
    progress = _progress(token)
    if progress is not None and progress.is_identified:
        try:
            with _db() as db:
                found = contracts.resume_link(db, token, progress.party_id)
            return _review_page(token, found)
        except IdentificationRequired:
            # Opened again elsewhere (which ended this identification): the code form again.
            progress = _Progress(progress.party_id, time.time())
            _remember(token, progress)
        except (LinkAlreadyUsed, AlreadyResponded):
            return redirect(url_for(".done", token=token), 303)
        except WorkflowError as exc:
            return _refused(exc, token)
    if progress is not None and not progress.identified and progress.recently_opened:
        try:
            with _db() as db:
                found = contracts.resume_link(
                    db, token, progress.party_id, require_identification=False
                )
        except WorkflowError as exc:
            return _refused(exc, token)
        return _code_page(token, found)
    return _open(token)


def _open(token: str) -> tuple[str, int]:
    try:
        with _db() as db:
            found = contracts.open_link(db, token, **_client())
    except WorkflowError as exc:
        return _refused(exc, token)
    _remember(token, _Progress(found.party_id, time.time()))
    return _code_page(token, found, code_sent=found.code_sent)


@bp.post("/c/<token>/resend")
def resend(token: str) -> Response | tuple[str, int]:
    """Open the link again: a new one-time code, unless one was sent within the last minute.

    :raise 404/410/409/403: see :func:`_refused`.
    """
    if _progress(token) is None:
        return _back_to_link(token)
    return _open(token)


@bp.post("/c/<token>/code")
def code(token: str) -> Response | tuple[str, int] | tuple[str, int, dict[str, str]]:
    """Check the access code or one-time code; on success, show the review page.

    :raise 400: wrong or expired code (the form again, with the attempts left).
    :raise 403: the fifth wrong code in a row: the party is locked.
    :raise 429: too many codes entered for this link or from this address
        (:mod:`web.security`; ``Retry-After``).
    :raise 404/410/409: see :func:`_refused`.
    """
    progress = _progress(token)
    if progress is None:
        return _back_to_link(token)
    wait = rate_limited(("code_ip", client_address()), ("code_link", _digest(token)))
    if wait is not None:
        page, status = page_error(
            429,
            f"コードの入力が多すぎます。{wait} 秒ほど待ってから、もう一度お試しください。",
            f"Too many codes were entered; wait {wait} seconds and try again.",
            template="party_error.html", kind="RateLimited", token=token,
        )
        return page, status, {"Retry-After": str(wait)}
    typed = request.form.get("code", "")[:MAX_CODE_CHARS]
    try:
        with _db() as db:
            found = contracts.resume_link(
                db, token, progress.party_id, require_identification=False
            )
            result = contracts.verify_code(db, found.party_id, typed, **_client())
    except WorkflowError as exc:
        return _refused(exc, token)
    if result.outcome is CodeOutcome.LOCKED:
        return _refused(PartyLocked(), token)
    if not result.verified:
        return _code_page(token, found, result=result, status=400)
    _remember(token, _Progress(progress.party_id, progress.opened, time.time()))
    return _back_to_link(token)


def _identification_required(token: str) -> tuple[str, int]:
    return _refused(IdentificationRequired(), token)


@bp.get("/c/<token>/pages/<int:number>.png")
def page_image(token: str, number: int) -> Response | tuple[str, int]:
    """Page ``number`` (1-based) of the contract as a PNG, for the identified party only.

    :raise 403: this browser has not identified for this link.
    :raise 404: no such page; or see :func:`_refused`.
    """
    progress = _identified(token)
    if progress is None:
        return _identification_required(token)
    try:
        with _db() as db:
            found = contracts.resume_link(db, token, progress.party_id)
        files = _page_files(found)
    except WorkflowError as exc:
        return _refused(exc, token)
    except (PreviewError, _Changed):
        return _broken_file()
    if not 1 <= number <= len(files):
        return page_error(404, "そのページはありません。", "There is no such page.",
                          template="party_error.html", kind="NoPage", token=token)
    return send_file(io.BytesIO(files[number - 1].read_bytes()), mimetype="image/png")


@bp.get("/c/<token>/document.pdf")
def original(token: str) -> Response | tuple[str, int]:
    """The contract's original PDF (the one to consent to), for the identified party only.

    :raise 403: this browser has not identified for this link; or see :func:`_refused`.
    """
    progress = _identified(token)
    if progress is None:
        return _identification_required(token)
    try:
        with _db() as db:
            found = contracts.resume_link(db, token, progress.party_id)
    except WorkflowError as exc:
        return _refused(exc, token)
    return _send_pdf(found.original_path, found.original_sha256,
                     _file_name(found.contract_title))


def _complete(contract_id: int, public_id: str) -> None:
    """Make the witness signature now; a failure is only logged (``koin jobs run-due`` and the
    job thread of ``koin serve`` finish the contract)."""
    try:
        contracts.complete_contract(
            services.session_factory(), contract_id, services.installation(),
            public_url=current_app.config["KOIN_PUBLIC_URL"],
            tsa_urls=current_app.config.get("KOIN_TSA_URLS") or (),
        )
    except Exception:
        log.exception("completing contract %s failed; the periodic job will retry", public_id)


@bp.post("/c/<token>/consent")
def consent_submit(token: str) -> Response | tuple[str, int]:
    """Consent to the document shown (its SHA-256 comes back in ``document_sha256``); with the
    last consent, sign the contract right away. A second submission shows the result page.

    :raise 400: the box "内容を確認し、合意します" is not ticked.
    :raise 403: this browser has not identified for this link.
    :raise 409: the document is not the one shown (``DocumentMismatch``); or see
        :func:`_refused`.
    """
    progress = _identified(token)
    if progress is None:
        return _identification_required(token)
    agreed = request.form.get("agree") == "yes"
    seen = request.form.get("document_sha256", "")[:128]
    try:
        with _db() as db:
            found = contracts.resume_link(db, token, progress.party_id)
            result = None
            if agreed:
                result = contracts.consent(
                    db, found.party_id, document_sha256_seen=seen,
                    public_url=current_app.config["KOIN_PUBLIC_URL"], **_client(),
                )
    except (LinkAlreadyUsed, AlreadyResponded):
        return redirect(url_for(".done", token=token), 303)
    except WorkflowError as exc:
        return _refused(exc, token)
    if result is None:
        return _review_page(
            token, found, status=400,
            consent_error=localized(
                "合意する場合は「内容を確認し、合意します」にチェックを入れてください。",
                'To consent, tick "I have reviewed the contents and agree".',
            ),
        )
    if result.completing:
        _complete(result.contract_id, found.contract_public_id)
    return redirect(url_for(".done", token=token), 303)


@bp.post("/c/<token>/decline")
def decline_submit(token: str) -> Response | tuple[str, int]:
    """Decline, with a reason: first a confirmation page, then (``confirm=yes``) the answer.

    :raise 400: no reason, or a reason that is too long (the review page again).
    :raise 403: this browser has not identified for this link; or see :func:`_refused`.
    """
    progress = _identified(token)
    if progress is None:
        return _identification_required(token)
    reason = request.form.get("reason", "").strip()
    try:
        with _db() as db:
            found = contracts.resume_link(db, token, progress.party_id)
            problem = None
            if not reason:
                problem = localized("同意しない理由を入力してください。",
                                    "Please give the reason why you do not consent.")
            elif len(reason) > MAX_REASON_CHARS:
                problem = localized(f"理由は {MAX_REASON_CHARS} 文字以内にしてください。",
                                    f"Please keep the reason within {MAX_REASON_CHARS} characters.")
            elif request.form.get("confirm") == "yes":
                contracts.decline(
                    db, found.party_id, reason,
                    public_url=current_app.config["KOIN_PUBLIC_URL"], **_client(),
                )
    except (LinkAlreadyUsed, AlreadyResponded):
        return redirect(url_for(".done", token=token), 303)
    except WorkflowError as exc:
        return _refused(exc, token)
    if problem is not None:
        return _review_page(token, found, decline_error=problem, reason=reason[:2000],
                            status=400)
    if request.form.get("confirm") != "yes":
        page = render_template("party_decline.html", token=token, found=found, reason=reason)
        return page, 200
    return redirect(url_for(".done", token=token), 303)


@bp.get("/c/<token>/code")
@bp.get("/c/<token>/resend")
@bp.get("/c/<token>/consent")
@bp.get("/c/<token>/decline")
def back(token: str) -> Response:
    """The forms' addresses opened directly (e.g. the language switch on a form's answer)."""
    lang = request.args.get("lang")
    target = url_for(".party", token=token, lang=lang) if lang else url_for(".party", token=token)
    return redirect(target, 303)


@bp.get("/c/<token>/done")
def done(token: str) -> Response | tuple[str, int]:
    """What became of this browser's answer: thanks (and the signed contract once completed),
    or the confirmation of the decline.

    :raise 403: this browser has not identified for this link; or see :func:`_refused`.
    """
    progress = _identified(token)
    if progress is None:
        return _identification_required(token)
    try:
        with _db() as db:
            answer = contracts.party_answer(db, token, progress.party_id)
    except WorkflowError as exc:
        return _refused(exc, token)
    if answer.party_status is PartyStatus.PENDING:
        return _back_to_link(token)
    return render_template("party_done.html", token=token, answer=answer), 200


@bp.get("/c/<token>/signed.pdf")
def signed_copy(token: str) -> Response | tuple[str, int]:
    """The signed contract, for the party who consented in this browser (recorded).

    :raise 403: this browser has not identified for this link.
    :raise 410: the contract is not completed; or see :func:`_refused`.
    """
    progress = _identified(token)
    if progress is None:
        return _identification_required(token)
    try:
        with _db() as db:
            download = contracts.open_signed_copy(db, token, progress.party_id, **_client())
    except WorkflowError as exc:
        return _refused(exc, token)
    return _send_pdf(download.path, download.sha256, _file_name(download.title, "_signed"))


@bp.get("/d/<token>")
def download(token: str) -> Response | tuple[str, int]:
    """The download link of the completion mail: the signed contract as an attachment
    (recorded).

    :raise 404: unknown or forged link.
    :raise 410: expired link.
    """
    try:
        with _db() as db:
            found = contracts.open_download(db, token, **_client())
    except WorkflowError as exc:
        return _refused(exc)
    return _send_pdf(found.path, found.sha256, _file_name(found.title, "_signed"))


@bp.after_request
def _private(response: Response) -> Response:
    """Nothing of a party's pages is cached, indexed, or leaks its address as a referrer."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Robots-Tag"] = "noindex, nofollow"
    return response


# -- logs ---------------------------------------------------------------------------------------


_TOKEN_IN_PATH = re.compile(r"(/[cd]/)([A-Za-z0-9_-]{16,})")


class TokenRedactor(logging.Filter):
    """Replaces link tokens in ``/c/…`` and ``/d/…`` paths of log messages with
    ``sha256:`` and the first 12 hex digits of the token's SHA-256."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is not ours to fix
            return True
        redacted = _TOKEN_IN_PATH.sub(_redact, message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def _redact(match: re.Match[str]) -> str:
    digest = hashlib.sha256(match.group(2).encode("ascii")).hexdigest()
    return f"{match.group(1)}sha256:{digest[:12]}"


def _install_redaction(app_logger: logging.Logger) -> None:
    for logger in (logging.getLogger("werkzeug"), app_logger):
        if not any(isinstance(existing, TokenRedactor) for existing in logger.filters):
            logger.addFilter(TokenRedactor())


@bp.record_once
def _on_register(state: BlueprintSetupState) -> None:
    _install_redaction(state.app.logger)

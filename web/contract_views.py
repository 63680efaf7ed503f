"""The contract officer's pages (立会人型電子契約の担当職員画面).

Every page is for logged-in officers. An officer sees the contracts they created; an officer who
is also an administrator sees every contract. Anyone else's contract answers 404, exactly like a
contract that does not exist.

- ``GET /contracts``: the list; ``?status=`` filter, ``?q=`` title search, ``?page=``
- ``GET /contracts/new``, ``POST /contracts/new``: the form; create a draft, go to its page
- ``GET /contracts/<id>``: detail, parties, actions, audit timeline and chain check
- ``POST /contracts/<id>/send``, ``…/resend``, ``…/cancel``: the officer's actions
- ``GET /contracts/<id>/original.pdf``, ``…/final.pdf``, ``…/audit.json``: downloads

Access codes are generated here (:func:`contracts.new_access_code`) and stored by the service
only as hashes. They reach the officer exactly once: the creating request puts them, encrypted
with a key derived from the app's secret, into the session; the next display of that contract's
page takes them out again and shows them.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import io
import json
import logging
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from flask import (
    Blueprint,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    send_file,
    session,
    url_for,
)
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wrappers import Response

from contracts import (
    AuditEvent,
    Contract,
    ContractNotFound,
    ContractStatus,
    Identification,
    InvalidContractData,
    InvalidContractState,
    LtaFile,
    LtaKind,
    Party,
    PartyRole,
    PartySpec,
    PartyStatus,
    SigningOrder,
    User,
    UserRole,
    cancel_contract,
    chain_head_tokens,
    contract_file,
    create_contract,
    list_events,
    list_parties,
    new_access_code,
    officer_contract,
    resend_invitations,
    send_contract,
    session_scope,
    verify_chain,
)
from contracts.workflow import MAX_PARTIES
from keys import KoinError
from signer import SigningError

from . import services
from ._contract_json import audit_document, timestamp_time
from .auth import current_user, login_required
from .errors import page_error
from .i18n import localized

__all__ = ["bp"]

log = logging.getLogger(__name__)

bp = Blueprint("contracts_web", __name__, url_prefix="/contracts")

#: Party rows in a fresh form; rows left empty are ignored, so the form works without JavaScript.
FORM_ROWS = 4
#: Rows read from a submitted form (the service refuses more than 20 parties).
MAX_FORM_ROWS = 40
PAGE_SIZE = 50
MAX_EXPIRY_DAYS = 365
#: How long the encrypted access codes stay in the session if the page is never shown.
CODES_TTL = 600

_CODES_KEY = "koin_new_access_codes"
_ROW_FIELDS = ("name", "organisation", "email", "role", "identification")


class _FormInputError(KoinError):
    """The form itself is incomplete or malformed (before any service is asked)."""



def _user() -> User:
    user = current_user()
    assert user is not None  # login_required ran first
    return user


def _sees_all(user: User) -> bool:
    return UserRole.ADMIN in user.roles


def _owned(db: Session, public_id: str, user: User) -> Contract:
    """The contract, if ``user`` may see it.

    :raises ContractNotFound: no such contract, or another officer's (the same answer).
    """
    return officer_contract(db, public_id, user)


@bp.errorhandler(ContractNotFound)
def _not_found(exc: ContractNotFound) -> tuple[str, int]:
    return page_error(404, exc.message, exc.message_en)


@bp.after_request
def _no_store(response: Response) -> Response:
    """Pages with personal data and one-time access codes: never kept in any cache."""
    response.headers["Cache-Control"] = "no-store"
    return response


def _public_url() -> str:
    return str(current_app.config["KOIN_PUBLIC_URL"])


def _home() -> Path:
    return services.installation().home


# -- the list -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListRow:
    contract: Contract
    parties: int
    agreed: int
    updated: dt.datetime
    officer: str


def _like_pattern(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


@bp.get("")
@login_required(UserRole.OFFICER)
def contract_list() -> str:
    """The officer's contracts (an administrator's: everyone's), most recently changed first."""
    user = _user()
    wanted = request.args.get("status", "")
    status = ContractStatus(wanted) if wanted in {s.value for s in ContractStatus} else None
    query_text = " ".join(unicodedata.normalize("NFC", request.args.get("q", "")).split())[:200]
    try:
        page = max(1, int(request.args.get("page", "1")))
    except ValueError:
        page = 1

    progress = (
        select(
            Party.contract_id.label("contract_id"),
            func.count().label("total"),
            func.sum(case((Party.status == PartyStatus.CONSENTED.value, 1), else_=0)).label(
                "agreed"
            ),
        )
        .group_by(Party.contract_id)
        .subquery()
    )
    latest = (
        select(
            AuditEvent.contract_id.label("contract_id"),
            func.max(AuditEvent.time).label("updated"),
        )
        .group_by(AuditEvent.contract_id)
        .subquery()
    )
    scope = [] if _sees_all(user) else [Contract.created_by == user.id]
    if query_text:
        scope.append(Contract.title.ilike(_like_pattern(query_text), escape="\\"))
    query = (
        select(Contract, progress.c.total, progress.c.agreed, latest.c.updated, User.display_name)
        .outerjoin(progress, progress.c.contract_id == Contract.id)
        .outerjoin(latest, latest.c.contract_id == Contract.id)
        .join(User, User.id == Contract.created_by)
        .where(*scope)
    )
    if status is not None:
        query = query.where(Contract.status == status.value)
    query = (
        query.order_by(latest.c.updated.desc(), Contract.id.desc())
        .offset((page - 1) * PAGE_SIZE)
        .limit(PAGE_SIZE + 1)
    )
    with services.session_factory()() as db:
        found = db.execute(query).all()
        counts = {
            str(value): int(count)
            for value, count in db.execute(
                select(Contract.status, func.count()).where(*scope).group_by(Contract.status)
            )
        }
    rows = [
        ListRow(contract, int(total or 0), int(agreed or 0), updated or contract.created_at, name)
        for contract, total, agreed, updated, name in found[:PAGE_SIZE]
    ]
    return render_template(
        "contracts.html",
        rows=rows,
        status=status,
        statuses=list(ContractStatus),
        counts=counts,
        total=sum(counts.values()),
        q=query_text,
        page=page,
        more=len(found) > PAGE_SIZE,
        sees_all=_sees_all(user),
    )


# -- creating -----------------------------------------------------------------------------------


@dataclass
class PartyRow:
    """One party row of the form, as typed."""

    name: str = ""
    organisation: str = ""
    email: str = ""
    role: str = PartyRole.CONTRACTOR.value
    identification: str = Identification.ACCESS_CODE.value

    @property
    def empty(self) -> bool:
        return not (self.name.strip() or self.organisation.strip() or self.email.strip())


@dataclass
class ContractForm:
    """The new-contract form, as typed (everything but the file), to show again after an
    error."""

    title: str = ""
    order: str = SigningOrder.PARALLEL.value
    expires_days: str = "14"
    reminder_days: str = "3"
    rows: list[PartyRow] = field(default_factory=list)

    @classmethod
    def blank(cls) -> ContractForm:
        rows = [
            PartyRow(
                role=PartyRole.PREFECTURE.value, identification=Identification.EMAIL_OTP.value
            ),
            PartyRow(),
        ]
        return cls(rows=rows + [PartyRow() for _ in range(FORM_ROWS - len(rows))])

    @classmethod
    def from_request(cls) -> ContractForm:
        form = request.form
        rows = []
        for index in range(MAX_FORM_ROWS):
            values = {name: form.get(f"party-{index}-{name}") for name in _ROW_FIELDS}
            if all(value is None for value in values.values()):
                continue
            rows.append(PartyRow(**{k: (v or "")[:1000] for k, v in values.items() if v}))
        filled = [row for row in rows if not row.empty]
        spare = [PartyRow() for _ in range(max(1, FORM_ROWS - len(filled)))]
        return cls(
            title=form.get("title", "")[:1000],
            order=form.get("order", SigningOrder.PARALLEL.value),
            expires_days=form.get("expires_days", "")[:20],
            reminder_days=form.get("reminder_days", "")[:20],
            rows=filled + spare,
        )

    def party_specs(self) -> tuple[list[PartySpec], dict[int, str]]:
        """The filled rows as parties, with a new access code for each party identified by
        one; the codes by position (1-based, as the service numbers the parties).

        :raises _FormInputError: a filled row lacks the name or the email address.
        """
        specs: list[PartySpec] = []
        codes: dict[int, str] = {}
        for number, row in enumerate((r for r in self.rows if not r.empty), start=1):
            if not row.name.strip() or not row.email.strip():
                raise _FormInputError(
                    f"当事者 {number}: 氏名とメールアドレスを入力してください。",
                    f"Party {number}: enter the name and the email address.",
                    field="parties",
                )
            code = None
            if row.identification == Identification.ACCESS_CODE.value:
                code = codes[number] = new_access_code()
            specs.append(
                PartySpec(
                    name=row.name, organisation=row.organisation, email=row.email,
                    role=row.role, identification=row.identification, access_code=code,
                )
            )
        return specs, codes


def _whole_number(text: str, message: str, message_en: str) -> int:
    """:raises _FormInputError: ``text`` is not a whole number (full-width digits are fine)."""
    folded = unicodedata.normalize("NFKC", text or "").strip()
    if not re.fullmatch(r"-?\d{1,9}", folded):
        raise _FormInputError(message, message_en, field="number")
    return int(folded)


def _form_page(
    form: ContractForm, error: KoinError | None = None, status: int = 200
) -> tuple[str, int]:
    text = localized(error.message, error.message_en) if error is not None else None
    return (
        render_template(
            "contract_new.html",
            form=form,
            error=text,
            submitted=request.method == "POST",
            max_parties=MAX_PARTIES,
        ),
        status,
    )


@bp.get("/new")
@login_required(UserRole.OFFICER)
def new_form() -> tuple[str, int]:
    return _form_page(ContractForm.blank())


@bp.post("/new")
@login_required(UserRole.OFFICER)
def create() -> Response | tuple[str, int]:
    """Create a draft contract and go to its page, where the generated access codes are shown
    once.

    :raise 400: the form is incomplete (no file, a party without name or email, days not a
        number); shown again with what was typed.
    :raise 413: the upload is larger than ``MAX_CONTENT_LENGTH``.
    :raise 422: the service refused it: not a PDF, encrypted, already signed, bad email,
        parties missing, … (the message says which).
    """
    user = _user()
    form = ContractForm.from_request()
    try:
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            raise _FormInputError(
                "契約書の PDF ファイルを選択してください。",
                "Choose the contract's PDF file.",
                field="file",
            )
        pdf = upload.read()
        expires_days = _whole_number(
            form.expires_days,
            "回答期限は日数を数字で入力してください。",
            "Enter the deadline as a number of days.",
        )
        if not 1 <= expires_days <= MAX_EXPIRY_DAYS:
            raise _FormInputError(
                f"回答期限は 1〜{MAX_EXPIRY_DAYS} 日にしてください。",
                f"The deadline must be 1 to {MAX_EXPIRY_DAYS} days.",
                field="expires_days",
            )
        reminder_days = _whole_number(
            form.reminder_days,
            "督促の間隔は日数を数字で入力してください(0 で督促なし)。",
            "Enter the reminder interval as a number of days (0: no reminders).",
        )
        specs, codes = form.party_specs()
    except _FormInputError as exc:
        return _form_page(form, exc, 400)
    try:
        with session_scope(services.session_factory()) as db:
            contract = create_contract(
                db,
                home=_home(),
                officer_id=user.id,
                title=form.title,
                pdf=pdf,
                parties=specs,
                order=form.order,
                expires_in=dt.timedelta(days=expires_days),
                reminder_interval_days=reminder_days,
            )
            public_id = contract.public_id
    except (InvalidContractData, SigningError) as exc:
        return _form_page(form, exc, 422)
    log.info("contract %s created by user %s", public_id, user.id)
    if codes:
        _keep_codes(public_id, codes)
    flash(localized("契約を作成しました(下書き)。", "The contract was created (draft)."),
          "contract")
    return redirect(url_for(".detail", public_id=public_id), code=303)


@bp.errorhandler(RequestEntityTooLarge)
def _too_large(_exc: RequestEntityTooLarge) -> tuple[str, int]:
    limit = int(current_app.config["MAX_CONTENT_LENGTH"] or 0) // 2**20
    error = _FormInputError(
        f"ファイルが大きすぎます(上限 約 {limit} MiB)。",
        f"The file is too large (limit about {limit} MiB).",
    )
    return _form_page(ContractForm.blank(), error, 413)


# -- access codes, once -------------------------------------------------------------------------


def _codes_cipher() -> Fernet:
    secret = current_app.secret_key
    key = secret.encode() if isinstance(secret, str) else bytes(secret or b"")
    derived = hmac.new(key, b"koin-contract-access-codes", hashlib.sha256).digest()
    return Fernet(base64.urlsafe_b64encode(derived))


def _keep_codes(public_id: str, codes: Mapping[int, str]) -> None:
    payload = json.dumps({"contract": public_id, "codes": {str(k): v for k, v in codes.items()}})
    session[_CODES_KEY] = _codes_cipher().encrypt(payload.encode()).decode("ascii")


def _take_codes(public_id: str) -> dict[int, str]:
    """The access codes generated for ``public_id``, if the session carries them; whatever it
    carries is removed, so codes are shown at most once."""
    token = session.pop(_CODES_KEY, None)
    if not isinstance(token, str):
        return {}
    try:
        payload = json.loads(_codes_cipher().decrypt(token.encode("ascii"), ttl=CODES_TTL))
    except (InvalidToken, ValueError):
        return {}
    if payload.get("contract") != public_id:
        return {}
    return {int(k): str(v) for k, v in payload.get("codes", {}).items()}


# -- the detail page ----------------------------------------------------------------------------


def _detail_page(
    public_id: str,
    *,
    error: KoinError | None = None,
    status: int = 200,
    codes: Mapping[int, str] | None = None,
) -> tuple[str, int]:
    """:raises ContractNotFound: no such contract, or not the user's."""
    user = _user()
    with services.session_factory()() as db:
        contract = _owned(db, public_id, user)
        parties = list_parties(db, contract)
        events = list_events(db, contract)
        check = verify_chain(db, contract)
        lta = _lta_status(db, contract)
    by_id = {party.id: party for party in parties}
    shown_codes = [
        (party, codes[party.position]) for party in parties if codes and party.position in codes
    ]
    moment = dt.datetime.now(dt.UTC)
    page = render_template(
        "contract_detail.html",
        contract=contract,
        status=contract.contract_status,
        parties=parties,
        agreed=sum(p.status == PartyStatus.CONSENTED.value for p in parties),
        events=events,
        party_by_id=by_id,
        check=check,
        chain_timestamp=timestamp_time(contract.chain_head_timestamp),
        codes=shown_codes,
        error=localized(error.message, error.message_en) if error is not None else None,
        can_send=contract.contract_status is ContractStatus.DRAFT,
        can_resend=contract.contract_status.is_open and contract.expires_at > moment,
        can_cancel=contract.contract_status
        in (ContractStatus.DRAFT, ContractStatus.SENT, ContractStatus.PARTIALLY_AGREED),
        has_final=contract.contract_status is ContractStatus.COMPLETED
        and contract.final_path is not None,
        past_deadline=contract.expires_at <= moment,
        lta=lta,
    )
    return page, status


@dataclass(frozen=True)
class LtaStatus:
    """Long-term validity of a completed contract's final PDF, for its page."""

    renewed_at: dt.datetime | None  # last document timestamp added by the renewer
    valid_until: dt.datetime | None  # expiry of the newest timestamp's TSA certificate
    renewals: int
    tokens: int  # timestamps over the chain head (the first one and its renewals)


def _lta_status(db: Session, contract: Contract) -> LtaStatus | None:
    if contract.contract_status is not ContractStatus.COMPLETED:
        return None
    final = db.scalars(
        select(LtaFile).where(
            LtaFile.contract_id == contract.id, LtaFile.kind == LtaKind.CONTRACT_FINAL.value
        )
    ).one_or_none()
    if final is None:
        return None
    return LtaStatus(
        final.renewed_at, final.tsa_not_after, final.renewals,
        len(chain_head_tokens(db, contract)),
    )


@bp.get("/<public_id>")
@login_required(UserRole.OFFICER)
def detail(public_id: str) -> tuple[str, int]:
    """:raise 404: no such contract, or another officer's."""
    return _detail_page(public_id, codes=_take_codes(public_id))


# -- actions ------------------------------------------------------------------------------------


def _done(public_id: str, message: str, message_en: str) -> Response:
    flash(localized(message, message_en), "contract")
    return redirect(url_for(".detail", public_id=public_id), code=303)


@bp.post("/<public_id>/send")
@login_required(UserRole.OFFICER)
def send(public_id: str) -> Response | tuple[str, int]:
    """Send a draft to its parties.

    :raise 404: no such contract, or another officer's.
    :raise 409: not a draft, or its deadline has passed (shown on the contract's page).
    """
    user = _user()
    try:
        with session_scope(services.session_factory()) as db:
            send_contract(db, _owned(db, public_id, user), public_url=_public_url())
    except (InvalidContractState, InvalidContractData) as exc:
        return _detail_page(public_id, error=exc, status=409)
    log.info("contract %s sent by user %s", public_id, user.id)
    return _done(
        public_id, "契約を送付しました。当事者に招待メールを送ります。",
        "The contract was sent; the parties are being emailed their invitations.",
    )


@bp.post("/<public_id>/resend")
@login_required(UserRole.OFFICER)
def resend(public_id: str) -> Response | tuple[str, int]:
    """Fresh invitation links for the parties who should answer now (earlier links stop
    working).

    :raise 404: no such contract, or another officer's.
    :raise 409: the contract does not await answers.
    """
    user = _user()
    try:
        with session_scope(services.session_factory()) as db:
            count = resend_invitations(db, _owned(db, public_id, user), public_url=_public_url())
    except InvalidContractState as exc:
        return _detail_page(public_id, error=exc, status=409)
    if count == 0:
        return _done(
            public_id, "再送する当事者はいません(回答済みまたはロック中です)。",
            "There is nobody to send to (everyone has answered or is locked).",
        )
    return _done(
        public_id, f"{count} 名に招待メールを再送しました。以前のリンクは使えなくなります。",
        f"Invitations were sent again to {count} "
        f"part{'ies' if count != 1 else 'y'}; earlier links no longer work.",
    )


@bp.post("/<public_id>/cancel")
@login_required(UserRole.OFFICER)
def cancel(public_id: str) -> Response | tuple[str, int]:
    """Withdraw the contract; parties who were invited and have not answered are told.

    :raise 400: the confirmation box was not ticked.
    :raise 404: no such contract, or another officer's.
    :raise 409: the contract is completing, completed or already closed.
    :raise 422: the reason is too long.
    """
    user = _user()
    if request.form.get("confirm") != "yes":
        error = _FormInputError(
            "取り消すには「この契約を取り消します」にチェックを入れてください。",
            "To cancel, tick “Cancel this contract”.",
        )
        return _detail_page(public_id, error=error, status=400)
    try:
        with session_scope(services.session_factory()) as db:
            cancel_contract(
                db, _owned(db, public_id, user), officer_id=user.id,
                reason=request.form.get("reason", "")[:2000],
            )
    except InvalidContractState as exc:
        return _detail_page(public_id, error=exc, status=409)
    except InvalidContractData as exc:
        return _detail_page(public_id, error=exc, status=422)
    log.info("contract %s cancelled by user %s", public_id, user.id)
    return _done(public_id, "契約を取り消しました。", "The contract was cancelled.")


# -- files --------------------------------------------------------------------------------------


def _safe_file_name(title: str, suffix: str) -> str:
    cleaned = re.sub(r'[\\/:*?"<>|\x00-\x1f\x7f]', "_", title).strip(" .") or "contract"
    return f"{cleaned[:120]}{suffix}.pdf"


def _pdf_response(relative: str, sha256: str, download_name: str) -> Response | tuple[str, int]:
    """The stored file, if it still has the recorded SHA-256."""
    try:
        data = contract_file(_home(), relative).read_bytes()
    except (OSError, ValueError):
        log.error("contract file %s is missing or unreadable", relative)
        return page_error(
            404, "ファイルが見つかりません。", "The file was not found."
        )
    if hashlib.sha256(data).hexdigest() != sha256:
        log.error("contract file %s does not match its recorded SHA-256", relative)
        return page_error(
            500,
            "保存されているファイルが記録されたハッシュ値と一致しません。管理者に連絡してください。",
            "The stored file does not match its recorded SHA-256. Contact an administrator.",
        )
    return send_file(
        io.BytesIO(data), mimetype="application/pdf", as_attachment=True,
        download_name=download_name, max_age=0,
    )


@bp.get("/<public_id>/original.pdf")
@login_required(UserRole.OFFICER)
def original_pdf(public_id: str) -> Response | tuple[str, int]:
    """The uploaded original.

    :raise 404: no such contract (or another officer's), or its file is missing.
    :raise 500: the stored file no longer has the recorded SHA-256.
    """
    with services.session_factory()() as db:
        contract = _owned(db, public_id, _user())
    return _pdf_response(
        contract.original_path, contract.original_sha256, _safe_file_name(contract.title, "")
    )


@bp.get("/<public_id>/final.pdf")
@login_required(UserRole.OFFICER)
def final_pdf(public_id: str) -> Response | tuple[str, int]:
    """The contract signed by the witness service.

    :raise 404: no such contract (or another officer's), or it is not completed.
    :raise 500: the stored file no longer has the recorded SHA-256.
    """
    with services.session_factory()() as db:
        contract = _owned(db, public_id, _user())
    if (
        contract.contract_status is not ContractStatus.COMPLETED
        or contract.final_path is None
        or contract.final_sha256 is None
    ):
        return page_error(
            404,
            "締結済みの契約書はまだありません。",
            "There is no signed contract yet.",
        )
    return _pdf_response(
        contract.final_path, contract.final_sha256,
        _safe_file_name(contract.title, "(締結済み)"),
    )


@bp.get("/<public_id>/audit.json")
@login_required(UserRole.OFFICER)
def audit_json(public_id: str) -> Response:
    """The audit chain: every event with the fields its SHA-256 covers (canonical JSON: keys
    sorted, UTF-8, ``,`` and ``:`` without spaces, the event without ``sha256``), the chain
    check, and the RFC 3161 token over the chain head (base64 DER) once completed.

    :raise 404: no such contract, or another officer's.
    """
    with services.session_factory()() as db:
        contract = _owned(db, public_id, _user())
        body = audit_document(db, contract)
    text = json.dumps(body, ensure_ascii=False, indent=2)
    return Response(
        text + "\n",
        mimetype="application/json",
        headers={
            "Content-Disposition": f'attachment; filename="audit-{contract.public_id}.json"'
        },
    )


@bp.get("/<public_id>/evidence.zip")
@login_required(UserRole.OFFICER)
def evidence_zip(public_id: str) -> Response | tuple[str, int]:
    """The evidence package (ZIP): both PDFs, the audit chain as JSON Lines, the chain-head
    timestamps, certificates, CRLs and VERIFY.md with the commands that check it offline.

    :raise 404: no such contract (or another officer's), or it is not completed.
    :raise 500: a stored file is missing or unreadable.
    """
    from contracts import CompletionError
    from contracts.evidence import build_evidence_package

    with services.session_factory()() as db:
        contract = _owned(db, public_id, _user())
        if contract.contract_status is not ContractStatus.COMPLETED:
            return page_error(
                404,
                "証拠パッケージは締結済みの契約についてのみ作成できます。",
                "An evidence package exists only for a completed contract.",
            )
        try:
            package = build_evidence_package(
                db, _home(), contract, services.installation().trust_material()
            )
        except CompletionError as exc:
            log.error("evidence package of contract %s: %s", public_id, exc.message_en)
            return page_error(500, exc.message, exc.message_en)
    log.info("evidence package of contract %s downloaded by user %s", public_id, _user().id)
    return send_file(
        io.BytesIO(package.data), mimetype="application/zip", as_attachment=True,
        download_name=package.file_name, max_age=0,
    )

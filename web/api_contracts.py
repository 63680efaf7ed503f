"""REST API v1 for witness-type contracts (立会人型電子契約): what the officer's pages do, for
programs with an API key of scope ``contracts`` (:mod:`web.apiauth`; the key's owner must hold
the role ``officer``). Documented in ``web/openapi/contracts.json``.

- ``POST /api/v1/contracts``: multipart, field ``file`` (the unsigned PDF) and field
  ``metadata`` (JSON: ``title``, ``order``, ``expires_in_days`` or ``expires_at``,
  ``reminder_interval_days``, ``parties``); a draft
- ``POST /api/v1/contracts/<id>/parties``: JSON party; added to a draft
- ``POST /api/v1/contracts/<id>/send``, ``…/cancel`` (JSON ``{"reason": …}``)
- ``GET /api/v1/contracts`` (``?status=``, ``page``, ``per_page``), ``GET …/<id>``
- ``GET …/<id>/original.pdf``, ``…/final.pdf``, ``…/audit``

The workflow rules are the services' (:mod:`contracts.workflow`); this module parses requests,
calls them and maps their refusals to HTTP. Like the pages, a key sees its owner's contracts
(an administrator's: all), and anyone else's contract is 404 exactly like an unknown one.
Access codes of parties identified by code are generated here and answered once, in the
``201`` of the request that added the party; only their hashes are stored.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from flask import Blueprint, Response, current_app, jsonify, request, send_file
from sqlalchemy.orm import Session
from werkzeug.exceptions import RequestEntityTooLarge

from contracts import (
    ApiScope,
    Contract,
    ContractNotFound,
    ContractStatus,
    Identification,
    InvalidContractData,
    InvalidContractState,
    PartySpec,
    add_party,
    cancel_contract,
    contract_file,
    create_contract,
    list_contracts,
    list_parties,
    new_access_code,
    officer_contract,
    party_counts,
    send_contract,
    session_scope,
)
from keys import KoinError
from signer import AlreadySignedPdfError, EncryptedPdfError, InvalidPdfError

from . import services
from ._contract_json import audit_document, contract_json
from .apiauth import api_user, require_api_key
from .errors import api_error

__all__ = ["bp"]

log = logging.getLogger(__name__)

bp = Blueprint("api_contracts", __name__, url_prefix="/api/v1/contracts")

DEFAULT_EXPIRY_DAYS = 14
MAX_EXPIRY_DAYS = 365
DEFAULT_REMINDER_DAYS = 3
DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 100
#: Largest JSON body accepted (metadata, a party, a reason).
MAX_JSON_BYTES = 256 * 1024

_CONTRACT_FIELDS = frozenset(
    {"title", "order", "expires_in_days", "expires_at", "reminder_interval_days", "parties"}
)
_PARTY_FIELDS = frozenset({"name", "organisation", "email", "role", "identification"})
_PARTY_REQUIRED = ("name", "email", "role", "identification")
#: Service fields (``InvalidContractData.field``) whose error code is not ``invalid_<field>``.
_FIELD_CODES = {"expires_in": "invalid_deadline", "expires_at": "invalid_deadline"}


class _Refused(Exception):
    """An answer other than success: ``status``, a stable ``code`` and the two messages."""

    def __init__(self, status: int, code: str, message: str, message_en: str) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message
        self.message_en = message_en


def _refuse(status: int, code: str, message: str, message_en: str) -> NoReturn:
    raise _Refused(status, code, message, message_en)


@bp.errorhandler(_Refused)
def _refused(exc: _Refused) -> tuple[Response, int]:
    return api_error(exc.status, exc.code, exc.message, exc.message_en)


@bp.errorhandler(ContractNotFound)
def _not_found(exc: ContractNotFound) -> tuple[Response, int]:
    return api_error(404, "not_found", exc.message, exc.message_en or exc.message)


@bp.errorhandler(RequestEntityTooLarge)
def _too_large(_exc: RequestEntityTooLarge) -> tuple[Response, int]:
    limit = int(current_app.config["MAX_CONTENT_LENGTH"] or 0)
    return api_error(
        413, "too_large", "リクエストが大きすぎます。",
        f"The request is larger than {limit} bytes.",
    )


@bp.after_request
def _no_store(response: Response) -> Response:
    """Answers carry personal data and one-time access codes: never kept in any cache."""
    response.headers["Cache-Control"] = "no-store"
    return response


def _state_refusal(exc: InvalidContractState) -> _Refused:
    return _Refused(409, "invalid_state", exc.message, exc.message_en or exc.message)


def _data_refusal(exc: InvalidContractData) -> _Refused:
    code = _FIELD_CODES.get(exc.field, f"invalid_{exc.field}")
    return _Refused(400, code, exc.message, exc.message_en or exc.message)


def _pdf_refusal(exc: KoinError) -> _Refused:
    text = exc.message_en or exc.message
    if isinstance(exc, EncryptedPdfError):
        return _Refused(422, "encrypted", exc.message, text)
    if isinstance(exc, AlreadySignedPdfError):
        return _Refused(422, "already_signed", exc.message, text)
    if exc.fields.get("reason") == "not_pdf":
        return _Refused(415, "not_pdf", exc.message, text)
    return _Refused(422, "invalid_pdf", exc.message, text)


# -- reading requests ---------------------------------------------------------------------------


def _parse_json(text: str | bytes, what: str) -> dict[str, Any]:
    """A JSON object (no NaN or Infinity).

    :raises _Refused: 400 ``invalid_json``.
    """

    def no_constants(name: str) -> NoReturn:
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(text, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        _refuse(
            400, "invalid_json", f"{what} が JSON として読めません。",
            f"{what} is not valid JSON: {str(exc)[:200]}",
        )
    if not isinstance(value, dict):
        _refuse(
            400, "invalid_json", f"{what} は JSON オブジェクトにしてください。",
            f"{what} must be a JSON object.",
        )
    return value


def _json_body() -> dict[str, Any]:
    """The request's JSON object; an empty body is ``{}``.

    :raises _Refused: 413 too large, 415 not ``application/json``, 400 not a JSON object.
    """
    if (request.content_length or 0) > MAX_JSON_BYTES:
        raise RequestEntityTooLarge()
    data = request.get_data(cache=True)
    if len(data) > MAX_JSON_BYTES:
        raise RequestEntityTooLarge()
    if not data.strip():
        return {}
    if request.mimetype != "application/json":
        _refuse(
            415, "unsupported_media_type",
            "本文は application/json で送ってください。",
            "Send the body as application/json.",
        )
    return _parse_json(data, "body")


def _check_fields(value: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    """:raises _Refused: 400 ``unknown_field``."""
    unknown = sorted(set(value) - allowed)
    if unknown:
        names = ", ".join(name[:40] for name in unknown[:5])
        known = ", ".join(sorted(allowed))
        _refuse(
            400, "unknown_field", f"{where} に不明な項目があります: {names}(使える項目: {known})",
            f"Unknown field(s) in {where}: {names} (known: {known}).",
        )


def _string(value: Mapping[str, Any], name: str, where: str, *, required: bool) -> str | None:
    if name not in value or value[name] is None:
        if required:
            _refuse(
                400, "missing_field", f"{where} の {name} は必須です。",
                f"{where}: {name} is required.",
            )
        return None
    item = value[name]
    if not isinstance(item, str):
        _refuse(
            400, f"invalid_{name}", f"{where} の {name} は文字列にしてください。",
            f"{where}: {name} must be a string.",
        )
    return item


def _integer(value: Mapping[str, Any], name: str, where: str) -> int | None:
    if name not in value or value[name] is None:
        return None
    item = value[name]
    if isinstance(item, bool) or not isinstance(item, int):
        _refuse(
            400, f"invalid_{name}", f"{where} の {name} は整数にしてください。",
            f"{where}: {name} must be an integer.",
        )
    return item


@dataclass(frozen=True)
class _NewParty:
    """A party as the API received it, and the access code generated for it (if any)."""

    spec: PartySpec
    access_code: str | None


def _party(value: Any, where: str) -> _NewParty:
    """:raises _Refused: 400 not an object, unknown or missing fields, wrong types."""
    if not isinstance(value, dict):
        _refuse(
            400, "invalid_parties", f"{where} は JSON オブジェクトにしてください。",
            f"{where} must be a JSON object.",
        )
    _check_fields(value, _PARTY_FIELDS, where)
    texts = {name: _string(value, name, where, required=True) or "" for name in _PARTY_REQUIRED}
    organisation = _string(value, "organisation", where, required=False) or ""
    code = new_access_code() if texts["identification"] == Identification.ACCESS_CODE else None
    spec = PartySpec(
        name=texts["name"], organisation=organisation, email=texts["email"],
        role=texts["role"], identification=texts["identification"], access_code=code,
    )
    return _NewParty(spec, code)


@dataclass(frozen=True)
class _NewContract:
    title: str
    order: str
    expires_in: dt.timedelta
    reminder_interval_days: int
    parties: list[_NewParty] = field(default_factory=list)


def _deadline(metadata: Mapping[str, Any], now: dt.datetime) -> dt.timedelta:
    days = _integer(metadata, "expires_in_days", "metadata")
    at_text = _string(metadata, "expires_at", "metadata", required=False)
    if days is not None and at_text is not None:
        _refuse(
            400, "invalid_deadline",
            "expires_in_days と expires_at はどちらか一方だけ指定してください。",
            "Give either expires_in_days or expires_at, not both.",
        )
    if at_text is not None:
        try:
            moment = dt.datetime.fromisoformat(at_text)
        except ValueError:
            moment = None
        if moment is None or moment.utcoffset() is None:
            _refuse(
                400, "invalid_deadline",
                "expires_at はタイムゾーン付きの日時(RFC 3339、例 2026-05-31T17:00:00+09:00)"
                "にしてください。",
                "expires_at must be a date-time with a time zone (RFC 3339, e.g. "
                "2026-05-31T17:00:00+09:00).",
            )
        return moment - now
    if days is None:
        days = DEFAULT_EXPIRY_DAYS
    if not 1 <= days <= MAX_EXPIRY_DAYS:
        _refuse(
            400, "invalid_deadline", f"expires_in_days は 1〜{MAX_EXPIRY_DAYS} にしてください。",
            f"expires_in_days must be 1 to {MAX_EXPIRY_DAYS}.",
        )
    return dt.timedelta(days=days)


def _metadata(text: str | bytes, now: dt.datetime) -> _NewContract:
    """:raises _Refused: 400 for anything but a usable metadata object (types and names; the
    values are the services' to judge)."""
    metadata = _parse_json(text, "metadata")
    _check_fields(metadata, _CONTRACT_FIELDS, "metadata")
    title = _string(metadata, "title", "metadata", required=True) or ""
    order = _string(metadata, "order", "metadata", required=False) or "parallel"
    reminder = _integer(metadata, "reminder_interval_days", "metadata")
    parties_value = metadata.get("parties")
    if parties_value is None:
        parties_value = []
    if not isinstance(parties_value, list):
        _refuse(
            400, "invalid_parties", "metadata の parties は配列にしてください。",
            "metadata: parties must be an array.",
        )
    parties = [_party(item, f"parties[{index}]") for index, item in enumerate(parties_value)]
    return _NewContract(
        title=title,
        order=order,
        expires_in=_deadline(metadata, now),
        reminder_interval_days=DEFAULT_REMINDER_DAYS if reminder is None else reminder,
        parties=parties,
    )


def _upload() -> tuple[bytes, str | bytes]:
    """The PDF (field ``file``) and the metadata text (field ``metadata``, a form field or a
    file part) of a multipart request.

    :raises _Refused: 415 not multipart, 400 no file, empty file or no metadata.
    :raises RequestEntityTooLarge: larger than ``MAX_CONTENT_LENGTH``.
    """
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if limit is not None and (request.content_length or 0) > limit:
        raise RequestEntityTooLarge()
    if request.mimetype != "multipart/form-data":
        _refuse(
            415, "unsupported_media_type",
            "multipart/form-data で、PDF を file、設定を metadata (JSON) として送ってください。",
            "Send multipart/form-data with the PDF as field 'file' and the settings as field "
            "'metadata' (JSON).",
        )
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        _refuse(
            400, "no_file", "契約書の PDF をフィールド file で送ってください。",
            "Send the contract's PDF as the multipart file field 'file'.",
        )
    pdf = upload.read()
    if not pdf:
        _refuse(400, "empty_file", "ファイルが空です。", "The file is empty.")
    text: str | bytes | None = request.form.get("metadata")
    if text is None and "metadata" in request.files:
        text = request.files["metadata"].read(MAX_JSON_BYTES + 1)
    if text is None or not text.strip():
        _refuse(
            400, "no_metadata", "契約の設定をフィールド metadata (JSON) で送ってください。",
            "Send the contract's settings as the multipart field 'metadata' (JSON).",
        )
    if len(text) > MAX_JSON_BYTES:
        raise RequestEntityTooLarge()
    return pdf, text


# -- answers ------------------------------------------------------------------------------------


def _base_path() -> str:
    return f"{request.script_root}{bp.url_prefix}"


def _contract_answer(
    public_id: str, status: int = 200, access_codes: Mapping[int, str] | None = None
) -> tuple[Response, int]:
    """The contract with its parties, read afresh after the change."""
    with services.session_factory()() as db:
        contract = officer_contract(db, public_id, api_user())
        body = contract_json(
            contract, list_parties(db, contract), base_path=_base_path(),
            access_codes=access_codes,
        )
    response = jsonify(body)
    if status == 201:
        response.headers["Location"] = body["links"]["self"]
    return response, status


def _in_contract(public_id: str, action: Callable[[Session, Contract], object]) -> None:
    """Run ``action(db, contract)`` in one transaction on the key owner's contract.

    :raises ContractNotFound: unknown, or not the key owner's.
    """
    with session_scope(services.session_factory()) as db:
        action(db, officer_contract(db, public_id, api_user()))


# -- endpoints ----------------------------------------------------------------------------------


@bp.post("")
@require_api_key(ApiScope.CONTRACTS)
def create() -> tuple[Response, int]:
    """Create a draft contract from the PDF (field ``file``) and its settings (field
    ``metadata``, JSON). Answers ``201`` with the contract; generated access codes appear here
    once (``parties[].access_code``).

    :raise 400: no file, empty file, no or malformed metadata, unknown fields, wrong types, or
        values the service refuses (``invalid_title``, ``invalid_email``, …).
    :raise 401 / 403 / 429: see :func:`web.apiauth.require_api_key`.
    :raise 413: too large. :raise 415: not multipart, or the file is not a PDF.
    :raise 422: the PDF is broken, truncated, encrypted or already signed.
    """
    user = api_user()
    moment = dt.datetime.now(dt.UTC)
    pdf, text = _upload()
    wanted = _metadata(text, moment)
    try:
        with session_scope(services.session_factory()) as db:
            contract = create_contract(
                db,
                home=services.installation().home,
                officer_id=user.id,
                title=wanted.title,
                pdf=pdf,
                parties=[party.spec for party in wanted.parties],
                order=wanted.order,
                expires_in=wanted.expires_in,
                reminder_interval_days=wanted.reminder_interval_days,
                allow_incomplete=True,
                now=moment,
            )
            public_id = contract.public_id
    except InvalidContractData as exc:
        if exc.field == "pdf":
            raise _Refused(413, "too_large", exc.message, exc.message_en or exc.message) from exc
        raise _data_refusal(exc) from exc
    except (InvalidPdfError, AlreadySignedPdfError) as exc:
        raise _pdf_refusal(exc) from exc
    log.info("API: contract %s created by user %s", public_id, user.id)
    codes = {
        position: party.access_code
        for position, party in enumerate(wanted.parties, start=1)
        if party.access_code is not None
    }
    return _contract_answer(public_id, 201, codes)


@bp.post("/<public_id>/parties")
@require_api_key(ApiScope.CONTRACTS)
def add(public_id: str) -> tuple[Response, int]:
    """Add a party (JSON body) to a draft, after the others. Answers ``201`` with the contract;
    a generated access code appears here once.

    :raise 400: not a JSON object, unknown or missing fields, unusable values, or the email
        address is already another party's (``invalid_email``).
    :raise 404: unknown contract, or another officer's.
    :raise 409: not a draft (``invalid_state``), or it has 20 parties (``too_many_parties``).
    :raise 415: not ``application/json``.
    """
    new = _party(_json_body(), "party")
    added: list[int] = []

    def action(db: Session, contract: Contract) -> None:
        added.append(add_party(db, contract, new.spec).position)

    try:
        _in_contract(public_id, action)
    except InvalidContractState as exc:
        raise _state_refusal(exc) from exc
    except InvalidContractData as exc:
        if exc.field == "parties":
            raise _Refused(
                409, "too_many_parties", exc.message, exc.message_en or exc.message
            ) from exc
        raise _data_refusal(exc) from exc
    log.info("API: party %s added to contract %s by user %s", added[0], public_id,
             api_user().id)
    codes = {added[0]: new.access_code} if new.access_code is not None else None
    return _contract_answer(public_id, 201, codes)


@bp.post("/<public_id>/send")
@require_api_key(ApiScope.CONTRACTS)
def send(public_id: str) -> tuple[Response, int]:
    """Send a draft: every party (sequential: the first) gets an invitation mail.

    :raise 404: unknown contract, or another officer's.
    :raise 409: not a draft (``invalid_state``), parties missing or not both sides
        (``parties_incomplete``), or its deadline passed (``deadline_passed``).
    """
    public_url = str(current_app.config["KOIN_PUBLIC_URL"])
    try:
        _in_contract(
            public_id, lambda db, contract: send_contract(db, contract, public_url=public_url)
        )
    except InvalidContractState as exc:
        raise _state_refusal(exc) from exc
    except InvalidContractData as exc:
        code = "parties_incomplete" if exc.field == "parties" else "deadline_passed"
        raise _Refused(409, code, exc.message, exc.message_en or exc.message) from exc
    log.info("API: contract %s sent by user %s", public_id, api_user().id)
    return _contract_answer(public_id)


@bp.post("/<public_id>/cancel")
@require_api_key(ApiScope.CONTRACTS)
def cancel(public_id: str) -> tuple[Response, int]:
    """Withdraw a contract (JSON ``{"reason": "…"}``); invited parties who have not answered
    are told.

    :raise 400: no reason, or not a JSON object. :raise 404: unknown, or another officer's.
    :raise 409: completing, completed or already closed. :raise 415: not ``application/json``.
    """
    body = _json_body()
    _check_fields(body, frozenset({"reason"}), "body")
    reason = _string(body, "reason", "body", required=True) or ""
    if not reason.strip():
        _refuse(
            400, "missing_field", "取消しの理由 (reason) を入力してください。",
            "Give the reason for cancelling (reason).",
        )
    user = api_user()
    try:
        _in_contract(
            public_id,
            lambda db, contract: cancel_contract(db, contract, officer_id=user.id, reason=reason),
        )
    except InvalidContractState as exc:
        raise _state_refusal(exc) from exc
    except InvalidContractData as exc:
        raise _data_refusal(exc) from exc
    log.info("API: contract %s cancelled by user %s", public_id, user.id)
    return _contract_answer(public_id)


def _whole(name: str, default: int, low: int, high: int) -> int:
    """The query parameter ``name`` as a whole number from ``low`` to ``high``.

    :raises _Refused: 400 ``invalid_<name>``.
    """
    text = request.args.get(name)
    if text is None:
        return default
    text = text.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 9 and low <= int(text) <= high):
        _refuse(
            400, f"invalid_{name}", f"{name} は {low}〜{high} の整数にしてください。",
            f"{name} must be a whole number from {low} to {high}.",
        )
    return int(text)


@bp.get("")
@require_api_key(ApiScope.CONTRACTS)
def contract_list() -> Response:
    """The key owner's contracts (an administrator's: all), newest first; ``?status=`` one of
    the statuses, ``page`` (from 1) and ``per_page`` (1–100, default 50).

    :raise 400: unknown status, or page / per_page out of range.
    """
    status = request.args.get("status")  # given but empty: refused like any unknown status
    page = _whole("page", 1, 1, 1_000_000)
    per_page = _whole("per_page", DEFAULT_PER_PAGE, 1, MAX_PER_PAGE)
    try:
        with services.session_factory()() as db:
            found = list_contracts(
                db, api_user(), status=status, limit=per_page + 1,
                offset=(page - 1) * per_page,
            )
            shown = found[:per_page]
            counts = party_counts(db, [contract.id for contract in shown])
    except InvalidContractData as exc:
        raise _data_refusal(exc) from exc
    base = _base_path()
    return jsonify(
        {
            "contracts": [
                contract_json(c, None, base_path=base, party_counts=counts.get(c.id, (0, 0)))
                for c in shown
            ],
            "page": page,
            "per_page": per_page,
            "more": len(found) > per_page,
        }
    )


@bp.get("/<public_id>")
@require_api_key(ApiScope.CONTRACTS)
def detail(public_id: str) -> tuple[Response, int]:
    """The contract: status, timestamps, hashes, parties and their progress.

    :raise 404: unknown contract, or another officer's.
    """
    return _contract_answer(public_id)


def _pdf(contract: Contract, relative: str, sha256: str, name: str) -> Response:
    """The stored file, if it still has the recorded SHA-256.

    :raises _Refused: 500 the file is missing or changed (logged).
    """
    try:
        data = contract_file(services.installation().home, relative).read_bytes()
    except (OSError, ValueError):
        data = None
    if data is None or hashlib.sha256(data).hexdigest() != sha256:
        log.error("contract file %s is missing or does not match its SHA-256", relative)
        _refuse(
            500, "integrity_error",
            "保存されているファイルが見つからないか、記録されたハッシュ値と一致しません。"
            "管理者に連絡してください。",
            "The stored file is missing or does not match its recorded SHA-256. Contact an "
            "administrator.",
        )
    response = send_file(
        io.BytesIO(data), mimetype="application/pdf", as_attachment=True,
        download_name=f"contract-{contract.public_id}{name}.pdf", max_age=0,
    )
    response.headers["X-Koin-SHA256"] = sha256
    return response


@bp.get("/<public_id>/original.pdf")
@require_api_key(ApiScope.CONTRACTS)
def original_pdf(public_id: str) -> Response:
    """The uploaded original.

    :raise 404: unknown contract, or another officer's.
    :raise 500: the stored file is missing or changed.
    """
    with services.session_factory()() as db:
        contract = officer_contract(db, public_id, api_user())
    return _pdf(contract, contract.original_path, contract.original_sha256, "")


@bp.get("/<public_id>/final.pdf")
@require_api_key(ApiScope.CONTRACTS)
def final_pdf(public_id: str) -> Response:
    """The contract signed by the witness service, once completed.

    :raise 404: unknown contract, or another officer's.
    :raise 409: not completed (yet) (``not_completed``).
    :raise 500: the stored file is missing or changed.
    """
    with services.session_factory()() as db:
        contract = officer_contract(db, public_id, api_user())
    status = contract.contract_status
    if (
        status is not ContractStatus.COMPLETED
        or contract.final_path is None
        or contract.final_sha256 is None
    ):
        _refuse(
            409, "not_completed",
            f"契約は「{status.label_ja}」のため、締結済みの PDF はまだありません。",
            f"The contract is {status.label_en}; there is no signed PDF yet.",
        )
    return _pdf(contract, contract.final_path, contract.final_sha256, "-final")


@bp.get("/<public_id>/audit")
@require_api_key(ApiScope.CONTRACTS)
def audit(public_id: str) -> Response:
    """The audit chain, exactly as the officer's page downloads it (``audit.json``): every
    event with the fields its SHA-256 covers, the chain check, and the RFC 3161 token over the
    chain head once completed.

    :raise 404: unknown contract, or another officer's.
    """
    with services.session_factory()() as db:
        body = audit_document(db, officer_contract(db, public_id, api_user()))
    return jsonify(body)

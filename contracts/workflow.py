"""Witness-type contracts (立会人型電子契約): the workflow services.

An officer creates a contract from an unsigned PDF and its parties, then sends it. Each party
opens the emailed link, identifies (access code or emailed one-time code), reviews the PDF and
consents or declines. When every party consented, the service appends a certificate of agreement
(合意締結証明書), signs the whole PDF with its WITNESS key (PAdES B-T, invisible) and timestamps
the head of the contract's audit chain.

States (:class:`~contracts.workflow_models.ContractStatus`)::

    draft ──send──▶ sent ──consent──▶ partially_agreed ──last consent──▶ completing ──▶ completed
      │               │ ╲                   │ ╲                                 (complete_contract)
      └──cancel──▶ cancelled ◀──cancel──────┘  ╲
                      decline ▶ declined ◀──────╲── decline
                      run_due ▶ expired  ◀────────── run_due (past expires_at)

Concurrency. Every service that changes a contract first *locks* it with a no-op ``UPDATE`` of
its row: on PostgreSQL that takes the row lock until commit, on SQLite the database write lock
(SQLite runs the reads before it outside a transaction, so nothing stale is kept). All changes
to a contract and all appends to its audit chain are therefore serialised, and state is re-read
after the lock. Decisions are additionally atomic conditional ``UPDATE``\\ s checked by
``rowcount`` (``… SET status='consented' WHERE id=… AND status='pending'``), so a double click
or two concurrent requests give exactly one consent.

Completion (:func:`complete_contract`) runs outside any long transaction: it *claims* the
contract with ``UPDATE … SET completion_owner=…, completion_lease_until=now+lease WHERE
status='completing' AND (lease is free or expired)``; only the claimant signs. The final file
``KOIN_HOME/contracts/<public id>/final.pdf`` is deterministic and write-once (published with
``link(2)``, which fails if it exists): a run that finds it (a previous run died after signing,
before recording) checks it and reuses it instead of signing again. The final transaction
re-checks the claim, records everything at once and marks the contract completed.

Services take the caller's session and work in its transaction (the caller commits), except
:func:`complete_contract` and :func:`run_due`, which take a session factory and commit their own
steps. After a :func:`consent` whose result says ``completing``, the caller commits and then
calls :func:`complete_contract`; :func:`run_due` finishes any contract left in ``completing``.

URLs in mails: invitation and reminder ``{public_url}/c/{token}``, completion (download)
``{public_url}/d/{token}``, officer ``{public_url}/contracts/{public_id}``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import io
import logging
import os
import re
import secrets
import shutil
import tempfile
import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from asn1crypto import cms
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation import validate_pdf_signature
from pyhanko.sign.validation.errors import SignatureValidationError
from pyhanko.sign.validation.status import SignatureCoverageLevel
from pyhanko_certvalidator import ValidationContext
from sqlalchemy import ColumnElement, case, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from keys import KoinError, Role, atomic_write
from signer import (
    AgreementCertificate,
    AgreementParty,
    Installation,
    SignatureLevel,
    SigningContext,
    SignOptions,
    append_agreement_certificate,
    check_unsigned_pdf,
    new_document_id,
    sign_pdf,
)
from timestamp import TimestampError

from . import _contract_mails as mails
from . import lta, metrics
from ._db import aware_utc, rowcount, session_scope, utcnow
from .accounts import User, UserRole
from .audit import EventData, append_event, chain_head
from .documents import record_signed_document
from .errors import (
    AlreadyResponded,
    CompletionError,
    ContractNotFound,
    ContractNotOpen,
    DocumentMismatch,
    IdentificationRequired,
    InvalidContractData,
    InvalidContractState,
    LinkAlreadyUsed,
    LinkExpired,
    LinkInvalid,
    NotYourTurn,
    PartyLocked,
)
from .models import SigningChannel
from .public_ids import new_public_id
from .workflow_models import (
    AccessLink,
    AuditEvent,
    Contract,
    ContractStatus,
    EventKind,
    Identification,
    LinkPurpose,
    Party,
    PartyRole,
    PartyStatus,
    SigningOrder,
)

__all__ = [
    "COMPLETION_LEASE",
    "DEFAULT_EXPIRY",
    "MAX_CODE_ATTEMPTS",
    "OTP_LIFETIME",
    "CodeOutcome",
    "CodeResult",
    "CompletionOutcome",
    "ConsentResult",
    "Download",
    "JobReport",
    "PartyAnswer",
    "PartySession",
    "PartySpec",
    "add_party",
    "cancel_contract",
    "complete_contract",
    "consent",
    "contract_file",
    "create_contract",
    "decline",
    "get_contract",
    "list_contracts",
    "list_events",
    "list_parties",
    "new_access_code",
    "officer_contract",
    "open_download",
    "open_link",
    "open_signed_copy",
    "party_answer",
    "party_counts",
    "require_contract",
    "resend_invitations",
    "resume_link",
    "run_due",
    "send_contract",
    "verify_code",
    "visible_to",
]

log = logging.getLogger(__name__)

DEFAULT_EXPIRY = dt.timedelta(days=14)
MAX_EXPIRY = dt.timedelta(days=365)
MIN_EXPIRY = dt.timedelta(hours=1)
MIN_PARTIES = 2
MAX_PARTIES = 20
MAX_PDF_BYTES = 50 * 1024 * 1024
#: Wrong codes in a row after which a party is locked.
MAX_CODE_ATTEMPTS = 5
#: Validity of an emailed one-time code.
OTP_LIFETIME = dt.timedelta(minutes=10)
#: Opening the link again within this time does not send another code.
OTP_RESEND_INTERVAL = dt.timedelta(seconds=60)
MIN_ACCESS_CODE_LENGTH = 6
MAX_ACCESS_CODE_LENGTH = 32
#: How long a claim on completing a contract holds before another worker may take over.
COMPLETION_LEASE = dt.timedelta(minutes=10)
#: Validity of the download links in completion mails.
DOWNLOAD_LINK_LIFETIME = dt.timedelta(days=30)
MAX_REMINDER_INTERVAL_DAYS = 60

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")
_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_OPEN = (ContractStatus.SENT.value, ContractStatus.PARTIALLY_AGREED.value)
_E = TypeVar("_E", bound=StrEnum)


# -- values -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartySpec:
    """A party as the officer enters it.

    :ivar access_code: for ``access_code`` identification, the code the officer will pass on
        by phone or paper (6–32 letters or digits; see :func:`new_access_code`). Only its hash
        is stored.
    """

    name: str
    email: str
    role: PartyRole | str
    identification: Identification | str
    organisation: str = ""
    access_code: str | None = None


@dataclass(frozen=True)
class PartySession:
    """What :func:`open_link` found: the party behind a valid link, to be kept by the web layer
    (e.g. ``party_id`` in a signed session cookie) for :func:`verify_code`, :func:`consent` and
    :func:`decline`.

    :ivar code_sent: a one-time code was emailed by this opening.
    :ivar original_path: relative to ``KOIN_HOME`` (see :func:`contract_file`).
    """

    contract_id: int
    contract_public_id: str
    contract_title: str
    party_id: int
    party_name: str
    identification: Identification
    link_id: int
    code_sent: bool
    original_path: str
    original_sha256: str
    expires_at: dt.datetime
    #: When the party last passed identification; None if not since the link was last opened
    #: (always None from :func:`open_link`).
    identified_at: dt.datetime | None = None


@dataclass(frozen=True)
class PartyAnswer:
    """What became of a party's answer, for the page shown after it (see :func:`party_answer`).

    :ivar signed_copy_available: the party consented and the contract is completed: the signed
        PDF can be fetched with :func:`open_signed_copy`.
    """

    contract_public_id: str
    contract_title: str
    contract_status: ContractStatus
    party_name: str
    party_status: PartyStatus

    @property
    def signed_copy_available(self) -> bool:
        return (
            self.party_status is PartyStatus.CONSENTED
            and self.contract_status is ContractStatus.COMPLETED
        )


class CodeOutcome(StrEnum):
    VERIFIED = "verified"
    WRONG = "wrong"
    #: No valid one-time code: it expired or none was sent (not counted as a failure).
    EXPIRED = "expired"
    #: This wrong code was the last allowed one; the party is now locked.
    LOCKED = "locked"


@dataclass(frozen=True)
class CodeResult:
    """The verdict on a code; wrong codes are results, not exceptions, so that the caller's
    transaction commits the failure count."""

    outcome: CodeOutcome
    attempts_left: int

    @property
    def verified(self) -> bool:
        return self.outcome is CodeOutcome.VERIFIED

    @property
    def message(self) -> str:
        return {
            CodeOutcome.VERIFIED: "本人確認が完了しました。",
            CodeOutcome.WRONG: f"確認コードが正しくありません(あと {self.attempts_left} 回)。",
            CodeOutcome.EXPIRED: "確認コードの有効期限が切れています。リンクを開き直して"
            "新しいコードを受け取ってください。",
            CodeOutcome.LOCKED: "確認コードを続けて間違えたため、ロックされました。"
            "県の担当者にお問い合わせください。",
        }[self.outcome]

    @property
    def message_en(self) -> str:
        return {
            CodeOutcome.VERIFIED: "You have been identified.",
            CodeOutcome.WRONG: f"The code is not correct ({self.attempts_left} attempts left).",
            CodeOutcome.EXPIRED: "The code has expired. Open the link again to receive a new "
            "code.",
            CodeOutcome.LOCKED: "Locked after too many wrong codes. Please contact the "
            "prefecture's officer.",
        }[self.outcome]


@dataclass(frozen=True)
class ConsentResult:
    """:ivar completing: every party has consented; commit, then call
    :func:`complete_contract` with ``contract_id``."""

    contract_id: int
    status: ContractStatus

    @property
    def completing(self) -> bool:
        return self.status is ContractStatus.COMPLETING


class CompletionOutcome(StrEnum):
    #: This call signed (or reused the signed file) and marked the contract completed.
    COMPLETED = "completed"
    ALREADY_COMPLETED = "already_completed"
    #: Another worker holds the claim; it (or the periodic job) finishes.
    IN_PROGRESS = "in_progress"


@dataclass(frozen=True)
class Download:
    """The signed contract behind a download link. ``path`` is relative to ``KOIN_HOME``."""

    contract_public_id: str
    title: str
    path: str
    sha256: str


@dataclass
class JobReport:
    """What :func:`run_due` did; ``failed`` holds ``(public id, message, message_en)`` per
    contract."""

    reminded: list[str] = field(default_factory=list)
    reminders_sent: int = 0
    expired: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)


# -- small helpers ------------------------------------------------------------------------------




def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def _hash_secret(secret: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode("utf-8"), salt=salt, dklen=32, **_SCRYPT)
    encode = base64.b64encode
    return (
        f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}$"
        f"{encode(salt).decode()}${encode(digest).decode()}"
    )


def _check_secret(secret: str, stored: str) -> bool:
    """Constant-time comparison of ``secret`` with a hash from :func:`_hash_secret`."""
    try:
        scheme, n, r, p, salt_text, digest_text = stored.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_text)
        expected = base64.b64decode(digest_text)
        actual = hashlib.scrypt(
            secret.encode("utf-8"), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def _normalize_code(text: str) -> str:
    """Codes as people type them: full-width digits, spaces and hyphens, any case."""
    folded = unicodedata.normalize("NFKC", text)
    return "".join(ch for ch in folded if not ch.isspace() and ch != "-").upper()


def new_access_code() -> str:
    """A random 8-digit access code for the officer to pass on by phone or paper."""
    return f"{secrets.randbelow(10**8):08d}"


def _new_otp() -> str:
    return f"{secrets.randbelow(10**6):06d}"


def _text(field_name: str, value: str, max_length: int, *, required: bool = True) -> str:
    cleaned = " ".join(unicodedata.normalize("NFC", value or "").split())
    if required and not cleaned:
        raise InvalidContractData(
            field_name, f"{field_name} を入力してください。", f"{field_name} is required."
        )
    if len(cleaned) > max_length:
        raise InvalidContractData(
            field_name,
            f"{field_name} は {max_length} 文字以内にしてください。",
            f"{field_name} must be at most {max_length} characters.",
        )
    return cleaned


def _email(value: str) -> str:
    address = (value or "").strip()
    if len(address) > 254 or not _EMAIL.match(address):
        raise InvalidContractData(
            "email",
            f"メールアドレス「{address[:80]}」の形式が正しくありません。",
            f"The email address '{address[:80]}' is not valid.",
        )
    local, domain = address.rsplit("@", 1)
    return f"{local}@{domain.lower()}"


def _choice(kind: type[_E], value: _E | str, field_name: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(item.value for item in kind)
        raise InvalidContractData(
            field_name,
            f"{field_name} は {allowed} のいずれかにしてください。",
            f"{field_name} must be one of {allowed}, not {value!r}.",
        ) from None


def _public_url(url: str) -> str:
    base = url.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"public_url must be an http(s) URL, got {url!r}")
    return base


def contract_file(home: Path, relative: str) -> Path:
    """The file ``relative`` (as stored on a contract) below ``home``.

    :raises ValueError: ``relative`` would leave ``home``.
    """
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"not a path inside KOIN_HOME: {relative!r}")
    return home / path


# -- reading ------------------------------------------------------------------------------------


def get_contract(session: Session, public_id: str) -> Contract | None:
    """The contract with this public ID, or None."""
    if not public_id or len(public_id) > 32:
        return None
    return session.scalar(select(Contract).where(Contract.public_id == public_id))


def require_contract(session: Session, public_id: str) -> Contract:
    """:raises ContractNotFound: there is no such contract."""
    contract = get_contract(session, public_id)
    if contract is None:
        raise ContractNotFound(public_id)
    return contract


def visible_to(user: User) -> list[ColumnElement[bool]]:
    """The conditions of the contracts ``user`` may see: an officer their own, an
    administrator every contract."""
    return [] if UserRole.ADMIN in user.roles else [Contract.created_by == user.id]


def officer_contract(session: Session, public_id: str, user: User) -> Contract:
    """The contract with this public ID, if ``user`` may see it (see :func:`visible_to`).

    :raises ContractNotFound: no such contract, or another officer's (the same answer, so
        that nobody learns which IDs exist).
    """
    contract = get_contract(session, public_id)
    if contract is None or not (
        contract.created_by == user.id or UserRole.ADMIN in user.roles
    ):
        raise ContractNotFound(public_id[:40])
    return contract


def list_contracts(
    session: Session,
    user: User,
    *,
    status: ContractStatus | str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[Contract]:
    """The contracts ``user`` may see (see :func:`visible_to`), newest first.

    :raises InvalidContractData: ``status`` is not a contract status (field ``status``).
    """
    query = select(Contract).where(*visible_to(user))
    if status is not None:
        query = query.where(Contract.status == _choice(ContractStatus, status, "status").value)
    query = query.order_by(Contract.created_at.desc(), Contract.id.desc())
    return list(session.scalars(query.offset(max(0, offset)).limit(max(0, limit))))


def party_counts(session: Session, contract_ids: Collection[int]) -> dict[int, tuple[int, int]]:
    """``(parties, consented)`` per contract row id (contracts without parties are left out)."""
    if not contract_ids:
        return {}
    rows = session.execute(
        select(
            Party.contract_id,
            func.count(),
            func.sum(case((Party.status == PartyStatus.CONSENTED.value, 1), else_=0)),
        )
        .where(Party.contract_id.in_(list(contract_ids)))
        .group_by(Party.contract_id)
    )
    return {int(cid): (int(total), int(agreed or 0)) for cid, total, agreed in rows}


def list_parties(session: Session, contract: Contract) -> list[Party]:
    """The parties of ``contract`` in order, freshly read."""
    return list(
        session.scalars(
            select(Party)
            .where(Party.contract_id == contract.id)
            .order_by(Party.position)
            .execution_options(populate_existing=True)
        )
    )


def list_events(session: Session, contract: Contract) -> list[AuditEvent]:
    """The audit chain of ``contract``, oldest first."""
    return list(
        session.scalars(
            select(AuditEvent).where(AuditEvent.contract_id == contract.id).order_by(AuditEvent.seq)
        )
    )


# -- locking and state --------------------------------------------------------------------------


def _lock(session: Session, contract_id: int) -> Contract:
    """Lock the contract row until the end of the transaction and return it freshly read.

    :raises ContractNotFound: no such contract.
    """
    result = session.execute(
        update(Contract)
        .where(Contract.id == contract_id)
        .values(status=Contract.status)
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) != 1:
        raise ContractNotFound(str(contract_id))
    contract = session.get(Contract, contract_id, populate_existing=True)
    assert contract is not None
    return contract


def _state_error(contract: Contract, action: str) -> InvalidContractState:
    status = contract.contract_status
    return InvalidContractState(
        contract.public_id, status.value, status.label_ja, status.label_en, action
    )


def _require_open(contract: Contract, moment: dt.datetime) -> None:
    """:raises ContractNotOpen: the contract does not await answers (or its deadline passed)."""
    status = contract.contract_status
    if status.is_open and contract.expires_at <= moment:
        status = ContractStatus.EXPIRED
    if not status.is_open:
        raise ContractNotOpen(status.value, status.label_ja, status.label_en)


def _is_turn(contract: Contract, party: Party, parties: Sequence[Party]) -> bool:
    if contract.order is SigningOrder.PARALLEL:
        return True
    return all(
        other.status == PartyStatus.CONSENTED.value
        for other in parties
        if other.position < party.position
    )


def _awaiting(contract: Contract, parties: Sequence[Party]) -> list[Party]:
    """Parties who should have a link now: pending, not locked, and (sequential) next."""
    pending = [p for p in parties if p.status == PartyStatus.PENDING.value and not p.locked]
    if contract.order is SigningOrder.SEQUENTIAL:
        return [p for p in pending if _is_turn(contract, p, parties)][:1]
    return pending


def _reload_party(session: Session, party: Party | int) -> Party:
    party_id = party if isinstance(party, int) else party.id
    fresh = session.get(Party, party_id, populate_existing=True)
    if fresh is None:
        raise LinkInvalid()
    return fresh


def _check_can_act(contract: Contract, party: Party, moment: dt.datetime) -> None:
    if party.status != PartyStatus.PENDING.value:
        raise AlreadyResponded(party.status)
    _require_open(contract, moment)
    if party.locked:
        raise PartyLocked()


# -- links and mail -----------------------------------------------------------------------------


def _issue_link(
    session: Session, party: Party, purpose: LinkPurpose, expires_at: dt.datetime
) -> tuple[AccessLink, str]:
    token = secrets.token_urlsafe(32)
    link = AccessLink(
        party_id=party.id,
        token_sha256=_token_digest(token),
        purpose=purpose.value,
        expires_at=expires_at,
    )
    session.add(link)
    session.flush()
    return link, token


def _find_link(session: Session, token: str, purpose: LinkPurpose) -> AccessLink:
    """:raises LinkInvalid: malformed, unknown, or a link of the other purpose."""
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise LinkInvalid()
    link = session.scalar(
        select(AccessLink)
        .where(AccessLink.token_sha256 == _token_digest(token))
        .execution_options(populate_existing=True)
    )
    if link is None or link.purpose != purpose.value:
        raise LinkInvalid()
    return link


def _enqueue(session: Session, to: str, mail: mails.Mail) -> None:
    from .mail import enqueue_mail

    enqueue_mail(session, to=to, subject=mail.subject, text=mail.text, tag=mail.tag)


def _officer_email(session: Session, user_id: int) -> str | None:
    from .accounts import User

    user = session.get(User, user_id)
    return user.email if user is not None and user.is_active else None


def _notify_officer(
    session: Session, contract: Contract, mail: mails.Mail, moment: dt.datetime
) -> None:
    address = _officer_email(session, contract.created_by)
    if address is None:
        return
    _enqueue(session, address, mail)
    append_event(
        session, contract, EventKind.EMAIL_QUEUED, time=moment, email=address,
        details={"purpose": mail.tag, "recipient": "officer", "officer_id": contract.created_by},
    )


def _announce(
    session: Session, contract: Contract, moment: dt.datetime, public_url: str
) -> None:
    """Queue the webhook ``contract.<status>`` in this transaction (see
    :mod:`contracts.webhooks`), for the contract's new status."""
    from .webhooks import contract_event_data, enqueue_event

    data = contract_event_data(
        contract_id=contract.public_id, title=contract.title, status=contract.status,
        time=moment, public_url=public_url,
    )
    enqueue_event(session, f"contract.{contract.status}", data, now=moment)


def _sent_public_url(session: Session, contract: Contract) -> str:
    """The service URL the contract was sent under (recorded with its ``sent`` event; every
    contract that can be declined was sent, the default is for a hand-edited database)."""
    url = session.scalar(
        select(AuditEvent.details).where(
            AuditEvent.contract_id == contract.id, AuditEvent.kind == EventKind.SENT.value
        ).order_by(AuditEvent.seq).limit(1)
    )
    return _public_url(str((url or {}).get("public_url") or "http://127.0.0.1:5000"))


def _invite(
    session: Session,
    contract: Contract,
    party: Party,
    public_url: str,
    moment: dt.datetime,
    *,
    kind: EventKind = EventKind.EMAIL_QUEUED,
) -> None:
    """A new sign link for ``party`` and the mail carrying it (invitation or reminder)."""
    reminder = kind is EventKind.REMINDED
    link, token = _issue_link(session, party, LinkPurpose.SIGN, contract.expires_at)
    mail = mails.invitation(
        name=party.name,
        title=contract.title,
        public_id=contract.public_id,
        link=f"{public_url}/c/{token}",
        expires_at=contract.expires_at,
        identification=party.method,
        reminder=reminder,
    )
    _enqueue(session, party.email, mail)
    if reminder:
        party.reminded_at = moment
    elif party.invited_at is None:
        party.invited_at = moment
    append_event(
        session, contract, kind, time=moment, party_id=party.id, email=party.email,
        identification=party.identification,
        details={"purpose": mail.tag, "link_id": link.id, "link_expires_at": _iso(link.expires_at)},
    )


# -- creating and sending -----------------------------------------------------------------------


def _checked_party(spec: PartySpec) -> dict[str, Any]:
    """One party's columns from what the officer entered (the access code hashed).

    :raises InvalidContractData: unusable role, identification, email, code or name.
    """
    role = _choice(PartyRole, spec.role, "role")
    method = _choice(Identification, spec.identification, "identification")
    email = _email(spec.email)
    code_hash = None
    if method is Identification.ACCESS_CODE:
        code = _normalize_code(spec.access_code or "")
        if not (
            MIN_ACCESS_CODE_LENGTH <= len(code) <= MAX_ACCESS_CODE_LENGTH
            and code.isascii()
            and code.isalnum()
        ):
            raise InvalidContractData(
                "access_code",
                f"アクセスコードは英数字 {MIN_ACCESS_CODE_LENGTH}〜{MAX_ACCESS_CODE_LENGTH} "
                "文字にしてください。",
                f"An access code must be {MIN_ACCESS_CODE_LENGTH} to "
                f"{MAX_ACCESS_CODE_LENGTH} letters or digits.",
            )
        code_hash = _hash_secret(code)
    elif spec.access_code:
        raise InvalidContractData(
            "access_code",
            "メール認証の当事者にはアクセスコードを指定しません。",
            "An access code is only for parties identified by access code.",
        )
    return {
        "name": _text("name", spec.name, 200),
        "organisation": _text("organisation", spec.organisation, 200, required=False),
        "email": email,
        "role": role.value,
        "identification": method.value,
        "access_code_hash": code_hash,
    }


def _duplicate_email(email: str) -> InvalidContractData:
    return InvalidContractData(
        "email",
        f"メールアドレス {email} が複数の当事者に指定されています。",
        f"The email address {email} is given for more than one party.",
    )


def _check_count(count: int) -> None:
    """:raises InvalidContractData: (field ``parties``) fewer than 2 or more than 20."""
    if not MIN_PARTIES <= count <= MAX_PARTIES:
        raise InvalidContractData(
            "parties",
            f"当事者は {MIN_PARTIES} 〜 {MAX_PARTIES} 名にしてください。",
            f"A contract needs {MIN_PARTIES} to {MAX_PARTIES} parties, got {count}.",
        )


def _check_sides(roles: Collection[str]) -> None:
    """:raises InvalidContractData: (field ``parties``) not both the prefecture and a
    contractor."""
    if set(roles) != {PartyRole.PREFECTURE.value, PartyRole.CONTRACTOR.value}:
        raise InvalidContractData(
            "parties",
            "当事者には茨城県側と契約相手方の両方が必要です。",
            "A contract needs at least one prefecture party and one contractor.",
        )


def _checked_parties(
    parties: Sequence[PartySpec], *, complete: bool = True
) -> list[dict[str, Any]]:
    """The parties' columns. ``complete=False`` (a draft still being put together) allows 0
    to 20 parties of any sides; :func:`send_contract` checks them in full.

    :raises InvalidContractData: as :func:`_checked_party`; a repeated email address; and
        with ``complete``, too few or too many parties or not both sides.
    """
    if complete or len(parties) > MAX_PARTIES:
        _check_count(len(parties))
    checked: list[dict[str, Any]] = []
    seen: set[str] = set()
    for spec in parties:
        item = _checked_party(spec)
        if item["email"].casefold() in seen:
            raise _duplicate_email(item["email"])
        seen.add(item["email"].casefold())
        checked.append(item)
    if complete:
        _check_sides({item["role"] for item in checked})
    return checked


def create_contract(
    session: Session,
    *,
    home: Path,
    officer_id: int,
    title: str,
    pdf: bytes,
    parties: Sequence[PartySpec],
    order: SigningOrder | str = SigningOrder.PARALLEL,
    expires_in: dt.timedelta = DEFAULT_EXPIRY,
    reminder_interval_days: int = 3,
    allow_incomplete: bool = False,
    now: dt.datetime | None = None,
) -> Contract:
    """Create a draft contract: store the PDF as ``KOIN_HOME/contracts/<public id>/original.pdf``
    (atomically) and record the contract, its parties and the ``created`` event.

    With ``allow_incomplete`` the parties may still be incomplete (none, one, or only one side;
    at most 20): :func:`add_party` adds the others and :func:`send_contract` checks them.

    :raises InvalidContractData: unusable title, parties, codes, expiry or reminder interval,
        or an unknown officer.
    :raises InvalidPdfError: the PDF is not readable (see :func:`signer.check_unsigned_pdf`).
    :raises EncryptedPdfError: the PDF is encrypted.
    :raises AlreadySignedPdfError: the PDF already carries a signature.
    """
    from .accounts import User

    moment = aware_utc(now)
    clean_title = _text("title", title, 200)
    signing_order = _choice(SigningOrder, order, "order")
    if not MIN_EXPIRY <= expires_in <= MAX_EXPIRY:
        raise InvalidContractData(
            "expires_in",
            "回答期限は1時間後から365日後までの間にしてください。",
            "The deadline must be between one hour and 365 days ahead.",
        )
    if not 0 <= reminder_interval_days <= MAX_REMINDER_INTERVAL_DAYS:
        raise InvalidContractData(
            "reminder_interval_days",
            f"督促の間隔は 0〜{MAX_REMINDER_INTERVAL_DAYS} 日にしてください。",
            f"The reminder interval must be 0 to {MAX_REMINDER_INTERVAL_DAYS} days.",
        )
    specs = _checked_parties(parties, complete=not allow_incomplete)
    if len(pdf) > MAX_PDF_BYTES:
        raise InvalidContractData(
            "pdf",
            f"PDF が大きすぎます({MAX_PDF_BYTES // 2**20} MiB まで)。",
            f"The PDF is too large (at most {MAX_PDF_BYTES // 2**20} MiB).",
        )
    pages = check_unsigned_pdf(pdf)
    if session.get(User, officer_id) is None:
        raise InvalidContractData(
            "officer_id", "担当職員が見つかりません。", f"There is no user {officer_id}."
        )

    public_id = new_public_id()
    relative = f"contracts/{public_id}/original.pdf"
    path = contract_file(home, relative)
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=False)
    try:
        atomic_write(path, pdf, mode=0o640)
        digest = _sha256(pdf)
        contract = Contract(
            public_id=public_id,
            document_id=new_document_id(),
            title=clean_title,
            original_path=relative,
            original_sha256=digest,
            page_count=pages,
            status=ContractStatus.DRAFT.value,
            signing_order=signing_order.value,
            expires_at=moment + expires_in,
            created_by=officer_id,
            created_at=moment,
            reminder_interval_days=reminder_interval_days,
        )
        session.add(contract)
        session.flush()
        for position, spec in enumerate(specs, start=1):
            session.add(Party(contract_id=contract.id, position=position, **spec))
        session.flush()
        append_event(
            session, contract, EventKind.CREATED, time=moment, document_sha256=digest,
            details={
                "title": clean_title,
                "officer_id": officer_id,
                "page_count": pages,
                "signing_order": signing_order.value,
                "expires_at": _iso(contract.expires_at),
                "parties": [
                    {k: spec[k] for k in ("name", "organisation", "email", "role",
                                          "identification")}
                    for spec in specs
                ],
            },
        )
    except BaseException:
        shutil.rmtree(path.parent, ignore_errors=True)
        raise
    return contract


def add_party(
    session: Session, contract: Contract, spec: PartySpec, *, now: dt.datetime | None = None
) -> Party:
    """Add a party to a draft, after the others (its place in a sequential order). Nothing is
    mailed until :func:`send_contract`, whose ``sent`` event records the parties as sent.

    :raises InvalidContractState: the contract is not a draft.
    :raises InvalidContractData: the party is unusable (as in :func:`create_contract`), its
        email address is another party's (field ``email``), or the contract already has 20
        parties (field ``parties``).
    """
    moment = aware_utc(now)
    contract = _lock(session, contract.id)
    if contract.contract_status is not ContractStatus.DRAFT:
        raise _state_error(contract, "add_party")
    parties = list_parties(session, contract)
    if len(parties) >= MAX_PARTIES:
        _check_count(len(parties) + 1)
    item = _checked_party(spec)
    if any(p.email.casefold() == item["email"].casefold() for p in parties):
        raise _duplicate_email(item["email"])
    position = max((p.position for p in parties), default=0) + 1
    party = Party(contract_id=contract.id, position=position, **item)
    session.add(party)
    session.flush()
    log.info("contract %s: party %s added at %s", contract.public_id, position, _iso(moment))
    return party


def _party_record(party: Party) -> dict[str, Any]:
    return {
        "position": party.position, "name": party.name, "organisation": party.organisation,
        "email": party.email, "role": party.role, "identification": party.identification,
    }


def send_contract(
    session: Session, contract: Contract, *, public_url: str, now: dt.datetime | None = None
) -> None:
    """Send a draft: ``draft`` → ``sent``; one link and invitation mail per party (sequential
    contracts: only the first party now, each next one when the previous consents). The
    ``sent`` event records the parties as sent.

    :raises InvalidContractState: the contract is not a draft.
    :raises InvalidContractData: its deadline has already passed (field ``expires_at``), or
        its parties are not 2 to 20 with both sides (field ``parties``).
    """
    moment = aware_utc(now)
    base = _public_url(public_url)
    contract = _lock(session, contract.id)
    if contract.contract_status is not ContractStatus.DRAFT:
        raise _state_error(contract, "send")
    if contract.expires_at <= moment:
        raise InvalidContractData(
            "expires_at",
            "回答期限が過ぎているため送付できません。契約を作り直してください。",
            "The deadline has passed; create the contract again.",
        )
    parties = list_parties(session, contract)
    _check_count(len(parties))
    _check_sides({party.role for party in parties})
    contract.status = ContractStatus.SENT.value
    contract.sent_at = moment
    append_event(
        session, contract, EventKind.SENT, time=moment,
        document_sha256=contract.original_sha256,
        details={"public_url": base, "parties": [_party_record(p) for p in parties]},
    )
    for party in _awaiting(contract, parties):
        _invite(session, contract, party, base, moment)


def resend_invitations(
    session: Session,
    contract: Contract,
    *,
    public_url: str,
    party_ids: Collection[int] | None = None,
    now: dt.datetime | None = None,
) -> int:
    """Send fresh links to the parties who should answer now (all, or those in ``party_ids``);
    their earlier unused links stop working. Returns how many mails were queued.

    :raises InvalidContractState: the contract does not await answers.
    """
    moment = aware_utc(now)
    base = _public_url(public_url)
    contract = _lock(session, contract.id)
    if not contract.contract_status.is_open or contract.expires_at <= moment:
        raise _state_error(contract, "resend")
    count = 0
    for party in _awaiting(contract, list_parties(session, contract)):
        if party_ids is not None and party.id not in party_ids:
            continue
        session.execute(
            update(AccessLink)
            .where(
                AccessLink.party_id == party.id,
                AccessLink.purpose == LinkPurpose.SIGN.value,
                AccessLink.used_at.is_(None),
                AccessLink.expires_at > moment,
            )
            .values(expires_at=moment)
            .execution_options(synchronize_session=False)
        )
        _invite(session, contract, party, base, moment)
        count += 1
    return count


def cancel_contract(
    session: Session,
    contract: Contract,
    *,
    officer_id: int,
    reason: str = "",
    now: dt.datetime | None = None,
) -> None:
    """Withdraw a contract (``draft``, ``sent`` or ``partially_agreed`` → ``cancelled``); invited
    parties who have not answered get a notice. Links stop working.

    :raises InvalidContractState: the contract is completing, completed or already closed.
    """
    moment = aware_utc(now)
    contract = _lock(session, contract.id)
    status = contract.contract_status
    if status not in (ContractStatus.DRAFT, ContractStatus.SENT, ContractStatus.PARTIALLY_AGREED):
        raise _state_error(contract, "cancel")
    contract.status = ContractStatus.CANCELLED.value
    append_event(
        session, contract, EventKind.CANCELLED, time=moment,
        details={
            "officer_id": officer_id,
            "reason": _text("reason", reason, 1000, required=False),
            "previous_status": status.value,
        },
    )
    for party in list_parties(session, contract):
        if party.invited_at is None or party.status != PartyStatus.PENDING.value:
            continue
        mail = mails.cancellation(
            name=party.name, title=contract.title, public_id=contract.public_id
        )
        _enqueue(session, party.email, mail)
        append_event(
            session, contract, EventKind.EMAIL_QUEUED, time=moment, party_id=party.id,
            email=party.email, details={"purpose": mail.tag},
        )


# -- the party's side ---------------------------------------------------------------------------


def _send_otp(session: Session, contract: Contract, party: Party, moment: dt.datetime) -> None:
    code = _new_otp()
    party.otp_hash = _hash_secret(code)
    party.otp_sent_at = moment
    party.otp_expires_at = moment + OTP_LIFETIME
    _enqueue(
        session,
        party.email,
        mails.one_time_code(
            name=party.name, title=contract.title, code=code, expires_at=party.otp_expires_at
        ),
    )
    append_event(
        session, contract, EventKind.CODE_SENT, time=moment, party_id=party.id,
        email=party.email, identification=party.identification,
        details={"expires_at": _iso(party.otp_expires_at)},
    )


def open_link(
    session: Session,
    token: str,
    *,
    ip: str | None,
    user_agent: str | None,
    now: dt.datetime | None = None,
) -> PartySession:
    """A party opens the link from an invitation or reminder mail.

    Records ``opened``; the party has to identify again (every opening, in any browser). For
    ``email_otp`` parties a new one-time code is emailed, unless one was sent less than a
    minute ago and is still valid.

    :raises LinkInvalid: the token is malformed, unknown (forged) or not an invitation link.
    :raises LinkAlreadyUsed: the link was used to answer already.
    :raises AlreadyResponded: the party answered (with another link).
    :raises ContractNotOpen: the contract is not awaiting answers (draft, completing,
        completed, declined, cancelled, expired, or past its deadline).
    :raises LinkExpired: the link has expired (e.g. replaced by a resent one).
    :raises PartyLocked: the party is locked after too many wrong codes.
    :raises NotYourTurn: sequential contract, an earlier party has not consented.
    """
    moment = aware_utc(now)
    found = _find_link(session, token, LinkPurpose.SIGN)
    party = session.get(Party, found.party_id)
    if party is None:  # pragma: no cover - foreign key
        raise LinkInvalid()
    contract = _lock(session, party.contract_id)
    link = session.get(AccessLink, found.id, populate_existing=True)
    party = _reload_party(session, party)
    assert link is not None
    _check_sign_link(session, contract, party, link, moment)

    party.identified_at = None
    append_event(
        session, contract, EventKind.OPENED, time=moment, party_id=party.id, ip=ip,
        user_agent=user_agent, email=party.email, identification=party.identification,
        document_sha256=contract.original_sha256, details={"link_id": link.id},
    )
    code_sent = False
    if party.method is Identification.EMAIL_OTP:
        recent = (
            party.otp_hash is not None
            and party.otp_sent_at is not None
            and party.otp_expires_at is not None
            and moment - party.otp_sent_at < OTP_RESEND_INTERVAL
            and party.otp_expires_at > moment
        )
        if not recent:
            _send_otp(session, contract, party, moment)
            code_sent = True
    return _party_session(contract, party, link, code_sent=code_sent)


def _check_sign_link(
    session: Session, contract: Contract, party: Party, link: AccessLink, moment: dt.datetime
) -> None:
    """The checks of an invitation link before a party may use it (see :func:`open_link`)."""
    if link.used_at is not None:
        raise LinkAlreadyUsed()
    if party.status != PartyStatus.PENDING.value:
        raise AlreadyResponded(party.status)
    _require_open(contract, moment)
    if link.expires_at <= moment:
        raise LinkExpired()
    if party.locked:
        raise PartyLocked()
    # (parallel contracts: always the party's turn, no need to read the others)
    if contract.order is SigningOrder.SEQUENTIAL and not _is_turn(
        contract, party, list_parties(session, contract)
    ):
        raise NotYourTurn()


def _party_session(
    contract: Contract, party: Party, link: AccessLink, *, code_sent: bool
) -> PartySession:
    return PartySession(
        contract_id=contract.id,
        contract_public_id=contract.public_id,
        contract_title=contract.title,
        party_id=party.id,
        party_name=party.name,
        identification=party.method,
        link_id=link.id,
        code_sent=code_sent,
        original_path=contract.original_path,
        original_sha256=contract.original_sha256,
        expires_at=contract.expires_at,
        identified_at=party.identified_at,
    )


def _party_link(
    session: Session, token: str, party_id: int
) -> tuple[Contract, Party, AccessLink]:
    """The invitation link ``token`` of ``party_id``, freshly read (without a lock).

    :raises LinkInvalid: malformed, unknown, not an invitation link, or another party's.
    """
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise LinkInvalid()
    # one query for the three rows: every page view of a party comes through here
    found = session.execute(
        select(AccessLink, Party, Contract)
        .join(Party, Party.id == AccessLink.party_id)
        .join(Contract, Contract.id == Party.contract_id)
        .where(AccessLink.token_sha256 == _token_digest(token))
        .execution_options(populate_existing=True)
    ).one_or_none()
    if found is None:
        raise LinkInvalid()
    link, party, contract = found
    if link.purpose != LinkPurpose.SIGN.value or link.party_id != party_id:
        raise LinkInvalid()
    return contract, party, link


def resume_link(
    session: Session,
    token: str,
    party_id: int,
    *,
    require_identification: bool = True,
    now: dt.datetime | None = None,
) -> PartySession:
    """The party comes back to a page of a link it has opened (the code form, the review page,
    a page image, the original PDF): the checks of :func:`open_link`, but nothing is recorded,
    no code is sent and the identification stays. ``party_id`` is the one :func:`open_link`
    returned for this token (kept by the web layer), so a session cannot act with another
    party's link.

    :raises LinkInvalid: the token is malformed, unknown, not an invitation link, or not
        ``party_id``'s.
    :raises LinkAlreadyUsed: the link was used to answer already.
    :raises AlreadyResponded: the party answered (with another link).
    :raises ContractNotOpen: the contract is not awaiting answers.
    :raises LinkExpired: the link has expired.
    :raises PartyLocked: the party is locked after too many wrong codes.
    :raises NotYourTurn: sequential contract, an earlier party has not consented.
    :raises IdentificationRequired: ``require_identification`` and the party has not
        identified since the link was last opened (here or in another browser).
    """
    moment = aware_utc(now)
    contract, party, link = _party_link(session, token, party_id)
    _check_sign_link(session, contract, party, link, moment)
    if require_identification and party.identified_at is None:
        raise IdentificationRequired()
    return _party_session(contract, party, link, code_sent=False)


def party_answer(session: Session, token: str, party_id: int) -> PartyAnswer:
    """What became of the answer ``party_id`` gave with the invitation link ``token`` (read
    only; the party may still be pending when it has not answered).

    :raises LinkInvalid: the token is malformed, unknown, not an invitation link, or not
        ``party_id``'s.
    """
    contract, party, _ = _party_link(session, token, party_id)
    return PartyAnswer(
        contract_public_id=contract.public_id,
        contract_title=contract.title,
        contract_status=contract.contract_status,
        party_name=party.name,
        party_status=party.party_status,
    )


def verify_code(
    session: Session,
    party: Party | int,
    code: str,
    *,
    ip: str | None,
    user_agent: str | None,
    now: dt.datetime | None = None,
) -> CodeResult:
    """Check the party's access code or one-time code (constant-time). A wrong code counts
    towards the lock (the 5th wrong code in a row locks the party and tells the officer); the
    result says which. Commit the session in every case.

    :raises AlreadyResponded, ContractNotOpen: the party can no longer act.
    :raises PartyLocked: the party was already locked.
    """
    moment = aware_utc(now)
    current = _reload_party(session, party)
    contract = _lock(session, current.contract_id)
    current = _reload_party(session, current)
    _check_can_act(contract, current, moment)
    event_fields: dict[str, Any] = {
        "party_id": current.id, "ip": ip, "user_agent": user_agent, "email": current.email,
        "identification": current.identification,
    }
    attempts_left = MAX_CODE_ATTEMPTS - current.failed_code_attempts
    if current.method is Identification.EMAIL_OTP:
        if current.otp_hash is None or (
            current.otp_expires_at is not None and current.otp_expires_at <= moment
        ):
            append_event(
                session, contract, EventKind.CODE_FAILED, time=moment,
                details={"reason": "no_valid_code"}, **event_fields,
            )
            return CodeResult(CodeOutcome.EXPIRED, attempts_left)
        stored = current.otp_hash
    else:
        stored = current.access_code_hash or ""
    if _check_secret(_normalize_code(code or "")[:64], stored):
        current.identified_at = moment
        current.failed_code_attempts = 0
        current.otp_hash = None
        current.otp_expires_at = None
        append_event(session, contract, EventKind.CODE_VERIFIED, time=moment, **event_fields)
        return CodeResult(CodeOutcome.VERIFIED, MAX_CODE_ATTEMPTS)

    session.execute(
        update(Party)
        .where(Party.id == current.id, Party.locked.is_(False))
        .values(
            failed_code_attempts=Party.failed_code_attempts + 1,
            locked=Party.failed_code_attempts + 1 >= MAX_CODE_ATTEMPTS,
        )
        .execution_options(synchronize_session=False)
    )
    current = _reload_party(session, current)
    attempts_left = max(0, MAX_CODE_ATTEMPTS - current.failed_code_attempts)
    append_event(
        session, contract, EventKind.CODE_FAILED, time=moment,
        details={"reason": "wrong_code", "failed_attempts": current.failed_code_attempts},
        **event_fields,
    )
    if not current.locked:
        return CodeResult(CodeOutcome.WRONG, attempts_left)
    current.identified_at = None
    current.otp_hash = None
    append_event(
        session, contract, EventKind.LOCKED, time=moment,
        details={"failed_attempts": current.failed_code_attempts}, **event_fields,
    )
    _notify_officer(
        session, contract,
        mails.locked_notice(
            title=contract.title, public_id=contract.public_id, party_name=current.name
        ),
        moment,
    )
    return CodeResult(CodeOutcome.LOCKED, 0)


def _answerable(
    session: Session, party: Party | int, moment: dt.datetime
) -> tuple[Contract, Party, list[Party]]:
    current = _reload_party(session, party)
    contract = _lock(session, current.contract_id)
    current = _reload_party(session, current)
    _check_can_act(contract, current, moment)
    if current.identified_at is None:
        raise IdentificationRequired()
    parties = list_parties(session, contract)
    if not _is_turn(contract, current, parties):
        raise NotYourTurn()
    return contract, current, parties


def _decide(
    session: Session, party: Party, status: PartyStatus, moment: dt.datetime, **values: Any
) -> None:
    """The atomic decision: exactly one request turns a pending party into ``status``.

    :raises AlreadyResponded: another request decided first.
    """
    result = session.execute(
        update(Party)
        .where(
            Party.id == party.id,
            Party.status == PartyStatus.PENDING.value,
            Party.locked.is_(False),
            Party.identified_at.is_not(None),
        )
        .values(status=status.value, acted_at=moment, **values)
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) != 1:
        raise AlreadyResponded(_reload_party(session, party).status)
    session.execute(
        update(AccessLink)
        .where(
            AccessLink.party_id == party.id,
            AccessLink.purpose == LinkPurpose.SIGN.value,
            AccessLink.used_at.is_(None),
        )
        .values(used_at=moment)
        .execution_options(synchronize_session=False)
    )
    _reload_party(session, party)


def consent(
    session: Session,
    party: Party | int,
    *,
    document_sha256_seen: str,
    ip: str | None,
    user_agent: str | None,
    public_url: str,
    now: dt.datetime | None = None,
) -> ConsentResult:
    """The identified party consents to the document it reviewed.

    The contract becomes ``partially_agreed`` (sequential: the next party is invited) or, with
    the last consent, ``completing``: then commit and call :func:`complete_contract`.

    :raises IdentificationRequired: the party has not identified since opening the link.
    :raises DocumentMismatch: ``document_sha256_seen`` is not the contract's original.
    :raises AlreadyResponded: the party answered already (also the loser of a double click).
    :raises ContractNotOpen, PartyLocked, NotYourTurn: the party cannot act now.
    """
    moment = aware_utc(now)
    base = _public_url(public_url)
    contract, current, _ = _answerable(session, party, moment)
    seen = (document_sha256_seen or "").strip().lower()
    if not hmac.compare_digest(seen.encode(), contract.original_sha256.encode()):
        raise DocumentMismatch()
    _decide(
        session, current, PartyStatus.CONSENTED, moment,
        consent_ip=ip[:45] if ip else ip,
        consent_user_agent=user_agent[:512] if user_agent else user_agent,
        document_sha256_seen=seen,
    )
    parties = list_parties(session, contract)
    remaining = [p for p in parties if p.status != PartyStatus.CONSENTED.value]
    append_event(
        session, contract, EventKind.CONSENTED, time=moment, party_id=current.id, ip=ip,
        user_agent=user_agent, email=current.email, identification=current.identification,
        document_sha256=seen,
        details={
            "identified_at": _iso(current.identified_at or moment),
            "remaining_parties": len(remaining),
        },
    )
    if not remaining:
        contract.status = ContractStatus.COMPLETING.value
        contract.completion_owner = None
        contract.completion_lease_until = None
    else:
        contract.status = ContractStatus.PARTIALLY_AGREED.value
        if contract.order is SigningOrder.SEQUENTIAL:
            for nxt in _awaiting(contract, parties):
                if nxt.invited_at is None:
                    _invite(session, contract, nxt, base, moment)
    return ConsentResult(contract.id, contract.contract_status)


def decline(
    session: Session,
    party: Party | int,
    reason: str,
    *,
    ip: str | None,
    user_agent: str | None,
    public_url: str | None = None,
    now: dt.datetime | None = None,
) -> None:
    """The identified party declines: the contract becomes ``declined``, the officer is told
    and the webhook ``contract.declined`` queued (its URLs under ``public_url``; default: the
    URL the contract was sent under).

    :raises IdentificationRequired: the party has not identified since opening the link.
    :raises AlreadyResponded: the party answered already.
    :raises ContractNotOpen, PartyLocked, NotYourTurn: the party cannot act now.
    """
    moment = aware_utc(now)
    contract, current, _ = _answerable(session, party, moment)
    text = _text("reason", reason, 1000, required=False)
    _decide(
        session, current, PartyStatus.DECLINED, moment, decline_reason=text,
        consent_ip=ip[:45] if ip else ip,
        consent_user_agent=user_agent[:512] if user_agent else user_agent,
    )
    contract.status = ContractStatus.DECLINED.value
    append_event(
        session, contract, EventKind.DECLINED, time=moment, party_id=current.id, ip=ip,
        user_agent=user_agent, email=current.email, identification=current.identification,
        document_sha256=contract.original_sha256, details={"reason": text},
    )
    _announce(
        session, contract, moment,
        _public_url(public_url) if public_url else _sent_public_url(session, contract),
    )
    _notify_officer(
        session, contract,
        mails.declined_notice(
            title=contract.title, public_id=contract.public_id, party_name=current.name,
            reason=text,
        ),
        moment,
    )


def open_download(
    session: Session,
    token: str,
    *,
    ip: str | None,
    user_agent: str | None,
    now: dt.datetime | None = None,
) -> Download:
    """A party fetches the signed contract with the link from the completion mail (records
    ``downloaded``).

    :raises LinkInvalid: the token is malformed, unknown or not a download link.
    :raises LinkExpired: the link has expired.
    :raises ContractNotOpen: the contract is not completed (cannot happen for a real link).
    """
    moment = aware_utc(now)
    found = _find_link(session, token, LinkPurpose.DOWNLOAD)
    if found.expires_at <= moment:
        raise LinkExpired()
    party = _reload_party(session, found.party_id)
    contract = _lock(session, party.contract_id)
    status = contract.contract_status
    if status is not ContractStatus.COMPLETED or not contract.final_path:
        raise ContractNotOpen(status.value, status.label_ja, status.label_en)
    link = session.get(AccessLink, found.id, populate_existing=True)
    assert link is not None
    if link.used_at is None:
        link.used_at = moment
    append_event(
        session, contract, EventKind.DOWNLOADED, time=moment, party_id=party.id, ip=ip,
        user_agent=user_agent, email=party.email, document_sha256=contract.final_sha256,
        details={"link_id": link.id},
    )
    return Download(
        contract.public_id, contract.title, contract.final_path, contract.final_sha256 or ""
    )


def open_signed_copy(
    session: Session,
    token: str,
    party_id: int,
    *,
    ip: str | None,
    user_agent: str | None,
    now: dt.datetime | None = None,
) -> Download:
    """A party who consented with the invitation link ``token`` fetches the signed contract
    from the page shown after its answer (the file of the completion mail's download link;
    records ``downloaded``). ``party_id`` is the one :func:`open_link` returned for the token.

    :raises LinkInvalid: the token is malformed, unknown, not an invitation link, or not
        ``party_id``'s.
    :raises LinkExpired: the link is past its validity (the completion mail's link remains).
    :raises ContractNotOpen: the contract is not completed, or the party did not consent.
    """
    moment = aware_utc(now)
    _, party, found = _party_link(session, token, party_id)
    if found.expires_at <= moment:
        raise LinkExpired()
    contract = _lock(session, party.contract_id)
    party = _reload_party(session, party)
    status = contract.contract_status
    if (
        status is not ContractStatus.COMPLETED
        or not contract.final_path
        or party.status != PartyStatus.CONSENTED.value
    ):
        raise ContractNotOpen(status.value, status.label_ja, status.label_en)
    append_event(
        session, contract, EventKind.DOWNLOADED, time=moment, party_id=party.id, ip=ip,
        user_agent=user_agent, email=party.email, document_sha256=contract.final_sha256,
        details={"link_id": found.id, "link_purpose": LinkPurpose.SIGN.value},
    )
    return Download(
        contract.public_id, contract.title, contract.final_path, contract.final_sha256 or ""
    )


# -- completion ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Snapshot:
    contract_id: int
    public_id: str
    document_id: str
    title: str
    original_path: str
    original_sha256: str
    head_seq: int
    head_sha256: str
    agreed_at: dt.datetime
    parties: tuple[AgreementParty, ...]


@dataclass(frozen=True)
class _Final:
    path: str
    sha256: str
    signed_at: dt.datetime
    page_count: int
    signer_subject: str
    reused: bool


def _claim(session: Session, contract_id: int, owner: str, moment: dt.datetime) -> bool:
    result = session.execute(
        update(Contract)
        .where(
            Contract.id == contract_id,
            Contract.status == ContractStatus.COMPLETING.value,
            or_(
                Contract.completion_lease_until.is_(None),
                Contract.completion_lease_until < moment,
            ),
        )
        .values(completion_owner=owner, completion_lease_until=moment + COMPLETION_LEASE)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


def _release(sessions: sessionmaker[Session], contract_id: int, owner: str) -> None:
    try:
        with session_scope(sessions) as session:
            session.execute(
                update(Contract)
                .where(Contract.id == contract_id, Contract.completion_owner == owner)
                .values(completion_owner=None, completion_lease_until=None)
                .execution_options(synchronize_session=False)
            )
    except Exception:  # the lease expires by itself
        log.warning("could not release the completion claim on contract %s", contract_id)


def _snapshot(session: Session, contract_id: int) -> _Snapshot:
    contract = session.get(Contract, contract_id, populate_existing=True)
    assert contract is not None
    parties = list_parties(session, contract)
    if any(p.status != PartyStatus.CONSENTED.value or p.acted_at is None for p in parties):
        raise CompletionError(
            "同意していない当事者がいるため締結できません。",
            f"Contract {contract.public_id} is completing, but not every party consented.",
        )
    seq, head = chain_head(session, contract)
    return _Snapshot(
        contract_id=contract.id,
        public_id=contract.public_id,
        document_id=contract.document_id,
        title=contract.title,
        original_path=contract.original_path,
        original_sha256=contract.original_sha256,
        head_seq=seq,
        head_sha256=head,
        agreed_at=max(p.acted_at for p in parties if p.acted_at is not None),
        parties=tuple(
            AgreementParty(
                name=p.name,
                organisation=p.organisation,
                email=p.email,
                role_label=p.party_role.label_ja,
                identification_label=p.method.label_ja,
                consented_at=p.acted_at or contract.created_at,
                ip=p.consent_ip,
            )
            for p in parties
        ),
    )


def _witness_reason(snapshot: _Snapshot) -> str:
    return f"{'、'.join(p.name for p in snapshot.parties)} の合意に基づく立会人署名"


def _signer_subject(context: SigningContext) -> str:
    certificate = context.signer.signing_cert
    return certificate.subject.human_friendly if certificate is not None else "?"


def _existing_final(
    path: Path, original: bytes, context: SigningContext, installation: Installation
) -> _Final | None:
    """The final PDF a previous run published, if it is intact: the original as prefix, one
    signature, by our witness certificate, valid and covering the whole file. A file that does
    not pass is moved aside (never served) and None returned."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    problem = None
    try:
        reader = PdfFileReader(io.BytesIO(data))
        signatures = reader.embedded_regular_signatures
        certificate = context.signer.signing_cert
        if not data.startswith(original):
            problem = "does not start with the original"
        elif len(signatures) != 1:
            problem = f"has {len(signatures)} signatures"
        elif certificate is None or signatures[0].signer_cert.dump() != certificate.dump():
            problem = "is not signed by the witness certificate"
        else:
            trust = installation.trust_material()
            status = validate_pdf_signature(
                signatures[0],
                ValidationContext(
                    trust_roots=list(trust.roots), other_certs=list(trust.intermediates),
                    allow_fetching=False, revocation_mode="soft-fail",
                ),
            )
            if not (status.intact and status.valid):
                problem = "signature is not valid"
            elif status.coverage is not SignatureCoverageLevel.ENTIRE_FILE:
                problem = "signature does not cover the whole file"
            else:
                signed_at = signatures[0].self_reported_timestamp or utcnow()
                return _Final(
                    path=str(path),
                    sha256=_sha256(data),
                    signed_at=signed_at.astimezone(dt.UTC),
                    page_count=int(reader.root["/Pages"]["/Count"]),
                    signer_subject=_signer_subject(context),
                    reused=True,
                )
    except (SignatureValidationError, ValueError, KeyError, TypeError, OSError) as exc:
        problem = f"cannot be read: {exc}"
    except Exception as exc:  # pyHanko raises assorted errors on damaged files
        problem = f"cannot be read: {exc.__class__.__name__}: {exc}"
    aside = path.with_name(f"{path.name}.rejected-{secrets.token_hex(4)}")
    log.warning("final PDF %s %s; moved to %s", path, problem, aside)
    os.replace(path, aside)
    return None


def _publish_once(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` unless it exists (atomically, never overwriting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o640)
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            return False
        return True
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _make_final(
    installation: Installation,
    snapshot: _Snapshot,
    context: SigningContext,
    public_url: str,
) -> _Final:
    home = installation.home
    relative = f"contracts/{snapshot.public_id}/final.pdf"
    path = contract_file(home, relative)
    original = contract_file(home, snapshot.original_path).read_bytes()
    if _sha256(original) != snapshot.original_sha256:
        raise CompletionError(
            "保存されている契約書の原本が変更されています。締結できません。",
            f"The stored original of contract {snapshot.public_id} does not match its SHA-256.",
        )
    existing = _existing_final(path, original, context, installation)
    if existing is not None:
        return replace(existing, path=relative)
    certificate = AgreementCertificate(
        title=snapshot.title,
        contract_id=snapshot.public_id,
        document_id=snapshot.document_id,
        original_sha256=snapshot.original_sha256,
        chain_head_sha256=snapshot.head_sha256,
        parties=snapshot.parties,
        agreed_at=snapshot.agreed_at,
        verify_url=f"{public_url}/verify/{snapshot.document_id}",
    )
    unsigned = append_agreement_certificate(original, certificate, installation.font_file)
    options = SignOptions(
        level=SignatureLevel.B_T,
        placement=None,
        reason=_witness_reason(snapshot),
        document_id=snapshot.document_id,
    )
    with metrics.timed_signature(Role.WITNESS):
        result = sign_pdf(unsigned, context, options)
    assert result.data is not None
    if not _publish_once(path, result.data):
        existing = _existing_final(path, original, context, installation)
        if existing is None:
            raise CompletionError(
                "署名済み契約書を保存できませんでした。",
                f"Could not publish the final PDF of contract {snapshot.public_id}.",
            )
        return replace(existing, path=relative)
    pages = int(PdfFileReader(io.BytesIO(result.data)).root["/Pages"]["/Count"])
    return _Final(
        relative, result.sha256, result.signed_at, pages, _signer_subject(context), False
    )


def _timestamp_head(installation: Installation, tsa_urls: Sequence[str], head: str) -> bytes:
    """An RFC 3161 token (DER ContentInfo) over the hex SHA-256 ``head``.

    :raises TimestampError: no TSA answered correctly.
    """
    stamper = installation.timestamper(tsa_urls)
    try:
        token: cms.ContentInfo = asyncio.run(
            stamper.async_timestamp(bytes.fromhex(head), "sha256")
        )
    except TimestampError:
        metrics.count_tsa_error()
        raise
    return bytes(token.dump())


def _tst_time(token: bytes) -> str | None:
    try:
        info = cms.ContentInfo.load(token)["content"]["encap_content_info"]["content"].parsed
        return _iso(info["gen_time"].native)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def complete_contract(
    sessions: sessionmaker[Session],
    contract_id: int,
    installation: Installation,
    *,
    public_url: str | None = None,
    tsa_urls: Sequence[str] = (),
    now: dt.datetime | None = None,
) -> CompletionOutcome:
    """Finish a ``completing`` contract, exactly once: append the certificate of agreement, sign
    with the WITNESS key (B-T, invisible, reason naming the parties), store
    ``contracts/<public id>/final.pdf``, timestamp the audit chain head, record the document in
    ``signed_documents``, mark the contract completed and mail download links.

    Safe to call concurrently and to repeat (see the module docstring); commits its own
    transactions. ``public_url`` defaults to the installation's.

    :raises ContractNotFound: no such contract.
    :raises InvalidContractState: the contract is not (or no longer) completing or completed.
    :raises CompletionError: the stored original was changed, or the final file is unusable.
    :raises KoinError: signing or timestamping failed (the claim is released; retried later).
    """
    base = _public_url(public_url or installation.public_url)
    owner = secrets.token_hex(16)
    with session_scope(sessions) as session:
        if not _claim(session, contract_id, owner, aware_utc(now)):
            contract = session.get(Contract, contract_id, populate_existing=True)
            if contract is None:
                raise ContractNotFound(str(contract_id))
            if contract.contract_status is ContractStatus.COMPLETED:
                return CompletionOutcome.ALREADY_COMPLETED
            if contract.contract_status is ContractStatus.COMPLETING:
                return CompletionOutcome.IN_PROGRESS
            raise _state_error(contract, "complete")
        snapshot = _snapshot(session, contract_id)
    try:
        context = installation.signing_context(Role.WITNESS, tsa_urls=tsa_urls, stamp=False)
        final = _make_final(installation, snapshot, context, base)
        moment = aware_utc(now)
        signed = EventData(
            contract=snapshot.public_id,
            seq=snapshot.head_seq + 1,
            kind=EventKind.SIGNED,
            time=moment,
            prev_sha256=snapshot.head_sha256,
            document_sha256=final.sha256,
            details={
                "document_id": snapshot.document_id,
                "role": Role.WITNESS.value,
                "signer": final.signer_subject,
                "level": SignatureLevel.B_T.value,
                "reason": _witness_reason(snapshot),
                "signed_at": _iso(final.signed_at),
                "certified_chain_head": snapshot.head_sha256,
                "original_sha256": snapshot.original_sha256,
                "final_path": final.path,
                "reused_existing_file": final.reused,
            },
        )
        completed = EventData(
            contract=snapshot.public_id,
            seq=signed.seq + 1,
            kind=EventKind.COMPLETED,
            time=moment,
            prev_sha256=signed.sha256,
            document_sha256=final.sha256,
            details={"original_sha256": snapshot.original_sha256, "final_sha256": final.sha256},
        )
        token = _timestamp_head(installation, tsa_urls, completed.sha256)
        stamped = EventData(
            contract=snapshot.public_id,
            seq=completed.seq + 1,
            kind=EventKind.CHAIN_TIMESTAMPED,
            time=moment,
            prev_sha256=completed.sha256,
            details={
                "chain_head_sha256": completed.sha256,
                "hash_algorithm": "sha256",
                "tsa_time": _tst_time(token),
            },
        )
        with session_scope(sessions) as session:
            outcome = _finish(
                session, snapshot, owner, final, (signed, completed, stamped), token, base, moment
            )
        if outcome is CompletionOutcome.COMPLETED:  # recorded once, when completed
            metrics.count_signed(Role.WITNESS, SignatureLevel.B_T)
        return outcome
    except BaseException:
        _release(sessions, contract_id, owner)
        raise


def _finish(
    session: Session,
    snapshot: _Snapshot,
    owner: str,
    final: _Final,
    events: tuple[EventData, EventData, EventData],
    token: bytes,
    public_url: str,
    moment: dt.datetime,
) -> CompletionOutcome:
    contract = _lock(session, snapshot.contract_id)
    if contract.contract_status is ContractStatus.COMPLETED:
        return CompletionOutcome.ALREADY_COMPLETED
    if (
        contract.contract_status is not ContractStatus.COMPLETING
        or contract.completion_owner != owner
    ):
        return CompletionOutcome.IN_PROGRESS  # our claim ran out and another worker took over
    if chain_head(session, contract) != (snapshot.head_seq, snapshot.head_sha256):
        raise CompletionError(
            "締結処理中に監査証跡が変更されました。",
            f"The audit chain of contract {snapshot.public_id} changed during completion.",
        )
    for data in events:
        session.add(data.to_row(contract.id))
    completed = events[1]
    contract.status = ContractStatus.COMPLETED.value
    contract.completed_at = moment
    contract.final_path = final.path
    contract.final_sha256 = final.sha256
    contract.chain_head_sha256 = completed.sha256
    contract.chain_head_timestamp = token
    contract.completion_owner = None
    contract.completion_lease_until = None
    _announce(session, contract, moment, public_url)
    record_signed_document(
        session,
        document_id=snapshot.document_id,
        sha256=final.sha256,
        signer_role=Role.WITNESS.value,
        signer_subject=final.signer_subject[:512],
        level=SignatureLevel.B_T,
        signed_at=final.signed_at,
        file_name=f"{snapshot.title[:200]}.pdf",
        page_count=final.page_count,
        channel=SigningChannel.CONTRACT,
    )
    lta.register_contract(session, contract, now=moment)
    session.flush()
    link_expiry = moment + DOWNLOAD_LINK_LIFETIME
    for party in list_parties(session, contract):
        link, token_text = _issue_link(session, party, LinkPurpose.DOWNLOAD, link_expiry)
        mail = mails.completion(
            name=party.name, title=contract.title, public_id=contract.public_id,
            link=f"{public_url}/d/{token_text}", link_expires_at=link_expiry,
        )
        _enqueue(session, party.email, mail)
        append_event(
            session, contract, EventKind.EMAIL_QUEUED, time=moment, party_id=party.id,
            email=party.email, document_sha256=final.sha256,
            details={"purpose": mail.tag, "link_id": link.id, "link_expires_at": _iso(link_expiry)},
        )
    _notify_officer(
        session, contract,
        mails.officer_completion(
            title=contract.title, public_id=contract.public_id,
            link=f"{public_url}/contracts/{contract.public_id}",
        ),
        moment,
    )
    return CompletionOutcome.COMPLETED


# -- the periodic job ---------------------------------------------------------------------------


def _reminders_due(
    contract: Contract, parties: Sequence[Party], moment: dt.datetime
) -> list[Party]:
    if contract.reminder_interval_days <= 0:
        return []
    interval = dt.timedelta(days=contract.reminder_interval_days)
    due = []
    for party in _awaiting(contract, parties):
        last = party.reminded_at or party.invited_at
        if last is not None and moment - last >= interval:
            due.append(party)
    return due


def _remind(session: Session, contract_id: int, public_url: str, moment: dt.datetime) -> int:
    contract = _lock(session, contract_id)
    if not contract.contract_status.is_open or contract.expires_at <= moment:
        return 0
    due = _reminders_due(contract, list_parties(session, contract), moment)
    for party in due:
        _invite(session, contract, party, public_url, moment, kind=EventKind.REMINDED)
    if due:
        contract.last_reminded_at = moment
    return len(due)


def _expire(
    session: Session, contract_id: int, moment: dt.datetime, public_url: str
) -> bool:
    contract = _lock(session, contract_id)
    if not contract.contract_status.is_open or contract.expires_at > moment:
        return False
    previous = contract.status
    contract.status = ContractStatus.EXPIRED.value
    append_event(
        session, contract, EventKind.EXPIRED, time=moment,
        details={"expires_at": _iso(contract.expires_at), "previous_status": previous},
    )
    _announce(session, contract, moment, public_url)
    _notify_officer(
        session, contract,
        mails.expired_notice(title=contract.title, public_id=contract.public_id),
        moment,
    )
    return True


def run_due(
    sessions: sessionmaker[Session],
    installation: Installation,
    *,
    public_url: str,
    tsa_urls: Sequence[str] = (),
    now: dt.datetime | None = None,
) -> JobReport:
    """The periodic job (``koin jobs run-due``): expire overdue contracts, remind parties who
    have not answered for ``reminder_interval_days`` (with a fresh link), and finish contracts
    left in ``completing`` (crashed or failed completion). Each contract is handled in its own
    transaction; a failure is reported and does not stop the others.
    """
    moment = aware_utc(now)
    base = _public_url(public_url)
    report = JobReport()

    def attempt(contract_id: int, public_id: str, step: Any) -> Any:
        try:
            return step()
        except Exception as exc:
            if isinstance(exc, KoinError):
                report.failed.append((public_id, exc.message, exc.message_en))
            else:
                log.exception("run-due: contract %s failed", public_id)
                report.failed.append((public_id, str(exc), str(exc)))
            return None

    with sessions() as session:
        overdue = session.execute(
            select(Contract.id, Contract.public_id).where(
                Contract.status.in_(_OPEN), Contract.expires_at <= moment
            ).order_by(Contract.id)
        ).all()
    for contract_id, public_id in overdue:

        def expire_one(contract_id: int = contract_id) -> bool:
            with session_scope(sessions) as session:
                return _expire(session, contract_id, moment, base)

        if attempt(contract_id, public_id, expire_one):
            report.expired.append(public_id)

    with sessions() as session:
        candidates = [
            (contract.id, contract.public_id)
            for contract in session.scalars(
                select(Contract).where(
                    Contract.status.in_(_OPEN),
                    Contract.expires_at > moment,
                    Contract.reminder_interval_days > 0,
                ).order_by(Contract.id)
            )
            if _reminders_due(contract, list_parties(session, contract), moment)
        ]
    for contract_id, public_id in candidates:

        def remind_one(contract_id: int = contract_id) -> int:
            with session_scope(sessions) as session:
                return _remind(session, contract_id, base, moment)

        sent = attempt(contract_id, public_id, remind_one)
        if sent:
            report.reminded.append(public_id)
            report.reminders_sent += int(sent)

    with sessions() as session:
        stuck = session.execute(
            select(Contract.id, Contract.public_id).where(
                Contract.status == ContractStatus.COMPLETING.value,
                or_(
                    Contract.completion_lease_until.is_(None),
                    Contract.completion_lease_until < moment,
                ),
            ).order_by(Contract.id)
        ).all()
    for contract_id, public_id in stuck:

        def complete_one(contract_id: int = contract_id) -> CompletionOutcome:
            return complete_contract(
                sessions, contract_id, installation, public_url=base, tsa_urls=tsa_urls, now=now
            )

        if attempt(contract_id, public_id, complete_one) is CompletionOutcome.COMPLETED:
            report.completed.append(public_id)
    return report

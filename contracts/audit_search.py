"""Searching the audit events of every contract (the administrator's audit page).

Filters: one contract (its public ID or the document ID printed on its certificate), one
document (a SHA-256, or the document ID of a signed document), an actor (a party's or
officer's email address, or an IP address), an event type, and a range of days in Japan time.
Newest first, a page at a time. Indexes: migration ``0011``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from signer import JST

from .accounts import get_user_by_email, normalize_email
from .audit import ChainCheck, verify_chain
from .documents import get_document, normalize_document_id
from .errors import ContractsError, InvalidAccountData
from .workflow_models import AuditEvent, Contract, EventKind

__all__ = ["AuditFilterError", "AuditFilters", "AuditHit", "AuditPage", "search_events"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PUBLIC_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class AuditFilterError(ContractsError):
    """A filter value cannot be understood.

    :ivar field: which filter.
    """

    def __init__(self, field: str, message: str, message_en: str) -> None:
        super().__init__(message, message_en, field=field)
        self.field = field


@dataclass(frozen=True)
class AuditFilters:
    contract: str = ""
    document: str = ""
    actor: str = ""
    kind: str = ""
    date_from: dt.date | None = None
    date_to: dt.date | None = None

    @property
    def active(self) -> bool:
        return any((self.contract, self.document, self.actor, self.kind, self.date_from,
                    self.date_to))


@dataclass(frozen=True)
class AuditHit:
    event: AuditEvent
    contract_public_id: str
    contract_title: str


@dataclass(frozen=True)
class AuditPage:
    hits: list[AuditHit]
    total: int
    offset: int
    has_more: bool
    #: The contract the search is about (contract filter), with the check of its chain.
    contract: Contract | None = None
    check: ChainCheck | None = None


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), JST).astimezone(dt.UTC)


def _find_contract(session: Session, text: str) -> Contract | None:
    """:raises AuditFilterError: neither a public ID nor a document ID."""
    document_id = normalize_document_id(text)
    if document_id is not None:
        found = session.scalar(select(Contract).where(Contract.document_id == document_id))
        if found is not None:
            return found
    if not _PUBLIC_ID.match(text):
        raise AuditFilterError(
            "contract",
            "契約の指定は、契約 ID か文書番号(XXXX-XXXX-XXXX-XXXX)にしてください。",
            "Give the contract as its ID or its document ID (XXXX-XXXX-XXXX-XXXX).",
        )
    return session.scalar(select(Contract).where(Contract.public_id == text))


def _document_condition(session: Session, text: str) -> ColumnElement[bool]:
    """:raises AuditFilterError: neither a SHA-256 nor a document ID."""
    digest = text.lower()
    if _SHA256.match(digest):
        return AuditEvent.document_sha256 == digest
    if normalize_document_id(text) is None:
        raise AuditFilterError(
            "document",
            "文書の指定は、SHA-256(16 進 64 桁)か文書番号にしてください。",
            "Give the document as its SHA-256 (64 hex digits) or its document ID.",
        )
    record = get_document(session, text)
    contract = session.scalar(
        select(Contract).where(Contract.document_id == normalize_document_id(text))
    )
    digests = [d for d in (record.sha256 if record else None,
                           contract.final_sha256 if contract else None) if d]
    conditions: list[ColumnElement[bool]] = [AuditEvent.document_sha256.in_(digests)]
    if contract is not None:
        conditions.append(AuditEvent.contract_id == contract.id)
    return or_(*conditions)


def _actor_condition(session: Session, text: str) -> ColumnElement[bool]:
    """:raises AuditFilterError: neither an email address nor an IP address."""
    if "@" in text:
        try:
            address = normalize_email(text)
        except InvalidAccountData as exc:
            raise AuditFilterError("actor", exc.message, exc.message_en) from None
        conditions: list[ColumnElement[bool]] = [AuditEvent.email == address]
        staff = get_user_by_email(session, address)
        if staff is not None:  # the officer who created, sent or cancelled
            conditions.append(AuditEvent.details["officer_id"].as_integer() == staff.id)
        return or_(*conditions)
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise AuditFilterError(
            "actor",
            "操作した人の指定は、メールアドレスか IP アドレスにしてください。",
            "Give the actor as an email address or an IP address.",
        ) from None
    return AuditEvent.ip == str(ip)


def search_events(
    session: Session, filters: AuditFilters, *, limit: int = 50, offset: int = 0
) -> AuditPage:
    """The events matching ``filters``, newest first; with the chain check of the contract
    when the search names one.

    :raises AuditFilterError: a filter value cannot be understood, or the range of days ends
        before it starts.
    """
    conditions: list[ColumnElement[bool]] = []
    contract = None
    if filters.contract:
        contract = _find_contract(session, filters.contract.strip())
        if contract is None:
            return AuditPage([], 0, offset, False)
        conditions.append(AuditEvent.contract_id == contract.id)
    if filters.document:
        conditions.append(_document_condition(session, filters.document.strip()))
    if filters.actor:
        conditions.append(_actor_condition(session, filters.actor.strip()))
    if filters.kind:
        try:
            conditions.append(AuditEvent.kind == EventKind(filters.kind).value)
        except ValueError:
            raise AuditFilterError(
                "kind", "イベントの種類の指定が正しくありません。", "Unknown event type."
            ) from None
    if filters.date_from and filters.date_to and filters.date_from > filters.date_to:
        raise AuditFilterError(
            "date", "期間の終わりが始まりより前です。", "The range ends before it starts."
        )
    if filters.date_from:
        conditions.append(AuditEvent.time >= _day_start(filters.date_from))
    if filters.date_to:
        conditions.append(AuditEvent.time < _day_start(filters.date_to + dt.timedelta(days=1)))

    where = and_(*conditions) if conditions else None
    query = (
        select(AuditEvent, Contract.public_id, Contract.title)
        .join(Contract, Contract.id == AuditEvent.contract_id)
        .order_by(AuditEvent.time.desc(), AuditEvent.id.desc())
        .limit(limit + 1)
        .offset(offset)
    )
    counted = select(func.count()).select_from(AuditEvent)
    if where is not None:
        query, counted = query.where(where), counted.where(where)
    rows = session.execute(query).all()
    hits = [AuditHit(event, public_id, title) for event, public_id, title in rows[:limit]]
    total = int(session.scalar(counted) or 0)
    check = verify_chain(session, contract) if contract is not None else None
    return AuditPage(hits, total, offset, len(rows) > limit, contract, check)

"""Tables of witness-type contracts (立会人型電子契約): contracts, parties, access links and the
append-only audit chain. Migration: ``migrations/versions/0004_contracts.py``.

State rules live in :mod:`contracts.workflow`; these classes only describe the rows.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import Mapped, Mapper, mapped_column

from ._db import Base, utcnow
from .errors import ContractsError

__all__ = [
    "AccessLink",
    "AuditEvent",
    "Contract",
    "ContractStatus",
    "EventKind",
    "Identification",
    "LinkPurpose",
    "Party",
    "PartyRole",
    "PartyStatus",
    "SigningOrder",
]


class ContractStatus(StrEnum):
    """Life of a contract.

    ``draft`` → ``sent`` → (``partially_agreed`` →) ``completing`` → ``completed``; from ``sent``
    or ``partially_agreed`` also ``declined`` (a party said no), ``cancelled`` (by the officer;
    also from ``draft``) or ``expired`` (deadline passed). ``completing`` means every party
    consented and the witness signature is being made.
    """

    DRAFT = "draft"
    SENT = "sent"
    PARTIALLY_AGREED = "partially_agreed"
    COMPLETING = "completing"
    COMPLETED = "completed"
    DECLINED = "declined"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_open(self) -> bool:
        """Parties can act (open links, identify, consent, decline)."""
        return self in (ContractStatus.SENT, ContractStatus.PARTIALLY_AGREED)

    @property
    def label_ja(self) -> str:
        return _STATUS_LABELS[self][0]

    @property
    def label_en(self) -> str:
        return _STATUS_LABELS[self][1]


_STATUS_LABELS: dict[ContractStatus, tuple[str, str]] = {
    ContractStatus.DRAFT: ("下書き", "draft"),
    ContractStatus.SENT: ("送付済み", "sent"),
    ContractStatus.PARTIALLY_AGREED: ("一部合意", "partially agreed"),
    ContractStatus.COMPLETING: ("締結処理中", "being completed"),
    ContractStatus.COMPLETED: ("締結済み", "completed"),
    ContractStatus.DECLINED: ("不同意", "declined"),
    ContractStatus.CANCELLED: ("取消し", "cancelled"),
    ContractStatus.EXPIRED: ("期限切れ", "expired"),
}


class SigningOrder(StrEnum):
    """``parallel``: every party is invited at once; ``sequential``: one after another, in
    ``Party.position`` order, each invited when the previous one consented."""

    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"


class PartyRole(StrEnum):
    PREFECTURE = "prefecture"
    CONTRACTOR = "contractor"

    @property
    def label_ja(self) -> str:
        return "茨城県" if self is PartyRole.PREFECTURE else "契約相手方"


class Identification(StrEnum):
    """The second factor of a party, besides holding the emailed link.

    ``access_code``: a code the officer passes on by phone or paper (only its hash is stored).
    ``email_otp``: a 6-digit one-time code emailed when the link is opened, valid 10 minutes.
    """

    ACCESS_CODE = "access_code"
    EMAIL_OTP = "email_otp"

    @property
    def label_ja(self) -> str:
        if self is Identification.ACCESS_CODE:
            return "アクセスコード(電話・書面で通知)"
        return "メール認証コード(ワンタイム)"


class PartyStatus(StrEnum):
    PENDING = "pending"
    CONSENTED = "consented"
    DECLINED = "declined"


class LinkPurpose(StrEnum):
    """``sign``: the invitation link (review, identify, consent); ``download``: the link in the
    completion mail to fetch the signed contract."""

    SIGN = "sign"
    DOWNLOAD = "download"


class EventKind(StrEnum):
    CREATED = "created"
    SENT = "sent"
    EMAIL_QUEUED = "email_queued"
    OPENED = "opened"
    CODE_SENT = "code_sent"
    CODE_VERIFIED = "code_verified"
    CODE_FAILED = "code_failed"
    LOCKED = "locked"
    CONSENTED = "consented"
    DECLINED = "declined"
    REMINDED = "reminded"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    SIGNED = "signed"
    COMPLETED = "completed"
    CHAIN_TIMESTAMPED = "chain_timestamped"
    DOWNLOADED = "downloaded"
    #: Long-term validity kept up (``contracts.lta``): a new document timestamp on the final
    #: PDF, or a new token over the previous chain-head token.
    ARCHIVE_TIMESTAMPED = "archive_timestamped"


def _one_of(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Contract(Base):
    """A contract PDF sent to parties for consent; signed by the service once all consented."""

    __tablename__ = "contracts"
    __table_args__ = (
        CheckConstraint(_one_of("status", ContractStatus), name="status"),
        CheckConstraint(_one_of("signing_order", SigningOrder), name="signing_order"),
        CheckConstraint("reminder_interval_days >= 0", name="reminder_interval_days"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    #: Random, URL-safe; the contract's name in URLs and mails (never the integer id).
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    #: Printed on the certificate of agreement and recorded in ``signed_documents``.
    document_id: Mapped[str] = mapped_column(String(19), unique=True)
    title: Mapped[str] = mapped_column(String(200))
    #: Relative to ``KOIN_HOME``: ``contracts/<public_id>/original.pdf``.
    original_path: Mapped[str] = mapped_column(String(255))
    original_sha256: Mapped[str] = mapped_column(String(64))
    page_count: Mapped[int]
    #: Relative to ``KOIN_HOME``: ``contracts/<public_id>/final.pdf``, set when completed.
    final_path: Mapped[str | None] = mapped_column(String(255))
    final_sha256: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), index=True, default=ContractStatus.DRAFT.value)
    signing_order: Mapped[str] = mapped_column(String(12))
    expires_at: Mapped[dt.datetime]
    created_by: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None]
    completed_at: Mapped[dt.datetime | None]
    #: SHA-256 of the audit event that the RFC 3161 token below covers (the ``completed`` one).
    chain_head_sha256: Mapped[str | None] = mapped_column(String(64))
    #: DER of the RFC 3161 ``TimeStampToken`` (CMS ContentInfo) over ``chain_head_sha256``.
    chain_head_timestamp: Mapped[bytes | None] = mapped_column(LargeBinary)
    #: Days between reminders to parties who have not answered; 0 = no reminders.
    reminder_interval_days: Mapped[int] = mapped_column(default=3)
    last_reminded_at: Mapped[dt.datetime | None]
    #: Who is making the witness signature (random per attempt), and until when.
    completion_owner: Mapped[str | None] = mapped_column(String(32))
    completion_lease_until: Mapped[dt.datetime | None]

    @property
    def contract_status(self) -> ContractStatus:
        return ContractStatus(self.status)

    @property
    def order(self) -> SigningOrder:
        return SigningOrder(self.signing_order)

    def __repr__(self) -> str:
        return f"Contract(public_id={self.public_id!r}, status={self.status!r})"


class Party(Base):
    """Someone who has to consent: the prefecture's authorised signer or the contractor."""

    __tablename__ = "parties"
    __table_args__ = (
        UniqueConstraint("contract_id", "position", name="uq_parties_contract_id_position"),
        CheckConstraint(_one_of("role", PartyRole), name="role"),
        CheckConstraint(_one_of("identification", Identification), name="identification"),
        CheckConstraint(_one_of("status", PartyStatus), name="status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    contract_id: Mapped[int] = mapped_column(ForeignKey("contracts.id"), index=True)
    #: 1-based order; the signing order of sequential contracts.
    position: Mapped[int]
    name: Mapped[str] = mapped_column(String(200))
    organisation: Mapped[str] = mapped_column(String(200), default="")
    email: Mapped[str] = mapped_column(String(254))
    role: Mapped[str] = mapped_column(String(12))
    identification: Mapped[str] = mapped_column(String(12))
    #: scrypt hash of the access code (``access_code`` parties only).
    access_code_hash: Mapped[str | None] = mapped_column(String(200))
    #: scrypt hash of the current one-time code (``email_otp`` parties), and its validity.
    otp_hash: Mapped[str | None] = mapped_column(String(200))
    otp_sent_at: Mapped[dt.datetime | None]
    otp_expires_at: Mapped[dt.datetime | None]
    failed_code_attempts: Mapped[int] = mapped_column(default=0)
    locked: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(12), default=PartyStatus.PENDING.value)
    #: When the invitation mail was first queued, and the last reminder.
    invited_at: Mapped[dt.datetime | None]
    reminded_at: Mapped[dt.datetime | None]
    #: When the party last passed identification; cleared whenever the link is opened again.
    identified_at: Mapped[dt.datetime | None]
    acted_at: Mapped[dt.datetime | None]
    decline_reason: Mapped[str | None] = mapped_column(String(1000))
    consent_ip: Mapped[str | None] = mapped_column(String(45))
    consent_user_agent: Mapped[str | None] = mapped_column(String(512))
    #: SHA-256 of the document the party reviewed when consenting.
    document_sha256_seen: Mapped[str | None] = mapped_column(String(64))

    @property
    def party_role(self) -> PartyRole:
        return PartyRole(self.role)

    @property
    def method(self) -> Identification:
        return Identification(self.identification)

    @property
    def party_status(self) -> PartyStatus:
        return PartyStatus(self.status)

    def __repr__(self) -> str:
        return f"Party(id={self.id!r}, position={self.position!r}, status={self.status!r})"


class AccessLink(Base):
    """An emailed link. Only the SHA-256 of its token is stored; the token is in the mail."""

    __tablename__ = "access_links"
    __table_args__ = (CheckConstraint(_one_of("purpose", LinkPurpose), name="purpose"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    party_id: Mapped[int] = mapped_column(ForeignKey("parties.id"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    purpose: Mapped[str] = mapped_column(String(10))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    #: Sign links: when the party consented or declined with it. Download links: first use.
    used_at: Mapped[dt.datetime | None]


class AuditEvent(Base):
    """One link of a contract's audit chain. Rows are only ever inserted.

    ``sha256`` is the SHA-256 of the canonical JSON of the event's fields including
    ``prev_sha256`` (see :func:`contracts.audit.event_digest`).
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        UniqueConstraint("contract_id", "seq", name="uq_audit_events_contract_id_seq"),
        CheckConstraint(_one_of("kind", EventKind), name="kind"),
        # the administrator's audit search (web/admin_views.py); migration 0011
        Index("ix_audit_events_time", "time"),
        Index("ix_audit_events_kind_time", "kind", "time"),
        Index("ix_audit_events_email", "email"),
        Index("ix_audit_events_document_sha256", "document_sha256"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    contract_id: Mapped[int] = mapped_column(ForeignKey("contracts.id"), index=True)
    #: 1, 2, 3 … per contract.
    seq: Mapped[int]
    kind: Mapped[str] = mapped_column(String(24))
    time: Mapped[dt.datetime]
    party_id: Mapped[int | None] = mapped_column(ForeignKey("parties.id"))
    ip: Mapped[str | None] = mapped_column(String(45))
    user_agent: Mapped[str | None] = mapped_column(String(512))
    email: Mapped[str | None] = mapped_column(String(254))
    identification: Mapped[str | None] = mapped_column(String(12))
    #: SHA-256 of the document concerned (the original a party saw, or the signed final PDF).
    document_sha256: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_sha256: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))

    def __repr__(self) -> str:
        return f"AuditEvent(seq={self.seq!r}, kind={self.kind!r})"


def _refuse_change(_mapper: Mapper[Any], _connection: Any, target: AuditEvent) -> None:
    raise ContractsError(
        "監査証跡は追記のみで、変更・削除はできません。",
        f"The audit chain is append-only; event {target.seq} cannot be changed or deleted.",
    )


event.listen(AuditEvent, "before_update", _refuse_change)
event.listen(AuditEvent, "before_delete", _refuse_change)

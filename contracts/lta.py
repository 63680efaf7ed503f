"""Long-term validity (長期署名) of every signed file the service stores, kept up for years.

The registry holds one row per stored signed file — a batch document (``batches/<id>/out/``),
a contract's witness-signed ``final.pdf``, or the RFC 3161 token over a contract's audit-chain
head — with its current SHA-256 and what its newest timestamp is worth: the expiry of that
timestamp's TSA certificate and its algorithms. Rows are recorded where the files are stored
(:func:`register_stored_file` from ``batches._mark_done``, :func:`register_contract` from the
completion of a contract). Migration: ``migrations/versions/0010_lta.py``.

:func:`renew_due` (``koin lta renew``, and :class:`LtaWorker` in ``koin serve``) keeps them at
PAdES B-LTA: a file is *due* when it is not B-LTA yet, when its newest timestamp's TSA
certificate expires within the margin (``KOIN_LTA_MARGIN_DAYS``, default 365), or when that
timestamp uses an algorithm configured as weak (``KOIN_LTA_WEAK_ALGORITHMS``). A due PDF gets
the validation data of everything in it and a new document timestamp (:func:`signer.extend_lta`,
incremental: the earlier bytes stay a prefix); a due chain-head token gets a new token over the
SHA-256 of its DER (an archive-timestamp chain like RFC 4998), and every token is kept.

Guarantees:

* **Claimed with a lease**, like batch documents (``FOR UPDATE SKIP LOCKED`` on PostgreSQL): two
  renewers never work on the same file, and the recording ``UPDATE`` is conditional on the
  lease *and* on the SHA-256 the renewer started from, so each version is renewed once.
* **Atomic files.** The renewed file is written and fsynced beside the old one and renamed over
  it inside the recording transaction. A crash between rename and commit leaves a file that
  starts with the recorded version; the next run recognises it (by the recorded size and
  SHA-256 of that prefix) and records it as ``recovered``.
* **Never the local clock.** A TSA that does not answer leaves the file untouched; the row is
  retried with a back-off.
* **Recorded.** Every renewal is a row of ``lta_renewals``; a contract's renewals are also
  events on its audit chain (``archive_timestamped``), and ``contracts.final_sha256`` /
  ``batch_documents.output_sha256`` follow the stored file, so downloads keep matching.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import hashlib
import logging
import os
import secrets
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asn1crypto import cms
from pyhanko.sign.timestamps import TimeStamper
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    LargeBinary,
    String,
    UniqueConstraint,
    and_,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from keys import KoinError
from signer import (
    Installation,
    InvalidPdfError,
    LtaError,
    TimestampFacts,
    TrustMaterial,
    VerifyPolicy,
    WeakAlgorithms,
    extend_lta,
    inspect_lta,
    timestamp_facts,
    verify_pdf,
)
from timestamp import TimestampError

from . import metrics
from ._db import Base, aware_utc, claim_predicate, rowcount, session_scope, utcnow
from ._periodic import PeriodicWorker
from .audit import append_event
from .errors import ContractNotFound, ContractsError, LtaFileError
from .mail import retry_delay
from .models import SignedDocument
from .workflow_models import Contract, EventKind

__all__ = [
    "DEFAULT_LTA_INTERVAL",
    "DEFAULT_MARGIN",
    "LEASE",
    "CopyMatch",
    "DueFile",
    "LtaFile",
    "LtaKind",
    "LtaPolicy",
    "LtaRenewal",
    "LtaReport",
    "LtaWorker",
    "RenewalReason",
    "Renewed",
    "check_copy",
    "chain_head_tokens",
    "claim_due",
    "due_reason",
    "list_due",
    "lta_file_of_document",
    "register_contract",
    "register_existing",
    "register_stored_file",
    "register_stored_files",
    "renew_due",
]

log = logging.getLogger(__name__)

#: Renew this long before the newest timestamp's TSA certificate expires.
DEFAULT_MARGIN = dt.timedelta(days=365)
#: How long a claimed file is reserved for the renewer that claimed it.
LEASE = dt.timedelta(minutes=10)
#: Back-off after a problem that waiting a minute does not solve (file changed, TSA
#: certificate too short-lived, weak algorithm): try again a day later.
PROBLEM_RETRY = dt.timedelta(days=1)
#: Seconds between two rounds of :class:`LtaWorker` in ``koin serve``.
DEFAULT_LTA_INTERVAL = 3600.0
#: Files renewed per claim.
DEFAULT_CHUNK = 20
MAX_ERROR = 1000


class LtaKind(enum.StrEnum):
    BATCH_DOCUMENT = "batch_document"
    CONTRACT_FINAL = "contract_final"
    CHAIN_HEAD_TOKEN = "chain_head_token"

    @property
    def label_ja(self) -> str:
        return _KIND_LABELS[self][0]

    @property
    def label_en(self) -> str:
        return _KIND_LABELS[self][1]


_KIND_LABELS = {
    LtaKind.BATCH_DOCUMENT: ("一括署名の文書", "batch document"),
    LtaKind.CONTRACT_FINAL: ("締結済み契約書", "signed contract"),
    LtaKind.CHAIN_HEAD_TOKEN: ("監査証跡のタイムスタンプ", "audit-chain timestamp"),
}


class RenewalReason(enum.StrEnum):
    """Why a file was renewed (or is due)."""

    NOT_LTA = "not_lta"  # not B-LTA yet (or not inspected yet, when listing)
    EXPIRY = "expiry"  # the newest timestamp's TSA certificate expires within the margin
    ALGORITHM = "algorithm"  # the newest timestamp uses an algorithm configured as weak
    RECOVERED = "recovered"  # a renewal written before a crash, recorded afterwards

    @property
    def label_ja(self) -> str:
        return _REASON_LABELS[self][0]

    @property
    def label_en(self) -> str:
        return _REASON_LABELS[self][1]


_REASON_LABELS = {
    RenewalReason.NOT_LTA: ("B-LTA 化", "brought to B-LTA"),
    RenewalReason.EXPIRY: ("TSA 証明書の期限前の更新", "TSA certificate expiring"),
    RenewalReason.ALGORITHM: ("弱くなったアルゴリズムの更新", "weakened algorithm"),
    RenewalReason.RECOVERED: ("中断した更新の記録", "interrupted renewal recorded"),
}


def _one_of(column: str, values: type[enum.StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class LtaFile(Base):
    """One stored signed file (or chain-head token) kept at long-term validity."""

    __tablename__ = "lta_files"
    __table_args__ = (
        UniqueConstraint("kind", "path", name="uq_lta_files_kind_path"),
        UniqueConstraint("kind", "contract_id", name="uq_lta_files_kind_contract_id"),
        CheckConstraint(_one_of("kind", LtaKind), name="kind"),
        CheckConstraint("renewals >= 0", name="renewals"),
        CheckConstraint("attempts >= 0", name="attempts"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    #: Relative to ``KOIN_HOME``; None for a chain-head token (kept in the database).
    path: Mapped[str | None] = mapped_column(String(255))
    #: The printed document ID of a PDF (``signed_documents.document_id``).
    document_id: Mapped[str | None] = mapped_column(String(19), index=True)
    contract_id: Mapped[int | None] = mapped_column(ForeignKey("contracts.id"), index=True)
    #: The file as it was first stored (the signed document as handed out then).
    original_sha256: Mapped[str] = mapped_column(String(64))
    #: Its size; known once the renewer has looked at it (before it changes anything).
    original_size: Mapped[int | None] = mapped_column(BigInteger)
    #: The file as it is stored now.
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)
    #: The newest timestamp (document timestamp, or the newest token): its time, when its TSA
    #: certificate expires, its algorithms. None: not B-LTA yet, or not inspected yet.
    timestamped_at: Mapped[dt.datetime | None]
    tsa_not_after: Mapped[dt.datetime | None] = mapped_column(index=True)
    digest_algorithm: Mapped[str | None] = mapped_column(String(16))
    key_algorithm: Mapped[str | None] = mapped_column(String(8))
    key_bits: Mapped[int | None]
    renewals: Mapped[int] = mapped_column(default=0)
    registered_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    checked_at: Mapped[dt.datetime | None]
    renewed_at: Mapped[dt.datetime | None]
    #: Failed attempts since the last success, and when to try again.
    attempts: Mapped[int] = mapped_column(default=0)
    retry_after: Mapped[dt.datetime | None]
    error: Mapped[str | None] = mapped_column(String(MAX_ERROR))
    error_en: Mapped[str | None] = mapped_column(String(MAX_ERROR))
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[dt.datetime | None]

    @property
    def lta_kind(self) -> LtaKind:
        return LtaKind(self.kind)

    @property
    def algorithms(self) -> str | None:
        if self.digest_algorithm is None or self.key_algorithm is None:
            return None
        return f"{self.digest_algorithm},{self.key_algorithm}{self.key_bits or ''}"

    def __repr__(self) -> str:
        return f"LtaFile(kind={self.kind!r}, path={self.path!r}, contract_id={self.contract_id})"


class LtaRenewal(Base):
    """One renewal of an :class:`LtaFile` (the history; rows are only inserted)."""

    __tablename__ = "lta_renewals"
    __table_args__ = (CheckConstraint(_one_of("reason", RenewalReason), name="reason"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    file_id: Mapped[int] = mapped_column(ForeignKey("lta_files.id"), index=True)
    renewed_at: Mapped[dt.datetime]
    reason: Mapped[str] = mapped_column(String(12))
    previous_sha256: Mapped[str] = mapped_column(String(64))
    previous_size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    #: The new timestamp.
    timestamped_at: Mapped[dt.datetime]
    tsa_subject: Mapped[str] = mapped_column(String(512))
    tsa_not_after: Mapped[dt.datetime]
    digest_algorithm: Mapped[str] = mapped_column(String(16))
    key_algorithm: Mapped[str] = mapped_column(String(8))
    key_bits: Mapped[int]
    #: Chain-head tokens: the new token (DER ``ContentInfo``), over SHA-256 of the previous.
    token: Mapped[bytes | None] = mapped_column(LargeBinary)

    def __repr__(self) -> str:
        return f"LtaRenewal(file_id={self.file_id}, reason={self.reason!r})"


# -- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LtaPolicy:
    """When a file is due: ``margin`` before its newest timestamp's TSA certificate expires,
    or at once when that timestamp uses one of the ``weak`` algorithms."""

    margin: dt.timedelta = DEFAULT_MARGIN
    weak: WeakAlgorithms = field(default_factory=WeakAlgorithms)

    @classmethod
    def from_settings(cls, margin_days: float, weak: str = "") -> LtaPolicy:
        """:raises LtaError: ``weak`` cannot be understood, or the margin is negative."""
        if margin_days < 0:
            raise LtaError(
                "更新の猶予日数は 0 以上で指定してください。",
                f"The renewal margin must be 0 days or more, got {margin_days:g}.",
                reason="margin",
            )
        return cls(dt.timedelta(days=margin_days), WeakAlgorithms.parse(weak))


def due_reason(
    facts: TimestampFacts | None, policy: LtaPolicy, moment: dt.datetime
) -> RenewalReason | None:
    """Why a file whose newest (covering) timestamp is ``facts`` needs renewing now; None if
    it does not. ``facts`` None: not B-LTA."""
    if facts is None:
        return RenewalReason.NOT_LTA
    if policy.weak.weakens(facts):
        return RenewalReason.ALGORITHM
    if facts.tsa_not_after <= moment + policy.margin:
        return RenewalReason.EXPIRY
    return None


def _row_due_reason(row: LtaFile, policy: LtaPolicy, moment: dt.datetime) -> RenewalReason | None:
    if row.tsa_not_after is None:
        return RenewalReason.NOT_LTA
    if policy.weak.is_weak(row.digest_algorithm, row.key_algorithm, row.key_bits):
        return RenewalReason.ALGORITHM
    if row.tsa_not_after <= moment + policy.margin:
        return RenewalReason.EXPIRY
    return None


def _due(policy: LtaPolicy, moment: dt.datetime) -> Any:
    reasons = [LtaFile.tsa_not_after.is_(None), LtaFile.tsa_not_after <= moment + policy.margin]
    if policy.weak.digests:
        reasons.append(LtaFile.digest_algorithm.in_(sorted(policy.weak.digests)))
    for kind, bits in policy.weak.keys:
        reasons.append(and_(LtaFile.key_algorithm == kind, LtaFile.key_bits <= bits))
    return and_(
        or_(*reasons),
        or_(LtaFile.retry_after.is_(None), LtaFile.retry_after <= moment),
        or_(LtaFile.lease_until.is_(None), LtaFile.lease_until <= moment),
    )


# -- registering stored files -----------------------------------------------------------------


def _insert_ignoring_duplicates(
    session: Session, values: dict[str, Any] | list[dict[str, Any]]
) -> None:
    dialect = session.get_bind(LtaFile).dialect.name
    statement: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        statement = postgresql.insert(LtaFile).values(values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        statement = sqlite.insert(LtaFile).values(values).on_conflict_do_nothing()
    else:
        raise ContractsError(
            f"データベース {dialect} には対応していません。",
            f"The database {dialect} is not supported.",
            backend=dialect,
        )
    session.execute(statement)


def register_stored_file(
    session: Session,
    kind: LtaKind,
    path: str,
    sha256: str,
    *,
    document_id: str | None = None,
    contract_id: int | None = None,
    now: dt.datetime | None = None,
) -> None:
    """Record a stored signed PDF (relative to ``KOIN_HOME``) in the session's transaction, to
    be kept at B-LTA from now on. Idempotent (a path already recorded is left alone). Cheap:
    the file is inspected later, by the renewer.

    :raises ValueError: ``kind`` is the chain-head token (see :func:`register_contract`), or
        ``path`` is not a plain relative path.
    """
    if kind is LtaKind.CHAIN_HEAD_TOKEN:
        raise ValueError("chain-head tokens are registered with register_contract")
    _home_relative(path)
    moment = aware_utc(now)
    _insert_ignoring_duplicates(session, {
        "kind": kind.value, "path": path, "document_id": document_id,
        "contract_id": contract_id, "original_sha256": sha256, "sha256": sha256,
        "renewals": 0, "attempts": 0, "registered_at": moment,
    })


def register_stored_files(
    session: Session,
    kind: LtaKind,
    files: Sequence[tuple[str, str, str | None]],
    *,
    now: dt.datetime | None = None,
) -> None:
    """:func:`register_stored_file` for many ``(path, sha256, document ID)`` at once, in one
    statement (a batch registers its documents together).

    :raises ValueError: as :func:`register_stored_file`.
    """
    if kind is LtaKind.CHAIN_HEAD_TOKEN:
        raise ValueError("chain-head tokens are registered with register_contract")
    moment = aware_utc(now)
    rows = []
    for path, sha256, document_id in files:
        _home_relative(path)
        rows.append({
            "kind": kind.value, "path": path, "document_id": document_id, "contract_id": None,
            "original_sha256": sha256, "sha256": sha256, "renewals": 0, "attempts": 0,
            "registered_at": moment,
        })
    if rows:
        _insert_ignoring_duplicates(session, rows)


def register_contract(
    session: Session, contract: Contract, *, now: dt.datetime | None = None
) -> None:
    """Record a completed contract's final PDF and its chain-head token (in the session's
    transaction). Idempotent.

    :raises ValueError: the contract has no final PDF or no chain-head token yet.
    """
    if not contract.final_path or not contract.final_sha256 or not contract.chain_head_timestamp:
        raise ValueError(f"contract {contract.public_id} is not completed")
    moment = aware_utc(now)
    register_stored_file(
        session, LtaKind.CONTRACT_FINAL, contract.final_path, contract.final_sha256,
        document_id=contract.document_id, contract_id=contract.id, now=moment,
    )
    token = bytes(contract.chain_head_timestamp)
    values: dict[str, Any] = {
        "kind": LtaKind.CHAIN_HEAD_TOKEN.value, "path": None, "contract_id": contract.id,
        "original_sha256": _sha256(token), "sha256": _sha256(token),
        "original_size": len(token), "size": len(token), "renewals": 0, "attempts": 0,
        "registered_at": moment,
    }
    try:
        values.update(_facts_columns(timestamp_facts(token)), checked_at=moment)
    except LtaError:
        log.warning("chain-head token of contract %s cannot be read", contract.public_id)
    _insert_ignoring_duplicates(session, values)


def register_existing(sessions: sessionmaker[Session], *, limit: int = 500) -> int:
    """Register stored files that have no row yet (stored before this registry existed): done
    batch documents and completed contracts, at most ``limit`` of each per call. Returns how
    many were registered."""
    from .batches import BatchDocument  # batches registers its files here: import late

    registered = 0
    with session_scope(sessions) as session:
        documents = session.execute(
            select(BatchDocument.output_path, BatchDocument.output_sha256,
                   BatchDocument.document_id)
            .where(
                BatchDocument.state == "done",
                BatchDocument.output_path.is_not(None),
                BatchDocument.output_sha256.is_not(None),
                ~select(LtaFile.id).where(
                    LtaFile.kind == LtaKind.BATCH_DOCUMENT.value,
                    LtaFile.path == BatchDocument.output_path,
                ).exists(),
            )
            .order_by(BatchDocument.id)
            .limit(limit)
        ).all()
        for path, sha256, document_id in documents:
            register_stored_file(session, LtaKind.BATCH_DOCUMENT, str(path), str(sha256),
                                 document_id=document_id)
            registered += 1
        contracts = session.scalars(
            select(Contract)
            .where(
                Contract.status == "completed",
                Contract.final_path.is_not(None),
                Contract.chain_head_timestamp.is_not(None),
                ~select(LtaFile.id).where(
                    LtaFile.kind == LtaKind.CONTRACT_FINAL.value,
                    LtaFile.contract_id == Contract.id,
                ).exists(),
            )
            .order_by(Contract.id)
            .limit(limit)
        ).all()
        for contract in contracts:
            register_contract(session, contract)
            registered += 1
    if registered:
        log.info("LTA: registered %d stored file(s) that had no record yet", registered)
    return registered


# -- queries ------------------------------------------------------------------------------------


def chain_head_tokens(session: Session, contract: Contract) -> list[bytes]:
    """Every RFC 3161 token of the contract's chain head, oldest first: the token over the
    ``completed`` event, then each token over the SHA-256 of the one before it."""
    if not contract.chain_head_timestamp:
        return []
    tokens = [bytes(contract.chain_head_timestamp)]
    renewed = session.scalars(
        select(LtaRenewal.token)
        .join(LtaFile, LtaFile.id == LtaRenewal.file_id)
        .where(
            LtaFile.kind == LtaKind.CHAIN_HEAD_TOKEN.value,
            LtaFile.contract_id == contract.id,
            LtaRenewal.token.is_not(None),
        )
        .order_by(LtaRenewal.id)
    )
    tokens.extend(bytes(token) for token in renewed if token is not None)
    return tokens


def lta_file_of_document(session: Session, document_id: str) -> LtaFile | None:
    """The registry row of the stored PDF with this (canonical) document ID, if any."""
    return session.scalars(
        select(LtaFile)
        .where(LtaFile.document_id == document_id, LtaFile.path.is_not(None))
        .order_by(LtaFile.id)
        .limit(1)
    ).one_or_none()


@dataclass(frozen=True)
class DueFile:
    """A file that :func:`renew_due` would work on (``koin lta renew --dry-run``)."""

    id: int
    kind: LtaKind
    label: str
    reason: RenewalReason
    tsa_not_after: dt.datetime | None
    retry_after: dt.datetime | None
    error: str | None
    error_en: str | None


def _label(row: LtaFile, public_id: str | None) -> str:
    if row.path is not None:
        return row.path
    return f"contracts/{public_id} (chain-head token)"


def list_due(
    session: Session, policy: LtaPolicy, *, now: dt.datetime | None = None, limit: int = 1000
) -> list[DueFile]:
    """Files due for renewal (including those backing off after a failure), soonest first."""
    moment = aware_utc(now)
    horizon = moment + policy.margin
    reasons = [LtaFile.tsa_not_after.is_(None), LtaFile.tsa_not_after <= horizon]
    if policy.weak.digests:
        reasons.append(LtaFile.digest_algorithm.in_(sorted(policy.weak.digests)))
    for kind, bits in policy.weak.keys:
        reasons.append(and_(LtaFile.key_algorithm == kind, LtaFile.key_bits <= bits))
    rows = session.execute(
        select(LtaFile, Contract.public_id)
        .outerjoin(Contract, Contract.id == LtaFile.contract_id)
        .where(or_(*reasons))
        .order_by(LtaFile.tsa_not_after.is_not(None), LtaFile.tsa_not_after, LtaFile.id)
        .limit(limit)
    ).all()
    due = []
    for row, public_id in rows:
        reason = _row_due_reason(row, policy, moment) or RenewalReason.EXPIRY
        due.append(DueFile(
            row.id, row.lta_kind, _label(row, public_id), reason, row.tsa_not_after,
            row.retry_after, row.error, row.error_en,
        ))
    return due


# -- the verify page: is an uploaded copy one of ours? ------------------------------------------


class CopyMatch(enum.StrEnum):
    """How an uploaded copy relates to a document signed here."""

    SIGNED = "signed"  # byte for byte the document as it was signed (and handed out then)
    RENEWED = "renewed"  # a version kept with long-term validation data, as stored since
    EARLIER = "earlier"  # an earlier state of the stored file: it starts with these bytes
    NONE = "none"

    @property
    def matches(self) -> bool:
        return self is not CopyMatch.NONE


_EOF_MARKERS = (b"%%EOF", b"%%EOF\n", b"%%EOF\r\n", b"%%EOF\r")


def check_copy(session: Session, home: Path, document: SignedDocument, data: bytes) -> CopyMatch:
    """Whether ``data`` is the document signed here under ``document``'s ID: the file as
    signed, a version of it renewed for long-term validity (its SHA-256 is in the renewal
    history), or an earlier state of the stored file — a prefix of it, at least the signed
    document and ending at the end of a revision (``%%EOF``). Renewals only append, so a copy
    handed out before any of them is always recognised."""
    digest = _sha256(data)
    if digest == document.sha256:
        return CopyMatch.SIGNED
    row = lta_file_of_document(session, document.document_id)
    if row is None or row.path is None:
        return CopyMatch.NONE
    renewed = session.scalar(
        select(LtaRenewal.id).where(LtaRenewal.file_id == row.id, LtaRenewal.sha256 == digest)
    )
    if digest == row.sha256 or renewed is not None:
        return CopyMatch.RENEWED
    signed_size = row.original_size
    if signed_size is None or len(data) < signed_size or not data.endswith(_EOF_MARKERS):
        return CopyMatch.NONE
    if _sha256(data[:signed_size]) != document.sha256:
        return CopyMatch.NONE
    try:
        with _home_relative_file(home, row.path).open("rb") as stored:
            if stored.read(len(data)) == data:
                return CopyMatch.EARLIER
    except (OSError, ValueError):
        log.warning("stored file %s cannot be read to check a copy", row.path)
    return CopyMatch.NONE


# -- claiming -------------------------------------------------------------------------------


def _new_owner() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(6)}"


def claim_due(
    sessions: sessionmaker[Session],
    *,
    owner: str,
    limit: int,
    policy: LtaPolicy,
    lease: dt.timedelta = LEASE,
    now: dt.datetime | None = None,
) -> list[int]:
    """Lease up to ``limit`` due files to ``owner`` (files never inspected and those expiring
    soonest first). Safe with concurrent renewers: no file is held by two at once.

    :raises ValueError: ``limit`` below 1, or an empty ``owner``.
    """
    if limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    if not owner or len(owner) > 64:
        raise ValueError("owner must be 1 to 64 characters")
    moment = aware_utc(now)
    due = _due(policy, moment)
    first_due = (
        select(LtaFile.id)
        .where(due)
        .order_by(LtaFile.tsa_not_after.is_not(None), LtaFile.tsa_not_after, LtaFile.id)
        .limit(limit)
    )
    with session_scope(sessions) as session:
        chosen = claim_predicate(session, LtaFile.id, first_due)
        if chosen is None:
            return []
        claimed = session.scalars(
            update(LtaFile)
            .where(chosen, due)
            .values(lease_owner=owner, lease_until=moment + lease)
            .returning(LtaFile.id),
            execution_options={"synchronize_session": False},
        ).all()
    return sorted(claimed)


# -- renewing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Renewed:
    id: int
    kind: LtaKind
    label: str
    reason: RenewalReason
    sha256: str
    tsa_not_after: dt.datetime


@dataclass
class LtaReport:
    """What one :func:`renew_due` run did."""

    claimed: int = 0
    renewed: list[Renewed] = field(default_factory=list)
    #: Looked at and found in order (facts recorded, nothing changed).
    up_to_date: int = 0
    #: ``(label, message, message_en)`` of files that failed; retried later.
    failed: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Snapshot:
    id: int
    kind: LtaKind
    path: str | None
    label: str
    contract_id: int | None
    sha256: str
    size: int | None
    original_sha256: str
    original_size: int | None
    attempts: int
    renewals: int
    tokens: tuple[bytes, ...] = ()


class _Run:
    """What one run needs once: the TSA client, our trust material, the policy."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        installation: Installation,
        policy: LtaPolicy,
        tsa_urls: Sequence[str],
        owner: str,
        clock: Callable[[], dt.datetime],
    ) -> None:
        self.sessions = sessions
        self.installation = installation
        self.home = installation.home
        self.policy = policy
        self.tsa_urls = tuple(tsa_urls)
        self.owner = owner
        self.clock = clock
        self._timestamper: TimeStamper | None = None
        self._trust: TrustMaterial | None = None
        self._probe: TimestampFacts | None = None

    @property
    def timestamper(self) -> TimeStamper:
        if self._timestamper is None:
            self._timestamper = self.installation.timestamper(self.tsa_urls)
        return self._timestamper

    @property
    def trust(self) -> TrustMaterial:
        if self._trust is None:
            self._trust = self.installation.trust_material()
        return self._trust

    def verify_policy(self, size: int) -> VerifyPolicy:
        """Our trust material, for a file of ``size`` bytes (stored files may be larger than
        uploads to the verify page)."""
        trust = self.trust
        return VerifyPolicy(trust.roots, trust.intermediates, trust.crls, max_bytes=size + 1)

    def probe(self) -> TimestampFacts:
        """The facts of a timestamp from our TSA (one request per run and TSA client; pyHanko
        keeps it), to refuse a pointless renewal before asking for real ones.

        :raises TimestampError: the TSA does not answer.
        """
        if self._probe is None:
            algorithm = self.policy.weak.renewal_digest()
            token = asyncio.run(self.timestamper.async_dummy_response(algorithm))
            self._probe = timestamp_facts(bytes(token.dump()))
        return self._probe

    def check_new(self, facts: TimestampFacts, reason: RenewalReason, moment: dt.datetime) -> None:
        """Refuse a renewal that would be worth nothing.

        :raises LtaFileError: the new timestamp uses a weak algorithm, or its TSA certificate
            expires within the margin (a renewal for expiry would be due again at once).
        """
        if self.policy.weak.weakens(facts):
            raise LtaFileError(
                f"TSA のタイムスタンプが弱いと設定されたアルゴリズム({facts.algorithms})を"
                "使っています。TSA を替えてください。",
                f"The TSA's timestamps use an algorithm configured as weak ({facts.algorithms}); "
                "use another TSA.",
                reason="weak_tsa",
            )
        horizon = moment + self.policy.margin
        if reason is not RenewalReason.NOT_LTA and facts.tsa_not_after <= horizon:
            raise LtaFileError(
                f"TSA 証明書の有効期限({facts.tsa_not_after:%Y-%m-%d})が更新の猶予期間内に"
                "切れるため、更新しても意味がありません。TSA の証明書を更新してください"
                "(koin keys rotate tsa)。",
                f"The TSA certificate expires on {facts.tsa_not_after:%Y-%m-%d}, within the "
                "renewal margin, so a renewal would gain nothing; renew the TSA certificate "
                "first (koin keys rotate tsa).",
                reason="tsa_expires_soon",
            )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _home_relative(relative: str) -> Path:
    path = Path(relative)
    if not relative or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"not a path inside KOIN_HOME: {relative!r}")
    return path


def _home_relative_file(home: Path, relative: str) -> Path:
    return home / _home_relative(relative)


def _facts_columns(facts: TimestampFacts | None) -> dict[str, Any]:
    if facts is None:
        return {
            "timestamped_at": None, "tsa_not_after": None, "digest_algorithm": None,
            "key_algorithm": None, "key_bits": None,
        }
    return {
        "timestamped_at": facts.time, "tsa_not_after": facts.tsa_not_after,
        "digest_algorithm": facts.digest_algorithm[:16], "key_algorithm": facts.key_algorithm[:8],
        "key_bits": facts.key_bits,
    }


def _snapshot(sessions: sessionmaker[Session], file_id: int, owner: str) -> _Snapshot | None:
    with session_scope(sessions) as session:
        row = session.get(LtaFile, file_id)
        if row is None or row.lease_owner != owner:
            return None
        public_id = None
        tokens: tuple[bytes, ...] = ()
        if row.contract_id is not None:
            contract = session.get(Contract, row.contract_id)
            if contract is None:
                raise ContractNotFound(str(row.contract_id))
            public_id = contract.public_id
            if row.lta_kind is LtaKind.CHAIN_HEAD_TOKEN:
                tokens = tuple(chain_head_tokens(session, contract))
        return _Snapshot(
            id=row.id, kind=row.lta_kind, path=row.path, label=_label(row, public_id),
            contract_id=row.contract_id, sha256=row.sha256, size=row.size,
            original_sha256=row.original_sha256, original_size=row.original_size,
            attempts=row.attempts, renewals=row.renewals, tokens=tokens,
        )


def _release(
    run: _Run, snap: _Snapshot, error: KoinError | Exception, *, transient: bool
) -> None:
    """Give the row back after a failure, to be retried after a back-off."""
    if isinstance(error, KoinError):
        message, message_en = error.message, error.message_en
    else:
        message = "一時的な障害のため長期署名を更新できませんでした。自動で再試行します。"
        message_en = f"{error.__class__.__name__}: {error}"
    moment = run.clock()
    delay = retry_delay(snap.attempts + 1) if transient else PROBLEM_RETRY
    try:
        with session_scope(run.sessions) as session:
            session.execute(
                update(LtaFile)
                .where(LtaFile.id == snap.id, LtaFile.lease_owner == run.owner)
                .values(
                    lease_owner=None, lease_until=None, attempts=LtaFile.attempts + 1,
                    retry_after=moment + delay, error=message[:MAX_ERROR],
                    error_en=message_en[:MAX_ERROR], checked_at=moment,
                ),
                execution_options={"synchronize_session": False},
            )
    except Exception:  # the lease runs out by itself
        log.exception("could not release LTA file %s", snap.label)


def _lock_contract(session: Session, contract_id: int) -> Contract:
    """Lock the contract row like ``workflow._lock`` (audit events need the lock)."""
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


class _LeaseLost(Exception):
    """The row changed under us (lease taken over, or renewed by someone else)."""


def _record(
    session: Session,
    run: _Run,
    snap: _Snapshot,
    *,
    reason: RenewalReason,
    previous_sha256: str,
    previous_size: int | None,
    sha256: str,
    size: int,
    facts: TimestampFacts,
    moment: dt.datetime,
    token: bytes | None = None,
) -> None:
    """Record one renewal in the session's transaction: the row (conditional on our lease and
    on the version we started from), the history, and what follows the stored file.

    :raises _LeaseLost: the row is not ours any more, or was renewed meanwhile.
    """
    values: dict[str, Any] = {
        "sha256": sha256, "size": size, "renewals": LtaFile.renewals + 1,
        "renewed_at": moment, "checked_at": moment, "attempts": 0, "retry_after": None,
        "error": None, "error_en": None, "lease_owner": None, "lease_until": None,
        **_facts_columns(facts),
    }
    if snap.original_size is None and previous_sha256 == snap.original_sha256:
        values["original_size"] = previous_size
    result = session.execute(
        update(LtaFile)
        .where(
            LtaFile.id == snap.id, LtaFile.lease_owner == run.owner,
            LtaFile.sha256 == snap.sha256,
        )
        .values(**values),
        execution_options={"synchronize_session": False},
    )
    if rowcount(result) != 1:
        raise _LeaseLost
    session.add(LtaRenewal(
        file_id=snap.id, renewed_at=moment, reason=reason.value,
        previous_sha256=previous_sha256, previous_size=previous_size, sha256=sha256,
        size=size, timestamped_at=facts.time, tsa_subject=facts.tsa_subject[:512],
        tsa_not_after=facts.tsa_not_after, digest_algorithm=facts.digest_algorithm[:16],
        key_algorithm=facts.key_algorithm[:8], key_bits=facts.key_bits, token=token,
    ))
    details: dict[str, Any] = {
        "reason": reason.value,
        "previous_sha256": previous_sha256,
        "sha256": sha256,
        "tsa_time": _iso(facts.time),
        "tsa_not_after": _iso(facts.tsa_not_after),
        "algorithms": facts.algorithms,
        "renewal": snap.renewals + 1,
    }
    if snap.kind is LtaKind.BATCH_DOCUMENT:
        from .batches import BatchDocument  # batches registers its files here: import late

        session.execute(
            update(BatchDocument)
            .where(BatchDocument.output_path == snap.path,
                   BatchDocument.output_sha256 == previous_sha256)
            .values(output_sha256=sha256),
            execution_options={"synchronize_session": False},
        )
    elif snap.contract_id is not None:
        contract = _lock_contract(session, snap.contract_id)
        if snap.kind is LtaKind.CONTRACT_FINAL:
            if contract.final_sha256 == previous_sha256:
                contract.final_sha256 = sha256
            append_event(
                session, contract, EventKind.ARCHIVE_TIMESTAMPED, time=moment,
                document_sha256=sha256,
                details={"target": "final_pdf", "path": snap.path or "", **details},
            )
        else:
            append_event(
                session, contract, EventKind.ARCHIVE_TIMESTAMPED, time=moment,
                details={"target": "chain_head_token", "token_number": len(snap.tokens) + 1,
                         **details},
            )


def _checked(run: _Run, snap: _Snapshot, facts: TimestampFacts | None, size: int) -> None:
    """Record what an inspection found (nothing was due) and give the row back."""
    moment = run.clock()
    values: dict[str, Any] = {
        "size": size, "checked_at": moment, "attempts": 0, "retry_after": None,
        "error": None, "error_en": None, "lease_owner": None, "lease_until": None,
        **_facts_columns(facts),
    }
    if snap.original_size is None and snap.sha256 == snap.original_sha256:
        values["original_size"] = size
    with session_scope(run.sessions) as session:
        session.execute(
            update(LtaFile)
            .where(LtaFile.id == snap.id, LtaFile.lease_owner == run.owner,
                   LtaFile.sha256 == snap.sha256)
            .values(**values),
            execution_options={"synchronize_session": False},
        )


def _note_size(run: _Run, snap: _Snapshot, size: int) -> None:
    values: dict[str, Any] = {"size": size}
    if snap.original_size is None and snap.sha256 == snap.original_sha256:
        values["original_size"] = size
    with session_scope(run.sessions) as session:
        session.execute(
            update(LtaFile)
            .where(LtaFile.id == snap.id, LtaFile.lease_owner == run.owner,
                   LtaFile.sha256 == snap.sha256)
            .values(**values),
            execution_options={"synchronize_session": False},
        )


def _write_beside(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` (fsynced, same mode)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".lta")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(name, path.stat().st_mode & 0o777)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_problem(snap: _Snapshot, message: str, message_en: str, reason: str) -> LtaFileError:
    return LtaFileError(f"{snap.label}: {message}", f"{snap.label}: {message_en}", reason=reason)


def _newest_facts(data: bytes) -> tuple[TimestampFacts | None, int]:
    state = inspect_lta(data)
    return (state.newest if state.is_lta else None), state.size


def _renew_pdf(run: _Run, snap: _Snapshot, report: LtaReport) -> None:
    assert snap.path is not None
    path = _home_relative_file(run.home, snap.path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _file_problem(
            snap, "保存されているファイルを読めません。",
            f"the stored file cannot be read ({exc.strerror}).", "missing",
        ) from exc
    digest = _sha256(data)
    if digest != snap.sha256:
        changed = _file_problem(
            snap, "保存されているファイルが記録と一致しません(koin 以外で変更されています)。",
            "the stored file does not match its record (changed outside koin).", "changed",
        )
        known = snap.size
        if known is None or len(data) <= known or _sha256(data[:known]) != snap.sha256:
            raise changed
        # The recorded version plus more: a renewal renamed into place before its transaction
        # committed (a crash) — if what was appended is exactly that: validation data and a
        # valid document timestamp over everything.
        facts, size = _newest_facts(data)
        if facts is None or not verify_pdf(data, run.verify_policy(len(data))).passed:
            raise changed
        moment = run.clock()
        with session_scope(run.sessions) as session:
            _record(session, run, snap, reason=RenewalReason.RECOVERED,
                    previous_sha256=snap.sha256, previous_size=known, sha256=digest,
                    size=size, facts=facts, moment=moment)
        log.warning("LTA: %s had an unrecorded renewal; recorded it", snap.label)
        report.renewed.append(Renewed(snap.id, snap.kind, snap.label, RenewalReason.RECOVERED,
                                      digest, facts.tsa_not_after))
        return
    facts, size = _newest_facts(data)
    moment = run.clock()
    reason = due_reason(facts, run.policy, moment)
    if reason is None:
        _checked(run, snap, facts, size)
        report.up_to_date += 1
        return
    if snap.size is None:
        _note_size(run, snap, size)  # so that an interrupted renewal can be recognised
    if reason is not RenewalReason.NOT_LTA:
        run.check_new(run.probe(), reason, moment)
    result = extend_lta(
        data, run.timestamper, run.trust, md_algorithm=run.policy.weak.renewal_digest()
    )
    run.check_new(result.newest, reason, moment)
    if result.unresolved:
        log.warning("LTA: %s: no chain to our roots for %s", snap.label, result.unresolved)
    temporary = _write_beside(path, result.data)
    try:
        with session_scope(run.sessions) as session:
            _record(session, run, snap, reason=reason, previous_sha256=digest,
                    previous_size=len(data), sha256=result.sha256, size=len(result.data),
                    facts=result.newest, moment=moment)
            # Inside the transaction: if the commit fails after this, the next run finds a
            # file that starts with the recorded version and records it (``recovered``).
            os.replace(temporary, path)
            _fsync_folder(path.parent)
    finally:
        temporary.unlink(missing_ok=True)
    log.info("LTA: renewed %s (%s), newest timestamp valid until %s", snap.label,
             reason.value, result.newest.tsa_not_after.isoformat())
    report.renewed.append(Renewed(snap.id, snap.kind, snap.label, reason, result.sha256,
                                  result.newest.tsa_not_after))


def _renew_token(run: _Run, snap: _Snapshot, report: LtaReport) -> None:
    if not snap.tokens or _sha256(snap.tokens[-1]) != snap.sha256:
        raise _file_problem(
            snap, "チェーン先頭のタイムスタンプトークンが記録と一致しません。",
            "the chain-head tokens do not match their record.", "changed",
        )
    newest = snap.tokens[-1]
    facts = timestamp_facts(newest)
    moment = run.clock()
    reason = due_reason(facts, run.policy, moment)
    if reason is None:
        _checked(run, snap, facts, len(newest))
        report.up_to_date += 1
        return
    run.check_new(run.probe(), reason, moment)
    algorithm = run.policy.weak.renewal_digest()
    imprint = hashlib.new(algorithm, newest).digest()
    token: cms.ContentInfo = asyncio.run(run.timestamper.async_timestamp(imprint, algorithm))
    token_der = bytes(token.dump())
    new_facts = timestamp_facts(token_der)
    run.check_new(new_facts, reason, moment)
    with session_scope(run.sessions) as session:
        _record(session, run, snap, reason=reason, previous_sha256=snap.sha256,
                previous_size=len(newest), sha256=_sha256(token_der), size=len(token_der),
                facts=new_facts, moment=moment, token=token_der)
    log.info("LTA: renewed %s (%s), token valid until %s", snap.label, reason.value,
             new_facts.tsa_not_after.isoformat())
    report.renewed.append(Renewed(snap.id, snap.kind, snap.label, reason, _sha256(token_der),
                                  new_facts.tsa_not_after))


def _renew_claimed(run: _Run, file_id: int, report: LtaReport) -> None:
    snap = _snapshot(run.sessions, file_id, run.owner)
    if snap is None:
        return
    try:
        if snap.kind is LtaKind.CHAIN_HEAD_TOKEN:
            _renew_token(run, snap, report)
        else:
            _renew_pdf(run, snap, report)
    except _LeaseLost:
        log.warning("LTA: %s changed hands before it was recorded; nothing written", snap.label)
    except TimestampError as exc:
        log.warning("LTA: %s not renewed, TSA unavailable: %s", snap.label, exc.message_en)
        metrics.count_tsa_error()
        report.failed.append((snap.label, exc.message, exc.message_en))
        _release(run, snap, exc, transient=True)
    except (LtaFileError, LtaError, InvalidPdfError) as exc:
        log.warning("LTA: %s not renewed: %s", snap.label, exc.message_en)
        report.failed.append((snap.label, exc.message, exc.message_en))
        _release(run, snap, exc, transient=False)
    except Exception as exc:
        log.exception("LTA: %s not renewed", snap.label)
        report.failed.append((snap.label, "長期署名を更新できませんでした。", str(exc)))
        _release(run, snap, exc, transient=True)


def renew_due(
    sessions: sessionmaker[Session],
    installation: Installation,
    *,
    policy: LtaPolicy | None = None,
    tsa_urls: Sequence[str] = (),
    limit: int = DEFAULT_CHUNK,
    owner: str | None = None,
    now: dt.datetime | None = None,
    clock: Callable[[], dt.datetime] | None = None,
) -> LtaReport:
    """Register stored files that have no record yet (:func:`register_existing`), then claim
    up to ``limit`` due files and renew each (see the module docstring). A file that fails is
    given back with its reason and a back-off; the others go on.

    :param now: the time to decide what is due and to record (tests move it); the TSA's
        time is the TSA's.
    """
    policy = policy or LtaPolicy()
    owner = owner or _new_owner()
    moment = aware_utc(now)
    run = _Run(sessions, installation, policy, tsa_urls, owner,
               clock or (lambda: moment if now is not None else utcnow()))
    register_existing(sessions)
    ids = claim_due(sessions, owner=owner, limit=limit, policy=policy, now=moment)
    report = LtaReport(claimed=len(ids))
    for file_id in ids:
        _renew_claimed(run, file_id, report)
    return report


class LtaWorker(PeriodicWorker[LtaReport]):
    """Keeps stored files at B-LTA from ``koin serve``: runs :func:`renew_due` right away
    and every ``interval`` seconds (at once again while whole chunks were due)."""

    thread_name = "koin-lta"

    def __init__(
        self,
        sessions: sessionmaker[Session],
        installation: Installation,
        *,
        policy: LtaPolicy | None = None,
        tsa_urls: Sequence[str] = (),
        interval: float = DEFAULT_LTA_INTERVAL,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        """:raises ValueError: ``interval`` or ``chunk`` is not positive."""
        super().__init__(interval)
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        self.sessions = sessions
        self.installation = installation
        self.policy = policy or LtaPolicy()
        self.tsa_urls = tuple(tsa_urls)
        self.chunk = chunk
        self.owner = _new_owner()

    def run_once(self) -> LtaReport | None:
        try:
            report = renew_due(
                self.sessions, self.installation, policy=self.policy, tsa_urls=self.tsa_urls,
                limit=self.chunk, owner=self.owner,
            )
        except Exception:
            log.exception("LTA renewal round failed; trying again in %.0f s", self.interval)
            return None
        if report.renewed:
            log.info("LTA: %d file(s) renewed", len(report.renewed))
        return report

    def more_due(self, result: LtaReport | None) -> bool:
        return result is not None and result.claimed == self.chunk

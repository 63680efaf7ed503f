"""The audit chain of a contract: every event hashes its predecessor.

An event's ``sha256`` is the SHA-256 of the canonical JSON (keys sorted, UTF-8, no insignificant
whitespace, times as ISO-8601 UTC with microseconds and ``Z``) of::

    {"contract": public id, "seq", "kind", "time", "party": party row id or null, "ip",
     "user_agent", "email", "identification", "document_sha256", "details", "prev_sha256"}

The first event's ``prev_sha256`` is 64 zeros. When a contract is completed, the SHA-256 of its
``completed`` event is timestamped (RFC 3161) and the token stored on the contract, so that a
chain rewritten later (even consistently) no longer matches the token.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from asn1crypto import cms, tsp
from sqlalchemy import select
from sqlalchemy.orm import Session

from .workflow_models import AuditEvent, Contract, EventKind

__all__ = [
    "GENESIS_SHA256",
    "ChainCheck",
    "EventData",
    "append_event",
    "canonical_event_json",
    "chain_head",
    "event_digest",
    "timestamp_imprint",
    "verify_chain",
]

GENESIS_SHA256 = "0" * 64


@dataclass(frozen=True)
class EventData:
    """The hashed fields of an event, before it becomes a row."""

    contract: str  # public id
    seq: int
    kind: EventKind
    time: dt.datetime
    prev_sha256: str
    party_id: int | None = None
    ip: str | None = None
    user_agent: str | None = None
    email: str | None = None
    identification: str | None = None
    document_sha256: str | None = None
    details: Mapping[str, Any] | None = None

    @property
    def sha256(self) -> str:
        return event_digest(self)

    def to_row(self, contract_id: int) -> AuditEvent:
        return AuditEvent(
            contract_id=contract_id,
            seq=self.seq,
            kind=self.kind.value,
            time=self.time,
            party_id=self.party_id,
            ip=self.ip,
            user_agent=self.user_agent,
            email=self.email,
            identification=self.identification,
            document_sha256=self.document_sha256,
            details=dict(self.details or {}),
            prev_sha256=self.prev_sha256,
            sha256=self.sha256,
        )


def _utc_text(moment: dt.datetime) -> str:
    if moment.utcoffset() is None:
        raise ValueError("audit times must be aware")
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_json(value: Any, where: str = "details") -> None:
    """Only values that survive a database round trip unchanged: no floats, string keys."""
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, list):
        for item in value:
            _check_json(item, where)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {key!r}")
            _check_json(item, f"{where}.{key}")
        return
    raise TypeError(f"{where}: {type(value).__name__} is not allowed in audit details")


def canonical_event_json(event: EventData | AuditEvent, contract_public_id: str) -> bytes:
    """The bytes that an event's SHA-256 is computed over."""
    details = dict(event.details or {})
    _check_json(details)
    kind = event.kind.value if isinstance(event.kind, EventKind) else str(event.kind)
    document = {
        "contract": contract_public_id,
        "seq": event.seq,
        "kind": kind,
        "time": _utc_text(event.time),
        "party": event.party_id,
        "ip": event.ip,
        "user_agent": event.user_agent,
        "email": event.email,
        "identification": event.identification,
        "document_sha256": event.document_sha256,
        "details": details,
        "prev_sha256": event.prev_sha256,
    }
    return json.dumps(
        document, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    ).encode("utf-8")


def event_digest(event: EventData) -> str:
    return hashlib.sha256(canonical_event_json(event, event.contract)).hexdigest()


def chain_head(session: Session, contract: Contract) -> tuple[int, str]:
    """``(seq, sha256)`` of the newest event, or ``(0, GENESIS_SHA256)`` if there is none."""
    row = session.execute(
        select(AuditEvent.seq, AuditEvent.sha256)
        .where(AuditEvent.contract_id == contract.id)
        .order_by(AuditEvent.seq.desc())
        .limit(1)
    ).first()
    if row is None:
        return 0, GENESIS_SHA256
    return int(row[0]), str(row[1])


def append_event(
    session: Session,
    contract: Contract,
    kind: EventKind,
    *,
    time: dt.datetime,
    party_id: int | None = None,
    ip: str | None = None,
    user_agent: str | None = None,
    email: str | None = None,
    identification: str | None = None,
    document_sha256: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """Append an event to ``contract``'s chain in the session's transaction.

    The caller must hold the contract's lock (see ``contracts.workflow``), so that two writers
    never pick the same ``seq``; the unique constraint on ``(contract_id, seq)`` backs this up.

    :raises TypeError: ``details`` holds something other than JSON strings, ints, bools, lists
        and objects.
    """
    session.flush()
    seq, prev = chain_head(session, contract)
    data = EventData(
        contract=contract.public_id,
        seq=seq + 1,
        kind=kind,
        time=time,
        prev_sha256=prev,
        party_id=party_id,
        ip=ip[:45] if ip else ip,
        user_agent=user_agent[:512] if user_agent else user_agent,
        email=email,
        identification=identification,
        document_sha256=document_sha256,
        details=details,
    )
    row = data.to_row(contract.id)
    session.add(row)
    session.flush()
    return row


@dataclass(frozen=True)
class ChainCheck:
    """The verdict on a contract's audit chain.

    :ivar ok: every event hashes correctly, links to its predecessor, seq runs 1…n, and the
        timestamped head (if any) is in the chain and matches its token.
    :ivar broken_seq: the first event that does not check out (None if ok, or if the problem is
        not one event's, e.g. an unreadable token).
    """

    ok: bool
    events: int
    head_sha256: str
    broken_seq: int | None = None
    reason: str | None = None
    reason_ja: str | None = None


def timestamp_imprint(token_der: bytes) -> tuple[str, bytes]:
    """``(hash algorithm, hashed message)`` of an RFC 3161 token (CMS ContentInfo, DER).

    :raises ValueError: the token cannot be parsed.
    """
    try:
        content_info = cms.ContentInfo.load(token_der)
        signed_data = content_info["content"]
        encap = signed_data["encap_content_info"]
        info = encap["content"].parsed
        if not isinstance(info, tsp.TSTInfo):
            raise ValueError("not a TSTInfo")
        imprint = info["message_imprint"]
        return str(imprint["hash_algorithm"]["algorithm"].native), bytes(
            imprint["hashed_message"].native
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"unreadable timestamp token: {exc}") from exc


def _broken(
    events: int, head: str, seq: int | None, reason: str, reason_ja: str
) -> ChainCheck:
    return ChainCheck(False, events, head, seq, reason, reason_ja)


def verify_chain(session: Session, contract: Contract) -> ChainCheck:
    """Recompute the whole chain of ``contract`` from the stored rows (fails closed)."""
    rows = list(
        session.scalars(
            select(AuditEvent)
            .where(AuditEvent.contract_id == contract.id)
            .order_by(AuditEvent.seq)
            .execution_options(populate_existing=True)
        )
    )
    prev = GENESIS_SHA256
    digests: dict[str, AuditEvent] = {}
    for expected_seq, row in enumerate(rows, start=1):
        if row.seq != expected_seq:
            return _broken(
                len(rows), prev, expected_seq,
                f"event {expected_seq} is missing (found {row.seq})",
                f"イベント {expected_seq} が欠落しています(次は {row.seq})。",
            )
        if row.prev_sha256 != prev:
            return _broken(
                len(rows), prev, row.seq,
                f"event {row.seq} does not link to event {row.seq - 1}",
                f"イベント {row.seq} が直前のイベントとつながっていません。",
            )
        try:
            digest = hashlib.sha256(canonical_event_json(row, contract.public_id)).hexdigest()
        except (TypeError, ValueError) as exc:
            return _broken(
                len(rows), prev, row.seq,
                f"event {row.seq} cannot be hashed: {exc}",
                f"イベント {row.seq} のハッシュを計算できません。",
            )
        if digest != row.sha256:
            return _broken(
                len(rows), prev, row.seq,
                f"event {row.seq} was altered (its SHA-256 does not match its contents)",
                f"イベント {row.seq} が改変されています(内容と SHA-256 が一致しません)。",
            )
        digests[digest] = row
        prev = digest
    head = prev
    if contract.chain_head_sha256 is not None:
        anchored = digests.get(contract.chain_head_sha256)
        if anchored is None or anchored.kind != EventKind.COMPLETED.value:
            return _broken(
                len(rows), head, None,
                "the timestamped chain head is not the completed event of this chain",
                "タイムスタンプ付きのチェーン先頭が、この監査証跡の締結イベントと一致しません。",
            )
        if contract.chain_head_timestamp is None:
            return _broken(
                len(rows), head, anchored.seq,
                "the chain head has no timestamp token",
                "チェーン先頭のタイムスタンプトークンがありません。",
            )
        try:
            algorithm, hashed = timestamp_imprint(contract.chain_head_timestamp)
        except ValueError as exc:
            return _broken(
                len(rows), head, None, str(exc), "タイムスタンプトークンを読み取れません。"
            )
        if algorithm != "sha256" or hashed.hex() != contract.chain_head_sha256:
            return _broken(
                len(rows), head, anchored.seq,
                "the timestamp token does not cover the chain head",
                "タイムスタンプトークンがチェーン先頭を対象としていません。",
            )
    return ChainCheck(True, len(rows), head)

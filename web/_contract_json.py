"""Contracts as JSON: the audit document (shared by the officer's ``audit.json`` download and
``GET /api/v1/contracts/<id>/audit``) and the contract and party objects of the REST API."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

from asn1crypto import cms
from sqlalchemy.orm import Session

from contracts import (
    AuditEvent,
    ChainCheck,
    Contract,
    ContractStatus,
    Party,
    PartyStatus,
    list_events,
    list_parties,
    verify_chain,
)
from contracts.audit import GENESIS_SHA256, canonical_event_json

__all__ = [
    "audit_document",
    "contract_json",
    "party_json",
    "timestamp_time",
    "utc_text",
]


def utc_text(moment: dt.datetime | None) -> str | None:
    """ISO 8601 in UTC with microseconds and ``Z``, as the audit chain hashes times."""
    if moment is None:
        return None
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def timestamp_time(token: bytes | None) -> dt.datetime | None:
    """``genTime`` of an RFC 3161 token, or None if there is none or it is unreadable."""
    if not token:
        return None
    try:
        info = cms.ContentInfo.load(token)["content"]["encap_content_info"]["content"].parsed
        moment = info["gen_time"].native
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return moment if isinstance(moment, dt.datetime) else None


def _event_json(event: AuditEvent, public_id: str) -> dict[str, Any]:
    """The event's hashed fields exactly as they were hashed, plus its ``sha256``."""
    try:
        hashed: dict[str, Any] = json.loads(canonical_event_json(event, public_id))
    except (TypeError, ValueError):  # a row changed behind our back: show it as it is
        hashed = {
            "contract": public_id, "seq": event.seq, "kind": event.kind,
            "time": utc_text(event.time), "party": event.party_id, "ip": event.ip,
            "user_agent": event.user_agent, "email": event.email,
            "identification": event.identification, "document_sha256": event.document_sha256,
            "details": repr(event.details), "prev_sha256": event.prev_sha256,
        }
    hashed["sha256"] = event.sha256
    return hashed


def _check_json(check: ChainCheck) -> dict[str, Any]:
    return {
        "ok": check.ok,
        "events": check.events,
        "head_sha256": check.head_sha256,
        "broken_seq": check.broken_seq,
        "reason": check.reason,
        "reason_ja": check.reason_ja,
    }


def audit_document(db: Session, contract: Contract) -> dict[str, Any]:
    """The audit chain of ``contract``: every event with the fields its SHA-256 covers
    (canonical JSON: keys sorted, UTF-8, ``,`` and ``:`` without spaces, the event without
    ``sha256``), the chain check, and the RFC 3161 token over the chain head (base64 DER) once
    completed."""
    parties = list_parties(db, contract)
    events = list_events(db, contract)
    check = verify_chain(db, contract)
    token = contract.chain_head_timestamp
    return {
        "contract": {
            "public_id": contract.public_id,
            "document_id": contract.document_id,
            "title": contract.title,
            "status": contract.status,
            "signing_order": contract.signing_order,
            "original_sha256": contract.original_sha256,
            "final_sha256": contract.final_sha256,
            "created_at": utc_text(contract.created_at),
            "sent_at": utc_text(contract.sent_at),
            "expires_at": utc_text(contract.expires_at),
            "completed_at": utc_text(contract.completed_at),
        },
        "parties": [
            {
                "id": party.id, "position": party.position, "name": party.name,
                "organisation": party.organisation, "email": party.email, "role": party.role,
                "identification": party.identification, "status": party.status,
                "acted_at": utc_text(party.acted_at), "locked": party.locked,
            }
            for party in parties
        ],
        "hashing": {
            "algorithm": "sha256",
            "input": "canonical JSON of each event without 'sha256': keys sorted, UTF-8, "
            "separators ',' and ':', times ISO 8601 UTC with microseconds",
            "genesis_prev_sha256": GENESIS_SHA256,
        },
        "events": [_event_json(event, contract.public_id) for event in events],
        "chain_check": _check_json(check),
        "chain_head": {
            "sha256": contract.chain_head_sha256,
            "timestamp_token_base64": base64.b64encode(token).decode("ascii") if token else None,
            "timestamp_time": utc_text(timestamp_time(token)),
        },
    }


def party_json(party: Party, access_code: str | None = None) -> dict[str, Any]:
    """A party as the API shows it; ``access_code`` only in the answer that created it."""
    body: dict[str, Any] = {
        "position": party.position,
        "name": party.name,
        "organisation": party.organisation,
        "email": party.email,
        "role": party.role,
        "identification": party.identification,
        "status": party.status,
        "locked": party.locked,
        "invited_at": utc_text(party.invited_at),
        "reminded_at": utc_text(party.reminded_at),
        "acted_at": utc_text(party.acted_at),
        "decline_reason": party.decline_reason
        if party.status == PartyStatus.DECLINED.value
        else None,
    }
    if access_code is not None:
        body["access_code"] = access_code
    return body


def contract_json(
    contract: Contract,
    parties: Sequence[Party] | None,
    *,
    base_path: str,
    party_counts: tuple[int, int] | None = None,
    access_codes: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """A contract as the API shows it. ``parties`` (in order) adds them and their progress;
    without them (lists) ``party_counts`` gives ``(total, consented)``. ``access_codes`` by
    position: shown this once."""
    status = contract.contract_status
    if parties is not None:
        counts = (
            len(parties), sum(p.status == PartyStatus.CONSENTED.value for p in parties)
        )
    else:
        counts = party_counts or (0, 0)
    completed = status is ContractStatus.COMPLETED and contract.final_path is not None
    here = f"{base_path}/{contract.public_id}"
    body: dict[str, Any] = {
        "id": contract.public_id,
        "document_id": contract.document_id,
        "title": contract.title,
        "status": status.value,
        "status_label": status.label_ja,
        "status_label_en": status.label_en,
        "signing_order": contract.signing_order,
        "reminder_interval_days": contract.reminder_interval_days,
        "page_count": contract.page_count,
        "created_at": utc_text(contract.created_at),
        "sent_at": utc_text(contract.sent_at),
        "expires_at": utc_text(contract.expires_at),
        "completed_at": utc_text(contract.completed_at),
        "original_sha256": contract.original_sha256,
        "final_sha256": contract.final_sha256,
        "chain_head_sha256": contract.chain_head_sha256,
        "parties_total": counts[0],
        "parties_consented": counts[1],
        "links": {
            "self": here,
            "original_pdf": f"{here}/original.pdf",
            "final_pdf": f"{here}/final.pdf" if completed else None,
            "audit": f"{here}/audit",
        },
    }
    if parties is not None:
        codes = access_codes or {}
        body["parties"] = [party_json(p, codes.get(p.position)) for p in parties]
    return body

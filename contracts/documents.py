"""The record of signed documents: write once when signing, look up when verifying."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from signer import SignatureLevel, is_document_id

from .errors import ContractsError, DocumentNotFound, DuplicateDocument
from .models import SignedDocument, SigningChannel

__all__ = [
    "find_documents_by_sha256",
    "get_document",
    "normalize_document_id",
    "record_signed_document",
    "record_signed_documents",
    "require_document",
]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Crockford base32 decoding: letters people type for the digits they see on paper.
_LOOKALIKES = str.maketrans({"O": "0", "I": "1", "L": "1"})


def normalize_document_id(text: str) -> str | None:
    """The canonical ``XXXX-XXXX-XXXX-XXXX`` form of a document ID as typed by a person
    (any case, with or without dashes or spaces, O for 0 and I/L for 1), or None if it
    cannot be one."""
    compact = "".join(text.split()).replace("-", "").upper().translate(_LOOKALIKES)
    if len(compact) != 16:
        return None
    candidate = "-".join(compact[i : i + 4] for i in range(0, 16, 4))
    return candidate if is_document_id(candidate) else None


def _normalize_sha256(text: str) -> str | None:
    digest = text.strip().lower()
    return digest if _SHA256.match(digest) else None


def _text(name: str, value: str, max_length: int) -> str:
    if not value or len(value) > max_length:
        raise ValueError(f"{name} must be 1 to {max_length} characters, got {len(value)}")
    return value


def _checked_values(
    *,
    document_id: str,
    sha256: str,
    signer_role: str,
    signer_subject: str,
    level: SignatureLevel | str,
    signed_at: dt.datetime,
    file_name: str | None,
    page_count: int | None,
    signed_by: int | None,
    template: str | None,
    channel: SigningChannel | str | None,
) -> dict[str, Any]:
    canonical_id = normalize_document_id(document_id)
    if canonical_id is None:
        raise ValueError(f"not a document ID: {document_id!r}")
    digest = _normalize_sha256(sha256)
    if digest is None:
        raise ValueError(f"not a hex SHA-256: {sha256!r}")
    if signed_at.utcoffset() is None:
        raise ValueError("signed_at must be an aware datetime")
    if page_count is not None and page_count < 1:
        raise ValueError(f"page_count must be positive, got {page_count}")
    return {
        "document_id": canonical_id,
        "sha256": digest,
        "signer_role": _text("signer_role", str(signer_role), 32),
        "signer_subject": _text("signer_subject", signer_subject, 512),
        "level": SignatureLevel(level).value,
        "signed_at": signed_at.astimezone(dt.UTC),
        "file_name": None if file_name is None else _text("file_name", file_name, 255),
        "page_count": page_count,
        "signed_by": signed_by,
        "template": None if template is None else _text("template", template, 64),
        "channel": None if channel is None else SigningChannel(channel).value,
    }


def record_signed_document(
    session: Session,
    *,
    document_id: str,
    sha256: str,
    signer_role: str,
    signer_subject: str,
    level: SignatureLevel | str,
    signed_at: dt.datetime,
    file_name: str | None = None,
    page_count: int | None = None,
    signed_by: int | None = None,
    template: str | None = None,
    channel: SigningChannel | str | None = None,
) -> SignedDocument:
    """Record a signed document in the session's transaction (the caller commits).

    Idempotent: recording the same data again returns the stored row. The unique constraint
    on ``document_id`` decides between concurrent writers (``INSERT … ON CONFLICT DO
    NOTHING``, which waits for a competing uncommitted insert); nothing is rolled back in the
    caller's session.

    :raises DuplicateDocument: ``document_id`` is already recorded with different data.
    :raises ValueError: a malformed argument (document ID, SHA-256, naive ``signed_at``,
        unknown level or channel, empty or over-long text, page count below 1).
    :raises ContractsError: the session's database is neither SQLite nor PostgreSQL.
    """
    values = _checked_values(
        document_id=document_id,
        sha256=sha256,
        signer_role=signer_role,
        signer_subject=signer_subject,
        level=level,
        signed_at=signed_at,
        file_name=file_name,
        page_count=page_count,
        signed_by=signed_by,
        template=template,
        channel=channel,
    )
    dialect = session.get_bind(SignedDocument).dialect.name
    conflict_target = [SignedDocument.document_id]
    statement: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        statement = postgresql.insert(SignedDocument).values(**values)
        statement = statement.on_conflict_do_nothing(index_elements=conflict_target)
    elif dialect == "sqlite":
        statement = sqlite.insert(SignedDocument).values(**values)
        statement = statement.on_conflict_do_nothing(index_elements=conflict_target)
    else:
        raise ContractsError(
            f"データベース {dialect} には対応していません。",
            f"The database {dialect} is not supported.",
            backend=dialect,
        )
    inserted = session.scalars(statement.returning(SignedDocument)).one_or_none()
    if inserted is not None:
        return inserted

    existing = session.scalars(
        select(SignedDocument).where(SignedDocument.document_id == values["document_id"])
    ).one()
    differing = [name for name, value in values.items() if getattr(existing, name) != value]
    if differing:
        raise DuplicateDocument(values["document_id"], differing)
    return existing


def _insert_statement(session: Session, rows: list[dict[str, Any]]) -> Any:
    dialect = session.get_bind(SignedDocument).dialect.name
    if dialect not in ("postgresql", "sqlite"):
        raise ContractsError(
            f"データベース {dialect} には対応していません。",
            f"The database {dialect} is not supported.",
            backend=dialect,
        )
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        insert(SignedDocument).values(rows)
        .on_conflict_do_nothing(index_elements=[SignedDocument.document_id])
        .returning(SignedDocument.document_id)
    )


def record_signed_documents(session: Session, records: list[dict[str, Any]]) -> None:
    """Record many signed documents at once, each given as the keyword arguments of
    :func:`record_signed_document`, with the same idempotence and conflict rules, in three
    statements whatever their number (a batch records its documents together).

    :raises DuplicateDocument: one of the document IDs is already recorded with other data.
    :raises ValueError: a malformed record (see :func:`record_signed_document`), or one
        document ID twice.
    :raises ContractsError: the session's database is neither SQLite nor PostgreSQL.
    """
    optional = {"file_name": None, "page_count": None, "signed_by": None, "template": None,
                "channel": None}
    rows = [_checked_values(**{**optional, **record}) for record in records]
    if not rows:
        return
    wanted = {row["document_id"]: row for row in rows}
    if len(wanted) != len(rows):
        raise ValueError("a document ID appears twice among the records")
    inserted = set(session.scalars(_insert_statement(session, rows)))
    others = [document_id for document_id in wanted if document_id not in inserted]
    if not others:
        return
    for existing in session.scalars(
        select(SignedDocument).where(SignedDocument.document_id.in_(others))
    ):
        values = wanted[existing.document_id]
        differing = [name for name, value in values.items() if getattr(existing, name) != value]
        if differing:
            raise DuplicateDocument(existing.document_id, differing)


def get_document(session: Session, document_id: str) -> SignedDocument | None:
    """The record of ``document_id`` as typed by a person (see :func:`normalize_document_id`),
    or None if there is none or the text cannot be a document ID."""
    canonical_id = normalize_document_id(document_id)
    if canonical_id is None:
        return None
    return session.scalar(select(SignedDocument).where(SignedDocument.document_id == canonical_id))


def require_document(session: Session, document_id: str) -> SignedDocument:
    """Like :func:`get_document`, for callers that need the record.

    :raises DocumentNotFound: there is no record of ``document_id``.
    """
    document = get_document(session, document_id)
    if document is None:
        raise DocumentNotFound(document_id.strip())
    return document


def find_documents_by_sha256(session: Session, sha256: str) -> list[SignedDocument]:
    """Every record whose signed output has this SHA-256 (hex, any case), oldest first;
    empty if there is none or ``sha256`` is not a hex SHA-256."""
    digest = _normalize_sha256(sha256)
    if digest is None:
        return []
    return list(
        session.scalars(
            select(SignedDocument)
            .where(SignedDocument.sha256 == digest)
            .order_by(SignedDocument.signed_at, SignedDocument.id)
        )
    )

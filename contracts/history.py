"""The signing history (署名履歴): every document koin signed, searched and filtered for the
staff pages.

A search text matches a document ID (as a person types it: any case, with or without dashes,
O for 0 — see :func:`~contracts.documents.normalize_document_id` — or a part of one), a
SHA-256 (whole, or its first characters) or a part of the file name. Dates are days in Japan
time, both ends included.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from signer import JST

from .accounts import User
from .documents import normalize_document_id
from .models import SignedDocument, SigningChannel

__all__ = [
    "MAX_HISTORY_PAGE",
    "STANDARD_STAMP",
    "HistoryPage",
    "HistoryQuery",
    "HistoryRow",
    "history_signers",
    "search_signed_documents",
]

#: Largest page of :func:`search_signed_documents`.
MAX_HISTORY_PAGE = 500
#: :attr:`HistoryQuery.template` value for documents signed with the standard stamp (no
#: template).
STANDARD_STAMP = ""
_MAX_TEXT = 200
_HEX = re.compile(r"[0-9a-f]{4,64}")
_ID_PART = re.compile(r"[0-9A-Z-]{4,19}")


@dataclass(frozen=True)
class HistoryQuery:
    """What to look for; every field left at its default matches everything."""

    #: Document ID, SHA-256 (or its start) or part of the file name.
    text: str = ""
    #: Signed on or after this day (Japan time).
    date_from: dt.date | None = None
    #: Signed on or before this day (Japan time).
    date_to: dt.date | None = None
    #: A template's name, :data:`STANDARD_STAMP` for the standard stamp, None for any.
    template: str | None = None
    channel: SigningChannel | None = None
    #: Only documents signed on behalf of this user (staff see only their own).
    signed_by: int | None = None


@dataclass(frozen=True)
class HistoryRow:
    """A signed document and the display name of the staff member it was signed for (None
    for the command line and contracts' witness signatures)."""

    document: SignedDocument
    signer_name: str | None


@dataclass(frozen=True)
class HistoryPage:
    rows: list[HistoryRow]
    #: How many documents match altogether.
    total: int
    offset: int
    limit: int

    @property
    def has_more(self) -> bool:
        return self.offset + len(self.rows) < self.total


def _like_escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _text_condition(text: str) -> ColumnElement[bool] | None:
    text = " ".join(unicodedata.normalize("NFKC", text).split())[:_MAX_TEXT]
    if not text:
        return None
    conditions: list[ColumnElement[bool]] = [
        SignedDocument.file_name.ilike(f"%{_like_escaped(text)}%", escape="\\")
    ]
    canonical = normalize_document_id(text)
    if canonical is not None:
        conditions.append(SignedDocument.document_id == canonical)
    compact = text.replace(" ", "")
    if _HEX.fullmatch(compact.lower()):
        conditions.append(SignedDocument.sha256.startswith(compact.lower(), autoescape=True))
    if _ID_PART.fullmatch(compact.upper()):
        conditions.append(
            SignedDocument.document_id.contains(compact.upper(), autoescape=True)
        )
    return or_(*conditions)


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), JST).astimezone(dt.UTC)


def _conditions(wanted: HistoryQuery) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    text = _text_condition(wanted.text)
    if text is not None:
        conditions.append(text)
    if wanted.date_from is not None:
        conditions.append(SignedDocument.signed_at >= _day_start(wanted.date_from))
    if wanted.date_to is not None:
        next_day = wanted.date_to + dt.timedelta(days=1)
        conditions.append(SignedDocument.signed_at < _day_start(next_day))
    if wanted.template == STANDARD_STAMP:
        conditions.append(SignedDocument.template.is_(None))
    elif wanted.template is not None:
        conditions.append(SignedDocument.template == wanted.template)
    if wanted.channel is not None:
        conditions.append(SignedDocument.channel == wanted.channel.value)
    if wanted.signed_by is not None:
        conditions.append(SignedDocument.signed_by == wanted.signed_by)
    return conditions


def search_signed_documents(
    session: Session, wanted: HistoryQuery, *, limit: int = 50, offset: int = 0
) -> HistoryPage:
    """The signed documents matching ``wanted``, newest first, ``limit`` (at most
    :data:`MAX_HISTORY_PAGE`) from ``offset``, with how many match in all.

    :raises ValueError: ``date_from`` is after ``date_to``.
    """
    if wanted.date_from and wanted.date_to and wanted.date_from > wanted.date_to:
        raise ValueError("date_from is after date_to")
    limit = max(1, min(limit, MAX_HISTORY_PAGE))
    offset = max(0, offset)
    conditions = _conditions(wanted)
    total = session.scalar(select(func.count(SignedDocument.id)).where(*conditions))
    rows = session.execute(
        select(SignedDocument, User.display_name)
        .outerjoin(User, User.id == SignedDocument.signed_by)
        .where(*conditions)
        .order_by(SignedDocument.signed_at.desc(), SignedDocument.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return HistoryPage(
        rows=[HistoryRow(document, name) for document, name in rows],
        total=int(total or 0),
        offset=offset,
        limit=limit,
    )


def history_signers(session: Session) -> list[tuple[int, str]]:
    """(user id, display name) of every staff member something was signed for, by name (the
    signer filter of administrators)."""
    rows = session.execute(
        select(User.id, User.display_name)
        .where(User.id.in_(select(SignedDocument.signed_by).distinct()))
        .order_by(User.display_name, User.id)
    ).all()
    return [(int(user_id), str(name)) for user_id, name in rows]

"""Indexes for the administrator's audit search: by time, event type and time, email of the
actor, and SHA-256 of the document concerned.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEXES = {
    "ix_audit_events_time": ["time"],
    "ix_audit_events_kind_time": ["kind", "time"],
    "ix_audit_events_email": ["email"],
    "ix_audit_events_document_sha256": ["document_sha256"],
}


def upgrade() -> None:
    for name, columns in _INDEXES.items():
        op.create_index(name, "audit_events", columns, unique=False)


def downgrade() -> None:
    for name in reversed(list(_INDEXES)):
        op.drop_index(name, table_name="audit_events")

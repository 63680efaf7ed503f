"""The record of signed documents.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "signed_documents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("document_id", sa.String(length=19), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("signer_role", sa.String(length=32), nullable=False),
        sa.Column("signer_subject", sa.String(length=512), nullable=False),
        sa.Column("level", sa.String(length=8), nullable=False),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("file_name", sa.String(length=255), nullable=True),
        sa.Column("page_count", sa.Integer(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),  # now() on PostgreSQL, CURRENT_TIMESTAMP (UTC) on SQLite
            nullable=False,
        ),
        sa.CheckConstraint(
            "level IN ('B-B', 'B-T', 'B-LT', 'B-LTA')", name=op.f("ck_signed_documents_level")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_signed_documents")),
        sa.UniqueConstraint("document_id", name=op.f("uq_signed_documents_document_id")),
    )
    op.create_index(
        op.f("ix_signed_documents_sha256"), "signed_documents", ["sha256"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_signed_documents_sha256"), table_name="signed_documents")
    op.drop_table("signed_documents")

"""Signing batches and their documents.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("created_by", sa.Integer(), nullable=False),
        sa.Column("template", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('draft', 'running', 'finished', 'cancelled')",
            name=op.f("ck_batches_status"),
        ),
        sa.ForeignKeyConstraint(
            ["created_by"], ["users.id"], name=op.f("fk_batches_created_by_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
        sa.UniqueConstraint("public_id", name=op.f("uq_batches_public_id")),
    )
    op.create_index(op.f("ix_batches_created_by"), "batches", ["created_by"], unique=False)
    op.create_index(op.f("ix_batches_status"), "batches", ["status"], unique=False)
    op.create_table(
        "batch_documents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("file_name", sa.String(length=255), nullable=False),
        sa.Column("input_path", sa.String(length=255), nullable=False),
        sa.Column("input_sha256", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("output_path", sa.String(length=255), nullable=True),
        sa.Column("output_sha256", sa.String(length=64), nullable=True),
        sa.Column("document_id", sa.String(length=19), nullable=True),
        sa.Column("error", sa.String(length=1000), nullable=True),
        sa.Column("error_en", sa.String(length=1000), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('waiting', 'running', 'done', 'failed')",
            name=op.f("ck_batch_documents_state"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_batch_documents_attempts")),
        sa.ForeignKeyConstraint(
            ["batch_id"], ["batches.id"], name=op.f("fk_batch_documents_batch_id_batches")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batch_documents")),
        sa.UniqueConstraint(
            "batch_id", "position", name="uq_batch_documents_batch_id_position"
        ),
        sa.UniqueConstraint("document_id", name=op.f("uq_batch_documents_document_id")),
    )
    op.create_index(
        op.f("ix_batch_documents_batch_id"), "batch_documents", ["batch_id"], unique=False
    )
    # Claimable documents: waiting (past their back-off) or running with an expired lease.
    op.create_index(
        "ix_batch_documents_due", "batch_documents", ["state", "lease_until"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_batch_documents_due", table_name="batch_documents")
    op.drop_index(op.f("ix_batch_documents_batch_id"), table_name="batch_documents")
    op.drop_table("batch_documents")
    op.drop_index(op.f("ix_batches_status"), table_name="batches")
    op.drop_index(op.f("ix_batches_created_by"), table_name="batches")
    op.drop_table("batches")

"""Who signed a document, with which template and through which channel; batch names; when a
batch document was last handed to the task queue.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHANNELS = "'web', 'api', 'batch', 'cli', 'contract'"


def upgrade() -> None:
    with op.batch_alter_table("signed_documents") as table:
        table.add_column(sa.Column("signed_by", sa.Integer(), nullable=True))
        table.add_column(sa.Column("template", sa.String(length=64), nullable=True))
        table.add_column(sa.Column("channel", sa.String(length=12), nullable=True))
        table.create_foreign_key(
            op.f("fk_signed_documents_signed_by_users"), "users", ["signed_by"], ["id"],
            ondelete="SET NULL",
        )
        table.create_check_constraint(
            op.f("ck_signed_documents_channel"), f"channel IN ({_CHANNELS})"
        )
        table.create_index(op.f("ix_signed_documents_signed_by"), ["signed_by"], unique=False)
        table.create_index("ix_signed_documents_signed_at", ["signed_at"], unique=False)
    with op.batch_alter_table("batches") as table:
        table.add_column(sa.Column("name", sa.String(length=200), nullable=True))
    with op.batch_alter_table("batch_documents") as table:
        table.add_column(sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batch_documents") as table:
        table.drop_column("queued_at")
    with op.batch_alter_table("batches") as table:
        table.drop_column("name")
    with op.batch_alter_table("signed_documents") as table:
        table.drop_index("ix_signed_documents_signed_at")
        table.drop_index(op.f("ix_signed_documents_signed_by"))
        table.drop_constraint(op.f("ck_signed_documents_channel"), type_="check")
        table.drop_constraint(op.f("fk_signed_documents_signed_by_users"), type_="foreignkey")
        table.drop_column("channel")
        table.drop_column("template")
        table.drop_column("signed_by")

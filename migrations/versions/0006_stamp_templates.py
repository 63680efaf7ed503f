"""Stamp templates per document type.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stamp_templates",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("page", sa.Integer(), server_default="-1", nullable=False),
        sa.Column("box_x1", sa.Float(), nullable=True),
        sa.Column("box_y1", sa.Float(), nullable=True),
        sa.Column("box_x2", sa.Float(), nullable=True),
        sa.Column("box_y2", sa.Float(), nullable=True),
        sa.Column("qr", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("level", sa.String(length=8), server_default="B-T", nullable=False),
        sa.Column("certify", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint(
            "level IN ('B-B', 'B-T', 'B-LT', 'B-LTA')", name=op.f("ck_stamp_templates_level")
        ),
        sa.CheckConstraint("page <> 0", name=op.f("ck_stamp_templates_page")),
        sa.CheckConstraint(
            "(box_x1 IS NULL AND box_y1 IS NULL AND box_x2 IS NULL AND box_y2 IS NULL) OR "
            "(box_x1 IS NOT NULL AND box_y1 IS NOT NULL AND box_x2 IS NOT NULL AND "
            "box_y2 IS NOT NULL AND box_x1 < box_x2 AND box_y1 < box_y2)",
            name=op.f("ck_stamp_templates_box"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stamp_templates")),
        sa.UniqueConstraint("name", name=op.f("uq_stamp_templates_name")),
    )


def downgrade() -> None:
    op.drop_table("stamp_templates")

"""Long-term validity: the registry of stored signed files, their renewal history, and the
audit event kind ``archive_timestamped``.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EVENT_KINDS = (
    "'created', 'sent', 'email_queued', 'opened', 'code_sent', 'code_verified', "
    "'code_failed', 'locked', 'consented', 'declined', 'reminded', 'cancelled', 'expired', "
    "'signed', 'completed', 'chain_timestamped', 'downloaded'"
)


def upgrade() -> None:
    op.create_table(
        "lta_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("path", sa.String(length=255), nullable=True),
        sa.Column("document_id", sa.String(length=19), nullable=True),
        sa.Column("contract_id", sa.Integer(), nullable=True),
        sa.Column("original_sha256", sa.String(length=64), nullable=False),
        sa.Column("original_size", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("timestamped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("tsa_not_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("digest_algorithm", sa.String(length=16), nullable=True),
        sa.Column("key_algorithm", sa.String(length=8), nullable=True),
        sa.Column("key_bits", sa.Integer(), nullable=True),
        sa.Column("renewals", sa.Integer(), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("retry_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.String(length=1000), nullable=True),
        sa.Column("error_en", sa.String(length=1000), nullable=True),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "kind IN ('batch_document', 'contract_final', 'chain_head_token')",
            name=op.f("ck_lta_files_kind"),
        ),
        sa.CheckConstraint("renewals >= 0", name=op.f("ck_lta_files_renewals")),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_lta_files_attempts")),
        sa.ForeignKeyConstraint(
            ["contract_id"], ["contracts.id"], name=op.f("fk_lta_files_contract_id_contracts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lta_files")),
        sa.UniqueConstraint("kind", "path", name="uq_lta_files_kind_path"),
        sa.UniqueConstraint("kind", "contract_id", name="uq_lta_files_kind_contract_id"),
    )
    op.create_index(op.f("ix_lta_files_contract_id"), "lta_files", ["contract_id"], unique=False)
    op.create_index(op.f("ix_lta_files_document_id"), "lta_files", ["document_id"], unique=False)
    op.create_index(
        op.f("ix_lta_files_tsa_not_after"), "lta_files", ["tsa_not_after"], unique=False
    )

    op.create_table(
        "lta_renewals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("file_id", sa.Integer(), nullable=False),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(length=12), nullable=False),
        sa.Column("previous_sha256", sa.String(length=64), nullable=False),
        sa.Column("previous_size", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("timestamped_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tsa_subject", sa.String(length=512), nullable=False),
        sa.Column("tsa_not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("digest_algorithm", sa.String(length=16), nullable=False),
        sa.Column("key_algorithm", sa.String(length=8), nullable=False),
        sa.Column("key_bits", sa.Integer(), nullable=False),
        sa.Column("token", sa.LargeBinary(), nullable=True),
        sa.CheckConstraint(
            "reason IN ('not_lta', 'expiry', 'algorithm', 'recovered')",
            name=op.f("ck_lta_renewals_reason"),
        ),
        sa.ForeignKeyConstraint(
            ["file_id"], ["lta_files.id"], name=op.f("fk_lta_renewals_file_id_lta_files")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lta_renewals")),
    )
    op.create_index(op.f("ix_lta_renewals_file_id"), "lta_renewals", ["file_id"], unique=False)
    op.create_index(op.f("ix_lta_renewals_sha256"), "lta_renewals", ["sha256"], unique=False)

    with op.batch_alter_table("audit_events") as table:
        table.drop_constraint(op.f("ck_audit_events_kind"), type_="check")
        table.create_check_constraint(
            op.f("ck_audit_events_kind"), f"kind IN ({_EVENT_KINDS}, 'archive_timestamped')"
        )


def downgrade() -> None:
    with op.batch_alter_table("audit_events") as table:
        table.drop_constraint(op.f("ck_audit_events_kind"), type_="check")
        table.create_check_constraint(op.f("ck_audit_events_kind"), f"kind IN ({_EVENT_KINDS})")
    op.drop_index(op.f("ix_lta_renewals_sha256"), table_name="lta_renewals")
    op.drop_index(op.f("ix_lta_renewals_file_id"), table_name="lta_renewals")
    op.drop_table("lta_renewals")
    op.drop_index(op.f("ix_lta_files_tsa_not_after"), table_name="lta_files")
    op.drop_index(op.f("ix_lta_files_document_id"), table_name="lta_files")
    op.drop_index(op.f("ix_lta_files_contract_id"), table_name="lta_files")
    op.drop_table("lta_files")

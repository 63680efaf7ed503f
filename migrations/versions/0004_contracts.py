"""Witness-type contracts: contracts, parties, access links, audit chain.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "contracts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("document_id", sa.String(length=19), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("original_path", sa.String(length=255), nullable=False),
        sa.Column("original_sha256", sa.String(length=64), nullable=False),
        sa.Column("page_count", sa.Integer(), nullable=False),
        sa.Column("final_path", sa.String(length=255), nullable=True),
        sa.Column("final_sha256", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("signing_order", sa.String(length=12), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("chain_head_sha256", sa.String(length=64), nullable=True),
        sa.Column("chain_head_timestamp", sa.LargeBinary(), nullable=True),
        sa.Column("reminder_interval_days", sa.Integer(), nullable=False),
        sa.Column("last_reminded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completion_owner", sa.String(length=32), nullable=True),
        sa.Column("completion_lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('draft', 'sent', 'partially_agreed', 'completing', 'completed', "
            "'declined', 'cancelled', 'expired')",
            name=op.f("ck_contracts_status"),
        ),
        sa.CheckConstraint(
            "signing_order IN ('sequential', 'parallel')", name=op.f("ck_contracts_signing_order")
        ),
        sa.CheckConstraint(
            "reminder_interval_days >= 0", name=op.f("ck_contracts_reminder_interval_days")
        ),
        sa.ForeignKeyConstraint(
            ["created_by"], ["users.id"], name=op.f("fk_contracts_created_by_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contracts")),
        sa.UniqueConstraint("document_id", name=op.f("uq_contracts_document_id")),
        sa.UniqueConstraint("public_id", name=op.f("uq_contracts_public_id")),
    )
    op.create_index(op.f("ix_contracts_created_by"), "contracts", ["created_by"], unique=False)
    op.create_index(op.f("ix_contracts_status"), "contracts", ["status"], unique=False)

    op.create_table(
        "parties",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("contract_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("organisation", sa.String(length=200), nullable=False),
        sa.Column("email", sa.String(length=254), nullable=False),
        sa.Column("role", sa.String(length=12), nullable=False),
        sa.Column("identification", sa.String(length=12), nullable=False),
        sa.Column("access_code_hash", sa.String(length=200), nullable=True),
        sa.Column("otp_hash", sa.String(length=200), nullable=True),
        sa.Column("otp_sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("otp_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failed_code_attempts", sa.Integer(), nullable=False),
        sa.Column("locked", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("invited_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reminded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("identified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decline_reason", sa.String(length=1000), nullable=True),
        sa.Column("consent_ip", sa.String(length=45), nullable=True),
        sa.Column("consent_user_agent", sa.String(length=512), nullable=True),
        sa.Column("document_sha256_seen", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "role IN ('prefecture', 'contractor')", name=op.f("ck_parties_role")
        ),
        sa.CheckConstraint(
            "identification IN ('access_code', 'email_otp')",
            name=op.f("ck_parties_identification"),
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'consented', 'declined')", name=op.f("ck_parties_status")
        ),
        sa.ForeignKeyConstraint(
            ["contract_id"], ["contracts.id"], name=op.f("fk_parties_contract_id_contracts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_parties")),
        sa.UniqueConstraint("contract_id", "position", name="uq_parties_contract_id_position"),
    )
    op.create_index(op.f("ix_parties_contract_id"), "parties", ["contract_id"], unique=False)

    op.create_table(
        "access_links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("party_id", sa.Integer(), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.String(length=10), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("purpose IN ('sign', 'download')", name=op.f("ck_access_links_purpose")),
        sa.ForeignKeyConstraint(
            ["party_id"], ["parties.id"], name=op.f("fk_access_links_party_id_parties")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_access_links")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_access_links_token_sha256")),
    )
    op.create_index(op.f("ix_access_links_party_id"), "access_links", ["party_id"], unique=False)

    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("contract_id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("party_id", sa.Integer(), nullable=True),
        sa.Column("ip", sa.String(length=45), nullable=True),
        sa.Column("user_agent", sa.String(length=512), nullable=True),
        sa.Column("email", sa.String(length=254), nullable=True),
        sa.Column("identification", sa.String(length=12), nullable=True),
        sa.Column("document_sha256", sa.String(length=64), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("prev_sha256", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.CheckConstraint(
            "kind IN ('created', 'sent', 'email_queued', 'opened', 'code_sent', "
            "'code_verified', 'code_failed', 'locked', 'consented', 'declined', 'reminded', "
            "'cancelled', 'expired', 'signed', 'completed', 'chain_timestamped', 'downloaded')",
            name=op.f("ck_audit_events_kind"),
        ),
        sa.ForeignKeyConstraint(
            ["contract_id"], ["contracts.id"], name=op.f("fk_audit_events_contract_id_contracts")
        ),
        sa.ForeignKeyConstraint(
            ["party_id"], ["parties.id"], name=op.f("fk_audit_events_party_id_parties")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
        sa.UniqueConstraint("contract_id", "seq", name="uq_audit_events_contract_id_seq"),
    )
    op.create_index(
        op.f("ix_audit_events_contract_id"), "audit_events", ["contract_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_audit_events_contract_id"), table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_index(op.f("ix_access_links_party_id"), table_name="access_links")
    op.drop_table("access_links")
    op.drop_index(op.f("ix_parties_contract_id"), table_name="parties")
    op.drop_table("parties")
    op.drop_index(op.f("ix_contracts_status"), table_name="contracts")
    op.drop_index(op.f("ix_contracts_created_by"), table_name="contracts")
    op.drop_table("contracts")

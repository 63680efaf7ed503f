"""Tables of koin. Every change here needs a hand-reviewed migration in ``migrations/versions``.

The record of signed documents lives here; the other tables live beside their services.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, func
from sqlalchemy.orm import Mapped, mapped_column

from signer import SignatureLevel

from ._db import Base, utcnow

__all__ = ["SignedDocument", "SigningChannel"]

_LEVELS = ", ".join(f"'{level.value}'" for level in SignatureLevel)


class SigningChannel(StrEnum):
    """How a document came to be signed (shown in the history)."""

    WEB = "web"  # a staff member on the signing page
    API = "api"  # POST /api/v1/sign with an API key
    BATCH = "batch"  # a batch (page, API or remote CLI)
    CLI = "cli"  # koin sign / koin sign-batch on the server
    CONTRACT = "contract"  # the witness signature of a completed contract


_CHANNELS = ", ".join(f"'{channel.value}'" for channel in SigningChannel)


class SignedDocument(Base):
    """One document signed by koin, found again by the ID printed on its stamp or by the
    SHA-256 of the signed file."""

    __tablename__ = "signed_documents"
    __table_args__ = (
        CheckConstraint(f"level IN ({_LEVELS})", name="level"),
        CheckConstraint(f"channel IN ({_CHANNELS})", name="channel"),
        Index("ix_signed_documents_signed_at", "signed_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    #: Printed ID, canonical form ``XXXX-XXXX-XXXX-XXXX`` (Crockford base32).
    document_id: Mapped[str] = mapped_column(String(19), unique=True)
    #: Lower-case hex SHA-256 of the signed output.
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    #: Key role that signed, e.g. ``position`` or ``witness``.
    signer_role: Mapped[str] = mapped_column(String(32))
    #: Subject of the signing certificate, e.g. ``CN=Governor of Ibaraki Prefecture,...``.
    signer_subject: Mapped[str] = mapped_column(String(512))
    #: PAdES level, a :class:`signer.SignatureLevel` value (``B-B`` … ``B-LTA``).
    level: Mapped[str] = mapped_column(String(8))
    signed_at: Mapped[dt.datetime]
    #: Name of the uploaded original, if there was one.
    file_name: Mapped[str | None] = mapped_column(String(255))
    page_count: Mapped[int | None]
    #: The staff member on whose behalf it was signed (page, API key, batch); None when
    #: signed from the server's command line or as a contract's witness signature.
    signed_by: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    #: Name of the stamp template used, if any.
    template: Mapped[str | None] = mapped_column(String(64))
    #: A :class:`SigningChannel` value; None for records made before it was kept.
    channel: Mapped[str | None] = mapped_column(String(12))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, server_default=func.now())

    @property
    def signature_level(self) -> SignatureLevel:
        return SignatureLevel(self.level)

    def __repr__(self) -> str:
        return f"SignedDocument(document_id={self.document_id!r}, level={self.level!r})"

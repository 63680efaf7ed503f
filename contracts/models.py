"""Tables of koin. Every change here needs a hand-reviewed migration in ``migrations/versions``.

For now only the record of signed documents; batches, contracts and users will join it.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import CheckConstraint, String, func
from sqlalchemy.orm import Mapped, mapped_column

from signer import SignatureLevel

from ._db import Base, utcnow

__all__ = ["SignedDocument"]

_LEVELS = ", ".join(f"'{level.value}'" for level in SignatureLevel)


class SignedDocument(Base):
    """One document signed by koin, found again by the ID printed on its stamp or by the
    SHA-256 of the signed file."""

    __tablename__ = "signed_documents"
    __table_args__ = (CheckConstraint(f"level IN ({_LEVELS})", name="level"),)

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
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, server_default=func.now())

    @property
    def signature_level(self) -> SignatureLevel:
        return SignatureLevel(self.level)

    def __repr__(self) -> str:
        return f"SignedDocument(document_id={self.document_id!r}, level={self.level!r})"

"""Errors of the time-stamping layer."""

from __future__ import annotations

from keys.errors import KoinError

__all__ = ["TimestampError"]


class TimestampError(KoinError):
    """No trustworthy RFC 3161 timestamp could be obtained.

    Raised instead of ever falling back to the local clock.

    :ivar fields: ``attempts`` maps each TSA URL tried to why it failed.
    """

from __future__ import annotations

from enum import StrEnum

__all__ = ["Role"]


class Role(StrEnum):
    """What a key is used for. Each role has exactly one active key in a key store."""

    #: 職責による電子署名: the position certificate "Governor of Ibaraki Prefecture".
    POSITION = "position"
    #: The service's own key that signs witness-type contracts.
    WITNESS = "witness"
    #: The RFC 3161 time-stamping authority.
    TSA = "tsa"

"""Document IDs printed on stamps: short, unambiguous when read aloud or typed from paper."""

from __future__ import annotations

import re
import secrets

__all__ = ["ALPHABET", "new_document_id", "is_document_id"]

# Crockford base32: no I, L, O, U, so 0/O and 1/I/L never get confused on paper.
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PATTERN = re.compile(r"^[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){3}$")


def new_document_id() -> str:
    """80 random bits as ``XXXX-XXXX-XXXX-XXXX``."""
    value = secrets.randbits(80)
    chars = "".join(ALPHABET[(value >> (5 * i)) & 31] for i in range(16))
    return "-".join(chars[i : i + 4] for i in range(0, 16, 4))


def is_document_id(text: str) -> bool:
    return bool(_PATTERN.match(text))

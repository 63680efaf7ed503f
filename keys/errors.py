"""Errors of the key layer, and :class:`KoinError`, the root of every koin error.

``keys`` is the bottom layer that every other package may import, so the root error lives here.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "KoinError",
    "KeyStoreError",
    "PassphraseError",
    "RoleNotConfigured",
    "CertificateImportError",
    "TokenError",
    "PinError",
]


class KoinError(Exception):
    """Root of all koin errors.

    :ivar message: what went wrong, in Japanese (the default UI language).
    :ivar message_en: the same in English.
    :ivar fields: structured details for logs and API responses (never secrets).
    """

    def __init__(self, message: str, message_en: str | None = None, **fields: Any) -> None:
        self.message = message
        self.message_en = message_en or message
        self.fields = fields
        super().__init__(self.message_en)

    def __str__(self) -> str:
        if self.message_en and self.message_en != self.message:
            return f"{self.message_en} ({self.message})"
        return self.message


class KeyStoreError(KoinError):
    """The key store is missing, unreadable or inconsistent."""


class PassphraseError(KeyStoreError):
    """No passphrase was given, or it does not open the key files."""


class RoleNotConfigured(KeyStoreError):
    """No key is configured for the requested role."""


class CertificateImportError(KeyStoreError):
    """A PKCS#12 file offered for import is unusable for the role."""


class TokenError(KeyStoreError):
    """A PKCS#11 module, token or key cannot be used (missing, ambiguous, refused)."""


class PinError(TokenError):
    """No PKCS#11 PIN was given, or the token refuses it. The message never contains the PIN."""

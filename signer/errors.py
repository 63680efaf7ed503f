"""Errors of the signing layer."""

from __future__ import annotations

from keys.errors import KoinError

__all__ = [
    "VerifyInputError",
    "InvalidPdfError",
    "LtaError",
    "EncryptedPdfError",
    "AlreadySignedPdfError",
    "UnsignablePdfError",
    "PlacementError",
    "SigningError",
    "StampAssetError",
]


class SigningError(KoinError):
    """The document could not be signed."""


class InvalidPdfError(SigningError):
    """The input is not a PDF, is truncated, or its structure (xref) is broken."""


class EncryptedPdfError(InvalidPdfError):
    """The input is encrypted (password or certificate); koin does not sign encrypted PDFs."""


class AlreadySignedPdfError(SigningError):
    """The input already carries a signature, where an unsigned original is required (the
    original of a witness-type contract)."""


class UnsignablePdfError(SigningError):
    """The PDF is readable but must not be signed as asked: an existing signature fails
    verification (koin does not seal over a forgery or a tampered document), or its
    certification signature forbids the change. The document is at fault, not the service:
    trying again does not help."""


class PlacementError(SigningError):
    """The page number or stamp box does not fit the document."""


class LtaError(SigningError):
    """A signed PDF or time-stamp token cannot be brought to or kept at long-term validity
    (no signature in it, a token that cannot be read, a weak-algorithm setting that cannot be
    understood). ``reason`` names the cause."""


class StampAssetError(SigningError):
    """The seal image or stamp font is missing or unusable."""


class VerifyInputError(KoinError):
    """A file offered for verification cannot be verified at all (too large, not a PDF,
    unreadable, encrypted). ``status`` is the HTTP status a web front end should answer."""

    @property
    def status(self) -> int:
        return int(self.fields.get("status", 422))

    @property
    def reason(self) -> str:
        return str(self.fields.get("reason", "invalid"))

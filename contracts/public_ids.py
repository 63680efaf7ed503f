"""Public identifiers of contracts and batches, as they appear in URLs and CLI arguments."""

from __future__ import annotations

import secrets

_PUBLIC_ID_BYTES = 16


def new_public_id() -> str:
    """A random URL-safe identifier (128 bits) that never begins with ``-`` or ``_``.

    An identifier beginning with ``-`` is read as an option when a clerk pastes it into
    ``koin evidence export ID OUT``; drawing again costs nothing and keeps every ID usable
    on the command line as it is.
    """
    while True:
        candidate = secrets.token_urlsafe(_PUBLIC_ID_BYTES)
        if candidate[0].isalnum():
            return candidate

"""A secret shown once: a new password, API key or webhook secret is carried to the next page
in the session, encrypted (the session cookie is only signed) with a key derived from the app's
secret key per purpose, and removed when it is read."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from flask import current_app, session

__all__ = ["keep_once", "take_once"]


def _cipher(purpose: str) -> Fernet:
    secret = current_app.secret_key
    key = secret.encode() if isinstance(secret, str) else bytes(secret or b"")
    derived = hmac.new(key, purpose.encode(), hashlib.sha256).digest()
    return Fernet(base64.urlsafe_b64encode(derived))


def keep_once(name: str, purpose: str, payload: dict[str, Any]) -> None:
    """Put ``payload`` in the session under ``name``, encrypted for ``purpose``."""
    token = _cipher(purpose).encrypt(json.dumps(payload).encode())
    session[name] = token.decode("ascii")


def take_once(name: str, purpose: str, ttl: int) -> dict[str, Any] | None:
    """The payload kept under ``name`` if it is there, readable and younger than ``ttl``
    seconds; it is removed either way."""
    token = session.pop(name, None)
    if not isinstance(token, str):
        return None
    try:
        payload = json.loads(_cipher(purpose).decrypt(token.encode("ascii"), ttl=ttl))
    except (InvalidToken, ValueError):
        return None
    return payload if isinstance(payload, dict) else None

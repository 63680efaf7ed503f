"""API keys on the REST API v1: ``Authorization: Bearer koin_…`` and a rate limit per key.

The rate limit is a token bucket per key (``KOIN_API_RATE`` requests per second, bursts of
``KOIN_API_BURST``), shared by all server processes when the installation has Redis
(:mod:`web.ratelimit`), else counted in each process.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import Flask, Response, g, request

import contracts
from contracts.apikeys import ApiScope

from . import services
from .errors import api_error
from .ratelimit import RateLimiter, limiter

__all__ = ["api_user", "require_api_key"]

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_RATE = 10.0
DEFAULT_BURST = 20


def _configured(app: Flask) -> tuple[float, int]:
    return (float(app.config.get("KOIN_API_RATE", DEFAULT_RATE)),
            int(app.config.get("KOIN_API_BURST", DEFAULT_BURST)))


def _limiter() -> RateLimiter:
    return limiter("api_key", _configured)


def _unauthorized(message: str, message_en: str) -> tuple[Response, int]:
    response, status = api_error(401, "unauthorized", message, message_en)
    response.headers["WWW-Authenticate"] = 'Bearer realm="koin"'
    return response, status


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def require_api_key(scope: ApiScope) -> Callable[[F], F]:
    """Let the view run only for a request with a valid API key carrying ``scope``; the key's
    owner is then :func:`api_user`.

    :raise 401: no ``Authorization: Bearer`` header, or the key is malformed, unknown or
        revoked (with ``WWW-Authenticate: Bearer``).
    :raise 403: the key lacks ``scope`` (or its owner the role the scope needs).
    :raise 429: more requests with this key than the rate limit allows (``Retry-After``).
    """

    def decorator(view: F) -> F:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            raw = _bearer()
            if raw is None:
                return _unauthorized(
                    "Authorization: Bearer ヘッダーで API キーを送ってください。",
                    "Send an API key in an 'Authorization: Bearer' header.",
                )
            try:
                with contracts.session_scope(services.session_factory()) as session:
                    user = contracts.authenticate_api_key(session, raw, scope=scope)
            except contracts.ApiKeyInvalid as exc:
                return _unauthorized(exc.message, exc.message_en or exc.message)
            except contracts.ApiKeyScope as exc:
                return api_error(403, "forbidden", exc.message, exc.message_en or exc.message)
            wait = _limiter().take(hashlib.sha256(raw.encode()).hexdigest())
            if wait > 0:
                response, status = api_error(
                    429,
                    "rate_limited",
                    "リクエストが多すぎます。しばらく待ってから再試行してください。",
                    "Too many requests with this API key; retry later.",
                )
                response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
                return response, status
            g.api_user = user
            return view(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator


def api_user() -> contracts.User:
    """The owner of the API key of this request (inside a :func:`require_api_key` view)."""
    user: contracts.User = g.api_user
    return user

"""API keys on the REST API v1: ``Authorization: Bearer koin_…`` and a rate limit per key.

The rate limit is a token bucket per key held in this process's memory
(``KOIN_API_RATE`` requests per second, bursts of ``KOIN_API_BURST``). With several worker
processes each process counts for itself, so the effective limit is that many times higher; a
shared limit would need a shared store (e.g. the reverse proxy's own limiter).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import Response, current_app, g, request

import contracts
from contracts.apikeys import ApiScope

from . import services
from .errors import api_error

__all__ = ["TokenBucketLimiter", "api_user", "require_api_key"]

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_RATE = 10.0
DEFAULT_BURST = 20
#: Buckets untouched this long are dropped (they would be full again anyway).
_IDLE_SECONDS = 600.0


class TokenBucketLimiter:
    """Token buckets keyed by a string: ``rate`` tokens per second, at most ``burst``."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, when)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Take one token for ``key``: 0.0 if there was one, else the seconds until there is."""
        with self._lock:
            now = self._clock()
            tokens, when = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - when) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
            if len(self._buckets) > 10_000:
                self._buckets = {
                    k: v for k, v in self._buckets.items() if now - v[1] < _IDLE_SECONDS
                }
            return wait


def _limiter() -> TokenBucketLimiter:
    extensions = current_app.extensions
    limiter: TokenBucketLimiter | None = extensions.get("koin_api_limiter")
    if limiter is None:
        limiter = TokenBucketLimiter(
            float(current_app.config.get("KOIN_API_RATE", DEFAULT_RATE)),
            int(current_app.config.get("KOIN_API_BURST", DEFAULT_BURST)),
        )
        extensions["koin_api_limiter"] = limiter
    return limiter


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

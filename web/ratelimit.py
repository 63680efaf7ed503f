"""Token-bucket rate limits, per process or shared by every process of an installation.

``KOIN_RATE_LIMIT_STORE`` chooses where the buckets live:

- ``memory``: in each server process (one machine, ``koin serve``). With several processes
  each counts for itself, so the effective limit is that many times higher.
- a ``redis://`` (or ``rediss://``, ``unix://``) URL: in Redis, shared by every gunicorn
  process on every machine, so a login or access-code limit means what it says however many
  processes serve. Unset, the store is the Celery broker when that is Redis (the many-machine
  layout), else memory.

Keys in Redis are ``koin:rl:<installation>:<limit>:<SHA-256 of the key>``: the installation
part (from its secret key) keeps two installations on one Redis apart, and the hash keeps
client addresses, e-mail addresses and API keys out of Redis. Each bucket expires once it
would be full again.

If Redis cannot be reached, the request is counted in the process's own bucket instead (the
limits of the ``memory`` store), and a warning is logged at most once a minute per limit:
the hard limits — account lockout after failed logins, link lock after wrong access codes —
are kept in the database and hold either way.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

from flask import Flask, current_app

__all__ = [
    "RATE_LIMIT_STORE_ENV",
    "RateLimiter",
    "RedisTokenBucketLimiter",
    "TokenBucketLimiter",
    "check_store",
    "limiter",
    "rate_limit_store",
]

log = logging.getLogger(__name__)

RATE_LIMIT_STORE_ENV = "KOIN_RATE_LIMIT_STORE"
_REDIS_SCHEMES = ("redis", "rediss", "unix")
#: Buckets untouched this long are dropped from memory (they would be full again anyway).
_IDLE_SECONDS = 600.0
#: Seconds a Redis call of a limiter may take before the process's own bucket is used.
_REDIS_TIMEOUT = 0.5
_WARN_EVERY = 60.0


class RateLimiter(Protocol):
    rate: float
    burst: int

    def take(self, key: str) -> float:
        """Take one token for ``key``: 0.0 if there was one, else the seconds until there is."""
        ...


class TokenBucketLimiter:
    """Token buckets keyed by a string, in this process: ``rate`` tokens per second, at most
    ``burst``."""

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


# One bucket per key as a hash {tokens, when}; Redis's own clock, so that machines whose
# clocks differ still share one bucket. Returned as a string: Lua numbers become integers.
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'when')
local tokens = tonumber(bucket[1]) or burst
local when = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - when) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'when', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


class RedisTokenBucketLimiter:
    """The same token buckets kept in Redis, shared by every process that uses ``prefix``;
    the process's own :class:`TokenBucketLimiter` counts while Redis cannot be reached."""

    def __init__(self, client: Any, prefix: str, rate: float, burst: int) -> None:
        import redis

        self._unreachable = redis.RedisError
        self.local = TokenBucketLimiter(rate, burst)
        self.rate = rate
        self.burst = burst
        self._prefix = prefix
        self._take = client.register_script(_TAKE)
        self._warned_at = -_WARN_EVERY

    def take(self, key: str) -> float:
        name = f"{self._prefix}:{hashlib.sha256(key.encode('utf-8')).hexdigest()}"
        try:
            return float(self._take(keys=[name], args=[repr(self.rate), self.burst]))
        except self._unreachable as exc:
            now = time.monotonic()
            if now - self._warned_at >= _WARN_EVERY:
                self._warned_at = now
                log.warning(
                    "rate limit store unreachable (%s); %s counted in this process only",
                    exc.__class__.__name__, self._prefix.rsplit(":", 1)[-1],
                )
            return self.local.take(key)


def rate_limit_store(config: Mapping[str, Any]) -> str:
    """``"memory"`` or the Redis URL that the limiters of this app use (see the module)."""
    chosen = str(config.get("KOIN_RATE_LIMIT_STORE") or "").strip()
    if chosen:
        return chosen
    broker = str(config.get("KOIN_BROKER_URL") or "")
    return broker if urlsplit(broker).scheme in _REDIS_SCHEMES else "memory"


def _redis_client(app: Flask, url: str) -> Any:
    client = app.extensions.get("koin_rate_limit_redis")
    if client is None:
        import redis

        client = redis.Redis.from_url(
            url, socket_connect_timeout=_REDIS_TIMEOUT, socket_timeout=_REDIS_TIMEOUT
        )
        client = app.extensions.setdefault("koin_rate_limit_redis", client)
    return client


def _installation_tag(app: Flask) -> str:
    secret = str(app.config.get("SECRET_KEY") or app.config.get("KOIN_HOME") or "")
    return hashlib.sha256(b"koin rate limits\0" + secret.encode("utf-8")).hexdigest()[:16]


def limiter(name: str, rate_and_burst: Callable[[Flask], tuple[float, int]]) -> RateLimiter:
    """The limiter ``name`` of the current app, made on first use in the configured store
    with the rate and burst that ``rate_and_burst`` reads from the app (then never again)."""
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    limiters: dict[str, RateLimiter] = app.extensions.setdefault("koin_limiters", {})
    found = limiters.get(name)
    if found is not None:
        return found
    rate, burst = rate_and_burst(app)
    store = check_store(app.config)
    made: RateLimiter
    if store == "memory":
        made = TokenBucketLimiter(rate, burst)
    else:
        prefix = f"koin:rl:{_installation_tag(app)}:{name}"
        made = RedisTokenBucketLimiter(_redis_client(app, store), prefix, rate, burst)
    return limiters.setdefault(name, made)


def check_store(config: Mapping[str, Any]) -> str:
    """:func:`rate_limit_store`, refused at start-up if it is neither ``memory`` nor Redis.

    :raises ValueError: an unusable ``KOIN_RATE_LIMIT_STORE``.
    """
    store = rate_limit_store(config)
    if store != "memory" and urlsplit(store).scheme not in _REDIS_SCHEMES:
        raise ValueError(
            f"{RATE_LIMIT_STORE_ENV} must be 'memory' or a redis://, rediss:// or unix:// URL"
        )
    return store

"""Security headers on every response, and the rate limits of the public forms.

Headers (:func:`init_app`): a Content Security Policy without inline scripts or styles
(``script-src 'self'``: every script is a file under ``web/static/``) that no page may be
framed by (``frame-ancestors 'none'`` — a party's 合意する button cannot be clickjacked),
``X-Content-Type-Options: nosniff``, ``Referrer-Policy`` (``no-referrer`` on the link pages
``/c/…`` and ``/d/…``, whose address is the credential; ``strict-origin`` elsewhere),
``Cache-Control: no-store`` on everything but static files and the public PKI files (pages
name the logged-in user, parties' data, uploaded documents' reports), and HSTS when
``KOIN_PUBLIC_URL`` is https.

Rate limits (:func:`rate_limited`): token buckets (:mod:`web.ratelimit`) per client address
and per account or link, for staff login, the access / one-time code of a party link, and
verification uploads; the API keys have their own (:mod:`web.apiauth`). They are shared by
every server process through Redis when the installation has it (``KOIN_RATE_LIMIT_STORE``,
default the Celery broker when that is Redis), else counted in each process. The client address is
``request.remote_addr``; behind reverse proxies set ``KOIN_TRUSTED_PROXIES`` (see
:func:`init_app`) so that it is the client's, not the proxy's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from flask import Flask, Response, current_app, request
from werkzeug.middleware.proxy_fix import ProxyFix

from .ratelimit import RateLimiter, check_store, limiter

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "DEFAULT_RATE_LIMITS",
    "LINK_PREFIXES",
    "client_address",
    "init_app",
    "rate_limited",
]

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",  # the template preview is a data: PNG
    "font-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])

#: Paths whose address carries a party's link token.
LINK_PREFIXES = ("/c/", "/d/")

#: Requests per second and burst, per limiter; ``KOIN_RATE_LIMITS`` (a mapping) overrides
#: single entries.
DEFAULT_RATE_LIMITS: Mapping[str, tuple[float, int]] = {
    # Per address the limits are generous (an office behind one NAT address shares them):
    # they stop floods and password spraying, not people.
    # staff login: 60 tries from one address at once, then one every 2 s …
    "login_ip": (0.5, 60),
    # … and 10 tries for one account, then 5 a minute (the account also locks for 15 minutes
    # after 5 failures in a row: contracts.accounts)
    "login_account": (1 / 12, 10),
    # access codes and one-time codes of party links: the same (a link also locks after 5
    # wrong codes: contracts.workflow)
    "code_ip": (0.5, 60),
    "code_link": (1 / 12, 10),
    # verification uploads (each may hold a process for up to KOIN_VERIFY_TIME_LIMIT s):
    # 60 at once, then one every 2 s
    "verify_ip": (0.5, 60),
}

#: Endpoints whose answers may be cached (public, the same for everyone).
_CACHEABLE = frozenset({"static", "pki.crl", "pki.ca_certificate"})


def client_address() -> str:
    """The client's address as the rate limits see it."""
    return request.remote_addr or "unknown"


def _limiter(name: str) -> RateLimiter:
    def configured(app: Flask) -> tuple[float, int]:
        rate, burst = {**DEFAULT_RATE_LIMITS, **(app.config.get("KOIN_RATE_LIMITS") or {})}[name]
        return float(rate), int(burst)

    return limiter(name, configured)


def rate_limited(*checks: tuple[str, str]) -> int | None:
    """Take a token from each ``(limiter name, key)``; None if every one had a token, else
    the seconds to wait (for ``Retry-After``), at least 1.

    Every bucket is charged, so that one address cannot spare its own bucket by spreading
    tries over many accounts, nor many addresses spare one account's.
    """
    wait = 0.0
    for name, key in checks:
        wait = max(wait, _limiter(name).take(key))
    return max(1, math.ceil(wait)) if wait > 0 else None


def _headers(response: Response) -> Response:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    on_link_page = request.path.startswith(LINK_PREFIXES)
    headers.setdefault("Referrer-Policy", "no-referrer" if on_link_page else "strict-origin")
    if "Cache-Control" not in headers and request.endpoint not in _CACHEABLE:
        headers["Cache-Control"] = "no-store"
    if str(current_app.config.get("KOIN_PUBLIC_URL", "")).lower().startswith("https://"):
        headers.setdefault("Strict-Transport-Security", "max-age=63072000; includeSubDomains")
    return response


def init_app(app: Flask) -> None:
    """Security headers on every response; with ``KOIN_TRUSTED_PROXIES`` = N > 0, the client
    address and scheme come from the ``X-Forwarded-For`` / ``-Proto`` headers set by the N
    reverse proxies in front (werkzeug's ``ProxyFix``; never trust them without proxies)."""
    app.after_request(_headers)
    check_store(app.config)  # a mistyped KOIN_RATE_LIMIT_STORE stops the start, not a login
    hops = int(app.config.get("KOIN_TRUSTED_PROXIES") or 0)
    if hops > 0:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=hops, x_proto=hops
        )

"""Japanese by default; English on request (``?lang=en``, remembered in a cookie)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Flask, Response, current_app, g, has_request_context, request
from flask_babel import Babel, get_translations

from signer import JST, format_japanese_datetime

__all__ = ["init_app", "localized", "LANGUAGES"]

LANGUAGES = ("ja", "en")
COOKIE = "koin_lang"


def _select_locale() -> str:
    wanted = request.args.get("lang") or request.cookies.get(COOKIE)
    return wanted if wanted in LANGUAGES else "ja"


def _remember_choice(response: Response) -> Response:
    wanted = request.args.get("lang")
    if wanted in LANGUAGES:
        # Secure like the session cookie: when KOIN_PUBLIC_URL is https (behind a proxy that
        # ends TLS the request itself looks like http), or when the request is https.
        secure = bool(current_app.config.get("SESSION_COOKIE_SECURE")) or request.is_secure
        response.set_cookie(
            COOKIE, wanted, max_age=365 * 24 * 3600, samesite="Lax", httponly=True,
            secure=secure,
        )
    return response


def localized(message: str, message_en: str) -> str:
    """The message in the language of this request's page (Japanese unless English was
    chosen): for the messages of services, which carry both."""
    return message_en if g.get("lang") == "en" else message


def _when(value: dt.datetime | None) -> str:
    """Datetimes for people: 令和 and JST in Japanese; ISO-like and also in Japan time in
    English (the prefecture's deadlines and documents are in JST; mixing zones between the
    two languages confused readers)."""
    if value is None:
        return "—"
    if getattr(g, "lang", "ja") == "ja":
        return format_japanese_datetime(value)
    return value.astimezone(JST).strftime("%Y-%m-%d %H:%M:%S JST")


def _translations() -> Any:
    """The catalogue of this request, looked up once: Flask-Babel looks it up again for every
    string of a template (about a fifth of a small page's time). Nothing here switches the
    locale inside a request (no ``force_locale``), so one lookup holds for the request."""
    if not has_request_context():
        return get_translations()
    found = g.get("_koin_translations")
    if found is None:
        found = g._koin_translations = get_translations()
    return found


def init_app(app: Flask) -> None:
    Babel(app, locale_selector=_select_locale)
    app.jinja_env.install_gettext_callables(  # type: ignore[attr-defined]
        gettext=lambda s: _translations().ugettext(s),
        ngettext=lambda s, p, n: _translations().ungettext(s, p, n),
        newstyle=True,
        pgettext=lambda c, s: _translations().upgettext(c, s),
        npgettext=lambda c, s, p, n: _translations().unpgettext(c, s, p, n),
    )
    app.after_request(_remember_choice)

    @app.before_request
    def _lang() -> None:
        g.lang = _select_locale()

    app.jinja_env.filters["when"] = _when
    app.jinja_env.globals["languages"] = LANGUAGES

"""Staff login: the login and logout pages, the session cookie, CSRF protection of every form,
and :func:`login_required` / :func:`current_user` for the pages behind them.

The session is Flask's signed cookie. It holds the user's ID, the time of the login (sessions
end 8 hours after it, however active) and a fingerprint of the password hash keyed with the
app's secret, so that a password change ends every other session of that user. The cookie is
HttpOnly, SameSite=Lax, and Secure when ``KOIN_PUBLIC_URL`` is https; the session is emptied
and re-created at login, so nothing planted in it beforehand survives.

The secret key comes from ``KOIN_SECRET_KEY`` or the file ``KOIN_HOME/secret_key`` (mode 0600),
created by ``koin init`` or at the first start.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
import stat
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.wrappers import Response

import contracts
import keys
from contracts import User, UserRole
from contracts.errors import AccountError
from keys import KoinError

from . import services
from .errors import page_error
from .i18n import localized
from .security import client_address, rate_limited

__all__ = [
    "SECRET_KEY_ENV",
    "SECRET_KEY_FILE",
    "SESSION_LIFETIME",
    "bp",
    "create_secret_key_file",
    "csrf",
    "current_user",
    "init_app",
    "keep_this_session",
    "login_required",
    "resolve_secret_key",
    "safe_next",
]

F = TypeVar("F", bound=Callable[..., Any])

bp = Blueprint("auth", __name__)
csrf = CSRFProtect()

SECRET_KEY_ENV = "KOIN_SECRET_KEY"
SECRET_KEY_FILE = "secret_key"
MIN_SECRET_KEY_LENGTH = 32
#: A login lasts this long at most, active or not.
SESSION_LIFETIME = dt.timedelta(hours=8)

_USER_ID = "user_id"
_FINGERPRINT = "password_fp"
_LOGGED_IN_AT = "logged_in_at"
_NOT_LOADED = object()


# -- secret key -------------------------------------------------------------------------------


def create_secret_key_file(home: Path) -> Path | None:
    """Create ``home/secret_key`` (random, mode 0600) unless it exists or ``KOIN_SECRET_KEY``
    is set; the path if it was created now. Safe against concurrent starts: the file appears
    complete or not at all, and the first writer wins.

    :raises OSError: ``home`` cannot be written.
    """
    if os.environ.get(SECRET_KEY_ENV, "").strip():
        return None
    path = home / SECRET_KEY_FILE
    if path.exists():
        return None
    draft = path.with_name(f".{SECRET_KEY_FILE}.{secrets.token_hex(8)}.new")
    keys.write_private_file(draft, secrets.token_hex(32).encode("ascii") + b"\n")
    try:
        os.link(draft, path)
    except FileExistsError:
        return None
    finally:
        draft.unlink(missing_ok=True)
    return path


def resolve_secret_key(home: Path) -> str:
    """``KOIN_SECRET_KEY``, else the contents of ``home/secret_key`` (created when missing).

    :raises KoinError: the key is too short, its file is readable by others, or it cannot be
        created.
    """
    from_env = os.environ.get(SECRET_KEY_ENV, "").strip()
    if from_env:
        if len(from_env) < MIN_SECRET_KEY_LENGTH:
            raise KoinError(
                f"{SECRET_KEY_ENV} が短すぎます"
                f"（{MIN_SECRET_KEY_LENGTH} 文字以上にしてください）。",
                f"{SECRET_KEY_ENV} is too short (use at least {MIN_SECRET_KEY_LENGTH} characters).",
            )
        return from_env
    path = home / SECRET_KEY_FILE
    try:
        create_secret_key_file(home)
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KoinError(
                f"秘密鍵ファイル {path} が他のユーザーから読めます(chmod 600 にしてください)。",
                f"The secret key file {path} is readable by other users; chmod 600 it.",
            )
        value = path.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise KoinError(
            f"セッション用の秘密鍵 {path} を読み書きできません。{SECRET_KEY_ENV} を設定して"
            "ください。",
            f"Cannot read or create the session secret {path} ({exc.__class__.__name__}); "
            f"set {SECRET_KEY_ENV}.",
        ) from exc
    if len(value) < MIN_SECRET_KEY_LENGTH:
        raise KoinError(
            f"秘密鍵ファイル {path} の内容が短すぎます。",
            f"The secret key file {path} is too short.",
        )
    return value


# -- the logged-in user -----------------------------------------------------------------------


def _fingerprint(user: User) -> str:
    """Binds a session to the password hash: a new password invalidates older sessions."""
    secret = current_app.secret_key
    key = secret.encode() if isinstance(secret, str) else bytes(secret or b"")
    message = b"koin-session\0" + user.password_hash.encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


def _load_user() -> User | None:
    user_id = session.get(_USER_ID)
    logged_in_at = session.get(_LOGGED_IN_AT)
    if not isinstance(user_id, int) or not isinstance(logged_in_at, int | float):
        return None
    age = time.time() - logged_in_at
    if not -60 <= age <= current_app.permanent_session_lifetime.total_seconds():
        session.clear()
        return None
    with contracts.session_scope(services.session_factory()) as db:
        user = contracts.get_user(db, user_id)
        if user is not None:
            db.expunge(user)
    fingerprint = str(session.get(_FINGERPRINT, ""))
    if user is None or not user.is_active or not hmac.compare_digest(
        fingerprint, _fingerprint(user)
    ):
        session.clear()
        return None
    return user


def current_user() -> User | None:
    """The user logged in with this request's session, or None (loaded once per request).

    Sessions end when the user is deleted or disabled, the password changes, or
    ``SESSION_LIFETIME`` has passed since the login.
    """
    user = g.get("koin_user", _NOT_LOADED)
    if user is _NOT_LOADED:
        user = _load_user()
        g.koin_user = user
    assert user is None or isinstance(user, User)
    return user


def safe_next(target: str | None) -> str | None:
    """``target`` if it is a path on this site (``/…``), else None: no scheme, no host, no
    ``//host`` or ``/\\host`` that a browser would take for another site."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return None
    if "\\" in target or any(ord(char) < 0x20 or ord(char) == 0x7F for char in target):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    return target


def _here() -> str:
    query = request.query_string.decode("latin-1")
    return f"{request.path}?{query}" if query else request.path


def _forbidden() -> tuple[str, int]:
    return page_error(
        403,
        "このページを表示する権限がありません。",
        "You do not have permission to view this page.",
    )


def login_required(*roles: UserRole | str) -> Callable[[F], F]:
    """Let the view run only for a logged-in user who holds one of ``roles`` (any role, if
    none are given)::

        @bp.get("/contracts")
        @login_required(UserRole.OFFICER, UserRole.ADMIN)
        def contract_list() -> str: ...

    :raise 302: not logged in: to ``/login?next=<this page>``.
    :raise 403: logged in without any of ``roles``.
    :raises ValueError: (when decorating) a role that does not exist.
    """
    wanted = frozenset(UserRole(role) for role in roles)

    def decorator(view: F) -> F:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            user = current_user()
            if user is None:
                return redirect(url_for("auth.login", next=_here()))
            if wanted and not wanted & user.roles:
                return _forbidden()
            return view(*args, **kwargs)

        return wrapped  # type: ignore[return-value]

    return decorator


# -- pages ------------------------------------------------------------------------------------


class _TooManyAttempts(AccountError):
    """Too many logins tried from this address or for this account (not recorded: the
    account's own lock counts failures, this only slows down the tries)."""

    def __init__(self, wait: int) -> None:
        super().__init__(
            f"ログインの試行が多すぎます。{wait} 秒ほど待ってから、もう一度お試しください。",
            f"Too many login attempts; wait {wait} seconds and try again.",
        )


def _login_page(
    status: int = 200, error: AccountError | None = None, next_url: str | None = None
) -> tuple[str, int]:
    text = None
    if error is not None:
        text = localized(error.message, error.message_en)
    page = render_template(
        "login.html",
        error=text,
        next_url=safe_next(next_url) or "",
        email=request.form.get("email", "") if request.method == "POST" else "",
    )
    return page, status


@bp.get("/login")
def login() -> tuple[str, int]:
    return _login_page(next_url=request.args.get("next"))


@bp.post("/login")
def login_submit() -> Response | tuple[str, int] | tuple[str, int, dict[str, str]]:
    """Log in and go to ``next`` (a local path) or the start page.

    :raise 400: the CSRF token is missing or invalid (the form is shown again).
    :raise 401: unknown email or wrong password (one message for both), or disabled account.
    :raise 429: the account is locked after too many failures, or too many logins were tried
        from this address or for this account (:mod:`web.security`); ``Retry-After`` says how
        long.
    """
    next_url = request.form.get("next") or request.args.get("next")
    email = request.form.get("email", "").strip().lower()[:320]
    wait = rate_limited(("login_ip", client_address()), ("login_account", email))
    if wait is not None:
        page, status = _login_page(429, _TooManyAttempts(wait), next_url)
        return page, status, {"Retry-After": str(wait)}
    try:
        with contracts.session_scope(services.session_factory()) as db:
            user = contracts.authenticate(
                db, request.form.get("email", ""), request.form.get("password", "")
            )
    except contracts.AccountLocked as exc:
        page, status = _login_page(429, exc, next_url)
        wait = exc.seconds_left()
        return page, status, {"Retry-After": str(wait)}
    except AccountError as exc:
        return _login_page(401, exc, next_url)
    session.clear()  # a fresh session: nothing set before the login survives it
    session.permanent = True
    session[_USER_ID] = user.id
    session[_LOGGED_IN_AT] = int(time.time())
    session[_FINGERPRINT] = _fingerprint(user)
    g.koin_user = user
    return redirect(safe_next(next_url) or url_for("pki.index"))


def keep_this_session(user: User) -> None:
    """After ``user`` changed their own password: this session goes on (bound to the new
    password), while every other session of theirs has ended."""
    session[_FINGERPRINT] = _fingerprint(user)
    g.koin_user = user


@bp.post("/logout")
def logout() -> Response:
    """End the session and show the login page."""
    session.clear()
    g.koin_user = None
    flash("logged_out")
    return redirect(url_for("auth.login"))


# -- set-up -----------------------------------------------------------------------------------


def _csrf_failed(exc: CSRFError) -> tuple[str, int]:
    """A form without a valid CSRF token: a clear page, never a stack trace."""
    message = (
        "フォームの有効期限が切れたか、送信元を確認できませんでした。"
        "ページを再読み込みして、もう一度お試しください。"
    )
    message_en = (
        "The form has expired or its origin could not be confirmed. "
        "Reload the page and try again."
    )
    if request.endpoint == "auth.login_submit":
        text = localized(message, message_en)
        page = render_template(
            "login.html", error=text, next_url=safe_next(request.form.get("next")) or "",
            email=request.form.get("email", ""),
        )
        return page, 400
    return page_error(400, message, message_en)


def init_app(app: Flask) -> None:
    """Secret key, session cookie flags, CSRF protection of every form, ``current_user`` in
    templates. The caller registers :data:`bp` and exempts stateless blueprints from CSRF.

    :raises KoinError: no usable secret key (see :func:`resolve_secret_key`).
    """
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = resolve_secret_key(Path(app.config["KOIN_HOME"]))
    if app.config.get("SESSION_COOKIE_SECURE") is None:
        public_url = str(app.config.get("KOIN_PUBLIC_URL", ""))
        app.config["SESSION_COOKIE_SECURE"] = public_url.lower().startswith("https://")
    csrf.init_app(app)
    app.register_error_handler(CSRFError, _csrf_failed)

    @app.context_processor
    def _user() -> dict[str, Any]:
        return {"current_user": current_user()}

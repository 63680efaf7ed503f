"""The staff member's own account (アカウント): changing one's password.

- ``GET /account/password``: the form (current password, new one twice)
- ``POST /account/password``: change it; other sessions of the account end, this one goes on

A wrong current password counts as a failed login (:func:`contracts.change_password`): five in a
row lock the account, so a session left open on a shared PC cannot be used to guess it. The
form is also limited like the login (:mod:`web.security`).
"""

from __future__ import annotations

import logging

from flask import Blueprint, flash, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

import contracts
from contracts import User
from contracts.accounts import MIN_PASSWORD_LENGTH
from contracts.errors import AccountError

from . import services
from .auth import current_user, keep_this_session, login_required
from .i18n import localized
from .security import client_address, rate_limited

__all__ = ["bp"]

log = logging.getLogger(__name__)

bp = Blueprint("account", __name__, url_prefix="/account")


def _page(status: int = 200, error: str | None = None, field: str | None = None
          ) -> tuple[str, int]:
    return render_template(
        "account_password.html", error=error, error_field=field,
        min_length=MIN_PASSWORD_LENGTH,
    ), status


@bp.get("/password")
@login_required()
def password_form() -> tuple[str, int]:
    return _page()


@bp.post("/password")
@login_required()
def password_change() -> Response | tuple[str, int] | tuple[str, int, dict[str, str]]:
    """Change the logged-in user's password.

    :raise 400: the new password is unusable, or the two copies differ.
    :raise 401: the current password is wrong (counted as a failed login).
    :raise 429: the account is locked, or too many tries (``Retry-After``).
    """
    user = current_user()
    assert user is not None  # login_required ran first
    wait = rate_limited(("login_ip", client_address()), ("login_account", user.email))
    if wait is not None:
        page, status = _page(429, localized(
            f"試行が多すぎます。{wait} 秒ほど待ってから、もう一度お試しください。",
            f"Too many attempts; wait {wait} seconds and try again.",
        ))
        return page, status, {"Retry-After": str(wait)}
    current = request.form.get("current_password", "")
    new = request.form.get("new_password", "")
    if new != request.form.get("new_password_again", ""):
        return _page(400, localized(
            "新しいパスワードが確認用の入力と一致しません。",
            "The two copies of the new password differ.",
        ), "new_password_again")
    try:
        with contracts.session_scope(services.session_factory()) as db:
            account = db.get(User, user.id)
            if account is None:  # deleted meanwhile: the session ends with the next page
                return redirect(url_for("auth.login"))
            contracts.change_password(db, account, current, new)
    except contracts.AccountLocked as exc:
        page, status = _page(429, localized(exc.message, exc.message_en))
        return page, status, {"Retry-After": str(exc.seconds_left())}
    except contracts.WrongCurrentPassword as exc:
        return _page(401, localized(exc.message, exc.message_en), "current_password")
    except AccountError as exc:
        return _page(400, localized(exc.message, exc.message_en), "new_password")
    keep_this_session(account)
    log.info("user %s changed their password", account.id)
    flash("password_changed", "account")
    return redirect(url_for(".password_form"), code=303)

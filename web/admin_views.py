"""The administrator's pages (管理): staff accounts and the audit search.

Every page is for logged-in administrators; anyone else gets 403 (anonymous visitors are sent
to the login page).

- ``GET /admin``: links to every administrator's page
- ``GET /admin/users``: every account (email, name, roles, active, last login); right after
  creating one, its initial password, once
- ``POST /admin/users``: create an account (a generated password; see
  :func:`contracts.create_user`), back to the list
- ``POST /admin/users/roles``: give an account (``user_id``) exactly the ticked roles
- ``POST /admin/users/active``: switch an account off (``active=no``) or on again
  (``active=yes``); an administrator cannot switch off their own account, and the last
  active administrator cannot be removed
- ``GET /admin/audit?contract=&document=&actor=&kind=&from=&to=&page=``: the audit events of
  every contract, newest first, with the chain check of the contract searched for

The new password travels from the form to the list inside the session cookie, encrypted with a
key derived from the app's secret and for ten minutes at most, and is removed when shown (like
new API keys in :mod:`web.apikey_views`); it is never logged.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import unicodedata
from dataclasses import dataclass

from flask import (
    Blueprint,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.wrappers import Response

from contracts import (
    EventKind,
    User,
    UserExists,
    UserRole,
    create_user,
    get_user,
    list_users,
    session_scope,
)
from contracts.accounts import generate_password, set_password, set_roles, set_user_active
from contracts.audit_search import AuditFilterError, AuditFilters, search_events
from contracts.errors import AccountError
from keys import KoinError

from . import services
from ._once import keep_once, take_once
from .auth import current_user, login_required
from .errors import page_error
from .i18n import localized

__all__ = ["bp"]

log = logging.getLogger(__name__)

bp = Blueprint("admin_web", __name__, url_prefix="/admin")

#: How long the encrypted new password stays in the session if the list is never shown.
PASSWORD_TTL = 600
#: Audit events on one page.
AUDIT_PAGE = 50
_NEW_PASSWORD = "koin_new_user_password"
_DATE = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})")


class _FormInputError(KoinError):
    """A form or filter value is malformed (before any service is asked)."""



def _actor() -> User:
    user = current_user()
    assert user is not None  # login_required ran first
    return user


@bp.after_request
def _no_store(response: Response) -> Response:
    """A page may carry a new password: never kept in any cache."""
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.errorhandler(_FormInputError)
def _bad_input(exc: _FormInputError) -> tuple[str, int]:
    return page_error(400, exc.message, exc.message_en)


# -- the new password, once ---------------------------------------------------------------------


def _keep_password(email: str, password: str) -> None:
    keep_once(_NEW_PASSWORD, "koin-new-user-password", {"email": email, "password": password})


def _take_password() -> tuple[str, str] | None:
    """``(email, password)`` of the account just created, if the session carries it; it is
    removed, so a password is shown at most once."""
    payload = take_once(_NEW_PASSWORD, "koin-new-user-password", PASSWORD_TTL)
    try:
        return (str(payload["email"]), str(payload["password"])) if payload else None
    except KeyError:
        return None


# -- index --------------------------------------------------------------------------------------


@bp.get("")
@login_required(UserRole.ADMIN)
def index() -> str:
    """Links to the administrator's pages.

    :raise 403: not an administrator.
    """
    return render_template("admin_index.html")


# -- users --------------------------------------------------------------------------------------


@dataclass
class UserForm:
    """The create form as typed, to show again after an error."""

    email: str = ""
    display_name: str = ""
    roles: tuple[str, ...] = ()

    @classmethod
    def from_request(cls) -> UserForm:
        form = request.form
        return cls(
            email=form.get("email", "")[:320],
            display_name=form.get("display_name", "")[:400],
            roles=tuple(value[:20] for value in form.getlist("role")[:10]),
        )


def _users_page(
    form: UserForm | None = None, error: KoinError | None = None, status: int = 200
) -> tuple[str, int]:
    with services.session_factory()() as db:
        users = list_users(db)
    return (
        render_template(
            "admin_users.html",
            users=users,
            roles=list(UserRole),
            form=form or UserForm(),
            error=localized(error.message, error.message_en) if error is not None else None,
            new_password=_take_password() if request.method == "GET" else None,
            me=_actor().id,
            now=dt.datetime.now(dt.UTC),
        ),
        status,
    )


def _user_from_form(db_user_id: str) -> int:
    """:raises _FormInputError: no usable user ID."""
    if not db_user_id.isdigit() or len(db_user_id) > 12:
        raise _FormInputError("職員を選んでください。", "Choose a staff member.")
    return int(db_user_id)


@bp.get("/users")
@login_required(UserRole.ADMIN)
def users() -> tuple[str, int]:
    """Every account; an account just created is shown here with its password, once.

    :raise 403: not an administrator.
    """
    return _users_page()


@bp.post("/users")
@login_required(UserRole.ADMIN)
def create() -> Response | tuple[str, int]:
    """Create an account with a generated password; the list then shows it once.

    :raise 400: no CSRF token. :raise 403: not an administrator.
    :raise 409: the email address already has an account (shown on the page).
    :raise 422: unusable email, name or roles (shown on the page).
    """
    form = UserForm.from_request()
    try:
        with session_scope(services.session_factory()) as db:
            user, password = create_user(
                db, form.email, form.roles, display_name=form.display_name.strip() or None
            )
            email, user_id = user.email, user.id
    except UserExists as exc:
        return _users_page(form, exc, 409)
    except AccountError as exc:
        return _users_page(form, exc, 422)
    assert password is not None
    log.info("user %s created by user %s", user_id, _actor().id)
    _keep_password(email, password)
    return redirect(url_for(".users"), code=303)


@bp.post("/users/roles")
@login_required(UserRole.ADMIN)
def change_roles() -> Response | tuple[str, int]:
    """Give the account ``user_id`` exactly the ticked roles.

    :raise 400: no user chosen, or no CSRF token. :raise 403: not an administrator.
    :raise 404: no such account.
    :raise 422: no role ticked, or the last administrator would lose the role.
    """
    user_id = _user_from_form(request.form.get("user_id", ""))
    wanted = [value[:20] for value in request.form.getlist("role")[:10]]
    try:
        with session_scope(services.session_factory()) as db:
            user = get_user(db, user_id)
            if user is None:
                return _no_such_user()
            changed = set_roles(db, user, wanted)
            email, roles = user.email, ", ".join(sorted(user.roles))
    except AccountError as exc:
        return _users_page(error=exc, status=422)
    if changed:
        log.info("roles of user %s set to %s by user %s", user_id, roles, _actor().id)
    flash(localized(f"{email} の役割: {roles}", f"Roles of {email}: {roles}"), "users")
    return redirect(url_for(".users"), code=303)


@bp.post("/users/active")
@login_required(UserRole.ADMIN)
def change_active() -> Response | tuple[str, int]:
    """Switch the account ``user_id`` off (``active=no``) or on again (``active=yes``).

    :raise 400: no user chosen, no or an unknown ``active``, or no CSRF token.
    :raise 403: not an administrator. :raise 404: no such account.
    :raise 422: one's own account, or the last active administrator.
    """
    user_id = _user_from_form(request.form.get("user_id", ""))
    choice = request.form.get("active", "")
    if choice not in ("yes", "no"):
        raise _FormInputError("有効か無効かを選んでください。", "Choose active or inactive.")
    actor = _actor()
    try:
        with session_scope(services.session_factory()) as db:
            user = get_user(db, user_id)
            acting = get_user(db, actor.id)
            if user is None or acting is None:
                return _no_such_user()
            set_user_active(db, user, choice == "yes", actor=acting)
            email = user.email
    except AccountError as exc:
        return _users_page(error=exc, status=422)
    log.info("user %s %s by user %s", user_id,
             "activated" if choice == "yes" else "deactivated", actor.id)
    if choice == "yes":
        flash(localized(f"{email} を有効にしました。", f"{email} was activated."), "users")
    else:
        flash(localized(f"{email} を無効にしました。このアカウントではログインできません。",
                        f"{email} was deactivated; it can no longer log in."), "users")
    return redirect(url_for(".users"), code=303)


@bp.post("/users/password")
@login_required(UserRole.ADMIN)
def reset_password() -> Response | tuple[str, int]:
    """Give the account ``user_id`` a new generated password (the list then shows it once)
    and lift a lockout, for a staff member who forgot theirs; their sessions end.

    :raise 400: no user chosen, or no CSRF token. :raise 403: not an administrator.
    :raise 404: no such account. :raise 422: one's own account.
    """
    user_id = _user_from_form(request.form.get("user_id", ""))
    actor = _actor()
    if user_id == actor.id:
        return page_error(
            422, "自分のパスワードは、ほかの管理者か koin users reset-password で再発行します。",
            "Your own password is reissued by another administrator or with "
            "koin users reset-password.",
        )
    with session_scope(services.session_factory()) as db:
        user = get_user(db, user_id)
        if user is None:
            return _no_such_user()
        password = generate_password()
        set_password(db, user, password)
        email = user.email
    log.info("password of user %s reissued by user %s", user_id, actor.id)
    _keep_password(email, password)
    return redirect(url_for(".users"), code=303)


def _no_such_user() -> tuple[str, int]:
    return page_error(404, "この職員のアカウントはありません。", "There is no such account.")


# -- audit search -------------------------------------------------------------------------------


def _date_arg(name: str) -> dt.date | None:
    """:raises _FormInputError: not a date."""
    text = unicodedata.normalize("NFKC", request.args.get(name, "")).strip()
    if not text:
        return None
    match = _DATE.fullmatch(text)
    try:
        if match is None:
            raise ValueError(text)
        return dt.date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        raise _FormInputError(
            f"日付「{text[:20]}」を読み取れません(例: 2026-11-23)。",
            f"Cannot read the date “{text[:20]}” (e.g. 2026-11-23).",
        ) from None


def _page_number() -> int:
    try:
        return max(1, min(int(request.args.get("page", "1")), 100_000))
    except ValueError:
        return 1


@bp.get("/audit")
@login_required(UserRole.ADMIN)
def audit() -> tuple[str, int]:
    """The audit events of every contract, newest first, filtered; the chain check of the
    contract searched for.

    :raise 400: an unreadable filter (shown on the page). :raise 403: not an administrator.
    """
    args = request.args
    shown = {
        "contract": args.get("contract", "").strip()[:64],
        "document": args.get("document", "").strip()[:80],
        "actor": args.get("actor", "").strip()[:254],
        "kind": args.get("kind", "").strip()[:24],
        "from": args.get("from", "").strip()[:20],
        "to": args.get("to", "").strip()[:20],
    }
    page = _page_number()
    error: KoinError | None = None
    found = None
    officers: dict[int, User] = {}
    try:
        filters = AuditFilters(
            contract=shown["contract"], document=shown["document"], actor=shown["actor"],
            kind=shown["kind"], date_from=_date_arg("from"), date_to=_date_arg("to"),
        )
        with services.session_factory()() as db:
            found = search_events(db, filters, limit=AUDIT_PAGE, offset=(page - 1) * AUDIT_PAGE)
            officers = {user.id: user for user in list_users(db)}
    except (_FormInputError, AuditFilterError) as exc:
        error = exc
    return (
        render_template(
            "admin_audit.html",
            found=found,
            filters={k: v for k, v in shown.items() if v},
            shown=shown,
            kinds=list(EventKind),
            officers=officers,
            page=page,
            error=localized(error.message, error.message_en) if error is not None else None,
        ),
        400 if error is not None else 200,
    )

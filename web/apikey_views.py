"""API key pages (API キー): staff create and revoke their own keys; administrators manage
everyone's.

- ``GET /account/apikeys``: the logged-in user's keys and a form to create one (only the
  scopes their roles allow); ``POST /account/apikeys`` creates it
- ``POST /account/apikeys/<prefix>/revoke``: revoke one's own key (with a confirmation box)
- ``GET /admin/apikeys``, ``POST /admin/apikeys``, ``POST /admin/apikeys/<prefix>/revoke``:
  the same for every user's keys (administrators only; anyone else gets 403)

A new key is shown exactly once. The creating request puts it, encrypted with a key derived from
the app's secret, into the session and redirects; the next display of the same page takes it out
and shows it (like the access codes of :mod:`web.contract_views`). koin keeps only the key's
SHA-256 (:mod:`contracts.apikeys`); the key is never logged.
"""

from __future__ import annotations

import logging
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
    ApiKey,
    ApiKeyNotFound,
    ApiScope,
    InvalidApiKeyData,
    User,
    UserRole,
    allowed_scopes,
    create_api_key,
    get_user,
    list_all_api_keys,
    list_api_keys,
    list_users,
    revoke_api_key,
    session_scope,
)
from contracts.apikeys import NAME_MAX_LENGTH, SCOPE_ROLES
from keys import KoinError

from . import services
from ._once import keep_once, take_once
from .auth import current_user, login_required
from .errors import page_error
from .i18n import localized

__all__ = ["bp"]

log = logging.getLogger(__name__)

bp = Blueprint("apikeys_web", __name__)

#: How long the encrypted new key stays in the session if the page is never shown.
NEW_KEY_TTL = 600
_NEW_KEY = "koin_new_api_key"
_ACCOUNT = "account"
_ADMIN = "admin"


class _FormInputError(KoinError):
    """The form itself is incomplete or malformed (before any service is asked)."""



def _user() -> User:
    user = current_user()
    assert user is not None  # login_required ran first
    return user


@bp.after_request
def _no_store(response: Response) -> Response:
    """A page may carry a new key: never kept in any cache."""
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.errorhandler(ApiKeyNotFound)
def _not_found(exc: ApiKeyNotFound) -> tuple[str, int]:
    return page_error(404, exc.message, exc.message_en)


# -- the new key, once --------------------------------------------------------------------------


def _keep_new_key(page: str, raw: str, prefix: str) -> None:
    keep_once(_NEW_KEY, "koin-new-api-key", {"page": page, "key": raw, "prefix": prefix})


def _take_new_key(page: str) -> tuple[str, str] | None:
    """``(key, prefix)`` created for ``page`` if the session carries it; whatever it carries is
    removed, so a key is shown at most once."""
    payload = take_once(_NEW_KEY, "koin-new-api-key", NEW_KEY_TTL)
    if payload is None or payload.get("page") != page:
        return None
    return str(payload["key"]), str(payload["prefix"])


# -- pages --------------------------------------------------------------------------------------


@dataclass
class KeyForm:
    """The create form as typed, to show again after an error."""

    name: str = ""
    scopes: tuple[str, ...] = ()
    user_id: str = ""

    @classmethod
    def from_request(cls) -> KeyForm:
        form = request.form
        return cls(
            name=form.get("name", "")[: NAME_MAX_LENGTH * 4],
            scopes=tuple(value[:40] for value in form.getlist("scope")[:10]),
            user_id=form.get("user_id", "")[:20],
        )


def _page(
    page: str,
    *,
    form: KeyForm | None = None,
    error: KoinError | None = None,
    status: int = 200,
) -> tuple[str, int]:
    user = _user()
    with services.session_factory()() as db:
        fresh = get_user(db, user.id)
        assert fresh is not None
        keys: list[ApiKey] = list_all_api_keys(db) if page == _ADMIN else list_api_keys(db, fresh)
        users = list_users(db, active_only=True) if page == _ADMIN else []
        scopes = list(ApiScope) if page == _ADMIN else allowed_scopes(fresh)
    new_key = _take_new_key(page) if request.method == "GET" else None
    return (
        render_template(
            "apikeys.html",
            admin_page=page == _ADMIN,
            keys=keys,
            users=users,
            scopes=scopes,
            scope_roles={scope.value: (role.value if role else None)
                         for scope, role in SCOPE_ROLES.items()},
            form=form or KeyForm(scopes=(ApiScope.SIGN.value,) if page == _ACCOUNT
                                 and ApiScope.SIGN in scopes else ()),
            error=localized(error.message, error.message_en) if error is not None else None,
            new_key=new_key,
            is_admin=UserRole.ADMIN in user.roles,
            name_max=NAME_MAX_LENGTH,
        ),
        status,
    )


def _create(page: str) -> Response | tuple[str, int]:
    """Create a key from the form (for the logged-in user, or on the admin page for the chosen
    user) and go back to the page, which shows it once."""
    form = KeyForm.from_request()
    actor = _user()
    try:
        with session_scope(services.session_factory()) as db:
            owner = get_user(db, actor.id)
            if page == _ADMIN:
                owner = get_user(db, int(form.user_id)) if form.user_id.isdigit() else None
                if owner is None or not owner.is_active:
                    raise _FormInputError(
                        "API キーを発行する職員を選んでください。",
                        "Choose the staff member to issue the API key to.",
                        field="user_id",
                    )
            assert owner is not None
            key, raw = create_api_key(db, owner, name=form.name, scopes=form.scopes)
            prefix, owner_id = key.prefix, owner.id
    except _FormInputError as exc:
        return _page(page, form=form, error=exc, status=400)
    except InvalidApiKeyData as exc:
        return _page(page, form=form, error=exc, status=422)
    log.info("API key %s created for user %s by user %s", prefix, owner_id, actor.id)
    _keep_new_key(page, raw, prefix)
    return redirect(url_for(f".{page}_keys"), code=303)


def _revoke(page: str, prefix: str) -> Response | tuple[str, int]:
    """:raises ApiKeyNotFound: no such key (or, on the account page, not the user's)."""
    actor = _user()
    if request.form.get("confirm") != "yes":
        error = _FormInputError(
            "失効させるには「この API キーを失効させます」にチェックを入れてください。",
            "To revoke, tick “Revoke this API key”.",
        )
        return _page(page, error=error, status=400)
    with session_scope(services.session_factory()) as db:
        owner = None if page == _ADMIN else get_user(db, actor.id)
        key = revoke_api_key(db, prefix[:16], owner=owner)
        shown = key.prefix
    log.info("API key %s revoked by user %s", shown, actor.id)
    flash(
        localized(
            f"API キー koin_{shown}_… を失効させました。このキーはもう使えません。",
            f"The API key koin_{shown}_… was revoked; it no longer works.",
        ),
        "apikeys",
    )
    return redirect(url_for(f".{page}_keys"), code=303)


@bp.get("/account/apikeys")
@login_required()
def account_keys() -> tuple[str, int]:
    """The logged-in user's keys; a key just created is shown here once."""
    return _page(_ACCOUNT)


@bp.post("/account/apikeys")
@login_required()
def account_create() -> Response | tuple[str, int]:
    """Create a key for oneself.

    :raise 400: the CSRF token is missing or invalid.
    :raise 422: no name, or no scope, or a scope one's roles do not allow (shown on the page).
    """
    return _create(_ACCOUNT)


@bp.post("/account/apikeys/<prefix>/revoke")
@login_required()
def account_revoke(prefix: str) -> Response | tuple[str, int]:
    """Revoke one's own key.

    :raise 400: the confirmation box was not ticked (or no CSRF token).
    :raise 404: no such key, or someone else's.
    """
    return _revoke(_ACCOUNT, prefix)


@bp.get("/admin/apikeys")
@login_required(UserRole.ADMIN)
def admin_keys() -> tuple[str, int]:
    """Every user's keys (administrators); a key just created here is shown once.

    :raise 403: not an administrator.
    """
    return _page(_ADMIN)


@bp.post("/admin/apikeys")
@login_required(UserRole.ADMIN)
def admin_create() -> Response | tuple[str, int]:
    """Create a key for the chosen user.

    :raise 400: no (active) user chosen, or no CSRF token. :raise 403: not an administrator.
    :raise 422: no name, no scope, or a scope the user's roles do not allow.
    """
    return _create(_ADMIN)


@bp.post("/admin/apikeys/<prefix>/revoke")
@login_required(UserRole.ADMIN)
def admin_revoke(prefix: str) -> Response | tuple[str, int]:
    """Revoke anyone's key.

    :raise 400: the confirmation box was not ticked. :raise 403: not an administrator.
    :raise 404: no such key.
    """
    return _revoke(_ADMIN, prefix)

"""API keys: how programs call the REST API v1 on behalf of a staff member.

A key looks like ``koin_<prefix>_<secret>``: the prefix (8 hex digits, 32 bits) names the key in
lists and on the command line, the secret carries 256 bits from :mod:`secrets`. Only the
SHA-256 of the whole key is stored, so a copy of the database does not give working keys; a
plain hash (not scrypt) is enough because the key is random, not chosen by a person.

A key carries scopes, each of which needs a role of its owner: ``sign`` needs
:attr:`UserRole.SIGNER`, ``contracts`` needs :attr:`UserRole.OFFICER`, ``verify`` anyone.
The roles are checked when the key is created and again at every use, so taking a role away
from a person also takes it from their keys.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import re
import secrets
from collections.abc import Iterable

from sqlalchemy import ForeignKey, String, func, or_, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from ._db import Base, aware_utc, utcnow
from .accounts import User, UserRole
from .errors import ApiKeyInvalid, ApiKeyNotFound, ApiKeyScope, InvalidApiKeyData

__all__ = [
    "LAST_USED_RESOLUTION",
    "SCOPE_ROLES",
    "ApiKey",
    "ApiScope",
    "authenticate_api_key",
    "allowed_scopes",
    "create_api_key",
    "list_all_api_keys",
    "list_api_keys",
    "revoke_api_key",
]

#: ``last_used_at`` is written at most this often per key (one UPDATE, not one per request).
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)
NAME_MAX_LENGTH = 100
PREFIX_LENGTH = 8
_SECRET_BYTES = 32  # 256 bits
_KEY = re.compile(r"^koin_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")


class ApiScope(enum.StrEnum):
    """What an API key may be used for."""

    #: sign PDFs with the position key (``POST /api/v1/sign``)
    SIGN = "sign"
    #: manage witness-type contracts
    CONTRACTS = "contracts"
    #: verify PDFs (the verify endpoint is public; the scope exists for clients that send a key
    #: everywhere)
    VERIFY = "verify"


#: The role a key's owner must hold for each scope (None: any account).
SCOPE_ROLES: dict[ApiScope, UserRole | None] = {
    ApiScope.SIGN: UserRole.SIGNER,
    ApiScope.CONTRACTS: UserRole.OFFICER,
    ApiScope.VERIFY: None,
}


class ApiKey(Base):
    """One API key of one staff member; the key itself is never stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    #: Chosen by the owner, e.g. the calling system's name.
    name: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH))
    #: The 8 hex digits after ``koin_``: shown in lists, used to revoke.
    prefix: Mapped[str] = mapped_column(String(PREFIX_LENGTH), unique=True)
    #: Hex SHA-256 of the whole key.
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    #: Space-separated, sorted :class:`ApiScope` values.
    scopes: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, server_default=func.now())
    last_used_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]

    user: Mapped[User] = relationship(lazy="selectin")

    @property
    def scope_set(self) -> frozenset[ApiScope]:
        return frozenset(ApiScope(scope) for scope in self.scopes.split())

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def __repr__(self) -> str:
        return f"ApiKey(id={self.id!r}, prefix={self.prefix!r}, scopes={self.scopes!r})"


def _digest(raw: str) -> str:
    return hashlib.sha256(raw.encode("ascii")).hexdigest()


def _checked_scopes(user: User, scopes: Iterable[ApiScope | str]) -> frozenset[ApiScope]:
    checked: set[ApiScope] = set()
    for scope in scopes:
        try:
            checked.add(ApiScope(scope))
        except ValueError:
            names = ", ".join(ApiScope)
            raise InvalidApiKeyData(
                "scopes",
                f"スコープ {scope!r} はありません（{names} のいずれか）。",
                f"There is no scope {scope!r} (one of {names}).",
            ) from None
    if not checked:
        raise InvalidApiKeyData(
            "scopes", "スコープを一つ以上指定してください。", "Give at least one scope."
        )
    for scope in sorted(checked):
        role = SCOPE_ROLES[scope]
        if role is not None and role not in user.roles:
            raise InvalidApiKeyData(
                "scopes",
                f"{user.email} には役割 {role.value} がないため、スコープ {scope.value} の "
                "API キーは作れません。",
                f"{user.email} does not hold the role {role.value}, which the scope "
                f"{scope.value} needs.",
            )
    return frozenset(checked)


def _checked_name(name: str) -> str:
    name = " ".join(name.split())
    if not name or len(name) > NAME_MAX_LENGTH:
        raise InvalidApiKeyData(
            "name",
            f"API キーの名前は 1 文字以上 {NAME_MAX_LENGTH} 文字以下にしてください。",
            f"An API key's name must have 1 to {NAME_MAX_LENGTH} characters.",
        )
    return name




def _allowed(user: User, scope: ApiScope) -> bool:
    role = SCOPE_ROLES[scope]
    return role is None or role in user.roles


def allowed_scopes(user: User) -> list[ApiScope]:
    """The scopes that ``user``'s roles allow on a key, in :class:`ApiScope` order."""
    return [scope for scope in ApiScope if _allowed(user, scope)]


# -- services ---------------------------------------------------------------------------------


def create_api_key(
    session: Session, user: User, *, name: str, scopes: Iterable[ApiScope | str]
) -> tuple[ApiKey, str]:
    """Create an API key for ``user`` in the session's transaction (the caller commits).

    :returns: the key's record, and the key itself: shown this once, stored only as a hash.
    :raises InvalidApiKeyData: unusable name, unknown scope, no scope, or a scope that the
        user's roles do not allow.
    """
    checked = _checked_scopes(user, scopes)
    prefix = secrets.token_hex(PREFIX_LENGTH // 2)
    raw = f"koin_{prefix}_{secrets.token_urlsafe(_SECRET_BYTES)}"
    key = ApiKey(
        user_id=user.id,
        name=_checked_name(name),
        prefix=prefix,
        key_sha256=_digest(raw),
        scopes=" ".join(sorted(checked)),
        created_at=utcnow(),
    )
    session.add(key)
    session.flush()
    return key, raw


def authenticate_api_key(
    session: Session, raw: str, *, scope: ApiScope | str, now: dt.datetime | None = None
) -> User:
    """The owner of the API key ``raw``, if the key may be used for ``scope``; records the use
    in ``last_used_at`` (the caller commits) at most once per :data:`LAST_USED_RESOLUTION`,
    with one conditional UPDATE so that concurrent requests do not each write.

    :param now: the current time (aware), for tests; default the clock.
    :raises ApiKeyInvalid: malformed, unknown or revoked key, or disabled account (one error
        for all, HTTP 401).
    :raises ApiKeyScope: the key lacks ``scope``, or its owner no longer holds the role that
        ``scope`` needs (HTTP 403).
    :raises ValueError: ``scope`` is not an :class:`ApiScope` value, or ``now`` is naive.
    """
    needed = ApiScope(scope)
    now = aware_utc(now)
    if not _KEY.match(raw):
        raise ApiKeyInvalid()
    key = session.scalar(select(ApiKey).where(ApiKey.key_sha256 == _digest(raw)))
    if key is None or key.revoked_at is not None or not key.user.is_active:
        raise ApiKeyInvalid()
    if needed not in key.scope_set or not _allowed(key.user, needed):
        raise ApiKeyScope(needed.value)
    session.execute(
        update(ApiKey)
        .where(
            ApiKey.id == key.id,
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= now - LAST_USED_RESOLUTION),
        )
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    return key.user


def revoke_api_key(
    session: Session,
    prefix: str,
    *,
    owner: User | None = None,
    now: dt.datetime | None = None,
) -> ApiKey:
    """Revoke the key with ``prefix`` (the caller commits); revoking again keeps the first
    revocation time. With ``owner``, only a key of that user (a staff member revoking their
    own key); another's is not found.

    :raises ApiKeyNotFound: no key has this prefix (or ``owner`` is not its owner).
    :raises ValueError: ``now`` is naive.
    """
    now = aware_utc(now)
    wanted = prefix.strip().lower()
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == wanted))
    if key is None or (owner is not None and key.user_id != owner.id):
        raise ApiKeyNotFound(prefix.strip()[:PREFIX_LENGTH * 2])
    session.execute(
        update(ApiKey)
        .where(ApiKey.id == key.id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
    session.refresh(key)
    return key


def list_api_keys(session: Session, user: User) -> list[ApiKey]:
    """Every key of ``user``, revoked ones included, oldest first."""
    return list(
        session.scalars(
            select(ApiKey).where(ApiKey.user_id == user.id).order_by(ApiKey.created_at, ApiKey.id)
        )
    )


def list_all_api_keys(session: Session) -> list[ApiKey]:
    """Every key of every user (an administrator's view), revoked ones included, by the owner's
    email address and then oldest first."""
    return list(
        session.scalars(
            select(ApiKey)
            .join(User, User.id == ApiKey.user_id)
            .order_by(User.email, ApiKey.created_at, ApiKey.id)
        )
    )

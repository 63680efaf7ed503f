"""Staff accounts: who may log in, with which roles, and the lockout after failed logins.

Passwords are kept only as werkzeug scrypt hashes. Failed logins are counted with one atomic
``UPDATE … SET failed_logins = failed_logins + 1`` on a connection of their own, so that
concurrent attempts are all counted and the count survives the rollback of the caller's
transaction when :class:`LoginFailed` propagates.

Roles live in a small table ``user_roles`` (one row per user and role) rather than in a
joined string: the database itself refuses unknown roles (CHECK) and duplicates (primary
key), and "every officer" is an indexed join, not a ``LIKE`` over text.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import secrets
from collections.abc import Iterable
from functools import cache
from typing import NoReturn

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    ColumnElement,
    Engine,
    ForeignKey,
    String,
    case,
    exists,
    func,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship
from werkzeug.security import check_password_hash, generate_password_hash

from ._db import Base, UtcDateTime, aware_utc, utcnow
from .errors import (
    AccountDisabled,
    AccountLocked,
    ContractsError,
    InvalidAccountData,
    LoginFailed,
    UserExists,
    WrongCurrentPassword,
)

__all__ = [
    "LOCKOUT_PERIOD",
    "MAX_FAILED_LOGINS",
    "MIN_PASSWORD_LENGTH",
    "User",
    "UserRole",
    "UserRoleGrant",
    "admin_exists",
    "authenticate",
    "change_password",
    "create_first_admin",
    "create_user",
    "generate_password",
    "get_user",
    "get_user_by_email",
    "has_role",
    "list_users",
    "normalize_email",
    "set_password",
    "set_roles",
    "set_user_active",
]

#: Failed logins in a row after which the account is locked (and again after each further
#: this many failures once the lock has expired).
MAX_FAILED_LOGINS = 5
#: How long a locked account refuses every login, even with the right password.
LOCKOUT_PERIOD = dt.timedelta(minutes=15)
MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
EMAIL_MAX_LENGTH = 254
DISPLAY_NAME_MAX_LENGTH = 100

#: werkzeug's scrypt: n=2**15, r=8, p=1 (32 MiB, some tens of milliseconds per check).
_HASH_METHOD = "scrypt"
# Generated passwords: 20 characters without look-alikes (0/o, 1/l/i), ~99 bits, in groups.
_PASSWORD_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
_PASSWORD_GROUPS = 4
_PASSWORD_GROUP_LENGTH = 5
# ASCII only, so that Python's lower() and the database's agree (and the CHECK holds).
_EMAIL = re.compile(
    r"^[a-z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
    r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)


class UserRole(enum.StrEnum):
    """What a staff member may do."""

    #: manages accounts and settings
    ADMIN = "admin"
    #: prepares witness-type contracts and sends them out
    OFFICER = "officer"
    #: consents to contracts on the prefecture's side (the witness signature is applied then)
    SIGNER = "signer"


_ROLES = ", ".join(f"'{role.value}'" for role in UserRole)


class UserRoleGrant(Base):
    """One role held by one user."""

    __tablename__ = "user_roles"
    __table_args__ = (CheckConstraint(f"role IN ({_ROLES})", name="role"),)

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    role: Mapped[str] = mapped_column(String(16), primary_key=True, index=True)

    def __repr__(self) -> str:
        return f"UserRoleGrant(user_id={self.user_id!r}, role={self.role!r})"


class User(Base):
    """A staff member who logs in to koin."""

    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint("email = lower(email)", name="email_lower_case"),
        CheckConstraint("failed_logins >= 0", name="failed_logins"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    #: Lower-case, ASCII; the login name.
    email: Mapped[str] = mapped_column(String(EMAIL_MAX_LENGTH), unique=True)
    #: Shown in page headers and audit trails.
    display_name: Mapped[str] = mapped_column(String(DISPLAY_NAME_MAX_LENGTH))
    #: werkzeug ``scrypt:n:r:p$salt$hash``; never the password.
    password_hash: Mapped[str] = mapped_column(String(255))
    #: Failed logins since the last successful one (attempts refused during a lock not counted).
    failed_logins: Mapped[int] = mapped_column(default=0, server_default="0")
    #: While in the future, every login is refused.
    locked_until: Mapped[dt.datetime | None]
    is_active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, server_default=func.now())
    last_login_at: Mapped[dt.datetime | None]

    grants: Mapped[list[UserRoleGrant]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, lazy="selectin",
        order_by=UserRoleGrant.role,
    )

    @property
    def roles(self) -> frozenset[UserRole]:
        return frozenset(UserRole(grant.role) for grant in self.grants)

    def is_locked(self, now: dt.datetime | None = None) -> bool:
        return self.locked_until is not None and self.locked_until > (now or utcnow())

    def __repr__(self) -> str:
        roles = ",".join(sorted(self.roles))
        return f"User(id={self.id!r}, email={self.email!r}, roles={roles!r})"


# -- validation -------------------------------------------------------------------------------


def normalize_email(text: str) -> str:
    """``text`` stripped and lower-cased.

    :raises InvalidAccountData: it is not a plain ASCII email address of at most 254 characters.
    """
    email = text.strip().lower()
    if len(email) > EMAIL_MAX_LENGTH or not _EMAIL.match(email):
        raise InvalidAccountData(
            "email",
            f"メールアドレス {text.strip()!r} は使えません（半角英数字の user@example.jp 形式、"
            f"{EMAIL_MAX_LENGTH} 文字以内）。",
            f"The email address {text.strip()!r} cannot be used (ASCII, like user@example.jp, "
            f"at most {EMAIL_MAX_LENGTH} characters).",
        )
    return email


def _checked_roles(roles: Iterable[UserRole | str]) -> frozenset[UserRole]:
    checked: set[UserRole] = set()
    for role in roles:
        try:
            checked.add(UserRole(role))
        except ValueError:
            names = ", ".join(UserRole)
            raise InvalidAccountData(
                "roles",
                f"役割 {role!r} はありません（{names} のいずれか）。",
                f"There is no role {role!r} (one of {names}).",
            ) from None
    if not checked:
        raise InvalidAccountData(
            "roles", "役割を一つ以上指定してください。", "Give at least one role."
        )
    return frozenset(checked)


def _checked_password(password: str) -> str:
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise InvalidAccountData(
            "password",
            f"パスワードは {MIN_PASSWORD_LENGTH} 文字以上 {MAX_PASSWORD_LENGTH} 文字以下に"
            "してください。",
            f"A password must have {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters.",
        )
    return password


def _checked_display_name(name: str) -> str:
    name = " ".join(name.split())
    if not name or len(name) > DISPLAY_NAME_MAX_LENGTH:
        raise InvalidAccountData(
            "display_name",
            f"表示名は 1 文字以上 {DISPLAY_NAME_MAX_LENGTH} 文字以下にしてください。",
            f"A display name must have 1 to {DISPLAY_NAME_MAX_LENGTH} characters.",
        )
    return name




def generate_password() -> str:
    """A strong random password that is easy to type: ``xxxxx-xxxxx-xxxxx-xxxxx``."""
    return "-".join(
        "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(_PASSWORD_GROUP_LENGTH))
        for _ in range(_PASSWORD_GROUPS)
    )


def _hash(password: str) -> str:
    return generate_password_hash(password, method=_HASH_METHOD)


@cache
def _dummy_hash() -> str:
    """Checked against when the email is unknown, so that it takes as long as a wrong password."""
    return _hash(secrets.token_urlsafe(16))


# -- services ---------------------------------------------------------------------------------


def create_user(
    session: Session,
    email: str,
    roles: Iterable[UserRole | str],
    *,
    display_name: str | None = None,
    password: str | None = None,
) -> tuple[User, str | None]:
    """Create an account in the session's transaction (the caller commits).

    Without ``password`` a strong one is generated; it is returned this once and stored only
    as a hash. The unique email decides between concurrent creators (``INSERT … ON CONFLICT DO
    NOTHING``), without spoiling the caller's transaction.

    :returns: the user, and the generated password (None when ``password`` was given).
    :raises UserExists: an account with this email already exists.
    :raises InvalidAccountData: unusable email, roles, display name or password.
    """
    address = normalize_email(email)
    checked_roles = _checked_roles(roles)
    name = _checked_display_name(display_name or address.split("@", 1)[0])
    generated = None
    if password is None:
        password = generated = generate_password()
    password_hash = _hash(_checked_password(password))

    statement = (
        _insert(session)
        .values(
            email=address,
            display_name=name,
            password_hash=password_hash,
            failed_logins=0,
            is_active=True,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=[User.email])
        .returning(User.id)
    )
    user_id = session.scalars(statement).one_or_none()
    if user_id is None:
        raise UserExists(address)
    user = session.get_one(User, user_id)
    user.grants = [UserRoleGrant(role=role.value) for role in sorted(checked_roles)]
    session.flush()
    return user, generated


def _insert(session: Session) -> postgresql.Insert | sqlite.Insert:
    dialect = session.get_bind(User).dialect.name
    if dialect == "postgresql":
        return postgresql.insert(User)
    if dialect == "sqlite":
        return sqlite.insert(User)
    raise ContractsError(
        f"データベース {dialect} には対応していません。",
        f"The database {dialect} is not supported.",
        backend=dialect,
    )


def _not_locked(now: dt.datetime) -> ColumnElement[bool]:
    return or_(User.locked_until.is_(None), User.locked_until <= now)


def _engine(session: Session) -> Engine:
    bind = session.get_bind(User)
    return bind if isinstance(bind, Engine) else bind.engine


def _count_failure(session: Session, user_id: int, now: dt.datetime) -> NoReturn:
    """Count one failed login, lock the account at every ``MAX_FAILED_LOGINS``-th failure in a
    row, and raise. One atomic UPDATE, committed on a connection of its own: concurrent
    failures are all counted, and the count survives the caller's rollback.

    :raises AccountLocked: this failure locked the account, or it was locked meanwhile.
    :raises LoginFailed: otherwise.
    """
    counted = User.failed_logins + 1
    until = now + LOCKOUT_PERIOD
    statement = (
        update(User)
        .where(User.id == user_id, _not_locked(now))
        .values(
            failed_logins=counted,
            locked_until=case(
                (counted % MAX_FAILED_LOGINS == 0, literal(until, UtcDateTime())),
                else_=User.locked_until,
            ),
        )
        .returning(User.locked_until)
    )
    with _engine(session).begin() as connection:
        row = connection.execute(statement).one_or_none()
        if row is None:  # locked by a concurrent attempt after we read the row
            locked_until = connection.scalar(select(User.locked_until).where(User.id == user_id))
        else:
            locked_until = row.locked_until
    if locked_until is not None and locked_until > now:
        raise AccountLocked(locked_until, now)
    raise LoginFailed()


def authenticate(
    session: Session, email: str, password: str, *, now: dt.datetime | None = None
) -> User:
    """The account of ``email`` if ``password`` is its password, recording the login (the
    caller commits): the failure count is reset and ``last_login_at`` set.

    A wrong password is counted (see :func:`_count_failure`); the ``MAX_FAILED_LOGINS``-th
    failure in a row locks the account for ``LOCKOUT_PERIOD``, during which every login is
    refused without looking at the password. Unknown addresses take as long as wrong
    passwords and give the same error.

    Call it in a transaction that has not written yet: the failure count is written on a
    second connection, and SQLite allows one writer at a time.

    :param now: the current time (aware), for tests; default the clock.
    :raises LoginFailed: unknown email or wrong password (one message for both).
    :raises AccountLocked: too many failed logins; ``locked_until`` says until when.
    :raises AccountDisabled: the password is right but the account is switched off.
    :raises ValueError: ``now`` is naive.
    """
    now = aware_utc(now)
    user = get_user_by_email(session, email)
    if user is None:
        check_password_hash(_dummy_hash(), password)
        raise LoginFailed()
    if user.locked_until is not None and user.locked_until > now:
        raise AccountLocked(user.locked_until, now)
    if not check_password_hash(user.password_hash, password):
        _count_failure(session, user.id, now)
    if not user.is_active:
        raise AccountDisabled()
    recorded = session.scalars(
        update(User)
        .where(User.id == user.id, _not_locked(now))
        .values(failed_logins=0, locked_until=None, last_login_at=now)
        .returning(User.id)
        .execution_options(synchronize_session=False)
    ).one_or_none()
    session.refresh(user)
    if recorded is None:  # locked by concurrent failures while we checked the password
        raise AccountLocked(user.locked_until or now + LOCKOUT_PERIOD, now)
    return user


def get_user(session: Session, user_id: int) -> User | None:
    """The account with this ID, or None."""
    return session.get(User, user_id)


def get_user_by_email(session: Session, email: str) -> User | None:
    """The account of ``email`` (any case, surrounding spaces ignored), or None."""
    try:
        address = normalize_email(email)
    except InvalidAccountData:
        return None
    return session.scalar(select(User).where(User.email == address))


def list_users(session: Session, *, active_only: bool = False) -> list[User]:
    """Every account (or every active one), by email address."""
    query = select(User).order_by(User.email)
    if active_only:
        query = query.where(User.is_active.is_(True))
    return list(session.scalars(query))


def set_password(session: Session, user: User, password: str) -> None:
    """Replace the password of ``user`` (the caller commits) and lift a lockout. Sessions
    logged in with the old password stop working (the web layer binds them to the hash).

    :raises InvalidAccountData: the password is shorter than ``MIN_PASSWORD_LENGTH``.
    """
    user.password_hash = _hash(_checked_password(password))
    user.failed_logins = 0
    user.locked_until = None
    session.flush()


def change_password(
    session: Session, user: User, current: str, new: str, *, now: dt.datetime | None = None
) -> None:
    """The user's own change of password (the caller commits): ``current`` must be the
    password, and ``new`` a usable one that differs from it and from the e-mail address.
    Sessions logged in with the old password stop working, as with :func:`set_password`.

    A wrong ``current`` counts as a failed login (a stolen session cannot try passwords at
    will): the ``MAX_FAILED_LOGINS``-th in a row locks the account. Call it in a transaction
    that has not written yet (see :func:`authenticate`).

    :param now: the current time (aware), for tests; default the clock.
    :raises WrongCurrentPassword: ``current`` is wrong (counted).
    :raises AccountLocked: the account is locked, or this failure locked it.
    :raises InvalidAccountData: ``new`` is too short or too long, the same as ``current``, or
        the e-mail address.
    """
    now = aware_utc(now)
    if user.locked_until is not None and user.locked_until > now:
        raise AccountLocked(user.locked_until, now)
    if not check_password_hash(user.password_hash, current):
        try:
            _count_failure(session, user.id, now)
        except LoginFailed:
            raise WrongCurrentPassword() from None
    _checked_password(new)
    if new == current:
        raise InvalidAccountData(
            "password", "新しいパスワードが現在のものと同じです。",
            "The new password is the same as the current one.",
        )
    if new.strip().lower() == user.email:
        raise InvalidAccountData(
            "password", "メールアドレスはパスワードに使えません。",
            "The e-mail address cannot be the password.",
        )
    set_password(session, user, new)


def has_role(user: User, role: UserRole | str) -> bool:
    """Whether ``user`` holds ``role``.

    :raises ValueError: ``role`` is not a :class:`UserRole` name.
    """
    return UserRole(role) in user.roles


def admin_exists(session: Session) -> bool:
    """Whether some active account holds the admin role."""
    return bool(
        session.scalar(
            select(
                exists()
                .where(UserRoleGrant.user_id == User.id)
                .where(UserRoleGrant.role == UserRole.ADMIN.value, User.is_active.is_(True))
            )
        )
    )


def create_first_admin(
    session: Session, email: str, *, display_name: str | None = None
) -> tuple[User, str] | None:
    """Create an admin with a generated password if there is no active admin yet (``koin
    init``); None if there is one. Safe against a concurrent ``koin init``.

    :returns: the new admin and its password (to be shown once), or None.
    :raises UserExists: ``email`` belongs to an account that is not an admin.
    :raises InvalidAccountData: ``email`` or ``display_name`` is unusable.
    """
    if admin_exists(session):
        return None
    try:
        user, password = create_user(
            session, email, [UserRole.ADMIN], display_name=display_name
        )
    except UserExists:
        if admin_exists(session):  # a concurrent init won
            return None
        raise
    assert password is not None
    return user, password


# -- administration (the admin's user pages) ---------------------------------------------------


def _lock_admins(session: Session) -> None:
    """On PostgreSQL, lock the admin grants, so that two administrators removing each other
    at the same moment cannot leave none (the second waits, then sees the first's change)."""
    session.execute(
        select(UserRoleGrant.user_id)
        .where(UserRoleGrant.role == UserRole.ADMIN.value)
        .with_for_update()
    ).all()


def _refuse_no_admin_left(session: Session) -> None:
    session.flush()
    if not admin_exists(session):
        raise InvalidAccountData(
            "roles",
            "最後の管理者は外せません。先にほかの職員に管理者の役割を与えてください。",
            "The last administrator cannot be removed; make someone else an administrator "
            "first.",
        )


def set_roles(session: Session, user: User, roles: Iterable[UserRole | str]) -> bool:
    """Give ``user`` exactly ``roles`` (the caller commits); whether anything changed.

    :raises InvalidAccountData: no role or an unknown one; or the change would leave no
        active administrator.
    """
    wanted = _checked_roles(roles)
    if wanted == user.roles:
        return False
    _lock_admins(session)
    session.refresh(user)
    user.grants = [UserRoleGrant(role=role.value) for role in sorted(wanted)]
    _refuse_no_admin_left(session)
    return True


def set_user_active(session: Session, user: User, active: bool, *, actor: User) -> bool:
    """Switch the account of ``user`` on or off (the caller commits); whether it changed.
    A switched-off account cannot log in and its sessions end; its records stay.

    :raises InvalidAccountData: ``actor`` switches off their own account, or the last active
        administrator.
    """
    if user.is_active == active:
        return False
    if not active and user.id == actor.id:
        raise InvalidAccountData(
            "active",
            "自分のアカウントは無効にできません。",
            "You cannot deactivate your own account.",
        )
    _lock_admins(session)
    user.is_active = active
    if not active:
        _refuse_no_admin_left(session)
    session.flush()
    return True

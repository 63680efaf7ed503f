"""The database: declarative base, UTC timestamps, engines and sessions.

SQLite (the default, one file below ``KOIN_HOME``) and PostgreSQL (through psycopg 3) are
supported; ``KOIN_DATABASE_URL`` selects the database.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import ColumnElement, DateTime, Engine, MetaData, Select, create_engine, event
from sqlalchemy.engine import URL, CursorResult, Dialect, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, InstrumentedAttribute, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from .errors import ContractsError

__all__ = [
    "DATABASE_URL_ENV",
    "Base",
    "UtcDateTime",
    "database_url",
    "make_engine",
    "make_session_factory",
    "session_scope",
    "utcnow",
]

#: Environment variable that selects the database; unset means SQLite in ``KOIN_HOME``.
DATABASE_URL_ENV = "KOIN_DATABASE_URL"
SQLITE_FILE = "koin.db"
SQLITE_BUSY_TIMEOUT_MS = 5000

#: Stable constraint names, so that migrations can refer to them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

_SUPPORTED_BACKENDS = ("sqlite", "postgresql")


def utcnow() -> dt.datetime:
    """The current time, aware, in UTC."""
    return dt.datetime.now(dt.UTC)


def aware_utc(now: dt.datetime | None) -> dt.datetime:
    """``now`` as an aware UTC datetime, or the current time when None (services take an
    explicit ``now`` so tests can move the clock).

    :raises ValueError: ``now`` is naive.
    """
    if now is None:
        return utcnow()
    if now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    return now.astimezone(dt.UTC)


class UtcDateTime(TypeDecorator[dt.datetime]):
    """An aware datetime, stored as UTC and always read back as aware UTC.

    PostgreSQL stores ``timestamp with time zone``; SQLite, which has no time zones, stores the
    naive UTC value. Naive datetimes are refused rather than guessed at.
    """

    impl = DateTime
    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        """:raises ValueError: ``value`` is naive."""
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given; koin stores aware UTC")
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    """Declarative base of every koin table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # Every ``Mapped[datetime]`` column is an aware UTC timestamp.
    type_annotation_map = {dt.datetime: UtcDateTime()}


def database_url(home: Path) -> str:
    """``KOIN_DATABASE_URL`` if set, else the SQLite file ``koin.db`` in ``home``."""
    configured = os.environ.get(DATABASE_URL_ENV, "").strip()
    if configured:
        return configured
    path = home.resolve() / SQLITE_FILE
    return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)


def _sqlalchemy_url(url: str) -> URL:
    """Parse ``url``; plain ``postgresql://`` (and ``postgres://``) mean psycopg 3.

    :raises ContractsError: the URL cannot be parsed or names an unsupported database.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ContractsError(
            "データベースURLを解釈できません（KOIN_DATABASE_URL を確認してください）。",
            "The database URL cannot be parsed (check KOIN_DATABASE_URL).",
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend not in _SUPPORTED_BACKENDS:
        raise ContractsError(
            f"データベース {backend} には対応していません"
            "（SQLite か PostgreSQL を使ってください）。",
            f"The database {backend} is not supported (use SQLite or PostgreSQL).",
            backend=backend,
        )
    return parsed


def _configure_sqlite_connection(dbapi_connection: Any, _connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
    finally:
        cursor.close()


def _create_private_file(database: str | None) -> None:
    """Create the SQLite file (and its WAL/SHM companions' folder) readable by the owner only:
    it holds password hashes and evidence."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)


def rowcount(result: Any) -> int:
    """Rows matched by an UPDATE/DELETE: how conditional updates tell who won a race."""
    return int(cast(CursorResult[Any], result).rowcount)


def claim_predicate(
    session: Session, id_column: InstrumentedAttribute[int], due: Select[Any]
) -> ColumnElement[bool] | None:
    """A WHERE clause picking the rows of ``due`` (ids, ordered and limited) for a claiming
    UPDATE that concurrent workers may run at the same time; None when nothing is due.

    PostgreSQL: the rows are locked first with ``FOR UPDATE SKIP LOCKED``, in the caller's
    transaction (not as a sub-select of the UPDATE: PostgreSQL may re-run that per row and
    claim far more than the limit). SQLite: one statement, which holds the database's write
    lock from its start. The UPDATE must repeat the due conditions in its own WHERE.
    """
    if session.get_bind().dialect.name == "postgresql":
        ids = session.scalars(due.with_for_update(skip_locked=True)).all()
        return id_column.in_(ids) if ids else None
    return id_column.in_(due.scalar_subquery())


def make_engine(url: str) -> Engine:
    """An engine for ``url``: SQLite with foreign keys, WAL and a busy timeout, or PostgreSQL
    through psycopg 3. No connection is opened yet. Call ``dispose()`` when done.

    :raises ContractsError: the URL cannot be parsed or names an unsupported database.
    """
    parsed = _sqlalchemy_url(url)
    if parsed.get_backend_name() == "sqlite":
        _create_private_file(parsed.database)
        engine = create_engine(parsed)
        event.listen(engine, "connect", _configure_sqlite_connection)
        return engine
    return create_engine(parsed, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``. Objects stay readable after commit (no expiry), so that a
    view can render what a service returned."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: a session in a transaction that commits when the block ends normally
    and rolls back when it raises; the session is closed either way.

    :raises Exception: whatever the block raised, after the rollback; or the database's error
        when the commit fails.
    """
    with factory() as session, session.begin():
        yield session

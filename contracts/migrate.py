"""Database migrations, run programmatically (there is no ``alembic.ini``).

The Alembic environment lives in ``migrations/`` next to this package, found from this file's
location, so the working directory does not matter. ``koin init``, ``koin serve`` and
``koin db upgrade`` call :func:`upgrade`.

A new revision, after changing :mod:`contracts.models`::

    from alembic import command
    from contracts.migrate import alembic_config
    command.revision(alembic_config("sqlite:////tmp/scratch.db"), "add batches",
                     autogenerate=True, rev_id="0002")

then review the generated file by hand.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import text

from ._db import make_engine
from .errors import ContractsError

__all__ = ["MIGRATIONS_DIR", "alembic_config", "current", "head", "upgrade"]

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# Serialises concurrent upgrades (several workers starting at once) per database and schema.
_PG_LOCK = (
    "SELECT pg_advisory_xact_lock(hashtext('koin-migrate:' || coalesce(current_schema(), '')))"
)


def alembic_config(url: str | None = None) -> Config:
    """The Alembic configuration of koin; ``url`` is the database for commands that need one.

    :raises ContractsError: the ``migrations`` folder is missing (koin installed without it).
    """
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise ContractsError(
            f"マイグレーションのフォルダ {MIGRATIONS_DIR} がありません。",
            f"The migrations folder {MIGRATIONS_DIR} is missing.",
            path=str(MIGRATIONS_DIR),
        )
    config = Config()
    # Values go through ConfigParser interpolation: a literal % must be doubled.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if url is not None:
        # Not "sqlalchemy.url": URLs may hold % escapes that ConfigParser would mangle.
        config.attributes["url"] = url
    return config


def head() -> str | None:
    """The newest revision among the migrations shipped with koin.

    :raises ContractsError: the ``migrations`` folder is missing.
    """
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` up to ``revision`` (default: the newest). A database that
    is already there is left alone. On PostgreSQL the whole upgrade is one transaction and
    concurrent upgrades of the same schema wait for each other.

    :raises ContractsError: the URL is unusable, the ``migrations`` folder is missing, or
        ``revision`` is unknown.
    :raises sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    config = alembic_config(url)
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text(_PG_LOCK))
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except CommandError as exc:
        raise ContractsError(
            f"データベースを更新できません: {exc}",
            f"Cannot upgrade the database: {exc}",
            revision=revision,
        ) from exc
    finally:
        engine.dispose()


def current(url: str) -> str | None:
    """The revision the database at ``url`` is at, or None if it was never migrated.

    :raises ContractsError: the URL is unusable.
    :raises sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()

"""Alembic environment of koin: migrates ``contracts.Base.metadata``.

Driven by :mod:`contracts.migrate`, which passes either an open connection
(``config.attributes["connection"]``, used by ``upgrade``) or a database URL
(``config.attributes["url"]``, e.g. for ``command.revision(..., autogenerate=True)``). There is no
``alembic.ini`` and logging is left to the application.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.engine import Connection

from contracts import Base, UtcDateTime, make_engine
from contracts.errors import ContractsError

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise ContractsError(
            "マイグレーションの対象データベースが指定されていません。",
            "No database was given to migrate.",
        )
    return str(url)


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    # Migrations spell out the stored type, so they do not depend on contracts' internals.
    if type_ == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**options: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table
        compare_type=True,
        render_item=_render_item,
        **options,
    )


def _run_with(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    engine = make_engine(_url())  # resolves postgresql:// to psycopg; never connects here
    try:
        _configure(url=engine.url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    finally:
        engine.dispose()
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            _run_with(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

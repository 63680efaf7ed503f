"""Database fixtures shared by the tests of ``contracts``: every test runs on SQLite and on a
real PostgreSQL.

PostgreSQL comes from ``KOIN_TEST_DATABASE_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``); each test gets its own schema, dropped
afterwards, so several test sessions can share the database. ``tests/conftest.py`` loads
this module as a plugin, so every test module can ask for these fixtures by name.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from contracts import make_engine, make_session_factory
from contracts.migrate import upgrade

__all__ = [
    "DEFAULT_POSTGRES_URL",
    "START_POSTGRES",
    "db_url",
    "engine",
    "postgres_url",
    "sessions",
]

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The PostgreSQL server of the test suite; a test that needs it fails if it is down."""
    url = os.environ.get("KOIN_TEST_DATABASE_URL") or DEFAULT_POSTGRES_URL
    engine = make_engine(url)
    problem = None
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as exc:
        problem = exc.orig
    finally:
        engine.dispose()
    if problem is not None:
        shown = make_url(url).render_as_string(hide_password=True)
        pytest.fail(
            f"PostgreSQL at {shown} is not reachable: {problem}\n"
            f"Start it with:  {START_POSTGRES}\n"
            "or point KOIN_TEST_DATABASE_URL at another server.",
            pytrace=False,
        )
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh schema of the test PostgreSQL whose name
    the connection URL puts first on the search path (with a Japanese session time zone)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/koin.db"
        return
    admin_url: str = request.getfixturevalue("postgres_url")
    schema = f"koin_test_{secrets.token_hex(6)}"
    admin = make_engine(admin_url)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(admin_url)
        given = url.query.get("options", ())
        options = " ".join(
            [*([given] if isinstance(given, str) else given)]
            + [f"-csearch_path={schema}", "-ctimezone=Asia/Tokyo"]
        )
        yield url.update_query_dict({"options": options}).render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text("SET LOCAL lock_timeout = '10s'"))
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on ``db_url`` migrated to the newest revision."""
    upgrade(db_url)
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)

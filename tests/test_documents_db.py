"""The record of signed documents and its migrations, on SQLite and on a real PostgreSQL
(fixtures in :mod:`tests.db`)."""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from contracts import (
    Base,
    ContractsError,
    DocumentNotFound,
    DuplicateDocument,
    SignedDocument,
    database_url,
    find_documents_by_sha256,
    get_document,
    make_engine,
    make_session_factory,
    record_signed_document,
    record_signed_documents,
    require_document,
    session_scope,
)
from contracts.migrate import current, head, upgrade
from signer import JST, SignatureLevel, new_document_id
from tests.db import DEFAULT_POSTGRES_URL

SUBJECT = "CN=Governor of Ibaraki Prefecture,O=Ibaraki Prefecture,C=JP"


def fields(document_id: str | None = None, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "document_id": document_id or new_document_id(),
        "sha256": hashlib.sha256(b"signed permit").hexdigest(),
        "signer_role": "position",
        "signer_subject": SUBJECT,
        "level": SignatureLevel.B_T,
        "signed_at": dt.datetime(2026, 4, 1, 9, 30, 15, 123456, tzinfo=JST),
        "file_name": "営業許可書.pdf",
        "page_count": 2,
    }
    values.update(overrides)
    return values


def count_rows(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(SignedDocument)) or 0


# -- migrations -------------------------------------------------------------------------------


def test_upgrade_from_empty_creates_the_table_at_head(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the migrations are found from the package, not the cwd
    assert current(db_url) is None

    upgrade(db_url)

    assert current(db_url) == head() is not None
    engine = make_engine(db_url)
    try:
        inspector = inspect(engine)
        assert {"signed_documents", "alembic_version"} <= set(inspector.get_table_names())
        assert [uc["name"] for uc in inspector.get_unique_constraints("signed_documents")] == [
            "uq_signed_documents_document_id"
        ]
        indexes = inspector.get_indexes("signed_documents")
        assert sorted(ix["name"] for ix in indexes if not ix.get("duplicates_constraint")) == [
            "ix_signed_documents_sha256",
            "ix_signed_documents_signed_at",
            "ix_signed_documents_signed_by",
        ]
    finally:
        engine.dispose()


def test_upgrade_twice_is_a_no_op(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        sessions = make_session_factory(engine)
        with session_scope(sessions) as session:
            record_signed_document(session, **fields("0GSC-8XWZ-0DCG-CZGF"))

        upgrade(db_url)

        assert current(db_url) == head()
        assert count_rows(sessions) == 1
    finally:
        engine.dispose()


def test_unknown_revision_is_refused(db_url: str) -> None:
    with pytest.raises(ContractsError) as caught:
        upgrade(db_url, "no-such-revision")
    assert "no-such-revision" in caught.value.message_en


def test_models_match_the_migrations(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        assert compare_metadata(context, Base.metadata) == []


def test_engine_settings(engine: Engine) -> None:
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
        else:
            assert engine.dialect.driver == "psycopg"
            schema = connection.execute(text("SELECT current_schema()")).scalar_one()
            assert schema.startswith("koin_test_")
            assert connection.execute(text("SHOW timezone")).scalar() == "Asia/Tokyo"


def test_database_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KOIN_DATABASE_URL", raising=False)
    tmp_path = tmp_path.resolve()
    url = database_url(tmp_path / "home dir")
    assert url == f"sqlite:///{tmp_path}/home dir/koin.db"
    assert make_url(url).database == f"{tmp_path}/home dir/koin.db"

    monkeypatch.setenv("KOIN_DATABASE_URL", DEFAULT_POSTGRES_URL)
    assert database_url(tmp_path) == DEFAULT_POSTGRES_URL
    engine = make_engine(database_url(tmp_path))
    assert engine.url.drivername == "postgresql+psycopg"
    engine.dispose()

    with pytest.raises(ContractsError):
        make_engine("mysql://root@localhost/koin")


# -- recording and finding --------------------------------------------------------------------


def test_record_get_and_find(sessions: sessionmaker[Session]) -> None:
    values = fields("0GSC-8XWZ-0DCG-CZGF", level="B-LTA")
    with session_scope(sessions) as session:
        recorded = record_signed_document(session, **values)
        assert recorded.id is not None
    other = fields(sha256=hashlib.sha256(b"another permit").hexdigest(), file_name=None)
    with session_scope(sessions) as session:
        record_signed_document(session, **other)

    with sessions() as session:
        for typed in ["0GSC-8XWZ-0DCG-CZGF", " 0gsc8xwz0dcgczgf\n", "0gsc 8xwz odcg czgf"]:
            found = get_document(session, typed)
            assert found is not None, typed
            assert found.document_id == "0GSC-8XWZ-0DCG-CZGF"
        found = require_document(session, "0GSC-8XWZ-0DCG-CZGF")
        assert found.sha256 == values["sha256"]
        assert found.signer_role == "position"
        assert found.signer_subject == SUBJECT
        assert found.level == "B-LTA"
        assert found.signature_level is SignatureLevel.B_LTA
        assert found.file_name == "営業許可書.pdf"
        assert found.page_count == 2
        assert get_document(session, "0GSC-8XWZ-0DCG-CZG0") is None
        assert get_document(session, "not an id") is None
        assert found.id == recorded.id
        with pytest.raises(DocumentNotFound):
            require_document(session, "0GSC-8XWZ-0DCG-CZG0")

        by_hash = find_documents_by_sha256(session, values["sha256"].upper())
        assert [d.document_id for d in by_hash] == ["0GSC-8XWZ-0DCG-CZGF"]
        assert find_documents_by_sha256(session, "0" * 64) == []
        assert find_documents_by_sha256(session, "xyz") == []


def test_the_same_sha256_may_be_recorded_under_several_ids(sessions: sessionmaker[Session]) -> None:
    first = fields(signed_at=dt.datetime(2026, 4, 1, tzinfo=dt.UTC))
    second = fields(signed_at=dt.datetime(2026, 3, 1, tzinfo=dt.UTC))
    with session_scope(sessions) as session:
        record_signed_document(session, **first)
        record_signed_document(session, **second)
    with sessions() as session:
        found = find_documents_by_sha256(session, first["sha256"])
    assert [d.document_id for d in found] == [second["document_id"], first["document_id"]]


def test_identical_re_record_is_idempotent(sessions: sessionmaker[Session]) -> None:
    values = fields()
    with session_scope(sessions) as session:
        first_id = record_signed_document(session, **values).id
    same_moment_in_utc = values["signed_at"].astimezone(dt.UTC)
    with session_scope(sessions) as session:
        again = record_signed_document(
            session,
            **{
                **values,
                "signed_at": same_moment_in_utc,
                "document_id": values["document_id"].lower().replace("-", ""),
            },
        )
        assert again.id == first_id
    assert count_rows(sessions) == 1


def test_conflicting_re_record_raises_duplicate(sessions: sessionmaker[Session]) -> None:
    values = fields()
    with session_scope(sessions) as session:
        record_signed_document(session, **values)
    changed = {**values, "sha256": "f" * 64, "page_count": 3}
    with pytest.raises(DuplicateDocument) as caught, session_scope(sessions) as session:
        record_signed_document(session, **changed)
    error = caught.value
    assert error.document_id == values["document_id"]
    assert error.differing == ("sha256", "page_count")
    assert "既に異なる内容で登録" in error.message
    assert "already recorded with different data" in error.message_en
    assert count_rows(sessions) == 1
    with sessions() as session:
        stored = get_document(session, values["document_id"])
        assert stored is not None and stored.sha256 == values["sha256"]


def test_duplicate_does_not_spoil_the_callers_transaction(sessions: sessionmaker[Session]) -> None:
    taken = fields()
    with session_scope(sessions) as session:
        record_signed_document(session, **taken)
    fresh = fields()
    with session_scope(sessions) as session:
        record_signed_document(session, **fresh)
        with pytest.raises(DuplicateDocument):
            record_signed_document(session, **{**taken, "signer_role": "witness"})
    with sessions() as session:
        assert get_document(session, fresh["document_id"]) is not None


def test_session_scope_rolls_back_on_error(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(RuntimeError), session_scope(sessions) as session:
        record_signed_document(session, **fields())
        raise RuntimeError("boom")
    assert count_rows(sessions) == 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"document_id": "0GSC-8XWZ-0DCG"},
        {"document_id": "0GSC-8XWZ-0DCG-CZGU"},  # U is not Crockford base32
        {"sha256": "abc"},
        {"level": "B-XL"},
        {"signed_at": dt.datetime(2026, 4, 1, 9, 30)},
        {"signer_role": ""},
        {"signer_subject": "CN=" + "x" * 510},
        {"file_name": "長" * 256},
        {"page_count": 0},
    ],
    ids=lambda overrides: next(iter(overrides)),
)
def test_malformed_records_are_refused(
    sessions: sessionmaker[Session], overrides: dict[str, Any]
) -> None:
    with pytest.raises(ValueError), session_scope(sessions) as session:
        record_signed_document(session, **fields(**overrides))
    assert count_rows(sessions) == 0


# -- time -------------------------------------------------------------------------------------


def test_signed_at_round_trips_as_aware_utc(sessions: sessionmaker[Session]) -> None:
    signed_at = dt.datetime(2026, 4, 1, 0, 5, 9, 654321, tzinfo=JST)  # 2026-03-31 15:05 UTC
    values = fields(signed_at=signed_at)
    before = dt.datetime.now(dt.UTC)
    with session_scope(sessions) as session:
        record_signed_document(session, **values)
    after = dt.datetime.now(dt.UTC)

    with sessions() as session:
        stored = get_document(session, values["document_id"])
        assert stored is not None
        assert stored.signed_at == signed_at
        assert stored.signed_at.tzinfo is dt.UTC
        assert stored.signed_at.isoformat() == "2026-03-31T15:05:09.654321+00:00"
        assert stored.created_at.tzinfo is dt.UTC
        assert before - dt.timedelta(seconds=1) <= stored.created_at <= after

        # Rows written without the ORM get the database's own UTC time.
        session.execute(
            text(
                "INSERT INTO signed_documents"
                " (document_id, sha256, signer_role, signer_subject, level, signed_at)"
                " SELECT 'AAAA-BBBB-CCCC-DDDD', sha256, signer_role, signer_subject, level,"
                " signed_at FROM signed_documents"
            )
        )
        raw = get_document(session, "AAAA-BBBB-CCCC-DDDD")
        assert raw is not None
        assert raw.signed_at == signed_at
        assert raw.created_at.tzinfo is dt.UTC
        assert abs(raw.created_at - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
        session.rollback()


# -- concurrency ------------------------------------------------------------------------------


def _record_in_own_session(sessions: sessionmaker[Session], values: dict[str, Any]) -> str:
    with session_scope(sessions) as session:
        return record_signed_document(session, **values).sha256


def test_concurrent_insert_waits_for_the_first_and_loses(sessions: sessionmaker[Session]) -> None:
    document_id = new_document_id()
    with sessions() as first, ThreadPoolExecutor(1) as pool:
        record_signed_document(first, **fields(document_id, sha256="a" * 64))  # not committed
        second = pool.submit(_record_in_own_session, sessions, fields(document_id, sha256="b" * 64))
        time.sleep(0.5)
        # The database makes the second writer wait for the first one's transaction.
        assert not second.done()
        first.commit()
        with pytest.raises(DuplicateDocument):
            second.result(timeout=30)
    assert count_rows(sessions) == 1
    with sessions() as session:
        stored = get_document(session, document_id)
        assert stored is not None and stored.sha256 == "a" * 64


def test_concurrent_insert_after_a_rollback_wins(sessions: sessionmaker[Session]) -> None:
    document_id = new_document_id()
    with sessions() as first, ThreadPoolExecutor(1) as pool:
        record_signed_document(first, **fields(document_id, sha256="a" * 64))
        second = pool.submit(_record_in_own_session, sessions, fields(document_id, sha256="b" * 64))
        time.sleep(0.5)
        assert not second.done()
        first.rollback()
        assert second.result(timeout=30) == "b" * 64
    assert count_rows(sessions) == 1


def test_racing_writers_leave_exactly_one_row(sessions: sessionmaker[Session]) -> None:
    document_id = new_document_id()
    writers = 6
    start = threading.Barrier(writers)

    def attempt(number: int) -> str:
        values = fields(document_id, sha256=f"{number:064x}")
        with session_scope(sessions) as session:
            start.wait(timeout=30)
            return record_signed_document(session, **values).sha256

    with ThreadPoolExecutor(writers) as pool:
        futures = [pool.submit(attempt, number) for number in range(writers)]
        winners = [f.result() for f in futures if f.exception(timeout=60) is None]
        losers = [f.exception() for f in futures if f.exception() is not None]

    assert len(winners) == 1
    assert len(losers) == writers - 1
    assert all(isinstance(exc, DuplicateDocument) for exc in losers), losers
    assert count_rows(sessions) == 1
    with sessions() as session:
        stored = get_document(session, document_id)
        assert stored is not None and stored.sha256 == winners[0]


def test_sqlite_database_file_is_owner_only(tmp_path: Path) -> None:
    import stat

    from contracts import database_url, make_engine

    engine = make_engine(database_url(tmp_path / "home"))
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()
    assert stat.S_IMODE((tmp_path / "home" / "koin.db").stat().st_mode) == 0o600


def test_many_records_at_once_follow_the_same_rules(sessions: sessionmaker[Session]) -> None:
    already = fields()
    with session_scope(sessions) as session:
        record_signed_document(session, **already)
    fresh = [fields(file_name=f"許可書-{n}.pdf") for n in range(3)]
    same_again = {**already, "document_id": already["document_id"].lower().replace("-", "")}
    with session_scope(sessions) as session:
        record_signed_documents(session, [*fresh, same_again])  # identical re-record: no-op
    assert count_rows(sessions) == 4
    with sessions() as session:
        for values in fresh:
            stored = get_document(session, values["document_id"])
            assert stored is not None and stored.file_name == values["file_name"]
    other = fields()
    with pytest.raises(DuplicateDocument) as caught, session_scope(sessions) as session:
        record_signed_documents(session, [other, {**fresh[1], "sha256": "e" * 64}])
    assert caught.value.document_id == fresh[1]["document_id"]
    assert caught.value.differing == ("sha256",)
    assert count_rows(sessions) == 4  # nothing of the refused call is kept
    with pytest.raises(ValueError, match="twice"), session_scope(sessions) as session:
        record_signed_documents(session, [other, other])
    with session_scope(sessions) as session:
        record_signed_documents(session, [])
    assert count_rows(sessions) == 4

"""Batch signing on SQLite and on a real PostgreSQL: every document is signed at most once,
bad files fail alone, and crashed or overtaken workers are recovered from."""

from __future__ import annotations

import datetime as dt
import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyhanko.pdf_utils.reader import PdfFileReader
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

import contracts.batches as batches_module
from contracts import (
    Batch,
    BatchDocument,
    BatchStatus,
    BatchWorker,
    DocumentState,
    InvalidBatchState,
    Progress,
    SignedDocument,
    UserRole,
    add_document,
    batch_progress,
    cancel_batch,
    claim_documents,
    create_batch,
    create_user,
    list_documents,
    reconcile,
    require_batch,
    retry_failed,
    session_scope,
    sign_document,
    start_batch,
    utcnow,
)
from keys import Role
from signer import Installation, SigningContext, SignResult, sign_pdf
from signer.samples import make_permit_pdf
from tests.conftest import PUBLIC_URL
from tests.hostile import password_protected_pdf
from tests.servers import closed_port_url

COUNT = 12
LATER = dt.timedelta(minutes=10)


@pytest.fixture(scope="module")
def permits(installation: Installation) -> list[bytes]:
    return [make_permit_pdf(installation.font_file, number=i) for i in range(1, COUNT + 1)]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def context(installation: Installation) -> SigningContext:
    return installation.signing_context(Role.POSITION)


@pytest.fixture
def user_id(sessions: sessionmaker[Session]) -> int:
    with session_scope(sessions) as session:
        user, _ = create_user(session, "officer@pref.example.jp", [UserRole.OFFICER])
        return user.id


@pytest.fixture
def sign_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of the signer made by the batch service (the document IDs)."""
    calls: list[str] = []
    real = sign_pdf

    def counting(*args: Any, **kwargs: Any) -> SignResult:
        result = real(*args, **kwargs)
        calls.append(result.document_id)
        return result

    monkeypatch.setattr(batches_module, "sign_pdf", counting)
    return calls


def new_batch(
    sessions: sessionmaker[Session],
    home: Path,
    user_id: int,
    files: list[tuple[str, bytes]],
    *,
    start: bool = True,
) -> str:
    with session_scope(sessions) as session:
        batch = create_batch(session, home=home, user_id=user_id)
        for name, data in files:
            add_document(session, batch, home=home, file_name=name, data=data)
        if start:
            start_batch(session, batch)
        return batch.public_id


def progress(sessions: sessionmaker[Session], public_id: str) -> Progress:
    with sessions() as session:
        return batch_progress(session, require_batch(session, public_id))


def status(sessions: sessionmaker[Session], public_id: str) -> str:
    with sessions() as session:
        return require_batch(session, public_id).status


def documents(sessions: sessionmaker[Session], public_id: str) -> list[BatchDocument]:
    with sessions() as session:
        return list_documents(session, require_batch(session, public_id))


def records(sessions: sessionmaker[Session], public_id: str) -> list[SignedDocument]:
    """The signed_documents rows of the batch's documents."""
    with sessions() as session:
        batch = require_batch(session, public_id)
        ids = select(BatchDocument.document_id).where(BatchDocument.batch_id == batch.id)
        query = select(SignedDocument).where(SignedDocument.document_id.in_(ids))
        return list(session.scalars(query))


def signatures(path: Path) -> int:
    return len(PdfFileReader(io.BytesIO(path.read_bytes())).embedded_signatures)


def drain(
    sessions: sessionmaker[Session],
    context: SigningContext,
    home: Path,
    *,
    owner: str = "worker",
    now: Callable[[], dt.datetime] = utcnow,
) -> None:
    """Claim and sign until nothing is claimable."""
    while ids := claim_documents(sessions, owner=owner, limit=4, now=now()):
        for row_id in ids:
            sign_document(sessions, row_id, context, home=home, owner=owner, now=now())


def assert_signed_once(sessions: sessionmaker[Session], home: Path, public_id: str) -> None:
    rows = documents(sessions, public_id)
    recorded = {r.document_id: r for r in records(sessions, public_id)}
    for row in rows:
        assert row.state == DocumentState.DONE, row
        assert row.output_path and row.document_id and row.lease_owner is None
        output = home / row.output_path
        assert signatures(output) == 1
        assert recorded[row.document_id].sha256 == row.output_sha256
    assert len(recorded) == len(rows)


# -- building a batch ---------------------------------------------------------------------------


def test_create_add_start(
    sessions: sessionmaker[Session], home: Path, user_id: int, permits: list[bytes]
) -> None:
    public_id = new_batch(
        sessions, home, user_id, [("許可書 1.pdf", permits[0]), ("../x/2.pdf", permits[1])],
        start=False,
    )
    assert status(sessions, public_id) == BatchStatus.DRAFT
    rows = documents(sessions, public_id)
    assert [(r.position, r.file_name, r.state) for r in rows] == [
        (1, "許可書 1.pdf", "waiting"), (2, "2.pdf", "waiting"),
    ]
    assert rows[0].input_path == f"batches/{public_id}/in/1.pdf"
    assert (home / rows[1].input_path).read_bytes() == permits[1]
    assert claim_documents(sessions, owner="w", limit=5) == []  # a draft is not worked on

    with session_scope(sessions) as session:
        batch = start_batch(session, require_batch(session, public_id))
        assert batch.status == BatchStatus.RUNNING and batch.started_at is not None
    with session_scope(sessions) as session, pytest.raises(InvalidBatchState):
        add_document(
            session, require_batch(session, public_id), home=home, file_name="3.pdf",
            data=permits[2],
        )
    with session_scope(sessions) as session, pytest.raises(InvalidBatchState):
        start_batch(session, require_batch(session, public_id))
    assert progress(sessions, public_id) == Progress(0, 0, 2, 0, 2)

    empty = new_batch(sessions, home, user_id, [], start=False)
    with session_scope(sessions) as session, pytest.raises(InvalidBatchState):
        start_batch(session, require_batch(session, empty))
    with session_scope(sessions) as session:
        cancel_batch(session, require_batch(session, public_id))
    assert claim_documents(sessions, owner="w", limit=5) == []  # nor a cancelled one


# -- concurrent workers ----------------------------------------------------------------------


def test_two_workers_sign_every_document_exactly_once(
    sessions: sessionmaker[Session],
    home: Path,
    user_id: int,
    permits: list[bytes],
    installation: Installation,
    context: SigningContext,
    sign_calls: list[str],
) -> None:
    public_id = new_batch(
        sessions, home, user_id, [(f"permit-{i}.pdf", data) for i, data in enumerate(permits)]
    )
    workers = [
        BatchWorker(
            sessions, installation, home=home, context=context, threads=2, interval=0.05,
            public_url=PUBLIC_URL,
        )
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + 120
        while status(sessions, public_id) != BatchStatus.FINISHED:
            assert time.monotonic() < deadline, progress(sessions, public_id)
            time.sleep(0.05)
    finally:
        for worker in workers:
            worker.stop()

    assert progress(sessions, public_id) == Progress(COUNT, 0, 0, 0, COUNT)
    assert_signed_once(sessions, home, public_id)
    assert sorted(sign_calls) == sorted(str(r.document_id) for r in documents(sessions, public_id))


def test_concurrent_claims_never_overlap(
    sessions: sessionmaker[Session], home: Path, user_id: int, permits: list[bytes]
) -> None:
    public_id = new_batch(sessions, home, user_id, [(f"{i}.pdf", permits[0]) for i in range(20)])
    start = threading.Barrier(4)
    claimed: list[list[int]] = []

    def claim(owner: str) -> None:
        start.wait()
        mine: list[int] = []
        while ids := claim_documents(sessions, owner=owner, limit=3):
            mine.extend(ids)
        claimed.append(mine)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [row_id for mine in claimed for row_id in mine]
    assert len(every) == len(set(every)) == 20
    assert progress(sessions, public_id).running == 20


# -- bad files and transient errors ---------------------------------------------------------


def test_bad_files_fail_alone(
    sessions: sessionmaker[Session],
    home: Path,
    user_id: int,
    permits: list[bytes],
    context: SigningContext,
) -> None:
    files = [
        ("a.pdf", permits[0]),
        ("not-a-pdf.pdf", b"this is a spreadsheet, honestly"),
        ("b.pdf", permits[1]),
        ("encrypted.pdf", password_protected_pdf()),
        ("c.pdf", permits[2]),
    ]
    public_id = new_batch(sessions, home, user_id, files)
    drain(sessions, context, home)

    assert status(sessions, public_id) == BatchStatus.FINISHED
    assert progress(sessions, public_id) == Progress(done=3, failed=2, waiting=0, running=0,
                                                     total=5)
    rows = {r.file_name: r for r in documents(sessions, public_id)}
    for name in ("not-a-pdf.pdf", "encrypted.pdf"):
        row = rows[name]
        assert row.state == DocumentState.FAILED and row.attempts == 0
        assert row.error and row.error_en and row.output_path is None
    assert "password-protected" in (rows["encrypted.pdf"].error_en or "")
    assert len(records(sessions, public_id)) == 3

    with session_scope(sessions) as session:
        assert retry_failed(session, require_batch(session, public_id)) == 2
    assert status(sessions, public_id) == BatchStatus.RUNNING
    drain(sessions, context, home)  # still not PDFs
    assert progress(sessions, public_id).failed == 2
    assert status(sessions, public_id) == BatchStatus.FINISHED


def test_tsa_down_puts_the_document_back_to_waiting(
    sessions: sessionmaker[Session],
    home: Path,
    user_id: int,
    permits: list[bytes],
    installation: Installation,
    context: SigningContext,
) -> None:
    down = installation.signing_context(Role.POSITION, tsa_urls=[closed_port_url()])
    public_id = new_batch(sessions, home, user_id, [("a.pdf", permits[0])])
    [row_id] = claim_documents(sessions, owner="w", limit=5)

    assert sign_document(sessions, row_id, down, home=home, owner="w") == DocumentState.WAITING
    [row] = documents(sessions, public_id)
    assert row.attempts == 1 and row.lease_owner is None
    assert row.lease_until is not None and row.lease_until > utcnow()
    assert row.error_en
    assert not list((home / "batches" / public_id).glob("out/*.pdf"))
    assert claim_documents(sessions, owner="w", limit=5) == []  # backing off

    drain(sessions, context, home, now=lambda: utcnow() + LATER)  # the TSA is back
    assert_signed_once(sessions, home, public_id)
    assert status(sessions, public_id) == BatchStatus.FINISHED


# -- crashes ------------------------------------------------------------------------------------


def test_crashed_worker_without_output_is_reconciled_and_signed_once(
    sessions: sessionmaker[Session],
    home: Path,
    user_id: int,
    permits: list[bytes],
    context: SigningContext,
    sign_calls: list[str],
) -> None:
    public_id = new_batch(sessions, home, user_id, [("a.pdf", permits[0]), ("b.pdf", permits[1])])
    assert len(claim_documents(sessions, owner="dies", limit=5)) == 2  # …and never signs
    assert claim_documents(sessions, owner="w", limit=5) == []  # leased

    assert reconcile(sessions) == 0
    assert reconcile(sessions, now=utcnow() + LATER) == 2
    assert progress(sessions, public_id).waiting == 2
    drain(sessions, context, home)

    assert len(sign_calls) == 2
    assert_signed_once(sessions, home, public_id)
    assert status(sessions, public_id) == BatchStatus.FINISHED


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "unrecorded"])
def test_output_of_a_crashed_attempt_is_recorded_not_signed_again(
    sessions: sessionmaker[Session],
    home: Path,
    user_id: int,
    permits: list[bytes],
    context: SigningContext,
    sign_calls: list[str],
    recorded: bool,
) -> None:
    public_id = new_batch(sessions, home, user_id, [("a.pdf", permits[0])])
    drain(sessions, context, home)
    [signed] = documents(sessions, public_id)
    assert signed.output_path is not None and signed.output_sha256 is not None
    output = home / signed.output_path
    before = output.read_bytes()

    # The crash: the file is there, but the row was never marked (nor, maybe, recorded).
    with session_scope(sessions) as session:
        session.execute(
            update(BatchDocument)
            .where(BatchDocument.id == signed.id)
            .values(state="running", lease_owner="dead", lease_until=utcnow(), output_path=None,
                    output_sha256=None)
        )
        session.execute(update(Batch).values(status="running", finished_at=None))
        if not recorded:
            session.execute(
                delete(SignedDocument).where(SignedDocument.document_id == signed.document_id)
            )

    drain(sessions, context, home, now=lambda: utcnow() + LATER)

    assert len(sign_calls) == 1  # only the first run signed
    assert output.read_bytes() == before
    [row] = documents(sessions, public_id)
    assert row.state == DocumentState.DONE and row.output_sha256 == signed.output_sha256
    assert row.document_id == signed.document_id
    assert_signed_once(sessions, home, public_id)
    assert status(sessions, public_id) == BatchStatus.FINISHED


def test_a_foreign_output_file_is_not_accepted(
    sessions: sessionmaker[Session],
    home: Path,
    user_id: int,
    permits: list[bytes],
    context: SigningContext,
) -> None:
    public_id = new_batch(sessions, home, user_id, [("a.pdf", permits[0])])
    [row_id] = claim_documents(sessions, owner="w", limit=1)
    with sessions() as session:
        batch = require_batch(session, public_id)
        row = session.get_one(BatchDocument, row_id)
        output = home / batches_module.output_relative(batch, row)
    output.parent.mkdir(parents=True)
    output.write_bytes(permits[1])  # some other file under the output name

    assert sign_document(sessions, row_id, context, home=home, owner="w") == DocumentState.FAILED
    [row] = documents(sessions, public_id)
    assert "existing output" in (row.error_en or "")
    assert records(sessions, public_id) == []


def test_a_worker_that_lost_its_lease_cannot_mark_the_document(
    sessions: sessionmaker[Session],
    home: Path,
    user_id: int,
    permits: list[bytes],
    context: SigningContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    public_id = new_batch(sessions, home, user_id, [("a.pdf", permits[0])])
    [row_id] = claim_documents(sessions, owner="slow", limit=1)
    real = sign_pdf
    calls: list[str] = []

    def slow_sign(*args: Any, **kwargs: Any) -> SignResult:
        result = real(*args, **kwargs)
        calls.append(result.document_id)
        # While "slow" signs, its lease runs out and "fast" takes the document over.
        assert claim_documents(sessions, owner="fast", limit=1, now=utcnow() + LATER) == [row_id]
        return result

    monkeypatch.setattr(batches_module, "sign_pdf", slow_sign)
    assert sign_document(sessions, row_id, context, home=home, owner="slow") == "running"
    [row] = documents(sessions, public_id)
    assert row.lease_owner == "fast" and row.output_path is None
    assert records(sessions, public_id) == []
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(SignedDocument)) == 0

    # The new owner finds the complete file of the overtaken attempt and records it.
    assert sign_document(sessions, row_id, context, home=home, owner="fast") == "done"
    assert len(calls) == 1
    assert_signed_once(sessions, home, public_id)
    # A late word from the old owner changes nothing.
    assert sign_document(sessions, row_id, context, home=home, owner="slow") == "done"
    assert len(calls) == 1


def test_worker_survives_and_reports(
    sessions: sessionmaker[Session], installation: Installation, home: Path
) -> None:
    worker = BatchWorker(sessions, installation, home=home, interval=0.05)
    assert worker.run_once() == 0
    assert worker.claim_size == 2 * batches_module.DEFAULT_CHUNK
    assert worker.more_due(worker.claim_size) and not worker.more_due(worker.claim_size - 1)
    assert not worker.more_due(None)
    with pytest.raises(ValueError):
        BatchWorker(sessions, installation, threads=0)


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    left = [t for t in set(threading.enumerate()) - before if t.name.startswith("koin-")]
    assert not left, left


# -- handing documents to queue workers -------------------------------------------------------


def test_a_task_taken_at_once_finds_its_documents_claimable(
    sessions: sessionmaker[Session], home: Path, user_id: int, permits: list[bytes]
) -> None:
    """A worker may take a task the moment it is sent: the documents must not be locked by
    the transaction that queues them (claims skip locked rows, so such a task claimed
    nothing and its documents waited minutes for the reconciler)."""
    from contracts.batch_queue import queue_due

    new_batch(sessions, home, user_id, [(f"p{i}.pdf", permits[0]) for i in range(25)])
    claimed: list[int] = []

    def send_and_take_at_once(ids: list[int]) -> None:
        claimed.extend(claim_documents(sessions, owner="fast-worker", limit=len(ids), ids=ids))

    assert queue_due(sessions, send_and_take_at_once, chunk=10) == 25
    assert len(claimed) == 25 and len(set(claimed)) == 25
    assert queue_due(sessions, send_and_take_at_once, chunk=10) == 0  # nothing sent twice


def test_documents_not_sent_are_sent_by_the_next_round(
    sessions: sessionmaker[Session], home: Path, user_id: int, permits: list[bytes]
) -> None:
    from contracts.batch_queue import queue_due

    new_batch(sessions, home, user_id, [(f"p{i}.pdf", permits[0]) for i in range(25)])
    sent: list[list[int]] = []

    def broker_fails_on_the_second_chunk(ids: list[int]) -> None:
        if len(sent) == 1:
            raise ConnectionError("broker down")
        sent.append(ids)

    assert queue_due(sessions, broker_fails_on_the_second_chunk, chunk=10) == 10
    with sessions() as session:
        not_queued = session.scalar(
            select(func.count()).select_from(BatchDocument)
            .where(BatchDocument.queued_at.is_(None))
        )
    assert not_queued == 15  # the unsent ones are not noted as queued
    assert queue_due(sessions, sent.append, chunk=10) == 15
    assert sorted(i for ids in sent for i in ids) == sorted(set(i for ids in sent for i in ids))
    assert sum(map(len, sent)) == 25

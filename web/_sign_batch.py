"""``koin sign-batch``: sign every PDF of a folder, resumably, for RPA robots.

The parent process lists the inputs, decides what is already done from the manifest, hands
the rest to the signing workers (itself with one worker, else a pool of processes that each
build their signing context once) and writes the manifest: one row appended and fsynced right
after each document, the whole file rewritten atomically (deduplicated, in input order) at the
end. An interrupted run therefore loses at most the document in flight, whose output file was
never renamed into place (:func:`signer.sign_pdf` writes to a temporary file first).

Manifest (UTF-8 with BOM, so that Excel shows Japanese names): ``input_name, input_sha256,
output_sha256, document_id, status, error``. ``status`` is ``signed`` or ``failed``; an input
skipped because it was signed earlier keeps its ``signed`` row. A row of another status (e.g.
``skipped`` written by hand) never counts as done.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import io
import logging
import multiprocessing
import os
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from contracts.models import SigningChannel
from keys import KoinError, Role, atomic_write
from signer import Installation, SignatureLevel, SigningContext, SignOptions

from .config import Settings

__all__ = [
    "MANIFEST_COLUMNS",
    "BatchSummary",
    "Row",
    "Status",
    "list_inputs",
    "read_manifest",
    "run_batch",
    "with_level",
]

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "input_name", "input_sha256", "output_sha256", "document_id", "status", "error",
)
#: The newline csv writes; the manifest is meant for Excel on Windows as much as for robots.
_LINE_END = "\r\n"


class Status(StrEnum):
    SIGNED = "signed"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class Row:
    """One manifest row: what became of one input."""

    input_name: str
    input_sha256: str
    output_sha256: str = ""
    document_id: str = ""
    status: Status = Status.FAILED
    error: str = ""

    def fields(self) -> list[str]:
        return [self.input_name, self.input_sha256, self.output_sha256, self.document_id,
                self.status.value, self.error]


@dataclass(frozen=True)
class _Outcome:
    """What a worker reports for one input: its row, whether it was signed before (adopted,
    see :func:`_adopted`), and a fatal error that stops the whole batch (no key, say)."""

    row: Row
    adopted: bool = False
    fatal: str | None = None


@dataclass(frozen=True)
class BatchSummary:
    total: int
    signed: int
    skipped: int
    failed: int
    manifest: Path


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _reason(exc: KoinError, language: str) -> str:
    return _one_line(exc.message_en if language == "en" else exc.message)


def list_inputs(in_dir: Path) -> list[Path]:
    """The ``*.pdf`` files (any case of the suffix) directly in ``in_dir``, sorted by name."""
    return sorted(
        (p for p in in_dir.iterdir() if p.suffix.lower() == ".pdf" and p.is_file()),
        key=lambda p: p.name,
    )


# -- manifest ---------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, Row]:
    """The last row of each input name in the manifest at ``path``; empty if there is none.
    Rows that do not parse (a line cut off by a kill) are ignored."""
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except FileNotFoundError:
        return {}
    rows: dict[str, Row] = {}
    for record in csv.DictReader(io.StringIO(text, newline="")):
        values = [record.get(column) for column in MANIFEST_COLUMNS]
        if any(value is None for value in values):
            continue
        name, input_sha, output_sha, document_id, status, error = (str(v) for v in values)
        try:
            rows[name] = Row(name, input_sha, output_sha, document_id, Status(status), error)
        except ValueError:
            continue
    return rows


def _csv_text(records: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator=_LINE_END).writerows(records)
    return buffer.getvalue()


def _rewrite_manifest(path: Path, rows: Iterable[Row]) -> None:
    """Replace the manifest with ``rows`` atomically (temporary file, fsync, rename)."""
    text = _csv_text([MANIFEST_COLUMNS, *(row.fields() for row in rows)])
    atomic_write(path, ("\ufeff" + text).encode("utf-8"), mode=0o644)


class _ManifestAppender:
    """Appends one row at a time, flushed and fsynced, to a manifest that already has its
    header (see :func:`_rewrite_manifest`)."""

    def __init__(self, path: Path) -> None:
        self._handle = path.open("ab")

    def append(self, row: Row) -> None:
        self._handle.write(_csv_text([row.fields()]).encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


# -- workers ----------------------------------------------------------------------------------


@dataclass
class _WorkerState:
    language: str
    options: SignOptions
    template: str | None = None
    context: SigningContext | None = None
    engine: Engine | None = None
    sessions: sessionmaker[Session] | None = None
    setup_error: str | None = None


_state: _WorkerState | None = None


def _init_worker(settings: Settings, options: SignOptions, template: str | None = None) -> None:
    """Build this process's signing context and database sessions, once for all its documents.
    A refusal (no key, wrong passphrase) is kept and reported with the first document."""
    import contracts

    global _state
    state = _WorkerState(settings.language, options, template)
    try:
        installation = Installation(settings.home, public_url=settings.public_url)
        state.context = installation.signing_context(Role.POSITION, tsa_urls=settings.tsa_urls)
        state.engine = contracts.make_engine(contracts.database_url(settings.home))
        state.sessions = contracts.make_session_factory(state.engine)
    except KoinError as exc:
        state.setup_error = _reason(exc, settings.language)
    _state = state


def _close_worker() -> None:
    global _state
    if _state is not None and _state.engine is not None:
        _state.engine.dispose()
    _state = None


def _adopted(
    sessions: sessionmaker[Session], name: str, data: bytes, output: Path
) -> Row | None:
    """The row of an output signed by an earlier run that was stopped before its manifest row
    was written: ``output`` extends ``data`` (a signature is an incremental update) and the
    database records a position signature of exactly these bytes under this file name."""
    from contracts import find_documents_by_sha256, session_scope

    try:
        signed = output.read_bytes()
    except OSError:
        return None
    if len(signed) <= len(data) or not signed.startswith(data):
        return None
    digest = hashlib.sha256(signed).hexdigest()
    with session_scope(sessions) as session:
        records = [
            r for r in find_documents_by_sha256(session, digest)
            if r.file_name == name[-255:] and r.signer_role == Role.POSITION.value
        ]
    if not records:
        return None
    return Row(name, hashlib.sha256(data).hexdigest(), digest, records[-1].document_id,
               Status.SIGNED)


def _sign_one(source: Path, output: Path) -> _Outcome:
    """Sign ``source`` to ``output`` and record it; a refusal fails this document alone."""
    from contracts import sign_and_record

    state = _state
    assert state is not None, "_init_worker was not run"
    name = source.name
    if state.setup_error is not None:
        return _Outcome(Row(name, ""), fatal=state.setup_error)
    assert state.context is not None and state.sessions is not None
    input_sha = ""
    try:
        data = source.read_bytes()
        input_sha = hashlib.sha256(data).hexdigest()
        if output.exists():
            adopted = _adopted(state.sessions, name, data, output)
            if adopted is not None:
                return _Outcome(adopted, adopted=True)
        result = sign_and_record(
            state.sessions, data, state.context, state.options, role=Role.POSITION,
            file_name=name, output=output, template=state.template,
            channel=SigningChannel.CLI,
        )
    except KoinError as exc:
        return _Outcome(Row(name, input_sha, error=_reason(exc, state.language)))
    except OSError as exc:
        reason = f"{exc.strerror or exc.__class__.__name__}: {exc.filename or name}"
        return _Outcome(Row(name, input_sha, error=_one_line(reason)))
    except Exception as exc:  # a bug: this document fails, the batch goes on
        log.exception("internal error while signing %s", name)
        return _Outcome(Row(name, input_sha, error=f"internal error ({exc.__class__.__name__})"))
    return _Outcome(
        Row(name, input_sha, result.sha256, result.document_id, Status.SIGNED)
    )


def _in_process(
    settings: Settings, options: SignOptions, jobs: Sequence[tuple[Path, Path]],
    template: str | None,
) -> Generator[_Outcome, None, None]:
    _init_worker(settings, options, template)
    try:
        for source, output in jobs:
            yield _sign_one(source, output)
    finally:
        _close_worker()


def _in_pool(
    settings: Settings, options: SignOptions, jobs: Sequence[tuple[Path, Path]], workers: int,
    template: str | None,
) -> Generator[_Outcome, None, None]:
    """Outcomes in the order the documents finish. At most ``2 * workers`` documents are
    queued at once, so that stopping early leaves little started."""
    context = multiprocessing.get_context("forkserver")
    pending: set[Future[_Outcome]] = set()
    queue = iter(jobs)
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_init_worker,
        initargs=(settings, options, template),
    ) as pool:
        try:
            while True:
                for source, output in queue:
                    pending.add(pool.submit(_sign_one, source, output))
                    if len(pending) >= 2 * workers:
                        break
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


# -- the batch --------------------------------------------------------------------------------


def _already_signed(row: Row | None, input_sha: str, output: Path) -> bool:
    if row is None or row.status is not Status.SIGNED or row.input_sha256 != input_sha:
        return False
    try:
        return output.is_file() and _sha256_file(output) == row.output_sha256
    except OSError:
        return False


def _remove_stale_temporaries(out_dir: Path, names: Iterable[str]) -> None:
    """Temporary outputs of a run that was killed (never renamed into place)."""
    for name in names:
        for stale in out_dir.glob(f".{glob.escape(name)}.*.tmp"):
            stale.unlink(missing_ok=True)


def run_batch(
    settings: Settings,
    in_dir: Path,
    out_dir: Path,
    options: SignOptions,
    *,
    manifest: Path,
    workers: int = 1,
    report: Callable[[int, int, Row, str], None] = lambda done, total, row, label: None,
    template: str | None = None,
) -> BatchSummary:
    """Sign every ``*.pdf`` of ``in_dir`` into ``out_dir`` (same names) that the manifest does
    not show as signed already; ``report(done, total, row, label)`` after each input, where
    ``label`` is ``signed``, ``skipped`` or ``failed``.

    :raises KoinError: the signing key or the database cannot be used at all (nothing further
        is signed; what was signed is in the manifest).
    :raises OSError: the folders or the manifest cannot be read or written.
    """
    inputs = list_inputs(in_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = read_manifest(manifest)
    rows: dict[str, Row] = {}
    jobs: list[tuple[Path, Path]] = []
    total = len(inputs)
    done = 0
    skipped_rows: list[Row] = []
    for source in inputs:
        output = out_dir / source.name
        row = previous.get(source.name)
        if row is not None and _already_signed(row, _sha256_file(source), output):
            rows[source.name] = row
            skipped_rows.append(row)
        else:
            jobs.append((source, output))
    _remove_stale_temporaries(out_dir, (source.name for source, _ in jobs))
    _rewrite_manifest(manifest, skipped_rows)  # drops rows of inputs that are to be redone
    counts = {Status.SIGNED: 0, Status.SKIPPED: len(skipped_rows), Status.FAILED: 0}
    for row in skipped_rows:
        done += 1
        report(done, total, row, Status.SKIPPED.value)

    outcomes = (
        _in_process(settings, options, jobs, template) if workers == 1
        else _in_pool(settings, options, jobs, workers, template)
    )
    appender = _ManifestAppender(manifest)
    try:
        for outcome in outcomes:
            if outcome.fatal is not None:
                raise KoinError(outcome.fatal)
            row = outcome.row
            appender.append(row)
            rows[row.input_name] = row
            label = Status.SKIPPED if outcome.adopted else row.status
            counts[label] += 1
            done += 1
            report(done, total, row, label.value)
    finally:
        appender.close()
        outcomes.close()
    _rewrite_manifest(manifest, (rows[source.name] for source in inputs))
    return BatchSummary(
        total, counts[Status.SIGNED], counts[Status.SKIPPED], counts[Status.FAILED], manifest
    )


def with_level(options: SignOptions, level: str | None) -> SignOptions:
    """``options`` at ``level`` if one is given."""
    return options if level is None else dataclasses.replace(options, level=SignatureLevel(level))

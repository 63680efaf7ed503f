"""``python -m bench.faults``: batches and mail under faults, counted.

Each scenario runs the many-machine layout on this machine — ``koin serve`` (HTTP API, broker
configured so it only queues), ``koin worker`` (Celery on Redis, 2 processes, with its
scheduler), a PostgreSQL of its own (a throw-away cluster in a temporary folder, so that
restarting it disturbs nothing else), and where needed an external TSA (``koin tsa serve``) —
breaks one part in the middle of a batch, repairs it, and counts:

* **lost**: documents that never ended signed (or, for mail, messages never received);
* **signed twice**: documents with more than one signature in their file, more than one record
  in ``signed_documents``, or stray signed files; for mail, messages received twice.

Scenarios: ``tsa-down`` (the external TSA stopped for a while: documents go back to waiting
with the reason "TSA unavailable" and finish when it returns), ``smtp-down`` (the outbox keeps
retrying until the mail server is up), ``postgres-restart`` (the database restarted
mid-batch), ``worker-killed`` (``kill -9`` of the worker's process group and a new worker).
Prints a table and writes ``bench/faults.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

HERE = Path(__file__).resolve().parent
PASSPHRASE = "bench-passphrase-not-secret"
KOIN = str(Path(sys.executable).parent / "koin")
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), Path("/usr/bin"))


@dataclass
class Outcome:
    scenario: str
    items: int
    done: int
    lost: int
    twice: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def _as_postgres(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True,
                          text=True, check=True)


class Postgres:
    """A PostgreSQL cluster of its own in a temporary folder, on a free port."""

    def __init__(self, folder: Path) -> None:
        self.data = folder / "pgdata"
        self.port = _free_port()
        folder.mkdir(parents=True, exist_ok=True)
        folder.parent.chmod(0o711)  # postgres may pass through, not list
        shutil.chown(folder, "postgres")
        _as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                     "postgres", "--no-sync")
        self.start()
        _as_postgres(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                     "-U", "postgres", "koin")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/koin"

    def _ctl(self, *args: str) -> None:
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-l",
                     str(self.data.parent / "pg.log"), *args)

    def start(self) -> None:
        self._ctl("-o", f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1",
                  "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")


class Layout:
    """The processes of one scenario (see the module docstring)."""

    def __init__(self, work: Path, redis_url: str, *, external_tsa: bool = False) -> None:
        import keys
        from signer import Installation

        self.work = work
        self.home = work / "home"
        keys.write_private_file(self.home / "keys" / "passphrase", PASSPHRASE.encode() + b"\n")
        Installation(self.home).initialize()
        self.postgres = Postgres(work / "pg")
        self.port = _free_port()
        self.tsa_port = _free_port() if external_tsa else None
        self.env = {
            **os.environ, "KOIN_HOME": str(self.home), "KOIN_DATABASE_URL": self.postgres.url,
            "KOIN_BROKER_URL": redis_url, "KOIN_BATCH_QUEUE": f"faults-{secrets.token_hex(4)}",
            "KOIN_PUBLIC_URL": f"http://127.0.0.1:{self.port}", "KOIN_API_RATE": "100000",
            "KOIN_API_BURST": "100000", "KOIN_JOBS_INTERVAL": "0", "KOIN_DEV_MODE": "0",
            "KOIN_SMTP_URL": "smtp://127.0.0.1:9", "KOIN_BATCH_LEASE": "15",
            "KOIN_BATCH_REQUEUE": "10", "KOIN_RECONCILE_INTERVAL": "2",
            "KOIN_MAIL_INTERVAL": "1", "KOIN_LTA_INTERVAL": "0",
        }
        if self.tsa_port:
            self.env["KOIN_TSA_URLS"] = f"http://127.0.0.1:{self.tsa_port}/"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        from contracts import migrate

        migrate.upgrade(self.postgres.url)
        import contracts

        engine = contracts.make_engine(self.postgres.url)
        with contracts.session_scope(contracts.make_session_factory(engine)) as session:
            user, _ = contracts.create_user(session, "faults@pref.example.jp", ["signer"])
            _, self.key = contracts.create_api_key(session, user, name="faults", scopes=["sign"])
        engine.dispose()

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        with (self.work / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [KOIN, *args], env={**self.env, **(env or {})}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def start_tsa(self) -> None:
        assert self.tsa_port is not None
        self.start("tsa", "tsa", "serve", "--port", str(self.tsa_port))
        _wait_port(self.tsa_port)

    def start_all(self, env: dict[str, str] | None = None) -> None:
        if self.tsa_port:
            self.start_tsa()
        self.start("serve", "serve", "--no-init", "--port", str(self.port), env=env)
        _wait_port(self.port)
        self.start("worker", "worker", "--concurrency=2", "--loglevel=WARNING", env=env)

    def close(self) -> None:
        for name in list(self.processes):
            self.stop(name)
        try:
            self.postgres.stop()
        except subprocess.CalledProcessError:
            pass

    # -- the batch through the API -----------------------------------------------------------

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/batches"

    def http(self) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.key}"
        return session

    def run_batch(self, pdfs: list[bytes]) -> str:
        http = self.http()
        batch_id = str(http.post(self.api, json={"name": "faults"}, timeout=60).json()["id"])
        for first in range(0, len(pdfs), 200):
            files = [("file", (f"permit-{first + i:05d}.pdf", pdf, "application/pdf"))
                     for i, pdf in enumerate(pdfs[first:first + 200])]
            http.post(f"{self.api}/{batch_id}/documents", files=files,
                      timeout=600).raise_for_status()
        http.post(f"{self.api}/{batch_id}/start", timeout=60).raise_for_status()
        return batch_id

    def progress(self, batch_id: str) -> dict[str, Any]:
        try:
            body: dict[str, Any] = self.http().get(f"{self.api}/{batch_id}", timeout=10).json()
            return body
        except (requests.RequestException, ValueError):
            return {"status": "unknown", "progress": {}}

    def wait(self, batch_id: str, predicate: Callable[[dict[str, Any]], bool],
             timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = self.progress(batch_id)
            if body.get("progress") and predicate(body):
                return body
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up waiting: {body}")
            time.sleep(0.5)

    def count(self, batch_id: str, total: int) -> tuple[int, int, list[str]]:
        """(done, signed twice, notes) from the database and the files themselves."""
        from pyhanko.pdf_utils.reader import PdfFileReader
        from sqlalchemy import func, select

        import contracts
        from contracts import BatchDocument, SignedDocument

        engine = contracts.make_engine(self.postgres.url)
        notes: list[str] = []
        try:
            with contracts.make_session_factory(engine)() as session:
                batch = contracts.require_batch(session, batch_id)
                documents = contracts.list_documents(session, batch)
                records = session.execute(
                    select(SignedDocument.document_id, func.count())
                    .group_by(SignedDocument.document_id)
                ).all()
                rows = session.scalar(select(func.count()).select_from(BatchDocument))
        finally:
            engine.dispose()
        done = [d for d in documents if d.state == "done"]
        twice = sum(1 for _, n in records if n > 1)
        if len(records) != len(done):
            notes.append(f"{len(records)} records for {len(done)} signed documents")
            twice += abs(len(records) - len(done))
        for document in done:
            assert document.output_path is not None
            with (self.home / document.output_path).open("rb") as handle:
                signatures = len(PdfFileReader(handle, strict=False).embedded_signatures)
            if signatures != 1:
                twice += 1
                notes.append(f"{document.file_name}: {signatures} signatures")
        out = self.home / "batches" / batch_id / "out"
        stray = sorted(p.name for p in out.glob("*.pdf")) if out.exists() else []
        if len(stray) != len(done):
            twice += len(stray) - len(done)
            notes.append(f"{len(stray)} files in out/ for {len(done)} signed documents")
        if rows != total:
            notes.append(f"{rows} document rows for {total} uploads")
        return len(done), twice, notes


def _permits(count: int) -> list[bytes]:
    from signer import Installation
    from signer.samples import make_permit_pdf, numbered_copies

    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder)
        installation = Installation(home)
        from signer._assets import extract_cjk_font

        extract_cjk_font(installation.font_file)
        permit = make_permit_pdf(installation.font_file)
    return list(numbered_copies(permit, count))


# -- scenarios ----------------------------------------------------------------------------------


def tsa_down(layout: Layout, pdfs: list[bytes]) -> Outcome:
    layout.start_all()
    start = time.monotonic()
    batch_id = layout.run_batch(pdfs)
    layout.wait(batch_id, lambda b: b["progress"]["done"] >= len(pdfs) // 4, 600)
    layout.stop("tsa")
    down_at = time.monotonic()
    waiting = layout.wait(batch_id, lambda b: b["progress"]["running"] == 0, 120)
    reasons = {
        d["error_en"] for d in layout.http().get(
            f"{layout.api}/{batch_id}/documents", params={"state": "waiting", "limit": "1000"},
            timeout=60).json()["documents"] if d["error_en"]
    }
    time.sleep(20)
    stalled = layout.progress(batch_id)["progress"]
    layout.start_tsa()
    back_after = time.monotonic() - down_at
    final = layout.wait(batch_id, lambda b: b["status"] == "finished", 900)
    done, twice, notes = layout.count(batch_id, len(pdfs))
    notes += [
        f"TSA down {back_after:.0f} s: {waiting['progress']['done']} done, "
        f"{waiting['progress']['waiting']} waiting when it stopped; 20 s later "
        f"{stalled['done']} done (nothing signed without a timestamp)",
        f"reasons shown: {sorted(reasons)[:1]}",
        f"finished {final['finished_at']}",
    ]
    return Outcome("tsa-down", len(pdfs), done, len(pdfs) - done, twice,
                   time.monotonic() - start, notes)


def postgres_restart(layout: Layout, pdfs: list[bytes]) -> Outcome:
    layout.start_all()
    start = time.monotonic()
    batch_id = layout.run_batch(pdfs)
    layout.wait(batch_id, lambda b: b["progress"]["done"] >= len(pdfs) // 4, 600)
    layout.postgres.stop()
    time.sleep(5)
    layout.postgres.start()
    final = layout.wait(batch_id, lambda b: b["status"] == "finished", 900)
    done, twice, notes = layout.count(batch_id, len(pdfs))
    notes.append(f"PostgreSQL down 5 s at about a quarter; finished {final['finished_at']}")
    return Outcome("postgres-restart", len(pdfs), done, len(pdfs) - done, twice,
                   time.monotonic() - start, notes)


def worker_killed(layout: Layout, pdfs: list[bytes]) -> Outcome:
    layout.start_all()
    start = time.monotonic()
    batch_id = layout.run_batch(pdfs)
    before = layout.wait(batch_id, lambda b: b["progress"]["done"] >= len(pdfs) // 4, 600)
    layout.stop("worker", signal.SIGKILL)
    at_kill = layout.progress(batch_id)["progress"]
    layout.start("worker", "worker", "--concurrency=2", "--loglevel=WARNING")
    final = layout.wait(batch_id, lambda b: b["status"] == "finished", 900)
    done, twice, notes = layout.count(batch_id, len(pdfs))
    notes.append(f"killed with {before['progress']['done']}–{at_kill.get('done')} done and "
                 f"{at_kill.get('running')} running; finished {final['finished_at']}")
    return Outcome("worker-killed", len(pdfs), done, len(pdfs) - done, twice,
                   time.monotonic() - start, notes)


def smtp_down(layout: Layout, count: int) -> Outcome:
    from aiosmtpd.controller import Controller

    import contracts

    smtp_port = _free_port()
    received: list[str] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
            from email import message_from_bytes

            received.append(str(message_from_bytes(envelope.content)["Message-ID"]))
            return "250 OK"

    engine = contracts.make_engine(layout.postgres.url)
    with contracts.session_scope(contracts.make_session_factory(engine)) as session:
        for number in range(count):
            contracts.enqueue_mail(session, to=f"party{number}@example.jp",
                                   subject=f"通知 {number}", text="本文", tag="faults")
    engine.dispose()
    start = time.monotonic()
    layout.start("worker", "worker", "--concurrency=2", "--loglevel=WARNING",
                 env={"KOIN_SMTP_URL": f"smtp://127.0.0.1:{smtp_port}"})
    time.sleep(15)  # the server is down: attempts fail and back off
    controller = Controller(Handler(), hostname="127.0.0.1", port=smtp_port)
    controller.start()
    try:
        deadline = time.monotonic() + 300
        while len(set(received)) < count and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(5)  # anything sent twice would arrive now
    finally:
        controller.stop()
    unique = len(set(received))
    return Outcome("smtp-down", count, unique, count - unique, len(received) - unique,
                   time.monotonic() - start,
                   [f"SMTP down for the first 15 s; {len(received)} messages received"])


SCENARIOS = ("worker-killed", "postgres-restart", "tsa-down", "smtp-down")


@contextmanager
def _layout(redis_url: str, *, external_tsa: bool = False) -> Iterator[Layout]:
    work = Path(tempfile.mkdtemp(prefix="koin-faults-"))
    layout = Layout(work, redis_url, external_tsa=external_tsa)
    try:
        yield layout
    finally:
        layout.close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"any of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--mails", type=int, default=50)
    parser.add_argument("--redis-url", default=os.environ.get(
        "KOIN_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--output", type=Path, default=HERE / "faults.json")
    args = parser.parse_args(argv)
    os.environ["KOIN_KEY_PASSPHRASE"] = PASSPHRASE
    chosen = args.scenarios or list(SCENARIOS)
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario {', '.join(sorted(unknown))}")
    pdfs = _permits(args.docs)
    outcomes: list[Outcome] = []
    for name in chosen:
        with _layout(args.redis_url, external_tsa=name == "tsa-down") as layout:
            if name == "smtp-down":
                outcome = smtp_down(layout, args.mails)
            else:
                runner = {"worker-killed": worker_killed, "postgres-restart": postgres_restart,
                          "tsa-down": tsa_down}[name]
                outcome = runner(layout, pdfs)
        outcomes.append(outcome)
        print(f"… {name}: lost {outcome.lost}, twice {outcome.twice}", file=sys.stderr,
              flush=True)
    print("| scenario | items | done | lost | signed/sent twice | seconds |")
    print("|---|---|---|---|---|---|")
    for o in outcomes:
        print(f"| {o.scenario} | {o.items} | {o.done} | {o.lost} | {o.twice} | {o.seconds:.0f} |")
    for o in outcomes:
        for note in o.notes:
            print(f"- {o.scenario}: {note}")
    args.output.write_text(json.dumps([asdict(o) for o in outcomes], ensure_ascii=False,
                                      indent=2) + "\n", "utf-8")
    return 0 if all(o.lost == 0 and o.twice == 0 for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The batch figure end to end, in the many-machine layout squeezed onto this one: the REST API
served by ``koin serve`` (broker configured, so it only queues), ``koin worker`` (Celery,
prefork, 2 processes) on Redis, PostgreSQL; a client uploads the permits over HTTP, starts the
batch, polls its progress and downloads the archive. The clock runs from the first upload to
the last byte of the archive."""

from __future__ import annotations

import io
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import requests

__all__ = ["E2eResult", "run_end_to_end"]

UPLOAD_GROUP = 200


@dataclass(frozen=True)
class E2eResult:
    documents: int
    signed: int
    failed: int
    in_archive: int
    seconds: float
    upload_seconds: float
    signing_seconds: float
    archive_seconds: float
    archive_mib: float


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"koin serve exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def _schema_url(admin_url: str, schema: str) -> str:
    separator = "&" if "?" in admin_url else "?"
    return f"{admin_url}{separator}options=-csearch_path%3D{schema}"


def run_end_to_end(
    home: Path, pdfs: list[bytes], *, postgres_url: str, redis_url: str, passphrase: str,
    workers: int = 2,
) -> E2eResult:
    """Sign ``pdfs`` as one batch through the HTTP API and Celery workers (see the module).

    :raises RuntimeError: a server did not start, or the batch did not finish within an hour.
    """
    from sqlalchemy import text

    import contracts
    from contracts import migrate, session_scope

    schema = f"bench_{secrets.token_hex(4)}"
    admin = contracts.make_engine(postgres_url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = _schema_url(postgres_url, schema)
    port = _free_port()
    env = {
        **os.environ, "KOIN_HOME": str(home), "KOIN_DATABASE_URL": url,
        "KOIN_BROKER_URL": redis_url, "KOIN_BATCH_QUEUE": f"bench-{schema}",
        "KOIN_KEY_PASSPHRASE": passphrase, "KOIN_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "KOIN_API_RATE": "100000", "KOIN_API_BURST": "100000", "KOIN_JOBS_INTERVAL": "0",
        "KOIN_DEV_MODE": "0", "KOIN_SMTP_URL": "smtp://127.0.0.1:9",
    }
    koin = str(Path(sys.executable).parent / "koin")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        migrate.upgrade(url)
        engine = contracts.make_engine(url)
        with session_scope(contracts.make_session_factory(engine)) as session:
            user, _ = contracts.create_user(session, "bench@pref.example.jp", ["signer"])
            _, key = contracts.create_api_key(session, user, name="bench", scopes=["sign"])
        engine.dispose()
        logs = Path(tempfile.mkdtemp(prefix="koin-bench-logs-"))
        for args in (["serve", "--no-init", "--port", str(port)],
                     ["worker", f"--concurrency={workers}", "--loglevel=WARNING"]):
            with (logs / f"{args[0]}.log").open("wb") as log:
                processes.append(subprocess.Popen(
                    [koin, *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                ))
        _wait_for_port(port, processes[0])
        time.sleep(3)  # the worker's processes load their keys
        api = f"http://127.0.0.1:{port}/api/v1/batches"
        http = requests.Session()
        http.headers["Authorization"] = f"Bearer {key}"

        start = time.perf_counter()
        created = http.post(api, json={"name": "bench"}, timeout=60)
        created.raise_for_status()
        batch_id = created.json()["id"]
        for first in range(0, len(pdfs), UPLOAD_GROUP):
            files = [("file", (f"permit-{first + i:05d}.pdf", pdf, "application/pdf"))
                     for i, pdf in enumerate(pdfs[first:first + UPLOAD_GROUP])]
            http.post(f"{api}/{batch_id}/documents", files=files, timeout=600).raise_for_status()
        http.post(f"{api}/{batch_id}/start", timeout=600).raise_for_status()
        uploaded = time.perf_counter()
        deadline = uploaded + 3600
        while True:
            body = http.get(f"{api}/{batch_id}", timeout=60).json()
            if body["status"] == "finished":
                break
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the batch did not finish: {body['progress']}")
            time.sleep(0.25)
        signed_at = time.perf_counter()
        archive = io.BytesIO()
        with http.get(f"{api}/{batch_id}/archive", stream=True, timeout=600) as response:
            response.raise_for_status()
            for chunk in response.iter_content(1 << 20):
                archive.write(chunk)
        end = time.perf_counter()
        with zipfile.ZipFile(archive) as bundle:
            in_archive = sum(1 for name in bundle.namelist() if name != "manifest.csv")
        return E2eResult(
            documents=len(pdfs), signed=body["progress"]["done"],
            failed=body["progress"]["failed"], in_archive=in_archive,
            seconds=end - start, upload_seconds=uploaded - start,
            signing_seconds=signed_at - uploaded, archive_seconds=end - signed_at,
            archive_mib=archive.tell() / 2**20,
        )
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()

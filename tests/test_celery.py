"""Batches signed by real Celery workers (``koin worker``) on Redis with PostgreSQL: a batch of
1,000 permits through the API, and a worker killed with SIGKILL mid-batch and replaced — every
document ends signed exactly once.

Redis must run on 127.0.0.1:6379 (``KOIN_TEST_REDIS_URL``); the tests fail, never skip, when it
does not. Each test uses a queue of its own, so that concurrent test runs do not share tasks.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import x509 as asn1_x509
from flask import Flask
from flask.testing import FlaskClient
from pyhanko.pdf_utils.reader import PdfFileReader
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import encode_multipart

import contracts
from contracts import BatchDocument, DocumentState, SignedDocument, session_scope
from signer import Installation
from signer.samples import make_permit_pdf
from tests.conftest import PUBLIC_URL
from tests.permits import numbered_copies
from tests.validators import pdfsig, pyhanko_status
from web import create_app, services

pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@pytest.fixture
def home(koin_home: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home)
    for leftover in home.glob("koin.db*"):
        leftover.unlink()
    return home


@pytest.fixture
def worker_env(home: Path, db_url: str, redis_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "KOIN_HOME": str(home),
        "KOIN_DATABASE_URL": db_url,
        "KOIN_BROKER_URL": redis_url,
        "KOIN_BATCH_QUEUE": f"koin-test-{secrets.token_hex(4)}",
        "KOIN_PUBLIC_URL": PUBLIC_URL,
        # short enough that a killed worker's documents are taken over within the test
        "KOIN_BATCH_LEASE": "10",
        "KOIN_BATCH_REQUEUE": "5",
        "KOIN_RECONCILE_INTERVAL": "2",
    }


@pytest.fixture
def app(home: Path, engine: Engine, worker_env: dict[str, str]) -> Iterator[Flask]:
    app = create_app({
        "KOIN_HOME": str(home), "TESTING": True,
        "KOIN_DATABASE_URL": worker_env["KOIN_DATABASE_URL"],
        "KOIN_BROKER_URL": worker_env["KOIN_BROKER_URL"],
        "KOIN_BATCH_QUEUE": worker_env["KOIN_BATCH_QUEUE"],
        "KOIN_BATCH_LEASE": 10.0, "KOIN_BATCH_REQUEUE": 5.0, "KOIN_RECONCILE_INTERVAL": 2.0,
        "KOIN_PUBLIC_URL": PUBLIC_URL, "KOIN_API_RATE": 1000, "KOIN_API_BURST": 1000,
    })
    yield app
    services.close(app)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def key(sessions: sessionmaker[Session]) -> str:
    with session_scope(sessions) as session:
        user, _ = contracts.create_user(session, "hisho@pref.ibaraki.example", ["signer"])
        _, raw = contracts.create_api_key(session, user, name="rpa", scopes=["sign"])
    return raw


@pytest.fixture(scope="module")
def permit(installation: Installation) -> bytes:
    return make_permit_pdf(installation.font_file, number=1)


@contextmanager
def koin_worker(env: dict[str, str], concurrency: int = 2) -> Iterator[subprocess.Popen[bytes]]:
    """``koin worker`` in a process group of its own (so that it can be killed whole)."""
    koin = Path(sys.executable).parent / "koin"
    log = Path(env["KOIN_HOME"]) / f"worker-{secrets.token_hex(3)}.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [str(koin), "worker", f"--concurrency={concurrency}", "--loglevel=WARNING"],
            env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _start_batch(client: FlaskClient, key: str, pdfs: list[bytes]) -> str:
    batch_id: str = client.post(
        "/api/v1/batches", json={"name": "Celery"}, headers=_auth(key)
    ).get_json()["id"]
    for first in range(0, len(pdfs), 100):
        # encoded in memory: the test client would spool a large body to a file it never closes
        boundary, body = encode_multipart(MultiDict(
            ("file", FileStorage(io.BytesIO(pdf), f"permit-{first + i + 1:05d}.pdf",
                                 content_type="application/pdf"))
            for i, pdf in enumerate(pdfs[first:first + 100])
        ))
        response = client.post(
            f"/api/v1/batches/{batch_id}/documents", data=body,
            content_type=f"multipart/form-data; boundary={boundary}", headers=_auth(key),
        )
        assert response.status_code == 201, response.get_json()
    started = client.post(f"/api/v1/batches/{batch_id}/start", headers=_auth(key))
    assert started.status_code == 202, started.get_json()
    return batch_id


def _counts(sessions: sessionmaker[Session]) -> dict[str, int]:
    with session_scope(sessions) as session:
        rows = session.execute(
            select(BatchDocument.state, func.count()).group_by(BatchDocument.state)
        ).all()
    return {state: int(count) for state, count in rows}


def _wait(sessions: sessionmaker[Session], done: int, worker: subprocess.Popen[bytes],
          timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = _counts(sessions)
        if counts.get(DocumentState.DONE.value, 0) >= done:
            return counts
        assert worker.poll() is None, f"the worker exited with {worker.returncode}"
        assert time.monotonic() < deadline, f"only {counts} after {timeout} s"
        time.sleep(0.5)


def _signature_count(path: Path) -> int:
    with path.open("rb") as handle:
        return len(PdfFileReader(handle, strict=False).embedded_signatures)


def _check_signed_exactly_once(
    sessions: sessionmaker[Session], home: Path, batch_id: str, total: int
) -> list[Path]:
    with session_scope(sessions) as session:
        batch = contracts.require_batch(session, batch_id)
        documents = contracts.list_documents(session, batch)
        records = session.scalars(select(SignedDocument)).all()
        assert batch.status == "finished"
    assert len(documents) == total
    assert {d.state for d in documents} == {"done"}
    # one record per document, and the same document IDs
    assert len(records) == total
    assert {r.document_id for r in records} == {d.document_id for d in documents}
    outputs = [home / d.output_path for d in documents if d.output_path]
    assert len(outputs) == total
    out_dir = outputs[0].parent
    assert sorted(out_dir.glob("*.pdf")) == sorted(outputs)  # nothing signed on the side
    with ProcessPoolExecutor(2) as pool:
        counts = list(pool.map(_signature_count, outputs, chunksize=50))
    assert counts == [1] * total
    digests = {r.document_id: r.sha256 for r in records}
    import hashlib

    for document, path in zip(documents, outputs, strict=True):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == document.output_sha256
        assert digests[document.document_id] == document.output_sha256
    return outputs


def _valid(args: tuple[Path, Path]) -> bool:
    path, root_pem = args
    from keys import load_certificates

    root = load_certificates([root_pem])[0]
    status = pyhanko_status(path.read_bytes(), root)
    return bool(status.bottom_line and status.timestamp_validity is not None)


@pytest.mark.slow
def test_thousand_permits_through_the_api_and_a_celery_worker(
    client: FlaskClient, key: str, worker_env: dict[str, str], sessions: sessionmaker[Session],
    home: Path, permit: bytes, root_pem: Path, nss_db: Path, root_cert: asn1_x509.Certificate,
) -> None:
    total = 1000
    batch_id = _start_batch(client, key, list(numbered_copies(permit, total)))
    with koin_worker(worker_env) as worker:
        _wait(sessions, total, worker, timeout=900)
        deadline = time.monotonic() + 30
        while client.get(f"/api/v1/batches/{batch_id}", headers=_auth(key)).get_json()[
                "status"] != "finished":
            assert time.monotonic() < deadline
            time.sleep(0.5)
    outputs = _check_signed_exactly_once(sessions, home, batch_id, total)
    with ProcessPoolExecutor(2) as pool:
        verdicts = list(pool.map(_valid, [(p, root_pem) for p in outputs], chunksize=25))
    assert all(verdicts), [p.name for p, ok in zip(outputs, verdicts, strict=True) if not ok]
    for path in outputs[:: total // 4]:
        report = pdfsig(path, nss_db)
        assert "Signature is Valid." in report and "Certificate is Trusted." in report, report
    archive = client.get(f"/api/v1/batches/{batch_id}/archive", headers=_auth(key))
    assert archive.status_code == 200 and archive.headers["X-Koin-Batch-Complete"] == "true"
    import zipfile

    with zipfile.ZipFile(io.BytesIO(archive.get_data())) as bundle:
        assert len(bundle.namelist()) == total + 1


@pytest.mark.slow
def test_worker_killed_mid_batch_and_replaced_signs_each_document_once(
    client: FlaskClient, key: str, worker_env: dict[str, str], sessions: sessionmaker[Session],
    home: Path, permit: bytes, root_cert: asn1_x509.Certificate,
) -> None:
    total = 120
    batch_id = _start_batch(client, key, list(numbered_copies(permit, total)))
    with koin_worker(worker_env) as first:
        before = _wait(sessions, total // 5, first, timeout=300)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    at_kill = _counts(sessions)
    assert at_kill.get("done", 0) < total, "the batch finished before the kill"
    assert before.get("done", 0) >= total // 5
    with koin_worker(worker_env) as second:
        _wait(sessions, total, second, timeout=600)
        # the worker marks the batch finished just after committing its last documents: wait
        # for that before stopping it (stopped in between, the batch would wait for the next
        # worker's reconciler, as after a crash)
        deadline = time.monotonic() + 30
        while _counts(sessions) != {"done": total} or client.get(
                f"/api/v1/batches/{batch_id}", headers=_auth(key)
        ).get_json()["status"] != "finished":
            assert time.monotonic() < deadline, _counts(sessions)
            time.sleep(0.5)
    outputs = _check_signed_exactly_once(sessions, home, batch_id, total)
    for path in outputs[:: total // 6]:
        assert pyhanko_status(path.read_bytes(), root_cert).bottom_line


@pytest.mark.slow
def test_the_scheduler_runs_mail_webhooks_and_long_term_renewal_in_the_worker(
    client: FlaskClient, key: str, worker_env: dict[str, str], sessions: sessionmaker[Session],
    home: Path, permit: bytes,
) -> None:
    """The many-machine layout: no thread in the web tier; the worker's scheduler sends the
    outbox to SMTP, delivers webhooks and keeps stored files at B-LTA."""
    from contracts.lta import LtaFile
    from contracts.webhooks import create_endpoint
    from tests.servers import smtp_collector, wsgi_server

    received: list[bytes] = []

    def receiver(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        received.append(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
        start_response("204 No Content", [])
        return [b""]

    with smtp_collector() as (smtp_url, mail), wsgi_server(receiver) as hook_url:
        with session_scope(sessions) as session:
            contracts.enqueue_mail(
                session, to="kanri@pref.ibaraki.example", subject="一括署名のお知らせ",
                text="本文", tag="test",
            )
            create_endpoint(session, hook_url, events=["batch.finished"])
        batch_id = _start_batch(client, key, list(numbered_copies(permit, 3)))
        env = {**worker_env, "KOIN_SMTP_URL": smtp_url, "KOIN_MAIL_INTERVAL": "1",
               "KOIN_WEBHOOKS_INTERVAL": "1", "KOIN_LTA_INTERVAL": "2"}
        with koin_worker(env) as worker:
            _wait(sessions, 3, worker, timeout=300)
            [message] = mail.wait_for(lambda m: "一括署名" in str(m["Subject"]), timeout=60)
            deadline = time.monotonic() + 120
            while not received or not _all_lta(sessions, LtaFile, 3):
                assert worker.poll() is None
                assert time.monotonic() < deadline, (received, _counts(sessions))
                time.sleep(0.5)
    [event] = [json.loads(body) for body in received]
    assert event["type"] == "batch.finished" and event["data"]["batch_id"] == batch_id
    assert str(message["To"]) == "kanri@pref.ibaraki.example"


def _all_lta(sessions: sessionmaker[Session], model: Any, count: int) -> bool:
    """Whether ``count`` stored files have been renewed (brought to B-LTA) at least once."""
    with sessions() as session:
        rows = session.scalars(select(model)).all()
        return len(rows) >= count and all(r.renewals >= 1 for r in rows)


def _scrape(url: str, token: str | None = None) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_worker_metrics_count_the_signatures_of_all_its_processes(
    client: FlaskClient, key: str, worker_env: dict[str, str], sessions: sessionmaker[Session],
    permit: bytes, tmp_path: Path,
) -> None:
    """Batch signatures are made in the worker's prefork processes: `koin worker
    --metrics-port` serves their sum, so that koin_documents_signed_total holds them."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.servers import free_port, wait_for_port

    folder = tmp_path / "worker-metrics"
    folder.mkdir()
    (folder / "counter_999999.db").write_bytes(b"left from an earlier run")
    port, token, total = free_port(), secrets.token_urlsafe(16), 6
    env = {**worker_env, "PROMETHEUS_MULTIPROC_DIR": str(folder),
           "KOIN_WORKER_METRICS_PORT": str(port), "KOIN_METRICS_TOKEN": token}
    batch_id = _start_batch(client, key, list(numbered_copies(permit, total)))
    with koin_worker(env) as worker:
        wait_for_port(port, worker, timeout=60)
        _wait(sessions, total, worker, timeout=300)
        url = f"http://127.0.0.1:{port}/metrics"
        assert _scrape(url)[0] == 401
        assert _scrape(url, "not-" + token)[0] == 401
        status, text = _scrape(url, token)
    assert status == 200, text
    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }
    signed = values[("koin_documents_signed_total", (("level", "B-T"), ("role", "position")))]
    assert signed == total, (batch_id, values)
    assert values[("koin_signing_seconds_count", (("role", "position"),))] == total
    assert not (folder / "counter_999999.db").exists()  # the earlier run's values are gone
    assert len(list(folder.glob("counter_*.db"))) >= 1


def test_worker_metrics_need_a_folder_of_their_own(worker_env: dict[str, str]) -> None:
    env = {k: v for k, v in worker_env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    koin = Path(sys.executable).parent / "koin"
    done = subprocess.run([str(koin), "worker", "--metrics-port", "9"],
                          env={**env, "KOIN_LANG": "en"}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "--metrics-port needs PROMETHEUS_MULTIPROC_DIR" in done.stderr, done.stderr

"""Every file of the hostile corpus (``tests/corpus.py``) through every public path: ``koin
sign`` and ``koin verify`` on the command line, ``POST /api/v1/verify``, the verify page,
``POST /api/v1/sign`` and a batch through the REST API with the in-process worker.

What each path must do with a bad file: a clean refusal with a reason (exit 1 or 2 with one
line on stderr; a 4xx JSON or HTML answer; a failed batch document with its error) or a
verdict that is not PASSED — never a traceback, a 500, a hang or a file left behind. The
corpus lists, per file, whether signing refuses it and whether verification can read it.

The command lines run in forked copies of one process that imported the CLI once
(``tests/cli_fork.py``): 112 real processes with their own exit codes and output, without
1.5 s of imports each. A few files also go through the installed ``koin`` executable.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import EnvironBuilder, TestResponse

import contracts
from contracts import BatchWorker, create_api_key, create_user, session_scope
from contracts.migrate import upgrade
from signer import Installation, SignatureLevel, SignOptions, sign_pdf, verify_pdf
from tests.cli_fork import CliJob, run_jobs
from tests.conftest import PUBLIC_URL
from tests.corpus import (
    NAMES,
    BadPdf,
    build_corpus,
    minimal_pdf,
    one_page_objects,
    page_object,
    raw_pdf,
)
from web import create_app, services

#: Rate limits out of the way: the corpus is posted from one address in quick succession.
NO_LIMITS = {"KOIN_API_RATE": 1000, "KOIN_API_BURST": 1000, "KOIN_RATE_LIMITS": {
    "verify_ip": (1000.0, 1000), "login_ip": (1000.0, 1000), "login_account": (1000.0, 1000),
    "code_ip": (1000.0, 1000), "code_link": (1000.0, 1000),
}}


@pytest.fixture(scope="module")
def home(koin_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("hostile") / "home"
    shutil.copytree(koin_home, home)
    for leftover in home.glob("koin.db*"):
        leftover.unlink()
    upgrade(contracts.database_url(home))  # as `koin serve` and `koin sign` do
    return home


@pytest.fixture(scope="module")
def corpus(installation: Installation, permit_pdf: bytes) -> dict[str, BadPdf]:
    return {item.name: item for item in build_corpus(installation, permit_pdf)}


@pytest.fixture(scope="module")
def corpus_dir(corpus: dict[str, BadPdf], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for item in corpus.values():
        (folder / f"{item.name}.pdf").write_bytes(item.data)
    return folder


def _environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOIN_")}
    env.update(KOIN_HOME=str(home), KOIN_PUBLIC_URL=PUBLIC_URL)
    return env


@dataclass(frozen=True)
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    output: Path


@pytest.fixture(scope="module")
def cli_runs(home: Path, corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[tuple[str, str], CliRun]:
    """``koin sign FILE OUT`` and ``koin verify FILE`` for every corpus file."""
    work = tmp_path_factory.mktemp("cli")
    env = _environment(home)
    jobs: list[tuple[tuple[str, str], CliJob, Path]] = []
    for name in NAMES:
        source = corpus_dir / f"{name}.pdf"
        out = work / f"{name}-signed.pdf"
        for command, argv in (("sign", ["sign", str(source), str(out)]),
                              ("verify", ["verify", str(source)])):
            job = CliJob(argv, env, work, work / f"{name}.{command}.out",
                         work / f"{name}.{command}.err", timeout=90)
            jobs.append(((name, command), job, out))
    results = run_jobs([job for _, job, _ in jobs], parallel=2)
    runs = {}
    for (key, job, out), result in zip(jobs, results, strict=True):
        runs[key] = CliRun(result["returncode"], job.stdout.read_text("utf-8"),
                           job.stderr.read_text("utf-8"), out)
    return runs


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text and "internal error" not in text, text


@pytest.mark.parametrize("name", NAMES)
def test_koin_sign(name: str, corpus: dict[str, BadPdf], cli_runs: dict[Any, CliRun],
                   installation: Installation) -> None:
    item, run = corpus[name], cli_runs[name, "sign"]
    _no_traceback(run.stderr)
    if item.sign == "refused":
        assert run.returncode == 1, (run.stdout, run.stderr)
        lines = run.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("koin: ") and len(lines[0]) > 12, lines
        assert not run.output.exists(), "nothing may be written"
        assert not list(run.output.parent.glob(f".{run.output.name}*")), "no temporary file"
    else:
        assert run.returncode == 0, run.stderr
        assert verify_pdf(run.output, installation.verify_policy()).passed, item.note


@pytest.mark.parametrize("name", NAMES)
def test_koin_verify(name: str, corpus: dict[str, BadPdf], cli_runs: dict[Any, CliRun]) -> None:
    item, run = corpus[name], cli_runs[name, "verify"]
    _no_traceback(run.stderr)
    if item.verify == "refused":
        assert run.returncode == 2, (run.stdout, run.stderr)
        assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith("koin: ")
        assert run.stdout == ""
    else:
        assert run.returncode == 1, (run.stdout, run.stderr)
        assert run.stdout.startswith(("FAILED: ", "INDETERMINATE: ")), run.stdout
        assert run.stderr == ""


@pytest.mark.parametrize("name", ["empty", "page-is-its-own-parent", "sig-shadow-hide"])
def test_installed_koin_executable(name: str, corpus: dict[str, BadPdf], corpus_dir: Path,
                                   home: Path, tmp_path: Path,
                                   cli_runs: dict[Any, CliRun]) -> None:
    """The executable on PATH answers exactly as the forked command lines did."""
    koin = Path(sys.executable).parent / "koin"
    out = tmp_path / "out.pdf"
    for command, argv in (("sign", ["sign", str(corpus_dir / f"{name}.pdf"), str(out)]),
                          ("verify", ["verify", str(corpus_dir / f"{name}.pdf")])):
        done = subprocess.run([str(koin), *argv], env=_environment(home), capture_output=True,
                              text=True, timeout=120, check=False)
        forked = cli_runs[name, command]
        assert (done.returncode, done.stderr) == (forked.returncode, forked.stderr)
        assert not out.exists()


def _nested_tree() -> bytes:
    """Two levels of page tree nodes, the MediaBox inherited from the root node."""
    inherited = page_object().replace(b"/MediaBox [0 0 595 842] ", b"")
    return raw_pdf({
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [6 0 R 3 0 R] /Count 3 /MediaBox [0 0 595 842] >>",
        3: inherited,
        4: b"<< /Length 2 >>\nstream\nq \nendstream",
        5: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        6: b"<< /Type /Pages /Parent 2 0 R /Kids [7 0 R 8 0 R] /Count 2 >>",
        7: inherited.replace(b"/Parent 2 0 R", b"/Parent 6 0 R"),
        8: inherited.replace(b"/Parent 2 0 R", b"/Parent 6 0 R"),
    })


@pytest.mark.parametrize("quirk", ["minimal", "no-parent", "root-without-type", "nested"])
def test_well_formed_and_tolerated_page_trees_are_signed(
    quirk: str, installation: Installation
) -> None:
    """The page tree checks refuse what is broken, not what is merely unusual."""
    data = {
        "minimal": minimal_pdf(),
        "no-parent": raw_pdf(one_page_objects(o3=page_object().replace(b"/Parent 2 0 R ", b""))),
        "root-without-type": raw_pdf(one_page_objects(o2=b"<< /Kids [3 0 R] /Count 1 >>")),
        "nested": _nested_tree(),
    }[quirk]
    result = sign_pdf(data, installation.signing_context(), SignOptions(level=SignatureLevel.B_B))
    assert result.data is not None and result.page == (3 if quirk == "nested" else 1)
    assert verify_pdf(result.data, installation.verify_policy()).passed


# -- the web: verify API, verify page, sign API ------------------------------------------------


@pytest.fixture(scope="module")
def app(home: Path) -> Iterator[Flask]:
    app = create_app({"KOIN_HOME": str(home), "TESTING": True, "KOIN_PUBLIC_URL": PUBLIC_URL,
                      **NO_LIMITS})
    yield app
    services.close(app)


@pytest.fixture(scope="module")
def sign_key(app: Flask) -> str:
    with app.app_context(), session_scope(services.session_factory()) as session:
        user, _ = create_user(session, "hostile@pref.ibaraki.example", ["signer"])
        _, raw = create_api_key(session, user, name="hostile corpus", scopes=["sign"])
    return raw


def _post_file(client: FlaskClient, path: str, data: bytes, **kwargs: Any) -> TestResponse:
    """POST ``data`` as multipart field ``file``, closing the spooled body afterwards
    (werkzeug's test client leaves bodies over 500 KB in a temporary file otherwise)."""
    builder = EnvironBuilder(path=path, method="POST",
                             data={"file": (io.BytesIO(data), "upload.pdf")}, **kwargs)
    environ = builder.get_environ()
    try:
        return client.open(environ)
    finally:
        environ["wsgi.input"].close()


def _error(response: TestResponse) -> dict[str, str]:
    assert response.mimetype == "application/json", response.data[:200]
    error: dict[str, str] = response.get_json()["error"]
    assert error["code"] and error["message"] and error["message_en"], error
    return error


@pytest.mark.parametrize("name", NAMES)
def test_verify_api(name: str, corpus: dict[str, BadPdf], app: Flask) -> None:
    item = corpus[name]
    response = app.test_client().post(
        "/api/v1/verify", data=item.data, content_type="application/pdf"
    )
    if item.verify == "refused":
        assert 400 <= response.status_code < 500, response.data[:300]
        assert _error(response)["code"] != "verifier_error"
    else:
        assert response.status_code == 200, response.data[:300]
        report = response.get_json()
        assert report["indication"] in ("FAILED", "INDETERMINATE"), report
        assert report["summary_ja"] and report["summary_en"]


@pytest.mark.parametrize("name", NAMES)
def test_verify_page(name: str, corpus: dict[str, BadPdf], app: Flask) -> None:
    item = corpus[name]
    response = _post_file(app.test_client(), "/verify?lang=en", item.data)
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    if item.verify == "refused":
        assert 400 <= response.status_code < 500, page[:300]
        assert 'id="error"' in page
    else:
        assert response.status_code == 200
        assert 'id="verdict"' in page and 'data-indication="PASSED"' not in page
    assert "Traceback" not in page


@pytest.mark.parametrize("name", NAMES)
def test_sign_api(name: str, corpus: dict[str, BadPdf], app: Flask, sign_key: str,
                  installation: Installation) -> None:
    item = corpus[name]
    response = app.test_client().post(
        "/api/v1/sign?level=B-B", data=item.data, content_type="application/pdf",
        headers={"Authorization": f"Bearer {sign_key}"},
    )
    if item.sign == "refused":
        assert 400 <= response.status_code < 500, response.data[:300]
        assert _error(response)["code"] in (
            "invalid_pdf", "encrypted", "unsignable", "placement", "not_pdf", "empty"
        )
    else:
        assert response.status_code == 200 and response.mimetype == "application/pdf"
        assert verify_pdf(response.get_data(), installation.verify_policy()).passed


# -- batches ----------------------------------------------------------------------------------


@pytest.fixture
def batch_app(home: Path, tmp_path: Path, db_url: str, engine: Engine) -> Iterator[Flask]:
    batch_home = tmp_path / "home"
    shutil.copytree(home, batch_home, ignore=shutil.ignore_patterns("koin.db*"))
    app = create_app({"KOIN_HOME": str(batch_home), "TESTING": True, "KOIN_DATABASE_URL": db_url,
                      "KOIN_PUBLIC_URL": PUBLIC_URL, **NO_LIMITS})
    yield app
    services.close(app)


@pytest.fixture
def batch_worker(batch_app: Flask) -> Iterator[BatchWorker]:
    with batch_app.app_context():
        worker = BatchWorker(
            services.session_factory(),
            Installation(Path(batch_app.config["KOIN_HOME"]), public_url=PUBLIC_URL),
            threads=2, interval=30, public_url=PUBLIC_URL,
        )
        services.attach_batch_worker(worker)
    worker.start()
    yield worker
    worker.stop()


def test_batch_fails_each_bad_file_alone(
    batch_app: Flask, batch_worker: BatchWorker, sessions: sessionmaker[Session],
    corpus: dict[str, BadPdf], one_page_permit: bytes, installation: Installation,
) -> None:
    with session_scope(sessions) as session:
        user, _ = create_user(session, "batch-hostile@pref.ibaraki.example", ["signer"])
        _, key = create_api_key(session, user, name="batch", scopes=["sign"])
    auth = {"Authorization": f"Bearer {key}"}
    client = batch_app.test_client()
    batch_id = client.post("/api/v1/batches", json={"name": "hostile"}, headers=auth).get_json()[
        "id"]
    refused_at_upload: dict[str, str] = {}
    for name in [*NAMES[:20], "good", *NAMES[20:]]:
        data = one_page_permit if name == "good" else corpus[name].data
        added = client.post(f"/api/v1/batches/{batch_id}/documents?name={name}.pdf", data=data,
                            content_type="application/pdf", headers=auth)
        if added.status_code != 201:
            assert 400 <= added.status_code < 500, (name, added.data[:300])
            refused_at_upload[name] = _error(added)["code"]
    assert set(refused_at_upload) <= {"empty"}, refused_at_upload  # only an empty body
    started = client.post(f"/api/v1/batches/{batch_id}/start", headers=auth)
    assert started.status_code == 202, started.get_json()
    deadline = time.monotonic() + 240
    while (status := client.get(f"/api/v1/batches/{batch_id}", headers=auth).get_json())[
            "status"] != "finished":
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    listed = client.get(f"/api/v1/batches/{batch_id}/documents?limit=200",
                        headers=auth).get_json()["documents"]
    by_name = {d["file_name"].removesuffix(".pdf"): d for d in listed}
    expected_signed = {"good"} | {n for n in NAMES if corpus[n].sign == "signed"}
    assert set(by_name) == {"good", *NAMES} - set(refused_at_upload)
    for name, document in by_name.items():
        if name in expected_signed:
            assert document["state"] == "done", document
            with client.get(document["download"], headers=auth) as signed:
                assert verify_pdf(signed.get_data(), installation.verify_policy()).passed
        else:
            assert document["state"] == "failed", document
            assert document["error"] and document["error_en"] and document["download"] is None
            assert "internal" not in document["error_en"].lower()
    assert status["progress"]["done"] == len(expected_signed)
    assert status["progress"]["failed"] == len(by_name) - len(expected_signed)

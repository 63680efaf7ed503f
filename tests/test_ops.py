"""Running it for real: ``/readyz`` against real parts that stop and come back (a private
PostgreSQL cluster, a private ``redis-server``, a ``koin tsa serve`` process), ``/metrics``
counting a real signature (also summed over two gunicorn workers), JSON log lines carrying the
request ID of a real ``koin serve``, and the admin status page."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY
from prometheus_client.mmap_dict import MmapedDict
from sqlalchemy.orm import Session, sessionmaker

from contracts import (
    CompletionOutcome,
    add_document,
    claim_documents,
    complete_contract,
    create_api_key,
    create_batch,
    create_user,
    make_engine,
    make_session_factory,
    session_scope,
    sign_document,
    start_batch,
    utcnow,
)
from contracts.accounts import User
from contracts.migrate import upgrade
from contracts.operations import operation_figures
from keys import Role
from signer import Installation
from tests.conftest import PUBLIC_URL
from tests.pg_cluster import PrivateCluster
from tests.servers import closed_port_url, free_port, koin_process, wait_for_port
from tests.test_workflow import _all_consent, _create
from web import create_app, services
from web.health import CHECKS

SECRET = "test-secret-key-0123456789abcdef-not-for-production"
PASSWORD = "correct horse battery staple"
ADMIN = "kanri@pref.ibaraki.example"
SIGNER = "hisho@pref.ibaraki.example"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_NO_CACHE = {"keystore": 0, "tsa": 0}
BIN = Path(sys.executable).parent


def _app(home: Path, **config: Any) -> Flask:
    return create_app({"KOIN_HOME": str(home), "KOIN_PUBLIC_URL": PUBLIC_URL,
                       "SECRET_KEY": SECRET, "TESTING": True, **config})


def _ready(client: FlaskClient) -> tuple[int, dict[str, Any]]:
    response = client.get("/readyz")
    body = response.get_json()
    assert isinstance(body, dict)
    return response.status_code, body


def _assert_shape(body: dict[str, Any]) -> None:
    assert set(body) == {"status", "checks", "failing"}
    assert body["status"] in ("ok", "fail")
    assert set(body["checks"]) == set(CHECKS)
    for check in body["checks"].values():
        assert set(check) == {"ok", "detail"}
        assert isinstance(check["ok"], bool) and isinstance(check["detail"], str)
    assert body["failing"] == [n for n in CHECKS if not body["checks"][n]["ok"]]
    assert (body["status"] == "ok") == (body["failing"] == [])


def _wait_ready(client: FlaskClient, *, want: int, timeout: float = 30) -> dict[str, Any]:
    """``/readyz`` until it answers ``want`` (a restarted server takes a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = _ready(client)
        if status == want or time.monotonic() > deadline:
            assert status == want, body
            _assert_shape(body)
            return body
        time.sleep(0.3)


@pytest.fixture
def disposable(tmp_path: Path) -> Iterator[list[Flask]]:
    """Apps to close (their connection pools) when the test ends."""
    apps: list[Flask] = []
    yield apps
    for app in apps:
        services.close(app)


# -- /healthz and /readyz -----------------------------------------------------------------------


def test_healthz_and_readyz_green_on_a_normal_app(
    koin_home: Path, db_url: str, disposable: list[Flask]
) -> None:
    app = _app(koin_home, KOIN_DATABASE_URL=db_url)
    disposable.append(app)
    client = app.test_client()
    assert client.get("/healthz").get_json() == {"status": "ok"}
    status, body = _ready(client)
    assert status == 200, body
    _assert_shape(body)
    checks = body["checks"]
    assert body == {"status": "ok", "checks": checks, "failing": []}
    assert checks["broker"]["detail"].startswith("in-process executor")
    assert checks["keystore"]["detail"] == "position, witness keys load"
    assert checks["tsa"]["detail"].startswith("embedded TSA: valid token")
    assert "SELECT 1" in checks["database"]["detail"]
    # A second call within the cache time reuses the key store and TSA results.
    assert _ready(client)[1]["checks"]["tsa"] == checks["tsa"]


def test_readyz_names_the_database_while_postgresql_is_stopped(
    koin_home: Path, tmp_path: Path, disposable: list[Flask]
) -> None:
    cluster = PrivateCluster(tmp_path / "pg")
    try:
        app = _app(koin_home, KOIN_DATABASE_URL=cluster.url, KOIN_READYZ_CACHE=_NO_CACHE)
        disposable.append(app)
        client = app.test_client()
        green = _wait_ready(client, want=200)
        assert f"127.0.0.1:{cluster.port}/koin" in green["checks"]["database"]["detail"]

        cluster.stop()
        red = _wait_ready(client, want=503)
        assert red["status"] == "fail" and red["failing"] == ["database"]
        assert red["checks"]["database"]["ok"] is False
        assert str(cluster.port) in red["checks"]["database"]["detail"]

        cluster.start()
        again = _wait_ready(client, want=200)
        assert again["failing"] == [] and again["checks"]["database"]["ok"] is True
    finally:
        cluster.close()


def _redis(port: int, password: str, folder: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--requirepass", password, "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process)  # type: ignore[arg-type]
    return process


def test_readyz_names_the_broker_while_redis_is_down_and_shows_no_password(
    koin_home: Path, tmp_path: Path, disposable: list[Flask]
) -> None:
    port, password = free_port(), "broker-" + secrets.token_hex(8)
    redis = _redis(port, password, tmp_path)
    try:
        app = _app(koin_home, KOIN_DATABASE_URL=f"sqlite:///{tmp_path}/koin.db",
                   KOIN_BROKER_URL=f"redis://:{password}@127.0.0.1:{port}/0",
                   KOIN_READYZ_CACHE=_NO_CACHE)
        disposable.append(app)
        client = app.test_client()
        green = _wait_ready(client, want=200)
        assert green["checks"]["broker"]["detail"].startswith(f"redis://127.0.0.1:{port}/0: PING")

        redis.send_signal(signal.SIGKILL)
        redis.wait()
        red = _wait_ready(client, want=503)
        assert red["failing"] == ["broker"]
        assert f"127.0.0.1:{port}" in red["checks"]["broker"]["detail"]

        redis = _redis(port, password, tmp_path)
        _wait_ready(client, want=200)

        # A wrong password is a failing broker too, and no password shows in the answer.
        wrong = _app(koin_home, KOIN_DATABASE_URL=f"sqlite:///{tmp_path}/koin.db",
                     KOIN_BROKER_URL=f"redis://:not-{password}@127.0.0.1:{port}/0")
        disposable.append(wrong)
        response = wrong.test_client().get("/readyz")
        assert response.status_code == 503 and response.get_json()["failing"] == ["broker"]
        for answer in (response, client.get("/readyz")):
            assert password not in answer.get_data(as_text=True)
    finally:
        redis.kill()
        redis.wait()


def test_readyz_names_the_tsa_while_koin_tsa_serve_is_stopped(
    koin_home: Path, tmp_path: Path, disposable: list[Flask]
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    app = _app(koin_home, KOIN_DATABASE_URL=f"sqlite:///{tmp_path}/koin.db",
               KOIN_TSA_URLS=[url], KOIN_READYZ_CACHE=_NO_CACHE)
    disposable.append(app)
    client = app.test_client()
    with koin_process(koin_home, "tsa", "serve", "--port", str(port), port=port):
        green = _wait_ready(client, want=200)
        assert green["checks"]["tsa"]["detail"].startswith(f"{url}: valid token in ")
    red = _wait_ready(client, want=503)
    assert red["failing"] == ["tsa"]
    assert red["checks"]["tsa"]["detail"].startswith(f"{url}: cannot connect")
    with koin_process(koin_home, "tsa", "serve", "--port", str(port), port=port):
        _wait_ready(client, want=200)


def test_tsa_that_is_not_ours_fails_the_check(
    koin_home: Path, tmp_path: Path, disposable: list[Flask]
) -> None:
    """An HTTP server that answers, but not with a token from a TSA we trust, is no TSA."""
    other = tmp_path / "other-home"
    other.mkdir()
    (other / "keys").mkdir()
    shutil.copy(koin_home / "keys" / "passphrase", other / "keys" / "passphrase")
    Installation(other, public_url=PUBLIC_URL).initialize()  # another demo PKI
    port = free_port()
    app = _app(koin_home, KOIN_DATABASE_URL=f"sqlite:///{tmp_path}/koin.db",
               KOIN_TSA_URLS=[f"http://127.0.0.1:{port}/"], KOIN_READYZ_CACHE=_NO_CACHE)
    disposable.append(app)
    with koin_process(other, "tsa", "serve", "--port", str(port), port=port):
        body = _wait_ready(app.test_client(), want=503)
    assert body["failing"] == ["tsa"]
    assert "trusted root" in body["checks"]["tsa"]["detail"]


def test_a_key_store_that_cannot_open_fails_the_check(
    koin_home: Path, tmp_path: Path, disposable: list[Flask]
) -> None:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home, ignore=shutil.ignore_patterns("*.db", "*.log"))
    app = _app(home, KOIN_DATABASE_URL=f"sqlite:///{tmp_path}/koin.db",
               KOIN_READYZ_CACHE=_NO_CACHE)
    disposable.append(app)
    client = app.test_client()
    _wait_ready(client, want=200)
    (home / "keys" / "passphrase").write_text("a wrong passphrase\n")
    body = _wait_ready(client, want=503)
    assert "keystore" in body["failing"]
    assert "a wrong passphrase" not in json.dumps(body)


# -- /metrics -----------------------------------------------------------------------------------


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition ``text`` (0 if absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        sample_name, _, rest = sample.partition("{")
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if sample_name == name and got == wanted:
            total += float(value)
    return total


def _people(sessions: sessionmaker[Session]) -> dict[str, User]:
    users = {}
    with session_scope(sessions) as session:
        for email, roles in ((ADMIN, ["admin"]), (SIGNER, ["signer"])):
            user, _ = create_user(session, email, roles, password=PASSWORD,
                                  display_name="試験 利用者")
            users[email] = user
    return users


def _api_key(sessions: sessionmaker[Session], user: User) -> str:
    with session_scope(sessions) as session:
        _, raw = create_api_key(session, session.get_one(User, user.id), name="metrics",
                                scopes=["sign"])
    return raw


def test_metrics_count_a_signature_made_through_the_api(
    koin_home: Path, db_url: str, sessions: sessionmaker[Session], one_page_permit: bytes,
    disposable: list[Flask]
) -> None:
    people = _people(sessions)
    raw = _api_key(sessions, people[SIGNER])
    app = _app(koin_home, KOIN_DATABASE_URL=db_url)
    disposable.append(app)
    client = app.test_client()
    before = client.get("/metrics")
    assert before.status_code == 200
    assert before.content_type.startswith("text/plain")
    text = before.get_data(as_text=True)
    for name in ("koin_tsa_errors_total", "koin_queue_depth", "koin_mail_outbox_backlog",
                 "koin_contracts", "koin_database_up"):
        assert f"\n{name}" in text, name
    assert _metric(text, "koin_database_up") == 1
    assert _metric(text, "koin_contracts", state="draft") == 0
    signed_before = _metric(text, "koin_documents_signed_total", role="position", level="B-T")
    histogram_before = _metric(text, "koin_signing_seconds_count", role="position")

    signed = client.post("/api/v1/sign?no_stamp=true&level=B-T", data=one_page_permit,
                         content_type="application/pdf",
                         headers={"Authorization": f"Bearer {raw}"})
    assert signed.status_code == 200, signed.get_data(as_text=True)[:500]

    after = client.get("/metrics").get_data(as_text=True)
    assert _metric(after, "koin_documents_signed_total", role="position",
                   level="B-T") == signed_before + 1
    assert _metric(after, "koin_signing_seconds_count", role="position") == histogram_before + 1
    assert _metric(after, "koin_signing_seconds_sum", role="position") > 0


def test_metrics_count_verifications_by_verdict(
    koin_home: Path, db_url: str, one_page_permit: bytes, disposable: list[Flask]
) -> None:
    app = _app(koin_home, KOIN_DATABASE_URL=db_url)
    disposable.append(app)
    client = app.test_client()
    text = client.get("/metrics").get_data(as_text=True)
    before = _metric(text, "koin_verify_requests_total", verdict="failed")
    answer = client.post("/api/v1/verify", data=one_page_permit,
                         content_type="application/pdf")
    assert answer.status_code == 200 and answer.get_json()["indication"] == "FAILED"
    after = client.get("/metrics").get_data(as_text=True)
    assert _metric(after, "koin_verify_requests_total", verdict="failed") == before + 1


def test_metrics_token(koin_home: Path, tmp_path: Path, disposable: list[Flask]) -> None:
    token = secrets.token_urlsafe(24)
    app = _app(koin_home, KOIN_DATABASE_URL=f"sqlite:///{tmp_path}/koin.db",
               KOIN_METRICS_TOKEN=token)
    disposable.append(app)
    client = app.test_client()
    refused = client.get("/metrics")
    assert refused.status_code == 401 and "Bearer" in refused.headers["WWW-Authenticate"]
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and "koin_database_up" in ok.get_data(as_text=True)


# -- JSON logs with the request ID of a real koin serve -----------------------------------------


def test_json_log_lines_carry_the_request_id(koin_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home, ignore=shutil.ignore_patterns("*.db", "*.log"))
    port = free_port()
    env = {"KOIN_LOG_FORMAT": "json", "KOIN_PUBLIC_URL": f"http://127.0.0.1:{port}",
           "KOIN_DEV_SMTP_PORT": str(free_port()), "KOIN_JOBS_INTERVAL": "0",
           "KOIN_LTA_INTERVAL": "0", "PYTHONWARNINGS": "ignore"}
    base = f"http://127.0.0.1:{port}"
    with koin_process(home, "serve", "--port", str(port), port=port, env=env):
        given = requests.get(f"{base}/healthz", headers={"X-Request-ID": "lb-7f3a.42"},
                             timeout=10)
        assert given.headers["X-Request-ID"] == "lb-7f3a.42"
        verify = requests.get(f"{base}/verify?token=do-not-log-me",
                              headers={"X-Request-ID": "req-ops-0001"}, timeout=10)
        assert verify.status_code == 200 and verify.headers["X-Request-ID"] == "req-ops-0001"
        insane = requests.get(f"{base}/verify", headers={"X-Request-ID": "bad id <script>"},
                              timeout=10)
        made = insane.headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", made)
        token = secrets.token_urlsafe(32)
        requests.get(f"{base}/c/{token}", timeout=10)
        time.sleep(0.5)  # the access line is written after the answer
    log = (home / f"koin-serve-{port}.log").read_text()
    lines = []
    for line in log.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    [line] = [e for e in lines if e.get("request_id") == "req-ops-0001"]
    assert line["logger"] == "koin.access" and line["level"] == "INFO"
    assert line["method"] == "GET" and line["path"] == "/verify" and line["status"] == 200
    assert isinstance(line["duration_ms"], float) and line["time"].endswith("Z")
    assert {"time", "level", "logger", "message"} <= set(line)
    assert [e["path"] for e in lines if e.get("request_id") == made] == ["/verify"]
    assert "do-not-log-me" not in log and token not in log  # no query strings, no link tokens
    assert any(e.get("path", "").startswith("/c/sha256:") for e in lines)
    assert "lb-7f3a.42" not in log  # /healthz lines are DEBUG, below the default INFO


# -- gunicorn with two workers: one sum ---------------------------------------------------------


def test_gunicorn_workers_add_up_in_multiprocess_mode(
    koin_home: Path, tmp_path: Path, one_page_permit: bytes
) -> None:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home, ignore=shutil.ignore_patterns("*.db", "*.log"))
    database = f"sqlite:///{tmp_path}/koin.db"
    upgrade(database)
    engine = make_engine(database)
    sessions = make_session_factory(engine)
    raw = _api_key(sessions, _people(sessions)[SIGNER])
    engine.dispose()
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_99999.db").write_bytes(b"left over from an earlier run")
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KOIN_")},
           "KOIN_HOME": str(home), "KOIN_DATABASE_URL": database,
           "KOIN_PUBLIC_URL": f"http://127.0.0.1:{port}", "PROMETHEUS_MULTIPROC_DIR": str(folder),
           "KOIN_LOG_FORMAT": "json", "KOIN_BIND_HOST": "127.0.0.1", "KOIN_WEB_PORT": str(port),
           "KOIN_WEB_WORKERS": "2"}
    log = (tmp_path / "gunicorn.log").open("wb")
    server = subprocess.Popen(  # as compose.yaml and the systemd unit start it
        [str(BIN / "gunicorn"), "--config", "python:web.gunicorn_config"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, server, timeout=60)  # type: ignore[arg-type]

        def sign(_: int) -> int:
            return requests.post(
                f"{base}/api/v1/sign?no_stamp=true&level=B-B", data=one_page_permit,
                headers={"Authorization": f"Bearer {raw}", "Content-Type": "application/pdf"},
                timeout=120,
            ).status_code

        with ThreadPoolExecutor(4) as pool:  # sync workers: concurrent requests use both
            assert list(pool.map(sign, range(4))) == [200] * 4
        values = set()
        for _ in range(6):  # whichever worker answers, it tells the sum
            text = requests.get(f"{base}/metrics", timeout=30).text
            values.add(_metric(text, "koin_documents_signed_total", role="position",
                               level="B-B"))
        assert values == {4.0}
        per_process = {}
        for path in folder.glob("counter_*.db"):
            for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(path)):
                if "koin_documents_signed" in key:
                    per_process[path.name] = per_process.get(path.name, 0.0) + value
        assert sum(per_process.values()) == 4 and len(per_process) == 2, per_process
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


# -- the admin status page ----------------------------------------------------------------------


def _login(client: FlaskClient, email: str) -> None:
    page = client.get("/login").get_data(as_text=True)
    found = _CSRF.search(page)
    assert found
    answer = client.post("/login", data={"csrf_token": found.group(1), "email": email,
                                         "password": PASSWORD})
    assert answer.status_code == 302


def test_admin_status_page(
    koin_home: Path, db_url: str, sessions: sessionmaker[Session], disposable: list[Flask]
) -> None:
    _people(sessions)
    app = _app(koin_home, KOIN_DATABASE_URL=db_url)
    disposable.append(app)
    anonymous = app.test_client()
    assert anonymous.get("/admin/status").status_code == 302
    signer = app.test_client()
    _login(signer, SIGNER)
    assert signer.get("/admin/status").status_code == 403

    admin = app.test_client()
    _login(admin, ADMIN)
    answer = admin.get("/admin/status")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 200, page[:2000]
    assert "稼働状況" in page and "すべての確認項目が正常です。" in page
    for name in CHECKS:
        assert f'data-check="{name}" data-ok="true"' in page
    for role in ("position", "witness", "tsa", "ca"):
        assert f'data-role="{role}" data-state="ok"' in page, role
    assert 'id="certificate-warning"' not in page
    assert 'id="queue-waiting">0<' in page and 'id="mail-backlog">0<' in page

    # The demo certificates live a few years: with a longer warning time, every one warns.
    warned = _app(koin_home, KOIN_DATABASE_URL=db_url, KOIN_CERT_WARNING_DAYS=100 * 365)
    disposable.append(warned)
    client = warned.test_client()
    _login(client, ADMIN)
    english = client.get("/admin/status?lang=en").get_data(as_text=True)
    assert 'id="certificate-warning"' in english and "Prepare its renewal." in english
    assert 'data-role="position" data-state="warning"' in english
    assert re.search(r"expires in \d+ days", english)
    assert "Service status" in english and "Embedded TSA" in english


# -- counted once per signed document, where the services sign ----------------------------------


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_batch_counts_each_document_once_and_the_tsa_outage(
    sessions: sessionmaker[Session], tmp_path: Path, installation: Installation,
    one_page_permit: bytes
) -> None:
    home = tmp_path / "home"
    user = _people(sessions)[SIGNER]
    with session_scope(sessions) as session:
        batch = create_batch(session, home=home, user_id=user.id)
        for index in range(3):
            add_document(session, batch, home=home, file_name=f"{index}.pdf",
                         data=one_page_permit)
        start_batch(session, batch)
    with sessions() as session:
        assert operation_figures(session).queue_depth == {"waiting": 3, "running": 0}
    levels = ("B-B", "B-T", "B-LT", "B-LTA")
    before = {level: _sample("koin_documents_signed_total", role="position", level=level)
              for level in levels}
    errors = _sample("koin_tsa_errors_total")

    down = installation.signing_context(Role.POSITION, tsa_urls=[closed_port_url()])
    [first, *_] = claim_documents(sessions, owner="w", limit=1)
    sign_document(sessions, first, down, home=home, owner="w")
    assert _sample("koin_tsa_errors_total") == errors + 1

    context = installation.signing_context(Role.POSITION)
    later = utcnow() + dt.timedelta(hours=2)
    while ids := claim_documents(sessions, owner="w", limit=2, now=later):
        for row_id in ids:
            sign_document(sessions, row_id, context, home=home, owner="w", now=later)
    after = {level: _sample("koin_documents_signed_total", role="position", level=level)
             for level in levels}
    assert sum(after.values()) - sum(before.values()) == 3
    with sessions() as session:
        assert operation_figures(session, now=later).queue_depth == {"waiting": 0, "running": 0}


def test_a_completed_contract_counts_one_witness_signature(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes
) -> None:
    with session_scope(sessions) as session:
        officer, _ = create_user(session, "keiyaku@pref.ibaraki.example", ["officer"],
                                 display_name="契約 担当", password=PASSWORD)
        officer_id = officer.id
    contract_id = _create(sessions, installation, officer_id, permit_pdf)
    _all_consent(sessions, contract_id)
    before = _sample("koin_documents_signed_total", role="witness", level="B-T")
    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(
            lambda _: complete_contract(sessions, contract_id, installation), range(3)
        ))
    assert outcomes.count(CompletionOutcome.COMPLETED) == 1
    assert _sample("koin_documents_signed_total", role="witness", level="B-T") == before + 1
    assert _sample("koin_signing_seconds_count", role="witness") >= 1

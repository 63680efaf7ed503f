"""The many-machine layout, run for real: ``deploy/run-local.sh`` starts gunicorn, ``koin
worker``, ``koin scheduler`` and ``koin tsa serve`` against the local PostgreSQL (a database of
their own, created by the script) and Redis (a database number of their own); through HTTP
only, a witness-type contract is completed by two parties reading real mail (an aiosmtpd
server) and a batch of 100 permits is signed by the Celery worker; every final PDF verifies
against the deployment's root. Then ``run-local.sh stop`` leaves no process behind.

And statically: ``compose.yaml`` names the services of that layout with KOIN_HOME on volumes,
the ``Dockerfile`` runs as a non-root user and copies no key material, ``.dockerignore`` keeps
instance folders and keys out of the build context.

PostgreSQL and Redis must run on 127.0.0.1; the test fails, never skips, when they do not.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from sqlalchemy import text
from sqlalchemy.engine import make_url

import keys
from contracts import make_engine
from signer import Installation
from signer.samples import make_permit_pdf
from tests.permits import numbered_copies
from tests.servers import CollectedMail, free_port, smtp_collector
from tests.validators import make_nss_db, pdfsig, pdfsig_signatures, pyhanko_status

ROOT = Path(__file__).resolve().parent.parent
RUN_LOCAL = ROOT / "deploy" / "run-local.sh"
REDIS_URL = "redis://127.0.0.1:6379"
REDIS_DB = 3  # the deployment's own database number (the other tests use 0)
OFFICER = "keiyaku@pref.ibaraki.example"
HANAKO = {
    "name": "茨城 花子", "organisation": "茨城県 土木部", "email": "hanako@pref.ibaraki.example",
    "role": "prefecture", "identification": "email_otp",
}
TARO = {
    "name": "常陸 太郎", "organisation": "株式会社 水戸建設", "email": "taro@mito-kensetsu.example",
    "role": "contractor", "identification": "access_code",
}
WITNESS_CN = "koin Witness Signing Service"
BATCH_SIZE = 100
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_SHA = re.compile(r'name="document_sha256" value="([0-9a-f]{64})"')
_OTP = re.compile(r"確認コード: (\d{6})")
_KEY = re.compile(r"\bkoin_[A-Za-z0-9_-]+")


# -- the deployment -----------------------------------------------------------------------------


@dataclass
class Deployment:
    url: str
    run_dir: Path
    home: Path
    env: dict[str, str]
    mail: CollectedMail
    timings: dict[str, float]

    def script(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """``deploy/run-local.sh ARGS`` with the deployment's environment."""
        return subprocess.run(
            ["bash", str(RUN_LOCAL), *args], env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )

    def koin(self, *args: str) -> str:
        result = self.script("koin", *args, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def pids(self) -> dict[str, int]:
        return {
            path.stem: int(path.read_text())
            for path in sorted((self.run_dir / "pids").glob("*.pid"))
        }


def _redis_check() -> None:
    import redis

    try:
        redis.Redis.from_url(f"{REDIS_URL}/{REDIS_DB}", socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {REDIS_URL} is not reachable ({exc})", pytrace=False)


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    """The URL of a database that does not exist yet (run-local.sh creates it); dropped
    afterwards."""
    name = f"koin_deploy_test_{secrets.token_hex(4)}"
    yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    admin = make_engine(postgres_url)
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _processes_with(marker: str) -> list[tuple[int, str]]:
    """Live processes whose environment or command line mentions ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            status = (entry / "stat").read_text()
            if status.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            blob = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if marker.encode() in blob:
            found.append((int(entry.name), (entry / "cmdline").read_bytes()
                          .replace(b"\0", b" ").decode(errors="replace")[:120]))
    return found


@pytest.fixture
def deployment(tmp_path: Path, database: str) -> Iterator[Deployment]:
    _redis_check()
    run_dir = tmp_path / "run"
    web_port, tsa_port = free_port(), free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("KOIN_")}
    timings: dict[str, float] = {}
    with smtp_collector() as (smtp_url, mail):
        env = {
            **base,
            "KOIN_RUN_DIR": str(run_dir),
            "KOIN_WEB_PORT": str(web_port),
            "KOIN_TSA_PORT": str(tsa_port),
            "KOIN_DATABASE_URL": database,
            "KOIN_REDIS_DB": str(REDIS_DB),
            # a queue of its own, so that a concurrent run of this test shares no task
            "KOIN_BATCH_QUEUE": f"koin-deploy-{secrets.token_hex(4)}",
            "KOIN_SMTP_URL": smtp_url,
            "KOIN_MAIL_INTERVAL": "1",
            "KOIN_RECONCILE_INTERVAL": "2",
            "KOIN_WEB_WORKERS": "2",
            "KOIN_WORKER_CONCURRENCY": "2",
            "KOIN_LOG_LEVEL": "INFO",  # the TSA logs each request it answers
            "KOIN_STOP_TIMEOUT": "20",
        }
        deployment = Deployment(
            f"http://127.0.0.1:{web_port}", run_dir, run_dir / "home", env, mail, timings
        )
        started = time.monotonic()
        result = deployment.script("start")
        timings["start"] = time.monotonic() - started
        try:
            assert result.returncode == 0, result.stdout + result.stderr
            assert set(deployment.pids()) == {"web", "worker", "scheduler", "tsa"}
            yield deployment
        finally:
            members = {
                pid for group in deployment.pids().values() for pid in _group_members(group)
            }
            stopped = time.monotonic()
            stop = deployment.script("stop", timeout=120)
            timings["stop"] = time.monotonic() - stopped
            leftovers = _processes_with(str(run_dir))
            for pid, _ in leftovers:  # do not leave them to the next test
                os.kill(pid, signal.SIGKILL)
            _forget_queue(env["KOIN_BATCH_QUEUE"])
            assert stop.returncode == 0, stop.stderr
            assert not leftovers, f"processes left after stop: {leftovers}"
            assert not [pid for pid in members if _alive(pid)]
            assert not list((run_dir / "pids").glob("*.pid"))
            if result.returncode == 0:
                # 4 services, gunicorn's 2 workers and the Celery worker's 2 children
                assert len(members) >= 8, members
            print(f"\ndeployment timings (s): {timings}")


def _forget_queue(queue: str) -> None:
    """Remove what Celery left in the deployment's Redis database for this test's queue."""
    import redis

    client = redis.Redis.from_url(f"{REDIS_URL}/{REDIS_DB}")
    try:
        names = list(client.scan_iter(match=f"*{queue}*"))
        if names:
            client.delete(*names)
    finally:
        client.close()


def _group_members(group: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pgid=,pid="], capture_output=True, text=True).stdout
    return [int(pid) for pgid, pid in (line.split() for line in out.splitlines())
            if int(pgid) == group]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# -- HTTP helpers ---------------------------------------------------------------------------------


class Api:
    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"

    def __call__(self, method: str, path: str, status: int, **options: Any) -> Any:
        response = self.http.request(method, self.url + path, timeout=60, **options)
        assert response.status_code == status, (method, path, response.text[:500])
        return response.json() if response.headers["Content-Type"].startswith(
            "application/json") else response


def _to(address: str, subject_part: str) -> Any:
    return lambda m: address in str(m["To"]) and subject_part in str(m["Subject"])


def _body(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def _consent(deployment: Deployment, party: dict[str, str], access_code: str | None) -> str:
    """The party follows the link of its invitation mail in a cookie session of its own,
    identifies (access code, or the one-time code mailed on opening) and consents; the link."""
    invitation = deployment.mail.wait_for(_to(party["email"], "同意のお願い"))[0]
    link = re.search(re.escape(deployment.url) + r"/c/[A-Za-z0-9_-]+", _body(invitation))
    assert link, _body(invitation)
    browser = requests.Session()
    page = browser.get(link.group(0), timeout=30)
    assert page.status_code == 200, page.text[:500]
    code = access_code
    if code is None:
        otp = deployment.mail.wait_for(_to(party["email"], "確認コード"))[0]
        found = _OTP.search(_body(otp))
        assert found, _body(otp)
        code = found.group(1)
    csrf = _CSRF.search(page.text)
    assert csrf
    review = browser.post(link.group(0) + "/code", data={"csrf_token": csrf.group(1),
                                                         "code": code}, timeout=30)
    assert review.status_code == 200, review.text[:500]
    assert "内容を確認し、合意します" in review.text
    csrf, sha = _CSRF.search(review.text), _SHA.search(review.text)
    assert csrf and sha
    done = browser.post(link.group(0) + "/consent", data={
        "csrf_token": csrf.group(1), "document_sha256": sha.group(1), "agree": "yes",
    }, timeout=120)
    assert done.status_code == 200 and done.url.endswith("/done"), done.text[:500]
    return link.group(0)


def _valid(args: tuple[bytes, Path]) -> bool:
    """pyHanko's verdict on a batch output, the deployment's root the only trust anchor."""
    pdf, root_pem = args
    status = pyhanko_status(pdf, keys.load_certificates([root_pem])[0])
    return bool(status.bottom_line and status.timestamp_validity is not None)


# -- the test -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_contract_and_batch_through_the_local_layout(
    deployment: Deployment, tmp_path: Path
) -> None:
    timings = deployment.timings
    home = deployment.home
    root_pem = home / "pki" / "root-ca.pem"
    root = keys.load_certificates([root_pem])[0]
    assert (home / "keys" / "position.p12").is_file()  # koin init made the demo key store
    assert requests.get(deployment.url + "/healthz", timeout=10).json() == {"status": "ok"}

    # An operator creates the officer and an API key with the koin command of the deployment.
    deployment.koin("users", "create", OFFICER, "--role", "officer", "--role", "signer",
                    "--name", "契約 担当")
    found_key = _KEY.search(deployment.koin(
        "apikeys", "create", "--user", OFFICER, "--scope", "contracts,sign", "--name", "基幹"))
    assert found_key
    api = Api(deployment.url, found_key.group(0))
    permit = make_permit_pdf(Installation(home).font_file, pages=2)

    # A witness-type contract: created, a party added, sent, both consent by mail.
    began = time.monotonic()
    metadata = {"title": "県道123号線 道路改良工事 請負契約書", "parties": [HANAKO]}
    created = api("POST", "/api/v1/contracts", 201, files={
        "file": ("契約書.pdf", permit, "application/pdf"),
        "metadata": (None, json.dumps(metadata, ensure_ascii=False)),
    })
    contract = created["id"]
    added = api("POST", f"/api/v1/contracts/{contract}/parties", 201, json=TARO)
    [access_code] = [p["access_code"] for p in added["parties"] if p.get("access_code")]
    api("POST", f"/api/v1/contracts/{contract}/send", 200)
    links = [_consent(deployment, HANAKO, None), _consent(deployment, TARO, access_code)]
    deadline = time.monotonic() + 60
    while (detail := api("GET", f"/api/v1/contracts/{contract}", 200))["status"] != "completed":
        assert time.monotonic() < deadline, detail
        time.sleep(0.5)
    final = api("GET", f"/api/v1/contracts/{contract}/final.pdf", 200).content
    deployment.mail.wait_for(lambda m: "締結されました" in str(m["Subject"]), count=2)
    timings["contract"] = time.monotonic() - began
    assert final.startswith(permit)
    status = pyhanko_status(final, root)
    assert status.bottom_line and status.timestamp_validity is not None
    assert status.signing_cert.subject.native["common_name"] == WITNESS_CN
    final_path = tmp_path / "final.pdf"
    final_path.write_bytes(final)
    [block] = pdfsig_signatures(pdfsig(final_path, make_nss_db(tmp_path / "nss", root_pem)))
    assert "Signature is Valid." in block and "Certificate is Trusted." in block

    # A batch of 100 permits, signed by the Celery worker through Redis.
    began = time.monotonic()
    one_page = make_permit_pdf(Installation(home).font_file)
    pdfs = list(numbered_copies(one_page, BATCH_SIZE))
    batch = api("POST", "/api/v1/batches", 201, json={"name": "11月分 建設業許可"})["id"]
    api("POST", f"/api/v1/batches/{batch}/documents", 201, files=[
        ("file", (f"permit-{n:03d}.pdf", pdf, "application/pdf"))
        for n, pdf in enumerate(pdfs, start=1)
    ])
    api("POST", f"/api/v1/batches/{batch}/start", 202)
    deadline = time.monotonic() + 180
    while (progress := api("GET", f"/api/v1/batches/{batch}", 200))["status"] != "finished":
        assert time.monotonic() < deadline, progress
        time.sleep(1)
    timings["batch"] = time.monotonic() - began
    assert progress["progress"]["done"] == BATCH_SIZE and progress["progress"]["failed"] == 0
    archive = api("GET", f"/api/v1/batches/{batch}/archive", 200)
    assert archive.headers["X-Koin-Batch-Complete"] == "true"
    with zipfile.ZipFile(io.BytesIO(archive.content)) as bundle:
        signed = {name: bundle.read(name) for name in bundle.namelist()
                  if name.endswith(".pdf")}
    assert len(signed) == BATCH_SIZE
    by_name = {f"permit-{n:03d}.pdf": pdf for n, pdf in enumerate(pdfs, start=1)}
    for name, data in signed.items():
        assert data.startswith(by_name[Path(name).name])
    began = time.monotonic()
    with ProcessPoolExecutor(2) as pool:
        verdicts = list(pool.map(
            _valid, [(data, root_pem) for data in signed.values()], chunksize=10
        ))
    timings["verify_batch"] = time.monotonic() - began
    assert all(verdicts), [n for n, ok in zip(signed, verdicts, strict=True) if not ok]

    # The layout was the one of compose.yaml: timestamps came from the TSA service, batches
    # were signed by the worker, and no log holds a party's link.
    logs = {path.name: path.read_text(errors="replace")
            for path in (deployment.run_dir / "logs").glob("*.log")}
    assert logs["tsa.log"].count("POST") >= BATCH_SIZE + 1, logs["tsa.log"][-2000:]
    assert "koin.batches.sign" in logs["worker.log"]
    assert "GET /healthz" in logs["web-access.log"]
    for link in links:
        token = link.rsplit("/", 1)[1]
        assert not [name for name, content in logs.items() if token in content]
    assert "/c/sha256:" in logs["web-access.log"]


# -- static checks --------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "compose.yaml").read_text("utf-8"))
    assert isinstance(document, dict)
    return document


def test_compose_is_valid_under_the_compose_specification() -> None:
    """What ``docker compose config`` checks of the file's structure, without Docker: the
    JSON schema of the Compose Specification (compose-spec/compose-spec, schema/
    compose-spec.json at 170098b, Apache-2.0), after YAML anchors and merge keys."""
    from jsonschema import Draft7Validator

    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text("utf-8"))
    errors = [f"{list(error.path)}: {error.message}"
              for error in Draft7Validator(schema).iter_errors(_compose())]
    assert not errors, errors


def test_compose_names_the_layout_with_volumes() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"web", "worker", "scheduler", "tsa", "postgres", "redis", "init"} <= set(services)
    koin_services = ("init", "web", "worker", "scheduler", "tsa")
    homes = set()
    for name in koin_services:
        service = services[name]
        mounts = [m if isinstance(m, str) else f"{m['source']}:{m['target']}"
                  for m in service["volumes"]]
        named = {m.split(":")[0]: m.split(":")[1] for m in mounts}
        assert set(named) <= set(compose["volumes"]), (name, named)
        environment = service["environment"]
        home = environment["KOIN_HOME"]
        assert home in named.values(), (name, home, named)  # KOIN_HOME is a volume
        assert any(target == f"{home}/keys" for target in named.values()), name  # keys too
        homes.add(home)
        assert environment["KOIN_DATABASE_URL"].startswith("postgresql://")
        assert environment["KOIN_BROKER_URL"].startswith("redis://redis:6379/")
        # secrets come from the environment (an env file), never written here
        for secret in ("KOIN_KEY_PASSPHRASE", "KOIN_SECRET_KEY"):
            assert environment[secret].startswith("${"), (name, secret)
    assert len(homes) == 1
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${")
    assert "volumes" in services["postgres"]
    # the web starts after init/migrate has run, and only on healthy PostgreSQL and Redis
    depends = services["web"]["depends_on"]
    assert depends["init"]["condition"] == "service_completed_successfully"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["redis"]["condition"] == "service_healthy"
    init_command = " ".join(services["init"]["command"])
    assert "init" in init_command and "db upgrade" in init_command
    assert "gunicorn" in " ".join(services["web"]["command"])
    assert services["worker"]["command"][:1] == ["worker"]
    assert services["scheduler"]["command"] == ["scheduler"]
    assert services["tsa"]["command"][:2] == ["tsa", "serve"]
    for name in ("web", "postgres", "redis", "tsa"):
        assert "healthcheck" in services[name], name


def test_dockerfile_runs_as_a_user_without_key_material() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text("utf-8")
    lines = [line.strip() for line in dockerfile.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    users = [line.split(None, 1)[1] for line in lines if line.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0"), users
    assert lines[-1].upper().startswith(("CMD", "ENTRYPOINT")) or any(
        line.upper().startswith("ENTRYPOINT") for line in lines)
    # only the source: the packages (keys/ is the PKI library), migrations, the entry point
    allowed = {"pyproject.toml", "README.md", "keys", "timestamp", "signer", "contracts", "web",
               "migrations", "deploy/docker-entrypoint.sh"}
    copied = [line.split()[1:-1] for line in lines if line.upper().startswith(("COPY", "ADD"))]
    assert copied
    for sources in copied:
        assert set(sources) <= allowed, sources
    tracked = subprocess.run(
        ["git", "ls-files", *sorted(allowed)], cwd=ROOT, capture_output=True, text=True,
        check=True,
    ).stdout.split()
    assert tracked and not [name for name in tracked if name.endswith(
        (".p12", ".pfx", ".key", ".pem", "passphrase", "secret_key"))]
    assert not re.search(r"KOIN_(KEY_PASSPHRASE|SECRET_KEY)\s*=", dockerfile)
    assert "fonts-noto-cjk" in dockerfile
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for pattern in ("instance/", "*.p12", "**/*.p12", "*.key", "**/*.key"):
        assert pattern in ignored, pattern


def test_systemd_units_start_the_same_processes(tmp_path: Path) -> None:
    import configparser
    import shutil

    units = ROOT / "deploy" / "systemd"
    expected = {
        "koin-web.service": "/gunicorn --config python:web.gunicorn_config",
        "koin-worker.service": "/koin worker --no-beat",
        "koin-scheduler.service": "/koin scheduler",
        "koin-tsa.service": "/koin tsa serve",
    }
    env_example = units / "koin.env.example"
    settings = dict(
        line.split("=", 1) for line in env_example.read_text("utf-8").splitlines()
        if line and not line.startswith("#")
    )
    for name, command in expected.items():
        parser = configparser.ConfigParser(interpolation=None, strict=True)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(units / name, encoding="utf-8")
        service = parser["Service"]
        assert command in service["ExecStart"], name
        assert service["User"] == "koin" and service["EnvironmentFile"] == "/etc/koin/koin.env"
        assert service["KillMode"] == "mixed", name  # the main process stops its children
        for variable in re.findall(r"\$\{(\w+)\}", service["ExecStart"]):
            assert variable in settings, (name, variable)
    for secret in ("KOIN_KEY_PASSPHRASE", "KOIN_SECRET_KEY"):
        assert settings[secret] == "CHANGE-ME"
    if shutil.which("systemd-analyze"):
        # systemd's own check, with the paths of this checkout
        venv_bin = Path(sys.executable).parent
        for name in expected:
            unit = (units / name).read_text("utf-8")
            unit = unit.replace("/opt/koin/.venv/bin", str(venv_bin))
            unit = unit.replace("/etc/koin/koin.env", str(env_example))
            (tmp_path / name).write_text(unit, "utf-8")
        result = subprocess.run(
            ["systemd-analyze", "verify", *(str(tmp_path / name) for name in expected)],
            capture_output=True, text=True,
        )
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr

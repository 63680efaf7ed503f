"""``koin backup`` / ``koin restore`` (``contracts/backup.py``) as an operator runs them: a real
installation with a signed permit and a completed witness-type contract is backed up with the
real command, restored into a fresh KOIN_HOME (SQLite → SQLite, SQLite → PostgreSQL,
PostgreSQL → PostgreSQL, PostgreSQL → SQLite), and the restored installation still verifies
the signed files, finds their records and checks the contract's audit chain."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy import Engine, MetaData, inspect, select, text
from sqlalchemy.engine import make_url

from contracts import (
    CompletionOutcome,
    Contract,
    UserRole,
    complete_contract,
    create_user,
    get_document,
    make_engine,
    make_session_factory,
    session_scope,
    verify_chain,
)
from contracts.migrate import upgrade
from contracts.staff_signing import sign_for_staff
from keys import Role
from signer import Installation
from tests.conftest import PUBLIC_URL
from tests.test_workflow import _all_consent, _create
from web import create_app, services
from web.auth import create_secret_key_file

PASSPHRASE = "backup passphrase for the tests"
KOIN = Path(sys.executable).parent / "koin"


@dataclass
class Source:
    home: Path
    url: str
    signed_id: str
    contract_public_id: str
    contract_document_id: str
    events: int


def _koin(home: Path, url: str, *args: str, passphrase: str | None = PASSPHRASE,
          lang: str = "en") -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "KOIN_HOME": str(home), "KOIN_DATABASE_URL": url,
           "KOIN_LANG": lang}
    if passphrase is not None:
        env["KOIN_BACKUP_PASSPHRASE"] = passphrase
    return subprocess.run([str(KOIN), *args], capture_output=True, text=True, env=env,
                          timeout=300)


@contextmanager
def _schema(postgres_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL schema first on the search path (like ``tests.db``)."""
    schema = f"koin_restore_{secrets.token_hex(6)}"
    admin = make_engine(postgres_url)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(postgres_url).update_query_dict(
            {"options": f"-csearch_path={schema} -ctimezone=Asia/Tokyo"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text("SET LOCAL lock_timeout = '10s'"))
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def _target_url(kind: str, home: Path, postgres_url: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{home}/koin.db"
    else:
        with _schema(postgres_url) as url:
            yield url


def _table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return set(inspect(connection).get_table_names())
    finally:
        engine.dispose()


def _normal(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        aware = value if value.utcoffset() is not None else value.replace(tzinfo=dt.UTC)
        return aware.astimezone(dt.UTC)
    return value


def _all_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (but Alembic's), in primary key order, datetimes as UTC."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            reflected = MetaData()
            reflected.reflect(connection)
            return {
                table.name: [
                    tuple(_normal(v) for v in row)
                    for row in connection.execute(
                        select(table).order_by(*table.primary_key.columns))
                ]
                for table in reflected.sorted_tables if table.name != "alembic_version"
            }
    finally:
        engine.dispose()


@pytest.fixture
def source(koin_home: Path, tmp_path: Path, db_url: str, permit_pdf: bytes) -> Iterator[Source]:
    """An installation with a permit signed on the staff page and a completed contract."""
    home = tmp_path / "source"
    shutil.copytree(koin_home, home, ignore=shutil.ignore_patterns("koin.db*"))
    create_secret_key_file(home)
    # SQLite: the default place, inside KOIN_HOME (it must be dumped, not copied as a file)
    url = f"sqlite:///{home}/koin.db" if db_url.startswith("sqlite") else db_url
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    installation = Installation(home, public_url=PUBLIC_URL)
    with session_scope(sessions) as session:
        signer, _ = create_user(session, "hisho@pref.ibaraki.example", [UserRole.SIGNER],
                                password="correct horse battery staple")
        officer, _ = create_user(session, "keiyaku@pref.ibaraki.example", [UserRole.OFFICER],
                                 display_name="契約 担当", password="correct horse battery staple")
        signer_id, officer_id = signer.id, officer.id
    signed = sign_for_staff(
        sessions, permit_pdf, installation.signing_context(Role.POSITION), home=home,
        user_id=signer_id, file_name="建設業許可通知書.pdf", template=None, public_url=PUBLIC_URL,
    )
    contract_id = _create(sessions, installation, officer_id, permit_pdf)
    _all_consent(sessions, contract_id)
    assert complete_contract(sessions, contract_id, installation) is CompletionOutcome.COMPLETED
    with sessions() as session:
        contract = session.get_one(Contract, contract_id)
        check = verify_chain(session, contract)
        assert check.ok, check
        public_id, document_id = contract.public_id, contract.document_id
    engine.dispose()
    yield Source(home, url, signed.document_id, public_id, document_id, check.events)


def _check_restored(home: Path, url: str, source: Source) -> None:
    """The restored installation verifies the signed permit and the contract's final PDF with
    ``koin verify`` (its own trust roots), finds their records and checks the audit chain."""
    copy = home / "signed" / f"{source.signed_id}.pdf"
    final = home / "contracts" / source.contract_public_id / "final.pdf"
    for pdf in (copy, final):
        verified = _koin(home, url, "verify", str(pdf))
        assert verified.returncode == 0 and verified.stdout.startswith("PASSED"), (
            verified.stdout + verified.stderr)
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            record = get_document(session, source.signed_id)
            assert record is not None and record.file_name == "建設業許可通知書.pdf"
            assert get_document(session, source.contract_document_id) is not None
            contract = session.scalars(select(Contract).where(
                Contract.public_id == source.contract_public_id)).one()
            check = verify_chain(session, contract)
            assert check.ok and check.events == source.events, check
    finally:
        engine.dispose()


@pytest.mark.parametrize("target", ["sqlite", "postgresql"])
def test_backup_and_restore_into_a_fresh_installation(
    source: Source, target: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    archive = tmp_path / "koin-backup.tar.gz"
    made = _koin(source.home, source.url, "backup", str(archive))
    assert made.returncode == 0, made.stderr
    assert "Backed up to" in made.stdout
    assert archive.stat().st_mode & 0o777 == 0o600
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        sealed = tar.extractfile("secrets/keys/passphrase.enc").read()  # type: ignore[union-attr]
    assert manifest["alembic_revision"] and manifest["koin_version"]
    assert set(manifest["members"]) == set(names) - {"manifest.json"}
    assert "files/koin.db" not in names and "secrets/secret_key.enc" in names
    assert f"files/signed/{source.signed_id}.pdf" in names
    assert f"files/contracts/{source.contract_public_id}/final.pdf" in names
    assert "files/keys/witness.p12" in names  # PKCS#12: encrypted on disk already
    assert (source.home / "keys" / "passphrase").read_bytes().strip() not in sealed

    postgres_url = request.getfixturevalue("postgres_url") if target == "postgresql" else ""
    home = tmp_path / "restored"
    with _target_url(target, home, postgres_url) as url:
        restored = _koin(home, url, "restore", str(archive))
        assert restored.returncode == 0, restored.stderr
        assert "Restored into" in restored.stdout

        # Every row came back as it was (types included), and the files with their modes.
        assert _all_rows(url) == _all_rows(source.url)
        for name in ("secret_key", "keys/passphrase", "keys/witness.p12", "assets/seal.png",
                     f"contracts/{source.contract_public_id}/original.pdf"):
            assert (home / name).read_bytes() == (source.home / name).read_bytes(), name
        assert (home / "keys" / "passphrase").stat().st_mode & 0o777 == 0o600
        copy = home / "signed" / f"{source.signed_id}.pdf"
        assert copy.stat().st_mtime == (source.home / "signed" / copy.name).stat().st_mtime

        # koin verify in the restored installation; the records are found, the audit chain
        # checks, new rows get fresh keys.
        _check_restored(home, url, source)
        engine = make_engine(url)
        try:
            sessions = make_session_factory(engine)
            with sessions() as session:
                contract = session.scalars(select(Contract).where(
                    Contract.public_id == source.contract_public_id)).one()
                assert contract.chain_head_timestamp is not None
            with session_scope(sessions) as session:
                newcomer, _ = create_user(session, "new@pref.ibaraki.example", [UserRole.ADMIN],
                                          password="correct horse battery staple")
                assert newcomer.id == 3
        finally:
            engine.dispose()

        # The verify service of the restored installation: record page and copy check.
        app = create_app({"KOIN_HOME": str(home), "KOIN_DATABASE_URL": url,
                          "KOIN_PUBLIC_URL": PUBLIC_URL, "TESTING": True})
        try:
            client = app.test_client()
            page = client.get(f"/verify/{source.signed_id}")
            assert page.status_code == 200 and source.signed_id in page.get_data(as_text=True)
            checked = client.post(
                f"/verify/{source.signed_id}",
                data={"file": (io.BytesIO(copy.read_bytes()), "copy.pdf")},
                content_type="multipart/form-data",
            )
            body = checked.get_data(as_text=True)
            assert checked.status_code == 200 and 'data-copy="signed"' in body, body
            assert client.get(f"/verify/{source.contract_document_id}").status_code == 200
        finally:
            services.close(app)


# -- refusals (SQLite only: they happen before any database is written) ---------------------------


@pytest.fixture
def sqlite_source(koin_home: Path, tmp_path: Path) -> tuple[Path, str]:
    home = tmp_path / "small"
    shutil.copytree(koin_home, home, ignore=shutil.ignore_patterns("koin.db*"))
    create_secret_key_file(home)
    url = f"sqlite:///{home}/koin.db"
    upgrade(url)
    engine = make_engine(url)
    with session_scope(make_session_factory(engine)) as session:
        create_user(session, "admin@pref.ibaraki.example", [UserRole.ADMIN],
                    password="correct horse battery staple")
    engine.dispose()
    return home, url


def _rewrite(archive: Path, out: Path, change: dict[str, bytes]) -> None:
    """Copy ``archive`` with some members' contents replaced (the manifest left as it is)."""
    with tarfile.open(archive) as tar, tarfile.open(out, "w:gz") as copy:
        for info in tar:
            handle = tar.extractfile(info)
            assert handle is not None
            data = change.get(info.name, handle.read())
            info.size = len(data)
            copy.addfile(info, io.BytesIO(data))


def test_secrets_need_a_passphrase(sqlite_source: tuple[Path, str], tmp_path: Path) -> None:
    home, url = sqlite_source
    refused = _koin(home, url, "backup", str(tmp_path / "b.tar.gz"), passphrase=None)
    assert refused.returncode == 1
    assert "secret_key" in refused.stderr and "KOIN_BACKUP_PASSPHRASE" in refused.stderr
    assert not (tmp_path / "b.tar.gz").exists()
    short = _koin(home, url, "backup", str(tmp_path / "b.tar.gz"), passphrase="short")
    assert short.returncode == 1 and "at least 12 characters" in short.stderr
    # In production the secrets come from the environment: nothing to encrypt.
    (home / "secret_key").unlink()
    (home / "keys" / "passphrase").unlink()
    made = _koin(home, url, "backup", str(tmp_path / "b.tar.gz"), passphrase=None)
    assert made.returncode == 0, made.stderr
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        assert "files/keys/position.p12" in tar.getnames()  # encrypted with the key passphrase
    again = _koin(home, url, "backup", str(tmp_path / "b.tar.gz"))
    assert again.returncode == 1 and "already exists" in again.stderr
    # A PKCS#12 file without a password is a secret like any other.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "plain")])
    now = dt.datetime.now(dt.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(1).not_valid_before(now)
                   .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    (home / "keys" / "plain.p12").write_bytes(pkcs12.serialize_key_and_certificates(
        b"plain", key, certificate, None, serialization.NoEncryption()))
    plain = _koin(home, url, "backup", str(tmp_path / "c.tar.gz"), passphrase=None)
    assert plain.returncode == 1 and "keys/plain.p12" in plain.stderr


def test_a_tampered_or_damaged_backup_is_refused_and_nothing_is_written(
    sqlite_source: tuple[Path, str], tmp_path: Path
) -> None:
    home, url = sqlite_source
    archive = tmp_path / "good.tar.gz"
    assert _koin(home, url, "backup", str(archive)).returncode == 0
    with tarfile.open(archive) as tar:
        users = next(n for n in tar.getnames() if n.endswith("-users.jsonl"))
        rows = tar.extractfile(users).read()  # type: ignore[union-attr]
    target = tmp_path / "target"
    target_url = f"sqlite:///{target}/koin.db"

    tampered = tmp_path / "tampered.tar.gz"
    _rewrite(archive, tampered, {users: rows.replace(b'"is_active":true', b'"is_active":false')})
    refused = _koin(target, target_url, "restore", str(tampered))
    assert refused.returncode == 1
    assert "damaged or was altered" in refused.stderr and users in refused.stderr
    assert "nothing was written" in refused.stderr
    ja = _koin(target, target_url, "restore", str(tampered), lang="ja")
    assert ja.returncode == 1 and "改変" in ja.stderr

    # A member and its SHA-256 altered together: the manifest is sealed with the passphrase.
    manifest = _manifest(archive)
    altered_rows = rows.replace(b'"is_active":true', b'"is_active":false')
    manifest["members"][users] = hashlib.sha256(altered_rows).hexdigest()
    resealed = tmp_path / "resealed.tar.gz"
    _rewrite(archive, resealed, {users: altered_rows,
                                 "manifest.json": json.dumps(manifest).encode()})
    refused = _koin(target, target_url, "restore", str(resealed))
    assert refused.returncode == 1 and "manifest.json was altered" in refused.stderr

    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    refused = _koin(target, target_url, "restore", str(truncated))
    assert refused.returncode == 1 and "damaged" in refused.stderr, refused.stderr

    missing_manifest = tmp_path / "no-manifest.tar.gz"
    with tarfile.open(archive) as tar, tarfile.open(missing_manifest, "w:gz") as copy:
        for info in tar:
            if info.name != "manifest.json":
                copy.addfile(info, tar.extractfile(info))
    refused = _koin(target, target_url, "restore", str(missing_manifest))
    assert refused.returncode == 1 and "no manifest.json" in refused.stderr

    wrong = _koin(target, target_url, "restore", str(archive), passphrase="not the passphrase")
    assert wrong.returncode == 1 and "passphrase is wrong" in wrong.stderr
    none = _koin(target, target_url, "restore", str(archive), passphrase=None)
    assert none.returncode == 1 and "encrypted secrets" in none.stderr
    not_there = _koin(target, target_url, "restore", str(tmp_path / "nothing.tar.gz"))
    assert not_there.returncode == 1 and "does not exist" in not_there.stderr

    assert not target.exists(), "a refused restore writes nothing"
    restored = _koin(target, target_url, "restore", str(archive))
    assert restored.returncode == 0, restored.stderr


def test_restore_into_an_installation_needs_force(
    sqlite_source: tuple[Path, str], tmp_path: Path, postgres_url: str
) -> None:
    home, url = sqlite_source
    archive = tmp_path / "b.tar.gz"
    assert _koin(home, url, "backup", str(archive)).returncode == 0

    # Into the very installation it came from: refused, then --force puts it back.
    refused = _koin(home, url, "restore", str(archive))
    assert refused.returncode == 1
    assert "already holds an installation" in refused.stderr and "--force" in refused.stderr
    assert _table_names(url) >= {"users", "alembic_version"}

    # A PostgreSQL schema that holds an installation, with an empty KOIN_HOME.
    with _schema(postgres_url) as pg_url:
        upgrade(pg_url)
        target = tmp_path / "empty-home"
        refused = _koin(target, pg_url, "restore", str(archive))
        assert refused.returncode == 1 and "already holds" in refused.stderr
        assert "test" in refused.stderr  # names the database (without a password)
        assert not target.exists()
        forced = _koin(target, pg_url, "restore", str(archive), "--force")
        assert forced.returncode == 0, forced.stderr
        assert _all_rows(pg_url) == _all_rows(url)

    (home / "assets" / "seal.png").write_bytes(b"changed")
    forced = _koin(home, url, "restore", str(archive), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (home / "assets" / "seal.png").read_bytes() != b"changed"
    assert os.stat(home / "secret_key").st_mode & 0o777 == 0o600


def _manifest(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive) as tar:
        handle = tar.extractfile("manifest.json")
        assert handle is not None
        manifest: dict[str, Any] = json.loads(handle.read())
        return manifest


def test_a_backup_of_an_older_revision_is_migrated_after_loading(
    koin_home: Path, tmp_path: Path
) -> None:
    home = tmp_path / "old"
    shutil.copytree(koin_home, home, ignore=shutil.ignore_patterns("koin.db*"))
    (home / "keys" / "passphrase").unlink()  # (KOIN_KEY_PASSPHRASE) no secret on disk
    # made by any app that ran on the shared installation before (test order varies)
    (home / "secret_key").unlink(missing_ok=True)
    url = f"sqlite:///{home}/koin.db"
    upgrade(url, "0009")  # an installation of an older koin
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO users (email, display_name, password_hash, failed_logins, is_active, "
            "created_at) VALUES ('old@pref.ibaraki.example', 'old', 'x', 0, 1, "
            "'2026-04-01 00:00:00.000000')"))
    engine.dispose()
    archive = tmp_path / "old.tar.gz"
    made = _koin(home, url, "backup", str(archive), passphrase=None)
    assert made.returncode == 0, made.stderr
    assert _manifest(archive)["alembic_revision"] == "0009"
    assert "lta_files" not in {t["name"] for t in _manifest(archive)["tables"]}

    target = tmp_path / "new"
    target_url = f"sqlite:///{target}/koin.db"
    restored = _koin(target, target_url, "restore", str(archive), passphrase=None)
    assert restored.returncode == 0, restored.stderr
    from contracts.migrate import current, head

    assert current(target_url) == head()
    assert "lta_files" in _table_names(target_url)
    rows = _all_rows(target_url)["users"]
    assert [(r[1], r[7]) for r in rows] == [
        ("old@pref.ibaraki.example", dt.datetime(2026, 4, 1, tzinfo=dt.UTC))]

    # A backup from a newer koin (a revision this one does not know) is refused.
    newer = _manifest(archive)
    newer["alembic_revision"] = "9999"
    future = tmp_path / "future.tar.gz"
    _rewrite(archive, future, {"manifest.json": json.dumps(newer).encode()})
    refused = _koin(tmp_path / "other", f"sqlite:///{tmp_path}/other/koin.db", "restore",
                    str(future), passphrase=None)
    assert refused.returncode == 1 and "newer koin" in refused.stderr
    assert not (tmp_path / "other").exists()


def test_rows_that_do_not_fit_leave_the_target_empty(
    sqlite_source: tuple[Path, str], tmp_path: Path, postgres_url: str
) -> None:
    home, url = sqlite_source
    for secret in ("secret_key", "keys/passphrase"):  # unsealed: the manifest can be edited
        (home / secret).unlink()
    archive = tmp_path / "b.tar.gz"
    assert _koin(home, url, "backup", str(archive), passphrase=None).returncode == 0
    manifest = _manifest(archive)
    users = next(t for t in manifest["tables"] if t["name"] == "users")
    users["columns"].append(["nickname", "str"])  # a column no revision of koin has
    bad = tmp_path / "bad.tar.gz"
    _rewrite(archive, bad, {"manifest.json": json.dumps(manifest).encode()})
    with _schema(postgres_url) as pg_url:
        refused = _koin(tmp_path / "target", pg_url, "restore", str(bad), passphrase=None)
        assert refused.returncode == 1 and "users does not fit" in refused.stderr
        assert _table_names(pg_url) == set()
        again = _koin(tmp_path / "target", pg_url, "restore", str(archive), passphrase=None)
        assert again.returncode == 0, again.stderr


def test_the_dump_reads_one_state_of_the_database(engine: Engine) -> None:
    """What ``koin backup`` reads is one snapshot, whatever is committed meanwhile."""
    from contracts.backup import _snapshot

    sessions = make_session_factory(engine)
    with _snapshot(engine) as snapshot:
        before = snapshot.scalar(text("SELECT count(*) FROM users"))
        with session_scope(sessions) as session:
            create_user(session, "meanwhile@pref.ibaraki.example", [UserRole.SIGNER],
                        password="correct horse battery staple")
        assert snapshot.scalar(text("SELECT count(*) FROM users")) == before == 0
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM users")) == 1


# -- large files: streamed, never held whole --------------------------------------------------

_MIB = 1024 * 1024

# Runs one backup or one restore in a fresh interpreter and prints how much its peak resident
# memory (VmHWM) grew meanwhile: the imports are done, and the peak reset to the present
# (``clear_refs``), before it starts. (``ru_maxrss`` would not do: Linux carries it over from
# the parent, pytest, through fork and exec.)
_MEASURE = """
import json, sys
from pathlib import Path
import contracts.backup as backup, contracts.migrate  # noqa: F401

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)

what, archive, home, url, passphrase = sys.argv[1:6]
Path("/proc/self/clear_refs").write_text("5")  # the peak is now the present
before = status("VmHWM")
if what == "backup":
    backup.create_backup(Path(home), url, Path(archive), passphrase=passphrase.encode())
else:
    backup.restore_backup(Path(archive), Path(home), url, passphrase=passphrase.encode())
print(json.dumps({"before": before, "growth": status("VmHWM") - before}))
"""


def _measured(what: str, archive: Path, home: Path, url: str) -> int:
    """How many bytes the peak memory of a process grew by while it ran ``what``."""
    env = {"PATH": "/usr/bin:/bin", "KOIN_LANG": "en"}
    done = subprocess.run([sys.executable, "-c", _MEASURE, what, str(archive), str(home), url,
                           PASSPHRASE], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    growth: int = json.loads(done.stdout)["growth"]
    return growth


def _large_pdf(path: Path, mib: int) -> str:
    """A file of ``mib`` MiB starting like a PDF (each MiB some random bytes, then zeros, so
    that compressing it is quick); its SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for number in range(mib):
            piece = (b"%PDF-1.7\n" if number == 0 else b"") + os.urandom(4096)
            piece += bytes(_MIB - len(piece))
            out.write(piece)
            digest.update(piece)
    return digest.hexdigest()


def test_a_large_stored_file_is_streamed_through_backup_and_restore(
    sqlite_source: tuple[Path, str], tmp_path: Path
) -> None:
    home, url = sqlite_source
    size = 200 * _MIB
    (home / "signed").mkdir(exist_ok=True)
    sha256 = _large_pdf(home / "signed" / "large.pdf", 200)
    archive = tmp_path / "large.tar.gz"
    grew = _measured("backup", archive, home, url)
    assert grew < 120 * _MIB, f"backup: peak memory grew by {grew // _MIB} MiB"
    with tarfile.open(archive) as tar:
        assert tar.getmember("files/signed/large.pdf").size == size
    (home / "signed" / "large.pdf").unlink()  # the disk of the machine is shared

    target = tmp_path / "target"
    grew = _measured("restore", archive, target, f"sqlite:///{target}/koin.db")
    assert grew < 120 * _MIB, f"restore: peak memory grew by {grew // _MIB} MiB"
    restored = target / "signed" / "large.pdf"
    assert restored.stat().st_size == size
    digest = hashlib.sha256()
    with restored.open("rb") as handle:
        while piece := handle.read(_MIB):
            digest.update(piece)
    assert digest.hexdigest() == sha256
    assert not list(target.rglob("*.tmp")), "no temporary file is left behind"


def test_a_file_that_changes_while_it_is_backed_up_fails_the_backup(
    sqlite_source: tuple[Path, str], tmp_path: Path
) -> None:
    """A file written in place while it is read would go into the archive as a state it never
    had (with a SHA-256 that matches that state): the backup fails instead, and says so."""
    from contracts.backup import BackupError, create_backup

    home, url = sqlite_source
    growing = home / "batches" / "growing.csv"
    growing.parent.mkdir(exist_ok=True)
    with growing.open("wb") as out:
        for _ in range(48):
            out.write(os.urandom(1024) + bytes(_MIB - 1024))
    stop = threading.Event()

    def append() -> None:
        while not stop.is_set():
            with growing.open("ab") as out:
                out.write(b"1,2,3\n")
            time.sleep(0.001)

    archive = tmp_path / "changing.tar.gz"
    writer = threading.Thread(target=append)
    writer.start()
    try:
        with pytest.raises(BackupError) as refused:
            create_backup(home, url, archive, passphrase=PASSPHRASE.encode())
    finally:
        stop.set()
        writer.join()
    assert "batches/growing.csv changed while it was being backed up" in refused.value.message_en
    assert "バックアップの途中で変更されました" in refused.value.message
    assert not archive.exists() and not list(tmp_path.glob(".changing.tar.gz.*"))

    # Once it stands still, the backup goes through and carries the file as it is.
    made = _koin(home, url, "backup", str(archive))
    assert made.returncode == 0, made.stderr
    with tarfile.open(archive) as tar:
        member = tar.extractfile("files/batches/growing.csv")
        assert member is not None
        assert hashlib.sha256(member.read()).digest() == hashlib.sha256(
            growing.read_bytes()).digest()


# -- restore --force: the installation that was there is moved aside whole ----------------------


def _files(folder: Path) -> set[str]:
    """The files below ``folder`` but SQLite's (``koin.db`` and its companions)."""
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*")
            if path.is_file() and not path.name.startswith("koin.db")}


def _emails(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return set(connection.scalars(text("SELECT email FROM users")))
    finally:
        engine.dispose()


def test_a_forced_restore_moves_the_installation_that_was_there_aside(
    source: Source, tmp_path: Path
) -> None:
    """``restore --force`` onto an installation that went on after its backup: afterwards the
    home holds exactly the backup's files; what was there (stale contracts, batches, the key
    files of another installation, and a SQLite database inside KOIN_HOME) is in the folder
    the command names; PostgreSQL's tables are replaced."""
    archive = tmp_path / "before.tar.gz"
    made = _koin(source.home, source.url, "backup", str(archive))
    assert made.returncode == 0, made.stderr
    backed_up = {entry["path"] for entry in _manifest(archive)["files"]}
    before = _emails(source.url)
    stale = {
        "contracts/C-STALE/final.pdf": b"%PDF-1.7 a contract the backup does not know",
        "keys/position-other-installation.p12": (source.home / "keys" / "position.p12")
        .read_bytes(),
        "batches/B-STALE/input.csv": b"name,file\n",
    }
    for name, data in stale.items():
        (source.home / name).parent.mkdir(parents=True, exist_ok=True)
        (source.home / name).write_bytes(data)
    engine = make_engine(source.url)
    with session_scope(make_session_factory(engine)) as session:
        create_user(session, "later@pref.ibaraki.example", [UserRole.ADMIN],
                    password="correct horse battery staple")
    engine.dispose()

    forced = _koin(source.home, source.url, "restore", str(archive), "--force")
    assert forced.returncode == 0, forced.stderr
    [aside] = source.home.parent.glob(f"{source.home.name}.replaced-*")
    assert f"was moved to {aside}" in forced.stdout
    assert _files(source.home) == backed_up
    for name, data in stale.items():
        assert not (source.home / name).exists(), name
        assert (aside / name).read_bytes() == data, name
    assert _files(aside) >= backed_up  # the old installation is whole
    assert _emails(source.url) == before
    if source.url.startswith("sqlite"):  # the old database went aside with the rest
        assert "later@pref.ibaraki.example" in _emails(f"sqlite:///{aside}/koin.db")
    _check_restored(source.home, source.url, source)


@contextmanager
def _unwritable(*folders: Path) -> Iterator[None]:
    """Folders nobody may add to or rename in (for root too: ``chattr +i``)."""
    if os.geteuid() != 0:
        for folder in folders:
            folder.chmod(0o555)
        try:
            yield
        finally:
            for folder in folders:
                folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(
            ["chattr", "+i", *map(str, folders)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder unwritable for root here (chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, folders)], check=True)


def test_a_forced_restore_moves_aside_inside_the_home_or_refuses(
    sqlite_source: tuple[Path, str], tmp_path: Path
) -> None:
    """Where KOIN_HOME cannot be renamed (a container's volume, a parent not writable), what
    it holds goes into ``KOIN_HOME/.replaced-…``; where nothing can be moved, the restore is
    refused before anything changes."""
    home, url = sqlite_source
    archive = tmp_path / "b.tar.gz"
    assert _koin(home, url, "backup", str(archive)).returncode == 0
    parent = tmp_path / "volumes"
    target = parent / "koin"
    shutil.copytree(home, target)  # an installation, its SQLite database inside
    target_url = f"sqlite:///{target}/koin.db"
    (target / "keys" / "other-installation.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----")

    elsewhere = tmp_path / "db" / "koin.db"  # a database outside the home: nothing to move
    elsewhere.parent.mkdir()
    listing = sorted(target.rglob("*"))
    with _unwritable(parent, target):
        refused = _koin(target, f"sqlite:///{elsewhere}", "restore", str(archive), "--force",
                        lang="ja")
    assert refused.returncode == 1
    assert "退避できません" in refused.stderr and "何も変更していません" in refused.stderr
    assert sorted(target.rglob("*")) == listing and not elsewhere.exists()

    with _unwritable(parent):
        forced = _koin(target, target_url, "restore", str(archive), "--force", lang="ja")
    assert forced.returncode == 0, forced.stderr
    [inside] = target.glob(".replaced-*")
    assert f"{inside} に移しました" in forced.stdout
    assert sorted(os.listdir(parent)) == ["koin"]
    assert {name for name in _files(target) if not name.startswith(".replaced-")} == _files(home)
    assert (inside / "keys" / "other-installation.pem").exists()
    assert not (target / "keys" / "other-installation.pem").exists()
    assert (inside / "koin.db").exists()
    assert _all_rows(target_url) == _all_rows(url)


def test_a_forced_restore_that_fails_later_says_where_the_old_installation_went(
    sqlite_source: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only koin's own errors: whatever stops the restore after the move names the folder
    that holds the old installation."""
    import contracts.backup as backup

    home, url = sqlite_source
    archive = tmp_path / "b.tar.gz"
    assert _koin(home, url, "backup", str(archive)).returncode == 0
    target = tmp_path / "target"
    shutil.copytree(home, target)

    def disk_full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backup, "_restore_into", disk_full)
    with pytest.raises(backup.BackupError) as failed:
        backup.restore_backup(archive, target, f"sqlite:///{target}/koin.db",
                              passphrase=PASSPHRASE.encode(), force=True)
    [aside] = tmp_path.glob("target.replaced-*")
    assert failed.value.message_en == (
        "The restore failed (OSError: [Errno 28] No space left on device). "
        f"The previous installation was moved to {aside}.")
    assert f"{aside} に移してあります" in failed.value.message
    assert (aside / "koin.db").exists() and _files(aside) == _files(home)

"""Backup and restore of a whole installation: database, stored files and key store, in one
file (``koin backup OUT`` / ``koin restore IN``).

The backup is a gzip-compressed tar holding::

    database/NNN-<table>.jsonl   every row of every table, one JSON object a line, tables in
                                 foreign-key order; types round-trip (datetimes as ISO 8601
                                 UTC, bytes as base64, JSON as JSON, decimals as text)
    files/<path>                 every file below KOIN_HOME (signed copies, contract originals
                                 and final PDFs, batches, certificates, PKCS#12 key files …)
    secrets/<path>.enc           secrets that are not encrypted on disk (the session secret
                                 ``secret_key``, ``keys/passphrase``, PIN files, PEM private
                                 keys): AES-256-GCM under a key derived with scrypt from the
                                 backup passphrase; the member name is the associated data
    manifest.json                (last) koin version, Alembic revision, creation time, the
                                 tables with their column types, the files with mode and
                                 modification time, and the SHA-256 of every other member
                                 (with a passphrase, the manifest itself is sealed too)

The database is read in one read-only transaction (REPEATABLE READ on PostgreSQL, a single
read transaction on SQLite), so the dump is one consistent state; files are read after it, so a
file the dump refers to is there (files written meanwhile may be too, without a row). The dump
is independent of the database: a backup of SQLite restores into PostgreSQL and back.

Stored files are streamed in pieces of 1 MiB both ways (a signed PDF may be a gigabyte): a file
is hashed as it goes into the tar, and one that changes while it is read (size or modification
time moved, or it ended early) fails the backup rather than going in as a state that never was.
Only secrets, small files, are held whole to be sealed.

A restore first reads the whole archive and checks every member against the manifest (a
damaged or altered archive is refused before anything is written), decrypts the secrets
(a wrong passphrase is refused likewise), refuses a target that already holds an installation
(unless ``force``: then the installation in KOIN_HOME, a SQLite database inside it included, is
moved aside whole, and koin's tables in another database are dropped), migrates the target
database to the backed-up revision, loads the rows in one transaction, sets PostgreSQL's
sequences past the loaded keys, writes the files (each through a temporary file, fsynced and
renamed), and finally migrates to the newest revision this koin knows.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import hashlib
import io
import json
import os
import re
import secrets
import stat
import tarfile
import tempfile
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    Date,
    DateTime,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    Uuid,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from keys import atomic_writer

from . import migrate
from ._db import SQLITE_FILE, Base, make_engine, utcnow
from .errors import ContractsError

__all__ = [
    "BACKUP_PASSPHRASE_ENV",
    "MIN_PASSPHRASE_LENGTH",
    "BackupError",
    "BackupReport",
    "RestoreReport",
    "create_backup",
    "read_manifest",
    "restore_backup",
    "target_is_empty",
]

#: Environment variable holding the passphrase that encrypts the secrets of a backup.
BACKUP_PASSPHRASE_ENV = "KOIN_BACKUP_PASSPHRASE"
MIN_PASSPHRASE_LENGTH = 12
FORMAT = "koin-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_INSERT_CHUNK = 500
#: gzip level of backups. Measured on signed PDFs and table rows: level 9 (tarfile's default)
#: gave the same size as 6 (0.778 / 0.337 vs 0.778 / 0.339) at up to 2.7 times the CPU.
_GZIP_LEVEL = 6
_READ_CHUNK = 1024 * 1024
# scrypt: 2**15 × 8 × 128 bytes = 32 MiB, some tens of milliseconds (as werkzeug's hashes).
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1
_NONCE_BYTES = 12
_MEMBER = re.compile(r"^(?:database/\d{3}-[A-Za-z0-9_]+\.jsonl|files/.+|secrets/.+\.enc)$")
_ALEMBIC_TABLE = "alembic_version"
# Files below KOIN_HOME that are never backed up: the SQLite database (dumped as rows instead).
_SQLITE_COMPANIONS = ("", "-wal", "-shm", "-journal")
# PKCS#12 files are encrypted with the key store passphrase: copied as they are.
_ENCRYPTED_SUFFIXES = (".p12", ".pfx")
_CERTIFICATE_SUFFIXES = (".pem", ".crt", ".cer", ".der")
_PRIVATE_KEY_MARK = b"PRIVATE KEY-----"
_PDF_MARK = b"%PDF"


class BackupError(ContractsError):
    """A backup cannot be made, or a backup file cannot be restored (the message says why)."""


@dataclass(frozen=True)
class BackupReport:
    path: Path
    revision: str
    tables: dict[str, int]
    files: int
    secrets: int
    size: int


@dataclass(frozen=True)
class RestoreReport:
    revision: str
    koin_version: str
    created_at: str
    tables: dict[str, int]
    files: int
    secrets: int
    #: where the installation that was in KOIN_HOME was moved (a forced restore), else None
    replaced: Path | None = None


# -- values ---------------------------------------------------------------------------------------


def _kind(column_type: Any) -> str:
    """How values of a column are written in the dump.

    :raises BackupError: a type the dump cannot carry.
    """
    checks: list[tuple[type[Any], str]] = [
        (Boolean, "bool"),
        (DateTime, "datetime"),
        (Date, "date"),
        (LargeBinary, "bytes"),
        (JSON, "json"),
        (Uuid, "uuid"),
        (Integer, "int"),
        (Float, "float"),
        (Numeric, "decimal"),
        (String, "str"),
        (Text, "str"),
    ]
    for type_class, kind in checks:
        if isinstance(column_type, type_class):
            return kind
    raise BackupError(
        f"列の型 {column_type!r} はバックアップできません。",
        f"The column type {column_type!r} cannot be backed up.",
    )


def _encode(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == "datetime":
        assert isinstance(value, dt.datetime)
        if value.utcoffset() is None:  # SQLite keeps naive UTC
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat()
    if kind == "date":
        return value.isoformat()
    if kind == "bytes":
        return base64.b64encode(bytes(value)).decode("ascii")
    if kind in ("decimal", "uuid"):
        return str(value)
    return value


def _decode(kind: str, value: Any, *, naive: bool) -> Any:
    """:raises ValueError, TypeError: a value that does not fit ``kind``."""
    if value is None:
        return None
    if kind == "datetime":
        moment = dt.datetime.fromisoformat(value)
        if moment.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}")
        moment = moment.astimezone(dt.UTC)
        return moment.replace(tzinfo=None) if naive else moment
    if kind == "date":
        return dt.date.fromisoformat(value)
    if kind == "bytes":
        return base64.b64decode(value, validate=True)
    if kind == "decimal":
        return decimal.Decimal(value)
    if kind == "uuid":
        return uuid.UUID(value)
    if kind == "bool" and not isinstance(value, bool):
        raise TypeError(f"not a boolean: {value!r}")
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"not an integer: {value!r}")
    return value


# -- secrets --------------------------------------------------------------------------------------


def _is_secret(relative: PurePosixPath, handle: IO[bytes]) -> bool:
    """Whether a file below KOIN_HOME holds a secret that is not encrypted on disk.

    ``handle`` is read from where it stands, in pieces: a PDF is known by its first bytes, other
    files are searched for a PEM private key without being held whole (only a PKCS#12 file,
    a small key file, is read whole to try to open it).
    """
    parts, name = relative.parts, relative.name.lower()
    if relative.as_posix() == "secret_key":
        return True
    if name.endswith(_ENCRYPTED_SUFFIXES):
        return _opens_without_password(handle.read())
    if parts[0] == "keys" or parts[:2] == ("pki", "private"):
        if name == "keystore.json":
            return False
        if name.endswith(_CERTIFICATE_SUFFIXES):
            return _holds_private_key(handle)
        return True
    head = handle.read(len(_PDF_MARK))
    return head != _PDF_MARK and _holds_private_key(handle, head)


def _holds_private_key(handle: IO[bytes], start: bytes = b"") -> bool:
    """Whether the rest of ``handle`` (after ``start``, already read) holds a PEM private key;
    read in pieces that overlap by the length of the mark."""
    carry = start
    while True:
        if _PRIVATE_KEY_MARK in carry:
            return True
        chunk = handle.read(_READ_CHUNK)
        if not chunk:
            return False
        carry = carry[-(len(_PRIVATE_KEY_MARK) - 1):] + chunk


def _opens_without_password(pkcs12_data: bytes) -> bool:
    """Whether a PKCS#12 file gives up its key without a password (then it is a secret like
    any other, not a file that is encrypted on disk)."""
    for password in (None, b""):
        try:
            key, _certificate, _chain = pkcs12.load_key_and_certificates(pkcs12_data, password)
        except (ValueError, TypeError):
            continue
        return key is not None
    return False


def _derive(passphrase: bytes, salt: bytes) -> AESGCM:
    key = Scrypt(salt=salt, length=32, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P).derive(passphrase)
    return AESGCM(key)


def _seal(cipher: AESGCM, member: str, data: bytes) -> bytes:
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return nonce + cipher.encrypt(nonce, data, member.encode("utf-8"))


def _open_sealed(cipher: AESGCM, member: str, sealed: bytes) -> bytes:
    """:raises InvalidTag: wrong passphrase, or the member was altered."""
    return cipher.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], member.encode("utf-8"))


def _check_passphrase(passphrase: bytes) -> None:
    if len(passphrase) < MIN_PASSPHRASE_LENGTH:
        raise BackupError(
            f"バックアップのパスフレーズは {MIN_PASSPHRASE_LENGTH} 文字以上にしてください。",
            f"The backup passphrase must have at least {MIN_PASSPHRASE_LENGTH} characters.",
        )


# -- the database ---------------------------------------------------------------------------------


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    if parsed.database == ":memory:" or parsed.database.startswith("file:"):
        return None
    return Path(parsed.database).resolve()


@contextmanager
def _engine(url: str) -> Iterator[Engine]:
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def _snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection in one read-only transaction that sees a single state of the database."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            with conn.begin():
                conn.execute(text("SET TRANSACTION READ ONLY"))
                yield conn
        return
    with engine.connect() as conn:
        # pysqlite opens transactions only before writes; BEGIN makes every read below share
        # one snapshot (WAL readers see the database as of their first read).
        conn.exec_driver_sql("BEGIN")
        try:
            yield conn
        finally:
            conn.rollback()


def _reflect(conn: Connection) -> MetaData:
    reflected = MetaData()
    reflected.reflect(conn)
    return reflected


def _dump_table(conn: Connection, table: Table, out: IO[bytes]) -> int:
    kinds = {column.name: _kind(column.type) for column in table.columns}
    order = list(table.primary_key.columns) or list(table.columns)
    rows = 0
    result = conn.execution_options(stream_results=True, yield_per=1000).execute(
        select(table).order_by(*order)
    )
    for row in result.mappings():
        record = {name: _encode(kinds[name], row[name]) for name in kinds}
        out.write(
            json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            .encode("utf-8")
        )
        out.write(b"\n")
        rows += 1
    return rows


# -- writing the archive --------------------------------------------------------------------------


class _EndedEarly(Exception):
    """A source gave fewer bytes than its member's size (a file shrank while it was read)."""


class _SourceFailed(Exception):
    """Reading a source failed (told apart from failing to write the archive)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


class _Hashing:
    """Reads exactly ``size`` bytes from ``source`` for :meth:`tarfile.TarFile.addfile`, and
    hashes them on the way: the SHA-256 is that of what went into the archive."""

    def __init__(self, source: IO[bytes], size: int) -> None:
        self.source = source
        self.remaining = size
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        want = self.remaining if size < 0 else min(size, self.remaining)
        try:
            data = self.source.read(want)
            while len(data) < want:
                more = self.source.read(want - len(data))
                if not more:
                    raise _EndedEarly
                data += more
        except OSError as exc:
            raise _SourceFailed(exc) from exc
        self.remaining -= len(data)
        self.digest.update(data)
        return data


class _Writer:
    """Adds members to the tar and remembers their SHA-256."""

    def __init__(self, tar: tarfile.TarFile, created: float) -> None:
        self.tar = tar
        self.created = created
        self.hashes: dict[str, str] = {}

    def add(self, name: str, data: bytes | IO[bytes], size: int | None = None) -> None:
        """Add a member: ``data`` whole, or ``size`` bytes read from it in pieces.

        :raises _EndedEarly: ``data`` ended before ``size`` bytes.
        :raises _SourceFailed: reading ``data`` failed.
        """
        if isinstance(data, bytes):
            size, data = len(data), io.BytesIO(data)
        assert size is not None
        source = _Hashing(data, size)
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, int(self.created), 0o600
        self.tar.addfile(info, source)
        self.hashes[name] = source.digest.hexdigest()


def _walk(home: Path, skip: set[Path]) -> Iterator[tuple[PurePosixPath, Path, bool]]:
    """``(relative path, path, is_dir)`` of everything to back up below ``home``, sorted.

    :raises BackupError: a folder cannot be read (a backup never leaves one out silently).
    """

    def refuse(exc: OSError) -> None:
        raise BackupError(
            f"フォルダ {exc.filename} を読めません。",
            f"Cannot read the folder {exc.filename} ({exc.__class__.__name__}).",
        ) from exc

    for folder, dirs, files in os.walk(home, onerror=refuse):
        dirs.sort()
        base = Path(folder)
        for name in dirs:
            path = base / name
            if not path.is_symlink():
                yield PurePosixPath(path.relative_to(home).as_posix()), path, True
        for name in sorted(files):
            path = base / name
            if name.startswith(".") and name.endswith(".tmp"):
                continue  # a file being written (keys.atomic_write)
            if path.resolve() in skip or not path.is_file():
                continue
            yield PurePosixPath(path.relative_to(home).as_posix()), path, False


def _cannot_read(path: Path, exc: OSError) -> BackupError:
    return BackupError(
        f"{path} を読めません。", f"Cannot read {path} ({exc.__class__.__name__})."
    )


@contextmanager
def _opened(path: Path) -> Iterator[IO[bytes] | None]:
    """The file open for reading, or None if it was removed meanwhile (files come and go
    while koin serves; one gone after the database was read is not needed to restore it).

    :raises BackupError: the file cannot be read.
    """
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        yield None
        return
    except OSError as exc:
        raise _cannot_read(path, exc) from exc
    with handle:
        yield handle


def _plain_secret(relative: PurePosixPath, path: Path) -> bool:
    """:raises BackupError: the file cannot be read."""
    with _opened(path) as handle:
        try:
            return handle is not None and _is_secret(relative, handle)
        except OSError as exc:
            raise _cannot_read(path, exc) from exc


def _changed(relative: PurePosixPath) -> BackupError:
    return BackupError(
        f"{relative} がバックアップの途中で変更されました。もう一度バックアップしてください"
        "(バックアップファイルは作っていません)。",
        f"{relative} changed while it was being backed up; run the backup again (no backup "
        "file was made).",
    )


def _add_file(
    writer: _Writer, relative: PurePosixPath, path: Path, cipher: AESGCM | None
) -> dict[str, Any] | None:
    """Add one stored file to the archive: an ordinary file streamed in pieces, hashed as it
    goes in; a secret read whole and sealed. Its manifest entry, or None if it is gone.

    :raises BackupError: the file cannot be read; it is a secret and there is no passphrase;
        it changed while it was read (its size or modification time moved, or it ended early:
        the member would hold a state of the file that never was).
    """
    with _opened(path) as handle:
        if handle is None:
            return None
        try:
            before = os.fstat(handle.fileno())
            secret = _is_secret(relative, handle)
            handle.seek(0)
            data = handle.read() if secret else b""  # a secret is small; it is sealed whole
        except OSError as exc:
            raise _cannot_read(path, exc) from exc
        if secret and cipher is None:  # it became one while the backup was made
            raise BackupError(
                f"{relative} は暗号化されていない秘密情報です。パスフレーズを指定してください。",
                f"{relative} is a secret that is not encrypted on disk; give a passphrase.",
            )
        if secret:
            assert cipher is not None
            member = f"secrets/{relative.as_posix()}.enc"
            if len(data) != before.st_size:
                raise _changed(relative)
            writer.add(member, _seal(cipher, member, data))
        else:
            member = f"files/{relative.as_posix()}"
            try:
                writer.add(member, handle, before.st_size)
            except _EndedEarly:
                raise _changed(relative) from None
            except _SourceFailed as exc:
                raise _cannot_read(path, exc.error) from exc
        try:
            grew = bool(handle.read(1))
            after = os.fstat(handle.fileno())
        except OSError as exc:
            raise _cannot_read(path, exc) from exc
    if grew or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise _changed(relative)
    return {
        "path": relative.as_posix(), "member": member, "encrypted": secret,
        "mode": stat.S_IMODE(before.st_mode), "mtime": before.st_mtime, "size": before.st_size,
    }


def _skipped_paths(home: Path, database_url: str, out: Path) -> set[Path]:
    skip = {out.resolve()}
    databases = [home.resolve() / SQLITE_FILE]
    sqlite_file = _sqlite_file(database_url)
    if sqlite_file is not None:
        databases.append(sqlite_file)
    for database in databases:
        for suffix in _SQLITE_COMPANIONS:
            skip.add(database.with_name(database.name + suffix))
    return skip


def create_backup(
    home: Path,
    database_url: str,
    out: Path,
    *,
    passphrase: bytes | None,
    now: dt.datetime | None = None,
) -> BackupReport:
    """Write a backup of the installation in ``home`` with the database at ``database_url``
    to ``out`` (a new file, mode 0600, written under a temporary name and renamed when
    complete).

    :raises BackupError: ``out`` exists; ``home`` is not a folder; the installation has secrets
        that are not encrypted on disk and no ``passphrase`` was given (or it is too short);
        the database was never migrated or holds a type the dump cannot carry; a file or the
        database cannot be read.
    """
    if out.exists():
        raise BackupError(
            f"{out} は既にあります。別のファイル名を指定してください。",
            f"{out} already exists; give another file name.",
        )
    if not home.is_dir():
        raise BackupError(
            f"KOIN_HOME {home} がありません。", f"KOIN_HOME {home} is not a folder."
        )
    if passphrase is not None:
        _check_passphrase(passphrase)
    created = now or utcnow()
    skip = _skipped_paths(home, database_url, out)
    plain_secrets = [  # refused before anything is written (checked again while writing)
        rel.as_posix() for rel, path, is_dir in _walk(home, skip)
        if not is_dir and _plain_secret(rel, path)
    ]
    if plain_secrets and passphrase is None:
        names = ", ".join(plain_secrets)
        raise BackupError(
            f"暗号化されていない秘密情報({names})があります。--passphrase-file か "
            f"{BACKUP_PASSPHRASE_ENV} でバックアップ用のパスフレーズを指定してください。",
            f"The installation holds secrets that are not encrypted on disk ({names}); give "
            f"a backup passphrase with --passphrase-file or {BACKUP_PASSPHRASE_ENV}.",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    skip.add(Path(tmp_name).resolve())
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT,
                              compresslevel=_GZIP_LEVEL) as tar:
                manifest = _write_members(
                    _Writer(tar, created.timestamp()), home, database_url, skip, passphrase,
                    created,
                )
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return BackupReport(
        out, manifest["alembic_revision"],
        {table["name"]: table["rows"] for table in manifest["tables"]},
        sum(1 for f in manifest["files"] if not f["encrypted"]),
        sum(1 for f in manifest["files"] if f["encrypted"]),
        out.stat().st_size,
    )


def _write_members(
    writer: _Writer,
    home: Path,
    database_url: str,
    skip: set[Path],
    passphrase: bytes | None,
    created: dt.datetime,
) -> dict[str, Any]:
    tables: list[dict[str, Any]] = []
    try:
        with _engine(database_url) as engine, _snapshot(engine) as conn:
            names = set(inspect(conn).get_table_names())
            if _ALEMBIC_TABLE not in names:
                raise BackupError(
                    "データベースが初期化されていません(koin db upgrade を実行してください)。",
                    "The database was never set up (run koin db upgrade).",
                )
            revision = conn.scalar(text(f"SELECT version_num FROM {_ALEMBIC_TABLE}"))
            reflected = _reflect(conn)
            dialect = conn.dialect.name
            for number, table in enumerate(reflected.sorted_tables):
                if table.name == _ALEMBIC_TABLE:
                    continue
                member = f"database/{number:03d}-{table.name}.jsonl"
                with tempfile.TemporaryFile() as dump:
                    rows = _dump_table(conn, table, dump)
                    size = dump.tell()
                    dump.seek(0)
                    writer.add(member, dump, size)
                tables.append({
                    "name": table.name, "member": member, "rows": rows,
                    "columns": [[c.name, _kind(c.type)] for c in table.columns],
                })
    except SQLAlchemyError as exc:
        raise BackupError(
            "データベースを読めません。KOIN_DATABASE_URL を確認してください。",
            f"Cannot read the database ({exc.__class__.__name__}); check KOIN_DATABASE_URL.",
        ) from exc

    salt = secrets.token_bytes(16)
    cipher = _derive(passphrase, salt) if passphrase is not None else None
    files: list[dict[str, Any]] = []
    folders: list[dict[str, Any]] = []
    # Listed after the database was read: every file a row of the dump refers to is there.
    for relative, path, is_dir in _walk(home, skip):
        if not is_dir:
            entry = _add_file(writer, relative, path, cipher)
            if entry is not None:  # else removed since the walk (a signed copy past its day)
                files.append(entry)
            continue
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _cannot_read(path, exc) from exc
        folders.append({"path": relative.as_posix(), "mode": stat.S_IMODE(info.st_mode)})
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "koin_version": _koin_version(),
        "alembic_revision": revision,
        "created_at": created.astimezone(dt.UTC).isoformat(),
        "source_database": dialect,
        "tables": tables,
        "folders": folders,
        "files": files,
        "members": dict(writer.hashes),
    }
    manifest["encryption"] = None if cipher is None else {
        "cipher": "AES-256-GCM", "kdf": "scrypt", "n": _SCRYPT_N, "r": _SCRYPT_R,
        "p": _SCRYPT_P, "salt": base64.b64encode(salt).decode("ascii"),
        "nonce_bytes": _NONCE_BYTES, "associated_data": "member name",
        # lets a restore tell a wrong passphrase from a damaged member
        "check": base64.b64encode(_seal(cipher, "check", b"koin")).decode("ascii"),
        # the rest of the manifest, sealed: whoever lacks the passphrase cannot alter a member
        # and its SHA-256 together unnoticed
        "manifest_seal": base64.b64encode(
            _seal(cipher, "manifest", _manifest_digest(manifest))
        ).decode("ascii"),
    }
    writer.add(MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1).encode("utf-8"))
    return manifest


def _manifest_digest(manifest: dict[str, Any]) -> bytes:
    """SHA-256 of the manifest without its encryption block (canonical JSON)."""
    rest = {key: value for key, value in manifest.items() if key != "encryption"}
    text_ = json.dumps(rest, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text_.encode("utf-8")).digest()


def _koin_version() -> str:
    try:
        return metadata.version("koin")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a plain checkout
        return "unknown"


# -- reading the archive --------------------------------------------------------------------------


def _damaged(reason: str, reason_en: str) -> BackupError:
    return BackupError(
        f"バックアップファイルが壊れているか改変されています({reason})。何も書き込んでいません。",
        f"The backup file is damaged or was altered ({reason_en}); nothing was written.",
    )


def _cannot_read_archive(path: Path, exc: OSError) -> BackupError:
    return BackupError(
        f"バックアップファイル {path} を読めません。",
        f"Cannot read the backup file {path} ({exc.__class__.__name__}).",
    )


@contextmanager
def _archive_file(path: Path) -> Iterator[IO[bytes]]:
    """The backup file, open for reading: a restore reads it three times (check, rows,
    files) through this one handle, so it reads the very file it checked, wherever the file
    is moved meanwhile (into the folder the old installation is moved aside to, say).

    :raises BackupError: the file does not exist or cannot be opened.
    """
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise BackupError(
            f"バックアップファイル {path} がありません。", f"The backup file {path} does not exist."
        ) from None
    except OSError as exc:
        raise _cannot_read_archive(path, exc) from exc
    with handle:
        yield handle


@contextmanager
def _open_archive(source: IO[bytes]) -> Iterator[tarfile.TarFile]:
    """The tar in ``source``, read from its start.

    :raises BackupError: it is not a readable tar/gzip, or reading it failed.
    """
    path = Path(getattr(source, "name", "?"))
    try:
        source.seek(0)
        with tarfile.open(fileobj=source, mode="r:*") as tar:
            yield tar
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno:
            raise _cannot_read_archive(path, exc) from exc
        raise _damaged("tar/gzip として読めません", f"not a readable tar/gzip: {exc}") from exc


def _members(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, IO[bytes]]]:
    for info in tar:
        if not info.isfile():
            raise _damaged(f"想定外のメンバー {info.name!r}", f"unexpected member {info.name!r}")
        handle = tar.extractfile(info)
        assert handle is not None
        yield info, handle


@dataclass
class _Checked:
    manifest: dict[str, Any]
    secrets: dict[str, bytes] = field(default_factory=dict)


def _read_checked(source: IO[bytes]) -> _Checked:
    """Read the whole archive once: every member's SHA-256 against the manifest.

    :raises BackupError: the archive is unreadable, or a member is missing, extra, or
        altered, or the manifest is not a koin backup manifest.
    """
    hashes: dict[str, str] = {}
    manifest_bytes: bytes | None = None
    sealed: dict[str, bytes] = {}
    with _open_archive(source) as tar:
        for info, handle in _members(tar):
            if info.name in hashes or (info.name == MANIFEST and manifest_bytes is not None):
                raise _damaged(f"メンバー {info.name!r} が重複", f"duplicate {info.name!r}")
            if info.name == MANIFEST:
                if info.size > _MAX_MANIFEST_BYTES:
                    raise _damaged("目録が大きすぎます", "the manifest is too large")
                manifest_bytes = handle.read()
                continue
            if not _MEMBER.match(info.name) or _unsafe(info.name):
                raise _damaged(
                    f"想定外のメンバー {info.name!r}", f"unexpected member {info.name!r}"
                )
            digest = hashlib.sha256()
            keep = info.name.startswith("secrets/")
            kept = bytearray()
            while chunk := handle.read(_READ_CHUNK):
                digest.update(chunk)
                if keep:
                    kept += chunk
            hashes[info.name] = digest.hexdigest()
            if keep:
                sealed[info.name] = bytes(kept)
    if manifest_bytes is None:
        raise _damaged("目録 manifest.json がありません", "no manifest.json")
    manifest = _parse_manifest(manifest_bytes)
    expected: dict[str, str] = manifest["members"]
    missing = sorted(set(expected) - set(hashes))
    extra = sorted(set(hashes) - set(expected))
    if missing or extra:
        names = ", ".join(missing + extra)
        raise _damaged(f"目録と中身が一致しません: {names}", f"members do not match: {names}")
    altered = sorted(name for name, digest in hashes.items() if expected[name] != digest)
    if altered:
        names = ", ".join(altered)
        raise _damaged(
            f"SHA-256 が目録と一致しません: {names}", f"SHA-256 does not match: {names}"
        )
    referenced = [t["member"] for t in manifest["tables"]]
    referenced += [f["member"] for f in manifest["files"]]
    if sorted(referenced) != sorted(expected):
        raise _damaged("目録の記載が不整合です", "the manifest is inconsistent")
    return _Checked(manifest, sealed)


def _unsafe(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return name.startswith("/") or ".." in parts or "\\" in name or "\x00" in name


def _parse_manifest(data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
        if manifest.get("format") != FORMAT:
            raise ValueError("not a koin backup")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BackupError(
                f"バックアップの形式 {manifest.get('format_version')!r} には対応していません。",
                f"Backup format version {manifest.get('format_version')!r} is not supported.",
            )
        for key in ("alembic_revision", "koin_version", "created_at"):
            if not isinstance(manifest[key], str):
                raise ValueError(key)
        if not isinstance(manifest["members"], dict):
            raise ValueError("members")
        for table in manifest["tables"]:
            if not (isinstance(table["name"], str) and isinstance(table["member"], str)):
                raise ValueError("tables")
            for name, kind in table["columns"]:
                _decode(str(kind), None, naive=False)
                if not isinstance(name, str):
                    raise ValueError("columns")
        for entry in manifest["files"] + manifest["folders"]:
            relative = PurePosixPath(entry["path"])
            if _unsafe(entry["path"]) or not relative.parts or not isinstance(entry["mode"], int):
                raise ValueError(f"path {entry['path']!r}")
        for entry in manifest["files"]:
            if not isinstance(entry["member"], str) or not isinstance(entry["encrypted"], bool):
                raise ValueError("files")
            float(entry["mtime"])
    except BackupError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _damaged(
            "目録 manifest.json を読めません", f"unreadable manifest.json: {exc}"
        ) from exc
    if not isinstance(manifest, dict):  # pragma: no cover - checked by .get above
        raise _damaged("目録 manifest.json を読めません", "unreadable manifest.json")
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the backup at ``path``, after checking every member against it.

    :raises BackupError: the file is missing, unreadable, damaged or altered.
    """
    with _archive_file(path) as source:
        return _read_checked(source).manifest


def _decrypt_secrets(checked: _Checked, passphrase: bytes | None) -> dict[str, bytes]:
    """Open the secrets, and check the sealed manifest, with the passphrase.

    :raises BackupError: secrets but no passphrase, or a wrong one; the manifest was altered.
    """
    encryption = checked.manifest.get("encryption")
    if checked.secrets and not isinstance(encryption, dict):
        raise _damaged("暗号化の設定がありません", "no encryption parameters")
    if checked.secrets and passphrase is None:
        raise BackupError(
            "このバックアップには暗号化された秘密情報があります。--passphrase-file か "
            f"{BACKUP_PASSPHRASE_ENV} でパスフレーズを指定してください。",
            "This backup holds encrypted secrets; give its passphrase with --passphrase-file "
            f"or {BACKUP_PASSPHRASE_ENV}.",
        )
    if not isinstance(encryption, dict) or passphrase is None:
        return {}  # nothing encrypted, or nothing to open it with
    try:
        salt = base64.b64decode(encryption["salt"], validate=True)
        if (encryption["n"], encryption["r"], encryption["p"]) != (_SCRYPT_N, _SCRYPT_R, _SCRYPT_P):
            raise ValueError("scrypt parameters")
        cipher = _derive(passphrase, salt)
        check = base64.b64decode(encryption["check"], validate=True)
        manifest_seal = base64.b64decode(encryption["manifest_seal"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise _damaged(
            "暗号化の設定を読めません", f"unreadable encryption parameters: {exc}"
        ) from exc
    try:
        _open_sealed(cipher, "check", check)
    except InvalidTag:
        raise BackupError(
            "バックアップのパスフレーズが違います。何も書き込んでいません。",
            "The backup passphrase is wrong; nothing was written.",
        ) from None
    try:
        sealed_digest = _open_sealed(cipher, "manifest", manifest_seal)
    except InvalidTag:
        sealed_digest = b""
    if sealed_digest != _manifest_digest(checked.manifest):
        raise _damaged("目録 manifest.json が改変されています", "manifest.json was altered")
    opened = {}
    for member, sealed in checked.secrets.items():
        try:
            opened[member] = _open_sealed(cipher, member, sealed)
        except InvalidTag:
            raise _damaged(f"{member} を復号できません", f"{member} cannot be decrypted") from None
    return opened


# -- restoring ------------------------------------------------------------------------------------


def target_is_empty(home: Path, database_url: str) -> tuple[bool, bool]:
    """``(home is empty, database is empty)``: a missing or empty folder; a database without
    koin's tables.

    :raises BackupError: the database cannot be reached.
    """
    home_empty = not home.exists() or (home.is_dir() and not any(home.iterdir()))
    sqlite_file = _sqlite_file(database_url)
    if sqlite_file is not None and not sqlite_file.exists():
        return home_empty, True
    try:
        with _engine(database_url) as engine, engine.connect() as conn:
            names = set(inspect(conn).get_table_names())
    except SQLAlchemyError as exc:
        raise BackupError(
            "データベースに接続できません。KOIN_DATABASE_URL を確認してください。",
            f"Cannot reach the database ({exc.__class__.__name__}); check KOIN_DATABASE_URL.",
        ) from exc
    ours = set(Base.metadata.tables) | {_ALEMBIC_TABLE}
    return home_empty, not (names & ours)


def _check_revision(revision: str) -> None:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        known = ScriptDirectory.from_config(migrate.alembic_config()).get_revision(revision)
    except CommandError:
        known = None
    if known is None:
        raise BackupError(
            f"バックアップのデータベースの版 {revision} をこの koin は知りません"
            "(より新しい koin で作られたバックアップです)。koin を更新してください。",
            f"This koin does not know the backup's database revision {revision} (the backup "
            "was made by a newer koin); upgrade koin first.",
        )


def restore_backup(
    archive: Path,
    home: Path,
    database_url: str,
    *,
    passphrase: bytes | None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    now: dt.datetime | None = None,
) -> RestoreReport:
    """Restore the backup ``archive`` into ``home`` and the database at ``database_url``.

    With ``force``, a ``home`` that is not empty is first moved aside whole (see
    :func:`_move_aside`; a SQLite database inside it goes along), so that it then holds exactly
    the backup's files; koin's tables in a database elsewhere (PostgreSQL, or SQLite outside
    ``home``) are dropped.

    :raises BackupError: the archive is missing, unreadable, damaged or altered; it holds
        secrets and ``passphrase`` is missing or wrong; it was made by a newer koin; the target
        already holds an installation and ``force`` is not set; the installation in ``home``
        cannot be moved aside (nothing is changed then); the rows do not fit the database
        (nothing is loaded then; the message says where the old installation went).
    """
    say = progress or (lambda _message: None)
    with _archive_file(archive) as source:
        checked = _read_checked(source)
        manifest = checked.manifest
        opened = _decrypt_secrets(checked, passphrase)
        revision = manifest["alembic_revision"]
        _check_revision(revision)
        home_empty, database_empty = target_is_empty(home, database_url)
        if not force and not (home_empty and database_empty):
            where = [] if home_empty else [str(home)]
            where += [] if database_empty else [make_url(database_url).render_as_string()]
            raise BackupError(
                f"復元先に既にインストールがあります({', '.join(where)})。空の KOIN_HOME と"
                "データベースに復元するか、置き換えるなら --force を付けてください。",
                f"The target already holds an installation ({', '.join(where)}); restore into "
                "an empty KOIN_HOME and database, or add --force to replace it.",
            )
        say(f"checked {len(manifest['members'])} members")
        replaced = None
        if not home_empty:  # only with force
            replaced = _move_aside(home, now or utcnow())
            say(f"moved the installation in {home} aside to {replaced}")
        try:
            if replaced is not None:
                # a SQLite database inside KOIN_HOME went along: nothing left to drop
                database_empty = target_is_empty(home, database_url)[1]
            counts = _restore_into(source, manifest, opened, home, database_url, database_empty)
        except Exception as exc:  # whatever stops it: the operator must learn where it went
            if replaced is None:
                raise
            if isinstance(exc, ContractsError):
                reason, reason_en = exc.message, exc.message_en or exc.message
            else:
                detail = (str(exc).splitlines() or [""])[0][:300]
                reason = f"復元できませんでした({exc.__class__.__name__}: {detail})。"
                reason_en = f"The restore failed ({exc.__class__.__name__}: {detail})."
            raise BackupError(
                f"{reason} 以前のインストールは {replaced} に移してあります。",
                f"{reason_en} The previous installation was moved to {replaced}.",
            ) from exc
        say(f"loaded {sum(counts.values())} rows at revision {revision}")
    return RestoreReport(
        revision, manifest["koin_version"], manifest["created_at"], counts,
        sum(1 for f in manifest["files"] if not f["encrypted"]),
        sum(1 for f in manifest["files"] if f["encrypted"]),
        replaced,
    )


def _restore_into(
    source: IO[bytes],
    manifest: dict[str, Any],
    opened: dict[str, bytes],
    home: Path,
    database_url: str,
    database_empty: bool,
) -> dict[str, int]:
    """Load the rows and write the files of a checked backup; the row counts.

    :raises BackupError: the rows do not fit the database (nothing is loaded then); a file
        cannot be written.
    """
    revision = manifest["alembic_revision"]
    home.mkdir(parents=True, exist_ok=True)
    backed_up = {t["name"] for t in manifest["tables"]}
    try:
        if not database_empty:  # only with force
            _drop_tables(database_url, backed_up)
        migrate.upgrade(database_url, revision)
        counts = _load_rows(source, manifest, database_url)
    except (SQLAlchemyError, ContractsError) as exc:
        # The rows are loaded in one transaction; take away the tables made for them too, so
        # that the target is as empty as it was and the restore can be run again.
        with suppress(SQLAlchemyError):
            _drop_tables(database_url, backed_up)
        if isinstance(exc, ContractsError):
            raise
        raise BackupError(
            "データベースに行を読み込めません。",
            f"Cannot load the rows into the database ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0][:300]}).",
        ) from exc
    _write_files(source, manifest, opened, home, database_url)
    migrate.upgrade(database_url)
    return counts


def _move_aside(home: Path, now: dt.datetime) -> Path:
    """Move everything in ``home`` aside before a forced restore; where it went.

    Preferably ``home`` itself is renamed to the sibling ``<home>.replaced-<UTC time>`` and
    made anew, empty, with its mode (one atomic rename). Where that cannot be (``home`` is a
    mount point, as a container's volume is, or a symbolic link, or its parent is not
    writable), its contents are moved into ``<home>/.replaced-<UTC time>`` instead.

    :raises BackupError: neither works; nothing was moved then.
    """
    home = home.absolute()  # "." has no parent to be renamed in
    stamp = now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    status = home.lstat()
    if not home.is_symlink() and not os.path.ismount(home):
        sibling = _reserve(home.parent, f"{home.name}.replaced-{stamp}")
        if sibling is not None:
            try:
                os.rename(home, sibling)  # over the empty folder just reserved
            except OSError:
                with suppress(OSError):
                    sibling.rmdir()
            else:
                home.mkdir(mode=0o700)
                os.chmod(home, stat.S_IMODE(status.st_mode))
                if (status.st_uid, status.st_gid) != (os.getuid(), os.getgid()):
                    with suppress(OSError):
                        os.chown(home, status.st_uid, status.st_gid)
                return sibling
    inside = _reserve(home, f".replaced-{stamp}")
    problem: OSError | None = None
    if inside is not None:
        moved: list[str] = []
        try:
            for entry in sorted(home.iterdir()):
                if entry.name != inside.name:
                    os.rename(entry, inside / entry.name)
                    moved.append(entry.name)
            return inside
        except OSError as exc:
            problem = exc
            for name in reversed(moved):  # put back what was moved
                with suppress(OSError):
                    os.rename(inside / name, home / name)
            with suppress(OSError):
                inside.rmdir()
    reason = f" ({problem.__class__.__name__}: {problem.strerror})" if problem else ""
    raise BackupError(
        f"{home} にある既存のインストールを退避できません({home.parent} にも {home} にも"
        f"移せません){reason}。何も変更していません。書き込めるようにしてから --force で"
        "もう一度実行してください。",
        f"Cannot move the installation in {home} aside (neither beside it in {home.parent} "
        f"nor into it){reason}; nothing was changed. Make one of them writable and run the "
        "restore with --force again.",
    )


def _reserve(folder: Path, name: str) -> Path | None:
    """A new empty folder ``folder/name`` (``name-2``, ``-3`` … if taken), mode 0700; None if
    none can be made."""
    for number in range(1, 100):
        candidate = folder / (name if number == 1 else f"{name}-{number}")
        try:
            candidate.mkdir(mode=0o700)
        except FileExistsError:
            continue
        except OSError:
            return None
        return candidate
    return None


def _drop_tables(database_url: str, backed_up: set[str]) -> None:
    ours = backed_up | set(Base.metadata.tables) | {_ALEMBIC_TABLE}
    with _engine(database_url) as engine, engine.begin() as conn:
        reflected = _reflect(conn)
        doomed = [t for t in reflected.sorted_tables if t.name in ours]
        reflected.drop_all(conn, tables=doomed)


def _load_rows(
    source: IO[bytes], manifest: dict[str, Any], database_url: str
) -> dict[str, int]:
    """Insert every dumped row in one transaction; set PostgreSQL's sequences.

    :raises BackupError: a table or column of the dump is not in the database, or a value
        does not fit its column.
    """
    tables = {t["member"]: t for t in manifest["tables"]}
    counts: dict[str, int] = {}
    with _engine(database_url) as engine, engine.begin() as conn:
        reflected = _reflect(conn)
        naive_everywhere = conn.dialect.name == "sqlite"
        loaded: dict[str, tuple[Table, dict[str, Any]]] = {}
        for entry in manifest["tables"]:
            table = reflected.tables.get(entry["name"])
            columns = {name: kind for name, kind in entry["columns"]}
            if table is None or not set(columns) <= set(table.columns.keys()):
                raise BackupError(
                    f"表 {entry['name']} がデータベースの版 {manifest['alembic_revision']} と"
                    "合いません。",
                    f"The table {entry['name']} does not fit the database at revision "
                    f"{manifest['alembic_revision']}.",
                )
            for column in table.columns:
                if isinstance(column.type, JSON):
                    column.type = JSON(none_as_null=True)
            loaded[entry["member"]] = (table, columns)
        expected = [t["member"] for t in manifest["tables"]]
        with _open_archive(source) as tar:
            for info, handle in _members(tar):
                if info.name not in tables:
                    continue
                # the dump is loaded as it streams by: in the order it was written, which is
                # the order of the foreign keys
                if not expected or expected.pop(0) != info.name:
                    raise _damaged("表の順序が目録と違います", "tables are out of order")
                table, columns = loaded[info.name]
                naive = {
                    name: naive_everywhere or not getattr(table.c[name].type, "timezone", True)
                    for name in columns
                }
                counts[table.name] = _insert_rows(conn, table, columns, naive, handle, info.name)
        if conn.dialect.name == "postgresql":
            _reset_sequences(conn, [loaded[m][0] for m in tables])
    return counts


def _insert_rows(
    conn: Connection,
    table: Table,
    columns: dict[str, str],
    naive: dict[str, bool],
    handle: IO[bytes],
    member: str,
) -> int:
    batch: list[dict[str, Any]] = []
    rows = 0
    for number, line in enumerate(handle, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or set(record) != set(columns):
                raise ValueError("columns differ")
            batch.append({
                name: _decode(columns[name], value, naive=naive[name])
                for name, value in record.items()
            })
        except (ValueError, TypeError) as exc:
            raise BackupError(
                f"{member} の {number} 行目を読めません。",
                f"Line {number} of {member} cannot be read ({exc}).",
            ) from exc
        if len(batch) >= _INSERT_CHUNK:
            conn.execute(insert(table), batch)
            rows += len(batch)
            batch = []
    if batch:
        conn.execute(insert(table), batch)
        rows += len(batch)
    return rows


def _reset_sequences(conn: Connection, tables: list[Table]) -> None:
    quote = conn.dialect.identifier_preparer.quote
    for table in tables:
        for column in table.primary_key.columns:
            if not isinstance(column.type, Integer):
                continue
            sequence = conn.scalar(
                text("SELECT pg_get_serial_sequence(:table, :column)"),
                {"table": quote(table.name), "column": column.name},
            )
            if sequence is None:
                continue
            highest = conn.scalar(select(func.max(column)))
            conn.execute(
                text("SELECT setval(CAST(:sequence AS regclass), :value, :called)"),
                {"sequence": sequence, "value": highest or 1, "called": highest is not None},
            )


def _write_files(
    source: IO[bytes],
    manifest: dict[str, Any],
    opened: dict[str, bytes],
    home: Path,
    database_url: str,
) -> None:
    """Write the folders and files of the backup below ``home``: each file through a
    temporary file that is fsynced and renamed into place; an ordinary file streamed in pieces
    and hashed again on the way (the backup file could have changed since it was checked).

    :raises BackupError: a member differs from the checked one; a file cannot be written.
    """
    root = home.resolve()
    database = _sqlite_file(database_url)
    protected = set()
    if database is not None:
        protected = {database.with_name(database.name + s) for s in _SQLITE_COMPANIONS}
    for folder in manifest["folders"]:
        path = root / folder["path"]
        if not path.resolve().is_relative_to(root):
            continue
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(folder["mode"] & 0o777)
    by_member = {f["member"]: f for f in manifest["files"]}
    with _open_archive(source) as tar:
        for info, handle in _members(tar):
            entry = by_member.get(info.name)
            if entry is None:
                continue
            path = root / entry["path"]
            if path.resolve() in protected or not path.resolve().is_relative_to(root):
                continue
            try:
                with atomic_writer(path, mode=entry["mode"] & 0o777) as out:
                    if entry["encrypted"]:
                        out.write(opened[info.name])
                    else:
                        _copy_checked(handle, out, info.name, manifest["members"][info.name])
            except OSError as exc:
                raise BackupError(
                    f"{path} を書き込めません。", f"Cannot write {path} ({exc.strerror})."
                ) from exc
            with suppress(OSError):
                os.utime(path, (float(entry["mtime"]), float(entry["mtime"])))


def _copy_checked(handle: IO[bytes], out: IO[bytes], member: str, sha256: str) -> None:
    """Copy a member in pieces, checking its SHA-256 at the end (``out`` is then thrown away).

    :raises BackupError: the member differs from the one checked before.
    """
    digest = hashlib.sha256()
    while chunk := handle.read(_READ_CHUNK):
        digest.update(chunk)
        out.write(chunk)
    if digest.hexdigest() != sha256:
        raise BackupError(
            f"バックアップファイルの {member} が確認のあとで変わりました。復元は途中までです。",
            f"{member} in the backup file changed after it was checked; the restore is "
            "incomplete.",
        )

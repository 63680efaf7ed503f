"""``koin --server URL --api-key-file F sign-batch``: the same folder-to-folder signing for RPA
robots, done by a remote koin through its REST API (``/api/v1/batches``).

The server signs each uploaded document exactly once; the client only has to never upload an
input twice and never lose a signed file. So before uploading it writes the batch's ID to
``OUT_DIR/.koin-remote.json``; a run that was interrupted (even ``kill -9``) finds the batch
there on the next run, looks up which inputs it already holds (by file name and SHA-256),
uploads only the rest (into the same batch while it is still a draft, else into a new one),
and downloads what is signed. Each signed file is checked (its SHA-256 as the server reports
it, and that it starts with the input's bytes: a signature is an incremental update), written
atomically, and then its manifest row is appended and fsynced, as in local mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from keys import KoinError

from ._sign_batch import (
    BatchSummary,
    Row,
    Status,
    _already_signed,
    _ManifestAppender,
    _rewrite_manifest,
    _sha256_file,
    list_inputs,
    read_manifest,
)

__all__ = ["ApiClient", "RemoteError", "read_api_key", "run_remote_batch"]

STATE_FILE = ".koin-remote.json"
UPLOAD_GROUP = 100
PAGE = 1000
POLL_SECONDS = 1.0
TIMEOUT = 300


class RemoteError(KoinError):
    """The server could not be reached or refused the request."""


def read_api_key(path: Path) -> str:
    """The API key in ``path`` (its first line), which must be readable by its owner only.

    :raises RemoteError: missing, empty, or readable by others.
    """
    try:
        mode = path.stat().st_mode
        text = path.read_text("utf-8").strip()
    except OSError as exc:
        raise RemoteError(
            f"API キーのファイル {path} を読めません。",
            f"Cannot read the API key file {path} ({exc.strerror}).",
        ) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise RemoteError(
            f"API キーのファイル {path} は本人以外も読めます。chmod 600 にしてください。",
            f"The API key file {path} is readable by others; chmod 600 it.",
        )
    key = text.splitlines()[0].strip() if text else ""
    if not key:
        raise RemoteError(
            f"API キーのファイル {path} が空です。", f"The API key file {path} is empty."
        )
    return key


class ApiClient:
    """The batch API of one koin server, with one API key."""

    def __init__(self, server: str, api_key: str) -> None:
        self.base = server.rstrip("/")
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {api_key}"
        self.http.headers["User-Agent"] = "koin-cli"

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """:raises RemoteError: no answer, or an error answer (its message)."""
        url = path if path.startswith("http") else f"{self.base}{path}"
        for attempt in range(5):
            try:
                response = self.http.request(method, url, timeout=TIMEOUT, **kwargs)
            except requests.RequestException as exc:
                raise RemoteError(
                    f"サーバー {self.base} に接続できません。",
                    f"Cannot reach the server {self.base} ({exc.__class__.__name__}).",
                ) from exc
            if response.status_code == 429 and attempt < 4:  # rate limited: wait as told
                time.sleep(min(30.0, float(response.headers.get("Retry-After", "1") or 1)))
                continue
            break
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                message, message_en = str(error["message"]), str(error["message_en"])
            except (ValueError, KeyError, TypeError):
                message = message_en = f"HTTP {response.status_code}"
            raise RemoteError(
                f"サーバーが拒否しました({response.status_code}): {message}",
                f"The server refused ({response.status_code}): {message_en}",
                status=response.status_code,
            )
        return response

    def create_batch(self, template: str | None, name: str) -> str:
        body: dict[str, Any] = {"name": name}
        if template:
            body["template"] = template
        return str(self._call("POST", "/api/v1/batches", json=body).json()["id"])

    def batch(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/api/v1/batches/{batch_id}").json()
        return result

    def documents(self, batch_id: str, state: str | None = None) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            params: dict[str, Any] = {"offset": offset, "limit": PAGE}
            if state:
                params["state"] = state
            page = self._call(
                "GET", f"/api/v1/batches/{batch_id}/documents", params=params
            ).json()["documents"]
            yield from page
            if len(page) < PAGE:
                return
            offset += PAGE

    def upload(self, batch_id: str, files: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        parts = [("file", (name, data, "application/pdf")) for name, data in files]
        added: list[dict[str, Any]] = self._call(
            "POST", f"/api/v1/batches/{batch_id}/documents", files=parts
        ).json()["added"]
        return added

    def start(self, batch_id: str) -> None:
        self._call("POST", f"/api/v1/batches/{batch_id}/start")

    def download(self, url: str) -> tuple[bytes, str]:
        response = self._call("GET", url)
        return response.content, response.headers.get("X-Koin-SHA256", "")


@dataclass
class _Tracked:
    """An input the server holds: where, and what became of it."""

    source: Path
    input_sha256: str
    batch_id: str
    position: int


def _read_state(path: Path, server: str) -> list[str]:
    try:
        state = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(state, dict) or state.get("server") != server:
        return []
    return [str(b) for b in state.get("batches", []) if isinstance(b, str)]


def _write_state(path: Path, server: str, batches: list[str]) -> None:
    data = json.dumps({"server": server, "batches": batches}, indent=2).encode()
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_output(path: Path, data: bytes) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def run_remote_batch(
    client: ApiClient,
    server: str,
    in_dir: Path,
    out_dir: Path,
    *,
    template: str | None,
    manifest: Path,
    workers: int = 2,
    language: str = "ja",
    report: Callable[[int, int, Row, str], None] = lambda done, total, row, label: None,
) -> BatchSummary:
    """Sign every ``*.pdf`` of ``in_dir`` into ``out_dir`` through the server's batch API,
    resumably (see the module). ``workers`` downloads run at once.

    :raises RemoteError: the server cannot be reached or refuses (e.g. a bad API key); what
        was signed so far is in the manifest, and a new run carries on.
    :raises OSError: the folders or the manifest cannot be read or written.
    """
    inputs = list_inputs(in_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = read_manifest(manifest)
    state_path = out_dir / STATE_FILE
    rows: dict[str, Row] = {}
    pending: dict[tuple[str, str], Path] = {}
    skipped_rows: list[Row] = []
    for source in inputs:
        digest = _sha256_file(source)
        row = previous.get(source.name)
        if row is not None and _already_signed(row, digest, out_dir / source.name):
            rows[source.name] = row
            skipped_rows.append(row)
        else:
            pending[(source.name, digest)] = source
    _rewrite_manifest(manifest, skipped_rows)
    total, done = len(inputs), 0
    counts = {Status.SIGNED: 0, Status.SKIPPED: len(skipped_rows), Status.FAILED: 0}
    for row in skipped_rows:
        done += 1
        report(done, total, row, Status.SKIPPED.value)

    # Inputs that an earlier, interrupted run already handed to the server.
    tracked: dict[tuple[str, int], _Tracked] = {}
    batches = _read_state(state_path, server)
    draft: str | None = None
    for batch_id in batches:
        try:
            status = client.batch(batch_id)["status"]
        except RemoteError as exc:
            if getattr(exc, "status", None) == 404:
                continue
            raise
        if status == "draft":
            draft = batch_id
        for document in client.documents(batch_id):
            key = (document["file_name"], document["input_sha256"])
            found: Path | None = pending.pop(key, None)
            if found is not None:
                tracked[(batch_id, document["position"])] = _Tracked(
                    found, key[1], batch_id, document["position"]
                )

    if pending:
        batch_id = draft or client.create_batch(template, f"koin sign-batch {in_dir.name}")
        if batch_id not in batches:
            batches.append(batch_id)
            _write_state(state_path, server, batches)  # before anything is uploaded
        draft = batch_id
        queue = list(pending.items())
        for first in range(0, len(queue), UPLOAD_GROUP):
            group = queue[first:first + UPLOAD_GROUP]
            files = [(source.name, source.read_bytes()) for _, source in group]
            for document, ((_, digest), source) in zip(
                client.upload(batch_id, files), group, strict=True
            ):
                tracked[(batch_id, document["position"])] = _Tracked(
                    source, digest, batch_id, document["position"]
                )
    if draft is not None and any(t.batch_id == draft for t in tracked.values()):
        client.start(draft)

    appender = _ManifestAppender(manifest)
    try:
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="koin-download") as pool:
            while tracked:
                finished: list[tuple[_Tracked, dict[str, Any]]] = []
                for batch_id in {t.batch_id for t in tracked.values()}:
                    for state in ("done", "failed"):
                        for document in client.documents(batch_id, state):
                            item = tracked.get((batch_id, document["position"]))
                            if item is not None:
                                finished.append((item, document))
                if not finished:
                    time.sleep(POLL_SECONDS)
                    continue
                fetched = pool.map(
                    lambda pair: _fetch(client, out_dir, pair[0], pair[1], language), finished
                )
                for (item, _), row in zip(finished, fetched, strict=True):
                    del tracked[(item.batch_id, item.position)]
                    appender.append(row)
                    rows[row.input_name] = row
                    counts[row.status] += 1
                    done += 1
                    report(done, total, row, row.status.value)
    finally:
        appender.close()
    _rewrite_manifest(manifest, (rows[s.name] for s in inputs if s.name in rows))
    state_path.unlink(missing_ok=True)
    return BatchSummary(
        total, counts[Status.SIGNED], counts[Status.SKIPPED], counts[Status.FAILED], manifest
    )


def _fetch(
    client: ApiClient, out_dir: Path, item: _Tracked, document: dict[str, Any], language: str
) -> Row:
    """The manifest row of a finished document, after writing its signed file.

    :raises RemoteError: the download failed or is not a signature of the input.
    """
    name = item.source.name
    if document["state"] == "failed":
        error = document.get("error_en" if language == "en" else "error") or "failed"
        return Row(name, item.input_sha256, error=" ".join(str(error).split()))
    data, reported = client.download(document["download"])
    digest = hashlib.sha256(data).hexdigest()
    source = item.source.read_bytes()
    if digest != reported or digest != document["output_sha256"] or not data.startswith(source):
        raise RemoteError(
            f"{name} の署名済みファイルが壊れています(ハッシュ不一致)。",
            f"The signed file of {name} arrived damaged (hash mismatch).",
        )
    _write_output(out_dir / name, data)
    return Row(name, item.input_sha256, digest, str(document["document_id"]), Status.SIGNED)

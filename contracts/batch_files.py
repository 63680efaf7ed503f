"""Files in and out of a batch: PDFs taken from an uploaded ZIP, and the signed files (with a
manifest) streamed back as a ZIP.

Reading a ZIP is guarded against what ZIP files can do to a server: more entries than a batch
may hold, entries larger than a PDF may be (read with a limit, whatever the header claims, so
a decompression bomb stops at the limit), names with ``..`` or absolute paths (only the name
is used), encrypted entries, and Japanese names written by Windows in Shift_JIS without the
UTF-8 flag (decoded as CP932).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session

from .batches import (
    MAX_INPUT_BYTES,
    Batch,
    BatchDocument,
    DocumentState,
    list_documents,
)
from .errors import InvalidBatchData

__all__ = [
    "MANIFEST_COLUMNS",
    "MAX_ZIP_ENTRIES",
    "MAX_ZIP_TOTAL_BYTES",
    "ArchiveMember",
    "SkippedEntry",
    "ZipPdf",
    "archive_members",
    "manifest_csv",
    "read_zip_pdfs",
    "stream_zip",
]

#: The same columns as the manifest of ``koin sign-batch``.
MANIFEST_COLUMNS = (
    "input_name", "input_sha256", "output_sha256", "document_id", "status", "error",
)
MAX_ZIP_ENTRIES = 20_000
#: Everything read out of one uploaded ZIP together.
MAX_ZIP_TOTAL_BYTES = 4 * 2**30
_UTF8_NAME_FLAG = 0x800
_ENCRYPTED_FLAG = 0x1
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class ZipPdf:
    """A PDF found in the ZIP (not yet checked to be one): its name and bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class SkippedEntry:
    """An entry of the ZIP that was not taken, and why (Japanese and English)."""

    name: str
    reason: str
    reason_en: str


def _entry_name(info: zipfile.ZipInfo) -> str:
    name = info.filename
    if not info.flag_bits & _UTF8_NAME_FLAG:
        # zipfile decoded the raw name as CP437; Japanese Windows wrote CP932 (Shift_JIS).
        try:
            name = name.encode("cp437").decode("cp932")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass
    return name.replace("\\", "/")


def _is_system_junk(path: str) -> bool:
    parts = [part for part in path.split("/") if part]
    return not parts or parts[0] == "__MACOSX" or parts[-1].startswith(".") or (
        parts[-1].lower() in ("thumbs.db", "desktop.ini")
    )


def _flat_name(path: str) -> str:
    """``dir/sub/file.pdf`` → ``dir_sub_file.pdf``: folders kept in the name, no ``..``."""
    parts = [part for part in path.split("/") if part not in ("", ".", "..")]
    return "_".join(parts)


def read_zip_pdfs(
    source: BinaryIO | bytes,
    *,
    max_entries: int = MAX_ZIP_ENTRIES,
    max_file_bytes: int = MAX_INPUT_BYTES,
    max_total_bytes: int = MAX_ZIP_TOTAL_BYTES,
) -> Iterator[ZipPdf | SkippedEntry]:
    """The ``*.pdf`` entries of a ZIP, in the archive's order, and the entries skipped with
    their reason (not a ``.pdf``, encrypted, too large, unreadable). Folders and system files
    (``__MACOSX/``, ``.DS_Store``, ``Thumbs.db``) are left out silently.

    :raises InvalidBatchData: not a ZIP, more than ``max_entries`` entries, or more than
        ``max_total_bytes`` in all.
    """
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidBatchData(
            "zip", "ZIP ファイルとして読めません。", f"The file is not a readable ZIP ({exc})."
        ) from exc
    with archive:
        entries = [info for info in archive.infolist() if not info.is_dir()]
        if len(entries) > max_entries:
            raise InvalidBatchData(
                "zip",
                f"ZIP に含まれるファイルが多すぎます({max_entries} 件まで)。",
                f"The ZIP holds more than {max_entries} files.",
            )
        total = 0
        for info in entries:
            path = _entry_name(info)
            if _is_system_junk(path):
                continue
            name = _flat_name(path)
            if not name.lower().endswith(".pdf"):
                yield SkippedEntry(
                    path, "PDF(.pdf)ではないため取り込みませんでした。",
                    "Not taken: not a .pdf file.",
                )
                continue
            if info.flag_bits & _ENCRYPTED_FLAG:
                yield SkippedEntry(
                    path, "パスワード付き ZIP の項目は読めません。",
                    "Not taken: the ZIP entry is encrypted.",
                )
                continue
            if info.file_size > max_file_bytes:
                yield _too_large(path, max_file_bytes)
                continue
            try:
                with archive.open(info) as handle:
                    data = handle.read(max_file_bytes + 1)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
                yield SkippedEntry(
                    path, "ZIP の項目が壊れていて読めません。",
                    f"Not taken: the ZIP entry cannot be read ({exc.__class__.__name__}).",
                )
                continue
            if len(data) > max_file_bytes:  # the header understated the size
                yield _too_large(path, max_file_bytes)
                continue
            total += len(data)
            if total > max_total_bytes:
                raise InvalidBatchData(
                    "zip",
                    f"ZIP の中身が大きすぎます(合計 {max_total_bytes // 2**20} MiB まで)。",
                    f"The ZIP's contents exceed {max_total_bytes // 2**20} MiB in all.",
                )
            yield ZipPdf(name, data)


def _too_large(path: str, limit: int) -> SkippedEntry:
    return SkippedEntry(
        path,
        f"ファイルが大きすぎます({limit // 2**20} MiB まで)。",
        f"Not taken: larger than {limit // 2**20} MiB.",
    )


# -- signed files out ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveMember:
    """A signed file of the batch and its name inside the ZIP."""

    name: str
    path: Path


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        taken.add(name)
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    number = 2
    while True:
        candidate = f"{stem}-{number}.{suffix}" if dot else f"{stem}-{number}"
        if candidate not in taken:
            taken.add(candidate)
            return candidate
        number += 1


def manifest_csv(documents: list[BatchDocument], language: str = "ja") -> bytes:
    """The batch's manifest, like ``koin sign-batch`` writes it (UTF-8 with BOM for Excel):
    one row per document; status ``signed``, ``failed``, ``waiting`` or ``running``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(MANIFEST_COLUMNS)
    for document in documents:
        state = document.document_state
        status = "signed" if state is DocumentState.DONE else state.value
        error = (document.error_en if language == "en" else document.error) or ""
        writer.writerow([
            document.file_name, document.input_sha256, document.output_sha256 or "",
            document.document_id if state is DocumentState.DONE else "",
            status, " ".join(error.split()),
        ])
    return ("\ufeff" + out.getvalue()).encode("utf-8")


def archive_members(
    session: Session, batch: Batch, home: Path
) -> tuple[list[ArchiveMember], list[BatchDocument]]:
    """The signed files of ``batch`` (names made unique, upload order) and all its documents
    (for the manifest)."""
    documents = list_documents(session, batch)
    taken = {"manifest.csv"}
    members = [
        ArchiveMember(_unique(document.file_name, taken), home / document.output_path)
        for document in documents
        if document.document_state is DocumentState.DONE and document.output_path
    ]
    return members, documents


class _Sink(io.RawIOBase):
    """A write-only stream that hands out what was written since the last :meth:`take`;
    it cannot seek, so :mod:`zipfile` writes sizes after each member (data descriptors)."""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: list[bytes] = []
        self._offset = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = bytes(data)
        self._chunks.append(chunk)
        self._offset += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._offset

    def seekable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = 0) -> int:
        raise OSError("not seekable")

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


def stream_zip(
    members: Sequence[ArchiveMember], extra: Sequence[tuple[str, bytes]] = ()
) -> Iterator[bytes]:
    """A ZIP of ``members`` (read from disk a megabyte at a time, stored uncompressed: PDFs
    are compressed already) and the in-memory files ``extra``, produced piece by piece, so
    that a batch of any size is sent without being held in memory or on disk again.

    :raises OSError: a member's file disappeared (the ZIP is then incomplete).
    """
    sink = _Sink()
    now = dt.datetime.now().timetuple()[:6]
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, data in extra:
            archive.writestr(zipfile.ZipInfo(name, date_time=now), data)
            yield sink.take()
        for member in members:
            info = zipfile.ZipInfo(member.name, date_time=now)
            info.file_size = member.path.stat().st_size
            with member.path.open("rb") as source, archive.open(info, "w") as target:
                for chunk in iter(lambda: source.read(_COPY_CHUNK), b""):  # noqa: B023
                    target.write(chunk)
                    yield sink.take()
            yield sink.take()
    yield sink.take()

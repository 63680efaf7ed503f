"""Writing many files durably without one ``fsync`` per file.

A batch writes thousands of small files. ``fsync`` after each costs milliseconds apiece;
:func:`sync_filesystem` (Linux ``syncfs``) flushes all of them at once. Callers write their
files under temporary names, sync once, then give them their final names (``link``/
``rename``) and sync once more for the names: a final name therefore never points at an
incompletely written file, even after a power cut.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import tempfile
from pathlib import Path

__all__ = ["stage_file", "sync_filesystem"]

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _syncfs = _libc.syncfs
except (OSError, AttributeError):  # not Linux
    _libc = None


def sync_filesystem(path: Path) -> None:
    """Flush the written data and metadata of the filesystem holding ``path`` (a folder).

    :raises OSError: the folder cannot be opened, or the flush failed.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc is not None:
            if _syncfs(fd) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, os.strerror(errno), str(path))
        else:
            os.sync()
    finally:
        os.close(fd)


def stage_file(folder: Path, name: str, data: bytes, mode: int = 0o640) -> Path:
    """Write ``data`` to a new temporary file in ``folder`` (not yet synced); its path.

    :raises OSError: the file cannot be written.
    """
    folder.mkdir(mode=0o750, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return Path(temporary)

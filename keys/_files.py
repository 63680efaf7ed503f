"""Atomic file writes: a crash never leaves a half-written key, certificate or PDF behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_writer", "write_private_file", "write_public_file"]


@contextmanager
def atomic_writer(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A file to write ``path``'s new content to, in pieces: a temporary file in the same
    folder, fsynced and renamed over ``path`` when the block ends without an exception (and
    removed if it raises). Readers of ``path`` see the old content or the new, never a part.

    :raises OSError: the folder or the temporary file cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    with atomic_writer(path, mode) as handle:
        handle.write(data)


def write_private_file(path: Path, data: bytes) -> None:
    """Write a secret (key file, passphrase) readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, data, mode=0o600)


def write_public_file(path: Path, data: bytes) -> None:
    atomic_write(path, data, mode=0o644)

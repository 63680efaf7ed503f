"""Serial numbers of time-stamp tokens that never repeat, across threads, processes and restarts.

RFC 3161 §2.4.2: "Time-Stamping users MUST be ready to accommodate integers up to 160 bits" and
the serial number MUST be unique for each TimeStampToken issued by a given TSA.

The state file holds a high-water mark: every serial number up to it may already have been
issued. A process reserves a block of numbers by raising the mark (under an exclusive ``flock``
on a sibling lock file, written atomically and fsync'ed) *before* it hands out any number of
the block, so a crash or restart can only skip numbers, never repeat them. Numbers of a
reserved block are then handed out in memory under a thread lock.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import time
from pathlib import Path

from .errors import TimestampError

__all__ = ["SerialNumberAllocator"]

#: RFC 3161 §2.4.2: serial numbers of up to 160 bits.
MAX_SERIAL = 2**159 - 1
_HEADER = "koin-tsa-serial-high-water-mark v1"


class SerialNumberAllocator:
    """Hands out strictly increasing, never repeated serial numbers backed by ``state_file``.

    Safe for many threads of one instance, for several instances in one process and for
    several processes on the same state file (``flock`` locks belong to the open file
    description, so they exclude each other even within one process).

    A missing state file starts at the current Unix time shifted left by 32 bits: should the
    state directory ever be lost, the new serial numbers still lie above any number issued
    before (unless more than 2**32 tokens per second were issued).
    """

    def __init__(self, state_file: Path, block_size: int = 256) -> None:
        """
        :raises ValueError: ``block_size`` is not positive.
        """
        if block_size < 1:
            raise ValueError("block_size must be positive")
        self.state_file = state_file
        self.block_size = block_size
        self._lock_file = state_file.with_name(state_file.name + ".lock")
        self._thread_lock = threading.Lock()
        self._next = 0
        self._limit = 0  # exclusive: self._next == self._limit means "reserve a new block"

    def next(self) -> int:
        """The next serial number.

        :raises TimestampError: the state file cannot be read or written, or is corrupt.
        """
        with self._thread_lock:
            if self._next >= self._limit:
                self._next, self._limit = self._reserve_block()
            value = self._next
            self._next += 1
            return value

    def _reserve_block(self) -> tuple[int, int]:
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self._error("を開けません", "cannot be opened", exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
            high = self._read_high_water_mark()
            new_high = high + self.block_size
            if new_high > MAX_SERIAL:
                raise self._error(
                    "の通し番号が上限に達しました", "has run out of serial numbers", None
                )
            self._write_high_water_mark(new_high)
        except OSError as exc:
            raise self._error("を更新できません", "cannot be updated", exc) from exc
        finally:
            os.close(fd)
        return high + 1, new_high + 1

    def _read_high_water_mark(self) -> int:
        try:
            text = self.state_file.read_text("ascii")
        except FileNotFoundError:
            return int(time.time()) << 32
        except (OSError, UnicodeDecodeError) as exc:
            raise self._error("を読めません", "cannot be read", exc) from exc
        lines = text.splitlines()
        if len(lines) != 2 or lines[0] != _HEADER or not lines[1].isdigit():
            # Never guess: a wrong guess would re-issue serial numbers.
            raise self._error("が壊れています", "is corrupt", None)
        return int(lines[1])

    def _write_high_water_mark(self, value: int) -> None:
        directory = self.state_file.parent
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{self.state_file.name}.")
        try:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(f"{_HEADER}\n{value}\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, self.state_file)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    def _error(self, what_ja: str, what_en: str, cause: Exception | None) -> TimestampError:
        detail = f": {cause}" if cause is not None else ""
        return TimestampError(
            f"TSA の通し番号ファイル {self.state_file} {what_ja}{detail}",
            f"TSA serial-number state file {self.state_file} {what_en}{detail}",
            state_file=str(self.state_file),
        )

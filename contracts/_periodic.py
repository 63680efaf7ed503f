"""A background thread that runs one round of work every ``interval`` seconds."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any, Generic, Self, TypeVar

__all__ = ["PeriodicWorker"]

R = TypeVar("R")


class PeriodicWorker(ABC, Generic[R]):
    """Runs :meth:`run_once` right away and then every ``interval`` seconds until
    :meth:`stop`. :meth:`run_once` must log its own errors and never raise: nothing escapes
    the thread."""

    thread_name = "koin-worker"

    def __init__(self, interval: float) -> None:
        """:raises ValueError: ``interval`` is not positive."""
        if not interval > 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.interval = interval
        self._stopping = threading.Event()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None

    @abstractmethod
    def run_once(self) -> R | None:
        """One round; None if it failed as a whole (after logging why)."""

    def more_due(self, result: R | None) -> bool:
        """Whether to start the next round at once instead of waiting ``interval``."""
        return False

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Start the next round now instead of after the interval (new work arrived)."""
        self._wakeup.set()

    def start(self) -> None:
        """Start the thread.

        :raises RuntimeError: it is already running.
        """
        if self._thread is not None:
            raise RuntimeError(f"{self.thread_name} is already running")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 120.0) -> None:
        """Ask the thread to stop after the round it is running, and wait for it."""
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wakeup.clear()
            if self.more_due(self.run_once()):
                continue
            self._wakeup.wait(self.interval)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

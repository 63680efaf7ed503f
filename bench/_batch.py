"""A batch worker process for ``python -m bench`` (importable, so ``spawn`` can start it)."""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["run_worker"]


def run_worker(home: str, database_url: str, passphrase: str) -> None:
    """Work off running batches with one ``BatchWorker`` (one thread) until idle for ~1 s."""
    import contracts
    from contracts.batches import BatchWorker
    from signer import Installation

    os.environ["KOIN_KEY_PASSPHRASE"] = passphrase
    engine = contracts.make_engine(database_url)
    sessions = contracts.make_session_factory(engine)
    worker = BatchWorker(sessions, Installation(Path(home)), threads=1, interval=0.01)
    idle = 0
    while idle < 20:
        claimed = worker.run_once()
        idle = idle + 1 if not claimed else 0
        if not claimed:
            time.sleep(0.05)
    engine.dispose()

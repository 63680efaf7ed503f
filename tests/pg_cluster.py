"""A PostgreSQL cluster of a test's own (``initdb`` in a temporary folder, on a free port), so
that a test can stop and start "the database" without touching the suite's server. Same
approach as ``bench/faults.py``: the server runs as the ``postgres`` user (``runuser``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.servers import free_port

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), Path("/usr/bin"))


class ClusterCommandFailed(subprocess.CalledProcessError):
    """A failed PostgreSQL command, with what it printed and the server log's tail in its
    message (pytest shows only the message)."""

    def __init__(self, failed: subprocess.CalledProcessError, log: Path | None) -> None:
        super().__init__(failed.returncode, failed.cmd, failed.output, failed.stderr)
        self.log_tail = ""
        if log is not None and log.exists():
            self.log_tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])

    def __str__(self) -> str:
        return (f"{super().__str__()}\nstdout: {self.output}\nstderr: {self.stderr}"
                f"\nserver log:\n{self.log_tail}")


def _as_postgres(*args: str, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True,
                              text=True, check=True, timeout=180)
    except subprocess.CalledProcessError as exc:
        raise ClusterCommandFailed(exc, log) from None


class PrivateCluster:
    """``initdb`` + ``pg_ctl start`` in ``folder``; :meth:`stop` / :meth:`start` at will,
    :meth:`close` removes it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "pgdata"
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        for parent in folder.parents:  # postgres may pass through, not list
            if parent == Path("/") or parent == Path("/tmp"):
                break
            parent.chmod(parent.stat().st_mode | 0o711)
        shutil.chown(folder, "postgres")
        _as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                     "postgres", "--no-sync")
        self.start()
        _as_postgres(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                     "-U", "postgres", "koin")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/koin"

    def _ctl(self, *args: str) -> None:
        # -t 150: on a machine busy with other tests the default 60 s wait was not always enough
        log = self.folder / "pg.log"
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "150", "-l",
                     str(log), *args, log=log)

    def start(self) -> None:
        self._ctl("-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                  "-c fsync=off -c shared_buffers=16MB", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def close(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.folder, ignore_errors=True)

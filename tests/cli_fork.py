"""Run many ``koin`` command lines quickly: one process imports the CLI once, then each command
runs in a forked copy of it, with its own environment, working folder, standard output and
error (files) and exit code — a real process each, minus the 1.5 s of imports per start.

Used by tests that put dozens of files through the CLI (``tests/test_hostile_corpus.py``);
tests that check the installed ``koin`` executable itself still start it with ``subprocess``.

Protocol: ``python -m tests.cli_fork PARALLEL`` reads one JSON object per line on standard
input — ``{"argv": [...], "env": {...}, "cwd": "...", "stdout": "file", "stderr": "file"}`` —
and, once standard input ends, writes one JSON line per job, in the same order:
``{"returncode": N, "seconds": S}``. A job running longer than ``timeout`` seconds (default
120) is killed (SIGKILL; ``returncode`` is then -9).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CliJob", "run_jobs"]


@dataclass(frozen=True)
class CliJob:
    argv: Sequence[str]
    env: dict[str, str]
    cwd: Path
    stdout: Path
    stderr: Path
    timeout: float = 120.0

    def to_json(self) -> str:
        return json.dumps({
            "argv": list(self.argv), "env": self.env, "cwd": str(self.cwd),
            "stdout": str(self.stdout), "stderr": str(self.stderr), "timeout": self.timeout,
        })


def run_jobs(jobs: Sequence[CliJob], parallel: int = 2) -> list[dict[str, Any]]:
    """Run ``jobs`` in forked copies of one CLI process; their results in the same order."""
    process = subprocess.run(
        [sys.executable, "-m", "tests.cli_fork", str(parallel)],
        input="".join(job.to_json() + "\n" for job in jobs),
        capture_output=True, text=True, check=False,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=60 + sum(job.timeout for job in jobs),
    )
    if process.returncode != 0:
        raise RuntimeError(f"cli_fork failed ({process.returncode}): {process.stderr}")
    return [json.loads(line) for line in process.stdout.splitlines()]


def _child(job: dict[str, Any]) -> None:
    """In the forked process: become the command line of ``job``; never returns."""
    code = 70
    try:
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        from web.cli import main

        try:
            main(job["argv"])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # the harness itself failed: say so on the job's stderr
        import traceback

        traceback.print_exc()
        code = 71
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _serve(parallel: int) -> None:
    import web.cli  # noqa: F401  # the whole point: imported once, before any fork

    jobs = [json.loads(line) for line in sys.stdin if line.strip()]
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    running: dict[int, tuple[int, float]] = {}  # pid → (index, started)
    upcoming = iter(range(len(jobs)))
    exhausted = False
    while running or not exhausted:
        while not exhausted and len(running) < parallel:
            index = next(upcoming, None)
            if index is None:
                exhausted = True
                break
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(jobs[index])
            running[pid] = (index, time.monotonic())
        if not running:
            break
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            for other, (index, started) in list(running.items()):
                if now - started > float(jobs[index].get("timeout", 120)):
                    os.kill(other, signal.SIGKILL)
            time.sleep(0.01)
            continue
        index, started = running.pop(pid)
        results[index] = {
            "returncode": os.waitstatus_to_exitcode(status),
            "seconds": round(time.monotonic() - started, 3),
        }
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else 2)

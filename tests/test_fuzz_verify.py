"""A minute of fuzzing in the suite: ``bench/fuzz_verify.py`` (atheris) on ``verify_pdf`` for
45 s and on ``POST /api/v1/verify`` for 15 s, each in its own process, with no crash, no
timeout, and mutated inputs actually run (libFuzzer's own count). Longer runs are by hand
(see the script's docstring and the README)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.corpus import NAMES

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "fuzz_verify.py"
#: Seeds: the corpus, one signed PDF per level, a certified one and one with two signatures.
SEEDS = len(NAMES) + 4 + 2


@pytest.mark.slow
@pytest.mark.parametrize(("target", "seconds", "mutated"), [("lib", 45, 200), ("web", 15, 20)])
def test_fuzzing_finds_no_crash(
    target: str, seconds: int, mutated: int, koin_home: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home, ignore=shutil.ignore_patterns("koin.db*"))
    workdir = tmp_path / "fuzz"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOIN_")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--target", target, "--home", str(home),
         "--workdir", str(workdir), f"-max_total_time={seconds}", "-seed=20261201"],
        capture_output=True, text=True, env=env, timeout=seconds + 240, check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "Uncaught Python exception" not in output and "ERROR: libFuzzer" not in output
    assert list((workdir / "crashes").iterdir()) == [], "crash or timeout inputs were written"
    assert f"{SEEDS - 1} files found" in output, output[-3000:]  # libFuzzer skips empty.pdf
    runs = re.search(r"^Done (\d+) runs in (\d+) second", output, re.MULTILINE)
    assert runs, output[-3000:]
    assert int(runs.group(1)) >= SEEDS + mutated, f"only {runs.group(1)} runs"
    assert int(runs.group(2)) >= seconds - 1

"""``python -m bench._rss raw|koin HOME IN OUT``: sign one large file, print peak RSS as JSON.

Runs in its own process so that ``ru_maxrss`` is this signature's peak and nothing else's.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def _peak_mib() -> float:
    """VmHWM: the peak of this program's memory. (``ru_maxrss`` would include the parent's
    size at the fork before ``exec``.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    kind, home = sys.argv[1], Path(sys.argv[2])
    source, target = Path(sys.argv[3]), Path(sys.argv[4])
    text = "\n".join(
        ["茨城県知事", "Governor of Ibaraki Prefecture", "署名日時 令和8年4月1日 09:00 JST",
         "文書番号 ABCD-EFGH-JKMN-PQRS"]
    )
    if kind == "raw":
        from bench._raw import RawPyHanko

        raw = RawPyHanko(home, os.environ["KOIN_KEY_PASSPHRASE"].encode())
        baseline = _peak_mib()
        start = time.perf_counter()
        with source.open("rb") as inp, target.open("w+b") as out:
            raw.sign(inp, stamp_text=text, output=out)
    else:
        from keys import Role
        from signer import Installation, sign_pdf

        context = Installation(home).signing_context(Role.POSITION)
        baseline = _peak_mib()
        start = time.perf_counter()
        sign_pdf(source, context, output=target)
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_rss_mib": _peak_mib(), "baseline_mib": baseline, "seconds": seconds}))


if __name__ == "__main__":
    main()

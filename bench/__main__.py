"""``python -m bench``: koin against stock pyHanko, measured side by side in one run.

Prints a table (figure, raw pyHanko, koin, ratio, target, met) and writes ``bench/results.json``.
Everything runs on this machine: a fresh demo installation in a temporary folder, inputs made
by ``signer.samples`` (1 and 20 pages) and a 1 GiB PDF written in pieces and deleted afterwards.
``--profile`` also writes cProfile listings to ``bench/profiles/``. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PASSPHRASE = "bench-passphrase-not-secret"
GIB = 1 << 30


@dataclass
class Figure:
    name: str
    unit: str
    raw: float | None
    koin: float | None
    target: str
    met: bool | None
    note: str = ""

    @property
    def ratio(self) -> str:
        if self.raw is None or self.koin is None or not self.raw or not self.koin:
            return "—"
        if self.unit in ("docs/s",):
            return f"{self.koin / self.raw:.1f}×"
        return f"{self.raw / self.koin:.1f}×"


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "not measured"
    if unit == "docs/s":
        return f"{value:,.1f} docs/s"
    if unit == "ms":
        return f"{value:,.1f} ms"
    if unit == "s":
        return f"{value:,.1f} s"
    if unit == "MiB":
        return f"{value:,.0f} MiB"
    return f"{value:g} {unit}"


def _rate(function: Callable[[], Any], count: int) -> float:
    function()  # warm-up: key, template, prepared stamp
    start = time.perf_counter()
    for _ in range(count):
        function()
    return count / (time.perf_counter() - start)


def _times(function: Callable[[], Any], count: int) -> list[float]:
    function()
    result = []
    for _ in range(count):
        start = time.perf_counter()
        function()
        result.append((time.perf_counter() - start) * 1000)
    return result


# -- set-up ---------------------------------------------------------------------------------


def _installation(home: Path) -> Any:
    import keys
    from signer import Installation

    keys.write_private_file(home / "keys" / "passphrase", PASSPHRASE.encode() + b"\n")
    installation = Installation(home)
    installation.initialize()  # demo PKI, font, seal, prepared stamp fonts
    return installation


# -- figures --------------------------------------------------------------------------------


def sign_figures(installation: Any, raw: Any, args: argparse.Namespace) -> list[Figure]:
    from keys import Role
    from signer import SignatureLevel, SigningContext, SignOptions, sign_pdf
    from signer.samples import make_permit_pdf

    one = make_permit_pdf(installation.font_file, pages=1)
    twenty = make_permit_pdf(installation.font_file, pages=20)
    context = installation.signing_context(Role.POSITION)
    plain = SigningContext(
        context.signer, context.timestamper, context.appearance, context.trust, fast=False
    )
    text = context.appearance.text("令和8年4月1日 09:00 JST", "ABCD-EFGH-JKMN-PQRS")
    figures = []
    for label, pdf in (("1-page", one), ("20-page", twenty)):
        raw_rate = _rate(lambda pdf=pdf: raw.sign(io.BytesIO(pdf), stamp_text=text), args.raw_docs)
        koin_rate = _rate(lambda pdf=pdf: sign_pdf(pdf, context), args.docs)
        plain_rate = _rate(lambda pdf=pdf: sign_pdf(pdf, plain), args.raw_docs)
        if label == "1-page":
            ratio = koin_rate / raw_rate
            figures.append(Figure(
                "batch B-T, Japanese seal stamp, 1-page permit, one core", "docs/s",
                raw_rate, koin_rate, "≥ 30× raw", ratio >= 30,
                f"koin's plain pyHanko path: {plain_rate:.1f} docs/s",
            ))
        else:
            figures.append(Figure(
                "batch B-T, Japanese seal stamp, 20-page permit, one core", "docs/s",
                raw_rate, koin_rate, "(no target)", None,
                f"koin's plain pyHanko path: {plain_rate:.1f} docs/s",
            ))
    for level in (SignatureLevel.B_B, SignatureLevel.B_LT, SignatureLevel.B_LTA):
        options = SignOptions(level=level)
        koin_rate = _rate(lambda options=options: sign_pdf(one, context, options), args.docs // 4)
        plain_rate = _rate(lambda options=options: sign_pdf(one, plain, options), 3)
        figures.append(Figure(
            f"{level.value}, seal stamp, 1-page permit, one core (koin plain → fast)", "docs/s",
            plain_rate, koin_rate, "(no target)", None, "raw column: koin's plain path",
        ))
    return figures


def verify_figure(installation: Any, raw: Any, args: argparse.Namespace) -> Figure:
    from asn1crypto import pem

    from keys import Role
    from signer import sign_pdf, verify_pdf
    from signer.samples import make_permit_pdf

    signed = sign_pdf(
        make_permit_pdf(installation.font_file), installation.signing_context(Role.POSITION)
    ).data
    assert signed is not None
    policy = installation.verify_policy()
    # Stock pyHanko in a process of its own: importing signer speeds pyHanko up in-process.
    with tempfile.TemporaryDirectory() as folder:
        trust = Path(folder)
        (trust / "signed.pdf").write_bytes(signed)
        for name, certificates in (("roots.pem", policy.trust_roots),
                                   ("others.pem", policy.other_certs)):
            (trust / name).write_bytes(b"".join(
                pem.armor("CERTIFICATE", c.dump()) for c in certificates))
        for number, crl in enumerate(policy.crls):
            (trust / f"{number}.crl").write_bytes(crl.dump())
        completed = subprocess.run(
            [sys.executable, "-m", "bench._raw_verify", str(trust / "signed.pdf"), str(trust),
             str(args.verify_runs)], capture_output=True, text=True, check=True, cwd=HERE.parent,
        )
    raw_result = json.loads(completed.stdout.strip().splitlines()[-1])
    koin_verdict = verify_pdf(signed, policy).passed
    koin_ms = statistics.median(_times(lambda: verify_pdf(signed, policy), args.verify_runs))
    raw_ms = float(raw_result["median_ms"])
    same = bool(raw_result["verdict"]) == koin_verdict
    return Figure(
        "verify a 1-page B-T PDF (median)", "ms", raw_ms, koin_ms, "≥ 3× raw",
        raw_ms / koin_ms >= 3 and same,
        f"verdicts: pyHanko {'valid' if raw_result['verdict'] else 'invalid'}, koin "
        f"{'PASSED' if koin_verdict else 'not PASSED'}; raw pyHanko timed in a process of its "
        f"own (koin's speedups not installed); {args.verify_runs} runs each",
    )


def api_figure(home: Path, args: argparse.Namespace) -> Figure:
    import contracts
    from contracts import create_api_key, create_user, migrate, session_scope
    from signer.samples import make_permit_pdf
    from web import create_app

    migrate.upgrade(contracts.database_url(home))
    engine = contracts.make_engine(contracts.database_url(home))
    sessions = contracts.make_session_factory(engine)
    with session_scope(sessions) as session:
        user, _ = create_user(session, "bench-signer@koin.local", ["signer"])
        _, key = create_api_key(session, user, name="bench", scopes=["sign"])
    engine.dispose()
    app = create_app({
        "KOIN_HOME": str(home), "TESTING": True, "KOIN_API_RATE": 100000.0,
        "KOIN_API_BURST": 100000,
    })
    client = app.test_client()
    pdf = make_permit_pdf(home / "assets" / "NotoSansCJKjp-Regular.otf")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/pdf"}

    def call() -> None:
        response = client.post("/api/v1/sign?level=B-T", data=pdf, headers=headers)
        assert response.status_code == 200, response.get_data(as_text=True)[:300]

    times = _times(call, args.api_requests)
    p50 = statistics.median(times)
    return Figure(
        "single sign + timestamp through POST /api/v1/sign, p50", "ms", None, p50,
        "≤ 30 ms", p50 <= 30,
        f"Flask test client, {args.api_requests} requests, SQLite record; "
        f"p90 {statistics.quantiles(times, n=10)[-1]:.1f} ms",
    )


def batch_figure(home: Path, args: argparse.Namespace) -> Figure:
    from bench._e2e import run_end_to_end
    from signer.samples import make_permit_pdf, numbered_copies

    count = args.batch_docs
    name = f"{count:,}-permit batch end to end (API → Celery workers → archive) on 2 cores"
    if count <= 0:
        return Figure(name, "s", None, None, "≤ 75 s", None, "not measured: --batch-docs 0")
    permit = make_permit_pdf(home / "assets" / "NotoSansCJKjp-Regular.otf")
    pdfs = list(numbered_copies(permit, count))
    result = run_end_to_end(
        home, pdfs, postgres_url=args.postgres_url, redis_url=args.redis_url,
        passphrase=PASSPHRASE,
    )
    complete = result.signed == count and result.in_archive == count
    return Figure(
        name, "s", None, result.seconds, "≤ 75 s (10,000)",
        (result.seconds <= 75 and complete) if count == 10000 else None,
        f"{result.signed:,} of {count:,} signed, {result.failed} failed, {result.in_archive:,} "
        f"in the archive ({result.archive_mib:,.0f} MiB); upload {result.upload_seconds:.1f} s, "
        f"signing {result.signing_seconds:.1f} s, archive {result.archive_seconds:.1f} s; "
        "koin serve (HTTP) → Redis → koin worker (Celery, 2 processes) → PostgreSQL",
    )


def rss_figure(work: Path, args: argparse.Namespace) -> Figure:
    from bench._inputs import write_large_pdf

    if args.big_mib <= 0:
        return Figure(
            "peak RSS signing a 1 GiB PDF (file in, file out)", "MiB", None, None,
            "≤ 128 MiB", None, "not measured: --big-mib 0",
        )
    big = work / "big.pdf"
    write_large_pdf(big, args.big_mib << 20)
    results = {}
    try:
        for kind in ("raw", "koin"):
            out = work / f"big-{kind}.pdf"
            completed = subprocess.run(
                [sys.executable, "-m", "bench._rss", kind, str(work / "home"), str(big), str(out)],
                capture_output=True, text=True, check=True,
                env={**os.environ, "KOIN_KEY_PASSPHRASE": PASSPHRASE},
            )
            results[kind] = json.loads(completed.stdout.strip().splitlines()[-1])
            out.unlink(missing_ok=True)
    finally:
        big.unlink(missing_ok=True)
    raw, koin = results["raw"], results["koin"]
    return Figure(
        f"peak RSS signing a {args.big_mib:,} MiB PDF (file in, file out)", "MiB",
        raw["peak_rss_mib"], koin["peak_rss_mib"], "≤ 128 MiB", koin["peak_rss_mib"] <= 128,
        f"B-T with the seal stamp; time raw {raw['seconds']:.1f} s, koin {koin['seconds']:.1f} s; "
        f"the signing process's own peak (VmHWM), imports included ({koin['baseline_mib']:.0f} MiB "
        "before signing)",
    )


# -- profiles -------------------------------------------------------------------------------


def write_profiles(installation: Any, raw: Any) -> list[Path]:
    from keys import Role
    from signer import SigningContext, sign_pdf, verify_pdf
    from signer.samples import make_permit_pdf

    pdf = make_permit_pdf(installation.font_file)
    context = installation.signing_context(Role.POSITION)
    plain = SigningContext(
        context.signer, context.timestamper, context.appearance, context.trust, fast=False
    )
    signed = sign_pdf(pdf, context).data
    assert signed is not None
    policy = installation.verify_policy()
    text = context.appearance.text("令和8年4月1日 09:00 JST", "ABCD-EFGH-JKMN-PQRS")
    jobs: dict[str, tuple[Callable[[], Any], int]] = {
        "sign-bt-stamp-raw-pyhanko": (lambda: raw.sign(io.BytesIO(pdf), stamp_text=text), 3),
        "sign-bt-stamp-koin-plain": (lambda: sign_pdf(pdf, plain), 3),
        "sign-bt-stamp-koin-fast": (lambda: sign_pdf(pdf, context), 100),
        "verify-bt-koin": (lambda: verify_pdf(signed, policy), 20),
    }
    written = []
    (HERE / "profiles").mkdir(exist_ok=True)
    for name, (function, count) in jobs.items():
        function()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(count):
            function()
        profile.disable()
        path = HERE / "profiles" / f"{name}.txt"
        with path.open("w", encoding="utf-8") as out:
            out.write(f"# {name}: {count} calls, cProfile, sorted by cumulative time\n")
            stats = pstats.Stats(profile, stream=out)
            stats.strip_dirs().sort_stats("cumulative").print_stats(45)
        written.append(path)
    return written


# -- output ---------------------------------------------------------------------------------


def print_table(figures: list[Figure]) -> str:
    rows = [("figure", "raw pyHanko", "koin", "ratio", "target", "met")]
    for f in figures:
        met = "—" if f.met is None else ("met" if f.met else "NOT met")
        rows.append((f.name, _fmt(f.raw, f.unit) if f.raw is not None else "—",
                     _fmt(f.koin, f.unit), f.ratio, f.target, met))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    notes = [f"- {f.name}: {f.note}" for f in figures if f.note]
    return "\n".join(lines + [""] + notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--docs", type=int, default=300, help="koin signatures per figure")
    parser.add_argument("--raw-docs", type=int, default=8, help="raw pyHanko signatures")
    parser.add_argument("--api-requests", type=int, default=200)
    parser.add_argument("--verify-runs", type=int, default=50)
    parser.add_argument("--batch-docs", type=int, default=10000, help="0 skips the batch")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "KOIN_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--redis-url", default=os.environ.get(
        "KOIN_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--only", choices=["sign", "verify", "api", "batch", "rss"],
                        action="append", help="run only these figures (repeatable)")
    parser.add_argument("--big-mib", type=int, default=1024, help="0 skips the large file")
    parser.add_argument("--profile", action="store_true", help="write bench/profiles/*.txt")
    parser.add_argument("--output", type=Path, default=HERE / "results.json")
    args = parser.parse_args(argv)

    os.environ["KOIN_KEY_PASSPHRASE"] = PASSPHRASE
    os.environ.pop("KOIN_TSA_URLS", None)
    from bench._raw import RawPyHanko

    with tempfile.TemporaryDirectory(prefix="koin-bench-") as tmp:
        work = Path(tmp)
        home = work / "home"
        installation = _installation(home)
        raw = RawPyHanko(home, PASSPHRASE.encode())
        figures: list[Figure] = []
        steps: dict[str, Callable[[], Any]] = {
            "sign": lambda: figures.extend(sign_figures(installation, raw, args)),
            "verify": lambda: figures.append(verify_figure(installation, raw, args)),
            "api": lambda: figures.append(api_figure(home, args)),
            "batch": lambda: figures.append(batch_figure(home, args)),
            "rss": lambda: figures.append(rss_figure(work, args)),
        }
        for key, step in steps.items():
            if args.only and key not in args.only:
                continue
            step()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
            print(f"… {figures[-1].name} (bench peak RSS {peak} MiB)", file=sys.stderr, flush=True)
        if args.profile:
            for path in write_profiles(installation, raw):
                print(f"profile: {path}", file=sys.stderr)
        shutil.rmtree(home / "batches", ignore_errors=True)

    table = print_table(figures)
    print(table)
    result = {
        "machine": {
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "load_average": os.getloadavg(),
        },
        "run_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "figures": [asdict(f) | {"ratio": f.ratio} for f in figures],
        "peak_rss_of_this_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }
    args.output.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", "utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

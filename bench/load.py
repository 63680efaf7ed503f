"""``python -m bench.load``: the public pages under load.

gunicorn (``web.wsgi:app``, sync workers, one per core) serves koin on PostgreSQL; ``wrk``
(Debian's package; a second process on loopback) requests for a fixed time, and its latency
distribution is read. Pages:

* ``consent``: the review and consent page a contractor sees at ``/c/<token>`` after entering
  the access code (the browser's session cookie is sent along, as a browser does): link
  lookup by hash, contract and party state, the rendered page with the 合意する button;
* ``first-open``: the same link opened without a session (a new browser): each request
  records an ``opened`` event on the contract's hash-chained audit log (row lock, hash,
  insert) and shows the code form — all on one contract here, the worst case;
* ``verify-form``: ``/verify``; ``verify-record``: ``/verify/<document id>`` (a record lookup);
* ``healthz`` for the floor of the stack.

Target (issue 8): the consent page at ≥ 300 requests/s with p99 ≤ 200 ms on this machine's two
cores. Prints a table and writes ``bench/load.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PASSPHRASE = "bench-passphrase-not-secret"
_LINK = re.compile(r"/c/([A-Za-z0-9_-]{43})\b")


@dataclass
class LoadFigure:
    page: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    target: str
    met: bool | None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def _ms(text: str) -> float:
    number = float(re.sub(r"[a-z]+$", "", text))
    unit = re.sub(r"^[0-9.]+", "", text)
    return number * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(
    url: str, seconds: int, connections: int, cookie: str | None = None
) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, non-2xx or socket errors) of ``wrk`` on ``url``."""
    headers = ["-H", f"Cookie: {cookie}"] if cookie else []
    completed = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", *headers, url],
        capture_output=True, text=True, check=True,
    )
    out = completed.stdout
    rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses:\s+(\d+)", r"Socket errors:.*?(\d+)"):
        match = re.search(pattern, out)
        if match:
            errors += int(match.group(1))
    return rate, p50, p99, errors


def _prepare(home: Path, database_url: str, public_url: str) -> dict[str, str]:
    """An installation with a sent contract and a signed document: the URLs to request."""
    from sqlalchemy import select

    import contracts
    import keys
    from contracts import PartySpec, migrate, session_scope
    from signer import Installation, SignOptions
    from signer.samples import make_permit_pdf

    keys.write_private_file(home / "keys" / "passphrase", PASSPHRASE.encode() + b"\n")
    installation = Installation(home, public_url=public_url)
    installation.initialize()
    migrate.upgrade(database_url)
    engine = contracts.make_engine(database_url)
    sessions = contracts.make_session_factory(engine)
    pdf = make_permit_pdf(installation.font_file)
    with session_scope(sessions) as session:
        officer, _ = contracts.create_user(session, "keiyaku@pref.example.jp", ["officer"])
        contract = contracts.create_contract(
            session, home=home, officer_id=officer.id, title="業務委託契約書(負荷試験)",
            pdf=pdf, parties=[
                PartySpec("茨城 花子", "kanri@pref.example.jp", "prefecture", "email_otp"),
                PartySpec("常陸 太郎", "taro@mito-kensetsu.example.jp", "contractor",
                          "access_code", "株式会社 水戸建設", access_code="A1B2C3D4"),
            ],
        )
        contracts.send_contract(session, contract, public_url=public_url)
    with sessions() as session:
        bodies = [m.text_body for m in session.scalars(
            select(contracts.OutboxMessage)
            .where(contracts.OutboxMessage.to_address == "taro@mito-kensetsu.example.jp")
        )]
    token = next(match.group(1) for body in bodies if (match := _LINK.search(body)))
    context = installation.signing_context()
    signed = contracts.sign_and_record(
        sessions, pdf, context, SignOptions(), role=keys.Role.POSITION,
        file_name="permit.pdf",
    )
    engine.dispose()
    return {
        "consent": f"{public_url}/c/{token}",
        "first-open": f"{public_url}/c/{token}",
        "verify-form": f"{public_url}/verify",
        "verify-record": f"{public_url}/verify/{signed.document_id}",
        "healthz": f"{public_url}/healthz",
    }


def _identified_cookie(link: str, code: str) -> str:
    """Open ``link`` in a fresh "browser", enter ``code``; the session cookie it ends with.

    :raises RuntimeError: the review page was not reached.
    """
    import requests

    browser = requests.Session()
    page = browser.get(link, timeout=30).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    if csrf is None:
        raise RuntimeError("no code form on the link page")
    answer = browser.post(f"{link}/code", data={"csrf_token": csrf.group(1), "code": code},
                          timeout=30)
    if "合意する" not in answer.text:
        raise RuntimeError(f"identification failed ({answer.status_code}): {answer.text[:2000]}")
    return "; ".join(f"{name}={value}" for name, value in browser.cookies.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="gunicorn worker processes")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "KOIN_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--app", default="web.wsgi:app", help="the WSGI application")
    parser.add_argument("--pages",
                        default="consent,first-open,verify-form,verify-record,healthz")
    parser.add_argument("--output", type=Path, default=HERE / "load.json")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install wrk)")
    from sqlalchemy import text

    import contracts

    schema = f"load_{secrets.token_hex(4)}"
    admin = contracts.make_engine(args.postgres_url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in args.postgres_url else "?"
    database_url = f"{args.postgres_url}{separator}options=-csearch_path%3D{schema}"
    work = Path(tempfile.mkdtemp(prefix="koin-load-"))
    port = _free_port()
    public_url = f"http://127.0.0.1:{port}"
    server: subprocess.Popen[bytes] | None = None
    figures: list[LoadFigure] = []
    try:
        urls = _prepare(work / "home", database_url, public_url)
        env = {**os.environ, "KOIN_HOME": str(work / "home"), "KOIN_DATABASE_URL": database_url,
               "KOIN_PUBLIC_URL": public_url, "KOIN_KEY_PASSPHRASE": PASSPHRASE,
               "KOIN_LOG_LEVEL": "WARNING"}
        gunicorn = str(Path(sys.executable).parent / "gunicorn")
        with (work / "gunicorn.log").open("wb") as log:
            server = subprocess.Popen(
                [gunicorn, "--workers", str(args.workers), "--bind", f"127.0.0.1:{port}",
                 "--log-level", "warning", args.app],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        _wait_port(port)
        cookie = _identified_cookie(urls["consent"], "A1B2C3D4")
        for page, url in urls.items():
            if page not in args.pages.split(","):
                continue
            jar = cookie if page == "consent" else None
            run_wrk(url, 2, args.connections, jar)  # warm-up: connections, caches
            rate, p50, p99, errors = run_wrk(url, args.seconds, args.connections, jar)
            target = "≥ 300 req/s, p99 ≤ 200 ms" if page == "consent" else "—"
            met = (rate >= 300 and p99 <= 200 and errors == 0) if page == "consent" else None
            figures.append(LoadFigure(page, rate, p50, p99, errors, target, met))
            print(f"… {page}: {rate:.0f} req/s, p99 {p99:.1f} ms", file=sys.stderr, flush=True)
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
        shutil.rmtree(work, ignore_errors=True)
    print(f"gunicorn {args.workers} sync workers, wrk 2 threads × {args.connections} "
          f"connections, {args.seconds} s per page, PostgreSQL; load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| page | req/s | p50 | p99 | errors | target | met |")
    print("|---|---|---|---|---|---|---|")
    for f in figures:
        shown = "—" if f.met is None else ("met" if f.met else "NOT met")
        print(f"| {f.page} | {f.requests_per_second:,.0f} | {f.p50_ms:.1f} ms | "
              f"{f.p99_ms:.1f} ms | {f.errors} | {f.target} | {shown} |")
    args.output.write_text(json.dumps([asdict(f) for f in figures], ensure_ascii=False,
                                      indent=2) + "\n", "utf-8")
    return 0 if all(f.met is not False for f in figures) else 1


if __name__ == "__main__":
    raise SystemExit(main())

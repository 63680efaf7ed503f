"""Fuzz the verifier: atheris (libFuzzer for Python) mutates PDFs and feeds them to
``signer.verify_pdf`` with the installation's policy (``--target lib``, the default), or posts
them to ``POST /api/v1/verify`` through Flask's test client (``--target web``).

A crash is anything but the clean answers: ``verify_pdf`` may return a report or raise
:class:`signer.VerifyInputError` (its only documented refusal); the web API may answer 200 with
a report or a 4xx JSON error — a 5xx, or the ``verifier_error`` refusal (the verifier failed
inside its isolated process), is a crash too. libFuzzer also stops on an input that runs
longer than ``-timeout`` (default here: 30 s, the web's ``KOIN_VERIFY_TIME_LIMIT``) or needs
more than ``-rss_limit_mb`` (default 2048), and writes the input as ``crash-…``/``timeout-…``.

Seeds: the hostile corpus of ``tests/corpus.py`` and valid signed PDFs (B-B, B-T, B-LT, B-LTA,
certified, two signatures), made for a fresh demo installation (or ``KOIN_HOME`` /
``--home``).

Run it for 10 minutes by hand (more is better; new interesting inputs are kept in
``--corpus DIR`` for the next run; crashing inputs land in ``.fuzz/crashes/``)::

    .venv/bin/python bench/fuzz_verify.py -max_total_time=600
    .venv/bin/python bench/fuzz_verify.py --target web -max_total_time=600
    .venv/bin/python bench/fuzz_verify.py --corpus fuzz-corpus -max_total_time=600 -jobs=2

Other arguments go to libFuzzer (``-runs=N``, ``-seed=N``, ``-max_len=N`` …). The test suite
runs both targets briefly (``tests/test_fuzz_verify.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Instrumented for coverage feedback: our verifier and the PDF / CMS parsers under it.
with atheris.instrument_imports(include=["signer", "pyhanko", "pyhanko_certvalidator"]):
    import signer
    from signer import Installation, VerifyInputError, verify_pdf

#: libFuzzer options used unless given on the command line.
DEFAULT_OPTIONS = {"-timeout": "30", "-rss_limit_mb": "2048", "-max_len": "262144"}


def _arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    parser.add_argument("--target", choices=["lib", "web"], default="lib")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".fuzz",
                        help="seeds, crash inputs and (without --home) the demo installation "
                        "(default: .fuzz/)")
    parser.add_argument("--home", type=Path, default=None,
                        help="an initialised KOIN_HOME (default: $KOIN_HOME, else a demo "
                        "installation made once in WORKDIR/home)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="folder that keeps the inputs found, for the next run")
    ours, libfuzzer = parser.parse_known_args(argv[1:])
    given = {option.split("=", 1)[0] for option in libfuzzer if option.startswith("-")}
    defaults = {**DEFAULT_OPTIONS, "-artifact_prefix": f"{ours.workdir / 'crashes'}/"}
    libfuzzer += [f"{k}={v}" for k, v in defaults.items() if k not in given]
    return ours, libfuzzer


def _installation(home: Path | None, workdir: Path) -> Installation:
    import keys

    if home is None and os.environ.get("KOIN_HOME"):
        home = Path(os.environ["KOIN_HOME"])
    if home is not None:
        return Installation(home)
    home = workdir / "home"
    if (home / "keys").is_dir():
        return Installation(home)
    keys.write_private_file(home / "keys" / "passphrase", b"fuzz-passphrase-not-secret\n")
    os.environ.pop("KOIN_KEY_PASSPHRASE", None)
    installation = Installation(home)
    installation.initialize()
    return installation


def _seeds(installation: Installation, folder: Path) -> int:
    """Write the hostile corpus and valid signed PDFs into ``folder``; how many."""
    from signer import Placement, SignatureLevel, SignOptions, sign_pdf
    from signer.samples import make_permit_pdf
    from tests.corpus import write_corpus

    paths = write_corpus(installation, folder)
    permit = make_permit_pdf(installation.font_file, pages=1)
    context = installation.signing_context()
    for level in SignatureLevel:
        signed = sign_pdf(permit, context, SignOptions(level=level, placement=None)).data
        assert signed is not None
        (folder / f"valid-{level.value}.pdf").write_bytes(signed)
    certified = sign_pdf(permit, context, SignOptions(certify=True, placement=None)).data
    assert certified is not None
    (folder / "valid-certified.pdf").write_bytes(certified)
    stamped = sign_pdf(permit, context, SignOptions(placement=Placement())).data
    assert stamped is not None
    twice = sign_pdf(stamped, installation.signing_context(stamp=False),
                     SignOptions(placement=None)).data
    assert twice is not None
    (folder / "valid-two-signatures.pdf").write_bytes(twice)
    return len(paths) + len(SignatureLevel) + 2


def _library_target(installation: Installation) -> Callable[[bytes], None]:
    policy = installation.verify_policy()

    def test_one_input(data: bytes) -> None:
        try:
            report = verify_pdf(data, policy)
        except VerifyInputError:
            return
        if not isinstance(report, signer.Report):
            raise TypeError(f"verify_pdf returned {type(report).__name__}")

    return test_one_input


def _web_target(installation: Installation) -> Callable[[bytes], None]:
    import contracts
    from contracts.migrate import upgrade
    from web import create_app

    upgrade(contracts.database_url(installation.home))
    app = create_app({
        "KOIN_HOME": str(installation.home), "TESTING": True,
        "KOIN_RATE_LIMITS": {"verify_ip": (1e9, 1_000_000_000)},
    })
    client = app.test_client()

    def test_one_input(data: bytes) -> None:
        response = client.post("/api/v1/verify", data=data, content_type="application/pdf")
        body = response.get_json(silent=True)
        if response.status_code == 200:
            if not isinstance(body, dict) or body.get("indication") not in (
                "PASSED", "FAILED", "INDETERMINATE"
            ):
                raise AssertionError(f"200 without a verdict: {response.data[:200]!r}")
            return
        if not 400 <= response.status_code < 500:
            raise AssertionError(f"HTTP {response.status_code}: {response.data[:500]!r}")
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or not error.get("message_en"):
            raise AssertionError(f"{response.status_code} without a JSON error")
        if error.get("code") == "verifier_error":
            raise AssertionError("the verifier crashed in its process (see the log above)")

    return test_one_input


def main(argv: list[str]) -> None:
    options, libfuzzer = _arguments(argv)
    # pyHanko warns about every broken timestamp it meets; that is the fuzzer's daily bread
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pyhanko").setLevel(logging.ERROR)
    installation = _installation(options.home, options.workdir)
    seeds = options.workdir / f"seeds-{options.target}"  # made afresh at every start
    shutil.rmtree(seeds, ignore_errors=True)
    seeds.mkdir(parents=True)
    (options.workdir / "crashes").mkdir(exist_ok=True)
    count = _seeds(installation, seeds)
    corpus_dirs = [str(seeds)]
    if options.corpus is not None:
        options.corpus.mkdir(parents=True, exist_ok=True)
        corpus_dirs.insert(0, str(options.corpus))  # libFuzzer writes new inputs to the first
    print(f"fuzz_verify: target {options.target}, {count} seeds in {seeds}, "
          f"installation {installation.home}", file=sys.stderr, flush=True)
    target = (_library_target if options.target == "lib" else _web_target)(installation)
    atheris.Setup([argv[0], *libfuzzer, *corpus_dirs], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)

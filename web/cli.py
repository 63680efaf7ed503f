"""The ``koin`` command line.

Exit codes: 0 success; 1 the input or request was refused (one-line reason on stderr);
2 usage error; 3 internal error (a bug: please report it with the log).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

import keys as keys_lib
from keys import KoinError, Role
from signer import MM as POINTS_PER_MM
from signer import Installation, Placement, SignatureLevel, SignOptions

from .config import Settings

F = TypeVar("F", bound=Callable[..., Any])

EXIT_REFUSED = 1
EXIT_INTERNAL = 3

log = logging.getLogger("koin")


def _say_error(message: str) -> None:
    click.echo(f"koin: {message}", err=True)


def refusals_exit_1(func: F) -> F:
    """Turn a :class:`KoinError` into a one-line message and exit code 1."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        settings: Settings = click.get_current_context().obj
        try:
            return func(*args, **kwargs)
        except KoinError as exc:
            text = exc.message_en if settings.language == "en" else exc.message
            _say_error(" ".join(text.split()))
            sys.exit(EXIT_REFUSED)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.version_option(package_name="koin")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """koin (公印): electronic seals, signatures and witness-type contracts."""
    ctx.obj = Settings()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _installation(settings: Settings) -> Installation:
    return Installation(settings.home, public_url=settings.public_url)


@cli.command()
@click.option("--public-url", help="URL of this service (default: KOIN_PUBLIC_URL).")
@click.pass_obj
@refusals_exit_1
def init(settings: Settings, public_url: str | None) -> None:
    """Set up KOIN_HOME: demo PKI and key store, stamp font, demo seal (idempotent)."""
    installation = Installation(settings.home, public_url=public_url or settings.public_url)
    report = installation.initialize()
    _upgrade_database(settings)
    home = settings.home.resolve()
    if report.keys_created:
        click.echo(f"デモ PKI と鍵ストアを作成しました: {home / 'keys'}")
        if report.passphrase_file_created:
            click.echo(
                f"鍵のパスフレーズは {home / 'keys' / 'passphrase'} (0600) に保存しました。"
                "本番では KOIN_KEY_PASSPHRASE を使ってください。"
            )
    else:
        click.echo(f"鍵ストアは既にあります: {home / 'keys'}")
    for path in report.assets_created:
        click.echo(f"作成: {path}")
    click.echo(f"ルート証明書: {home / 'pki' / 'root-ca.pem'}")


def _database_url(settings: Settings) -> str:
    import contracts

    return contracts.database_url(settings.home)


def _upgrade_database(settings: Settings) -> None:
    """Bring the database schema to the current version (Alembic).

    :raises KoinError: the database cannot be reached.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from contracts import migrate

    try:
        migrate.upgrade(_database_url(settings))
    except SQLAlchemyError as exc:
        raise KoinError(
            "データベースに接続できません。KOIN_DATABASE_URL を確認してください。",
            f"Cannot reach the database ({exc.__class__.__name__}); check KOIN_DATABASE_URL.",
        ) from exc


def _sessions(settings: Settings) -> Any:
    import contracts

    return contracts.make_session_factory(contracts.make_engine(_database_url(settings)))


def _parse_box(text: str, units: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4:
        raise click.BadParameter("expected four numbers x1,y1,x2,y2", param_hint="--box")
    factor = POINTS_PER_MM if units == "mm" else 1.0
    x1, y1, x2, y2 = (v * factor for v in values)
    return (x1, y1, x2, y2)


@cli.command()
@click.argument("input_pdf", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("output_pdf", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--level",
    type=click.Choice([level.value for level in SignatureLevel]),
    default=SignatureLevel.B_T.value,
    show_default=True,
    help="PAdES baseline level.",
)
@click.option("--page", type=int, help="Page of the stamp, 1-based; negative counts from the end "
              "(default: last page).")
@click.option("--box", help="Stamp box x1,y1,x2,y2 from the bottom-left corner "
              "(default: bottom right).")
@click.option("--units", type=click.Choice(["pt", "mm"]), default="pt", show_default=True,
              help="Units of --box.")
@click.option("--no-stamp", is_flag=True, help="Invisible signature, no seal stamp.")
@click.option("--certify", is_flag=True,
              help="Certification signature: later changes limited to form filling and signing.")
@click.option("--tsa", "tsa_urls", multiple=True, metavar="URL",
              help="TSA URL, repeat to give fallbacks (default: KOIN_TSA_URLS or embedded TSA).")
@click.option("--role", type=click.Choice([Role.POSITION.value, Role.WITNESS.value]),
              default=Role.POSITION.value, show_default=True, help="Whose key signs.")
@click.option("--document-id", help="Document ID printed on the stamp (default: new random ID).")
@click.option("--qr", is_flag=True,
              help="Print a QR code linking to this document's page on KOIN_PUBLIC_URL.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
@refusals_exit_1
def sign(
    settings: Settings,
    input_pdf: Path,
    output_pdf: Path,
    level: str,
    page: int | None,
    box: str | None,
    units: str,
    no_stamp: bool,
    certify: bool,
    tsa_urls: Sequence[str],
    role: str,
    document_id: str | None,
    qr: bool,
    as_json: bool,
) -> None:
    """Sign INPUT_PDF with the position certificate and write OUTPUT_PDF.

    The output is written to a temporary file and renamed only when complete.
    """
    if no_stamp and (box or page is not None):
        raise click.UsageError("--no-stamp cannot be combined with --page or --box")
    if input_pdf.resolve() == output_pdf.resolve():
        raise click.UsageError("OUTPUT_PDF must differ from INPUT_PDF")
    if not input_pdf.is_file():
        raise KoinError(
            f"入力ファイル {input_pdf} がありません。", f"Input file {input_pdf} does not exist."
        )
    placement = None if no_stamp else Placement(page, _parse_box(box, units) if box else None)
    installation = _installation(settings)
    context = installation.signing_context(
        Role(role), tsa_urls=list(tsa_urls) or settings.tsa_urls, stamp=not no_stamp
    )
    options = SignOptions(
        level=SignatureLevel(level),
        placement=placement,
        certify=certify,
        document_id=document_id,
        verify_base_url=settings.public_url if qr else None,
    )
    from contracts import sign_and_record

    _upgrade_database(settings)
    result = sign_and_record(
        _sessions(settings), input_pdf, context, options, role=Role(role),
        file_name=input_pdf.name, output=output_pdf,
    )
    summary = {
        "output": str(output_pdf),
        "document_id": result.document_id,
        "level": result.level.value,
        "field": result.field_name,
        "signed_at": result.signed_at.isoformat(),
        "sha256": result.sha256,
        "page": result.page,
        "box": list(result.box) if result.box else None,
    }
    if as_json:
        click.echo(json.dumps(summary, ensure_ascii=False))
    else:
        click.echo(
            f"署名しました: {output_pdf} (文書番号 {result.document_id}, {result.level.value}, "
            f"SHA-256 {result.sha256})"
        )


@cli.command()
@click.argument("pdf", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--max-mib", type=int, default=50, show_default=True, help="Size limit.")
@click.pass_obj
def verify(settings: Settings, pdf: Path, as_json: bool, max_mib: int) -> None:
    """Verify every signature in PDF.

    Exit codes: 0 PASSED; 1 FAILED or INDETERMINATE; 2 the file could not be verified at all
    (not a PDF, encrypted, too large, unreadable) or a usage error.
    """
    from signer import VerifyInputError, verify_pdf

    english = settings.language == "en"
    try:
        if not pdf.is_file():
            raise VerifyInputError(
                f"ファイル {pdf} がありません。", f"File {pdf} does not exist.", reason="missing"
            )
        policy = _installation(settings).verify_policy(max_bytes=max_mib * 1024 * 1024)
        report = verify_pdf(pdf, policy)
    except KoinError as exc:
        _say_error(" ".join((exc.message_en if english else exc.message).split()))
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
    else:
        summary = report.summary_en if english else report.summary_ja
        click.echo(f"{report.indication.value}: {summary}")
        for sig in report.signatures:
            who = sig.signer.common_name if sig.signer else "?"
            reason = sig.reason_en if english else sig.reason_ja
            sub = f" / {sig.subindication.value}" if sig.subindication else ""
            coverage = sig.coverage_en if english else sig.coverage_ja
            click.echo(
                f"  #{sig.index} {sig.kind} {sig.field_name}: {sig.indication.value}{sub} — "
                f"{who}; {sig.pades_level or '-'}; {coverage}; {reason}"
            )
    sys.exit(0 if report.passed else 1)


@cli.group("db")
def db_group() -> None:
    """The database of this installation."""


@db_group.command("upgrade")
@click.pass_obj
@refusals_exit_1
def db_upgrade(settings: Settings) -> None:
    """Apply pending schema migrations (run after every upgrade of koin)."""
    from contracts import migrate

    _upgrade_database(settings)
    click.echo(f"データベースは最新です: {migrate.current(_database_url(settings))}")


@cli.group("keys")
def keys_group() -> None:
    """Manage the key store."""


@keys_group.command("import")
@click.argument("role", type=click.Choice([r.value for r in Role]))
@click.argument("p12_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--passphrase-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File holding the passphrase of P12_FILE (default: ask, or "
              "KOIN_IMPORT_PASSPHRASE).")
@click.pass_obj
@refusals_exit_1
def keys_import(
    settings: Settings, role: str, p12_file: Path, passphrase_file: Path | None
) -> None:
    """Import ROLE's key and certificate from a PKCS#12 file (re-encrypted for this store)."""

    if passphrase_file is not None:
        file_passphrase = passphrase_file.read_bytes().strip()
    elif os.environ.get("KOIN_IMPORT_PASSPHRASE"):
        file_passphrase = os.environ["KOIN_IMPORT_PASSPHRASE"].encode()
    else:
        file_passphrase = click.prompt(
            f"{p12_file} のパスフレーズ", hide_input=True, err=True
        ).encode()
    store = _installation(settings).key_store
    certificate = keys_lib.import_pkcs12(
        store, Role(role), p12_file.read_bytes(), file_passphrase,
        keys_lib.resolve_passphrase(settings.home),
    )
    click.echo(f"{role} の鍵を取り込みました: {certificate.subject.rfc4514_string()}")


@cli.group("pki")
def pki_group() -> None:
    """Certificates and CRLs of this installation."""


@pki_group.command("export-roots")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.pass_obj
@refusals_exit_1
def export_roots(settings: Settings, out_dir: Path) -> None:
    """Write root.pem (trust anchor) and chain.pem (CA certificates) into OUT_DIR."""

    for path in keys_lib.export_roots(settings.home, out_dir):
        click.echo(str(path))


@pki_group.command("refresh-crls")
@click.option("--force", is_flag=True, help="Re-issue even if not yet due.")
@click.pass_obj
@refusals_exit_1
def refresh_crls(settings: Settings, force: bool) -> None:
    """Re-issue the demo CAs' CRLs that are about to expire."""

    for name in keys_lib.refresh_crls(settings.home, settings.public_url, force=force):
        click.echo(f"CRL を更新しました: {name}")


@cli.group("tsa")
def tsa_group() -> None:
    """The RFC 3161 time-stamping authority."""


@tsa_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3161, show_default=True, type=int)
@click.pass_obj
@refusals_exit_1
def tsa_serve(settings: Settings, host: str, port: int) -> None:
    """Serve the TSA over HTTP (application/timestamp-query) until interrupted."""
    from timestamp import TimeStampAuthority, serve

    installation = _installation(settings)
    authority = TimeStampAuthority.from_key_store(
        installation.key_store, installation.tsa_state_dir
    )
    click.echo(f"TSA: http://{host}:{port}/ (Ctrl-C で終了)", err=True)
    serve(authority, host, port)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--init/--no-init", "run_init", default=True, show_default=True,
              help="Run `koin init` first (creates the demo PKI on a new installation).")
@click.pass_obj
@refusals_exit_1
def serve(settings: Settings, host: str, port: int, run_init: bool) -> None:
    """Run the service with embedded defaults (single machine, development server)."""
    from . import create_app

    if run_init:
        _installation(settings).initialize()
        _upgrade_database(settings)
    app = create_app()
    click.echo(f"koin: http://{host}:{port}/ (Ctrl-C で終了)", err=True)
    app.run(host=host, port=port, threaded=True, use_reloader=False)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="koin")
    except SystemExit:
        raise
    except Exception:  # a bug, not a refusal: keep the traceback in the log, not on stdout
        log.exception("internal error")
        _say_error("内部エラーが発生しました(internal error); see the log above.")
        sys.exit(EXIT_INTERNAL)

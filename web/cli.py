"""The ``koin`` command line.

Exit codes: 0 success; 1 the input or request was refused (one-line reason on stderr);
2 usage error; 3 internal error (a bug: please report it with the log).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from sqlalchemy.orm import Session, sessionmaker

import keys as keys_lib
from contracts.accounts import UserRole
from keys import KoinError, Role
from signer import MM as POINTS_PER_MM
from signer import Installation, Placement, SignatureLevel, SignOptions

from .config import Settings

if TYPE_CHECKING:
    import contracts as contracts_module
    from contracts import SmtpTransport
    from contracts.devmail import DevMailServer

F = TypeVar("F", bound=Callable[..., Any])

EXIT_REFUSED = 1
EXIT_INTERNAL = 3

#: The first administrator that ``koin init`` creates when there is none.
DEFAULT_ADMIN_EMAIL = "admin@koin.local"

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
@click.option("--server", metavar="URL", envvar="KOIN_SERVER",
              help="Sign on this remote koin through its REST API instead of locally "
              "(sign and sign-batch; needs --api-key-file).")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path),
              envvar="KOIN_API_KEY_FILE",
              help="File holding an API key with the scope sign (mode 0600).")
@click.pass_context
def cli(ctx: click.Context, server: str | None, api_key_file: Path | None) -> None:
    """koin (公印): electronic seals, signatures and witness-type contracts."""
    ctx.obj = Settings()
    ctx.meta["koin.server"] = server.rstrip("/") if server else None
    ctx.meta["koin.api_key_file"] = api_key_file
    if server and not server.startswith(("http://", "https://")):
        raise click.UsageError("--server must be an http:// or https:// URL")
    if server and api_key_file is None:
        raise click.UsageError("--server needs --api-key-file")
    if server and ctx.invoked_subcommand not in ("sign", "sign-batch"):
        raise click.UsageError("--server works with sign and sign-batch only")
    # KOIN_LOG_LEVEL (DEBUG, INFO, WARNING …): how much goes to stderr; secrets never do.
    # KOIN_LOG_FORMAT=json: one JSON object per line (web.logs); pyHanko's warnings only with
    # KOIN_LOG_LEVEL set.
    from .logs import configure_logging

    configure_logging()


def _installation(settings: Settings) -> Installation:
    return Installation(settings.home, public_url=settings.public_url)


@cli.command()
@click.option("--public-url", help="URL of this service (default: KOIN_PUBLIC_URL).")
@click.option("--admin-email", default=DEFAULT_ADMIN_EMAIL, show_default=True,
              help="Email of the first administrator, created (with a password printed once) "
              "if there is no administrator yet.")
@click.pass_obj
@refusals_exit_1
def init(settings: Settings, public_url: str | None, admin_email: str) -> None:
    """Set up KOIN_HOME: demo PKI and key store, stamp font, demo seal, session secret, database
    and a first administrator (idempotent)."""
    installation = Installation(settings.home, public_url=public_url or settings.public_url)
    report = installation.initialize()
    _upgrade_database(settings)
    home = settings.home.resolve()
    say = settings.in_language
    if report.keys_created:
        click.echo(say(f"デモ PKI と鍵ストアを作成しました: {home / 'keys'}",
                       f"Created the demo PKI and key store: {home / 'keys'}"))
        if report.passphrase_file_created:
            passphrase_file = home / "keys" / "passphrase"
            click.echo(say(
                f"鍵のパスフレーズは {passphrase_file} (0600) に保存しました。"
                "本番では KOIN_KEY_PASSPHRASE を使ってください。",
                f"Saved the key passphrase in {passphrase_file} (0600); in production, use "
                "KOIN_KEY_PASSPHRASE instead.",
            ))
    else:
        click.echo(say(f"鍵ストアは既にあります: {home / 'keys'}",
                       f"The key store already exists: {home / 'keys'}"))
    for path in report.assets_created:
        click.echo(say(f"作成: {path}", f"Created: {path}"))
    root = home / "pki" / "root-ca.pem"
    click.echo(say(f"ルート証明書: {root}", f"Root certificate: {root}"))
    secret_file = _create_secret_key_file(settings)
    if secret_file is not None:
        click.echo(say(f"作成: {secret_file}", f"Created: {secret_file}"))
    _ensure_first_admin(settings, admin_email)


def _create_secret_key_file(settings: Settings) -> Path | None:
    """:raises KoinError: KOIN_HOME cannot be written."""
    from .auth import SECRET_KEY_ENV, create_secret_key_file

    try:
        return create_secret_key_file(settings.home)
    except OSError as exc:
        raise KoinError(
            f"セッション用の秘密鍵を {settings.home} に書けません。",
            f"Cannot write the session secret into {settings.home} ({exc.__class__.__name__}); "
            f"check the folder or set {SECRET_KEY_ENV}.",
        ) from exc


def _ensure_first_admin(settings: Settings, email: str) -> None:
    """Create the first administrator unless there is one; print its password this once.

    :raises KoinError: ``email`` is unusable or belongs to an account that is not an admin.
    """
    import contracts

    engine = contracts.make_engine(_database_url(settings))
    try:
        with contracts.session_scope(contracts.make_session_factory(engine)) as session:
            created = contracts.create_first_admin(session, email)
    except contracts.UserExists as exc:
        raise KoinError(
            f"{exc.email} のアカウントは管理者ではありません。--admin-email で別のアドレスを"
            "指定してください。",
            f"The account {exc.email} is not an administrator; give another --admin-email.",
        ) from exc
    finally:
        engine.dispose()
    if created is None:
        click.echo(settings.in_language(
            "管理者のアカウントは既にあります。", "An administrator account already exists."
        ))
        return
    admin, password = created
    click.echo(settings.in_language(f"管理者のアカウントを作成しました: {admin.email}",
                                    f"Created the administrator account: {admin.email}"))
    _show_password_once(settings, password)


def _show_password_once(settings: Settings, password: str) -> None:
    # stdout only, never the log: this is the one place the password is ever shown
    click.echo(settings.in_language(
        f"初期パスワード(この一度だけ表示します。安全な場所に控えてください): {password}",
        f"Initial password (shown this once only; keep it somewhere safe): {password}",
    ))


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


@contextmanager
def _sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """A session factory on this installation's database, disposed of afterwards."""
    import contracts

    engine = contracts.make_engine(_database_url(settings))
    try:
        yield contracts.make_session_factory(engine)
    finally:
        engine.dispose()


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

    The output is written to a temporary file and renamed only when complete. With --server,
    a remote koin signs it (POST /api/v1/sign).
    """
    if click.get_current_context().meta.get("koin.server"):
        if certify or tsa_urls or role != Role.POSITION.value or document_id or qr:
            raise click.UsageError(
                "with --server only --level, --page, --box, --units and --no-stamp apply"
            )
        _sign_remotely(
            settings, input_pdf, output_pdf, level=level, page=page,
            box=_parse_box(box, units) if box else None, no_stamp=no_stamp, as_json=as_json,
        )
        return
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
    from contracts import SigningChannel, sign_and_record

    _upgrade_database(settings)
    with _sessions(settings) as sessions:
        result = sign_and_record(
            sessions, input_pdf, context, options, role=Role(role),
            file_name=input_pdf.name, output=output_pdf, channel=SigningChannel.CLI,
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
        click.echo(settings.in_language(
            f"署名しました: {output_pdf} (文書番号 {result.document_id}, {result.level.value}, "
            f"SHA-256 {result.sha256})",
            f"Signed: {output_pdf} (document ID {result.document_id}, {result.level.value}, "
            f"SHA-256 {result.sha256})",
        ))


def _sign_remotely(
    settings: Settings, input_pdf: Path, output_pdf: Path, *, level: str, page: int | None,
    box: tuple[float, float, float, float] | None, no_stamp: bool, as_json: bool,
) -> None:
    """:raises KoinError: the input is missing, or the server refused or cannot be reached."""
    import hashlib

    from ._remote_batch import ApiClient, RemoteError, _write_output, read_api_key

    context = click.get_current_context()
    if input_pdf.resolve() == output_pdf.resolve():
        raise click.UsageError("OUTPUT_PDF must differ from INPUT_PDF")
    if not input_pdf.is_file():
        raise KoinError(
            f"入力ファイル {input_pdf} がありません。", f"Input file {input_pdf} does not exist."
        )
    params: dict[str, str] = {"level": level}
    if no_stamp:
        params["no_stamp"] = "true"
    if page is not None:
        params["page"] = str(page)
    if box is not None:
        params["box"] = ",".join(f"{v:g}" for v in box)
    client = ApiClient(context.meta["koin.server"], read_api_key(context.meta["koin.api_key_file"]))
    try:
        source = input_pdf.read_bytes()
        response = client._call(
            "POST", "/api/v1/sign", params=params, data=source,
            headers={"Content-Type": "application/pdf"},
        )
    finally:
        client.close()
    data = response.content
    digest = hashlib.sha256(data).hexdigest()
    if digest != response.headers.get("X-Koin-SHA256") or not data.startswith(source):
        raise RemoteError(
            "署名済みファイルが壊れています(ハッシュ不一致)。",
            "The signed file arrived damaged (hash mismatch).",
        )
    output_pdf.parent.mkdir(parents=True, exist_ok=True)
    _write_output(output_pdf, data)
    document_id = response.headers.get("X-Koin-Document-Id", "")
    if as_json:
        click.echo(json.dumps({"output": str(output_pdf), "document_id": document_id,
                               "level": level, "sha256": digest}, ensure_ascii=False))
    else:
        click.echo(settings.in_language(
            f"署名しました: {output_pdf} (文書番号 {document_id}, {level}, SHA-256 {digest})",
            f"Signed: {output_pdf} (document ID {document_id}, {level}, SHA-256 {digest})",
        ))


_BATCH_LABELS = {
    "ja": {"signed": "署名済み", "skipped": "スキップ(署名済み)", "failed": "失敗"},
    "en": {"signed": "signed", "skipped": "skipped (signed before)", "failed": "failed"},
}


@cli.command("sign-batch")
@click.argument("in_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--template", "template_name", metavar="NAME",
              help="Stamp template to sign with (default: B-T, stamp bottom-right of the last "
              "page).")
@click.option("--level", type=click.Choice([level.value for level in SignatureLevel]),
              help="PAdES baseline level (default: the template's, else B-T).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Signing processes.")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path),
              help="Manifest CSV (default: OUT_DIR/manifest.csv).")
@click.option("--quiet", is_flag=True, help="No progress lines (failures are still shown).")
@click.pass_obj
@refusals_exit_1
def sign_batch(
    settings: Settings,
    in_dir: Path,
    out_dir: Path,
    template_name: str | None,
    level: str | None,
    workers: int,
    manifest: Path | None,
    quiet: bool,
) -> None:
    """Sign every *.pdf in IN_DIR with the position certificate into OUT_DIR (same names).

    Resumable: inputs that the manifest shows as signed, with their output unchanged, are
    skipped. Exit 0 if every file is signed or skipped, 1 if any failed (reason in the manifest
    and on stderr). With --server, a remote koin signs them (a batch through its REST API).
    """
    from ._sign_batch import Row, run_batch, with_level

    if in_dir.resolve() == out_dir.resolve():
        raise click.UsageError("OUT_DIR must differ from IN_DIR")
    labels = _BATCH_LABELS[settings.language]

    def report(done: int, total: int, row: Row, label: str) -> None:
        if label == "failed":
            click.echo(f"[{done}/{total}] {row.input_name} {labels[label]}: {row.error}", err=True)
        elif not quiet:
            click.echo(f"[{done}/{total}] {row.input_name} {labels[label]}", err=True)

    context = click.get_current_context()
    server = context.meta.get("koin.server")
    if server:
        if level is not None:
            raise click.UsageError("--level cannot be used with --server; use a --template")
        from ._remote_batch import ApiClient, read_api_key, run_remote_batch

        client = ApiClient(server, read_api_key(context.meta["koin.api_key_file"]))
        try:
            summary = run_remote_batch(
                client, server, in_dir, out_dir, template=template_name,
                manifest=manifest or out_dir / "manifest.csv", workers=workers,
                language=settings.language, report=report,
            )
        finally:
            client.close()
        _batch_summary(settings, summary)
        return
    _upgrade_database(settings)
    options = SignOptions()
    if template_name is not None:
        import contracts

        with _sessions(settings) as factory, factory() as session:
            template = contracts.require_template(session, template_name)
            options = contracts.sign_options(template, public_url=settings.public_url)
    options = with_level(options, level)
    summary = run_batch(
        settings, in_dir, out_dir, options, manifest=manifest or out_dir / "manifest.csv",
        workers=workers, report=report, template=template_name,
    )
    _batch_summary(settings, summary)


def _batch_summary(settings: Settings, summary: Any) -> None:
    click.echo(settings.in_language(
        f"{summary.total} 件: 署名 {summary.signed} 件、スキップ {summary.skipped} 件、"
        f"失敗 {summary.failed} 件。マニフェスト {summary.manifest}",
        f"{summary.total} file(s): {summary.signed} signed, {summary.skipped} skipped, "
        f"{summary.failed} failed; manifest {summary.manifest}",
    ))
    if summary.failed:
        sys.exit(EXIT_REFUSED)


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
    revision = migrate.current(_database_url(settings))
    click.echo(settings.in_language(
        f"データベースは最新です: {revision}", f"The database is up to date: {revision}"
    ))


@cli.group("users")
def users_group() -> None:
    """Staff accounts."""


@users_group.command("create")
@click.argument("email")
@click.option("--role", "roles", multiple=True, required=True,
              type=click.Choice([role.value for role in UserRole]),
              help="Role of the account; repeat for several.")
@click.option("--name", help="Display name (default: the part of EMAIL before the @).")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File holding the password (default: generate one and print it once).")
@click.pass_obj
@refusals_exit_1
def users_create(
    settings: Settings,
    email: str,
    roles: Sequence[str],
    name: str | None,
    password_file: Path | None,
) -> None:
    """Create a staff account for EMAIL. Running it again for an account that already exists
    with these roles changes nothing (and shows no password); other roles are refused."""
    import contracts

    password = None
    if password_file is not None:
        try:
            password = password_file.read_text("utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise KoinError(
                f"パスワードファイル {password_file} を読めません。",
                f"Cannot read the password file {password_file} ({exc.__class__.__name__}).",
            ) from exc
    _upgrade_database(settings)
    engine = contracts.make_engine(_database_url(settings))
    try:
        with contracts.session_scope(contracts.make_session_factory(engine)) as session:
            try:
                user, generated = contracts.create_user(
                    session, email, roles, display_name=name, password=password
                )
            except contracts.UserExists as exc:
                existing = contracts.get_user_by_email(session, exc.email)
                if existing is None or existing.roles != {UserRole(role) for role in roles} or (
                    name is not None and existing.display_name != " ".join(name.split())
                ):
                    raise KoinError(
                        f"{exc.message}役割や表示名は変更しません。",
                        f"{exc.message_en} Its roles and name are left unchanged.",
                        email=exc.email,
                    ) from exc
                click.echo(settings.in_language(
                    f"アカウントは既にあります(変更なし): {existing.email}",
                    f"The account already exists (unchanged): {existing.email}",
                ))
                return
    finally:
        engine.dispose()
    summary = f"{user.email} ({', '.join(sorted(user.roles))})"
    click.echo(settings.in_language(
        f"アカウントを作成しました: {summary}", f"Created the account: {summary}"
    ))
    if generated is not None:
        _show_password_once(settings, generated)


@users_group.command("reset-password")
@click.argument("email")
@click.pass_obj
@refusals_exit_1
def users_reset_password(settings: Settings, email: str) -> None:
    """Give the account EMAIL a new generated password (printed once) and lift a lockout,
    for a staff member who forgot theirs; sessions logged in with the old one end."""
    import contracts

    _upgrade_database(settings)
    with _sessions(settings) as sessions, contracts.session_scope(sessions) as session:
        user = contracts.get_user_by_email(session, email)
        if user is None:
            raise KoinError(
                f"アカウント {email} はありません。", f"There is no account {email}.",
                email=email,
            )
        password = contracts.generate_password()
        contracts.set_password(session, user, password)
        address = user.email
    click.echo(settings.in_language(
        f"パスワードを再発行しました: {address}", f"Issued a new password: {address}"
    ))
    _show_password_once(settings, password)


@cli.group("apikeys")
def apikeys_group() -> None:
    """API keys for the REST API v1 (``Authorization: Bearer koin_…``)."""


def _scopes(text: str) -> list[str]:
    return [part for part in text.replace(",", " ").split() if part]


def _user_or_refuse(session: Session, email: str) -> contracts_module.User:
    import contracts

    user = contracts.get_user_by_email(session, email)
    if user is None:
        raise KoinError(
            f"メールアドレス {email} のアカウントはありません。",
            f"There is no account with the email address {email}.",
        )
    return user


def _when(value: dt.datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"


@apikeys_group.command("create")
@click.option("--user", "email", required=True, help="Email of the key's owner.")
@click.option("--scope", "scopes", required=True, metavar="SCOPES",
              help="Comma-separated: sign (needs role signer), contracts (officer), verify.")
@click.option("--name", default="default", show_default=True,
              help="Name of the key, e.g. the calling system.")
@click.pass_obj
@refusals_exit_1
def apikeys_create(settings: Settings, email: str, scopes: str, name: str) -> None:
    """Create an API key and print it once (only its hash is stored)."""
    import contracts

    _upgrade_database(settings)
    with _sessions(settings) as sessions, contracts.session_scope(sessions) as session:
        user = _user_or_refuse(session, email)
        key, raw = contracts.create_api_key(session, user, name=name, scopes=_scopes(scopes))
        summary = f"{key.prefix} ({key.scopes.replace(' ', ',')}) for {user.email}"
    click.echo(settings.in_language(
        f"API キーを作成しました: {summary}", f"Created the API key: {summary}"
    ))
    # stdout only, never the log: this is the one place the key is ever shown
    click.echo(settings.in_language(
        f"API キー(この一度だけ表示します。安全な場所に控えてください): {raw}",
        f"API key (shown this once only; keep it somewhere safe): {raw}",
    ))


@apikeys_group.command("list")
@click.option("--user", "email", required=True, help="Email of the keys' owner.")
@click.pass_obj
@refusals_exit_1
def apikeys_list(settings: Settings, email: str) -> None:
    """List a user's API keys: prefix, scopes, name, created, last used, revoked."""
    import contracts

    _upgrade_database(settings)
    with _sessions(settings) as sessions, contracts.session_scope(sessions) as session:
        user = _user_or_refuse(session, email)
        keys = contracts.list_api_keys(session, user)
        for key in keys:
            state = f"revoked {_when(key.revoked_at)}" if key.revoked_at else "active"
            click.echo(
                f"{key.prefix}  {key.scopes.replace(' ', ','):<22} {state:<34} "
                f"created {_when(key.created_at)}  last used {_when(key.last_used_at)}  "
                f"{key.name}"
            )
    if not keys:
        click.echo(settings.in_language(
            f"{user.email} には API キーがありません。", f"{user.email} has no API keys."
        ))


@apikeys_group.command("revoke")
@click.argument("prefix")
@click.pass_obj
@refusals_exit_1
def apikeys_revoke(settings: Settings, prefix: str) -> None:
    """Revoke the API key whose prefix (the 8 hex digits after koin_) is PREFIX."""
    import contracts

    _upgrade_database(settings)
    with _sessions(settings) as sessions, contracts.session_scope(sessions) as session:
        key = contracts.revoke_api_key(session, prefix)
        revoked = key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "?"
    click.echo(settings.in_language(
        f"API キーを無効にしました: {key.prefix} ({revoked})",
        f"Revoked the API key: {key.prefix} ({revoked})",
    ))


@cli.group("templates")
def templates_group() -> None:
    """Stamp templates per document type (page, box, QR code, level)."""


@templates_group.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include deactivated templates.")
@click.option("--json", "as_json", is_flag=True, help="Print the templates as JSON.")
@click.pass_obj
@refusals_exit_1
def templates_list(settings: Settings, show_all: bool, as_json: bool) -> None:
    """List the stamp templates (active ones unless --all)."""
    import contracts

    _upgrade_database(settings)
    with _sessions(settings) as factory, factory() as session:
        templates = contracts.list_templates(session, include_inactive=show_all)
    if as_json:
        rows = [
            {
                "name": t.name, "title": t.title, "page": t.page, "box": t.box, "qr": t.qr,
                "level": t.level, "certify": t.certify, "active": t.active,
            }
            for t in templates
        ]
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    if not templates:
        click.echo(settings.in_language(
            "印影テンプレートはありません。", "There are no stamp templates."
        ))
        return
    for t in templates:
        box = ",".join(f"{v:g}" for v in t.box) if t.box else "default"
        flags = [t.level, *(["qr"] if t.qr else []), *(["certify"] if t.certify else []),
                 *([] if t.active else ["inactive"])]
        click.echo(f"{t.name}\t{t.title}\tpage={t.page}\tbox={box}\t{' '.join(flags)}")


@templates_group.command("add")
@click.argument("name")
@click.option("--title", required=True, help="Display name, e.g. 建設業許可通知書.")
@click.option("--page", type=int, default=-1, show_default=True,
              help="Page of the stamp, 1-based; negative counts from the end.")
@click.option("--box", help="Stamp box x1,y1,x2,y2 from the bottom-left corner "
              "(default: bottom right).")
@click.option("--units", type=click.Choice(["pt", "mm"]), default="pt", show_default=True,
              help="Units of --box.")
@click.option("--qr", is_flag=True, help="Print the verification QR code on the stamp.")
@click.option("--level", type=click.Choice([level.value for level in SignatureLevel]),
              default=SignatureLevel.B_T.value, show_default=True, help="PAdES baseline level.")
@click.option("--certify", is_flag=True, help="Certification signature (DocMDP).")
@click.pass_obj
@refusals_exit_1
def templates_add(
    settings: Settings,
    name: str,
    title: str,
    page: int,
    box: str | None,
    units: str,
    qr: bool,
    level: str,
    certify: bool,
) -> None:
    """Create the stamp template NAME (lower-case letters, digits, hyphens)."""
    import contracts

    points = _parse_box(box, units) if box else None
    _upgrade_database(settings)
    with _sessions(settings) as factory, contracts.session_scope(factory) as session:
        template = contracts.create_template(
            session, name, title=title, page=page, box=points, qr=qr, level=level,
            certify=certify,
        )
    summary = f"{template.name} ({template.title})"
    click.echo(settings.in_language(
        f"印影テンプレートを作成しました: {summary}", f"Created the stamp template: {summary}"
    ))


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
            settings.in_language(f"{p12_file} のパスフレーズ", f"Passphrase of {p12_file}"),
            hide_input=True, err=True,
        ).encode()
    store = _installation(settings).key_store
    certificate = keys_lib.import_pkcs12(
        store, Role(role), p12_file.read_bytes(), file_passphrase,
        keys_lib.resolve_passphrase(settings.home),
    )
    subject = certificate.subject.rfc4514_string()
    click.echo(settings.in_language(
        f"{role} の鍵を取り込みました: {subject}", f"Imported the {role} key: {subject}"
    ))


def _role_pairs(values: Sequence[str], option: str) -> dict[Role, str]:
    """Parse repeated ``ROLE=VALUE`` options. :raises click.BadParameter: malformed."""
    pairs: dict[Role, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not rest or name not in {r.value for r in Role}:
            raise click.BadParameter(
                f"{value!r}: expected ROLE=VALUE with ROLE one of "
                f"{', '.join(r.value for r in Role)}", param_hint=option,
            )
        if Role(name) in pairs:
            raise click.BadParameter(f"{name} given twice", param_hint=option)
        pairs[Role(name)] = rest
    return pairs


def _certificate_lines(certificate: Any) -> list[str]:
    """Subject, serial and validity of a cryptography certificate, for people."""
    return [
        f"  subject:  {certificate.subject.rfc4514_string()}",
        f"  serial:   {certificate.serial_number:x}",
        f"  validity: {certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC – "
        f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
    ]


@keys_group.command("init-token")
@click.option("--module", default=keys_lib.DEFAULT_MODULE, show_default=True,
              help="Path of the PKCS#11 module.")
@click.option("--token", "token_label", required=True, help="Label of the token.")
@click.option("--pin-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File (mode 0600) holding the user PIN; recorded in the key store so later "
              "runs read it (default: KOIN_PKCS11_PIN, else ask).")
@click.option("--key-type", type=click.Choice([k.value for k in keys_lib.KeyKind]),
              default=keys_lib.KeyKind.RSA2048.value, show_default=True,
              help="Kind of the keys generated in the token.")
@click.option("--label-prefix", default=keys_lib.DEFAULT_LABEL_PREFIX, show_default=True,
              help="Keys are labelled PREFIX-position, PREFIX-witness, PREFIX-tsa.")
@click.option("--key-label", "key_labels", multiple=True, metavar="ROLE=LABEL",
              help="Label of one role's key instead of PREFIX-ROLE (repeatable).")
@click.option("--import-cert", "import_certs", multiple=True, metavar="ROLE=CERT",
              help="Use the key already in the token for ROLE with this certificate (PEM, "
              "optionally followed by its CA chain) instead of generating one (repeatable).")
@click.pass_obj
@refusals_exit_1
def keys_init_token(
    settings: Settings,
    module: str,
    token_label: str,
    pin_file: Path | None,
    key_type: str,
    label_prefix: str,
    key_labels: Sequence[str],
    import_certs: Sequence[str],
) -> None:
    """Move the position, witness and TSA keys into a PKCS#11 token (HSM).

    Generates each key inside the token (sensitive, not extractable), issues its certificate
    from the demo CA, stores the certificate in the token and in KOIN_HOME/keys, and switches
    the key store to the token. The old PKCS#12 key files are deleted; their certificates are
    archived in KOIN_HOME/keys/archive.
    """
    certificates = {
        role: Path(path) for role, path in _role_pairs(import_certs, "--import-cert").items()
    }
    for path in certificates.values():
        if not path.is_file():
            raise click.BadParameter(f"{path} does not exist", param_hint="--import-cert")
    labels = _role_pairs(key_labels, "--key-label")
    recorded_pin_file: str | None = None
    if pin_file is not None:
        # Inside KOIN_HOME/keys the file is recorded relative to it, so the folder can move.
        resolved, keys_dir = pin_file.resolve(), (settings.home / "keys").resolve()
        recorded_pin_file = str(
            resolved.relative_to(keys_dir) if resolved.is_relative_to(keys_dir) else resolved
        )
        pin, pin_source = keys_lib.resolve_pin(settings.home, recorded_pin_file, env=False)
    elif os.environ.get(keys_lib.PIN_ENV):
        pin, pin_source = os.environ[keys_lib.PIN_ENV], keys_lib.PIN_ENV
    else:
        pin = click.prompt(
            settings.in_language(f"トークン {token_label} の PIN", f"PIN of token {token_label}"),
            hide_input=True, err=True,
        )
        pin_source = "PIN"
    result = keys_lib.init_token(
        settings.home, settings.public_url, module=module, token=token_label, pin=pin,
        pin_source=pin_source, pin_file=recorded_pin_file, kind=keys_lib.KeyKind(key_type),
        label_prefix=label_prefix, key_labels=labels, import_certs=certificates,
    )
    say = settings.in_language
    for entry in result.roles:
        how = (
            say("トークン内で生成", "generated in the token") if entry.generated
            else say("トークン内の既存の鍵", "the key already in the token")
        )
        click.echo(f"{entry.role.value}: {how} (label {entry.key_label})")
        for line in _certificate_lines(entry.certificate):
            click.echo(line)
    for path in result.archived:
        click.echo(say(f"旧証明書を保管しました: {path}", f"Archived the old certificate: {path}"))
    for path in result.removed:
        click.echo(say(f"旧 PKCS#12 鍵ファイルを削除しました: {path}",
                       f"Deleted the old PKCS#12 key file: {path}"))
    click.echo(say(
        f"鍵ストアを PKCS#11 トークン {result.token!r} ({result.module}) に切り替えました。",
        f"Switched the key store to the PKCS#11 token {result.token!r} ({result.module}).",
    ))
    if recorded_pin_file is None:
        click.echo(say(f"署名するプロセスには {keys_lib.PIN_ENV} で PIN を渡してください。",
                       f"Give the signing processes the PIN in {keys_lib.PIN_ENV}."))


@keys_group.command("rotate")
@click.argument("role", type=click.Choice([r.value for r in Role]))
@click.pass_obj
@refusals_exit_1
def keys_rotate(settings: Settings, role: str) -> None:
    """Replace ROLE's key and certificate (new key in the token, or a new PKCS#12 file).

    The old certificate is kept in KOIN_HOME/keys/archive; documents signed before keep
    verifying. Restart running services (koin serve, koin tsa serve) to use the new key.
    """
    rotation = keys_lib.rotate_key(settings.home, Role(role), settings.public_url)
    say = settings.in_language
    click.echo(say(f"{role} の鍵を更新しました ({rotation.backend}):",
                   f"Replaced the {role} key ({rotation.backend}):"))
    for line in _certificate_lines(rotation.certificate):
        click.echo(line)
    serial = f"{rotation.previous.serial_number:x}"
    click.echo(say(f"旧証明書 (serial {serial}) を保管しました: {rotation.archived}",
                   f"Archived the old certificate (serial {serial}): {rotation.archived}"))
    if rotation.previous_key_label:
        label = rotation.previous_key_label
        click.echo(say(f"旧鍵はトークン内にラベル {label} で残っています。",
                       f"The old key stays in the token with the label {label}."))


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
        click.echo(settings.in_language(
            f"CRL を更新しました: {name}", f"Re-issued the CRL: {name}"
        ))


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
    click.echo(settings.in_language(f"TSA: http://{host}:{port}/ (Ctrl-C で終了)",
                                    f"TSA: http://{host}:{port}/ (Ctrl-C to stop)"), err=True)
    serve(authority, host, port)


def _start_mail_transport(
    settings: Settings, dev_port: int | None
) -> tuple[SmtpTransport, DevMailServer | None]:
    """The SMTP server of KOIN_SMTP_URL; without one, the development mailbox (an SMTP server
    filing mail into KOIN_HOME/mail), started on ``dev_port`` (0: any free port; None: 8025,
    or any free port if that is taken).

    :raises KoinError: the URL is unusable or the development server cannot listen.
    """
    from contracts import MailError, SmtpTransport
    from contracts.devmail import DEFAULT_DEV_SMTP_PORT, DevMailServer

    if settings.smtp_url:
        return SmtpTransport.from_url(settings.smtp_url), None
    port = DEFAULT_DEV_SMTP_PORT if dev_port is None else dev_port
    server = DevMailServer(settings.home, port=port)
    try:
        server.start()
    except MailError:
        if dev_port is not None:
            raise
        server = DevMailServer(settings.home, port=0)
        server.start()
        log.warning("port %d is taken; the development mailbox listens on %s instead",
                    DEFAULT_DEV_SMTP_PORT, server.url)
    return server.transport(), server


@cli.group("mail")
def mail_group() -> None:
    """Outgoing mail (the outbox)."""


@mail_group.command("deliver")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1),
              help="Send at most this many messages.")
@click.pass_obj
@refusals_exit_1
def mail_deliver(settings: Settings, limit: int) -> None:
    """Send the queued mail that is due, once (e.g. from cron; `koin serve` does it itself).

    Without KOIN_SMTP_URL the mail is filed in the development mailbox (KOIN_HOME/mail).
    Messages that fail stay queued and are retried later; the exit code is 0 all the same.
    """
    import contracts

    contracts.mail.validate_sender(settings.mail_from)
    _upgrade_database(settings)
    transport, dev_server = _start_mail_transport(settings, dev_port=0)
    engine = contracts.make_engine(_database_url(settings))
    try:
        report = contracts.deliver_due(
            contracts.make_session_factory(engine), transport, limit=limit,
            sender=settings.mail_from,
        )
    finally:
        engine.dispose()
        if dev_server is not None:
            dev_server.stop()
    click.echo(settings.in_language(
        f"メールを送信しました: {len(report.sent)} 件"
        + (f"、失敗 {len(report.failed)} 件(後で再送します)" if report.failed else ""),
        f"Sent {len(report.sent)} message(s)"
        + (f"; {len(report.failed)} failed (sent again later)" if report.failed else ""),
    ))


@cli.group("jobs")
def jobs_group() -> None:
    """Periodic work of witness-type contracts (run from cron or a systemd timer)."""


@jobs_group.command("run-due")
@click.pass_obj
@refusals_exit_1
def jobs_run_due(settings: Settings) -> None:
    """Remind parties who have not answered, expire overdue contracts and finish contracts
    whose witness signature is still due. Exit code 1 if any contract failed (it is retried
    on the next run)."""
    import contracts

    _upgrade_database(settings)
    engine = contracts.make_engine(_database_url(settings))
    try:
        report = contracts.run_due(
            contracts.make_session_factory(engine), _installation(settings),
            public_url=settings.public_url, tsa_urls=settings.tsa_urls,
        )
    finally:
        engine.dispose()
    click.echo(settings.in_language(
        f"督促 {report.reminders_sent} 件、期限切れ {len(report.expired)} 件、"
        f"締結 {len(report.completed)} 件、失敗 {len(report.failed)} 件",
        f"Reminders {report.reminders_sent}, expired {len(report.expired)}, "
        f"completed {len(report.completed)}, failed {len(report.failed)}",
    ))
    for public_id, message, message_en in report.failed:
        _say_error(f"{public_id}: {' '.join(settings.in_language(message, message_en).split())}")
    if report.failed:
        sys.exit(EXIT_REFUSED)


def _worker_config(settings: Settings) -> Any:
    from contracts import tasks

    return tasks.WorkerConfig(
        home=str(settings.home.resolve()),
        database_url=_database_url(settings),
        public_url=settings.public_url,
        tsa_urls=tuple(settings.tsa_urls),
        lease_seconds=settings.batch_lease,
        requeue_seconds=settings.batch_requeue,
        reconcile_interval=settings.reconcile_interval,
        queue=settings.batch_queue,
        smtp_url=settings.smtp_url,
        mail_from=settings.mail_from,
        jobs_interval=settings.jobs_interval,
        lta_interval=settings.lta_interval,
        lta_margin_days=settings.lta_margin_days,
        lta_weak_algorithms=settings.lta_weak_algorithms,
        mail_interval=settings.mail_interval,
        webhooks_interval=settings.webhooks_interval,
    )


def _require_broker(settings: Settings) -> str:
    if not settings.broker_url:
        raise KoinError(
            "KOIN_BROKER_URL が設定されていません(例: redis://127.0.0.1:6379/0)。"
            "1 台構成では koin serve が一括署名も行います。",
            "KOIN_BROKER_URL is not set (e.g. redis://127.0.0.1:6379/0); on one machine "
            "`koin serve` signs batches itself.",
        )
    return settings.broker_url


@cli.command()
@click.option("--concurrency", type=click.IntRange(1, 256), default=os.cpu_count() or 1,
              show_default="number of CPUs", help="Signing processes.")
@click.option("--beat/--no-beat", default=True, show_default=True,
              help="Also run the scheduler of the reconciler (off when `koin scheduler` runs "
              "elsewhere; running it twice does no harm).")
@click.option("--loglevel", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--hostname", help="Celery node name (default: koin@HOST).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), envvar="KOIN_WORKER_METRICS_PORT",
              help="Serve the Prometheus metrics of this worker's signing processes at "
              "http://HOST:PORT/metrics (needs PROMETHEUS_MULTIPROC_DIR; KOIN_METRICS_TOKEN "
              "applies).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              envvar="KOIN_WORKER_METRICS_HOST", help="Address of --metrics-port.")
@click.pass_obj
@refusals_exit_1
def worker(
    settings: Settings, concurrency: int, beat: bool, loglevel: str, hostname: str | None,
    metrics_port: int | None, metrics_host: str,
) -> None:
    """Sign batch documents from the queue (Celery on KOIN_BROKER_URL) until stopped.

    Each process loads the position key once. The database is the source of truth: a worker
    that is killed loses no document (another takes it over when its lease ends).
    """
    from contracts import tasks

    broker_url = _require_broker(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    if metrics_port is not None:
        from ._worker_metrics import serve_worker_metrics

        serve_worker_metrics(metrics_host, metrics_port, settings.metrics_token)
    app = tasks.configure(broker_url, _worker_config(settings))
    argv = [
        "worker", f"--concurrency={concurrency}", "--pool=prefork", f"--loglevel={loglevel}",
        f"--queues={settings.batch_queue}", "--without-gossip", "--without-mingle",
        f"--hostname={hostname or 'koin@%h'}",
    ]
    if beat:
        argv += ["--beat", f"--schedule={settings.home.resolve() / 'celerybeat-schedule'}"]
    app.worker_main(argv)


@cli.command()
@click.option("--loglevel", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.pass_obj
@refusals_exit_1
def scheduler(settings: Settings, loglevel: str) -> None:
    """Send the periodic tasks (the batch reconciler) to the workers, until stopped. Needed
    when the workers run with --no-beat."""
    from contracts import tasks

    broker_url = _require_broker(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    app = tasks.configure(broker_url, _worker_config(settings))
    app.start(["beat", f"--loglevel={loglevel}",
               f"--schedule={settings.home.resolve() / 'celerybeat-schedule'}"])


@cli.group("webhooks")
def webhooks_group() -> None:
    """Outgoing webhooks: endpoints that are told when contracts and batches finish."""


def _event_names(values: Sequence[str]) -> list[str]:
    return [part for value in values for part in value.replace(",", " ").split() if part]


@webhooks_group.command("add")
@click.argument("url")
@click.option("--event", "events", multiple=True, required=True, metavar="TYPE",
              help="Event type to send (repeat, or comma-separated): batch.finished, "
              "contract.completed, contract.declined, contract.expired.")
@click.option("--description", default="", help="What the endpoint is, e.g. the system's name.")
@click.pass_obj
@refusals_exit_1
def webhooks_add(settings: Settings, url: str, events: tuple[str, ...], description: str) -> None:
    """Register an endpoint and print its signing secret once."""
    import contracts

    _upgrade_database(settings)
    with _sessions(settings) as sessions, contracts.session_scope(sessions) as session:
        endpoint, secret = contracts.create_endpoint(
            session, url, events=_event_names(events), description=description
        )
        summary = f"{endpoint.id} {endpoint.url} ({endpoint.events.replace(' ', ',')})"
    click.echo(settings.in_language(
        f"Webhook の送信先を登録しました: {summary}",
        f"Registered the webhook endpoint: {summary}",
    ))
    # stdout only, never the log: this is the one place the secret is ever shown
    click.echo(settings.in_language(
        f"署名用シークレット(この一度だけ表示します。受信側に設定してください): {secret}",
        f"Signing secret (shown this once only; set it on the receiving side): {secret}",
    ))


@webhooks_group.command("list")
@click.pass_obj
@refusals_exit_1
def webhooks_list(settings: Settings) -> None:
    """List the endpoints: ID, state, event types, URL, description (never the secret)."""
    import contracts

    _upgrade_database(settings)
    with _sessions(settings) as sessions, sessions() as session:
        endpoints = contracts.list_endpoints(session)
        counts = contracts.webhooks.delivery_counts(session)
    if not endpoints:
        click.echo(settings.in_language(
            "Webhook の送信先はありません。", "There are no webhook endpoints."
        ))
        return
    for endpoint in endpoints:
        state = "active" if endpoint.active else "disabled"
        mine = counts.get(endpoint.id, {})
        queue = f"pending={mine.get('pending', 0)} failed={mine.get('failed', 0)}"
        click.echo(
            f"{endpoint.id}\t{state}\t{endpoint.events.replace(' ', ',')}\t{endpoint.url}\t"
            f"{queue}\t{endpoint.description}"
        )


def _set_webhook_active(settings: Settings, endpoint_id: int, active: bool) -> None:
    import contracts

    _upgrade_database(settings)
    with _sessions(settings) as sessions, contracts.session_scope(sessions) as session:
        endpoint = contracts.set_endpoint_active(session, endpoint_id, active)
        url = endpoint.url
    if active:
        click.echo(settings.in_language(
            f"Webhook の送信先 {endpoint_id} を有効にしました: {url}",
            f"Enabled the webhook endpoint {endpoint_id}: {url}",
        ))
    else:
        click.echo(settings.in_language(
            f"Webhook の送信先 {endpoint_id} を停止しました: {url}",
            f"Disabled the webhook endpoint {endpoint_id}: {url}",
        ))


@webhooks_group.command("disable")
@click.argument("endpoint_id", type=int)
@click.pass_obj
@refusals_exit_1
def webhooks_disable(settings: Settings, endpoint_id: int) -> None:
    """Stop sending to an endpoint (its pending deliveries wait until it is enabled)."""
    _set_webhook_active(settings, endpoint_id, False)


@webhooks_group.command("enable")
@click.argument("endpoint_id", type=int)
@click.pass_obj
@refusals_exit_1
def webhooks_enable(settings: Settings, endpoint_id: int) -> None:
    """Send to a disabled endpoint again, including what waited meanwhile."""
    _set_webhook_active(settings, endpoint_id, True)


@webhooks_group.command("deliver")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1),
              help="Send at most this many deliveries.")
@click.pass_obj
@refusals_exit_1
def webhooks_deliver(settings: Settings, limit: int) -> None:
    """Send the webhook deliveries that are due, once (e.g. from cron; `koin serve` does it
    itself). Failed ones are retried later; the exit code is 0 all the same."""
    import contracts

    _upgrade_database(settings)
    with _sessions(settings) as sessions:
        report = contracts.deliver_webhooks(sessions, limit=limit)
    click.echo(settings.in_language(
        f"Webhook を配信しました: {len(report.delivered)} 件"
        + (f"、再試行待ち {len(report.retrying)} 件" if report.retrying else "")
        + (f"、失敗(打ち切り) {len(report.failed)} 件" if report.failed else ""),
        f"Delivered {len(report.delivered)} webhook(s)"
        + (f"; {len(report.retrying)} waiting to be retried" if report.retrying else "")
        + (f"; {len(report.failed)} failed (given up)" if report.failed else ""),
    ))


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
    import contracts

    from . import services

    sender = contracts.mail.validate_sender(settings.mail_from)
    # Development mode unless configured: by default, on exactly when mail stays local.
    dev_mode = settings.dev_mode if settings.dev_mode is not None else not settings.smtp_url
    transport, dev_server = _start_mail_transport(settings, settings.dev_smtp_port)
    try:
        app = create_app({"KOIN_DEV_MODE": dev_mode})
        with app.app_context():
            worker = contracts.MailWorker(services.session_factory(), transport, sender=sender)
            webhooks = contracts.WebhookWorker(services.session_factory())
            # Reminders, expiry and unfinished completions (what `koin jobs run-due` does).
            jobs = (
                contracts.JobWorker(
                    services.session_factory(), services.installation(),
                    public_url=app.config["KOIN_PUBLIC_URL"], tsa_urls=settings.tsa_urls,
                    interval=settings.jobs_interval,
                )
                if settings.jobs_interval > 0
                else None
            )
            # Batches: Celery workers when a broker is configured, else a thread here.
            batches = None
            if not settings.broker_url:
                batches = contracts.BatchWorker(
                    services.session_factory(), services.installation(),
                    threads=max(1, settings.batch_threads),
                    public_url=app.config["KOIN_PUBLIC_URL"], tsa_urls=settings.tsa_urls,
                    lease=dt.timedelta(seconds=settings.batch_lease),
                )
                services.attach_batch_worker(batches)
            # Long-term validity of the stored signed files (what `koin lta renew` does).
            lta = (
                contracts.LtaWorker(
                    services.session_factory(), services.installation(),
                    policy=contracts.LtaPolicy.from_settings(
                        settings.lta_margin_days, settings.lta_weak_algorithms
                    ),
                    tsa_urls=settings.tsa_urls, interval=settings.lta_interval,
                )
                if settings.lta_interval > 0
                else None
            )
        say = settings.in_language
        if dev_server is None:
            click.echo(say(f"koin: メールの送信先 {transport.url}",
                           f"koin: mail goes to {transport.url}"), err=True)
        else:
            mailbox = (
                f"http://{host}:{port}/dev/mailbox" if dev_mode else str(dev_server.folder)
            )
            click.echo(say(f"koin: 開発用メールボックス {mailbox} (SMTP {dev_server.url})",
                           f"koin: development mailbox {mailbox} (SMTP {dev_server.url})"),
                       err=True)
        click.echo(say(f"koin: http://{host}:{port}/ (Ctrl-C で終了)",
                       f"koin: http://{host}:{port}/ (Ctrl-C to stop)"), err=True)
        with worker, webhooks:
            for periodic in (jobs, batches, lta):
                if periodic is not None:
                    periodic.start()
            try:
                app.run(host=host, port=port, threaded=True, use_reloader=False)
            finally:
                for periodic in (jobs, batches, lta):
                    if periodic is not None:
                        periodic.stop()
    finally:
        if dev_server is not None:
            dev_server.stop()


from ._cli_lta import evidence_group, lta_group  # noqa: E402  (they use the helpers above)

cli.add_command(lta_group)
cli.add_command(evidence_group)
from ._cli_backup import backup_command, restore_command  # noqa: E402

cli.add_command(backup_command)
cli.add_command(restore_command)
from ._cli_demo import demo  # noqa: E402

cli.add_command(demo)


def _internal_error_message() -> str:
    bilingual = "内部エラーが発生しました(internal error); see the log above."
    try:
        return Settings().in_language(bilingual, "Internal error; see the log above.")
    except Exception:  # the settings themselves may be what failed
        return bilingual


def main(argv: Sequence[str] | None = None) -> None:
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="koin")
    except SystemExit:
        raise
    except Exception:  # a bug, not a refusal: keep the traceback in the log, not on stdout
        log.exception("internal error")
        _say_error(_internal_error_message())
        sys.exit(EXIT_INTERNAL)

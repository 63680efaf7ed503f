"""``koin backup OUT`` and ``koin restore IN`` (registered on the ``koin`` group in
:mod:`web.cli`); the work is done by :mod:`contracts.backup`."""

from __future__ import annotations

import os
from pathlib import Path

import click

from keys import KoinError

from .cli import _database_url
from .cli import refusals_exit_1 as _refusals_exit_1
from .config import Settings

__all__ = ["backup_command", "restore_command"]


def _passphrase(passphrase_file: Path | None) -> bytes | None:
    """The backup passphrase: from ``--passphrase-file``, else ``KOIN_BACKUP_PASSPHRASE``.

    :raises KoinError: the file cannot be read or is empty.
    """
    from contracts.backup import BACKUP_PASSPHRASE_ENV

    if passphrase_file is not None:
        try:
            value = passphrase_file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise KoinError(
                f"パスフレーズファイル {passphrase_file} を読めません。",
                f"Cannot read the passphrase file {passphrase_file} ({exc.__class__.__name__}).",
            ) from exc
        if not value:
            raise KoinError(
                f"パスフレーズファイル {passphrase_file} が空です。",
                f"The passphrase file {passphrase_file} is empty.",
            )
        return value
    from_env = os.environ.get(BACKUP_PASSPHRASE_ENV, "")
    return from_env.encode("utf-8") if from_env else None


_PASSPHRASE_OPTION = click.option(
    "--passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the passphrase that encrypts the secrets in the backup (default: "
    "KOIN_BACKUP_PASSPHRASE).",
)


def _backup(settings: Settings, out: Path, passphrase_file: Path | None) -> None:
    """Write a backup of this installation to OUT (a new .tar.gz, mode 0600): every table as
    JSON Lines (read in one consistent transaction), every file below KOIN_HOME, the key store;
    secrets that are not encrypted on disk are encrypted with the backup passphrase (AES-256-GCM,
    scrypt). Safe to run while koin serves."""
    from contracts.backup import create_backup

    report = create_backup(
        settings.home, _database_url(settings), out, passphrase=_passphrase(passphrase_file)
    )
    rows = sum(report.tables.values())
    click.echo(settings.in_language(
        f"バックアップしました: {report.path} (版 {report.revision}, {len(report.tables)} 表 "
        f"{rows} 行, ファイル {report.files} 件, 暗号化した秘密情報 {report.secrets} 件, "
        f"{report.size} バイト)",
        f"Backed up to {report.path} (revision {report.revision}, {len(report.tables)} tables "
        f"with {rows} rows, {report.files} files, {report.secrets} encrypted secrets, "
        f"{report.size} bytes)",
    ))


def _restore(
    settings: Settings, archive: Path, passphrase_file: Path | None, force: bool
) -> None:
    """Restore the backup IN into KOIN_HOME and the database of KOIN_DATABASE_URL (SQLite or
    PostgreSQL, whichever the backup came from). Every member is checked against the
    manifest's SHA-256 before anything is written. With --force, an installation already in
    KOIN_HOME is first moved aside whole (to KOIN_HOME.replaced-<time>, or into
    KOIN_HOME/.replaced-<time>), a SQLite database inside it included."""
    from contracts.backup import restore_backup

    report = restore_backup(
        archive, settings.home, _database_url(settings),
        passphrase=_passphrase(passphrase_file), force=force,
    )
    rows = sum(report.tables.values())
    click.echo(settings.in_language(
        f"復元しました: {settings.home} ({report.created_at} の koin {report.koin_version} の"
        f"バックアップ, 版 {report.revision}, {rows} 行, ファイル {report.files} 件, "
        f"秘密情報 {report.secrets} 件)",
        f"Restored into {settings.home} (backup of koin {report.koin_version} made "
        f"{report.created_at}, revision {report.revision}, {rows} rows, {report.files} files, "
        f"{report.secrets} secrets)",
    ))
    if report.replaced is not None:
        click.echo(settings.in_language(
            f"それまで {settings.home} にあったインストールは {report.replaced} に移しました。"
            "復元を確かめたら、そのフォルダを別の場所に保管するか削除してください。",
            f"The installation that was in {settings.home} was moved to {report.replaced}; "
            "once the restore is checked, keep that folder elsewhere or delete it.",
        ))


# Typed assignments rather than decorators: web.cli imports this module at its end, and mypy
# cannot type decorated names across that cycle.
backup_command: click.Command = click.command("backup")(
    click.argument("out", type=click.Path(dir_okay=False, path_type=Path))(
        _PASSPHRASE_OPTION(click.pass_obj(_refusals_exit_1(_backup)))
    )
)
restore_command: click.Command = click.command("restore")(
    click.argument("archive", metavar="IN", type=click.Path(dir_okay=False, path_type=Path))(
        _PASSPHRASE_OPTION(
            click.option(
                "--force", is_flag=True,
                help="Restore even if KOIN_HOME or the database already holds an installation: "
                "everything in KOIN_HOME (a SQLite database in it too) is first moved aside to "
                "KOIN_HOME.replaced-<time> (or KOIN_HOME/.replaced-<time>); koin's tables in "
                "another database are dropped.",
            )(click.pass_obj(_refusals_exit_1(_restore)))
        )
    )
)

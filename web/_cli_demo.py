"""``koin demo``: realistic Japanese demo data in this installation (registered on the ``koin``
group in :mod:`web.cli`; the data itself is made by :mod:`contracts.demo`)."""

from __future__ import annotations

import click

from .cli import (
    _create_secret_key_file,
    _installation,
    _sessions,
    _upgrade_database,
    refusals_exit_1,
)
from .config import Settings

__all__ = ["demo"]


@click.pass_obj
@refusals_exit_1
def _demo(settings: Settings) -> None:
    """Add demo data (idempotent): an administrator, the signers 田中 太郎 and 佐藤 花子, the
    contract officer 鈴木 一郎, three stamp templates, signed permits, a finished batch of 20
    permits (one broken file) and contracts in every state. Passwords of new accounts and the
    access codes of parties still to answer are printed once. For demonstrations and trials
    only: not on a production installation."""
    from contracts.demo import seed_demo

    installation = _installation(settings)
    installation.initialize()
    _upgrade_database(settings)
    _create_secret_key_file(settings)
    say = settings.in_language
    click.echo(say("デモデータを作成しています(数十秒かかります)…",
                   "Creating the demo data (this takes a minute or less)…"))
    with _sessions(settings) as sessions:
        report = seed_demo(sessions, installation, public_url=settings.public_url,
                           tsa_urls=settings.tsa_urls)
    for item in report.created:
        click.echo(say(f"作成: {item.message}", f"Created: {item.message_en}"))
    if report.existing:
        click.echo(say(f"既にあるもの(変更なし): {len(report.existing)} 件",
                       f"Already there (unchanged): {len(report.existing)}"))
    if report.passwords:
        # stdout only, never the log: the one place these passwords are ever shown
        click.echo(say("初期パスワード(この一度だけ表示します。安全な場所に控えてください):",
                       "Initial passwords (shown this once only; keep them somewhere safe):"))
    for email, password in report.passwords.items():
        click.echo(f"  {email}  {password}")
    for title, party, code in report.access_codes:
        # shown this once, like on the officer's page; only the hash is kept
        click.echo(say(f"アクセスコード: {title} / {party}: {code}",
                       f"Access code: {title} / {party}: {code}"))
    if not report.created:
        click.echo(say("デモデータは既にそろっています。", "The demo data is all there already."))
    base = settings.public_url.rstrip("/")
    click.echo(say(
        f"ログイン: {base}/login  メール(koin serve の開発用メールボックス): {base}/dev/mailbox",
        f"Log in: {base}/login  Mail (the development mailbox of koin serve): "
        f"{base}/dev/mailbox",
    ))


demo: click.Command = click.command("demo")(_demo)

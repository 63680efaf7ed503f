"""``koin lta renew`` and ``koin evidence export``: long-term validity from the command line
(registered on the ``koin`` group in :mod:`web.cli`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from keys import atomic_write

from .cli import EXIT_REFUSED, _installation, _say_error, _sessions, _upgrade_database
from .cli import refusals_exit_1 as _refusals_exit_1
from .config import Settings

__all__ = ["evidence_group", "lta_group"]


def _lta() -> None:
    """Long-term validity (PAdES B-LTA) of the signed files this service stores."""


lta_group: click.Group = click.group("lta")(_lta)


@lta_group.command("renew")
@click.option("--margin-days", type=click.FloatRange(min=0), default=None,
              help="Renew this many days before the newest timestamp's TSA certificate "
              "expires (default: KOIN_LTA_MARGIN_DAYS, else 365).")
@click.option("--dry-run", is_flag=True,
              help="Only list the files that are due; change nothing.")
@click.pass_obj
@_refusals_exit_1
def lta_renew(settings: Settings, margin_days: float | None, dry_run: bool) -> None:
    """Keep every stored signed file at B-LTA: add a document timestamp (and the validation
    data of everything in the file) before the newest timestamp's TSA certificate expires, or
    when its algorithms are configured as weak (KOIN_LTA_WEAK_ALGORITHMS); renew chain-head
    tokens likewise. Safe to run from cron next to `koin serve`. Exit code 1 if a file could
    not be renewed (it is retried on the next run)."""
    import contracts
    from contracts.lta import DEFAULT_CHUNK

    policy = contracts.LtaPolicy.from_settings(
        settings.lta_margin_days if margin_days is None else margin_days,
        settings.lta_weak_algorithms,
    )
    _upgrade_database(settings)
    with _sessions(settings) as sessions:
        if dry_run:
            with sessions() as session:
                due = contracts.list_due(session, policy)
            for item in due:
                reason = settings.in_language(item.reason.label_ja, item.reason.label_en)
                until = item.tsa_not_after.date().isoformat() if item.tsa_not_after else "-"
                line = f"{item.label}\t{reason}\t{until}"
                error = settings.in_language(item.error or "", item.error_en or "")
                if error:
                    line += f"\t{' '.join(error.split())}"
                click.echo(line)
            click.echo(settings.in_language(
                f"更新の対象: {len(due)} 件(何も変更していません)",
                f"Due: {len(due)} file(s) (nothing was changed)",
            ))
            return
        installation = _installation(settings)
        renewed = up_to_date = 0
        failed: list[tuple[str, str, str]] = []
        while True:
            report = contracts.renew_due(
                sessions, installation, policy=policy, tsa_urls=settings.tsa_urls,
                limit=DEFAULT_CHUNK,
            )
            renewed += len(report.renewed)
            up_to_date += report.up_to_date
            failed.extend(report.failed)
            for done in report.renewed:
                reason = settings.in_language(done.reason.label_ja, done.reason.label_en)
                click.echo(f"{done.label}\t{reason}\t{done.tsa_not_after.date().isoformat()}")
            if report.claimed < DEFAULT_CHUNK:
                break
    click.echo(settings.in_language(
        f"更新 {renewed} 件、変更なし {up_to_date} 件、失敗 {len(failed)} 件",
        f"Renewed {renewed}, unchanged {up_to_date}, failed {len(failed)}",
    ))
    for label, message, message_en in failed:
        _say_error(f"{label}: {' '.join(settings.in_language(message, message_en).split())}")
    if failed:
        sys.exit(EXIT_REFUSED)


def _evidence() -> None:
    """Evidence packages of completed contracts."""


evidence_group: click.Group = click.group("evidence")(_evidence)


@evidence_group.command("export")
@click.argument("contract_id")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
@_refusals_exit_1
def evidence_export(settings: Settings, contract_id: str, out: Path) -> None:
    """Write the evidence package of the completed contract CONTRACT_ID (its public ID) to
    OUT (a ZIP): final and original PDF, the audit chain as JSON Lines, the chain-head
    timestamps, certificates, CRLs and VERIFY.md with the openssl commands that check it.

    New IDs never begin with '-'; an older one that does goes after '--':
    koin evidence export -- -6Iw... out.zip"""
    import contracts
    from contracts.evidence import build_evidence_package

    _upgrade_database(settings)
    installation = _installation(settings)
    with _sessions(settings) as sessions, sessions() as session:
        contract = contracts.require_contract(session, contract_id.strip())
        package = build_evidence_package(
            session, settings.home, contract, installation.trust_material()
        )
    try:
        atomic_write(out, package.data)
    except OSError as exc:
        from keys import KoinError

        raise KoinError(
            f"{out} に書き込めません。", f"Cannot write {out}: {exc.strerror}"
        ) from exc
    click.echo(settings.in_language(
        f"証拠パッケージを書き出しました: {out}({len(package.members)} ファイル)",
        f"Evidence package written: {out} ({len(package.members)} files)",
    ))

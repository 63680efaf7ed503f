"""Settings of one installation, read from ``KOIN_*`` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Settings"]


def _split(value: str) -> list[str]:
    return [part for part in value.replace(",", " ").split() if part]


def _flag(value: str | None) -> bool | None:
    if value is None or not value.strip():
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    #: Folder holding keys, database and files of this installation.
    home: Path = field(default_factory=lambda: Path(os.environ.get("KOIN_HOME", "instance")))
    #: The URL under which the service is reachable (CRL distribution points, verify links).
    public_url: str = field(
        default_factory=lambda: os.environ.get("KOIN_PUBLIC_URL", "http://127.0.0.1:5000")
    )
    #: External TSAs, tried in order; empty = the embedded TSA of this installation.
    tsa_urls: list[str] = field(default_factory=lambda: _split(os.environ.get("KOIN_TSA_URLS", "")))
    #: Largest PDF accepted for verification (and signing uploads), in bytes.
    max_upload_bytes: int = field(
        default_factory=lambda: int(os.environ.get("KOIN_MAX_UPLOAD_MIB", "50")) * 1024 * 1024
    )
    #: Seconds one verification may take before it is stopped.
    verify_time_limit: float = field(
        default_factory=lambda: float(os.environ.get("KOIN_VERIFY_TIME_LIMIT", "30"))
    )
    #: Database URL (default: SQLite in KOIN_HOME).
    database_url: str | None = field(default_factory=lambda: os.environ.get("KOIN_DATABASE_URL"))
    #: Language of messages on the command line and default UI ("ja" or "en").
    language: str = field(
        default_factory=lambda: "en" if os.environ.get("KOIN_LANG", "ja").startswith("en") else "ja"
    )
    #: SMTP server for outgoing mail, ``smtp://`` or ``smtps://`` (see contracts._smtp); None:
    #: ``koin serve`` runs the development mailbox instead.
    smtp_url: str | None = field(
        default_factory=lambda: os.environ.get("KOIN_SMTP_URL", "").strip() or None
    )
    #: ``From`` of outgoing mail; None: contracts.mail.DEFAULT_MAIL_FROM.
    mail_from: str | None = field(
        default_factory=lambda: os.environ.get("KOIN_MAIL_FROM", "").strip() or None
    )
    #: Development mode (``KOIN_DEV_MODE=1``): pages such as /dev/mailbox exist. None when
    #: unset: off in create_app, on in ``koin serve`` when there is no KOIN_SMTP_URL.
    dev_mode: bool | None = field(default_factory=lambda: _flag(os.environ.get("KOIN_DEV_MODE")))
    #: Port of the development mailbox's SMTP server in ``koin serve``; None when unset: 8025,
    #: or any free port if 8025 is taken.
    dev_smtp_port: int | None = field(
        default_factory=lambda: int(os.environ["KOIN_DEV_SMTP_PORT"])
        if os.environ.get("KOIN_DEV_SMTP_PORT", "").strip()
        else None
    )
    #: Seconds between runs of the periodic contract jobs (reminders, expiry, unfinished
    #: completions) inside ``koin serve``; 0 = not in-process (run ``koin jobs run-due`` instead).
    jobs_interval: float = field(
        default_factory=lambda: float(os.environ.get("KOIN_JOBS_INTERVAL", "").strip() or 60)
    )
    #: Rate limit of the REST API per API key and per process: requests per second, and burst.
    api_rate: float = field(
        default_factory=lambda: float(os.environ.get("KOIN_API_RATE", "").strip() or 10)
    )
    api_burst: int = field(
        default_factory=lambda: int(os.environ.get("KOIN_API_BURST", "").strip() or 20)
    )
    #: Where rate limits count (web.ratelimit): "memory" (each process) or a Redis URL (all
    #: processes of all machines); None: the broker when that is Redis, else memory.
    rate_limit_store: str | None = field(
        default_factory=lambda: os.environ.get("KOIN_RATE_LIMIT_STORE", "").strip() or None
    )
    #: Celery broker (e.g. ``redis://127.0.0.1:6379/0``): batches are signed by ``koin worker``
    #: processes. None: by a thread of ``koin serve`` (embedded, one machine).
    broker_url: str | None = field(
        default_factory=lambda: os.environ.get("KOIN_BROKER_URL", "").strip() or None
    )
    #: Seconds a worker holds a claimed batch document before another may take it over.
    batch_lease: float = field(
        default_factory=lambda: float(os.environ.get("KOIN_BATCH_LEASE", "").strip() or 300)
    )
    #: Seconds after which a document still waiting in the queue is handed over again.
    batch_requeue: float = field(
        default_factory=lambda: float(os.environ.get("KOIN_BATCH_REQUEUE", "").strip() or 120)
    )
    #: Seconds between two rounds of the batch reconciler (Celery scheduler).
    reconcile_interval: float = field(
        default_factory=lambda: float(os.environ.get("KOIN_RECONCILE_INTERVAL", "").strip() or 15)
    )
    #: Signing threads of the embedded batch worker in ``koin serve`` (no broker).
    batch_threads: int = field(
        default_factory=lambda: int(os.environ.get("KOIN_BATCH_THREADS", "").strip() or 2)
    )
    #: Broker queue of this installation's batch tasks.
    batch_queue: str = field(
        default_factory=lambda: os.environ.get("KOIN_BATCH_QUEUE", "").strip() or "koin.batches"
    )
    #: Long-term validity: renew a stored file this many days before its newest timestamp's
    #: TSA certificate expires.
    lta_margin_days: float = field(
        default_factory=lambda: float(os.environ.get("KOIN_LTA_MARGIN_DAYS", "").strip() or 365)
    )
    #: Algorithms no longer trusted (e.g. ``sha1,rsa1024``): timestamps using them are renewed.
    lta_weak_algorithms: str = field(
        default_factory=lambda: os.environ.get("KOIN_LTA_WEAK_ALGORITHMS", "").strip()
    )
    #: Seconds between two rounds of the long-term renewal inside ``koin serve``; 0 = not
    #: in-process (run ``koin lta renew`` from cron instead).
    lta_interval: float = field(
        default_factory=lambda: float(os.environ.get("KOIN_LTA_INTERVAL", "").strip() or 3600)
    )
    #: Seconds between the scheduler's mail and webhook delivery tasks (Celery layout).
    mail_interval: float = field(
        default_factory=lambda: float(os.environ.get("KOIN_MAIL_INTERVAL", "").strip() or 10)
    )
    webhooks_interval: float = field(
        default_factory=lambda: float(os.environ.get("KOIN_WEBHOOKS_INTERVAL", "").strip() or 10)
    )
    #: Reverse proxies in front of koin whose X-Forwarded-For / X-Forwarded-Proto headers are
    #: trusted (client addresses for rate limits and the audit trail); 0 = none.
    trusted_proxies: int = field(
        default_factory=lambda: int(os.environ.get("KOIN_TRUSTED_PROXIES", "").strip() or 0)
    )
    #: Bearer token that scrapers of ``/metrics`` must send; None: the page is open.
    metrics_token: str | None = field(
        default_factory=lambda: os.environ.get("KOIN_METRICS_TOKEN", "").strip() or None
    )
    #: The admin status page warns this many days before a certificate expires.
    cert_warning_days: int = field(
        default_factory=lambda: int(os.environ.get("KOIN_CERT_WARNING_DAYS", "").strip() or 90)
    )

    def in_language(self, message: str, message_en: str) -> str:
        """The message in the language of the command line (``KOIN_LANG``; Japanese unless
        English was chosen)."""
        return message_en if self.language == "en" else message

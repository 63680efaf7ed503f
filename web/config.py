"""Settings of one installation, read from ``KOIN_*`` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Settings"]


def _split(value: str) -> list[str]:
    return [part for part in value.replace(",", " ").split() if part]


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

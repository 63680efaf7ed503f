"""The periodic job of witness-type contracts in a background thread, for ``koin serve``.

:func:`contracts.run_due` expires overdue contracts, reminds parties and finishes contracts left
in ``completing``. Elsewhere run ``koin jobs run-due`` from cron; both may run at once (every
step locks its contract and completion is claimed, see :mod:`contracts.workflow`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy.orm import Session, sessionmaker

from signer import Installation

from ._periodic import PeriodicWorker
from .workflow import JobReport, run_due

__all__ = ["DEFAULT_JOBS_INTERVAL", "JobWorker"]

log = logging.getLogger(__name__)

#: Seconds between two runs of :func:`contracts.run_due` in ``koin serve``.
DEFAULT_JOBS_INTERVAL = 60.0


class JobWorker(PeriodicWorker[JobReport]):
    """A background thread that runs :func:`contracts.run_due` right away and then every
    ``interval`` seconds until :meth:`stop`. Errors are logged and the next round goes on;
    nothing escapes the thread."""

    thread_name = "koin-jobs"

    def __init__(
        self,
        sessions: sessionmaker[Session],
        installation: Installation,
        *,
        public_url: str,
        tsa_urls: Sequence[str] = (),
        interval: float = DEFAULT_JOBS_INTERVAL,
    ) -> None:
        """:raises ValueError: ``interval`` is not positive."""
        super().__init__(interval)
        self.sessions = sessions
        self.installation = installation
        self.public_url = public_url
        self.tsa_urls = tuple(tsa_urls)

    def run_once(self) -> JobReport | None:
        """One round; None if it failed as a whole (the error is logged)."""
        try:
            report = run_due(
                self.sessions, self.installation, public_url=self.public_url,
                tsa_urls=self.tsa_urls,
            )
        except Exception:
            log.exception("periodic contract jobs failed; trying again in %.0f s", self.interval)
            return None
        if report.reminders_sent or report.expired or report.completed:
            log.info(
                "periodic contract jobs: %d reminders, %d expired, %d completed",
                report.reminders_sent, len(report.expired), len(report.completed),
            )
        for public_id, _, message_en in report.failed:
            log.warning("periodic contract jobs: contract %s failed: %s", public_id, message_en)
        return report

"""The WSGI entry point for a production server: ``gunicorn web.wsgi:app``.

Every setting comes from the ``KOIN_*`` environment (see :class:`web.config.Settings`). The web
tier runs no background threads here: with ``KOIN_BROKER_URL`` set, batches go to ``koin
worker`` processes and the periodic work (mail, reminders, webhooks, renewals) is sent by
``koin scheduler``; run ``koin db upgrade`` before starting it after an upgrade.
"""

from __future__ import annotations

from . import create_app

__all__ = ["app"]

app = create_app()

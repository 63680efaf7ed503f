"""The web application (``create_app``) and the ``koin`` command line."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

from .config import Settings

__all__ = ["create_app"]


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Application factory.

    ``config`` overrides settings (tests pass ``{"KOIN_HOME": tmp_path}``); everything else comes
    from ``KOIN_*`` environment variables.
    """
    settings = Settings()
    app = Flask(__name__)
    app.config.from_mapping(
        KOIN_HOME=str(settings.home),
        KOIN_PUBLIC_URL=settings.public_url,
        KOIN_DATABASE_URL=settings.database_url,
        KOIN_MAX_UPLOAD_BYTES=settings.max_upload_bytes,
        KOIN_VERIFY_TIME_LIMIT=settings.verify_time_limit,
        # External TSAs for the witness signature made when a party gives the last consent.
        KOIN_TSA_URLS=settings.tsa_urls,
        # Token bucket per API key and per process (web.apiauth): requests/second, burst.
        KOIN_API_RATE=settings.api_rate,
        KOIN_API_BURST=settings.api_burst,
        # Batches: Celery broker (None: a worker thread of `koin serve`), lease and re-queueing.
        KOIN_BROKER_URL=settings.broker_url,
        KOIN_BATCH_LEASE=settings.batch_lease,
        KOIN_BATCH_REQUEUE=settings.batch_requeue,
        KOIN_RECONCILE_INTERVAL=settings.reconcile_interval,
        KOIN_BATCH_QUEUE=settings.batch_queue,
        # Development mode: /dev/mailbox and other pages that must not exist in production.
        KOIN_DEV_MODE=bool(settings.dev_mode),
        # the whole request may carry a little more than the file (multipart framing)
        MAX_CONTENT_LENGTH=settings.max_upload_bytes + 1024 * 1024,
        BABEL_DEFAULT_LOCALE="ja",
        BABEL_DEFAULT_TIMEZONE="Asia/Tokyo",
        JSON_AS_ASCII=False,
        # Staff sessions (web.auth): a signed cookie, 8 hours at most, Secure when the public
        # URL is https (None = decide from KOIN_PUBLIC_URL).
        SESSION_COOKIE_NAME="koin_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=None,
        PERMANENT_SESSION_LIFETIME=8 * 3600,
        WTF_CSRF_TIME_LIMIT=8 * 3600,
        # Security headers and rate limits (web.security): reverse proxies whose
        # X-Forwarded-For/-Proto are trusted, and overrides of DEFAULT_RATE_LIMITS.
        KOIN_TRUSTED_PROXIES=settings.trusted_proxies,
        KOIN_RATE_LIMITS={},
        KOIN_RATE_LIMIT_STORE=settings.rate_limit_store,
        # Operations (web.metrics, web.status_views): bearer token of /metrics (None: open),
        # days before a certificate's expiry from which the status page warns.
        KOIN_METRICS_TOKEN=settings.metrics_token,
        KOIN_CERT_WARNING_DAYS=settings.cert_warning_days,
    )
    if config:
        app.config.from_mapping(config)
    if config and "KOIN_MAX_UPLOAD_BYTES" in config and "MAX_CONTENT_LENGTH" not in config:
        app.config["MAX_CONTENT_LENGTH"] = int(config["KOIN_MAX_UPLOAD_BYTES"]) + 1024 * 1024
    app.json.ensure_ascii = False  # type: ignore[attr-defined]

    from . import (
        account_views,
        admin_views,
        api,
        api_batches,
        api_contracts,
        apikey_views,
        auth,
        batch_views,
        contract_views,
        health,
        i18n,
        logs,
        metrics,
        party_views,
        pki,
        security,
        services,
        status_views,
        template_views,
        verify_views,
        webhook_views,
    )

    logs.init_app(app)
    i18n.init_app(app)
    services.init_app(app)
    auth.init_app(app)
    security.init_app(app)
    # CSRF protects every form; exempt are the stateless public verification (page and API,
    # side-effect free) and the RFC 3161 TSA endpoint (machine-to-machine, no cookies).
    auth.csrf.exempt(api.bp)
    auth.csrf.exempt(api_batches.bp)
    auth.csrf.exempt(api_contracts.bp)  # API keys, no cookies
    auth.csrf.exempt(verify_views.bp)
    auth.csrf.exempt(pki.tsa)
    app.register_blueprint(auth.bp)
    app.register_blueprint(account_views.bp)
    app.register_blueprint(pki.bp)
    app.register_blueprint(verify_views.bp)
    app.register_blueprint(contract_views.bp)
    app.register_blueprint(party_views.bp)
    app.register_blueprint(template_views.bp)
    app.register_blueprint(webhook_views.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(api_batches.bp)
    app.register_blueprint(api_contracts.bp)
    app.register_blueprint(apikey_views.bp)
    app.register_blueprint(batch_views.bp)
    app.register_blueprint(admin_views.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(status_views.bp)
    if app.config["KOIN_DEV_MODE"] in (True, 1, "1", "true"):
        from . import devmail_views

        app.register_blueprint(devmail_views.bp)
    return app

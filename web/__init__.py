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
        # the whole request may carry a little more than the file (multipart framing)
        MAX_CONTENT_LENGTH=settings.max_upload_bytes + 1024 * 1024,
        BABEL_DEFAULT_LOCALE="ja",
        BABEL_DEFAULT_TIMEZONE="Asia/Tokyo",
        JSON_AS_ASCII=False,
    )
    if config:
        app.config.from_mapping(config)
    if config and "KOIN_MAX_UPLOAD_BYTES" in config and "MAX_CONTENT_LENGTH" not in config:
        app.config["MAX_CONTENT_LENGTH"] = int(config["KOIN_MAX_UPLOAD_BYTES"]) + 1024 * 1024
    app.json.ensure_ascii = False  # type: ignore[attr-defined]

    from . import api, i18n, pki, services, verify_views

    i18n.init_app(app)
    services.init_app(app)
    app.register_blueprint(pki.bp)
    app.register_blueprint(verify_views.bp)
    app.register_blueprint(api.bp)
    return app

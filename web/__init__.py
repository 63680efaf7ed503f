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
        MAX_CONTENT_LENGTH=64 * 1024 * 1024,
    )
    if config:
        app.config.from_mapping(config)

    from . import pki

    app.register_blueprint(pki.bp)
    return app

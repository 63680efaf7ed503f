"""One place that turns refusals into HTTP answers: JSON for the API, a page for people."""

from __future__ import annotations

from typing import Any

from flask import Response, g, jsonify, render_template

__all__ = ["api_error", "page_error"]


def api_error(status: int, code: str, message: str, message_en: str) -> tuple[Response, int]:
    """``{"error": {"code", "message", "message_en"}}`` with ``status``."""
    body = {"error": {"code": code, "message": message, "message_en": message_en}}
    return jsonify(body), status


def page_error(
    status: int, message: str, message_en: str, template: str = "error.html", **context: Any
) -> tuple[str, int]:
    text = message_en if getattr(g, "lang", "ja") == "en" else message
    return render_template(template, error=text, status=status, **context), status

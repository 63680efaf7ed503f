"""REST API v1 (public part): verification. Documented in ``static/openapi.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from signer import VerifyInputError

from .errors import api_error
from .uploads import uploaded_pdf
from .verify_views import run_verification

__all__ = ["bp"]

bp = Blueprint("api", __name__, url_prefix="/api/v1")

OPENAPI_FILE = Path(__file__).parent / "static" / "openapi.json"


@bp.post("/verify")
def verify() -> tuple[Response, int] | Response:
    """Verify a PDF; the body is ``application/pdf`` or multipart with field ``file``.

    :raise 400: nothing uploaded. :raise 413: too large. :raise 415: not a PDF / wrong type.
    :raise 422: encrypted, unreadable, or too complex to verify within the limits.
    """
    try:
        data, _ = uploaded_pdf()
        report = run_verification(data)
    except RequestEntityTooLarge:
        limit = int(current_app.config["KOIN_MAX_UPLOAD_BYTES"])
        return api_error(
            413, "too_large", "ファイルが大きすぎます。", f"The file is larger than {limit} bytes."
        )
    except VerifyInputError as exc:
        return api_error(exc.status, exc.reason, exc.message, exc.message_en)
    return jsonify(report.to_dict())


@bp.get("/openapi.json")
def openapi() -> Response:
    document: dict[str, Any] = json.loads(OPENAPI_FILE.read_text("utf-8"))
    return jsonify(document)


@bp.app_errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> tuple[Response, int] | HTTPException:
    """JSON errors under /api/ (routing errors happen before any blueprint is chosen)."""
    if not request.path.startswith(bp.url_prefix or "/api/"):
        return exc
    code = exc.code or 500
    text = exc.description or exc.name or ""
    return api_error(code, (exc.name or "error").lower().replace(" ", "_"), text, text)

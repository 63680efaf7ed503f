"""REST API v1: public verification, and signing with an API key (:mod:`web.apiauth`).
Documented by the OpenAPI fragments in ``web/openapi/`` (:func:`openapi_document`)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from contracts import SigningChannel, get_template, session_scope, sign_and_record
from contracts import sign_options as template_sign_options
from contracts.apikeys import ApiScope
from keys import Role
from signer import (
    EncryptedPdfError,
    InvalidPdfError,
    Placement,
    PlacementError,
    SignatureLevel,
    SigningError,
    SignOptions,
    UnsignablePdfError,
    VerifyInputError,
)
from timestamp import TimestampError

from . import services
from .apiauth import api_user, require_api_key
from .errors import api_error
from .uploads import uploaded_pdf
from .verify_views import run_verification, verify_rate_limited

__all__ = ["bp"]

bp = Blueprint("api", __name__, url_prefix="/api/v1")

#: One OpenAPI fragment per area of the API; ``00-base.json`` holds ``openapi``, ``info`` and the
#: shared components, the others add ``paths`` and ``components``.
OPENAPI_DIR = Path(__file__).parent / "openapi"

log = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class _BadParameter(Exception):
    def __init__(self, name: str, message: str, message_en: str) -> None:
        super().__init__(name)
        self.name = name
        self.message = message
        self.message_en = message_en


def _too_large() -> tuple[Response, int]:
    limit = int(current_app.config["KOIN_MAX_UPLOAD_BYTES"])
    return api_error(
        413, "too_large", "ファイルが大きすぎます。", f"The file is larger than {limit} bytes."
    )


@bp.post("/verify")
def verify() -> tuple[Response, int] | Response:
    """Verify a PDF; the body is ``application/pdf`` or multipart with field ``file``.

    :raise 400: nothing uploaded. :raise 413: too large. :raise 415: not a PDF / wrong type.
    :raise 422: encrypted, unreadable, or too complex to verify within the limits.
    :raise 429: too many verifications from this address (``Retry-After``).
    """
    wait = verify_rate_limited()
    if wait is not None:
        response, status = api_error(
            429, "rate_limited",
            "検証の依頼が多すぎます。しばらく待ってから再試行してください。",
            "Too many verifications from this address; retry later.",
        )
        response.headers["Retry-After"] = str(wait)
        return response, status
    try:
        data, _ = uploaded_pdf()
        report = run_verification(data)
    except RequestEntityTooLarge:
        return _too_large()
    except VerifyInputError as exc:
        return api_error(exc.status, exc.reason, exc.message, exc.message_en)
    return jsonify(report.to_dict())


def _template_options(name: str, level_text: str) -> tuple[SignOptions, str]:
    """The options of the active stamp template ``name`` (its level unless ``level`` is given).

    :raises _BadParameter: no such template, or an unusable level.
    """
    with session_scope(services.session_factory()) as session:
        template = get_template(session, name)
        if template is None or not template.active:
            raise _BadParameter(
                "template", f"印影テンプレート「{name}」はありません。",
                f"There is no active stamp template {name!r}.",
            )
        options = template_sign_options(
            template, public_url=str(current_app.config["KOIN_PUBLIC_URL"])
        )
        if level_text:
            options = replace(options, level=_level(level_text))
        return options, template.name


def _level(text: str) -> SignatureLevel:
    try:
        return SignatureLevel(text.strip().upper())
    except ValueError:
        names = ", ".join(SignatureLevel)
        raise _BadParameter(
            "level", f"level は {names} のいずれかです。", f"level must be one of {names}."
        ) from None


def _sign_options() -> tuple[SignOptions, str | None]:
    """``template`` or else ``level``, ``page``, ``box`` and ``no_stamp`` from the form or the
    query string; with the template's name when one was used.

    :raises _BadParameter: one of them is unusable, or a template combined with placement.
    """
    values = request.values
    template_name = values.get("template", "").strip()
    if template_name:
        if any(values.get(name, "").strip() for name in ("page", "box", "no_stamp")):
            raise _BadParameter(
                "template",
                "template と page / box / no_stamp は同時に指定できません。",
                "template cannot be combined with page, box or no_stamp.",
            )
        return _template_options(template_name, values.get("level", ""))
    level = _level(values.get("level", SignatureLevel.B_T.value))
    no_stamp_text = values.get("no_stamp", "").strip().lower()
    if no_stamp_text not in _TRUE + _FALSE:
        raise _BadParameter(
            "no_stamp", "no_stamp は true か false です。", "no_stamp must be true or false."
        )
    page_text, box_text = values.get("page", "").strip(), values.get("box", "").strip()
    if no_stamp_text in _TRUE:
        if page_text or box_text:
            raise _BadParameter(
                "no_stamp",
                "no_stamp と page / box は同時に指定できません。",
                "no_stamp cannot be combined with page or box.",
            )
        return SignOptions(level=level, placement=None), None
    page = None
    if page_text:
        try:
            page = int(page_text)
        except ValueError:
            raise _BadParameter(
                "page", "page は整数です(1 から、負数は末尾から)。",
                "page must be an integer (1-based; negative counts from the end).",
            ) from None
    box = None
    if box_text:
        try:
            numbers = [float(part) for part in box_text.split(",")]
        except ValueError:
            numbers = []
        if len(numbers) != 4 or not all(math.isfinite(n) for n in numbers):
            raise _BadParameter(
                "box", "box は x1,y1,x2,y2 (ポイント単位の数値 4 つ)です。",
                "box must be four numbers x1,y1,x2,y2 in points.",
            )
        box = (numbers[0], numbers[1], numbers[2], numbers[3])
    return SignOptions(level=level, placement=Placement(page, box)), None


@bp.post("/sign")
@require_api_key(ApiScope.SIGN)
def sign() -> tuple[Response, int] | Response:
    """Sign a PDF with the position key (the prefecture's seal) and record it; the body is
    ``application/pdf`` or multipart with field ``file``; options ``template`` (a stamp
    template's name) or ``level``, ``page``, ``box``, ``no_stamp``, as form fields or query
    parameters (``level`` also overrides a template's). Answers the signed PDF.

    :raise 400: nothing uploaded or an unusable option. :raise 401 / 403 / 429: see
        :func:`web.apiauth.require_api_key`. :raise 413: too large. :raise 415: wrong type.
    :raise 422: not a PDF, encrypted, broken, an existing signature fails verification, or the
        stamp does not fit.
    :raise 503: no time-stamping authority answered, or the service cannot sign now.
    """
    try:
        data, file_name = uploaded_pdf()
        options, template = _sign_options()
    except RequestEntityTooLarge:
        return _too_large()
    except VerifyInputError as exc:
        return api_error(exc.status, exc.reason, exc.message, exc.message_en)
    except _BadParameter as exc:
        return api_error(400, f"invalid_{exc.name}", exc.message, exc.message_en)
    try:
        context = services.signing_context(stamp=options.placement is not None)
        result = sign_and_record(
            services.session_factory(), data, context, options, role=Role.POSITION,
            file_name=file_name, signed_by=api_user().id, template=template,
            channel=SigningChannel.API,
        )
    except EncryptedPdfError as exc:
        return api_error(422, "encrypted", exc.message, exc.message_en or exc.message)
    except InvalidPdfError as exc:
        return api_error(422, "invalid_pdf", exc.message, exc.message_en or exc.message)
    except UnsignablePdfError as exc:
        return api_error(422, "unsignable", exc.message, exc.message_en or exc.message)
    except PlacementError as exc:
        return api_error(422, "placement", exc.message, exc.message_en or exc.message)
    except TimestampError as exc:
        log.warning("API signing failed: no time stamp (%s)", exc.message_en or exc.message)
        return api_error(
            503, "tsa_unavailable",
            "タイムスタンプ局に接続できません。しばらくしてから再試行してください。",
            "The time-stamping authority is unavailable; retry later.",
        )
    except SigningError as exc:  # the service cannot sign now (key, certificate, settings)
        log.error("API signing failed: %s", exc.message_en or exc.message)
        return api_error(
            503, "signing_unavailable", exc.message, exc.message_en or exc.message
        )
    assert result.data is not None
    log.info(
        "API signed document %s (%s) for %s", result.document_id, result.level.value,
        api_user().email,
    )
    response = Response(result.data, mimetype="application/pdf")
    response.headers["X-Koin-Document-Id"] = result.document_id
    response.headers["X-Koin-SHA256"] = result.sha256
    response.headers["Content-Disposition"] = f'attachment; filename="{result.document_id}.pdf"'
    return response


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document: the fragments of ``web/openapi/`` merged in name order.

    :raises ValueError: two fragments define the same path, operation or component.
    """
    document: dict[str, Any] = {}
    for path in sorted(OPENAPI_DIR.glob("*.json")):
        fragment: dict[str, Any] = json.loads(path.read_text("utf-8"))
        for key, value in fragment.items():
            if key not in ("paths", "components"):
                document[key] = value
                continue
            section: dict[str, Any] = document.setdefault(key, {})
            for name, entry in value.items():
                if key == "components":
                    group: dict[str, Any] = section.setdefault(name, {})
                    for component, definition in entry.items():
                        if component in group:
                            raise ValueError(f"{path.name}: component {component} defined twice")
                        group[component] = definition
                else:
                    operations: dict[str, Any] = section.setdefault(name, {})
                    for method, operation in entry.items():
                        if method in operations:
                            raise ValueError(f"{path.name}: {method} {name} defined twice")
                        operations[method] = operation
    return document


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document())


@bp.app_errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> tuple[Response, int] | HTTPException:
    """JSON errors under /api/ (routing errors happen before any blueprint is chosen)."""
    if not request.path.startswith(bp.url_prefix or "/api/"):
        return exc
    code = exc.code or 500
    text = exc.description or exc.name or ""
    response, status = api_error(
        code, (exc.name or "error").lower().replace(" ", "_"), text, text
    )
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)  # required with 405 (RFC 9110)
    return response, status

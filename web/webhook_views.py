"""The administrator's pages for outgoing webhooks (Webhook): endpoints and their deliveries.

Every page is for logged-in administrators; anyone else gets 403.

- ``GET /admin/webhooks``: every endpoint with its state and queue; right after creating one,
  its signing secret, once
- ``GET /admin/webhooks/new``, ``POST …/new``: the form; create, back to the list
- ``POST /admin/webhooks/<id>/disable``, ``POST …/<id>/enable``: stop or resume sending
- ``GET /admin/webhooks/deliveries?endpoint_id=ID&state=S``: the most recent deliveries
- ``GET /admin/webhooks/deliveries/<n>``: one delivery with its body
- ``POST /admin/webhooks/deliveries/<n>/redeliver``: queue a failed delivery again

The new secret travels from the form to the list inside the session cookie, encrypted with a
key derived from the app's secret and for ten minutes at most, and is removed when shown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from flask import (
    Blueprint,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.wrappers import Response

from contracts import (
    EVENT_TYPES,
    DeliveryState,
    InvalidWebhookData,
    InvalidWebhookState,
    UserRole,
    WebhookNotFound,
    create_endpoint,
    list_deliveries,
    list_endpoints,
    redeliver,
    require_delivery,
    require_endpoint,
    session_scope,
    set_endpoint_active,
)
from contracts.webhooks import delivery_counts
from keys import KoinError

from . import services
from ._once import keep_once, take_once
from .auth import current_user, login_required
from .errors import page_error
from .i18n import localized

__all__ = ["bp"]

bp = Blueprint("webhooks_web", __name__, url_prefix="/admin/webhooks")

#: How long the encrypted new secret stays in the session if the list is never shown.
SECRET_TTL = 600
#: Deliveries shown on one page.
PAGE_SIZE = 100

_SECRET_KEY = "koin_new_webhook_secret"


class _FormInputError(KoinError):
    """A filter or form value is malformed (before any service is asked)."""



@bp.errorhandler(WebhookNotFound)
def _not_found(exc: WebhookNotFound) -> tuple[str, int]:
    return page_error(404, exc.message, exc.message_en)


@bp.errorhandler(_FormInputError)
def _bad_input(exc: _FormInputError) -> tuple[str, int]:
    return page_error(400, exc.message, exc.message_en)


@bp.after_request
def _no_store(response: Response) -> Response:
    """A signing secret is shown here once: never kept in any cache."""
    response.headers["Cache-Control"] = "no-store"
    return response


# -- the secret, once ---------------------------------------------------------------------------


def _keep_secret(endpoint_id: int, secret: str) -> None:
    keep_once(_SECRET_KEY, "koin-webhook-secret", {"endpoint": endpoint_id, "secret": secret})


def _take_secret() -> tuple[int, str] | None:
    """The secret of the endpoint just created, if the session carries it; it is removed, so
    it is shown at most once."""
    payload = take_once(_SECRET_KEY, "koin-webhook-secret", SECRET_TTL)
    try:
        return (int(payload["endpoint"]), str(payload["secret"])) if payload else None
    except (KeyError, TypeError, ValueError):
        return None


# -- endpoints ----------------------------------------------------------------------------------


@bp.get("")
@login_required(UserRole.ADMIN)
def endpoint_list() -> str:
    """Every endpoint, active or not, with how many deliveries wait or failed."""
    with services.session_factory()() as db:
        endpoints = list_endpoints(db)
        counts = delivery_counts(db)
    return render_template(
        "webhooks.html", endpoints=endpoints, counts=counts, new_secret=_take_secret()
    )


@dataclass
class EndpointForm:
    """The form as typed, to show again after an error."""

    url: str = ""
    description: str = ""
    events: list[str] = field(default_factory=list)

    @classmethod
    def from_request(cls) -> EndpointForm:
        return cls(
            url=request.form.get("url", "")[:4000],
            description=request.form.get("description", "")[:1000],
            events=[e for e in request.form.getlist("events")[:20] if e in EVENT_TYPES],
        )


def _form_page(
    form: EndpointForm, error: KoinError | None = None, status: int = 200
) -> tuple[str, int]:
    text = localized(error.message, error.message_en) if error is not None else None
    return (
        render_template("webhook_form.html", form=form, event_types=EVENT_TYPES, error=text),
        status,
    )


@bp.get("/new")
@login_required(UserRole.ADMIN)
def new_form() -> tuple[str, int]:
    return _form_page(EndpointForm(events=list(EVENT_TYPES)))


@bp.post("/new")
@login_required(UserRole.ADMIN)
def create() -> Response | tuple[str, int]:
    """Register an endpoint; the list then shows its secret once.

    :raise 422: the service refused a value (URL, event types, description); shown again.
    """
    form = EndpointForm.from_request()
    user = current_user()
    try:
        with session_scope(services.session_factory()) as db:
            endpoint, secret = create_endpoint(
                db, form.url, events=request.form.getlist("events")[:20],
                description=form.description, created_by=user.id if user else None,
            )
            endpoint_id = endpoint.id
    except InvalidWebhookData as exc:
        return _form_page(form, exc, 422)
    _keep_secret(endpoint_id, secret)
    flash(localized(f"Webhook の送信先 {endpoint_id} を登録しました。",
                    f"Registered the webhook endpoint {endpoint_id}."), "webhook")
    return redirect(url_for(".endpoint_list"), code=303)


def _set_active(endpoint_id: int, active: bool) -> Response:
    with session_scope(services.session_factory()) as db:
        set_endpoint_active(db, endpoint_id, active)
    if active:
        flash(localized(f"送信先 {endpoint_id} への配信を再開しました。",
                        f"Sending to endpoint {endpoint_id} again."), "webhook")
    else:
        flash(localized(f"送信先 {endpoint_id} への配信を停止しました。"
                        "未配信の分は再開まで待ちます。",
                        f"Stopped sending to endpoint {endpoint_id}; its pending deliveries wait "
                        "until it is enabled."), "webhook")
    return redirect(url_for(".endpoint_list"), code=303)


@bp.post("/<int:endpoint_id>/disable")
@login_required(UserRole.ADMIN)
def disable(endpoint_id: int) -> Response:
    """:raise 404: there is no such endpoint."""
    return _set_active(endpoint_id, False)


@bp.post("/<int:endpoint_id>/enable")
@login_required(UserRole.ADMIN)
def enable(endpoint_id: int) -> Response:
    """:raise 404: there is no such endpoint."""
    return _set_active(endpoint_id, True)


# -- deliveries ---------------------------------------------------------------------------------


def _filters() -> tuple[int | None, DeliveryState | None]:
    """:raises _FormInputError: ``endpoint`` is not a number or ``state`` not a state."""
    endpoint_text = request.args.get("endpoint_id", "").strip()
    state_text = request.args.get("state", "").strip()
    endpoint_id = None
    if endpoint_text:
        if not endpoint_text.isdigit() or len(endpoint_text) > 9:
            raise _FormInputError(
                "送信先の指定が正しくありません。", "The endpoint filter is not valid."
            )
        endpoint_id = int(endpoint_text)
    state = None
    if state_text:
        try:
            state = DeliveryState(state_text)
        except ValueError:
            raise _FormInputError(
                "配信状態の指定が正しくありません。", "The state filter is not valid."
            ) from None
    return endpoint_id, state


@bp.get("/deliveries")
@login_required(UserRole.ADMIN)
def delivery_list() -> str:
    """The most recent deliveries, newest first, optionally of one endpoint and state.

    :raise 400: a malformed filter. :raise 404: the endpoint filter names no endpoint.
    """
    endpoint_id, state = _filters()
    with services.session_factory()() as db:
        endpoint = require_endpoint(db, endpoint_id) if endpoint_id is not None else None
        deliveries = list_deliveries(db, endpoint_id=endpoint_id, state=state, limit=PAGE_SIZE)
        endpoints = list_endpoints(db)
    return render_template(
        "webhook_deliveries.html", deliveries=deliveries, endpoints=endpoints,
        endpoint=endpoint, state=state.value if state else "", states=list(DeliveryState),
        page_size=PAGE_SIZE,
    )


@bp.get("/deliveries/<int:delivery_pk>")
@login_required(UserRole.ADMIN)
def delivery_detail(delivery_pk: int) -> str:
    """One delivery with its headers and body.

    :raise 404: there is no such delivery.
    """
    with services.session_factory()() as db:
        delivery = require_delivery(db, delivery_pk)
    try:
        body = json.dumps(json.loads(delivery.payload), ensure_ascii=False, indent=2)
    except ValueError:  # pragma: no cover - koin writes JSON
        body = delivery.payload
    return render_template("webhook_delivery.html", delivery=delivery, body=body)


@bp.post("/deliveries/<int:delivery_pk>/redeliver")
@login_required(UserRole.ADMIN)
def redeliver_one(delivery_pk: int) -> Response:
    """Queue a failed delivery again (due now, same delivery ID).

    :raise 404: there is no such delivery. Not failed (e.g. a second click): a message.
    """
    try:
        with session_scope(services.session_factory()) as db:
            delivery = redeliver(db, delivery_pk)
            active = delivery.endpoint.active
    except InvalidWebhookState as exc:
        flash(localized(exc.message, exc.message_en), "webhook-error")
    else:
        if active:
            flash(localized("再配信を予約しました。数秒以内に送信します。",
                            "Queued for redelivery; it is sent within seconds."), "webhook")
        else:
            flash(localized("再配信を予約しました。送信先が停止中のため、再開後に送信します。",
                            "Queued for redelivery; the endpoint is disabled, so it is sent once "
                            "the endpoint is enabled."), "webhook")
    return redirect(url_for(".delivery_detail", delivery_pk=delivery_pk), code=303)

"""The development mailbox page: what the embedded SMTP server of ``koin serve`` received.

Registered only in development mode (``KOIN_DEV_MODE``); in production these URLs do not exist.
Bodies are shown as text only, never as HTML.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, abort, current_app, render_template

from contracts.devmail import list_mailbox, read_mail, read_raw_mail

__all__ = ["bp"]

bp = Blueprint("devmail", __name__)


def _home() -> Path:
    return Path(current_app.config["KOIN_HOME"])


@bp.get("/dev/mailbox")
def mailbox() -> str:
    """Received messages, newest first."""
    return render_template("dev_mailbox.html", mails=list_mailbox(_home()))


@bp.get("/dev/mailbox/<name>")
def mail(name: str) -> str:
    """One message: headers and its plain text body.

    :raise 404: no such message.
    """
    found = read_mail(_home(), name)
    if found is None:
        abort(404)
    return render_template("dev_mail.html", mail=found)


@bp.get("/dev/mailbox/<name>/raw")
def raw(name: str) -> Response:
    """The message as received (``message/rfc822``), to open in a mail client.

    :raise 404: no such message.
    """
    data = read_raw_mail(_home(), name)
    if data is None:
        abort(404)
    return Response(
        data,
        mimetype="message/rfc822",
        headers={"Content-Disposition": f'attachment; filename="{name}.eml"'},
    )

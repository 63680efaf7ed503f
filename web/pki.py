"""Public PKI endpoints: the root certificate, CRLs (the URLs in our certificates' CRL
distribution points) and the RFC 3161 TSA of the embedded installation."""

from __future__ import annotations

import re
from pathlib import Path

from flask import Blueprint, Response, abort, current_app, render_template, request

from timestamp import TimeStampAuthority

__all__ = ["bp"]

bp = Blueprint("pki", __name__)

_CA_NAME = re.compile(r"^[a-z0-9-]{1,64}$")
_MAX_TSA_REQUEST = 64 * 1024


def _pki_dir() -> Path:
    return Path(current_app.config["KOIN_HOME"]) / "pki"


@bp.get("/pki/<name>.crl")
def crl(name: str) -> Response:
    """The DER CRL of one of our CAs.

    :raise 404: no such CA.
    """
    if not _CA_NAME.match(name):
        abort(404)
    path = _pki_dir() / f"{name}.crl"
    if not path.is_file():
        abort(404)
    response = Response(path.read_bytes(), mimetype="application/pkix-crl")
    response.cache_control.max_age = 3600
    return response


@bp.get("/pki/<name>.pem")
def ca_certificate(name: str) -> Response:
    """A CA certificate (root-ca, issuing-ca) as PEM.

    :raise 404: no such certificate.
    """
    if name not in ("root-ca", "issuing-ca", "chain"):
        abort(404)
    path = _pki_dir() / f"{name}.pem"
    if not path.is_file():
        abort(404)
    return Response(
        path.read_bytes(),
        mimetype="application/x-pem-file",
        headers={"Content-Disposition": f'attachment; filename="{name}.pem"'},
    )


@bp.post("/tsa")
def tsa() -> Response:
    """RFC 3161 over HTTP: ``application/timestamp-query`` in, ``-reply`` out.

    :raise 413: request larger than 64 KiB.
    :raise 415: wrong content type.
    """
    if request.mimetype != "application/timestamp-query":
        abort(415)
    if (request.content_length or 0) > _MAX_TSA_REQUEST:
        abort(413)
    answer = _authority().respond(request.get_data(cache=False))
    return Response(answer, mimetype="application/timestamp-reply")


def _authority() -> TimeStampAuthority:
    authority: TimeStampAuthority | None = current_app.extensions.get("koin_tsa")
    if authority is None:
        from signer import Installation

        installation = Installation(Path(current_app.config["KOIN_HOME"]))
        authority = TimeStampAuthority.from_key_store(
            installation.key_store, installation.tsa_state_dir
        )
        current_app.extensions["koin_tsa"] = authority
    return authority


@bp.get("/")
def index() -> str:
    return render_template("index.html", public_url=current_app.config["KOIN_PUBLIC_URL"])

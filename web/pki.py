"""Public PKI endpoints: the root certificate, CRLs (the URLs in our certificates' CRL
distribution points) and the RFC 3161 TSA of the embedded installation."""

from __future__ import annotations

import re
from pathlib import Path

from flask import Blueprint, Response, abort, current_app, render_template_string, request

from timestamp import TimeStampAuthority

__all__ = ["bp"]

bp = Blueprint("pki", __name__)

_CA_NAME = re.compile(r"^[a-z0-9-]{1,64}$")
_MAX_TSA_REQUEST = 64 * 1024


def _pki_dir() -> Path:
    return Path(current_app.config["KOIN_HOME"]) / "pki"


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    """:raise: never; the process is up."""
    return {"status": "ok"}


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


_INDEX = """<!doctype html>
<html lang="ja"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>koin 公印 — 茨城県 電子署名サービス</title>
<style>body{font-family:"Noto Sans CJK JP",sans-serif;max-width:40rem;margin:2rem auto;
padding:0 1rem;line-height:1.7;color:#222}h1{font-size:1.4rem}code{background:#f3f3f3;
padding:.1rem .3rem}</style></head><body>
<h1>茨城県 電子署名サービス(koin 公印)</h1>
<p>茨城県が発行する文書には、職責「茨城県知事」による電子署名とタイムスタンプが付いています。
PDF リーダーで「署名済みであり、すべての署名が有効です」と表示させるには、
県のルート証明書を信頼してください。</p>
<ul>
<li><a href="/pki/root-ca.pem">ルート証明書 (root-ca.pem)</a></li>
<li><a href="/pki/issuing-ca.pem">発行 CA 証明書 (issuing-ca.pem)</a></li>
<li>失効リスト: <a href="/pki/root-ca.crl">root-ca.crl</a>,
<a href="/pki/issuing-ca.crl">issuing-ca.crl</a></li>
<li>タイムスタンプ局 (RFC 3161): <code>POST {{ public_url }}/tsa</code></li>
</ul>
<p lang="en">Documents of Ibaraki Prefecture carry a signature by the position certificate
"Governor of Ibaraki Prefecture" and an RFC 3161 timestamp. Trust the root certificate above
to have PDF readers show them as valid.</p>
</body></html>"""


@bp.get("/")
def index() -> str:
    return render_template_string(_INDEX, public_url=current_app.config["KOIN_PUBLIC_URL"])

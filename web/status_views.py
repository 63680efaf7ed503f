"""``GET /admin/status`` (稼働状況, administrators only): whether the service can sign right
now — the readiness checks of ``/readyz`` (:func:`web.health.readiness`), the certificates of
the key store with their expiry (a warning ``KOIN_CERT_WARNING_DAYS`` days before, 90 by
default), the TSA in use, and what waits in the batch queue and the mail outbox."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from asn1crypto import x509 as asn1_x509
from flask import Blueprint, Flask, current_app, render_template
from sqlalchemy.exc import SQLAlchemyError

import contracts
import keys
from contracts import UserRole
from contracts.operations import OperationFigures, operation_figures
from keys import KeyStore, KoinError

from .auth import login_required
from .health import CHECKS, readiness, redact_url

__all__ = ["CertificateRow", "bp", "certificate_rows"]

bp = Blueprint("status_web", __name__)


@dataclass(frozen=True)
class CertificateRow:
    #: ``position``, ``witness``, ``tsa``, or ``ca`` (a CA certificate of ``pki/chain.pem``).
    role: str
    subject: str
    #: Serial number in hex, in groups of 8 digits (so that it can wrap).
    serial: str
    not_after: dt.datetime | None
    days_left: int | None
    #: ``ok``, ``warning`` (expires within the warning days), ``expired`` or ``error``.
    state: str
    #: Where a role's key lives (``pkcs12``, ``pkcs11``).
    backend: str = ""
    #: Why the certificate could not be read (English, for operators).
    error: str = ""


def _grouped(serial: int) -> str:
    digits = format(serial, "X")
    digits = digits.zfill(-(-len(digits) // 8) * 8)
    return " ".join(digits[i:i + 8] for i in range(0, len(digits), 8))


def _row(role: str, certificate: asn1_x509.Certificate, now: dt.datetime, warning_days: int,
         backend: str = "") -> CertificateRow:
    not_after: dt.datetime = certificate["tbs_certificate"]["validity"]["not_after"].native
    if not_after <= now:
        state = "expired"
    elif not_after - now <= dt.timedelta(days=warning_days):
        state = "warning"
    else:
        state = "ok"
    return CertificateRow(
        role, str(certificate.subject.human_friendly), _grouped(certificate.serial_number),
        not_after, (not_after - now).days, state, backend,
    )


def certificate_rows(
    home: Path, *, warning_days: int, now: dt.datetime | None = None
) -> list[CertificateRow]:
    """The certificates of the key store at ``home`` (one per configured role; a role whose
    key cannot be loaded is a row with state ``error``) and the CA certificates of
    ``pki/chain.pem``."""
    moment = now or dt.datetime.now(dt.UTC)
    rows: list[CertificateRow] = []
    try:
        store = KeyStore.open(home)
    except KoinError as exc:
        return [CertificateRow("keystore", "", "", None, None, "error", error=exc.message_en)]
    for role in store.roles():
        backend = store.backend_for(role)
        kind = str(backend.describe().get("backend", "")) if backend is not None else ""
        try:
            certificate = store.certificate_for(role)
        except KoinError as exc:
            rows.append(CertificateRow(role.value, "", "", None, None, "error", kind,
                                       exc.message_en))
            continue
        rows.append(_row(role.value, certificate, moment, warning_days, kind))
    chain = keys.PkiLayout(home).pki_dir / "chain.pem"
    if chain.is_file():
        try:
            cas = keys.load_certificates([chain])
        except (OSError, ValueError):
            cas = []
        rows.extend(_row("ca", ca, moment, warning_days) for ca in cas)
    return rows


def _figures(app: Flask) -> OperationFigures | None:
    try:
        with contracts.session_scope(app.extensions["koin"].session_factory()) as session:
            return operation_figures(session)
    except SQLAlchemyError:
        return None


@bp.get("/admin/status")
@login_required(UserRole.ADMIN)
def status() -> str:
    """:raise 302: not logged in. :raise 403: not an administrator."""
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    warning_days = int(app.config.get("KOIN_CERT_WARNING_DAYS") or 90)
    rows = certificate_rows(Path(app.config["KOIN_HOME"]), warning_days=warning_days)
    tsa_urls = [redact_url(url) for url in app.config.get("KOIN_TSA_URLS") or ()]
    return render_template(
        "admin_status.html",
        ready=readiness(app),
        check_names=CHECKS,
        certificates=rows,
        warning_days=warning_days,
        attention=[row for row in rows if row.state != "ok"],
        tsa_urls=tsa_urls,
        tsa_certificate=next((row for row in rows if row.role == "tsa"), None),
        figures=_figures(app),
    )

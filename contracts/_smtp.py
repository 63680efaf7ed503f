"""Sending one message to an SMTP server: the transport behind :func:`contracts.deliver_due`.

``KOIN_SMTP_URL`` names the server:

* ``smtp://host[:port]`` — plain SMTP (port 25), e.g. a relay on the local network;
* ``smtp://user:pass@host:587?starttls=1`` — upgrade with STARTTLS before anything else;
* ``smtps://user:pass@host[:port]`` — implicit TLS (port 465).

Query parameters: ``starttls=1`` (``smtp`` only), ``timeout=SECONDS`` (default 30) and
``cafile=PATH`` (a CA bundle to trust instead of the system's, e.g. the prefecture's own CA).
User name and password are percent-decoded. Credentials are only ever sent over TLS: a URL with
a password but without TLS is refused. The certificate of a TLS server is always verified.
"""

from __future__ import annotations

import enum
import smtplib
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .errors import MailError

__all__ = ["SMTP_URL_ENV", "MailTransport", "SmtpSecurity", "SmtpTransport"]

#: Environment variable with the SMTP server's URL; unset means the development mailbox.
SMTP_URL_ENV = "KOIN_SMTP_URL"
DEFAULT_TIMEOUT = 30.0
_DEFAULT_PORTS = {"smtp": 25, "smtps": 465}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class MailTransport(Protocol):
    """Something that hands one message over for delivery."""

    def send(self, message: EmailMessage) -> None:
        """Send ``message`` to the addresses in its ``To`` header.

        :raises MailError: the message was not accepted; nothing is known to be sent.
        """


class SmtpSecurity(enum.Enum):
    """How the connection to the SMTP server is protected."""

    PLAIN = "plain"
    STARTTLS = "starttls"
    TLS = "tls"


def _url_error(reason_ja: str, reason_en: str) -> MailError:
    return MailError(
        f"メールサーバーの URL（KOIN_SMTP_URL）が正しくありません: {reason_ja}",
        f"The mail server URL (KOIN_SMTP_URL) is not valid: {reason_en}",
        reason=reason_en,
    )


def _flag(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise _url_error(f"{name} は 0 か 1 です", f"{name} must be 0 or 1")


def _describe(exc: BaseException) -> str:
    """A one-line reason for a failed SMTP exchange (the server's answer, never credentials)."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        answers = [
            f"{code} {reply.decode(errors='replace')}"
            for code, reply in exc.recipients.values()
        ]
        return "recipient refused: " + "; ".join(answers)
    if isinstance(exc, smtplib.SMTPResponseException):
        reply = exc.smtp_error
        text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
        return f"{exc.smtp_code} {text}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    detail = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {detail}"


@dataclass(frozen=True)
class SmtpTransport:
    """An SMTP server to send through; one connection per message.

    A message counts as sent once the server has accepted its data (``250`` after ``DATA``);
    a failure to say ``QUIT`` afterwards is ignored, so an accepted message is not sent again.
    """

    host: str
    port: int
    security: SmtpSecurity = SmtpSecurity.PLAIN
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    #: CA bundle to verify the server against; None means the system's trust store.
    cafile: Path | None = None

    def __post_init__(self) -> None:
        if self.password is not None and self.security is SmtpSecurity.PLAIN:
            raise _url_error(
                "パスワードは TLS（smtps:// か ?starttls=1）でのみ送れます",
                "a password is only sent over TLS (smtps:// or ?starttls=1)",
            )

    @classmethod
    def from_url(cls, url: str) -> SmtpTransport:
        """The transport for ``smtp://`` or ``smtps://`` ``url`` (see the module docstring).

        :raises MailError: the URL is malformed, has unknown parameters, names a missing
            ``cafile``, or carries a password without TLS.
        """
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError:
            raise _url_error("解釈できません", "cannot be parsed") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise _url_error(
                "smtp:// か smtps:// で始めてください", "it must start with smtp:// or smtps://"
            )
        if not parts.hostname:
            raise _url_error("ホスト名がありません", "the host name is missing")
        if parts.path not in ("", "/") or parts.fragment:
            raise _url_error("パスは指定できません", "it cannot have a path")
        try:
            query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError:
            raise _url_error(
                "パラメータを解釈できません", "its parameters cannot be parsed"
            ) from None
        unknown = sorted(set(query) - {"starttls", "timeout", "cafile"})
        if unknown or any(len(values) > 1 for values in query.values()):
            names = ", ".join(unknown) or "duplicate"
            raise _url_error(f"不明なパラメータ {names}", f"unknown parameter {names}")
        params = {name: values[0] for name, values in query.items()}

        security = SmtpSecurity.TLS if scheme == "smtps" else SmtpSecurity.PLAIN
        if _flag("starttls", params.get("starttls", "0")):
            if security is SmtpSecurity.TLS:
                raise _url_error(
                    "smtps:// に starttls は指定できません", "smtps:// cannot use starttls"
                )
            security = SmtpSecurity.STARTTLS
        try:
            timeout = float(params.get("timeout", DEFAULT_TIMEOUT))
        except ValueError:
            timeout = -1.0
        if not 0 < timeout <= 600:
            raise _url_error(
                "timeout は 600 以下の正の秒数です", "timeout must be 0 < seconds <= 600"
            )
        cafile = Path(params["cafile"]) if params.get("cafile") else None
        if cafile is not None and not cafile.is_file():
            raise _url_error(f"cafile {cafile} がありません", f"cafile {cafile} does not exist")
        return cls(
            host=parts.hostname,
            port=port or _DEFAULT_PORTS[scheme],
            security=security,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            timeout=timeout,
            cafile=cafile,
        )

    @property
    def url(self) -> str:
        """The server's URL for logs and messages, with the password left out."""
        scheme = "smtps" if self.security is SmtpSecurity.TLS else "smtp"
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = "?starttls=1" if self.security is SmtpSecurity.STARTTLS else ""
        return f"{scheme}://{user}{host}:{self.port}{query}"

    def _tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cafile) if self.cafile else None)

    def _connect(self) -> smtplib.SMTP:
        if self.security is SmtpSecurity.TLS:
            return smtplib.SMTP_SSL(
                self.host, self.port, timeout=self.timeout, context=self._tls_context()
            )
        return smtplib.SMTP(self.host, self.port, timeout=self.timeout)

    def send(self, message: EmailMessage) -> None:
        """Send ``message`` to its ``To`` addresses, from its ``From`` address.

        :raises MailError: the server cannot be reached, the TLS handshake or the login
            failed, or the server refused the sender, a recipient or the data.
        """
        try:
            smtp = self._connect()
        except (smtplib.SMTPException, OSError) as exc:
            raise self._failed(exc) from exc
        accepted = False
        try:
            if self.security is SmtpSecurity.STARTTLS:
                smtp.starttls(context=self._tls_context())
            if self.username is not None:
                smtp.login(self.username, self.password or "")
            smtp.send_message(message)
            accepted = True
        except (smtplib.SMTPException, OSError) as exc:
            raise self._failed(exc) from exc
        finally:
            try:
                if accepted:
                    smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass
            finally:
                smtp.close()

    def _failed(self, exc: BaseException) -> MailError:
        reason = _describe(exc)
        return MailError(
            f"メールサーバー {self.host}:{self.port} に送信できませんでした（{reason}）。",
            f"Cannot send mail through {self.host}:{self.port} ({reason}).",
            server=self.url,
            reason=reason,
        )

"""pyHanko ``TimeStamper`` implementations: remote TSAs over HTTP, and the in-process TSA.

Both plug into pyHanko wherever it takes a ``timestamper`` (``PdfSigner``, ``PdfTimeStamper``,
CAdES signed attributes): pyHanko only calls :meth:`~TimeStamper.async_timestamp` (directly or
through ``async_dummy_response``), which both classes override so that no token reaches pyHanko
unchecked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import requests
from asn1crypto import x509 as asn1_x509
from pyhanko.sign.timestamps import TimeStamper
from pyhanko.sign.validation.generic_cms import validate_tst_signed_data
from pyhanko_certvalidator import ValidationContext
from pyhanko_certvalidator.policy_decl import NO_REVOCATION, CertRevTrustPolicy

from ._asn1 import has_critical_time_stamping_eku
from ._authority import TimeStampAuthority
from ._checks import AttemptFailed, check_response, parse_response, redact_url
from .errors import TimestampError

__all__ = ["DEFAULT_TIMEOUT", "MAX_RESPONSE_BYTES", "LocalTimeStamper", "TsaClient"]

log = logging.getLogger(__name__)

#: Seconds to wait for a TSA to connect, and again for it to answer.
DEFAULT_TIMEOUT = 10.0
#: A TimeStampResp is a few KiB; anything much larger is not one.
MAX_RESPONSE_BYTES = 1 << 20

_REQUEST_HEADERS = {
    "Content-Type": "application/timestamp-query",
    "Accept": "application/timestamp-reply",
}


class TsaClient(TimeStamper):
    """RFC 3161 client that tries several TSAs in order and returns the first valid token.

    A token is accepted only if the response is *granted*, echoes our nonce, stamps exactly our
    digest, its CMS signature verifies, and the TSA certificate chains to one of
    ``trust_roots`` and carries the critical timeStamping EKU (RFC 3161 §2.3). Each failure is
    logged as a warning and the next URL is tried; there is never a fallback to the local
    clock.

    Revocation of the TSA certificate is *not* checked here (no CRL/OCSP fetching while
    signing): this check answers "is this a fresh token for our digest from a TSA we trust".
    Revocation belongs to signature validation and to the LTV data pyHanko embeds
    (``validation_paths`` of this class), which see the same certificates.

    >>> client = TsaClient(["https://tsa.example/"], trust_roots=[root])  # doctest: +SKIP
    >>> PdfSigner(metadata, signer, timestamper=client)                  # doctest: +SKIP
    """

    def __init__(
        self,
        urls: Sequence[str],
        trust_roots: Sequence[asn1_x509.Certificate],
        *,
        intermediates: Sequence[asn1_x509.Certificate] = (),
        timeout: float = DEFAULT_TIMEOUT,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        """
        :param urls: TSA URLs, tried in this order.
        :param trust_roots: trust anchors for TSA certificates (never the system trust list).
        :param intermediates: CA certificates to use when a TSA omits them from its tokens.
        :param timeout: seconds to connect, and again to read the reply, per URL.
        :param max_response_bytes: refuse longer replies.
        :raises TimestampError: no URL or no trust anchor was given.
        """
        if not urls:
            raise TimestampError("TSA の URL が設定されていません。", "No TSA URL is configured.")
        if not trust_roots:
            raise TimestampError(
                "TSA 証明書の信頼点が設定されていません。",
                "No trust anchor for TSA certificates is configured.",
            )
        super().__init__(include_nonce=True)
        self.urls = tuple(urls)
        self.trust_roots = tuple(trust_roots)
        self.intermediates = tuple(intermediates)
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.cert_registry.register_multiple(self.intermediates)

    async def async_timestamp(self, message_digest: bytes, md_algorithm: str) -> Any:
        """A verified time-stamp token (``ContentInfo``) over ``message_digest``.

        :param md_algorithm: the hash that produced ``message_digest``, e.g. ``"sha256"``.
        :raises TimestampError: no TSA returned a valid token; ``fields["attempts"]`` maps each
            URL to the reason.
        """
        failures: dict[str, AttemptFailed] = {}
        for url in self.urls:
            shown = redact_url(url)
            try:
                token = await self._attempt(url, message_digest, md_algorithm)
            except AttemptFailed as failure:
                log.warning("TSA %s failed: %s", shown, failure.reason_en)
                failures[shown] = failure
                continue
            if failures:
                log.info("TSA %s answered after %d failed attempt(s)", shown, len(failures))
            return token
        raise _all_failed(failures)

    async def async_request_tsa_response(self, req: Any) -> Any:
        """Send ``req`` to the TSAs in order; return the first well-formed ``TimeStampResp``.

        Transport only: status, nonce, imprint, signature and trust are *not* checked here
        (:meth:`async_timestamp` checks them).

        :raises TimestampError: no TSA returned a DER ``TimeStampResp``.
        """
        failures: dict[str, AttemptFailed] = {}
        for url in self.urls:
            shown = redact_url(url)
            try:
                return parse_response(await asyncio.to_thread(self._post, url, req.dump()))
            except AttemptFailed as failure:
                log.warning("TSA %s failed: %s", shown, failure.reason_en)
                failures[shown] = failure
        raise _all_failed(failures)

    async def _attempt(self, url: str, message_digest: bytes, md_algorithm: str) -> Any:
        # pyHanko's request builder (unannotated): a fresh nonce per URL, certReq true.
        nonce, request = self.request_cms(message_digest, md_algorithm)
        body = await asyncio.to_thread(self._post, url, request.dump())
        response = parse_response(body)
        token, _ = check_response(
            response, nonce=nonce, message_digest=message_digest, md_algorithm=md_algorithm
        )
        await self._check_signature_and_trust(token, message_digest)
        return token

    def _post(self, url: str, body: bytes) -> bytes:
        # rfc3161ng's RemoteTimestamper is not used for the exchange: it builds its own pyasn1
        # request (we must send pyHanko's asn1crypto request with the nonce we check), posts
        # with a one-off ``requests.post`` without an Accept header, a Content-Type check or a
        # size limit, and its ``check_timestamp`` knows only RSA PKCS#1 v1.5 and no chain
        # validation. Plain requests does the transport; pyHanko does the verification.
        try:
            with (
                requests.Session() as session,
                session.post(
                    url, data=body, headers=_REQUEST_HEADERS, timeout=self.timeout, stream=True
                ) as reply,
            ):
                return self._read_reply(reply)
        except requests.Timeout as exc:
            raise AttemptFailed(
                f"{self.timeout:g} 秒以内に応答がありません。",
                f"no reply within {self.timeout:g} s",
            ) from exc
        except requests.ConnectionError as exc:
            reason = _network_reason(exc)
            raise AttemptFailed(
                f"接続できません({reason})。", f"cannot connect ({reason})"
            ) from exc
        except requests.RequestException as exc:
            reason = type(exc).__name__
            raise AttemptFailed(
                f"HTTP 通信に失敗しました({reason})。", f"HTTP exchange failed ({reason})"
            ) from exc

    def _read_reply(self, reply: requests.Response) -> bytes:
        if reply.status_code != 200:
            raise AttemptFailed(
                f"HTTP ステータス {reply.status_code} が返りました。",
                f"HTTP status {reply.status_code}",
            )
        content_type = reply.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if content_type != "application/timestamp-reply":
            shown = content_type[:60] or "none"
            raise AttemptFailed(
                f"応答の Content-Type が application/timestamp-reply ではありません({shown})。",
                f"Content-Type is {shown}, not application/timestamp-reply",
            )
        data = bytearray()
        for chunk in reply.iter_content(chunk_size=64 * 1024):
            data += chunk
            if len(data) > self.max_response_bytes:
                raise AttemptFailed(
                    f"応答が大きすぎます({self.max_response_bytes} バイト超)。",
                    f"reply larger than {self.max_response_bytes} bytes",
                )
        return bytes(data)

    async def _check_signature_and_trust(self, token: Any, message_digest: bytes) -> None:
        # A fresh context per token: responses add their certificates to its registry.
        context = ValidationContext(
            trust_roots=list(self.trust_roots),
            other_certs=list(self.intermediates),
            allow_fetching=False,
            revinfo_policy=CertRevTrustPolicy(NO_REVOCATION),
        )
        try:
            status = await validate_tst_signed_data(
                token["content"], context, lambda _algorithm: message_digest
            )
        except ValueError as exc:  # pyHanko's validation errors are all ValueErrors
            reason = getattr(exc, "failure_message", None) or type(exc).__name__
            raise AttemptFailed(
                f"トークンの署名を検証できません({reason})。",
                f"cannot validate the token signature ({reason})",
            ) from exc
        if not (status["intact"] and status["valid"]):
            raise AttemptFailed(
                "トークンの署名が正しくありません。", "the token signature does not verify"
            )
        problem = status["trust_problem_indic"]
        if problem is not None or status["validation_path"] is None:
            shown = getattr(problem, "name", None) or "no path"
            raise AttemptFailed(
                f"TSA 証明書が信頼する認証局につながりません({shown})。",
                f"the TSA certificate does not chain to a trusted root ({shown})",
            )
        if not has_critical_time_stamping_eku(status["signing_cert"]):
            raise AttemptFailed(
                "TSA 証明書に critical な timeStamping 拡張鍵用途がありません。",
                "the TSA certificate lacks the critical timeStamping EKU",
            )


class LocalTimeStamper(TimeStamper):
    """The embedded TSA, called in-process (no HTTP), with the same nonce and imprint checks
    as :class:`TsaClient`.

    The token's signature and chain are not re-validated: the authority signed it in this
    process with the installation's own TSA key.
    """

    def __init__(self, authority: TimeStampAuthority) -> None:
        super().__init__(include_nonce=True)
        self.authority = authority

    async def async_request_tsa_response(self, req: Any) -> Any:
        """The authority's ``TimeStampResp`` for ``req`` (never raises)."""
        return await self.authority.async_respond(req)

    async def async_timestamp(self, message_digest: bytes, md_algorithm: str) -> Any:
        """A time-stamp token (``ContentInfo``) over ``message_digest`` from the local TSA.

        :raises TimestampError: the authority refused (e.g. an unsupported hash) or failed.
        """
        nonce, request = self.request_cms(message_digest, md_algorithm)
        response = await self.async_request_tsa_response(request)
        try:
            token, _ = check_response(
                response, nonce=nonce, message_digest=message_digest, md_algorithm=md_algorithm
            )
        except AttemptFailed as failure:
            raise TimestampError(
                f"内蔵 TSA からタイムスタンプを取得できませんでした: {failure.reason_ja}",
                f"The embedded TSA gave no valid timestamp: {failure.reason_en}",
                attempts={"local": failure.reason_en},
            ) from failure
        return token


def _all_failed(failures: dict[str, AttemptFailed]) -> TimestampError:
    return TimestampError(
        "どの TSA からも有効なタイムスタンプを取得できませんでした。 "
        + " ".join(f"{url}: {failure.reason_ja}" for url, failure in failures.items()),
        "No TSA returned a valid timestamp. "
        + "; ".join(f"{url}: {failure.reason_en}" for url, failure in failures.items()),
        attempts={url: failure.reason_en for url, failure in failures.items()},
    )


def _network_reason(exc: BaseException) -> str:
    """The innermost OS error text (``Connection refused``…) behind a requests error."""
    pending: list[object] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return str(current.strerror)
        pending.extend(current.args)
        pending.extend((getattr(current, "reason", None), current.__cause__, current.__context__))
    return type(exc).__name__

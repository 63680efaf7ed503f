"""Client-side checks of a ``TimeStampResp``, shared by the HTTP and the in-process client."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from asn1crypto import tsp

from ._asn1 import TimeStampResp, is_void

__all__ = ["AttemptFailed", "check_response", "parse_response", "redact_url"]


class AttemptFailed(Exception):
    """One TSA did not give a usable token. Internal: callers turn it into ``TimestampError``.

    :ivar reason_ja: why, in Japanese.
    :ivar reason_en: why, in English (also the ``attempts`` value of the final error).
    """

    def __init__(self, reason_ja: str, reason_en: str) -> None:
        self.reason_ja = reason_ja
        self.reason_en = reason_en
        super().__init__(reason_en)


def redact_url(url: str) -> str:
    """``url`` without user info and query (they may carry credentials), for logs and errors."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host if parts.port is None else f"{host}:{parts.port}"
    except ValueError:
        return "<invalid URL>"
    return urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


def parse_response(data: bytes) -> Any:
    """Parse a DER ``TimeStampResp`` completely.

    :raises AttemptFailed: ``data`` is not a DER ``TimeStampResp``.
    """
    try:
        response = TimeStampResp.load(data, strict=True)
        response.native  # noqa: B018  # asn1crypto parses lazily: parse everything now
    except Exception as exc:  # asn1crypto raises ValueError, TypeError, OverflowError… on garbage
        raise AttemptFailed(
            f"応答が RFC 3161 の TimeStampResp ではありません({type(exc).__name__})。",
            f"the reply is not a DER TimeStampResp ({type(exc).__name__})",
        ) from exc
    return response


def check_response(
    response: Any, *, nonce: int, message_digest: bytes, md_algorithm: str
) -> tuple[Any, Any]:
    """Check status, structure, nonce and message imprint of a parsed ``TimeStampResp``.

    Does not check the signature or the TSA certificate.

    :return: the token (``ContentInfo``) and its ``TSTInfo``.
    :raises AttemptFailed: the response is not a grant of what was asked.
    """
    try:
        return _check_response(response, nonce, message_digest, md_algorithm)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise AttemptFailed(
            f"タイムスタンプトークンの構造が不正です({type(exc).__name__})。",
            f"malformed time-stamp token ({type(exc).__name__})",
        ) from exc


def _check_response(
    response: Any, nonce: int, message_digest: bytes, md_algorithm: str
) -> tuple[Any, Any]:
    status_info = response["status"]
    status = status_info["status"].native
    if status != "granted":
        fail_info = ", ".join(sorted(status_info["fail_info"].native or ())) or "-"
        text = "; ".join(status_info["status_string"].native or ()) or "-"
        raise AttemptFailed(
            f"TSA が要求を拒否しました(status {status}、failInfo {fail_info}、{text})。",
            f"the TSA refused: status {status}, failInfo {fail_info}, statusString {text!r}",
        )
    token = response["time_stamp_token"]
    if is_void(token) or token["content_type"].native != "signed_data":
        raise AttemptFailed(
            "応答にタイムスタンプトークンがありません。", "the reply carries no time-stamp token"
        )
    encapsulated = token["content"]["encap_content_info"]
    tst_info = None
    if encapsulated["content_type"].native == "tst_info":
        tst_info = encapsulated["content"].parsed
    if not isinstance(tst_info, tsp.TSTInfo):
        raise AttemptFailed(
            "トークンに TSTInfo が入っていません。", "the token does not encapsulate a TSTInfo"
        )
    if tst_info["version"].native != "v1":
        raise AttemptFailed("TSTInfo の版が 1 ではありません。", "TSTInfo version is not 1")
    received_nonce = tst_info["nonce"].native
    if received_nonce != nonce:
        raise AttemptFailed(
            "応答の nonce が要求と一致しません(再送・すり替えの疑い)。",
            f"nonce mismatch: sent {nonce:#x}, got "
            + ("none" if received_nonce is None else f"{received_nonce:#x}"),
        )
    imprint = tst_info["message_imprint"]
    if (
        imprint["hash_algorithm"]["algorithm"].native != md_algorithm
        or imprint["hashed_message"].native != message_digest
    ):
        raise AttemptFailed(
            "トークンのメッセージインプリントが要求したハッシュ値と一致しません。",
            "the token's message imprint is not the digest that was sent",
        )
    return token, tst_info

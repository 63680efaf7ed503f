"""Run a verification in a separate process with a time and memory limit.

A hostile upload (decompression bomb, pathological object graph) must not hang or exhaust the
web server: the work runs in a child process forked from a clean fork server, under
``RLIMIT_AS``, and is killed when it overruns its time.
"""

from __future__ import annotations

import logging
import multiprocessing
import resource
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509

from ._verify import Report, VerifyPolicy, verify_pdf
from .errors import VerifyInputError

__all__ = ["DEFAULT_TIME_LIMIT", "DEFAULT_MEMORY_LIMIT", "verify_pdf_isolated"]

DEFAULT_TIME_LIMIT = 30.0  # seconds
DEFAULT_MEMORY_LIMIT = 1024 * 1024 * 1024  # bytes of address space for the child

log = logging.getLogger(__name__)

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(["signer"])


@dataclass(frozen=True)
class _PortablePolicy:
    """A :class:`VerifyPolicy` as plain bytes, so it crosses the process boundary cheaply."""

    roots: tuple[bytes, ...]
    others: tuple[bytes, ...]
    crls: tuple[bytes, ...]
    max_bytes: int

    @classmethod
    def of(cls, policy: VerifyPolicy) -> _PortablePolicy:
        return cls(
            tuple(c.dump() for c in policy.trust_roots),
            tuple(c.dump() for c in policy.other_certs),
            tuple(c.dump() for c in policy.crls),
            policy.max_bytes,
        )

    def policy(self) -> VerifyPolicy:
        return VerifyPolicy(
            [asn1_x509.Certificate.load(d) for d in self.roots],
            [asn1_x509.Certificate.load(d) for d in self.others],
            [asn1_crl.CertificateList.load(d) for d in self.crls],
            self.max_bytes,
        )


def _child(conn: Connection, data: bytes, portable: _PortablePolicy, memory: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    try:
        result: tuple[str, Any] = ("ok", verify_pdf(data, portable.policy()))
    except VerifyInputError as exc:
        result = ("refused", (exc.message, exc.message_en, exc.fields))
    except MemoryError:
        result = ("refused", _too_complex("memory"))
    except Exception as exc:  # a verifier bug must still give an answer, not a hang
        result = ("error", f"{type(exc).__name__}: {exc}")
    conn.send(result)
    conn.close()


def _too_complex(what: str) -> tuple[str, str, dict[str, Any]]:
    return (
        "この PDF は検証に必要な処理が大きすぎるため、検証を中止しました。",
        f"Verification of this PDF was stopped: it needs too much {what}.",
        {"reason": "too_complex", "status": 422},
    )


def verify_pdf_isolated(
    data: bytes,
    policy: VerifyPolicy,
    *,
    time_limit: float = DEFAULT_TIME_LIMIT,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
) -> Report:
    """:func:`verify_pdf` in a child process, killed after ``time_limit`` seconds.

    :raises VerifyInputError: as :func:`verify_pdf`, or with reason ``too_complex`` when the
        child runs out of time or memory.
        With reason ``verifier_error`` when the verifier itself failed (a bug, logged).
    """
    receiver, sender = _context.Pipe(duplex=False)
    child = _context.Process(
        target=_child, args=(sender, data, _PortablePolicy.of(policy), memory_limit), daemon=True
    )
    child.start()
    sender.close()
    try:
        if not receiver.poll(time_limit):
            child.kill()
            raise VerifyInputError(*_too_complex("time")[:2], **_too_complex("time")[2])
        try:
            kind, payload = receiver.recv()
        except EOFError:  # killed by the kernel (e.g. the memory limit hit inside C code)
            raise VerifyInputError(
                *_too_complex("memory")[:2], **_too_complex("memory")[2]
            ) from None
    finally:
        receiver.close()
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join()
        child.close()
    if kind == "ok":
        assert isinstance(payload, Report)
        return payload
    if kind == "refused":
        message, message_en, fields = payload
        raise VerifyInputError(message, message_en, **fields)
    # A verifier bug met by this file: logged in full for the operators, while the person who
    # uploaded it gets a clear refusal (fail closed: nothing is called valid).
    log.error("verification failed with an internal error: %s", payload)
    raise VerifyInputError(
        "この PDF は検証できませんでした(検証処理の内部エラー)。",
        "This PDF could not be verified (internal error of the verifier; it has been logged).",
        reason="verifier_error",
        status=422,
    )

"""Signing with a record: every document signed by the service is findable by its ID."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session, sessionmaker

from keys import Role
from signer import SigningContext, SignOptions, SignResult, sign_pdf

from . import metrics
from ._db import session_scope
from .documents import record_signed_document
from .models import SigningChannel

__all__ = ["sign_and_record"]


def sign_and_record(
    sessions: sessionmaker[Session],
    source: bytes | Path | BinaryIO,
    context: SigningContext,
    options: SignOptions,
    *,
    role: Role,
    file_name: str | None = None,
    output: Path | None = None,
    signed_by: int | None = None,
    template: str | None = None,
    channel: SigningChannel | None = None,
) -> SignResult:
    """Sign a PDF and record it (ID, SHA-256 of the output, role, signer, level, time).

    ``signed_by``, ``template`` and ``channel`` say for whom, with which stamp template and
    how it was signed (the signing history shows them).

    If the record cannot be written, the signed output file is removed again: a signed
    document that the verify page does not know must not leave the service.

    :raises KoinError: as :func:`signer.sign_pdf`, or the record could not be written
        (:class:`~contracts.errors.DuplicateDocument`).
    """
    with metrics.timed_signature(role):
        result = sign_pdf(source, context, options, output=output)
    certificate = context.signer.signing_cert
    subject = certificate.subject.human_friendly if certificate is not None else "?"
    try:
        with session_scope(sessions) as session:
            record_signed_document(
                session,
                document_id=result.document_id,
                sha256=result.sha256,
                signer_role=role.value,
                signer_subject=subject,
                level=result.level,
                signed_at=result.signed_at,
                file_name=file_name[-255:] if file_name else None,
                signed_by=signed_by,
                template=template,
                channel=channel,
            )
    except BaseException:
        if output is not None:
            output.unlink(missing_ok=True)
        raise
    metrics.count_signed(role, result.level)
    return result

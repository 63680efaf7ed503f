"""Persistence and workflow of koin: the database, its tables and the services that use them.

Views call the services here; ``signer``, ``keys`` and ``timestamp`` never touch the database.
Migrations: :mod:`contracts.migrate`.
"""

from ._db import (
    DATABASE_URL_ENV,
    Base,
    UtcDateTime,
    database_url,
    make_engine,
    make_session_factory,
    session_scope,
    utcnow,
)
from .documents import (
    find_documents_by_sha256,
    get_document,
    normalize_document_id,
    record_signed_document,
    require_document,
)
from .errors import ContractsError, DocumentNotFound, DuplicateDocument
from .models import SignedDocument
from .signing import sign_and_record

__all__ = [
    "DATABASE_URL_ENV",
    "Base",
    "ContractsError",
    "DocumentNotFound",
    "DuplicateDocument",
    "SignedDocument",
    "UtcDateTime",
    "database_url",
    "find_documents_by_sha256",
    "get_document",
    "make_engine",
    "make_session_factory",
    "normalize_document_id",
    "record_signed_document",
    "require_document",
    "session_scope",
    "sign_and_record",
    "utcnow",
]

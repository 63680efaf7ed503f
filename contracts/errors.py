"""Errors of the persistence and workflow layer."""

from __future__ import annotations

from collections.abc import Sequence

from keys.errors import KoinError

__all__ = ["ContractsError", "DocumentNotFound", "DuplicateDocument"]


class ContractsError(KoinError):
    """Root of the errors of ``contracts``: the database or a workflow rule refused a request."""


class DuplicateDocument(ContractsError):
    """A document ID is already recorded, with different data.

    :ivar document_id: the canonical document ID.
    :ivar differing: names of the fields whose values differ from the stored record.
    """

    def __init__(self, document_id: str, differing: Sequence[str]) -> None:
        names = ", ".join(differing)
        super().__init__(
            f"文書ID {document_id} は既に異なる内容で登録されています（相違する項目: {names}）。",
            f"Document ID {document_id} is already recorded with different data "
            f"(differing fields: {names}).",
            document_id=document_id,
            differing=list(differing),
        )
        self.document_id = document_id
        self.differing = tuple(differing)


class DocumentNotFound(ContractsError):
    """No signed document is recorded under the given document ID.

    :ivar document_id: the ID as it was asked for.
    """

    def __init__(self, document_id: str) -> None:
        super().__init__(
            f"文書ID {document_id} の署名記録はありません。",
            f"No signed document is recorded under the document ID {document_id}.",
            document_id=document_id,
        )
        self.document_id = document_id

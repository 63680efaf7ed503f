"""Opening PDFs for signing, with one clear error for each way an input can be unusable."""

from __future__ import annotations

from typing import BinaryIO

from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.crypt import PubKeySecurityHandler
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.misc import PdfError
from pyhanko.pdf_utils.reader import PdfFileReader

from .errors import EncryptedPdfError, InvalidPdfError, PlacementError

__all__ = ["open_for_signing", "page_box", "page_count", "resolve_page_index"]

HEADER_WINDOW = 1024  # PDF readers accept the header anywhere in the first KiB


def open_for_signing(stream: BinaryIO) -> IncrementalPdfFileWriter:
    """Open ``stream`` for an incremental update.

    :raises InvalidPdfError: not a PDF, truncated, or with a broken cross-reference table.
    :raises EncryptedPdfError: the PDF is encrypted.
    """
    stream.seek(0)
    head = stream.read(HEADER_WINDOW)
    if b"%PDF-" not in head:
        raise InvalidPdfError(
            "PDF ファイルではありません(先頭に %PDF- がありません)。",
            "Not a PDF file (no %PDF- header).",
            reason="not_pdf",
        )
    stream.seek(0, 2)
    size = stream.tell()
    stream.seek(max(0, size - HEADER_WINDOW))
    if b"%%EOF" not in stream.read():
        raise InvalidPdfError(
            "PDF が途中で切れています(末尾に %%EOF がありません)。"
            "ファイル全体を送り直してください。",
            "The PDF is truncated (no %%EOF marker at the end); send the complete file.",
            reason="truncated",
        )
    stream.seek(0)
    try:
        # strict: we refuse to repair a broken xref silently; the signed bytes must be exactly
        # what a reader will show.
        writer = IncrementalPdfFileWriter(stream, strict=True)
        reader = writer.prev
        encrypted = reader.encrypted
        if not encrypted:
            page_count(reader)  # walks the trailer, root and page tree
    except (PdfError, ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise InvalidPdfError(
            "PDF の構造(相互参照表など)が壊れているため署名できません。修復はしません。"
            "元のアプリケーションで PDF を作り直してください。",
            "The PDF structure (cross-reference table or object tree) is broken; koin does not "
            f"repair it. Re-export the PDF from its source application. Detail: {exc}",
            reason="broken_structure",
        ) from exc
    if encrypted:
        if isinstance(reader.security_handler, PubKeySecurityHandler):
            raise EncryptedPdfError(
                "PDF が証明書で暗号化されています。暗号化を解除してから署名してください。",
                "The PDF is encrypted with certificates; remove the encryption before signing.",
                reason="encrypted_certificate",
            )
        raise EncryptedPdfError(
            "PDF がパスワードで保護されています。保護を解除してから署名してください。",
            "The PDF is password-protected; remove the protection before signing.",
            reason="encrypted_password",
        )
    return writer


def page_count(reader: PdfFileReader) -> int:
    count = reader.root["/Pages"]["/Count"]
    if not isinstance(count, int) or count < 1:
        raise InvalidPdfError(
            "PDF にページがありません。", "The PDF has no pages.", reason="no_pages"
        )
    return int(count)


def resolve_page_index(reader: PdfFileReader, page: int | None) -> int:
    """Turn a 1-based page number (negative counts from the end, None = last) into an index.

    :raises PlacementError: the page does not exist.
    """
    total = page_count(reader)
    if page is None:
        return total - 1
    index = page - 1 if page > 0 else total + page
    if page == 0 or not 0 <= index < total:
        raise PlacementError(
            f"ページ {page} はありません(この PDF は {total} ページです)。",
            f"Page {page} does not exist; the PDF has {total} page(s).",
            page=page,
            page_count=total,
        )
    return index


def page_box(reader: PdfFileReader, index: int) -> tuple[float, float, float, float]:
    """The visible area (CropBox, else MediaBox, both inheritable) of a page, normalised."""
    page_ref, _ = reader.find_page_for_modification(index)
    node = page_ref.get_object()
    for key in ("/CropBox", "/MediaBox"):
        current = node
        while current is not None:
            if key in current:
                values = [float(v) for v in current[key]]
                x1, y1, x2, y2 = values
                return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
            parent = current.get("/Parent")
            current = parent.get_object() if isinstance(parent, generic.IndirectObject) else parent
    raise InvalidPdfError(
        f"{index + 1} ページ目に大きさ(MediaBox)がありません。",
        f"Page {index + 1} has no MediaBox.",
        reason="no_mediabox",
    )

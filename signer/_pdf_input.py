"""Opening PDFs for signing, with one clear error for each way an input can be unusable."""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any, BinaryIO

from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.crypt import PubKeySecurityHandler
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.misc import PdfError
from pyhanko.pdf_utils.reader import PdfFileReader

from .errors import EncryptedPdfError, InvalidPdfError, PlacementError

__all__ = [
    "MAX_PAGES",
    "MAX_PAGE_TREE_DEPTH",
    "READ_ERRORS",
    "broken_structure",
    "check_page_tree",
    "open_for_signing",
    "page_box",
    "page_count",
    "resolve_page_index",
]

HEADER_WINDOW = 1024  # PDF readers accept the header anywhere in the first KiB
#: Most pages koin signs in one document; a page tree claiming more is refused before it is
#: walked (a hostile file can claim millions).
MAX_PAGES = 100_000
#: Deepest page tree accepted (real ones are a few levels deep).
MAX_PAGE_TREE_DEPTH = 64

#: What pyHanko raises on a malformed object graph. AssertionError and AttributeError too: its
#: reader asserts the types of objects it expects (e.g. a catalog that is a number); zlib and
#: struct errors come from corrupt compressed or binary streams (found by fuzzing:
#: bench/fuzz_verify.py).
READ_ERRORS = (
    PdfError,
    ValueError,
    LookupError,
    TypeError,
    ArithmeticError,
    RecursionError,
    AssertionError,
    AttributeError,
    NotImplementedError,
    zlib.error,
    struct.error,
)


def broken_structure(exc: BaseException | str) -> InvalidPdfError:
    """The refusal of a PDF whose object structure cannot be read or makes no sense."""
    if isinstance(exc, str):
        detail = exc
    else:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return InvalidPdfError(
        "PDF の構造(相互参照表など)が壊れているため署名できません。修復はしません。"
        "元のアプリケーションで PDF を作り直してください。",
        "The PDF structure (cross-reference table or object tree) is broken; koin does not "
        f"repair it. Re-export the PDF from its source application. Detail: {detail}",
        reason="broken_structure",
    )


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
            check_page_tree(reader)  # walks the trailer, root and the whole page tree
    except InvalidPdfError:
        raise
    except READ_ERRORS as exc:
        raise broken_structure(exc) from exc
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
    """The number of pages the page tree claims (checked by :func:`check_page_tree`)."""
    count = reader.root["/Pages"]["/Count"]
    if not isinstance(count, int) or count < 1:
        raise _no_pages()
    return int(count)


def _no_pages() -> InvalidPdfError:
    return InvalidPdfError("PDF にページがありません。", "The PDF has no pages.", reason="no_pages")


def check_page_tree(reader: PdfFileReader) -> int:
    """Walk the whole page tree once and return the number of pages.

    Refuses what would make pyHanko (or a PDF reader) loop, recurse without end or disagree
    about which page is which: a cycle, a node listed twice, a child whose ``/Parent`` names
    another node than the one listing it, a ``/Count`` that is not the number of pages below
    the node, more than :data:`MAX_PAGES` pages or :data:`MAX_PAGE_TREE_DEPTH` levels. Every
    page's content stream is read and decoded, so a lying ``/Length`` or an unknown filter is
    refused too.
    The walk is iterative: a deep tree cannot exhaust the stack.

    :raises InvalidPdfError: the tree is broken (``broken_structure``) or has no pages.
    :raises PdfError: (and the other errors of a malformed object graph) from pyHanko.
    """
    root = reader.root
    if not isinstance(root, generic.DictionaryObject):
        raise broken_structure("the catalog is not a dictionary")
    top = root.raw_get("/Pages")
    if not isinstance(top, generic.IndirectObject):
        raise broken_structure("/Pages of the catalog is not an indirect object")
    top_node = top.get_object()
    if not isinstance(top_node, generic.DictionaryObject) or top_node.get(
        "/Type", "/Pages"
    ) != "/Pages":
        raise broken_structure("/Pages of the catalog is not a page tree node")
    claimed = top_node.get("/Count")
    if not isinstance(claimed, int) or claimed < 1:
        raise _no_pages()
    if claimed > MAX_PAGES:
        raise InvalidPdfError(
            f"ページ数が多すぎます({claimed} ページ、上限 {MAX_PAGES} ページ)。",
            f"The PDF claims too many pages ({claimed}; koin signs at most {MAX_PAGES}).",
            reason="too_many_pages",
        )
    seen: set[generic.Reference] = {top.reference}
    # (node, its reference, depth, index of the next kid, pages counted below it so far)
    stack: list[list[Any]] = [[top_node, top.reference, 1, 0, 0]]
    pages = 0
    while stack:
        frame = stack[-1]
        node, node_ref, depth, next_kid, _below = frame
        kids = node.get("/Kids")
        if not isinstance(kids, generic.ArrayObject):
            raise broken_structure(f"page tree node {node_ref.idnum} has no /Kids array")
        if next_kid == len(kids):
            stack.pop()
            if node.get("/Count") != frame[4]:
                raise broken_structure(
                    f"page tree node {node_ref.idnum} claims /Count {node.get('/Count')!r} "
                    f"but holds {frame[4]} page(s)"
                )
            if stack:
                stack[-1][4] += frame[4]
            continue
        frame[3] += 1
        kid_ref = kids.raw_get(next_kid)
        if not isinstance(kid_ref, generic.IndirectObject):
            raise broken_structure(f"a child of page tree node {node_ref.idnum} is not indirect")
        if kid_ref.reference in seen:
            raise broken_structure(
                f"object {kid_ref.idnum} appears twice in the page tree (a cycle or a page "
                "listed twice)"
            )
        seen.add(kid_ref.reference)
        kid = kid_ref.get_object()
        if not isinstance(kid, generic.DictionaryObject):
            raise broken_structure(f"page tree entry {kid_ref.idnum} is not a dictionary")
        # A missing /Parent is tolerated (readers find the page through the tree); one that
        # names another node would make readers disagree about inherited attributes.
        if "/Parent" in kid:
            parent = kid.raw_get("/Parent")
            if not isinstance(parent, generic.IndirectObject) or parent.reference != node_ref:
                raise broken_structure(
                    f"/Parent of page tree entry {kid_ref.idnum} is not the node listing it"
                )
        kind = kid.get("/Type")
        if kind == "/Pages":
            if depth >= MAX_PAGE_TREE_DEPTH:
                raise broken_structure(f"the page tree is deeper than {MAX_PAGE_TREE_DEPTH}")
            stack.append([kid, kid_ref.reference, depth + 1, 0, 0])
        elif kind == "/Page":
            pages += 1
            frame[4] += 1
            if pages > claimed:
                raise broken_structure(f"the page tree holds more than its /Count {claimed}")
            _read_contents(kid, kid_ref.idnum)
        else:
            raise broken_structure(f"page tree entry {kid_ref.idnum} has /Type {kind!r}")
    return pages


def _read_contents(page: generic.DictionaryObject, idnum: int) -> None:
    """Read and decode the content stream(s) of a page (under the reader's decode limits)."""
    if "/Contents" not in page:
        return
    contents = page["/Contents"]
    streams = contents if isinstance(contents, generic.ArrayObject) else [contents]
    for item in streams:
        stream = item.get_object() if isinstance(item, generic.IndirectObject) else item
        if not isinstance(stream, generic.StreamObject):
            raise broken_structure(f"/Contents of page object {idnum} is not a stream")
        stream.data  # noqa: B018  # decodes: a wrong /Length or filter raises here


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
    """The visible area (CropBox, else MediaBox, both inheritable) of a page, normalised.

    :raises InvalidPdfError: the page has no usable box.
    """
    page_ref, _ = reader.find_page_for_modification(index)
    node = page_ref.get_object()
    for key in ("/CropBox", "/MediaBox"):
        current = node
        visited: set[int] = set()
        while isinstance(current, generic.DictionaryObject) and id(current) not in visited:
            visited.add(id(current))
            if key in current:
                return _box(current[key], index, key)
            parent = current.get("/Parent")
            current = parent.get_object() if isinstance(parent, generic.IndirectObject) else parent
    raise InvalidPdfError(
        f"{index + 1} ページ目に大きさ(MediaBox)がありません。",
        f"Page {index + 1} has no MediaBox.",
        reason="no_mediabox",
    )


def _box(value: object, index: int, key: str) -> tuple[float, float, float, float]:
    items = list(value) if isinstance(value, generic.ArrayObject) else []
    numbers = [
        float(v) for v in items if isinstance(v, generic.NumberObject | generic.FloatObject)
    ]
    if len(items) != 4 or len(numbers) != 4 or not all(math.isfinite(v) for v in numbers):
        raise InvalidPdfError(
            f"{index + 1} ページ目の大きさ({key[1:]})が 4 つの数値ではありません。",
            f"The {key[1:]} of page {index + 1} is not four numbers.",
            reason="no_mediabox",
        )
    x1, y1, x2, y2 = numbers
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))

"""Many distinct one-page permits, cheaply: one drawn permit plus a tiny incremental update per
copy that gives it its own title in the document information (a valid PDF whose bytes and
hash differ from every other copy). Drawing a permit with the CJK font takes most of a
second; a copy takes a few milliseconds."""

from __future__ import annotations

import io
from collections.abc import Iterator

from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter

__all__ = ["numbered_copies"]


def numbered_copies(permit: bytes, count: int, *, start: int = 1) -> Iterator[bytes]:
    """``count`` copies of ``permit``, copy ``n`` titled "許可書 第 n 号"."""
    for number in range(start, start + count):
        writer = IncrementalPdfFileWriter(io.BytesIO(permit), strict=False)
        title = generic.TextStringObject(f"許可書 第 {number} 号")
        writer.set_info(generic.DictionaryObject({generic.NameObject("/Title"): title}))
        out = io.BytesIO()
        writer.write(out)
        yield out.getvalue()

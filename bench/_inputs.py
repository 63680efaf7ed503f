"""Benchmark inputs: the sample permit (1 and 20 pages) and a large PDF written in pieces."""

from __future__ import annotations

import os
from pathlib import Path

from signer.samples import A4

__all__ = ["write_large_pdf"]

#: Noise image per page: 1024 × 1024 grey pixels, 1 MiB, stored uncompressed.
_SIDE = 1024
_PIECE = _SIDE * _SIDE


def write_large_pdf(path: Path, size: int) -> int:
    """Write a valid PDF of about ``size`` bytes to ``path``, one 1 MiB image page at a time
    (never more than one page in memory). Returns the number of pages.

    Each page shows a grey noise image (random bytes, so nothing compresses it away) and the
    file ends with a classic cross-reference table, as office software writes it.
    """
    pages = max(1, size // _PIECE)
    offsets: dict[int, int] = {}
    # objects: 1 catalog, 2 page tree, then per page: page, contents, image
    first_page = 3
    with path.open("wb") as out:

        def obj(number: int, body: bytes) -> None:
            offsets[number] = out.tell()
            out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")

        out.write(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
        obj(1, b"<< /Type /Catalog /Pages 2 0 R >>")
        kids = b" ".join(b"%d 0 R" % (first_page + 3 * i) for i in range(pages))
        obj(2, b"<< /Type /Pages /Count %d /Kids [%s] >>" % (pages, kids))
        width, height = A4
        draw = b"q %g 0 0 %g 0 0 cm /Im0 Do Q" % (width, height)
        for i in range(pages):
            page = first_page + 3 * i
            contents, image = page + 1, page + 2
            obj(
                page,
                b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %g %g] /Contents %d 0 R "
                b"/Resources << /XObject << /Im0 %d 0 R >> >> >>"
                % (width, height, contents, image),
            )
            obj(contents, b"<< /Length %d >>\nstream\n%s\nendstream" % (len(draw), draw))
            offsets[image] = out.tell()
            out.write(
                b"%d 0 obj\n<< /Type /XObject /Subtype /Image /Width %d /Height %d "
                b"/ColorSpace /DeviceGray /BitsPerComponent 8 /Length %d >>\nstream\n"
                % (image, _SIDE, _SIDE, _PIECE)
            )
            out.write(os.urandom(_PIECE))
            out.write(b"\nendstream\nendobj\n")
        count = first_page + 3 * pages
        xref = out.tell()
        out.write(b"xref\n0 %d\n0000000000 65535 f \n" % count)
        for number in range(1, count):
            out.write(b"%010d 00000 n \n" % offsets[number])
        out.write(
            b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (count, xref)
        )
    return pages

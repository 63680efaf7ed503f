"""The visible stamp: the seal image (電子印影) on the left, the position and date on the right."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from PIL import Image
from pyhanko.pdf_utils import layout
from pyhanko.pdf_utils.font.opentype import GlyphAccumulator, GlyphAccumulatorFactory
from pyhanko.pdf_utils.images import PdfImage
from pyhanko.pdf_utils.text import TextBoxStyle
from pyhanko.pdf_utils.writer import BasePdfFileWriter
from pyhanko.stamp import QRPosition, QRStampStyle, TextStampStyle
from pyhanko.version import __version__ as pyhanko_version

from keys import atomic_write

from ._docid import ALPHABET as DOCUMENT_ID_ALPHABET
from ._era import format_japanese_datetime
from ._prebuilt import PrebuiltFontFactory, PrebuiltImage, PreparedFont, PreparedImage
from .errors import PlacementError, StampAssetError

__all__ = [
    "DEFAULT_QR_STAMP_SIZE",
    "DEFAULT_STAMP_SIZE",
    "MIN_STAMP_SIZE",
    "MM",
    "Box",
    "InMemoryFontFactory",
    "StampAppearance",
]

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
#: Bump when the prepared font's content or format changes.
_PREPARED_VERSION = "1"

MM = 72 / 25.4  # points per millimetre
#: Width and height of the default stamp, in points (about 80 × 25 mm).
DEFAULT_STAMP_SIZE = (228.0, 70.0)
#: The default stamp with a QR code beside the text (about 106 × 25 mm).
DEFAULT_QR_STAMP_SIZE = (300.0, 70.0)
#: Smaller than this the text would be unreadable once shrunk to fit.
MIN_STAMP_SIZE = (90.0, 28.0)
#: Distance of the default stamp from the right and bottom page edges (about 12 mm).
DEFAULT_STAMP_MARGIN = 34.0

_PADDING = 4.0
_GAP = 6.0
_TEXT_SIZE = 8
_TEXT_COLOR = (0.1, 0.1, 0.1)
_BORDER_COLOR = (0.55, 0.55, 0.55)

#: Labels of the variable lines of :meth:`StampAppearance.text`.
_DATE_LABEL = "署名日時"
_ID_LABEL = "文書番号"
#: Every character the variable lines can print: labels, the 和暦 date with time and zone
#: (see ``format_japanese_datetime``; 元 for 元年), the document ID alphabet.
VARIABLE_CHARACTERS = (
    _DATE_LABEL + _ID_LABEL + " 0123456789:JST令和平成昭和元年月日-" + DOCUMENT_ID_ALPHABET
)


@dataclass(frozen=True)
class InMemoryFontFactory(GlyphAccumulatorFactory):
    """pyHanko's OpenType font factory, reading the font from memory.

    The stock factory opens the file for every stamp and never closes it; this one reads the
    file once per process.
    """

    font_data: bytes = b""

    def create_font_engine(
        self, writer: BasePdfFileWriter, obj_stream: Any = None
    ) -> GlyphAccumulator:
        if obj_stream is None and writer.stream_xrefs and self.create_objstream_if_needed:
            obj_stream = writer.prepare_object_stream()
        return GlyphAccumulator(
            writer=writer,
            font_handle=io.BytesIO(self.font_data),
            font_size=self.font_size,
            ot_script_tag=self.ot_script_tag,
            ot_language_tag=self.ot_language_tag,
            writing_direction=self.writing_direction,
            bcp47_lang_code=self.bcp47_lang_code,
            obj_stream=obj_stream,
        )


@dataclass(frozen=True)
class StampAppearance:
    """Static parts of a stamp, loaded once and reused for every document.

    :ivar title_lines: the position as printed,
        e.g. ("茨城県知事", "Governor of Ibaraki Prefecture").
    """

    seal_image: Path
    font_file: Path
    title_lines: tuple[str, ...] = ("茨城県知事", "Governor of Ibaraki Prefecture")

    @cached_property
    def seal(self) -> Image.Image:
        """The seal, decoded once.

        :raises StampAssetError: the image is missing or unreadable.
        """
        try:
            with Image.open(self.seal_image) as image:
                image.load()
                return image.convert("RGBA")
        except (OSError, ValueError) as exc:
            raise StampAssetError(
                f"印影画像 {self.seal_image} を読み込めません。",
                f"Cannot read the seal image {self.seal_image}: {exc}",
            ) from exc

    @cached_property
    def font_data(self) -> bytes:
        """:raises StampAssetError: the font file is missing."""
        try:
            return self.font_file.read_bytes()
        except OSError as exc:
            raise StampAssetError(
                f"フォント {self.font_file} がありません。`koin init` を実行してください。",
                f"Font {self.font_file} is missing; run `koin init`.",
            ) from exc

    @cached_property
    def font(self) -> GlyphAccumulatorFactory:
        """:raises StampAssetError: the font file is missing."""
        return InMemoryFontFactory(
            str(self.font_file), font_size=_TEXT_SIZE, font_data=self.font_data
        )

    @cached_property
    def prepared_font(self) -> PreparedFont:
        """The font subset for every text this appearance can print.

        Read from :attr:`prepared_font_file` when ``koin init`` (or an earlier process) left
        it there, else built (~0.5 s, ~120 MiB while fontTools parses the font) and saved
        there for the next process.

        :raises StampAssetError: the font file is missing or unusable.
        """
        path = self.prepared_font_file
        try:
            return PreparedFont.from_json(self.font_file, json.loads(path.read_text("utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not prepared yet, or by another version: build it
        prepared = self._build_prepared_font()
        try:
            atomic_write(path, json.dumps(prepared.to_json()).encode("utf-8"))
        except OSError as exc:
            log.info("cannot keep the prepared stamp font in %s: %s", path, exc)
        return prepared

    @cached_property
    def prepared_font_file(self) -> Path:
        """Where the prepared subset of this font and these title lines is kept: named by a
        hash of the font, the characters, the title lines and the pyHanko version.

        :raises StampAssetError: the font file is missing.
        """
        key = hashlib.sha256()
        for part in (
            _PREPARED_VERSION, pyhanko_version, "\n".join(self.title_lines), VARIABLE_CHARACTERS
        ):
            key.update(part.encode("utf-8") + b"\0")
        try:
            with self.font_file.open("rb") as font:
                key.update(hashlib.file_digest(font, "sha256").digest())
        except OSError as exc:
            raise StampAssetError(
                f"フォント {self.font_file} がありません。`koin init` を実行してください。",
                f"Font {self.font_file} is missing; run `koin init`.",
            ) from exc
        return self.font_file.parent / "prepared" / f"stamp-font-{key.hexdigest()[:24]}.json"

    def _build_prepared_font(self) -> PreparedFont:
        sample = self.text(
            format_japanese_datetime(dt.datetime(2028, 12, 28, 23, 58, tzinfo=dt.UTC)),
            "0123-4567-89AB-CDEF",
        )
        characters = "".join(self.title_lines) + VARIABLE_CHARACTERS
        try:
            return PreparedFont.build(self.font_data, characters, sample.split("\n"))
        except Exception as exc:  # fontTools / HarfBuzz on an unusable file
            raise StampAssetError(
                f"フォント {self.font_file} を読み込めません。",
                f"Cannot use the font {self.font_file}: {type(exc).__name__}: {exc}",
            ) from exc

    @cached_property
    def prepared_seal(self) -> PreparedImage:
        """The seal image encoded once. :raises StampAssetError: see :attr:`seal`."""
        return PreparedImage(self.seal)

    def text(self, signed_at: str, document_id: str) -> str:
        return "\n".join(
            [*self.title_lines, f"{_DATE_LABEL} {signed_at}", f"{_ID_LABEL} {document_id}"]
        )

    def style_for(self, box: Box, *, qr: bool = False, prebuilt: bool = False) -> TextStampStyle:
        """A pyHanko stamp style laid out for ``box``: the seal square on the left, the text
        beside it and, with ``qr``, a QR code (of the ``url`` text parameter) on the right.

        With ``prebuilt`` the font subset and the seal image come from :attr:`prepared_font`
        and :attr:`prepared_seal` (same layout, same look, no per-document font work).
        """
        font: GlyphAccumulatorFactory
        background: PdfImage
        if prebuilt:
            font = PrebuiltFontFactory(
                str(self.font_file), font_size=_TEXT_SIZE, prepared=self.prepared_font
            )
            background = PrebuiltImage(self.prepared_seal)
        else:
            font, background = self.font, PdfImage(self.seal)
        height = box[3] - box[1]
        seal_side = height - 2 * _PADDING
        text_left = _PADDING + seal_side + _GAP
        style_class = QRStampStyle if qr else TextStampStyle
        extra: dict[str, Any] = (
            {"qr_position": QRPosition.RIGHT_OF_TEXT, "innsep": int(_PADDING)} if qr else {}
        )
        return style_class(
            **extra,
            stamp_text="%(stamp_text)s",
            text_box_style=TextBoxStyle(
                font=font,
                font_size=_TEXT_SIZE,
                leading=round(_TEXT_SIZE * 1.45),
                text_color=_TEXT_COLOR,
            ),
            inner_content_layout=layout.SimpleBoxLayoutRule(
                x_align=layout.AxisAlignment.ALIGN_MIN,
                y_align=layout.AxisAlignment.ALIGN_MID,
                margins=layout.Margins(
                    left=int(text_left),
                    right=int(_PADDING),
                    top=int(_PADDING),
                    bottom=int(_PADDING),
                ),
                inner_content_scaling=layout.InnerScaling.SHRINK_TO_FIT,
            ),
            background=background,
            background_layout=layout.SimpleBoxLayoutRule(
                x_align=layout.AxisAlignment.ALIGN_MIN,
                y_align=layout.AxisAlignment.ALIGN_MID,
                margins=layout.Margins.uniform(int(_PADDING)),
                inner_content_scaling=layout.InnerScaling.SHRINK_TO_FIT,
            ),
            background_opacity=1.0,
            border_width=1,
            border_color=_BORDER_COLOR,
        )


def default_box(page: Box, *, qr: bool = False) -> Box:
    """Bottom-right corner of the page, inside a margin."""
    width, height = DEFAULT_QR_STAMP_SIZE if qr else DEFAULT_STAMP_SIZE
    right = page[2] - DEFAULT_STAMP_MARGIN
    bottom = page[1] + DEFAULT_STAMP_MARGIN
    return (right - width, bottom, right, bottom + height)


def check_box(box: Box, page: Box, page_number: int) -> Box:
    """Normalise ``box`` and make sure it lies on the page and is large enough to read.

    :raises PlacementError: with the page size in the message.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    page_text = f"{page[0]:g},{page[1]:g},{page[2]:g},{page[3]:g}"
    if x1 < page[0] or y1 < page[1] or x2 > page[2] or y2 > page[3]:
        raise PlacementError(
            f"印影の枠 {x1:g},{y1:g},{x2:g},{y2:g} が {page_number} ページ目"
            f"({page_text})からはみ出しています。",
            f"The stamp box {x1:g},{y1:g},{x2:g},{y2:g} lies outside page {page_number} "
            f"({page_text}).",
            page=page_number,
        )
    min_w, min_h = MIN_STAMP_SIZE
    if x2 - x1 < min_w or y2 - y1 < min_h:
        raise PlacementError(
            f"印影の枠が小さすぎます(幅 {min_w:g}pt・高さ {min_h:g}pt 以上にしてください)。",
            f"The stamp box is too small to be legible (at least {min_w:g} x {min_h:g} pt).",
            page=page_number,
        )
    return (x1, y1, x2, y2)

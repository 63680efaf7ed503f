"""Stamp assets prepared once per installation: the CJK font and the demo seal image.

pyHanko's OpenType support needs a single-face font file with unitsPerEm 1000 to lay out glyphs
at the right width; Debian ships Noto Sans CJK only as a ``.ttc`` collection, so the Japanese face
is extracted to an ``.otf`` once (at ``koin init``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from fontTools.ttLib import TTCollection
from PIL import Image, ImageDraw, ImageFont

from keys import atomic_write

from .errors import StampAssetError

__all__ = [
    "DEFAULT_SEAL_TEXT",
    "NOTO_CJK_DIRS",
    "draw_demo_seal",
    "extract_cjk_font",
    "find_system_font",
]

NOTO_CJK_DIRS = (
    Path("/usr/share/fonts/opentype/noto"),
    Path("/usr/share/fonts/noto-cjk"),
    Path("/usr/share/fonts/google-noto-cjk"),
)
JAPANESE_FACE = "Noto Sans CJK JP"

#: 茨城県知事之印, in the three columns of a square official seal, read right to left.
DEFAULT_SEAL_TEXT: tuple[str, ...] = ("茨城県", "知事", "之印")
SEAL_RED = (200, 22, 30, 255)


def find_system_font(file_name: str) -> Path:
    """Locate one of Debian's ``fonts-noto-cjk`` collections.

    :raises StampAssetError: the package is not installed.
    """
    for folder in NOTO_CJK_DIRS:
        candidate = folder / file_name
        if candidate.exists():
            return candidate
    raise StampAssetError(
        f"フォント {file_name} が見つかりません。fonts-noto-cjk をインストールしてください。",
        f"Font {file_name} not found; install the fonts-noto-cjk package.",
    )


def extract_cjk_font(destination: Path, collection: Path | None = None) -> Path:
    """Write the "Noto Sans CJK JP" face of the Noto CJK collection to ``destination`` (.otf).

    :raises StampAssetError: the collection is missing or has no Japanese face.
    """
    collection = collection or find_system_font("NotoSansCJK-Regular.ttc")
    fonts = TTCollection(str(collection)).fonts
    for font in fonts:
        if font["name"].getDebugName(1) == JAPANESE_FACE:
            if font["head"].unitsPerEm != 1000:
                raise StampAssetError(
                    "フォントの unitsPerEm が 1000 ではありません。",
                    f"{JAPANESE_FACE} in {collection} has unitsPerEm "
                    f"{font['head'].unitsPerEm}, expected 1000.",
                )
            buffer = io.BytesIO()
            font.save(buffer)
            atomic_write(destination, buffer.getvalue())
            return destination
    raise StampAssetError(
        f"{collection} に日本語フェイスがありません。",
        f"{collection} has no {JAPANESE_FACE} face.",
    )


def draw_demo_seal(
    destination: Path,
    columns: Sequence[str] = DEFAULT_SEAL_TEXT,
    size: int = 600,
) -> Path:
    """Draw a square red official-seal image (角印) as a transparent PNG.

    ``columns`` are read right to left, each top to bottom, as on a real 公印. Glyphs are
    stretched to fill their column so that short columns fill the square like carved seal text.
    The real seal image of the prefecture replaces this file.
    """
    font_path = find_system_font("NotoSerifCJK-Bold.ttc")
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    border = round(size * 0.055)
    draw.rectangle(
        (border // 2, border // 2, size - 1 - border // 2, size - 1 - border // 2),
        outline=SEAL_RED,
        width=border,
    )
    inner_margin = border + round(size * 0.035)
    inner = size - 2 * inner_margin
    column_width = inner / len(columns)
    glyph_font = ImageFont.truetype(str(font_path), size=400, index=0)
    for column_index, text in enumerate(columns):
        left = inner_margin + inner - (column_index + 1) * column_width
        cell_height = inner / len(text)
        for row, char in enumerate(text):
            glyph = _render_glyph(char, glyph_font)
            target = (max(1, round(column_width * 0.94)), max(1, round(cell_height * 0.94)))
            glyph = glyph.resize(target, Image.Resampling.LANCZOS)
            x = round(left + (column_width - target[0]) / 2)
            y = round(inner_margin + row * cell_height + (cell_height - target[1]) / 2)
            solid = Image.new("RGBA", (target[0], target[1]), SEAL_RED)
            image.paste(solid, (x, y), glyph)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    atomic_write(destination, buffer.getvalue())
    return destination


def _render_glyph(char: str, font: ImageFont.FreeTypeFont) -> Image.Image:
    """Render one glyph as an alpha mask cropped to its ink."""
    left, top, right, bottom = (int(v) for v in font.getbbox(char))
    mask = Image.new("L", (right - left + 8, bottom - top + 8), 0)
    ImageDraw.Draw(mask).text((4 - left, 4 - top), char, font=font, fill=255)
    ink = mask.getbbox()
    return mask.crop(ink) if ink else mask

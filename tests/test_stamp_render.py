"""Look at the stamp the way a recipient does: render the page and inspect the pixels."""

from __future__ import annotations

import subprocess
from pathlib import Path

from PIL import Image, ImageChops

from keys import Role
from signer import Installation, Placement, SignatureLevel, SignOptions, sign_pdf

DPI = 144
SCALE = DPI / 72  # pixels per point


def _render(pdf: Path, page: int, out_prefix: Path) -> Image.Image:
    subprocess.run(
        ["pdftoppm", "-r", str(DPI), "-f", str(page), "-l", str(page), "-png", "-singlefile",
         str(pdf), str(out_prefix)],
        check=True,
    )
    with Image.open(f"{out_prefix}.png") as image:
        return image.convert("RGB")


def _sign_and_render(
    installation: Installation, source: bytes, tmp_path: Path, placement: Placement
) -> tuple[Image.Image, Image.Image, tuple[float, float, float, float], int]:
    context = installation.signing_context(Role.POSITION)
    result = sign_pdf(
        source, context, SignOptions(level=SignatureLevel.B_B, placement=placement)
    )
    assert result.data is not None and result.box is not None and result.page is not None
    (tmp_path / "orig.pdf").write_bytes(source)
    (tmp_path / "signed.pdf").write_bytes(result.data)
    before = _render(tmp_path / "orig.pdf", result.page, tmp_path / "before")
    after = _render(tmp_path / "signed.pdf", result.page, tmp_path / "after")
    return before, after, result.box, result.page


def _pixel_box(box: tuple[float, float, float, float], height: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (v * SCALE for v in box)
    return (int(x1), int(height - y2), int(x2 + 1), int(height - y1 + 1))


def test_stamp_inks_its_box_and_nothing_else(
    installation: Installation, permit_pdf: bytes, tmp_path: Path
) -> None:
    before, after, box, page = _sign_and_render(installation, permit_pdf, tmp_path, Placement())
    assert page == 2, "default placement is the last page"
    left, top, right, bottom = _pixel_box(box, after.height)
    # bottom right of the page, inside the margin
    assert right > after.width * 0.8 and bottom > after.height * 0.85

    # Outside the box (with a 2 px seam for anti-aliasing) the page is unchanged.
    diff = ImageChops.difference(before, after)
    outside = diff.copy()
    outside.paste((0, 0, 0), (left - 2, top - 2, right + 2, bottom + 2))
    assert outside.getbbox() is None, "the stamp changed pixels outside its box"

    stamp = after.crop((left, top, right, bottom))
    width, height = stamp.size
    seal_part = stamp.crop((0, 0, height, height))  # the seal is a square at the left
    text_part = stamp.crop((height + 8, 8, width - 8, height - 8))
    red = sum(1 for r, g, b in seal_part.get_flattened_data() if r > 150 and g < 90 and b < 90)
    dark = sum(1 for r, g, b in text_part.get_flattened_data() if r < 128 and g < 128 and b < 128)
    assert red > 0.15 * height * height, f"seal not visible ({red} red pixels)"
    # four lines of ~30 glyphs each: well over a thousand dark pixels at 144 dpi
    assert dark > 1500, f"stamp text not visible ({dark} dark pixels)"
    # Text stays inside its part of the box: the right-most column of pixels is blank.
    right_edge = stamp.crop((width - 8, 8, width - 4, height - 8))
    assert all(p == (255, 255, 255) for p in right_edge.get_flattened_data())


def test_explicit_page_and_box_in_mm(
    installation: Installation, permit_pdf: bytes, tmp_path: Path
) -> None:
    mm = 72 / 25.4
    box = (20 * mm, 20 * mm, 100 * mm, 45 * mm)
    before, after, got_box, page = _sign_and_render(
        installation, permit_pdf, tmp_path, Placement(page=1, box=box)
    )
    assert page == 1 and got_box == box
    left, top, right, bottom = _pixel_box(box, after.height)
    diff = ImageChops.difference(before, after).getbbox()
    assert diff is not None
    assert diff[0] >= left - 2 and diff[1] >= top - 2
    assert diff[2] <= right + 2 and diff[3] <= bottom + 2


def test_qr_code_on_stamp_decodes_to_verify_url(
    installation: Installation, one_page_permit: bytes, tmp_path: Path
) -> None:
    result = sign_pdf(
        one_page_permit,
        installation.signing_context(Role.POSITION),
        SignOptions(level=SignatureLevel.B_B, verify_base_url="https://koin.example.jp/"),
    )
    assert result.data is not None and result.box is not None
    assert result.box[2] - result.box[0] == 300  # the wider default box for seal + text + QR
    (tmp_path / "qr.pdf").write_bytes(result.data)
    _render(tmp_path / "qr.pdf", 1, tmp_path / "page")
    decoded = subprocess.run(
        ["zbarimg", "-q", "--raw", str(tmp_path / "page.png")], capture_output=True, text=True
    )
    assert decoded.stdout.strip() == f"https://koin.example.jp/verify/{result.document_id}"

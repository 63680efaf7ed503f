from __future__ import annotations

from pathlib import Path

from PIL import Image

from web.previews import page_images


def test_pages_rendered_once_and_cached(permit_pdf: bytes, tmp_path: Path) -> None:
    pdf = tmp_path / "contract.pdf"
    pdf.write_bytes(permit_pdf)
    images = page_images(pdf, tmp_path / "cache")
    assert [p.name for p in images] == ["page-1.png", "page-2.png"]
    with Image.open(images[0]) as image:
        assert 880 < image.width < 940  # A4 at 110 dpi
    first_mtime = images[0].stat().st_mtime_ns
    assert page_images(pdf, tmp_path / "cache")[0].stat().st_mtime_ns == first_mtime
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [images[0].parent.name]

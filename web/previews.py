"""Page images of a PDF for review on any device (phones have no reliable PDF viewer).

Rendered once with poppler's ``pdftoppm`` into a cache folder keyed by the file's SHA-256, so a
changed file can never be shown with stale images.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from keys import KoinError

__all__ = ["PreviewError", "page_images"]

DPI = 110  # A4 at 110 dpi is ~910 px wide: sharp on phones, small enough to load quickly
TIMEOUT = 120  # seconds for the whole document


class PreviewError(KoinError):
    """The PDF could not be rendered for review."""


def page_images(pdf: Path, cache_root: Path) -> list[Path]:
    """PNG files of every page of ``pdf``, rendered once and cached below ``cache_root``.

    :raises PreviewError: pdftoppm is missing or failed.
    """
    digest = hashlib.sha256(pdf.read_bytes()).hexdigest()
    folder = cache_root / digest
    if not folder.is_dir():
        _render(pdf, folder)
    return sorted(folder.glob("page-*.png"), key=lambda p: int(p.stem.split("-")[1]))


def _render(pdf: Path, folder: Path) -> None:
    if shutil.which("pdftoppm") is None:
        raise PreviewError(
            "PDF を画像にするための pdftoppm(poppler-utils)がありません。",
            "pdftoppm (poppler-utils) is not installed.",
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".render-"))
    try:
        subprocess.run(
            ["pdftoppm", "-r", str(DPI), "-png", str(pdf), str(staging / "page")],
            check=True, capture_output=True, timeout=TIMEOUT,
        )
        # pdftoppm pads numbers to the page count's width (page-01.png); normalise.
        for path in staging.glob("page-*.png"):
            path.rename(staging / f"page-{int(path.stem.split('-')[1])}.png")
        os.replace(staging, folder)  # atomic: readers see all pages or none
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise PreviewError(
            "PDF を画像にできませんでした。", f"The PDF could not be rendered: {exc}"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)

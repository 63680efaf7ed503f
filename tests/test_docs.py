"""The documentation: both languages build with ``mkdocs build --strict``, every image a page
shows was made by ``docs/screenshots.py`` (listed in its manifest), and the API reference is
the current OpenAPI document's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIGS = {"ja": "mkdocs.yml", "en": "mkdocs.en.yml"}
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)")


def _pages(language: str) -> list[Path]:
    return sorted((DOCS / language).rglob("*.md"))


@pytest.mark.parametrize("language", sorted(CONFIGS))
def test_mkdocs_builds_without_warnings(language: str, tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "-f", CONFIGS[language], "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    built = tmp_path / "site"
    for page in _pages(language):
        relative = page.relative_to(DOCS / language)
        target = relative.with_suffix("") / "index.html" if relative.stem != "index" else (
            relative.with_suffix(".html"))
        assert (built / target).is_file(), f"{relative} was not built"
    # nothing is loaded from elsewhere (no web fonts, no CDN)
    index = (built / "index.html").read_text("utf-8")
    assert "fonts.googleapis" not in index and "fonts.gstatic" not in index


def test_every_image_exists_and_was_made_by_the_script() -> None:
    manifest = json.loads((DOCS / "screenshots.json").read_text("utf-8"))
    assert manifest["generated_by"] == "docs/screenshots.py"
    listed = {entry["file"] for entry in manifest["screenshots"]}
    for entry in manifest["screenshots"]:
        assert entry["steps"] and entry["url"].startswith("/"), entry
        assert (DOCS / entry["file"]).is_file(), f"{entry['file']} is listed but missing"
    shown: set[str] = set()
    for language in CONFIGS:
        for page in _pages(language):
            for link in _IMAGE.findall(page.read_text("utf-8")):
                path = (page.parent / link).resolve()
                assert path.is_file(), f"{page.relative_to(ROOT)} shows the missing {link}"
                name = path.relative_to(DOCS).as_posix()
                assert name in listed, f"{name} (shown by {page.name}) is not in screenshots.json"
                shown.add(name)
    # both languages show the same pictures, and the script makes none that no page shows
    assert {n.split("/", 1)[1] for n in shown if n.startswith("ja/")} == {
        n.split("/", 1)[1] for n in shown if n.startswith("en/")
    }
    assert listed == shown, f"made but shown nowhere: {sorted(listed - shown)}"


def test_images_are_small_enough() -> None:
    from PIL import Image

    for path in sorted(DOCS.glob("*/img/*.png")):
        assert path.stat().st_size < 400_000, f"{path.name}: {path.stat().st_size} bytes"
        with Image.open(path) as image:
            assert image.width <= 1280, f"{path.name} is {image.width} px wide"


def test_both_languages_have_the_same_pages() -> None:
    names = {language: {p.relative_to(DOCS / language) for p in _pages(language)}
             for language in CONFIGS}
    assert names["ja"] == names["en"]


def test_the_api_reference_is_current() -> None:
    done = subprocess.run(
        [sys.executable, str(DOCS / "gen_api.py"), "--check"], cwd=ROOT, capture_output=True,
        text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    from web.api import openapi_document

    reference = (DOCS / "en" / "api.md").read_text("utf-8")
    for path in openapi_document()["paths"]:
        assert f"`{path}`" in reference


@pytest.mark.slow
def test_the_screenshot_script_makes_every_listed_image(tmp_path: Path) -> None:
    """``docs/screenshots.py`` still runs on a fresh demo instance (koin init, koin demo, koin
    serve, Chromium) and makes exactly the images the committed manifest lists."""
    if not Path("/usr/bin/chromium").exists():
        pytest.fail("Debian's chromium is not installed; run `bash .ci/setup`")
    done = subprocess.run(
        [sys.executable, str(DOCS / "screenshots.py"), "--out", str(tmp_path)], cwd=ROOT,
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    made = json.loads((tmp_path / "screenshots.json").read_text("utf-8"))
    committed = json.loads((DOCS / "screenshots.json").read_text("utf-8"))
    assert [e["file"] for e in made["screenshots"]] == [
        e["file"] for e in committed["screenshots"]
    ]
    for entry in made["screenshots"]:
        assert (tmp_path / entry["file"]).stat().st_size > 5000, entry

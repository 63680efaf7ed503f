"""The English catalogue covers every Japanese message in the templates and code, and the
committed .po/.mo are what `python -m web.translations.english` builds now."""

from __future__ import annotations

from web.translations.english import CATALOG, build


def test_committed_catalogue_is_complete_and_current() -> None:
    po, mo = build()  # raises KeyError naming any msgid without an English text
    assert (CATALOG / "messages.po").read_bytes() == po, "run python -m web.translations.english"
    assert (CATALOG / "messages.mo").read_bytes() == mo

"""Which language the ``koin`` command line speaks: Japanese by default, English with
``KOIN_LANG=en``. With English chosen, no Japanese may be left in the output except the data
the user gave (a template title, a key name …) or the demo data, which the checks strip first.
"""

from __future__ import annotations

import re

__all__ = ["assert_english", "assert_japanese", "japanese_in"]

#: Kana, kanji and Japanese punctuation and full-width forms (。、「」ー(): …).
_JAPANESE = re.compile(
    "[\u3000-\u303f\u3040-\u309f\u30a0-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\uff00-\uffef]"
)


def japanese_in(output: str, *user_data: str) -> str:
    """The Japanese characters left in ``output`` once every piece of ``user_data`` is taken
    out (longest first, so that one piece inside another is not left half)."""
    for data in sorted(user_data, key=len, reverse=True):
        output = output.replace(data, "")
    return "".join(_JAPANESE.findall(output))


def assert_english(output: str, *user_data: str) -> None:
    """``output`` holds no Japanese but ``user_data``, and does hold some text."""
    assert output.strip(), "no output"
    left = japanese_in(output, *user_data)
    assert not left, f"Japanese {left!r} in the English output:\n{output}"


def assert_japanese(output: str) -> None:
    """``output`` is in Japanese (holds kana or kanji of its own)."""
    assert japanese_in(output), f"no Japanese in the output:\n{output}"

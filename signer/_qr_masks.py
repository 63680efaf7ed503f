"""qrcode's choice of mask pattern, made fast with the same result (installed by
:mod:`signer._speedups`).

A stamp with a verification QR code spends most of its time in ``QRCode.best_mask_pattern``:
qrcode lays out the whole symbol eight times (once per mask, one Python call per module) and
scores each layout with pure-Python loops — about 8 ms per stamp, more than the signature.
The eight test layouts differ only in the data modules (qrcode's test layouts leave the format
information blank), so here the symbol is laid out once (by qrcode, with :func:`map_data`,
which knows the version's data modules), and each other mask is derived by flipping the data
modules where its mask differs from mask 0. The score is computed on rows and columns as byte
strings and integers, rule by rule exactly as ``qrcode.util.lost_point`` counts (runs of five
or more, 2×2 blocks, the 1:1:3:1:1 finder-like patterns with four light modules, the dark
share), and the first mask with the lowest score wins, as in qrcode. tests/test_speedups.py
compares both over many inputs.
"""

from __future__ import annotations

import re
from typing import Any

from qrcode import util as qr_util

__all__ = ["best_mask_pattern", "lost_point", "map_data"]

_RUNS = (re.compile(rb"00000+"), re.compile(rb"11111+"))  # two simple ones: 3× faster
# Neither pattern overlaps itself, so bytes.count finds every occurrence (the two may overlap
# each other, and are counted separately).
_FINDER_LIKE = (b"10111010000", b"00001011101")


# version -> the data modules in the order qrcode's map_data fills them (upwards and downwards
# in two-module columns from the right); mask bits of a (version, pattern) in that order.
_order_by_version: dict[int, list[tuple[int, int]]] = {}
_mask_bits: dict[tuple[int, int], int] = {}


def _placement_order(modules: list[list[Any]], size: int) -> list[tuple[int, int]]:
    order = []
    step, row = -1, size - 1
    for col in range(size - 1, 0, -2):
        if col <= 6:
            col -= 1  # the vertical timing pattern is skipped
        while True:
            for c in (col, col - 1):
                if modules[row][c] is None:
                    order.append((row, c))
            row += step
            if row < 0 or size <= row:
                row -= step
                step = -step
                break
    return order


def map_data(qr: Any, data: Any, mask_pattern: int) -> None:
    """qrcode's ``QRCode.map_data``: the data bits (then light modules) into the free modules,
    masked; the free modules' order and the mask are worked out once per version."""
    order = _order_by_version.get(qr.version)
    if order is None:
        order = _order_by_version[qr.version] = _placement_order(qr.modules, qr.modules_count)
    length = len(order)
    mask = _mask_bits.get((qr.version, mask_pattern))
    if mask is None:
        applies = qr_util.mask_func(mask_pattern)
        mask = int("".join("1" if applies(r, c) else "0" for r, c in order), 2)
        _mask_bits[(qr.version, mask_pattern)] = mask
    data_bits = 8 * len(data)
    value = int.from_bytes(bytes(data), "big") if data_bits else 0
    if data_bits > length:
        value >>= data_bits - length
    else:
        value <<= length - data_bits
    modules = qr.modules
    for (r, c), bit in zip(order, format(value ^ mask, f"0{length}b"), strict=True):
        modules[r][c] = bit == "1"


def _bits(line: bytes) -> int:
    return int(line, 2)


def lost_point(rows: list[bytes]) -> int:
    """qrcode's penalty score of a symbol given as rows of ``b"0"``/``b"1"``."""
    size = len(rows)
    columns = [bytes(column) for column in zip(*rows, strict=True)]
    # All rows and columns in one text, kept apart by a byte no pattern contains.
    text = b"2".join(rows + columns)
    # rule 1: each run of n ≥ 5 same-coloured modules costs n − 2
    runs = _RUNS[0].findall(text) + _RUNS[1].findall(text)
    score = sum(map(len, runs)) - 2 * len(runs)
    pair_mask = (1 << (size - 1)) - 1  # rule 2: 3 per 2×2 block of one colour
    values = [_bits(row) for row in rows]
    for upper, lower in zip(values, values[1:], strict=False):
        same_vertically = ~(upper ^ lower)
        same_across = ~(upper ^ (upper >> 1))
        uniform = same_vertically & (same_vertically >> 1) & same_across & pair_mask
        score += 3 * uniform.bit_count()
    score += 40 * sum(map(text.count, _FINDER_LIKE))  # rule 3: 1:1:3:1:1 beside 4 light

    dark = sum(row.count(b"1") for row in rows)  # rule 4: 10 per 5 % away from half dark
    percent = float(dark) / (size**2)
    return score + int(abs(percent * 100 - 50) / 5) * 10


# version -> per mask pattern 1..7, per row: the data modules where that mask differs from
# mask 0, as bits (leftmost module = highest bit). Which modules hold data depends only on
# the version.
_flips_by_version: dict[int, list[list[int]]] = {}


def _flips(version: int, size: int, data_cells: list[tuple[int, int]]) -> list[list[int]]:
    found = _flips_by_version.get(version)
    if found is None:
        first_mask = qr_util.mask_func(0)
        found = []
        for pattern in range(1, 8):
            mask = qr_util.mask_func(pattern)
            rows = [0] * size
            for r, c in data_cells:
                if mask(r, c) != first_mask(r, c):
                    rows[r] |= 1 << (size - 1 - c)
            found.append(rows)
        _flips_by_version[version] = found
    return found


def best_mask_pattern(qr: Any) -> int:
    """The mask pattern qrcode's ``QRCode.best_mask_pattern`` picks for ``qr`` (with
    :func:`map_data` installed as qrcode's, which notes the version's data modules)."""
    qr.makeImpl(True, 0)
    order = _order_by_version.get(qr.version)
    assert order is not None, "signer._qr_masks.map_data must be installed"
    size = len(qr.modules)
    base = [bytes(49 if value else 48 for value in row) for row in qr.modules]  # b"1", b"0"
    base_bits = [_bits(row) for row in base]
    layout_format = f"0{size}b"
    best, best_score = 0, lost_point(base)
    for pattern, flips in enumerate(_flips(qr.version, size, order), start=1):
        layout = [
            format(bits ^ flip, layout_format).encode() for bits, flip in zip(base_bits, flips,
                                                                               strict=True)
        ]
        score = lost_point(layout)
        if score < best_score:
            best, best_score = pattern, score
    return best

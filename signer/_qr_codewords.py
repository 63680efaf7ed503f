"""qrcode's codewords made fast with the same result (installed by :mod:`signer._speedups`).

After the mask choice (:mod:`signer._qr_masks`), a QR stamp's time went to two pure-Python
loops of qrcode: ``BitBuffer.put``, one method call per bit (about 1,400 a stamp, as
``QRCode.best_fit`` encodes the data once per version it tries), and the Reed–Solomon error
correction, where ``Polynomial.__mod__`` divides recursively with a new list per data byte.

- :func:`put` appends a value's bits a byte at a time, in the same layout (most significant
  bit first, the last byte filled from the left).
- :func:`render_command_stream` draws the symbol into the stamp with one rectangle per run of
  dark modules in a row (pyHanko draws one per module: about 580 for a verify URL).
- :func:`create_bytes` computes each block's error correction codewords as the remainder of a
  linear-feedback shift register over GF(256) kept in one integer: per data byte one table
  look-up (the generator polynomial times that byte, tabled once per codeword count), a shift
  and an XOR. It is the same remainder qrcode's polynomial division gives, interleaved the
  same way; tests/test_speedups.py compares both over many inputs.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pyhanko.pdf_utils.qr import PdfStreamQRImage
from qrcode import LUT
from qrcode import base as qr_base

_original_render_command_stream = PdfStreamQRImage.render_command_stream

__all__ = ["create_bytes", "put", "render_command_stream"]


def put(buffer: Any, num: int, length: int) -> None:
    """``BitBuffer.put``: the low ``length`` bits of ``num``, most significant first."""
    data = buffer.buffer
    position = buffer.length
    remaining = length
    num &= (1 << length) - 1
    while remaining:
        used = position & 7
        if used == 0:
            data.append(0)
        space = 8 - used
        take = space if space < remaining else remaining
        remaining -= take
        data[-1] |= ((num >> remaining) & ((1 << take) - 1)) << (space - take)
        position += take
    buffer.length = position


def _multiply(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return int(qr_base.EXP_TABLE[(qr_base.LOG_TABLE[a] + qr_base.LOG_TABLE[b]) % 255])


@cache
def _generator_rows(ec_count: int) -> tuple[int, ...]:
    """For each byte value f: the generator polynomial's coefficients after the leading 1,
    times f in GF(256), as one big-endian integer of ``ec_count`` bytes."""
    if ec_count in LUT.rsPoly_LUT:
        generator = list(LUT.rsPoly_LUT[ec_count])
    else:
        poly = qr_base.Polynomial([1], 0)
        for i in range(ec_count):
            poly = poly * qr_base.Polynomial([1, qr_base.gexp(i)], 0)
        generator = list(poly)
    assert len(generator) == ec_count + 1 and generator[0] == 1
    tail = generator[1:]
    return tuple(
        int.from_bytes(bytes(_multiply(factor, c) for c in tail), "big") for factor in range(256)
    )


def _remainder(data: list[int], ec_count: int) -> list[int]:
    rows = _generator_rows(ec_count)
    top = 8 * (ec_count - 1)
    mask = (1 << (8 * ec_count)) - 1
    state = 0
    for byte in data:
        state = ((state << 8) & mask) ^ rows[byte ^ (state >> top)]
    return list(state.to_bytes(ec_count, "big"))


def create_bytes(buffer: Any, rs_blocks: list[Any]) -> list[int]:
    """``qrcode.util.create_bytes``: the data codewords of each block, then their error
    correction codewords, interleaved block by block."""
    offset = 0
    data_blocks: list[list[int]] = []
    ec_blocks: list[list[int]] = []
    for block in rs_blocks:
        data_count = block.data_count
        ec_count = block.total_count - data_count
        data = [0xFF & value for value in buffer.buffer[offset:offset + data_count]]
        offset += data_count
        data_blocks.append(data)
        ec_blocks.append(_remainder(data, ec_count))
    codewords: list[int] = []
    for blocks in (data_blocks, ec_blocks):
        longest = max(len(b) for b in blocks)
        for i in range(longest):
            codewords.extend(b[i] for b in blocks if i < len(b))
    return codewords


def render_command_stream(image: Any) -> bytes:
    """pyHanko's ``PdfStreamQRImage.render_command_stream`` with each horizontal run of dark
    modules as one rectangle (``x y w 1 re``) instead of one per module: the same area filled
    (no hairline seams between neighbours either), a third of the rectangles, and a shorter
    stream to compress. Subclasses that draw modules their own way (pyHanko's fancy QR) keep
    pyHanko's rendering."""
    if type(image).append_single_rect is not PdfStreamQRImage.append_single_rect:
        return bytes(_original_render_command_stream(image))
    commands = [image.setup_drawing_area()]
    run_row = run_col = -1
    run_length = 0
    for row, col in sorted(image._img):
        if row == run_row and col == run_col + run_length:
            run_length += 1
            continue
        if run_length:
            commands.append(b"%d %d %d 1 re" % (run_col, run_row, run_length))
        run_row, run_col, run_length = row, col, 1
    if run_length:
        commands.append(b"%d %d %d 1 re" % (run_col, run_row, run_length))
    commands.append(b"f")
    return b"\n".join(commands)

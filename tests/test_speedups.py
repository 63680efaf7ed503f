"""The faster hex-string reader and name comparison decide exactly as the originals do."""

from __future__ import annotations

import io
import random

import pytest
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.misc import PdfStreamError

from signer import _speedups

CASES = [
    b"<48656C6C6F>", b"<48 65\n6C\t6C\r6F\x00>", b"<4865 6C6C 6>", b"<>", b"< >",
    b"<48656C%comment\n6C6F>", b"<4865XY>", b"<48656C", b"<", b"<ABCDEF0123456789abcdef> tail",
    b"<" + b"0" * 70000 + b">", b"<" + b"a1" * 40000 + b"  >rest",
]


def _read(reader: object, data: bytes) -> tuple[object, int]:
    stream = io.BytesIO(data)
    try:
        value = reader(stream)  # type: ignore[operator]
    except PdfStreamError as exc:
        return ("error", str(exc)), stream.tell()
    return (type(value).__name__, bytes(value) if isinstance(value, bytes) else value), \
        stream.tell()


@pytest.mark.parametrize("data", CASES, ids=range(len(CASES)))
def test_hex_reader_matches_pyhanko(data: bytes) -> None:
    original = _speedups._original_hex_reader
    assert _read(_speedups._read_hex_string, data) == _read(original, data)


def test_hex_reader_on_random_input() -> None:
    rng = random.Random(7)
    alphabet = b"0123456789abcdefABCDEF \n\r\t\f\x00>%Zz<"
    for _ in range(2000):
        body = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        data = b"<" + body
        assert _read(_speedups._read_hex_string, data) == _read(
            _speedups._original_hex_reader, data
        ), data
    assert generic.read_hex_string_from_stream is _speedups._read_hex_string  # installed


def _name(**attributes: str) -> asn1_x509.Name:
    return asn1_x509.Name.build(attributes)


def test_names_compare_as_rfc_5280_says() -> None:
    original = _speedups._original_name_eq
    a = _name(country_name="JP", organization_name="Ibaraki Prefecture", common_name="Governor")
    same = asn1_x509.Name.load(a.dump())
    spaced = _name(country_name="JP", organization_name="ibaraki   PREFECTURE",
                   common_name="governor")
    other = _name(country_name="JP", organization_name="Ibaraki Prefecture", common_name="CA")
    fewer = _name(country_name="JP", organization_name="Ibaraki Prefecture")
    for left, right in [(a, same), (a, spaced), (a, other), (a, fewer), (spaced, other)]:
        assert (left == right) is original(left, right)
        assert (left == right) is (left.hashable == right.hashable)
    assert a == spaced and a != other and a != fewer
    assert a != "CN=Governor"
    # a name inside a context tag (as in GeneralName) still compares by content
    general = asn1_x509.GeneralName(name="directory_name", value=a)
    assert general.chosen == a and original(general.chosen, a)

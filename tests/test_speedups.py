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


def _names_in_many_shapes() -> list[asn1_x509.Name]:
    built = _name(country_name="JP", organization_name="茨城県", common_name="茨城県知事")
    loaded = asn1_x509.Name.load(built.dump())
    looked_into = asn1_x509.Name.load(built.dump())
    _ = looked_into.native, looked_into.hashable  # parsed before it is retagged
    changed = asn1_x509.Name.load(built.dump())
    changed.chosen[0][0]["value"] = asn1_x509.DirectoryString(
        name="utf8_string", value="千葉県")  # mutated in place: its DER is stale
    return [built, loaded, looked_into, changed]


@pytest.mark.parametrize("tagging", [{"explicit": 4}, {"explicit": (2, 1)}, "explicit"])
def test_retagged_names_equal_asn1crypto_retag(tagging: object) -> None:
    assert asn1_x509.Name.retag is _speedups._name_retag  # installed
    tag = 4 if isinstance(tagging, str) else None
    for name in _names_in_many_shapes():
        fast = _speedups._name_retag(name, tagging, tag)
        slow = _speedups._original_name_retag(name, tagging, tag)
        assert fast.dump() == slow.dump()
        assert fast.native == slow.native == name.native
        assert fast.explicit == slow.explicit and fast.implicit == slow.implicit
        assert fast.chosen.dump() == name.chosen.dump()
        assert fast is not name and fast.chosen is not name.chosen  # an independent copy


def test_implicit_tagging_of_a_name_is_refused_alike() -> None:
    for retag in (_speedups._name_retag, _speedups._original_name_retag):
        with pytest.raises(ValueError, match="can not be implicitly tagged"):
            retag(asn1_x509.Name.load(_name(common_name="x").dump()), {"implicit": 4})


def test_general_name_of_a_certificate_issuer_is_unchanged() -> None:
    name = asn1_x509.Name.load(
        _name(country_name="JP", common_name="Koin Demo Root CA").dump())
    general = asn1_x509.GeneralName(name="directory_name", value=name)
    assert general.dump() == asn1_x509.GeneralName.load(general.dump()).dump()
    assert general.chosen == name and general.dump()[:1] == b"\xa4"

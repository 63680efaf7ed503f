"""The faster hex-string reader and name comparison decide exactly as the originals do."""

from __future__ import annotations

import io
import random
import re
import string

import pytest
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.misc import PdfStreamError

from signer import Installation, _speedups, new_document_id

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


def _qr_inputs() -> list[tuple[str, int]]:
    import qrcode

    rng = random.Random(11)
    levels = [qrcode.constants.ERROR_CORRECT_L, qrcode.constants.ERROR_CORRECT_M,
              qrcode.constants.ERROR_CORRECT_Q, qrcode.constants.ERROR_CORRECT_H]
    alphabet = string.ascii_letters + string.digits + "/:.-?=&"
    inputs = [(f"https://sign.pref.ibaraki.example/verify/{new_document_id()}", level)
              for level in levels]
    for length in [1, 7, 25, 60, 61, 120, 200, 400, 900]:  # versions 1 to 20 (≥ 7: version bits)
        for _ in range(6):
            data = "".join(rng.choice(alphabet) for _ in range(length))
            inputs.append((data, rng.choice(levels)))
    inputs.append(("茨城県知事 電子署名", qrcode.constants.ERROR_CORRECT_M))
    return inputs


def test_qr_mask_choice_and_scores_equal_qrcode() -> None:
    import qrcode
    from qrcode import util as qr_util

    from signer import _qr_masks

    assert qrcode.main.QRCode.best_mask_pattern is _qr_masks.best_mask_pattern  # installed
    versions = set()
    for data, level in _qr_inputs():
        qr = qrcode.QRCode(error_correction=level)
        qr.add_data(data)
        qr.best_fit(start=None)
        versions.add(qr.version)
        for pattern in range(8):  # the score of every test layout, not only the winner's
            qr.makeImpl(True, pattern)
            rows = [bytes(49 if module else 48 for module in row) for row in qr.modules]
            assert _qr_masks.lost_point(rows) == qr_util.lost_point(qr.modules), (data, pattern)
        assert _qr_masks.best_mask_pattern(qr) == _speedups._original_best_mask_pattern(qr), data
    assert min(versions) == 1 and max(versions) >= 7


def test_qr_symbols_are_identical_to_qrcode_s() -> None:
    import qrcode

    for data, level in _qr_inputs()[:12]:
        fast = qrcode.QRCode(error_correction=level)
        fast.add_data(data)
        fast.make()
        slow = qrcode.QRCode(error_correction=level)
        slow.add_data(data)
        slow.make(fit=True)
        slow.makeImpl(False, _speedups._original_best_mask_pattern(slow))
        assert fast.get_matrix() == slow.get_matrix(), data


def test_qr_data_layout_equals_qrcode_s_for_every_mask() -> None:
    import qrcode

    from signer import _qr_masks

    assert qrcode.main.QRCode.map_data is _qr_masks.map_data  # installed
    for data, level in _qr_inputs():
        qr = qrcode.QRCode(error_correction=level)
        qr.add_data(data)
        qr.best_fit(start=None)
        for test, pattern in [(True, p) for p in range(8)] + [(False, 3)]:
            qr.map_data = lambda d, m, q=qr: _speedups._original_map_data(q, d, m)
            qr.makeImpl(test, pattern)
            expected = [list(row) for row in qr.modules]
            del qr.map_data
            qr.makeImpl(test, pattern)
            assert qr.modules == expected, (data, test, pattern)


def test_qr_codewords_are_qrcode_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bits and error correction codewords of every input, every version it fits and every
    level, with koin's BitBuffer.put and create_bytes against qrcode's own."""
    import qrcode
    from qrcode import util as qr_util

    from signer import _qr_codewords

    assert qr_util.BitBuffer.put is _qr_codewords.put  # installed
    assert qr_util.create_bytes is _qr_codewords.create_bytes
    compared = set()
    for data, _level in _qr_inputs():
        for level in range(4):
            fitted = qrcode.QRCode(error_correction=level)
            fitted.add_data(data)
            fitted.best_fit(start=None)
            for version in range(fitted.version, min(fitted.version + 3, 41)):
                fast = qr_util.create_data(version, level, fitted.data_list)
                with monkeypatch.context() as original:
                    original.setattr(qr_util.BitBuffer, "put", _speedups._original_bit_buffer_put)
                    original.setattr(qr_util, "create_bytes", _speedups._original_create_bytes)
                    slow = qr_util.create_data(version, level, fitted.data_list)
                assert fast == slow, (data, version, level)
                compared.add((version, level))
    # odd lengths of put, and values wider than their length (qrcode keeps the low bits)
    for value, length in [(0b1011, 4), (0x1FF, 9), (0xABCDE, 13), (5, 1), (0, 7), (2**40, 3)]:
        fast_buffer, slow_buffer = qr_util.BitBuffer(), qr_util.BitBuffer()
        for buffer, put in [(fast_buffer, _qr_codewords.put),
                            (slow_buffer, _speedups._original_bit_buffer_put)]:
            put(buffer, 0b101, 3)
            put(buffer, value, length)
        assert (fast_buffer.buffer, len(fast_buffer)) == (slow_buffer.buffer, len(slow_buffer))
    assert len(compared) > 60 and max(v for v, _ in compared) >= 20


def _filled_cells(stream: bytes) -> set[tuple[int, int]]:
    cells = set()
    for x, y, width, height in re.findall(rb"(\d+) (\d+) (\d+) (\d+) re", stream):
        for dx in range(int(width)):
            for dy in range(int(height)):
                cells.add((int(x) + dx, int(y) + dy))
    return cells


def test_qr_image_fills_the_same_modules_as_pyhanko_s() -> None:
    """One rectangle per run of dark modules: the same cells as pyHanko's one per module, the
    same drawing set-up, fewer rectangles; pyHanko's fancy QR keeps its own drawing."""
    import qrcode
    from pyhanko.pdf_utils.qr import PdfFancyQRImage, PdfStreamQRImage

    from signer import _qr_codewords

    assert PdfStreamQRImage.render_command_stream is _qr_codewords.render_command_stream
    for data, level in _qr_inputs():
        qr = qrcode.QRCode(error_correction=level)
        qr.add_data(data)
        qr.make()
        image = qr.make_image(image_factory=PdfStreamQRImage)
        fast = image.render_command_stream()
        slow = _qr_codewords._original_render_command_stream(image)
        assert fast.split(b"\n")[:2] == slow.split(b"\n")[:2] and fast.endswith(b"\nf")
        assert _filled_cells(fast) == _filled_cells(slow) != set(), data
        assert fast.count(b" re") < slow.count(b" re") * 0.6
        fancy = qr.make_image(image_factory=PdfFancyQRImage, version=qr.version)
        # its modules (rounded squares) come from pyHanko's drawing, before its own patterns
        assert fancy.render_command_stream().startswith(
            _qr_codewords._original_render_command_stream(fancy) + b"\n")


def test_certificates_of_a_signature_are_pyhanko_s(
    installation: Installation, permit_pdf: bytes
) -> None:
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import generic_cms

    from signer import SignatureLevel, SignOptions, sign_pdf

    assert generic_cms.extract_certificate_info is _speedups._extract_certificate_info
    context = installation.signing_context()
    signed = sign_pdf(permit_pdf, context, SignOptions(level=SignatureLevel.B_LTA)).data
    assert signed is not None
    reader = PdfFileReader(io.BytesIO(signed))
    seen = 0
    for embedded in reader.embedded_signatures:
        signed_datas = [embedded.signed_data]
        token = embedded.signer_info["unsigned_attrs"] if embedded.signer_info[
            "unsigned_attrs"].native else None
        if token is not None:
            for attribute in token:
                if attribute["type"].native == "signature_time_stamp_token":
                    signed_datas.append(attribute["values"][0]["content"])
        for signed_data in signed_datas:
            fast = _speedups._extract_certificate_info(signed_data)
            slow = _speedups._original_extract_certificate_info(signed_data)
            assert fast.signer_cert.dump() == slow.signer_cert.dump()
            assert [c.dump() for c in fast.other_certs] == [c.dump() for c in slow.other_certs]
            assert fast.attribute_certs == slow.attribute_certs == []
            again = _speedups._extract_certificate_info(signed_data)
            assert again.signer_cert is fast.signer_cert  # parsed once, then taken as it is
            seen += 1
    assert seen >= 3  # signature, its timestamp token, the document timestamp

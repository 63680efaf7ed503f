"""Two hot spots of verification in the libraries under pyHanko, made fast without changing
what they decide (installed once, when :mod:`signer` is imported).

* **Hex strings** (``pyhanko.pdf_utils.generic.read_hex_string_from_stream``): a signature's
  ``/Contents`` is a hex string of ~20,000 digits, which pyHanko reads one byte and one
  generator step at a time (about 15 ms per signature). The fast reader takes the bytes up to
  the closing ``>`` in one read and decodes them with :func:`binascii.unhexlify` when they are
  only hex digits and PDF whitespace; anything else (a comment, a stray character, the end of
  the file) is handed to pyHanko's own reader from the same position, so errors and edge
  cases are exactly pyHanko's.
* **Names** (``asn1crypto.x509.Name``): path building compares issuer and subject names and
  files certificates under ``Name.hashable``, each time normalising every attribute (RFC 5280
  §7.1 string preparation). Both depend on the DER alone, so the normalised form of each
  name (per RDN: its number of attributes and asn1crypto's own normalised text, which is what
  asn1crypto compares) is computed once per distinct DER and remembered for the last few
  thousand names; identical encodings are equal at once.
* **Retagged names** (``Name.retag``): revocation checking wraps the CRL issuer's name in a
  ``GeneralName`` (explicitly tagged ``[4]``) for every certificate and CRL, and asn1crypto
  retags by deep-copying the whole parsed name tree (about a third of the CRL checks). A name
  read from DER and not changed since is retagged from its encoding instead; the copy parses
  it again when (if ever) it is looked into. Anything else goes to asn1crypto's own retag.
* **Certificates of a signature** (``pyhanko.sign.general.extract_certificate_info``): the
  same few certificates (the position's, the TSA's, our CAs') arrive in every signature, and
  each time asn1crypto parses their fields again, field by field, as path validation looks
  into them (about a sixth of a verification). Certificates are taken from a small
  per-thread table keyed by their exact DER, so a certificate seen before comes already
  parsed; equal bytes are the same certificate, and no one changes a parsed certificate.
  Large ones (over 16 KiB) are not kept.
* **QR masks** (``qrcode.QRCode.best_mask_pattern``): a stamp with a verification QR code
  spent more time choosing the QR code's mask than signing; :mod:`signer._qr_masks` picks the
  same mask several times faster, and lays out the data modules from a placement order
  worked out once per version.
* **QR codewords** (``qrcode.util.BitBuffer.put``, ``qrcode.util.create_bytes``): a call per
  bit and a recursive polynomial division took half of what was left of a QR code's time;
  :mod:`signer._qr_codewords` writes whole bytes and divides with a table per codeword count.
"""

from __future__ import annotations

import binascii
import re
import threading
from typing import Any

from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.qr import PdfStreamQRImage
from pyhanko.sign import general as sign_general
from qrcode import main as qr_main
from qrcode import util as qr_util

from . import _qr_codewords, _qr_masks

__all__ = ["install"]

_HEX_OR_SPACE = re.compile(rb"[0-9A-Fa-f \n\r\t\f\x00]*")
_SPACE = b" \n\r\t\f\x00"
_CHUNK = 1 << 16
_installed = False
_original_hex_reader = generic.read_hex_string_from_stream
_original_name_eq = asn1_x509.Name.__eq__
_original_name_hashable = asn1_x509.Name.hashable
_original_name_retag = asn1_x509.Name.retag
_original_best_mask_pattern = qr_main.QRCode.best_mask_pattern
_original_map_data = qr_main.QRCode.map_data
_original_bit_buffer_put = qr_util.BitBuffer.put
_original_create_bytes = qr_util.create_bytes
_original_extract_certificate_info = sign_general.extract_certificate_info


def _read_hex_string(stream: Any) -> Any:
    start = stream.tell()
    stream.read(1)  # "<"
    pieces: list[bytes] = []
    while True:
        chunk = stream.read(_CHUNK)
        if not chunk:  # no ">" before the end: pyHanko says how it is broken
            stream.seek(start)
            return _original_hex_reader(stream)
        end = chunk.find(b">")
        if end >= 0:
            pieces.append(chunk[:end])
            break
        pieces.append(chunk)
    body = b"".join(pieces)
    if not _HEX_OR_SPACE.fullmatch(body):  # a comment or a bad character
        stream.seek(start)
        return _original_hex_reader(stream)
    stream.seek(start + 1 + len(body) + 1)
    digits = body.translate(None, _SPACE)
    if len(digits) % 2:
        digits += b"0"
    return generic.pdf_string(binascii.unhexlify(digits))


_MAX_REMEMBERED = 4096
_normalised_by_der: dict[bytes, tuple[tuple[int, str], ...]] = {}
_hashable_by_der: dict[bytes, str] = {}


def _remember(table: dict[bytes, Any], der: bytes, value: Any) -> None:
    if len(table) >= _MAX_REMEMBERED:
        table.clear()  # a rare full reset is cheaper than bookkeeping an LRU order
    table[der] = value


def _normalised(name: asn1_x509.Name) -> tuple[tuple[int, str], ...]:
    """Per RDN of ``name``: (number of attributes, normalised attributes) — equal tuples
    exactly when asn1crypto's RFC 5280 comparison says two names are equal. Computed from the
    object (its DER may carry a context tag), remembered by its DER."""
    der = name.dump()
    found = _normalised_by_der.get(der)
    if found is None:
        found = tuple((len(rdn), rdn.hashable) for rdn in name.chosen)
        _remember(_normalised_by_der, der, found)
    return found


def _name_eq(self: asn1_x509.Name, other: object) -> bool:
    if not isinstance(other, asn1_x509.Name):
        return False
    return self.dump() == other.dump() or _normalised(self) == _normalised(other)


def _name_hashable(self: asn1_x509.Name) -> str:
    der = self.dump()
    found = _hashable_by_der.get(der)
    if found is None:
        found = _original_name_hashable.fget(self)
        assert isinstance(found, str)
        _remember(_hashable_by_der, der, found)
    return found


def _name_retag(self: asn1_x509.Name, tagging: Any, tag: Any = None) -> asn1_x509.Name:
    encoded = self._contents
    parsed = self._parsed
    if encoded is None or (parsed is not None and parsed._is_mutated()):
        return _original_name_retag(self, tagging, tag)
    if not isinstance(tagging, dict):
        tagging = {tagging: tag}
    retagged = self.__class__(explicit=tagging.get("explicit"), implicit=tagging.get("implicit"))
    retagged._contents = encoded
    retagged._choice = self._choice
    retagged._name = self._name
    return retagged


_MAX_KEPT_CERTIFICATE = 16 * 1024
_parsed_certificates = threading.local()


def _certificate(der: bytes) -> asn1_x509.Certificate:
    if len(der) > _MAX_KEPT_CERTIFICATE:
        return asn1_x509.Certificate.load(der)
    table: dict[bytes, asn1_x509.Certificate] | None = getattr(
        _parsed_certificates, "table", None
    )
    if table is None:
        table = _parsed_certificates.table = {}
    found = table.get(der)
    if found is None:
        found = asn1_x509.Certificate.load(der)
        _remember(table, der, found)
    return found


def _extract_certificate_info(signed_data: Any) -> Any:
    """pyHanko's ``extract_certificate_info``, with certificates from :func:`_certificate`."""
    certs = []
    attribute_certs = []
    for choice in signed_data["certificates"]:
        if choice.name == "certificate":
            certs.append(_certificate(choice.chosen.dump()))
        elif choice.name == "v2_attr_cert":
            attribute_certs.append(choice.chosen.untag())
    signer_info = sign_general.extract_signer_info(signed_data)
    signer_cert, other_certs = sign_general._partition_certs(certs, signer_info)
    return sign_general.SignedDataCerts(
        signer_cert=signer_cert, other_certs=other_certs, attribute_certs=attribute_certs
    )


def install() -> None:
    """Install them (idempotent)."""
    global _installed
    if _installed:
        return
    generic.read_hex_string_from_stream = _read_hex_string
    asn1_x509.Name.__eq__ = _name_eq
    asn1_x509.Name.hashable = property(_name_hashable)
    asn1_x509.Name.retag = _name_retag
    qr_main.QRCode.best_mask_pattern = _qr_masks.best_mask_pattern
    qr_main.QRCode.map_data = _qr_masks.map_data
    qr_util.BitBuffer.put = _qr_codewords.put
    qr_util.create_bytes = _qr_codewords.create_bytes
    PdfStreamQRImage.render_command_stream = (  # type: ignore[method-assign]
        _qr_codewords.render_command_stream
    )
    # pyHanko's validation modules import the function by name: replace it there too.
    from pyhanko.sign.validation import ades, dss, generic_cms

    for module in (sign_general, generic_cms, dss, ades):
        module.extract_certificate_info = _extract_certificate_info  # type: ignore[attr-defined]
    _installed = True

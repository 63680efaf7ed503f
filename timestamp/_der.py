"""Just enough DER to splice pre-encoded parts: lengths and tag-length-value headers.

The fast paths (time-stamp tokens here, CMS signatures in ``signer``) build their structures
once with asn1crypto, keep the encoded parts that never change, and join them with the few
parts that do (a digest, a signature, a serial number, a time) with these helpers. Tests
compare the result with asn1crypto's own encoding byte for byte.
"""

from __future__ import annotations

__all__ = ["der_integer", "der_length", "tlv"]


def der_length(length: int) -> bytes:
    """The DER length octets of ``length`` (short form below 128, long form above)."""
    if length < 0x80:
        return bytes((length,))
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, *parts: bytes) -> bytes:
    """One DER element: a single-octet ``tag``, the length, then ``parts`` joined."""
    content = b"".join(parts)
    return bytes((tag,)) + der_length(len(content)) + content


def der_integer(value: int) -> bytes:
    """An INTEGER in minimal two's-complement form."""
    length = max(1, (value.bit_length() + 8) // 8)  # room for the sign bit
    return tlv(0x02, value.to_bytes(length, "big", signed=True))

"""RFC 3161 structures that asn1crypto lacks or declares too strictly."""

from __future__ import annotations

from typing import Any

from asn1crypto import cms, core, tsp
from asn1crypto import x509 as asn1_x509

__all__ = [
    "IMPRINT_DIGEST_SIZES",
    "TimeStampResp",
    "has_critical_time_stamping_eku",
    "is_void",
    "rejection",
]

#: Message-imprint hash algorithms a koin TSA accepts, with their digest size in bytes.
IMPRINT_DIGEST_SIZES: dict[str, int] = {"sha256": 32, "sha384": 48, "sha512": 64}


class TimeStampResp(tsp.TimeStampResp):  # type: ignore[misc]  # asn1crypto is untyped
    """``TimeStampResp`` with ``timeStampToken`` OPTIONAL, as RFC 3161 §2.4.2 defines it.

    asn1crypto declares the token mandatory, so its class can neither build nor parse a
    rejection (a response without a token).
    """

    _fields = [
        ("status", tsp.PKIStatusInfo),
        ("time_stamp_token", cms.ContentInfo, {"optional": True}),
    ]


def rejection(fail_info: str, text: str) -> Any:
    """A ``TimeStampResp`` with status *rejection*, one failInfo bit and a statusString.

    :param fail_info: an asn1crypto ``PKIFailureInfo`` bit name, e.g. ``"bad_alg"``.
    """
    return TimeStampResp(
        {
            "status": tsp.PKIStatusInfo(
                {
                    "status": "rejection",
                    "status_string": [text],
                    "fail_info": tsp.PKIFailureInfo({fail_info}),
                }
            )
        }
    )


def has_critical_time_stamping_eku(certificate: asn1_x509.Certificate) -> bool:
    """True if ``certificate`` has exactly the id-kp-timeStamping EKU, marked critical.

    RFC 3161 §2.3: the TSA certificate "MUST contain only one instance of the extended key usage
    field extension … with KeyPurposeID having value id-kp-timeStamping. This extension MUST be
    critical."
    """
    eku = certificate.extended_key_usage_value
    if eku is None or "extended_key_usage" not in certificate.critical_extensions:
        return False
    purposes = eku.native
    return isinstance(purposes, list) and purposes == ["time_stamping"]


def is_void(value: Any) -> bool:
    """True for an absent OPTIONAL field."""
    return isinstance(value, core.Void)

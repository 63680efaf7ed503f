"""Raw pyHanko validation timed in a process of its own (``python -m bench._raw_verify``).

koin installs faster hex-string and name-comparison routines into pyHanko and asn1crypto when
``signer`` is imported (:mod:`signer._speedups`); stock pyHanko must be measured where they
are not installed, so this module imports neither ``signer`` nor anything of koin.

Usage: ``python -m bench._raw_verify SIGNED.pdf TRUST_DIR COUNT`` where TRUST_DIR holds
``roots.pem``, ``others.pem`` and ``*.crl`` (DER); prints ``{"verdict": …, "median_ms": …}``.
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import time
from pathlib import Path

from asn1crypto import crl as asn1_crl
from asn1crypto import pem
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation import validate_pdf_signature
from pyhanko_certvalidator import ValidationContext


def _certificates(path: Path) -> list[asn1_x509.Certificate]:
    return [asn1_x509.Certificate.load(der) for _, _, der in pem.unarmor(path.read_bytes(),
                                                                          multiple=True)]


def main() -> None:
    signed_path, trust, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    signed = signed_path.read_bytes()
    roots = _certificates(trust / "roots.pem")
    others = _certificates(trust / "others.pem") if (trust / "others.pem").exists() else []
    crls = [asn1_crl.CertificateList.load(p.read_bytes()) for p in sorted(trust.glob("*.crl"))]

    def validate() -> bool:
        reader = PdfFileReader(io.BytesIO(signed))
        context = ValidationContext(
            trust_roots=roots, other_certs=others, crls=crls, allow_fetching=False,
            revocation_mode="hard-fail",
        )
        return bool(validate_pdf_signature(reader.embedded_signatures[0], context).bottom_line)

    verdict = validate()
    times = []
    for _ in range(count):
        start = time.perf_counter()
        validate()
        times.append((time.perf_counter() - start) * 1000)
    print(json.dumps({"verdict": verdict, "median_ms": statistics.median(times)}))


if __name__ == "__main__":
    main()

"""Independent validators run for real: poppler's pdfsig (NSS), openssl cms / ts, pyHanko."""

from __future__ import annotations

import io
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from asn1crypto import cms
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation import validate_pdf_signature
from pyhanko.sign.validation.dss import DocumentSecurityStore
from pyhanko.sign.validation.status import PdfSignatureStatus
from pyhanko_certvalidator import ValidationContext


def make_nss_db(directory: Path, root_pem: Path) -> Path:
    """An NSS database trusting only our root, as a recipient would set up."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{directory}", "--empty-password"], check=True)
    subprocess.run(
        ["certutil", "-A", "-d", f"sql:{directory}", "-n", "koin-root", "-t", "CT,C,C",
         "-i", str(root_pem)],
        check=True,
    )
    return directory


def pdfsig(pdf: Path, nss_db: Path) -> str:
    result = subprocess.run(
        ["pdfsig", "-nssdir", f"sql:{nss_db}", str(pdf)], capture_output=True, text=True
    )
    return result.stdout + result.stderr


def pdfsig_signatures(output: str) -> list[str]:
    """Split pdfsig output into one block per signature."""
    return re.split(r"^Signature #\d+:", output, flags=re.M)[1:]


@dataclass
class ExtractedSignature:
    signed_data: bytes  # the bytes covered by /ByteRange
    cms_der: bytes
    signature_value: bytes  # SignerInfo.signature, what the signature timestamp covers
    timestamp_token_der: bytes | None


def extract_signatures(pdf_bytes: bytes) -> list[ExtractedSignature]:
    reader = PdfFileReader(io.BytesIO(pdf_bytes))
    result = []
    for embedded in reader.embedded_regular_signatures:
        byte_range = [int(v) for v in embedded.sig_object["/ByteRange"]]
        covered = b"".join(
            pdf_bytes[byte_range[i] : byte_range[i] + byte_range[i + 1]]
            for i in range(0, len(byte_range), 2)
        )
        # /Contents is zero-padded; re-encode just the CMS ContentInfo for openssl.
        content_info = cms.ContentInfo.load(embedded.pkcs7_content)
        signer_info = embedded.signer_info
        token = None
        unsigned = signer_info["unsigned_attrs"]
        if unsigned.native is not None:
            for attribute in unsigned:
                if attribute["type"].native == "signature_time_stamp_token":
                    token = attribute["values"][0].dump()
        result.append(
            ExtractedSignature(
                covered,
                content_info.dump(),
                signer_info["signature"].native,
                token,
            )
        )
    return result


def openssl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=cwd)


def pyhanko_status(
    pdf_bytes: bytes, root: asn1_x509.Certificate, index: int = 0
) -> PdfSignatureStatus:
    """Validate signature ``index`` with our root as the only trust anchor, no network."""
    reader = PdfFileReader(io.BytesIO(pdf_bytes))
    context = ValidationContext(
        trust_roots=[root], allow_fetching=False, revocation_mode="soft-fail"
    )
    return validate_pdf_signature(reader.embedded_regular_signatures[index], context)


def pyhanko_status_offline_ltv(
    pdf_bytes: bytes, root: asn1_x509.Certificate, index: int = 0
) -> PdfSignatureStatus:
    """Validate from the DSS alone with revocation checks required: proves B-LT completeness."""
    reader = PdfFileReader(io.BytesIO(pdf_bytes))
    dss = DocumentSecurityStore.read_dss(reader)
    context = dss.as_validation_context(
        {"trust_roots": [root], "allow_fetching": False, "revocation_mode": "hard-fail"}
    )
    return validate_pdf_signature(reader.embedded_regular_signatures[index], context)

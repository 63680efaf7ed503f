"""Signed outputs checked by independent validators: pdfsig (NSS), openssl cms/ts, pyHanko."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils.reader import PdfFileReader

from keys import Role
from signer import (
    Installation,
    Placement,
    SignatureLevel,
    SigningError,
    SignOptions,
    sign_pdf,
)
from tests.validators import (
    extract_signatures,
    openssl,
    pdfsig,
    pdfsig_signatures,
    pyhanko_status,
    pyhanko_status_offline_ltv,
)

GOVERNOR = "Governor of Ibaraki Prefecture"


def _sign(
    installation: Installation, data: bytes, **options: object
) -> bytes:
    context = installation.signing_context(Role.POSITION)
    result = sign_pdf(data, context, SignOptions(**options))  # type: ignore[arg-type]
    assert result.data is not None
    return result.data


@pytest.fixture(scope="module")
def signed_bt(installation: Installation, permit_pdf: bytes) -> bytes:
    return _sign(installation, permit_pdf)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_pdfsig_reports_valid_and_trusted(
    signed_bt: bytes, nss_db: Path, tmp_path: Path
) -> None:
    output = pdfsig(_write(tmp_path, "signed.pdf", signed_bt), nss_db)
    [block] = pdfsig_signatures(output)
    assert "Signature is Valid." in block
    assert "Certificate is Trusted." in block
    assert f"Signer Certificate Common Name: {GOVERNOR}" in block
    assert "Signature Type: ETSI.CAdES.detached" in block
    assert "Signing Hash Algorithm: SHA-256" in block
    assert "Total document signed" in block


def test_openssl_verifies_cms_and_signature_timestamp(
    signed_bt: bytes, root_pem: Path, chain_pem: Path, tmp_path: Path
) -> None:
    [signature] = extract_signatures(signed_bt)
    content = _write(tmp_path, "content.bin", signature.signed_data)
    cms_file = _write(tmp_path, "sig.der", signature.cms_der)
    result = openssl(
        "cms", "-verify", "-binary", "-inform", "DER", "-in", str(cms_file),
        "-content", str(content), "-CAfile", str(root_pem), "-purpose", "any",
        "-out", str(tmp_path / "out.bin"),
    )
    assert result.returncode == 0, result.stderr
    assert "Verification successful" in result.stderr

    assert signature.timestamp_token_der is not None, "B-T must carry a signature timestamp"
    token = _write(tmp_path, "token.der", signature.timestamp_token_der)
    sig_value = _write(tmp_path, "sigvalue.bin", signature.signature_value)
    result = openssl(
        "ts", "-verify", "-data", str(sig_value), "-in", str(token), "-token_in",
        "-CAfile", str(root_pem), "-untrusted", str(chain_pem),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verification: OK" in result.stdout


def test_pyhanko_validator_intact_valid_trusted_with_timestamp(
    signed_bt: bytes, root_cert: asn1_x509.Certificate
) -> None:
    status = pyhanko_status(signed_bt, root_cert)
    assert status.intact and status.valid and status.trusted
    assert status.bottom_line
    assert status.timestamp_validity is not None
    assert status.timestamp_validity.intact and status.timestamp_validity.valid
    assert status.timestamp_validity.trusted
    assert status.signer_reported_dt is not None
    assert status.coverage.name == "ENTIRE_FILE"
    reader = PdfFileReader(io.BytesIO(signed_bt))
    sig_object = reader.embedded_regular_signatures[0].sig_object
    assert sig_object["/Reason"] == "公印に代わる電子署名"
    assert sig_object["/Location"] == "Ibaraki Prefecture"
    assert sig_object["/SubFilter"] == "/ETSI.CAdES.detached"


@pytest.mark.parametrize("level", [SignatureLevel.B_LT, SignatureLevel.B_LTA])
def test_long_term_levels_validate_offline_from_embedded_data(
    installation: Installation,
    permit_pdf: bytes,
    root_cert: asn1_x509.Certificate,
    nss_db: Path,
    tmp_path: Path,
    level: SignatureLevel,
) -> None:
    signed = _sign(installation, permit_pdf, level=level)
    reader = PdfFileReader(io.BytesIO(signed))
    dss = reader.root["/DSS"]
    assert len(dss["/Certs"]) >= 2 and len(dss["/CRLs"]) >= 1
    status = pyhanko_status_offline_ltv(signed, root_cert)
    assert status.bottom_line, status.pretty_print_details()
    assert status.timestamp_validity is not None and status.timestamp_validity.trusted
    doc_timestamps = reader.embedded_timestamp_signatures
    if level is SignatureLevel.B_LTA:
        assert len(doc_timestamps) == 1
        assert doc_timestamps[0].sig_object["/SubFilter"] == "/ETSI.RFC3161"
    else:
        assert doc_timestamps == []
    output = pdfsig(_write(tmp_path, "lt.pdf", signed), nss_db)
    assert "Signature is Valid." in pdfsig_signatures(output)[0]


def test_b_b_has_no_timestamp(
    installation: Installation, permit_pdf: bytes, root_cert: asn1_x509.Certificate
) -> None:
    signed = _sign(installation, permit_pdf, level=SignatureLevel.B_B)
    status = pyhanko_status(signed, root_cert)
    assert status.bottom_line and status.timestamp_validity is None
    assert extract_signatures(signed)[0].timestamp_token_der is None


def test_second_signature_keeps_first_valid(
    installation: Installation,
    signed_bt: bytes,
    root_cert: asn1_x509.Certificate,
    nss_db: Path,
    tmp_path: Path,
) -> None:
    witness = installation.signing_context(Role.WITNESS)
    twice = sign_pdf(
        signed_bt, witness, SignOptions(placement=Placement(page=1, box=(72, 60, 300, 130)))
    ).data
    assert twice is not None and twice.startswith(signed_bt), "must be an incremental update"
    first, second = pyhanko_status(twice, root_cert, 0), pyhanko_status(twice, root_cert, 1)
    assert first.bottom_line and second.bottom_line
    assert first.coverage.name == "ENTIRE_REVISION"
    assert first.modification_level is not None
    assert first.modification_level.name == "FORM_FILLING"
    assert second.coverage.name == "ENTIRE_FILE"
    blocks = pdfsig_signatures(pdfsig(_write(tmp_path, "two.pdf", twice), nss_db))
    assert len(blocks) == 2
    assert all("Signature is Valid." in b and "Certificate is Trusted." in b for b in blocks)
    assert "koin Witness Signing Service" in blocks[1]


def test_certification_signature_allows_later_signatures(
    installation: Installation, permit_pdf: bytes, root_cert: asn1_x509.Certificate
) -> None:
    certified = _sign(installation, permit_pdf, certify=True)
    reader = PdfFileReader(io.BytesIO(certified))
    perms = reader.root["/Perms"]["/DocMDP"]
    assert perms["/Reference"][0]["/TransformParams"]["/P"] == 2
    status = pyhanko_status(certified, root_cert)
    assert status.bottom_line and status.docmdp_ok
    from pyhanko.sign.validation import read_certification_data

    certification = read_certification_data(reader)
    assert certification is not None and certification.permission.name == "FILL_FORMS"
    # a later (invisible) approval signature is allowed by P=2 and keeps the certification valid
    again = sign_pdf(
        certified,
        installation.signing_context(Role.WITNESS, stamp=False),
        SignOptions(placement=None),
    ).data
    assert again is not None
    first = pyhanko_status(again, root_cert, 0)
    assert first.bottom_line and first.docmdp_ok
    assert pyhanko_status(again, root_cert, 1).bottom_line
    # a visible stamp would be a forbidden change: refused, not produced
    with pytest.raises(SigningError) as info:
        sign_pdf(certified, installation.signing_context(Role.WITNESS), SignOptions())
    assert "--no-stamp" in info.value.message_en


def test_tampering_one_byte_fails_every_validator(
    signed_bt: bytes,
    root_cert: asn1_x509.Certificate,
    root_pem: Path,
    nss_db: Path,
    tmp_path: Path,
) -> None:
    # Flip one byte inside the page content, which lies in the first signed range.
    reader = PdfFileReader(io.BytesIO(signed_bt))
    byte_range = [int(v) for v in reader.embedded_regular_signatures[0].sig_object["/ByteRange"]]
    position = signed_bt.index(b"stream", 200) + 20
    assert position < byte_range[1]
    tampered = bytearray(signed_bt)
    tampered[position] ^= 0x01
    tampered_bytes = bytes(tampered)

    assert not pyhanko_status(tampered_bytes, root_cert).intact
    block = pdfsig_signatures(pdfsig(_write(tmp_path, "t.pdf", tampered_bytes), nss_db))[0]
    assert "Signature is Valid." not in block
    [signature] = extract_signatures(tampered_bytes)
    result = openssl(
        "cms", "-verify", "-binary", "-inform", "DER",
        "-in", str(_write(tmp_path, "sig.der", signature.cms_der)),
        "-content", str(_write(tmp_path, "c.bin", signature.signed_data)),
        "-CAfile", str(root_pem), "-purpose", "any", "-out", str(tmp_path / "o.bin"),
    )
    assert result.returncode != 0


def test_output_file_is_written_atomically(
    installation: Installation, permit_pdf: bytes, tmp_path: Path
) -> None:
    source = _write(tmp_path, "in.pdf", permit_pdf)
    out = tmp_path / "sub" / "out.pdf"
    result = sign_pdf(source, installation.signing_context(), output=out)
    assert result.output == out and result.data is None
    assert out.read_bytes().startswith(permit_pdf)
    import hashlib

    assert hashlib.sha256(out.read_bytes()).hexdigest() == result.sha256
    assert [p.name for p in out.parent.iterdir()] == ["out.pdf"]

"""Attack corpus for ``verify_pdf``: every case is a real signed PDF attacked as published
(see ``tests/attacks.py``) and the verdict the verifier must give, per EN 319 102-1.

Verdicts are checked on three levels: the overall indication, the indication and sub-indication
of the signature concerned, and that a person gets a reason in Japanese and English.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import crl as asn1_crl
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign import signers
from pyhanko.sign.fields import SigSeedSubFilter
from pyhanko.sign.timestamps import TimeStamper
from pyhanko.sign.validation import add_validation_info
from pyhanko_certvalidator.registry import SimpleCertificateStore

import keys
from keys import Role
from signer import (
    ChangeKind,
    Indication,
    Installation,
    Placement,
    Report,
    SignatureLevel,
    SignatureReport,
    SigningContext,
    SignOptions,
    SubIndication,
    VerifyPolicy,
    sign_pdf,
    verify_pdf,
)
from tests import attacks
from tests.conftest import PASSPHRASE, PUBLIC_URL
from tests.validators import extract_signatures, pdfsig, pdfsig_signatures
from timestamp import LocalTimeStamper

PASSED, FAILED, INDETERMINATE = Indication.PASSED, Indication.FAILED, Indication.INDETERMINATE


# -- helpers ----------------------------------------------------------------------------------


def _sign(
    installation: Installation, data: bytes, role: Role = Role.POSITION, **options: Any
) -> bytes:
    stamp = options.get("placement", Placement()) is not None
    context = installation.signing_context(role, stamp=stamp)
    result = sign_pdf(data, context, SignOptions(**options))
    assert result.data is not None
    return result.data


def _pyhanko_sign(
    data: bytes, signer: signers.Signer, timestamper: TimeStamper | None
) -> bytes:
    """Sign with pyHanko directly: no koin checks on the certificate (expired, revoked …)."""
    meta = signers.PdfSignatureMetadata(
        field_name="Attack", md_algorithm="sha256", subfilter=SigSeedSubFilter.PADES
    )
    writer = IncrementalPdfFileWriter(io.BytesIO(data))
    out = signers.PdfSigner(meta, signer=signer, timestamper=timestamper).sign_pdf(writer)
    return bytes(out.getvalue())


def _verdict(
    report: Report,
    indication: Indication,
    subindication: SubIndication | None,
    *,
    overall: Indication | None = None,
    index: int = -1,
) -> SignatureReport:
    """Assert the verdict of signature ``index`` and the document's; return the signature."""
    signature = report.signatures[index]
    got = (signature.indication, signature.subindication)
    assert got == (indication, subindication), (got, signature.details)
    assert report.indication is (overall or indication)
    assert signature.reason_ja and signature.reason_en
    assert report.summary_ja and report.summary_en
    return signature


def _kinds(signature: SignatureReport) -> list[ChangeKind]:
    return [change.kind for change in signature.changes_after]


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def policy(installation: Installation) -> VerifyPolicy:
    return installation.verify_policy()


@pytest.fixture(scope="module")
def signed_bt(installation: Installation, permit_pdf: bytes) -> bytes:
    """The permit signed by the governor at B-T, stamp on the last page."""
    return _sign(installation, permit_pdf)


@pytest.fixture(scope="module")
def issuing_ca(koin_home: Path) -> keys.CertificateAuthority:
    return keys.load_certificate_authority(
        keys.PkiLayout(koin_home), "issuing-ca", PASSPHRASE.encode(), PUBLIC_URL
    )


def _position_signer(
    ca: keys.CertificateAuthority, **validity: Any
) -> tuple[signers.Signer, int]:
    """A fresh position key with a certificate from ``ca``; returns the signer and serial."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    certificate = keys.issue_role_certificate(ca, Role.POSITION, key.public_key(), **validity)
    registry = SimpleCertificateStore.from_certs([keys.to_asn1(ca.certificate)])
    signer = keys.LocalKeySigner(keys.to_asn1(certificate), key, registry)
    return signer, certificate.serial_number


# -- 1. tampering -----------------------------------------------------------------------------


def test_one_flipped_byte_in_signed_content_is_hash_failure(
    signed_bt: bytes, policy: VerifyPolicy
) -> None:
    position = signed_bt.index(b"stream", 200) + 20  # inside the first page's content
    assert position < attacks.byte_range(signed_bt)[1]
    report = verify_pdf(attacks.flip_byte(signed_bt, position), policy)
    _verdict(report, FAILED, SubIndication.HASH_FAILURE)


# -- 2. incremental saving attack -------------------------------------------------------------


def test_incremental_update_replacing_page_content_fails_where_pdfsig_passes(
    signed_bt: bytes, policy: VerifyPolicy, nss_db: Path, tmp_path: Path
) -> None:
    attacked = attacks.replace_page_content(signed_bt, "PERMIT REVOKED")
    assert attacked.startswith(signed_bt)
    report = verify_pdf(attacked, policy)
    signature = _verdict(report, FAILED, SubIndication.SIG_CONSTRAINTS_FAILURE)
    assert _kinds(signature) == [ChangeKind.OTHER]
    assert not signature.changes_after[0].allowed
    assert not signature.covers_whole_document
    # What a plain PDF reader says: the signed bytes are intact, so the signature "is valid".
    [block] = pdfsig_signatures(pdfsig(_write(tmp_path, "isa.pdf", attacked), nss_db))
    assert "Signature is Valid." in block


# -- 3. signature wrapping --------------------------------------------------------------------


def _wrapped_ranges(values: list[int]) -> dict[str, list[int]]:
    _, a, b, c = values
    return {
        "gap swallows bytes after /Contents": [0, a, b + 12, c - 12],
        "gap swallows bytes before /Contents": [0, a - 10, b, c],
        "gap shorter than /Contents": [0, a + 10, b, c],
        "no gap": [0, a, a, b - a + c],
        "past the end of the file": [0, a, b, c + 4096],
        "second range overlaps the first": [0, b, a, c + b - a],
    }


@pytest.mark.parametrize(
    "variant", list(_wrapped_ranges([0, 100, 200, 300])), ids=lambda v: v.replace(" ", "-")
)
def test_rewritten_byte_range_is_format_failure(
    signed_bt: bytes, policy: VerifyPolicy, variant: str
) -> None:
    values = _wrapped_ranges(attacks.byte_range(signed_bt))[variant]
    attacked = attacks.rewrite_byte_range(signed_bt, values)
    assert attacks.byte_range(attacked) == values and len(attacked) == len(signed_bt)
    report = verify_pdf(attacked, policy)
    signature = _verdict(report, FAILED, SubIndication.FORMAT_FAILURE)
    assert signature.details


def test_bytes_injected_into_the_contents_gap_are_format_failure(
    signed_bt: bytes, policy: VerifyPolicy, nss_db: Path, tmp_path: Path
) -> None:
    attacked = attacks.inject_into_gap(signed_bt, b"/Injected (payload the signer never saw)")
    assert attacks.byte_range(attacked) == attacks.byte_range(signed_bt)
    report = verify_pdf(attacked, policy)
    signature = _verdict(report, FAILED, SubIndication.FORMAT_FAILURE)
    assert "gap" in " ".join(signature.details)
    # The digest over the signed ranges is untouched: pdfsig is satisfied.
    [block] = pdfsig_signatures(pdfsig(_write(tmp_path, "swa.pdf", attacked), nss_db))
    assert "Signature is Valid." in block


# -- 4. universal signature forgery -----------------------------------------------------------


@pytest.mark.parametrize("variant", attacks.FORGERY_VARIANTS)
@pytest.mark.parametrize("base", ["unsigned", "signed"])
def test_forged_signature_field_is_format_failure(
    permit_pdf: bytes, signed_bt: bytes, policy: VerifyPolicy, base: str, variant: str
) -> None:
    genuine_cms = extract_signatures(signed_bt)[0].cms_der
    source = permit_pdf if base == "unsigned" else signed_bt
    forged = attacks.add_signature_field(source, variant, contents=genuine_cms)
    report = verify_pdf(forged, policy)  # never raises
    signature = _verdict(report, FAILED, SubIndication.FORMAT_FAILURE)
    assert signature.field_name == "Forged"
    assert signature.signer is None and signature.details
    if variant == "no_signer_info":  # the /ByteRange is right: the CMS itself is refused
        assert signature.details[0].startswith("cannot read the signature")
    if base == "signed":
        # The genuine signature still holds: a new signature field is allowed after it.
        [genuine, _] = report.signatures
        assert genuine.indication is PASSED
        assert _kinds(genuine) == [ChangeKind.FORM_FILL_OR_SIGNING]
    else:
        assert len(report.signatures) == 1


# -- 5. shadow attacks ------------------------------------------------------------------------


def test_shadow_hide_repointing_to_signed_unused_content_fails(
    installation: Installation, permit_pdf: bytes, policy: VerifyPolicy
) -> None:
    prepared, hidden = attacks.add_hidden_content(permit_pdf, "PERMIT REVOKED")
    signed = _sign(installation, prepared)
    assert verify_pdf(signed, policy).passed  # an unused object alone is harmless
    attacked = attacks.show_hidden_content(signed, hidden)
    report = verify_pdf(attacked, policy)
    signature = _verdict(report, FAILED, SubIndication.SIG_CONSTRAINTS_FAILURE)
    assert _kinds(signature) == [ChangeKind.OTHER]


@pytest.mark.parametrize("target", ["page font", "seal stamp appearance"])
def test_shadow_replace_overwriting_a_used_object_fails(
    signed_bt: bytes, policy: VerifyPolicy, target: str
) -> None:
    if target == "page font":
        ref, replacement = attacks.page_font_ref(signed_bt), attacks.replacement_font()
    else:
        ref = attacks.signature_appearance_ref(signed_bt)
        replacement = attacks.replacement_appearance()
    attacked = attacks.replace_object(signed_bt, ref, replacement)
    report = verify_pdf(attacked, policy)
    signature = _verdict(report, FAILED, SubIndication.SIG_CONSTRAINTS_FAILURE)
    assert _kinds(signature) == [ChangeKind.OTHER]
    assert f"idnum={ref.idnum}," in " ".join(signature.details)


# -- 6–9. signer and timestamp problems -------------------------------------------------------


@pytest.fixture(scope="module")
def untrusted_signer(tmp_path_factory: pytest.TempPathFactory) -> signers.Signer:
    """The position key of a second demo PKI whose root nobody trusts."""
    home = tmp_path_factory.mktemp("untrusted-pki")
    keys.generate_demo_pki(home, b"other-passphrase", "http://127.0.0.1:9")
    key, certificate, chain = keys.read_pkcs12(
        keys.PkiLayout(home).role_key(Role.POSITION), b"other-passphrase"
    )
    registry = SimpleCertificateStore.from_certs([keys.to_asn1(c) for c in chain])
    return keys.LocalKeySigner(keys.to_asn1(certificate), key, registry)


def test_signer_from_untrusted_root_has_no_chain(
    installation: Installation,
    permit_pdf: bytes,
    policy: VerifyPolicy,
    untrusted_signer: signers.Signer,
) -> None:
    context = SigningContext(untrusted_signer, installation.timestamper(), None)
    signed = sign_pdf(permit_pdf, context, SignOptions(placement=None)).data
    assert signed is not None
    report = verify_pdf(signed, policy)
    signature = _verdict(report, INDETERMINATE, SubIndication.NO_CERTIFICATE_CHAIN_FOUND)
    assert signature.signer is not None and signature.signer.common_name is not None
    assert signature.chain == []


def test_expired_signer(
    installation: Installation,
    permit_pdf: bytes,
    policy: VerifyPolicy,
    issuing_ca: keys.CertificateAuthority,
) -> None:
    # Valid for one minute, starting when the issuing CA did (minutes before the suite ran).
    signer, _ = _position_signer(
        issuing_ca,
        not_before=issuing_ca.certificate.not_valid_before_utc,
        lifetime=dt.timedelta(minutes=1),
    )
    expired_at = issuing_ca.certificate.not_valid_before_utc + dt.timedelta(minutes=1)
    assert expired_at < dt.datetime.now(dt.UTC)

    # B-T: the token was issued after expiry; it bounds the signing time from above only, so
    # it does not prove a late signature either (EN 319 102-1): no proof within validity.
    report = verify_pdf(_pyhanko_sign(permit_pdf, signer, installation.timestamper()), policy)
    signature = _verdict(report, INDETERMINATE, SubIndication.OUT_OF_BOUNDS_NO_POE)
    assert signature.timestamp_time is not None and signature.timestamp_time > expired_at

    # B-B: nothing shows when the signature was made.
    report = verify_pdf(_pyhanko_sign(permit_pdf, signer, None), policy)
    signature = _verdict(report, INDETERMINATE, SubIndication.OUT_OF_BOUNDS_NO_POE)
    assert signature.timestamp_time is None


def test_expired_signer_with_unverified_timestamp_is_hash_failure(
    installation: Installation,
    permit_pdf: bytes,
    policy: VerifyPolicy,
    issuing_ca: keys.CertificateAuthority,
) -> None:
    # A token that does not cover the signature proves nothing, not even a late signature.
    signer, _ = _position_signer(
        issuing_ca,
        not_before=issuing_ca.certificate.not_valid_before_utc,
        lifetime=dt.timedelta(minutes=1),
    )
    local = installation.timestamper()
    assert isinstance(local, LocalTimeStamper)
    signed = _pyhanko_sign(permit_pdf, signer, _OtherImprintTimeStamper(local.authority))
    _verdict(verify_pdf(signed, policy), FAILED, SubIndication.HASH_FAILURE)


def test_b_lta_signature_outlives_its_certificate(
    installation: Installation,
    permit_pdf: bytes,
    policy: VerifyPolicy,
    issuing_ca: keys.CertificateAuthority,
) -> None:
    """Valid when made, verified after the signer's certificate expired: the signature
    timestamp proves it existed in time, so it still PASSES (past signature validation)."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    signer, _ = _position_signer(
        issuing_ca, not_before=now - dt.timedelta(minutes=1), lifetime=dt.timedelta(hours=1)
    )
    context = SigningContext(
        signer, installation.timestamper(), None, installation.trust_material()
    )
    options = SignOptions(level=SignatureLevel.B_LTA, placement=None)
    signed = sign_pdf(permit_pdf, context, options).data
    assert signed is not None
    _verdict(verify_pdf(signed, policy), PASSED, None, index=0)
    # Two days on: the signer's certificate has expired, the TSA's has not.
    later = dataclasses.replace(policy, validation_time=now + dt.timedelta(days=2))
    signature = _verdict(verify_pdf(signed, later), PASSED, None, index=0)
    assert any("the time proven by its timestamp" in d for d in signature.details)
    # A B-B signature has no such proof: the same wait makes it INDETERMINATE.
    unproven = sign_pdf(
        permit_pdf, context, SignOptions(level=SignatureLevel.B_B, placement=None)
    ).data
    assert unproven is not None
    _verdict(verify_pdf(unproven, later), INDETERMINATE, SubIndication.OUT_OF_BOUNDS_NO_POE)


def test_revoked_signer(
    installation: Installation,
    permit_pdf: bytes,
    policy: VerifyPolicy,
    issuing_ca: keys.CertificateAuthority,
) -> None:
    signer, serial = _position_signer(issuing_ca)
    # revoked five minutes ago (issue_crl's default thisUpdate), i.e. before the signature
    crl = asn1_crl.CertificateList.load(
        keys.issue_crl(issuing_ca, [serial]).public_bytes(serialization.Encoding.DER)
    )
    revoked_policy = dataclasses.replace(
        policy, crls=[c for c in policy.crls if c.issuer != crl.issuer] + [crl]
    )
    assert len(revoked_policy.crls) == len(policy.crls)
    signed = _pyhanko_sign(permit_pdf, signer, installation.timestamper())

    assert verify_pdf(signed, policy).passed  # the CRL on file does not list it

    # The signature timestamp is after the revocation, but a signature timestamp only proves
    # the signature existed by then, not that it was made after the revocation: EN 319 102-1
    # keeps this INDETERMINATE/REVOKED_NO_POE (FAILED/REVOKED needs a content timestamp).
    report = verify_pdf(signed, revoked_policy)
    signature = _verdict(report, INDETERMINATE, SubIndication.REVOKED_NO_POE)
    assert signature.timestamp_time is not None


class _OtherImprintTimeStamper(LocalTimeStamper):
    """Our own TSA, asked to stamp sha256(b"other") instead of the digest it is given."""

    async def async_timestamp(self, message_digest: bytes, md_algorithm: str) -> Any:
        return await super().async_timestamp(hashlib.sha256(b"other").digest(), "sha256")


def test_timestamp_over_another_imprint_is_hash_failure(
    installation: Installation, permit_pdf: bytes, policy: VerifyPolicy
) -> None:
    local = installation.timestamper()
    assert isinstance(local, LocalTimeStamper)
    signer = installation.signing_context().signer
    signed = _pyhanko_sign(permit_pdf, signer, _OtherImprintTimeStamper(local.authority))
    report = verify_pdf(signed, policy)
    signature = _verdict(report, FAILED, SubIndication.HASH_FAILURE)
    assert "timestamp" in " ".join(signature.details)


# -- 10–11. legitimate documents --------------------------------------------------------------


def test_later_dss_and_document_timestamp_keep_b_t_signature_valid(
    installation: Installation, signed_bt: bytes, policy: VerifyPolicy
) -> None:
    trust = installation.trust_material()
    reader = PdfFileReader(io.BytesIO(signed_bt))
    with_dss = add_validation_info(reader.embedded_signatures[0], trust.validation_context())
    writer = IncrementalPdfFileWriter(with_dss)
    stamped = signers.PdfTimeStamper(installation.timestamper()).timestamp_pdf(
        writer, "sha256", validation_context=trust.validation_context()
    )
    report = verify_pdf(stamped.getvalue(), policy)
    signature = _verdict(report, PASSED, None, index=0)
    assert set(_kinds(signature)) == {ChangeKind.DSS, ChangeKind.DOCUMENT_TIMESTAMP}
    assert all(change.allowed for change in signature.changes_after)
    assert signature.pades_level == "B-LTA"
    timestamp = report.signatures[-1]
    assert timestamp.kind == "document_timestamp" and timestamp.indication is PASSED


@pytest.mark.parametrize("level", list(SignatureLevel), ids=str)
def test_our_own_levels_pass(
    installation: Installation, permit_pdf: bytes, policy: VerifyPolicy, level: SignatureLevel
) -> None:
    report = verify_pdf(_sign(installation, permit_pdf, level=level), policy)
    signature = _verdict(report, PASSED, None, index=0)
    assert signature.pades_level == level.value
    assert report.subindication is None
    assert all(s.indication is PASSED for s in report.signatures)


def test_position_then_witness_signatures_both_pass(
    installation: Installation, signed_bt: bytes, policy: VerifyPolicy
) -> None:
    twice = _sign(
        installation, signed_bt, Role.WITNESS, placement=Placement(page=1, box=(72, 60, 300, 130))
    )
    report = verify_pdf(twice, policy)
    first, second = report.signatures
    _verdict(report, PASSED, None, index=0)
    _verdict(report, PASSED, None, index=1)
    assert not first.covers_whole_document
    assert (first.signed_revision, first.total_revisions) == (2, 3)
    assert first.coverage_en == "revision 2 of 3" and first.coverage_ja == "版 2 / 3"
    assert _kinds(first) == [ChangeKind.FORM_FILL_OR_SIGNING]
    assert second.covers_whole_document and second.changes_after == []
    assert second.signer is not None and second.signer.common_name == "koin Witness Signing Service"


# -- 12. annotations after signing ------------------------------------------------------------


def test_annotation_after_certification_fails(
    installation: Installation, permit_pdf: bytes, policy: VerifyPolicy
) -> None:
    certified = _sign(installation, permit_pdf, certify=True)
    report = verify_pdf(attacks.add_annotation(certified), policy)
    signature = _verdict(report, FAILED, SubIndication.SIG_CONSTRAINTS_FAILURE)
    assert signature.certification == "FILL_FORMS"  # DocMDP P=2: no annotations
    assert _kinds(signature) == [ChangeKind.ANNOTATIONS]
    assert not signature.changes_after[0].allowed


def test_annotation_after_approval_signature_is_amber(
    signed_bt: bytes, policy: VerifyPolicy
) -> None:
    report = verify_pdf(attacks.add_annotation(signed_bt), policy)
    signature = _verdict(report, INDETERMINATE, SubIndication.SIG_CONSTRAINTS_FAILURE)
    assert signature.certification is None
    assert _kinds(signature) == [ChangeKind.ANNOTATIONS]
    assert "注釈" in signature.reason_ja and "Annotations" in signature.reason_en


def test_annotation_hiding_a_content_change_fails(
    signed_bt: bytes, policy: VerifyPolicy
) -> None:
    attacked = attacks.add_annotation(signed_bt, new_content="PERMIT REVOKED")
    report = verify_pdf(attacked, policy)
    signature = _verdict(report, FAILED, SubIndication.SIG_CONSTRAINTS_FAILURE)
    assert _kinds(signature) == [ChangeKind.OTHER]


# -- 13. nothing signed -----------------------------------------------------------------------


def test_pdf_without_signature_fails(permit_pdf: bytes, policy: VerifyPolicy) -> None:
    report = verify_pdf(permit_pdf, policy)
    assert (report.indication, report.subindication) == (FAILED, SubIndication.NO_SIGNATURE)
    assert report.signatures == []
    assert report.summary_ja and report.summary_en

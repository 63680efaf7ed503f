"""The fast signing path: valid for every validator, equivalent to the plain pyHanko path,
byte-identical CMS and time-stamp tokens, /Contents never truncated, large files streamed."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms, tsp
from asn1crypto import x509 as asn1_x509
from PIL import Image, ImageChops
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.general import as_signing_certificate_v2
from pyhanko.sign.signers.pdf_cms import PdfCMSSignedAttributes
from pyhanko.sign.timestamps import TimeStamper

from keys import Role
from signer import (
    Installation,
    Placement,
    SignatureLevel,
    SigningContext,
    SignOptions,
    sign_pdf,
    verify_pdf,
)
from signer._cms_template import TemplateSigner
from signer.samples import make_permit_pdf
from tests.validators import (
    extract_signatures,
    openssl,
    pdfsig,
    pdfsig_signatures,
    pyhanko_status,
    pyhanko_status_offline_ltv,
)
from timestamp import LocalTimeStamper, TimeStampAuthority
from timestamp._authority import _attribute, _cms_time

PUBLIC = "https://koin.example.jp"


@pytest.fixture(scope="module")
def fast(installation: Installation) -> SigningContext:
    context = installation.signing_context(Role.POSITION)
    assert context.fast
    return context


@pytest.fixture(scope="module")
def plain(fast: SigningContext) -> SigningContext:
    return SigningContext(fast.signer, fast.timestamper, fast.appearance, fast.trust, fast=False)


@pytest.fixture(scope="module")
def twenty_pages(installation: Installation) -> bytes:
    return make_permit_pdf(installation.font_file, pages=20)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _openssl_checks(signed: bytes, root_pem: Path, chain_pem: Path, tmp_path: Path) -> None:
    [signature] = extract_signatures(signed)[:1]
    result = openssl(
        "cms", "-verify", "-binary", "-inform", "DER",
        "-in", str(_write(tmp_path, "sig.der", signature.cms_der)),
        "-content", str(_write(tmp_path, "content.bin", signature.signed_data)),
        "-CAfile", str(root_pem), "-purpose", "any", "-out", str(tmp_path / "out.bin"),
    )
    assert result.returncode == 0 and "Verification successful" in result.stderr, result.stderr
    if signature.timestamp_token_der is None:
        return
    result = openssl(
        "ts", "-verify", "-data", str(_write(tmp_path, "value.bin", signature.signature_value)),
        "-in", str(_write(tmp_path, "token.der", signature.timestamp_token_der)), "-token_in",
        "-CAfile", str(root_pem), "-untrusted", str(chain_pem),
    )
    assert result.returncode == 0 and "Verification: OK" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("level", "qr", "pages"),
    [
        (SignatureLevel.B_B, False, 1),
        (SignatureLevel.B_T, False, 1),
        (SignatureLevel.B_T, True, 20),
        (SignatureLevel.B_LT, True, 1),
        (SignatureLevel.B_LTA, False, 20),
    ],
)
def test_fast_outputs_pass_every_validator(
    fast: SigningContext,
    one_page_permit: bytes,
    twenty_pages: bytes,
    root_cert: asn1_x509.Certificate,
    root_pem: Path,
    chain_pem: Path,
    nss_db: Path,
    installation: Installation,
    tmp_path: Path,
    level: SignatureLevel,
    qr: bool,
    pages: int,
) -> None:
    source = one_page_permit if pages == 1 else twenty_pages
    options = SignOptions(level=level, verify_base_url=PUBLIC if qr else None)
    result = sign_pdf(source, fast, options)
    signed = result.data
    assert signed is not None and signed.startswith(source)
    assert hashlib.sha256(signed).hexdigest() == result.sha256

    [block, *rest] = pdfsig_signatures(pdfsig(_write(tmp_path, "s.pdf", signed), nss_db))
    assert "Signature is Valid." in block and "Certificate is Trusted." in block, block
    assert len(rest) == (1 if level is SignatureLevel.B_LTA else 0)
    _openssl_checks(signed, root_pem, chain_pem, tmp_path)
    status = (
        pyhanko_status_offline_ltv(signed, root_cert)
        if level.embeds_validation_data
        else pyhanko_status(signed, root_cert)
    )
    assert status.bottom_line, status.pretty_print_details()
    assert (status.timestamp_validity is not None) == level.needs_timestamp
    report = verify_pdf(signed, installation.verify_policy())
    assert report.passed, report.to_dict()
    assert report.signatures[0].pades_level == level.value


def _render_stamp(pdf: bytes, tmp_path: Path, name: str, page: int) -> Image.Image:
    path = _write(tmp_path, f"{name}.pdf", pdf)
    subprocess.run(
        ["pdftoppm", "-r", "144", "-f", str(page), "-l", str(page), "-png", "-singlefile",
         str(path), str(tmp_path / name)],
        check=True,
    )
    with Image.open(tmp_path / f"{name}.png") as image:
        return image.convert("RGB")


@pytest.mark.parametrize("qr", [False, True])
def test_fast_and_plain_paths_are_equivalent(
    fast: SigningContext,
    plain: SigningContext,
    permit_pdf: bytes,
    installation: Installation,
    tmp_path: Path,
    qr: bool,
) -> None:
    options = SignOptions(
        level=SignatureLevel.B_T, document_id="ABCD-EFGH-JKMN-PQRS",
        verify_base_url=PUBLIC if qr else None,
    )
    fast_result = sign_pdf(permit_pdf, fast, options)
    plain_result = sign_pdf(permit_pdf, plain, options)
    assert fast_result.data is not None and plain_result.data is not None
    assert (fast_result.field_name, fast_result.page, fast_result.box) == (
        plain_result.field_name, plain_result.page, plain_result.box,
    )
    policy = installation.verify_policy()
    fast_report, plain_report = verify_pdf(fast_result.data, policy), verify_pdf(
        plain_result.data, policy
    )
    keys = ("field_name", "pades_level", "reason", "location", "subfilter", "digest_algorithm",
            "indication", "covers_whole_document", "position")
    assert [{k: getattr(s, k) for k in keys} for s in fast_report.signatures] == [
        {k: getattr(s, k) for k in keys} for s in plain_report.signatures
    ]
    fast_sig = PdfFileReader(io.BytesIO(fast_result.data)).embedded_signatures[0]
    plain_sig = PdfFileReader(io.BytesIO(plain_result.data)).embedded_signatures[0]
    for key in ("/Type", "/Filter", "/SubFilter", "/Reason", "/Location"):
        assert fast_sig.sig_object[key] == plain_sig.sig_object[key]
    for key in ("/FT", "/T", "/F", "/Rect"):
        assert fast_sig.sig_field[key] == plain_sig.sig_field[key]

    # The same stamp, pixel for pixel (same dates: both signed within the same minute, else
    # the date line differs and only that line may change).
    page = fast_result.page
    assert page is not None and fast_result.box is not None
    fast_image = _render_stamp(fast_result.data, tmp_path, "fast", page)
    plain_image = _render_stamp(plain_result.data, tmp_path, "plain", page)
    diff = ImageChops.difference(fast_image, plain_image)
    if fast_result.signed_at.replace(second=0, microsecond=0) == plain_result.signed_at.replace(
        second=0, microsecond=0
    ):
        assert diff.getbbox() is None, "the fast stamp looks different"
    else:  # pragma: no cover - a minute boundary between the two signatures
        scale = 2
        x1, y1, x2, y2 = fast_result.box
        height = fast_image.height
        inside = (int(x1 * scale) - 2, int(height - y2 * scale) - 2,
                  int(x2 * scale) + 2, int(height - y1 * scale) + 2)
        bbox = diff.getbbox()
        assert bbox is not None and bbox[0] >= inside[0] and bbox[2] <= inside[2]
    if qr:
        decoded = subprocess.run(
            ["zbarimg", "-q", "--raw", str(tmp_path / "fast.png")], capture_output=True, text=True
        )
        assert decoded.stdout.strip() == f"{PUBLIC}/verify/ABCD-EFGH-JKMN-PQRS"


def test_second_signature_on_a_fast_signed_file_keeps_the_first_valid(
    fast: SigningContext,
    installation: Installation,
    one_page_permit: bytes,
    root_cert: asn1_x509.Certificate,
    nss_db: Path,
    tmp_path: Path,
) -> None:
    first = sign_pdf(one_page_permit, fast).data
    assert first is not None
    witness = installation.signing_context(Role.WITNESS)
    assert witness.fast
    twice = sign_pdf(
        first, witness, SignOptions(placement=Placement(page=1, box=(72, 60, 300, 130)))
    ).data
    assert twice is not None and twice.startswith(first)
    one, two = pyhanko_status(twice, root_cert, 0), pyhanko_status(twice, root_cert, 1)
    assert one.bottom_line and two.bottom_line
    assert one.modification_level is not None and one.modification_level.name == "FORM_FILLING"
    blocks = pdfsig_signatures(pdfsig(_write(tmp_path, "two.pdf", twice), nss_db))
    assert len(blocks) == 2 and all("Signature is Valid." in b for b in blocks)
    assert verify_pdf(twice, installation.verify_policy()).passed


def test_template_cms_is_byte_identical_to_pyhanko(fast: SigningContext) -> None:
    class SameToken(TimeStamper):
        """Hands out one real token from the installation's TSA, so both CMS agree."""

        def __init__(self, token: Any) -> None:
            super().__init__()
            self.token = token

        async def async_timestamp(self, message_digest: bytes, md_algorithm: str) -> Any:
            return self.token

    assert fast.timestamper is not None
    token = asyncio.run(fast.timestamper.async_timestamp(bytes(32), "sha256"))
    stamper = SameToken(token)
    digest = hashlib.sha256(b"a document").digest()
    settings = PdfCMSSignedAttributes(signing_time=dt.datetime.now(dt.UTC))
    template = TemplateSigner(fast.signer)
    ours = asyncio.run(template.async_sign(
        digest, "sha256", use_pades=True, timestamper=stamper, signed_attr_settings=settings
    ))
    theirs = asyncio.run(fast.signer.async_sign(
        digest, "sha256", use_pades=True, timestamper=stamper, signed_attr_settings=settings
    ))
    assert ours.dump() == theirs.dump()
    # not PAdES: pyHanko's own code (with a signing-time attribute)
    generic = asyncio.run(template.async_sign(digest, "sha256", signed_attr_settings=settings))
    names = [a["type"].native for a in generic["content"]["signer_infos"][0]["signed_attrs"]]
    assert "signing_time" in names


def test_template_tsa_token_is_byte_identical_to_asn1crypto(
    installation: Installation, tmp_path: Path
) -> None:
    authority = TimeStampAuthority.from_key_store(installation.key_store, tmp_path)
    nonce, request = LocalTimeStamper(authority).request_cms(bytes(range(32)), "sha256")
    moment = dt.datetime(2026, 4, 1, 9, 0, 1, 250000, tzinfo=dt.UTC)
    ours = asyncio.run(authority.token_der(request, 4242, moment))

    # the reference: every structure built by asn1crypto
    tst_info = tsp.TSTInfo({
        "version": "v1", "policy": authority.policy,
        "message_imprint": tsp.MessageImprint.load(request["message_imprint"].dump()),
        "serial_number": 4242, "gen_time": moment, "accuracy": authority._accuracy_value,
        "ordering": False, "nonce": nonce,
        "tsa": asn1_x509.GeneralName(name="directory_name", value=authority.certificate.subject),
    }).dump()
    attributes = cms.CMSAttributes([
        _attribute("content_type", "tst_info"),
        _attribute("signing_time", _cms_time(moment)),
        _attribute("message_digest", hashlib.sha256(tst_info).digest()),
        _attribute("signing_certificate_v2",
                   as_signing_certificate_v2(authority.certificate, "sha256")),
    ])
    signature = authority.signer.sign_raw(attributes.dump(), "sha256")  # type: ignore[attr-defined]
    signer_info = authority.signer.signer_info("sha256", attributes, signature)
    reference = cms.ContentInfo({
        "content_type": "signed_data",
        "content": {
            "version": "v3", "digest_algorithms": [signer_info["digest_algorithm"]],
            "encap_content_info": {
                "content_type": "tst_info", "content": cms.ParsableOctetString(tst_info),
            },
            "certificates": [
                cms.CertificateChoices(name="certificate", value=c)
                for c in authority._embedded_certs
            ],
            "signer_infos": [signer_info],
        },
    }).dump()
    assert ours == reference


class _GrowingTokens(TimeStamper):
    """The installation's TSA, but its real tokens carry 40 extra certificates that the
    size estimate (the dummy response) does not: the reserved space is too small once."""

    def __init__(self, inner: TimeStamper, extra: list[asn1_x509.Certificate]) -> None:
        super().__init__()
        self.inner = inner
        self.extra = extra
        self.calls = 0

    async def async_dummy_response(self, md_algorithm: str) -> Any:
        return await self.inner.async_dummy_response(md_algorithm)

    async def async_timestamp(self, message_digest: bytes, md_algorithm: str) -> Any:
        self.calls += 1
        token = await self.inner.async_timestamp(message_digest, md_algorithm)
        data = cms.ContentInfo.load(token.dump())
        certificates = list(data["content"]["certificates"])
        certificates += [cms.CertificateChoices(name="certificate", value=c) for c in self.extra]
        data["content"]["certificates"] = certificates
        return cms.ContentInfo.load(data.dump())


def test_contents_too_small_is_retried_never_truncated(
    fast: SigningContext,
    installation: Installation,
    one_page_permit: bytes,
    root_cert: asn1_x509.Certificate,
    nss_db: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert fast.timestamper is not None
    root_like = installation.key_store.trust_roots() * 40
    stamper = _GrowingTokens(fast.timestamper, root_like)
    context = SigningContext(fast.signer, stamper, fast.appearance, fast.trust)
    with caplog.at_level("WARNING", logger="signer._sign"):
        result = sign_pdf(one_page_permit, context, output=tmp_path / "out.pdf")
    assert any("did not fit" in r.getMessage() for r in caplog.records)
    assert stamper.calls == 2  # the first attempt's CMS did not fit: signed again, larger
    signed = (tmp_path / "out.pdf").read_bytes()
    assert hashlib.sha256(signed).hexdigest() == result.sha256
    assert [p.name for p in tmp_path.iterdir()] == ["out.pdf"]
    status = pyhanko_status(signed, root_cert)
    assert status.bottom_line and status.timestamp_validity is not None
    [block] = pdfsig_signatures(pdfsig(tmp_path / "out.pdf", nss_db))
    assert "Signature is Valid." in block


def test_prepared_font_is_reused_from_disk(installation: Installation) -> None:
    appearance = installation.appearance(Role.POSITION)
    assert appearance.prepared_font_file.is_file()  # written by koin init
    data = json.loads(appearance.prepared_font_file.read_text("utf-8"))
    assert data["base_ps_name"] == "NotoSansCJKjp-Regular" and data["glyphs"]
    restored = appearance.prepared_font
    assert len(restored.glyphs) == len(data["glyphs"])


@pytest.mark.slow
def test_a_1_gib_file_is_signed_streamed_under_128_mib(
    koin_home: Path, tmp_path: Path
) -> None:
    from bench._inputs import write_large_pdf

    big = tmp_path / "big.pdf"
    write_large_pdf(big, 1 << 30)
    try:
        env = {"KOIN_KEY_PASSPHRASE": "", "PATH": "/usr/bin:/bin"}
        completed = subprocess.run(
            [sys.executable, "-m", "bench._rss", "koin", str(koin_home), str(big),
             str(tmp_path / "out.pdf")],
            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
            env={k: v for k, v in env.items() if v},
        )
        assert completed.returncode == 0, completed.stderr
        figures = json.loads(completed.stdout.strip().splitlines()[-1])
        assert figures["peak_rss_mib"] <= 128, figures
        with (tmp_path / "out.pdf").open("rb") as out, big.open("rb") as original:
            assert out.read(1 << 20) == original.read(1 << 20)
        with (tmp_path / "out.pdf").open("rb") as signed:
            [signature] = PdfFileReader(signed).embedded_signatures
            assert signature.sig_object["/SubFilter"] == "/ETSI.CAdES.detached"
            assert signature.evaluate_signature_coverage().name == "ENTIRE_FILE"
    finally:
        big.unlink(missing_ok=True)
        (tmp_path / "out.pdf").unlink(missing_ok=True)

"""Every unusable input is refused with a clear message and nothing is written."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.writer import PageObject, PdfFileWriter

import keys
from keys import Role
from signer import (
    EncryptedPdfError,
    Installation,
    InvalidPdfError,
    Placement,
    PlacementError,
    SignatureLevel,
    SigningError,
    SignOptions,
    sign_pdf,
)


def _blank_pdf(encrypt: str | None = None, recipient: object = None) -> bytes:
    writer = PdfFileWriter()
    stream = writer.add_object(generic.StreamObject(stream_data=b"BT ET"))
    writer.insert_page(PageObject(stream, (0, 0, 595, 842)))
    if encrypt == "password":
        writer.encrypt("owner-secret", "user-secret")
    elif encrypt == "certificate":
        from pyhanko.pdf_utils.crypt.pubkey import RecipientEncryptionPolicy

        policy = RecipientEncryptionPolicy(ignore_key_usage=True)
        writer.encrypt_pubkey([recipient], policy=policy)  # type: ignore[list-item]
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def _refused(
    installation: Installation, data: bytes, tmp_path: Path, options: SignOptions | None = None
) -> SigningError:
    out = tmp_path / "out.pdf"
    with pytest.raises(SigningError) as info:
        sign_pdf(
            data,
            installation.signing_context(Role.POSITION),
            options or SignOptions(level=SignatureLevel.B_B),
            output=out,
        )
    assert list(tmp_path.iterdir()) == [], "nothing may be left behind"
    error = info.value
    assert error.message and error.message_en and error.message != error.message_en
    return error


def test_not_a_pdf(installation: Installation, tmp_path: Path) -> None:
    error = _refused(installation, b"<html>this is a web page</html>", tmp_path)
    assert isinstance(error, InvalidPdfError)
    assert "Not a PDF" in error.message_en and "PDF ファイルではありません" in error.message


def test_empty_file(installation: Installation, tmp_path: Path) -> None:
    error = _refused(installation, b"", tmp_path)
    assert isinstance(error, InvalidPdfError) and error.fields["reason"] == "not_pdf"


def test_truncated_pdf(installation: Installation, permit_pdf: bytes, tmp_path: Path) -> None:
    error = _refused(installation, permit_pdf[: len(permit_pdf) // 2], tmp_path)
    assert isinstance(error, InvalidPdfError)
    assert "truncated" in error.message_en and "途中で切れて" in error.message


def test_broken_xref_is_refused_not_repaired(
    installation: Installation, permit_pdf: bytes, tmp_path: Path
) -> None:
    match = re.search(rb"startxref\s+(\d+)", permit_pdf)
    assert match is not None
    wrong = str(int(match.group(1)) - 37).encode()
    broken = permit_pdf[: match.start(1)] + wrong + permit_pdf[match.end(1) :]
    error = _refused(installation, broken, tmp_path)
    assert error.fields["reason"] == "broken_structure"
    assert "does not repair" in error.message_en and "修復はしません" in error.message


def test_password_encrypted_pdf(installation: Installation, tmp_path: Path) -> None:
    error = _refused(installation, _blank_pdf("password"), tmp_path)
    assert isinstance(error, EncryptedPdfError)
    assert error.fields["reason"] == "encrypted_password"
    assert "password-protected" in error.message_en and "パスワード" in error.message


def test_certificate_encrypted_pdf(
    installation: Installation, key_store: keys.KeyStore, tmp_path: Path
) -> None:
    recipient = key_store.certificate_for(Role.WITNESS)
    error = _refused(installation, _blank_pdf("certificate", recipient), tmp_path)
    assert isinstance(error, EncryptedPdfError)
    assert error.fields["reason"] == "encrypted_certificate"
    assert "encrypted with certificates" in error.message_en


@pytest.mark.parametrize("page", [3, 0, -3])
def test_page_out_of_range(
    installation: Installation, permit_pdf: bytes, tmp_path: Path, page: int
) -> None:
    error = _refused(
        installation,
        permit_pdf,
        tmp_path,
        SignOptions(level=SignatureLevel.B_B, placement=Placement(page=page)),
    )
    assert isinstance(error, PlacementError)
    assert f"Page {page} does not exist; the PDF has 2 page(s)." == error.message_en


def test_negative_page_counts_from_the_end(
    installation: Installation, permit_pdf: bytes
) -> None:
    result = sign_pdf(
        permit_pdf,
        installation.signing_context(),
        SignOptions(level=SignatureLevel.B_B, placement=Placement(page=-2)),
    )
    assert result.page == 1


@pytest.mark.parametrize(
    "box",
    [(500, 20, 700, 90), (-10, 20, 200, 90), (300, 800, 500, 860)],
)
def test_box_outside_page(
    installation: Installation,
    permit_pdf: bytes,
    tmp_path: Path,
    box: tuple[float, float, float, float],
) -> None:
    error = _refused(
        installation,
        permit_pdf,
        tmp_path,
        SignOptions(level=SignatureLevel.B_B, placement=Placement(page=1, box=box)),
    )
    assert isinstance(error, PlacementError)
    assert "lies outside page 1 (0,0,595.28,841.89)" in error.message_en


def test_box_too_small(installation: Installation, permit_pdf: bytes, tmp_path: Path) -> None:
    error = _refused(
        installation,
        permit_pdf,
        tmp_path,
        SignOptions(level=SignatureLevel.B_B, placement=Placement(page=1, box=(10, 10, 40, 20))),
    )
    assert isinstance(error, PlacementError) and "too small" in error.message_en


def test_certifying_an_already_signed_pdf(
    installation: Installation, permit_pdf: bytes, tmp_path: Path
) -> None:
    signed = sign_pdf(
        permit_pdf, installation.signing_context(), SignOptions(level=SignatureLevel.B_B)
    ).data
    assert signed is not None
    error = _refused(
        installation, signed, tmp_path, SignOptions(level=SignatureLevel.B_B, certify=True)
    )
    assert "certification signature must be the first" in error.message_en


def test_certifying_twice_and_no_changes_certification(
    installation: Installation, permit_pdf: bytes, tmp_path: Path
) -> None:
    certified = sign_pdf(
        permit_pdf,
        installation.signing_context(),
        SignOptions(level=SignatureLevel.B_B, certify=True),
    ).data
    assert certified is not None
    error = _refused(
        installation, certified, tmp_path, SignOptions(level=SignatureLevel.B_B, certify=True)
    )
    assert "already carries a certification signature" in error.message_en


def _copy_home(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_missing_passphrase(
    koin_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _copy_home(koin_home, tmp_path / "home")
    (home / "keys" / "passphrase").unlink()
    monkeypatch.delenv("KOIN_KEY_PASSPHRASE", raising=False)
    with pytest.raises(keys.PassphraseError) as info:
        Installation(home).signing_context()
    assert "KOIN_KEY_PASSPHRASE" in info.value.message_en


def test_wrong_passphrase(koin_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _copy_home(koin_home, tmp_path / "home")
    monkeypatch.setenv("KOIN_KEY_PASSPHRASE", "not-the-passphrase")
    with pytest.raises(keys.PassphraseError) as info:
        Installation(home).signing_context()
    assert "wrong passphrase" in info.value.message_en
    assert "not-the-passphrase" not in str(info.value), "never echo a secret"


def test_passphrase_file_readable_by_others_is_refused(
    koin_home: Path, tmp_path: Path
) -> None:
    home = _copy_home(koin_home, tmp_path / "home")
    (home / "keys" / "passphrase").chmod(0o644)
    with pytest.raises(keys.PassphraseError) as info:
        Installation(home).signing_context()
    assert "chmod 600" in info.value.message_en


def test_b_t_without_tsa_is_refused_not_downgraded(
    installation: Installation, permit_pdf: bytes, tmp_path: Path
) -> None:
    from signer import SigningContext

    context = installation.signing_context()
    no_tsa = SigningContext(context.signer, None, context.appearance, context.trust)
    with pytest.raises(SigningError) as info:
        sign_pdf(permit_pdf, no_tsa, SignOptions(level=SignatureLevel.B_T))
    assert "needs a time-stamping authority" in info.value.message_en

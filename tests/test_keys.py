"""The demo PKI and the key store, checked with openssl as an outsider would."""

from __future__ import annotations

import logging
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import keys
from keys import Role
from tests.conftest import PASSPHRASE, write_passphrase_file


def _text(path: Path) -> str:
    return subprocess.run(
        ["openssl", "x509", "-in", str(path), "-noout", "-text"],
        capture_output=True, text=True, check=True,
    ).stdout


def _role_cert(key_store: keys.KeyStore, role: Role, tmp_path: Path) -> Path:
    path = tmp_path / f"{role.value}.der"
    path.write_bytes(key_store.certificate_for(role).dump())
    pem = tmp_path / f"{role.value}.pem"
    subprocess.run(
        ["openssl", "x509", "-inform", "DER", "-in", str(path), "-out", str(pem)], check=True
    )
    return pem


def test_position_certificate_profile(
    key_store: keys.KeyStore, koin_home: Path, tmp_path: Path
) -> None:
    pem = _role_cert(key_store, Role.POSITION, tmp_path)
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    subject = cert.subject
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "Governor of Ibaraki Prefecture"
    )
    organization = subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    assert organization == "Ibaraki Prefecture"
    assert subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "JP"
    assert "知事" in str(subject.get_attributes_for_oid(NameOID.TITLE)[0].value)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.content_commitment
    assert not usage.value.key_cert_sign
    text = _text(pem)
    assert "URI:http://127.0.0.1:8000/pki/issuing-ca.crl" in text
    assert "Authority Information Access" not in text, "no OCSP AIA in the demo chain"
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(koin_home / "pki" / "root-ca.pem"), "-untrusted",
         str(koin_home / "pki" / "issuing-ca.pem"), str(pem)],
        capture_output=True, text=True,
    )
    assert verify.stdout.strip().endswith("OK"), verify.stderr


def test_tsa_and_witness_certificates(key_store: keys.KeyStore, tmp_path: Path) -> None:
    tsa = x509.load_pem_x509_certificate(_role_cert(key_store, Role.TSA, tmp_path).read_bytes())
    eku = tsa.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical and list(eku.value) == [ExtendedKeyUsageOID.TIME_STAMPING]
    witness = x509.load_pem_x509_certificate(
        _role_cert(key_store, Role.WITNESS, tmp_path).read_bytes()
    )
    assert witness.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "koin Witness Signing Service"
    )


@pytest.mark.parametrize("ca", ["root-ca", "issuing-ca"])
def test_each_ca_has_a_crl_signed_by_it(koin_home: Path, ca: str) -> None:
    issuer = koin_home / "pki" / ("root-ca.pem" if ca == "root-ca" else "issuing-ca.pem")
    result = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-in", str(koin_home / "pki" / f"{ca}.crl"),
         "-CAfile", str(issuer), "-noout"],
        capture_output=True, text=True,
    )
    assert "verify OK" in result.stdout + result.stderr


def test_private_keys_are_encrypted_and_owner_only(koin_home: Path) -> None:
    files = [*(koin_home / "keys").glob("*.p12"), *(koin_home / "pki" / "private").glob("*.p12")]
    assert len(files) == 5
    for path in [*files, koin_home / "keys" / "passphrase"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in files:
        with pytest.raises(keys.PassphraseError):
            keys.read_pkcs12(path, b"")
        result = subprocess.run(
            ["openssl", "pkcs12", "-in", str(path), "-noout", "-passin", f"pass:{PASSPHRASE}"],
            capture_output=True, text=True,
        )
        assert result.returncode == 0, result.stderr


def test_init_is_idempotent(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_passphrase_file(home)
    first = keys.ensure_demo_pki(home, "http://example.test")
    before = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
    second = keys.ensure_demo_pki(home, "http://example.test")
    after = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
    assert first.created and not second.created
    assert before == after


def test_stale_crls_are_reissued(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_passphrase_file(home)
    keys.ensure_demo_pki(home, "http://example.test")
    assert keys.refresh_crls(home, "http://example.test") == []
    assert keys.refresh_crls(home, "http://example.test", force=True) == ["root-ca", "issuing-ca"]


def test_signer_per_role_is_loaded_once(key_store: keys.KeyStore) -> None:
    first = key_store.signer_for(Role.POSITION)
    assert key_store.signer_for(Role.POSITION) is first
    assert key_store.signer_for(Role.TSA) is not first
    assert first.signing_cert.subject.native["common_name"] == "Governor of Ibaraki Prefecture"


def test_passphrase_never_logged(
    koin_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = keys.KeyStore.open(koin_home)
    store.signer_for(Role.WITNESS)
    assert PASSPHRASE not in caplog.text


def _foreign_p12(tmp_path: Path, role: Role, passphrase: bytes) -> tuple[bytes, x509.Certificate]:
    """A key and certificate from another CA, as a real installation would import."""
    other = keys.generate_demo_pki(tmp_path / "other", b"x", "http://other.test")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = keys.issue_role_certificate(other.issuing, role, key.public_key())
    return keys.write_pkcs12("imported", key, cert, [other.issuing.certificate], passphrase), cert


def test_import_replaces_the_role_key(koin_home: Path, tmp_path: Path) -> None:
    import shutil

    home = tmp_path / "home"
    shutil.copytree(koin_home, home)
    data, cert = _foreign_p12(tmp_path, Role.POSITION, b"import-pass")
    store = keys.KeyStore.open(home)
    keys.import_pkcs12(store, Role.POSITION, data, b"import-pass", PASSPHRASE.encode())
    reopened = keys.KeyStore.open(home)
    assert reopened.certificate_for(Role.POSITION).dump() == keys.to_asn1(cert).dump()
    assert stat.S_IMODE((home / "keys" / "position.p12").stat().st_mode) == 0o600


def test_import_refuses_tsa_certificate_without_eku(koin_home: Path, tmp_path: Path) -> None:
    data, _ = _foreign_p12(tmp_path, Role.POSITION, b"p")
    store = keys.KeyStore.open(koin_home)
    with pytest.raises(keys.CertificateImportError) as info:
        keys.import_pkcs12(store, Role.TSA, data, b"p", PASSPHRASE.encode())
    assert "timeStamping" in info.value.message_en


def test_import_with_wrong_file_passphrase(koin_home: Path, tmp_path: Path) -> None:
    data, _ = _foreign_p12(tmp_path, Role.POSITION, b"right")
    with pytest.raises(keys.PassphraseError):
        keys.import_pkcs12(
            keys.KeyStore.open(koin_home), Role.POSITION, data, b"wrong", PASSPHRASE.encode()
        )


def test_export_roots(koin_home: Path, tmp_path: Path) -> None:
    written = keys.export_roots(koin_home, tmp_path / "out")
    assert [p.name for p in written] == ["root.pem", "chain.pem"]
    assert written[0].read_bytes() == (koin_home / "pki" / "root-ca.pem").read_bytes()

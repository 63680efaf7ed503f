"""Role keys in a PKCS#11 token (SoftHSM2): generated inside it, never extractable, used by the
signer and the embedded TSA from many threads, rotated; signatures checked by pdfsig (NSS),
pyHanko and openssl ts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pkcs11
import pytest
from asn1crypto import cms
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.util.rsa import encode_rsa_public_key
from pyhanko.sign.pkcs11 import PKCS11Signer

import keys
from keys import Role
from signer import Installation, SignatureLevel, SignOptions, sign_pdf
from signer.samples import make_permit_pdf
from tests.cli_language import assert_english
from tests.conftest import PASSPHRASE, PUBLIC_URL
from tests.validators import (
    extract_signatures,
    openssl,
    pdfsig,
    pdfsig_signatures,
    pyhanko_status,
)
from web.cli import cli

MODULE = keys.DEFAULT_MODULE
PIN = "52814-koin-user-pin"
SO_PIN = "90417-koin-so-pin"
WRONG_PIN = "77777-not-the-pin"
#: One token per scenario, all created before this process loads the module (SoftHSM2 reads
#: its token folder when it is initialised).
RSA_TOKEN, EC_TOKEN, IMPORT_TOKEN = "koin-rsa", "koin-ec", "koin-import"


@dataclass(frozen=True)
class Hsm:
    conf: Path
    pin_file: Path


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hsm]:
    """A SoftHSM2 of this module's own: its config, token folder and three fresh tokens."""
    folder = tmp_path_factory.mktemp("softhsm")
    (folder / "tokens").mkdir()
    conf = folder / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {folder / 'tokens'}\n"
        "objectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
    )
    pin_file = folder / "user-pin"
    keys.write_private_file(pin_file, PIN.encode() + b"\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", str(conf))
        patch.delenv(keys.PIN_ENV, raising=False)
        for label in (RSA_TOKEN, EC_TOKEN, IMPORT_TOKEN):
            subprocess.run(
                ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN,
                 "--so-pin", SO_PIN],
                check=True, capture_output=True,
            )
        yield Hsm(conf, pin_file)


def _env(home: Path, hsm: Hsm, **extra: str) -> dict[str, str]:
    return {
        "KOIN_HOME": str(home), "KOIN_LANG": "en", "PATH": "/usr/bin:/bin",
        "SOFTHSM2_CONF": str(hsm.conf), **extra,
    }


def _koin(home: Path, hsm: Hsm, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """The installed `koin` entry point in its own process, as an operator runs it."""
    koin = Path(sys.executable).parent / "koin"
    return subprocess.run(
        [str(koin), *args], capture_output=True, text=True, env=_env(home, hsm, **extra)
    )


def _invoke(home: Path, *args: str) -> tuple[int, str, str]:
    """`koin` inside this process (same token session as the test)."""
    result = CliRunner().invoke(
        cli, list(args), env={"KOIN_HOME": str(home), "KOIN_LANG": "en"}
    )
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def token_home(koin_home: Path, hsm: Hsm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh demo installation whose three keys `koin keys init-token` moved into a token."""
    home = tmp_path_factory.mktemp("token-home") / "home"
    shutil.copytree(koin_home, home)
    result = _koin(home, hsm, "keys", "init-token", "--token", RSA_TOKEN,
                   "--pin-file", str(hsm.pin_file))
    assert result.returncode == 0, result.stderr
    (home / "init-token.out").write_text(result.stdout)
    return home


def _session(hsm: Hsm, label: str) -> keys.TokenSession:
    return keys.open_token(MODULE, label, PIN, "test")


def _manifest(home: Path) -> dict[str, dict[str, str]]:
    roles: dict[str, dict[str, str]] = json.loads(
        (home / "keys" / "keystore.json").read_text()
    )["roles"]
    return roles


def _leaf(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def _token_certificate(token: keys.TokenSession, label: str) -> x509.Certificate:
    with token.lock:
        [obj] = token.session.get_objects(
            {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: label}
        )
        return x509.load_der_x509_certificate(bytes(obj[Attribute.VALUE]))


def _private_key(token: keys.TokenSession, label: str) -> pkcs11.PrivateKey:
    with token.lock:
        [key] = token.session.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}
        )
        assert isinstance(key, pkcs11.PrivateKey)
        return key


def _sign_file(home: Path, hsm: Hsm, source: Path, out: Path, *args: str) -> None:
    result = _koin(home, hsm, "sign", str(source), str(out), *args)
    assert result.returncode == 0, result.stderr


def _signer_certificate(pdf: bytes) -> asn1_x509.Certificate:
    [signature] = extract_signatures(pdf)
    signed_data = cms.ContentInfo.load(signature.cms_der)["content"]
    serial = signed_data["signer_infos"][0]["sid"].chosen["serial_number"].native
    for choice in signed_data["certificates"]:
        if choice.chosen.serial_number == serial:
            return choice.chosen
    raise AssertionError("the signer's certificate is not embedded")


def _assert_valid_bt(
    pdf: Path, nss_db: Path, root_cert: asn1_x509.Certificate, root_pem: Path, chain_pem: Path,
    tmp_path: Path,
) -> None:
    """pdfsig (NSS trusting our root), pyHanko, and openssl ts over the signature timestamp."""
    [block] = pdfsig_signatures(pdfsig(pdf, nss_db))
    assert "Signature is Valid." in block and "Certificate is Trusted." in block, block
    data = pdf.read_bytes()
    status = pyhanko_status(data, root_cert)
    assert status.intact and status.valid and status.trusted and status.bottom_line
    assert status.timestamp_validity is not None and status.timestamp_validity.trusted
    [signature] = extract_signatures(data)
    assert signature.timestamp_token_der is not None
    token = tmp_path / f"{pdf.stem}.tst"
    token.write_bytes(signature.timestamp_token_der)
    value = tmp_path / f"{pdf.stem}.sigvalue"
    value.write_bytes(signature.signature_value)
    verified = openssl(
        "ts", "-verify", "-data", str(value), "-in", str(token), "-token_in",
        "-CAfile", str(root_pem), "-untrusted", str(chain_pem),
    )
    assert "Verification: OK" in verified.stdout, verified.stdout + verified.stderr


@pytest.fixture
def permit_file(tmp_path: Path, one_page_permit: bytes) -> Path:
    path = tmp_path / "permit.pdf"
    path.write_bytes(one_page_permit)
    return path


# -- init-token --------------------------------------------------------------------------


def test_init_token_moves_every_role_into_the_token(token_home: Path, hsm: Hsm) -> None:
    output = (token_home / "init-token.out").read_text()
    manifest = _manifest(token_home)
    token = _session(hsm, RSA_TOKEN)
    for role in Role:
        entry = manifest[role.value]
        assert entry["backend"] == "pkcs11"
        assert entry["module"] == MODULE and entry["token"] == RSA_TOKEN
        assert entry["key_label"] == f"koin-{role.value}"
        assert entry["pin_file"] == str(hsm.pin_file.resolve())
        on_disk = _leaf(token_home / "keys" / entry["certificate"])
        assert _token_certificate(token, entry["key_label"]) == on_disk
        assert f"serial:   {on_disk.serial_number:x}" in output
        assert on_disk.subject.rfc4514_string() in output
        # The old key file is gone; its certificate is archived.
        assert not (token_home / "keys" / f"{role.value}.p12").exists()
        assert len(list((token_home / "keys" / "archive").glob(f"{role.value}-*.pem"))) == 1
    assert "Governor of Ibaraki Prefecture" in output
    assert output.count("generated in the token") == 3
    assert f"Switched the key store to the PKCS#11 token {RSA_TOKEN!r}" in output
    subjects = [  # certificate data: the governor's title is 知事 / Governor
        _leaf(token_home / "keys" / manifest[role.value]["certificate"]).subject.rfc4514_string()
        for role in Role
    ]
    assert_english(output, *subjects)
    assert PIN not in output and PIN not in (token_home / "keys" / "keystore.json").read_text()
    # No private key is left in a file below keys/; the CA keys stay where they were.
    for path in (token_home / "keys").rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes() and path.suffix != ".p12", path
    assert sorted(p.name for p in (token_home / "pki" / "private").iterdir()) == [
        "issuing-ca.p12", "root-ca.p12"
    ]


def test_store_hands_out_token_signers(token_home: Path, hsm: Hsm) -> None:
    store = keys.KeyStore.open(token_home)
    signer = store.signer_for(Role.POSITION)
    assert isinstance(signer, PKCS11Signer)
    assert store.signer_for(Role.POSITION) is signer, "loaded once per store"
    assert signer.signing_cert.subject.native["common_name"] == "Governor of Ibaraki Prefecture"
    tsa = store.credentials(Role.TSA)
    assert isinstance(tsa.signer, PKCS11Signer)
    assert [c.subject.native["common_name"] for c in tsa.chain] == [
        "Ibaraki Prefecture Demo Issuing CA", "Ibaraki Prefecture Demo Root CA"
    ]


def test_sign_bt_with_token_keys_passes_every_validator(
    token_home: Path, hsm: Hsm, permit_file: Path, tmp_path: Path, nss_db: Path,
    root_cert: asn1_x509.Certificate, root_pem: Path, chain_pem: Path,
) -> None:
    out = tmp_path / "signed.pdf"
    _sign_file(token_home, hsm, permit_file, out)  # default level B-T, embedded TSA
    _assert_valid_bt(out, nss_db, root_cert, root_pem, chain_pem, tmp_path)
    data = out.read_bytes()
    position = _leaf(token_home / "keys" / "position.pem")
    assert _signer_certificate(data).dump() == position.public_bytes(
        serialization.Encoding.DER
    )
    # The timestamp was signed by the TSA key in the token.
    [signature] = extract_signatures(data)
    assert signature.timestamp_token_der is not None
    token_content = cms.ContentInfo.load(signature.timestamp_token_der)["content"]
    tsa_certs = [c.chosen.dump() for c in token_content["certificates"]]
    tsa = _leaf(token_home / "keys" / "tsa.pem").public_bytes(serialization.Encoding.DER)
    assert tsa in tsa_certs


def test_private_keys_never_leave_the_token(token_home: Path, hsm: Hsm) -> None:
    token = _session(hsm, RSA_TOKEN)
    with token.lock:
        wrapping = token.session.generate_key(
            KeyType.AES, 256, store=False,
            capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP | MechanismFlag.ENCRYPT,
        )
    for role in Role:
        key = _private_key(token, f"koin-{role.value}")
        with token.lock:
            assert key[Attribute.SENSITIVE] is True
            assert key[Attribute.EXTRACTABLE] is False
            assert key[Attribute.ALWAYS_SENSITIVE] is True
            assert key[Attribute.NEVER_EXTRACTABLE] is True
            assert key[Attribute.DECRYPT] is False, "sign only"
            for secret in (Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1, Attribute.PRIME_2):
                with pytest.raises(p11.AttributeSensitive):
                    key[secret]
            with pytest.raises((p11.AttributeSensitive, p11.AttributeTypeInvalid)):
                key[Attribute.VALUE]
            with pytest.raises(p11.KeyUnextractable):
                wrapping.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
            with pytest.raises(p11.AttributeReadOnly):
                key[Attribute.EXTRACTABLE] = True
            assert key[Attribute.EXTRACTABLE] is False


def test_four_threads_sign_forty_documents_with_one_store(
    token_home: Path, hsm: Hsm, root_cert: asn1_x509.Certificate
) -> None:
    installation = Installation(token_home, public_url=PUBLIC_URL)
    context = installation.signing_context(Role.POSITION)
    base = make_permit_pdf(installation.font_file, pages=1)
    documents = [base + b"%% copy %d\n" % i for i in range(40)]

    def sign(data: bytes) -> bytes:
        result = sign_pdf(data, context, SignOptions(level=SignatureLevel.B_T))
        assert result.data is not None
        return result.data

    with ThreadPoolExecutor(4) as pool:
        signed = list(pool.map(sign, documents))
    assert len({hashlib.sha256(d).hexdigest() for d in signed}) == 40
    for data in signed:
        status = pyhanko_status(data, root_cert)
        assert status.intact and status.valid and status.trusted and status.bottom_line
        assert status.timestamp_validity is not None and status.timestamp_validity.valid


def test_batch_workers_in_separate_processes_each_log_in(
    token_home: Path, hsm: Hsm, tmp_path: Path, root_cert: asn1_x509.Certificate,
    one_page_permit: bytes,
) -> None:
    source = tmp_path / "in"
    source.mkdir()
    for i in range(4):
        (source / f"permit-{i}.pdf").write_bytes(one_page_permit + b"%% %d\n" % i)
    result = _koin(token_home, hsm, "sign-batch", str(source), str(tmp_path / "out"),
                   "--workers", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    for i in range(4):
        data = (tmp_path / "out" / f"permit-{i}.pdf").read_bytes()
        assert pyhanko_status(data, root_cert).bottom_line


# -- refusals ------------------------------------------------------------------------------


def test_wrong_pin_is_a_clear_refusal(
    token_home: Path, hsm: Hsm, permit_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "never.pdf"
    result = _koin(token_home, hsm, "sign", str(permit_file), str(out),
                   **{keys.PIN_ENV: WRONG_PIN})
    assert result.returncode == 1
    assert result.stderr == (
        f"koin: The PKCS#11 token '{RSA_TOKEN}' refused the PIN (check KOIN_PKCS11_PIN).\n"
    )
    assert not out.exists()
    japanese = _koin(token_home, hsm, "sign", str(permit_file), str(out),
                     KOIN_LANG="ja", **{keys.PIN_ENV: WRONG_PIN})
    assert japanese.returncode == 1 and "PIN を受け付けません" in japanese.stderr
    for text in (result.stdout, result.stderr, japanese.stderr):
        assert WRONG_PIN not in text and PIN not in text and "Traceback" not in text


def test_pin_never_logged(token_home: Path, hsm: Hsm) -> None:
    """A fresh process with every logger at DEBUG: login and key lookup are logged, the PIN
    is not."""
    script = (
        "import logging, sys; from pathlib import Path; import keys; "
        "logging.basicConfig(level=logging.DEBUG); "
        "keys.KeyStore.open(Path(sys.argv[1])).signer_for(keys.Role.WITNESS)"
    )
    for extra in ({}, {keys.PIN_ENV: PIN}):
        result = subprocess.run(
            [sys.executable, "-c", script, str(token_home)], capture_output=True, text=True,
            env=_env(token_home, hsm, **extra),
        )
        assert result.returncode == 0, result.stderr
        assert f"logged in to token '{RSA_TOKEN}'" in result.stderr
        assert "koin-witness" in result.stderr
        assert PIN not in result.stdout + result.stderr


def test_a_second_pin_in_one_process_is_refused(
    token_home: Path, hsm: Hsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys.KeyStore.open(token_home).signer_for(Role.WITNESS)
    # This process is logged in with the right PIN; another PIN is refused, not ignored.
    monkeypatch.setenv(keys.PIN_ENV, WRONG_PIN)
    with pytest.raises(keys.PinError) as info:
        keys.KeyStore.open(token_home).signer_for(Role.WITNESS)
    assert "another PIN" in info.value.message_en
    assert WRONG_PIN not in str(info.value)


def test_pin_file_readable_by_others_is_refused(
    token_home: Path, hsm: Hsm, tmp_path: Path, permit_file: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(token_home, home)
    loose = tmp_path / "loose-pin"
    loose.write_text(PIN)
    loose.chmod(0o644)
    manifest = json.loads((home / "keys" / "keystore.json").read_text())
    for entry in manifest["roles"].values():
        entry["pin_file"] = str(loose)
    (home / "keys" / "keystore.json").write_text(json.dumps(manifest))
    result = _koin(home, hsm, "sign", str(permit_file), str(tmp_path / "o.pdf"))
    assert result.returncode == 1
    assert result.stderr == (
        f"koin: The PIN file {loose} is readable by other users; chmod 600 it.\n"
    )
    del manifest["roles"]["position"]["pin_file"]
    (home / "keys" / "keystore.json").write_text(json.dumps(manifest))
    result = _koin(home, hsm, "sign", str(permit_file), str(tmp_path / "o.pdf"))
    assert result.returncode == 1
    assert result.stderr == "koin: No PKCS#11 PIN: set KOIN_PKCS11_PIN.\n"


def test_missing_module_or_token_is_a_clear_error(
    koin_home: Path, token_home: Path, hsm: Hsm, tmp_path: Path, permit_file: Path
) -> None:
    fresh = tmp_path / "fresh"
    shutil.copytree(koin_home, fresh)
    before = (fresh / "keys" / "keystore.json").read_bytes()
    code, _, err = _invoke(fresh, "keys", "init-token", "--module", "/nonexistent/libp11.so",
                           "--token", RSA_TOKEN, "--pin-file", str(hsm.pin_file))
    assert code == 1
    assert err == (
        "koin: The PKCS#11 module /nonexistent/libp11.so does not exist; check the path.\n"
    )
    code, _, err = _invoke(fresh, "keys", "init-token", "--token", "no-such-token",
                           "--pin-file", str(hsm.pin_file))
    assert code == 1
    assert err.startswith(f"koin: No token labelled 'no-such-token' in the PKCS#11 module {MODULE}")
    assert f"'{RSA_TOKEN}'" in err, "the known tokens are listed"
    assert (fresh / "keys" / "keystore.json").read_bytes() == before, "nothing switched"
    assert (fresh / "keys" / "position.p12").exists()

    # A key store pointing at a module or token that went away.
    for field, value, expected in (
        ("module", "/opt/hsm/gone.so", "The PKCS#11 module /opt/hsm/gone.so does not exist"),
        ("token", "gone", "No token labelled 'gone'"),
    ):
        home = tmp_path / field
        shutil.copytree(token_home, home)
        manifest = json.loads((home / "keys" / "keystore.json").read_text())
        manifest["roles"]["position"][field] = value
        (home / "keys" / "keystore.json").write_text(json.dumps(manifest))
        result = _koin(home, hsm, "sign", str(permit_file), str(tmp_path / "o.pdf"))
        assert result.returncode == 1 and expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_init_token_refuses_taken_labels_and_a_second_run(
    koin_home: Path, token_home: Path, hsm: Hsm, tmp_path: Path
) -> None:
    code, _, err = _invoke(token_home, "keys", "init-token", "--token", RSA_TOKEN,
                           "--pin-file", str(hsm.pin_file))
    assert code == 1 and "already uses the PKCS#11 token" in err
    fresh = tmp_path / "fresh"
    shutil.copytree(koin_home, fresh)
    code, _, err = _invoke(fresh, "keys", "init-token", "--token", RSA_TOKEN,
                           "--pin-file", str(hsm.pin_file))
    assert code == 1
    assert "already holds an object labelled 'koin-position'" in err
    assert "--import-cert position=cert.pem" in err


# -- keys already in a token -------------------------------------------------------------


def _external_key(token: keys.TokenSession, label: str, *, extractable: bool = False) -> bytes:
    """A key pair made by the HSM's own tools (not by koin); returns its SubjectPublicKeyInfo."""
    with token.lock:
        public, _ = token.session.generate_keypair(
            KeyType.RSA, 2048, id=label.encode(), label=label, store=True,
            private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: extractable},
        )
        pkcs1 = encode_rsa_public_key(public)
    return bytes(asn1_keys.PublicKeyInfo(
        {"algorithm": {"algorithm": "rsa"}, "public_key": asn1_keys.RSAPublicKey.load(pkcs1)}
    ).dump())


def test_import_certificates_for_keys_already_in_the_token(
    koin_home: Path, hsm: Hsm, tmp_path: Path, permit_file: Path, nss_db: Path,
    root_cert: asn1_x509.Certificate, root_pem: Path, chain_pem: Path,
) -> None:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home)
    token = _session(hsm, IMPORT_TOKEN)
    ca = keys.load_certificate_authority(
        keys.PkiLayout(home), "issuing-ca", PASSPHRASE.encode(), PUBLIC_URL
    )
    files: dict[Role, Path] = {}
    for role in Role:
        spki = _external_key(token, f"hsm-{role.value}")
        public_key = serialization.load_der_public_key(spki)
        assert isinstance(public_key, rsa.RSAPublicKey)
        certificate = keys.issue_role_certificate(ca, role, public_key)
        files[role] = tmp_path / f"{role.value}.pem"
        files[role].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    labels = [f"--key-label={role.value}=hsm-{role.value}" for role in Role]

    # A certificate that belongs to another key is refused before anything changes.
    mixed = [f"--import-cert=position={files[Role.WITNESS]}",
             f"--import-cert=witness={files[Role.WITNESS]}", f"--import-cert=tsa={files[Role.TSA]}"]
    code, _, err = _invoke(home, "keys", "init-token", "--token", IMPORT_TOKEN,
                           "--pin-file", str(hsm.pin_file), *labels, *mixed)
    assert (code, err) == (1, "koin: The key in the token does not match the certificate.\n")
    assert _manifest(home)["position"]["backend"] == "pkcs12"

    imports = [f"--import-cert={role.value}={files[role]}" for role in Role]
    code, out, err = _invoke(home, "keys", "init-token", "--token", IMPORT_TOKEN,
                             "--pin-file", str(hsm.pin_file), *labels, *imports)
    assert code == 0, err
    assert out.count("the key already in the token") == 3
    assert_english(out, *(_leaf(files[role]).subject.rfc4514_string() for role in Role))
    for role in Role:
        assert _manifest(home)[role.value]["key_label"] == f"hsm-{role.value}"
        assert _token_certificate(token, f"hsm-{role.value}") == _leaf(files[role])
    out_pdf = tmp_path / "signed.pdf"
    _sign_file(home, hsm, permit_file, out_pdf)
    _assert_valid_bt(out_pdf, nss_db, root_cert, root_pem, chain_pem, tmp_path)


def test_import_refuses_an_extractable_key(
    koin_home: Path, hsm: Hsm, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home)
    token = _session(hsm, IMPORT_TOKEN)
    spki = _external_key(token, "loose-position", extractable=True)
    ca = keys.load_certificate_authority(
        keys.PkiLayout(home), "issuing-ca", PASSPHRASE.encode(), PUBLIC_URL
    )
    public_key = serialization.load_der_public_key(spki)
    assert isinstance(public_key, rsa.RSAPublicKey)
    cert = tmp_path / "position.pem"
    cert.write_bytes(keys.issue_role_certificate(ca, Role.POSITION, public_key).public_bytes(
        serialization.Encoding.PEM
    ))
    code, _, err = _invoke(home, "keys", "init-token", "--token", IMPORT_TOKEN,
                           "--pin-file", str(hsm.pin_file), "--label-prefix", "loose",
                           f"--import-cert=position={cert}")
    assert code == 1 and "can be extracted" in err, err


# -- EC keys -------------------------------------------------------------------------------


def test_ec_p256_keys_in_the_token(
    koin_home: Path, hsm: Hsm, tmp_path: Path, permit_file: Path, nss_db: Path,
    root_cert: asn1_x509.Certificate, root_pem: Path, chain_pem: Path,
) -> None:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home)
    pin_file = home / "keys" / "pkcs11-pin"
    keys.write_private_file(pin_file, PIN.encode())
    result = _koin(home, hsm, "keys", "init-token", "--token", EC_TOKEN, "--key-type",
                   "ec-p256", "--pin-file", str(pin_file))
    assert result.returncode == 0, result.stderr
    # A PIN file inside KOIN_HOME/keys is recorded relative to it (the folder may move).
    assert {e["pin_file"] for e in _manifest(home).values()} == {"pkcs11-pin"}
    for role in Role:
        public_key = _leaf(home / "keys" / f"{role.value}.pem").public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert public_key.curve.name == "secp256r1"
    out = tmp_path / "signed.pdf"
    _sign_file(home, hsm, permit_file, out)
    _assert_valid_bt(out, nss_db, root_cert, root_pem, chain_pem, tmp_path)


# -- rotation ------------------------------------------------------------------------------


def _serial(pdf: bytes) -> int:
    serial: int = _signer_certificate(pdf).serial_number
    return serial


def test_rotate_position_key_in_the_token(
    token_home: Path, hsm: Hsm, tmp_path: Path, permit_file: Path, nss_db: Path,
    root_cert: asn1_x509.Certificate, root_pem: Path, chain_pem: Path,
) -> None:
    home = tmp_path / "home"
    shutil.copytree(token_home, home)  # same token and keys; rotation changes only this copy
    before = tmp_path / "before.pdf"
    _sign_file(home, hsm, permit_file, before)
    old_certificate = _leaf(home / "keys" / "position.pem")

    code, out, err = _invoke(home, "keys", "rotate", "position")
    assert code == 0, err
    entry = _manifest(home)["position"]
    assert entry["key_label"].startswith("koin-position-") and entry["token"] == RSA_TOKEN
    new_certificate = _leaf(home / "keys" / entry["certificate"])
    assert new_certificate.serial_number != old_certificate.serial_number
    assert new_certificate.public_key() != old_certificate.public_key()
    assert f"subject:  {new_certificate.subject.rfc4514_string()}" in out
    assert f"serial:   {new_certificate.serial_number:x}" in out
    assert f"{new_certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC" in out
    assert "koin-position" in out, "the old key's label is reported"
    assert out.startswith("Replaced the position key (pkcs11):")
    assert "The old key stays in the token with the label koin-position" in out
    assert_english(out, new_certificate.subject.rfc4514_string())
    archived = list(
        (home / "keys" / "archive").glob(f"position-*-{old_certificate.serial_number:x}.pem")
    )
    assert len(archived) == 1 and _leaf(archived[0]) == old_certificate
    assert not (home / "keys" / "position.pem").exists()
    token = _session(hsm, RSA_TOKEN)
    key = _private_key(token, entry["key_label"])
    with token.lock:
        assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
    assert _token_certificate(token, entry["key_label"]) == new_certificate
    assert _manifest(home)["witness"] == _manifest(token_home)["witness"], "only position"

    after = tmp_path / "after.pdf"
    _sign_file(home, hsm, permit_file, after)
    for pdf in (before, after):
        _assert_valid_bt(pdf, nss_db, root_cert, root_pem, chain_pem, tmp_path)
    assert _serial(before.read_bytes()) == old_certificate.serial_number
    assert _serial(after.read_bytes()) == new_certificate.serial_number


def test_rotate_pkcs12_store(
    koin_home: Path, tmp_path: Path, permit_file: Path, nss_db: Path,
    root_cert: asn1_x509.Certificate, root_pem: Path, chain_pem: Path,
) -> None:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home)
    koin = Path(sys.executable).parent / "koin"
    env = {"KOIN_HOME": str(home), "KOIN_LANG": "en", "PATH": "/usr/bin:/bin"}

    def sign(out: Path) -> None:
        result = subprocess.run([str(koin), "sign", str(permit_file), str(out)],
                                capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr

    before = tmp_path / "before.pdf"
    sign(before)
    old_certificate = x509.load_der_x509_certificate(
        keys.KeyStore.open(home).certificate_for(Role.POSITION).dump()
    )
    rotated = subprocess.run([str(koin), "keys", "rotate", "position"],
                             capture_output=True, text=True, env=env)
    assert rotated.returncode == 0, rotated.stderr
    entry = _manifest(home)["position"]
    assert entry["backend"] == "pkcs12" and entry["file"] != "position.p12"
    new_file = home / "keys" / entry["file"]
    assert stat.S_IMODE(new_file.stat().st_mode) == 0o600
    assert not (home / "keys" / "position.p12").exists(), "the old key file is gone"
    _, new_certificate, _ = keys.read_pkcs12(new_file, PASSPHRASE.encode())
    assert new_certificate.serial_number != old_certificate.serial_number
    assert f"serial:   {new_certificate.serial_number:x}" in rotated.stdout
    assert new_certificate.subject.rfc4514_string() in rotated.stdout
    [archived] = (home / "keys" / "archive").glob("position-*.pem")
    assert _leaf(archived) == old_certificate

    after = tmp_path / "after.pdf"
    sign(after)
    for pdf in (before, after):
        _assert_valid_bt(pdf, nss_db, root_cert, root_pem, chain_pem, tmp_path)
    assert _serial(before.read_bytes()) == old_certificate.serial_number
    assert _serial(after.read_bytes()) == new_certificate.serial_number


def test_rotate_needs_the_demo_ca(koin_home: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home)
    (home / "pki" / "private" / "issuing-ca.p12").unlink()
    before = (home / "keys" / "keystore.json").read_bytes()
    code, _, err = _invoke(home, "keys", "rotate", "tsa")
    assert code == 1 and "No demo CA key" in err
    assert (home / "keys" / "keystore.json").read_bytes() == before
    assert not os.path.exists(home / "keys" / "archive")

"""Demo PKI: root CA → issuing CA → position, witness and TSA certificates, with CRLs.

A real installation imports its own certificates (``koin keys import``); this generator gives an
embedded installation and the test suite a complete, realistic chain. Certificates carry CRL
distribution points that point at the service's own URL and no OCSP AIA (poppler 22.12
mis-reports chains that announce OCSP).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._files import write_private_file, write_public_file
from ._roles import Role
from ._store import write_pkcs12

__all__ = [
    "CertificateAuthority",
    "DemoPki",
    "PkiLayout",
    "generate_demo_pki",
    "issue_crl",
    "issue_role_certificate",
    "load_certificate_authority",
]

ORGANIZATION = "Ibaraki Prefecture"
ROOT_NAME = "Ibaraki Prefecture Demo Root CA"
ISSUING_NAME = "Ibaraki Prefecture Demo Issuing CA"

#: Subject of each role's certificate (C, O, [title], CN), outermost RDN first.
ROLE_SUBJECTS: dict[Role, tuple[str, str | None]] = {
    Role.POSITION: ("Governor of Ibaraki Prefecture", "知事 / Governor"),
    Role.WITNESS: ("koin Witness Signing Service", None),
    Role.TSA: ("koin Time-Stamping Authority", None),
}

CA_KEY_BITS = 3072
LEAF_KEY_BITS = 2048
CRL_LIFETIME = dt.timedelta(days=7)


@dataclass(frozen=True)
class PkiLayout:
    """Where the PKI of one installation lives below ``KOIN_HOME``."""

    home: Path

    @property
    def pki_dir(self) -> Path:
        return self.home / "pki"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def root_cert(self) -> Path:
        return self.pki_dir / "root-ca.pem"

    @property
    def issuing_cert(self) -> Path:
        return self.pki_dir / "issuing-ca.pem"

    def ca_key(self, name: str) -> Path:
        return self.pki_dir / "private" / f"{name}.p12"

    def crl(self, name: str) -> Path:
        return self.pki_dir / f"{name}.crl"

    def role_key(self, role: Role) -> Path:
        return self.keys_dir / f"{role.value}.p12"


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA certificate with its private key, able to issue certificates and CRLs."""

    name: str  # file stem, e.g. "issuing-ca"
    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey
    crl_url: str | None  # where relying parties fetch this CA's CRL


@dataclass(frozen=True)
class DemoPki:
    root: CertificateAuthority
    issuing: CertificateAuthority
    role_certificates: dict[Role, x509.Certificate]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _name(common_name: str, title: str | None = None) -> x509.Name:
    attributes = [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
    ]
    if title:
        attributes.append(x509.NameAttribute(NameOID.TITLE, title))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _crl_url(public_url: str, ca_name: str) -> str:
    return f"{public_url.rstrip('/')}/pki/{ca_name}.crl"


def _cdp(url: str) -> x509.CRLDistributionPoints:
    return x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(url)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )


def _key_usage(*, signing: bool = False, ca: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signing,
        content_commitment=signing,  # a.k.a. nonRepudiation
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca(
    name: str,
    common_name: str,
    issuer: CertificateAuthority | None,
    public_url: str,
    not_before: dt.datetime,
    lifetime: dt.timedelta,
) -> CertificateAuthority:
    key = rsa.generate_private_key(public_exponent=65537, key_size=CA_KEY_BITS)
    subject = _name(common_name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + lifetime)
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0),
            critical=True,
        )
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    signing_key = key
    if issuer is not None:
        signing_key = issuer.private_key
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.private_key.public_key()),
            critical=False,
        )
        if issuer.crl_url:
            builder = builder.add_extension(_cdp(issuer.crl_url), critical=False)
    certificate = builder.sign(signing_key, hashes.SHA256())
    return CertificateAuthority(name, certificate, key, _crl_url(public_url, name))


def issue_role_certificate(
    ca: CertificateAuthority,
    role: Role,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    *,
    not_before: dt.datetime | None = None,
    lifetime: dt.timedelta = dt.timedelta(days=3 * 365),
) -> x509.Certificate:
    """Issue the certificate of ``role`` for ``public_key`` from ``ca``.

    The position and witness certificates allow digitalSignature + nonRepudiation; the TSA
    certificate carries the critical id-kp-timeStamping EKU that RFC 3161 §2.3 requires.
    """
    common_name, title = ROLE_SUBJECTS[role]
    not_before = not_before or _now() - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, title))
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_before + lifetime, ca.certificate.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signing=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()),
            critical=False,
        )
    )
    if ca.crl_url:
        builder = builder.add_extension(_cdp(ca.crl_url), critical=False)
    if role is Role.TSA:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True
        )
    return builder.sign(ca.private_key, hashes.SHA256())


def issue_crl(
    ca: CertificateAuthority,
    revoked_serials: Sequence[int] = (),
    *,
    crl_number: int | None = None,
    this_update: dt.datetime | None = None,
    lifetime: dt.timedelta = CRL_LIFETIME,
) -> x509.CertificateRevocationList:
    """Issue a CRL of ``ca`` listing ``revoked_serials`` (reason unspecified)."""
    this_update = this_update or _now() - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(this_update)
        .next_update(this_update + lifetime)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.CRLNumber(crl_number if crl_number is not None else int(this_update.timestamp())),
            critical=False,
        )
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(this_update)
            .build()
        )
    return builder.sign(ca.private_key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def generate_demo_pki(
    home: Path,
    passphrase: bytes,
    public_url: str,
    *,
    not_before: dt.datetime | None = None,
    leaf_lifetime: dt.timedelta = dt.timedelta(days=3 * 365),
) -> DemoPki:
    """Generate a complete demo PKI below ``home`` and write it out.

    Writes ``pki/root-ca.pem``, ``pki/issuing-ca.pem``, ``pki/chain.pem``, one CRL per CA, the CA
    keys as ``pki/private/*.p12`` and one ``keys/ROLE.p12`` per role, every PKCS#12 file
    encrypted with ``passphrase`` and readable by the owner only.
    """
    layout = PkiLayout(home)
    start = not_before or _now() - dt.timedelta(minutes=5)
    root = _make_ca("root-ca", ROOT_NAME, None, public_url, start, dt.timedelta(days=20 * 365))
    issuing = _make_ca(
        "issuing-ca", ISSUING_NAME, root, public_url, start, dt.timedelta(days=10 * 365)
    )
    for ca, issuer_chain in ((root, []), (issuing, [root.certificate])):
        write_private_file(
            layout.ca_key(ca.name),
            write_pkcs12(ca.name, ca.private_key, ca.certificate, issuer_chain, passphrase),
        )
    write_public_file(layout.root_cert, _pem(root.certificate))
    write_public_file(layout.issuing_cert, _pem(issuing.certificate))
    chain = _pem(issuing.certificate) + _pem(root.certificate)
    write_public_file(layout.pki_dir / "chain.pem", chain)

    role_certificates: dict[Role, x509.Certificate] = {}
    for role in Role:
        key = rsa.generate_private_key(public_exponent=65537, key_size=LEAF_KEY_BITS)
        certificate = issue_role_certificate(
            issuing, role, key.public_key(), not_before=start, lifetime=leaf_lifetime
        )
        role_certificates[role] = certificate
        write_private_file(
            layout.role_key(role),
            write_pkcs12(
                role.value, key, certificate, [issuing.certificate, root.certificate], passphrase
            ),
        )
    write_crls(layout, [root, issuing])
    return DemoPki(root, issuing, role_certificates)


def write_crls(
    layout: PkiLayout,
    authorities: Sequence[CertificateAuthority],
    revoked: dict[str, Sequence[int]] | None = None,
) -> None:
    """(Re-)issue and write the DER CRL of each CA in ``authorities``."""
    for ca in authorities:
        crl = issue_crl(ca, (revoked or {}).get(ca.name, ()))
        write_public_file(layout.crl(ca.name), crl.public_bytes(serialization.Encoding.DER))


def load_certificate_authority(
    layout: PkiLayout, name: str, passphrase: bytes, public_url: str
) -> CertificateAuthority:
    """Load a demo CA (certificate and key) written by :func:`generate_demo_pki`.

    :raises PassphraseError: the passphrase does not open the CA key.
    :raises KeyStoreError: the CA files are missing.
    """
    from ._store import read_pkcs12

    key, certificate, _ = read_pkcs12(layout.ca_key(name), passphrase)
    if not isinstance(key, rsa.RSAPrivateKey):
        from .errors import KeyStoreError

        raise KeyStoreError("CA 鍵が RSA ではありません。", "The CA key is not an RSA key.")
    return CertificateAuthority(name, certificate, key, _crl_url(public_url, name))

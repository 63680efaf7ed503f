"""The key store: the one place private keys are loaded.

``KeyStore.open(home)`` reads ``keys/keystore.json`` (which backend holds each role's key) and
hands out a pyHanko :class:`~pyhanko.sign.signers.Signer` per role. Keys are loaded once per
process and cached, because parsing an RSA key with full validation costs ~30 ms (and logging in
to a token more). A backend is anything implementing :class:`KeyBackend`: PKCS#12 files
(:class:`Pkcs12Backend`) or a PKCS#11 token (:class:`keys.Pkcs11Backend`); callers do not know
which.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from pyhanko.sign.signers import Signer
from pyhanko_certvalidator.registry import SimpleCertificateStore
from pyhanko_certvalidator.util import get_pyca_cryptography_hash

from ._files import write_private_file
from ._roles import Role
from .errors import CertificateImportError, KeyStoreError, PassphraseError, RoleNotConfigured

__all__ = [
    "KeyBackend",
    "KeyStore",
    "LocalKeySigner",
    "Pkcs12Backend",
    "RoleCredentials",
    "import_pkcs12",
    "read_pkcs12",
    "resolve_passphrase",
    "write_pkcs12",
]

PASSPHRASE_ENV = "KOIN_KEY_PASSPHRASE"
PASSPHRASE_FILE = "passphrase"
MANIFEST_FILE = "keystore.json"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def to_asn1(certificate: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))


def resolve_passphrase(home: Path, *, create: bool = False) -> bytes:
    """Return the key store passphrase.

    ``KOIN_KEY_PASSPHRASE`` wins; otherwise ``keys/passphrase`` beside the key files, which must
    be readable by its owner only. With ``create=True`` (``koin init`` of a demo installation) a
    random passphrase is written there when neither exists.

    :raises PassphraseError: no passphrase is available, or its file is readable by others.
    """
    from_env = os.environ.get(PASSPHRASE_ENV)
    if from_env:
        return from_env.encode("utf-8")
    path = home / "keys" / PASSPHRASE_FILE
    if path.exists():
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PassphraseError(
                f"パスフレーズファイル {path} が他のユーザーから読めます"
                "(chmod 600 にしてください)。",
                f"The passphrase file {path} is readable by other users; chmod 600 it.",
            )
        value = path.read_bytes().strip()
        if not value:
            raise PassphraseError(
                f"パスフレーズファイル {path} が空です。", f"The passphrase file {path} is empty."
            )
        return value
    if create:
        value = secrets.token_urlsafe(32).encode("ascii")
        write_private_file(path, value + b"\n")
        return value
    raise PassphraseError(
        f"鍵のパスフレーズがありません。{PASSPHRASE_ENV} を設定するか {path} を置いてください。",
        f"No key passphrase: set {PASSPHRASE_ENV} or create {path} (mode 0600).",
    )


def write_pkcs12(
    name: str,
    key: PrivateKey,
    certificate: x509.Certificate,
    chain: Sequence[x509.Certificate],
    passphrase: bytes,
) -> bytes:
    """Serialise a key, its certificate and CA chain as PKCS#12 (AES-256, PBKDF2)."""
    return pkcs12.serialize_key_and_certificates(
        name.encode("utf-8"),
        key,
        certificate,
        list(chain) or None,
        serialization.BestAvailableEncryption(passphrase),
    )


def read_pkcs12(
    path: Path, passphrase: bytes
) -> tuple[PrivateKey, x509.Certificate, list[x509.Certificate]]:
    """Open a PKCS#12 file holding one private key, its certificate and optionally CA certs.

    :raises KeyStoreError: the file is missing or holds no key and certificate.
    :raises PassphraseError: the passphrase does not open it.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyStoreError(
            f"鍵ファイル {path} がありません。`koin init` を実行してください。",
            f"Key file {path} does not exist; run `koin init`.",
        ) from exc
    return _parse_pkcs12(data, passphrase, str(path))


def _parse_pkcs12(
    data: bytes, passphrase: bytes, label: str
) -> tuple[PrivateKey, x509.Certificate, list[x509.Certificate]]:
    try:
        key, certificate, extra = pkcs12.load_key_and_certificates(data, passphrase)
    except ValueError as exc:
        raise PassphraseError(
            f"{label} を開けません: パスフレーズが違うか、PKCS#12 ファイルではありません。",
            f"Cannot open {label}: wrong passphrase or not a PKCS#12 file.",
        ) from exc
    if key is None or certificate is None:
        raise KeyStoreError(
            f"{label} に秘密鍵と証明書の組がありません。",
            f"{label} does not hold a private key with its certificate.",
        )
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise KeyStoreError(
            f"{label} の鍵の種類には対応していません(RSA か ECDSA のみ)。",
            f"{label}: unsupported key type (RSA and ECDSA only).",
        )
    return key, certificate, list(extra)


class LocalKeySigner(Signer):
    """A pyHanko signer over an already parsed in-memory key.

    pyHanko's ``SimpleSigner`` re-parses the DER key on every signature; this one parses once.
    """

    def __init__(
        self,
        signing_cert: asn1_x509.Certificate,
        private_key: PrivateKey,
        cert_registry: SimpleCertificateStore,
    ) -> None:
        self._private_key = private_key
        super().__init__(
            signing_cert=signing_cert, cert_registry=cert_registry, embed_roots=False
        )

    async def async_sign_raw(
        self, data: bytes, digest_algorithm: str, dry_run: bool = False
    ) -> bytes:
        return self.sign_raw(data, digest_algorithm)

    def sign_raw(self, data: bytes, digest_algorithm: str) -> bytes:
        mechanism = self.get_signature_mechanism_for_digest(digest_algorithm)
        algorithm = mechanism.signature_algo
        digest = get_pyca_cryptography_hash(digest_algorithm)
        key = self._private_key
        if isinstance(key, rsa.RSAPrivateKey) and algorithm == "rsassa_pkcs1v15":
            return key.sign(data, padding.PKCS1v15(), digest)
        if isinstance(key, ec.EllipticCurvePrivateKey) and algorithm == "ecdsa":
            return key.sign(data, ec.ECDSA(digest))
        raise KeyStoreError(
            f"署名方式 {algorithm} には対応していません。",
            f"Signature mechanism {algorithm} is not supported by this key.",
        )


@dataclass(frozen=True)
class RoleCredentials:
    """Everything needed to sign as one role."""

    role: Role
    signer: Signer
    certificate: asn1_x509.Certificate
    #: CA certificates from the issuer up to (and including) the root, as far as known.
    chain: tuple[asn1_x509.Certificate, ...]


class KeyBackend(ABC):
    """Where one role's key lives (a PKCS#12 file, a PKCS#11 token, …)."""

    @abstractmethod
    def load(self, role: Role) -> RoleCredentials:
        """Load the key and certificates of ``role``.

        :raises KeyStoreError: the key cannot be loaded.
        """

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The manifest entry for this backend (JSON-serialisable, no secrets)."""


class Pkcs12Backend(KeyBackend):
    def __init__(self, path: Path, passphrase: bytes) -> None:
        self.path = path
        self._passphrase = passphrase

    def load(self, role: Role) -> RoleCredentials:
        key, certificate, extra = read_pkcs12(self.path, self._passphrase)
        signing_cert = to_asn1(certificate)
        chain = tuple(to_asn1(c) for c in extra)
        registry = SimpleCertificateStore.from_certs(
            [c for c in chain if c.subject != c.issuer]  # intermediates only; roots are anchors
        )
        signer = LocalKeySigner(signing_cert, key, registry)
        return RoleCredentials(role, signer, signing_cert, chain)

    def describe(self) -> dict[str, Any]:
        return {"backend": "pkcs12", "file": self.path.name}


class KeyStore:
    """Signers per role for one installation.

    >>> store = KeyStore.open(Path("instance"))            # doctest: +SKIP
    >>> signer = store.signer_for(Role.POSITION)           # doctest: +SKIP
    """

    def __init__(self, home: Path, backends: dict[Role, KeyBackend]) -> None:
        self.home = home
        self._backends = backends
        self._loaded: dict[Role, RoleCredentials] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, home: Path, passphrase: bytes | None = None) -> KeyStore:
        """Open the key store of the installation at ``home`` (nothing is decrypted yet).

        :raises KeyStoreError: the manifest is missing or invalid.
        :raises PassphraseError: no passphrase is available.
        """
        manifest_path = home / "keys" / MANIFEST_FILE
        try:
            manifest = json.loads(manifest_path.read_text("utf-8"))
        except FileNotFoundError as exc:
            raise KeyStoreError(
                f"鍵ストア {manifest_path} がありません。`koin init` を実行してください。",
                f"No key store at {manifest_path}; run `koin init`.",
            ) from exc
        except ValueError as exc:
            raise KeyStoreError(
                f"鍵ストア {manifest_path} が壊れています。",
                f"Key store {manifest_path} is corrupt.",
            ) from exc
        backends: dict[Role, KeyBackend] = {}
        lazy_passphrase: list[bytes] = []

        def get_passphrase() -> bytes:
            if not lazy_passphrase:
                lazy_passphrase.append(passphrase or resolve_passphrase(home))
            return lazy_passphrase[0]

        for role_name, entry in manifest.get("roles", {}).items():
            try:
                role = Role(role_name)
            except ValueError:
                continue  # a role of a newer version; ignore rather than fail
            backends[role] = _backend_from_manifest(home, entry, get_passphrase)
        return cls(home, backends)

    def save_manifest(self) -> None:
        manifest = {"roles": {r.value: b.describe() for r, b in sorted(self._backends.items())}}
        write_private_file(
            self.home / "keys" / MANIFEST_FILE,
            json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8") + b"\n",
        )

    def set_backend(self, role: Role, backend: KeyBackend) -> None:
        with self._lock:
            self._backends[role] = backend
            self._loaded.pop(role, None)

    def roles(self) -> list[Role]:
        return sorted(self._backends)

    def backend_for(self, role: Role) -> KeyBackend | None:
        """Where ``role``'s key lives (``None``: not configured)."""
        with self._lock:
            return self._backends.get(role)

    def credentials(self, role: Role) -> RoleCredentials:
        """Load (once) and return the credentials of ``role``.

        :raises RoleNotConfigured: the store has no key for ``role``.
        :raises PassphraseError: the passphrase does not open the key.
        """
        with self._lock:
            if role not in self._loaded:
                backend = self._backends.get(role)
                if backend is None:
                    raise RoleNotConfigured(
                        f"役割 {role.value} の鍵が設定されていません。",
                        f"No key is configured for role {role.value}.",
                        role=role.value,
                    )
                self._loaded[role] = backend.load(role)
            return self._loaded[role]

    def signer_for(self, role: Role) -> Signer:
        """The pyHanko signer of ``role``. :raises KeyStoreError: see :meth:`credentials`."""
        return self.credentials(role).signer

    def certificate_for(self, role: Role) -> asn1_x509.Certificate:
        return self.credentials(role).certificate

    def trust_roots(self) -> list[asn1_x509.Certificate]:
        """Trust anchors of this installation: every PEM file in ``pki/trust/``."""
        return load_certificates(sorted((self.home / "pki" / "trust").glob("*.pem")))


def load_certificates(paths: Iterable[Path]) -> list[asn1_x509.Certificate]:
    result: list[asn1_x509.Certificate] = []
    for path in paths:
        for certificate in x509.load_pem_x509_certificates(path.read_bytes()):
            result.append(to_asn1(certificate))
    return result


def _backend_from_manifest(home: Path, entry: dict[str, Any], passphrase: Any) -> KeyBackend:
    kind = entry.get("backend")
    if kind == "pkcs12":

        class _LazyPkcs12(Pkcs12Backend):
            def load(self, role: Role) -> RoleCredentials:
                self._passphrase = passphrase()
                return super().load(role)

        return _LazyPkcs12(home / "keys" / str(entry["file"]), b"")
    if kind == "pkcs11":
        from ._pkcs11 import Pkcs11Backend  # here: _pkcs11 itself builds on this module

        return Pkcs11Backend.from_manifest(home, entry)
    raise KeyStoreError(
        f"鍵の保管方式 {kind!r} には対応していません。", f"Unknown key backend {kind!r}."
    )


_REQUIRED_USAGE = {
    Role.POSITION: "digital_signature",
    Role.WITNESS: "digital_signature",
    Role.TSA: "digital_signature",
}


def check_role_certificate(role: Role, certificate: x509.Certificate) -> None:
    """Refuse a certificate that cannot serve ``role``.

    :raises CertificateImportError: with the reason.
    """
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        if not getattr(usage, _REQUIRED_USAGE[role]):
            raise CertificateImportError(
                "証明書の鍵用途に digitalSignature がありません。",
                "The certificate's key usage lacks digitalSignature.",
            )
    except x509.ExtensionNotFound:
        pass  # no keyUsage extension means no restriction
    if role is Role.TSA:
        try:
            eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        except x509.ExtensionNotFound:
            eku = None
        if (
            eku is None
            or not eku.critical
            or list(eku.value) != [x509.oid.ExtendedKeyUsageOID.TIME_STAMPING]
        ):
            raise CertificateImportError(
                "TSA 証明書には critical な timeStamping 拡張鍵用途だけが必要です(RFC 3161)。",
                "A TSA certificate needs exactly the critical timeStamping EKU (RFC 3161).",
            )


def import_pkcs12(
    store: KeyStore, role: Role, data: bytes, file_passphrase: bytes, store_passphrase: bytes
) -> x509.Certificate:
    """Import a role key from a PKCS#12 file, re-encrypted with the store passphrase.

    :raises PassphraseError: ``file_passphrase`` does not open the file.
    :raises CertificateImportError: the certificate cannot serve ``role``.
    """
    key, certificate, extra = _parse_pkcs12(data, file_passphrase, "PKCS#12")
    check_role_certificate(role, certificate)
    public_key = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public_key != certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CertificateImportError(
            "秘密鍵と証明書が対応していません。", "The private key does not match the certificate."
        )
    path = store.home / "keys" / f"{role.value}.p12"
    write_private_file(path, write_pkcs12(role.value, key, certificate, extra, store_passphrase))
    store.set_backend(role, Pkcs12Backend(path, store_passphrase))
    store.save_manifest()
    return certificate


def fingerprint(certificate: asn1_x509.Certificate) -> str:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(certificate.dump())
    return digest.finalize().hex()

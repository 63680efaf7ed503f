"""PKCS#11 tokens (HSMs): role keys that are generated in the token and never leave it.

A process logs in to a token once and shares that session between all its threads. python-pkcs11
initialises a module with ``C_Initialize(NULL)``, which promises the module that the application
never calls it from two threads at once (SoftHSM2 then switches its own mutexes off), so every
call into a module goes through that module's lock here. A signature takes about a millisecond
in the token; the PDF work around it still runs in parallel.

The PIN comes from ``KOIN_PKCS11_PIN`` or a file readable by its owner only; it is never
written to a log or put into a message.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import pkcs11
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.util.ec import (
    encode_ec_public_key,
    encode_ecdsa_signature,
    encode_named_curve_parameters,
)
from pkcs11.util.rsa import encode_rsa_public_key
from pkcs11.util.x509 import decode_x509_certificate
from pyhanko.sign.pkcs11 import PKCS11Signer

from ._roles import Role
from ._store import KeyBackend, RoleCredentials, to_asn1
from .errors import KeyStoreError, PinError, TokenError

__all__ = [
    "DEFAULT_MODULE",
    "PIN_ENV",
    "KeyKind",
    "Pkcs11Backend",
    "TokenSession",
    "TokenSigner",
    "find_private_key",
    "generate_key",
    "key_id_of",
    "key_protection",
    "label_in_use",
    "open_token",
    "read_certificate_bundle",
    "resolve_pin",
    "store_certificate",
    "token_certificates",
    "verify_key_matches",
    "write_certificate_bundle",
]

log = logging.getLogger(__name__)

#: Debian's SoftHSM2 module.
DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN_ENV = "KOIN_PKCS11_PIN"

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class KeyKind(StrEnum):
    """Which key ``koin keys init-token`` generates in the token."""

    RSA2048 = "rsa2048"
    EC_P256 = "ec-p256"

    @classmethod
    def of(cls, public_key: Any) -> KeyKind:
        """The kind matching an existing key (rotation keeps the kind).

        :raises KeyStoreError: neither RSA nor EC P-256.
        """
        if isinstance(public_key, rsa.RSAPublicKey):
            return cls.RSA2048
        if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
            public_key.curve, ec.SECP256R1
        ):
            return cls.EC_P256
        raise KeyStoreError(
            "鍵の種類に対応していません(RSA か EC P-256 のみ)。",
            "Unsupported key type (RSA or EC P-256 only).",
        )


# -- PIN ------------------------------------------------------------------------------------


def resolve_pin(home: Path, pin_file: str | None, *, env: bool = True) -> tuple[str, str]:
    """The token PIN and where it came from (``KOIN_PKCS11_PIN`` or the file's path).

    ``KOIN_PKCS11_PIN`` wins (unless ``env`` is false); otherwise ``pin_file`` (relative to
    ``home/keys``), which must be readable by its owner only.

    :raises PinError: no PIN is available, or its file is unusable.
    """
    from_env = os.environ.get(PIN_ENV) if env else None
    if from_env:
        return from_env, PIN_ENV
    if not pin_file:
        raise PinError(
            f"PKCS#11 の PIN がありません。{PIN_ENV} を設定してください。",
            f"No PKCS#11 PIN: set {PIN_ENV}.",
        )
    path = pin_path(home, pin_file)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise PinError(
            f"PIN ファイル {path} がありません。{PIN_ENV} を設定するか、ファイルを置いてください。",
            f"The PIN file {path} does not exist; create it (mode 0600) or set {PIN_ENV}.",
        ) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PinError(
            f"PIN ファイル {path} が他のユーザーから読めます(chmod 600 にしてください)。",
            f"The PIN file {path} is readable by other users; chmod 600 it.",
        )
    value = path.read_text("utf-8").strip()
    if not value:
        raise PinError(f"PIN ファイル {path} が空です。", f"The PIN file {path} is empty.")
    return value, str(path)


def pin_path(home: Path, pin_file: str) -> Path:
    path = Path(pin_file)
    return path if path.is_absolute() else home / "keys" / path


# -- sessions -------------------------------------------------------------------------------

_registry_lock = threading.Lock()
_module_locks: dict[str, threading.RLock] = {}
_module_pids: dict[str, int] = {}
_sessions: dict[tuple[str, str], TokenSession] = {}
#: Only a keyed hash of the PIN is kept, to notice a different PIN for an open session.
_PIN_KEY = secrets.token_bytes(32)


@dataclass(frozen=True, eq=False)
class TokenSession:
    """A logged-in read-write session on one token, shared by all threads of this process.

    Hold :attr:`lock` around every use of :attr:`session` (and of objects found through it).
    """

    module: str
    label: str
    session: Any  # pkcs11.Session
    lock: threading.RLock
    pid: int
    pin_digest: bytes


def _pin_digest(pin: str) -> bytes:
    return hmac.new(_PIN_KEY, pin.encode("utf-8"), hashlib.sha256).digest()


def _load_module(module: str) -> Any:
    """:raises TokenError: the module does not exist or cannot be loaded."""
    if not Path(module).is_file():
        raise TokenError(
            f"PKCS#11 モジュール {module} がありません(パスを確認してください)。",
            f"The PKCS#11 module {module} does not exist; check the path.",
            module=module,
        )
    try:
        lib = pkcs11.lib(module)
        pid = os.getpid()
        if _module_pids.setdefault(module, pid) != pid:
            # A forked child inherits the parent's module state but not its sessions.
            lib.reinitialize()
            _module_pids[module] = pid
    except p11.PKCS11Error as exc:
        raise TokenError(
            f"PKCS#11 モジュール {module} を読み込めません: {exc}",
            f"Cannot load the PKCS#11 module {module}: {exc}",
            module=module,
        ) from exc
    return lib


def open_token(module: str, label: str, pin: str, pin_source: str) -> TokenSession:
    """The session of this process on the token ``label`` of ``module``; logs in the first
    time (per process), later calls with the same PIN return the same session.

    :param pin_source: where the PIN came from, for messages (never the PIN itself).
    :raises TokenError: the module is missing or no (or more than one) token has ``label``.
    :raises PinError: the token refuses the PIN, or this process is logged in with another.
    """
    digest = _pin_digest(pin)
    with _registry_lock:
        current = _sessions.get((module, label))
        if current is not None and current.pid == os.getpid():
            if not hmac.compare_digest(current.pin_digest, digest):
                raise PinError(
                    f"このプロセスは PKCS#11 トークン {label!r} に別の PIN でログイン済みです。",
                    f"This process is already logged in to the PKCS#11 token {label!r} with "
                    "another PIN.",
                    token=label,
                )
            return current
        lib = _load_module(module)
        lock = _module_locks.setdefault(module, threading.RLock())
        with lock:
            token = _find_token(lib, module, label)
            session = _log_in(token, module, label, pin, pin_source)
        opened = TokenSession(module, label, session, lock, os.getpid(), digest)
        _sessions[(module, label)] = opened
        log.info("PKCS#11: logged in to token %r of %s", label, module)
        return opened


def _find_token(lib: Any, module: str, label: str) -> Any:
    try:
        tokens = [slot.get_token() for slot in lib.get_slots(token_present=True)]
    except p11.PKCS11Error as exc:
        raise TokenError(
            f"PKCS#11 モジュール {module} のスロットを読めません({type(exc).__name__})。",
            f"Cannot list the slots of the PKCS#11 module {module} ({type(exc).__name__}).",
        ) from exc
    matching = [token for token in tokens if token.label == label]
    if len(matching) == 1:
        return matching[0]
    known = ", ".join(repr(token.label) for token in tokens if token.label) or "なし / none"
    if not matching:
        raise TokenError(
            f"PKCS#11 モジュール {module} にラベル {label!r} のトークンがありません"
            f"(あるトークン: {known})。",
            f"No token labelled {label!r} in the PKCS#11 module {module} (tokens: {known}).",
            module=module,
            token=label,
        )
    raise TokenError(
        f"ラベル {label!r} のトークンが複数あります。ラベルを一意にしてください。",
        f"More than one token is labelled {label!r}; make the labels unique.",
        module=module,
        token=label,
    )


def _log_in(token: Any, module: str, label: str, pin: str, pin_source: str) -> Any:
    try:
        return token.open(rw=True, user_pin=pin)
    except p11.PinIncorrect as exc:
        raise PinError(
            f"PKCS#11 トークン {label!r} が PIN を受け付けません"
            f"({pin_source} を確認してください)。",
            f"The PKCS#11 token {label!r} refused the PIN (check {pin_source}).",
            token=label,
        ) from exc
    except (p11.PinInvalid, p11.PinLenRange) as exc:
        raise PinError(
            f"PKCS#11 トークン {label!r} の PIN の形式が正しくありません({pin_source})。",
            f"The PIN for the PKCS#11 token {label!r} is malformed (check {pin_source}).",
            token=label,
        ) from exc
    except (p11.PinLocked, p11.PinExpired) as exc:
        raise PinError(
            f"PKCS#11 トークン {label!r} の PIN がロックされているか期限切れです。",
            f"The PIN of the PKCS#11 token {label!r} is locked or expired; ask the token's "
            "security officer.",
            token=label,
        ) from exc
    except p11.PKCS11Error as exc:
        raise TokenError(
            f"PKCS#11 トークン {label!r} にログインできません({type(exc).__name__})。",
            f"Cannot log in to the PKCS#11 token {label!r} of {module} ({type(exc).__name__}).",
            token=label,
        ) from exc


# -- keys and certificates in the token -----------------------------------------------------


def _objects(token: TokenSession, attrs: dict[Attribute, Any]) -> list[Any]:
    with token.lock:
        return list(token.session.get_objects(attrs))


def find_private_key(token: TokenSession, label: str, key_id: bytes | None = None) -> Any:
    """The one signing private key labelled ``label`` (and with ``key_id``, if given).

    :raises TokenError: none or several match.
    """
    attrs: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}
    if key_id:
        attrs[Attribute.ID] = key_id
    found = _objects(token, attrs)
    if len(found) == 1:
        return found[0]
    if not found:
        raise TokenError(
            f"トークン {token.label!r} にラベル {label!r} の秘密鍵がありません。",
            f"The token {token.label!r} holds no private key labelled {label!r}.",
            token=token.label,
            key_label=label,
        )
    raise TokenError(
        f"トークン {token.label!r} にラベル {label!r} の秘密鍵が複数あります。",
        f"The token {token.label!r} holds several private keys labelled {label!r}.",
        token=token.label,
        key_label=label,
    )


def label_in_use(token: TokenSession, label: str) -> bool:
    """Whether any key or certificate in the token carries ``label``."""
    return bool(_objects(token, {Attribute.LABEL: label}))


def key_id_of(token: TokenSession, key: Any) -> bytes:
    """CKA_ID of a key (empty if it has none)."""
    with token.lock:
        return bytes(key[Attribute.ID] or b"")


def key_protection(token: TokenSession, private_key: Any) -> tuple[bool, bool]:
    """``(CKA_SENSITIVE, CKA_EXTRACTABLE)`` of a private key."""
    with token.lock:
        return bool(private_key[Attribute.SENSITIVE]), bool(private_key[Attribute.EXTRACTABLE])


def generate_key(token: TokenSession, label: str, kind: KeyKind) -> tuple[bytes, PublicKey]:
    """Generate a signing key pair inside the token: sensitive, never extractable, sign only.

    Returns the new key's CKA_ID and its public key.

    :raises TokenError: the token refused.
    """
    key_id = secrets.token_bytes(16)
    private_template = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
    public_template = {
        Attribute.TOKEN: True,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
    }
    try:
        with token.lock:
            if kind is KeyKind.RSA2048:
                public, _ = token.session.generate_keypair(
                    KeyType.RSA, 2048, id=key_id, label=label, store=True,
                    public_template={**public_template, Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"},
                    private_template=private_template,
                )
                der = encode_rsa_public_key(public)
                loaded = serialization.load_der_public_key(_rsa_spki(der))
            else:
                parameters = token.session.create_domain_parameters(
                    KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                    local=True,
                )
                public, _ = parameters.generate_keypair(
                    id=key_id, label=label, store=True,
                    public_template=public_template, private_template=private_template,
                )
                loaded = serialization.load_der_public_key(encode_ec_public_key(public))
    except p11.PKCS11Error as exc:
        raise TokenError(
            f"トークン {token.label!r} で鍵を生成できません({type(exc).__name__})。",
            f"The token {token.label!r} could not generate a key ({type(exc).__name__}).",
            token=token.label,
        ) from exc
    if not isinstance(loaded, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise TokenError("生成された鍵の種類が想定外です。", "Unexpected generated key type.")
    log.info("PKCS#11: generated %s key %r in token %r", kind.value, label, token.label)
    return key_id, loaded


def _rsa_spki(pkcs1_der: bytes) -> bytes:
    from asn1crypto import keys as asn1_keys

    return bytes(
        asn1_keys.PublicKeyInfo(
            {
                "algorithm": {"algorithm": "rsa"},
                "public_key": asn1_keys.RSAPublicKey.load(pkcs1_der),
            }
        ).dump()
    )


def store_certificate(
    token: TokenSession, label: str, key_id: bytes, certificate: x509.Certificate
) -> None:
    """Put ``certificate`` into the token beside its key (same label and CKA_ID).

    :raises TokenError: the token refused.
    """
    attrs = decode_x509_certificate(certificate.public_bytes(serialization.Encoding.DER))
    attrs.update(
        {Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.LABEL: label,
         Attribute.ID: key_id}
    )
    try:
        with token.lock:
            token.session.create_object(attrs)
    except p11.PKCS11Error as exc:
        raise TokenError(
            f"トークン {token.label!r} に証明書を保存できません({type(exc).__name__})。",
            f"The token {token.label!r} could not store the certificate ({type(exc).__name__}).",
            token=token.label,
        ) from exc


def token_certificates(token: TokenSession, label: str, key_id: bytes) -> list[bytes]:
    """DER of the certificates stored beside the key ``label`` / ``key_id``."""
    attrs: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: label}
    if key_id:
        attrs[Attribute.ID] = key_id
    with token.lock:
        return [bytes(obj[Attribute.VALUE]) for obj in token.session.get_objects(attrs)]


def verify_key_matches(
    token: TokenSession, private_key: Any, certificate: x509.Certificate
) -> None:
    """Sign a random challenge in the token and verify it with ``certificate``'s public key.

    :raises TokenError: the key cannot sign, or does not belong to the certificate.
    """
    challenge = secrets.token_bytes(32)
    public_key = certificate.public_key()
    try:
        with token.lock:
            if isinstance(public_key, rsa.RSAPublicKey):
                signature = private_key.sign(challenge, mechanism=Mechanism.SHA256_RSA_PKCS)
            else:
                digest = hashlib.sha256(challenge).digest()
                raw = private_key.sign(digest, mechanism=Mechanism.ECDSA)
                signature = encode_ecdsa_signature(raw)
    except p11.PKCS11Error as exc:
        raise TokenError(
            f"トークン {token.label!r} の鍵で署名できません({type(exc).__name__})。",
            f"The key in token {token.label!r} cannot sign ({type(exc).__name__}).",
            token=token.label,
        ) from exc
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, challenge, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, challenge, ec.ECDSA(hashes.SHA256()))
        else:
            raise InvalidSignature
    except InvalidSignature as exc:
        raise TokenError(
            "トークン内の鍵と証明書が対応していません。",
            "The key in the token does not match the certificate.",
            token=token.label,
            subject=certificate.subject.rfc4514_string(),
        ) from exc


# -- certificates on disk -------------------------------------------------------------------


def read_certificate_bundle(path: Path) -> list[x509.Certificate]:
    """The certificates of a PEM bundle (leaf first) or of one DER certificate.

    :raises KeyStoreError: missing or not a certificate.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyStoreError(
            f"証明書ファイル {path} がありません。", f"The certificate file {path} does not exist."
        ) from exc
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise KeyStoreError(
            f"{path} は証明書(PEM か DER)ではありません。",
            f"{path} is not a certificate (PEM or DER).",
        ) from exc


def write_certificate_bundle(path: Path, certificates: Sequence[x509.Certificate]) -> None:
    from ._files import write_public_file

    write_public_file(
        path, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)
    )


# -- signing --------------------------------------------------------------------------------


class _LockedKey:
    """A private key handle whose ``sign`` holds the module lock."""

    def __init__(self, key: Any, lock: threading.RLock) -> None:
        self._key = key
        self._lock = lock

    def sign(self, data: bytes, **kwargs: Any) -> bytes:
        with self._lock:
            return bytes(self._key.sign(data, **kwargs))


class TokenSigner(PKCS11Signer):
    """pyHanko's :class:`~pyhanko.sign.pkcs11.PKCS11Signer` on a shared :class:`TokenSession`.

    Safe for many threads at once: the key handle is found right away (under the module lock),
    and every signature takes the module lock. pyHanko picks the mechanism (CKM_SHA256_RSA_PKCS;
    for EC keys raw CKM_ECDSA over a digest computed here, which every token supports).
    """

    def __init__(
        self,
        token: TokenSession,
        *,
        key_label: str,
        key_id: bytes | None,
        signing_cert: asn1_x509.Certificate,
        ca_chain: Sequence[asn1_x509.Certificate],
    ) -> None:
        self._token = token
        super().__init__(
            token.session,
            key_label=key_label,
            key_id=key_id or None,
            signing_cert=signing_cert,
            ca_chain=list(ca_chain),
            embed_roots=False,
            use_raw_mechanism=signing_cert.public_key.algorithm == "ec",
        )
        self._load_objects()

    def _load_objects(self) -> None:
        with self._token.lock:
            super()._load_objects()

    def _pull_signing_key_handle(self) -> _LockedKey:
        return _LockedKey(super()._pull_signing_key_handle(), self._token.lock)


# -- the key store backend ------------------------------------------------------------------


class Pkcs11Backend(KeyBackend):
    """A role key in a PKCS#11 token; its certificate (and CA chain) also on disk.

    Manifest entry: ``{"backend": "pkcs11", "module": …, "token": …, "key_label": …,
    "key_id": hex, "certificate": "position.pem", "pin_file": …}`` (``pin_file`` optional:
    without it the PIN comes from ``KOIN_PKCS11_PIN`` only).
    """

    def __init__(
        self,
        home: Path,
        *,
        module: str,
        token: str,
        key_label: str,
        key_id: bytes,
        certificate: str,
        pin_file: str | None,
    ) -> None:
        self.home = home
        self.module = module
        self.token = token
        self.key_label = key_label
        self.key_id = key_id
        self.certificate = certificate
        self.pin_file = pin_file

    @classmethod
    def from_manifest(cls, home: Path, entry: dict[str, Any]) -> Pkcs11Backend:
        """:raises KeyStoreError: the entry lacks a field."""
        try:
            return cls(
                home,
                module=str(entry["module"]),
                token=str(entry["token"]),
                key_label=str(entry["key_label"]),
                key_id=bytes.fromhex(str(entry.get("key_id", ""))),
                certificate=str(entry["certificate"]),
                pin_file=str(entry["pin_file"]) if entry.get("pin_file") else None,
            )
        except (KeyError, ValueError) as exc:
            raise KeyStoreError(
                "鍵ストアの PKCS#11 の設定が不完全です。",
                f"The PKCS#11 entry of the key store is incomplete or invalid ({exc}).",
            ) from exc

    @property
    def certificate_path(self) -> Path:
        return self.home / "keys" / self.certificate

    def open_token(self) -> TokenSession:
        """:raises TokenError: see :func:`open_token`. :raises PinError: no or a wrong PIN."""
        pin, source = resolve_pin(self.home, self.pin_file)
        return open_token(self.module, self.token, pin, source)

    def load(self, role: Role) -> RoleCredentials:
        token = self.open_token()
        bundle = read_certificate_bundle(self.certificate_path)
        leaf, chain = bundle[0], bundle[1:]
        leaf_der = leaf.public_bytes(serialization.Encoding.DER)
        stored = token_certificates(token, self.key_label, self.key_id)
        if stored and leaf_der not in stored:
            raise TokenError(
                f"トークン内の証明書と {self.certificate_path} が一致しません。",
                f"The certificate in the token differs from {self.certificate_path}.",
                token=self.token,
                key_label=self.key_label,
            )
        verify_key_matches(token, find_private_key(token, self.key_label, self.key_id), leaf)
        signing_cert = to_asn1(leaf)
        asn1_chain = tuple(to_asn1(c) for c in chain)
        try:
            signer = TokenSigner(
                token,
                key_label=self.key_label,
                key_id=self.key_id,
                signing_cert=signing_cert,
                ca_chain=[c for c in asn1_chain if c.subject != c.issuer],
            )
        except p11.PKCS11Error as exc:
            raise TokenError(
                f"トークン {self.token!r} の鍵 {self.key_label!r} を使えません。",
                f"The key {self.key_label!r} in token {self.token!r} cannot be used "
                f"({type(exc).__name__}).",
            ) from exc
        log.debug(
            "PKCS#11: %s key %r of token %r ready (certificate serial %x)",
            role.value, self.key_label, self.token, leaf.serial_number,
        )
        return RoleCredentials(role, signer, signing_cert, asn1_chain)

    def describe(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "backend": "pkcs11",
            "module": self.module,
            "token": self.token,
            "key_label": self.key_label,
            "certificate": self.certificate,
        }
        if self.key_id:
            entry["key_id"] = self.key_id.hex()
        if self.pin_file:
            entry["pin_file"] = self.pin_file
        return entry

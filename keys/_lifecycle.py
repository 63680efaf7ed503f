"""Key lifecycle: move an installation's role keys into a PKCS#11 token, rotate a role key.

The manifest (``keys/keystore.json``) is the commit point: new keys and certificates are
written beside the old ones, checked, and only then does the manifest switch to them. A crash
before that leaves the installation signing with its old keys.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ._files import write_private_file, write_public_file
from ._pkcs11 import (
    KeyKind,
    Pkcs11Backend,
    TokenSession,
    find_private_key,
    generate_key,
    key_id_of,
    key_protection,
    label_in_use,
    open_token,
    read_certificate_bundle,
    store_certificate,
    token_certificates,
    verify_key_matches,
    write_certificate_bundle,
)
from ._pki import (
    CertificateAuthority,
    PkiLayout,
    issue_role_certificate,
    load_certificate_authority,
)
from ._roles import Role
from ._store import (
    KeyStore,
    Pkcs12Backend,
    check_role_certificate,
    resolve_passphrase,
    write_pkcs12,
)
from .errors import CertificateImportError, KeyStoreError, RoleNotConfigured, TokenError

__all__ = [
    "ARCHIVE_DIR",
    "DEFAULT_LABEL_PREFIX",
    "InitTokenResult",
    "Rotation",
    "TokenRole",
    "init_token",
    "rotate_key",
]

#: Below ``keys/``: certificates that were replaced (by rotation or by moving into a token).
ARCHIVE_DIR = "archive"
DEFAULT_LABEL_PREFIX = "koin"
_STAMP = re.compile(r"-\d{8}T\d{6}Z$")


@dataclass(frozen=True)
class TokenRole:
    role: Role
    key_label: str
    generated: bool  # False: a key already in the token, with a given certificate
    certificate: x509.Certificate


@dataclass(frozen=True)
class InitTokenResult:
    module: str
    token: str
    roles: list[TokenRole]
    archived: list[Path]  # certificates of the replaced PKCS#12 keys
    removed: list[Path]  # PKCS#12 key files deleted after the switch


@dataclass(frozen=True)
class Rotation:
    role: Role
    backend: str  # "pkcs11" or "pkcs12"
    certificate: x509.Certificate
    previous: x509.Certificate
    archived: Path  # the previous certificate
    key_label: str | None = None  # PKCS#11: label of the new key
    previous_key_label: str | None = None  # PKCS#11: the old key, still in the token


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _stamp(moment: dt.datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%SZ")


def _demo_ca(home: Path, public_url: str) -> tuple[CertificateAuthority, x509.Certificate]:
    """The demo issuing CA (certificate and key, from ``pki/private``) and the demo root.

    :raises KeyStoreError: this installation has no demo CA (its certificates come from
        another CA).
    :raises PassphraseError: the passphrase does not open the CA key.
    """
    layout = PkiLayout(home)
    if not layout.ca_key("issuing-ca").exists():
        raise KeyStoreError(
            f"デモ CA の鍵 {layout.ca_key('issuing-ca')} がありません。他の CA の証明書は "
            "--import-cert ROLE=証明書 で取り込んでください。",
            f"No demo CA key at {layout.ca_key('issuing-ca')}: certificates from another CA "
            "are given with --import-cert ROLE=cert.pem.",
        )
    ca = load_certificate_authority(layout, "issuing-ca", resolve_passphrase(home), public_url)
    root = x509.load_pem_x509_certificate(layout.root_cert.read_bytes())
    return ca, root


def _known_cas(home: Path) -> list[x509.Certificate]:
    layout = PkiLayout(home)
    paths = [layout.pki_dir / "chain.pem", *sorted((layout.pki_dir / "trust").glob("*.pem"))]
    found: list[x509.Certificate] = []
    for path in paths:
        if path.exists():
            found.extend(x509.load_pem_x509_certificates(path.read_bytes()))
    return found


def _issuer_chain(
    leaf: x509.Certificate, candidates: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """CA certificates from ``leaf``'s issuer up to a self-signed root, as far as known."""
    chain: list[x509.Certificate] = []
    current = leaf
    while current.issuer != current.subject:
        issuer = next(
            (c for c in candidates if c.subject == current.issuer and c not in chain), None
        )
        if issuer is None:
            break
        chain.append(issuer)
        current = issuer
    return chain


def _check_valid_now(certificate: x509.Certificate) -> None:
    now = _now()
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise CertificateImportError(
            "証明書が有効期間外です。", "The certificate is not valid now.",
            subject=certificate.subject.rfc4514_string(),
        )


def _archive(home: Path, role: Role, certificate: x509.Certificate) -> Path:
    """Keep a replaced certificate as ``keys/archive/ROLE-YYYYMMDD-SERIAL.pem``."""
    name = f"{role.value}-{certificate.not_valid_before_utc:%Y%m%d}-{certificate.serial_number:x}"
    path = home / "keys" / ARCHIVE_DIR / f"{name}.pem"
    write_public_file(path, certificate.public_bytes(serialization.Encoding.PEM))
    return path


def _current_certificate(store: KeyStore, role: Role) -> x509.Certificate:
    return x509.load_der_x509_certificate(store.certificate_for(role).dump())


@dataclass
class _Plan:
    role: Role
    label: str
    certificate: x509.Certificate | None = None  # given (import) or issued
    chain: Sequence[x509.Certificate] = ()
    key_id: bytes = b""


def init_token(
    home: Path,
    public_url: str,
    *,
    module: str,
    token: str,
    pin: str,
    pin_source: str,
    pin_file: str | None = None,
    kind: KeyKind = KeyKind.RSA2048,
    label_prefix: str = DEFAULT_LABEL_PREFIX,
    key_labels: Mapping[Role, str] | None = None,
    import_certs: Mapping[Role, Path] | None = None,
) -> InitTokenResult:
    """Put every role's key into the PKCS#11 token and switch the key store to it.

    Roles in ``import_certs`` keep a key that is already in the token (found by its label,
    ``key_labels[role]`` or ``PREFIX-ROLE``), with the given certificate (PEM, leaf first,
    optionally followed by its CA chain); the key must be sensitive and not extractable and
    must match the certificate. The other roles get a new key generated inside the token and a
    certificate from the demo issuing CA. Certificates go into the token and to
    ``keys/ROLE.pem``. The certificates of the replaced PKCS#12 keys are archived and their key
    files deleted.

    :param pin_file: recorded in the manifest so later runs find the PIN (``None``: only
        ``KOIN_PKCS11_PIN``).
    :raises KeyStoreError: no key store yet, the store already uses a token, or no demo CA.
    :raises TokenError: module, token or key unusable; a label is already taken.
    :raises PinError: the token refuses the PIN.
    :raises CertificateImportError: a given certificate cannot serve its role.
    """
    store = KeyStore.open(home)
    for role in Role:
        backend = store.backend_for(role)
        if isinstance(backend, Pkcs11Backend):
            raise KeyStoreError(
                f"鍵ストアは既に PKCS#11 トークン {backend.token!r} を使っています。"
                "鍵の更新は `koin keys rotate` で行ってください。",
                f"The key store already uses the PKCS#11 token {backend.token!r}; "
                "use `koin keys rotate ROLE` to replace a key.",
            )
    imports = dict(import_certs or {})
    labels = dict(key_labels or {})
    # Everything that can fail without touching the token comes first.
    previous = {
        role: _current_certificate(store, role)
        for role in Role
        if isinstance(store.backend_for(role), Pkcs12Backend)
    }
    demo = _demo_ca(home, public_url) if any(role not in imports for role in Role) else None
    session = open_token(module, token, pin, pin_source)
    plans = [
        _prepare(session, home, role, labels.get(role) or f"{label_prefix}-{role.value}",
                 imports.get(role))
        for role in Role
    ]
    results: list[TokenRole] = []
    for plan in plans:
        generated = plan.certificate is None
        if plan.certificate is None:
            assert demo is not None
            ca, root = demo
            plan.key_id, public_key = generate_key(session, plan.label, kind)
            plan.certificate = issue_role_certificate(ca, plan.role, public_key)
            plan.chain = [ca.certificate, root]
        if plan.certificate.public_bytes(serialization.Encoding.DER) not in token_certificates(
            session, plan.label, plan.key_id
        ):
            store_certificate(session, plan.label, plan.key_id, plan.certificate)
        results.append(TokenRole(plan.role, plan.label, generated, plan.certificate))

    backends: dict[Role, Pkcs11Backend] = {}
    for plan in plans:
        assert plan.certificate is not None
        backend = Pkcs11Backend(
            home, module=module, token=token, key_label=plan.label, key_id=plan.key_id,
            certificate=f"{plan.role.value}.pem", pin_file=pin_file,
        )
        write_certificate_bundle(backend.certificate_path, [plan.certificate, *plan.chain])
        backend.load(plan.role)  # the key signs, and matches its certificate
        backends[plan.role] = backend

    archived = [_archive(home, role, certificate) for role, certificate in previous.items()]
    old_files = [
        b.path for role in Role if isinstance(b := store.backend_for(role), Pkcs12Backend)
    ]
    for role, backend in backends.items():
        store.set_backend(role, backend)
    store.save_manifest()
    removed = []
    for path in old_files:
        if path.exists():
            path.unlink()
            removed.append(path)
    return InitTokenResult(module, token, results, archived, removed)


def _prepare(
    session: TokenSession, home: Path, role: Role, label: str, cert_file: Path | None
) -> _Plan:
    """Check one role before anything is written: a free label for a new key, or an existing
    protected key that matches the given certificate."""
    if cert_file is None:
        if label_in_use(session, label):
            raise TokenError(
                f"トークン {session.label!r} には既にラベル {label!r} のオブジェクトがあります。"
                f"その鍵を使うなら --import-cert {role.value}=証明書 を、新しい鍵なら別の "
                "--label-prefix を指定してください。",
                f"The token {session.label!r} already holds an object labelled {label!r}: give "
                f"--import-cert {role.value}=cert.pem to use that key, or another --label-prefix "
                "for new keys.",
                key_label=label,
            )
        return _Plan(role, label)
    bundle = read_certificate_bundle(cert_file)
    leaf = bundle[0]
    try:
        check_role_certificate(role, leaf)
    except CertificateImportError as exc:
        raise CertificateImportError(
            f"{cert_file}: {exc.message}", f"{cert_file}: {exc.message_en}"
        ) from exc
    _check_valid_now(leaf)
    key = find_private_key(session, label)
    sensitive, extractable = key_protection(session, key)
    if not sensitive or extractable:
        raise TokenError(
            f"トークンの鍵 {label!r} は取り出し可能です(CKA_SENSITIVE=true、"
            "CKA_EXTRACTABLE=false の鍵だけを使います)。",
            f"The key {label!r} in the token can be extracted; only keys with "
            "CKA_SENSITIVE=true and CKA_EXTRACTABLE=false are used.",
            key_label=label,
        )
    verify_key_matches(session, key, leaf)
    chain = bundle[1:] or _issuer_chain(leaf, _known_cas(home))
    return _Plan(role, label, leaf, chain, key_id_of(session, key))


def rotate_key(home: Path, role: Role, public_url: str) -> Rotation:
    """Replace ``role``'s key with a new one (in the token for PKCS#11, a new PKCS#12 file
    otherwise) and a new certificate from the demo issuing CA.

    The previous certificate is archived in ``keys/archive/``; documents signed before carry
    it and keep verifying (same CA). A PKCS#11 key that was replaced stays in the token under
    its label. Processes that already loaded the old key keep using it until restarted.

    :raises RoleNotConfigured: the store has no key for ``role``.
    :raises KeyStoreError: no demo CA here, or the backend cannot be rotated.
    :raises TokenError: the token refused.
    :raises PinError: no or a wrong PIN.
    :raises PassphraseError: the passphrase does not open the CA or key files.
    """
    store = KeyStore.open(home)
    backend = store.backend_for(role)
    if backend is None:
        raise RoleNotConfigured(
            f"役割 {role.value} の鍵が設定されていません。",
            f"No key is configured for role {role.value}.",
            role=role.value,
        )
    ca, root = _demo_ca(home, public_url)
    previous = _current_certificate(store, role)
    kind = KeyKind.of(previous.public_key())
    stamp = _stamp(_now())
    new_backend: Pkcs11Backend | Pkcs12Backend
    old_file: Path
    if isinstance(backend, Pkcs11Backend):
        session = backend.open_token()
        label = f"{_STAMP.sub('', backend.key_label)}-{stamp}"
        if label_in_use(session, label):
            raise TokenError(
                f"トークンに既にラベル {label!r} があります。1 秒後にやり直してください。",
                f"The token already holds the label {label!r}; try again in a second.",
            )
        key_id, public_key = generate_key(session, label, kind)
        certificate = issue_role_certificate(ca, role, public_key)
        store_certificate(session, label, key_id, certificate)
        new_backend = Pkcs11Backend(
            home, module=backend.module, token=backend.token, key_label=label, key_id=key_id,
            certificate=f"{role.value}-{stamp}.pem", pin_file=backend.pin_file,
        )
        write_certificate_bundle(new_backend.certificate_path, [certificate, ca.certificate, root])
        old_file = backend.certificate_path
    elif isinstance(backend, Pkcs12Backend):
        private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
        if kind is KeyKind.EC_P256:
            private_key = ec.generate_private_key(ec.SECP256R1())
        else:
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        certificate = issue_role_certificate(ca, role, private_key.public_key())
        passphrase = resolve_passphrase(home)
        path = home / "keys" / f"{role.value}-{stamp}.p12"
        write_private_file(
            path,
            write_pkcs12(role.value, private_key, certificate, [ca.certificate, root], passphrase),
        )
        new_backend = Pkcs12Backend(path, passphrase)
        old_file = backend.path
    else:
        raise KeyStoreError(
            f"この鍵の保管方式は更新できません: {backend.describe().get('backend')}",
            f"Keys of backend {backend.describe().get('backend')!r} cannot be rotated.",
        )
    new_backend.load(role)  # the new key signs, and matches its certificate
    archived = _archive(home, role, previous)
    store.set_backend(role, new_backend)
    store.save_manifest()
    if old_file.exists():
        old_file.unlink()  # the certificate is archived; a PKCS#12 file also held the old key
    return Rotation(
        role,
        "pkcs11" if isinstance(new_backend, Pkcs11Backend) else "pkcs12",
        certificate,
        previous,
        archived,
        key_label=new_backend.key_label if isinstance(new_backend, Pkcs11Backend) else None,
        previous_key_label=backend.key_label if isinstance(backend, Pkcs11Backend) else None,
    )

"""PKI and key stores: the demo PKI generator and the one place private keys are loaded."""

from ._files import atomic_write, write_private_file, write_public_file
from ._install import InitResult, ensure_demo_pki, export_roots, refresh_crls
from ._pki import (
    CertificateAuthority,
    DemoPki,
    PkiLayout,
    generate_demo_pki,
    issue_crl,
    issue_role_certificate,
    load_certificate_authority,
    write_crls,
)
from ._roles import Role
from ._store import (
    KeyBackend,
    KeyStore,
    LocalKeySigner,
    Pkcs12Backend,
    RoleCredentials,
    check_role_certificate,
    fingerprint,
    import_pkcs12,
    load_certificates,
    read_pkcs12,
    resolve_passphrase,
    to_asn1,
    write_pkcs12,
)
from .errors import (
    CertificateImportError,
    KeyStoreError,
    KoinError,
    PassphraseError,
    RoleNotConfigured,
)

__all__ = [
    "CertificateAuthority",
    "CertificateImportError",
    "DemoPki",
    "InitResult",
    "KeyBackend",
    "KeyStore",
    "KeyStoreError",
    "KoinError",
    "LocalKeySigner",
    "PassphraseError",
    "Pkcs12Backend",
    "PkiLayout",
    "Role",
    "RoleCredentials",
    "RoleNotConfigured",
    "atomic_write",
    "check_role_certificate",
    "ensure_demo_pki",
    "export_roots",
    "fingerprint",
    "generate_demo_pki",
    "import_pkcs12",
    "issue_crl",
    "issue_role_certificate",
    "load_certificate_authority",
    "load_certificates",
    "read_pkcs12",
    "refresh_crls",
    "resolve_passphrase",
    "to_asn1",
    "write_crls",
    "write_pkcs12",
    "write_private_file",
    "write_public_file",
]

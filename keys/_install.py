"""Set up the key material of one installation (``koin init``)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from ._files import write_public_file
from ._pki import PkiLayout, generate_demo_pki, load_certificate_authority, write_crls
from ._roles import Role
from ._store import KeyStore, Pkcs12Backend, resolve_passphrase

__all__ = ["InitResult", "ensure_demo_pki", "export_roots", "refresh_crls"]

#: Re-issue a CRL this long before it would go stale.
CRL_REFRESH_MARGIN = dt.timedelta(days=2)


@dataclass(frozen=True)
class InitResult:
    created: bool  # False: the installation already had its keys
    passphrase_file_created: bool


def ensure_demo_pki(home: Path, public_url: str) -> InitResult:
    """Create the demo PKI and key store at ``home`` unless a key store already exists.

    Idempotent: an existing installation (demo or imported keys) is left untouched except that
    stale demo CRLs are re-issued.
    """
    layout = PkiLayout(home)
    had_passphrase_file = (layout.keys_dir / "passphrase").exists()
    if (layout.keys_dir / "keystore.json").exists():
        refresh_crls(home, public_url)
        return InitResult(created=False, passphrase_file_created=False)
    passphrase = resolve_passphrase(home, create=True)
    pki = generate_demo_pki(home, passphrase, public_url)
    write_public_file(layout.pki_dir / "trust" / "root-ca.pem", layout.root_cert.read_bytes())
    store = KeyStore(home, {})
    for role in Role:
        store.set_backend(role, Pkcs12Backend(layout.role_key(role), passphrase))
    store.save_manifest()
    del pki
    created_file = not had_passphrase_file and (layout.keys_dir / "passphrase").exists()
    return InitResult(created=True, passphrase_file_created=created_file)


def refresh_crls(home: Path, public_url: str, *, force: bool = False) -> list[str]:
    """Re-issue the demo CRLs that expire within :data:`CRL_REFRESH_MARGIN`.

    Installations with imported keys have no CA keys here; their CRLs come from their own PKI.
    Returns the names of the CAs whose CRL was re-issued.
    """
    layout = PkiLayout(home)
    refreshed: list[str] = []
    now = dt.datetime.now(dt.UTC)
    for name in ("root-ca", "issuing-ca"):
        if not layout.ca_key(name).exists():
            continue
        crl_path = layout.crl(name)
        if crl_path.exists() and not force:
            crl = x509.load_der_x509_crl(crl_path.read_bytes())
            next_update = crl.next_update_utc
            if next_update is not None and next_update - now > CRL_REFRESH_MARGIN:
                continue
        ca = load_certificate_authority(layout, name, resolve_passphrase(home), public_url)
        write_crls(layout, [ca])
        refreshed.append(name)
    return refreshed


def export_roots(home: Path, out_dir: Path) -> list[Path]:
    """Write ``root.pem`` (trust anchors) and ``chain.pem`` (CA certificates) to ``out_dir``."""
    layout = PkiLayout(home)
    trust = sorted((layout.pki_dir / "trust").glob("*.pem"))
    if not trust:
        from .errors import KeyStoreError

        raise KeyStoreError(
            "信頼点の証明書がありません。`koin init` を実行してください。",
            "No trust anchors found; run `koin init`.",
        )
    written = [out_dir / "root.pem"]
    write_public_file(written[0], b"".join(p.read_bytes() for p in trust))
    chain = layout.pki_dir / "chain.pem"
    if chain.exists():
        written.append(out_dir / "chain.pem")
        write_public_file(written[1], chain.read_bytes())
    return written

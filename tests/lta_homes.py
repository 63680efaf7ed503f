"""Installations with short-lived certificates, for the long-term validity tests: the demo PKI
of ``keys`` issued with a leaf lifetime of hours instead of years, so that "after the
certificates expired" is a validation time a day or two ahead (the CRLs, valid a week, still
cover it)."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import keys
from keys import Role
from signer import Installation
from tests.conftest import PASSPHRASE, PUBLIC_URL, write_passphrase_file

__all__ = ["rotate_tsa", "short_lived_installation"]


def short_lived_installation(
    home: Path, assets_from: Path, *, lifetime: dt.timedelta = dt.timedelta(hours=1)
) -> Installation:
    """A new installation at ``home`` whose position, witness and TSA certificates expire
    ``lifetime`` from now (root and issuing CA: years). The stamp font and seal are copied from
    ``assets_from`` (an initialised ``KOIN_HOME``) instead of being extracted again."""
    write_passphrase_file(home)
    layout = keys.PkiLayout(home)
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=5)
    keys.generate_demo_pki(
        home, PASSPHRASE.encode(), PUBLIC_URL, not_before=start, leaf_lifetime=lifetime
    )
    keys.write_public_file(layout.pki_dir / "trust" / "root-ca.pem", layout.root_cert.read_bytes())
    store = keys.KeyStore(home, {})
    for role in Role:
        store.set_backend(role, keys.Pkcs12Backend(layout.role_key(role), PASSPHRASE.encode()))
    store.save_manifest()
    shutil.copytree(assets_from / "assets", home / "assets")
    installation = Installation(home, public_url=PUBLIC_URL)
    installation.initialize()
    return installation


def rotate_tsa(installation: Installation) -> Installation:
    """Give the TSA a new key and a certificate valid for years (``koin keys rotate tsa``);
    returns a fresh :class:`Installation` that uses it."""
    keys.rotate_key(installation.home, Role.TSA, PUBLIC_URL)
    return Installation(installation.home, public_url=PUBLIC_URL)

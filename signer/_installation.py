"""One installation (``KOIN_HOME``) assembled into ready-to-use signing contexts.

Everything expensive (key parsing, font and seal loading, the TSA client) happens once per
process here and is reused for every document.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from pyhanko.sign.timestamps import TimeStamper

import keys
from keys import KeyStore, PkiLayout, Role

from ._assets import draw_demo_seal, extract_cjk_font
from ._sign import SigningContext, TrustMaterial
from ._stamp import StampAppearance
from ._verify import VerifyPolicy

__all__ = ["Installation", "InitReport", "TITLE_LINES"]

SEAL_FILE = "seal.png"
FONT_FILE = "NotoSansCJKjp-Regular.otf"

#: What the stamp prints under the seal for each role.
TITLE_LINES: dict[Role, tuple[str, ...]] = {
    Role.POSITION: ("茨城県知事", "Governor of Ibaraki Prefecture"),
    Role.WITNESS: ("茨城県 電子契約サービス", "koin Witness Signing Service"),
}


@dataclass(frozen=True)
class InitReport:
    keys_created: bool
    passphrase_file_created: bool
    assets_created: list[str]


class Installation:
    """The files of one installation below ``home`` and the objects built from them."""

    def __init__(self, home: Path, *, public_url: str = "http://127.0.0.1:5000") -> None:
        self.home = home
        self.public_url = public_url
        self._store: KeyStore | None = None
        self._contexts: dict[tuple[Role, tuple[str, ...]], SigningContext] = {}
        self._local_tsa: TimeStamper | None = None
        self._lock = threading.Lock()

    # -- set-up -----------------------------------------------------------------------------

    @property
    def assets_dir(self) -> Path:
        return self.home / "assets"

    @property
    def seal_file(self) -> Path:
        return self.assets_dir / SEAL_FILE

    @property
    def font_file(self) -> Path:
        return self.assets_dir / FONT_FILE

    @property
    def tsa_state_dir(self) -> Path:
        return self.home / "tsa"

    def initialize(self) -> InitReport:
        """Create whatever is missing: demo PKI and key store, stamp font, demo seal. Idempotent.

        :raises KoinError: fonts-noto-cjk is missing, or the key store cannot be written.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        result = keys.ensure_demo_pki(self.home, self.public_url)
        created: list[str] = []
        if not self.font_file.exists():
            extract_cjk_font(self.font_file)
            created.append(str(self.font_file))
        if not self.seal_file.exists():
            draw_demo_seal(self.seal_file)
            created.append(str(self.seal_file))
        for role in TITLE_LINES:
            # the stamp font subset for each role's title lines (see StampAppearance)
            appearance = self.appearance(role)
            if not appearance.prepared_font_file.exists():
                appearance.prepared_font  # noqa: B018  # builds and saves it
                created.append(str(appearance.prepared_font_file))
        return InitReport(result.created, result.passphrase_file_created, created)

    # -- objects ----------------------------------------------------------------------------

    @property
    def key_store(self) -> KeyStore:
        """:raises KeyStoreError: no key store (run ``koin init``)."""
        if self._store is None:
            self._store = KeyStore.open(self.home)
        return self._store

    def appearance(self, role: Role) -> StampAppearance:
        return StampAppearance(
            self.seal_file, self.font_file, TITLE_LINES.get(role, TITLE_LINES[Role.POSITION])
        )

    def trust_material(self) -> TrustMaterial:
        """Trust anchors, CA certificates and current CRLs (stale demo CRLs are re-issued)."""
        keys.refresh_crls(self.home, self.public_url)
        layout = PkiLayout(self.home)
        roots = self.key_store.trust_roots()
        root_keys = {c.dump() for c in roots}
        intermediates = [
            c
            for c in keys.load_certificates([layout.pki_dir / "chain.pem"])
            if c.dump() not in root_keys
        ] if (layout.pki_dir / "chain.pem").exists() else []
        crls = [
            asn1_crl.CertificateList.load(path.read_bytes())
            for path in sorted(layout.pki_dir.glob("*.crl"))
        ]
        return TrustMaterial(roots, intermediates, crls)

    def verify_policy(self, *, max_bytes: int | None = None) -> VerifyPolicy:
        """Trust anchors (``pki/trust/*.pem``: our root plus configured extra roots such as
        LGPKI), our CA certificates and our current CRLs. Nothing else is ever fetched."""
        trust = self.trust_material()
        policy = VerifyPolicy(trust.roots, trust.intermediates, trust.crls)
        if max_bytes is not None:
            policy = VerifyPolicy(trust.roots, trust.intermediates, trust.crls, max_bytes)
        return policy

    def timestamper(self, tsa_urls: Sequence[str] = ()) -> TimeStamper:
        """A TSA client for ``tsa_urls`` (tried in order), or the in-process TSA when empty.

        :raises KeyStoreError: the embedded TSA's key cannot be loaded.
        """
        from timestamp import LocalTimeStamper, TimeStampAuthority, TsaClient

        if tsa_urls:
            return TsaClient(list(tsa_urls), trust_roots=self._tsa_roots())
        with self._lock:
            if self._local_tsa is None:
                authority = TimeStampAuthority.from_key_store(self.key_store, self.tsa_state_dir)
                self._local_tsa = LocalTimeStamper(authority)
            return self._local_tsa

    def _tsa_roots(self) -> list[asn1_x509.Certificate]:
        return list(self.key_store.trust_roots())

    def signing_context(
        self, role: Role = Role.POSITION, *, tsa_urls: Sequence[str] = (), stamp: bool = True
    ) -> SigningContext:
        """The signing context of ``role``, built once per process and cached.

        :raises KeyStoreError: the role's key cannot be loaded.
        """
        cache_key = (role, tuple(tsa_urls))
        context = self._contexts.get(cache_key)
        if context is None:
            context = SigningContext(
                signer=self.key_store.signer_for(role),
                timestamper=self.timestamper(tsa_urls),
                appearance=self.appearance(role),
                trust=self.trust_material(),
            )
            self._contexts[cache_key] = context
        if not stamp:
            return context.without_stamp()
        return context

"""Shared fixtures: one generated demo PKI per test session, real servers on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import keys

PUBLIC_URL = "http://127.0.0.1:8000"
PASSPHRASE = "test-passphrase-not-secret"


@pytest.fixture(scope="session")
def koin_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `KOIN_HOME` with the demo PKI (root → issuing CA → position / witness / TSA)."""
    home = tmp_path_factory.mktemp("koin-home")
    old = os.environ.get("KOIN_KEY_PASSPHRASE")
    os.environ["KOIN_KEY_PASSPHRASE"] = PASSPHRASE
    try:
        keys.ensure_demo_pki(home, PUBLIC_URL)
    finally:
        if old is None:
            del os.environ["KOIN_KEY_PASSPHRASE"]
        else:
            os.environ["KOIN_KEY_PASSPHRASE"] = old
    return home


@pytest.fixture(scope="session")
def key_store(koin_home: Path) -> keys.KeyStore:
    return keys.KeyStore.open(koin_home, PASSPHRASE.encode())


@pytest.fixture(scope="session")
def root_pem(koin_home: Path) -> Path:
    return koin_home / "pki" / "root-ca.pem"


@pytest.fixture(scope="session")
def chain_pem(koin_home: Path) -> Path:
    """Issuing CA + root, PEM."""
    return koin_home / "pki" / "chain.pem"


@pytest.fixture
def passphrase_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("KOIN_KEY_PASSPHRASE", PASSPHRASE)
    yield PASSPHRASE

"""Shared fixtures: one generated demo installation per test session, real validators."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509

import keys
from signer import Installation
from signer.samples import make_permit_pdf
from tests.validators import make_nss_db

# Database fixtures (db_url, engine, sessions, postgres_url): SQLite and PostgreSQL.
pytest_plugins = ["tests.db"]

PUBLIC_URL = "http://127.0.0.1:8000"
PASSPHRASE = "test-passphrase-not-secret"

# The suite controls the key passphrase itself (via the 0600 file in each KOIN_HOME).
os.environ.pop("KOIN_KEY_PASSPHRASE", None)
os.environ.pop("KOIN_TSA_URLS", None)


def write_passphrase_file(home: Path, passphrase: str = PASSPHRASE) -> None:
    keys.write_private_file(home / "keys" / "passphrase", passphrase.encode() + b"\n")


@pytest.fixture(scope="session")
def koin_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `KOIN_HOME` with the demo PKI (root → issuing CA → position / witness / TSA),
    the stamp font and the demo seal."""
    home = tmp_path_factory.mktemp("koin-home")
    write_passphrase_file(home)
    Installation(home, public_url=PUBLIC_URL).initialize()
    return home


@pytest.fixture(scope="session")
def installation(koin_home: Path) -> Installation:
    return Installation(koin_home, public_url=PUBLIC_URL)


@pytest.fixture(scope="session")
def key_store(koin_home: Path) -> keys.KeyStore:
    return keys.KeyStore.open(koin_home, PASSPHRASE.encode())


@pytest.fixture(scope="session")
def root_pem(koin_home: Path) -> Path:
    return koin_home / "pki" / "root-ca.pem"


@pytest.fixture(scope="session")
def root_cert(root_pem: Path) -> asn1_x509.Certificate:
    return keys.load_certificates([root_pem])[0]


@pytest.fixture(scope="session")
def chain_pem(koin_home: Path) -> Path:
    """Issuing CA + root, PEM."""
    return koin_home / "pki" / "chain.pem"


@pytest.fixture(scope="session")
def nss_db(tmp_path_factory: pytest.TempPathFactory, root_pem: Path) -> Path:
    return make_nss_db(tmp_path_factory.mktemp("nssdb"), root_pem)


@pytest.fixture(scope="session")
def permit_pdf(installation: Installation) -> bytes:
    return make_permit_pdf(installation.font_file, pages=2)


@pytest.fixture(scope="session")
def one_page_permit(installation: Installation) -> bytes:
    return make_permit_pdf(installation.font_file, pages=1)


@pytest.fixture
def passphrase_env(monkeypatch: pytest.MonkeyPatch) -> str:
    """Provide the passphrase through KOIN_KEY_PASSPHRASE instead of the file."""
    monkeypatch.setenv("KOIN_KEY_PASSPHRASE", PASSPHRASE)
    return PASSPHRASE


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
START_REDIS = (
    'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'
)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis of the tests (KOIN_TEST_REDIS_URL, default local): fails, never skips, when
    it cannot be reached."""
    import redis

    url = os.environ.get("KOIN_TEST_REDIS_URL") or DEFAULT_REDIS_URL
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {url} is not reachable ({exc}); start it with: {START_REDIS}",
                    pytrace=False)
    return url

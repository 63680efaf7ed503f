"""Schemathesis against a running ``koin serve``: every operation of ``/api/v1/openapi.json`` is
called with generated requests (valid and invalid) and an API key holding every scope; no
answer may be a server error or break the documented schema (status codes, content types,
headers, JSON bodies).

Left out is one check, ``positive_data_acceptance``: a request that fits the schema may still
be refused, because a schema cannot say "a PDF that parses" or "a contract that is a draft"
(random bytes sent as ``application/pdf`` are rightly answered 415/422).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

import contracts
from contracts import migrate, session_scope
from tests.servers import free_port, koin_process


@pytest.fixture(scope="module")
def running(koin_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[str, str]]:
    """A ``koin serve`` and an API key with the scopes sign, contracts and verify."""
    home = tmp_path_factory.mktemp("schemathesis") / "home"
    shutil.copytree(koin_home, home)
    for leftover in home.glob("koin.db*"):
        leftover.unlink()
    url = contracts.database_url(home)
    migrate.upgrade(url)
    engine = contracts.make_engine(url)
    with session_scope(contracts.make_session_factory(engine)) as session:
        user, _ = contracts.create_user(
            session, "fuzz@pref.ibaraki.example", ["signer", "officer"]
        )
        _, key = contracts.create_api_key(
            session, user, name="schemathesis", scopes=["sign", "contracts", "verify"]
        )
    engine.dispose()
    port = free_port()
    with koin_process(
        home, "serve", "--no-init", "--port", str(port), port=port,
        env={"KOIN_JOBS_INTERVAL": "0", "KOIN_DEV_SMTP_PORT": "0",
             "KOIN_PUBLIC_URL": f"http://127.0.0.1:{port}", "KOIN_API_RATE": "100000",
             "KOIN_API_BURST": "100000"},
    ):
        yield f"http://127.0.0.1:{port}", key


def test_api_conforms_to_its_openapi_document(running: tuple[str, str]) -> None:
    """Every operation, 25 generated cases each (schemathesis' pytest plugin does not run
    under pytest 9, so the operations are driven here directly)."""
    base_url, key = running
    api = schemathesis.openapi.from_url(f"{base_url}/api/v1/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in api.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        def check(case: Any) -> None:
            case.call_and_validate(
                base_url=base_url,
                headers={"Authorization": f"Bearer {key}"},
                excluded_checks=[positive_data_acceptance],
                timeout=120,
            )

        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:  # collect all, fail with every finding
            failures.append(f"{operation.label}: {exc}")
    assert operations >= 20, f"only {operations} operations in the document"
    assert not failures, "\n\n".join(failures)

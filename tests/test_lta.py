"""Long-term validity (PAdES B-LTA) kept up for the files the service stores.

The decisive check: a document signed under certificates that expire within the hour, then
renewed (a TSA with a new certificate adds a document timestamp over everything), still
verifies OFFLINE two days later — with ``signer.verify_pdf`` and the installation's policy, and
with pyHanko's validator from the DSS alone with revocation checks required — while the same
document without the renewal does not. Around it: the registry on SQLite and PostgreSQL
(registration where files are stored, idempotence, concurrent renewers, a TSA that is down, a
crash between rename and commit, files changed behind koin's back, weak algorithms), the
chain-head token chain checked with ``openssl ts -verify``, the verify page recognising copies
handed out before a renewal, ``koin lta renew`` and the periodic job of ``koin serve``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from asn1crypto import x509 as asn1_x509
from click.testing import CliRunner
from flask.testing import FlaskClient
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation import validate_pdf_signature, validate_pdf_timestamp
from pyhanko.sign.validation.dss import DocumentSecurityStore
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

import keys
from contracts import (
    BatchDocument,
    BatchWorker,
    CompletionOutcome,
    Contract,
    CopyMatch,
    EventKind,
    LtaFile,
    LtaKind,
    LtaPolicy,
    LtaRenewal,
    LtaWorker,
    SignedDocument,
    UserRole,
    add_document,
    chain_head_tokens,
    check_copy,
    complete_contract,
    contract_file,
    create_batch,
    create_user,
    get_document,
    list_due,
    renew_due,
    session_scope,
    start_batch,
    verify_chain,
)
from contracts.lta import RenewalReason
from signer import (
    Indication,
    Installation,
    LtaError,
    SignatureLevel,
    SignOptions,
    WeakAlgorithms,
    extend_lta,
    inspect_lta,
    sign_pdf,
    verify_pdf,
)
from signer.samples import make_permit_pdf
from tests.conftest import PUBLIC_URL
from tests.lta_homes import rotate_tsa, short_lived_installation
from tests.servers import closed_port_url, free_port, koin_process
from tests.test_workflow import _all_consent, _contract, _create, officer  # noqa: F401
from tests.validators import make_nss_db, openssl, pdfsig, pdfsig_signatures
from timestamp import TimestampError, TsaClient
from web import create_app
from web.cli import cli

T = TypeVar("T")

#: Validation time for "after the certificates expired": the short-lived ones live an hour.
TWO_DAYS = dt.timedelta(days=2)
#: Margin that makes a one-hour TSA certificate due, but not one valid for years.
MARGIN = LtaPolicy(margin=dt.timedelta(days=30))


# -- helpers ------------------------------------------------------------------------------------


def _root(installation: Installation) -> asn1_x509.Certificate:
    return keys.load_certificates([installation.home / "pki" / "root-ca.pem"])[0]


def pyhanko_archive_check(
    pdf: bytes, root: asn1_x509.Certificate, moment: dt.datetime
) -> list[tuple[str, bool, str]]:
    """pyHanko's validator, from the DSS alone (plus our root), revocation required
    (hard-fail), no fetching — along the archive-timestamp chain of EN 319 102-1: the newest
    document timestamp as of ``moment``, each older one as of the time proven by the one after
    it, and the signature (with its own timestamp) as of the time proven by the document
    timestamp after it. Returns ``(what, passed, why)`` per step; it stops at the first failure.
    """
    reader = PdfFileReader(io.BytesIO(pdf))
    dss = DocumentSecurityStore.read_dss(reader)

    def context(at: dt.datetime) -> Any:
        return dss.as_validation_context({
            "trust_roots": [root], "allow_fetching": False, "revocation_mode": "hard-fail",
            "moment": at,
        })

    steps: list[tuple[str, bool, str]] = []
    proven = moment
    stamps = sorted(reader.embedded_timestamp_signatures, key=lambda e: e.signed_revision)
    for stamp in reversed(stamps):
        status = validate_pdf_timestamp(stamp, validation_context=context(proven))
        passed = status.intact and status.valid and status.trusted
        steps.append((f"document timestamp of revision {stamp.signed_revision}", passed,
                      str(status.trust_problem_indic)))
        if not passed:
            return steps
        proven = status.timestamp
    [signature] = reader.embedded_regular_signatures
    status = validate_pdf_signature(
        signature, signer_validation_context=context(proven), ts_validation_context=context(proven)
    )
    steps.append(("signature", status.bottom_line, str(status.trust_problem_indic)))
    return steps


def _passed(steps: list[tuple[str, bool, str]]) -> bool:
    return bool(steps) and all(passed for _, passed, _ in steps) and steps[-1][0] == "signature"


def _concurrently(*actions: Callable[[], T]) -> list[T]:
    start = threading.Barrier(len(actions))

    def run(action: Callable[[], T]) -> T:
        start.wait(timeout=30)
        return action()

    with ThreadPoolExecutor(len(actions)) as pool:
        return [f.result(timeout=300) for f in [pool.submit(run, a) for a in actions]]


def _rows(sessions: sessionmaker[Session]) -> list[LtaFile]:
    with sessions() as session:
        return list(session.scalars(select(LtaFile).order_by(LtaFile.id)))


def _renewals(sessions: sessionmaker[Session], file_id: int) -> list[LtaRenewal]:
    with sessions() as session:
        return list(session.scalars(
            select(LtaRenewal).where(LtaRenewal.file_id == file_id).order_by(LtaRenewal.id)
        ))


@pytest.fixture
def user_id(sessions: sessionmaker[Session]) -> int:
    with session_scope(sessions) as session:
        user, _ = create_user(session, "hisho@pref.ibaraki.example", [UserRole.SIGNER])
        return user.id


def _sign_batch(
    sessions: sessionmaker[Session], installation: Installation, user_id: int, count: int
) -> list[BatchDocument]:
    """A batch of ``count`` permits signed at B-T by a worker of ``installation``."""
    home = installation.home
    with session_scope(sessions) as session:
        batch = create_batch(session, home=home, user_id=user_id, name="LTA")
        for number in range(1, count + 1):
            pdf = make_permit_pdf(installation.font_file, number=number)
            add_document(session, batch, home=home, file_name=f"許可書{number}.pdf", data=pdf)
        start_batch(session, batch)
        batch_id = batch.id
    worker = BatchWorker(sessions, installation, threads=1, public_url=PUBLIC_URL)
    while worker.run_once():
        pass
    with sessions() as session:
        rows = list(session.scalars(
            select(BatchDocument).where(BatchDocument.batch_id == batch_id)
            .order_by(BatchDocument.position)
        ))
    assert all(row.state == "done" for row in rows), rows
    return rows


@pytest.fixture
def short_lived(koin_home: Path, tmp_path: Path) -> Installation:
    """An installation whose position, witness and TSA certificates expire in an hour."""
    return short_lived_installation(tmp_path / "short-lived", koin_home)


# -- the library: bring to B-LTA, and why it matters ---------------------------------------------


def test_a_renewed_document_verifies_offline_after_every_certificate_expired(
    short_lived: Installation, one_page_permit: bytes, tmp_path: Path
) -> None:
    signed = sign_pdf(
        one_page_permit, short_lived.signing_context(), SignOptions(level=SignatureLevel.B_LTA)
    ).data
    assert signed is not None
    root = _root(short_lived)
    now = dt.datetime.now(dt.UTC)
    later = now + TWO_DAYS
    signer_expiry = short_lived.key_store.certificate_for(keys.Role.POSITION)[
        "tbs_certificate"]["validity"]["not_after"].native
    first_tsa = inspect_lta(signed).newest
    assert first_tsa is not None and inspect_lta(signed).is_lta
    assert signer_expiry < later and first_tsa.tsa_not_after < later  # both expired by then

    # Today both checks pass; two days on, without renewal, both fail (so the test proves
    # something): the signer's and the TSA's certificates have expired and nothing newer
    # proves the signature existed while they were valid.
    policy = short_lived.verify_policy()
    assert verify_pdf(signed, policy).passed
    assert _passed(pyhanko_archive_check(signed, root, now))
    stale = verify_pdf(signed, dataclasses.replace(policy, validation_time=later))
    assert stale.indication is Indication.INDETERMINATE
    assert all(s.indication is not Indication.PASSED for s in stale.signatures), stale
    assert not _passed(pyhanko_archive_check(signed, root, later))

    # The TSA gets a certificate valid for years; a renewal adds the validation data of
    # everything and a document timestamp over it, after the original bytes.
    renewer = rotate_tsa(short_lived)
    result = extend_lta(signed, renewer.timestamper(), renewer.trust_material())
    renewed = result.data
    assert renewed.startswith(signed) and len(renewed) > len(signed)
    assert result.previous_sha256 == hashlib.sha256(signed).hexdigest()
    assert result.newest.tsa_not_after > now + dt.timedelta(days=365)
    assert result.unresolved == ()
    state = inspect_lta(renewed)
    assert state.is_lta and state.document_timestamps == 2 and state.newest == result.newest

    # Two days on, offline: koin's verifier with the installation's policy ...
    policy_later = dataclasses.replace(renewer.verify_policy(), validation_time=later)
    report = verify_pdf(renewed, policy_later)
    assert report.passed, [(s.kind, s.subindication, s.details) for s in report.signatures]
    signature = report.signatures[0]
    assert signature.kind == "signature" and signature.pades_level == "B-LTA"
    assert any("document timestamps after it" in d for d in signature.details)
    # ... and pyHanko's, from the DSS alone with revocation required.
    steps = pyhanko_archive_check(renewed, root, later)
    assert _passed(steps), steps
    assert len(steps) == 3

    # A reader sees the signature valid and trusted today (pdfsig with NSS trusting this root
    # only; poppler lists document timestamps but does not validate them).
    nss = make_nss_db(tmp_path / "nss", short_lived.home / "pki" / "root-ca.pem")
    path = tmp_path / "renewed.pdf"
    path.write_bytes(renewed)
    blocks = pdfsig_signatures(pdfsig(path, nss))
    assert len(blocks) == 3, blocks
    assert "Signature is Valid." in blocks[0] and "Certificate is Trusted." in blocks[0]
    assert all("Common Name: koin Time-Stamping Authority" in b for b in blocks[1:]), blocks


def test_a_b_t_document_is_brought_to_b_lta(
    installation: Installation, one_page_permit: bytes
) -> None:
    signed = sign_pdf(one_page_permit, installation.signing_context()).data
    assert signed is not None
    before = inspect_lta(signed)
    assert not before.is_lta and before.newest is None and not before.has_dss
    result = extend_lta(signed, installation.timestamper(), installation.trust_material())
    after = inspect_lta(result.data)
    assert after.is_lta and after.has_dss and after.document_timestamps == 1
    assert result.certificates_added >= 4 and result.crls_added == 2  # root, CA, leaves; CRLs
    report = verify_pdf(result.data, installation.verify_policy())
    assert report.passed and report.signatures[0].pades_level == "B-LTA"
    kinds = [change.kind.value for change in report.signatures[0].changes_after]
    assert kinds == ["dss", "document_timestamp"]


def test_a_tsa_that_is_down_changes_nothing(
    installation: Installation, one_page_permit: bytes
) -> None:
    signed = sign_pdf(one_page_permit, installation.signing_context()).data
    assert signed is not None
    down = TsaClient([closed_port_url()], trust_roots=[_root(installation)], timeout=2)
    with pytest.raises(TimestampError) as caught:
        extend_lta(signed, down, installation.trust_material())
    assert "TSA" in caught.value.message_en


def test_unusable_inputs_are_refused(installation: Installation, one_page_permit: bytes) -> None:
    with pytest.raises(LtaError) as unsigned:
        extend_lta(one_page_permit, installation.timestamper(), installation.trust_material())
    assert unsigned.value.fields["reason"] == "unsigned" and unsigned.value.message
    with pytest.raises(LtaError):
        inspect_lta(one_page_permit)


def test_weak_algorithms_setting() -> None:
    weak = WeakAlgorithms.parse("SHA1, rsa1024 ec-224")
    assert weak.is_weak("sha1", "rsa", 2048)
    assert weak.is_weak("sha256", "rsa", 1024) and weak.is_weak("sha256", "rsa", 768)
    assert not weak.is_weak("sha256", "rsa", 2048)
    assert weak.is_weak("sha256", "ec", 224) and not weak.is_weak("sha256", "ec", 256)
    assert weak.renewal_digest() == "sha256"
    assert WeakAlgorithms.parse("sha256").renewal_digest() == "sha384"
    assert str(weak) == "sha1,ec224,rsa1024"
    for bad in ("md4", "rsa", "sha256,rsaXL"):
        with pytest.raises(LtaError) as caught:
            WeakAlgorithms.parse(bad)
        assert caught.value.message and caught.value.message_en
    with pytest.raises(LtaError):
        WeakAlgorithms.parse("sha256 sha384 sha512").renewal_digest()
    with pytest.raises(LtaError):
        LtaPolicy.from_settings(-1)


# -- the registry and the renewer (SQLite and PostgreSQL) ---------------------------------------


def test_stored_batch_documents_are_registered_renewed_once_and_recognised(
    sessions: sessionmaker[Session], installation: Installation, user_id: int
) -> None:
    [document] = _sign_batch(sessions, installation, user_id, 1)
    [row] = _rows(sessions)
    assert (row.kind, row.path, row.document_id) == (
        "batch_document", document.output_path, document.document_id
    )
    assert row.sha256 == row.original_sha256 == document.output_sha256
    assert row.tsa_not_after is None  # not B-LTA yet: due
    path = installation.home / str(document.output_path)
    signed = path.read_bytes()
    with sessions() as session:
        assert [d.reason for d in list_due(session, LtaPolicy())] == [RenewalReason.NOT_LTA]

    report = renew_due(sessions, installation)
    assert report.failed == [] and [r.reason for r in report.renewed] == [RenewalReason.NOT_LTA]
    renewed = path.read_bytes()
    assert renewed.startswith(signed) and inspect_lta(renewed).is_lta
    assert verify_pdf(renewed, installation.verify_policy()).passed
    [row] = _rows(sessions)
    digest = hashlib.sha256(renewed).hexdigest()
    assert row.sha256 == digest and row.size == len(renewed) and row.renewals == 1
    assert row.original_size == len(signed) and row.tsa_not_after is not None
    assert row.lease_owner is None and row.error is None
    [history] = _renewals(sessions, row.id)
    assert (history.reason, history.previous_sha256, history.sha256) == (
        "not_lta", document.output_sha256, digest
    )
    with sessions() as session:
        batch_row = session.get(BatchDocument, document.id)
        record = get_document(session, str(document.document_id))
        assert batch_row is not None and batch_row.output_sha256 == digest  # downloads match
        assert record is not None and record.sha256 == document.output_sha256  # as signed

    # Nothing due: a second run changes nothing.
    again = renew_due(sessions, installation)
    assert again.claimed == 0 and path.read_bytes() == renewed
    assert len(_renewals(sessions, row.id)) == 1

    # The verify page's check: the copy handed out before, the renewed one, and the stored
    # file cut at the end of its DSS revision are this document; anything else is not.
    ends = [m.end() for m in re.finditer(rb"%%EOF\r?\n?", renewed)]
    assert len(ends) >= 3
    between = renewed[: ends[-2]]  # signed + DSS, before the document timestamp
    with sessions() as session:
        assert record is not None
        assert check_copy(session, installation.home, record, signed) is CopyMatch.SIGNED
        assert check_copy(session, installation.home, record, renewed) is CopyMatch.RENEWED
        assert check_copy(session, installation.home, record, between) is CopyMatch.EARLIER
        for other in (signed[:-100], renewed[: ends[-2] - 7], renewed + b"%%EOF\n",
                      renewed.replace(b"Ibaraki", b"Ibaraka", 1)):
            assert check_copy(session, installation.home, record, other) is CopyMatch.NONE


def test_expiring_timestamps_are_renewed_with_a_tsa_that_outlasts_them(
    sessions: sessionmaker[Session], short_lived: Installation, user_id: int
) -> None:
    [document] = _sign_batch(sessions, short_lived, user_id, 1)
    path = short_lived.home / str(document.output_path)
    signed = path.read_bytes()
    root = _root(short_lived)

    # First run: B-T → B-LTA with the TSA as it is (its certificate expires within the hour).
    first = renew_due(sessions, short_lived, policy=MARGIN)
    assert [r.reason for r in first.renewed] == [RenewalReason.NOT_LTA]
    once = path.read_bytes()
    [row] = _rows(sessions)
    assert row.tsa_not_after is not None
    assert row.tsa_not_after < dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)

    # Due again at once (expiry within the margin), but a renewal by the same TSA would be
    # worth nothing: refused, the file untouched, retried a day later.
    refused = renew_due(sessions, short_lived, policy=MARGIN)
    assert refused.renewed == [] and len(refused.failed) == 1
    assert "koin keys rotate tsa" in refused.failed[0][2]
    assert path.read_bytes() == once
    [row] = _rows(sessions)
    assert row.error_en is not None and row.retry_after is not None
    assert row.retry_after > dt.datetime.now(dt.UTC) + dt.timedelta(hours=23)

    # With a new TSA certificate, the next due run renews it for expiry.
    renewer = rotate_tsa(short_lived)
    tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1, minutes=1)
    second = renew_due(sessions, renewer, policy=MARGIN, now=tomorrow)
    assert [r.reason for r in second.renewed] == [RenewalReason.EXPIRY], second
    stored = path.read_bytes()
    assert stored.startswith(once) and stored.startswith(signed)
    [row] = _rows(sessions)
    assert row.renewals == 2 and row.error is None and row.retry_after is None
    assert row.tsa_not_after is not None and row.tsa_not_after > tomorrow + MARGIN.margin

    later = dt.datetime.now(dt.UTC) + TWO_DAYS
    report = verify_pdf(stored, dataclasses.replace(renewer.verify_policy(), validation_time=later))
    assert report.passed, [(s.kind, s.subindication, s.details) for s in report.signatures]
    assert _passed(pyhanko_archive_check(stored, root, later))
    assert not _passed(pyhanko_archive_check(once, root, later))


def test_a_tsa_that_is_down_leaves_the_file_and_is_tried_again(
    sessions: sessionmaker[Session], installation: Installation, user_id: int
) -> None:
    [document] = _sign_batch(sessions, installation, user_id, 1)
    path = installation.home / str(document.output_path)
    signed = path.read_bytes()
    now = dt.datetime.now(dt.UTC)
    down = renew_due(sessions, installation, tsa_urls=[closed_port_url()], now=now)
    assert down.renewed == [] and len(down.failed) == 1
    assert "TSA" in down.failed[0][2]
    assert path.read_bytes() == signed  # untouched, and never the local clock
    [row] = _rows(sessions)
    assert row.attempts == 1 and row.sha256 == hashlib.sha256(signed).hexdigest()
    assert row.retry_after is not None and row.error is not None
    assert now < row.retry_after <= now + dt.timedelta(minutes=1)
    assert renew_due(sessions, installation, now=now).claimed == 0  # backing off
    back = renew_due(sessions, installation, now=row.retry_after + dt.timedelta(seconds=1))
    assert len(back.renewed) == 1 and inspect_lta(path.read_bytes()).is_lta
    [row] = _rows(sessions)
    assert row.attempts == 0 and row.error is None


def test_concurrent_renewers_renew_each_file_once(
    sessions: sessionmaker[Session], installation: Installation, user_id: int
) -> None:
    documents = _sign_batch(sessions, installation, user_id, 4)

    def renewer(owner: str) -> int:
        count = 0
        while (report := renew_due(sessions, installation, limit=1, owner=owner)).claimed:
            assert report.failed == [], report.failed
            count += len(report.renewed)
        return count

    counts = _concurrently(lambda: renewer("renewer-a"), lambda: renewer("renewer-b"),
                           lambda: renewer("renewer-c"))
    assert sum(counts) == 4
    for row in _rows(sessions):
        assert row.renewals == 1 and len(_renewals(sessions, row.id)) == 1
    for document in documents:
        data = (installation.home / str(document.output_path)).read_bytes()
        assert inspect_lta(data).document_timestamps == 1
        assert verify_pdf(data, installation.verify_policy()).passed


def test_an_interrupted_renewal_is_recorded_and_a_foreign_change_refused(
    sessions: sessionmaker[Session], installation: Installation, user_id: int
) -> None:
    first, second = _sign_batch(sessions, installation, user_id, 2)
    # Let the renewer look at both once (sizes recorded), with a TSA that is down.
    renew_due(sessions, installation, tsa_urls=[closed_port_url()])
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)

    # A renewal renamed into place whose transaction never committed (a crash).
    path = installation.home / str(first.output_path)
    crashed = extend_lta(path.read_bytes(), installation.timestamper(),
                         installation.trust_material())
    path.write_bytes(crashed.data)
    # A file changed behind koin's back.
    other = installation.home / str(second.output_path)
    foreign = other.read_bytes() + b"% appended by someone\n"
    other.write_bytes(foreign)

    report = renew_due(sessions, installation, now=later)
    assert [r.reason for r in report.renewed] == [RenewalReason.RECOVERED]
    assert path.read_bytes() == crashed.data
    [changed] = report.failed
    assert "changed outside koin" in changed[2] and other.read_bytes() == foreign
    rows = {row.path: row for row in _rows(sessions)}
    recovered = rows[first.output_path]
    assert recovered.sha256 == crashed.sha256 and recovered.renewals == 1
    assert _renewals(sessions, recovered.id)[0].reason == "recovered"
    refused = rows[second.output_path]
    assert refused.sha256 == second.output_sha256 and refused.retry_after is not None
    assert refused.retry_after > later + dt.timedelta(hours=23)
    with sessions() as session:
        batch_row = session.get(BatchDocument, first.id)
        assert batch_row is not None and batch_row.output_sha256 == crashed.sha256


def test_weak_algorithms_are_renewed_with_a_stronger_digest(
    sessions: sessionmaker[Session], installation: Installation, user_id: int
) -> None:
    [document] = _sign_batch(sessions, installation, user_id, 1)
    renew_due(sessions, installation)
    [row] = _rows(sessions)
    assert row.algorithms == "sha256,rsa2048"
    policy = LtaPolicy(weak=WeakAlgorithms.parse("sha256"))
    report = renew_due(sessions, installation, policy=policy)
    assert [r.reason for r in report.renewed] == [RenewalReason.ALGORITHM]
    [row] = _rows(sessions)
    assert row.digest_algorithm == "sha384" and row.renewals == 2
    data = (installation.home / str(document.output_path)).read_bytes()
    assert verify_pdf(data, installation.verify_policy()).passed
    assert renew_due(sessions, installation, policy=policy).claimed == 0


# -- contracts: the final PDF and the chain-head tokens ----------------------------------------


def test_a_contract_is_kept_up_on_its_audit_chain_and_its_tokens_chain_for_openssl(
    sessions: sessionmaker[Session],
    short_lived: Installation,
    permit_pdf: bytes,
    officer: int,  # noqa: F811
    tmp_path: Path,
) -> None:
    contract_id = _create(sessions, short_lived, officer, permit_pdf)
    _all_consent(sessions, contract_id)
    assert complete_contract(sessions, contract_id, short_lived) is CompletionOutcome.COMPLETED
    contract = _contract(sessions, contract_id)
    kinds = {row.kind: row for row in _rows(sessions)}
    assert set(kinds) == {"contract_final", "chain_head_token"}
    assert kinds["chain_head_token"].tsa_not_after is not None  # facts known at once
    final_path = contract_file(short_lived.home, str(contract.final_path))
    signed = final_path.read_bytes()

    renewer = rotate_tsa(short_lived)
    report = renew_due(sessions, renewer, policy=MARGIN)
    assert report.failed == []
    assert sorted((r.kind.value, r.reason.value) for r in report.renewed) == [
        ("chain_head_token", "expiry"), ("contract_final", "not_lta"),
    ]
    renewed = final_path.read_bytes()
    assert renewed.startswith(signed)
    with sessions() as session:
        fresh = session.get(Contract, contract_id)
        assert fresh is not None
        assert fresh.final_sha256 == hashlib.sha256(renewed).hexdigest()  # downloads match
        record = get_document(session, fresh.document_id)
        assert record is not None and record.sha256 == contract.final_sha256  # as signed
        tokens = chain_head_tokens(session, fresh)
        check = verify_chain(session, fresh)
        events = [e for e in fresh_events(session, fresh)
                  if e.kind == EventKind.ARCHIVE_TIMESTAMPED.value]
    assert check.ok, check
    assert sorted(e.details["target"] for e in events) == ["chain_head_token", "final_pdf"]
    assert len(tokens) == 2

    # openssl: token 1 over the chain head, token 2 over the SHA-256 of token 1's DER.
    chain = short_lived.home / "pki" / "chain.pem"
    root_pem = short_lived.home / "pki" / "root-ca.pem"
    for number, token in enumerate(tokens, start=1):
        (tmp_path / f"token-{number}.tst").write_bytes(token)
    head = openssl("ts", "-verify", "-digest", str(contract.chain_head_sha256), "-in",
                   str(tmp_path / "token-1.tst"), "-token_in", "-CAfile", str(root_pem),
                   "-untrusted", str(chain))
    assert "Verification: OK" in head.stdout, head.stdout + head.stderr
    linked = openssl("ts", "-verify", "-digest", hashlib.sha256(tokens[0]).hexdigest(), "-in",
                     str(tmp_path / "token-2.tst"), "-token_in", "-CAfile", str(root_pem),
                     "-untrusted", str(chain))
    assert "Verification: OK" in linked.stdout, linked.stdout + linked.stderr
    wrong = openssl("ts", "-verify", "-digest", hashlib.sha256(tokens[1]).hexdigest(), "-in",
                    str(tmp_path / "token-2.tst"), "-token_in", "-CAfile", str(root_pem),
                    "-untrusted", str(chain))
    assert "Verification: OK" not in wrong.stdout

    later = dt.datetime.now(dt.UTC) + TWO_DAYS
    policy = dataclasses.replace(renewer.verify_policy(), validation_time=later)
    assert verify_pdf(renewed, policy).passed
    assert not verify_pdf(signed, policy).passed
    assert renew_due(sessions, renewer, policy=MARGIN).claimed == 0


def fresh_events(session: Session, contract: Contract) -> list[Any]:
    from contracts import list_events

    return list_events(session, contract)


# -- koin lta renew, koin serve's worker, the verify page ---------------------------------------


@pytest.fixture
def cli_env(
    engine: Any, db_url: str, installation: Installation, monkeypatch: pytest.MonkeyPatch
) -> CliRunner:
    monkeypatch.setenv("KOIN_HOME", str(installation.home))
    monkeypatch.setenv("KOIN_DATABASE_URL", db_url)
    monkeypatch.setenv("KOIN_LANG", "en")
    monkeypatch.delenv("KOIN_LTA_WEAK_ALGORITHMS", raising=False)
    monkeypatch.delenv("KOIN_LTA_MARGIN_DAYS", raising=False)
    return CliRunner()


def test_koin_lta_renew(
    cli_env: CliRunner,
    sessions: sessionmaker[Session],
    installation: Installation,
    user_id: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    documents = _sign_batch(sessions, installation, user_id, 2)
    listed = cli_env.invoke(cli, ["lta", "renew", "--dry-run"])
    assert listed.exit_code == 0, listed.output
    assert "Due: 2 file(s) (nothing was changed)" in listed.output
    assert all(str(d.output_path) in listed.output for d in documents)
    assert all(row.renewals == 0 for row in _rows(sessions))

    monkeypatch.setenv("KOIN_TSA_URLS", closed_port_url())
    down = cli_env.invoke(cli, ["lta", "renew"])
    assert down.exit_code == 1 and "failed 2" in down.output
    assert "No TSA returned a valid timestamp" in down.output
    monkeypatch.delenv("KOIN_TSA_URLS")

    with session_scope(sessions) as session:  # no back-off wait in this test
        for row in session.scalars(select(LtaFile)):
            row.retry_after = None
    done = cli_env.invoke(cli, ["lta", "renew"])
    assert done.exit_code == 0, done.output
    assert "Renewed 2, unchanged 0, failed 0" in done.output
    again = cli_env.invoke(cli, ["lta", "renew", "--margin-days", "0"])
    assert again.exit_code == 0 and "Renewed 0" in again.output

    monkeypatch.setenv("KOIN_LTA_WEAK_ALGORITHMS", "md4")
    bad = cli_env.invoke(cli, ["lta", "renew"])
    assert bad.exit_code == 1 and "md4" in bad.output
    usage = cli_env.invoke(cli, ["lta", "renew", "--margin-days", "-3"])
    assert usage.exit_code == 2


def test_the_worker_of_koin_serve_renews(
    sessions: sessionmaker[Session], installation: Installation, user_id: int
) -> None:
    [document] = _sign_batch(sessions, installation, user_id, 1)
    worker = LtaWorker(sessions, installation, interval=3600, chunk=5)
    with worker:
        deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)
        while _rows(sessions)[0].renewals == 0 and dt.datetime.now(dt.UTC) < deadline:
            threading.Event().wait(0.2)
    assert _rows(sessions)[0].renewals == 1
    assert inspect_lta((installation.home / str(document.output_path)).read_bytes()).is_lta
    with pytest.raises(ValueError):
        LtaWorker(sessions, installation, chunk=0)


@pytest.fixture
def client(db_url: str, engine: Any, installation: Installation) -> Iterator[FlaskClient]:
    from web import services

    app = create_app({
        "KOIN_HOME": str(installation.home), "KOIN_DATABASE_URL": db_url,
        "KOIN_PUBLIC_URL": PUBLIC_URL, "TESTING": True,
        "SECRET_KEY": "test-secret-key-0123456789abcdef-not-for-production",
    })
    yield app.test_client()
    services.close(app)


def test_the_verify_page_recognises_copies_from_before_and_after_a_renewal(
    client: FlaskClient, sessions: sessionmaker[Session], installation: Installation, user_id: int
) -> None:
    [document] = _sign_batch(sessions, installation, user_id, 1)
    path = installation.home / str(document.output_path)
    signed = path.read_bytes()
    renew_due(sessions, installation)
    renewed = path.read_bytes()
    url = f"/verify/{document.document_id}"
    page = client.get(url).get_data(as_text=True)
    assert 'id="lta"' in page and hashlib.sha256(renewed).hexdigest() in page

    def check(data: bytes) -> str:
        response = client.post(url, data={"file": (io.BytesIO(data), "copy.pdf")},
                               content_type="multipart/form-data")
        assert response.status_code == 200
        return response.get_data(as_text=True)

    before = check(signed)
    assert 'data-copy="signed"' in before and "同一です" in before
    after = check(renewed)
    assert 'data-copy="renewed"' in after and "署名された内容は同一です" in after
    other = sign_pdf(make_permit_pdf(installation.font_file, number=99),
                     installation.signing_context()).data
    assert other is not None
    assert "一致しません" in check(other)
    english = client.post(f"{url}?lang=en", data={"file": (io.BytesIO(renewed), "c.pdf")},
                          content_type="multipart/form-data").get_data(as_text=True)
    assert "validation data and a document timestamp" in english


def test_registration_is_idempotent_and_checked(
    sessions: sessionmaker[Session], installation: Installation, user_id: int
) -> None:
    from contracts.lta import register_stored_file

    [document] = _sign_batch(sessions, installation, user_id, 1)
    with session_scope(sessions) as session:
        register_stored_file(session, LtaKind.BATCH_DOCUMENT, str(document.output_path),
                             str(document.output_sha256), document_id=document.document_id)
        with pytest.raises(ValueError):
            register_stored_file(session, LtaKind.BATCH_DOCUMENT, "../etc/passwd", "0" * 64)
        with pytest.raises(ValueError):
            register_stored_file(session, LtaKind.CHAIN_HEAD_TOKEN, "x", "0" * 64)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(LtaFile)) == 1
        assert session.scalar(select(func.count()).select_from(SignedDocument)) == 1


def test_files_stored_before_the_registry_are_registered_by_the_renewer(
    sessions: sessionmaker[Session],
    installation: Installation,
    user_id: int,
    permit_pdf: bytes,
    officer: int,  # noqa: F811
) -> None:
    [document] = _sign_batch(sessions, installation, user_id, 1)
    contract_id = _create(sessions, installation, officer, permit_pdf)
    _all_consent(sessions, contract_id)
    assert complete_contract(sessions, contract_id, installation) is CompletionOutcome.COMPLETED
    with session_scope(sessions) as session:  # as if stored before this feature existed
        session.execute(delete(LtaFile))
    report = renew_due(sessions, installation)
    assert report.failed == [] and len(report.renewed) == 2  # batch output, contract final
    kinds = sorted(row.kind for row in _rows(sessions))
    assert kinds == ["batch_document", "chain_head_token", "contract_final"]
    assert inspect_lta((installation.home / str(document.output_path)).read_bytes()).is_lta


def test_koin_serve_keeps_stored_files_at_b_lta(
    sessions: sessionmaker[Session], db_url: str, koin_home: Path, tmp_path: Path, user_id: int
) -> None:
    home = tmp_path / "home"
    shutil.copytree(koin_home, home)
    installation = Installation(home, public_url=PUBLIC_URL)
    [document] = _sign_batch(sessions, installation, user_id, 1)
    port = free_port()
    env = {"KOIN_DATABASE_URL": db_url, "KOIN_LTA_INTERVAL": "1", "KOIN_DEV_SMTP_PORT": "0"}
    with koin_process(home, "serve", "--port", str(port), port=port, env=env):
        deadline = time.monotonic() + 60
        while _rows(sessions)[0].renewals == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
    [row] = _rows(sessions)
    assert row.renewals == 1 and row.lease_owner is None
    assert inspect_lta((home / str(document.output_path)).read_bytes()).is_lta

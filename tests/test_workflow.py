"""Witness-type contracts end to end, on SQLite and on a real PostgreSQL (fixtures in
:mod:`tests.db`): links, identification, consent races, completion exactly once, the signed
result checked by pyHanko, pdfsig and openssl, and the audit chain."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import re
import secrets
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils.reader import PdfFileReader
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

import contracts.workflow as workflow
from contracts import (
    AccessLink,
    AlreadyResponded,
    AuditEvent,
    CodeOutcome,
    CompletionOutcome,
    Contract,
    ContractNotOpen,
    ContractsError,
    ContractStatus,
    DocumentMismatch,
    EventKind,
    IdentificationRequired,
    InvalidContractData,
    InvalidContractState,
    LinkAlreadyUsed,
    LinkExpired,
    LinkInvalid,
    NotYourTurn,
    OutboxMessage,
    Party,
    PartyLocked,
    PartySession,
    PartySpec,
    PartyStatus,
    UserRole,
    cancel_contract,
    complete_contract,
    consent,
    contract_file,
    create_contract,
    create_user,
    decline,
    get_document,
    list_events,
    list_parties,
    open_download,
    open_link,
    resend_invitations,
    run_due,
    send_contract,
    session_scope,
    verify_chain,
    verify_code,
)
from contracts.audit import EventData
from keys import Role
from signer import (
    AlreadySignedPdfError,
    EncryptedPdfError,
    Installation,
    InvalidPdfError,
    SignOptions,
    sign_pdf,
    verify_pdf,
)
from tests.cli_language import assert_japanese
from tests.conftest import PUBLIC_URL
from tests.hostile import password_protected_pdf
from tests.validators import openssl, pdfsig, pdfsig_signatures, pyhanko_status

WITNESS_CN = "koin Witness Signing Service"
ACCESS_CODE = "20260401"
UA = "Mozilla/5.0 (koin tests)"
HANAKO = PartySpec(
    name="茨城 花子",
    organisation="茨城県 土木部",
    email="hanako@pref.ibaraki.example",
    role="prefecture",
    identification="access_code",
    access_code=ACCESS_CODE,
)
TARO = PartySpec(
    name="常陸 太郎",
    organisation="株式会社 水戸建設",
    email="taro@mito-kensetsu.example",
    role="contractor",
    identification="email_otp",
)
_LINK = re.compile(r"/c/([A-Za-z0-9_-]{43})\b")
_DOWNLOAD = re.compile(r"/d/([A-Za-z0-9_-]{43})\b")
_OTP = re.compile(r"確認コード: (\d{6})")

T = TypeVar("T")


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def officer(sessions: sessionmaker[Session]) -> int:
    with session_scope(sessions) as session:
        user, _ = create_user(
            session, "keiyaku@pref.ibaraki.example", [UserRole.OFFICER],
            display_name="契約 担当", password="correct horse battery staple",
        )
        return user.id


def _create(
    sessions: sessionmaker[Session],
    installation: Installation,
    officer: int,
    pdf: bytes,
    *,
    send: bool = True,
    now: dt.datetime | None = None,
    **options: Any,
) -> int:
    with session_scope(sessions) as session:
        contract = create_contract(
            session, home=installation.home, officer_id=officer,
            title="県道123号線 道路改良工事 請負契約書", pdf=pdf,
            parties=options.pop("parties", [HANAKO, TARO]), now=now, **options,
        )
        if send:
            send_contract(session, contract, public_url=PUBLIC_URL, now=now)
        return contract.id


def _mails(
    sessions: sessionmaker[Session], *, to: str | None = None, tag: str | None = None
) -> list[OutboxMessage]:
    query = select(OutboxMessage).order_by(OutboxMessage.id)
    if to is not None:
        query = query.where(OutboxMessage.to_address == to)
    if tag is not None:
        query = query.where(OutboxMessage.tag == tag)
    with sessions() as session:
        return list(session.scalars(query))


def _token(message: OutboxMessage, pattern: re.Pattern[str] = _LINK) -> str:
    found = pattern.search(message.text_body)
    assert found, message.text_body
    return found.group(1)


def _last_token(sessions: sessionmaker[Session], to: str) -> str:
    invitations = [m for m in _mails(sessions, to=to) if _LINK.search(m.text_body)]
    assert invitations, f"no link mailed to {to}"
    return _token(invitations[-1])


def _in_tx(sessions: sessionmaker[Session], action: Callable[[Session], T]) -> T:
    with session_scope(sessions) as session:
        return action(session)


def _open(sessions: sessionmaker[Session], token: str, **options: Any) -> PartySession:
    return _in_tx(
        sessions, lambda s: open_link(s, token, ip="192.0.2.10", user_agent=UA, **options)
    )


def _code_for(sessions: sessionmaker[Session], session_: PartySession, email: str) -> str:
    if session_.identification.value == "access_code":
        return ACCESS_CODE
    found = _OTP.search(_mails(sessions, to=email, tag="contract-otp")[-1].text_body)
    assert found
    return found.group(1)


def _identify(
    sessions: sessionmaker[Session], email: str, **options: Any
) -> PartySession:
    opened = _open(sessions, _last_token(sessions, email), **options)
    code = _code_for(sessions, opened, email)
    result = _in_tx(
        sessions,
        lambda s: verify_code(s, opened.party_id, code, ip="192.0.2.10", user_agent=UA, **options),
    )
    assert result.outcome is CodeOutcome.VERIFIED, result
    return opened


def _consent(
    sessions: sessionmaker[Session], opened: PartySession, **options: Any
) -> ContractStatus:
    result = _in_tx(
        sessions,
        lambda s: consent(
            s, opened.party_id, document_sha256_seen=opened.original_sha256,
            ip=options.pop("ip", "192.0.2.10"), user_agent=UA, public_url=PUBLIC_URL, **options,
        ),
    )
    return result.status


def _contract(sessions: sessionmaker[Session], contract_id: int) -> Contract:
    with sessions() as session:
        contract = session.get(Contract, contract_id)
        assert contract is not None
        session.expunge(contract)
        return contract


def _events(sessions: sessionmaker[Session], contract_id: int) -> list[AuditEvent]:
    with sessions() as session:
        return list_events(session, _contract(sessions, contract_id))


def _kinds(sessions: sessionmaker[Session], contract_id: int) -> list[str]:
    return [event.kind for event in _events(sessions, contract_id)]


def _all_consent(sessions: sessionmaker[Session], contract_id: int) -> None:
    """Both parties identify and consent; the contract is left completing."""
    for party in (HANAKO, TARO):
        _consent(sessions, _identify(sessions, party.email))
    assert _contract(sessions, contract_id).status == ContractStatus.COMPLETING


def _final_bytes(installation: Installation, contract: Contract) -> bytes:
    assert contract.final_path is not None
    return contract_file(installation.home, contract.final_path).read_bytes()


def _signature_count(data: bytes) -> int:
    return len(PdfFileReader(io.BytesIO(data)).embedded_regular_signatures)


def _concurrently(*actions: Callable[[], T]) -> list[T | BaseException]:
    start = threading.Barrier(len(actions))

    def run(action: Callable[[], T]) -> T:
        start.wait(timeout=30)
        return action()

    with ThreadPoolExecutor(len(actions)) as pool:
        futures = [pool.submit(run, action) for action in actions]
        results: list[T | BaseException] = []
        for future in futures:
            error = future.exception(timeout=120)
            results.append(error if error is not None else future.result())
    return results


# -- the whole way ------------------------------------------------------------------------------


def test_happy_path_two_parties_to_a_signed_contract(
    sessions: sessionmaker[Session],
    installation: Installation,
    permit_pdf: bytes,
    officer: int,
    root_cert: asn1_x509.Certificate,
    root_pem: Path,
    chain_pem: Path,
    nss_db: Path,
    tmp_path: Path,
) -> None:
    contract_id = _create(sessions, installation, officer, permit_pdf)
    contract = _contract(sessions, contract_id)
    assert contract.status == ContractStatus.SENT
    assert contract.original_sha256 == hashlib.sha256(permit_pdf).hexdigest()
    original = contract_file(installation.home, contract.original_path)
    assert original == installation.home / "contracts" / contract.public_id / "original.pdf"
    assert original.read_bytes() == permit_pdf
    invitations = _mails(sessions, tag="contract-invitation")
    assert sorted(m.to_address for m in invitations) == sorted([HANAKO.email, TARO.email])
    assert all(f"{PUBLIC_URL}/c/" in m.text_body for m in invitations)
    assert "アクセスコード" in _mails(sessions, to=HANAKO.email)[0].text_body
    assert ACCESS_CODE not in _mails(sessions, to=HANAKO.email)[0].text_body
    with sessions() as session:  # only hashes of tokens and codes are stored
        tokens = [_token(m) for m in invitations]
        stored = set(session.scalars(select(AccessLink.token_sha256)))
        assert {hashlib.sha256(t.encode()).hexdigest() for t in tokens} <= stored
        assert not stored & set(tokens)
        hashes = [p.access_code_hash for p in list_parties(session, contract)]
        assert hashes[0] and ACCESS_CODE not in hashes[0] and hashes[1] is None

    # The prefecture's signer: access code, typed with a hyphen and full-width digits.
    hanako = _open(sessions, _last_token(sessions, HANAKO.email))
    assert not hanako.code_sent and hanako.contract_public_id == contract.public_id
    with pytest.raises(IdentificationRequired):
        _consent(sessions, hanako)
    result = _in_tx(
        sessions, lambda s: verify_code(s, hanako.party_id, "２０２６-０４０１", ip="192.0.2.10",
                                        user_agent=UA),
    )
    assert result.verified
    assert _consent(sessions, hanako, ip="192.0.2.10") is ContractStatus.PARTIALLY_AGREED

    # The contractor: a one-time code mailed when the link is opened.
    taro = _open(sessions, _last_token(sessions, TARO.email))
    assert taro.code_sent
    [otp_mail] = _mails(sessions, to=TARO.email, tag="contract-otp")
    code = _code_for(sessions, taro, TARO.email)
    assert code in otp_mail.text_body
    with sessions() as session:
        party = session.get(Party, taro.party_id)
        assert party is not None and party.otp_hash and code not in party.otp_hash
    assert _in_tx(
        sessions, lambda s: verify_code(s, taro.party_id, code, ip="2001:db8::7", user_agent=UA)
    ).verified
    assert _consent(sessions, taro, ip="2001:db8::7") is ContractStatus.COMPLETING

    assert complete_contract(sessions, contract_id, installation) is CompletionOutcome.COMPLETED
    assert (
        complete_contract(sessions, contract_id, installation)
        is CompletionOutcome.ALREADY_COMPLETED
    )

    contract = _contract(sessions, contract_id)
    assert contract.status == ContractStatus.COMPLETED and contract.completed_at is not None
    assert contract.final_path == f"contracts/{contract.public_id}/final.pdf"
    final = _final_bytes(installation, contract)
    assert hashlib.sha256(final).hexdigest() == contract.final_sha256
    assert final.startswith(permit_pdf)  # the original is an untouched first revision
    reader = PdfFileReader(io.BytesIO(final))
    assert int(reader.root["/Pages"]["/Count"]) == 3  # two pages + the certificate

    # pyHanko with our root as the only trust anchor.
    status = pyhanko_status(final, root_cert)
    assert status.intact and status.valid and status.trusted, status.pretty_print_details()
    assert status.signing_cert.subject.native["common_name"] == WITNESS_CN
    [embedded] = reader.embedded_regular_signatures
    assert str(embedded.sig_object["/Reason"]) == "茨城 花子、常陸 太郎 の合意に基づく立会人署名"
    assert "/AP" not in embedded.sig_field or embedded.sig_field["/Rect"] == [0, 0, 0, 0]
    # koin's own verifier agrees.
    assert verify_pdf(final, installation.verify_policy()).passed

    # pdfsig (poppler/NSS) trusting only our root.
    final_file = tmp_path / "final.pdf"
    final_file.write_bytes(final)
    [block] = pdfsig_signatures(pdfsig(final_file, nss_db))
    assert "Signature is Valid." in block
    assert "Certificate is Trusted." in block
    assert f"Signer Certificate Common Name: {WITNESS_CN}" in block
    assert "Total document signed" in block

    # The chain head's RFC 3161 token, checked by openssl over the head digest.
    assert contract.chain_head_sha256 and contract.chain_head_timestamp
    token_file = tmp_path / "chain-head.tst"
    token_file.write_bytes(contract.chain_head_timestamp)
    checked = openssl(
        "ts", "-verify", "-digest", contract.chain_head_sha256, "-in", str(token_file),
        "-token_in", "-CAfile", str(root_pem), "-untrusted", str(chain_pem),
    )
    assert "Verification: OK" in checked.stdout, checked.stdout + checked.stderr
    wrong = openssl(
        "ts", "-verify", "-digest", "0" * 64, "-in", str(token_file), "-token_in",
        "-CAfile", str(root_pem), "-untrusted", str(chain_pem),
    )
    assert "Verification: OK" not in wrong.stdout

    # The certificate of agreement, as text.
    page = subprocess.run(
        ["pdftotext", "-f", "3", "-l", "3", "-layout", str(final_file), "-"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "合意締結証明書" in page
    for party in (HANAKO, TARO):
        assert party.name in page and party.email in page and party.organisation in page
    assert contract.original_sha256 in page
    assert contract.document_id in page
    assert "アクセスコード" in page and "メール認証コード" in page
    assert "192.0.2.10" in page and "2001:db8::7" in page
    assert "令和" in page and "JST" in page
    events = _events(sessions, contract_id)
    last_consent = [e for e in events if e.kind == EventKind.CONSENTED][-1]
    assert last_consent.sha256 in page  # the chain head when the certificate was made

    # The audit chain, complete and intact, anchored by the token.
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["created", "sent"]
    assert kinds.count("signed") == 1 and kinds.count("completed") == 1
    assert kinds.index("signed") < kinds.index("completed") < kinds.index("chain_timestamped")
    for kind in ("opened", "code_sent", "code_verified", "consented", "email_queued"):
        assert kind in kinds
    completed = next(e for e in events if e.kind == EventKind.COMPLETED)
    assert completed.sha256 == contract.chain_head_sha256
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].prev_sha256 == "0" * 64
    consents = [e for e in events if e.kind == EventKind.CONSENTED]
    assert [e.document_sha256 for e in consents] == [contract.original_sha256] * 2
    assert consents[1].ip == "2001:db8::7" and consents[1].user_agent == UA
    with sessions() as session:
        check = verify_chain(session, contract)
        assert check.ok, check
        assert check.events == len(events)
        record = get_document(session, contract.document_id)
        assert record is not None and record.sha256 == contract.final_sha256
        assert record.signer_role == Role.WITNESS.value

    # Completion mails: a download link per party, and the officer's notice.
    completion_mails = _mails(sessions, tag="contract-completed")
    assert sorted(m.to_address for m in completion_mails) == sorted(
        [HANAKO.email, TARO.email, "keiyaku@pref.ibaraki.example"]
    )
    taro_mail = next(m for m in completion_mails if m.to_address == TARO.email)
    assert not taro_mail.html_body or "%PDF" not in taro_mail.html_body
    download = _in_tx(
        sessions, lambda s: open_download(s, _token(taro_mail, _DOWNLOAD), ip="192.0.2.7",
                                          user_agent=UA),
    )
    assert download.sha256 == contract.final_sha256 and download.path == contract.final_path
    assert _kinds(sessions, contract_id)[-1] == "downloaded"
    with pytest.raises(LinkInvalid):  # a download link is not an invitation link
        _open(sessions, _token(taro_mail, _DOWNLOAD))
    with pytest.raises(LinkAlreadyUsed):
        _open(sessions, _last_token(sessions, TARO.email))
    with sessions() as session:
        assert verify_chain(session, contract).ok


def test_sequential_order_invites_one_party_at_a_time(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    contract_id = _create(sessions, installation, officer, permit_pdf, order="sequential")
    assert [m.to_address for m in _mails(sessions, tag="contract-invitation")] == [HANAKO.email]
    hanako = _identify(sessions, HANAKO.email)
    assert _consent(sessions, hanako) is ContractStatus.PARTIALLY_AGREED
    invitations = _mails(sessions, tag="contract-invitation")
    assert [m.to_address for m in invitations] == [HANAKO.email, TARO.email]
    _consent(sessions, _identify(sessions, TARO.email))
    assert complete_contract(sessions, contract_id, installation) is CompletionOutcome.COMPLETED


# -- races --------------------------------------------------------------------------------------


def test_double_consent_is_one_consent(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    contract_id = _create(sessions, installation, officer, permit_pdf)
    hanako = _identify(sessions, HANAKO.email)
    assert _consent(sessions, hanako) is ContractStatus.PARTIALLY_AGREED
    with pytest.raises(AlreadyResponded) as caught:
        _consent(sessions, hanako)
    assert caught.value.status == "consented"
    assert "既に回答済み" in caught.value.message

    taro = _identify(sessions, TARO.email)
    results = _concurrently(*[lambda: _consent(sessions, taro) for _ in range(4)])
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert winners == [ContractStatus.COMPLETING]
    assert all(isinstance(error, AlreadyResponded) for error in losers), losers
    assert _kinds(sessions, contract_id).count("consented") == 2
    with sessions() as session:
        assert verify_chain(session, _contract(sessions, contract_id)).ok


def test_parties_completing_at_the_same_moment_sign_once(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    contract_id = _create(sessions, installation, officer, permit_pdf)
    hanako = _identify(sessions, HANAKO.email)
    taro = _identify(sessions, TARO.email)

    def consent_then_complete(opened: PartySession) -> CompletionOutcome | None:
        status = _consent(sessions, opened)
        try:  # what a page does: complete after every consent (at most one can be last)
            return complete_contract(sessions, contract_id, installation)
        except InvalidContractState:
            assert status is ContractStatus.PARTIALLY_AGREED
            return None

    results = _concurrently(
        lambda: consent_then_complete(hanako), lambda: consent_then_complete(taro)
    )
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert CompletionOutcome.COMPLETED in results
    _assert_signed_once(sessions, installation, contract_id)


def test_concurrent_complete_calls_sign_once(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    contract_id = _create(sessions, installation, officer, permit_pdf)
    _all_consent(sessions, contract_id)
    results = _concurrently(
        *[lambda: complete_contract(sessions, contract_id, installation) for _ in range(3)]
    )
    assert results.count(CompletionOutcome.COMPLETED) == 1, results
    assert set(results) <= {
        CompletionOutcome.COMPLETED,
        CompletionOutcome.IN_PROGRESS,
        CompletionOutcome.ALREADY_COMPLETED,
    }
    _assert_signed_once(sessions, installation, contract_id)


def _assert_signed_once(
    sessions: sessionmaker[Session], installation: Installation, contract_id: int
) -> None:
    contract = _contract(sessions, contract_id)
    assert contract.status == ContractStatus.COMPLETED
    final = _final_bytes(installation, contract)
    assert _signature_count(final) == 1
    assert hashlib.sha256(final).hexdigest() == contract.final_sha256
    kinds = _kinds(sessions, contract_id)
    assert kinds.count("signed") == 1 and kinds.count("completed") == 1
    assert kinds.count("chain_timestamped") == 1
    assert len(_mails(sessions, to=TARO.email, tag="contract-completed")) == 1
    folder = contract_file(installation.home, contract.final_path or "").parent
    assert sorted(p.name for p in folder.iterdir()) == ["final.pdf", "original.pdf"]
    with sessions() as session:
        assert verify_chain(session, contract).ok


# -- links --------------------------------------------------------------------------------------


def test_forged_expired_reused_and_foreign_tokens(
    sessions: sessionmaker[Session],
    installation: Installation,
    permit_pdf: bytes,
    one_page_permit: bytes,
    officer: int,
) -> None:
    first = _create(sessions, installation, officer, permit_pdf)
    hanako_first = _last_token(sessions, HANAKO.email)
    taro_first = _last_token(sessions, TARO.email)
    altered = hanako_first[:-1] + ("A" if hanako_first[-1] != "A" else "B")
    for forged in [secrets.token_urlsafe(32), altered, hanako_first + "A", "abc", "", "../x"]:
        with pytest.raises(LinkInvalid) as caught:
            _open(sessions, forged)
        assert "無効" in caught.value.message

    # A second contract (another PDF) with the same parties: links never cross over.
    second = _create(sessions, installation, officer, one_page_permit)
    opened_first = _open(sessions, hanako_first)
    opened_second = _open(sessions, _last_token(sessions, HANAKO.email))
    assert opened_first.contract_id == first and opened_second.contract_id == second
    assert opened_first.party_id != opened_second.party_id
    for opened in (opened_first, opened_second):
        _in_tx(sessions, lambda s, o=opened: verify_code(
            s, o.party_id, ACCESS_CODE, ip=None, user_agent=None))
    with pytest.raises(DocumentMismatch):  # consenting to one contract with the other's PDF
        _in_tx(sessions, lambda s: consent(
            s, opened_first.party_id, document_sha256_seen=opened_second.original_sha256,
            ip=None, user_agent=None, public_url=PUBLIC_URL))
    _consent(sessions, opened_first)
    with pytest.raises(LinkAlreadyUsed):
        _open(sessions, hanako_first)
    assert _contract(sessions, second).status == ContractStatus.SENT  # untouched

    # Resending replaces the contractor's link: the old one has expired.
    assert _in_tx(sessions, lambda s: resend_invitations(
        s, _contract(sessions, first), public_url=PUBLIC_URL)) == 1  # Hanako answered already
    with pytest.raises(LinkExpired) as expired:
        _open(sessions, taro_first)
    assert "有効期限" in expired.value.message
    assert _open(sessions, _last_token(sessions, TARO.email)).contract_id == first
    assert _contract(sessions, second).status == ContractStatus.SENT

    # Past the contract's deadline, even before the job has run.
    late = _contract(sessions, first).expires_at + dt.timedelta(seconds=1)
    with pytest.raises(ContractNotOpen) as closed:
        _open(sessions, _last_token(sessions, TARO.email), now=late)
    assert closed.value.status == "expired"


def test_five_wrong_codes_lock_the_party(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    contract_id = _create(sessions, installation, officer, permit_pdf)
    opened = _open(sessions, _last_token(sessions, HANAKO.email))

    def attempt(code: str) -> Any:
        return _in_tx(sessions, lambda s: verify_code(
            s, opened.party_id, code, ip="198.51.100.9", user_agent=UA))

    # A right code resets the count.
    assert [attempt("11111111").attempts_left for _ in range(3)] == [4, 3, 2]
    assert attempt(ACCESS_CODE).verified
    outcomes = [attempt(f"0000000{i}") for i in range(5)]
    assert [o.outcome for o in outcomes] == [CodeOutcome.WRONG] * 4 + [CodeOutcome.LOCKED]
    assert [o.attempts_left for o in outcomes] == [4, 3, 2, 1, 0]
    assert "ロック" in outcomes[-1].message
    with pytest.raises(PartyLocked):
        attempt(ACCESS_CODE)  # even the right code
    with pytest.raises(PartyLocked):
        _open(sessions, _last_token(sessions, HANAKO.email))
    with pytest.raises(PartyLocked):  # identified earlier, but locked since
        _consent(sessions, opened)
    with sessions() as session:
        party = session.get(Party, opened.party_id)
        assert party is not None and party.locked and party.failed_code_attempts == 5
    kinds = _kinds(sessions, contract_id)
    assert kinds.count("code_failed") == 8 and kinds.count("locked") == 1
    [notice] = _mails(sessions, tag="contract-locked")
    assert notice.to_address == "keiyaku@pref.ibaraki.example"
    # run_due does not remind a locked party.
    sent = _contract(sessions, contract_id).sent_at
    assert sent is not None
    report = run_due(sessions, installation, public_url=PUBLIC_URL,
                     now=sent + dt.timedelta(days=3, minutes=1))
    assert report.reminders_sent == 1
    assert [m.to_address for m in _mails(sessions, tag="contract-reminder")] == [TARO.email]


def test_one_time_codes_expire_and_are_single_use(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    _create(sessions, installation, officer, permit_pdf)
    token = _last_token(sessions, TARO.email)
    start = dt.datetime.now(dt.UTC)
    first = _open(sessions, token, now=start)
    assert first.code_sent
    again = _open(sessions, token, now=start + dt.timedelta(seconds=20))
    assert not again.code_sent  # no second mail within a minute
    code = _code_for(sessions, first, TARO.email)
    late = _in_tx(sessions, lambda s: verify_code(
        s, first.party_id, code, ip=None, user_agent=None,
        now=start + dt.timedelta(minutes=10, seconds=1)))
    assert late.outcome is CodeOutcome.EXPIRED and late.attempts_left == 5
    renewed = _open(sessions, token, now=start + dt.timedelta(minutes=11))
    assert renewed.code_sent
    new_code = _code_for(sessions, renewed, TARO.email)
    at = start + dt.timedelta(minutes=12)
    if new_code != code:
        wrong = _in_tx(sessions, lambda s: verify_code(
            s, first.party_id, code, ip=None, user_agent=None, now=at))
        assert wrong.outcome is CodeOutcome.WRONG
    assert _in_tx(sessions, lambda s: verify_code(
        s, first.party_id, new_code, ip=None, user_agent=None, now=at)).verified
    reused = _in_tx(sessions, lambda s: verify_code(
        s, first.party_id, new_code, ip=None, user_agent=None, now=at))
    assert reused.outcome is CodeOutcome.EXPIRED
    # Opening the link again (any browser) needs a new identification.
    _open(sessions, token, now=at + dt.timedelta(minutes=2))
    with pytest.raises(IdentificationRequired):
        _consent(sessions, first, now=at + dt.timedelta(minutes=2))


# -- the audit chain ----------------------------------------------------------------------------


def test_tampering_with_an_audit_row_is_found(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    contract_id = _create(sessions, installation, officer, permit_pdf)
    _all_consent(sessions, contract_id)
    contract = _contract(sessions, contract_id)
    with sessions() as session:
        assert verify_chain(session, contract).ok
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.contract_id == contract_id, AuditEvent.seq == 3)
        ).one()
        event.ip = "203.0.113.66"
        with pytest.raises(ContractsError):  # the ORM refuses to change audit rows
            session.flush()
        session.rollback()

    with session_scope(sessions) as session:
        session.execute(
            text("UPDATE audit_events SET ip = '203.0.113.66' WHERE contract_id = :c AND seq = 5"),
            {"c": contract_id},
        )
    with sessions() as session:
        check = verify_chain(session, contract)
    assert not check.ok and check.broken_seq == 5
    assert check.reason and "altered" in check.reason and check.reason_ja


def test_a_consistently_rewritten_chain_no_longer_matches_its_timestamp(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    contract_id = _create(sessions, installation, officer, permit_pdf)
    _all_consent(sessions, contract_id)
    complete_contract(sessions, contract_id, installation)
    contract = _contract(sessions, contract_id)
    events = _events(sessions, contract_id)
    # Rewrite the IP of one consent and re-hash every later event, as an insider could.
    prev = "0" * 64
    with session_scope(sessions) as session:
        for event in events:
            data = EventData(
                contract=contract.public_id, seq=event.seq, kind=EventKind(event.kind),
                time=event.time, prev_sha256=prev, party_id=event.party_id,
                ip="203.0.113.66" if event.kind == "consented" else event.ip,
                user_agent=event.user_agent, email=event.email,
                identification=event.identification, document_sha256=event.document_sha256,
                details=event.details,
            )
            session.execute(
                update(AuditEvent.__table__)
                .where(AuditEvent.__table__.c.id == event.id)
                .values(ip=data.ip, prev_sha256=prev, sha256=data.sha256)
            )
            prev = data.sha256
    with sessions() as session:
        check = verify_chain(session, contract)
    assert not check.ok
    assert check.reason == "the timestamped chain head is not the completed event of this chain"


def test_deleting_an_audit_row_is_found(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    contract_id = _create(sessions, installation, officer, permit_pdf)
    with session_scope(sessions) as session:
        session.execute(
            text("DELETE FROM audit_events WHERE contract_id = :c AND seq = 2"), {"c": contract_id}
        )
    with sessions() as session:
        check = verify_chain(session, _contract(sessions, contract_id))
    assert not check.ok and check.broken_seq == 2


# -- decline, cancel, expiry, reminders ---------------------------------------------------------


def test_decline(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    contract_id = _create(sessions, installation, officer, permit_pdf)
    taro = _identify(sessions, TARO.email)
    _in_tx(sessions, lambda s: decline(
        s, taro.party_id, "工期が短すぎるため", ip="192.0.2.20", user_agent=UA))
    contract = _contract(sessions, contract_id)
    assert contract.status == ContractStatus.DECLINED
    with sessions() as session:
        party = session.get(Party, taro.party_id)
        assert party is not None and party.status == PartyStatus.DECLINED
        assert party.decline_reason == "工期が短すぎるため"
    [notice] = _mails(sessions, tag="contract-declined")
    assert "工期が短すぎるため" in notice.text_body
    with pytest.raises(ContractNotOpen) as caught:
        _open(sessions, _last_token(sessions, HANAKO.email))
    assert caught.value.status == "declined" and "不同意" in caught.value.message
    with pytest.raises(AlreadyResponded):
        _in_tx(sessions, lambda s: decline(s, taro.party_id, "", ip=None, user_agent=None))
    with pytest.raises(InvalidContractState):
        _in_tx(sessions, lambda s: cancel_contract(s, contract, officer_id=officer))
    assert _kinds(sessions, contract_id).count("declined") == 1


def test_cancel(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    draft = _create(sessions, installation, officer, permit_pdf, send=False)
    _in_tx(sessions, lambda s: cancel_contract(s, _contract(sessions, draft), officer_id=officer))
    assert _contract(sessions, draft).status == ContractStatus.CANCELLED
    assert _mails(sessions) == []
    with pytest.raises(InvalidContractState) as caught:
        _in_tx(sessions, lambda s: send_contract(s, _contract(sessions, draft),
                                                 public_url=PUBLIC_URL))
    assert caught.value.action == "send" and "取消し" in caught.value.message

    sent = _create(sessions, installation, officer, permit_pdf)
    _consent(sessions, _identify(sessions, HANAKO.email))
    _in_tx(sessions, lambda s: cancel_contract(
        s, _contract(sessions, sent), officer_id=officer, reason="金額の誤り"))
    assert _contract(sessions, sent).status == ContractStatus.CANCELLED
    assert [m.to_address for m in _mails(sessions, tag="contract-cancelled")] == [TARO.email]
    with pytest.raises(ContractNotOpen):
        _open(sessions, _last_token(sessions, TARO.email))
    with pytest.raises(InvalidContractState):
        _in_tx(sessions, lambda s: cancel_contract(s, _contract(sessions, sent), officer_id=1))
    events = _events(sessions, sent)
    cancelled = next(e for e in events if e.kind == "cancelled")
    assert cancelled.details["reason"] == "金額の誤り"

    completed = _create(sessions, installation, officer, permit_pdf)
    _all_consent(sessions, completed)
    with pytest.raises(InvalidContractState):  # completing: the witness signature is due
        _in_tx(sessions, lambda s: cancel_contract(s, _contract(sessions, completed),
                                                   officer_id=officer))


def test_expiry_and_reminders_by_run_due(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    start = dt.datetime(2026, 4, 1, 0, 0, tzinfo=dt.UTC)
    contract_id = _create(sessions, installation, officer, permit_pdf, now=start,
                          expires_in=dt.timedelta(days=7))
    _consent(sessions, _identify(sessions, HANAKO.email, now=start), now=start)
    quiet = _create(sessions, installation, officer, permit_pdf, now=start,
                    reminder_interval_days=0, expires_in=dt.timedelta(days=30))

    report = run_due(sessions, installation, public_url=PUBLIC_URL,
                     now=start + dt.timedelta(days=2))
    assert report.reminders_sent == 0 and not report.expired

    public_id = _contract(sessions, contract_id).public_id
    report = run_due(sessions, installation, public_url=PUBLIC_URL,
                     now=start + dt.timedelta(days=3))
    assert report.reminded == [public_id] and report.reminders_sent == 1
    [reminder] = _mails(sessions, tag="contract-reminder")
    assert reminder.to_address == TARO.email and "再送" in reminder.subject
    # The reminder's fresh link works; so does the original one.
    assert _open(sessions, _token(reminder), now=start + dt.timedelta(days=3)).contract_id == (
        contract_id
    )
    again = run_due(sessions, installation, public_url=PUBLIC_URL,
                    now=start + dt.timedelta(days=4))
    assert again.reminders_sent == 0
    third = run_due(sessions, installation, public_url=PUBLIC_URL,
                    now=start + dt.timedelta(days=6))
    assert third.reminders_sent == 1
    assert _contract(sessions, contract_id).last_reminded_at == start + dt.timedelta(days=6)

    report = run_due(sessions, installation, public_url=PUBLIC_URL,
                     now=start + dt.timedelta(days=7, seconds=1))
    assert report.expired == [public_id] and report.reminders_sent == 0
    assert _contract(sessions, contract_id).status == ContractStatus.EXPIRED
    assert _contract(sessions, quiet).status == ContractStatus.SENT
    [notice] = _mails(sessions, tag="contract-expired")
    assert notice.to_address == "keiyaku@pref.ibaraki.example"
    with pytest.raises(ContractNotOpen):
        _open(sessions, _token(reminder), now=start + dt.timedelta(days=7, seconds=2))
    assert run_due(sessions, installation, public_url=PUBLIC_URL,
                   now=start + dt.timedelta(days=8)).expired == []
    kinds = _kinds(sessions, contract_id)
    assert kinds.count("reminded") == 2 and kinds.count("expired") == 1
    assert _kinds(sessions, quiet).count("reminded") == 0
    with sessions() as session:
        assert verify_chain(session, _contract(sessions, contract_id)).ok


def test_sequential_reminders_go_to_the_current_party_only(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    start = dt.datetime.now(dt.UTC)
    _create(sessions, installation, officer, permit_pdf, now=start, order="sequential")
    report = run_due(sessions, installation, public_url=PUBLIC_URL,
                     now=start + dt.timedelta(days=3))
    assert report.reminders_sent == 1
    assert [m.to_address for m in _mails(sessions, tag="contract-reminder")] == [HANAKO.email]
    # Taro has no link yet; a party not at its turn cannot answer.
    assert _mails(sessions, to=TARO.email) == []


# -- crashes ------------------------------------------------------------------------------------


def test_run_due_finishes_a_contract_left_completing_once(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    contract_id = _create(sessions, installation, officer, permit_pdf)
    _all_consent(sessions, contract_id)  # the caller died before calling complete_contract
    public_id = _contract(sessions, contract_id).public_id
    report = run_due(sessions, installation, public_url=PUBLIC_URL)
    assert report.completed == [public_id] and not report.failed
    assert run_due(sessions, installation, public_url=PUBLIC_URL).completed == []
    _assert_signed_once(sessions, installation, contract_id)


def test_a_crash_after_signing_reuses_the_signed_file(
    sessions: sessionmaker[Session],
    installation: Installation,
    permit_pdf: bytes,
    officer: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    contract_id = _create(sessions, installation, officer, permit_pdf)
    _all_consent(sessions, contract_id)

    class Crash(BaseException):
        pass

    def die(*_args: Any) -> bytes:
        raise Crash()

    with monkeypatch.context() as patch:
        patch.setattr(workflow, "_timestamp_head", die)  # after final.pdf was written …
        patch.setattr(workflow, "_release", lambda *_args: None)  # … the process is gone
        with pytest.raises(Crash):
            complete_contract(sessions, contract_id, installation)
    contract = _contract(sessions, contract_id)
    assert contract.status == ContractStatus.COMPLETING and contract.final_path is None
    path = installation.home / "contracts" / contract.public_id / "final.pdf"
    first = path.read_bytes()

    # Within the claim nobody else starts; after it a re-run finishes with the same file.
    assert complete_contract(sessions, contract_id, installation) is CompletionOutcome.IN_PROGRESS
    assert run_due(sessions, installation, public_url=PUBLIC_URL).completed == []
    later = dt.datetime.now(dt.UTC) + workflow.COMPLETION_LEASE + dt.timedelta(seconds=5)
    report = run_due(sessions, installation, public_url=PUBLIC_URL, now=later)
    assert report.completed == [contract.public_id]
    contract = _contract(sessions, contract_id)
    assert path.read_bytes() == first
    assert contract.final_sha256 == hashlib.sha256(first).hexdigest()
    signed = [e for e in _events(sessions, contract_id) if e.kind == "signed"]
    assert len(signed) == 1 and signed[0].details["reused_existing_file"] is True
    _assert_signed_once(sessions, installation, contract_id)


def test_a_damaged_leftover_file_is_set_aside_and_signed_again(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    contract_id = _create(sessions, installation, officer, permit_pdf)
    _all_consent(sessions, contract_id)
    public_id = _contract(sessions, contract_id).public_id
    leftover = installation.home / "contracts" / public_id / "final.pdf"
    leftover.write_bytes(permit_pdf)  # not signed: must not be taken for the final document
    assert complete_contract(sessions, contract_id, installation) is CompletionOutcome.COMPLETED
    final = _final_bytes(installation, _contract(sessions, contract_id))
    assert _signature_count(final) == 1 and final != permit_pdf
    aside = [p.name for p in leftover.parent.iterdir() if ".rejected-" in p.name]
    assert len(aside) == 1


def test_a_changed_original_is_not_signed_and_the_job_goes_on(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    broken = _create(sessions, installation, officer, permit_pdf)
    _all_consent(sessions, broken)
    fine = _create(sessions, installation, officer, permit_pdf)
    _all_consent(sessions, fine)
    contract = _contract(sessions, broken)
    contract_file(installation.home, contract.original_path).write_bytes(permit_pdf + b"\n")

    report = run_due(sessions, installation, public_url=PUBLIC_URL)
    assert report.completed == [_contract(sessions, fine).public_id]
    [(public_id, message, message_en)] = report.failed
    assert public_id == contract.public_id and "does not match its SHA-256" in message_en
    assert_japanese(message) and "原本が変更されています" in message
    contract = _contract(sessions, broken)
    assert contract.status == ContractStatus.COMPLETING and contract.completion_owner is None
    assert not (installation.home / "contracts" / contract.public_id / "final.pdf").exists()
    assert "signed" not in _kinds(sessions, broken)

# -- input checks -------------------------------------------------------------------------------


def test_unusable_pdfs_are_refused(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    signed = sign_pdf(permit_pdf, installation.signing_context(Role.POSITION), SignOptions())
    assert signed.data is not None
    cases: list[tuple[bytes, type[Exception]]] = [
        (b"not a pdf at all", InvalidPdfError),
        (permit_pdf[: len(permit_pdf) // 2], InvalidPdfError),
        (signed.data, AlreadySignedPdfError),
        (password_protected_pdf(), EncryptedPdfError),
    ]
    for pdf, error in cases:
        with pytest.raises(error), session_scope(sessions) as session:
            create_contract(session, home=installation.home, officer_id=officer, title="t",
                            pdf=pdf, parties=[HANAKO, TARO])
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Contract)) == 0


@pytest.mark.parametrize(
    ("parties", "field"),
    [
        ([HANAKO], "parties"),
        ([HANAKO, PartySpec("x", "x@pref.ibaraki.example", "prefecture", "email_otp")], "parties"),
        ([HANAKO, PartySpec("x", HANAKO.email.upper(), "contractor", "email_otp")], "email"),
        ([HANAKO, PartySpec("x", "not-an-address", "contractor", "email_otp")], "email"),
        ([HANAKO, PartySpec("x", "x@example.jp", "contractor", "access_code", access_code="12")],
         "access_code"),
        ([HANAKO, PartySpec("x", "x@example.jp", "contractor", "sms")], "identification"),
        ([HANAKO, PartySpec("", "x@example.jp", "contractor", "email_otp")], "name"),
    ],
)
def test_unusable_parties_are_refused(
    sessions: sessionmaker[Session],
    installation: Installation,
    permit_pdf: bytes,
    officer: int,
    parties: list[PartySpec],
    field: str,
) -> None:
    with pytest.raises(InvalidContractData) as caught, session_scope(sessions) as session:
        create_contract(session, home=installation.home, officer_id=officer, title="t",
                        pdf=permit_pdf, parties=parties)
    assert caught.value.field == field


def test_not_your_turn_and_states_are_checked(
    sessions: sessionmaker[Session], installation: Installation, permit_pdf: bytes, officer: int
) -> None:
    contract_id = _create(sessions, installation, officer, permit_pdf, order="sequential")
    with pytest.raises(InvalidContractState):
        _in_tx(sessions, lambda s: send_contract(s, _contract(sessions, contract_id),
                                                 public_url=PUBLIC_URL))
    with pytest.raises(InvalidContractState):
        complete_contract(sessions, contract_id, installation)
    with sessions() as session:
        taro = next(p for p in list_parties(session, _contract(sessions, contract_id))
                    if p.email == TARO.email)
    with session_scope(sessions) as session:  # as if Taro had identified out of turn
        session.execute(update(Party).where(Party.id == taro.id)
                        .values(identified_at=dt.datetime.now(dt.UTC)))
    with pytest.raises(NotYourTurn):
        _in_tx(sessions, lambda s: consent(
            s, taro.id, document_sha256_seen=_contract(sessions, contract_id).original_sha256,
            ip=None, user_agent=None, public_url=PUBLIC_URL))


def _koin_env(
    monkeypatch: pytest.MonkeyPatch, installation: Installation, db_url: str
) -> None:
    """The environment of a `koin` command on this installation and database."""
    monkeypatch.setenv("KOIN_HOME", str(installation.home))
    monkeypatch.setenv("KOIN_DATABASE_URL", db_url)
    monkeypatch.setenv("KOIN_PUBLIC_URL", PUBLIC_URL)


def test_cli_jobs_run_due(
    sessions: sessionmaker[Session],
    db_url: str,
    installation: Installation,
    permit_pdf: bytes,
    officer: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from click.testing import CliRunner

    from web.cli import cli

    contract_id = _create(sessions, installation, officer, permit_pdf)
    _all_consent(sessions, contract_id)
    _koin_env(monkeypatch, installation, db_url)
    monkeypatch.delenv("KOIN_LANG", raising=False)
    result = CliRunner().invoke(cli, ["jobs", "run-due"])
    assert result.exit_code == 0, result.output
    assert "締結 1 件" in result.output and "失敗 0 件" in result.output
    _assert_signed_once(sessions, installation, contract_id)
    again = CliRunner().invoke(cli, ["jobs", "run-due"], env={"KOIN_LANG": "en"})
    assert again.exit_code == 0
    assert again.output == "Reminders 0, expired 0, completed 0, failed 0\n"


def test_cli_jobs_run_due_reports_a_failure_in_the_language_of_koin_lang(
    sessions: sessionmaker[Session],
    db_url: str,
    installation: Installation,
    permit_pdf: bytes,
    officer: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from click.testing import CliRunner

    from web.cli import cli

    broken = _create(sessions, installation, officer, permit_pdf)
    _all_consent(sessions, broken)
    contract = _contract(sessions, broken)
    contract_file(installation.home, contract.original_path).write_bytes(permit_pdf + b"\n")
    _koin_env(monkeypatch, installation, db_url)
    english = CliRunner().invoke(cli, ["jobs", "run-due"], env={"KOIN_LANG": "en"})
    assert english.exit_code == 1
    assert english.stdout == "Reminders 0, expired 0, completed 0, failed 1\n"
    assert english.stderr == (
        f"koin: {contract.public_id}: The stored original of contract {contract.public_id} "
        "does not match its SHA-256.\n"
    )
    japanese = CliRunner().invoke(cli, ["jobs", "run-due"], env={"KOIN_LANG": None})
    assert japanese.exit_code == 1
    assert japanese.stdout == "督促 0 件、期限切れ 0 件、締結 0 件、失敗 1 件\n"
    assert japanese.stderr == (
        f"koin: {contract.public_id}: "
        "保存されている契約書の原本が変更されています。締結できません。\n"
    )


def test_public_ids_never_begin_with_an_option_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # One in 32 raw tokens begins with '-', which click reads as an option: the CI run that
    # drew '-6Iw_Q6eil0MJmXAMmc9ug' failed `koin evidence export ID OUT` with "No such option".
    import contracts.public_ids as public_ids

    drawn = iter(["-6Iw_Q6eil0MJmXAMmc9ug", "_Xq0AaaaaaaaaaaaaaaaaQ", "Q6eil0MJmXAMmc9ug-6Iw_"])
    monkeypatch.setattr(public_ids.secrets, "token_urlsafe", lambda n: next(drawn))
    assert public_ids.new_public_id() == "Q6eil0MJmXAMmc9ug-6Iw_"
    monkeypatch.undo()
    ids = {public_ids.new_public_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(i[0].isalnum() and len(i) == 22 for i in ids)

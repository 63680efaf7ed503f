"""Demo data (``koin demo``): realistic Japanese staff, stamp templates, signed permits, a
finished batch and contracts in several states, made through the ordinary services (accounts,
templates, staff signing, batches, the contract workflow), so that they look and behave like
the real thing on every page.

Idempotent: each item is looked up first (a user by email, a template by name, a permit by
its file name, the batch by its name, a contract by its title and officer) and made only if
it is missing, so running it again adds nothing. Contractors are fake (``@example.jp``, a
domain reserved for examples); their mail goes wherever this installation's mail goes.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from keys import Role
from signer import Installation
from signer.samples import make_notice_pdf, make_permit_pdf

from ._db import session_scope
from .accounts import User, UserRole, create_first_admin, create_user, get_user_by_email
from .batches import Batch, BatchStatus, BatchWorker, finish_if_complete
from .errors import TemplateExists, UserExists
from .mail import OutboxMessage
from .models import SignedDocument
from .staff_signing import Upload, batch_from_uploads, sign_for_staff
from .templates import create_template
from .workflow import (
    PartySpec,
    complete_contract,
    consent,
    create_contract,
    decline,
    new_access_code,
    open_link,
    send_contract,
    verify_code,
)
from .workflow_models import Contract, ContractStatus, Identification

__all__ = [
    "ADMIN_EMAIL",
    "BATCH_NAME",
    "CONTRACTS",
    "DemoItem",
    "DemoReport",
    "OFFICER_EMAIL",
    "SIGNERS",
    "TEMPLATES",
    "seed_demo",
]

ADMIN_EMAIL = "admin@koin.local"
OFFICER_EMAIL = "suzuki.ichiro@koin.local"
#: (email, display name, roles) of the demo staff.
SIGNERS = (
    ("tanaka.taro@koin.local", "田中 太郎", (UserRole.SIGNER,)),
    ("sato.hanako@koin.local", "佐藤 花子", (UserRole.SIGNER,)),
)
OFFICER = (OFFICER_EMAIL, "鈴木 一郎", (UserRole.OFFICER,))

MM = 72 / 25.4


@dataclass(frozen=True)
class _Template:
    name: str
    title: str
    page: int
    box_mm: tuple[float, float, float, float] | None
    qr: bool
    level: str


#: One stamp template per type of document.
TEMPLATES = (
    _Template("kensetsu-kyoka", "建設業許可通知書", -1, None, True, "B-T"),
    _Template("sanpai-kyoka", "産業廃棄物処理業許可証", 1, (120, 20, 190, 50), True, "B-LT"),
    _Template("hojokin-kettei", "補助金交付決定通知書", -1, (120, 20, 190, 50), False, "B-T"),
)

BATCH_NAME = "令和8年11月分 建設業許可通知書(デモ)"
BATCH_SIZE = 20
#: The one file of the batch that is not a usable PDF (it fails alone, with its reason).
BROKEN_FILE = "建設業許可通知書_020_破損.pdf"

_SANPAI = """茨城県指令 環境第08-0042号

産業廃棄物処理業許可証

株式会社 つくば環境サービス 代表取締役 中村 真一 様

廃棄物の処理及び清掃に関する法律第14条第1項の規定により、
産業廃棄物収集運搬業を下記のとおり許可します。

記

1 許可番号     第 00812042001 号
2 事業の範囲   産業廃棄物収集運搬業(積替え・保管を除く)
3 取り扱う産業廃棄物の種類  汚泥、廃油、廃プラスチック類、がれき類
4 許可の有効期限  令和13年11月30日

令和8年12月1日
茨城県知事"""

_HOJOKIN = """茨城県指令 農政第0315号

補助金交付決定通知書

水戸市農業協同組合 代表理事組合長 伊藤 誠 様

令和8年10月15日付けで申請のあった令和8年度 茨城県スマート農業導入支援事業
補助金については、下記のとおり交付することに決定したので、茨城県補助金等
交付規則第5条の規定により通知します。

記

1 補助事業の名称   スマート農業機械導入(自動操舵トラクター 2台)
2 補助金の額       金 4,800,000 円
3 補助事業の完了期限  令和9年2月28日

令和8年12月1日
茨城県知事"""

#: The permits signed one by one on the signing page: (file name, template, signer email).
PERMITS = (
    ("建設業許可通知書_土木第00121号.pdf", "kensetsu-kyoka", "tanaka.taro@koin.local"),
    ("産業廃棄物処理業許可証_環境第08-0042号.pdf", "sanpai-kyoka", "sato.hanako@koin.local"),
    ("補助金交付決定通知書_農政第0315号.pdf", "hojokin-kettei", "tanaka.taro@koin.local"),
)


@dataclass(frozen=True)
class _Contract:
    title: str
    #: draft, sent (nobody answered), partially_agreed, completed or declined
    state: str
    contractor: str
    contractor_company: str
    contractor_email: str
    amount: str
    decline_reason: str = ""


_PREFECTURE = ("山本 健一", "茨城県 土木部 道路維持課", "yamamoto.kenichi@pref.example.jp")

#: The demo contracts, each driven to its state through the workflow.
CONTRACTS = (
    _Contract("令和8年度 道路維持補修業務委託契約", "sent", "小林 誠", "株式会社常陸道路",
              "kobayashi.makoto@hitachi-doro.example.jp", "金 12,650,000 円"),
    _Contract("令和8年度 水戸土木事務所管内 橋梁点検業務委託契約", "partially_agreed",
              "高橋 美咲", "株式会社那珂川コンサルタント", "takahashi@nakagawa-c.example.jp",
              "金 8,910,000 円"),
    _Contract("令和8年度 県庁舎電気設備保守点検業務委託契約", "completed", "渡辺 大輔",
              "株式会社筑波電設", "watanabe.daisuke@tsukuba-densetsu.example.jp",
              "金 3,520,000 円"),
    _Contract("令和8年度 一級河川 涸沼川 除草業務委託契約", "declined", "加藤 直樹",
              "株式会社ひたちなか緑化", "kato@hitachinaka-ryokka.example.jp", "金 2,145,000 円",
              decline_reason="業務期間について再協議をお願いしたく、今回は合意を見送ります。"),
    _Contract("令和8年度 県立学校施設清掃業務委託契約", "draft", "松本 由美",
              "株式会社かすみがうらビルサービス", "matsumoto@kasumi-bs.example.jp",
              "金 6,380,000 円"),
)

_LINK = re.compile(r"/c/([A-Za-z0-9_-]{43})\b")
_UA = "koin demo"


@dataclass(frozen=True)
class DemoItem:
    """One thing :func:`seed_demo` made or found, described in Japanese and in English."""

    message: str
    message_en: str


@dataclass
class DemoReport:
    """What :func:`seed_demo` made. ``passwords`` (email → password) and ``access_codes``
    (contract title, party, code) are shown once and never stored in clear."""

    created: list[DemoItem] = field(default_factory=list)
    existing: list[DemoItem] = field(default_factory=list)
    passwords: dict[str, str] = field(default_factory=dict)
    access_codes: list[tuple[str, str, str]] = field(default_factory=list)


def _contract_text(spec: _Contract, officer: str) -> str:
    return f"""{spec.title}書

委託者 茨城県(以下「甲」という。)と受託者 {spec.contractor_company}(以下「乙」という。)は、
次の条項により業務委託契約を締結する。

1 業務名     {spec.title.removesuffix("契約")}
2 履行期間   令和8年12月15日から令和9年3月19日まで
3 委託料     {spec.amount}(うち取引に係る消費税及び地方消費税の額 10%)
4 契約保証金  免除

第1条 乙は、別冊仕様書に基づき、頭書の業務を履行期間内に完了しなければならない。
第2条 甲は、業務の完了を確認した後、乙の請求により委託料を支払う。
第3条 この契約に定めのない事項は、茨城県財務規則の定めるところによる。

この契約の締結を証するため、電子署名により本契約を締結し、
甲乙それぞれがその電磁的記録を保管する。

甲 茨城県 茨城県知事
乙 {spec.contractor_company} 代表者 {spec.contractor}
(担当 {officer})"""


def _user(
    session: Session, report: DemoReport, email: str, name: str, roles: Sequence[UserRole]
) -> User:
    try:
        user, password = create_user(session, email, roles, display_name=name)
    except UserExists:
        existing = get_user_by_email(session, email)
        assert existing is not None
        report.existing.append(DemoItem(f"職員 {existing.display_name} <{email}>",
                                        f"staff member {existing.display_name} <{email}>"))
        return existing
    if password is not None:
        report.passwords[email] = password
    summary = f"{name} <{email}> ({', '.join(sorted(roles))})"
    report.created.append(DemoItem(f"職員 {summary}", f"staff member {summary}"))
    return user


def _seed_staff(sessions: sessionmaker[Session], report: DemoReport) -> dict[str, int]:
    ids: dict[str, int] = {}
    with session_scope(sessions) as session:
        created = create_first_admin(session, ADMIN_EMAIL)
        if created is not None:
            report.passwords[ADMIN_EMAIL] = created[1]
            report.created.append(
                DemoItem(f"管理者 <{ADMIN_EMAIL}>", f"administrator <{ADMIN_EMAIL}>")
            )
        for email, name, roles in (*SIGNERS, OFFICER):
            ids[email] = _user(session, report, email, name, roles).id
    return ids


def _seed_templates(sessions: sessionmaker[Session], report: DemoReport) -> None:
    for spec in TEMPLATES:
        box = None
        if spec.box_mm is not None:
            x1, y1, x2, y2 = spec.box_mm
            box = (x1 * MM, y1 * MM, x2 * MM, y2 * MM)
        try:
            with session_scope(sessions) as session:
                create_template(
                    session, spec.name, title=spec.title, page=spec.page,
                    box=box, qr=spec.qr, level=spec.level,
                )
        except TemplateExists:
            report.existing.append(
                DemoItem(f"印影テンプレート {spec.name}", f"stamp template {spec.name}")
            )
            continue
        report.created.append(DemoItem(f"印影テンプレート {spec.name}({spec.title})",
                                       f"stamp template {spec.name} ({spec.title})"))


def _document(installation: Installation, template: str, number: int = 121) -> bytes:
    if template == "sanpai-kyoka":
        return make_notice_pdf(installation.font_file, _SANPAI)
    if template == "hojokin-kettei":
        return make_notice_pdf(installation.font_file, _HOJOKIN)
    return make_permit_pdf(installation.font_file, number=number)


def _seed_permits(
    sessions: sessionmaker[Session], installation: Installation, report: DemoReport,
    staff: dict[str, int], *, public_url: str, tsa_urls: Sequence[str],
) -> None:
    context = None
    for file_name, template, email in PERMITS:
        with sessions() as session:
            done = session.scalar(
                select(SignedDocument.id).where(
                    SignedDocument.file_name == file_name,
                    SignedDocument.signed_by == staff[email],
                )
            )
        if done is not None:
            report.existing.append(
                DemoItem(f"署名済みの許可書 {file_name}", f"signed permit {file_name}")
            )
            continue
        if context is None:
            context = installation.signing_context(Role.POSITION, tsa_urls=tsa_urls)
        result = sign_for_staff(
            sessions, _document(installation, template), context, home=installation.home,
            user_id=staff[email], file_name=file_name, template=template, public_url=public_url,
        )
        report.created.append(DemoItem(
            f"署名済みの許可書 {file_name}(文書番号 {result.document_id}、{result.level.value})",
            f"signed permit {file_name} (document ID {result.document_id}, "
            f"{result.level.value})",
        ))


def _seed_batch(
    sessions: sessionmaker[Session], installation: Installation, report: DemoReport,
    staff: dict[str, int], *, public_url: str, tsa_urls: Sequence[str],
) -> None:
    import io

    with sessions() as session:
        batch = session.scalar(select(Batch).where(Batch.name == BATCH_NAME))
    if batch is None:
        uploads = [
            Upload(
                f"建設業許可通知書_{number:03d}.pdf", "application/pdf",
                io.BytesIO(make_permit_pdf(installation.font_file, number=200 + number)),
            )
            for number in range(1, BATCH_SIZE)
        ]
        # looks like a PDF (taken into the batch), but is cut off: it fails when signed
        uploads.append(Upload(BROKEN_FILE, "application/pdf",
                              io.BytesIO(b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog")))
        intake = batch_from_uploads(
            sessions, uploads, home=installation.home, user_id=staff["sato.hanako@koin.local"],
            template="kensetsu-kyoka", name=BATCH_NAME,
        )
        report.created.append(DemoItem(
            f"一括署名 {BATCH_NAME}({intake.added} 件、ID {intake.public_id})",
            f"batch {BATCH_NAME} ({intake.added} files, ID {intake.public_id})",
        ))
        with sessions() as session:
            batch = session.scalar(select(Batch).where(Batch.name == BATCH_NAME))
        assert batch is not None
    else:
        report.existing.append(DemoItem(f"一括署名 {BATCH_NAME}", f"batch {BATCH_NAME}"))
    if batch.batch_status is not BatchStatus.RUNNING:
        return
    # Sign it here and now (one thread: the demo should not take the machine).
    worker = BatchWorker(sessions, installation, threads=1, public_url=public_url,
                         tsa_urls=tsa_urls)
    for _ in range(BATCH_SIZE):
        if not worker.run_once():
            break
    with session_scope(sessions) as session:
        fresh = session.get_one(Batch, batch.id)
        finish_if_complete(session, fresh, public_url=public_url)


def _token(session: Session, email: str) -> str:
    bodies = session.scalars(
        select(OutboxMessage.text_body)
        .where(OutboxMessage.to_address == email)
        .order_by(OutboxMessage.id.desc())
    )
    for body in bodies:
        found = _LINK.search(body)
        if found:
            return found.group(1)
    raise LookupError(f"no invitation mailed to {email}")


def _answer(
    sessions: sessionmaker[Session], email: str, code: str, *, public_url: str,
    decline_reason: str | None = None,
) -> None:
    """The party ``email`` opens its invitation, gives its access code and consents (or
    declines with ``decline_reason``), as on the party's pages."""
    with session_scope(sessions) as session:
        opened = open_link(session, _token(session, email), ip="192.0.2.1", user_agent=_UA)
    with session_scope(sessions) as session:
        result = verify_code(session, opened.party_id, code, ip="192.0.2.1", user_agent=_UA)
    if not result.verified:  # pragma: no cover - the code was made a moment ago
        raise RuntimeError(f"demo party {email}: {result.message_en}")
    with session_scope(sessions) as session:
        if decline_reason is not None:
            decline(session, opened.party_id, decline_reason, ip="192.0.2.1", user_agent=_UA,
                    public_url=public_url)
        else:
            consent(session, opened.party_id, document_sha256_seen=opened.original_sha256,
                    ip="192.0.2.1", user_agent=_UA, public_url=public_url)


def _seed_contracts(
    sessions: sessionmaker[Session], installation: Installation, report: DemoReport,
    staff: dict[str, int], *, public_url: str, tsa_urls: Sequence[str],
) -> None:
    officer_id = staff[OFFICER_EMAIL]
    for spec in CONTRACTS:
        with sessions() as session:
            found = session.scalar(
                select(Contract.id).where(
                    Contract.title == spec.title, Contract.created_by == officer_id
                )
            )
        if found is not None:
            report.existing.append(DemoItem(f"契約 {spec.title}", f"contract {spec.title}"))
            continue
        codes = (new_access_code(), new_access_code())
        prefecture = PartySpec(
            name=_PREFECTURE[0], organisation=_PREFECTURE[1], email=_PREFECTURE[2],
            role="prefecture", identification=Identification.ACCESS_CODE, access_code=codes[0],
        )
        contractor = PartySpec(
            name=spec.contractor, organisation=spec.contractor_company,
            email=spec.contractor_email, role="contractor",
            identification=Identification.ACCESS_CODE, access_code=codes[1],
        )
        pdf = make_notice_pdf(installation.font_file, _contract_text(spec, OFFICER[1]))
        with session_scope(sessions) as session:
            contract = create_contract(
                session, home=installation.home, officer_id=officer_id, title=spec.title,
                pdf=pdf, parties=[prefecture, contractor], expires_in=dt.timedelta(days=14),
            )
            contract_id, public_id = contract.id, contract.public_id
            if spec.state != "draft":
                send_contract(session, contract, public_url=public_url)
        if spec.state in ("partially_agreed", "completed", "declined"):
            _answer(sessions, prefecture.email, codes[0], public_url=public_url)
        if spec.state == "completed":
            _answer(sessions, contractor.email, codes[1], public_url=public_url)
            complete_contract(sessions, contract_id, installation, public_url=public_url,
                              tsa_urls=tsa_urls)
        elif spec.state == "declined":
            _answer(sessions, contractor.email, codes[1], public_url=public_url,
                    decline_reason=spec.decline_reason)
        with sessions() as session:
            status = ContractStatus(session.get_one(Contract, contract_id).status)
        report.created.append(DemoItem(
            f"契約 {spec.title}({status.label_ja}、ID {public_id})",
            f"contract {spec.title} ({status.label_en}, ID {public_id})",
        ))
        if status in (ContractStatus.DRAFT, ContractStatus.SENT,
                      ContractStatus.PARTIALLY_AGREED):
            if status is not ContractStatus.PARTIALLY_AGREED:
                report.access_codes.append((spec.title, prefecture.name, codes[0]))
            report.access_codes.append((spec.title, contractor.name, codes[1]))


def seed_demo(
    sessions: sessionmaker[Session],
    installation: Installation,
    *,
    public_url: str,
    tsa_urls: Sequence[str] = (),
) -> DemoReport:
    """Add the demo data that is missing (see the module docstring) and say what was made.

    :raises KoinError: signing or timestamping failed (no TSA answered, the key store cannot
        be opened); what was made before stays, and running it again completes the rest.
    """
    report = DemoReport()
    staff = _seed_staff(sessions, report)
    _seed_templates(sessions, report)
    for step in (_seed_permits, _seed_batch, _seed_contracts):
        step(sessions, installation, report, staff, public_url=public_url, tsa_urls=tsa_urls)
    return report

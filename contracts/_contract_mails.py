"""Texts of the mails of witness-type contracts (Japanese, with a short English part).

Links carry a token that exists nowhere but in the mail; one-time codes likewise.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from signer import format_japanese_datetime

from .workflow_models import Identification

__all__ = [
    "Mail",
    "cancellation",
    "completion",
    "declined_notice",
    "expired_notice",
    "invitation",
    "locked_notice",
    "officer_completion",
    "one_time_code",
]

SERVICE_NAME = "茨城県 電子契約サービス"
_FOOTER = (
    "\n--\n"
    f"{SERVICE_NAME}\n"
    "このメールは送信専用です。ご不明な点は、契約の担当職員にお問い合わせください。\n"
    "This is an automated message from the Ibaraki Prefecture e-contract service.\n"
)


@dataclass(frozen=True)
class Mail:
    subject: str
    text: str
    tag: str


def _when(moment: dt.datetime) -> str:
    return format_japanese_datetime(moment)


def invitation(
    *,
    name: str,
    title: str,
    public_id: str,
    link: str,
    expires_at: dt.datetime,
    identification: Identification,
    reminder: bool = False,
) -> Mail:
    if identification is Identification.ACCESS_CODE:
        how = (
            "リンクを開いた後、アクセスコードを入力してください。アクセスコードは、"
            "県の担当職員から電話または書面でお知らせします(メールではお送りしません)。"
        )
        how_en = "You will be asked for the access code the officer gave you by phone or letter."
    else:
        how = (
            "リンクを開くと、このメールアドレスに6桁の確認コードをお送りします。"
            "確認コードの有効期間は10分です。"
        )
        how_en = "Opening the link sends a 6-digit code to this address, valid for 10 minutes."
    prefix = "【再送・ご確認のお願い】" if reminder else ""
    subject = f"{prefix}【茨城県 電子契約】「{title}」への同意のお願い"
    text = (
        f"{name} 様\n\n"
        + ("まだ回答をいただいていない契約について、改めてご案内します。\n\n" if reminder else "")
        + "茨城県電子契約サービスから、次の契約書の内容確認と同意をお願いします。\n\n"
        f"  件名: {title}\n"
        f"  契約番号: {public_id}\n"
        f"  回答期限: {_when(expires_at)}\n\n"
        "次のリンクを開き、本人確認の上、契約書の内容を確認して「合意する」または"
        "「同意しない」を選んでください。\n\n"
        f"  {link}\n\n"
        f"{how}\n\n"
        "このリンクはあなた専用です。他の人に転送しないでください。"
        "心当たりのない場合は、このメールを破棄してください。\n\n"
        "Please review and answer the contract above using your personal link. "
        f"{how_en}\n"
        + _FOOTER
    )
    return Mail(subject, text, "contract-reminder" if reminder else "contract-invitation")


def one_time_code(*, name: str, title: str, code: str, expires_at: dt.datetime) -> Mail:
    subject = "【茨城県 電子契約】確認コードのお知らせ"
    text = (
        f"{name} 様\n\n"
        f"契約「{title}」の本人確認のための確認コードです。\n\n"
        f"  確認コード: {code}\n"
        f"  有効期限: {_when(expires_at)}(10分間)\n\n"
        "画面に確認コードを入力してください。このコードを他の人に教えないでください。"
        "心当たりのない場合は、このメールを破棄してください。\n\n"
        f"Your verification code: {code} (valid for 10 minutes).\n"
        + _FOOTER
    )
    return Mail(subject, text, "contract-otp")


def completion(
    *, name: str, title: str, public_id: str, link: str, link_expires_at: dt.datetime
) -> Mail:
    subject = f"【茨城県 電子契約】「{title}」の契約が締結されました"
    text = (
        f"{name} 様\n\n"
        "すべての当事者が同意し、次の契約が締結されました。\n\n"
        f"  件名: {title}\n"
        f"  契約番号: {public_id}\n\n"
        "合意締結証明書と立会人署名・タイムスタンプが付された契約書(PDF)を、"
        "次のリンクからダウンロードして保管してください。\n\n"
        f"  {link}\n\n"
        f"ダウンロードの期限: {_when(link_expires_at)}\n\n"
        "All parties have consented; the contract has been concluded. Download the signed PDF "
        "with the link above.\n"
        + _FOOTER
    )
    return Mail(subject, text, "contract-completed")


def officer_completion(*, title: str, public_id: str, link: str) -> Mail:
    subject = f"【茨城県 電子契約】「{title}」が締結されました"
    text = (
        f"契約「{title}」(契約番号 {public_id})は、すべての当事者が同意し、"
        "立会人署名により締結されました。\n\n"
        f"  {link}\n\n"
        "The contract has been concluded and signed by the witness service.\n"
        + _FOOTER
    )
    return Mail(subject, text, "contract-completed")


def cancellation(*, name: str, title: str, public_id: str) -> Mail:
    subject = f"【茨城県 電子契約】「{title}」の同意依頼は取り消されました"
    text = (
        f"{name} 様\n\n"
        f"先にお送りした契約「{title}」(契約番号 {public_id})への同意のお願いは、"
        "茨城県により取り消されました。お送りしたリンクは使用できません。\n\n"
        "The request to consent to this contract has been withdrawn by the prefecture.\n"
        + _FOOTER
    )
    return Mail(subject, text, "contract-cancelled")


def declined_notice(*, title: str, public_id: str, party_name: str, reason: str) -> Mail:
    subject = f"【茨城県 電子契約】「{title}」に不同意の回答がありました"
    text = (
        f"契約「{title}」(契約番号 {public_id})について、{party_name} 様から"
        "「同意しない」との回答がありました。\n\n"
        f"  理由: {reason or '(記載なし)'}\n\n"
        "A party declined the contract.\n" + _FOOTER
    )
    return Mail(subject, text, "contract-declined")


def expired_notice(*, title: str, public_id: str) -> Mail:
    subject = f"【茨城県 電子契約】「{title}」は回答期限を過ぎました"
    text = (
        f"契約「{title}」(契約番号 {public_id})は、すべての当事者の同意が得られないまま"
        "回答期限を過ぎたため、期限切れとなりました。\n\n"
        "The contract expired before every party consented.\n" + _FOOTER
    )
    return Mail(subject, text, "contract-expired")


def locked_notice(*, title: str, public_id: str, party_name: str) -> Mail:
    subject = f"【茨城県 電子契約】「{title}」の当事者がロックされました"
    text = (
        f"契約「{title}」(契約番号 {public_id})で、{party_name} 様が確認コードを"
        "続けて間違えたため、リンクがロックされました。本人に連絡して状況を確認してください。\n\n"
        "A party's link was locked after too many wrong codes.\n" + _FOOTER
    )
    return Mail(subject, text, "contract-locked")

"""Source of the English catalogue: Japanese msgid → English text.

``python -m web.translations.english`` rewrites ``en/LC_MESSAGES/messages.po`` and ``.mo``
from the templates; a test checks the committed catalogue is complete and current.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
from pathlib import Path

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po, write_po

ENGLISH = {
    "有効": "Valid",
    "無効": "Invalid",
    "判定不能": "Indeterminate",
    "文書タイムスタンプ": "Document timestamp",
    "署名": "Signature",
    "署名者": "Signer",
    "職責": "Position",
    "発行者": "Issuer",
    "署名日時(申告)": "Signing time (claimed)",
    "タイムスタンプ": "Timestamp",
    "署名レベル": "Signature level",
    "署名の範囲": "Coverage",
    "署名後の変更": "Changes after signing",
    "版": "Revision",
    "認証署名": "Certification",
    "技術的な詳細": "Technical details",
    "ハッシュ": "Digest",
    "証明書チェーン": "Certificate chain",
    "注記": "Note",
    "ここに PDF をドロップするか、クリックして選択してください": (
        "Drop a PDF here, or click to choose one"
    ),
    "検証する": "Verify",
    "茨城県 電子署名サービス": "Ibaraki Prefecture e-Signature Service",
    "署名の検証": "Verify signatures",
    "茨城県": "Ibaraki Prefecture",
    "文書番号": "Document ID",
    "署名日時": "Signed at",
    "お手元の PDF がこの文書と同じものか確認できます。": (
        "You can check whether your PDF is this very document."
    ),
    "お手元の PDF は、この文書番号で署名された文書と同一です。": (
        "Your PDF is identical to the document signed under this ID."
    ),
    "お手元の PDF は、この文書番号で署名された文書と一致しません。": (
        "Your PDF does not match the document signed under this ID."
    ),
    "署名の検証に戻る": "Back to verification",
    "茨城県が発行する文書には、職責「茨城県知事」による電子署名とタイムスタンプが付いています。": (
        "Documents issued by Ibaraki Prefecture carry an electronic signature by the position "
        '"Governor of Ibaraki Prefecture" and a timestamp.'
    ),
    "PDF の署名を検証する": "Verify the signatures of a PDF",
    "PDF リーダーで確認するには": "Checking in a PDF reader",
    "PDF リーダーで「署名済みであり、すべての署名が有効です」と表示させるには、"
    "県のルート証明書を信頼してください。": (
        'For a PDF reader to show "Signed and all signatures are valid", trust the '
        "prefecture's root certificate."
    ),
    "ルート証明書": "Root certificate",
    "発行 CA 証明書": "Issuing CA certificate",
    "失効リスト": "Revocation lists",
    "タイムスタンプ局": "Time-stamping authority",
    "茨城県が発行した PDF の電子署名とタイムスタンプを検証します。"
    "ファイルは検証のためだけに使い、保存しません。": (
        "Checks the electronic signatures and timestamps of a PDF issued by Ibaraki Prefecture. "
        "The file is used only for the check and is not stored."
    ),
    # staff login (web/auth.py, templates/login.html, base.html)
    "職員ログイン": "Staff login",
    "メールアドレス": "Email address",
    "パスワード": "Password",
    "ログイン": "Log in",
    "ログアウト": "Log out",
    "ログアウトしました。": "You have been logged out.",
    "県の職員用のページです。文書の検証にはログインは不要です。": (
        "This page is for prefecture staff. Verifying a document needs no login."
    ),
    # development mailbox (web/devmail_views.py, templates/dev_mail*.html)
    "開発用メールボックス": "Development mailbox",
    "開発モードです。送信したメールは届けられず、ここに保存されます。": (
        "Development mode: mail is not delivered but kept here."
    ),
    "受信日時": "Received",
    "宛先": "To",
    "件名": "Subject",
    "差出人": "From",
    "メールはまだありません。": "No mail yet.",
    "メールボックスに戻る": "Back to the mailbox",
    "このメールにはテキストの本文がありません。": "This message has no text body.",
    "元のメール (.eml)": "Original message (.eml)",
}

WEB = Path(__file__).resolve().parent.parent
CATALOG = WEB / "translations" / "en" / "LC_MESSAGES"


def extract() -> bytes:
    """The current template messages as a .pot, via pybabel."""
    with tempfile.TemporaryDirectory() as folder:
        pot = Path(folder) / "messages.pot"
        subprocess.run(
            [sys.executable, "-m", "babel.messages.frontend", "extract", "-F",
             str(WEB / "babel.cfg"), "-o", str(pot), "--omit-header", "--no-location", "."],
            cwd=WEB.parent, capture_output=True, check=True,
        )
        return pot.read_bytes()


def build() -> tuple[bytes, bytes]:
    """(.po, .mo) bytes for English from the current templates."""
    catalog = read_po(io.BytesIO(extract()), locale="en")
    for message in catalog:
        if message.id:
            message.string = ENGLISH[str(message.id)]
    po, mo = io.BytesIO(), io.BytesIO()
    write_po(po, catalog, omit_header=True, sort_output=True, no_location=True)
    write_mo(mo, catalog)
    return po.getvalue(), mo.getvalue()


if __name__ == "__main__":
    po_bytes, mo_bytes = build()
    CATALOG.mkdir(parents=True, exist_ok=True)
    (CATALOG / "messages.po").write_bytes(po_bytes)
    (CATALOG / "messages.mo").write_bytes(mo_bytes)
    print(f"wrote {CATALOG}")

"""Source of the English catalogue: Japanese msgid → English text.

``python -m web.translations.english`` rewrites ``en/LC_MESSAGES/messages.po`` and ``.mo``
from the templates; a test checks the committed catalogue is complete and current.
"""

from __future__ import annotations

import datetime as dt
import io
import subprocess
import sys
import tempfile
from pathlib import Path

from babel.messages import catalog as babel_catalog
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
    # contract officer's pages (web/contract_views.py, templates/contract*.html, base.html)
    "契約": "Contracts",
    "契約一覧": "Contracts",
    "新しい契約": "New contract",
    "下書き": "Draft",
    "送付済み": "Sent",
    "一部合意": "Partially agreed",
    "締結処理中": "Being completed",
    "締結済み": "Completed",
    "不同意": "Declined",
    "取消し": "Cancelled",
    "期限切れ": "Expired",
    "契約相手方": "Contractor",
    "アクセスコード": "Access code",
    "メール認証コード": "Emailed one-time code",
    "アクセスコード(電話・書面で通知)": "Access code (passed on by phone or on paper)",
    "メール認証コード(ワンタイム)": "One-time code by email",
    "未回答": "Not answered",
    "同意": "Consented",
    "同時(全員に一度に送付)": "Parallel (everyone at once)",
    "順番(1 番目から順に送付)": "Sequential (one after another, in order)",
    "作成": "Created",
    "送付": "Sent",
    "メール送信": "Email queued",
    "リンクを開いた": "Link opened",
    "確認コード送信": "Code sent",
    "本人確認成功": "Identified",
    "本人確認失敗": "Wrong code",
    "ロック": "Locked",
    "督促": "Reminder",
    "立会人署名": "Witness signature",
    "締結": "Completed",
    "監査証跡へのタイムスタンプ": "Audit chain timestamped",
    "ダウンロード": "Downloaded",
    "招待": "invitation",
    "確認コード": "one-time code",
    "締結の通知": "completion notice",
    "取消しの通知": "cancellation notice",
    "不同意の通知": "decline notice",
    "期限切れの通知": "expiry notice",
    "ロックの通知": "lock notice",
    "合意": "agreed",
    "アクセスコード(この画面でのみ表示)": "Access codes (shown only on this page)",
    "次のアクセスコードを、電話または書面で各当事者に伝えてください。メールでは送らないでください。"
    "コードは保存されていないため、この画面を離れると二度と表示できません。": (
        "Pass these access codes to the parties by phone or on paper, never by email. They are "
        "not stored, so they cannot be shown again once you leave this page."
    ),
    "送信": "Send",
    "当事者に招待メールを送ります。": "Emails the invitations to the parties.",
    "再送": "Resend",
    "未回答の当事者に新しいリンクを送ります(以前のリンクは無効になります)。": (
        "Sends fresh links to the parties who have not answered (earlier links stop working)."
    ),
    "取消": "Cancel",
    "取消しの理由(当事者には通知されません)": "Reason (not sent to the parties)",
    "この契約を取り消します": "Cancel this contract",
    "取り消す": "Cancel the contract",
    "契約の内容": "Contract",
    "原本の SHA-256": "SHA-256 of the original",
    "締結済み PDF の SHA-256": "SHA-256 of the signed PDF",
    "ページ数": "Pages",
    "送付の方法": "Signing order",
    "回答期限": "Deadline",
    "期限を過ぎています": "past the deadline",
    "%(days)s 日ごと": "every %(days)s days",
    "しない": "none",
    "原本 PDF": "Original PDF",
    "締結済み PDF(立会人署名付き)": "Signed PDF (with the witness signature)",
    "監査ログ (JSON)": "Audit log (JSON)",
    "当事者": "Parties",
    "確認コードを続けて間違えたためロックされています": "Locked after too many wrong codes",
    "ロック中": "Locked",
    "所属": "Organisation",
    "メール": "Email",
    "立場": "Role",
    "本人確認": "Identification",
    "回答日時": "Answered at",
    "不同意の理由": "Reason for declining",
    "監査証跡": "Audit trail",
    "改ざんは検出されませんでした": "No tampering detected",
    "%(count)s 件の記録のハッシュ連鎖を検証しました。": (
        "The hash chain of %(count)s records was checked."
    ),
    "締結時の監査証跡タイムスタンプ": "Audit chain timestamped at completion",
    "改ざんが検出されました": "Tampering detected",
    "記録番号": "Record",
    "契約書の PDF と当事者を登録します。"
    "作成した契約は下書きになり、内容を確認してから送信します。": (
        "Enter the contract's PDF and its parties. The contract is created as a draft; check it, "
        "then send it."
    ),
    "契約件名": "Title",
    "契約書(PDF)": "Contract (PDF)",
    "署名前の PDF(暗号化や電子署名のないもの)。": (
        "The PDF before signing (not encrypted, no electronic signature)."
    ),
    "ファイルをもう一度選択してください。": "Please choose the file again.",
    "回答期限(日後)": "Deadline (days from now)",
    "督促の間隔(日)": "Reminder interval (days)",
    "0 にすると督促しません。": "0: no reminders.",
    "茨城県側と契約相手方の両方が必要です。空欄の行は無視されます。"
    "アクセスコードは作成後に一度だけ表示されます。": (
        "At least one party of the prefecture and one contractor are needed. Empty rows are "
        "ignored. Access codes are shown once, after the contract is created."
    ),
    "氏名": "Name",
    "所属・会社名": "Organisation or company",
    "当事者を追加": "Add a party",
    "契約を作成する(下書き)": "Create the contract (draft)",
    "件名で検索": "Search titles",
    "検索": "Search",
    "状態で絞り込み": "Filter by status",
    "すべて": "All",
    "状態": "Status",
    "更新": "Updated",
    "担当": "Officer",
    "前へ": "Previous",
    "次へ": "Next",
    "条件に合う契約はありません。": "No contract matches.",
    "契約はまだありません。「新しい契約」から作成してください。": (
        "No contracts yet. Create one with “New contract”."
    ),
    # a party's pages (web/party_views.py, templates/party_*.html, _party_*.html)
    "茨城県から、契約書の内容確認と同意のお願いが届いています。": (
        "Ibaraki Prefecture asks you to review and consent to a contract."
    ),
    "依頼元": "Requested by",
    "宛名": "Addressed to",
    "契約番号": "Contract number",
    "手続きの流れ": "Steps",
    "確認と回答": "Review",
    "完了": "Done",
    "確認コードをメールでお送りしました。": "We have emailed you a one-time code.",
    "確認コードは1分以内にお送りしています。届いたメールをご確認ください。": (
        "A code was emailed to you less than a minute ago. Please check your mail."
    ),
    "メールで送信した 6 桁の確認コードを入力してください。": (
        "Enter the 6-digit code we sent you by email."
    ),
    "担当者から電話または書面でお知らせしたアクセスコードを入力してください。": (
        "Enter the access code the officer gave you by phone or letter."
    ),
    "確認コード(6 桁)": "One-time code (6 digits)",
    "確認する": "Confirm",
    "確認コードの有効期間は10分です。届かないときは迷惑メールのフォルダもご確認ください。": (
        "The code is valid for 10 minutes. If it does not arrive, check your spam folder too."
    ),
    "確認コードを再送する": "Send a new code",
    "このリンクはあなた専用です。他の人に転送しないでください。": (
        "This link is for you alone. Please do not forward it."
    ),
    "契約書の内容をご確認のうえ、このページの最後で"
    "「合意する」または「同意しない」を選んでください。": (
        'Please review the contract, then choose "I consent" or "I do not consent" at the end '
        "of this page."
    ),
    "契約書": "Contract",
    "契約書を画像で表示できませんでした。PDF をダウンロードしてご確認ください。": (
        "The contract could not be shown as images. Please download the PDF to review it."
    ),
    "%(number)s ページ目": "Page %(number)s",
    "タップすると拡大して表示します": "Tap to show it larger",
    "契約書(PDF)をダウンロード": "Download the contract (PDF)",
    "この契約書の SHA-256": "SHA-256 of this contract",
    "SHA-256 で同じ文書か確かめるには": "Checking with the SHA-256 that it is the same document",
    "SHA-256 はファイルの指紋にあたる値で、1 文字でも違うファイルからは別の値になります。"
    "ダウンロードした PDF について次のコマンドで表示される値が上の値と一致すれば、"
    "この画面に表示している契約書と同じファイルです。": (
        "The SHA-256 is a fingerprint of the file: a file that differs in a single character "
        "has a different one. If the command below prints the value above for the PDF you "
        "downloaded, it is the very contract shown on this page."
    ),
    "締結後にお送りする署名済みの契約書は、"
    "この文書の後ろに合意締結証明書と電子署名を加えたものです。": (
        "The signed contract you receive once all have consented is this document followed "
        "by a certificate of agreement, with an electronic signature."
    ),
    "回答": "Your answer",
    "内容を確認し、合意します": "I have reviewed the contents and agree",
    "合意する": "I consent",
    "同意しない場合": "If you do not consent",
    "同意しないと回答すると、この契約の手続きは終了し、理由とともに県の担当者に通知されます。": (
        "If you answer that you do not consent, this contract ends and the prefecture's officer "
        "is told, with your reason."
    ),
    "同意しない理由(必須)": "Why you do not consent (required)",
    "同意しない": "I do not consent",
    "同意しないことの確認": "Confirm that you do not consent",
    "次の契約に同意しないと回答します。回答すると取り消せません。": (
        "You are about to answer that you do not consent to this contract. This cannot be "
        "undone."
    ),
    "理由": "Reason",
    "同意しないと回答する": "Answer: I do not consent",
    "契約書の確認に戻る": "Back to the contract",
    "回答を受け付けました": "Answer received",
    "すべての当事者の合意が揃い、契約が締結されました。": (
        "All parties have consented: the contract is concluded."
    ),
    "署名済みの契約書(PDF)をダウンロード": "Download the signed contract (PDF)",
    "ダウンロード用のリンクはメールでもお送りしています。"
    "署名済みの契約書は大切に保管してください。": (
        "We have also emailed you a download link. Please keep the signed contract safe."
    ),
    "合意を受け付けました。"
    "すべての当事者の合意が揃うと、署名済みの契約書をメールでお送りします。": (
        "Consent received. Once all parties have consented, we will email you the signed "
        "contract."
    ),
    "同意しないとの回答を受け付けました。県の担当者に通知しました。": (
        "Your answer that you do not consent has been received; the prefecture's officer has "
        "been told."
    ),
    "契約の状態": "Contract status",
    "ありがとうございました。このページは閉じてかまいません。": (
        "Thank you. You may close this page."
    ),
    "お手続きできません": "This cannot be done",
    "リンクが無効です": "This link is not valid",
    "リンクの有効期限が切れています": "This link has expired",
    "回答済みです": "Already answered",
    "この契約は受付を終了しています": "This contract no longer takes answers",
    "まだ回答の順番ではありません": "It is not your turn yet",
    "ロックされています": "Locked",
    "本人確認が必要です": "Identification needed",
    "契約書が一致しません": "The contract does not match",
    "契約書のページを開き直す": "Open the contract page again",
    "ご不明な点は、契約の担当職員にお問い合わせください。": (
        "If anything is unclear, please contact the officer in charge of the contract."
    ),
    # stamp templates (web/template_views.py)
    "印影テンプレート": "Stamp templates",
    "新しいテンプレート": "New template",
    "文書の種類ごとに、印影を押すページと位置、QR コードの有無、署名レベルを決めます。": (
        "For each type of document: the page and position of the stamp, the QR code, and the "
        "signature level."
    ),
    "表示名": "Title",
    "ページ": "Page",
    "印影の枠": "Stamp box",
    "QR コード": "QR code",
    "最終ページ": "Last page",
    "末尾から": "From the end:",
    "右下(標準)": "Bottom right (default)",
    "あり": "Yes",
    "なし": "No",
    "無効にする": "Deactivate",
    "無効化済み": "Deactivated",
    "テンプレートはまだありません。": "There are no templates yet.",
    "印影テンプレートの編集": "Edit stamp template",
    "このテンプレートは無効になっています。": "This template is deactivated.",
    "テンプレート名(半角)": "Template name (ASCII)",
    "英小文字・数字・ハイフン。後から変更できません。": (
        "Lower-case letters, digits and hyphens. It cannot be changed later."
    ),
    "1 が最初のページ、-1 が最終ページ(負の数は末尾から数えます)。": (
        "1 is the first page, -1 the last (negative numbers count from the end)."
    ),
    (
        "ページ左下からの座標で、左下(x1, y1)と右上(x2, y2)を指定します。"
        "すべて空欄なら右下の標準位置です。"
    ): (
        "Coordinates from the page's bottom-left corner: lower left (x1, y1) and upper right "
        "(x2, y2). Leave all empty for the default bottom-right position."
    ),
    "単位": "Units",
    "A4 は 595 × 842 pt(210 × 297 mm)。1 mm ≒ 2.835 pt。": (
        "A4 is 595 × 842 pt (210 × 297 mm). 1 mm ≈ 2.835 pt."
    ),
    "オプション": "Options",
    "検証用 QR コードを印字する": "Print the verification QR code",
    "認証署名(署名後の変更を制限)": "Certification signature (limits changes after signing)",
    "保存する": "Save",
    "テンプレートを作成する": "Create template",
    "印影の位置を確認": "Check the stamp's position",
    (
        "見本の PDF に、この設定で印影を押した画像を表示します(保存も記録もされません)。"
        "PDF を選ばなければ県の見本(建設業許可通知書、2 ページ)を使います。"
    ): (
        "Shows a sample PDF stamped with these settings (nothing is saved or recorded). "
        "Without a PDF, the prefecture's two-page sample permit notice is used."
    ),
    "見本の PDF(任意)": "Sample PDF (optional)",
    "印影の位置を確認する": "Preview the stamp",
    "印影を押したページ": "The page with the stamp",
    "県の見本": "prefecture's sample",
    # API key pages (web/apikey_views.py, apikeys.html)
    "文書への署名(POST /api/v1/sign)": "sign documents (POST /api/v1/sign)",
    "電子契約の作成・送付(/api/v1/contracts)": "create and send contracts (/api/v1/contracts)",
    "署名の検証(/api/v1/verify)": "verify signatures (/api/v1/verify)",
    "API キーの管理(全職員)": "API keys of all staff",
    "API キー": "API keys",
    "自分の API キー": "My API keys",
    "全職員の API キー": "API keys of all staff",
    (
        "API キーを使うと、ほかのシステムから koin の REST API を呼び出せます。"
        "キーはパスワードと同じように扱い、人に渡したりメールで送ったりしないでください。"
    ): (
        "With an API key, other systems can call koin's REST API. Treat a key like a password: "
        "do not hand it to people or send it by email."
    ),
    "新しい API キー(この画面でのみ表示)": "New API key (shown on this page only)",
    "このキーは今だけ表示されます。": "This key is shown only now.",
    (
        "今すぐコピーして、呼び出すシステムの安全な場所(環境変数や秘密情報の保管庫など)に"
        "保存してください。koin にはキーのハッシュ値しか残らないため、この画面を離れると"
        "二度と表示できません。なくしたときは失効させて、新しいキーを作ってください。"
    ): (
        "Copy it now and store it in a safe place of the calling system (an environment "
        "variable or a secrets store). koin keeps only the key's hash, so it cannot be shown "
        "again once you leave this page. If you lose it, revoke it and create a new one."
    ),
    "新しい API キー": "New API key",
    "コピーしました": "Copied",
    "コピー": "Copy",
    "使い方: HTTP ヘッダー Authorization: Bearer <キー> を付けて呼び出します。": (
        "Usage: send the HTTP header Authorization: Bearer <key>."
    ),
    "発行済みの API キー": "Issued API keys",
    "職員": "Staff member",
    "名前": "Name",
    "キー": "Key",
    "スコープ": "Scopes",
    "最終使用": "Last used",
    "未使用": "Never",
    "失効": "Revoked",
    "失効させる": "Revoke",
    "この API キーを失効させます": "Revoke this API key",
    "API キーはまだありません。": "No API keys yet.",
    "新しい API キーを作る": "Create an API key",
    "発行先の職員": "Issue to",
    "選んでください": "Choose",
    "名前(呼び出すシステムの名前など)": "Name (e.g. the calling system's)",
    "例: 文書管理システム": "e.g. document management system",
    "スコープ(このキーでできること)": "Scopes (what the key may do)",
    "役割 %(role)s が必要": "needs the role %(role)s",
    "API キーを作る": "Create API key",
    "あなたの役割では作れる API キーがありません。": "Your roles allow no API key.",
    # webhooks (admin pages)
    "Webhook": "Webhooks",
    "一括署名の完了": "Batch finished",
    "契約の締結": "Contract completed",
    "契約の不同意": "Contract declined",
    "契約の期限切れ": "Contract expired",
    "配信待ち": "Pending",
    "配信済み": "Delivered",
    "失敗": "Failed",
    "配信中": "Active",
    "停止中": "Disabled",
    "配信履歴": "Deliveries",
    "配信": "Delivery",
    "送信先": "Endpoint",
    "すべての送信先": "All endpoints",
    "すべての状態": "All states",
    "絞り込む": "Filter",
    "イベント": "Event",
    "イベント ID": "Event ID",
    "試行": "Attempts",
    "最後": "last",
    "最後の応答": "Last answer",
    "次の試行": "Next attempt",
    "配信日時": "Delivered at",
    "再配信": "Redeliver",
    "同じ配信 ID で、もう一度送信します。": "Sends it again with the same delivery ID.",
    "新しい順に最大 100 件を表示しています。": "Showing the 100 most recent.",
    "条件に合う配信はありません。": "No deliveries match.",
    "本文": "Body",
    "新しい送信先": "New endpoint",
    "URL": "URL",
    "http:// または https://。リダイレクトはたどりません。": (
        "http:// or https://. Redirects are not followed."
    ),
    "説明": "Description",
    "文書管理システム": "Document management system",
    "通知するイベント": "Events to send",
    "登録すると、署名用シークレットを一度だけ表示します。": (
        "The signing secret is shown once, after registering."
    ),
    "登録する": "Register",
    "登録": "Registered",
    (
        "契約の締結・不同意・期限切れや一括署名の完了を、文書管理システムや RPA に HTTP POST で"
        "通知します。各リクエストには送信先ごとのシークレットによる署名が付きます。"
    ): (
        "Tells document management systems and RPA by HTTP POST when contracts are completed, "
        "declined or expired and when signing batches finish. Every request is signed with "
        "the endpoint's own secret."
    ),
    "署名用シークレット(この画面でのみ表示)": "Signing secret (shown on this page only)",
    (
        "送信先の受信側に、次のシークレットを設定してください。この画面を離れると二度と表示"
        "できません。分からなくなったときは、送信先を登録し直してください。"
    ): (
        "Configure this secret at the receiving end. It cannot be shown again once you leave "
        "this page; if it is lost, register the endpoint again."
    ),
    "コマンドライン": "command line",
    "停止する": "Disable",
    "再開する": "Enable",
    "送信先はまだありません。": "No endpoints yet.",
    "(説明なし)": "(no description)",
    # signing staff's pages (web/batch_views.py, templates sign*.html, batch*.html,
    # history.html, _batch_labels.html, base.html)
    "署名する": "Sign",
    "一括署名": "Batch signing",
    "署名履歴": "Signing history",
    "一括署名の一覧": "Signing batches",
    "署名中": "Signing",
    "待機中": "Waiting",
    "署名済み": "Signed",
    "署名画面": "Sign page",
    "REST API": "REST API",
    "電子契約(立会人署名)": "Contract (witness signature)",
    "標準の印影": "Standard stamp",
    "標準の印影(右下・QR コード付き)": "Standard stamp (bottom right, with QR code)",
    (
        "許可書・通知書などの PDF に、茨城県知事の職責で電子署名します。"
        "PDF が 1 件ならすぐに署名してダウンロードできます。"
        "複数の PDF や ZIP は一括署名になり、進み具合を確認できます。"
    ): (
        "Signs PDFs such as permits and notices with the Governor of Ibaraki's position key. "
        "A single PDF is signed at once and can be downloaded; several PDFs or ZIP files "
        "become a batch whose progress you can follow."
    ),
    "取り込まなかったファイル": "Files not taken",
    "ここに PDF または ZIP をドロップするか、クリックして選択してください": (
        "Drop PDF or ZIP files here, or click to choose them"
    ),
    "複数選択できます。合計 %(size)s まで。": (
        "You can choose several files; up to %(size)s in all."
    ),
    "一括署名の名前(任意)": "Batch name (optional)",
    "例: 令和8年11月分 建設業許可通知書": "e.g. Construction permit notices, November 2026",
    "複数のファイルを送るときの一覧での名前です。": (
        "The name shown in the list when you send several files."
    ),
    "送信しています…": "Uploading…",
    "署名しました": "Signed",
    "署名済み PDF をダウンロード": "Download the signed PDF",
    "この画面からのダウンロードは %(hours)s 時間有効です。署名の記録は署名履歴に残ります。": (
        "The download on this page is kept for %(hours)s hours; the record stays in the "
        "signing history."
    ),
    "検証ページ": "Verification page",
    "続けて署名する": "Sign another",
    "サーバーに接続できません。自動で再接続します…": (
        "Cannot reach the server; trying again automatically…"
    ),
    "件 処理済み": "processed",
    "進み具合": "Progress",
    "残り": "Remaining",
    "署名が進むとこの画面は自動で更新されます。": "This page updates itself as signing proceeds.",
    "5 秒ごとにページを再読み込みして更新します。": "The page reloads itself every 5 seconds.",
    "今すぐ更新": "Update now",
    "すべてダウンロード (ZIP)": "Download all (ZIP)",
    "署名済みのファイルと一覧表 (manifest.csv) をまとめてダウンロードします。": (
        "Downloads the signed files and the list (manifest.csv) in one ZIP."
    ),
    "失敗したファイルを再試行": "Retry the failed files",
    (
        "PDF として読めないファイルは、再試行しても失敗します。元のファイルを直してから新しく"
        "署名してください。"
    ): (
        "Files that cannot be read as PDFs fail again; fix the original file and sign it anew."
    ),
    "失敗したファイルをもう一度署名します": "Sign the failed files once more",
    "再試行する": "Retry",
    "一括署名を取り消す": "Cancel the batch",
    "まだ署名していないファイルは署名されません。署名済みのファイルはそのまま残ります。": (
        "Files not yet signed will not be signed; the files signed so far remain."
    ),
    "この一括署名を取り消します": "Cancel this batch",
    "アップロード時に取り込まなかったファイル": "Files not taken at upload",
    "ファイル": "Files",
    "再試行待ち": "Will retry",
    "ファイル名": "File name",
    "文書番号・理由": "Document ID or reason",
    "該当するファイルはありません。": "No files match.",
    "管理者として、すべての職員の一括署名を表示しています。": (
        "As an administrator you see the batches of all staff."
    ),
    "一括署名はまだありません。「署名する」から複数の PDF か ZIP を送ると一括署名になります。": (
        "There are no batches yet. Sending several PDFs or a ZIP on the Sign page makes one."
    ),
    "管理者として、この署名サービスで署名したすべての文書を表示しています。": (
        "As an administrator you see every document this service has signed."
    ),
    "あなたが署名した文書(署名画面・一括署名・API)です。": (
        "The documents you signed (sign page, batches, API)."
    ),
    "文書番号・ファイル名・SHA-256": "Document ID, file name or SHA-256",
    "絞り込み": "Filters",
    "署名日(から)": "Signed from",
    "署名日(まで)": "Signed until",
    "署名の経路": "Channel",
    "署名した職員": "Signed for",
    "条件をクリア": "Clear",
    "%(total)s 件中 %(first)s〜%(last)s 件": "%(first)s–%(last)s of %(total)s",
    "文書": "Document",
    "署名日時・職員": "Signed at, for",
    "印影・経路": "Stamp, channel",
    "(サーバー・契約)": "(server or contract)",
    "条件に合う文書はありません。": "No documents match.",
    "署名した文書はまだありません。": "Nothing has been signed yet.",
    "署名が終わりました。": "Signing has finished.",
    "ダウンロードする": "Download",
    "失敗したファイルの理由は下の一覧にあります。": (
        "The reasons for the failed files are listed below."
    ),
    # long-term validity and evidence packages (contract page, verify page)
    "長期検証のためのタイムスタンプ": "Timestamp for long-term validation",
    "PDF、監査ログ、タイムスタンプ、証明書と、オフラインで検証する手順(VERIFY.md)": (
        "PDFs, audit log, timestamps, certificates and the steps to check them offline "
        "(VERIFY.md)"
    ),
    "証拠パッケージ (ZIP)": "Evidence package (ZIP)",
    "長期検証": "Long-term validation",
    "PAdES B-LTA、タイムスタンプの有効期限": "PAdES B-LTA, timestamp valid until",
    "(最終更新 %(when)s)": " (last renewed %(when)s)",
    "検証情報とタイムスタンプを追加する処理を待っています": (
        "Waiting for validation data and a timestamp to be added"
    ),
    "検証情報と文書タイムスタンプを追加しました(%(when)s)": (
        "Validation data and a document timestamp added (%(when)s)"
    ),
    "現在保管している版の SHA-256": "SHA-256 of the version kept now",
    "お手元の PDF は、この文書番号で署名された文書です。": (
        "Your PDF is the document signed under this number."
    ),
    "署名後に本サービスが長期検証のための検証情報と文書タイムスタンプを追加した版で、"
    "署名された内容は同一です。": (
        "It is the version to which this service added validation data and a document "
        "timestamp for long-term validation after signing; what was signed is identical."
    ),
    "本サービスが保管している版の先頭部分と一致します(長期検証のための情報を追加する前の版)。"
    "署名された内容は同一です。": (
        "It matches the beginning of the version this service keeps (a version from before "
        "long-term validation data was added); what was signed is identical."
    ),
    # security (rate limits)
    "しばらくお待ちください": "Please wait a moment",
    # ops: health, metrics and the admin status page (admin_status.html)
    "稼働状況": "Service status",
    "署名に必要なものが、いま使える状態かを確認します。"
    "同じ確認結果は /readyz でも JSON で取得できます。": (
        "Whether everything signing needs can be used right now. The same checks are available "
        "as JSON at /readyz."
    ),
    "すべての確認項目が正常です。": "All checks passed.",
    "異常のある項目があります:": "Failing:",
    "データベース": "Database",
    "ジョブの受け渡し(ブローカー)": "Job broker",
    "鍵ストア": "Key store",
    "タイムスタンプ局(TSA)": "Time-stamping authority (TSA)",
    "職責署名の鍵": "Position key",
    "立会人署名の鍵": "Witness key",
    "認証局": "Certificate authority",
    "準備状況の確認": "Readiness checks",
    "項目": "Check",
    "詳細": "Detail",
    "正常": "OK",
    "異常": "Failing",
    "鍵ストアの証明書": "Key store certificates",
    "有効期限切れ、または %(days)s 日以内に期限が切れる証明書があります。"
    "更新の準備をしてください。": (
        "A certificate has expired or expires within %(days)s days. Prepare its renewal."
    ),
    "用途": "Use",
    "主体者": "Subject",
    "シリアル番号": "Serial number",
    "有効期限": "Valid until",
    "読み込めません": "Cannot be loaded",
    "あと %(days)s 日で期限切れ": "expires in %(days)s days",
    "あと %(days)s 日": "%(days)s days left",
    "使用している TSA": "TSA in use",
    "外部の TSA(上から順に使用)": "External TSAs (tried in this order)",
    "内蔵 TSA(この koin の TSA 鍵)": "Embedded TSA (this koin's TSA key)",
    "確認結果": "Check result",
    "TSA 証明書の有効期限": "TSA certificate valid until",
    "処理待ち": "Queues",
    "一括署名で署名を待つ文書": "Batch documents waiting to be signed",
    "一括署名で署名中の文書": "Batch documents being signed",
    "送信を待つメール": "Mail messages due to be sent",
    "データベースを読めないため表示できません。": "Not shown: the database cannot be read.",
    # admin: administrator's pages (web/admin_views.py, admin_*.html, base.html)
    "管理": "Administration",
    "管理者だけが使えるページです。": "Pages for administrators only.",
    "職員のアカウント": "Staff accounts",
    "アカウントの作成、役割の変更、無効化": "Create accounts, change roles, deactivate",
    "全職員の API キーの発行と失効": "Issue and revoke API keys of every staff member",
    "外部システムへの通知の送信先と配信履歴": (
        "Endpoints and deliveries of notifications to other systems"
    ),
    "監査証跡の検索": "Audit search",
    "契約・文書・操作した人・期間で監査イベントを検索し、改ざんの有無を確認": (
        "Search audit events by contract, document, actor and period, and check for tampering"
    ),
    "印影の位置と署名の設定": "Stamp positions and signing settings",
    "サービスの状態(データベース、キュー、証明書の期限など)": (
        "State of the service (database, queues, certificate expiry and more)"
    ),
    (
        "すべての契約の監査イベントを新しい順に表示します。"
        "契約を指定すると、その監査証跡のハッシュ連鎖も検証します。"
    ): (
        "The audit events of every contract, newest first. When you name a contract, the hash "
        "chain of its audit trail is checked as well."
    ),
    "契約(契約 ID か文書番号)": "Contract (contract ID or document ID)",
    "文書(SHA-256 か文書番号)": "Document (SHA-256 or document ID)",
    "操作した人(メールか IP アドレス)": "Actor (email or IP address)",
    "イベントの種類": "Event type",
    "日付(から)": "Date (from)",
    "日付(まで)": "Date (to)",
    "日時": "Time",
    "操作した人": "Actor",
    "条件に合う監査イベントはありません。": "No audit event matches.",
    "管理者": "Administrator",
    "契約担当": "Contract officer",
    "署名担当": "Signer",
    "初期パスワード(この画面でのみ表示)": "Initial password (shown on this page only)",
    (
        "本人に安全な方法で伝えてください。koin にはパスワードのハッシュ値しか残らないため、"
        "この画面を離れると二度と表示できません。"
    ): (
        "Pass it on to the person in a safe way. koin keeps only a hash of the password, so it "
        "cannot be shown again once you leave this page."
    ),
    "アカウント一覧": "Accounts",
    "役割": "Roles",
    "最終ログイン": "Last login",
    "自分": "you",
    "役割を保存": "Save roles",
    "有効にする": "Activate",
    "未ログイン": "Never logged in",
    "新しいアカウントを作る": "Create an account",
    "メールアドレス(ログイン名)": "Email address (login name)",
    "例: 茨城 花子": "e.g. Hanako Ibaraki",
    "パスワードは自動で作られ、作成後に一度だけ表示されます。": (
        "A password is generated and shown once after the account is created."
    ),
    "アカウントを作る": "Create account",
    # lead: admin-page words that mean something else on other pages
    "利用中": "Active",
    "利用停止": "Deactivated",
    "対象の契約": "Contract",
    "新しいパスワード(この画面でのみ表示)": "New password (shown on this page only)",
    "パスワードを再発行": "Reissue password",
    # lead: changing one's own password (web/account_views.py)
    "パスワードの変更": "Change password",
    "パスワードを変更しました。ほかの端末やブラウザーでのログインは終了しました。": (
        "Your password was changed. Logins on other devices and browsers have ended."
    ),
    "現在のパスワード": "Current password",
    "新しいパスワード": "New password",
    "新しいパスワード(確認)": "New password (again)",
    "変更する": "Change",
    "%(count)s 文字以上にしてください。": "Use at least %(count)s characters.",
    "管理者から受け取った初期パスワードは、ご自分だけが知るものに変えてください。": (
        "Replace the initial password you received from the administrator with one that only "
        "you know."
    ),
    # ui-look: one party's fieldset on the new-contract form (was "Parties 1")
    "当事者 %(number)s": "Party %(number)s",
}

FIXED_DATE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
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
    # The header names the Babel version; a fixed one keeps the files independent of it.
    installed_version = getattr(babel_catalog, "VERSION")  # noqa: B009 (not re-exported)
    setattr(babel_catalog, "VERSION", "(koin)")  # noqa: B010
    try:
        return _build()
    finally:
        setattr(babel_catalog, "VERSION", installed_version)  # noqa: B010


def _build() -> tuple[bytes, bytes]:
    catalog = read_po(io.BytesIO(extract()), locale="en")
    # A fixed header date keeps the .mo byte-for-byte reproducible (it embeds the header).
    catalog.creation_date = catalog.revision_date = FIXED_DATE
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

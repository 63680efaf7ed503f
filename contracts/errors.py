"""Errors of the persistence and workflow layer."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence

from keys.errors import KoinError

__all__ = [
    "AlreadyResponded",
    "BatchError",
    "BatchNotFound",
    "InvalidBatchData",
    "InvalidBatchState",
    "ApiKeyError",
    "ApiKeyInvalid",
    "ApiKeyNotFound",
    "ApiKeyScope",
    "InvalidApiKeyData",
    "CompletionError",
    "ContractNotFound",
    "ContractNotOpen",
    "DocumentMismatch",
    "IdentificationRequired",
    "InvalidContractData",
    "InvalidContractState",
    "LinkAlreadyUsed",
    "LinkExpired",
    "LinkInvalid",
    "MailError",
    "NotYourTurn",
    "PartyLocked",
    "TemplateError",
    "TemplateExists",
    "TemplateNotFound",
    "InvalidTemplateData",
    "WorkflowError",
    "AccountDisabled",
    "AccountError",
    "AccountLocked",
    "ContractsError",
    "DocumentNotFound",
    "DuplicateDocument",
    "InvalidAccountData",
    "LoginFailed",
    "WrongCurrentPassword",
    "LtaFileError",
    "UserExists",
    "InvalidWebhookData",
    "InvalidWebhookState",
    "WebhookError",
    "WebhookNotFound",
    "WebhookSignatureInvalid",
]


class ContractsError(KoinError):
    """Root of the errors of ``contracts``: the database or a workflow rule refused a request."""


class DuplicateDocument(ContractsError):
    """A document ID is already recorded, with different data.

    :ivar document_id: the canonical document ID.
    :ivar differing: names of the fields whose values differ from the stored record.
    """

    def __init__(self, document_id: str, differing: Sequence[str]) -> None:
        names = ", ".join(differing)
        super().__init__(
            f"文書ID {document_id} は既に異なる内容で登録されています（相違する項目: {names}）。",
            f"Document ID {document_id} is already recorded with different data "
            f"(differing fields: {names}).",
            document_id=document_id,
            differing=list(differing),
        )
        self.document_id = document_id
        self.differing = tuple(differing)


class DocumentNotFound(ContractsError):
    """No signed document is recorded under the given document ID.

    :ivar document_id: the ID as it was asked for.
    """

    def __init__(self, document_id: str) -> None:
        super().__init__(
            f"文書ID {document_id} の署名記録はありません。",
            f"No signed document is recorded under the document ID {document_id}.",
            document_id=document_id,
        )
        self.document_id = document_id


# -- staff accounts ---------------------------------------------------------------------------


class AccountError(ContractsError):
    """Root of the errors of staff accounts (:mod:`contracts.accounts`)."""


class LoginFailed(AccountError):
    """The email address or the password is wrong. Deliberately one message for both, so that a
    login form does not tell which addresses have accounts."""

    def __init__(self) -> None:
        super().__init__(
            "メールアドレスまたはパスワードが正しくありません。",
            "The email address or password is incorrect.",
        )


class AccountLocked(AccountError):
    """Too many failed logins in a row: the account refuses logins until ``locked_until``.

    :ivar locked_until: aware UTC time at which logins are accepted again.
    """

    def __init__(self, locked_until: dt.datetime, now: dt.datetime) -> None:
        minutes = max(1, math.ceil((locked_until - now).total_seconds() / 60))
        super().__init__(
            "ログインに続けて失敗したため、このアカウントは一時的にロックされています。"
            f"{minutes} 分ほど待ってから、もう一度お試しください。",
            "This account is temporarily locked after too many failed logins. "
            f"Try again in about {minutes} minute{'s' if minutes != 1 else ''}.",
            locked_until=locked_until.isoformat(),
        )
        self.locked_until = locked_until

    def seconds_left(self, now: dt.datetime | None = None) -> int:
        """Whole seconds until the lock ends, at least 1 (for ``Retry-After``)."""
        moment = now or dt.datetime.now(dt.UTC)
        return max(1, int((self.locked_until - moment).total_seconds()))


class AccountDisabled(AccountError):
    """The password is right, but the account has been switched off by an administrator.
    (Raised only after a correct password, so it tells a stranger nothing.)"""

    def __init__(self) -> None:
        super().__init__(
            "このアカウントは無効になっています。管理者にお問い合わせください。",
            "This account has been disabled. Please contact an administrator.",
        )


class UserExists(AccountError):
    """An account with this email address already exists.

    :ivar email: the normalised (lower-case) address.
    """

    def __init__(self, email: str) -> None:
        super().__init__(
            f"メールアドレス {email} のアカウントは既にあります。",
            f"An account with the email address {email} already exists.",
            email=email,
        )
        self.email = email


class WrongCurrentPassword(AccountError):
    """The current password given to change it is wrong (counted like a failed login)."""

    def __init__(self) -> None:
        super().__init__(
            "現在のパスワードが正しくありません。",
            "The current password is not correct.",
        )


class InvalidAccountData(AccountError):
    """An email address, password, name or role offered for an account is unusable.

    :ivar field: which one (``email``, ``password``, ``display_name`` or ``roles``).
    """

    def __init__(self, field: str, message: str, message_en: str) -> None:
        super().__init__(message, message_en, field=field)
        self.field = field



# -- API keys ---------------------------------------------------------------------------------


class ApiKeyError(ContractsError):
    """Root of the errors of API keys (:mod:`contracts.apikeys`)."""


class ApiKeyInvalid(ApiKeyError):
    """The API key is missing, malformed, unknown or revoked, or its account is disabled.
    Deliberately one message for every case (HTTP 401)."""

    def __init__(self) -> None:
        super().__init__(
            "API キーが無効です。",
            "The API key is not valid.",
        )


class ApiKeyScope(ApiKeyError):
    """The API key is valid but does not carry the scope the request needs, or its account no
    longer holds the role that the scope requires (HTTP 403).

    :ivar scope: the scope that was needed.
    """

    def __init__(self, scope: str) -> None:
        super().__init__(
            f"この API キーには {scope} の権限がありません。",
            f"This API key does not carry the scope '{scope}'.",
            scope=scope,
        )
        self.scope = scope


class ApiKeyNotFound(ApiKeyError):
    """No API key has this prefix.

    :ivar prefix: the prefix as it was asked for.
    """

    def __init__(self, prefix: str) -> None:
        super().__init__(
            f"接頭辞 {prefix} の API キーはありません。",
            f"There is no API key with the prefix {prefix}.",
            prefix=prefix,
        )
        self.prefix = prefix


class InvalidApiKeyData(ApiKeyError):
    """A name or scope offered for a new API key is unusable, or the account's roles do not
    allow a scope.

    :ivar field: which one (``name`` or ``scopes``).
    """

    def __init__(self, field: str, message: str, message_en: str) -> None:
        super().__init__(message, message_en, field=field)
        self.field = field


# -- witness-type contracts -------------------------------------------------------------------


class WorkflowError(ContractsError):
    """Root of the errors of witness-type contracts (:mod:`contracts.workflow`)."""


class InvalidContractData(WorkflowError):
    """A title, party, code or setting offered for a contract is unusable.

    :ivar field: which one (``title``, ``parties``, ``email``, ``access_code``, …).
    """

    def __init__(self, field: str, message: str, message_en: str) -> None:
        super().__init__(message, message_en, field=field)
        self.field = field


class ContractNotFound(WorkflowError):
    """No contract has this public ID."""

    def __init__(self, public_id: str) -> None:
        super().__init__(
            f"契約 {public_id} は見つかりません。",
            f"There is no contract {public_id}.",
            public_id=public_id,
        )
        self.public_id = public_id


class InvalidContractState(WorkflowError):
    """The contract's status does not allow the requested action (e.g. sending it twice).

    :ivar status: the contract's status value.
    :ivar action: what was asked (``send``, ``cancel``, ``complete``, …).
    """

    def __init__(
        self, public_id: str, status: str, label_ja: str, label_en: str, action: str
    ) -> None:
        super().__init__(
            f"契約 {public_id} は現在「{label_ja}」のため、この操作({action})はできません。",
            f"Contract {public_id} is {label_en}; the action '{action}' is not possible now.",
            public_id=public_id,
            status=status,
            action=action,
        )
        self.status = status
        self.action = action


class LinkInvalid(WorkflowError):
    """The link's token is unknown (mistyped, truncated or forged). One message for every
    such case, so that the page tells nothing about which tokens exist."""

    def __init__(self) -> None:
        super().__init__(
            "このリンクは無効です。メールに記載されたリンクをそのまま開いてください。",
            "This link is not valid. Open the link exactly as it appears in the email.",
        )


class LinkExpired(WorkflowError):
    """The link is past its validity (a newer mail may hold a fresh link)."""

    def __init__(self) -> None:
        super().__init__(
            "このリンクは有効期限が切れています。最新のメールのリンクを開くか、"
            "県の担当者にお問い合わせください。",
            "This link has expired. Open the link in the most recent email, or contact the "
            "prefecture's officer.",
        )


class LinkAlreadyUsed(WorkflowError):
    """The link was already used to answer (consent or decline)."""

    def __init__(self) -> None:
        super().__init__(
            "このリンクは既に使用されました(回答済みです)。",
            "This link has already been used; your answer has been recorded.",
        )


class ContractNotOpen(WorkflowError):
    """The contract does not await answers (draft, completed, declined, cancelled, expired).

    :ivar status: the contract's status value.
    """

    def __init__(self, status: str, label_ja: str, label_en: str) -> None:
        super().__init__(
            f"この契約は「{label_ja}」のため、確認・回答はできません。",
            f"This contract is {label_en}; it can no longer be reviewed or answered.",
            status=status,
        )
        self.status = status


class PartyLocked(WorkflowError):
    """Too many wrong codes: the party can no longer identify; the officer has to help."""

    def __init__(self) -> None:
        super().__init__(
            "確認コードを続けて間違えたため、このリンクはロックされました。"
            "県の担当者にお問い合わせください。",
            "This link is locked after too many wrong codes. Please contact the prefecture's "
            "officer.",
        )


class AlreadyResponded(WorkflowError):
    """The party has already consented or declined.

    :ivar status: ``consented`` or ``declined``.
    """

    def __init__(self, status: str) -> None:
        answer_ja = "同意" if status == "consented" else "不同意"
        super().__init__(
            f"この契約には既に回答済みです({answer_ja})。",
            f"You have already answered this contract ({status}).",
            status=status,
        )
        self.status = status


class NotYourTurn(WorkflowError):
    """Sequential signing: an earlier party has not consented yet."""

    def __init__(self) -> None:
        super().__init__(
            "この契約は順番に同意する方式です。前の当事者の同意をお待ちください。",
            "This contract is answered in order; please wait until the previous party has "
            "consented.",
        )


class IdentificationRequired(WorkflowError):
    """The party has not (or no longer) passed identification since the link was opened."""

    def __init__(self) -> None:
        super().__init__(
            "本人確認が済んでいません。確認コードを入力してください。",
            "Identification is required; please enter your code first.",
        )


class DocumentMismatch(WorkflowError):
    """The document the party reviewed is not this contract's original."""

    def __init__(self) -> None:
        super().__init__(
            "確認した文書が、この契約の契約書と一致しません。ページを開き直してください。",
            "The document you reviewed is not this contract's document; reload the page.",
        )


class CompletionError(WorkflowError):
    """The contract could not be completed (signed) right now; the periodic job retries."""


# -- stamp templates --------------------------------------------------------------------------


class TemplateError(ContractsError):
    """Root of the errors of stamp templates (:mod:`contracts.templates`)."""


class InvalidTemplateData(TemplateError):
    """A name, title, page, box or level offered for a stamp template is unusable.

    :ivar field: which one (``name``, ``title``, ``page``, ``box`` or ``level``).
    """

    def __init__(self, field: str, message: str, message_en: str) -> None:
        super().__init__(message, message_en, field=field)
        self.field = field


class TemplateNotFound(TemplateError):
    """No stamp template has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"印影テンプレート {name} はありません。",
            f"There is no stamp template {name}.",
            name=name,
        )
        self.name = name


class TemplateExists(TemplateError):
    """A stamp template with this name already exists (active or not)."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"印影テンプレート {name} は既にあります。",
            f"A stamp template named {name} already exists.",
            name=name,
        )
        self.name = name


# -- signing batches --------------------------------------------------------------------------


class BatchError(ContractsError):
    """Root of the errors of signing batches (:mod:`contracts.batches`)."""


class BatchNotFound(BatchError):
    """No signing batch has this public ID."""

    def __init__(self, public_id: str) -> None:
        super().__init__(
            f"一括署名 {public_id} は見つかりません。",
            f"There is no signing batch {public_id}.",
            public_id=public_id,
        )
        self.public_id = public_id


class InvalidBatchState(BatchError):
    """The batch's status does not allow the requested action (e.g. adding a file to a batch
    that has started).

    :ivar status: the batch's status value.
    :ivar action: what was asked (``add``, ``start``, ``cancel``, ``retry``).
    """

    def __init__(self, public_id: str, status: str, action: str) -> None:
        super().__init__(
            f"一括署名 {public_id} は現在「{status}」のため、この操作({action})はできません。",
            f"Signing batch {public_id} is {status}; the action '{action}' is not possible now.",
            public_id=public_id,
            status=status,
            action=action,
        )
        self.status = status
        self.action = action


class InvalidBatchData(BatchError):
    """A file name, file, template or user offered for a batch is unusable.

    :ivar field: which one (``file_name``, ``data``, ``template`` or ``user_id``).
    """

    def __init__(self, field: str, message: str, message_en: str) -> None:
        super().__init__(message, message_en, field=field)
        self.field = field


# -- mail -------------------------------------------------------------------------------------


class MailError(ContractsError):
    """A message could not be handed to the mail server, or the mail settings are unusable
    (``KOIN_SMTP_URL``, ``KOIN_MAIL_FROM``). Fields: ``server`` (URL without password) and
    ``reason`` (the server's answer) where known; never credentials."""


# -- webhooks ---------------------------------------------------------------------------------


class WebhookError(ContractsError):
    """Root of the errors of outgoing webhooks (:mod:`contracts.webhooks`)."""


class InvalidWebhookData(WebhookError):
    """A URL, event type or description offered for a webhook endpoint is unusable.

    :ivar field: which one (``url``, ``events``, ``description`` or ``created_by``).
    """

    def __init__(self, field: str, message: str, message_en: str) -> None:
        super().__init__(message, message_en, field=field)
        self.field = field


class WebhookNotFound(WebhookError):
    """No webhook endpoint or delivery has this ID.

    :ivar kind: ``endpoint`` or ``delivery``.
    """

    def __init__(self, kind: str, ident: str) -> None:
        what, what_en = ("Webhook の送信先", "webhook endpoint") if kind == "endpoint" else (
            "Webhook の配信", "webhook delivery"
        )
        super().__init__(
            f"{what} {ident} は見つかりません。", f"There is no {what_en} {ident}.",
            kind=kind, id=ident,
        )
        self.kind = kind


class InvalidWebhookState(WebhookError):
    """Only a failed delivery can be sent again by hand.

    :ivar state: the delivery's state.
    """

    def __init__(self, delivery_id: str, state: str) -> None:
        super().__init__(
            f"配信 {delivery_id} は失敗していないため、再配信できません(状態: {state})。",
            f"The delivery {delivery_id} has not failed, so it cannot be redelivered "
            f"(state: {state}).",
            delivery_id=delivery_id, state=state,
        )
        self.state = state


class WebhookSignatureInvalid(WebhookError):
    """A received webhook does not carry a valid, fresh signature (see
    :func:`contracts.webhooks.verify_webhook_signature`).

    :ivar reason: ``timestamp`` (missing or malformed), ``format`` (no ``sha256=<hex>``),
        ``stale`` (outside the tolerance) or ``mismatch``.
    """

    _TEXT = {
        "timestamp": ("X-Koin-Timestamp がないか、形式が正しくありません。",
                      "X-Koin-Timestamp is missing or malformed."),
        "format": ("X-Koin-Signature がないか、形式が正しくありません。",
                   "X-Koin-Signature is missing or malformed."),
        "stale": ("署名の時刻が古すぎるか、先の時刻です(再送攻撃の可能性)。",
                  "The signature's timestamp is too old or in the future (possible replay)."),
        "mismatch": ("署名が一致しません。", "The signature does not match."),
    }

    def __init__(self, reason: str) -> None:
        message, message_en = self._TEXT[reason]
        super().__init__(message, message_en, reason=reason)
        self.reason = reason
# -- long-term validity ------------------------------------------------------------------------


class LtaFileError(ContractsError):
    """A stored signed file cannot be kept at long-term validity right now: it is missing or
    was changed outside koin, or the TSA would not make the renewal worth anything (its
    certificate expires within the renewal margin, or it uses an algorithm configured as
    weak). ``reason`` says which; the renewal is tried again later."""

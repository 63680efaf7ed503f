"""PAdES signing core: sign PDFs with a role's key, a visible seal stamp and a timestamp."""


from . import _speedups
from ._agreement import (
    AgreementCertificate,
    AgreementParty,
    append_agreement_certificate,
    check_unsigned_pdf,
)
from ._assets import draw_demo_seal, extract_cjk_font, find_system_font
from ._docid import is_document_id, new_document_id
from ._era import JST, format_japanese_datetime, japanese_era_year
from ._installation import InitReport, Installation
from ._isolation import verify_pdf_isolated
from ._lta import (
    LtaResult,
    LtaState,
    TimestampFacts,
    WeakAlgorithms,
    extend_lta,
    inspect_lta,
    timestamp_facts,
)
from ._sign import (
    Placement,
    SignatureLevel,
    SigningContext,
    SignOptions,
    SignResult,
    TrustMaterial,
    sign_pdf,
)
from ._stamp import DEFAULT_STAMP_SIZE, MIN_STAMP_SIZE, MM, StampAppearance
from ._verify import (
    CertificateInfo,
    Change,
    ChangeKind,
    Indication,
    Report,
    SignatureReport,
    SubIndication,
    VerifyPolicy,
    verify_pdf,
)
from .errors import (
    AlreadySignedPdfError,
    EncryptedPdfError,
    InvalidPdfError,
    LtaError,
    PlacementError,
    SigningError,
    StampAssetError,
    UnsignablePdfError,
    VerifyInputError,
)

__all__ = [
    "AgreementCertificate",
    "AgreementParty",
    "AlreadySignedPdfError",
    "append_agreement_certificate",
    "check_unsigned_pdf",
    "CertificateInfo",
    "Change",
    "ChangeKind",
    "Indication",
    "Report",
    "SignatureReport",
    "SubIndication",
    "VerifyInputError",
    "VerifyPolicy",
    "verify_pdf",
    "verify_pdf_isolated",
    "DEFAULT_STAMP_SIZE",
    "EncryptedPdfError",
    "InitReport",
    "Installation",
    "InvalidPdfError",
    "JST",
    "MIN_STAMP_SIZE",
    "MM",
    "Placement",
    "PlacementError",
    "SignOptions",
    "SignResult",
    "SignatureLevel",
    "SigningContext",
    "SigningError",
    "StampAppearance",
    "StampAssetError",
    "TrustMaterial",
    "UnsignablePdfError",
    "draw_demo_seal",
    "extract_cjk_font",
    "find_system_font",
    "format_japanese_datetime",
    "is_document_id",
    "japanese_era_year",
    "new_document_id",
    "sign_pdf",
    # long-term validity (B-LTA renewal)
    "LtaError",
    "LtaResult",
    "LtaState",
    "TimestampFacts",
    "WeakAlgorithms",
    "extend_lta",
    "inspect_lta",
    "timestamp_facts",
]

_speedups.install()  # faster hex strings and name comparisons under pyHanko, same decisions

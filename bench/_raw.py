"""The baseline: stock pyHanko 0.38, used the way its documentation shows.

``SimpleSigner.load_pkcs12`` (it re-parses the key for every signature), ``PdfSigner`` with
its dry-run size estimate, pyHanko's in-process ``DummyTimeStamper`` with the installation's
TSA key, and the stamp built from the same pieces as koin's (``GlyphAccumulatorFactory`` over
the font file, ``PdfImage`` of the seal, the same layout). Validation: ``validate_pdf_signature``
with the same trust roots and CRLs as koin, no fetching, revocation hard-fail.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO

from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    pkcs12,
)
from pyhanko.pdf_utils import layout
from pyhanko.pdf_utils.font.opentype import GlyphAccumulatorFactory
from pyhanko.pdf_utils.images import PdfImage
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.pdf_utils.text import TextBoxStyle
from pyhanko.sign import signers
from pyhanko.sign.fields import SigFieldSpec, SigSeedSubFilter
from pyhanko.sign.timestamps.dummy_client import DummyTimeStamper
from pyhanko.sign.validation import validate_pdf_signature
from pyhanko.stamp import TextStampStyle
from pyhanko_certvalidator import ValidationContext

__all__ = ["RawPyHanko"]


class RawPyHanko:
    """Stock pyHanko over the files of a koin installation."""

    def __init__(self, home: Path, passphrase: bytes) -> None:
        keys_dir = home / "keys"
        self.signer = signers.SimpleSigner.load_pkcs12(
            str(keys_dir / "position.p12"), passphrase=passphrase
        )
        key, cert, extra = pkcs12.load_key_and_certificates(
            (keys_dir / "tsa.p12").read_bytes(), passphrase
        )
        assert key is not None and cert is not None
        self.timestamper = DummyTimeStamper(
            tsa_cert=asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER)),
            tsa_key=asn1_keys.PrivateKeyInfo.load(
                key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
            ),
            certs_to_embed=[
                asn1_x509.Certificate.load(c.public_bytes(Encoding.DER)) for c in extra
            ],
        )
        self.font_file = home / "assets" / "NotoSansCJKjp-Regular.otf"
        self.seal_file = home / "assets" / "seal.png"

    def style(self, box: tuple[float, float, float, float]) -> TextStampStyle:
        """The koin stamp (seal left, four text lines right), from stock pyHanko parts."""
        height = box[3] - box[1]
        text_left = 4 + (height - 8) + 6
        return TextStampStyle(
            stamp_text="%(stamp_text)s",
            text_box_style=TextBoxStyle(
                font=GlyphAccumulatorFactory(str(self.font_file), font_size=8),
                font_size=8, leading=12, text_color=(0.1, 0.1, 0.1),
            ),
            inner_content_layout=layout.SimpleBoxLayoutRule(
                x_align=layout.AxisAlignment.ALIGN_MIN,
                y_align=layout.AxisAlignment.ALIGN_MID,
                margins=layout.Margins(left=int(text_left), right=4, top=4, bottom=4),
                inner_content_scaling=layout.InnerScaling.SHRINK_TO_FIT,
            ),
            background=PdfImage(str(self.seal_file)),
            background_layout=layout.SimpleBoxLayoutRule(
                x_align=layout.AxisAlignment.ALIGN_MIN,
                y_align=layout.AxisAlignment.ALIGN_MID,
                margins=layout.Margins.uniform(4),
                inner_content_scaling=layout.InnerScaling.SHRINK_TO_FIT,
            ),
            background_opacity=1.0,
            border_width=1,
            border_color=(0.55, 0.55, 0.55),
        )

    def sign(
        self,
        source: BinaryIO,
        *,
        stamp_text: str | None,
        box: tuple[float, float, float, float] = (333.28, 34, 561.28, 104),
        timestamp: bool = True,
        output: BinaryIO | None = None,
    ) -> Any:
        """Sign B-T (B-B without ``timestamp``); with ``stamp_text`` a visible stamp."""
        meta = signers.PdfSignatureMetadata(
            field_name="Signature1", md_algorithm="sha256", subfilter=SigSeedSubFilter.PADES,
            reason="公印に代わる電子署名", location="Ibaraki Prefecture",
        )
        pdf_signer = signers.PdfSigner(
            meta,
            signer=self.signer,
            timestamper=self.timestamper if timestamp else None,
            stamp_style=self.style(box) if stamp_text else None,
            new_field_spec=SigFieldSpec("Signature1", on_page=0, box=box if stamp_text else None),
        )
        writer = IncrementalPdfFileWriter(source)
        return pdf_signer.sign_pdf(
            writer,
            appearance_text_params={"stamp_text": stamp_text} if stamp_text else None,
            output=output,
        )

    @staticmethod
    def validate(
        data: bytes,
        roots: list[asn1_x509.Certificate],
        others: list[asn1_x509.Certificate],
        crls: list[Any],
    ) -> bool:
        reader = PdfFileReader(io.BytesIO(data))
        context = ValidationContext(
            trust_roots=roots, other_certs=others, crls=crls, allow_fetching=False,
            revocation_mode="hard-fail",
        )
        status = validate_pdf_signature(reader.embedded_signatures[0], context)
        return bool(status.bottom_line)

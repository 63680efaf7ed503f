"""``verify_pdf`` never reaches out to URLs that an uploaded PDF or its certificates name.

A hostile upload can carry a certificate chain whose CRL distribution points, OCSP responder and
CA-issuers URLs point anywhere — at a service inside our network, say. A verifier that fetches
them is a server-side request forgery. Here they all point at a listener on loopback that counts
accepted connections; a fetching validator (pyHanko with ``allow_fetching=True``) is run as the
control, to prove the bait works.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import socket
import threading
from collections.abc import Iterator
from types import TracebackType

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign import signers
from pyhanko.sign.fields import SigSeedSubFilter
from pyhanko.sign.validation import validate_pdf_signature
from pyhanko_certvalidator import ValidationContext
from pyhanko_certvalidator.registry import SimpleCertificateStore

import keys
from signer import Indication, Installation, SubIndication, VerifyPolicy, verify_pdf
from tests import attacks


class ConnectionCounter:
    """A TCP listener on 127.0.0.1 that accepts, counts and closes every connection."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.05)
        self.port: int = self._socket.getsockname()[1]
        self._count = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="connection-counter")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            with connection:
                with self._lock:
                    self._count += 1

    def __enter__(self) -> ConnectionCounter:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[ConnectionCounter]:
    with ConnectionCounter() as counter:
        yield counter


@dataclasses.dataclass(frozen=True)
class BaitPki:
    root: x509.Certificate
    issuing: x509.Certificate
    leaf: x509.Certificate
    leaf_key: rsa.RSAPrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: str,
    issuer_key: rsa.RSAPrivateKey,
    *,
    ca: bool,
    bait: str | None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca, content_commitment=not ca, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if bait is not None:
        uri = x509.UniformResourceIdentifier
        builder = builder.add_extension(
            x509.CRLDistributionPoints(
                [x509.DistributionPoint([uri(f"{bait}/crl/{subject}")], None, None, None)]
            ),
            critical=False,
        ).add_extension(
            x509.AuthorityInformationAccess(
                [
                    x509.AccessDescription(AuthorityInformationAccessOID.OCSP, uri(f"{bait}/ocsp")),
                    x509.AccessDescription(
                        AuthorityInformationAccessOID.CA_ISSUERS, uri(f"{bait}/ca/{issuer}.cer")
                    ),
                ]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def bait_pki(listener: ConnectionCounter) -> BaitPki:
    """Root → issuing CA → signer; the issuing CA and signer certificates carry CRL DP, OCSP
    and CA-issuers URLs, all pointing at ``listener``."""
    root_key, issuing_key, leaf_key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)
    )
    root = _certificate("Bait-Root", root_key, "Bait-Root", root_key, ca=True, bait=None)
    bait = listener.url
    issuing = _certificate("Bait-CA", issuing_key, "Bait-Root", root_key, ca=True, bait=bait)
    leaf = _certificate("Bait-Signer", leaf_key, "Bait-CA", issuing_key, ca=False, bait=bait)
    return BaitPki(root, issuing, leaf, leaf_key)


def _signed_bait(
    installation: Installation, permit: bytes, pki: BaitPki, url: str, *, embed_issuing: bool
) -> bytes:
    """The permit with a link to ``url``, signed at B-T by the bait signer."""
    linked = attacks.add_uri_link(permit, f"{url}/link")
    registry = SimpleCertificateStore.from_certs(
        [keys.to_asn1(pki.issuing)] if embed_issuing else []
    )
    signer = keys.LocalKeySigner(keys.to_asn1(pki.leaf), pki.leaf_key, registry)
    meta = signers.PdfSignatureMetadata(
        field_name="Bait", md_algorithm="sha256", subfilter=SigSeedSubFilter.PADES
    )
    writer = IncrementalPdfFileWriter(io.BytesIO(linked))
    pdf_signer = signers.PdfSigner(meta, signer=signer, timestamper=installation.timestamper())
    return bytes(pdf_signer.sign_pdf(writer).getvalue())


def _fetching_validator_connects(data: bytes, pki: BaitPki, listener: ConnectionCounter) -> int:
    """How many connections pyHanko makes when fetching is allowed (the control)."""
    before = listener.count
    context = ValidationContext(
        trust_roots=[keys.to_asn1(pki.root)], allow_fetching=True, revocation_mode="hard-fail"
    )
    signature = PdfFileReader(io.BytesIO(data)).embedded_signatures[0]
    status = validate_pdf_signature(signature, context)
    assert not status.bottom_line
    return listener.count - before


@pytest.mark.parametrize(
    ("embed_issuing", "expected"),
    [
        # the chain can only be completed from the CA-issuers URL
        (False, SubIndication.NO_CERTIFICATE_CHAIN_FOUND),
        # the chain is complete; revocation status only at the CRL DP / OCSP URLs
        (True, SubIndication.CERTIFICATE_CHAIN_GENERAL_FAILURE),
    ],
    ids=["issuer-only-via-aia", "revocation-only-via-urls"],
)
def test_verify_fetches_nothing_named_in_the_upload(
    installation: Installation,
    permit_pdf: bytes,
    listener: ConnectionCounter,
    bait_pki: BaitPki,
    embed_issuing: bool,
    expected: SubIndication,
) -> None:
    signed = _signed_bait(
        installation, permit_pdf, bait_pki, listener.url, embed_issuing=embed_issuing
    )
    base = installation.verify_policy()
    policy = VerifyPolicy(
        [*base.trust_roots, keys.to_asn1(bait_pki.root)], base.other_certs, base.crls
    )

    before = listener.count
    report = verify_pdf(signed, policy)
    assert listener.count == before, "verify_pdf connected to a URL from the upload"

    [signature] = report.signatures
    assert report.indication is Indication.INDETERMINATE
    assert (signature.indication, signature.subindication) == (
        Indication.INDETERMINATE, expected,
    ), signature.details
    assert signature.reason_ja and signature.reason_en
    assert signature.signer is not None and signature.signer.common_name == "Bait-Signer"

    # The control: a validator that may fetch does take the bait.
    assert _fetching_validator_connects(signed, bait_pki, listener) > 0

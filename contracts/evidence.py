# The shell commands of VERIFY.md below stay one per line, exactly as a reader copies them.
# ruff: noqa: E501
"""The evidence package (証拠パッケージ) of a completed contract: everything needed to check it
offline, years later, with nothing but a shell, OpenSSL and coreutils.

``koin evidence export`` and the officer's contract page build a ZIP with the signed PDF as
stored now (long-term validation data included), the original, the audit chain as JSON Lines
(each line exactly the bytes its SHA-256 covers, see :mod:`contracts.audit`), every RFC 3161
token over the chain head, the witness signature's CMS, the certificates and CRLs, and a
``VERIFY.md`` (Japanese, then English) whose ``sh`` blocks are the checks themselves.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import re
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from asn1crypto import cms, pem
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils.reader import PdfFileReader
from sqlalchemy.orm import Session

from signer import TrustMaterial, timestamp_facts

from .audit import canonical_event_json, verify_chain
from .errors import CompletionError, InvalidContractState
from .lta import chain_head_tokens
from .workflow import contract_file, list_events
from .workflow_models import AuditEvent, Contract, ContractStatus

__all__ = ["EvidencePackage", "build_evidence_package"]

GENESIS = "0" * 64


@dataclass(frozen=True)
class EvidencePackage:
    """The ZIP (``data``) and its file name."""

    file_name: str
    data: bytes
    #: The names inside the ZIP, in order.
    members: tuple[str, ...]


def _pem(certificate: asn1_x509.Certificate) -> bytes:
    return pem.armor("CERTIFICATE", certificate.dump())  # type: ignore[no-any-return]


def _event_line(event: AuditEvent, public_id: str) -> bytes:
    """The event exactly as its SHA-256 was computed (a row changed behind our back so that
    it cannot be hashed any more is shown as it is; the documented check then fails)."""
    try:
        return canonical_event_json(event, public_id)
    except (TypeError, ValueError):
        return json.dumps(
            {"contract": public_id, "seq": event.seq, "kind": event.kind,
             "unhashable_details": repr(event.details)},
            ensure_ascii=False, sort_keys=True, separators=(",", ":"),
        ).encode("utf-8")


def _serial_text(certificate: asn1_x509.Certificate) -> str:
    """The serial as ``openssl crl -text`` prints it (upper-case hex, even length)."""
    text = format(certificate.serial_number, "X")
    return text if len(text) % 2 == 0 else f"0{text}"


def _epoch(moment: dt.datetime) -> int:
    # ``-attime`` takes whole seconds; a token is valid from its genTime on, so round up.
    seconds = moment.timestamp()
    return int(seconds) if seconds == int(seconds) else int(seconds) + 1


def _slug(taken: set[str], stem: str) -> str:
    name = stem
    number = 2
    while name in taken:
        name = f"{stem}-{number}"
        number += 1
    taken.add(name)
    return name


def _unique(certificates: Iterable[asn1_x509.Certificate]) -> list[asn1_x509.Certificate]:
    seen: dict[bytes, asn1_x509.Certificate] = {}
    for certificate in certificates:
        seen.setdefault(hashlib.sha256(certificate.dump()).digest(), certificate)
    return list(seen.values())


@dataclass(frozen=True)
class _Witness:
    byte_range: tuple[int, int, int, int]
    cms_der: bytes
    certificate: asn1_x509.Certificate
    tsa_certificates: tuple[asn1_x509.Certificate, ...]


def _witness_signature(final: bytes) -> _Witness:
    """The witness signature of the final PDF (the first regular signature) and the TSA
    certificates of every timestamp in the file.

    :raises CompletionError: the final PDF carries no readable signature.
    """
    try:
        reader = PdfFileReader(io.BytesIO(final), strict=False)
        signature = reader.embedded_regular_signatures[0]
        start1, length1, start2, length2 = (int(v) for v in signature.byte_range)
        content_info = cms.ContentInfo.load(signature.pkcs7_content)
        tsa: list[asn1_x509.Certificate] = []
        unsigned = signature.signer_info["unsigned_attrs"]
        if unsigned.native is not None:
            for attribute in unsigned:
                if attribute["type"].native == "signature_time_stamp_token":
                    for token in attribute["values"]:
                        tsa.append(_token_certificate(token))
        for stamp in reader.embedded_timestamp_signatures:
            tsa.append(stamp.signer_cert)
        return _Witness(
            (start1, length1, start2, length2), content_info.dump(), signature.signer_cert,
            tuple(tsa),
        )
    except Exception as exc:  # pyHanko and asn1crypto raise assorted errors
        raise CompletionError(
            "締結済み PDF の署名を読み取れません。",
            f"The signature of the final PDF cannot be read ({type(exc).__name__}: {exc}).",
        ) from exc


def _token_certificate(token: cms.ContentInfo) -> asn1_x509.Certificate:
    from pyhanko.sign.general import extract_certificate_info

    return extract_certificate_info(token["content"]).signer_cert


def build_evidence_package(
    session: Session, home: Path, contract: Contract, trust: TrustMaterial
) -> EvidencePackage:
    """The evidence package of a completed contract (see the module docstring).

    :param trust: our roots, CA certificates and current CRLs (``Installation.trust_material``).
    :raises InvalidContractState: the contract is not completed.
    :raises CompletionError: a stored file is missing or unreadable.
    """
    if (
        contract.contract_status is not ContractStatus.COMPLETED
        or not contract.final_path
        or not contract.chain_head_sha256
    ):
        status = contract.contract_status
        raise InvalidContractState(
            contract.public_id, status.value, status.label_ja, status.label_en, "evidence"
        )
    try:
        original = contract_file(home, contract.original_path).read_bytes()
        final = contract_file(home, contract.final_path).read_bytes()
    except (OSError, ValueError) as exc:
        raise CompletionError(
            "契約書のファイルを読めません。管理者に連絡してください。",
            f"The files of contract {contract.public_id} cannot be read ({exc}).",
        ) from exc
    events = list_events(session, contract)
    check = verify_chain(session, contract)
    tokens = chain_head_tokens(session, contract)
    witness = _witness_signature(final)

    files: list[tuple[str, bytes]] = []
    lines = [_event_line(event, contract.public_id) for event in events]
    files.append(("audit.jsonl", b"".join(line + b"\n" for line in lines)))
    files.append((
        "audit-sha256.txt",
        "".join(f"{event.seq} {event.sha256}\n" for event in events).encode("ascii"),
    ))
    files.append(("original.pdf", original))
    files.append(("final.pdf", final))
    files.append(("witness-signature.p7s", witness.cms_der))
    token_facts = [timestamp_facts(token) for token in tokens]
    for number, token in enumerate(tokens, start=1):
        files.append((f"chain-head-token-{number}.tst", token))

    taken: set[str] = set()
    roots = _unique(trust.roots)
    intermediates = _unique(trust.intermediates)
    files.append(("certs/root-ca.pem", b"".join(_pem(c) for c in roots)))
    files.append(("certs/issuing-ca.pem", b"".join(_pem(c) for c in intermediates)))
    files.append(("certs/witness.pem", _pem(witness.certificate)))
    tsa_certificates = _unique([
        *(_token_certificate(cms.ContentInfo.load(token)) for token in tokens),
        *witness.tsa_certificates,
    ])
    for certificate in tsa_certificates:
        name = _slug(taken, f"tsa-{_serial_text(certificate)[:12].lower()}")
        files.append((f"certs/{name}.pem", _pem(certificate)))
    crl_files: list[tuple[str, asn1_x509.Certificate]] = []  # (file, its issuer)
    crl_taken: set[str] = set()
    for crl in trust.crls:
        issuer = crl["tbs_cert_list"]["issuer"]
        if any(root.subject == issuer for root in roots):
            stem, ca = "root-ca", next(root for root in roots if root.subject == issuer)
        else:
            found = next((c for c in intermediates if c.subject == issuer), None)
            if found is None:
                continue
            stem, ca = "issuing-ca", found
        name = f"crls/{_slug(crl_taken, stem)}.crl"
        files.append((name, crl.dump()))
        crl_files.append((name, ca))

    verify_md = _verify_md(
        contract=contract,
        events=len(events),
        chain_ok=check.ok,
        original=original,
        witness=witness,
        token_times=[facts.time for facts in token_facts],
        crl_files=crl_files,
        roots=roots,
        intermediates=intermediates,
        tsa_certificates=tsa_certificates,
    )
    files.insert(0, ("VERIFY.md", verify_md.encode("utf-8")))

    folder = f"koin-evidence-{contract.public_id}"
    buffer = io.BytesIO()
    stamp = dt.datetime.now(dt.UTC).timetuple()[:6]
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files:
            info = zipfile.ZipInfo(f"{folder}/{name}", date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return EvidencePackage(
        f"{folder}.zip", buffer.getvalue(), tuple(f"{folder}/{name}" for name, _ in files)
    )


# -- VERIFY.md ----------------------------------------------------------------------------------


def _block(commands: str) -> str:
    """A shell block that runs in a subshell (``exit`` ends only the block) and stops at the
    first failing command."""
    return f"```sh\n(\nset -e\n{commands.strip()}\n)\n```\n"


def _verify_md(
    *,
    contract: Contract,
    events: int,
    chain_ok: bool,
    original: bytes,
    witness: _Witness,
    token_times: Sequence[dt.datetime],
    crl_files: Sequence[tuple[str, asn1_x509.Certificate]],
    roots: Sequence[asn1_x509.Certificate],
    intermediates: Sequence[asn1_x509.Certificate],
    tsa_certificates: Sequence[asn1_x509.Certificate],
) -> str:
    start1, length1, start2, length2 = witness.byte_range
    signed_size = start2 + length2
    hex_length = 2 * len(witness.cms_der)
    trust = "-CAfile certs/root-ca.pem -untrusted certs/issuing-ca.pem"
    head = contract.chain_head_sha256 or ""
    title = re.sub(r"[\r\n`]", " ", contract.title)
    parts: list[str] = []
    add = parts.append

    add(f"# 検証手順 / How to verify — {title}\n\n")
    add(
        f"契約 `{contract.public_id}`(文書番号 `{contract.document_id}`)の証拠パッケージです。"
        "茨城県 電子契約サービス(koin)が作成しました。以下の手順は、インターネットに接続せず、"
        "bash と OpenSSL、coreutils(`sha256sum`、`head`、`tail`、`cmp`、`od`)だけで実行できます。"
        "ZIP を展開し、このファイルのあるフォルダで各ブロックを順に実行してください。"
        "各ブロックは成功すると `OK` を表示し、失敗すると `NG` を表示して終了コード 1 で止まります。\n\n"
    )
    add(
        f"This is the evidence package of contract `{contract.public_id}` (document ID "
        f"`{contract.document_id}`), made by koin, the e-contract service of Ibaraki "
        "Prefecture. The steps below run offline with nothing but bash, OpenSSL and coreutils "
        "(`sha256sum`, `head`, `tail`, `cmp`, `od`). Unpack the ZIP and run each block in the "
        "folder of this file, in order. A block prints `OK` when its check passes, or `NG` and "
        "stops with exit code 1.\n\n"
    )
    add("| ファイル / file | 内容 / contents |\n|---|---|\n")
    rows = [
        ("original.pdf", "当事者が確認した原本 / the original the parties reviewed"),
        ("final.pdf", "立会人署名付きの締結済み PDF(長期検証用の情報を追記済み) / the signed "
         "contract as stored, with long-term validation data appended"),
        ("audit.jsonl", "監査証跡。1 行が 1 件で、その行のバイト列がそのまま SHA-256 の対象 / the "
         "audit chain, one event per line, each line exactly the bytes its SHA-256 covers"),
        ("audit-sha256.txt", "記録された各件の SHA-256 / each event's SHA-256 as recorded"),
        ("chain-head-token-N.tst", "チェーン先頭への RFC 3161 タイムスタンプ(2 番目以降は直前の"
         "トークンへのタイムスタンプ) / RFC 3161 tokens: the first over the chain head, each "
         "later one over the token before it"),
        ("witness-signature.p7s", "final.pdf に埋め込まれた立会人署名(CMS) / the witness "
         "signature (CMS) embedded in final.pdf"),
        ("certs/*.pem", "ルート CA、発行 CA、立会人、TSA の証明書 / root CA, issuing CA, "
         "witness and TSA certificates"),
        ("crls/*.crl", "CA の失効リスト(DER) / the CAs' revocation lists (DER)"),
    ]
    for name, text in rows:
        add(f"| `{name}` | {text} |\n")
    add("\n")
    if not chain_ok:
        add(
            "**注意 / Note:** 作成時点の検査で監査証跡に不整合が見つかっています。手順 1 は失敗します。"
            " / When this package was made, the audit chain did not check out; step 1 fails.\n\n"
        )

    # 1. the chain
    add("## 1. 監査証跡のハッシュ連鎖 / The hash chain of the audit log\n\n")
    add(
        f"`audit.jsonl` の各行({events} 件)の SHA-256 を計算し、次の行の `prev_sha256` が"
        "それと一致すること(最初の行は 0 が 64 個)、`seq` が 1 から順に並ぶこと、計算した値が"
        "記録された `audit-sha256.txt` と一致することを確かめます。1 文字でも書き換えると失敗します。\n\n"
        f"Compute the SHA-256 of every line of `audit.jsonl` ({events} events): each line's "
        "`prev_sha256` must be the previous line's SHA-256 (64 zeros for the first), `seq` must "
        "count up from 1, and the results must equal the recorded `audit-sha256.txt`. Changing "
        "a single character makes this fail.\n\n"
    )
    add(_block(f"""
prev={GENESIS}
seq=0
: > audit-sha256.computed
while IFS= read -r line; do
  seq=$((seq + 1))
  case "$line" in
    *"\\"prev_sha256\\":\\"$prev\\",\\"seq\\":$seq,"*) ;;
    *) echo "NG: 記録 $seq が直前の記録とつながっていません / event $seq does not link to event $((seq - 1))"; exit 1 ;;
  esac
  prev=$(printf '%s' "$line" | sha256sum | cut -c1-64)
  echo "$seq $prev" >> audit-sha256.computed
done < audit.jsonl
cmp -s audit-sha256.computed audit-sha256.txt || {{ echo "NG: 計算した SHA-256 が記録と一致しません / the computed SHA-256s differ from the record"; exit 1; }}
echo "OK: $seq 件のハッシュ連鎖を確認しました / $seq events chain correctly"
"""))

    # 2. the head and its token
    first_attime = f" -attime {_epoch(token_times[1])}" if len(token_times) > 1 else ""
    add("\n## 2. チェーン先頭とタイムスタンプ / The chain head and its timestamp\n\n")
    add(
        "締結(`completed`)の行の SHA-256 がチェーン先頭です。その値に対する RFC 3161 タイムスタンプ"
        "`chain-head-token-1.tst` を OpenSSL で検証します。"
        + ("後のトークンがこのトークンの存在を証明するため、その時刻(`-attime`)で検証します。"
           if first_attime else "")
        + "締結以後の記録(ダウンロード、長期署名の更新など)は連鎖でつながっていますが、"
        "このタイムスタンプの対象ではありません。\n\n"
        "The SHA-256 of the `completed` line is the chain head. Verify its RFC 3161 token "
        "`chain-head-token-1.tst` with OpenSSL"
        + (", as of the time (`-attime`) of the next token, which proves this one existed then"
           if first_attime else "")
        + ". Events after completion (downloads, long-term renewals) are chained but not "
        "covered by this timestamp.\n\n"
    )
    add(_block(f"""
line=$(grep -n '"kind":"completed"' audit.jsonl | cut -d: -f1)
head=$(sed -n "${{line}}p" audit.jsonl | tr -d '\\n' | sha256sum | cut -c1-64)
echo "チェーン先頭 / chain head: $head"
[ "$head" = "{head}" ] || {{ echo "NG: チェーン先頭が記録と異なります / the chain head differs from the record"; exit 1; }}
openssl ts -verify -digest "$head" -in chain-head-token-1.tst -token_in {trust}{first_attime}
echo "OK: チェーン先頭のタイムスタンプを確認しました / the chain head's timestamp verifies"
"""))

    # 3. the token chain
    add("\n## 3. タイムスタンプの連鎖 / The chain of timestamps\n\n")
    if len(token_times) < 2:
        add(
            "タイムスタンプの更新はまだありません(TSA 証明書の期限が近づくと、koin が直前の"
            "トークンの SHA-256 に新しいタイムスタンプを付けます)。\n\n"
            "No renewal yet (before the TSA certificate expires, koin timestamps the SHA-256 of "
            "the previous token).\n\n"
        )
    else:
        add(
            "各トークンは直前のトークン(DER)の SHA-256 へのタイムスタンプです(RFC 4998 の"
            "アーカイブタイムスタンプと同じ考え方)。各トークンを次のトークンの時刻で、最後のトークンを"
            "現在の時刻で検証します。\n\n"
            "Each token timestamps the SHA-256 of the token before it (DER), like RFC 4998 "
            "archive timestamps. Each is verified as of the next token's time, the last one as "
            "of now.\n\n"
        )
        commands = []
        for number in range(2, len(token_times) + 1):
            attime = (
                f" -attime {_epoch(token_times[number])}" if number < len(token_times) else ""
            )
            commands.append(
                f'digest=$(sha256sum chain-head-token-{number - 1}.tst | cut -c1-64)\n'
                f'openssl ts -verify -digest "$digest" -in chain-head-token-{number}.tst '
                f"-token_in {trust}{attime}"
            )
        commands.append(
            f'echo "OK: {len(token_times)} 個のトークンの連鎖を確認しました / '
            f'{len(token_times)} tokens chain correctly"'
        )
        add(_block("\n".join(commands)))

    # 4. the documents
    original_size = len(original)
    add("\n## 4. 原本と締結済み PDF / The original and the signed PDF\n\n")
    add(
        "締結の行には原本と署名済み PDF の SHA-256 が記録されています。`original.pdf` の SHA-256 と、"
        f"`final.pdf` の先頭 {signed_size} バイト(立会人署名が対象とする版)の SHA-256 がそれと一致"
        "すること、`final.pdf` が `original.pdf` のバイト列で始まる(原本に追記しただけである)ことを"
        "確かめます。\n\n"
        "The `completed` line records the SHA-256 of the original and of the signed PDF. Check "
        f"that `original.pdf` and the first {signed_size} bytes of `final.pdf` (the revision the "
        "witness signed) have those SHA-256s, and that `final.pdf` starts with the bytes of "
        "`original.pdf` (the original was only appended to).\n\n"
    )
    add(_block(f"""
completed=$(grep '"kind":"completed"' audit.jsonl)
original=$(sha256sum original.pdf | cut -c1-64)
signed=$(head -c {signed_size} final.pdf | sha256sum | cut -c1-64)
case "$completed" in *"\\"original_sha256\\":\\"$original\\""*) ;; *) echo "NG: original.pdf が記録と異なります / original.pdf differs from the record"; exit 1 ;; esac
case "$completed" in *"\\"final_sha256\\":\\"$signed\\""*) ;; *) echo "NG: 署名済みの版が記録と異なります / the signed revision differs from the record"; exit 1 ;; esac
head -c {original_size} final.pdf | cmp -s - original.pdf || {{ echo "NG: final.pdf は original.pdf で始まっていません / final.pdf does not start with original.pdf"; exit 1; }}
echo "OK: 原本 $original、署名済みの版 $signed / original $original, signed revision $signed"
"""))

    # 5. the witness signature
    token_one = f" -attime {_epoch(token_times[0])}" if token_times else ""
    add("\n## 5. 立会人署名 / The witness signature\n\n")
    add(
        f"署名は `final.pdf` の `/ByteRange [{start1} {length1} {start2} {length2}]` の範囲を"
        f"対象とします。{length1} バイト目から {start2} バイト目の間(`/Contents`)は署名値の 16 進文字列で、"
        "`witness-signature.p7s` と同じであることを確かめてから、対象の範囲を取り出して "
        "`openssl cms -verify` で検証します。証明書は、チェーン先頭のタイムスタンプの時刻"
        "(`-attime`、その時点で署名済みの版が存在したことが手順 2・4 で示されています)で検証します。\n\n"
        f"The signature covers `/ByteRange [{start1} {length1} {start2} {length2}]` of `final.pdf`. "
        f"The gap from byte {length1} to {start2} (`/Contents`) holds the CMS in hex: check that "
        "it is `witness-signature.p7s`, cut out the signed ranges and verify with "
        "`openssl cms -verify`. Certificates are checked as of the chain-head timestamp "
        "(`-attime`; steps 2 and 4 show the signed revision existed then).\n\n"
    )
    add(_block(f"""
hex=$(od -An -v -tx1 witness-signature.p7s | tr -d ' \\n')
embedded=$(tail -c +{length1 + 2} final.pdf | head -c {hex_length} | tr 'A-F' 'a-f')
[ "$embedded" = "$hex" ] || {{ echo "NG: witness-signature.p7s が final.pdf の署名と異なります / witness-signature.p7s is not the signature in final.pdf"; exit 1; }}
head -c {length1} final.pdf > signed-range-1.bin
tail -c +{start2 + 1} final.pdf | head -c {length2} > signed-range-2.bin
cat signed-range-1.bin signed-range-2.bin > signed-content.bin
openssl cms -verify -binary -inform DER -in witness-signature.p7s -content signed-content.bin -CAfile certs/root-ca.pem -certfile certs/issuing-ca.pem -purpose any{token_one} -out /dev/null
echo "OK: 立会人署名を確認しました / the witness signature verifies"
"""))

    # 6. revocation
    add("\n## 6. 失効情報 / Revocation\n\n")
    add(
        "CRL の署名を CA の証明書で検証し、立会人・TSA・発行 CA の証明書が失効リストに載っていない"
        "ことを確かめます。CRL はこのパッケージの作成時点のものです。署名時点の失効情報は "
        "`final.pdf` の DSS(長期検証用の情報)にも入っています。\n\n"
        "Verify each CRL's signature with its CA's certificate and check that the witness, TSA "
        "and issuing CA certificates are not on it. The CRLs are those current when this "
        "package was made; `final.pdf` also carries revocation data in its DSS.\n\n"
    )
    commands = []
    issued_by: dict[str, list[asn1_x509.Certificate]] = {}
    for name, ca in crl_files:
        members = [
            c for c in [witness.certificate, *tsa_certificates, *intermediates]
            if c.issuer == ca.subject and c.dump() != ca.dump()
        ]
        issued_by[name] = members
        ca_file = "certs/root-ca.pem" if any(ca.dump() == r.dump() for r in roots) else (
            "certs/issuing-ca.pem"
        )
        commands.append(f"openssl crl -inform DER -in {name} -CAfile {ca_file} -noout")
        commands.append(f"openssl crl -inform DER -in {name} -noout -text > crl.txt")
        for certificate in members:
            serial = _serial_text(certificate)
            commands.append(
                f'if grep -q "Serial Number: {serial}$" crl.txt; then echo "NG: 失効 / revoked: '
                f'{serial}"; exit 1; fi'
            )
    commands.append('echo "OK: 失効した証明書はありません / no certificate is revoked"')
    add(_block("\n".join(commands)))

    add(
        "\n---\n\n"
        "PDF リーダー(Adobe Acrobat Reader など)や `pdfsig` でも `final.pdf` の署名と長期検証情報"
        "(PAdES B-LTA)を確認できます。その際は `certs/root-ca.pem` を信頼してください。\n\n"
        "PDF readers (Adobe Acrobat Reader and others) and `pdfsig` also validate the signatures "
        "and long-term validation data (PAdES B-LTA) of `final.pdf`; trust `certs/root-ca.pem` "
        "there.\n"
    )
    return "".join(parts)

"""Write the seed corpus of fuzz_request.py: real OCSP requests.

Requests made by pyca cryptography's ``OCSPRequestBuilder`` (what a Python
client sends: SHA-1 or SHA-256 CertID, with or without a nonce, serials
with and without the high bit) and by ``ocspmint.request.build_request``
(hash parameters NULL or absent, as RFC 5019 §2.1.1 allows), plus one
request listing a certificate's SHA-1 and SHA-256 CertIDs. Keys, names and
serials are fixed, so the files are the same on every run; each is named
by the SHA-1 of its bytes, as libFuzzer names corpus files.

    python fuzz/make_corpus.py fuzz/corpus
"""

from __future__ import annotations

import datetime as dt
import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from ocspmint import der
from ocspmint.request import build_request

START = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def certificate(subject: str, serial: int, key: ec.EllipticCurvePrivateKey, issuer: str,
                issuer_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """A certificate; only its names, key and serial end up in a request."""
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(START).not_valid_after(START + dt.timedelta(days=90))
            .sign(issuer_key, hashes.SHA256()))


def requests() -> Iterator[bytes]:
    ca_key = ec.derive_private_key(0xC0FFEE, ec.SECP256R1())
    leaf_key = ec.derive_private_key(0xBEEF, ec.SECP256R1())
    ca = certificate("Fuzz Issuing CA", 1, ca_key, "Fuzz Issuing CA", ca_key)
    for serial in (0x01, 0x7F, 0x80, 0x4A3F9C2E11D07B65A8C3, (1 << 158) | 5):
        leaf = certificate("leaf.example", serial, leaf_key, "Fuzz Issuing CA", ca_key)
        for algorithm in (hashes.SHA1(), hashes.SHA256()):
            builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, ca, algorithm)
            yield builder.build().public_bytes(serialization.Encoding.DER)
            nonce = builder.add_extension(x509.OCSPNonce(hashlib.sha256(serial.to_bytes(21, "big")).digest()[:16]), False)
            yield nonce.build().public_bytes(serialization.Encoding.DER)
    # issuerNameHash / issuerKeyHash of the CA (RFC 6960 §4.1.1): its subject DER, its EC point
    name_der = ca.subject.public_bytes()
    point = ca.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    ids = {h: (hashlib.new(h, name_der).digest(), hashlib.new(h, point).digest()) for h in ("sha1", "sha256")}
    for h, (name_hash, key_hash) in ids.items():
        for null_params in (True, False):
            yield build_request(name_hash, key_hash, 0x80, h, null_params)
    # one certificate by both CertIDs: SEQUENCE { SEQUENCE { requestList { Request, Request } } }
    request_list = b"".join(_request(build_request(*ids[h], 0x80, h)) for h in ("sha1", "sha256"))
    yield der.tlv(0x30, der.tlv(0x30, der.tlv(0x30, request_list)))


def _request(single: bytes) -> bytes:
    """The one Request inside a one-Request OCSPRequest."""
    _, s, _ = der.read_tlv(single)  # OCSPRequest
    _, s, _ = der.read_tlv(single, s)  # tbsRequest
    _, s, e = der.read_tlv(single, s)  # requestList
    return single[s:e]


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for data in requests():
        (out / hashlib.sha1(data).hexdigest()).write_bytes(data)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).with_name("corpus")))

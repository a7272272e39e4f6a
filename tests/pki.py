"""Software PKI for unit tests that need no token: CA, delegated responder,
all made with pyca cryptography in a temp folder."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ocspmint.config import Issuer, Signer
from ocspmint.issuer import IssuerIdentity, issuer_identity

UTC = dt.timezone.utc
NOW = dt.datetime.now(UTC).replace(microsecond=0)


def new_key(kind: str):
    if kind == "rsa-2048":
        return rsa.generate_private_key(65537, 2048)
    return ec.generate_private_key(ec.SECP384R1() if kind == "ec-p384" else ec.SECP256R1())


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool, ocsp: bool, days: int) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:  # digitalSignature: the CA's own key may sign OCSP (BR 7.1.2.10.7)
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    if ocsp:  # the delegated responder profile of BR 7.1.2.8
        b = (b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
             .add_extension(x509.OCSPNoCheck(), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False))
    alg = hashes.SHA384() if isinstance(issuer_key, ec.EllipticCurvePrivateKey) and issuer_key.curve.name == "secp384r1" else hashes.SHA256()
    return b.sign(issuer_key, alg)


@dataclass
class SoftPKI:
    ca_key: object
    ca_cert: x509.Certificate
    responder_key: object
    responder_cert: x509.Certificate
    ca_path: Path
    responder_path: Path

    def identity(self, delegated: bool = True) -> IssuerIdentity:
        signer = Signer(uri="pkcs11:object=test", cert=str(self.responder_path) if delegated else "")
        return issuer_identity(Issuer(name="test-ca", cert=str(self.ca_path), signer=signer))

    def signing_key(self, delegated: bool = True):
        return self.responder_key if delegated else self.ca_key


def make_pki(folder: Path, ca_kind: str = "ec-p256", responder_kind: str = "ec-p256", responder_days: int = 30) -> SoftPKI:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = new_key(ca_kind)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Issuing CA")])
    ca = _cert("Test Issuing CA", ca_key, name, ca_key, ca=True, ocsp=False, days=365)
    rkey = new_key(responder_kind)
    resp = _cert("Test OCSP Responder", rkey, name, ca_key, ca=False, ocsp=True, days=responder_days)
    ca_path, resp_path = folder / "ca.pem", folder / "responder.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    resp_path.write_bytes(resp.public_bytes(serialization.Encoding.PEM))
    return SoftPKI(ca_key, ca, rkey, resp, ca_path, resp_path)

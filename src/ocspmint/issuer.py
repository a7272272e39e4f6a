"""Issuer and signer identities: the hashes CertID and ResponderID use.

``load_issuers(config)`` reads every issuer certificate and its signer
certificate and checks the signer certificate profile: a delegated
responder certificate as RFC 6960 §4.2.2.2 and BR 7.1.2.8 require it
(issued directly by the CA, EKU id-kp-OCSPSigning only, id-pkix-ocsp-nocheck
non-critical, keyUsage critical digitalSignature only); a CA certificate
whose own key signs with keyUsage digitalSignature (BR 7.1.2.10.7).
It also reads each of the issuer's Precertificate Signing Certificates
(``precert_signing_certificates``) and checks their profile
(``_check_precert_signer``: RFC 6962 §3.1, BR 7.1.2.4).
Errors raise IdentityError naming the file and the rule.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from ocspmint import der
from ocspmint.config import Config, Issuer

HASHES = ("sha1", "sha256")
# AlgorithmIdentifier DER for the CertID hash, parameters NULL as RFC 5019 shows.
CERTID_HASH_ALG = {
    "sha1": bytes.fromhex("300906052b0e03021a0500"),
    "sha256": bytes.fromhex("300d06096086480165030402010500"),
}
# Signature AlgorithmIdentifier DER (BR 7.1.3.2): ECDSA without parameters,
# RSA PKCS#1 v1.5 with NULL parameters.
SIG_ALG = {
    ("ec", "sha256"): bytes.fromhex("300a06082a8648ce3d040302"),
    ("ec", "sha384"): bytes.fromhex("300a06082a8648ce3d040303"),
    ("rsa", "sha256"): bytes.fromhex("300d06092a864886f70d01010b0500"),
}
CURVE_HASH = {"secp256r1": "sha256", "secp384r1": "sha384"}


class IdentityError(Exception):
    """An issuer or responder certificate unusable for signing OCSP."""


def load_certificate(path: str) -> x509.Certificate:
    """Read a PEM or DER certificate; raise IdentityError naming ``path``."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise IdentityError(f"{path}: cannot read certificate: {e.strerror}") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise IdentityError(f"{path}: not a certificate: {e}") from None


def key_bits(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der.spki_key_bits(spki)


@dataclass(frozen=True)
class SignerIdentity:
    """The certificate whose key signs: delegated responder or the CA itself.

    ``key_hash`` is SHA-1 of its subjectPublicKey (ResponderID byKey,
    RFC 6960 §4.2.1, RFC 9919 §3.2.2); ``key_type`` "ec"/"rsa";
    ``hash_name`` the signature hash (BR 7.1.3.2); ``sig_alg`` its
    AlgorithmIdentifier DER; ``cert_der`` goes in ``certs`` when delegated;
    ``source`` names the certificate in messages: the file it was read
    from, or the subject of one a response carries (``signed_by``).
    """

    cert: x509.Certificate
    cert_der: bytes
    delegated: bool
    key_hash: bytes
    key_type: str
    hash_name: str
    sig_alg: bytes
    not_before: dt.datetime
    not_after: dt.datetime
    source: str = ""


@dataclass(frozen=True)
class PrecertSigner:
    """A Precertificate Signing Certificate (RFC 6962 §3.1, BR 7.1.2.4)
    of an issuer, checked (``_check_precert_signer``): ``path`` the file
    it was read from, for messages."""

    cert: x509.Certificate
    path: str


@dataclass(frozen=True)
class IssuerIdentity:
    """An issuing CA: ``id`` is hex SHA-1 of its subjectPublicKey (the
    SHA-1 issuerKeyHash), used in store keys; ``name_hash``/``key_hash`` map
    "sha1"/"sha256" to the CertID hashes of RFC 6960 §4.1.1.
    ``precert_signers``: its Precertificate Signing Certificates, whose
    precertificates are this CA's serials (RFC 6962 §3.1: the CA issues the
    final certificate with the same serial; their CertID is this CA's)."""

    name: str
    cert: x509.Certificate
    id: str
    name_hash: dict[str, bytes]
    key_hash: dict[str, bytes]
    signer: SignerIdentity
    config: Issuer = field(repr=False)
    precert_signers: tuple[PrecertSigner, ...] = ()


def _signer_identity(cert: x509.Certificate, delegated: bool, path: str) -> SignerIdentity:
    pub = cert.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        key_type, hash_name = "ec", CURVE_HASH.get(pub.curve.name, "")
        if not hash_name:
            raise IdentityError(f"{path}: curve {pub.curve.name} is not allowed (BR 7.1.3.2: P-256, P-384)")
    elif isinstance(pub, rsa.RSAPublicKey):
        key_type, hash_name = "rsa", "sha256"
    else:
        raise IdentityError(f"{path}: key type {type(pub).__name__} is not supported (ECDSA or RSA)")
    return SignerIdentity(
        cert=cert,
        cert_der=cert.public_bytes(serialization.Encoding.DER),
        delegated=delegated,
        key_hash=hashlib.sha1(key_bits(cert)).digest(),
        key_type=key_type,
        hash_name=hash_name,
        sig_alg=SIG_ALG[(key_type, hash_name)],
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        source=path,
    )


# keyUsage bits by their RFC 5280 §4.2.1.3 names (encipherOnly/decipherOnly
# are only read when keyAgreement is set).
_KU_BITS = (("digitalSignature", "digital_signature"), ("nonRepudiation", "content_commitment"),
            ("keyEncipherment", "key_encipherment"), ("dataEncipherment", "data_encipherment"),
            ("keyAgreement", "key_agreement"), ("keyCertSign", "key_cert_sign"), ("cRLSign", "crl_sign"))


def _key_usages(ku: x509.KeyUsage) -> list[str]:
    names = [name for name, attr in _KU_BITS if getattr(ku, attr)]
    if ku.key_agreement:
        names += [name for name, attr in (("encipherOnly", "encipher_only"), ("decipherOnly", "decipher_only"))
                  if getattr(ku, attr)]
    return names


def _extensions(cert: x509.Certificate, path: str, what: str) -> x509.Extensions:
    try:
        return cert.extensions
    except ValueError as e:  # a duplicate or undecodable extension
        raise IdentityError(f"{path}: {what} certificate has a malformed extension: {e}") from None


_NOT_IN_RESPONDER = ((ExtensionOID.NAME_CONSTRAINTS, "nameConstraints"),
                     (ExtensionOID.SUBJECT_ALTERNATIVE_NAME, "subjectAltName"),
                     (ExtensionOID.CRL_DISTRIBUTION_POINTS, "cRLDistributionPoints"))


def _check_delegate(cert: x509.Certificate, ca: x509.Certificate, path: str) -> None:
    """A delegated responder certificate: issued directly by the CA
    (RFC 6960 §4.2.2.2) with the BR 7.1.2.8 profile: EKU id-kp-OCSPSigning
    and nothing else (7.1.2.8.5), id-pkix-ocsp-nocheck present and
    non-critical (7.1.2.8.6, 7.1.2.8.2), keyUsage present, critical
    (7.1.2.8.2), digitalSignature and no other bit (7.1.2.8.7); no
    nameConstraints, subjectAltName or cRLDistributionPoints (7.1.2.8.2:
    MUST NOT; certificatePolicies is SHOULD NOT there, so it is allowed,
    profiled by 7.1.2.8.8); basicConstraints, when
    present, cA FALSE (7.1.2.8.4); authorityKeyIdentifier as
    ``_check_authority_key_id`` (7.1.2.8.2, 7.1.2.11.1). Raises
    IdentityError naming ``path`` and the rule."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as e:
        raise IdentityError(f"{path}: responder certificate is not issued by its issuer: {e}") from None
    exts = _extensions(cert, path, "responder")
    eku = _ext(exts, ExtensionOID.EXTENDED_KEY_USAGE)
    if eku is None or ExtendedKeyUsageOID.OCSP_SIGNING not in eku.value:
        raise IdentityError(f"{path}: responder certificate lacks EKU id-kp-OCSPSigning (RFC 6960 §4.2.2.2)")
    others = [_eku_name(o) for o in eku.value if o != ExtendedKeyUsageOID.OCSP_SIGNING]
    if others:
        raise IdentityError(f"{path}: responder certificate has EKU {', '.join(others)} besides id-kp-OCSPSigning "
                            "(BR 7.1.2.8.5: id-kp-OCSPSigning only)")
    nocheck = _ext(exts, ExtensionOID.OCSP_NO_CHECK)
    if nocheck is None:
        raise IdentityError(f"{path}: responder certificate lacks id-pkix-ocsp-nocheck (BR 7.1.2.8.6)")
    if nocheck.critical:
        raise IdentityError(f"{path}: responder certificate marks id-pkix-ocsp-nocheck critical "
                            "(BR 7.1.2.8.2: non-critical)")
    ku = _ext(exts, ExtensionOID.KEY_USAGE)
    if ku is None or not ku.value.digital_signature:
        raise IdentityError(f"{path}: responder certificate lacks keyUsage digitalSignature (BR 7.1.2.8.7)")
    others = [n for n in _key_usages(ku.value) if n != "digitalSignature"]
    if others:
        raise IdentityError(f"{path}: responder certificate has keyUsage {', '.join(others)} besides digitalSignature "
                            "(BR 7.1.2.8.7: digitalSignature only)")
    if not ku.critical:
        raise IdentityError(f"{path}: responder certificate keyUsage is not critical (BR 7.1.2.8.2)")
    forbidden = [name for oid, name in _NOT_IN_RESPONDER if _ext(exts, oid) is not None]
    if forbidden:
        raise IdentityError(f"{path}: responder certificate has {', '.join(forbidden)} (BR 7.1.2.8.2: MUST NOT)")
    constraints = _ext(exts, ExtensionOID.BASIC_CONSTRAINTS)
    if constraints is not None and constraints.value.ca:
        raise IdentityError(f"{path}: responder certificate is a CA certificate (basicConstraints cA TRUE; "
                            "BR 7.1.2.8.4: cA FALSE)")
    _check_authority_key_id(exts, ca, path)


def _check_authority_key_id(exts: x509.Extensions, ca: x509.Certificate, path: str) -> None:
    """authorityKeyIdentifier of the responder certificate ``exts``: present
    and non-critical (BR 7.1.2.8.2; RFC 5280 §4.2.1.1), keyIdentifier present
    and no authorityCertIssuer or authorityCertSerialNumber (BR 7.1.2.11.1),
    keyIdentifier identical to the subjectKeyIdentifier of the issuing CA
    ``ca`` when it has one (BR 7.1.2.11.1; RFC 5280 §4.2.1.2). Raises
    IdentityError naming ``path`` and the rule."""
    aki = _ext(exts, ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    if aki is None:
        raise IdentityError(f"{path}: responder certificate lacks authorityKeyIdentifier (BR 7.1.2.8.2: MUST)")
    if aki.critical:
        raise IdentityError(f"{path}: responder certificate marks authorityKeyIdentifier critical "
                            "(BR 7.1.2.8.2, RFC 5280 §4.2.1.1: non-critical)")
    if aki.value.key_identifier is None:
        raise IdentityError(f"{path}: responder certificate authorityKeyIdentifier lacks keyIdentifier "
                            "(BR 7.1.2.11.1: MUST be present)")
    if aki.value.authority_cert_issuer is not None or aki.value.authority_cert_serial_number is not None:
        raise IdentityError(f"{path}: responder certificate authorityKeyIdentifier has authorityCertIssuer or "
                            "authorityCertSerialNumber (BR 7.1.2.11.1: MUST NOT be present)")
    ski = _ext(_extensions(ca, path, "issuer"), ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    if ski is not None and ski.value.digest != aki.value.key_identifier:
        raise IdentityError(f"{path}: responder certificate authorityKeyIdentifier keyIdentifier "
                            f"{aki.value.key_identifier.hex()} is not the issuer's subjectKeyIdentifier "
                            f"{ski.value.digest.hex()} (BR 7.1.2.11.1: MUST be identical)")


def _check_ca_signs(ca: x509.Certificate, path: str) -> None:
    """A CA certificate whose own key signs OCSP responses: keyUsage with
    digitalSignature (BR 7.1.2.10.7; RFC 5280 §4.2.1.3). Raises
    IdentityError naming ``path`` and the rule."""
    ku = _ext(_extensions(ca, path, "issuer"), ExtensionOID.KEY_USAGE)
    if ku is None or not ku.value.digital_signature:
        raise IdentityError(f"{path}: issuer certificate lacks keyUsage digitalSignature, so its key cannot sign OCSP "
                            "responses itself (BR 7.1.2.10.7); configure a delegated responder certificate (signer.cert)")


def _ext(exts: x509.Extensions, oid: x509.ObjectIdentifier) -> x509.Extension | None:
    try:
        return exts.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None


_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


def _eku_name(oid: x509.ObjectIdentifier) -> str:
    return _EKU_NAMES.get(oid, oid.dotted_string)


CT_PRECERT_SIGNING = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.4")  # EKU, RFC 6962 §3.1


def _key_algorithm(cert: x509.Certificate) -> str:
    """The public key algorithm of ``cert`` as messages name it: "RSA",
    "EC secp256r1", or the key class's name."""
    pub = cert.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return f"EC {pub.curve.name}"
    if isinstance(pub, rsa.RSAPublicKey):
        return "RSA"
    return type(pub).__name__


def _check_precert_signer(cert: x509.Certificate, ca: x509.Certificate, path: str) -> None:
    """A Precertificate Signing Certificate of CA ``ca``: issued directly
    by it (RFC 6962 §3.1; BR 7.1.2.4: issuer byte-identical to the CA's
    subject), a CA certificate (basicConstraints cA TRUE: RFC 6962 §3.1,
    BR 7.1.2.10.4), keyUsage present, critical, with keyCertSign
    (BR 7.1.2.10.7, RFC 5280 §4.2.1.3), EKU 1.3.6.1.4.1.11129.2.4.4 and no
    other purpose (RFC 6962 §3.1, BR 7.1.2.4.2), a public key of the CA's
    algorithm and curve (BR 7.1.2.4: its precertificates carry the
    signature algorithm of the CA's final certificates). Raises
    IdentityError naming ``path`` and the rule."""
    what = "Precertificate Signing Certificate"
    try:
        cert.verify_directly_issued_by(ca)
    except Exception as e:
        raise IdentityError(f"{path}: {what} is not issued directly by its issuer "
                            f"{ca.subject.rfc4514_string()!r} (RFC 6962 §3.1): {e or type(e).__name__}") from None
    exts = _extensions(cert, path, what)
    constraints = _ext(exts, ExtensionOID.BASIC_CONSTRAINTS)
    if constraints is None or not constraints.value.ca:
        raise IdentityError(f"{path}: {what} is not a CA certificate (basicConstraints cA TRUE: RFC 6962 §3.1, "
                            "BR 7.1.2.4, 7.1.2.10.4)")
    eku = _ext(exts, ExtensionOID.EXTENDED_KEY_USAGE)
    if eku is None or CT_PRECERT_SIGNING not in eku.value:
        raise IdentityError(f"{path}: {what} lacks EKU {CT_PRECERT_SIGNING.dotted_string} (RFC 6962 §3.1)")
    others = [_eku_name(o) for o in eku.value if o != CT_PRECERT_SIGNING]
    if others:
        raise IdentityError(f"{path}: {what} has EKU {', '.join(others)} besides "
                            f"{CT_PRECERT_SIGNING.dotted_string} (BR 7.1.2.4.2: MUST NOT)")
    ku = _ext(exts, ExtensionOID.KEY_USAGE)
    if ku is None or not ku.critical or not ku.value.key_cert_sign:
        raise IdentityError(f"{path}: {what} lacks a critical keyUsage with keyCertSign, so its signature on a "
                            "precertificate is not one a CA may make (BR 7.1.2.4.1, 7.1.2.10.7)")
    if (mine := _key_algorithm(cert)) != (theirs := _key_algorithm(ca)):
        raise IdentityError(f"{path}: {what} key is {mine}, its issuer's is {theirs} (BR 7.1.2.4: the same "
                            "public key algorithm as the issuing CA)")


def _precert_signer(path: str, ca: x509.Certificate) -> PrecertSigner:
    """Read and check (``_check_precert_signer``) the Precertificate
    Signing Certificate in file ``path`` of CA ``ca``; raise IdentityError."""
    cert = load_certificate(path)
    _check_precert_signer(cert, ca, path)
    return PrecertSigner(cert, path)


def issuer_identity(issuer: Issuer) -> IssuerIdentity:
    """Load one configured issuer, its signer and its Precertificate
    Signing Certificates; raise IdentityError."""
    ca = load_certificate(issuer.cert)
    responder = None
    if issuer.signer.cert:
        responder = load_certificate(issuer.signer.cert)
        _check_delegate(responder, ca, issuer.signer.cert)
    else:
        _check_ca_signs(ca, issuer.cert)
    signers = tuple(_precert_signer(path, ca) for path in issuer.precert_signing_certificates)
    return identity(issuer, ca, responder, signers)


def identity(issuer: Issuer, ca: x509.Certificate, responder: x509.Certificate | None,
             precert_signers: tuple[PrecertSigner, ...] = ()) -> IssuerIdentity:
    """The identity of ``issuer`` from certificates already read and checked
    (``responder`` None: the CA's own key signs; ``precert_signers`` its
    checked Precertificate Signing Certificates, none where no ledger is
    read); raise IdentityError for a signer key type or curve BR 7.1.3.2
    does not allow."""
    bits = key_bits(ca)
    name_der = ca.subject.public_bytes()
    if responder is not None:
        signer = _signer_identity(responder, True, issuer.signer.cert)
    else:
        signer = _signer_identity(ca, False, issuer.cert)
    return IssuerIdentity(
        name=issuer.name,
        cert=ca,
        id=hashlib.sha1(bits).hexdigest(),
        name_hash={h: hashlib.new(h, name_der).digest() for h in HASHES},
        key_hash={h: hashlib.new(h, bits).digest() for h in HASHES},
        signer=signer,
        config=issuer,
        precert_signers=precert_signers,
    )


def signed_by(issuer: IssuerIdentity, responder: x509.Certificate | None) -> IssuerIdentity:
    """``issuer`` with another signer: ``responder``, a delegated responder
    certificate checked like a configured one (issued directly by the CA,
    RFC 6960 §4.2.2.2, with the BR 7.1.2.8 profile: ``_check_delegate``),
    or None for the CA's own key (keyUsage digitalSignature, BR 7.1.2.10.7).
    For responses signed before or after a responder certificate rollover.
    Raises IdentityError."""
    label = f"responder certificate {responder.subject.rfc4514_string()!r}" if responder else issuer.config.cert
    if responder is not None:
        _check_delegate(responder, issuer.cert, label)
    else:
        _check_ca_signs(issuer.cert, label)
    return replace(issuer, signer=_signer_identity(responder or issuer.cert, responder is not None, label))


def load_issuers(config: Config) -> dict[str, IssuerIdentity]:
    """All configured issuers by config name; raise IdentityError."""
    return {i.name: issuer_identity(i) for i in config.issuers}

"""A real demo CA hierarchy: ``openssl`` CLI for the CA, SoftHSM2 for keys.

``build_demo(root)`` makes, inside ``root``::

    softhsm2.conf            SoftHSM2 config (tokendir = root/tokens)
    tokens/                  one token labelled ``ocspmint``
    pin.txt                  the token user PIN (mode 0600)
    ocspmint.toml            an ocspmint config (see ocspmint.config)
    ca/root.pem, root.key    root CA (EC P-256 software key)
    ca/issuing-ca.pem, .key  issuing CA signed by the root (EC P-256)
    ca/responder.pem         delegated OCSP responder certificate whose key
                             lives only in the token (RFC 6960 §4.2.2.2,
                             BR 7.1.2.8)
    ca/openssl.cnf           `openssl ca` config of the issuing CA
    ca/index.txt, newcerts/  the `openssl ca` database and issued certificates
    ca/serial, crlnumber     `openssl ca` counters (serial is rewritten
                             before every issue: serials are random)
    ca/leaf.ext              [leaf] / [precert] extension profiles
    ca/leaf.key, leaf.csr    the one leaf key + CSR every leaf reuses

Token objects (label, CKA_ID): ``ocsp-responder`` / 01 (generated inside the
token: sensitive, never extractable) and ``issuing-ca`` / 02 (the issuing
CA's software key imported, sensitive, so that ``signer="issuer"`` works).
The token is initialised with C_InitToken through ctypes (not softhsm2-util,
which wants PINs in argv); the SO PIN is random and then forgotten.

Everything runs as subprocesses: the ``openssl`` CLI, and one Python child
that talks PKCS#11 with ``SOFTHSM2_CONF`` set in its environment only. The
caller's ``os.environ`` and its PKCS#11 state are never touched (python-pkcs11
initialises a module once per process and SoftHSM2 reads its config then).
PINs never appear in argv, logs or exceptions.

Failures of a tool raise ``RuntimeError`` naming the command and its stderr;
bad arguments raise ``ValueError``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ocspmint.config import load_config
from ocspmint.model import MAX_SERIAL

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN_LABEL = "ocspmint"
RESPONDER_LABEL = "ocsp-responder"
RESPONDER_ID = b"\x01"
ISSUER_KEY_LABEL = "issuing-ca"
ISSUER_KEY_ID = b"\x02"
ISSUER_NAME = "issuing-ca"
RESPONDER_KEYS = ("ec-p256", "ec-p384", "rsa-2048")
SIGNERS = ("delegated", "issuer")
# Reasons `openssl ca -crl_reason` understands (RFC 5280 §5.3.1 names).
OPENSSL_REASONS = (
    "unspecified",
    "keyCompromise",
    "CACompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "certificateHold",
    "removeFromCRL",
)
# The reasons build_demo cycles through; None = revoked without -crl_reason.
DEMO_REASONS: tuple[str | None, ...] = (
    "keyCompromise",
    "superseded",
    None,
    "cessationOfOperation",
    "affiliationChanged",
)
EXPIRED_START = "20200101000000Z"
EXPIRED_END = "20200201000000Z"
CT_POISON_OID = "1.3.6.1.4.1.11129.2.4.3"
SUBJECT_PREFIX = "/C=XX/O=ocspmint demo"


@dataclass(frozen=True)
class Demo:
    """A built demo folder; every path is absolute.

    ``serials`` maps a tag to serials (ints), in issue order:

    - ``"good"``: final certificates, status V and not expired (extra_serials
      included). A revoked serial leaves this list.
    - ``"revoked"``: every revoked serial, certificate or precertificate.
    - ``"precert"``: every precertificate-only serial (CT poison, no final
      certificate ever issued), whatever its status: a revoked precertificate
      is listed both here and under ``"revoked"``.
    - ``"expired"``: certificates whose notAfter is past (index status E).

    ``revoked`` maps serial -> the `openssl ca` reason name, or None when it
    was revoked without ``-crl_reason`` (index.txt holds no reason).
    """

    root: Path
    config: Path
    softhsm_conf: Path
    pin_file: Path
    root_ca: Path
    issuing_ca: Path
    issuing_key: Path
    responder_cert: Path
    index: Path
    certs_dir: Path
    openssl_cnf: Path
    serials: dict[str, list[int]] = field(default_factory=dict)
    revoked: dict[int, str | None] = field(default_factory=dict)

    @property
    def leaf_ext(self) -> Path:
        """The extension file holding the [leaf] and [precert] profiles."""
        return self.openssl_cnf.parent / "leaf.ext"

    @property
    def leaf_csr(self) -> Path:
        """The one CSR every leaf reuses (subjects come from ``-subj``)."""
        return self.openssl_cnf.parent / "leaf.csr"

    def cert_path(self, serial: int) -> Path:
        """Where `openssl ca` stored ``serial``: newcerts/<HEX>.pem, the
        serial's octets in upper-case hex without a sign octet."""
        return self.certs_dir / f"{_openssl_hex(serial)}.pem"

    def env(self) -> dict[str, str]:
        """A copy of os.environ with SOFTHSM2_CONF pointing at this demo."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.softhsm_conf)}


def _openssl_hex(serial: int) -> str:
    h = format(serial, "X")
    return h if len(h) % 2 == 0 else "0" + h


def _run(args: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
         stdin: bytes | None = None) -> bytes:
    """Run a command, return stdout; RuntimeError with stderr on failure."""
    try:
        p = subprocess.run(list(args), cwd=cwd, env=dict(env) if env is not None else None, input=stdin,
                           capture_output=True, check=True)
    except FileNotFoundError as e:
        raise RuntimeError(f"{args[0]}: not found ({e.strerror})") from None
    except subprocess.CalledProcessError as e:
        err = (e.stderr or b"").decode(errors="replace").strip()
        raise RuntimeError(f"command failed (exit {e.returncode}): {' '.join(args)}\n{err}") from None
    return p.stdout


def _random_serial(high_bit: bool | None = None) -> int:
    """A random 16-octet serial; ``high_bit`` forces bit 127 on or off."""
    s = int.from_bytes(secrets.token_bytes(16), "big")
    if high_bit is True:
        s |= 1 << 127
    elif high_bit is False:
        s &= (1 << 127) - 1
    return s or 1


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string of ASCII is a TOML basic string


_OPENSSL_CNF = """\
# `openssl ca` config of the ocspmint demo issuing CA (made by ocspmint.demo).
dir = {dir}

[ca]
default_ca = issuing_ca

[issuing_ca]
database = $dir/index.txt
new_certs_dir = $dir/newcerts
serial = $dir/serial
crlnumber = $dir/crlnumber
certificate = $dir/issuing-ca.pem
private_key = $dir/issuing-ca.key
default_md = sha256
default_days = 90
default_crl_days = 7
policy = policy_anything
unique_subject = no
copy_extensions = none
email_in_dn = no
preserve = no

[policy_anything]
countryName = optional
stateOrProvinceName = optional
localityName = optional
organizationName = optional
organizationalUnitName = optional
commonName = supplied
emailAddress = optional

[req]
distinguished_name = req_dn
prompt = no
string_mask = utf8only

[req_dn]
CN = unused

[root_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[issuing_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
# digitalSignature: BR 7.1.2.10.7, set when the CA key signs OCSP (signer="issuer").
keyUsage = critical, digitalSignature, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

# Delegated OCSP responder: RFC 6960 §4.2.2.2, BR 7.1.2.8.
[responder_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = OCSPSigning
noCheck = ignored
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""

_LEAF_BODY = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:${ENV::OCSPMINT_DEMO_SAN}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""
# Leaf profiles for `openssl ca -extfile`; the SAN comes from the environment.
# A precertificate is a leaf plus the RFC 6962 §3.1 CT poison extension.
_LEAF_EXT = f"""\
[leaf]
{_LEAF_BODY}
[precert]
{_LEAF_BODY}1.3.6.1.4.1.11129.2.4.3 = critical, DER:0500
"""


def _write_config(root: Path, signer: str) -> Path:
    if signer == "delegated":
        signer_lines = [
            f"uri = {_toml_str(f'pkcs11:token={TOKEN_LABEL};object={RESPONDER_LABEL};type=private')}",
            f"module = {_toml_str(SOFTHSM_MODULE)}",
            f"cert = {_toml_str('ca/responder.pem')}",
            f"pin_file = {_toml_str('pin.txt')}",
        ]
    else:
        signer_lines = [
            f"uri = {_toml_str(f'pkcs11:token={TOKEN_LABEL};object={ISSUER_KEY_LABEL};type=private')}",
            f"module = {_toml_str(SOFTHSM_MODULE)}",
            f"pin_file = {_toml_str('pin.txt')}",
        ]
    text = "\n".join([
        "# ocspmint demo config (made by ocspmint.demo); paths are relative to this file.",
        'state_dir = "state"',
        "",
        "[store]",
        'url = "file:responses"',
        "",
        "[signing]",
        "workers = 2",
        "",
        "[[issuers]]",
        f"name = {_toml_str(ISSUER_NAME)}",
        'cert = "ca/issuing-ca.pem"',
        "",
        "[issuers.signer]",
        *signer_lines,
        "",
        "[[sources]]",
        'type = "openssl-index"',
        'path = "ca/index.txt"',
        'certs_dir = "ca/newcerts"',
        f"issuer = {_toml_str(ISSUER_NAME)}",
        "",
    ])
    path = root / "ocspmint.toml"
    path.write_text(text)
    load_config(path)  # raises ConfigError if this module drifted from config.py
    return path


def _token_setup(root: Path, conf: Path, so_pin: str, user_pin: str, responder_key: str,
                 issuing_key: Path) -> bytes:
    """Init the token, make the responder key, import the CA key; return the
    responder SPKI DER. Runs in a child Python so SOFTHSM2_CONF stays local."""
    src = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    request = json.dumps({
        "module": SOFTHSM_MODULE,
        "so_pin": so_pin,
        "user_pin": user_pin,
        "responder_key": responder_key,
        "issuing_key": str(issuing_key),
    }).encode()
    try:
        p = subprocess.run([sys.executable, "-c", "from ocspmint.demo import _token_child; _token_child()"],
                           input=request, env=env, cwd=root, capture_output=True, check=True)
    except subprocess.CalledProcessError as e:
        err = (e.stderr or b"").decode(errors="replace").strip()
        raise RuntimeError(f"token setup failed (exit {e.returncode}):\n{err}") from None
    return bytes.fromhex(json.loads(p.stdout)["spki"])


def _init_token(module: str, label: str, so_pin: str, user_pin: str) -> None:
    """C_InitToken on the first free slot, then C_InitPIN, through ctypes.

    python-pkcs11 0.10 has no C_InitToken, and softhsm2-util wants the PINs
    in argv or on a terminal; calling the module keeps them in memory.
    """
    import ctypes

    import pkcs11

    ulong = ctypes.c_ulong
    so = ctypes.CDLL(module)

    def call(name: str, *args: object) -> None:
        rv = getattr(so, name)(*args)
        if rv != 0:
            raise RuntimeError(f"{name} failed: CKR 0x{rv:08x}")

    call("C_Initialize", None)
    try:
        count = ulong(0)
        call("C_GetSlotList", ctypes.c_ubyte(1), None, ctypes.byref(count))
        slots = (ulong * count.value)()
        call("C_GetSlotList", ctypes.c_ubyte(1), slots, ctypes.byref(count))

        class TokenInfo(ctypes.Structure):
            _fields_ = [("label", ctypes.c_char * 32), ("manufacturerID", ctypes.c_char * 32),
                        ("model", ctypes.c_char * 16), ("serialNumber", ctypes.c_char * 16),
                        ("flags", ulong), ("rest", ctypes.c_byte * 256)]

        CKF_TOKEN_INITIALIZED = 0x400
        free = None
        for slot in slots[: count.value]:
            info = TokenInfo()
            call("C_GetTokenInfo", ulong(slot), ctypes.byref(info))
            if not info.flags & CKF_TOKEN_INITIALIZED:
                free = slot
                break
        if free is None:
            raise RuntimeError("no free token slot")
        so_b = so_pin.encode()
        call("C_InitToken", ulong(free), ctypes.c_char_p(so_b), ulong(len(so_b)),
             ctypes.c_char_p(label.encode().ljust(32)))
    finally:
        so.C_Finalize(None)

    lib = pkcs11.lib(module)
    with lib.get_token(token_label=label).open(rw=True, so_pin=so_pin) as session:
        session.init_pin(user_pin)
    lib.finalize()


def _token_child() -> None:
    """Child process body of _token_setup: JSON request on stdin, JSON out."""
    import pkcs11
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters
    from pkcs11.util.rsa import encode_rsa_public_key

    req = json.loads(sys.stdin.buffer.read())
    module = req["module"]
    _init_token(module, TOKEN_LABEL, req["so_pin"], req["user_pin"])
    lib = pkcs11.lib(module)
    token = lib.get_token(token_label=TOKEN_LABEL)
    private = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True,
               Attribute.SIGN: True, Attribute.TOKEN: True}
    with token.open(rw=True, user_pin=req["user_pin"]) as s:
        kind = req["responder_key"]
        if kind.startswith("ec-"):
            curve = {"ec-p256": "secp256r1", "ec-p384": "secp384r1"}[kind]
            params = s.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True)
            pub, _ = params.generate_keypair(store=True, label=RESPONDER_LABEL, id=RESPONDER_ID,
                                             private_template=private)
            spki = encode_ec_public_key(pub)
        else:
            pub, _ = s.generate_keypair(KeyType.RSA, 2048, store=True, label=RESPONDER_LABEL, id=RESPONDER_ID,
                                        private_template=private,
                                        public_template={Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"})
            # encode_rsa_public_key gives PKCS#1 RSAPublicKey; cryptography re-wraps it as SPKI.
            spki = serialization.load_der_public_key(encode_rsa_public_key(pub)).public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        # The issuing CA's key, imported for signer="issuer" (label issuing-ca, id 02).
        ca_key = serialization.load_pem_private_key(Path(req["issuing_key"]).read_bytes(), None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise SystemExit("issuing CA key is not EC")
        size = (ca_key.curve.key_size + 7) // 8
        curve_params = encode_named_curve_parameters(ca_key.curve.name)
        point = ca_key.public_key().public_bytes(serialization.Encoding.X962,
                                                 serialization.PublicFormat.UncompressedPoint)
        s.create_object({
            Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.EC,
            Attribute.EC_PARAMS: curve_params,
            Attribute.VALUE: ca_key.private_numbers().private_value.to_bytes(size, "big"),
            Attribute.LABEL: ISSUER_KEY_LABEL, Attribute.ID: ISSUER_KEY_ID, **private,
        })
        s.create_object({
            Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.EC,
            Attribute.EC_PARAMS: curve_params,
            Attribute.EC_POINT: bytes((0x04, len(point))) + point,
            Attribute.LABEL: ISSUER_KEY_LABEL, Attribute.ID: ISSUER_KEY_ID,
            Attribute.TOKEN: True, Attribute.VERIFY: True,
        })
    sys.stdout.write(json.dumps({"spki": spki.hex()}))


def _new_key_child() -> None:
    """Child process body of new_responder: JSON request on stdin, SPKI hex out."""
    import pkcs11
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

    req = json.loads(sys.stdin.buffer.read())
    token = pkcs11.lib(req["module"]).get_token(token_label=TOKEN_LABEL)
    private = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True,
               Attribute.SIGN: True, Attribute.TOKEN: True}
    pin = Path(req["pin_file"]).read_text().strip()
    with token.open(rw=True, user_pin=pin) as s:
        params = s.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
        pub, _ = params.generate_keypair(store=True, label=req["label"], id=req["label"].encode(),
                                         private_template=private)
        spki = encode_ec_public_key(pub)
    sys.stdout.write(json.dumps({"spki": spki.hex()}))


def new_responder(demo: Demo, label: str, days: int = 30) -> Path:
    """Rehearse a delegated responder rotation: generate a new P-256 key
    labelled ``label`` inside the demo token and have the issuing CA
    certify it (id-kp-OCSPSigning, RFC 6960 §4.2.2.2). Returns the new
    certificate's path, ``ca/<label>.pem``; point the config's signer at
    both to switch (then `ocspmint reissue`). Raises RuntimeError if the
    token or openssl fails."""
    env = {**demo.env(), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    request = json.dumps({"module": SOFTHSM_MODULE, "pin_file": str(demo.pin_file), "label": label}).encode()
    p = subprocess.run([sys.executable, "-c", "from ocspmint.demo import _new_key_child; _new_key_child()"],
                       input=request, env=env, capture_output=True)
    if p.returncode:
        raise RuntimeError(f"new responder key failed: {p.stderr.decode(errors='replace').strip()}")
    return certify_responder(demo, label, bytes.fromhex(json.loads(p.stdout)["spki"]), days)


def certify_responder(demo: Demo, label: str, spki: bytes, days: int = 30) -> Path:
    """Have the demo's issuing CA certify the public key ``spki`` (DER
    SubjectPublicKeyInfo) as a delegated OCSP responder (id-kp-OCSPSigning)
    named after ``label``; returns ``ca/<label>.pem``. RuntimeError if
    openssl fails."""
    from cryptography.hazmat.primitives import serialization

    ca = demo.root / "ca"
    pub_pem, cert = ca / f"{label}.pub.pem", ca / f"{label}.pem"
    pub_pem.write_bytes(serialization.load_der_public_key(spki).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    _openssl(ca, "x509", "-new", "-subj", f"{SUBJECT_PREFIX}/CN=ocspmint Demo OCSP Responder {label}",
             "-force_pubkey", str(pub_pem), "-CA", str(demo.issuing_ca), "-CAkey", str(demo.issuing_key),
             "-set_serial", "0x" + format(_random_serial(False), "x"), "-days", str(days), "-sha256",
             "-extfile", str(demo.openssl_cnf), "-extensions", "responder_ext", "-out", str(cert))
    pub_pem.unlink()
    return cert


def _openssl(cwd: Path, *args: str, env: Mapping[str, str] | None = None) -> bytes:
    """Run the openssl CLI in ``cwd``; return stdout, RuntimeError on failure."""
    return _run(["openssl", *args], cwd=cwd, env=env)


def _index_serials(index: Path) -> set[int]:
    """Serials already in an `openssl ca` index.txt (column 4, hex)."""
    out: set[int] = set()
    for line in index.read_text().splitlines():
        cols = line.split("\t")
        if len(cols) >= 4 and cols[3]:
            out.add(int(cols[3], 16))
    return out


def _check_serial_arg(serial: int) -> None:
    if isinstance(serial, bool) or not isinstance(serial, int) or not 1 <= serial <= MAX_SERIAL:
        raise ValueError(f"serial {serial!r} must be an int in [1, 2**160 - 1]")


def _issue(demo: Demo, *, serial: int | None, precert: bool, days: int | None = None,
           dates: tuple[str, str] | None = None, high_bit: bool | None = None, tag: str | None = None) -> int:
    used = _index_serials(demo.index)
    if serial is None:
        serial = _random_serial(high_bit)
        while serial in used:
            serial = _random_serial(high_bit)
    else:
        _check_serial_arg(serial)
        if serial in used:
            raise ValueError(f"serial {serial:#x} is already in {demo.index}")
    ca_dir = demo.openssl_cnf.parent
    (ca_dir / "serial").write_text(_openssl_hex(serial) + "\n")
    dns = f"{'precert' if precert else 'leaf'}-{serial:x}.example"
    args = ["ca", "-config", str(demo.openssl_cnf), "-batch", "-notext", "-in", str(demo.leaf_csr),
            "-subj", f"{SUBJECT_PREFIX}/CN={dns}", "-extfile", str(demo.leaf_ext),
            "-extensions", "precert" if precert else "leaf"]
    if dates is not None:
        args += ["-startdate", dates[0], "-enddate", dates[1]]
    else:
        args += ["-days", str(days)]
    _openssl(ca_dir, *args, env={**os.environ, "OCSPMINT_DEMO_SAN": dns})
    if not demo.cert_path(serial).is_file():
        raise RuntimeError(f"openssl ca did not write {demo.cert_path(serial)} for serial {serial:#x}")
    demo.serials.setdefault(tag or ("precert" if precert else "good"), []).append(serial)
    return serial


def issue(demo: Demo, *, serial: int | None = None, precert: bool = False, days: int = 30) -> int:
    """Issue one more leaf with `openssl ca` and return its serial.

    ``serial`` None picks a random unused 16-octet serial; otherwise it must
    be an unused int in [1, 2**160 - 1] (ValueError). ``precert`` adds the
    critical CT poison extension (RFC 6962 §3.1) and records the serial under
    ``demo.serials["precert"]`` (no final certificate is ever issued for it);
    otherwise under ``"good"``. ``days``: validity from now, ≥ 1.
    The certificate lands in ``demo.cert_path(serial)`` and a V row in
    index.txt. RuntimeError if openssl fails.
    """
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days {days!r} must be an int ≥ 1")
    return _issue(demo, serial=serial, precert=precert, days=days)


def revoke(demo: Demo, serial: int, reason: str | None) -> None:
    """Revoke ``serial`` with `openssl ca -revoke` (RFC 5280 §5.3.1 reasons).

    ``reason`` is an `openssl ca -crl_reason` name (OPENSSL_REASONS) or None
    to revoke without a reason (index.txt then holds only the time).
    certificateHold is passed as is (index.txt then says certificateHold;
    with ``-crl_hold`` openssl would write "holdInstruction,<oid name>"
    instead); the ledger should refuse it (BR 7.3). Updates ``demo.revoked`` and moves the
    serial from ``"good"`` to ``"revoked"`` (a precertificate stays listed
    under ``"precert"`` too). ValueError for an unknown reason, a serial this
    demo never issued, or one already revoked; RuntimeError if openssl fails.
    """
    _revoke(demo, serial, reason)


def _revoke(demo: Demo, serial: int, reason: str | None) -> None:
    if reason is not None and reason not in OPENSSL_REASONS:
        raise ValueError(f"reason {reason!r} is not one of {', '.join(OPENSSL_REASONS)}")
    _check_serial_arg(serial)
    if serial in demo.revoked:
        raise ValueError(f"serial {serial:#x} is already revoked")
    path = demo.cert_path(serial)
    if not path.is_file():
        raise ValueError(f"serial {serial:#x} was not issued by this demo ({path} missing)")
    args = ["ca", "-config", str(demo.openssl_cnf), "-revoke", str(path)]
    if reason is not None:
        args += ["-crl_reason", reason]
    _openssl(demo.openssl_cnf.parent, *args)
    demo.revoked[serial] = reason
    if serial in demo.serials.get("good", []):
        demo.serials["good"].remove(serial)
    demo.serials.setdefault("revoked", []).append(serial)


def build_demo(
    root: Path,
    *,
    certs: int = 12,
    precerts: int = 6,
    revoke: int = 4,
    responder_key: str = "ec-p256",
    extra_serials: Sequence[int] = (),
    signer: str = "delegated",
) -> Demo:
    """Build the demo CA, token and config in ``root`` (created if needed).

    Issues ``certs`` final certificates with random 16-octet serials (the
    first has bit 127 set, so its DER INTEGER needs a leading 00; the second
    has it clear), ``precerts`` precertificate-only entries (CT poison, the
    first with bit 127 set), one certificate per ``extra_serials`` value
    (exact serials, for round-trip tests), and one certificate that expired
    in 2020 (index status E after ``openssl ca -updatedb``).

    Revokes the last ``revoke`` of the ``certs`` with reasons cycling through
    DEMO_REASONS (keyCompromise, superseded, no reason, cessationOfOperation,
    affiliationChanged); when ``revoke`` > 0 and ``precerts`` ≥ 2 it also
    revokes the last precertificate with the next reason in that cycle (the
    defaults thus use all five).

    ``responder_key``: "ec-p256", "ec-p384" or "rsa-2048", generated inside
    the token. ``signer``: "delegated" (config signs with ocsp-responder and
    ca/responder.pem) or "issuer" (config signs with the imported issuing-ca
    token key, no signer.cert; responder.pem is still made).

    Returns a Demo (see its docstring for ``serials``). Raises ValueError for
    bad arguments, FileExistsError if ``root`` already holds a demo,
    RuntimeError if openssl or the token setup fails. Takes ~1-2 s.
    """
    if responder_key not in RESPONDER_KEYS:
        raise ValueError(f"responder_key {responder_key!r} must be one of {', '.join(RESPONDER_KEYS)}")
    if signer not in SIGNERS:
        raise ValueError(f"signer {signer!r} must be one of {', '.join(SIGNERS)}")
    for name, value in (("certs", certs), ("precerts", precerts), ("revoke", revoke)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} {value!r} must be an int ≥ 0")
    if revoke > certs:
        raise ValueError(f"revoke ({revoke}) must not exceed certs ({certs})")
    extras = list(extra_serials)
    for s in extras:
        _check_serial_arg(s)
    if len(set(extras)) != len(extras):
        raise ValueError("extra_serials must be unique")

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if (root / "tokens").exists() or (root / "ca").exists() or (root / "ocspmint.toml").exists():
        raise FileExistsError(f"{root} already holds a demo (tokens/, ca/ or ocspmint.toml)")
    ca = root / "ca"
    tokens = root / "tokens"
    ca.mkdir()
    tokens.mkdir(mode=0o700)
    demo = Demo(
        root=root,
        config=root / "ocspmint.toml",
        softhsm_conf=root / "softhsm2.conf",
        pin_file=root / "pin.txt",
        root_ca=ca / "root.pem",
        issuing_ca=ca / "issuing-ca.pem",
        issuing_key=ca / "issuing-ca.key",
        responder_cert=ca / "responder.pem",
        index=ca / "index.txt",
        certs_dir=ca / "newcerts",
        openssl_cnf=ca / "openssl.cnf",
        serials={"good": [], "revoked": [], "precert": [], "expired": []},
        revoked={},
    )

    # SoftHSM2 config and PINs (the user PIN only ever goes to pin.txt).
    demo.softhsm_conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    so_pin, user_pin = secrets.token_hex(16), secrets.token_hex(16)
    _write_private(demo.pin_file, user_pin.encode() + b"\n")

    # openssl ca database.
    demo.certs_dir.mkdir()
    demo.index.write_text("")
    (ca / "index.txt.attr").write_text("unique_subject = no\n")
    (ca / "crlnumber").write_text("1000\n")
    demo.openssl_cnf.write_text(_OPENSSL_CNF.format(dir=ca))
    demo.leaf_ext.write_text(_LEAF_EXT)
    cnf = str(demo.openssl_cnf)

    def genkey(path: Path) -> None:
        _write_private(path, _openssl(ca, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"))

    def serial_arg() -> str:
        return "0x" + format(_random_serial(False), "x")

    # Root CA (self-signed) and issuing CA (signed by the root).
    root_key = ca / "root.key"
    genkey(root_key)
    _openssl(ca, "req", "-config", cnf, "-new", "-x509", "-key", str(root_key), "-sha256", "-days", "3650",
             "-subj", f"{SUBJECT_PREFIX}/CN=ocspmint Demo Root CA", "-extensions", "root_ext",
             "-set_serial", serial_arg(), "-out", str(demo.root_ca))
    genkey(demo.issuing_key)
    csr = ca / "issuing-ca.csr"
    _openssl(ca, "req", "-config", cnf, "-new", "-key", str(demo.issuing_key),
             "-subj", f"{SUBJECT_PREFIX}/CN=ocspmint Demo Issuing CA", "-out", str(csr))
    _openssl(ca, "x509", "-req", "-in", str(csr), "-CA", str(demo.root_ca), "-CAkey", str(root_key),
             "-set_serial", serial_arg(), "-days", "1825", "-sha256", "-extfile", cnf,
             "-extensions", "issuing_ext", "-out", str(demo.issuing_ca))

    # Token: init, responder key inside it, issuing CA key imported.
    spki = _token_setup(root, demo.softhsm_conf, so_pin, user_pin, responder_key, demo.issuing_key)
    from cryptography.hazmat.primitives import serialization

    pub_pem = ca / "responder.pub.pem"
    pub_pem.write_bytes(serialization.load_der_public_key(spki).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    # Delegated responder certificate (RFC 6960 §4.2.2.2, BR 7.1.2.8): the
    # token's public key forced into a certificate the issuing CA signs.
    _openssl(ca, "x509", "-new", "-subj", f"{SUBJECT_PREFIX}/CN=ocspmint Demo OCSP Responder",
             "-force_pubkey", str(pub_pem), "-CA", str(demo.issuing_ca), "-CAkey", str(demo.issuing_key),
             "-set_serial", serial_arg(), "-days", "30", "-sha256", "-extfile", cnf,
             "-extensions", "responder_ext", "-out", str(demo.responder_cert))

    # One leaf key and CSR for every leaf; subjects come from -subj.
    leaf_key = ca / "leaf.key"
    genkey(leaf_key)
    _openssl(ca, "req", "-config", cnf, "-new", "-key", str(leaf_key), "-subj", "/CN=leaf.example",
             "-out", str(demo.leaf_csr))

    issued: list[int] = []
    for n in range(certs):
        high = True if n == 0 or (n == certs - 1 and certs >= 3) else False if n == 1 else None
        issued.append(_issue(demo, serial=None, precert=False, days=90, high_bit=high))
    pre: list[int] = []
    for n in range(precerts):
        pre.append(_issue(demo, serial=None, precert=True, days=90, high_bit=True if n == 0 else None))
    for s in extras:
        _issue(demo, serial=s, precert=False, days=90)
    _issue(demo, serial=None, precert=False, dates=(EXPIRED_START, EXPIRED_END), tag="expired")

    k = 0
    for s in issued[len(issued) - revoke:] if revoke else []:
        _revoke(demo, s, DEMO_REASONS[k % len(DEMO_REASONS)])
        k += 1
    if revoke and precerts >= 2:
        _revoke(demo, pre[-1], DEMO_REASONS[k % len(DEMO_REASONS)])

    # Mark the 2020 certificate E (openssl ca only does this on request).
    _openssl(ca, "ca", "-config", cnf, "-updatedb")
    for p in (csr, pub_pem):
        p.unlink()

    _write_config(root, signer)
    return demo

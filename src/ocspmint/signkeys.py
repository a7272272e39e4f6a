"""Worker-side signing keys: one holder per issuer, for the three ways a
signer process can sign (``signing.backend`` and ``key_file``).

- ``_NativeKey``: the C extension ``ocspmint._p11native`` (native/README.md):
  ``CKF_OS_LOCKING_OK``, ``signing.sessions`` sessions on their own threads,
  a whole batch per call with the GIL released; per-item CK_RV errors.
- ``_PythonKey``: python-pkcs11, one session, one thread.
- ``_SoftwareKey``: a PEM key file through pyca cryptography (tests and
  demos; not for production CA keys).

``_Keys`` opens every issuer's key in one process and signs a batch
(``submit``: an ``Attempt``), giving per item the signature, an error line
(``describe_error`` / ``describe_rv``: the CKR_ code) or None (not
attempted). The native backend signs the batches submitted while it is
busy back to back (``pipelined``); the others sign at ``submit``. Nothing
here holds a PIN longer than the login.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from pathlib import Path
from typing import Any, Protocol

import msgspec
from cryptography.hazmat.primitives import serialization

from ocspmint.encoder import ecdsa_signature
from ocspmint.issuer import IssuerIdentity
from ocspmint.pkcs11uri import Pkcs11Uri, UriError, parse, read_pin

# python-pkcs11 exception names that do not spell their CK_RV (the CKR_ names of pkcs11t.h)
_CKR_SPELLING = {
    "AnotherUserAlreadyLoggedIn": "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
    "FunctionCancelled": "CKR_FUNCTION_CANCELED",
    "RandomNoRNG": "CKR_RANDOM_NO_RNG",
    "SessionReadWriteSOExists": "CKR_SESSION_READ_WRITE_SO_EXISTS",
    "SlotIDInvalid": "CKR_SLOT_ID_INVALID",
    "TokenNotRecognised": "CKR_TOKEN_NOT_RECOGNIZED",
}
_PKCS11_NAME = {ckr: name for name, ckr in _CKR_SPELLING.items()}
SOFTWARE = "software-key"  # the backend of an issuer signing with key_file


class SignerError(Exception):
    """The signer pool cannot sign at all (login failed, key missing...)."""


class KeySpec(msgspec.Struct, frozen=True):
    """How a worker finds one issuer's signing key. Holds no PIN.

    A PKCS#11 key has ``module`` and ``uri``; a software key ``key_file``
    (and ``key_password_env``), which must match ``spki``, the
    SubjectPublicKeyInfo DER of the signer certificate ``cert``."""

    issuer: str
    module: str
    uri: str
    pin_env: str
    pin_file: str
    key_type: str
    hash_name: str
    key_file: str = ""
    key_password_env: str = ""
    cert: str = ""
    spki: bytes = b""


def describe_error(e: Exception) -> str:
    """One line for a PKCS#11 failure. python-pkcs11 raises an exception
    without arguments for a CK_RV, named after it: that gives
    ``CKR_DEVICE_REMOVED (DeviceRemoved)``. Its own errors (NoSuchToken,
    NoSuchKey...) and SignerError keep their message."""
    name = type(e).__name__
    if isinstance(e, SignerError):
        return str(e)
    if not e.args and type(e).__module__.startswith("pkcs11"):
        ckr = _CKR_SPELLING.get(name) or "CKR_" + re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()
        return f"{ckr} ({name})"
    return f"{name}: {e}" if str(e) else name


def describe_rv(rv: int) -> str:
    """One line for a CK_RV from the native backend, spelt as
    ``describe_error`` spells python-pkcs11's exception for it:
    ``CKR_DEVICE_REMOVED (DeviceRemoved)``; ``CK_RV 0x80000001`` when the
    code is not in the extension's table (vendor codes)."""
    from ocspmint import _p11native

    ckr = _p11native.ckr_name(rv)
    if ckr is None:
        return f"CK_RV 0x{rv:x}"
    return f"{ckr} ({_PKCS11_NAME.get(ckr) or ''.join(w.capitalize() for w in ckr[4:].split('_'))})"


def key_spec(issuer: IssuerIdentity) -> KeySpec:
    """The worker-side description of ``issuer``'s signer; raises UriError
    naming the issuer. The PIN is read and checked here, in the parent,
    before any worker logs in (``read_pin``: an empty, garbled or unreadable
    PIN stops the command at once instead of costing the token a failed
    login per worker); it is not kept: each worker reads it again."""
    s = issuer.config.signer
    spki = issuer.signer.cert.public_key().public_bytes(serialization.Encoding.DER,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    cert = s.cert or issuer.config.cert
    if s.key_file:
        return KeySpec(issuer.name, "", "", "", "", issuer.signer.key_type, issuer.signer.hash_name,
                       key_file=s.key_file, key_password_env=s.key_password_env, cert=cert, spki=spki)
    try:
        uri = parse(s.uri)
        read_pin(uri, s.pin_env, s.pin_file, os.environ)
    except UriError as e:
        raise UriError(f"issuer {issuer.name}: {e}") from None
    module = s.module or uri.query.get("module-path", "")
    if not module:
        raise UriError(f"issuer {issuer.name}: no PKCS#11 module (signer.module or module-path in the URI)")
    return KeySpec(issuer.name, module, s.uri, s.pin_env, s.pin_file, issuer.signer.key_type, issuer.signer.hash_name,
                   cert=cert, spki=spki)


def _pin(spec: KeySpec, uri: Pkcs11Uri) -> str:
    """The PIN for a worker's login (``read_pin``); UriError names the issuer."""
    try:
        return read_pin(uri, spec.pin_env, spec.pin_file, os.environ)
    except UriError as e:
        raise UriError(f"issuer {spec.issuer}: {e}") from None


def resolve_backend(backend: str) -> str:
    """"native" or "python" for the configured ``signing.backend``: "auto"
    takes native when ``ocspmint._p11native`` imports. Raises SignerError
    for "native" without the extension."""
    if backend == "python":
        return "python"
    try:
        importlib.import_module("ocspmint._p11native")
    except ImportError as e:
        if backend == "native":
            raise SignerError(f'signing.backend = "native", but the extension ocspmint._p11native does not import '
                              f'({e}); rebuild it with `pip install -e .` (gcc, libp11-kit-dev) or use "auto"') from None
        return "python"
    return "native"


Results = list[bytes | str | None]  # per item: signature, error line, or None (not attempted)


class Attempt(Protocol):
    """One submitted signing attempt of a batch."""

    def result(self) -> tuple[Results, str]:
        """(per item, error of the whole attempt or ""); waits for a
        native batch still signing (GIL released), then gives the same
        pair again on every call."""


class Done:
    """An attempt that ended at submission: signed in the caller's thread,
    or failed before any item was tried (``error``)."""

    def __init__(self, results: Results, error: str = "") -> None:
        self._pair = (results, error)

    def result(self) -> tuple[Results, str]:
        return self._pair


class _NativeAttempt:
    """A batch queued on a native signer (``_p11native.SignJob``)."""

    def __init__(self, job: Any) -> None:
        self._job, self._pair = job, None

    def result(self) -> tuple[Results, str]:
        if self._pair is None:
            raw = self._job.wait()
            self._pair = ([r if isinstance(r, bytes) else None if r is None else describe_rv(r) for r in raw], "")
            self._job = None
        return self._pair


class _PythonKey:
    """One issuer's key through python-pkcs11: one session, one thread."""

    def __init__(self, key: Any, mechanism: Any, spec: KeySpec) -> None:
        self.key, self.mechanism, self.spec = key, mechanism, spec

    def sign(self, tbs: list[bytes]) -> Results:
        """Sign in order; the first PKCS#11 error ends the batch (its
        description in that item's place, None for the items after it)."""
        import pkcs11

        out: Results = []
        for data in tbs:
            try:
                if self.spec.key_type == "ec":
                    digest = hashlib.new(self.spec.hash_name, data).digest()
                    out.append(ecdsa_signature(self.key.sign(digest, mechanism=self.mechanism)))
                else:
                    out.append(self.key.sign(data, mechanism=self.mechanism))
            except pkcs11.exceptions.PKCS11Error as e:
                out.append(describe_error(e))
                break
        return out + [None] * (len(tbs) - len(out))


class _NativeKey:
    """One issuer's key through ocspmint._p11native: ``sessions`` sessions,
    one thread each. RSA signs the data (CKM_SHA256_RSA_PKCS). ECDSA signs
    the data with CKM_ECDSA_SHA256/384 when the token offers the key's hash
    that way, else the digest made here (CKM_ECDSA); either way the
    extension hands back the DER ECDSA-Sig-Value (``der=True``)."""

    def __init__(self, signer: Any, spec: KeySpec) -> None:
        from ocspmint import _p11native as native

        self.signer, self.spec = signer, spec
        self.der = spec.key_type == "ec"
        self.prehash: Any = None  # hashlib constructor of the digest signed instead of the data
        if not self.der:
            self.mechanism = native.CKM_SHA256_RSA_PKCS
            return
        in_token = {"sha256": native.CKM_ECDSA_SHA256, "sha384": native.CKM_ECDSA_SHA384}.get(spec.hash_name)
        if in_token is not None and signer.supports(in_token):
            self.mechanism = in_token
        else:
            self.mechanism, self.prehash = native.CKM_ECDSA, getattr(hashlib, spec.hash_name)

    def submit(self, tbs: list[bytes]) -> _NativeAttempt:
        """Queue the batch on the sessions' threads; returns at once."""
        data = [self.prehash(t).digest() for t in tbs] if self.prehash else tbs
        return _NativeAttempt(self.signer.submit(data, self.mechanism, der=self.der))


class _SoftwareKey:
    """A PEM private key signing with pyca cryptography (key_file): ECDSA
    with the curve's hash, RSA PKCS#1 v1.5 with SHA-256. Not for production
    CA keys: the key sits in a file and in this process's memory."""

    def __init__(self, spec: KeySpec) -> None:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

        where = f"issuer {spec.issuer}: key file {spec.key_file}"
        password = None
        if spec.key_password_env:
            if spec.key_password_env not in os.environ:
                raise SignerError(f"{where}: password environment variable {spec.key_password_env} is not set")
            password = os.environ[spec.key_password_env].encode()
        try:
            data = Path(spec.key_file).read_bytes()
        except OSError as e:
            raise SignerError(f"{where}: cannot read: {e.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password)
        except (ValueError, TypeError) as e:  # cryptography's messages never hold the password
            raise SignerError(f"{where}: not a usable PEM private key: {e}") from None
        spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if spki != spec.spki:
            raise SignerError(f"{where} does not match the signer certificate {spec.cert} (different public key)")
        digest = hashes.SHA384() if spec.hash_name == "sha384" else hashes.SHA256()
        if isinstance(key, ec.EllipticCurvePrivateKey):
            algorithm = ec.ECDSA(digest)
            self._sign = lambda t: key.sign(t, algorithm)
        elif isinstance(key, rsa.RSAPrivateKey):
            self._sign = lambda t: key.sign(t, padding.PKCS1v15(), hashes.SHA256())
        else:  # the certificate check above already refused other key types
            raise SignerError(f"{where}: key type {type(key).__name__} is not supported (ECDSA or RSA)")

    def sign(self, tbs: list[bytes]) -> Results:
        return [self._sign(t) for t in tbs]


class _Keys:
    """Worker-side sessions and key handles of every issuer.

    ``backend``: "native" or "python" (resolved, see ``resolve_backend``)
    for PKCS#11 keys; a spec with ``key_file`` always signs in software.
    ``sessions``: sessions (and threads) per key with the native backend.
    """

    def __init__(self, specs: list[KeySpec], backend: str = "python", sessions: int = 1) -> None:
        self.specs = specs
        self.backend = backend
        self.sessions_per_key = sessions
        self.sessions: list = []  # python-pkcs11 sessions
        self.keys: dict[str, _PythonKey | _NativeKey | _SoftwareKey] = {}
        self._modules: dict[str, Any] = {}  # native Module by path
        self._signers: list[Any] = []  # native Signers

    def backends(self) -> dict[str, str]:
        """issuer → the backend that signs for it."""
        return {s.issuer: SOFTWARE if s.key_file else self.backend for s in self.specs}

    def errors(self) -> tuple[type[BaseException], ...]:
        """Exceptions that mean "close, back off, reopen and retry" (the
        native backend's process never imports python-pkcs11: ~45 ms of
        every signer's start)."""
        if self.backend == "native":
            from ocspmint import _p11native

            return SignerError, _p11native.Error
        import pkcs11

        return SignerError, pkcs11.exceptions.PKCS11Error

    def open(self) -> None:
        """Open every key; on an error close what was opened and raise
        SignerError (or UriError for a PIN source, python-pkcs11's errors)."""
        try:
            for spec in self.specs:
                if spec.key_file:
                    self.keys[spec.issuer] = _SoftwareKey(spec)
                elif self.backend == "native":
                    self.keys[spec.issuer] = self._open_native(spec)
                else:
                    self.keys[spec.issuer] = self._open_python(spec)
        except BaseException:
            self.close()
            raise

    def _open_python(self, spec: KeySpec) -> _PythonKey:
        import pkcs11
        from pkcs11 import Mechanism, ObjectClass

        uri = parse(spec.uri)
        lib = pkcs11.lib(spec.module)
        try:
            token = lib.get_token(token_label=uri.text("token"), token_serial=uri.path.get("serial"))
        except pkcs11.exceptions.PKCS11Error as e:
            raise SignerError(f"issuer {spec.issuer}: token of {spec.uri} not found: {describe_error(e)}") from None
        pin = _pin(spec, uri)
        try:
            session = token.open(user_pin=pin)
        except pkcs11.exceptions.PKCS11Error as e:
            raise SignerError(f"issuer {spec.issuer}: login to token {token.label!r} for {spec.uri} failed: "
                              f"{describe_error(e)}") from None
        self.sessions.append(session)
        attrs = {"object_class": ObjectClass.PRIVATE_KEY}
        if "object" in uri.path:
            attrs["label"] = uri.text("object")
        if "id" in uri.path:
            attrs["id"] = uri.path["id"]
        try:
            key = session.get_key(**attrs)
        except (pkcs11.exceptions.NoSuchKey, pkcs11.exceptions.MultipleObjectsReturned) as e:
            raise SignerError(f"issuer {spec.issuer}: key {spec.uri} not usable: {type(e).__name__} "
                              "(no single private key on the token matches the URI)") from None
        return _PythonKey(key, Mechanism.ECDSA if spec.key_type == "ec" else Mechanism.SHA256_RSA_PKCS, spec)

    def _open_native(self, spec: KeySpec) -> _NativeKey:
        from ocspmint import _p11native as native

        uri = parse(spec.uri)
        module = self._modules.get(spec.module)
        if module is None:
            try:
                module = self._modules[spec.module] = native.Module(spec.module)
            except native.Error as e:
                desc = describe_rv(e.rv) if e.rv is not None else str(e)
                raise SignerError(f"issuer {spec.issuer}: PKCS#11 module {spec.module} for {spec.uri} "
                                  f"unusable: {desc}") from None
        pin = _pin(spec, uri)
        try:
            signer = native.Signer(module, token_label=uri.text("token"), token_serial=uri.text("serial"),
                                   pin=pin.encode(), key_label=uri.text("object"), key_id=uri.path.get("id"),
                                   sessions=self.sessions_per_key)
        except native.Error as e:
            desc = describe_rv(e.rv) if e.rv is not None else str(e)
            why = {"token": f"token of {spec.uri} not found: {desc}",
                   "login": f"login to token {e.token!r} for {spec.uri} failed: {desc}",
                   "key": f"key {spec.uri} not usable: {desc}"}.get(
                e.stage, f"token {e.token!r} for {spec.uri}: cannot open {self.sessions_per_key} sessions: {desc}")
            raise SignerError(f"issuer {spec.issuer}: {why}") from None
        self._signers.append(signer)
        return _NativeKey(signer, spec)

    def close(self) -> None:
        for signer in self._signers:
            signer.close()
        for module in self._modules.values():
            module.close()  # C_Finalize: the next open() initialises the module afresh
        for session in self.sessions:
            try:
                session.close()
            except Exception:  # noqa: BLE001 - the session is already gone
                pass
        self.sessions, self.keys, self._signers, self._modules = [], {}, [], {}

    @property
    def pipelined(self) -> bool:
        """Whether ``submit`` returns while the batch is signing (the
        native backend), so that the next batch can be queued behind it."""
        return self.backend == "native"

    def submit(self, issuer: str, tbs: list[bytes]) -> Attempt:
        """Sign a batch with ``issuer``'s key: queued on the native
        backend's sessions, else signed here. Raises what ``errors()``
        lists when the key cannot take it (closed sessions)."""
        key = self.keys[issuer]
        if isinstance(key, _NativeKey):
            return key.submit(tbs)
        return Done(key.sign(tbs))

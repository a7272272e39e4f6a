"""Signer pool: worker processes that sign ResponseData through PKCS#11.

Workers are started with the ``spawn`` method, so none inherits PKCS#11
state from the parent; each initialises the module, logs in once and keeps
its key handles. python-pkcs11 0.10 calls ``C_Initialize(NULL)``, so
SoftHSM2 runs without mutexes: each worker signs from one thread only.

Batches cross the process boundary as msgspec MessagePack: ``SignBatch``
(issuer, list of ResponseData DER) in, ``Signed`` (signature values, DER
ECDSA-Sig-Value or RSA octets) or ``Failed`` out. A PKCS#11 error
reopens the worker's sessions, after a bounded backoff (``backoff``), and
goes on from the failed item (``retries`` consecutive failures end the
batch); a worker that dies is restarted and its batches re-sent.
A batch that still fails comes back as ``Failed``: never a silent skip.
Signing, login, token and key errors name the issuer, the key's PKCS#11
URI and, where the module returned one, the CK_RV (``describe_error``).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import re
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait

import msgspec

from ocspmint.encoder import ecdsa_signature
from ocspmint.issuer import IssuerIdentity
from ocspmint.pkcs11uri import UriError, parse, read_pin

IN_FLIGHT_PER_WORKER = 2
BACKOFF_BASE = 0.1  # seconds before the first reopen after a PKCS#11 error
BACKOFF_CAP = 5.0  # seconds, the longest wait between two attempts
# python-pkcs11 exception names that do not spell their CK_RV (the CKR_ names of pkcs11t.h)
_CKR_SPELLING = {
    "AnotherUserAlreadyLoggedIn": "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
    "FunctionCancelled": "CKR_FUNCTION_CANCELED",
    "RandomNoRNG": "CKR_RANDOM_NO_RNG",
    "SessionReadWriteSOExists": "CKR_SESSION_READ_WRITE_SO_EXISTS",
    "SlotIDInvalid": "CKR_SLOT_ID_INVALID",
    "TokenNotRecognised": "CKR_TOKEN_NOT_RECOGNIZED",
}


class SignerError(Exception):
    """The signer pool cannot sign at all (login failed, key missing...)."""


class KeySpec(msgspec.Struct, frozen=True):
    """How a worker finds one issuer's signing key. Holds no PIN."""

    issuer: str
    module: str
    uri: str
    pin_env: str
    pin_file: str
    key_type: str
    hash_name: str


class SignBatch(msgspec.Struct, tag=True):
    batch: int
    issuer: str
    tbs: list[bytes]


class Signed(msgspec.Struct, tag=True):
    batch: int
    signatures: list[bytes]


class Failed(msgspec.Struct, tag=True):
    batch: int
    error: str


class Ready(msgspec.Struct, tag=True):
    pid: int


class Fatal(msgspec.Struct, tag=True):
    error: str


Reply = Signed | Failed | Ready | Fatal
_encode = msgspec.msgpack.Encoder().encode
_decode_reply = msgspec.msgpack.Decoder(Reply).decode
_decode_batch = msgspec.msgpack.Decoder(SignBatch).decode


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


def backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` (≥ 1) consecutive PKCS#11 errors
    before reopening the sessions: BACKOFF_BASE doubled per failure, at
    most BACKOFF_CAP. A token that comes back (HSM failover, a reinserted
    token) within the sum of these waits loses no batch."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (failures - 1))


def key_spec(issuer: IssuerIdentity) -> KeySpec:
    """The worker-side description of ``issuer``'s signer; raises UriError."""
    s = issuer.config.signer
    uri = parse(s.uri)
    module = s.module or uri.query.get("module-path", "")
    if not module:
        raise UriError(f"issuer {issuer.name}: no PKCS#11 module (signer.module or module-path in the URI)")
    return KeySpec(issuer.name, module, s.uri, s.pin_env, s.pin_file, issuer.signer.key_type, issuer.signer.hash_name)


class _Keys:
    """Worker-side sessions and key handles (one thread only)."""

    def __init__(self, specs: list[KeySpec]) -> None:
        self.specs = specs
        self.sessions: list = []
        self.keys: dict[str, tuple] = {}

    def open(self) -> None:
        import pkcs11
        from pkcs11 import Mechanism, ObjectClass

        for spec in self.specs:
            uri = parse(spec.uri)
            lib = pkcs11.lib(spec.module)
            try:
                token = lib.get_token(token_label=uri.text("token"), token_serial=uri.path.get("serial"))
            except pkcs11.exceptions.PKCS11Error as e:
                raise SignerError(f"issuer {spec.issuer}: token of {spec.uri} not found: {describe_error(e)}") from None
            pin = read_pin(uri, spec.pin_env, spec.pin_file, dict(os.environ))
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
            mech = Mechanism.ECDSA if spec.key_type == "ec" else Mechanism.SHA256_RSA_PKCS
            self.keys[spec.issuer] = (key, mech, spec)

    def close(self) -> None:
        for session in self.sessions:
            try:
                session.close()
            except Exception:  # noqa: BLE001 - the session is already gone
                pass
        self.sessions, self.keys = [], {}

    def sign_one(self, issuer: str, tbs: bytes) -> bytes:
        key, mech, spec = self.keys[issuer]
        if spec.key_type == "ec":
            return ecdsa_signature(key.sign(hashlib.new(spec.hash_name, tbs).digest(), mechanism=mech))
        return key.sign(tbs, mechanism=mech)


def worker_main(conn: Connection, specs_msg: bytes, retries: int) -> None:
    """Entry point of a spawned signer process (not for direct use)."""
    import pkcs11

    keys = _Keys(msgspec.msgpack.decode(specs_msg, type=list[KeySpec]))
    try:
        keys.open()
    except (SignerError, UriError, pkcs11.exceptions.PKCS11Error, OSError) as e:
        conn.send_bytes(_encode(Fatal(str(e) or type(e).__name__)))
        return
    conn.send_bytes(_encode(Ready(os.getpid())))
    while True:
        try:
            req = _decode_batch(conn.recv_bytes())
        except EOFError:
            break
        conn.send_bytes(_encode(_sign_with_retry(keys, req, retries)))
    keys.close()


def _sign_with_retry(keys: _Keys, req: SignBatch, retries: int) -> Signed | Failed:
    """Sign every item; after a PKCS#11 error wait ``backoff(n)``, reopen
    the sessions and go on from the failed item. Fails after ``retries``
    consecutive errors with no signature made in between, naming the
    issuer, its key URI and the first and last error of that streak."""
    import pkcs11

    signatures: list[bytes] = []
    failures, first = 0, ""
    while len(signatures) < len(req.tbs):
        try:
            if not keys.keys:
                keys.open()
            signatures.append(keys.sign_one(req.issuer, req.tbs[len(signatures)]))
            failures = 0
        except (pkcs11.exceptions.PKCS11Error, SignerError) as e:
            error = describe_error(e)
            keys.close()
            failures += 1
            first = error if failures == 1 else first
            if failures >= retries:
                uri = next((s.uri for s in keys.specs if s.issuer == req.issuer), "")
                errors = error if error == first else f"first {first}, last {error}"
                return Failed(req.batch, f"issuer {req.issuer}: key {uri}: PKCS#11 signing failed {retries} times "
                                         f"in a row on fresh sessions: {errors}")
            time.sleep(backoff(failures))
    return Signed(req.batch, signatures)


class SignerPool:
    """N spawned signer processes; use as a context manager.

    ``submit()`` a SignBatch when ``has_capacity()``; ``collect()`` yields
    Signed/Failed replies. Raises SignerError on start when a worker cannot
    log in or find its key (the message names the issuer and URI, never
    the PIN).
    """

    def __init__(self, specs: list[KeySpec], workers: int, retries: int, timeout: float = 60.0) -> None:
        self._specs = _encode(specs)
        self._n = workers or os.cpu_count() or 1
        self._retries = retries
        self._timeout = timeout
        self._progress: dict[Connection, float] = {}  # last send to an idle worker or reply from it (monotonic)
        self._hung: set[Connection] = set()
        self._ctx = mp.get_context("spawn")
        self._workers: dict[Connection, mp.process.BaseProcess] = {}
        self._inflight: dict[Connection, dict[int, SignBatch]] = {}
        self._attempts: dict[int, int] = {}
        self.restarts = 0

    def __enter__(self) -> SignerPool:
        for _ in range(self._n):
            self._spawn()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self) -> Connection:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=worker_main, args=(child, self._specs, self._retries), daemon=True)
        proc.start()
        child.close()
        try:
            if not parent.poll(self._timeout):
                proc.kill()
                raise EOFError
            first = _decode_reply(parent.recv_bytes())
        except EOFError:
            proc.join(5)
            raise SignerError(f"signer process exited or hung at start (exit code {proc.exitcode}; "
                              f"timeout {self._timeout:g} s)") from None
        if isinstance(first, Fatal):
            proc.join(5)
            raise SignerError(first.error)
        self._workers[parent] = proc
        self._inflight[parent] = {}
        return parent

    @property
    def workers(self) -> int:
        return self._n

    def has_capacity(self) -> bool:
        return any(len(b) < IN_FLIGHT_PER_WORKER for b in self._inflight.values())

    def busy(self) -> bool:
        return any(self._inflight.values())

    def submit(self, batch: SignBatch) -> None:
        conn = min(self._inflight, key=lambda c: len(self._inflight[c]))
        if not self._inflight[conn]:
            self._progress[conn] = time.monotonic()
        self._inflight[conn][batch.batch] = batch
        self._attempts[batch.batch] = self._attempts.get(batch.batch, 0) + 1
        conn.send_bytes(_encode(batch))

    def collect(self, timeout: float | None = None) -> Iterator[Signed | Failed]:
        """Yield the replies that arrive within ``timeout`` seconds. A
        worker that made no progress for the pool's timeout (a hung HSM)
        is killed; its batches are re-sent to a fresh worker like a dead
        worker's."""
        now = time.monotonic()
        deadlines = [self._progress[c] + self._timeout for c, b in self._inflight.items() if b and c not in self._hung]
        for conn, batches in self._inflight.items():
            if batches and now > self._progress[conn] + self._timeout and conn not in self._hung:
                self._hung.add(conn)
                self._workers[conn].kill()
        if deadlines:  # wake up in time to notice a hung worker
            soonest = max(0.0, min(deadlines) - now) + 0.01
            timeout = soonest if timeout is None else min(timeout, soonest)
        for conn in wait(list(self._inflight), timeout):
            try:
                reply = _decode_reply(conn.recv_bytes())
            except (EOFError, OSError):
                yield from self._replace_dead(conn)
                continue
            self._inflight[conn].pop(reply.batch, None)
            self._attempts.pop(reply.batch, None)
            self._progress[conn] = time.monotonic()
            yield reply

    def _replace_dead(self, conn: Connection) -> Iterator[Failed]:
        proc = self._workers.pop(conn)
        lost = self._inflight.pop(conn)
        self._progress.pop(conn, None)
        why = f"signer process hung (no signature for {self._timeout:g} s)" if conn in self._hung else \
            "signer process died"
        self._hung.discard(conn)
        proc.join(5)
        conn.close()
        self._spawn()
        self.restarts += 1
        for batch in lost.values():
            if self._attempts[batch.batch] >= self._retries:
                yield Failed(batch.batch, f"{why} (exit code {proc.exitcode}) {self._retries} times")
            else:
                self.submit(batch)

    def close(self) -> None:
        for conn, proc in self._workers.items():
            conn.close()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
        self._workers.clear()
        self._inflight.clear()

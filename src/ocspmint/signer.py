"""Signer pool: worker processes that sign ResponseData through PKCS#11
(or, for tests and demos only, with a software key file).

Workers are started with the ``spawn`` method, so none inherits PKCS#11
state from the parent; each initialises the module, logs in once and keeps
its key handles. Two PKCS#11 backends (``signing.backend``):

- ``native``: the C extension ``ocspmint._p11native`` (native/README.md).
  It initialises the module with ``CKF_OS_LOCKING_OK`` and signs each batch
  over ``signing.sessions`` sessions, one thread each, with the GIL released.
- ``python``: python-pkcs11, which calls ``C_Initialize(NULL)``, so SoftHSM2
  runs without mutexes: each worker signs from one thread, one session.

``auto`` (the default) takes ``native`` when the extension imports. Both
give the same bytes (RSA PKCS#1 v1.5 is deterministic; ECDSA differs only
in its random k). An issuer whose signer gives ``key_file`` instead of a
PKCS#11 URI signs with pyca cryptography: not for production CA keys.

Batches cross the process boundary as msgspec MessagePack: ``SignBatch``
(issuer, list of ResponseData DER) in, ``Signed`` (signature values, DER
ECDSA-Sig-Value or RSA octets) or ``Failed`` out. With ``signing.verify``
(the pool gets an ``IssuerCheck`` per issuer) a batch also carries what
the ledger says of each serial (``Expect``), and the worker assembles each
OCSPResponse and verifies it (``verifier.verify_response``) before
replying ``Checked``: responses that passed, findings for those that did
not. Verification then runs in every worker process, not in the one
parent: it scales with ``signing.workers``, and within a worker a second
thread verifies one batch while the first signs the next (bench/RESULTS.md).
Only the first thread calls PKCS#11. With the native backend it keeps the
next batch queued behind the one signing (``PIPELINE``), so that no session
waits at a batch's end for the others' last signatures. A PKCS#11 error
reopens the worker's sessions, after a bounded backoff (``backoff``), and
goes on from the failed items (``retries`` consecutive failures end the
batch); a worker that dies is restarted and its batches re-sent.
A batch that still fails comes back as ``Failed``: never a silent skip.
Signing, login, token and key errors name the issuer, the key's PKCS#11
URI and, where the module returned one, the CK_RV (``describe_error``,
``describe_rv``).
"""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from multiprocessing.connection import Connection, wait

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ocspmint.config import Config, Issuer
from ocspmint.encoder import ResponseTemplate
from ocspmint.issuer import IssuerIdentity, identity
from ocspmint.model import Kind, LedgerEntry, Reason, Status, serial_hex, utc_now
from ocspmint.pkcs11uri import UriError
from ocspmint.verifier import Expectation, verify_response
from ocspmint.signkeys import (SOFTWARE, Attempt, Done, KeySpec, SignerError, _Keys, describe_error, describe_rv, key_spec,
                               resolve_backend)

__all__ = ["SOFTWARE", "Checked", "Expect", "Failed", "IssuerCheck", "KeySpec", "PoolStart", "SignBatch", "Signed",
           "SignerError", "SignerPool", "backoff", "describe_error", "describe_rv", "expect", "key_spec", "resolve_backend",
           "signer_pool"]

# Batches queued per worker: enough that it keeps signing while the parent
# journals 4,096 rows at once (~45 ms, Runner.JOURNAL_ROWS) and stores what
# the ledger pass held back; 2 left SoftHSM2 idle then, 8 signs ~4 % faster
# than 4 (bench/RESULTS.md: 2026-11-21 in-flight batches, 2026-11-22 03:50).
IN_FLIGHT_PER_WORKER = 8
# Batches a native-backend worker keeps queued on its sessions: the next one
# is taken up by each session as it finishes its share of the last, so a
# network HSM's many sessions stay busy across batch ends (bench/RESULTS.md).
PIPELINE = 2
BACKOFF_BASE = 0.1  # seconds before the first reopen after a PKCS#11 error
BACKOFF_CAP = 5.0  # seconds, the longest wait between two attempts


class Expect(msgspec.Struct, frozen=True, array_like=True):
    """What the ledger says of one serial of a batch, for the worker's
    verification: the LedgerEntry without issuer and source, the serial
    as 40-digit hex (MessagePack integers stop at 64 bits)."""

    serial: str
    kind: Kind
    not_after: dt.datetime
    status: Status
    revoked_at: dt.datetime | None
    reason: Reason | None


def expect(entry: LedgerEntry) -> Expect:
    return Expect(serial_hex(entry.serial), entry.kind, entry.not_after, entry.status, entry.revoked_at, entry.reason)


class SignBatch(msgspec.Struct, tag=True):
    """ResponseData DER to sign for ``issuer``. ``expect`` (one per item,
    with ``validity``, the configured nextUpdate − thisUpdate in seconds):
    assemble and verify each response in the worker, reply ``Checked``."""

    batch: int
    issuer: str
    tbs: list[bytes]
    expect: list[Expect] | None = None
    validity: int = 0


class Signed(msgspec.Struct, tag=True):
    batch: int
    signatures: list[bytes]


class Checked(msgspec.Struct, tag=True):
    """Per item of a batch with ``expect``: the OCSPResponse DER and ""
    when it passed every check, or b"" and the verifier's findings."""

    batch: int
    responses: list[bytes]
    findings: list[str]


class IssuerCheck(msgspec.Struct, frozen=True):
    """What a worker needs to assemble and verify an issuer's responses:
    its config, certificate and delegated responder certificate (DER; b""
    when the CA's own key signs), and the CertID hash names in order."""

    issuer: Issuer
    ca: bytes
    responder: bytes
    hashes: tuple[str, ...]


def _issuer_check(issuer: IssuerIdentity, hashes: tuple[str, ...]) -> IssuerCheck:
    responder = issuer.signer.cert_der if issuer.signer.delegated else b""
    return IssuerCheck(issuer.config, issuer.cert.public_bytes(serialization.Encoding.DER), responder, hashes)


class Failed(msgspec.Struct, tag=True):
    batch: int
    error: str


class Ready(msgspec.Struct, tag=True):
    pid: int
    backends: dict[str, str] = {}  # issuer -> "native", "python" or "software-key"


class Fatal(msgspec.Struct, tag=True):
    error: str


Reply = Signed | Checked | Failed | Ready | Fatal
_encode = msgspec.msgpack.Encoder().encode
_decode_reply = msgspec.msgpack.Decoder(Reply).decode
_decode_batch = msgspec.msgpack.Decoder(SignBatch).decode


def backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` (≥ 1) consecutive PKCS#11 errors
    before reopening the sessions: BACKOFF_BASE doubled per failure, at
    most BACKOFF_CAP. A token that comes back (HSM failover, a reinserted
    token) within the sum of these waits loses no batch."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (failures - 1))


def worker_main(conn: Connection, specs_msg: bytes, retries: int, backend: str = "python", sessions: int = 1,
                checks_msg: bytes = b"") -> None:
    """Entry point of a spawned signer process (not for direct use)."""
    # Ctrl-C at a terminal reaches the whole process group: the parent ends the run and closes
    # the pipes, which ends this process (no KeyboardInterrupt traceback from each worker)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    checks = msgspec.msgpack.decode(checks_msg, type=list[IssuerCheck]) if checks_msg else []
    checkers = {c.issuer.name: _checker(c) for c in checks}

    try:
        used = resolve_backend(backend)
    except SignerError as e:
        conn.send_bytes(_encode(Fatal(str(e))))
        return
    keys = _Keys(msgspec.msgpack.decode(specs_msg, type=list[KeySpec]), used, sessions)
    try:
        keys.open()
    except (UriError, OSError, *keys.errors()) as e:
        conn.send_bytes(_encode(Fatal(str(e) or type(e).__name__)))
        return
    conn.send_bytes(_encode(Ready(os.getpid(), keys.backends())))
    signed: queue.SimpleQueue[tuple[SignBatch, Signed | Failed] | None] = queue.SimpleQueue()
    replier = threading.Thread(target=_reply_loop, args=(conn, signed, checkers), name="verify", daemon=True)
    replier.start()
    _sign_loop(conn, keys, retries, signed)  # this thread alone calls PKCS#11 (python-pkcs11: SoftHSM2 without mutexes)
    signed.put(None)
    replier.join()
    keys.close()


def _sign_loop(conn: Connection, keys: _Keys, retries: int,
               signed: queue.SimpleQueue[tuple[SignBatch, Signed | Failed] | None]) -> None:
    """Sign the batches the parent sends, in order, until it closes the
    pipe. A pipelined key holder gets up to ``PIPELINE`` batches at once
    (the next is queued while one signs, when the parent has sent it
    already). A batch that failed anywhere waits until those behind it are
    done, since a retry reopens every session; they are then signed again
    from the start on the new sessions, so an attempt on sessions that had
    already failed never counts against a batch's ``retries``."""
    depth = PIPELINE if keys.pipelined else 1
    pending: deque[tuple[SignBatch, Attempt | None]] = deque()
    open_pipe = True
    while open_pipe or pending:
        while open_pipe and len(pending) < depth and (not pending or conn.poll()):
            try:
                req = _decode_batch(conn.recv_bytes())
            except (EOFError, OSError):  # the parent closed the pipe, or it broke as the parent went (Ctrl-C)
                open_pipe = False
                break
            pending.append((req, _attempt(keys, req.issuer, req.tbs)))
        if not pending:
            continue
        req, first = pending.popleft()
        if first is not None and not _all_signed(first):
            for _, behind in pending:  # let them finish on the old sessions, then sign them afresh after the reopen:
                if behind is not None:  # each batch's attempts count on sessions opened after the last failure
                    behind.result()
            pending = deque((r, None) for r, _ in pending)
        signed.put((req, _sign_with_retry(keys, req, retries, first)))


def _all_signed(attempt: Attempt) -> bool:
    results, error = attempt.result()
    return not error and all(isinstance(r, bytes) for r in results)


def _attempt(keys: _Keys, issuer: str, tbs: list[bytes]) -> Attempt:
    """Submit one signing attempt, opening the keys first when a retry
    closed them; an error on the way is an attempt that failed."""
    try:
        if not keys.keys:
            keys.open()
        return keys.submit(issuer, tbs)
    except keys.errors() as e:
        return Done([], describe_error(e))


def _reply_loop(conn: Connection, signed: queue.SimpleQueue[tuple[SignBatch, Signed | Failed] | None],
                checkers: dict[str, tuple[IssuerIdentity, ResponseTemplate]]) -> None:
    """Verify each signed batch that asks for it and send the reply, while
    the signing thread signs the next batch (the native backend releases
    the GIL while the token signs)."""
    while (job := signed.get()) is not None:
        req, reply = job
        if req.expect is not None and isinstance(reply, Signed) and req.issuer in checkers:
            try:
                reply = _checked(checkers[req.issuer], req, reply)  # else the Runner refuses to publish the batch
            except Exception as e:  # a batch it cannot verify fails now, named, instead of never coming back
                reply = Failed(req.batch, f"issuer {req.issuer}: the signer process could not verify the batch: "
                                          f"{type(e).__name__}: {e}")
        try:
            conn.send_bytes(_encode(reply))
        except OSError:  # the parent is gone: the signing thread sees EOF next
            return


def _checker(check: IssuerCheck) -> tuple[IssuerIdentity, ResponseTemplate]:
    responder = x509.load_der_x509_certificate(check.responder) if check.responder else None
    ident = identity(check.issuer, x509.load_der_x509_certificate(check.ca), responder)
    return ident, ResponseTemplate(ident, check.hashes)


def _checked(checker: tuple[IssuerIdentity, ResponseTemplate], req: SignBatch, signed: Signed) -> Checked:
    """Assemble every response of a signed batch and verify it against
    its ``Expect`` (RFC 6960 / BR checks of ``verify_response``)."""
    ident, template = checker
    now, validity = utc_now(), dt.timedelta(seconds=req.validity)
    responses, findings = [], []
    for tbs, signature, e in zip(req.tbs, signed.signatures, req.expect or (), strict=True):
        response = template.response(tbs, signature)
        entry = LedgerEntry(req.issuer, int(e.serial, 16), e.kind, e.not_after, e.status, e.revoked_at, e.reason)
        found = verify_response(response, ident, Expectation(entry, template.hashes, validity), now)
        responses.append(b"" if found else response)
        findings.append("; ".join(found))
    return Checked(req.batch, responses, findings)


def _sign_with_retry(keys: _Keys, req: SignBatch, retries: int, attempt: Attempt | None = None) -> Signed | Failed:
    """Sign every item (``attempt``: the first attempt, submitted
    already); after a PKCS#11 error wait ``backoff(n)``, reopen the
    sessions and go on with the items not signed yet. Fails after
    ``retries`` consecutive failed attempts with no signature made in
    between, naming the issuer, its key URI and the first and last error
    of that streak. No other attempt may be signing meanwhile: a retry
    closes every session."""
    signatures: list[bytes] = [b""] * len(req.tbs)
    todo = list(range(len(req.tbs)))
    failures, first = 0, ""
    while todo:
        made = 0
        if attempt is None:
            attempt = _attempt(keys, req.issuer, [req.tbs[i] for i in todo])
        results, error = attempt.result()
        attempt = None
        left = []
        for n, i in enumerate(todo):
            r = results[n] if n < len(results) else None
            if isinstance(r, bytes):
                signatures[i] = r
                made += 1
            else:
                left.append(i)
                error = error or r or ""
        todo = left
        if not todo:
            break
        error = error or "no live session took the items"
        keys.close()
        failures = 1 if made else failures + 1
        first = error if failures == 1 else first
        if failures >= retries:
            uri = next((s.uri or s.key_file for s in keys.specs if s.issuer == req.issuer), "")
            errors_text = error if error == first else f"first {first}, last {error}"
            return Failed(req.batch, f"issuer {req.issuer}: key {uri}: PKCS#11 signing failed {retries} times "
                                     f"in a row on fresh sessions: {errors_text}")
        time.sleep(backoff(failures))
    return Signed(req.batch, signatures)


class SignerPool:
    """N spawned signer processes; use as a context manager.

    ``submit()`` a SignBatch when ``has_capacity()``; ``collect()`` yields
    Signed/Failed replies. Raises SignerError on start when a worker cannot
    log in or find its key (the message names the issuer and URI, never
    the PIN). ``backend`` is ``signing.backend`` ("auto", "native",
    "python"), ``sessions`` the native backend's sessions (threads) per key
    and worker; ``backends`` maps each issuer to the backend its workers
    use ("native", "python" or "software-key"), known once started.
    """

    def __init__(self, specs: list[KeySpec], workers: int, retries: int, timeout: float = 60.0,
                 backend: str = "auto", sessions: int = 1, checks: list[IssuerCheck] | None = None) -> None:
        self._specs = _encode(specs)
        self._checks = _encode(checks) if checks else b""
        self._software = [(s.issuer, s.key_file) for s in specs if s.key_file]
        self._n = workers or os.cpu_count() or 1
        self._retries = retries
        self._timeout = timeout
        self._backend, self._sessions = backend, sessions
        self.backends: dict[str, str] = {}
        self._progress: dict[Connection, float] = {}  # last send to an idle worker or reply from it (monotonic)
        self._hung: set[Connection] = set()
        self._ctx = mp.get_context("spawn")
        self._workers: dict[Connection, mp.process.BaseProcess] = {}
        self._inflight: dict[Connection, dict[int, SignBatch]] = {}
        self._attempts: dict[int, int] = {}
        self.restarts = 0

    def __enter__(self) -> SignerPool:
        if self._software:  # one line per pool start (per run)
            keys = ", ".join(f"{issuer} ({path})" for issuer, path in self._software)
            print(f"ocspmint: WARNING: signing with software key files, not for production CA keys: {keys}",
                  file=sys.stderr, flush=True)
        for _ in range(self._n):
            self._spawn()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self) -> Connection:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=worker_main, daemon=True,
                                 args=(child, self._specs, self._retries, self._backend, self._sessions, self._checks))
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
        if isinstance(first, Ready):
            self.backends = first.backends
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


def signer_pool(config: Config, issuers: dict[str, IssuerIdentity]) -> SignerPool:
    """The pool ``config.signing`` describes for ``issuers`` (not started);
    with ``signing.verify`` its workers verify what they sign. Raises
    UriError for an unusable signer URI or PIN source: the PIN is read and
    checked here (``key_spec``), before any worker logs in."""
    s, hashes = config.signing, tuple(config.response.certid_hashes)
    checks = [_issuer_check(i, hashes) for i in issuers.values()] if s.verify else None
    return SignerPool([key_spec(i) for i in issuers.values()], s.workers, s.retries, s.timeout.total_seconds(),
                      s.backend, s.sessions, checks)


class PoolStart:
    """``pool`` started on a background thread, so that its workers spawn
    and log in while the caller does other work (`ocspmint run` reads the
    ledger meanwhile). ``start()`` begins (once); ``pool()`` starts it if
    not begun, waits, and returns it entered or raises what
    ``SignerPool.__enter__`` raised (SignerError); ``close()`` (also on
    leaving a ``with`` block) waits for a start begun and closes the pool.
    The waits are on an Event, not ``Thread.join``: a join interrupted by
    Ctrl-C may return at once the next time (CPython 3.11), and ``close``
    would then meet workers still being added."""

    def __init__(self, pool: SignerPool) -> None:
        self._pool = pool
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._enter, name="signer-start", daemon=True)
            self._thread.start()

    def _enter(self) -> None:
        try:
            self._pool.__enter__()
        except BaseException as e:  # re-raised in the caller's thread by pool()
            self._error = e
        finally:
            self._started.set()

    def pool(self) -> SignerPool:
        self.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self._pool

    def __enter__(self) -> PoolStart:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._thread is not None:
            self._started.wait()
            self._pool.close()
        self._thread = None

"""Peers and ceilings: ocspmint against cfssl, openssl ocsp, a pyca loop and openssl speed.

Usage::

    .venv/bin/python bench/peers.py [--serials 20000] [--key ec-p256|rsa-2048]
        [--repeat 3] [--workers 1] [--speed-seconds 3] [--inflight 4]
        [--openssl-mode server|process] [--store-dir DIR] [--json FILE] [--markdown]

One population for everyone: ``sign_throughput.synthetic_entries`` (random
16-byte serials, ~5 % revoked, ~30 % precertificates, notAfter 90 days
ahead) for the demo's issuing CA (``build_demo``, P-256 CA key on disk). The
delegated responder key has type ``--key`` everywhere: inside the SoftHSM2
token for ocspmint, a software key (PKCS#8 PEM, its own responder
certificate from the same CA) for the peers. Every response: validity
7 days, responder certificate included, SHA-256 signature. Per repetition:

(d) ceilings: ``openssl speed -seconds S ecdsap256|rsa2048``, sign/s, one
    process and ``-multi 2``. openssl speed also times verification for S
    seconds, which is not used.
(a) cfssl ``ocsprefresh`` (Debian golang-cfssl, 1.2.0 of 2016) on a fresh
    copy of a SQLite certdb in cfssl's schema holding the N certificates (real
    certificates of the CA made with pyca; precertificates carry the CT
    poison). Rate = N / wall time of the whole command. That includes what
    cfssl does per certificate: SELECT of every unexpired row, PEM parse,
    CheckSignatureFrom(CA) (an ECDSA verify), sign, then UPDATE + INSERT each
    in its own SQLite transaction (autocommit, a journal sync each).
(b) ``openssl ocsp`` as a responder (``-index``, ``-rsigner``, ``-rkey``,
    ``-CA``, ``-resp_key_id``, ``-ndays 7``) answering N POSTed requests, one
    CertID each; ``--inflight`` connections are kept open so that the
    single-process server never waits for the Python client (OpenSSL 3.0's
    responder closes the connection after each response: one TCP connection
    per request). Rate = N / (last response − first connect); the index
    (N lines) is loaded before the clock starts. Each response is written to
    a file by the client. Why the server and not one ``openssl ocsp -reqin
    -respout`` per request: that mode measures process start, config and key
    loading, and parsing the whole index.txt, for every response, which
    would be O(N) per response. The server mode is the one that amortises
    setup, as ocspmint and cfssl do. OpenSSL 3.0 can only bind it to all
    interfaces (``-port`` is a number), so it runs with its client in a
    private network namespace (``unshare --net`` as root, else ``unshare
    --user --map-root-user --net``); without one, or
    with ``--openssl-mode process``, the per-process mode runs on the first
    min(N, 500) requests and is labelled as such.
(c) a plain Python loop with pyca cryptography: ``OCSPResponseBuilder``
    (``add_response_by_hash``: the CertID from the serial, as ocspmint does,
    no certificate parsing), software key, ``sign`` + DER + one file per
    response (``write_bytes``: no fsync, no rename). Rate = N / loop time.
(e) ocspmint itself (``sign_throughput``'s machinery): the raw python-pkcs11
    token ceiling with ``--workers`` processes, then ``ocspmint run`` to the
    file store, verification off and on. Rate = N / command wall time.

Every peer's output is parsed afterwards (outside the timing): one
successful response per serial with the ledger's status; the first 100
signatures are checked against the responder key. "CPU µs/response" is
user + system time of every process involved (children via
RUSAGE_CHILDREN; for (b) the server plus the Python client; for (c) and
the client, ``time.process_time``) divided by N: with 2 cores a rate alone
hides how many cores it used. Ratios are medians over repetitions of
per-repetition ratios. The script exits 1 if any output check fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import resource
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sign_throughput as st  # noqa: E402  (bench/ is not a package)

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa  # noqa: E402
from cryptography.x509 import ocsp  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from ocspmint.demo import RESPONDER_KEYS, Demo, build_demo  # noqa: E402
from ocspmint.ledger.sqlite import write_entries  # noqa: E402
from ocspmint.model import LedgerEntry, Status  # noqa: E402

KEYS = tuple(k for k in RESPONDER_KEYS if k in ("ec-p256", "rsa-2048"))
SPEED_ALG = {"ec-p256": "ecdsap256", "rsa-2048": "rsa2048"}
VALIDITY = dt.timedelta(days=7)
SIG_SAMPLE = 100  # signatures checked per peer output
PROCESS_MODE_MAX = 500  # requests for the one-process-per-request openssl mode
# cfssl's SQLite certdb schema: certdb/sqlite/migrations/001_CreateCertificates.sql
# at cloudflare/cfssl 7fb22c8, the commit Debian's golang-cfssl 1.2.0+git20160825 is built from.
CFSSL_SCHEMA = """
CREATE TABLE certificates (
  serial_number            blob NOT NULL,
  authority_key_identifier blob NOT NULL,
  ca_label                 blob,
  status                   blob NOT NULL,
  reason                   int,
  expiry                   timestamp,
  revoked_at               timestamp,
  pem                      blob NOT NULL,
  PRIMARY KEY(serial_number, authority_key_identifier)
);
CREATE TABLE ocsp_responses (
  serial_number            blob NOT NULL,
  authority_key_identifier blob NOT NULL,
  body                     blob NOT NULL,
  expiry                   timestamp,
  PRIMARY KEY(serial_number, authority_key_identifier),
  FOREIGN KEY(serial_number, authority_key_identifier) REFERENCES certificates(serial_number, authority_key_identifier)
);
"""


@dataclass
class Row:
    """One measurement over repetitions (same index = same repetition)."""

    key: str
    what: str
    seconds: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    cpu: list[float | None] = field(default_factory=list)  # CPU seconds, all processes
    count: int = 0  # responses (or signatures) per repetition

    def add(self, seconds: float, count: int, cpu: float | None) -> None:
        self.seconds.append(seconds)
        self.rates.append(count / seconds)
        self.cpu.append(cpu)
        self.count = count

    def add_rate(self, seconds: float, rate: float) -> None:
        """A rate measured by the tool itself (openssl speed)."""
        self.seconds.append(seconds)
        self.rates.append(rate)
        self.cpu.append(None)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_us(self) -> float | None:
        vals = [c / self.count * 1e6 for c in self.cpu if c is not None]
        return statistics.median(vals) if vals else None


def ratio(a: Row, b: Row) -> float | None:
    """Median over repetitions of a.rate / b.rate (same repetition)."""
    pairs = list(zip(a.rates, b.rates))
    return statistics.median(x / y for x, y in pairs) if pairs else None


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_timed(args: Sequence[str], **kw: Any) -> tuple[float, float, subprocess.CompletedProcess[bytes]]:
    """Run a command; (wall seconds, CPU seconds of it and its waited-for children, result)."""
    c0, t0 = children_cpu(), time.perf_counter()
    p = subprocess.run(list(args), capture_output=True, **kw)
    return time.perf_counter() - t0, children_cpu() - c0, p


# ---------------------------------------------------------------- the software CA side


@dataclass(frozen=True)
class Peer:
    """Files and keys the peers share (software responder, same CA as the demo)."""

    dir: Path
    ca_pem: Path
    ca: x509.Certificate
    responder_pem: Path
    responder_key_pem: Path
    responder: x509.Certificate
    responder_key: Any
    name_hash: bytes
    key_hash: bytes


def make_peer(demo: Demo, key_type: str, where: Path) -> Peer:
    """A software delegated responder (key type ``key_type``) certified by the demo's issuing CA."""
    where.mkdir(parents=True)
    ca = x509.load_pem_x509_certificate(demo.issuing_ca.read_bytes())
    ca_key = serialization.load_pem_private_key(demo.issuing_key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key: Any = (ec.generate_private_key(ec.SECP256R1()) if key_type == "ec-p256"
                else rsa.generate_private_key(public_exponent=65537, key_size=2048))
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ocspmint bench software responder")]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
            .add_extension(x509.OCSPNoCheck(), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem, resp_pem, key_pem = where / "ca.pem", where / "responder.pem", where / "responder-key.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    resp_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    key_pem.chmod(0o600)
    return Peer(where, ca_pem, ca, resp_pem, key_pem, cert, key,
                name_hash=hashlib.sha1(ca.subject.public_bytes()).digest(),
                key_hash=x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest)


def leaf_certificates(demo: Demo, entries: Sequence[LedgerEntry]) -> Iterable[tuple[LedgerEntry, x509.Certificate]]:
    """A real certificate of the demo CA per entry (one shared leaf key; CT poison on precertificates)."""
    ca = x509.load_pem_x509_certificate(demo.issuing_ca.read_bytes())
    ca_key = serialization.load_pem_private_key(demo.issuing_key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    leaf = ec.generate_private_key(ec.SECP256R1()).public_key()
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    start = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(hours=1)
    for e in entries:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"leaf-{e.serial:x}.example")]))
             .issuer_name(ca.subject).public_key(leaf).serial_number(e.serial)
             .not_valid_before(start).not_valid_after(e.not_after)
             .add_extension(aki, critical=False))
        if e.kind.value == "precertificate":
            b = b.add_extension(x509.PrecertPoison(), critical=True)
        yield e, b.sign(ca_key, hashes.SHA256())


# ---------------------------------------------------------------- output checks


def check_outputs(name: str, ders: Iterable[bytes], entries: Sequence[LedgerEntry], peer: Peer) -> None:
    """Every serial once, successful, the ledger's status; SIG_SAMPLE signatures verified. SystemExit otherwise."""
    want = {e.serial: e for e in entries}
    seen: set[int] = set()
    pub = peer.responder.public_key()
    for i, der in enumerate(ders):
        r = ocsp.load_der_ocsp_response(der)
        if r.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            raise SystemExit(f"{name}: response #{i} status {r.response_status}")
        e = want.get(r.serial_number)
        if e is None or r.serial_number in seen:
            raise SystemExit(f"{name}: response #{i} for unexpected or repeated serial {r.serial_number:#x}")
        seen.add(r.serial_number)
        expected = ocsp.OCSPCertStatus.REVOKED if e.status is Status.REVOKED else ocsp.OCSPCertStatus.GOOD
        if r.certificate_status != expected:
            raise SystemExit(f"{name}: serial {e.serial:#x} is {r.certificate_status}, ledger says {e.status}")
        if i < SIG_SAMPLE:
            algo = r.signature_hash_algorithm
            assert algo is not None
            try:
                if isinstance(pub, ec.EllipticCurvePublicKey):
                    pub.verify(r.signature, r.tbs_response_bytes, ec.ECDSA(algo))
                else:
                    assert isinstance(pub, rsa.RSAPublicKey)
                    pub.verify(r.signature, r.tbs_response_bytes, padding.PKCS1v15(), algo)
            except Exception as exc:
                raise SystemExit(f"{name}: bad signature on serial {e.serial:#x}: {exc!r}") from None
    if len(seen) != len(want):
        raise SystemExit(f"{name}: {len(seen)} responses for {len(want)} serials")


def read_dir(path: Path) -> Iterable[bytes]:
    for p in sorted(path.iterdir()):
        yield p.read_bytes()


# ---------------------------------------------------------------- (d) openssl speed


def openssl_speed(key_type: str, seconds: int, multi: int) -> float:
    """sign/s reported by ``openssl speed`` (all processes together with -multi)."""
    alg = SPEED_ALG[key_type]
    args = ["openssl", "speed", "-seconds", str(seconds)] + (["-multi", str(multi)] if multi > 1 else []) + [alg]
    p = subprocess.run(args, capture_output=True, text=True)
    marker = "ecdsa (nistp256)" if key_type == "ec-p256" else "rsa 2048 bits"
    for line in reversed(p.stdout.splitlines()):
        if marker in line:
            return float(line.split()[-2])  # ... sign verify sign/s verify/s
    raise SystemExit(f"openssl speed: no '{marker}' line (exit {p.returncode}):\n{p.stdout[-1000:]}{p.stderr[-1000:]}")


# ---------------------------------------------------------------- (a) cfssl ocsprefresh


def _sql_time(t: dt.datetime) -> str:
    # go-sqlite3's own format for time.Time ("2006-01-02 15:04:05.999999999-07:00"); sorts against
    # CURRENT_TIMESTAMP as text, which is what cfssl's "CURRENT_TIMESTAMP < expiry" compares.
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S+00:00")


def make_cfssl_db(path: Path, certs: Iterable[tuple[LedgerEntry, x509.Certificate]]) -> None:
    """A cfssl certdb (SQLite) with one certificates row per certificate, no OCSP responses."""
    conn = sqlite3.connect(path)
    conn.executescript(CFSSL_SCHEMA)
    rows = []
    for e, cert in certs:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        assert aki is not None
        revoked = e.status is Status.REVOKED
        # cfssl scans every column into non-pointer Go fields: NULL is an error, hence '' / 0 / zero time.
        rows.append((str(e.serial), aki.hex(), "", "revoked" if revoked else "good",
                     int(e.reason) if revoked and e.reason is not None else 0,
                     _sql_time(e.not_after),
                     _sql_time(e.revoked_at) if revoked and e.revoked_at else "0001-01-01 00:00:00+00:00",
                     cert.public_bytes(serialization.Encoding.PEM).decode()))
    with conn:
        conn.executemany("INSERT INTO certificates VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.close()


def cfssl_version() -> str:
    try:
        out = subprocess.run(["cfssl", "version"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return "not installed"
    pkg = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "golang-cfssl"], capture_output=True, text=True).stdout
    ver = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Version")), "?")
    rt = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Runtime")), "?")
    return f"{ver} (Debian golang-cfssl {pkg or '?'}, {rt})"


def run_cfssl(peer: Peer, pristine: Path, run_dir: Path, entries: Sequence[LedgerEntry]) -> tuple[float, float]:
    """``cfssl ocsprefresh`` over a fresh copy of the certdb; (wall s, CPU s)."""
    run_dir.mkdir(parents=True)
    db = run_dir / "certdb.sqlite"
    shutil.copyfile(pristine, db)
    conf = run_dir / "db-config.json"
    conf.write_text(json.dumps({"driver": "sqlite3", "data_source": str(db)}))
    wall, cpu, p = run_timed(["cfssl", "ocsprefresh", "-db-config", str(conf), "-ca", str(peer.ca_pem),
                              "-responder", str(peer.responder_pem), "-responder-key", str(peer.responder_key_pem),
                              "-interval", f"{int(VALIDITY.total_seconds() // 3600)}h"])
    if p.returncode != 0:
        raise SystemExit(f"cfssl ocsprefresh failed (exit {p.returncode}):\n{p.stderr.decode(errors='replace')[-2000:]}")
    conn = sqlite3.connect(db)
    conn.text_factory = bytes  # cfssl stores the DER as a Go string: TEXT that is not UTF-8
    bodies = [bytes(b) for (b,) in conn.execute("SELECT body FROM ocsp_responses")]
    conn.close()
    check_outputs("cfssl ocsprefresh", bodies, entries, peer)
    return wall, cpu


# ---------------------------------------------------------------- (b) openssl ocsp


def _openssl_time(t: dt.datetime) -> str:
    t = t.astimezone(dt.timezone.utc)
    return t.strftime("%y%m%d%H%M%SZ") if t.year < 2050 else t.strftime("%Y%m%d%H%M%SZ")


def write_index(path: Path, entries: Iterable[LedgerEntry]) -> None:
    """An `openssl ca` index.txt: status, notAfter, revocation[,reason], serial hex, file, subject."""
    lines = []
    for e in entries:
        h = format(e.serial, "X")
        h = h if len(h) % 2 == 0 else "0" + h
        if e.status is Status.REVOKED:
            assert e.revoked_at is not None
            rev = _openssl_time(e.revoked_at) + (f",{e.reason.name}" if e.reason is not None else "")
            lines.append(f"R\t{_openssl_time(e.not_after)}\t{rev}\t{h}\tunknown\t/CN=leaf-{e.serial:x}.example")
        else:
            lines.append(f"V\t{_openssl_time(e.not_after)}\t\t{h}\tunknown\t/CN=leaf-{e.serial:x}.example")
    path.write_text("\n".join(lines) + "\n")
    Path(str(path) + ".attr").write_text("unique_subject = no\n")


def ocsp_requests(peer: Peer, entries: Iterable[LedgerEntry]) -> list[bytes]:
    """One DER OCSPRequest (one CertID, SHA-1, no nonce) per entry."""
    return [ocsp.OCSPRequestBuilder().add_certificate_by_hash(peer.name_hash, peer.key_hash, e.serial, hashes.SHA1())
            .build().public_bytes(serialization.Encoding.DER) for e in entries]


def responder_args(peer: Peer, index: Path) -> list[str]:
    return ["openssl", "ocsp", "-index", str(index), "-CA", str(peer.ca_pem), "-rsigner", str(peer.responder_pem),
            "-rkey", str(peer.responder_key_pem), "-resp_key_id", "-ndays", str(VALIDITY.days)]


def _loopback_up() -> None:
    """Bring `lo` up in a fresh network namespace (SIOCGIFFLAGS / SIOCSIFFLAGS, IFF_UP)."""
    import fcntl
    import struct

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, 0x8913, struct.pack("16sH14s", b"lo", 0, b"")))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", flags | 1, b""))
    finally:
        s.close()


def _http_post(body: bytes) -> bytes:
    return (b"POST / HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/ocsp-request\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


def openssl_server_child(spec_file: str) -> int:
    """Inside ``unshare --net``: start the responder, send every request, print JSON (seconds, cpu)."""
    spec = json.loads(Path(spec_file).read_text())
    _loopback_up()
    blob, i = Path(spec["requests"]).read_bytes(), 0
    reqs: list[bytes] = []
    while i < len(blob):  # 2-byte big-endian length, DER
        size = int.from_bytes(blob[i:i + 2], "big")
        reqs.append(_http_post(blob[i + 2:i + 2 + size]))
        i += 2 + size
    out = Path(spec["out"])
    out.mkdir(parents=True)
    with socket.socket() as probe:  # a private namespace: any port is free; pick one anyway
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = out.parent / "openssl-ocsp.log"
    c0 = children_cpu()
    with log.open("wb") as logf:
        server = subprocess.Popen([*spec["args"], "-port", str(port), "-nrequest", str(len(reqs))],
                                  stdout=logf, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while b"waiting for OCSP client connections" not in log.read_bytes():  # index loaded, listening
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            print(json.dumps({"error": f"openssl ocsp did not start: {log.read_text(errors='replace')[-1500:]}"}))
            return 1
        time.sleep(0.01)
    inflight: deque[socket.socket] = deque()
    nxt, done, k = 0, 0, spec["inflight"]
    p0 = time.process_time()
    t0 = time.perf_counter()
    try:
        while done < len(reqs):
            while nxt < len(reqs) and len(inflight) < k:  # queue up: the server accepts in order
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(reqs[nxt])
                inflight.append(s)
                nxt += 1
            s = inflight.popleft()
            chunks = []
            while True:
                d = s.recv(65536)
                if not d:
                    break
                chunks.append(d)
            s.close()
            resp = b"".join(chunks)
            head, _, body = resp.partition(b"\r\n\r\n")
            if not head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
                raise RuntimeError(f"request {done}: {head[:200]!r}")
            (out / f"{done:08d}.der").write_bytes(body)
            done += 1
        seconds = time.perf_counter() - t0
        client_cpu = time.process_time() - p0
        server.wait(timeout=60)
    except Exception as exc:
        server.kill()
        server.wait()
        print(json.dumps({"error": f"{exc!r}; server log: {log.read_text(errors='replace')[-1500:]}"}))
        return 1
    server_cpu = children_cpu() - c0
    print(json.dumps({"seconds": seconds, "cpu": client_cpu + server_cpu, "server_cpu": server_cpu,
                      "client_cpu": client_cpu, "server_exit": server.returncode}))
    return 0


def netns_prefix() -> list[str] | None:
    """The ``unshare`` command that gives a private network namespace here (root, or an
    unprivileged user namespace), or None."""
    if not shutil.which("unshare"):
        return None
    for prefix in (["unshare", "--net"], ["unshare", "--user", "--map-root-user", "--net"]):
        if prefix[1] == "--net" and os.geteuid() != 0:
            continue
        if subprocess.run([*prefix, "--", "true"], capture_output=True).returncode == 0:
            return prefix
    return None


def run_openssl_server(peer: Peer, index: Path, requests: list[bytes], run_dir: Path, inflight: int,
                       entries: Sequence[LedgerEntry], netns: list[str]) -> tuple[float, float]:
    run_dir.mkdir(parents=True)
    req_file, spec_file = run_dir / "requests.bin", run_dir / "spec.json"
    req_file.write_bytes(b"".join(len(r).to_bytes(2, "big") + r for r in requests))
    spec_file.write_text(json.dumps({"args": responder_args(peer, index), "requests": str(req_file),
                                     "out": str(run_dir / "responses"), "inflight": inflight}))
    p = subprocess.run([*netns, "--", sys.executable, str(Path(__file__).resolve()),
                        "--openssl-server-child", str(spec_file)], capture_output=True, text=True)
    try:
        res = json.loads(p.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        res = {"error": f"exit {p.returncode}: {p.stdout[-500:]} {p.stderr[-1500:]}"}
    if "error" in res:
        raise SystemExit(f"openssl ocsp (server) failed: {res['error']}")
    n = len(requests)
    print(f"  openssl ocsp: server {res['server_cpu'] / n * 1e6:,.0f} µs CPU/response (index load included), "
          f"client {res['client_cpu'] / n * 1e6:,.0f} µs", file=sys.stderr)
    check_outputs("openssl ocsp", read_dir(run_dir / "responses"), entries, peer)
    return res["seconds"], res["cpu"]


def run_openssl_process(peer: Peer, index: Path, requests: list[bytes], run_dir: Path,
                        entries: Sequence[LedgerEntry]) -> tuple[float, float]:
    """One ``openssl ocsp -reqin -respout`` process per request (each loads the whole index)."""
    out = run_dir / "responses"
    out.mkdir(parents=True)
    reqs = run_dir / "requests"
    reqs.mkdir()
    for i, r in enumerate(requests):
        (reqs / f"{i:08d}.der").write_bytes(r)
    args = responder_args(peer, index)
    c0, t0 = children_cpu(), time.perf_counter()
    for i in range(len(requests)):
        p = subprocess.run([*args, "-reqin", str(reqs / f"{i:08d}.der"), "-respout", str(out / f"{i:08d}.der")],
                           capture_output=True)
        if p.returncode != 0:
            raise SystemExit(f"openssl ocsp -reqin failed: {p.stderr.decode(errors='replace')[-1500:]}")
    wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    check_outputs("openssl ocsp -reqin", read_dir(out), entries, peer)
    return wall, cpu


# ---------------------------------------------------------------- (c) pyca loop


def run_pyca_loop(peer: Peer, entries: Sequence[LedgerEntry], out: Path) -> tuple[float, float]:
    """Build + sign + DER + write one file per entry with OCSPResponseBuilder; (loop s, CPU s)."""
    out.mkdir(parents=True)
    base = (ocsp.OCSPResponseBuilder().responder_id(ocsp.OCSPResponderEncoding.HASH, peer.responder)
            .certificates([peer.responder]))
    key, sha1, sha256 = peer.responder_key, hashes.SHA1(), hashes.SHA256()
    good, revoked = ocsp.OCSPCertStatus.GOOD, ocsp.OCSPCertStatus.REVOKED
    p0, t0 = time.process_time(), time.perf_counter()
    for e in entries:
        this = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        if e.status is Status.REVOKED:
            reason = x509.ReasonFlags(e.reason.name) if e.reason is not None else None
            b = base.add_response_by_hash(peer.name_hash, peer.key_hash, e.serial, sha1, revoked,
                                          this, this + VALIDITY, e.revoked_at, reason)
        else:
            b = base.add_response_by_hash(peer.name_hash, peer.key_hash, e.serial, sha1, good,
                                          this, this + VALIDITY, None, None)
        (out / f"{e.serial:040x}.der").write_bytes(b.sign(key, sha256).public_bytes(serialization.Encoding.DER))
    wall, cpu = time.perf_counter() - t0, time.process_time() - p0
    check_outputs("pyca loop", read_dir(out), entries, peer)
    return wall, cpu


# ---------------------------------------------------------------- report


def versions() -> dict[str, str]:
    from cryptography import __version__ as crypto_version
    from cryptography.hazmat.backends.openssl import backend

    return {"cfssl": cfssl_version(), "cryptography": f"{crypto_version} ({backend.openssl_version_text()})"}


def table(rows: list[Row], off: Row, on: Row, speed1: Row) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "" if x is None else format(x, fmt)

    head = ("| measurement | seconds (median) | responses/s (median) | min–max | CPU µs/response | "
            "ocspmint verify off ÷ this | ocspmint verify on ÷ this | this ÷ openssl speed 1 core |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    body = [f"| {r.what} | {statistics.median(r.seconds):.2f} | {r.rate:,.0f} | "
            f"{min(r.rates):,.0f}–{max(r.rates):,.0f} | {f(r.cpu_us, ',.0f')} | "
            f"{f(ratio(off, r), '.3f')} | {f(ratio(on, r), '.3f')} | {f(ratio(r, speed1), '.3f')} |" for r in rows]
    return "\n".join([head, *body])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serials", type=int, default=20_000)
    ap.add_argument("--key", choices=KEYS, default="ec-p256")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of every measurement; medians reported")
    ap.add_argument("--workers", type=int, default=1, help="ocspmint signing workers (and ceiling processes)")
    ap.add_argument("--speed-seconds", type=int, default=3, help="openssl speed -seconds (sign, then verify)")
    ap.add_argument("--inflight", type=int, default=4, help="openssl ocsp: connections the client keeps queued")
    ap.add_argument("--openssl-mode", choices=("server", "process"), default="server")
    ap.add_argument("--store-dir", type=Path, help="parent folder of every output (default: the temp folder)")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write every measurement as JSON")
    ap.add_argument("--markdown", action="store_true", help="append a dated section to bench/RESULTS.md")
    ap.add_argument("--openssl-server-child", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.openssl_server_child:
        return openssl_server_child(args.openssl_server_child)
    if not shutil.which("cfssl"):
        raise SystemExit("cfssl not found: run scripts/install-bench-deps.sh (Debian golang-cfssl)")

    mode, mode_note = args.openssl_mode, ""
    netns = netns_prefix() if mode == "server" else None
    if mode == "server" and netns is None:
        mode, mode_note = "process", " (no private network namespace for the server mode; fell back)"
        print("openssl ocsp: no private network namespace (unshare --net); using -reqin/-respout "
              f"per request on {min(args.serials, PROCESS_MODE_MAX)} requests", file=sys.stderr)
    n = args.serials
    speed_rows = {m: Row("speed" if m == 1 else f"speed-multi{m}",
                         f"(d) openssl speed {SPEED_ALG[args.key]} sign" + ("" if m == 1 else f", -multi {m}"))
                  for m in (1, 2)}
    cfssl_row = Row("cfssl", "(a) cfssl ocsprefresh (SQLite certdb)")
    osl_n = n if mode == "server" else min(n, PROCESS_MODE_MAX)
    osl_row = Row("openssl-ocsp", f"(b) openssl ocsp responder, {args.inflight} queued connections"
                  if mode == "server" else f"(b) openssl ocsp -reqin/-respout, 1 process per request, "
                  f"{osl_n:,} requests{mode_note}")
    pyca_row = Row("pyca", "(c) pyca OCSPResponseBuilder loop, software key, file per response")
    ceil_row = Row("token-ceiling", f"(e) token ceiling: raw python-pkcs11 sign loop, {args.workers} process(es)")
    off_row = Row("ocspmint-verify-off", f"(e) ocspmint run, verify off, {args.workers} worker(s), command wall")
    on_row = Row("ocspmint-verify-on", f"(e) ocspmint run, verify on, {args.workers} worker(s), command wall")
    rows = [speed_rows[1], speed_rows[2], cfssl_row, osl_row, pyca_row, ceil_row, off_row, on_row]

    with tempfile.TemporaryDirectory(prefix="ocspmint-peers-") as tmp, \
            tempfile.TemporaryDirectory(prefix="ocspmint-peers-runs-", dir=args.store_dir or tmp) as runs:
        root = Path(tmp)
        t_setup = time.perf_counter()
        demo = build_demo(root / "demo", certs=1, precerts=1, revoke=0, responder_key=args.key)
        entries = list(st.synthetic_entries(n))
        ledger = root / "ledger.sqlite"
        write_entries(str(ledger), entries)
        peer = make_peer(demo, args.key, root / "peer")
        pristine = root / "cfssl-certdb.sqlite"
        make_cfssl_db(pristine, leaf_certificates(demo, entries))
        index = root / "index.txt"
        write_index(index, entries)
        requests = ocsp_requests(peer, entries[:osl_n])
        print(f"setup: {time.perf_counter() - t_setup:.1f}s (demo, ledger, {n:,} certificates, index, requests)",
              file=sys.stderr)

        for rep in range(args.repeat):
            def step(row: Row, count: int, fn: Callable[[], tuple[float, float | None]]) -> None:
                seconds, cpu = fn()
                row.add(seconds, count, cpu)
                print(f"#{rep + 1} {row.what}: {seconds:.2f}s, {count / seconds:,.0f}/s"
                      + (f", {cpu / count * 1e6:,.0f} µs CPU each" if cpu is not None else ""), file=sys.stderr)

            base = Path(runs) / f"rep{rep}"
            for m, row in speed_rows.items():
                rate = openssl_speed(args.key, args.speed_seconds, m)
                row.add_rate(args.speed_seconds, rate)
                print(f"#{rep + 1} {row.what}: {rate:,.0f}/s", file=sys.stderr)
            step(cfssl_row, n, lambda: run_cfssl(peer, pristine, base / "cfssl", entries))
            if mode == "server":
                step(osl_row, osl_n, lambda: run_openssl_server(peer, index, requests, base / "openssl",
                                                                args.inflight, entries, netns or []))
            else:
                step(osl_row, osl_n, lambda: run_openssl_process(peer, index, requests, base / "openssl",
                                                                 entries[:osl_n]))
            step(pyca_row, n, lambda: run_pyca_loop(peer, entries, base / "pyca"))
            step(ceil_row, n, lambda: (n / st.ceiling(demo, args.key, n, args.workers), None))
            for verify, row in ((False, off_row), (True, on_row)):
                def ocspmint(verify: bool = verify) -> tuple[float, float]:
                    cfg = st.write_config(demo, ledger, base / f"ocspmint-{'on' if verify else 'off'}",
                                          args.workers, verify)
                    c0 = children_cpu()
                    wall, _summary = st.ocspmint_run(demo, cfg, n)
                    return wall, children_cpu() - c0
                step(row, n, ocspmint)

    where = f"outputs in {args.store_dir}" if args.store_dir else "outputs in the temp folder"
    params = (f"{n:,} serials, key {args.key}, ocspmint workers {args.workers}, {args.repeat} repetitions, "
              f"openssl speed -seconds {args.speed_seconds}, {where}")
    text = table(rows, off_row, on_row, speed_rows[1])
    print(f"\n{params}\n{text}", flush=True)
    info = {**st.machine(), **versions()}
    if args.json:
        args.json.write_text(json.dumps({
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else argv, "params": params, "machine": info,
            "rows": [{**asdict(r), "rate_median": r.rate, "cpu_us_median": r.cpu_us,
                      "ocspmint_verify_off_over_this": ratio(off_row, r),
                      "ocspmint_verify_on_over_this": ratio(on_row, r),
                      "this_over_openssl_speed_1": ratio(r, speed_rows[1])} for r in rows],
        }, indent=2) + "\n")
    if args.markdown:
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines = "\n".join(f"- {k}: {v}" for k, v in info.items())
        cmdline = " ".join(["bench/peers.py", *(sys.argv[1:] if argv is None else argv)])
        with st.RESULTS.open("a") as f:
            f.write(f"\n### {now}: peers and ceilings, {params}\n\n`{cmdline}`\n\n{lines}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

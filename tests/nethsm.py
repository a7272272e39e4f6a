"""A simulated network HSM: SoftHSM2 behind ``p11-kit server``, with added
latency and a capacity.

    from nethsm import nethsm                     # tests/ on sys.path
    with nethsm(tmp, softhsm_conf, token="ocspmint", latency_us=2000, slots=16) as hsm:
        subprocess.run([...], env={**os.environ, **hsm.env})   # load hsm.module

Two transports, chosen with ``transport``:

- ``"p11kit"`` (default): ``p11-kit server --foreground --provider SHIM
  -n <tmp>/p11kit-XXXX/p11.sock "pkcs11:token=<token>"``. The client loads
  ``p11-kit-client.so`` (``hsm.module``) with ``P11_KIT_SERVER_ADDRESS`` from
  ``hsm.env``. The server forks one ``p11-kit remote`` process per client
  connection (one per ``C_Initialize``d client process), and that process
  answers one RPC at a time: a client process gets **one call in flight**
  however many sessions and threads it uses (measured: 2 ms delay, 1/2/4/8
  sessions on threads of one process -> ~450 signatures/s each; 2 and 4
  processes -> ~890 and ~1,780/s).
- ``"shim"``: no p11-kit; the client loads the p11fault shim itself
  (``hsm.module``), which forwards to SoftHSM2. Same latency and slots, but
  sessions on threads of one process really sign concurrently: use it to
  show throughput against sessions in flight.

Latency and capacity come from the p11fault shim (tests/p11fault/README.md)
in front of SoftHSM2: ``P11FAULT_SIGN_DELAY_US=latency_us`` sleeps in every
signature attempt; ``P11FAULT_SIGN_SLOTS=slots`` lets at most ``slots``
attempts sleep at once, and ``P11FAULT_SIGN_SLOTS_NAME`` (a fresh named POSIX
semaphore per HSM, unlinked on exit) makes that limit shared by every process
that loads the shim: all p11-kit remote processes, or all client processes
in shim mode. Capacity = slots / latency. With ``latency_us=0`` the shim is
left out (p11kit: the server loads SoftHSM2 directly; shim: ``hsm.module``
is SoftHSM2 itself).

Not netem: this kernel has no sch_netem (``tc qdisc add ... netem`` in a
network namespace says "Specified qdisc kind is unknown"), and p11-kit's
transport is a unix socket, which netem would not delay anyway.

SoftHSM2 is found through ``softhsm_conf`` (SOFTHSM2_CONF), which goes into
the server's environment, and into ``hsm.env`` in shim mode. Nothing is set
in this process's environment. Everything runs under ``tmp``.

Run as a script to keep one up by hand:
``python tests/nethsm.py SOFTHSM2_CONF [--token ocspmint] [--latency-us 2000]
[--slots 16] [--transport p11kit|shim]`` prints ``export`` lines and waits
for Ctrl-C.
"""

from __future__ import annotations

import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
P11KIT_CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
TRANSPORTS = ("p11kit", "shim")
_HERE = Path(__file__).resolve().parent


class NetHsmError(RuntimeError):
    """The simulated HSM could not start (the message has the server's stderr)."""


@dataclass(frozen=True)
class NetHsm:
    """What a client needs: load ``module`` in a process whose environment
    includes ``env``. ``capacity`` is slots / latency in signatures per
    second (None without a slot limit or without latency)."""

    transport: str
    module: str
    env: dict[str, str]
    latency_us: int
    slots: int | None
    token: str
    socket: Path | None = None
    server_pid: int | None = None

    @property
    def capacity(self) -> float | None:
        if not self.slots or not self.latency_us:
            return None
        return self.slots * 1e6 / self.latency_us

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default os.environ) plus ``env``."""
        return {**(os.environ if base is None else base), **self.env}


def available() -> str | None:
    """None if p11-kit server, its client module, SoftHSM2 and gcc are
    present; otherwise what is missing (for pytest.skip)."""
    missing = [name for name, ok in (
        ("p11-kit", shutil.which("p11-kit")),
        (P11KIT_CLIENT, Path(P11KIT_CLIENT).is_file()),
        (SOFTHSM_MODULE, Path(SOFTHSM_MODULE).is_file()),
        ("gcc", shutil.which("gcc")),
    ) if not ok]
    return ", ".join(missing) + " missing" if missing else None


def build_shim(out_dir: Path) -> Path:
    """The p11fault shim (tests/p11fault/build.py), cached in ``out_dir``."""
    sys.path.insert(0, str(_HERE))
    try:
        from p11fault.build import build_shim as _build
    finally:
        sys.path.remove(str(_HERE))
    return _build(out_dir)


def _shim_env(real_module: str, latency_us: int, slots: int | None, sem_name: str | None) -> dict[str, str]:
    env = {"P11FAULT_MODULE": real_module, "P11FAULT_SIGN_DELAY_US": str(latency_us)}
    if slots:
        env["P11FAULT_SIGN_SLOTS"] = str(slots)
        env["P11FAULT_SIGN_SLOTS_NAME"] = sem_name or ""
    return env


@contextmanager
def nethsm(tmp: Path, softhsm_conf: Path | str, *, token: str = "ocspmint", latency_us: int = 0,
           slots: int | None = None, transport: str = "p11kit", real_module: str = SOFTHSM_MODULE,
           shim_dir: Path | None = None, start_timeout: float = 10.0) -> Iterator[NetHsm]:
    """Start the simulated HSM under ``tmp`` and stop it (server process
    group, named semaphore) on exit. ``slots`` needs ``latency_us`` > 0.
    ``shim_dir`` caches the compiled shim (default: a folder under tmp)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport {transport!r} must be one of {', '.join(TRANSPORTS)}")
    if latency_us < 0 or (slots is not None and slots < 1):
        raise ValueError("latency_us must be >= 0 and slots >= 1")
    if slots and not latency_us:
        raise ValueError("slots needs latency_us > 0 (a slot is held while the latency elapses)")
    tmp = Path(tmp).resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    softhsm_conf = str(Path(softhsm_conf).resolve())

    sem_name = f"/ocspmint-nethsm-{os.getpid()}-{secrets.token_hex(4)}" if slots else None
    fault_env: dict[str, str] = {}
    provider = real_module
    if latency_us:
        provider = str(build_shim(Path(shim_dir or tmp / "p11fault-build").resolve()))
        fault_env = _shim_env(real_module, latency_us, slots, sem_name)

    try:
        if transport == "shim":
            yield NetHsm("shim", provider, {"SOFTHSM2_CONF": softhsm_conf, **fault_env}, latency_us, slots, token)
            return
        with _p11kit_server(tmp, provider, token, {"SOFTHSM2_CONF": softhsm_conf, **fault_env},
                            start_timeout) as (address, sock, pid):
            yield NetHsm("p11kit", P11KIT_CLIENT, {"P11_KIT_SERVER_ADDRESS": address}, latency_us, slots, token,
                         socket=sock, server_pid=pid)
    finally:
        if sem_name:
            Path("/dev/shm", "sem." + sem_name[1:]).unlink(missing_ok=True)


@contextmanager
def _p11kit_server(tmp: Path, provider: str, token: str, env: dict[str, str],
                   start_timeout: float) -> Iterator[tuple[str, Path, int]]:
    # unix socket paths are limited to ~107 bytes: keep the folder short
    # when tmp is deep (pytest's tmp_path can be)
    sock_dir = Path(tempfile.mkdtemp(prefix="p11kit-", dir=tmp if len(str(tmp)) < 70 else None))
    sock = sock_dir / "p11.sock"
    errlog = sock_dir / "server.err"
    cmd = ["p11-kit", "server", "--foreground", "--sh", "--provider", provider, "-n", str(sock),
           f"pkcs11:token={token}"]
    with open(errlog, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True)
    try:
        address = _read_address(proc, start_timeout)
        deadline = time.monotonic() + start_timeout
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise NetHsmError("p11-kit server did not create its socket")
            time.sleep(0.01)
        if address is None:
            address = f"unix:path={sock}"
        yield address, sock, proc.pid
    except NetHsmError as e:
        raise NetHsmError(f"{e}\n$ {' '.join(cmd)}\n{errlog.read_text(errors='replace')}") from None
    finally:
        # the server and its per-connection `p11-kit remote` children
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
        if proc.stdout:
            proc.stdout.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def _read_address(proc: subprocess.Popen, timeout: float) -> str | None:
    """The P11_KIT_SERVER_ADDRESS value from the server's ``--sh`` output."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while True:
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith("P11_KIT_SERVER_ADDRESS="):
                    return line.split("=", 1)[1].split(";", 1)[0]
            left = deadline - time.monotonic()
            if left <= 0:
                raise NetHsmError("p11-kit server printed no address in time")
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise NetHsmError(f"p11-kit server exited (status {proc.wait()})")
            buf += chunk
    finally:
        sel.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Keep a simulated network HSM up until Ctrl-C.")
    ap.add_argument("softhsm_conf")
    ap.add_argument("--token", default="ocspmint")
    ap.add_argument("--latency-us", type=int, default=2000)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--transport", choices=TRANSPORTS, default="p11kit")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nethsm-") as tmp, \
            nethsm(Path(tmp), args.softhsm_conf, token=args.token, latency_us=args.latency_us,
                   slots=args.slots or None, transport=args.transport) as hsm:
        print(f"# module: {hsm.module}  capacity: {hsm.capacity or 'unlimited'}/s", flush=True)
        for k, v in hsm.env.items():
            print(f"export {k}={v}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

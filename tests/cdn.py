"""Real HTTP components for tests, on loopback, stopped at the end:
`ocspmint serve` (the origin) and Varnish running deploy/varnish/ocspmint.vcl
verbatim (only backend.vcl, which it includes, is written here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from seaweed import free_ports

REPO = Path(__file__).resolve().parent.parent
VCL = REPO / "deploy" / "varnish" / "ocspmint.vcl"
BIN = Path(sys.executable).parent


def free_port() -> int:
    return free_ports(1)[0]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    """Wait until ``url`` answers any HTTP status; raise with the log if
    the process died or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def _running(cmd: list[str], log: Path, port: int, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``cmd`` (output to ``log``) until it answers on 127.0.0.1:``port``;
    yield its base URL; stop it at the end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/healthz", proc, log)
        yield base
    finally:
        _stop(proc)


@contextmanager
def serve(config: Path, workdir: Path, port: int, env: dict[str, str] | None = None) -> Iterator[str]:
    """`ocspmint serve --config CONFIG` on 127.0.0.1:``port``; yields its base URL."""
    cmd = [str(BIN / "ocspmint"), "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"]
    with _running(cmd, workdir / f"serve-{port}.log", port, env) as base:
        yield base


@contextmanager
def varnish(origin: str, workdir: Path, listen: int) -> Iterator[str]:
    """varnishd on 127.0.0.1:``listen`` with deploy/varnish/ocspmint.vcl in
    front of ``origin`` (``http://127.0.0.1:PORT``); yields its base URL."""
    varnishd = shutil.which("varnishd") or "/usr/sbin/varnishd"
    host, port = origin.removeprefix("http://").split(":")
    vdir = workdir / f"varnish-{listen}"
    vdir.mkdir()
    (vdir / "backend.vcl").write_text(f'backend origin {{ .host = "{host}"; .port = "{port}"; }}\n')
    cmd = [varnishd, "-F", "-j", "none", "-n", str(vdir / "n"), "-a", f"127.0.0.1:{listen}", "-T", "none",
           "-f", str(VCL), "-p", f"vcl_path={vdir}:{VCL.parent}", "-s", "malloc,32m"]
    with _running(cmd, vdir / "varnishd.log", listen) as base:
        yield base

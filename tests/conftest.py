"""Shared fixtures. Each block is owned by the module named in its comment;
add new fixtures under their own clearly named heading."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ocspmint.demo import Demo, build_demo

if TYPE_CHECKING:
    from seaweed import SeaweedS3

# --- ocspmint.demo: a real openssl CA hierarchy and a SoftHSM2 token ---------


def softhsm_env(demo: Demo) -> dict[str, str]:
    """os.environ plus SOFTHSM2_CONF for ``demo``: pass it as ``env=`` to a
    subprocess that talks PKCS#11 (never set it in this process: python-pkcs11
    initialises SoftHSM2 once per process, with whatever config it saw then)."""
    return {**os.environ, "SOFTHSM2_CONF": str(demo.softhsm_conf)}


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """The default demo (build_demo defaults: EC P-256 delegated responder,
    12 certs, 6 precerts, 4+1 revoked, 1 expired), built once per session.

    Shared: do not issue or revoke in it; build your own with build_demo()
    when a test needs to change the CA's state.
    """
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def demo_softhsm_env(demo: Demo) -> dict[str, str]:
    """softhsm_env(demo) for the session demo."""
    return softhsm_env(demo)


# --- ocspmint.signer faults: the fault-injecting PKCS#11 module (tests/p11fault/) --


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The p11fault shim, built once per session: ``faultkit.use_module``
    points a demo at it, ``P11FAULT_*`` variables choose the faults."""
    from p11fault.build import build_shim

    return build_shim(tmp_path_factory.mktemp("shim"))


# --- ocspmint.s3store: a real SeaweedFS S3 server (tests/seaweed.py) ---------


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """SeaweedFS (``weed server -filer -s3``) on free 127.0.0.1 ports with
    S3 auth on, started once per session and stopped at its end. Gives
    ``endpoint`` (http://127.0.0.1:PORT), ``bucket`` (exists, shared: use
    your own key prefix), ``access_key``, ``secret_key``, ``region``;
    ``env()`` is the matching AWS_* environment variables."""
    from seaweed import seaweed as start_seaweed

    with start_seaweed(tmp_path_factory.mktemp("seaweed")) as sw:
        yield sw


# --- test_store_faults, test_state_lock: a small tmpfs for full disks ---------

Mount = Callable[[Path, str], None]


@pytest.fixture
def tmpfs() -> Iterator[Mount]:
    """``mount(path, options)``: a tmpfs at ``path`` (made if missing),
    unmounted at teardown; skips when this machine does not allow mounts."""
    mounted: list[Path] = []

    def mount(path: Path, options: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "ocspmint-test", str(path)], capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
        mounted.append(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)

"""Build the p11fault PKCS#11 fault-injection shim (see README.md).

    from build import build_shim
    so_path = build_shim(Path("/tmp/somewhere"))

The library is cached in ``out_dir`` under a name derived from the hash of the
source and of the compiler command, so repeated calls (and concurrent pytest
workers) compile at most once per source version.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().with_name("p11fault.c")
PKCS11_INCLUDE = "/usr/include/p11-kit-1"

# Everything after "-o <out>" and the source file name.
CFLAGS = [
    "-shared",
    "-fPIC",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fvisibility=hidden",
    f"-I{PKCS11_INCLUDE}",
]
LDLIBS = ["-ldl", "-lpthread"]


class ShimBuildError(RuntimeError):
    """gcc failed; the message carries its stderr."""


def build_shim(out_dir: Path, cc: str = "gcc", source: Path = SOURCE) -> Path:
    """Compile p11fault.c (or ``source``) into ``out_dir``, cached by source
    hash, and return the path of the shared library.  Raises ShimBuildError
    with gcc's stderr if compilation fails, FileNotFoundError if gcc or the
    PKCS#11 header is missing."""
    return compile_cached(Path(source), Path(out_dir), "libp11fault", ".so", CFLAGS, LDLIBS, cc)


def compile_cached(source: Path, out_dir: Path, stem: str, suffix: str, cflags: list[str], ldlibs: list[str],
                   cc: str = "gcc") -> Path:
    """gcc ``source`` into ``out_dir/<stem>-<hash><suffix>``, the hash taken
    over the source and the command, and return that path (made at most once
    per source version; also used by bench/p11loop/build.py). Built under a
    temporary name and renamed, so a concurrent builder never sees (or
    loads) a half-written file. Raises ShimBuildError with gcc's stderr,
    FileNotFoundError when gcc or the PKCS#11 header is missing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    compiler = shutil.which(cc)
    if compiler is None:
        raise FileNotFoundError(f"C compiler {cc!r} not found on PATH")
    if not Path(PKCS11_INCLUDE, "p11-kit", "pkcs11.h").is_file():
        raise FileNotFoundError(f"{PKCS11_INCLUDE}/p11-kit/pkcs11.h not found (install libp11-kit-dev)")
    digest = hashlib.sha256(source.read_bytes())
    digest.update("\0".join([cc, *cflags, *ldlibs]).encode())
    target = out_dir / f"{stem}-{digest.hexdigest()[:16]}{suffix}"
    if target.is_file():
        return target
    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}-", suffix=suffix, dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        cmd = [compiler, *cflags, "-o", str(tmp), str(source), *ldlibs]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ShimBuildError(f"building {source.name} failed (exit {proc.returncode}):\n"
                                 f"$ {' '.join(cmd)}\n{proc.stderr}")
        tmp.chmod(0o755)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    print(build_shim(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))

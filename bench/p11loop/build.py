"""Build ``p11_sign_loop`` (the raw C PKCS#11 sign-loop ceiling, see the
comment at the top of p11_sign_loop.c).

    from build import build_loop          # bench/p11loop/build.py
    exe = build_loop(Path("build/p11loop"))

The executable is cached in ``out_dir`` under a name derived from the hash of
the source and of the compiler command; it is built under a temporary name
and renamed into place, so concurrent builders never see a partial file.
Raises LoopBuildError (with gcc's stderr) if compilation fails.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().with_name("p11_sign_loop.c")
PKCS11_INCLUDE = "/usr/include/p11-kit-1"
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", f"-I{PKCS11_INCLUDE}"]
LDLIBS = ["-ldl", "-lpthread"]
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "build" / "p11loop"


class LoopBuildError(RuntimeError):
    """gcc failed; the message carries its stderr."""


def build_loop(out_dir: Path = DEFAULT_OUT, cc: str = "gcc", source: Path = SOURCE) -> Path:
    """Compile p11_sign_loop.c into ``out_dir`` (cached by source hash) and
    return the executable's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    compiler = shutil.which(cc)
    if compiler is None:
        raise FileNotFoundError(f"C compiler {cc!r} not found on PATH")
    if not Path(PKCS11_INCLUDE, "p11-kit", "pkcs11.h").is_file():
        raise FileNotFoundError(f"{PKCS11_INCLUDE}/p11-kit/pkcs11.h not found (install libp11-kit-dev)")
    digest = hashlib.sha256(Path(source).read_bytes())
    digest.update("\0".join([cc, *CFLAGS, *LDLIBS]).encode())
    target = out_dir / f"p11_sign_loop-{digest.hexdigest()[:16]}"
    if target.is_file():
        return target
    fd, tmp_name = tempfile.mkstemp(prefix=".p11_sign_loop-", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        cmd = [compiler, *CFLAGS, "-o", str(tmp), str(source), *LDLIBS]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise LoopBuildError(f"building {Path(source).name} failed (exit {proc.returncode}):\n"
                                 f"$ {' '.join(cmd)}\n{proc.stderr}")
        tmp.chmod(0o755)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    print(build_loop(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))

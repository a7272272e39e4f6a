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

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "p11fault_build", Path(__file__).resolve().parents[2] / "tests" / "p11fault" / "build.py")
assert _spec is not None and _spec.loader is not None
_shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_shared)

SOURCE = Path(__file__).resolve().with_name("p11_sign_loop.c")
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", f"-I{_shared.PKCS11_INCLUDE}"]
LDLIBS = ["-ldl", "-lpthread"]
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "build" / "p11loop"
LoopBuildError = _shared.ShimBuildError  # gcc failed; the message carries its stderr


def build_loop(out_dir: Path = DEFAULT_OUT, cc: str = "gcc", source: Path = SOURCE) -> Path:
    """Compile p11_sign_loop.c into ``out_dir`` (cached by source hash) and
    return the executable's path (tests/p11fault/build.py ``compile_cached``)."""
    return _shared.compile_cached(Path(source), Path(out_dir), "p11_sign_loop", "", CFLAGS, LDLIBS, cc)

"""One ocspmint at a time per state folder.

Every command that writes the journal or the store (`run`, `reissue`
without `--dry-run`, `refresh`, `audit --fix`, `demo`) takes an exclusive
``flock(2)`` on ``<state_dir>/lock`` before it starts, for as long as it
runs (``hold``). The file holds the holder's pid and command, one line
(``1234 refresh``), for the message a second command prints: it never
waits, it stops at once (``StateBusy``, exit 2 from the CLI).

Two processes sharing a journal and a store would sign the same serials
and each journal its own bytes (the journal's SHA-256 then no longer names
the stored object), and a reissue could overwrite a revocation published
meanwhile with the ``good`` response it planned before.

The lock belongs to the open file, not to the file's contents: it goes
away when the holder exits, however it dies (SIGKILL, a power loss), so a
stale ``lock`` file never blocks anything. The descriptor is opened
``O_CLOEXEC`` (never inherited by an exec'd child: signer workers are
spawned, openssl runs through subprocess), so no child can keep the lock
held after the holder died. The file is never deleted (deleting a lock
file races with the next holder). On NFS, Linux emulates flock with
byte-range locks, which the server arbitrates.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = "lock"


class StateBusy(Exception):
    """Another process holds the state folder's lock; the message names it."""


def holder(path: Path) -> str:
    """``pid N, COMMAND`` as the lock file states it (best effort)."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    pid, _, command = text.partition(" ")
    if not pid.isdigit():
        return "pid unknown"
    return f"pid {pid}, {command}" if command else f"pid {pid}"


def acquire(state_dir: str | Path, command: str) -> int:
    """Lock ``state_dir`` for ``command``; the locked descriptor (close it
    to release). Raises StateBusy when another process holds it, OSError
    when the lock file cannot be opened."""
    path = Path(state_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.set_inheritable(fd, False)  # O_CLOEXEC already; explicit, as the docstring promises
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise StateBusy(f"{state_dir}: in use by another ocspmint ({holder(path)}); wait for it to finish or "
                            "stop it (a refresh service: systemctl stop), then run this command again") from None
        try:  # for the message of the next one; best effort (a full disk is the journal's to report)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
        except OSError:
            pass
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def hold(state_dir: str | Path, command: str) -> Iterator[None]:
    """Hold the state folder's lock for the ``with`` block (``acquire``)."""
    fd = acquire(state_dir, command)
    try:
        yield
    finally:
        os.close(fd)

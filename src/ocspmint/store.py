"""Object store for published responses.

Key layout (stable, documented in docs/store-layout.md): one object per
(issuer, serial) at ``<shard>/<issuer id>/<serial>`` where ``issuer id`` is
the hex SHA-1 of the issuer's subjectPublicKey (the SHA-1 issuerKeyHash of
RFC 6960 §4.1.1), ``serial`` the 40-digit lowercase hex serial, and
``shard`` the first two hex digits of SHA-256 of ``<issuer id>/<serial>``,
which spreads keys evenly over prefixes (S3 scales per prefix) and folders.

``FileStore``: a folder; objects are written to ``.tmp/`` and renamed into
place (POSIX rename is atomic), so a reader never sees a half-written
response and a killed run leaves no torn object.

Every store offers the same interface (``Store``): ``submit`` a batch of
``PutItem`` and get a Future of per-item errors, resolved once every
successful item is durable (file store: after ``syncfs(2)``; S3: after the
server acknowledged each PUT); ``get``/``fetch`` (async) one object;
``keys`` to walk the store; ``delete`` one object; ``close``.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import hashlib
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import msgspec

from ocspmint.model import serial_hex

if TYPE_CHECKING:
    from ocspmint import config

CONTENT_TYPE = "application/ocsp-response"
_libc = ctypes.CDLL(None, use_errno=True)  # syncfs(2): Python's os module has no binding


class StoreError(Exception):
    """The store refused or failed an operation; the message names the key."""


class PutItem(msgspec.Struct, frozen=True):
    """One response to publish at ``key``; the times (aware UTC) give the
    object's cache metadata (RFC 5019 §6)."""

    key: str
    data: bytes
    this_update: dt.datetime
    next_update: dt.datetime


class Store(Protocol):
    def submit(self, items: list[PutItem]) -> Future[list[str | None]]:
        """Publish ``items``; the Future gives, per item, None when the item
        is durable/acknowledged or an error message naming the key."""
        ...

    def get(self, key: str) -> bytes | None: ...

    async def fetch(self, key: str) -> bytes | None:
        """``get`` for an asyncio caller (the responder)."""
        ...

    def keys(self) -> Iterator[str]: ...

    def delete(self, key: str) -> None:
        """Remove the object at ``key`` (`ocspmint audit --fix` for a serial
        the ledger does not know); no error when there is none."""
        ...

    def close(self) -> None: ...


def object_key(issuer_id: str, serial: int) -> str:
    """Store key of the response for ``serial`` of the issuer ``issuer_id``."""
    tail = f"{issuer_id}/{serial_hex(serial)}"
    return f"{hashlib.sha256(tail.encode()).hexdigest()[:2]}/{tail}"


class FileStore:
    """Responses as files below ``root`` (created if missing)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._root = str(self.root)
        self._tmp = ""
        self._root_fd = -1  # opened before the first write: syncfs reports write-back errors since then
        self._dirs: set[str] = set()
        self._n = 0
        self._queue: queue.SimpleQueue[tuple[list[PutItem], Future[list[str | None]]] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None

    def _tmp_prefix(self) -> str:
        """``.tmp/<pid>-``, made on the first write; temp files left by
        processes that no longer run (a killed run) are removed then, and
        the root's fd for ``_sync`` is opened. A reader (``ocspmint
        serve``) never touches ``.tmp``."""
        if not self._tmp:
            tmp = self.root / ".tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            self._root_fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY)
            for stale in tmp.iterdir():
                if not pid_alive(stale.name.partition("-")[0]):
                    stale.unlink(missing_ok=True)
            self._tmp = f"{tmp}/{os.getpid()}-"
        return self._tmp

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` atomically; raise StoreError.

        Plain os calls on str paths: this is the hot path of a run."""
        dest = f"{self._root}/{key}"
        folder = dest.rpartition("/")[0]
        try:  # a full disk (no block or inode for a folder) fails the item, not the run
            if folder not in self._dirs:
                os.makedirs(folder, exist_ok=True)
                self._dirs.add(folder)
            tmp_prefix = self._tmp or self._tmp_prefix()
        except OSError as e:
            raise StoreError(f"{dest}: {e.strerror}") from None
        self._n += 1
        tmp = f"{tmp_prefix}{self._n}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(28, "short write")
            finally:
                os.close(fd)
            os.replace(tmp, dest)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StoreError(f"{dest}: {e.strerror}") from None

    def submit(self, items: list[PutItem]) -> Future[list[str | None]]:
        """Queue ``items`` for the store's writer thread, which writes them
        and resolves the Future only after a ``syncfs(2)`` that covers them,
        so a journal row written after it resolves always names an object
        that survives a power loss. One sync covers every batch queued
        meanwhile; a write-back error it reports (Linux ≥ 5.8) fails every
        item of those batches. The writer's system calls run while the caller encodes
        and verifies the next batch (they release the GIL)."""
        done: Future[list[str | None]] = Future()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="filestore-writer", daemon=True)
            self._writer.start()
        self._queue.put((items, done))
        return done

    def _write_loop(self) -> None:
        written: list[tuple[Future[list[str | None]], list[str | None]]] = []
        while True:
            job = self._queue.get()
            if job is not None:
                items, done = job
                written.append((done, [self._put_item(item) for item in items]))
            if written and (job is None or self._queue.empty()):
                failure = self._sync()
                for done, errors in written:
                    done.set_result(errors if failure is None else [e or failure for e in errors])
                written = []
            if job is None:
                return

    def _sync(self) -> str | None:
        """syncfs(2) the store's file system: None when everything written
        since the last call is durable, else the error (a write-back error
        such as EIO or ENOSPC on a thin-provisioned or network disk)."""
        if self._root_fd < 0 or _libc.syncfs(self._root_fd) == 0:  # < 0: nothing was written
            return None
        err = ctypes.get_errno()
        return f"{self._root}: write-back failed, responses not durable: {os.strerror(err)}"

    def _put_item(self, item: PutItem) -> str | None:
        try:
            self.put(item.key, item.data)
            return None
        except StoreError as e:
            return str(e)

    def get(self, key: str) -> bytes | None:
        """The object at ``key``, None when there is none; StoreError when
        the store folder itself is missing (a mount gone)."""
        try:
            with open(f"{self._root}/{key}", "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            if not os.path.isdir(self._root):
                raise StoreError(f"{self._root}: store folder is missing") from None
            return None

    async def fetch(self, key: str) -> bytes | None:
        return self.get(key)

    def version(self, key: str) -> tuple[int, int, int, int] | None:
        """A cheap token of the object now at ``key`` (one stat, ~2 µs):
        (inode, size, mtime ns, ctime ns), None when there is none. ``put``
        renames a new file into place, so every publication changes it;
        ``ocspmint serve`` compares it to revalidate a cached object."""
        try:
            st = os.stat(f"{self._root}/{key}")
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def delete(self, key: str) -> None:
        """Remove the file at ``key`` (an atomic unlink: a reader sees the
        whole response or none); StoreError when that fails."""
        try:
            os.unlink(f"{self._root}/{key}")
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as e:
            raise StoreError(f"{self._root}/{key}: {e.strerror}") from None

    def close(self) -> None:
        """Finish every queued write (and its sync), then stop the writer thread."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd, self._tmp = -1, ""  # a later write opens it again

    def keys(self) -> Iterator[str]:
        """Every stored key (walks the folder; for verify and audit)."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d != ".tmp"]
            rel = Path(dirpath).relative_to(self.root)
            for name in filenames:
                yield str(rel / name)


def pid_alive(pid: str) -> bool:
    """Whether process ``pid`` (text) runs; False for no number (names of
    temp files left by a process that died are made from its pid)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True


def folder_missing(url: str) -> str | None:
    """For a ``file:`` store URL whose folder does not exist, the error to
    give before reading it (a reader would find nothing and report every
    serial); None otherwise."""
    if url.startswith("file:") and not os.path.isdir(url[5:]):
        return f"{url[5:]}: store folder does not exist"
    return None


def open_store(url: str, settings: config.Store | None = None) -> Store:
    """Open the store named by ``url``: ``file:PATH`` (a FileStore) or
    ``s3://BUCKET[/PREFIX]`` (an S3Store using ``settings``: endpoint,
    region, profile, concurrency, retries, timeout; default config.Store()).
    Raise StoreError."""
    if url.startswith("file:"):
        if os.path.exists(url[5:]) and not os.path.isdir(url[5:]):  # a file where the folder goes: no object could be written
            raise StoreError(f"{url[5:]}: store folder is a file, not a folder")
        return FileStore(url[5:])
    if url.startswith("s3://"):
        from ocspmint.s3store import S3Store

        return S3Store(url, settings)
    raise StoreError(f"unsupported store URL {url!r}")

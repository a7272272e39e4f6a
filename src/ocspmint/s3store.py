"""S3 back end of the response store (``s3://BUCKET/PREFIX``).

The data path is obstore (Rust ``object_store``), chosen by measurement
(bench/publish_throughput.py, bench/RESULTS.md): ~0.15 ms client CPU per
500-byte PUT against ~1.6 ms for boto3 and ~0.9 ms for aiobotocore.

Object ``key`` lives at ``PREFIX/key`` in ``BUCKET`` (no prefix: ``key``).
Every PUT carries (RFC 5019 §6, docs/store-layout.md):

- ``Content-Type: application/ocsp-response``;
- ``Cache-Control: max-age=N, public, no-transform, must-revalidate``, N the
  whole seconds from the upload to nextUpdate, never below 0 (obstore
  cannot send ``Expires``; Cache-Control takes precedence over it anyway);
- user metadata ``this-update``, ``next-update`` (RFC 3339, ``Z``) and
  ``sha256`` (hex of the body);
- ``x-amz-checksum-sha256`` of the body, so S3 itself rejects a body that
  differs from what was hashed (``BadDigest``), e.g. a truncated upload.

Threads: ``submit`` hands the batch to one background thread that runs an
event loop (uvloop when installed); at most ``concurrency`` PUTs are in
flight over all batches. ``fetch`` awaits obstore directly on the caller's
running loop (any loop, any thread; obstore's I/O runs on its own Rust
runtime), so it never blocks that loop and never goes through the
background thread. ``get``, ``keys`` and ``delete`` block the calling thread.

Retries (PUT): after a 5xx, a throttling answer (429, ``SlowDown``,
``Throttling``...), ``RequestTimeout``, a timeout or a connection error,
up to ``retries`` more attempts, sleeping a uniform random time in
[0, min(BACKOFF_CAP, BACKOFF_BASE · 2^attempt)] before each (exponential
backoff, full jitter). Any other 4xx fails the item at once. Reads (get,
fetch, keys) use obstore's own retry with the same bound. Credentials come
only from the standard AWS chain (environment variables, or the ``profile``
/ AWS_PROFILE shared config through boto3); they are never logged and never
appear in error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import hashlib
import os
import random
import re
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Self

import obstore
from obstore.store import S3Store as _ObStore

from ocspmint.config import http_url_problem, shown_url, split_s3_url
from ocspmint.store import CONTENT_TYPE, PutItem, StoreError

if TYPE_CHECKING:
    from ocspmint.config import Store as StoreSettings

BACKOFF_BASE = 0.1  # seconds, first retry's upper bound
BACKOFF_CAP = 20.0  # seconds, upper bound of any one backoff
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([^<]{1,64})</Code>")
_MESSAGE = re.compile(r"<Message>([^<]{0,200})</Message>")
_RETRY_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "InternalError",
    "ServiceUnavailable",
})
_CACHE_TAIL = "public, no-transform, must-revalidate"
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket[/prefix]`` → (bucket, prefix without surrounding
    slashes, may be ""); StoreError when the bucket is missing or invalid,
    or the prefix has an empty, "." or ".." segment (config.s3_url_problem:
    the checks a config gets at load)."""
    try:
        return split_s3_url(url)
    except ValueError as e:
        raise StoreError(str(e)) from None


def cache_control(next_update: dt.datetime, now: dt.datetime | None = None) -> str:
    """RFC 5019 §6.2 Cache-Control for a response valid until ``next_update``
    (aware): max-age is whole seconds from ``now`` (default: the current UTC
    time) to nextUpdate, at least 0."""
    now = now or dt.datetime.now(dt.UTC)
    age = max(0, int((next_update - now).total_seconds()))
    return f"max-age={age}, {_CACHE_TAIL}"


@functools.lru_cache(maxsize=256)
def _times(this_update: dt.datetime, next_update: dt.datetime) -> tuple[str, str, float]:
    """(RFC 3339 thisUpdate, RFC 3339 nextUpdate, nextUpdate POSIX seconds);
    cached: a batch shares its times."""
    return rfc3339(this_update), rfc3339(next_update), next_update.timestamp()


class _Batch:
    """One submitted batch on the I/O loop: per-item results, items left."""

    __slots__ = ("future", "left", "results")

    def __init__(self, future: Future[list[str | None]], n: int) -> None:
        self.future = future
        self.results: list[str | None] = [None] * n
        self.left = n


def rfc3339(t: dt.datetime) -> str:
    """``2026-11-21T18:00:00Z`` for an aware datetime (seconds precision)."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def classify(error: BaseException) -> tuple[bool, str]:
    """(retryable, one-line description) of an obstore error: 5xx,
    throttling, RequestTimeout, timeouts and connection errors retry; other
    4xx and anything else do not. The description has the status, the S3
    error code and message when there was an answer."""
    text = str(error)
    head = text.split("\n\nDebug source", 1)[0]
    status = _STATUS.search(head)
    if status:
        code_m, msg_m = _CODE.search(head), _MESSAGE.search(head)
        code = code_m.group(1) if code_m else ""
        n = int(status.group(1))
        desc = " ".join(x for x in (str(n), code, msg_m.group(1) if msg_m else "") if x)
        return n >= 500 or n == 429 or code in _RETRY_CODES, desc
    if isinstance(error, FileNotFoundError):
        return False, "not found"
    transient = "HTTP error" in head or "timed out" in head.lower() or "timeout" in head.lower()
    tail = head.rsplit(" - ", 1)[-1].replace("\n", " ")
    if transient:
        kind = re.search(r"kind: (\w+)", text)
        tail = f"{tail} ({kind.group(1)})" if kind else tail
    return transient, tail[:300]


class S3Store:
    """Responses as objects in an S3 bucket; implements ocspmint.store.Store.

    ``S3Store(url, settings)``: ``url`` ``s3://BUCKET[/PREFIX]``; ``settings``
    a config.Store (endpoint, region, profile, concurrency, retries,
    timeout), default config.Store(). Raises StoreError when no
    credentials can be found. Thread-safe; call ``close`` when done.
    """

    def __init__(self, url: str, settings: StoreSettings | None = None) -> None:
        from ocspmint.config import Store as StoreSettingsCls

        s = settings or StoreSettingsCls(url=url)
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = url.rstrip("/")
        self.retries = s.retries
        self._base = self.prefix + "/" if self.prefix else ""
        kw, self._secrets = _obstore_config(s)
        kw["bucket"] = self.bucket
        if self.prefix:
            kw["prefix"] = self.prefix
        # writes: no retry inside obstore, ours below; reads: obstore's own
        try:
            self._put_store = _ObStore(**kw, retry_config={"max_retries": 0})
            self._read_store = _ObStore(**kw, retry_config={"max_retries": s.retries})
        except Exception as e:  # noqa: BLE001 - obstore's ValueError and its own classes
            raise StoreError(self._scrub(f"{self.url}: {type(e).__name__}: {e}")) from None
        self._loop = _new_loop()
        self._concurrency = s.concurrency
        self._queue: deque[tuple[_Batch, int, PutItem]] = deque()
        self._workers = 0  # touched on the I/O loop only
        self._pending: set[Future[list[str | None]]] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop.run_forever, name="ocspmint-s3", daemon=True)
        self._thread.start()

    # -- write path ------------------------------------------------------

    def submit(self, items: list[PutItem]) -> Future[list[str | None]]:
        """Queue ``items`` for upload; return at once. The Future gives, in
        item order, None for an object S3 acknowledged or a one-line error
        ``s3://bucket/prefix/key: ...`` after the retries; it never raises.
        Its callbacks run on the store's I/O thread (keep them short).
        StoreError if the store is closed."""
        fut: Future[list[str | None]] = Future()
        with self._lock:
            if self._closed:
                raise StoreError(f"{self.url}: store is closed")
            if not items:
                fut.set_result([])
                return fut
            self._pending.add(fut)
        fut.add_done_callback(self._done)
        self._loop.call_soon_threadsafe(self._enqueue, list(items), fut)
        return fut

    def _done(self, fut: Future[list[str | None]]) -> None:
        with self._lock:
            self._pending.discard(fut)

    def _enqueue(self, items: list[PutItem], fut: Future[list[str | None]]) -> None:
        """On the I/O loop: queue the batch's items and start workers, up
        to ``concurrency``; a worker ends when the queue is empty."""
        batch = _Batch(fut, len(items))
        self._queue.extend((batch, i, item) for i, item in enumerate(items))
        while self._workers < self._concurrency and self._workers < len(self._queue):
            self._workers += 1
            self._loop.create_task(self._worker())

    async def _worker(self) -> None:
        queue = self._queue
        try:
            while queue:
                batch, i, item = queue.popleft()
                batch.results[i] = await self._put(item)
                batch.left -= 1
                if batch.left == 0 and not batch.future.done():  # done: the caller cancelled it
                    batch.future.set_result(batch.results)
        finally:
            self._workers -= 1

    async def _put(self, item: PutItem) -> str | None:
        """Upload one item with retries; None or the error line."""
        try:
            this_s, next_s, next_ts = _times(item.this_update, item.next_update)
            attributes = {
                "Content-Type": CONTENT_TYPE,
                "this-update": this_s,
                "next-update": next_s,
                "sha256": hashlib.sha256(item.data).hexdigest(),
            }
            attempt = 0
            while True:
                age = int(next_ts - time.time())
                attributes["Cache-Control"] = f"max-age={max(0, age)}, {_CACHE_TAIL}"
                try:
                    await obstore.put_async(self._put_store, item.key, item.data, attributes=attributes)
                    return None
                except Exception as e:  # noqa: BLE001 - obstore raises its own classes and builtins
                    retry, desc = classify(e)
                    if not retry or attempt >= self.retries:
                        tries = f" after {attempt + 1} attempts" if attempt else ""
                        return self._scrub(f"{self._where(item.key)}: PUT failed{tries}: {desc}")
                await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)))
                attempt += 1
        except Exception as e:  # noqa: BLE001 - a bad item (naive datetime, invalid key...): fail it, not the batch
            return self._scrub(f"{self._where(item.key)}: PUT failed: {type(e).__name__}: {e}")

    # -- read path -------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """The object at ``key``, None when there is none; blocks the caller.
        StoreError naming the key on any other failure."""
        try:
            return bytes(obstore.get(self._read_store, key).bytes())
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - obstore's classes and builtins
            raise StoreError(self._scrub(f"{self._where(key)}: GET failed: {classify(e)[1]}")) from None

    async def fetch(self, key: str) -> bytes | None:
        """``get`` awaited on the caller's running loop (any thread); never
        blocks that loop. None when missing; StoreError otherwise."""
        try:
            result = await obstore.get_async(self._read_store, key)
            return bytes(await result.bytes_async())
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - obstore's classes and builtins
            raise StoreError(self._scrub(f"{self._where(key)}: GET failed: {classify(e)[1]}")) from None

    def keys(self) -> Iterator[str]:
        """Every key under the prefix, relative to it (S3 listing order:
        lexicographic), 1000 per request. StoreError on failure."""
        try:
            for chunk in obstore.list(self._read_store, chunk_size=1000):
                for meta in chunk:
                    yield meta["path"]
        except Exception as e:  # noqa: BLE001 - obstore's classes and builtins
            raise StoreError(self._scrub(f"{self.url}: LIST failed: {classify(e)[1]}")) from None

    def delete(self, key: str) -> None:
        """Delete the object at ``key``; blocks the caller. S3 answers a
        missing key with success too. Idempotent, so obstore's read retry
        applies. StoreError naming the key on failure."""
        try:
            obstore.delete(self._read_store, key)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 - obstore's classes and builtins
            raise StoreError(self._scrub(f"{self._where(key)}: DELETE failed: {classify(e)[1]}")) from None

    # -- life cycle ------------------------------------------------------

    def close(self) -> None:
        """Wait for every submitted batch, then stop the I/O thread.
        Idempotent; ``submit`` raises StoreError afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending)
        for fut in pending:
            with contextlib.suppress(Exception):
                fut.result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._base}{key}"

    def _scrub(self, message: str) -> str:
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _obstore_config(s: StoreSettings) -> tuple[dict[str, Any], list[str]]:
    """obstore S3Store keyword arguments from the settings and the standard
    AWS credential chain, and the secrets to scrub from messages.

    Environment keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN) are read by obstore itself unless ``profile`` is set;
    otherwise boto3 resolves the profile / shared config / SSO / instance
    chain and obstore asks it for fresh credentials. StoreError when none,
    or when the endpoint is no http(s) URL (obstore would panic on every
    request) or ``timeout`` is not positive.
    """
    if s.endpoint and (problem := http_url_problem(s.endpoint, "an S3 endpoint")):
        raise StoreError(f"S3 endpoint {shown_url(s.endpoint)!r}: {problem}")
    if s.timeout <= dt.timedelta(0):
        raise StoreError(f"S3 timeout {s.timeout.total_seconds():g} s: must be > 0")
    timeout = s.timeout
    kw: dict[str, Any] = {
        "checksum_algorithm": "sha256",
        "client_options": {
            "timeout": timeout,
            "connect_timeout": min(timeout, dt.timedelta(seconds=10)),
            "pool_max_idle_per_host": str(max(s.concurrency, 1)),
            "allow_http": urllib.parse.urlsplit(s.endpoint).scheme == "http",
        },
    }
    if s.endpoint:
        kw["endpoint"] = s.endpoint
    region = s.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
    secrets = [v for name in _SECRET_ENV if (v := os.environ.get(name))]
    if s.profile or not os.environ.get("AWS_ACCESS_KEY_ID"):
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider

        try:
            session = boto3.Session(profile_name=s.profile or None)
            provider = Boto3CredentialProvider(session)
        except Exception as e:  # noqa: BLE001 - botocore ProfileNotFound, ValueError (no credentials)
            what = f"profile {s.profile!r}" if s.profile else "the environment or shared config"
            raise StoreError(f"no AWS credentials from {what}: {type(e).__name__}") from None
        frozen = provider.credentials.get_frozen_credentials()
        secrets += [x for x in (frozen.secret_key, frozen.token) if x]
        kw["credential_provider"] = provider
        region = s.region or session.region_name or region
    kw["region"] = region or "us-east-1"
    return kw, secrets

"""``ocspmint serve``: the RFC 5019 / RFC 9919 origin responder.

It parses GET and POST OCSP requests (RFC 6960 App. A, ``ocspmint.request``)
under ``[serve] path_prefix``, maps the CertID to a stored response
(``store.object_key``) and answers with the cache headers of RFC 5019 §6 /
RFC 9919 §6; anything it cannot answer gets one of the unsigned 5-byte
error responses of RFC 6960 §4.2.1, never a 404, an empty body or a stack
trace. docs/responder.md is the guide.

A stored object is checked once per cache fill with
``verifier.verify_response`` (signature, CertID issuer, status, times);
one that fails is answered with internalError, never served. Served
objects are kept in a byte-bounded LRU (``[serve] cache_bytes``), each
entry for at most ``cache_ttl`` and never past its nextUpdate. With a file
store every hit is revalidated by a stat of the object
(``FileStore.version``), so a republished or deleted object is never
answered from memory; an S3 store has no such cheap check, and its default
``cache_ttl`` is 0 (no cache). A store miss is never cached, so a newly
published precertificate response is served as soon as it is in the store
(BR 4.9.9's 15 minutes). PURGE and BAN from ``purge_from`` drop entries.
``/healthz`` and ``/metrics`` (Prometheus) sit beside the OCSP paths: a GET
request path is base64 of a DER SEQUENCE and always starts with "M", so
they cannot collide.

HTTP is aiohttp on uvloop, with aiohttp's pure-Python request parser:
the C parser (llhttp) refuses the ``BAN`` method outright. Each request
must be read whole within REQUEST_TIMEOUT, else 408 and the connection
closed (``_Connection``: no slowloris client holds a connection).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from email.utils import formatdate
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from ocspmint.config import Config
from ocspmint.encoder import MALFORMED_REQUEST, UNAUTHORIZED
from ocspmint.issuer import IdentityError, IssuerIdentity, load_issuers, signed_by
from ocspmint.respcache import Cache, Metrics, Stored, parse_stored
from ocspmint.request import IssuerMap, RequestError, parse_get_path, parse_request
from ocspmint.store import CONTENT_TYPE, Store, StoreError, object_key, open_store
from ocspmint.verifier import verify_response

INTERNAL_ERROR = bytes.fromhex("3003 0a01 02")
# What RFC 6960 §4.2.1 says the unsigned error responses are, byte for byte.
RFC6960_ERRORS = {
    "malformedRequest": bytes.fromhex("3003 0a01 01"),
    "internalError": bytes.fromhex("3003 0a01 02"),
    "unauthorized": bytes.fromhex("3003 0a01 06"),
}
MAX_BODY = 10 * 1024  # POST body cap, bytes (RFC 9919 §6: reject ~10 KB and over)
NO_CACHE = "max-age=0, no-cache"
PROBE_KEY = "healthz/probe"  # a key no response has; fetching it proves the store answers
OCSP_METHODS = ("GET", "HEAD", "POST")
ALLOW = "GET, HEAD, POST, PURGE, BAN"
_HEX = frozenset("0123456789abcdef")
KEEPALIVE_SECONDS = 15.0  # an idle keep-alive connection is closed after this (aiohttp's default: an hour)
# Seconds a client has to send a whole request (request line, headers, body), counted from
# the connection opening or the first byte of a later request on it; then 408 and close.
REQUEST_TIMEOUT = 10.0
REQUEST_TIMEOUT_REPLY = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
MAX_LINE = 4 * MAX_BODY  # request line: a GET of a request POST accepts, base64 then percent-encoded
FILE_CACHE_TTL = 60.0  # default [serve] cache_ttl, seconds, for a store whose hits are revalidated (file)
MAX_SIGNERS = 64  # responder certificates remembered across rollovers
EXPIRED_FINDING = "times: expired"  # a response past nextUpdate is served uncached (no-cache), not refused


class ServeError(Exception):
    """The responder cannot start; the message says why (exit status 2)."""


class UnservableResponse(ValueError):
    """The stored object at ``key`` fails ``verify_response``; ``findings``
    are the verifier's (never empty). Answered with internalError."""

    def __init__(self, key: str, findings: list[str]) -> None:
        more = f" (+{len(findings) - 1} more)" if len(findings) > 1 else ""
        super().__init__(f"{key}: stored response fails verification: {findings[0]}{more}")
        self.key, self.findings = key, findings


def _log(event: str, **fields: Any) -> None:
    """One JSON line on stderr (never PINs, credentials or request bodies):
    ``time`` (RFC 3339 UTC with microseconds and ``Z``, as
    ``refresh_purge.log`` writes it), ``event``, then ``fields``."""
    line = {"time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "event": event, **fields}
    print(json.dumps(line), file=sys.stderr, flush=True)


class _HttpErrorLog(logging.Handler):
    """aiohttp's own errors (a request it cannot parse: over-long line, bad
    header) as one ``http_error`` JSON line, at most one a second, without
    the traceback aiohttp attaches: any client could otherwise flood the log
    and break its one-line format."""

    def __init__(self) -> None:
        super().__init__()
        self._last, self._quiet = 0.0, 0

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        if now - self._last < 1.0:
            self._quiet += 1
            return
        error = record.exc_info[1] if record.exc_info else None
        detail = f"{type(error).__name__}: {str(error).strip()[:200]}" if error else record.getMessage()[:200]
        _log("http_error", error=detail, suppressed=self._quiet)
        self._last, self._quiet = now, 0


class _Throttle:
    """At most one log line a second for events any client can cause."""

    def __init__(self) -> None:
        self._last, self._suppressed = 0.0, 0

    def take(self) -> int | None:
        """None: skip this event's line (counted); else log it now, with
        this many events skipped since the last line."""
        now = time.monotonic()
        if now - self._last < 1.0:
            self._suppressed += 1
            return None
        suppressed, self._last, self._suppressed = self._suppressed, now, 0
        return suppressed


def _http_logger() -> logging.Logger:
    logger = logging.getLogger("ocspmint.serve.http")
    if not logger.handlers:
        logger.addHandler(_HttpErrorLog())
        logger.propagate = False
    return logger


# --- the responder ------------------------------------------------------------


def _http_date(t: int) -> str:
    return formatdate(t, usegmt=True)


def _etag_matches(header: str, etag: str) -> bool:
    """If-None-Match weak comparison (RFC 9110 §13.1.2): "*" or any listed
    entity-tag equal to ``etag`` once a W/ prefix is dropped."""
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def _networks(entries: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    try:
        return [ipaddress.ip_network(e, strict=False) for e in entries]
    except ValueError as e:
        raise ServeError(f"$.serve.purge_from: {e}") from None


class Responder:
    """The request handler (an aiohttp low-level handler: ``await
    responder.handle(request)``), its cache and its metrics."""

    def __init__(self, config: Config, issuers: Iterable[IssuerIdentity], reader: Store,
                 clock: Callable[[], float] = time.time) -> None:
        serve = config.serve
        issuers = list(issuers)
        self.issuers = IssuerMap(issuers)
        self._by_id = {i.id: i for i in issuers}
        self._signers: dict[tuple[str, bytes], IssuerIdentity | None] = {}  # (issuer, responder DER) → ``signed_by``
        self.reader = reader
        self.clock = clock
        self.path_prefix = serve.path_prefix
        self.max_age = int(serve.max_age.total_seconds())
        # a file store's object is stat'ed on every hit (FileStore.version); a store without
        # such a check (S3) would serve a superseded object for cache_ttl: no cache by default
        self._version: Callable[[str], Any] | None = getattr(reader, "version", None)
        if serve.cache_ttl is not None:
            ttl = serve.cache_ttl.total_seconds()
        else:
            ttl = FILE_CACHE_TTL if self._version is not None else 0.0
        self.cache = Cache(serve.cache_bytes, ttl, clock)
        self.metrics = Metrics(self.cache)
        self.purge_from = _networks(serve.purge_from)
        self._inflight: dict[str, asyncio.Future[Stored | None]] = {}
        self._bans = 0  # bumped by every PURGE/BAN: a fill begun before one is not cached
        self._last_error_log, self._quiet_errors = 0.0, 0

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        method = request.method
        path = request.raw_path
        if not path.startswith("/"):  # absolute-form request-target
            path = "/" + path.partition("://")[2].partition("/")[2]
        route = path.partition("?")[0]
        if method in ("GET", "HEAD") and route in ("/healthz", "/metrics"):
            return await (self._healthz() if route == "/healthz" else self._metrics())
        if method in ("PURGE", "BAN"):
            return await self._purge(request, path)
        if method not in OCSP_METHODS:
            return web.Response(status=405, text="method not allowed\n", headers={"Allow": ALLOW})
        start = time.perf_counter()
        result = "error"
        try:
            result, response = await self._ocsp(request, path)
        except ConnectionResetError:  # the client hung up mid-request: nothing to answer, not an error of ours
            result, response = "aborted", self._error(INTERNAL_ERROR)
        except Exception as e:  # noqa: BLE001 - any failure is internalError, never a trace
            self._log_error(method, e)
            response = self._error(INTERNAL_ERROR)
        self.metrics.answered(result, time.perf_counter() - start)
        return response

    def _log_error(self, method: str, e: Exception) -> None:
        """Log an internalError, at most one line a second (a store outage
        fails every request); ``suppressed`` counts the lines skipped. A
        stored object failing verification names its ``key`` and the
        verifier's first ``finding``."""
        now = time.monotonic()
        if now - self._last_error_log < 1.0:
            self._quiet_errors += 1
            return
        fields: dict[str, Any] = {}
        if isinstance(e, UnservableResponse):
            fields = {"key": e.key, "finding": e.findings[0][:300], "findings": len(e.findings)}
        _log("error", method=method, error=f"{type(e).__name__}: {str(e)[:200]}", **fields,
             suppressed=self._quiet_errors)
        self._last_error_log, self._quiet_errors = now, 0

    def _unprefixed(self, path: str) -> str | None:
        """``path`` (with its query) without ``path_prefix``: "/..." or
        "" for the prefix itself; None when the path is outside it."""
        prefix = self.path_prefix
        if not prefix:
            return path
        route = path.partition("?")[0]
        if route == prefix or route.startswith(prefix + "/"):
            return path[len(prefix):]
        return None

    def _error(self, body: bytes) -> Any:
        from aiohttp import web

        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE, "Cache-Control": NO_CACHE})

    async def _read_body(self, request: Any) -> bytes | None:
        """The POST body, or None when it is over MAX_BODY or not typed
        application/ocsp-request (RFC 6960 App. A.1); never reads more
        than MAX_BODY + 1 bytes."""
        ctype = request.headers.get("Content-Type", "application/ocsp-request")
        if ctype.partition(";")[0].strip().lower() != "application/ocsp-request":
            return None
        if request.content_length is not None and request.content_length > MAX_BODY:
            return None
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = bytearray()
        while len(body) <= MAX_BODY:
            chunk = await request.content.read(MAX_BODY + 1 - len(body))
            if not chunk:
                return bytes(body)
            body += chunk
        return None

    async def _ocsp(self, request: Any, path: str) -> tuple[str, Any]:
        from aiohttp import web

        inner = self._unprefixed(path)
        if inner is None:  # not under [serve] path_prefix: a bad path, as any other
            response = self._error(MALFORMED_REQUEST)
            if request.method == "POST":
                response.force_close()  # the body is never read
            return "malformed", response
        try:
            if request.method == "POST":
                data = await self._read_body(request)
                if data is None:
                    response = self._error(MALFORMED_REQUEST)
                    response.force_close()  # the rest of the body is never read
                    return "malformed", response
                cids = parse_request(data)
            else:
                cids = parse_get_path(inner)
        except RequestError:
            return "malformed", self._error(MALFORMED_REQUEST)
        # RFC 5019 §2.1.1: one Request. Several are answered only when they
        # name one certificate (say a SHA-1 and a SHA-256 CertID of it).
        targets = {(i.id if (i := self.issuers.issuer(c)) else None, c.serial) for c in cids}
        if len(targets) > 1:
            return "malformed", self._error(MALFORMED_REQUEST)
        key = self.issuers.key(cids[0])
        stored = await self._load(key) if key is not None else None
        if stored is not None and all(serial != cids[0].serial for _, serial in stored.certids):
            raise ValueError(f"{key}: the stored response is for another serial")  # internalError, logged
        if stored is None or any((c.hash_name, c.serial) not in stored.certids for c in cids):
            return "unauthorized", self._error(UNAUTHORIZED)  # no response, or none with this CertID hash
        now = int(self.clock())
        expired = now >= stored.next_update
        if expired:
            cache_control = NO_CACHE
        else:
            max_age = min(self.max_age, stored.next_update - now)  # Date + max-age ≤ nextUpdate
            cache_control = f"max-age={max_age}, public, no-transform, must-revalidate"
        headers = {
            "Content-Type": CONTENT_TYPE,
            "Date": _http_date(now),
            "Last-Modified": _http_date(stored.this_update),
            "Expires": _http_date(stored.next_update),
            "ETag": stored.etag,
            "Cache-Control": cache_control,
            "X-OCSP-Key": stored.label,
        }
        inm = request.headers.get("If-None-Match")
        if inm is not None and _etag_matches(inm, stored.etag):
            del headers["Content-Type"]
            return ("expired" if expired else "not_modified"), web.Response(status=304, headers=headers)
        return ("expired" if expired else "ok"), web.Response(body=stored.body, headers=headers)

    async def _load(self, key: str) -> Stored | None:
        """The response at ``key``, from the cache or the store (one store
        read per key at a time); None when the store has none. A cached
        entry of a file store is served only while the object's stat token
        is the one read with it. Raises StoreError or ValueError
        (unreadable stored response, UnservableResponse)."""
        hit = self.cache.get(key)
        if hit is not None:
            if self._version is None or self._version(key) == hit.version:
                self.metrics.hit()
                return hit
            self.cache.drop(key)  # republished or deleted since it was read
        self.metrics.miss()
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._fill(key))
            self._inflight[key] = fut
            fut.add_done_callback(lambda f: self._inflight.pop(key, None) if self._inflight.get(key) is f else None)
        return await asyncio.shield(fut)

    async def _fill(self, key: str) -> Stored | None:
        bans = self._bans
        # the token is taken before the read: a publication in between gives new bytes under
        # the old token, which the next hit sees as changed (never old bytes under a new token)
        version = self._version(key) if self._version is not None else None
        body = await self.reader.fetch(key)
        if body is None:
            return None  # never cached: a new precertificate must be served at once
        try:
            stored = parse_stored(body, key.partition("/")[2], version)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        self._verify(key, stored)
        if bans == self._bans and self.clock() < stored.next_update:
            self.cache.put(key, stored)
        return stored

    def _verify(self, key: str, stored: Stored) -> None:
        """``verify_response`` of the object read at ``key`` against the
        key's issuer (signature and signer, CertID issuer hashes, status
        not unknown, times; not the ledger: expect None), once per fill
        (~0.1 ms). A response past nextUpdate passes here: it is served
        with no-cache, counted as expired. Only a response the configured
        signer did not make is parsed again, for ``_signer_of``. Raises
        UnservableResponse."""
        issuer = self._by_id[key.split("/")[1]]
        now = dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc)

        def findings(signer: IssuerIdentity) -> list[str]:
            return [f for f in verify_response(stored.body, signer, None, now) if not f.startswith(EXPIRED_FINDING)]

        found = findings(issuer)
        if found and (other := self._signer_of(issuer, stored.body)) is not issuer:
            found = findings(other)
        if found:
            raise UnservableResponse(key, found)

    def _signer_of(self, issuer: IssuerIdentity, body: bytes) -> IssuerIdentity:
        """``issuer`` with the signer that made ``body``: the configured one,
        or, across a responder certificate rollover (objects not re-signed
        yet, or a ``serve`` started before it), the CA's own key or the
        delegated responder certificate the response carries, checked as a
        configured one (``issuer.signed_by``: issued by the CA, RFC 6960
        §4.2.2.2, and the BR 7.1.2.8 profile). Anything else: the configured
        signer, so the verifier names the mismatch."""
        try:
            resp = ocsp.load_der_ocsp_response(body)
            key_hash, certs = resp.responder_key_hash, resp.certificates
        except ValueError:
            return issuer
        if key_hash is None or key_hash == issuer.signer.key_hash:
            return issuer
        for cert in [None, *certs]:
            other = self._signed_by(issuer, cert)
            if other is not None and other.signer.key_hash == key_hash:
                return other
        return issuer

    def _signed_by(self, issuer: IssuerIdentity, cert: x509.Certificate | None) -> IssuerIdentity | None:
        """``signed_by(issuer, cert)``, None when ``cert`` may not sign for
        it; remembered (``MAX_SIGNERS``)."""
        key = (issuer.name, b"" if cert is None else cert.public_bytes(serialization.Encoding.DER))
        if key not in self._signers:
            if len(self._signers) >= MAX_SIGNERS:  # a store full of foreign certificates
                self._signers.pop(next(iter(self._signers)))
            try:
                self._signers[key] = signed_by(issuer, cert)
            except IdentityError:
                self._signers[key] = None
        return self._signers[key]

    def _forget(self, keys: set[str], issuer_ids: set[str]) -> int:
        """Drop ``keys`` and every key of ``issuer_ids`` from the cache and
        from the fills in flight; the number of cached entries dropped."""
        self._bans += 1

        def hit(key: str) -> bool:
            return key in keys or key.split("/")[1] in issuer_ids

        for key in [k for k in self._inflight if hit(k)]:
            del self._inflight[key]
        return sum(self.cache.drop(k) for k in (self.cache.keys() if issuer_ids else keys) if hit(k))

    def _allowed(self, remote: str | None) -> bool:
        try:
            ip = ipaddress.ip_address(remote or "")
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)
        return any(ip in net or (mapped is not None and mapped in net) for net in self.purge_from)

    async def _purge(self, request: Any, path: str) -> Any:
        """PURGE /<request>: forget what that request maps to. BAN with
        ``X-OCSP-Key: <issuer id>/<serial hex>`` and/or ``X-OCSP-Issuer:
        <issuer id>`` (each may list several, comma-separated or repeated):
        forget those keys / every key of those issuers. 405 unless the
        client address is in ``purge_from``; 400 for an unparsable target;
        else 200 ``purged N`` (N: cached entries dropped)."""
        from aiohttp import web

        if not self._allowed(request.remote):
            return web.Response(status=405, text="method not allowed\n", headers={"Allow": "GET, HEAD, POST"})
        keys: set[str] = set()
        issuer_ids: set[str] = set()

        def values(header: str) -> list[str]:
            return [v.strip().lower() for h in request.headers.getall(header, []) for v in h.split(",") if v.strip()]

        try:
            if request.method == "PURGE":  # the request path with or without path_prefix
                inner = self._unprefixed(path)
                cids = parse_get_path(path if inner is None else inner)
                keys = {k for c in cids if (k := self.issuers.key(c)) is not None}
            else:
                for value in values("X-OCSP-Key"):
                    issuer_id, _, serial = value.partition("/")
                    if len(issuer_id) != 40 or not serial or not _HEX.issuperset(issuer_id + serial):
                        raise ValueError(value)
                    keys.add(object_key(issuer_id, int(serial, 16)))
                for issuer_id in values("X-OCSP-Issuer"):
                    if len(issuer_id) != 40 or not _HEX.issuperset(issuer_id):
                        raise ValueError(issuer_id)
                    issuer_ids.add(issuer_id)
                if not keys and not issuer_ids:
                    raise ValueError("no X-OCSP-Key or X-OCSP-Issuer")
        except ValueError:  # RequestError included
            return web.Response(status=400, text="bad purge target\n")
        dropped = self._forget(keys, issuer_ids)
        return web.Response(text=f"purged {dropped}\n", headers={"Cache-Control": "no-store"})

    async def check_store(self) -> None:
        """Raise when the store does not answer (a fetch of PROBE_KEY)."""
        await self.reader.fetch(PROBE_KEY)

    async def _healthz(self) -> Any:
        from aiohttp import web

        try:
            await self.check_store()
        except Exception as e:  # noqa: BLE001
            _log("healthz", ok=False, error=f"{type(e).__name__}: {str(e)[:200]}")
            return web.Response(status=503, text="store unreachable\n", headers={"Cache-Control": "no-store"})
        return web.Response(text="ok\n", headers={"Cache-Control": "no-store"})

    async def _metrics(self) -> Any:
        from aiohttp import web

        body, ctype = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": ctype, "Cache-Control": "no-store"})


# --- connections --------------------------------------------------------------


def _connection_class() -> type:
    """``_Connection``: aiohttp's per-connection protocol with the request
    read deadline (aiohttp is imported only when serving)."""
    from aiohttp import web

    class _Connection(web.RequestHandler):
        """One client connection. Each request must be read whole (request
        line, headers and any body) within REQUEST_TIMEOUT of the connection
        opening, or of the first byte of that request on a kept-alive
        connection (a slowloris client trickling bytes or sending none holds
        nothing for longer). When the deadline passes before the request is
        read, nothing has been answered yet: the client gets 408 and the
        connection is closed, logged as one ``request_timeout`` line
        (``throttle``: at most one a second). A kept-alive connection idle
        between requests is aiohttp's: closed silently after
        KEEPALIVE_SECONDS."""

        def __init__(self, server: web.Server, throttle: _Throttle, **kwargs: Any) -> None:
            super().__init__(server, **kwargs)
            self._throttle = throttle
            self._deadline: asyncio.TimerHandle | None = None
            self._payload: Any = None  # the body of the request read last (aiohttp's StreamReader)
            self._body = False  # the deadline now waits for a request body

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: BaseException | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and (self._payload is None or self._payload.is_eof()):
                self._arm()  # the first byte of a later request, not the rest of a body
            super().data_received(data)

        def headers_read(self, payload: Any) -> None:
            """A request's line and headers are parsed; its body (if any)
            is ``payload``: the deadline stands until its end."""
            self._payload = payload
            if payload.is_eof():
                self._disarm()
                return
            if self._deadline is None:  # a pipelined request read with the previous one
                self._arm()
            self._body = True
            payload.on_eof(self._disarm)

        async def finish_response(self, request: Any, resp: Any, start_time: float | None) -> tuple[Any, bool]:
            """Write the answer. A body still unread (a GET's) is
            aiohttp's from here (read for lingering_time, then the
            connection closed): its deadline ends, no 408 follows an answer."""
            try:
                return await super().finish_response(request, resp, start_time)
            finally:
                if not self._payload.is_eof():
                    self._disarm()

        def _arm(self) -> None:
            self._body = False
            self._deadline = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, self._timed_out)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _timed_out(self) -> None:
            self._deadline = None
            if self.transport is None:
                return
            peer = self.transport.get_extra_info("peername")
            self.transport.write(REQUEST_TIMEOUT_REPLY)
            self.force_close()
            if (suppressed := self._throttle.take()) is not None:
                _log("request_timeout", peer=peer[0] if peer else None, waiting_for="body" if self._body else "headers",
                     seconds=REQUEST_TIMEOUT, suppressed=suppressed)

    return _Connection


def _server(handler: Callable[[Any], Any], **kwargs: Any) -> Any:
    """An aiohttp low-level server answering with ``handler`` whose
    connections are ``_Connection``s (``kwargs``: theirs)."""
    from aiohttp import web

    connection, throttle = _connection_class(), _Throttle()

    def request(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
        protocol.headers_read(payload)
        return web.BaseRequest(message, payload, protocol, writer, task, asyncio.get_running_loop())

    class _Server(web.Server):
        def __call__(self) -> web.RequestHandler:
            return connection(self, throttle, loop=asyncio.get_running_loop(), **kwargs)

    return _Server(handler, request_factory=request)


# --- start and stop -----------------------------------------------------------


def self_check() -> list[str]:
    """Problems with the error bodies this responder sends: each must equal
    the RFC 6960 §4.2.1 bytes and what pyca cryptography's
    ``OCSPResponseBuilder.build_unsuccessful`` makes. Empty when fine."""
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509 import ocsp

    sent = {"malformedRequest": MALFORMED_REQUEST, "internalError": INTERNAL_ERROR, "unauthorized": UNAUTHORIZED}
    statuses = {
        "malformedRequest": ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
        "internalError": ocsp.OCSPResponseStatus.INTERNAL_ERROR,
        "unauthorized": ocsp.OCSPResponseStatus.UNAUTHORIZED,
    }
    problems = []
    for name, body in sent.items():
        reference = ocsp.OCSPResponseBuilder.build_unsuccessful(statuses[name]).public_bytes(Encoding.DER)
        if not body == RFC6960_ERRORS[name] == reference:
            problems.append(f"{name} body {body.hex()} != RFC 6960 {RFC6960_ERRORS[name].hex()} / "
                            f"cryptography {reference.hex()}")
    return problems


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` (port 0: any free port); ServeError."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ServeError(f"listen address {listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _accept_any_method() -> None:
    """Make aiohttp use its pure-Python request parser, which accepts any
    method token; llhttp (the C parser) answers BAN with 400."""
    from aiohttp import web_protocol
    from aiohttp.http_parser import HttpRequestParserPy

    web_protocol.HttpRequestParser = HttpRequestParserPy  # type: ignore[attr-defined,misc]


async def _run(config: Config, issuers: list[IssuerIdentity], host: str, port: int) -> int:
    from aiohttp import web

    try:
        reader = open_store(config.store.url, config.store)
        responder = Responder(config, issuers, reader)
        await responder.check_store()
    except (StoreError, ServeError, OSError) as e:
        print(f"ocspmint serve: store {config.store.url} unusable: {e}", file=sys.stderr)
        return 2
    server = _server(responder.handle, access_log=None, logger=_http_logger(), keepalive_timeout=KEEPALIVE_SECONDS,
                     max_line_size=MAX_LINE)
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=10)
    await runner.setup()
    site = web.TCPSite(runner, host or None, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        print(f"ocspmint serve: cannot listen on {host}:{port}: {e.strerror}", file=sys.stderr)
        return 2
    bound = [addr[:2] for addr in runner.addresses]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _log("start", listen=[f"{h}:{p}" for h, p in bound], store=config.store.url, path_prefix=config.serve.path_prefix,
         cache_ttl=responder.cache.ttl, issuers=[i.name for i in issuers], pid=os.getpid())
    missing = [h for h in ("sha1", "sha256") if h not in config.response.certid_hashes]
    if missing:  # an assigned serial asked for with that hash gets unauthorized
        _log("warning", certid_hashes=list(config.response.certid_hashes),
             message=f"requests with {' or '.join(h.upper().replace('SHA', 'SHA-') for h in missing)} CertIDs are "
                     "answered unauthorized, even for assigned serials: the stored responses have no such "
                     "SingleResponse; set [response] certid_hashes = [\"sha1\", \"sha256\"] and re-sign "
                     "(RFC 9919 clients ask with SHA-256)")
    await stop.wait()
    await runner.cleanup()
    reader.close()
    m = responder.metrics
    _log("stop", answered=m.counts,
         cache_hits=m.n_hits, cache_misses=m.n_misses)
    return 0


def serve(config: Config, listen: str | None = None) -> int:
    """Run the responder until SIGTERM/SIGINT; the exit status: 0 after a
    clean stop, 2 when it refuses to start (self-check, issuers, store,
    listen address). Raises IdentityError for an unusable issuer
    certificate (the CLI maps it to 2)."""
    problems = self_check()
    if problems:
        print("ocspmint serve: refusing to start, error response bytes are wrong:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 2
    try:
        host, port = parse_listen(listen or config.serve.listen)
        _networks(config.serve.purge_from)
    except ServeError as e:
        print(f"ocspmint serve: {e}", file=sys.stderr)
        return 2
    issuers = list(load_issuers(config).values())
    _accept_any_method()
    import uvloop

    return uvloop.run(_run(config, issuers, host, port))

"""Invalidator: purge CDN caches where a served status changed.

The journal queues one purge per (target, issuer, serial) in the same
transaction that records a response whose status, revocation or signer
changed (routine refreshes are not purged: the origin's max-age never
reaches past nextUpdate). ``invalidate`` sends what is queued to every
configured target and removes it from the queue only when the target
acknowledged it; what fails stays queued for the next run and is reported
in the summary (docs/purge.md).

Targets:
- ``http`` (Varnish, Fastly-style): ``BAN`` with ``X-OCSP-Key: <issuer
  id>/<serial>`` (the responder's surrogate key, so every request encoding
  of that serial goes), or ``X-OCSP-Issuer: <issuer id>`` when an issuer
  has more than ``wildcard_over`` serials queued; or ``PURGE`` of each
  canonical GET URL (SHA-1 and SHA-256 CertIDs as configured, base64 raw
  and percent-encoded).
- ``cloudfront``: ``CreateInvalidation`` of the same GET paths, at most
  ``MAX_PATHS`` per invalidation; an issuer with more than
  ``wildcard_over`` paths gets one wildcard per (CertID hash, serial
  length, encoding) instead: the base64 prefix that the issuer's name and
  key hashes fix.

Every GET path (PURGE targets, CloudFront paths and wildcards) lies under
``[serve] path_prefix``, as the requests a cache holds do. Purges queued
under a target name no longer configured, or for an issuer no longer
configured, are reported pending (never sent, never dropped) until an
operator clears them (docs/purge.md). No message names a URL's
user:password (``config.shown_url``; the config refuses them anyway).
"""

from __future__ import annotations

import hashlib
import http.client
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from typing import Any

from ocspmint.config import Config, Purge, http_url_problem, shown_url
from ocspmint.issuer import IssuerIdentity
from ocspmint.journal import Journal
from ocspmint.model import serial_hex
from ocspmint.report import PurgeResult
from ocspmint.request import get_paths, request_for

MAX_PATHS = 3000  # CloudFront: paths in flight per distribution
ATTEMPTS = 3  # per run; what still fails stays queued for the next run
Key = tuple[str, int]  # (issuer name, serial)


class PurgeError(Exception):
    """A target did not acknowledge a purge; the message names it."""


def _by_issuer(keys: list[Key]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for issuer, serial in keys:
        out.setdefault(issuer, []).append(serial)
    return out


def _path(p: str) -> str:
    return p if p.startswith("/") else "/" + p


def serial_paths(ident: IssuerIdentity, serial: int, hashes: list[str], prefix: str = "") -> list[str]:
    """Every canonical GET path (leading "/") of ``serial``'s request,
    under ``prefix`` (``[serve] path_prefix``: "" or "/ocsp")."""
    return sorted({prefix + _path(p) for h in hashes for p in get_paths(request_for(ident, serial, h))})


def issuer_wildcards(ident: IssuerIdentity, serials: list[int], hashes: list[str], prefix: str = "") -> list[str]:
    """Wildcard paths covering every GET path of ``serials`` (under
    ``prefix``): per CertID hash and serial length, the base64 characters
    fixed by the bytes before the serial's content (the request's last
    bytes: no extensions)."""
    by_length = {s.bit_length() // 8 + 1: s for s in serials}  # DER INTEGER content octets
    out = set()
    for h in hashes:
        for length, sample in by_length.items():
            der = request_for(ident, sample, h)
            fixed = (len(der) - length) // 3 * 4
            out.update(prefix + _path(_fixed_prefix(p, fixed)) + "*" for p in get_paths(der))
    return sorted(out)


def _fixed_prefix(path: str, chars: int) -> str:
    """The leading part of ``path`` that encodes the first ``chars`` base64
    characters (a percent-escape counts as one character)."""
    path = path.lstrip("/")
    i = n = 0
    while n < chars:
        i += 3 if path[i] == "%" else 1
        n += 1
    return path[:i]


class HttpTarget:
    """PURGE/BAN to each base URL of an ``http`` target, in order; PURGE
    paths lie under ``prefix`` (``[serve] path_prefix``), after the base
    URL's own path."""

    CHUNK = 1000  # keys acknowledged per journal transaction

    def __init__(self, target: Purge, issuers: dict[str, IssuerIdentity], hashes: list[str], prefix: str = "") -> None:
        self.target, self.issuers, self.hashes, self.prefix = target, issuers, hashes, prefix
        self._wide: set[str] = set()  # ``prepare``: issuers purged by one issuer-wide BAN
        self._banned: set[str] = set()  # those whose BAN every base URL acknowledged in this drain

    def prepare(self, queued: list[Key]) -> None:
        """Before a drain of ``queued``: with method "ban", an issuer with
        more than ``wildcard_over`` serials in the whole queue gets one
        issuer-wide BAN (with its first chunk) instead of one per serial.
        Counted over the queue, not per chunk: a chunk holds at most CHUNK
        keys, never more than the default ``wildcard_over``."""
        counts = Counter(issuer for issuer, _ in queued)
        wide = self.target.method == "ban"
        self._wide = {name for name, n in counts.items() if wide and n > self.target.wildcard_over}
        self._banned = set()

    def _requests(self, keys: list[Key]) -> list[tuple[str, str, dict[str, str]]]:
        out: list[tuple[str, str, dict[str, str]]] = []
        for name, serials in _by_issuer(keys).items():
            ident = self.issuers[name]
            if self.target.method == "purge":
                out += [("PURGE", p, {}) for s in serials for p in serial_paths(ident, s, self.hashes, self.prefix)]
            elif name in self._wide:
                if name not in self._banned:  # every key was queued, so published, before this drain's BAN
                    out.append(("BAN", "/", {"X-OCSP-Issuer": ident.id}))
            else:
                out += [("BAN", "/", {"X-OCSP-Key": f"{ident.id}/{serial_hex(s)}"}) for s in serials]
        return out

    def send(self, keys: list[Key]) -> None:
        """Raise PurgeError unless every base URL answered 2xx to every
        request; never anything else. A base URL that is no usable http(s)
        URL (the config refuses those at load) fails without a connection;
        no message holds a URL's user:password."""
        requests = self._requests(keys)
        for base in self.target.urls:
            shown = shown_url(base)
            if problem := http_url_problem(base, "a purge URL"):
                raise PurgeError(f"{shown}: {problem}")
            conn: http.client.HTTPConnection | None = None
            try:
                url = urllib.parse.urlsplit(base)
                conn_type = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
                conn = conn_type(url.netloc, timeout=self.target.timeout.total_seconds())
                for method, path, headers in requests:
                    conn.request(method, url.path.rstrip("/") + path, headers=headers)
                    reply = conn.getresponse()
                    reply.read()
                    if not 200 <= reply.status < 300:
                        raise PurgeError(f"{method} {shown.rstrip('/')}{path} answered HTTP {reply.status} {reply.reason}")
            except (OSError, http.client.HTTPException, ValueError) as e:  # InvalidURL is an HTTPException
                raise PurgeError(f"{shown}: {str(e) or type(e).__name__}") from None
            finally:
                if conn is not None:
                    conn.close()
        self._banned.update(name for name, _ in keys if name in self._wide)


class CloudFrontTarget:
    """CreateInvalidation on one distribution (boto3 client injected); the
    paths lie under ``prefix`` (``[serve] path_prefix``), as viewers ask."""

    CHUNK = None  # the whole queue in one invalidation

    def __init__(self, target: Purge, issuers: dict[str, IssuerIdentity], hashes: list[str], client: Any,
                 prefix: str = "") -> None:
        self.target, self.issuers, self.hashes, self.client, self.prefix = target, issuers, hashes, client, prefix

    def paths(self, keys: list[Key]) -> list[str]:
        """Paths for ``keys``: exact, or wildcards for issuers over the
        threshold, or for every issuer when exact paths exceed MAX_PATHS."""
        groups = [(self.issuers[n], s) for n, s in _by_issuer(keys).items()]
        exact = {ident.name: [p for s in serials for p in serial_paths(ident, s, self.hashes, self.prefix)]
                 for ident, serials in groups}
        over = sum(len(v) for v in exact.values()) > MAX_PATHS
        out: list[str] = []
        for ident, serials in groups:
            wide = over or len(exact[ident.name]) > self.target.wildcard_over
            out += issuer_wildcards(ident, serials, self.hashes, self.prefix) if wide else exact[ident.name]
        return out

    def send(self, keys: list[Key]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        paths = self.paths(keys)
        if len(paths) > MAX_PATHS:
            raise PurgeError(f"{len(paths)} paths even with wildcards, over CloudFront's {MAX_PATHS}")
        ref = hashlib.sha256("\n".join(paths).encode() + str(time.time_ns()).encode()).hexdigest()[:32]
        batch = {"Paths": {"Quantity": len(paths), "Items": paths}, "CallerReference": f"ocspmint-{ref}"}
        try:
            self.client.create_invalidation(DistributionId=self.target.distribution_id, InvalidationBatch=batch)
        except (BotoCoreError, ClientError) as e:
            raise PurgeError(f"CreateInvalidation on {self.target.distribution_id}: {e}") from None


def cloudfront_client(config: Config) -> Any:
    """A boto3 CloudFront client from the standard AWS chain (``store.profile``)."""
    import boto3

    return boto3.Session(profile_name=config.store.profile or None).client("cloudfront")


def invalidate(config: Config, issuers: dict[str, IssuerIdentity], journal: Journal,
               cloudfront: Callable[[Config], Any] = cloudfront_client, pause: float = 0.5) -> dict[str, PurgeResult]:
    """Send every queued purge to its target; returns per-target results.

    Each chunk is tried ``ATTEMPTS`` times with doubling pauses; a chunk
    that still fails stays queued (attempts and last error recorded) and
    the target's remaining chunks wait for the next run. Purges queued for
    an issuer, or under a target name, no longer configured stay queued
    and count as pending (the run is not OK): the result of a target no
    longer configured is under its old name.
    """
    hashes = list(config.response.certid_hashes)
    prefix = config.serve.path_prefix
    results: dict[str, PurgeResult] = {}
    for target in config.purge:
        result = results[target.name] = PurgeResult()
        queued = journal.queued_purges(target.name)
        orphans = sorted({name for name, _ in queued if name not in issuers})
        errors: list[str] = []
        if orphans:
            queued = [k for k in queued if k[0] in issuers]
            result.pending = len(journal.queued_purges(target.name)) - len(queued)
            errors.append(f"purges queued for issuers no longer configured: {', '.join(orphans)}")
        if queued:
            try:
                backend = (HttpTarget(target, issuers, hashes, prefix) if target.type == "http"
                           else CloudFrontTarget(target, issuers, hashes, cloudfront(config), prefix))
            except Exception as e:  # noqa: BLE001 - boto3 client creation (ProfileNotFound, NoRegionError...)
                error = f"cannot create the {target.type} client: {type(e).__name__}: {e}"
                journal.purge_failed(target.name, queued, error)
                result.pending += len(queued)
            else:
                error = _drain(backend, target.name, queued, journal, result, pause)
            if error:
                errors.append(error)
        if errors:
            result.error = f"{target.name}: {'; '.join(errors)}"
    configured = {target.name for target in config.purge}
    for name, count in sorted(journal.queued_by_target().items()):
        if name not in configured:
            results[name] = PurgeResult(pending=count, error=(
                f"{name}: {count} purges queued under this target name, which no [[purge]] has any more "
                "(renamed or removed): not sent; name the target so again, or move or delete them "
                "(docs/purge.md, \"Renaming or removing a target\")"))
    return results


def _drain(backend: HttpTarget | CloudFrontTarget, name: str, queued: list[Key], journal: Journal,
           result: PurgeResult, pause: float) -> str:
    """Send ``queued`` to ``backend`` chunk by chunk, counting into
    ``result``; at the first chunk that still fails, leave it and the rest
    queued and return its error ("" when all went)."""
    size = backend.CHUNK or len(queued)
    if isinstance(backend, HttpTarget):
        backend.prepare(queued)
    for start in range(0, len(queued), size):
        chunk = queued[start : start + size]
        error = _send(backend, chunk, pause)
        if error:
            journal.purge_failed(name, queued[start:], error)
            result.pending += len(queued) - start
            return error
        journal.purged(name, chunk)
        result.sent += len(chunk)
    return ""


def _send(backend: HttpTarget | CloudFrontTarget, chunk: list[Key], pause: float) -> str:
    """"" when the target acknowledged ``chunk``, else the last error."""
    error = ""
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(pause * 2 ** (attempt - 1))
        try:
            backend.send(chunk)
            return ""
        except PurgeError as e:
            error = str(e)
    return error

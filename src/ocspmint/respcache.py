"""The responder's view of stored responses: ``parse_stored`` reads the
times and CertIDs of a stored DER response, ``Cache`` keeps them in a
byte-bounded LRU, ``Metrics`` holds the Prometheus series
(docs/responder.md)."""

from __future__ import annotations

import calendar
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ocspmint import der
from ocspmint.encoder import OCSP_BASIC_OID
from ocspmint.request import HASH_OIDS

RESULTS = ("ok", "unauthorized", "malformed", "not_modified", "expired", "aborted", "error")
ENTRY_OVERHEAD = 400  # bytes counted per cache entry beside its body


# --- stored responses ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    """A stored successful OCSPResponse and what serving it needs.

    ``this_update``/``next_update``: POSIX seconds (the first SingleResponse's
    thisUpdate, the earliest nextUpdate); ``certids``: the (hash name, serial)
    of every SingleResponse; ``etag``: quoted hex SHA-256 of ``body``;
    ``label``: ``<issuer id>/<040x serial>`` (the X-OCSP-Key header);
    ``version``: the store's token of the object read (``FileStore.version``),
    None for a store that has none."""

    body: bytes
    this_update: int
    next_update: int
    certids: frozenset[tuple[str, int]]
    etag: str
    label: str
    version: Hashable = None


def _gtime(buf: bytes, start: int, end: int) -> int:
    """POSIX seconds of a GeneralizedTime ``YYYYMMDDHHMMSSZ`` content."""
    text = buf[start:end]
    if len(text) != 15 or text[14:] != b"Z" or not text[:14].isdigit():
        raise ValueError("GeneralizedTime is not YYYYMMDDHHMMSSZ")
    t = text.decode()
    return calendar.timegm((int(t[0:4]), int(t[4:6]), int(t[6:8]), int(t[8:10]), int(t[10:12]), int(t[12:14])))


def parse_stored(body: bytes, label: str, version: Hashable = None) -> Stored:
    """Read the times and CertIDs of a stored DER OCSPResponse (RFC 6960
    §4.2.1) with ``ocspmint.der``; once per cache fill, ~10 µs. Raises
    ValueError when it is not a successful basic response whose every
    SingleResponse has a nextUpdate (RFC 5019 §2.2.4)."""

    def tlv(pos: int, tag: int) -> tuple[int, int]:
        t, s, e = der.read_tlv(body, pos)
        if t != tag:
            raise ValueError(f"stored response: expected tag {tag:#04x} at {pos}, got {t:#04x}")
        return s, e

    s, e = tlv(0, 0x30)
    if e != len(body):
        raise ValueError("stored response: trailing bytes")
    s, e = tlv(s, 0x0A)
    if body[s:e] != b"\x00":
        raise ValueError("stored response: responseStatus is not successful")
    s, _ = tlv(e, 0xA0)
    s, _ = tlv(s, 0x30)  # ResponseBytes
    _, e = tlv(s, 0x06)
    if body[s:e] != OCSP_BASIC_OID:
        raise ValueError("stored response: not id-pkix-ocsp-basic")
    s, _ = tlv(e, 0x04)
    s, _ = tlv(s, 0x30)  # BasicOCSPResponse
    pos, tbs_end = tlv(s, 0x30)  # ResponseData
    tag, _, e = der.read_tlv(body, pos)
    if tag == 0xA0:  # version
        pos = e
        tag, _, e = der.read_tlv(body, pos)
    if tag not in (0xA1, 0xA2):
        raise ValueError("stored response: no ResponderID")
    _, pos = tlv(e, 0x18)  # producedAt
    pos, list_end = tlv(pos, 0x30)
    certids: set[tuple[str, int]] = set()
    this_update, next_update = -1, 0
    while pos < list_end:
        s, single_end = tlv(pos, 0x30)
        c, cert_id_end = tlv(s, 0x30)
        a, _ = tlv(c, 0x30)
        o, oe = tlv(a, 0x06)
        hash_name = HASH_OIDS.get(body[o:oe], "other")
        _, _, e = der.read_tlv(body, c)  # algorithm
        _, _, e = der.read_tlv(body, e)  # issuerNameHash
        _, _, e = der.read_tlv(body, e)  # issuerKeyHash
        ss, se = tlv(e, 0x02)
        certids.add((hash_name, int.from_bytes(body[ss:se], "big", signed=True)))
        _, _, e = der.read_tlv(body, cert_id_end)  # certStatus
        ts, te = tlv(e, 0x18)
        if this_update < 0:
            this_update = _gtime(body, ts, te)
        tag, ns, ne = der.read_tlv(body, te) if te < single_end else (0, 0, 0)
        if tag != 0xA0:
            raise ValueError("stored response: a SingleResponse has no nextUpdate")
        ns, ne = tlv(ns, 0x18)
        nxt = _gtime(body, ns, ne)
        next_update = nxt if not next_update else min(next_update, nxt)
        pos = single_end
    if pos != list_end or not certids or list_end > tbs_end:
        raise ValueError("stored response: bad responses list")
    return Stored(body, this_update, next_update, frozenset(certids), f'"{hashlib.sha256(body).hexdigest()}"', label,
                  version)


# --- the in-memory cache ------------------------------------------------------


class Cache:
    """LRU of Stored by store key, bounded in bytes (body + ENTRY_OVERHEAD
    each); an entry lives ``ttl`` seconds at most and never past its
    nextUpdate. ``max_bytes`` 0 or ``ttl`` 0 disables caching."""

    def __init__(self, max_bytes: int, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.max_bytes, self.ttl, self._clock = max_bytes, ttl, clock
        self._entries: OrderedDict[str, tuple[Stored, float]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Stored | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        stored, until = hit
        if self._clock() >= until:
            self.drop(key)
            return None
        self._entries.move_to_end(key)
        return stored

    def put(self, key: str, stored: Stored) -> None:
        now = self._clock()
        until = min(now + self.ttl, stored.next_update)
        size = len(stored.body) + ENTRY_OVERHEAD
        if until <= now or size > self.max_bytes:
            return
        self.drop(key)
        self._entries[key] = (stored, until)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, (old, _) = self._entries.popitem(last=False)
            self.nbytes -= len(old.body) + ENTRY_OVERHEAD

    def drop(self, key: str) -> bool:
        """Remove ``key``; True when it was cached."""
        hit = self._entries.pop(key, None)
        if hit is not None:
            self.nbytes -= len(hit[0].body) + ENTRY_OVERHEAD
        return hit is not None

    def keys(self) -> list[str]:
        return list(self._entries)


# --- metrics ------------------------------------------------------------------


class Metrics:
    """Prometheus series on a private registry (names in docs/responder.md)."""

    def __init__(self, cache: Cache) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: they only add noise
        self.registry = CollectorRegistry()
        self.requests = Counter("ocspmint_serve_requests", "OCSP requests answered, by result", ["result"],
                                registry=self.registry)
        self.by_result = {r: self.requests.labels(r) for r in RESULTS}
        self.counts = dict.fromkeys(RESULTS, 0)
        self.latency = Histogram("ocspmint_serve_request_seconds", "time to answer an OCSP request, seconds",
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5, 10),
                                 registry=self.registry)
        self.hits = Counter("ocspmint_serve_cache_hits", "responses served from memory", registry=self.registry)
        self.misses = Counter("ocspmint_serve_cache_misses", "lookups that went to the store", registry=self.registry)
        self.n_hits = self.n_misses = 0
        Gauge("ocspmint_serve_cache_hit_ratio", "hits / (hits + misses) since start",
              registry=self.registry).set_function(lambda: self.n_hits / max(1, self.n_hits + self.n_misses))
        Gauge("ocspmint_serve_cache_bytes", "bytes held by the cache",
              registry=self.registry).set_function(lambda: cache.nbytes)
        Gauge("ocspmint_serve_cache_entries", "responses held by the cache",
              registry=self.registry).set_function(lambda: len(cache))

    def answered(self, result: str, seconds: float) -> None:
        self.counts[result] += 1
        self.by_result[result].inc()
        self.latency.observe(seconds)

    def hit(self) -> None:
        self.n_hits += 1
        self.hits.inc()

    def miss(self) -> None:
        self.n_misses += 1
        self.misses.inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

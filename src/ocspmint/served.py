"""Verification of what is served: fetch published responses over HTTP.

After a run has published (and purged), ``check_served`` builds a real
OCSP request for a sample of the serials published by the run — every
serial whose status changed, plus ``verify_served.sample`` others (or
"all") — sends it as an RFC 6960 Appendix A GET through
``verify_served.url`` (the origin, or the CDN in front of it), and checks
the answer exactly as the pre-publish verifier does, that its bytes are
the ones journaled, and the RFC 5019 §6 headers (``header_findings``).
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import random
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from ocspmint.config import Config
from ocspmint.issuer import IssuerIdentity
from ocspmint.journal import Journal, Record
from ocspmint.model import LedgerEntry, serial_hex, utc_now
from ocspmint.report import Failure
from ocspmint.store import CONTENT_TYPE
from ocspmint.verifier import Expectation, verify_response

THREADS = 8
_HASHES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}


def get_url(base: str, ident: IssuerIdentity, serial: int, hash_name: str) -> str:
    """The GET URL of an OCSP request for ``serial`` built by pyca
    cryptography (an encoder independent of ocspmint's): base64, then
    percent-encoded (RFC 6960 Appendix A.1)."""
    request = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        ident.name_hash[hash_name], ident.key_hash[hash_name], serial, _HASHES[hash_name]()).build()
    encoded = base64.b64encode(request.public_bytes(Encoding.DER)).decode()
    return f"{base.rstrip('/')}/{urllib.parse.quote(encoded, safe='')}"


def _http_date(value: str | None) -> dt.datetime | None:
    try:
        return email.utils.parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError):
        return None


def header_findings(headers: dict[str, str], body: bytes, this_update: dt.datetime, next_update: dt.datetime) -> list[str]:
    """Problems with the RFC 5019 §6 headers of a served response (keys
    lower-case): Content-Type, Content-Length, ETag = quoted hex SHA-256,
    Last-Modified = thisUpdate, Expires = nextUpdate, Cache-Control
    ``max-age=N, public, no-transform, must-revalidate`` with
    Date − Age + N ≤ nextUpdate."""
    found = []
    if headers.get("content-type") != CONTENT_TYPE:
        found.append(f"Content-Type {headers.get('content-type')!r}")
    if headers.get("content-length") != str(len(body)):
        found.append(f"Content-Length {headers.get('content-length')!r} for {len(body)} bytes")
    if headers.get("etag") != f'"{hashlib.sha256(body).hexdigest()}"':
        found.append(f"ETag {headers.get('etag')!r} is not the body's SHA-256")
    if _http_date(headers.get("last-modified")) != this_update:
        found.append(f"Last-Modified {headers.get('last-modified')!r} is not thisUpdate {this_update.isoformat()}")
    if _http_date(headers.get("expires")) != next_update:
        found.append(f"Expires {headers.get('expires')!r} is not nextUpdate {next_update.isoformat()}")
    directives = {d.strip().split("=")[0]: d.strip() for d in headers.get("cache-control", "").split(",")}
    missing = {"public", "no-transform", "must-revalidate", "max-age"} - directives.keys()
    date = _http_date(headers.get("date"))
    if missing or date is None:
        found.append(f"Cache-Control {headers.get('cache-control')!r} / Date {headers.get('date')!r}: missing {sorted(missing) or 'Date'}")
    else:
        try:
            fresh_until = date - dt.timedelta(seconds=int(headers.get("age", "0"))) + dt.timedelta(seconds=int(directives["max-age"][8:]))
        except ValueError:
            return [*found, f"Cache-Control {headers['cache-control']!r} or Age {headers.get('age')!r} unreadable"]
        if fresh_until > next_update:
            found.append(f"cacheable until {fresh_until.isoformat()}, past nextUpdate {next_update.isoformat()}")
    return found


def _fetch(url: str, timeout: float) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, {k.lower(): v for k, v in reply.headers.items()}, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def check_one(config: Config, ident: IssuerIdentity, entry: LedgerEntry, record: Record) -> list[str]:
    """Fetch ``entry``'s response through ``verify_served.url`` and return
    findings ([] when it is exactly what the journal says was published)."""
    hashes_ = tuple(config.response.certid_hashes)
    url = get_url(config.verify_served.url, ident, entry.serial, hashes_[0])
    try:
        status, headers, body = _fetch(url, config.verify_served.timeout.total_seconds())
    except OSError as e:
        return [f"GET {url}: {e}"]
    if status != 200:
        return [f"GET {url}: HTTP {status}"]
    findings = verify_response(body, ident, Expectation(entry, hashes_, record.next_update - record.this_update), utc_now())
    if hashlib.sha256(body).digest() != record.sha256:
        findings.append(f"served {len(body)} bytes that are not the response published at {record.this_update.isoformat()}")
    return findings + header_findings(headers, body, record.this_update, record.next_update)


class Sample:
    """Which published entries ``check_served`` fetches: every one whose
    served bytes had to change at once (``urgent``), plus ``size`` others
    drawn uniformly (reservoir sampling, so memory stays ``size`` entries
    whatever the run publishes), or all of them when ``size`` is "all"."""

    def __init__(self, size: int | str) -> None:
        self.size = size
        self.urgent: list[LedgerEntry] = []
        self.rest: list[LedgerEntry] = []
        self._seen = 0

    def add(self, entry: LedgerEntry, urgent: bool) -> None:
        if urgent:
            self.urgent.append(entry)
            return
        self._seen += 1
        if self.size == "all" or len(self.rest) < int(self.size):
            self.rest.append(entry)
        elif (slot := random.randrange(self._seen)) < len(self.rest):
            self.rest[slot] = entry


def check_served(config: Config, issuers: dict[str, IssuerIdentity], journal: Journal, sample: Sample) -> tuple[int, list[Failure]]:
    """Check the sampled published serials over HTTP; returns (number
    checked, failures of stage "served")."""
    work = [(e, journal.get(e.issuer, e.serial)) for e in sample.urgent + sample.rest]
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(lambda w: check_one(config, issuers[w[0].issuer], w[0], w[1]), work))
    failures = [Failure("served", "; ".join(f), e.issuer, serial_hex(e.serial), config.verify_served.url)
                for (e, _), f in zip(work, results, strict=True) if f]
    return len(work), failures

"""TOML configuration, decoded into msgspec Structs.

``load_config(path)`` returns a ``Config`` whose relative paths are resolved
against the config file's folder. Errors raise ``ConfigError`` naming the
file and the offending key (``$.issuers[0].signer.pin_env``). See
docs/config.md for every key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import urllib.parse
from pathlib import Path
from typing import Literal

import msgspec

from ocspmint import pkcs11uri

HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ConfigError(Exception):
    """The config file is unreadable or breaks a rule; the message says where."""


class Signer(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The key that signs an issuer's responses, addressed by RFC 7512 URI.

    ``cert`` is the delegated responder certificate; when empty the issuing
    CA's own key signs (then the token key must be the CA's). The PIN comes
    from exactly one of ``pin_env`` (an environment variable name),
    ``pin_file`` or a ``pin-source=file:`` attribute of the URI (relative
    to the config folder, like ``pin_file``); never from the config itself.
    The URI is checked at load (``pkcs11uri.parse``: only the attributes
    both signing backends match); ``module`` or its ``module-path``.

    Instead of ``uri``: ``key_file``, a PEM private key signed with in
    software (``key_password_env`` names the variable holding its
    password, if encrypted). For tests and demos: NOT for production CA
    keys. It must match the signer certificate's public key.
    """

    uri: str = ""
    module: str = ""
    cert: str = ""
    pin_env: str = ""
    pin_file: str = ""
    key_file: str = ""
    key_password_env: str = ""


class Issuer(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """An issuing CA: ``name`` (referenced by sources), ``cert`` its
    certificate file, ``signer`` the key that signs its responses.

    ``precert_signing_certificates``: the files of the CA's Precertificate
    Signing Certificates (RFC 6962 §3.1, BR 7.1.2.4), CA certificates it
    issued whose keys sign precertificates on its behalf; a certdir source
    credits such a precertificate to this issuer (docs/ledger.md). Each is
    checked when the issuers load (``issuer.issuer_identity``).
    """

    name: str
    cert: str
    signer: Signer
    precert_signing_certificates: list[str] = []


class Source(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Where assigned serials are read from.

    type ``openssl-index``: ``path`` is an `openssl ca` index.txt,
    ``certs_dir`` its new_certs_dir, ``issuer`` the issuer's config name.
    type ``certdir``: ``path`` a folder of PEM/DER certificates and
    precertificates; each is matched to an issuer by signature; ``crls``
    optional CRL files giving revocations.
    type ``sqlite``: ``path`` the ledger database filled by `ocspmint ingest`.
    """

    type: Literal["openssl-index", "certdir", "sqlite"]
    path: str
    certs_dir: str = ""
    issuer: str = ""
    crls: list[str] = []


class Response(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Response timing and content (BR 4.9.9; RFC 5019 §2.2.4).

    ``validity`` is nextUpdate − thisUpdate (the inclusive interval is one
    second longer); ``refresh_after`` is how long after thisUpdate a
    response is re-signed; ``backdate`` is how far thisUpdate lies before
    producedAt. ``certid_hashes``: ["sha1"], ["sha256"] or both (then one
    response carries one SingleResponse per hash; docs/certid.md).
    """

    validity: dt.timedelta = 7 * DAY - dt.timedelta(seconds=1)
    refresh_after: dt.timedelta = 3 * DAY
    backdate: dt.timedelta = HOUR
    certid_hashes: list[Literal["sha1", "sha256"]] = msgspec.field(default_factory=lambda: ["sha1"])


class Store(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Where responses are published (docs/store-layout.md).

    ``url``: ``file:PATH`` or ``s3://BUCKET/PREFIX``. For S3: ``endpoint``
    (empty: AWS), ``region``, ``profile`` (an AWS shared-config profile);
    credentials come from the standard AWS environment/profile chain, never
    from this file. ``concurrency``: PUTs in flight; ``retries``: attempts
    per PUT after 5xx, SlowDown or a timeout (exponential backoff, full
    jitter); ``timeout``: per request. Checked at load (``check_store``):
    the S3 bucket and prefix (no empty, "." or ".." segment), the endpoint
    (an http:// or https:// URL), ``timeout`` > 0.
    """

    url: str = "file:responses"
    endpoint: str = ""
    region: str = ""
    profile: str = ""
    concurrency: int = 64
    retries: int = 5
    timeout: dt.timedelta = dt.timedelta(seconds=30)


class Serve(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`ocspmint serve`, the RFC 5019 origin: ``listen`` HOST:PORT;
    ``path_prefix`` the URL path OCSP requests come under ("/ocsp" for an
    AIA URL http://host/ocsp; "" = the root); ``cache_bytes`` bounds the
    in-memory response cache (0: off); ``cache_ttl`` how long a cached
    object is kept (a file store's object is still checked against the
    store on every hit; unset: 1 minute for a file store, 0 = off for S3,
    docs/responder.md); ``max_age`` caps Cache-Control max-age (which never
    reaches past nextUpdate); ``purge_from`` the client addresses allowed
    to PURGE/BAN."""

    listen: str = "127.0.0.1:8080"
    path_prefix: str = ""
    cache_bytes: int = 64 * 2**20
    cache_ttl: dt.timedelta | None = None
    max_age: dt.timedelta = DAY
    purge_from: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1", "::1"])


class Purge(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A cache to purge when a served status changes (docs/purge.md).

    type ``http``: send ``method`` (``ban``: one BAN per serial carrying
    its ``X-OCSP-Key``, or one ``X-OCSP-Issuer`` BAN for an issuer with
    more than ``wildcard_over`` serials queued; ``purge``: PURGE of each
    canonical GET URL) to each base URL in ``urls``, in order (list the
    origin before the CDN).
    type ``cloudfront``: CreateInvalidation on ``distribution_id``; an
    issuer with more than ``wildcard_over`` paths in one invalidation gets
    wildcard paths instead. ``name`` identifies the target in the journal's
    purge queue: purges queued under a name no longer configured are
    reported as pending by every run until they are cleared (docs/purge.md).
    Paths purged are the GET paths under ``[serve] path_prefix``. Each URL
    is checked at load (``http_url_problem``): no user:password.
    """

    name: str
    type: Literal["http", "cloudfront"]
    urls: list[str] = []
    method: Literal["ban", "purge"] = "ban"
    distribution_id: str = ""
    wildcard_over: int = 1000
    timeout: dt.timedelta = dt.timedelta(seconds=10)


class VerifyServed(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """After publishing (and purging), fetch ``sample`` of the responses
    published by this run (a count, or "all") through ``url`` (the origin
    or the CDN) with real OCSP GET requests, and verify them and their
    HTTP headers. Empty ``url``: off."""

    url: str = ""
    sample: int | Literal["all"] = 100
    timeout: dt.timedelta = dt.timedelta(seconds=10)


class Refresh(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`ocspmint refresh`, the continuous service: every ``tick`` it reads
    ledger changes (signing them at once) and re-signs the responses whose
    refresh time came (journal ``refresh_at``), at most ``routine_rate``
    responses/s of routine work (0: no cap; new entries and status changes
    are never capped). ``metrics_listen`` HOST:PORT serves Prometheus
    /metrics (empty: off)."""

    tick: dt.timedelta = dt.timedelta(seconds=1)
    routine_rate: float = 0.0
    metrics_listen: str = "127.0.0.1:9310"


class Sweep(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The sweep after a complete full pass (docs/ledger.md, "the sweep"):
    one sweep takes at most max(``max_absent``, ``max_absent_fraction`` ×
    M) serials of an issuer off the routine schedule, M being the
    issuer's scheduled records whose certificate has not expired. More
    absent at once (a ledger read as complete but (nearly) empty: a
    truncated index.txt, an empty certdir mount, a sqlite ledger restored
    from an old backup) forgets none of them and is one ledger failure.
    ``max_absent_fraction = 1.0`` lets any number through (a removal that
    is meant: raise it for one run)."""

    max_absent: int = 10
    max_absent_fraction: float = 0.01


class Signing(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Signer pool: ``workers`` 0 means the CPU count; ``batch_size`` serials
    per IPC message; ``retries`` consecutive PKCS#11 failures, each
    followed by fresh sessions, before a batch is reported failed;
    ``timeout``: a worker with batches in hand that returns no signature
    for this long (a hung HSM) is killed and its batches re-sent, counted
    as an attempt. ``backend``: "native" (the C extension, several
    sessions per key), "python" (python-pkcs11, one session) or "auto"
    (native when the extension imports). ``sessions``: with the native
    backend, PKCS#11 sessions (each with its signing thread) per key and
    worker process, i.e. signatures in flight per worker; raise it for a
    network HSM, whose latency one session cannot hide."""

    workers: int = 0
    batch_size: int = 256
    retries: int = 3
    verify: bool = True
    timeout: dt.timedelta = dt.timedelta(seconds=60)
    backend: Literal["auto", "native", "python"] = "auto"
    sessions: int = 1


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    issuers: list[Issuer]
    sources: list[Source]
    state_dir: str = "state"
    on_error: Literal["stop", "quarantine"] = "stop"
    store: Store = Store()
    response: Response = Response()
    signing: Signing = Signing()
    serve: Serve = Serve()
    purge: list[Purge] = []
    verify_served: VerifyServed = VerifyServed()
    refresh: Refresh = Refresh()
    sweep: Sweep = Sweep()

    def issuer(self, name: str) -> Issuer:
        for issuer in self.issuers:
            if issuer.name == name:
                return issuer
        raise KeyError(name)


def _resolve(base: Path, value: str) -> str:
    return value if not value or os.path.isabs(value) else str(base / value)


def _resolve_paths(cfg: Config, base: Path) -> Config:
    issuers = [
        msgspec.structs.replace(
            i,
            cert=_resolve(base, i.cert),
            precert_signing_certificates=[_resolve(base, c) for c in i.precert_signing_certificates],
            signer=msgspec.structs.replace(
                i.signer,
                cert=_resolve(base, i.signer.cert),
                pin_file=_resolve(base, i.signer.pin_file),
                uri=pkcs11uri.with_pin_source(i.signer.uri, base) if i.signer.uri else "",
                key_file=_resolve(base, i.signer.key_file),
            ),
        )
        for i in cfg.issuers
    ]
    sources = [
        msgspec.structs.replace(
            s,
            path=_resolve(base, s.path),
            certs_dir=_resolve(base, s.certs_dir),
            crls=[_resolve(base, c) for c in s.crls],
        )
        for s in cfg.sources
    ]
    store = cfg.store
    if store.url.startswith("file:") and not store.url.startswith("file:/"):
        store = msgspec.structs.replace(store, url="file:" + _resolve(base, store.url[5:]))
    return msgspec.structs.replace(
        cfg, issuers=issuers, sources=sources, store=store, state_dir=_resolve(base, cfg.state_dir)
    )


def _whole_seconds(key: str, t: dt.timedelta) -> None:
    if t.microseconds:
        raise ConfigError(f"{key}: {t.total_seconds()} s has a fraction of a second; give whole seconds "
                          "(thisUpdate and nextUpdate are GeneralizedTime without fractions, RFC 5280 §4.1.2.5.2)")


def check_response_rules(r: Response) -> None:
    """Raise ConfigError if the timing breaks BR 4.9.9 or Microsoft's 7-day cap.

    Every duration is whole seconds (the response times derived from them
    carry no fraction). Inclusive interval (nextUpdate − thisUpdate + 1 s)
    must lie in [8 h, 7 d] (BR allows 10 d; Microsoft caps at 7 d).
    Interval ≥ 16 h: refresh at most 4 d after thisUpdate and at least 8 h
    before nextUpdate; < 16 h: before half the interval. 0 ≤ backdate ≤
    refresh_after / 4: `ocspmint refresh` re-signs a response between
    refresh_after/2 and refresh_after after thisUpdate (planner.refresh_at),
    and thisUpdate = producedAt − backdate, so a response comes due again at
    least refresh_after/4 after it was signed, never at once.
    """
    for key in ("validity", "refresh_after", "backdate"):
        _whole_seconds(f"$.response.{key}", getattr(r, key))
    interval = r.validity + dt.timedelta(seconds=1)
    if not (8 * HOUR <= interval <= 7 * DAY):
        raise ConfigError(f"$.response.validity: inclusive interval {interval} must lie in [8h, 7d] (BR 4.9.9, Microsoft)")
    if r.refresh_after <= dt.timedelta(0):
        raise ConfigError("$.response.refresh_after: must be > 0")
    if interval >= 16 * HOUR:
        if r.refresh_after > 4 * DAY or r.validity - r.refresh_after < 8 * HOUR:
            raise ConfigError("$.response.refresh_after: must be ≤ 4 days and ≥ 8 h before nextUpdate (BR 4.9.9)")
    elif r.refresh_after >= interval / 2:
        raise ConfigError("$.response.refresh_after: must be before half the validity interval (BR 4.9.9)")
    if r.backdate < dt.timedelta(0):
        raise ConfigError("$.response.backdate: must be ≥ 0")
    if r.backdate * 4 > r.refresh_after:
        raise ConfigError(f"$.response.backdate: {r.backdate} exceeds refresh_after / 4 ({r.refresh_after / 4}): "
                          "`ocspmint refresh` re-signs a response between refresh_after/2 and refresh_after after "
                          "thisUpdate = producedAt − backdate, so a longer backdate makes it due again (almost) as "
                          "soon as it is signed; need backdate ≤ refresh_after / 4")
    if not r.certid_hashes or len(set(r.certid_hashes)) != len(r.certid_hashes):
        raise ConfigError("$.response.certid_hashes: give sha1, sha256 or both, once each")


def _check_signer(n: int, sig: Signer) -> None:
    """The PKCS#11 settings of ``$.issuers[n].signer``: a URI that parses
    and names what both backends match (pkcs11uri.parse), one module, one
    PIN source."""
    key = f"$.issuers[{n}].signer"
    if sig.key_password_env:
        raise ConfigError(f"{key}.key_password_env: only with key_file")
    if not sig.uri:
        raise ConfigError(f"{key}: give uri (an RFC 7512 PKCS#11 URI) or key_file")
    try:
        uri = pkcs11uri.parse(sig.uri)
    except pkcs11uri.UriError as e:
        raise ConfigError(f"{key}.uri: {e}") from None
    module_path = uri.query.get("module-path", "")
    if not sig.module and not module_path:
        raise ConfigError(f"{key}.module: no PKCS#11 module: give module, or module-path in the URI")
    if sig.module and module_path and sig.module != module_path:
        raise ConfigError(f"{key}.module: {sig.module!r} differs from the URI's module-path {module_path!r}; give one")
    sources = [name for name, given in (("pin_env", sig.pin_env), ("pin_file", sig.pin_file),
                                        ("pin-source in the URI", "pin-source" in uri.query)) if given]
    if not sources:
        raise ConfigError(f"{key}: no PIN source: give pin_env, pin_file or pin-source in the URI")
    if sig.pin_env and not _ENV_NAME.fullmatch(sig.pin_env):  # never shown: it may be the PIN itself, put there by mistake
        raise ConfigError(f"{key}.pin_env: not an environment variable name (letters, digits and _, not starting "
                          "with a digit): it names the variable that holds the PIN, never the PIN itself")
    if len(sources) > 1:
        raise ConfigError(f"{key}: give one PIN source, not {' and '.join(sources)}")


def _check_precert_signing(n: int, paths: list[str]) -> None:
    """``$.issuers[n].precert_signing_certificates``: file names, none
    empty, none twice (the certificates are checked when they are loaded,
    ``issuer.issuer_identity``)."""
    key = f"$.issuers[{n}].precert_signing_certificates"
    for m, path in enumerate(paths):
        if not path.strip():
            raise ConfigError(f"{key}[{m}]: empty")
        if path in paths[:m]:
            raise ConfigError(f"{key}[{m}]: {path!r} is listed twice")


def _check(cfg: Config) -> None:
    check_response_rules(cfg.response)
    names = [i.name for i in cfg.issuers]
    if not names:
        raise ConfigError("$.issuers: no issuer: give at least one [[issuers]]")
    if len(set(names)) != len(names):
        raise ConfigError("$.issuers: issuer names must be unique")
    for n, i in enumerate(cfg.issuers):
        for key in ("name", "cert"):
            if not getattr(i, key).strip():
                raise ConfigError(f"$.issuers[{n}].{key}: empty")
        _check_precert_signing(n, i.precert_signing_certificates)
        sig = i.signer
        if sig.key_file:
            if sig.uri or sig.module or sig.pin_env or sig.pin_file:
                raise ConfigError(f"$.issuers[{n}].signer.key_file: a software key excludes uri, module, pin_env "
                                  "and pin_file (those address a PKCS#11 key)")
            continue
        _check_signer(n, sig)
    for n, s in enumerate(cfg.sources):
        if s.type == "openssl-index" and (not s.issuer or not s.certs_dir):
            raise ConfigError(f"$.sources[{n}]: openssl-index needs issuer and certs_dir")
        if s.issuer and s.issuer not in names:
            raise ConfigError(f"$.sources[{n}].issuer: no issuer named {s.issuer!r}")
    check_signing(cfg.signing)
    check_store(cfg.store)
    _check_purge(cfg.purge)
    check_serve(cfg.serve)
    if cfg.refresh.tick <= dt.timedelta(0) or cfg.refresh.routine_rate < 0:
        raise ConfigError("$.refresh: tick > 0 and routine_rate ≥ 0")
    check_verify_served(cfg.verify_served)
    check_sweep(cfg.sweep)


def check_signing(s: Signing) -> None:
    """Raise ConfigError naming the [signing] key whose value makes no sense."""
    if s.workers < 0:
        raise ConfigError(f"$.signing.workers: {s.workers} must be ≥ 0 (0: the CPU count)")
    if s.batch_size < 1:
        raise ConfigError(f"$.signing.batch_size: {s.batch_size} must be ≥ 1")
    if s.retries < 1:
        raise ConfigError(f"$.signing.retries: {s.retries} must be ≥ 1 (attempts per batch)")
    if s.timeout <= dt.timedelta(0):
        raise ConfigError(f"$.signing.timeout: {_seconds(s.timeout)} must be > 0 (a worker silent this long "
                          "with batches in hand is killed)")
    if not 1 <= s.sessions <= 256:
        raise ConfigError("$.signing.sessions: 1 to 256 sessions per key and worker")


# A [serve] path_prefix: "/"-separated non-empty segments of RFC 3986
# pchar without percent-encoding (a raw request path is compared with it).
_PATH_PREFIX = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@-]+)+")


def _seconds(t: dt.timedelta) -> str:
    return f"{t.total_seconds():g} s"


def check_serve(s: Serve) -> None:
    """Raise ConfigError naming the [serve] key whose value makes no sense."""
    if s.path_prefix and not _PATH_PREFIX.fullmatch(s.path_prefix):
        raise ConfigError(f"$.serve.path_prefix: {s.path_prefix!r} must start with \"/\" and not end with \"/\", "
                          "with no empty segment, \"%\", \"?\", \"#\" or space (e.g. \"/ocsp\"; \"\" for the root)")
    if s.cache_bytes < 0:
        raise ConfigError(f"$.serve.cache_bytes: {s.cache_bytes} is negative (0 turns the cache off)")
    if s.cache_ttl is not None and s.cache_ttl < dt.timedelta(0):
        raise ConfigError(f"$.serve.cache_ttl: {_seconds(s.cache_ttl)} is negative (PT0S turns the cache off)")
    if s.max_age < dt.timedelta(seconds=1):
        raise ConfigError(f"$.serve.max_age: {_seconds(s.max_age)} must be at least 1 s (it is the "
                          "Cache-Control max-age of every response served)")
    for n, entry in enumerate(s.purge_from):
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError as e:
            raise ConfigError(f"$.serve.purge_from[{n}]: {e}") from None


def _check_purge(purges: list[Purge]) -> None:
    names = [p.name for p in purges]
    if len(set(names)) != len(names):
        raise ConfigError("$.purge: names must be unique")
    for n, p in enumerate(purges):
        if p.type == "http" and not p.urls:
            raise ConfigError(f"$.purge[{n}].urls: an http purge needs at least one base URL")
        if p.type == "http":
            for m, url in enumerate(p.urls):
                if problem := http_url_problem(url, "a purge URL"):
                    raise ConfigError(f"$.purge[{n}].urls[{m}]: {shown_url(url)!r}: {problem}")
        if p.type == "cloudfront" and not p.distribution_id:
            raise ConfigError(f"$.purge[{n}].distribution_id: required for cloudfront")
        if p.timeout <= dt.timedelta(0):
            raise ConfigError(f"$.purge[{n}].timeout: {_seconds(p.timeout)} must be > 0 (per purge request)")


def check_verify_served(v: VerifyServed) -> None:
    """Raise ConfigError naming the [verify_served] key whose value makes no sense."""
    if v.url and (problem := http_url_problem(v.url, "the verify_served URL")):
        raise ConfigError(f"$.verify_served.url: {shown_url(v.url)!r}: {problem}")
    if v.sample != "all" and v.sample < 0:
        raise ConfigError("$.verify_served.sample: a count ≥ 0 or \"all\"")
    if v.timeout <= dt.timedelta(0):
        raise ConfigError(f"$.verify_served.timeout: {_seconds(v.timeout)} must be > 0 (per request)")


def check_sweep(s: Sweep) -> None:
    """Raise ConfigError naming the [sweep] key whose value makes no sense."""
    if s.max_absent < 0:
        raise ConfigError(f"$.sweep.max_absent: {s.max_absent} must be ≥ 0 (absent serials one sweep may forget "
                          "per issuer, whatever its size)")
    if not 0.0 <= s.max_absent_fraction <= 1.0:
        raise ConfigError(f"$.sweep.max_absent_fraction: {s.max_absent_fraction} must lie in [0, 1] (the part of "
                          "an issuer's scheduled serials one sweep may forget; 1.0: no limit)")


def check_store(s: Store) -> None:
    """Raise ConfigError naming the [store] key whose value makes no sense:
    the URL (``file:PATH``; ``s3://BUCKET[/PREFIX]`` per ``s3_url_problem``),
    the S3 endpoint (``http_url_problem``), the numbers."""
    if s.url.startswith("s3://"):
        if problem := s3_url_problem(s.url):
            raise ConfigError(f"$.store.url: {problem}")
    elif not s.url.startswith("file:"):
        raise ConfigError(f"$.store.url: unsupported store {shown_url(s.url)!r} (file:PATH or s3://BUCKET/PREFIX)")
    elif s.url == "file:":
        raise ConfigError("$.store.url: \"file:\" without a path (e.g. \"file:responses\")")
    if s.endpoint and (problem := http_url_problem(s.endpoint, "an S3 endpoint")):
        raise ConfigError(f"$.store.endpoint: {shown_url(s.endpoint)!r}: {problem} (e.g. \"https://s3.example.net\" "
                          "or \"http://127.0.0.1:8333\")")
    if s.concurrency < 1:
        raise ConfigError(f"$.store.concurrency: {s.concurrency} must be ≥ 1")
    if s.retries < 0:
        raise ConfigError(f"$.store.retries: {s.retries} must be ≥ 0")
    if s.timeout <= dt.timedelta(0):
        raise ConfigError(f"$.store.timeout: {_seconds(s.timeout)} must be > 0 (per S3 request)")


# Bucket names: AWS's rules for new buckets are stricter (3-63 lower-case
# letters, digits, "." and "-"); legacy buckets and S3-compatible stores
# also have upper case and "_". Anything else would be read as part of the
# request URL.
_BUCKET = re.compile(r"[A-Za-z0-9._-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket[/prefix]`` → (bucket, prefix without surrounding
    slashes, may be ""); ValueError (``s3_url_problem``'s text) when it is
    not usable."""
    if problem := s3_url_problem(url):
        raise ValueError(problem)
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


def s3_url_problem(url: str) -> str:
    """"" when ``url`` is a usable ``s3://BUCKET[/PREFIX]``, else what is
    wrong, never quoting a user:password. The prefix's segments are
    object_store path parts: none empty ("a//b"), "." or "..", no control
    character; leading and trailing "/" are dropped."""
    if not url.startswith("s3://"):
        return f"not an S3 store URL: {shown_url(url)!r}"
    bucket, _, prefix = url[5:].partition("/")
    if "@" in bucket:
        return (f"{shown_url(url)!r}: user:password (an \"@\") in the store URL is not supported; "
                "credentials come from the AWS environment or profile chain, never from the config")
    if not bucket:
        return f"S3 store URL without a bucket: {url!r} (s3://BUCKET/PREFIX)"
    if not _BUCKET.fullmatch(bucket):
        return f"bucket {bucket!r}: letters, digits, \".\", \"-\" and \"_\" only (s3://BUCKET/PREFIX)"
    prefix = prefix.strip("/")
    if not prefix:
        return ""
    if _CONTROL.search(prefix):
        return f"prefix {prefix!r} contains a control character"
    segments = prefix.split("/")
    if "" in segments:
        return f"prefix {prefix!r} has an empty segment (\"//\"): S3 keys under it cannot be addressed; write one \"/\""
    if "." in segments or ".." in segments:
        return f"prefix {prefix!r} has a \".\" or \"..\" segment; name the folder itself"
    return ""


def shown_url(url: str) -> str:
    """``url`` fit for a message, a log or the journal: whatever lies
    between "://" (or the start) and the last "@" (a user:password) is
    replaced by "***"."""
    if "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    head = f"{scheme}://" if sep else ""
    return f"{head}***@{(rest if sep else url).rpartition('@')[2]}"


def http_url_problem(url: str, what: str = "a URL") -> str:
    """"" when ``url`` is an ``http://`` or ``https://`` URL with a host,
    a port (if given) from 1 to 65535, an ASCII path and no user:password
    ("@"), query, fragment, space or control character; else what is
    wrong, never quoting the URL (show it through ``shown_url``).
    ``what`` names it in the text ("a purge URL")."""
    if "@" in url:
        return (f"user:password (an \"@\") in {what} is not supported: it would be taken for part of the host "
                "name and shown in messages; ocspmint sends no credentials (docs/purge.md)")
    if _CONTROL.search(url) or " " in url:
        return f"{what} cannot contain a space or a control character"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:  # a port that is no number or out of range, a bad [IPv6] host
        return f"{e} ({what} is http[s]://HOST[:PORT][/PATH])"
    if parts.scheme not in ("http", "https") or not url.partition(":")[2].startswith("//"):
        return f"{what} starts with http:// or https://"
    if not parts.hostname:
        return f"no host in {what}"
    if port == 0:
        return f"port 0 in {what}"
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return f"{what} takes no query (\"?\") or fragment (\"#\")"
    if not parts.path.isascii():
        return f"the path of {what} is not ASCII: percent-encode it"
    return ""


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, decode, resolve and check a TOML config; raise ConfigError."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror}") from None
    try:
        cfg = msgspec.toml.decode(raw, type=Config)
    except msgspec.DecodeError as e:
        raise ConfigError(f"{p}: {e}") from None
    except UnicodeDecodeError as e:  # msgspec decodes TOML as UTF-8 and lets this through
        raise ConfigError(f"{p}: cannot read config: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        _check(cfg)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    return _resolve_paths(cfg, p.resolve().parent)

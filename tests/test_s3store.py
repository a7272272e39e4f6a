"""S3Store against a real SeaweedFS S3 server (the session ``seaweed``
fixture): round trip with headers and metadata, listing, fetch from an
asyncio loop, per-item errors, S3-side checksum rejection, and retries
against real faults injected by a small HTTP proxy in front of SeaweedFS."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import http.client
import os
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import uvloop
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config as BotoConfig
from botocore.credentials import Credentials
from s3proxy import FaultyS3
from seaweed import SeaweedS3

from ocspmint import s3store
from ocspmint.config import Store as StoreSettings
from ocspmint.s3store import S3Store, cache_control, parse_s3_url
from ocspmint.store import PutItem, StoreError, object_key, open_store

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
THIS = NOW - dt.timedelta(hours=1)
NEXT = NOW + dt.timedelta(days=7)


@pytest.fixture
def aws_env(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3:
    """The fixture's credentials in the standard AWS environment variables,
    with every other AWS_* variable removed."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(s3store, "BACKOFF_BASE", 0.01)
    return seaweed


def settings(sw: SeaweedS3, endpoint: str | None = None, **kw: Any) -> StoreSettings:
    return StoreSettings(url="s3://unused", endpoint=endpoint or sw.endpoint, **kw)


def s3_client(sw: SeaweedS3, secret: str | None = None) -> Any:
    return boto3.session.Session().client(
        "s3", endpoint_url=sw.endpoint, aws_access_key_id=sw.access_key,
        aws_secret_access_key=secret or sw.secret_key, region_name=sw.region,
        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def items(n: int, tag: str = "") -> list[PutItem]:
    """``n`` items at ocspmint keys with distinct random bodies."""
    issuer = hashlib.sha1(tag.encode()).hexdigest()
    return [PutItem(object_key(issuer, 1000 + i), secrets.token_bytes(400 + i % 200), THIS, NEXT) for i in range(n)]


@pytest.fixture
def store(aws_env: SeaweedS3) -> Iterator[S3Store]:
    prefix = "t-" + secrets.token_hex(4)
    s = S3Store(f"s3://{aws_env.bucket}/{prefix}", settings(aws_env, concurrency=16))
    yield s
    s.close()


def test_parse_url_and_cache_control() -> None:
    assert parse_s3_url("s3://b/") == ("b", "")
    assert parse_s3_url("s3://b/a/b/") == ("b", "a/b")
    t = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert cache_control(t + dt.timedelta(seconds=90), now=t) == "max-age=90, public, no-transform, must-revalidate"
    assert cache_control(t - dt.timedelta(days=1), now=t).startswith("max-age=0,")


def test_round_trip_headers_and_metadata(store: S3Store, aws_env: SeaweedS3) -> None:
    batch = items(300, "round-trip")
    past = PutItem(object_key("00" * 20, 7), b"expired response", NOW - dt.timedelta(days=8), NOW - dt.timedelta(days=1))
    futures = [store.submit(batch[:100]), store.submit(batch[100:] + [past]), store.submit([])]
    assert [f.result(timeout=120) for f in futures] == [[None] * 100, [None] * 201, []]

    for item in batch + [past]:
        assert store.get(item.key) == item.data
    assert store.get("ff/none/such") is None

    client = s3_client(aws_env)
    for item in (batch[0], batch[-1], past):
        head = client.head_object(Bucket=aws_env.bucket, Key=f"{store.prefix}/{item.key}", ChecksumMode="ENABLED")
        assert head["ContentType"] == "application/ocsp-response"
        assert head["ContentLength"] == len(item.data)
        assert head["Metadata"] == {
            "this-update": item.this_update.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "next-update": item.next_update.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "sha256": hashlib.sha256(item.data).hexdigest(),
        }
        assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(item.data).digest()).decode()
        age, *rest = head["CacheControl"].split(", ")
        assert rest == ["public", "no-transform", "must-revalidate"]
        max_age = int(age.removeprefix("max-age="))
        # computed at upload time: never past nextUpdate, never negative
        assert 0 <= max_age <= max(0, (item.next_update - NOW).total_seconds())
    assert client.head_object(Bucket=aws_env.bucket, Key=f"{store.prefix}/{past.key}")["CacheControl"].startswith("max-age=0,")
    # a fresh response: max-age is about the seconds left (bounded by the test's own duration)
    fresh = client.head_object(Bucket=aws_env.bucket, Key=f"{store.prefix}/{batch[0].key}")["CacheControl"]
    assert int(fresh.split(",")[0].removeprefix("max-age=")) > (NEXT - NOW).total_seconds() - 3600


def test_keys_lists_only_the_prefix(store: S3Store, aws_env: SeaweedS3) -> None:
    batch = items(1200, "keys")
    assert all(e is None for e in store.submit(batch).result(timeout=120))
    other = S3Store(f"s3://{aws_env.bucket}/{store.prefix}-other", settings(aws_env))
    try:
        assert other.submit(items(3, "other")).result(timeout=60) == [None] * 3
        assert set(store.keys()) == {i.key for i in batch}  # > 1000: several list pages
        assert sorted(other.keys()) == sorted(i.key for i in items(3, "other"))
    finally:
        other.close()


def test_open_store_dispatches_s3(aws_env: SeaweedS3) -> None:
    s = open_store(f"s3://{aws_env.bucket}/open-store", settings(aws_env))
    try:
        assert isinstance(s, S3Store)
        assert (s.bucket, s.prefix) == (aws_env.bucket, "open-store")
        assert s.submit(items(2, "open")).result(timeout=60) == [None, None]
    finally:
        s.close()


def test_fetch_from_another_threads_uvloop(store: S3Store) -> None:
    batch = items(50, "fetch")
    assert store.submit(batch).result(timeout=60) == [None] * 50
    results: dict[str, Any] = {}

    async def responder() -> None:
        # uploads in flight on the store's own loop while this loop fetches
        later = store.submit(items(200, "fetch-more"))
        got = await asyncio.gather(*(store.fetch(i.key) for i in batch), store.fetch("00/no/such"))
        results["got"] = got
        results["thread"] = threading.get_ident()
        results["later"] = await asyncio.wrap_future(later)

    t = threading.Thread(target=lambda: uvloop.run(responder()))
    t.start()
    t.join(120)
    assert results["got"] == [i.data for i in batch] + [None]
    assert results["later"] == [None] * 200
    assert results["thread"] != store._thread.ident


def test_missing_bucket_fails_every_item_naming_its_key(aws_env: SeaweedS3) -> None:
    s = S3Store("s3://no-such-bucket-ocspmint/p", settings(aws_env, retries=3))
    try:
        batch = items(5, "nobucket")
        errors = s.submit(batch).result(timeout=60)
    finally:
        s.close()
    for item, error in zip(batch, errors, strict=True):
        assert error is not None
        assert error.startswith(f"s3://no-such-bucket-ocspmint/p/{item.key}: PUT failed")
        assert "NoSuchBucket" in error and "after" not in error  # a 4xx: not retried


def test_wrong_secret_fails_every_item_without_leaking(aws_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "WRONG" + secrets.token_urlsafe(24)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    s = S3Store(f"s3://{aws_env.bucket}/wrong", settings(aws_env, retries=3))
    try:
        batch = items(4, "wrong")
        errors = s.submit(batch).result(timeout=60)
        with pytest.raises(s3store.StoreError) as info:
            s.get(batch[0].key)
    finally:
        s.close()
    for item, error in zip(batch, errors, strict=True):
        assert error is not None and error.startswith(f"s3://{aws_env.bucket}/wrong/{item.key}: PUT failed: 403")
        assert wrong not in error and aws_env.secret_key not in error
    assert batch[0].key in str(info.value) and wrong not in str(info.value)
    assert not list(s3_client(aws_env).list_objects_v2(Bucket=aws_env.bucket, Prefix="wrong/").get("Contents", []))


def test_profile_credentials(aws_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    (tmp_path / "credentials").write_text(
        f"[ocspmint-test]\naws_access_key_id = {aws_env.access_key}\naws_secret_access_key = {aws_env.secret_key}\n"
    )
    (tmp_path / "config").write_text("[profile ocspmint-test]\nregion = us-east-1\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    with S3Store(f"s3://{aws_env.bucket}/profile", settings(aws_env, profile="ocspmint-test")) as s:
        batch = items(3, "profile")
        assert s.submit(batch).result(timeout=60) == [None] * 3
        assert s.get(batch[2].key) == batch[2].data
    with pytest.raises(s3store.StoreError, match="profile 'nope'"):
        S3Store(f"s3://{aws_env.bucket}/profile", settings(aws_env, profile="nope"))


def signed_put(sw: SeaweedS3, key: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """A raw SigV4-signed PUT of ``body`` (payload hash of the body actually
    sent) with extra ``headers``; (status, response body)."""
    url = f"{sw.endpoint}/{sw.bucket}/{key}"
    req = AWSRequest(method="PUT", url=url, data=body, headers={**headers, "x-amz-content-sha256": hashlib.sha256(body).hexdigest()})
    S3SigV4Auth(Credentials(sw.access_key, sw.secret_key), "s3", sw.region).add_auth(req)
    prepared = req.prepare()
    host, port = sw.endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("PUT", f"/{sw.bucket}/{key}", body=body, headers=dict(prepared.headers))
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["sha256", "md5"])
def test_server_rejects_body_that_does_not_match_checksum(seaweed: SeaweedS3, kind: str) -> None:
    intended = secrets.token_bytes(500)
    truncated = intended[:-1]
    if kind == "sha256":
        header = {"x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(intended).digest()).decode()}
    else:
        header = {"Content-MD5": base64.b64encode(hashlib.md5(intended).digest()).decode()}
    key = f"checksum/{kind}-{secrets.token_hex(4)}"
    status, body = signed_put(seaweed, key, truncated, header)
    assert status == 400 and b"BadDigest" in body
    missing = s3_client(seaweed).list_objects_v2(Bucket=seaweed.bucket, Prefix=key).get("Contents", [])
    assert missing == []
    status, _ = signed_put(seaweed, key, intended, header)  # control: the right body is accepted
    assert status == 200


def fault_proxy(target: str, faults: int, mode: str) -> FaultyS3:
    """tests/s3proxy.py in front of SeaweedFS: the first ``faults`` requests
    get ``mode`` (slowdown, denied, reset, or hang: no answer until the
    client's timeout); later ones are forwarded unchanged."""
    return FaultyS3(target, lambda n, method, path: mode if n <= faults else None)


@pytest.fixture
def proxy_factory(seaweed: SeaweedS3) -> Iterator[Any]:
    made: list[FaultyS3] = []

    def make(faults: int, mode: str) -> FaultyS3:
        made.append(fault_proxy(seaweed.endpoint, faults, mode))
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.mark.parametrize("mode", ["slowdown", "reset"])
def test_retries_transient_faults_then_succeeds(aws_env: SeaweedS3, proxy_factory: Any, mode: str) -> None:
    proxy = proxy_factory(3, mode)
    with S3Store(f"s3://{aws_env.bucket}/retry-{mode}", settings(aws_env, endpoint=proxy.endpoint, retries=3, concurrency=1)) as s:
        item = items(1, f"retry-{mode}")[0]
        assert s.submit([item]).result(timeout=60) == [None]
    assert len(proxy.log) == 4  # three faults, then the forwarded PUT
    direct = S3Store(f"s3://{aws_env.bucket}/retry-{mode}", settings(aws_env))
    try:
        assert direct.get(item.key) == item.data
    finally:
        direct.close()


def test_retries_are_bounded(aws_env: SeaweedS3, proxy_factory: Any) -> None:
    proxy = proxy_factory(100, "slowdown")
    with S3Store(f"s3://{aws_env.bucket}/bounded", settings(aws_env, endpoint=proxy.endpoint, retries=2, concurrency=4)) as s:
        batch = items(3, "bounded")
        errors = s.submit(batch).result(timeout=60)
    assert len(proxy.log) == 3 * 3  # 1 + 2 retries per item
    for item, error in zip(batch, errors, strict=True):
        assert error == f"s3://{aws_env.bucket}/bounded/{item.key}: PUT failed after 3 attempts: 503 SlowDown injected"


def test_client_error_is_not_retried(aws_env: SeaweedS3, proxy_factory: Any) -> None:
    proxy = proxy_factory(1, "denied")
    with S3Store(f"s3://{aws_env.bucket}/denied", settings(aws_env, endpoint=proxy.endpoint, retries=5, concurrency=1)) as s:
        first, second = items(2, "denied")
        assert s.submit([first]).result(timeout=60) == [f"s3://{aws_env.bucket}/denied/{first.key}: PUT failed: 403 AccessDenied injected"]
        assert s.submit([second]).result(timeout=60) == [None]
    assert len(proxy.log) == 2


def test_closed_store_refuses_submit(aws_env: SeaweedS3) -> None:
    s = S3Store(f"s3://{aws_env.bucket}/closed", settings(aws_env))
    pending = s.submit(items(20, "closed"))
    s.close()
    assert pending.done() and pending.result() == [None] * 20  # close waited for it
    with pytest.raises(s3store.StoreError, match="closed"):
        s.submit(items(1, "closed-late"))
    s.close()


def test_timeout_is_retried(aws_env: SeaweedS3, proxy_factory: Any) -> None:
    proxy = proxy_factory(1, "hang")
    s = S3Store(f"s3://{aws_env.bucket}/stall",
                settings(aws_env, endpoint=proxy.endpoint, retries=2, concurrency=1, timeout=dt.timedelta(seconds=1)))
    with s:
        assert s.submit(items(1, "stall")).result(timeout=60) == [None]
    assert len(proxy.log) == 2


# --- store URL and endpoint checks (config.s3_url_problem, http_url_problem) -


@pytest.mark.parametrize("url", ["s3://b/a//b", "s3://b/a/../b", "s3://b/./b", "s3:///p", "s3://k:TOPSECRET@b/p"])
def test_unusable_s3_urls_are_a_store_error(url: str) -> None:
    """obstore raised a bare ValueError (a traceback) for "a//b"."""
    with pytest.raises(StoreError) as e:
        parse_s3_url(url)
    assert "TOPSECRET" not in str(e.value)
    with pytest.raises(StoreError):
        S3Store(url, StoreSettings(url=url, endpoint="http://127.0.0.1:9"))


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8333", "http://127.0.0.1:83x3", "http://key:TOPSECRET@127.0.0.1:8333"])
def test_an_endpoint_without_http_is_refused_before_any_put(aws_env: SeaweedS3, endpoint: str) -> None:
    """obstore took "127.0.0.1:8333" and panicked in every PUT ("rust
    future panicked", a Rust backtrace on stderr)."""
    with pytest.raises(StoreError) as e:
        S3Store(f"s3://{aws_env.bucket}/ep", settings(aws_env, endpoint))
    assert "S3 endpoint" in str(e.value) and "TOPSECRET" not in str(e.value)


def test_an_upper_case_http_endpoint_works(aws_env: SeaweedS3) -> None:
    """"HTTP://..." passes the config check (URL schemes are case-insensitive),
    so plain HTTP must be allowed for it too."""
    s = S3Store(f"s3://{aws_env.bucket}/upper-{secrets.token_hex(4)}",
                settings(aws_env, aws_env.endpoint.replace("http://", "HTTP://")))
    try:
        batch = items(2, "upper")
        assert s.submit(batch).result(timeout=60) == [None, None]
        assert s.get(batch[0].key) == batch[0].data
    finally:
        s.close()

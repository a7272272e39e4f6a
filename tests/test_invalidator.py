"""The durable purge queue and the CloudFront back end (botocore Stubber:
the issue allows no real CloudFront here). Varnish purges run for real in
tests/test_publish_e2e.py."""

from __future__ import annotations

import base64
import urllib.parse
from pathlib import Path

import boto3
import msgspec
import pytest
from botocore.stub import ANY, Stubber
from cryptography.x509 import ocsp

from ocspmint.config import Config, Purge, load_config
from ocspmint.demo import Demo
from ocspmint.invalidator import MAX_PATHS, invalidate, issuer_wildcards, serial_paths
from ocspmint.issuer import load_issuers
from ocspmint.journal import Journal

DIST = "E2EXAMPLE123"


@pytest.fixture
def setup(demo: Demo, tmp_path: Path):
    cfg = load_config(demo.config)
    target = Purge(name="cf", type="cloudfront", distribution_id=DIST, wildcard_over=1000)
    cfg = msgspec.structs.replace(cfg, purge=[target], response=msgspec.structs.replace(cfg.response, certid_hashes=["sha1", "sha256"]))
    issuers = load_issuers(cfg)
    with Journal(tmp_path) as journal:
        yield cfg, issuers, journal


def queue(journal: Journal, issuer: str, serials: list[int]) -> None:
    journal.record([], [(issuer, s) for s in serials], ["cf"])


def stubbed(cfg: Config):
    client = boto3.client("cloudfront", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    return client, Stubber(client)


def ok_reply(n: int) -> dict:
    return {"Location": "https://cloudfront.amazonaws.com/x", "Invalidation": {
        "Id": "I1", "Status": "InProgress", "CreateTime": "2026-11-21T00:00:00Z",
        "InvalidationBatch": {"Paths": {"Quantity": n, "Items": ["/x"] * n}, "CallerReference": "r"}}}


def decoded_serial(path: str) -> int:
    der = base64.b64decode(urllib.parse.unquote(path.lstrip("/")))
    return ocsp.load_der_ocsp_request(der).serial_number


def test_small_batch_invalidates_the_exact_get_paths_of_each_serial(setup):
    cfg, issuers, journal = setup
    name = next(iter(issuers))
    serials = [0x01, 0x80, 0x7F_FF_FF, (1 << 159) + 5]
    queue(journal, name, serials)
    client, stub = stubbed(cfg)
    sent: list[list[str]] = []

    def capture(**kw):
        sent.append(kw["InvalidationBatch"]["Paths"]["Items"])

    client.meta.events.register("provide-client-params.cloudfront.CreateInvalidation", lambda params, **_: capture(**params))
    stub.add_response("create_invalidation", ok_reply(1), {"DistributionId": DIST, "InvalidationBatch": ANY})
    with stub:
        results = invalidate(cfg, issuers, journal, cloudfront=lambda _: client)
    stub.assert_no_pending_responses()
    assert results["cf"].sent == 4 and results["cf"].pending == 0
    paths = sent[0]
    assert not any(p.endswith("*") for p in paths)
    # every serial appears under both CertID hashes, raw and percent-encoded
    assert sorted({decoded_serial(p) for p in paths}) == sorted(serials)
    assert any("%2F" in p or "%2B" in p or "%3D" in p for p in paths)
    assert journal.queued_purges("cf") == []


def test_large_batch_uses_issuer_wildcards_that_cover_every_path(setup):
    cfg, issuers, journal = setup
    name = next(iter(issuers))
    ident = issuers[name]
    serials = list(range(0x10_0000, 0x10_0000 + 400)) + [(1 << 127) | i for i in range(400)]
    queue(journal, name, serials)
    client, stub = stubbed(cfg)
    sent: list[list[str]] = []
    client.meta.events.register("provide-client-params.cloudfront.CreateInvalidation",
                                lambda params, **_: sent.append(params["InvalidationBatch"]["Paths"]["Items"]))
    stub.add_response("create_invalidation", ok_reply(1), {"DistributionId": DIST, "InvalidationBatch": ANY})
    with stub:
        results = invalidate(cfg, issuers, journal, cloudfront=lambda _: client)
    assert results["cf"].sent == 800
    wild = sent[0]
    assert wild == issuer_wildcards(ident, serials, ["sha1", "sha256"]) and all(p.endswith("*") for p in wild)
    assert len(wild) <= 16 < MAX_PATHS
    for s in serials[:50] + serials[-50:]:
        for p in serial_paths(ident, s, ["sha1", "sha256"]):
            assert any(p.startswith(w[:-1]) for w in wild), p
    # a wildcard never reaches past the issuer: its prefix holds the issuer's key hash
    for w in wild:
        fixed = base64.b64decode(urllib.parse.unquote(w[1:-1]))
        assert ident.key_hash["sha1"] in fixed or ident.key_hash["sha256"] in fixed, w


def test_refused_invalidation_stays_queued_and_is_retried_next_run(setup):
    cfg, issuers, journal = setup
    name = next(iter(issuers))
    queue(journal, name, [7, 8, 9])
    client, stub = stubbed(cfg)
    for _ in range(3):
        stub.add_client_error("create_invalidation", "TooManyInvalidationsInProgress", "slow down", 400)
    with stub:
        results = invalidate(cfg, issuers, journal, cloudfront=lambda _: client, pause=0)
    assert results["cf"].sent == 0 and results["cf"].pending == 3
    assert "TooManyInvalidationsInProgress" in results["cf"].error
    assert journal.queued_purges("cf") == [(name, 7), (name, 8), (name, 9)]
    stub.add_response("create_invalidation", ok_reply(1), {"DistributionId": DIST, "InvalidationBatch": ANY})
    with stub:
        results = invalidate(cfg, issuers, journal, cloudfront=lambda _: client, pause=0)
    assert results["cf"].sent == 3 and journal.queued_purges("cf") == []


def test_purges_for_an_issuer_no_longer_configured_stay_pending_and_are_named(setup):
    cfg, issuers, journal = setup
    journal.record([], [("retired-ca", 5)], ["cf"])
    results = invalidate(cfg, issuers, journal, cloudfront=lambda _: pytest.fail("nothing to send"))
    assert results["cf"].pending == 1 and "retired-ca" in results["cf"].error

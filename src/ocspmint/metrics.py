"""Prometheus metrics of `ocspmint refresh` (names in docs/refresh.md).

A private registry served over HTTP on ``refresh.metrics_listen``
(HOST:PORT; empty: not served). Times are seconds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900)
SIGN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class RefreshMetrics:
    """Counters: ``ocspmint_due_total{reason}`` (responses planned, once per
    signing attempt), ``ocspmint_published_total{issuer}``,
    ``ocspmint_failed_total{stage}`` (one per ``failure`` log line).
    Gauges: ``ocspmint_oldest_this_update_seconds{issuer}`` (Unix time of the
    oldest thisUpdate still scheduled: staleness),
    ``ocspmint_earliest_next_update_seconds{issuer}`` (Unix time of the
    earliest nextUpdate still scheduled: the first served response to expire),
    ``ocspmint_ledger_changes_pending`` (ledger changes not published yet,
    retried with backoff), ``ocspmint_purges_pending{target}`` (purges
    queued in the journal for a target, after its last attempt). Histograms:
    ``ocspmint_ledger_to_published_seconds`` (ledger change seen → response
    stored, acknowledged and journaled), ``ocspmint_sign_batch_seconds`` (one
    batch sent to the HSM → signatures back), ``ocspmint_upload_batch_seconds``
    (batch handed to the store → acknowledged)."""

    def __init__(self, listen: str) -> None:
        disable_created_metrics()
        self.registry = r = CollectorRegistry()
        self.due = Counter("ocspmint_due", "Responses planned for signing (once per attempt), by planner reason",
                           ["reason"], registry=r)
        self.published = Counter("ocspmint_published", "Responses published and journaled", ["issuer"], registry=r)
        self.failed = Counter("ocspmint_failed", "Failures logged: responses not published at an attempt, unreadable "
                              "ledger rows or sources, clock refusals; by stage", ["stage"], registry=r)
        self.changes_pending = Gauge("ocspmint_ledger_changes_pending",
                                     "Ledger changes not published yet (retried with backoff)", registry=r)
        self.purges_pending = Gauge("ocspmint_purges_pending", "Purges queued in the journal, by target",
                                    ["target"], registry=r)
        self.oldest = Gauge("ocspmint_oldest_this_update_seconds", "Oldest scheduled thisUpdate (Unix time)",
                            ["issuer"], registry=r)
        self.earliest = Gauge("ocspmint_earliest_next_update_seconds",
                              "Earliest scheduled nextUpdate (Unix time): when the first served response expires",
                              ["issuer"], registry=r)
        self.ledger_to_published = Histogram("ocspmint_ledger_to_published_seconds",
                                             "Ledger change seen to response published", buckets=LATENCY_BUCKETS, registry=r)
        self.sign_seconds = Histogram("ocspmint_sign_batch_seconds", "Signing (and verifying) latency of one batch",
                                      buckets=SIGN_BUCKETS, registry=r)
        self.upload_seconds = Histogram("ocspmint_upload_batch_seconds", "Store latency of one batch",
                                        buckets=SIGN_BUCKETS, registry=r)
        if listen:
            host, _, port = listen.rpartition(":")
            start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=r)

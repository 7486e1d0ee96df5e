"""Prometheus metrics of the worker and the relay."""

from __future__ import annotations

import prometheus_client

from worker import pipeline

EVENTS_CONSUMED = prometheus_client.Counter(
    "convstats_events_consumed_total", "message-created records consumed"
)
EVENTS_APPLIED = prometheus_client.Counter(
    "convstats_events_applied_total", "messages that changed the statistics"
)
EVENTS_DUPLICATE = prometheus_client.Counter(
    "convstats_events_duplicate_total", "redelivered messages that changed nothing"
)
EVENTS_REJECTED = prometheus_client.Counter(
    "convstats_events_rejected_total",
    "records sent to the dead-letter topic",
    ["reason"],
)
BATCH_SECONDS = prometheus_client.Histogram(
    "convstats_batch_seconds",
    "time to apply one batch, dead letters included",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_RETRIES = prometheus_client.Counter(
    "convstats_batch_retries_total", "batches retried after a transient failure"
)
CONSUMER_LAG = prometheus_client.Gauge(
    "convstats_consumer_lag", "records not yet committed", ["partition"]
)
UPDATES_PUBLISHED = prometheus_client.Counter(
    "convstats_updates_published_total", "conversation-updated records acknowledged"
)
OUTBOX_BACKLOG = prometheus_client.Gauge(
    "convstats_outbox_backlog", "outbox rows waiting to be published"
)
OUTBOX_OLDEST_AGE = prometheus_client.Gauge(
    "convstats_outbox_oldest_age_seconds", "age of the oldest unpublished outbox row"
)


def count(tally: pipeline.Tally) -> None:
    """Adds what a batch (or a round of parked retries) did to the counters."""
    EVENTS_CONSUMED.inc(tally.consumed)
    EVENTS_APPLIED.inc(tally.applied)
    EVENTS_DUPLICATE.inc(tally.duplicates)
    for reason, n in tally.reasons.items():
        EVENTS_REJECTED.labels(reason=reason).inc(n)

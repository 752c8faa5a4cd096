"""Prometheus metrics (GET /metrics); `app.api.middleware` feeds the request metrics.

Counters and histograms are updated as requests and generations finish; job
states, queue depth and training speed are read from the database at scrape
time (it is the source of truth, and several API processes then agree); the
adapter cache counters come from the engine process with each reply.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select

from app.core.db import get_sessionmaker
from app.engine_process import engine_cache_stats
from app.models import JOB_STATUSES, Job
from app.services.workers import live_workers

REGISTRY = CollectorRegistry()

REQUESTS = Counter("sbora_http_requests", "HTTP requests by route template, method and status",
                   ["route", "method", "status"], registry=REGISTRY)
REQUEST_SECONDS = Histogram("sbora_http_request_duration_seconds", "time to the end of the response body",
                            ["route"], registry=REGISTRY,
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
GENERATION_SECONDS = Histogram("sbora_generation_duration_seconds", "generation latency, request queued to last token",
                               registry=REGISTRY, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120))
GENERATION_TOKENS_PER_S = Histogram("sbora_generation_tokens_per_second", "decoding speed of each generation",
                                    registry=REGISTRY, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000))
GENERATED_TOKENS = Counter("sbora_generated_tokens", "tokens generated", registry=REGISTRY)


def observe_generation(started: float, completion_tokens: int) -> None:
    elapsed = time.perf_counter() - started
    GENERATION_SECONDS.observe(elapsed)
    GENERATED_TOKENS.inc(completion_tokens)
    if completion_tokens and elapsed > 0:
        GENERATION_TOKENS_PER_S.observe(completion_tokens / elapsed)


class ServiceState:
    """Gauges read at scrape time: jobs by state, queue depth, training tokens/s, adapter cache."""

    def collect(self):
        with get_sessionmaker()() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            running = session.scalars(select(Job.progress).where(Job.status == "running")).all()
            live = [(w.queue, w.kind) for w in live_workers(session)]
        workers = GaugeMetricFamily("sbora_workers_live", "training workers heard from in the last three "
                                    "heartbeats", labels=["queue", "kind"])
        for queue, kind in sorted(set(live)):
            workers.add_metric([queue, kind], live.count((queue, kind)))
        yield workers
        jobs = GaugeMetricFamily("sbora_jobs", "jobs by state", labels=["state"])
        for state in JOB_STATUSES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("sbora_queue_depth", "jobs waiting for a worker", value=counts.get("queued", 0))
        yield GaugeMetricFamily("sbora_training_tokens_per_second", "sum over running jobs of their training speed",
                                value=sum((p or {}).get("tokens_per_s") or 0 for p in running))
        stats = engine_cache_stats()
        for name in ("hits", "misses", "evictions"):
            yield CounterMetricFamily(f"sbora_adapter_cache_{name}", f"adapter cache {name} in the engine process",
                                      value=stats.get(name, 0))
        yield GaugeMetricFamily("sbora_adapter_cache_bytes", "bytes of adapters held by the engine",
                                value=stats.get("bytes", 0))


REGISTRY.register(ServiceState())


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

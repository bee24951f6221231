"""API metrics (prometheus-client), all prefixed latentd_. Labels are route *templates*
(/v1/jobs/{job_id}), methods, status codes and fixed reason words: never raw paths, prompts or keys.

- latentd_api_requests_total{route,method,status}
- latentd_api_request_duration_seconds{route,method}  (histogram)
- latentd_jobs_admitted_total{endpoint,model}
- latentd_jobs_rejected_total{reason}      (invalid, unauthorized, rate_limited, queue_full,
                                          replication_timeout, idempotency_key, ...)
- latentd_queue_depth{model}, latentd_ready_workers{model}  (read from Redis at scrape time, one
  series per model of the deployment: latentd_ready_workers{model="x"} == 0 is a model nobody serves)

With several uvicorn workers set PROMETHEUS_MULTIPROC_DIR (`latentd serve` does) and the
scrape aggregates every process's counters.
"""
from __future__ import annotations

import os
import time

from prometheus_client import (CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest, multiprocess)
from prometheus_client.core import GaugeMetricFamily

disable_created_metrics()   # no *_created series: half the exposition size, nothing lost

REGISTRY = CollectorRegistry(auto_describe=True)
REQUESTS = Counter("latentd_api_requests_total", "API requests by route template and status",
                   ["route", "method", "status"], registry=REGISTRY)
LATENCY = Histogram("latentd_api_request_duration_seconds", "API request latency by route template",
                    ["route", "method"], registry=REGISTRY,
                    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
ADMITTED = Counter("latentd_jobs_admitted_total", "Jobs admitted to a model's queue",
                   ["endpoint", "model"], registry=REGISTRY)
REJECTED = Counter("latentd_jobs_rejected_total", "Requests rejected before queueing, by reason",
                   ["reason"], registry=REGISTRY)

_METHODS = frozenset(("GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"))
_REASONS = {401: "unauthorized", 413: "body_too_large", 429: "rate_limited", 400: "invalid"}


def rejected(status: int, code: str) -> None:
    if code in ("queue_full", "not_ready", "unavailable", "replication_timeout"):
        REJECTED.labels(code).inc()
    elif code.startswith("idempotency_key_"):      # reused with another request, or still admitting
        REJECTED.labels("idempotency_key").inc()
    elif status in _REASONS:
        REJECTED.labels(_REASONS[status]).inc()
    elif status == 422:
        REJECTED.labels("invalid").inc()
    # 404s and other lookups are not admission decisions


class QueueCollector:
    """Reads queue depth and ready workers from Redis when scraped."""

    def __init__(self, client):
        self.client = client

    def collect(self):
        depth = GaugeMetricFamily("latentd_queue_depth", "Jobs waiting in a model's queue",
                                  labels=["model"])
        ready = GaugeMetricFamily("latentd_ready_workers", "Workers with the model loaded and a "
                                  "fresh heartbeat (0: nobody serves the model)", labels=["model"])
        up = GaugeMetricFamily("latentd_redis_up", "1 if Redis answered this scrape")
        hooks = GaugeMetricFamily("latentd_webhooks_pending", "Webhook deliveries not yet delivered")
        try:
            for model, n in self.client.queue_depths().items():
                depth.add_metric([model], float(n))
            for model, ws in self.client.workers_by_model().items():
                ready.add_metric([model], float(len(ws)))
            hooks.add_metric([], float(self.client.webhooks_pending()))
            up.add_metric([], 1.0)
            yield depth
            yield ready
            yield hooks
        except Exception:
            up.add_metric([], 0.0)
        yield up


class AllMetrics:
    """This process's metrics (or, in multiprocess mode, every API process's) + the Redis gauges."""

    def __init__(self, client):
        self.live = QueueCollector(client)

    def collect(self):
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            yield from multiprocess.MultiProcessCollector(None).collect()
        else:
            yield from REGISTRY.collect()
        yield from self.live.collect()


def registry_for(client) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AllMetrics(client))
    return reg


def render(client) -> bytes:
    return generate_latest(registry_for(client))


_COUNTS: dict[tuple, tuple] = {}      # (template, method, status) -> its two series (bounded labels)


class MetricsMiddleware:
    """Pure ASGI middleware (cheap): counts and times each request by its route template."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            method = method if method in _METHODS else "OTHER"    # bounded label values
            key = (template, method, status[0])
            child = _COUNTS.get(key)
            if child is None:     # labels() costs more than the count: each series looked up once
                child = _COUNTS[key] = (REQUESTS.labels(template, method, str(status[0])),
                                        LATENCY.labels(template, method))
            child[0].inc()
            child[1].observe(time.perf_counter() - start)

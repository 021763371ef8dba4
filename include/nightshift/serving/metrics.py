"""Prometheus metrics of the endpoint (``GET /metrics``) and the structured access log.

Labels are bounded: the route is the matched route's template (``unmatched`` otherwise), the status an HTTP
code, the version a registered model version. Nothing a client sends becomes a label or a log field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

access_log = logging.getLogger("nightshift.serving.access")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LOGGED = ("key_id", "model_version", "model_role", "response_id", "prompt_tokens", "completion_tokens", "finish",
          "waited_s", "error")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServingMetrics:
    """The endpoint's counters, histograms and gauges, in a registry of their own (one per application)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nightshift_requests", "Requests answered, by route and HTTP status.",
                                ["route", "status"], registry=r)
        self.errors = Counter("nightshift_request_errors", "Requests answered with an error, by route and error code.",
                              ["route", "code"], registry=r)
        self.latency = Histogram("nightshift_request_seconds", "Wall time from request to the end of the response.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("nightshift_queue_wait_seconds", "Time a generation request waited for a slot.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("nightshift_tokens", "Tokens processed, by kind (prompt or completion) and version.",
                              ["kind", "version"], registry=r)
        self.answers = Counter("nightshift_answers", "Generation answers, by model version and role.",
                               ["version", "role"], registry=r)
        self.feedback = Counter("nightshift_feedback", "Feedback received, by rating and model version.",
                                ["rating", "version"], registry=r)
        self.shadows = Counter("nightshift_shadow_requests", "Shadow generations by the candidate, by outcome "
                               "(answered, skipped for lack of a free slot, failed).", ["outcome"], registry=r)
        self.batch_size = Histogram("nightshift_batch_size", "Sequences in each batched decoding step.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("nightshift_queue_depth", "Requests waiting for a generation slot.", registry=r)
        self.active = Gauge("nightshift_active_requests", "Requests holding a generation slot.", registry=r)
        self.running = Gauge("nightshift_running_sequences", "Sequences in the decoding batches.", registry=r)
        self.served = Gauge("nightshift_model_loaded", "1 for each model version loaded, by role.",
                            ["version", "role"], registry=r)

    def watch(self, waiting: Callable[[], float], active: Callable[[], float], running: Callable[[], float]) -> None:
        """Read the queue and batch gauges from the live objects at scrape time."""
        self.queue_depth.set_function(waiting)
        self.active.set_function(active)
        self.running.set_function(running)

    def set_loaded(self, loaded: dict[str, int | None]) -> None:
        """Record which version is loaded in each role (``champion``, ``candidate``)."""
        self.served.clear()
        for role, version in loaded.items():
            if version is not None:
                self.served.labels(str(version), role).set(1)

    def observe(self, route: str, status: int, seconds: float, state: dict[str, Any]) -> None:
        """Count one finished request (``state`` holds what the handlers noted)."""
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, str(state.get("error") or status)).inc()
        version = state.get("model_version")
        if version is None:
            return
        version = str(version)
        self.tokens.labels("prompt", version).inc(state.get("prompt_tokens") or 0)
        self.tokens.labels("completion", version).inc(state.get("completion_tokens") or 0)
        if status < 400:
            self.answers.labels(version, str(state.get("model_role") or "champion")).inc()
        if state.get("waited_s") is not None:
            self.queue_wait.observe(float(state["waited_s"]))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def route_of(scope) -> str:
    """Return the matched route's path template, bounded for use as a label."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def log_access(request_id: str, method: str, route: str, status: int, complete: bool, seconds: float,
               state: dict[str, Any]) -> None:
    """Write one JSON access-log line: ids, route, status, timings and counts, never the content."""
    record = {"request_id": request_id, "method": method, "route": route, "status": status or None,
              "complete": complete, "seconds": round(seconds, 4)}
    record.update({k: state[k] for k in LOGGED if state.get(k) is not None})
    access_log.info("%s", json.dumps(record, sort_keys=True))

"""Every Prometheus collector of the server, in one registry per server instance.

Names follow Prometheus conventions: `cellstream_` prefix, base units (seconds, bytes), `_total`
on counters. A registry per instance keeps tests (and several servers in one process) apart.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self._http_server: WSGIServer | None = None
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cellstream_requests", "RPCs handled, by method and final gRPC status code.",
            ["method", "code"], registry=r,
        )
        self.items = Counter(
            "cellstream_items", "Items of multiplexed calls (StepMany, StreamMany, GenerateMany turns), by method "
            "and the item's own status code.", ["method", "code"], registry=r,
        )
        self.request_latency = Histogram(
            "cellstream_request_duration_seconds", "Wall time of an RPC (streams: per message).",
            ["method"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.http_requests = Counter(
            "cellstream_http_requests", "HTTP requests handled, by route (its template, e.g. "
            "/v2/models/{model}/infer) and HTTP status code; 499: the client went away first.",
            ["route", "code"], registry=r,
        )
        self.http_latency = Histogram(
            "cellstream_http_request_duration_seconds", "Wall time of an HTTP request (a streamed reply: until "
            "its last event).", ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "cellstream_queue_wait_seconds", "Time a step waited in the batcher before its batch ran.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "cellstream_batch_size", "Session steps per onnxruntime call.", ["model"],
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.compute = Histogram(
            "cellstream_compute_seconds", "onnxruntime time per batch.", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "cellstream_tokens", "Tokens (or feature vectors) consumed by sessions.", ["model"], registry=r,
        )
        self.steps_dropped = Counter(
            "cellstream_steps_dropped", "Steps refused by the batcher before compute, by reason.",
            ["model", "reason"], registry=r,
        )
        self.calls_refused = Counter(
            "cellstream_calls_refused", "API calls refused before any servicer ran, by reason.", ["reason"],
            registry=r,
        )
        # With Redis, both gauges describe the shared store (every replica reports the same total, read
        # at its last probe or sweep): aggregate them across replicas with max, not sum.
        self.sessions_active = Gauge("cellstream_sessions_active",
                                     "Live sessions in the store (Redis: all replicas' sessions).", registry=r)
        self.state_bytes = Gauge("cellstream_state_bytes",
                                 "Bytes of h and C state held by live sessions (Redis: all replicas').", registry=r)
        self.store_up = Gauge("cellstream_state_store_up",
                              "1 while the session store answers the server's probe (the memory store always "
                              "does), 0 while it does not.", registry=r)
        self.sessions_opened = Counter("cellstream_sessions_opened", "Sessions opened (incl. forks).",
                                       registry=r)
        self.sessions_closed = Counter("cellstream_sessions_closed", "Sessions closed by clients.", registry=r)
        self.sessions_expired = Counter("cellstream_sessions_expired", "Sessions dropped after their idle TTL.",
                                        registry=r)
        self.sessions_evicted = Counter("cellstream_sessions_evicted",
                                        "Least recently used sessions evicted at max_sessions.", registry=r)
        # Per model version (docs/OPERATIONS.md, "Model versions"): a version's label is its number.
        self.version_steps = StepCounts()
        r.register(self.version_steps)
        self.version_sessions = Gauge("cellstream_model_version_sessions",
                                      "Live sessions pinned to each loaded model version, as counted at the last "
                                      "sweep or repository call (Redis: all replicas' sessions: aggregate with max).",
                                      ["model", "version"], registry=r)
        self.version_state = Gauge("cellstream_model_version_state",
                                   "1 for each loaded model version's state (READY: takes new sessions; DRAINING: "
                                   "unloaded, serving its live sessions until they end); gone once released.",
                                   ["model", "version", "state"], registry=r)
        self.model_events = Counter("cellstream_model_events",
                                    "Model version lifecycle events: loaded, refused (its file failed the checks), "
                                    "unloaded (draining begins), released (its onnxruntime sessions freed).",
                                    ["model", "version", "event"], registry=r)
        self._call_series: dict[str, CallSeries] = {}

    def call_series(self, method: str) -> CallSeries:
        """The request counter and duration histogram of one RPC method, bound once (labels() per call cost
        a lock and a dict lookup on every call of the hot path)."""
        series = self._call_series.get(method)
        if series is None:
            series = self._call_series[method] = CallSeries(self, method)
        return series

    def watch_store(self, count: Callable[[], int], state_bytes: Callable[[], int]) -> None:
        """Read the store's size at scrape time rather than tracking every change."""
        self.sessions_active.set_function(count)
        self.state_bytes.set_function(state_bytes)

    def serve_http(self, host: str, port: int) -> int:
        """Start /metrics on a daemon thread; returns the bound port (useful with port 0)."""
        self._http_server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http_server.server_address[1]

    def stop_http(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None


BULK_OBSERVE_FROM = 12  # measured crossover: numpy's fixed cost (~12 us) against ~1 us per observation


def observe(histogram: Histogram, value: float, times: int = 1) -> None:
    """`histogram.observe(value)`, `times` times, for a labelled child: its bucket found by bisection where
    the client scans them one by one (every call's duration is observed: this is on every call's path)."""
    histogram._buckets[bisect.bisect_left(histogram._upper_bounds, value)].inc(times)
    histogram._sum.inc(value * times)


def observe_many(histogram: Histogram, observations: Sequence[tuple[float, int]]) -> None:
    """`histogram.observe(value)`, `times` times, for every (value, times) of a labelled child.

    observe() takes a lock for the sum and for a bucket found by a linear scan: about 1-2 µs, which per
    step of a batch of hundreds is a large share of the server's CPU per step. This does what it does
    (a value lands in the first bucket whose upper bound is >= it) once per observation, or in bulk once
    per bucket; a batch's steps that waited together (a multiplexed message's) are one observation.
    """
    if len(observations) < BULK_OBSERVE_FROM:
        for value, times in observations:
            observe(histogram, value, times)
        return
    upper = histogram._upper_bounds  # the client's own fields: it has no bulk observe
    buckets = histogram._buckets
    values, times = np.array(observations, dtype=np.float64).T
    counts = np.bincount(np.searchsorted(upper, values, side="left"), weights=times, minlength=len(upper))
    for bucket, count in zip(buckets, counts.tolist(), strict=True):
        if count:
            bucket.inc(int(count))
    histogram._sum.inc(float(np.dot(values, times)))


class StepCounts(Collector):
    """`cellstream_model_version_steps_total`: each loaded version's batcher counts its steps in a plain int, read
    here at scrape time (a prometheus Counter would take a lock in every batch, on the hot path). A released
    version's series goes with it."""

    NAME = "cellstream_model_version_steps"
    HELP = "Session and stateless steps run, by model and version (while the version is loaded)."

    def __init__(self) -> None:
        self._sources: dict[tuple[str, str], Callable[[], int]] = {}

    def watch(self, model: str, version: int, steps: Callable[[], int]) -> None:
        self._sources[(model, str(version))] = steps

    def forget(self, model: str, version: int) -> None:
        self._sources.pop((model, str(version)), None)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.NAME, self.HELP, labels=["model", "version"])
        for labels, steps in list(self._sources.items()):
            family.add_metric(labels, steps())
        yield family


class CallSeries:
    """One method's series of `cellstream_requests_total` (by code) and its duration histogram."""

    def __init__(self, metrics: Metrics, method: str) -> None:
        self._requests = metrics.requests
        self._codes: dict[str, Counter] = {}
        self.method = method
        self.duration = metrics.request_latency.labels(method)

    def count(self, code: str) -> None:
        counter = self._codes.get(code)
        if counter is None:
            counter = self._codes[code] = self._requests.labels(self.method, code)
        counter.inc()

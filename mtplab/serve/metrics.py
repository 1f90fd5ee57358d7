"""What the server did, for operators: Prometheus metrics (`GET /metrics`) and one access-log line
per request.

Metrics (prometheus_client, one registry per app):

- `mtplab_requests_total{route, status}`: answered requests; `route` is the route's template
  (`/v1/models/{name}`, `other` for unknown paths), never the raw path
- `mtplab_http_requests_in_flight`, `mtplab_queue_depth` (waiting for a place in the batch),
  `mtplab_active_requests` (decoding now)
- `mtplab_generated_tokens_total`, `mtplab_decode_forwards_total`: their ratio is τ (tokens per
  forward) over any window; `mtplab_tau`: each finished request's τ
- `mtplab_time_to_first_token_seconds` (from the request's arrival), `mtplab_token_latency_seconds`
  (each later token: the time since the previous event over the tokens it brought)
- `mtplab_draft_proposed_total{position}`, `mtplab_draft_accepted_total{position}`: drafts
  verified and accepted at each draft position (0 = the first draft); their ratio is the
  acceptance by position

The access log (logger `mtplab.serve.access`, INFO) says: method, path, status, completion tokens,
seconds; never a body (prompt text) or a header (the key). Without prometheus_client installed
the server runs and `/metrics` is a 404 that says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

access_log = logging.getLogger("mtplab.serve.access")

ROUTES = frozenset({"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TAU_BUCKETS = (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 4, 6, 8)


def route_of(path: str) -> str:
    """A path's route template: few values, whatever the client sends."""
    if path in ROUTES:
        return path
    for prefix in ("/v1/models/", "/static/"):
        if path.startswith(prefix):
            return prefix + "{name}"
    return "other"


class Metrics:
    """The app's metrics; `worker()` gives the model worker (for the queue and batch gauges)."""

    def __init__(self, worker: Callable[[], object]):
        try:
            import prometheus_client as prom
        except ImportError:
            self.registry = None
            return
        r = self.registry = prom.CollectorRegistry()
        self.content_type = prom.CONTENT_TYPE_LATEST
        self._render = prom.generate_latest
        self.requests = prom.Counter("mtplab_requests", "HTTP requests answered, by route and status",
                                     ["route", "status"], registry=r)
        self.in_flight = prom.Gauge("mtplab_http_requests_in_flight", "HTTP requests being answered", registry=r)
        prom.Gauge("mtplab_queue_depth", "requests waiting for a place in the batch",
                   registry=r).set_function(lambda: len(worker().waiting))
        prom.Gauge("mtplab_active_requests", "requests decoding now",
                   registry=r).set_function(lambda: len(worker().active))
        self.tokens = prom.Counter("mtplab_generated_tokens", "completion tokens generated", registry=r)
        self.forwards = prom.Counter("mtplab_decode_forwards",
                                     "trunk forward passes (decode events); generated tokens / forwards = tau",
                                     registry=r)
        self.tau = prom.Histogram("mtplab_tau", "tokens per forward of each finished request",
                                  buckets=TAU_BUCKETS, registry=r)
        self.ttft = prom.Histogram("mtplab_time_to_first_token_seconds",
                                   "from a request's arrival to its first generated token",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.token_latency = prom.Histogram("mtplab_token_latency_seconds",
                                            "per generated token after the first", buckets=LATENCY_BUCKETS,
                                            registry=r)
        self.proposed = prom.Counter("mtplab_draft_proposed", "drafts verified, by draft position",
                                     ["position"], registry=r)
        self.accepted = prom.Counter("mtplab_draft_accepted", "drafts accepted, by draft position",
                                     ["position"], registry=r)

    def render(self) -> bytes | None:
        return None if self.registry is None else self._render(self.registry)

    def answered(self, method: str, path: str, status: int, tokens: int, seconds: float) -> None:
        if self.registry is not None:
            self.requests.labels(route_of(path), str(status)).inc()
        shown = ascii(path[:200])[1:-1]  # no control characters or surrogates in the log
        access_log.info("%s %s %d tokens=%d %.3fs", method, shown, status, tokens, seconds)

    def watch(self, arrived: float) -> Watch:
        return Watch(self, arrived)


class Watch:
    """One generation's pieces as they reach its client -> tokens, latencies, τ, acceptance."""

    def __init__(self, metrics: Metrics, arrived: float):
        self.metrics, self.arrived = metrics, arrived
        self.tokens = 0
        self.last: float | None = None  # when the previous event with tokens came
        self.piece = None

    def saw(self, piece) -> None:
        self.piece = piece
        n = len(piece.tokens)
        if not n:
            return
        now = time.perf_counter()
        self.tokens += n
        m = self.metrics
        if m.registry is not None:
            m.tokens.inc(n)
            m.forwards.inc()
            if self.last is None:
                m.ttft.observe(now - self.arrived)
            else:
                for _ in range(n):
                    m.token_latency.observe((now - self.last) / n)
        self.last = now

    def end(self) -> None:
        """The request is over (finished, stopped or failed): its speculation figures."""
        m, piece = self.metrics, self.piece
        if m.registry is None or piece is None:
            return
        if piece.finish_reason:
            m.tau.observe(piece.tau)
        stats = piece.stats
        for i, (p, a) in enumerate(zip(stats.proposed, stats.accepted)):
            if p:
                m.proposed.labels(str(i)).inc(p)
                m.accepted.labels(str(i)).inc(a)
        self.piece = None  # counted once

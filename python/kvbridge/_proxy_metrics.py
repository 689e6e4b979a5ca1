"""The proxy's Prometheus metrics (``GET /metrics``), in a registry of its own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvbridge._proxy_pool import Pool

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ProxyMetrics:
    """Counters and histograms the request path updates; gauges read from the pools."""

    def __init__(self, pools: list[Pool]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvbridge_proxy_requests", "Client requests, by route and outcome (ok, error, fallback)",
                                ["route", "outcome"], registry=r)  # fmt: skip
        self.upstream = Counter("kvbridge_proxy_upstream_requests", "Requests sent upstream, by role, server and outcome",
                                ["role", "backend", "outcome"], registry=r)  # fmt: skip
        self.retries = Counter("kvbridge_proxy_prefill_retries", "Prefills retried on another prefill server", registry=r)
        self.fallbacks = Counter("kvbridge_proxy_local_prefill_fallbacks",
                                 "Requests a decode server prefilled itself (no prefill server answered)", registry=r)  # fmt: skip
        self.ejections = Counter("kvbridge_proxy_ejections", "Servers ejected, by role", ["role"], registry=r)
        self.latency = Histogram("kvbridge_proxy_request_seconds", "Client request time to the response headers, by route",
                                 ["route"], buckets=_BUCKETS, registry=r)  # fmt: skip
        self.prefill = Histogram("kvbridge_proxy_prefill_seconds", "Prefill leg time (successful prefills)",
                                 buckets=_BUCKETS, registry=r)  # fmt: skip
        healthy = Gauge("kvbridge_proxy_backend_healthy", "1 if the server takes requests (not ejected)", ["role", "backend"], registry=r)
        busy = Gauge("kvbridge_proxy_backend_outstanding", "Requests in flight to the server", ["role", "backend"], registry=r)
        for pool in pools:
            for b in pool.backends:
                healthy.labels(pool.role, b.url).set_function(lambda b=b: 1.0 if b.healthy else 0.0)
                busy.labels(pool.role, b.url).set_function(lambda b=b: float(b.outstanding))

    def render(self) -> bytes:
        return generate_latest(self.registry)

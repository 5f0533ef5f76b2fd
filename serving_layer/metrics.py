"""Prometheus metrics of the service, kept with ``prometheus_client`` in a registry of their own
and written in the Prometheus text format by ``GET /metrics``: requests and errors by route and
status, request latency histograms, predictions by policy, and values read at scrape time (the
loaded model versions, reloads, the prediction log).

Each :class:`ServiceMetrics` has its own registry, not the process-wide default, so that several
services in one process (tests) count apart.

>>> metrics = ServiceMetrics()
>>> metrics.observe_request("GET", "/health", 200, 0.002)
>>> 'lambda_ml_http_requests_total{method="GET",route="/health",status="200"} 1.0' in metrics.render([])
True
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

# Latency buckets in seconds: fine around the milliseconds a prediction takes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_LATEST

# A value read at scrape time: (metric name, help, labels, value).
ScrapeValue = tuple[str, str, dict[str, str], float]


class ServiceMetrics:
    """Counters and histograms, updated from request threads (prometheus_client's metrics are
    thread-safe)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "lambda_ml_http_requests_total", "HTTP requests by method, route and status.",
            ["method", "route", "status"], registry=self.registry,
        )  # fmt: skip
        self.errors = Counter(
            "lambda_ml_http_errors_total", "HTTP requests answered with a 5xx, by route.", ["route"], registry=self.registry
        )
        self.latency = Histogram(
            "lambda_ml_http_request_duration_seconds", "Request latency by route.", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.predictions = Counter(
            "lambda_ml_predictions_total", "Rows scored, by policy and the versions that answered.",
            ["policy", "versions"], registry=self.registry,
        )  # fmt: skip

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method=method, route=route, status=str(status)).inc()
        errors = self.errors.labels(route=route)  # every route seen shows its count, 0 included
        if status >= 500:
            errors.inc()
        self.latency.labels(route=route).observe(seconds)

    def observe_predictions(self, policy: str, versions: Iterable[int], rows: int) -> None:
        self.predictions.labels(policy=policy, versions=",".join(str(v) for v in versions) or "prior").inc(rows)

    def render(self, gauges: Iterable[ScrapeValue]) -> str:
        """The exposition text of the registry and of ``gauges``, values read at scrape time
        (a name ending in ``_total`` is a counter, any other a gauge)."""
        return generate_latest(_Scrape(self.registry, gauges)).decode()


class _Scrape:
    """The service's registry plus the values read for one scrape, as one collector."""

    def __init__(self, registry: CollectorRegistry, values: Iterable[ScrapeValue]) -> None:
        self.registry = registry
        self.values = list(values)

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()
        by_name: dict[str, list[ScrapeValue]] = defaultdict(list)
        for value in self.values:
            by_name[value[0]].append(value)
        for name, samples in by_name.items():
            help_text, label_names = samples[0][1], list(samples[0][2])
            family: CounterMetricFamily | GaugeMetricFamily
            if name.endswith("_total"):
                family = CounterMetricFamily(name, help_text, labels=label_names)
            else:
                family = GaugeMetricFamily(name, help_text, labels=label_names)
            for _, _, labels, number in samples:
                family.add_metric([labels[k] for k in label_names], number)
            yield family

"""Prometheus metrics of the service, kept in process and written in the text exposition
format (version 0.0.4) by ``GET /metrics``: requests and errors by route and status, request
latency histograms, predictions by policy, and the loaded model versions."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable

# Latency buckets in seconds: fine around the milliseconds a prediction takes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(**labels: str) -> str:
    """``{a="x",b="y"}`` with Prometheus escaping.

    >>> _labels(route="/predict", status="200")
    '{route="/predict",status="200"}'
    """
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels.items())
    return "{" + ",".join(escaped) + "}"


class ServiceMetrics:
    """Counters and histograms, updated from request threads under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)  # (method, route, status)
        self.latency_counts: dict[str, list[int]] = {}  # route -> count per bucket (+Inf last)
        self.latency_sums: dict[str, float] = defaultdict(float)
        self.predictions: dict[tuple[str, str], int] = defaultdict(int)  # (policy, versions) -> rows

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, route, str(status))] += 1
            counts = self.latency_counts.setdefault(route, [0] * (len(LATENCY_BUCKETS) + 1))
            counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sums[route] += seconds

    def observe_predictions(self, policy: str, versions: Iterable[int], rows: int) -> None:
        key = (policy, ",".join(str(v) for v in versions) or "prior")
        with self._lock:
            self.predictions[key] += rows

    def render(self, gauges: Iterable[tuple[str, str, dict[str, str], float]]) -> str:
        """The exposition text; ``gauges`` are (name, help, labels, value) read at scrape time."""
        lines: list[str] = []
        with self._lock:
            lines += ["# HELP lambda_ml_http_requests_total HTTP requests by method, route and status.",
                      "# TYPE lambda_ml_http_requests_total counter"]  # fmt: skip
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f"lambda_ml_http_requests_total{_labels(method=method, route=route, status=status)} {n}")
            lines += ["# HELP lambda_ml_http_errors_total HTTP requests answered with a 5xx, by route.",
                      "# TYPE lambda_ml_http_errors_total counter"]  # fmt: skip
            errors: dict[str, int] = defaultdict(int)
            for (_, route, status), n in self.requests.items():
                errors[route] += n if status.startswith("5") else 0
            for route, n in sorted(errors.items()):
                lines.append(f"lambda_ml_http_errors_total{_labels(route=route)} {n}")
            lines += ["# HELP lambda_ml_http_request_duration_seconds Request latency by route.",
                      "# TYPE lambda_ml_http_request_duration_seconds histogram"]  # fmt: skip
            for route, counts in sorted(self.latency_counts.items()):
                cumulative = 0
                for bound, n in zip([*LATENCY_BUCKETS, "+Inf"], counts, strict=True):
                    cumulative += n
                    labels = _labels(route=route, le=str(bound))
                    lines.append(f"lambda_ml_http_request_duration_seconds_bucket{labels} {cumulative}")
                lines.append(f"lambda_ml_http_request_duration_seconds_sum{_labels(route=route)} {self.latency_sums[route]:.6f}")
                lines.append(f"lambda_ml_http_request_duration_seconds_count{_labels(route=route)} {cumulative}")
            lines += ["# HELP lambda_ml_predictions_total Rows scored, by policy and the versions that answered.",
                      "# TYPE lambda_ml_predictions_total counter"]  # fmt: skip
            for (policy, versions), n in sorted(self.predictions.items()):
                lines.append(f"lambda_ml_predictions_total{_labels(policy=policy, versions=versions)} {n}")
        by_name: dict[str, list[tuple[str, dict[str, str], float]]] = defaultdict(list)
        for name, help_text, labels, value in gauges:
            by_name[name].append((help_text, labels, value))
        for name, samples in by_name.items():
            lines += [f"# HELP {name} {samples[0][0]}", f"# TYPE {name} gauge"]
            lines += [f"{name}{_labels(**labels) if labels else ''} {value:g}" for _, labels, value in samples]
        return "\n".join(lines) + "\n"

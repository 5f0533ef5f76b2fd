"""Observability of the speed layer: a ``StreamingQueryListener`` turning each micro-batch's
progress into metrics (rows/s, batch duration, state size, Kafka lag per partition), written to
the log and, with ``speed.report_to_mlflow``, as step metrics (step = micro-batch id) of one
MLflow run per application start (tag ``layer=speed``) in the experiment ``<mlflow.experiment>-speed``. An MLflow outage costs metrics, never
the stream: failures to report are logged and skipped.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from typing import Any

from pyspark.sql.streaming import StreamingQueryListener

from lambda_ml.config import PlatformConfig

log = logging.getLogger(__name__)

# After a failed report, seconds without trying MLflow again (its client retries at length).
OUTAGE_PAUSE_S = 60


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN: Spark's "no rate yet"


def kafka_offsets(text: Any) -> dict[tuple[str, str], int]:
    """``{"topic": {"0": 12}}`` (a Kafka source offset, as JSON text or parsed) -> {(topic, partition): offset}."""
    if isinstance(text, str):
        try:
            text = json.loads(text)
        except ValueError:
            return {}
    if not isinstance(text, dict):
        return {}
    return {
        (topic, str(partition)): int(offset)
        for topic, partitions in text.items() if isinstance(partitions, dict)
        for partition, offset in partitions.items() if isinstance(offset, int)
    }  # fmt: skip


def progress_metrics(progress: dict[str, Any]) -> dict[str, float]:
    """One micro-batch's progress (``StreamingQueryProgress`` as JSON) -> flat metrics, named
    ``<query>.<metric>``: ``input_rows``, ``input_rows_per_s``, ``processed_rows_per_s``,
    ``batch_duration_ms``, ``state_rows``, ``state_memory_bytes`` and, for Kafka sources,
    ``kafka_lag.<topic>.<partition>`` (latest offset - offset read up to) and ``kafka_lag``.

    >>> m = progress_metrics({"name": "ingest", "numInputRows": 5, "inputRowsPerSecond": "NaN",
    ...     "durationMs": {"triggerExecution": 120}, "stateOperators": [{"numRowsTotal": 3, "memoryUsedBytes": 10}],
    ...     "sources": [{"endOffset": {"t": {"0": 7}}, "latestOffset": {"t": {"0": 9}}}]})
    >>> m["ingest.input_rows"], m["ingest.batch_duration_ms"], m["ingest.state_rows"], m["ingest.kafka_lag.t.0"]
    (5.0, 120.0, 3.0, 2.0)
    >>> "ingest.input_rows_per_s" in m
    False
    """
    name = progress.get("name") or progress.get("id") or "query"
    raw: dict[str, float | None] = {
        "input_rows": _number(progress.get("numInputRows")),
        "input_rows_per_s": _number(progress.get("inputRowsPerSecond")),
        "processed_rows_per_s": _number(progress.get("processedRowsPerSecond")),
        "batch_duration_ms": _number((progress.get("durationMs") or {}).get("triggerExecution")),
    }
    operators = progress.get("stateOperators") or []
    if operators:
        raw["state_rows"] = sum(_number(op.get("numRowsTotal")) or 0.0 for op in operators)
        raw["state_memory_bytes"] = sum(_number(op.get("memoryUsedBytes")) or 0.0 for op in operators)
    lags: dict[tuple[str, str], int] = {}
    for source in progress.get("sources") or []:
        latest, read = kafka_offsets(source.get("latestOffset")), kafka_offsets(source.get("endOffset"))
        for key, offset in latest.items():
            if key in read:
                lags[key] = max(0, offset - read[key])
    for (topic, partition), lag in sorted(lags.items()):
        raw[f"kafka_lag.{topic}.{partition}"] = float(lag)
    if lags:
        raw["kafka_lag"] = float(sum(lags.values()))
    return {f"{name}.{key}": value for key, value in raw.items() if value is not None}


def metrics_experiment(cfg: PlatformConfig) -> str:
    """The MLflow experiment of the speed layer's metrics: beside the batch runs', not among them.

    >>> from lambda_ml.config import load_config
    >>> metrics_experiment(load_config())
    'ctr-speed'
    """
    return f"{cfg.mlflow.experiment}-speed"


class ProgressReporter(StreamingQueryListener):
    """Logs every micro-batch's metrics and sends them to MLflow (best effort)."""

    def __init__(self, cfg: PlatformConfig, run_name: str = "speed-layer") -> None:
        self.cfg = cfg
        self.run_id: str | None = None
        self._client: Any = None
        self._pause_until = 0.0
        self._reported: dict[str, int] = {}  # query id -> latest micro-batch whose progress was handled
        if cfg.speed.report_to_mlflow:
            self._start_run(run_name)

    def _reachable(self) -> bool:
        # A quick look first: the MLflow client retries for minutes against a server that is down.
        try:
            with urllib.request.urlopen(f"{self.cfg.mlflow.tracking_uri.rstrip('/')}/health", timeout=2):
                return True
        except (OSError, ValueError):
            return False

    def _start_run(self, run_name: str) -> None:
        if not self._reachable():
            log.warning("MLflow is not answering at %s: speed-layer metrics go to the log only", self.cfg.mlflow.tracking_uri)
            return
        try:
            from mlflow import MlflowClient

            client = MlflowClient(self.cfg.mlflow.tracking_uri)
            name = metrics_experiment(self.cfg)
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            run = client.create_run(experiment_id, run_name=run_name, tags={"layer": "speed"})
            self._client, self.run_id = client, run.info.run_id
            log.info("speed-layer metrics go to MLflow run %s", self.run_id)
        except Exception as exc:  # an MLflow outage must not stop the stream
            log.warning("MLflow unreachable (%s): speed-layer metrics go to the log only", exc)

    def onQueryStarted(self, event: Any) -> None:
        log.info("query %s started (id %s)", event.name, event.id)

    def onQueryProgress(self, event: Any) -> None:
        progress = json.loads(event.progress.json)
        try:
            self._report(progress)
        finally:
            query_id, batch = str(progress.get("id")), int(progress.get("batchId") or 0)
            self._reported[query_id] = max(batch, self._reported.get(query_id, -1))

    def _report(self, progress: dict[str, Any]) -> None:
        metrics = progress_metrics(progress)
        log.info("progress of micro-batch %s: %s", progress.get("batchId"), ", ".join(f"{k}={v:g}" for k, v in metrics.items()))
        if self._client is None or self.run_id is None or time.monotonic() < self._pause_until:
            return
        try:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            step = int(progress.get("batchId") or 0)
            self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
        except Exception as exc:
            self._pause_until = time.monotonic() + OUTAGE_PAUSE_S
            log.warning("could not send speed-layer metrics to MLflow (%s); trying again in %d s", exc, OUTAGE_PAUSE_S)

    def onQueryIdle(self, event: Any) -> None:
        pass

    def onQueryTerminated(self, event: Any) -> None:
        log.info("query %s terminated%s", event.id, f": {event.exception}" if event.exception else "")

    def drain(self, queries: Any, timeout_s: float = 30.0) -> None:
        """Wait until the progress of each query's last micro-batch has been handled: Spark
        delivers progress events to listeners asynchronously, and a listener removed as soon as
        its queries stop would miss the last ones."""
        deadline = time.monotonic() + timeout_s
        for query in queries:
            last = query.lastProgress
            if last is None:
                continue
            query_id, batch = str(last.get("id")), int(last.get("batchId") or 0)
            while self._reported.get(query_id, -1) < batch and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._reported.get(query_id, -1) < batch:
                log.warning("progress of micro-batch %d of query %s was not reported in time", batch, query_id)

    def close(self) -> None:
        """End the MLflow run (the application is stopping)."""
        if self._client is not None and self.run_id is not None:
            try:
                self._client.set_terminated(self.run_id)
            except Exception as exc:
                log.warning("could not end MLflow run %s: %s", self.run_id, exc)

"""Speed-layer observability: per-micro-batch metrics from a StreamingQueryListener in MLflow
(real broker, Spark, Delta and MLflow)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pyspark.sql import SparkSession
from support import isolated

from lambda_ml import producer
from lambda_ml_cli import stack
from lambda_ml_apps.ctr import generator
from lambda_ml.config import PlatformConfig
from speed_layer import app
from speed_layer.monitor import metrics_experiment, progress_metrics

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def test_progress_metrics_reads_rates_state_and_lag_per_partition() -> None:
    progress = {
        "name": "labels",
        "numInputRows": 40,
        "inputRowsPerSecond": 20.0,
        "processedRowsPerSecond": 80.0,
        "durationMs": {"triggerExecution": 500, "addBatch": 400},
        "stateOperators": [{"numRowsTotal": 10, "memoryUsedBytes": 100}, {"numRowsTotal": 5, "memoryUsedBytes": 50}],
        "sources": [
            {"endOffset": '{"imp":{"0":10,"1":20}}', "latestOffset": '{"imp":{"0":15,"1":20}}'},
            {"endOffset": {"clk": {"0": 3}}, "latestOffset": None},
        ],
    }
    assert progress_metrics(progress) == {
        "labels.input_rows": 40.0,
        "labels.input_rows_per_s": 20.0,
        "labels.processed_rows_per_s": 80.0,
        "labels.batch_duration_ms": 500.0,
        "labels.state_rows": 15.0,
        "labels.state_memory_bytes": 150.0,
        "labels.kafka_lag.imp.0": 5.0,
        "labels.kafka_lag.imp.1": 0.0,
        "labels.kafka_lag": 5.0,
    }


@pytest.mark.integration
def test_every_micro_batch_reports_its_metrics_to_mlflow(running_stack: PlatformConfig, spark: SparkSession, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    cfg = isolated(running_stack, "ctr-speed-monitor", lake_root=tmp_path / "lake", topic_prefix="monitor")
    # Small micro-batches: several progress reports for the records below.
    cfg = cfg.model_copy(update={"speed": cfg.speed.model_copy(update={"max_offsets_per_trigger": 150})})
    stack.create_topics(cfg)
    records, _ = generator.generate(cfg.generator.model_copy(update={"impressions": 400, "seed": 9}), timedelta(minutes=30), NOW)
    producer.produce(cfg, records, progress=False)

    app.run(cfg, ["ingest"], available_now=True)

    client = MlflowClient(cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(metrics_experiment(cfg))
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], "tags.layer = 'speed'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "ingest.input_rows")
    assert len(history) >= 2  # several micro-batches, one step each
    assert sum(m.value for m in history) == len(records)
    assert len({m.step for m in history}) == len(history)
    lag = sorted(client.get_metric_history(runs[0].info.run_id, "ingest.kafka_lag"), key=lambda m: m.step)
    assert lag and lag[-1].value == 0  # drained
    assert all(m.value > 0 for m in client.get_metric_history(runs[0].info.run_id, "ingest.batch_duration_ms"))

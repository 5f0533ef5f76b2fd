"""The thin slice end to end, every step real: Kafka -> spark-submit ingest -> bronze Delta ->
spark-submit training -> MLflow registry -> ONNX -> the prediction service over HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import SparkSession

from lambda_ml import contract, producer
from lambda_ml_cli import stack
from lambda_ml_apps.ctr import generator
from lambda_ml.config import PlatformConfig, write_config
from lambda_ml_cli.submit import run_submit
from support import isolated


def _post(url: str, payload: object) -> tuple[int, dict]:  # type: ignore[type-arg]
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.integration
@pytest.mark.slow
def test_one_event_travels_the_whole_way(running_stack: PlatformConfig, spark: SparkSession, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    cfg = isolated(running_stack, "ctr-e2e", lake_root=tmp_path / "lake", topic_prefix="e2e")
    config_file = str(write_config(cfg, tmp_path / "platform.yaml"))
    stack.create_topics(cfg)
    now = datetime.now(UTC) - timedelta(minutes=1)
    gen = cfg.generator.model_copy(update={"impressions": 6000, "seed": 11})
    records, truth = generator.generate(gen, timedelta(minutes=cfg.ctr.attribution_window_minutes), now)
    producer.produce(cfg, records, progress=False)

    assert run_submit(cfg, "speed_layer/ingest.py", ["--config", config_file, "--available-now"]) == 0
    impressions = spark.read.format("delta").load(cfg.lake.table("bronze", "impressions"))
    clicks = spark.read.format("delta").load(cfg.lake.table("bronze", "clicks"))
    assert impressions.count() == truth.impressions
    assert clicks.count() == truth.clicks_sent
    assert spark.read.format("delta").load(cfg.lake.table("quarantine")).count() == truth.malformed_total

    assert run_submit(cfg, "batch_layer/train.py", ["--config", config_file]) == 0
    client = MlflowClient(cfg.mlflow.tracking_uri)
    champion = client.get_model_version_by_alias(cfg.mlflow.registered_model, "champion")
    assert champion.tags[contract.TAG_FLAVOR] == "onnx"
    latest = {
        name: spark.sql(f"DESCRIBE HISTORY delta.`{cfg.lake.table('bronze', name)}`").agg({"version": "max"}).first()[0]
        for name in ("impressions", "clicks")
    }
    assert champion.tags[contract.horizon_tag("impressions")] == str(latest["impressions"])
    assert champion.tags[contract.horizon_tag("clicks")] == str(latest["clicks"])
    spark_twin = client.get_model_version(cfg.mlflow.registered_model, champion.tags[contract.TAG_SPARK_VERSION])
    assert spark_twin.tags[contract.TAG_FLAVOR] == "spark"
    auc = client.get_run(champion.run_id).data.metrics["auc"]
    assert auc > 0.6  # the generator's click model is learnable from these features

    service = stack.ServingProcess(cfg)
    service.start(config_file)
    try:
        rows = [
            {"user_id": "u1", "item_id": "i1", "device": "mobile", "position": 1},
            {"user_id": "u1", "item_id": "i1", "device": "mobile", "position": 5},
            {"user_id": "nobody", "item_id": "nothing", "device": "tablet", "position": 2},
        ]
        status, body = _post(f"{service.url}/predict", {"rows": rows})
        assert status == 200, body
        probabilities = np.array([p["probability"] for p in body["predictions"]])
        assert np.all((probabilities > 0) & (probabilities < 1))
        # Lower slots are clicked less in the generator, and the model learned it.
        assert probabilities[0] > probabilities[1]
        assert str(body["model"]["version"]) == str(champion.version)
        # Scored on the declared window features, read off the batch views at the time of the
        # request: a user and an item the lake has never seen have empty windows.
        inputs = contract.model_inputs(cfg.features)
        assert [list(p["features"]) for p in body["predictions"]] == [list(inputs.names)] * 3
        stranger = body["predictions"][2]["features"]
        assert all(stranger[name] == 0 for name in inputs.numeric if "_impressions_" in name or "_clicks_" in name)
        assert stranger["user_ctr_7d"] == stranger["item_ctr_7d"] == 1 / 21  # the prior
        assert body["predictions"][0]["features"]["item_impressions_7d"] > 0  # i1 was shown in the generated data

        status, body = _post(f"{service.url}/predict", {"user_id": "u1", "item_id": "i1", "device": "mobile", "position": "top"})
        assert 400 <= status < 500
        assert "position" in json.dumps(body)
    finally:
        service.stop()

"""``lambda-ml demo``: one event's whole journey on the embedded stack, with a summary.

Kafka -> speed layer (ingest, labels, feature increments) -> Delta lake -> batch training ->
MLflow registry -> ONNX -> the speed layer's online model, warm-started from the new champion ->
serving (champion and online model).
The stack and the service stay up afterwards; ``make stop`` (``lambda-ml stack down``) stops them.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Callable
from typing import TypeVar

from lambda_ml import generator, jvm, stack
from lambda_ml.config import PlatformConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


def _step(number: int, total: int, title: str, action: Callable[[], T]) -> T:
    log.info("[%d/%d] %s ...", number, total, title)
    started = time.monotonic()
    result = action()
    log.info("[%d/%d] %s: done in %.1f s", number, total, title, time.monotonic() - started)
    return result


def _post_json(url: str, payload: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


def _lake_counts(cfg: PlatformConfig) -> dict[str, int]:
    from lambda_ml.spark import get_spark
    from speed_layer.ingest import table_paths

    spark = get_spark(cfg, "demo")
    return {name: spark.read.format("delta").load(path).count() for name, path in table_paths(cfg).items()}


def _train(cfg: PlatformConfig):  # type: ignore[no-untyped-def]
    from batch_layer import train
    from lambda_ml.spark import get_spark

    return train.run(get_spark(cfg, "demo"), cfg)


def _online_summary(cfg: PlatformConfig) -> str:
    from lambda_ml.spark import get_spark
    from speed_layer.online import load_state

    state = load_state(get_spark(cfg, "demo"), cfg)
    if state is None:
        return "no labelled impressions to learn from yet"
    model = state.model
    auc = "not measured yet" if state.auc is None else f"{state.auc:.4f}"
    return f"{model.updates} update(s) since champion v{model.base_version} ({model.generation}), last progressive AUC {auc}"


def run(cfg: PlatformConfig, impressions: int | None = None) -> int:
    """Run the demo end to end and print a summary; return the process exit code."""
    from speed_layer import app

    if impressions is not None:
        cfg = cfg.model_copy(update={"generator": cfg.generator.model_copy(update={"impressions": impressions})})
    started = time.monotonic()
    steps = 8
    _step(1, steps, "resolve JVM jars", lambda: jvm.resolve_all(cfg))
    _step(2, steps, "start Kafka broker and MLflow server", lambda: stack.up(cfg))
    truth = _step(3, steps, "generate events to Kafka", lambda: generator.run(cfg))
    _step(
        4, steps, "speed layer: ingest Kafka into bronze, labels, feature increments",
        lambda: app.run(cfg, ["ingest", "labels", "increments"], available_now=True),
    )  # fmt: skip
    counts = _lake_counts(cfg)
    result = _step(5, steps, "batch layer: label, featurise, train, export ONNX, register", lambda: _train(cfg))
    _step(6, steps, "speed layer: online model from the new champion", lambda: app.run(cfg, ["online"], available_now=True))
    online = _online_summary(cfg)
    service = stack.ServingProcess(cfg)
    _step(7, steps, "serving layer: start the prediction service", lambda: service.start(cfg.source))
    example = {"user_id": "u1", "item_id": "i1", "device": "mobile", "position": 1}
    answer = _step(8, steps, "ask for one prediction", lambda: _post_json(f"{service.url}/predict", example))

    print(
        "\n".join(
            [
                "",
                "=== lambda-ml demo summary ===",
                f"events sent this run:     {truth.impressions} impressions, {truth.clicks_sent} clicks, "
                f"{truth.malformed_total} malformed",
                f"bronze (all runs):        {counts['impressions']} impressions, {counts['clicks']} clicks",
                f"quarantined (all runs):   {counts['quarantine']} records, each with its reason",
                f"model:                    {cfg.mlflow.registered_model} version {result.versions.onnx} (ONNX, "
                f"{'already registered for this horizon' if result.reused else 'alias ' + result.decision}), "
                f"Spark twin version {result.versions.spark}",
                f"quality gate:             {result.reason or 'no decision recorded'}",
                f"holdout:                  AUC {result.auc:.4f}, log loss {result.log_loss:.4f} on "
                f"{result.rows.get('holdout', 0)} impressions ({result.rows.get('train', 0)} trained on)",
                f"horizon:                  {result.horizon}",
                f"online model:             {online}",
                f"one prediction:           POST {service.url}/predict {json.dumps(example)}",
                f"                          -> {json.dumps(answer)}",
                f"MLflow UI:                {cfg.mlflow.tracking_uri}",
                f"prediction service:       {service.url}/docs",
                f"prediction log:           Kafka topic {cfg.kafka.topics.predictions.name}"
                + ("" if cfg.serving.prediction_log.enabled else " (off: serving.prediction_log.enabled)")
                + "; `lambda-ml batch evaluate` joins it with later clicks (live AUC per version in MLflow)",
                f"total time:               {time.monotonic() - started:.0f} s",
                "The stack is still running; stop it with `make stop` (lambda-ml stack down).",
            ]
        )
    )
    return 0

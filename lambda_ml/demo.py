"""``lambda-ml demo``: one event's whole journey on the embedded stack, with a summary.

Kafka -> speed layer (ingest, labels, feature increments) -> Delta lake -> batch training ->
MLflow registry -> ONNX -> the speed layer running continuously (its online model warm-started
from the new champion) -> serving (champion and online model, batch views merged with the speed
layer's increments), then fresh events followed until serving counts them.
The stack, the speed layer and the service stay up afterwards; ``make stop`` (``lambda-ml stack
down``) stops them.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from lambda_ml import contract, generator, jvm, stack
from lambda_ml.config import PlatformConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


def _step(number: int, total: int, title: str, action: Callable[[], T]) -> T:
    log.info("[%d/%d] %s ...", number, total, title)
    started = time.monotonic()
    result = action()
    log.info("[%d/%d] %s: done in %.1f s", number, total, title, time.monotonic() - started)
    return result


def _json(url: str, payload: dict[str, object] | None = None) -> dict[str, Any]:
    """GET ``url`` (or POST ``payload`` to it as JSON) and return the JSON answer."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={} if data is None else {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


FRESH_USER, FRESH_IMPRESSIONS = "u1", 5


def follow_fresh_events(cfg: PlatformConfig, service_url: str, timeout_s: float = 300) -> str:
    """Send ``FRESH_IMPRESSIONS`` new impressions of user ``FRESH_USER`` (event time now) and
    wait until the service's merged features count them (batch view ⊕ the running speed layer's
    increments); say how long that took."""
    feature = contract.window_feature_name("user", "impressions", cfg.features.windows[0])
    sent_at = datetime.now(UTC)
    # One instant for every read: the window does not move while we wait.
    at = urllib.parse.quote((sent_at + timedelta(seconds=1)).isoformat())
    url = f"{service_url}/features/user/{FRESH_USER}?at={at}"
    before = float(_json(url)["merged"]["features"][feature])
    records = [
        generator.Record("impressions", FRESH_USER.encode(), json.dumps({
            "event_id": f"demo-{uuid.uuid4().hex}", "event_time": generator.iso(sent_at), "user_id": FRESH_USER,
            "item_id": "i1", "device": "mobile", "position": 1,
        }).encode())  # fmt: skip
        for _ in range(FRESH_IMPRESSIONS)
    ]
    started = time.monotonic()
    generator.produce(cfg, records, progress=False)
    while time.monotonic() - started < timeout_s:
        now = float(_json(url)["merged"]["features"][feature])
        if now >= before + FRESH_IMPRESSIONS:
            return (
                f"{FRESH_IMPRESSIONS} new impressions of {FRESH_USER} counted by serving after "
                f"{time.monotonic() - started:.0f} s ({feature}: {before:g} -> {now:g})"
            )
        time.sleep(1)
    return f"{FRESH_IMPRESSIONS} new impressions of {FRESH_USER} not counted by serving within {timeout_s:.0f} s"


def _wait_for_online_model(cfg: PlatformConfig, timeout_s: float = 300) -> str:
    """The online model's summary once the running speed layer has saved a step from the
    current champion (a step of an earlier run's champion does not count)."""
    from lambda_ml_apps.ctr.online import champion_version

    champion = champion_version(cfg)
    deadline = time.monotonic() + timeout_s
    while (summary := _online_summary(cfg, champion)) is None and time.monotonic() < deadline:
        time.sleep(5)
    return summary or f"no step from champion v{champion} saved within {timeout_s:.0f} s (see the speed layer's log)"


def _lake_counts(cfg: PlatformConfig) -> dict[str, int]:
    from lambda_ml.spark import get_spark
    from speed_layer.ingest import table_paths

    spark = get_spark(cfg, "demo")
    return {name: spark.read.format("delta").load(path).count() for name, path in table_paths(cfg).items()}


def _train(cfg: PlatformConfig):  # type: ignore[no-untyped-def]
    from batch_layer import train
    from lambda_ml.spark import get_spark

    return train.run(get_spark(cfg, "demo"), cfg)


def _online_summary(cfg: PlatformConfig, champion: int | None) -> str | None:
    """The online model's last saved step, if it learned from version ``champion``."""
    from lambda_ml.spark import get_spark
    from lambda_ml_apps.ctr.online_state import load_state

    state = load_state(get_spark(cfg, "demo"), cfg)
    if state is None or state.champion_version != champion:
        return None
    model = state.model
    auc = "not measured yet" if state.auc is None else f"{state.auc:.4f}"
    return f"{model.updates} update(s) since champion v{model.base_version} ({model.generation}), progressive AUC {auc}"


def run(cfg: PlatformConfig, impressions: int | None = None) -> int:
    """Run the demo end to end and print a summary; return the process exit code."""
    from speed_layer import app

    if impressions is not None:
        cfg = cfg.model_copy(update={"generator": cfg.generator.model_copy(update={"impressions": impressions})})
    started = time.monotonic()
    steps = 9
    _step(1, steps, "resolve JVM jars", lambda: jvm.resolve_all(cfg))
    _step(2, steps, "start Kafka broker and MLflow server", lambda: stack.up(cfg))
    speed = stack.SpeedProcess(cfg)
    if speed.stop():  # its queries share the checkpoints the drain below uses
        log.info("stopped the speed layer an earlier demo left running; it starts again after training")
    truth = _step(3, steps, "generate events to Kafka", lambda: generator.run(cfg))
    _step(
        4, steps, "speed layer: ingest Kafka into bronze, labels, feature increments",
        lambda: app.run(cfg, ["ingest", "labels", "increments"], available_now=True),
    )  # fmt: skip
    counts = _lake_counts(cfg)
    result = _step(5, steps, "batch layer: label, featurise, train, export ONNX, register", lambda: _train(cfg))
    # From here on the speed layer runs continuously, its online model learning from the champion.
    queries = list(dict.fromkeys([*cfg.speed.queries, "online"]))  # online even if the config leaves it out
    speed_pid = _step(6, steps, f"speed layer: run continuously ({', '.join(queries)})", lambda: speed.start(cfg.source, queries))
    online = _wait_for_online_model(cfg)
    service = stack.ServingProcess(cfg)
    _step(7, steps, "serving layer: start the prediction service", lambda: service.start(cfg.source))
    fresh = _step(8, steps, "fresh events: send some and wait until serving counts them", lambda: follow_fresh_events(cfg, service.url))
    example = {"user_id": FRESH_USER, "item_id": "i1", "device": "mobile", "position": 1}
    answer = _step(9, steps, "ask for one prediction", lambda: _json(f"{service.url}/predict", example))

    print(
        "\n".join(
            [
                "",
                "=== lambda-ml demo summary ===",
                f"events sent this run:     {truth.impressions} impressions, {truth.clicks_sent} clicks, "
                f"{truth.malformed_total} malformed",
                f"bronze (all runs):        {counts['impressions']} impressions, {counts['clicks']} clicks",
                f"quarantined (all runs):   {counts['quarantine']} records, each with its reason",
                f"model:                    {cfg.mlflow.registered_model} version {result.versions.served} (ONNX, "
                f"{'already registered for this horizon' if result.reused else 'alias ' + result.decision}), "
                f"Spark twin version {result.versions.others.get('spark', '?')}",
                f"quality gate:             {result.reason or 'no decision recorded'}",
                f"holdout:                  AUC {result.quality.value:.4f}, log loss {result.metrics.get('log_loss', float('nan')):.4f} on "
                f"{result.rows.get('holdout', 0)} impressions ({result.rows.get('train', 0)} trained on)",
                f"horizon:                  {result.horizon}",
                f"speed layer:              running (pid {speed_pid}): {', '.join(queries)}; log {speed.process.log_file}",
                f"online model:             {online}",
                f"fresh events:             {fresh}",
                f"one prediction:           POST {service.url}/predict {json.dumps(example)}",
                f"                          -> {json.dumps(answer)}",
                f"MLflow UI:                {cfg.mlflow.tracking_uri}",
                f"prediction service:       {service.url}/docs",
                f"prediction log:           Kafka topic {cfg.kafka.topics.predictions.name}"
                + ("" if cfg.serving.prediction_log.enabled else " (off: serving.prediction_log.enabled)")
                + "; `lambda-ml batch evaluate` joins it with later clicks (live AUC per version in MLflow)",
                f"total time:               {time.monotonic() - started:.0f} s",
                "The stack, the speed layer and the service are still running; stop them with `make stop` (lambda-ml stack down).",
            ]
        )
    )
    return 0

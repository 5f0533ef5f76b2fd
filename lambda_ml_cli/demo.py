"""``lambda-ml demo``: the events' whole journey on the embedded stack, with a summary, for the
application the config names (``app.type``; what depends on it is its ``DemoScript``).

Kafka -> speed layer (ingest, feature increments, the application's first queries) -> Delta lake
-> batch training -> MLflow registry -> the speed layer running continuously (its model updates,
from the new champion, on the model-updates topic) -> serving (champion and speed model, batch
views merged with the speed layer's increments), then fresh events followed until serving counts
them, one request, and ``lambda-ml verify``'s checks. The stack, the speed layer and the service
stay up afterwards; ``make stop`` (``lambda-ml stack down``) stops them. A second run keeps the
speed layer and the service an earlier one left running (when they would be started the same way:
same command, same configuration): the speed layer lands the new events, the service swaps in the
new champion and views, as in a deployment between two batch runs.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from lambda_ml import contract, jvm, producer
from lambda_ml_cli import stack, verify
from lambda_ml.apps import DemoScript, load_application
from lambda_ml.config import PlatformConfig
from lambda_ml.contract import Horizon, ModelUpdate

log = logging.getLogger(__name__)
T = TypeVar("T")

# Keys per entity and events the demo's verify step compares (`lambda-ml verify` checks all keys).
VERIFY_SAMPLE = 200


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


@dataclass(frozen=True)
class Outcome:
    """What a step found: whether it got what it waited for, in words for the summary."""

    ok: bool
    text: str
    at: datetime | None = None  # when what it waited for was sent


def follow_fresh_events(cfg: PlatformConfig, script: DemoScript, service_url: str, timeout_s: float = 300) -> Outcome:
    """Send the application's fresh events (event time now) and wait until the service's merged
    features count them (batch view ⊕ the running speed layer's increments); say how long that took."""
    sent_at = datetime.now(UTC)
    fresh = script.fresh_events(cfg, sent_at)
    feature = contract.window_feature_name(fresh.entity, fresh.aggregate, cfg.features.windows[0])
    # One instant for every read: the window does not move while we wait.
    at = urllib.parse.quote((sent_at + timedelta(seconds=1)).isoformat())
    url = f"{service_url}/features/{fresh.entity}/{fresh.key}?at={at}"
    before = float(_json(url)["merged"]["features"][feature])
    started = time.monotonic()
    producer.produce(cfg, fresh.records, progress=False)
    what = f"{fresh.count} new event(s) of {fresh.entity} {fresh.key}"
    while time.monotonic() - started < timeout_s:
        now = float(_json(url)["merged"]["features"][feature])
        if now >= before + fresh.count:
            return Outcome(True, f"{what} counted by serving after {time.monotonic() - started:.0f} s ({feature}: {before:g} -> {now:g})", sent_at)
        time.sleep(1)
    return Outcome(False, f"{what} not counted by serving within {timeout_s:.0f} s", sent_at)


def champion_horizon(cfg: PlatformConfig) -> tuple[int, Horizon] | None:
    """The champion's version and horizon in the registry, None without a champion."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        version = MlflowClient(cfg.mlflow.tracking_uri).get_model_version_by_alias(cfg.mlflow.registered_model, contract.CHAMPION_ALIAS)
    except MlflowException:
        return None
    return int(version.version), Horizon.from_tags(version.tags)


def latest_speed_update(cfg: PlatformConfig, timeout_ms: int = 3000) -> ModelUpdate | None:
    """The last model update the speed layer published (alias ``speed``) on the model-updates
    topic, None if there is none: what serving receives, read the way serving reads it."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=cfg.kafka.bootstrap_servers, group_id=None, enable_auto_commit=False,
                             consumer_timeout_ms=timeout_ms)  # fmt: skip
    try:
        topic = cfg.kafka.topics.model_updates.name
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            return None
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        key = contract.model_update_key(cfg.mlflow.registered_model, contract.SPEED_ALIAS)
        latest = None
        for record in consumer:
            if record.key == key and record.value is not None:
                try:
                    latest = contract.parse_model_update(record.value)
                except ValueError:
                    continue
        return latest
    finally:
        consumer.close()


def wait_for_speed_model(cfg: PlatformConfig, timeout_s: float = 300) -> Outcome:
    """Once the running speed layer has published an update from the current champion (its
    generation is the champion's horizon), what it says; why not after ``timeout_s``."""
    champion = champion_horizon(cfg)
    if champion is None:
        return Outcome(False, "no champion in the registry")
    version, horizon = champion
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        update = latest_speed_update(cfg)
        if update is not None and update.generation == horizon:
            quality = "" if update.quality is None else f", recent quality {update.quality:.4f}"
            return Outcome(True, f"{update.updates or 0} update(s) since champion v{version} ({horizon}){quality}, published on the model-updates topic")
        time.sleep(2)
    return Outcome(False, f"no update from champion v{version} published within {timeout_s:.0f} s (see the speed layer's log)")


def event_end_offsets(cfg: PlatformConfig) -> dict[tuple[str, int], int]:
    """Kafka's end offset of every partition of the event topics: what was sent so far."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=cfg.kafka.bootstrap_servers, group_id=None, enable_auto_commit=False)
    try:
        partitions = [
            TopicPartition(topic.name, p) for topic in cfg.events.topics().values() for p in sorted(consumer.partitions_for_topic(topic.name) or ())
        ]
        return {(tp.topic, tp.partition): offset for tp, offset in consumer.end_offsets(partitions).items()}
    finally:
        consumer.close()


def wait_for_ingest(cfg: PlatformConfig, ends: Mapping[tuple[str, int], int], timeout_s: float = 300) -> None:
    """Wait until the running speed layer's ingest has committed a micro-batch that read every
    event topic partition up to ``ends`` (its records are then in bronze or in quarantine)."""
    from lambda_ml.spark import get_spark

    spark = get_spark(cfg, "demo")
    deadline = time.monotonic() + timeout_s
    while True:
        progress = verify.ingest_progress(spark, cfg)
        behind = {tp: end for tp, end in ends.items() if end > (progress.ends.get(tp, 0) if progress else 0)}
        if not behind:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the running speed layer did not read the events sent within {timeout_s:.0f} s (still behind on "
                f"{', '.join(f'{t}/{p}' for t, p in sorted(behind))}); see {stack.SpeedProcess(cfg).process.log_file}"
            )
        time.sleep(1)


def _lake_counts(cfg: PlatformConfig) -> dict[str, int]:
    from lambda_ml.spark import get_spark
    from speed_layer.ingest import table_paths

    spark = get_spark(cfg, "demo")
    return {name: spark.read.format("delta").load(path).count() for name, path in table_paths(cfg).items()}


def _train(cfg: PlatformConfig):  # type: ignore[no-untyped-def]
    from batch_layer import train
    from lambda_ml.spark import get_spark

    return train.run(get_spark(cfg, "demo"), cfg)


def run(cfg: PlatformConfig, events: int | None = None) -> int:
    """Run the demo end to end and print a summary; return the process exit code."""
    from speed_layer import app

    application = load_application(cfg)
    script = application.demo
    if script is None:
        raise ValueError(f"{cfg.source}: app.type: the {application.name} application has no demo")
    started = time.monotonic()
    steps = 11
    _step(1, steps, "resolve JVM jars", lambda: jvm.resolve_all(cfg))
    _step(2, steps, "start Kafka broker and MLflow server", lambda: stack.up(cfg))
    # A speed layer and a service an earlier demo left running, started as this run would start
    # them, keep running: the speed layer lands this run's events as they come and its online
    # model follows the new champion, the service swaps it in (what a deployment does between
    # two batch runs). Anything else running is stopped, and they start after training.
    queries = list(cfg.speed.queries)
    speed, service = stack.SpeedProcess(cfg), stack.ServingProcess(cfg)
    speed_pid, service_pid = speed.running(cfg.source, queries), service.running(cfg.source)
    if speed_pid is None and speed.stop():  # its queries share the checkpoints the drain below uses
        log.info("stopped the speed layer an earlier demo left running; it starts again after training")
    sent = _step(3, steps, "generate events to Kafka", lambda: script.send_events(cfg, events))
    if speed_pid is None:
        warm = ["ingest", "increments", *script.warm_queries]
        _step(4, steps, f"speed layer: {', '.join(warm)} (catch up and stop)", lambda: app.run(cfg, warm, available_now=True))
    else:
        ends = event_end_offsets(cfg)
        _step(4, steps, f"speed layer: running since an earlier demo (pid {speed_pid}): wait until it has read these events",
              lambda: wait_for_ingest(cfg, ends))  # fmt: skip
    counts = _lake_counts(cfg)
    result = _step(5, steps, "batch layer: views, train, gate, register", lambda: _train(cfg))
    # From here on the speed layer runs continuously, its model updates following the champion.
    if speed_pid is None:
        speed_pid = _step(6, steps, f"speed layer: run continuously ({', '.join(queries)})", lambda: speed.start(cfg.source, queries))
    else:
        _step(6, steps, f"speed layer: running (pid {speed_pid}): {', '.join(queries)}", lambda: None)
    if service_pid is None:
        _step(7, steps, "serving layer: start the service", lambda: service.start(cfg.source))
    else:
        champion = champion_horizon(cfg)  # the gate may have kept the earlier one
        served = None if champion is None else champion[0]
        _step(7, steps, f"serving layer: running (pid {service_pid}): wait until it serves champion v{served} and the new views",
              lambda: service.wait_until_serving(served, result.horizon.parts))  # fmt: skip
    fresh = _step(8, steps, "fresh events: send some and wait until serving counts them",
                  lambda: follow_fresh_events(cfg, script, service.url))  # fmt: skip
    # After the fresh events: a speed model may move only on events after the champion's horizon.
    pending = script.update_pending(cfg, fresh.at)
    speed_model = _step(9, steps, "speed layer: an update from the champion",
                        lambda: Outcome(True, pending) if pending else wait_for_speed_model(cfg))  # fmt: skip
    path, example = script.example(cfg)
    answer = _step(10, steps, f"ask the service: POST {path}", lambda: _json(f"{service.url}{path}", example))
    # What the platform promises, checked on what the demo left: the same checks as `lambda-ml verify`.
    report = _step(11, steps, "verify: lambda identity, exactly once, lineage, point in time",
                   lambda: verify.run_checks(cfg, sample=VERIFY_SAMPLE, pit_sample=VERIFY_SAMPLE))  # fmt: skip

    bronze = ", ".join(f"{counts[name]} {name}" for name in cfg.events.types)
    others = "".join(f", {flavour} version {v}" for flavour, v in result.versions.others.items())
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.metrics.items()) if not k.startswith(("rows_", "seconds_")))
    print(
        "\n".join(
            [
                "",
                f"=== lambda-ml demo summary ({application.name}) ===",
                f"events sent this run:     {sent}",
                f"bronze (all runs):        {bronze}",
                f"quarantined (all runs):   {counts['quarantine']} records, each with its reason",
                f"model:                    {cfg.mlflow.registered_model} version {result.versions.served}{others} "
                f"({'already registered for this horizon' if result.reused else 'alias ' + result.decision})",
                f"quality gate:             {result.reason or 'no decision recorded'}",
                f"holdout:                  {metrics}",
                f"horizon:                  {result.horizon}",
                f"speed layer:              running (pid {speed_pid}): {', '.join(queries)}; log {speed.process.log_file}",
                f"speed model:              {speed_model.text}",
                f"fresh events:             {fresh.text}",
                f"one request:              POST {service.url}{path} {json.dumps(example)}",
                f"                          -> {json.dumps(answer)}",
                f"MLflow UI:                {cfg.mlflow.tracking_uri}",
                f"service:                  {service.url}/docs",
                "verify:",
                *(f"  {line}" for line in report.text().splitlines()),
                f"total time:               {time.monotonic() - started:.0f} s",
                "The stack, the speed layer and the service are still running; stop them with `make stop` (lambda-ml stack down).",
            ]
        )
    )
    failed = [name for name, outcome in (("speed model", speed_model), ("fresh events", fresh)) if not outcome.ok]
    failed += [f"verify ({name})" for name in report.failed]
    if failed:
        log.error("the demo did not see everything it waited for: %s (see the logs above)", ", ".join(failed))
        return 1
    return 0

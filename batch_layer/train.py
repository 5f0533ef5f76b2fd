"""Batch layer: retrain the application's model from a pinned bronze snapshot.

One run reads every bronze table at fixed Delta versions (the horizon), derives the feature
events (the application's rule) and writes the batch views, then hands the snapshot to the
application's batch update (``app.type``), which builds its training set, trains and evaluates.
The layer logs the candidate in one MLflow run with its lineage (horizon, config and feature
definitions hashes), scores the champion on the same holdout rows, registers the candidate and
moves the aliases as the quality gate decides (see :mod:`batch_layer.registry`). A second run
for the same horizon, config and feature definitions registers nothing and reports the first
run's versions.

    spark-submit batch_layer/train.py [--config conf/platform.yaml]
        [--version EVENT=N ... | --as-of 2026-01-01T12:00:00Z]

(``lambda-ml submit batch_layer/train.py`` adds the platform's jars and settings.)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import mlflow
from pyspark.sql import DataFrame, SparkSession

from batch_layer import registry
from batch_layer.registry import ExistingVersions, Lineage
from batch_layer.snapshot import read_snapshot
from batch_layer.views import build_views, views_at, write_views
from lambda_ml.apps import Application, Candidate, Quality, Registered, load_application
from lambda_ml.config import PlatformConfig, load_config
from lambda_ml.contract import Horizon
from lambda_ml.features import definitions_hash
from lambda_ml.logs import setup_logging
from lambda_ml.spark import job_session, shuffle_partitions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a batch training run produced (or found already registered, ``reused``)."""

    run_id: str
    versions: Registered
    horizon: Horizon
    quality: Quality
    metrics: dict[str, float] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    decision: str = ""  # the gate's: "champion" or "challenger"
    reason: str = ""
    reused: bool = False

    def summary(self) -> str:
        others = "".join(f", {flavour} version {v}" for flavour, v in self.versions.others.items())
        quality = f"{self.quality.metric} {self.quality.value:.4f}"
        if self.reused:
            return (
                f"{self.horizon} was already trained with this config and these feature definitions: "
                f"reusing version {self.versions.served}{others} "
                f"({self.decision or 'no gate decision recorded'}, {quality}) of MLflow run {self.run_id}; "
                "nothing trained or registered"
            )
        rows = "".join(f"{self.rows[k]} {k} rows, " for k in ("train", "holdout") if k in self.rows)
        return (
            f"trained on {self.horizon}: {rows}{quality}; registered version {self.versions.served}{others} "
            f"as {self.decision} ({self.reason}) in MLflow run {self.run_id}"
        )


class StepTimes:
    """Seconds each step of a job took, from the job's start: logged as ``step_seconds.<step>``
    metrics of its MLflow run, whose start time is the job's (``started_at``)."""

    def __init__(self, started_at: datetime | None = None) -> None:
        self.started_at = started_at or datetime.now(UTC)
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()
        # Whatever ran before (the config read, the Spark session started) is the first step.
        before = (datetime.now(UTC) - self.started_at).total_seconds()
        if before >= 0.001:
            self.seconds["startup"] = round(before, 3)

    def lap(self, step: str) -> None:
        """``step`` ended now: it took the time since the previous step ended."""
        now = time.monotonic()
        self.seconds[step] = round(now - self._last, 3)
        self._last = now

    def metrics(self) -> dict[str, float]:
        return {f"step_seconds.{step}": seconds for step, seconds in self.seconds.items()}


def run(
    spark: SparkSession,
    cfg: PlatformConfig,
    versions: Mapping[str, int] | None = None,
    snapshot_as_of: datetime | None = None,
    started_at: datetime | None = None,
) -> TrainResult:
    """The whole batch run: snapshot -> views -> the application's training -> MLflow -> gate.

    Bronze is pinned at the given versions (event type -> Delta version), or at the versions
    each table had at ``snapshot_as_of``, or at the latest ones. Nothing is registered when the
    candidate refuses its own artefacts (e.g. ONNX disagreeing with Spark); the MLflow run is
    then left FAILED. If versions with the same lineage (horizon, config and feature
    definitions) are already registered, nothing is trained and they are returned (``reused``).
    Shuffles use ``spark.batch_shuffle_partitions`` for the run. The MLflow run starts at
    ``started_at`` (the job's start, default now), so its duration is the job's, and logs the
    seconds of each step (``step_seconds.snapshot``, ``.views``, ``.training``...).
    """
    steps = StepTimes(started_at)
    app = load_application(cfg)
    with shuffle_partitions(spark, cfg.spark.batch_shuffle_partitions):
        return _run(spark, cfg, app, versions, snapshot_as_of, steps)


def _run(
    spark: SparkSession, cfg: PlatformConfig, app: Application, versions: Mapping[str, int] | None,
    snapshot_as_of: datetime | None, steps: StepTimes,
) -> TrainResult:  # fmt: skip
    snapshot = read_snapshot(spark, cfg, versions, as_of=snapshot_as_of)
    horizon = snapshot.horizon
    log.info("pinned %s", horizon)
    lineage = Lineage(horizon, registry.training_config_hash(cfg), features_hash(cfg, app))
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    existing = registry.find_registered(client, cfg.mlflow.registered_model, lineage)
    steps.lap("snapshot")
    if existing is not None:
        log.info(
            "%s was already trained with this config and these feature definitions (MLflow run %s): "
            "skipping training, no new model version",
            horizon,
            existing.run_id,
        )
        if not views_at(spark, cfg, horizon):  # e.g. a lake rebuilt under the same registry
            log.info("the batch views are not at %s: writing them", horizon)
            events = app.features.batch(snapshot, cfg)
            write_views(build_views(events, cfg.features, horizon), cfg)
        return reused_result(client, existing, horizon)
    events: DataFrame | None = app.features.batch(snapshot, cfg).cache()
    candidate: Candidate | None = None
    try:
        # One pass derives the feature events: the views and the application share them.
        write_views(build_views(events, cfg.features, horizon), cfg)
        steps.lap("views")
        candidate = app.batch.train(spark, snapshot, events, cfg)  # the holdout metrics included
        steps.lap("training")
        events.unpersist()
        events = None
        run_id, registered, gate = log_and_register(cfg, lineage, candidate, steps)
    finally:
        if events is not None:
            events.unpersist()
        if candidate is not None:
            candidate.release()
    rows = {key.removeprefix("rows_"): int(value) for key, value in candidate.metrics.items() if key.startswith("rows_")}
    return TrainResult(
        run_id, registered, horizon, candidate.quality, dict(candidate.metrics), rows, gate.decision, gate.reason
    )


def features_hash(cfg: PlatformConfig, app: Application) -> str:
    """The hash of the feature declarations and of the code deriving them, the application's
    feature-event rule included (a version's ``feature_definitions_sha256``)."""
    return definitions_hash(cfg.features, sys.modules[type(app.features).__module__])


def log_and_register(
    cfg: PlatformConfig, lineage: Lineage, candidate: Candidate, steps: StepTimes | None = None
) -> tuple[str, Registered, registry.GateDecision]:
    """One MLflow run with the lineage, the candidate's params, metrics and artefacts, and the
    config; the candidate refusing its artefacts leaves the run FAILED with nothing registered.
    Then the gate: the champion is scored on the candidate's holdout rows, the candidate is
    registered with the verdict, and its served version becomes ``champion`` or ``challenger``.
    ``steps``: the job's start (the run's start time) and the seconds of its steps so far,
    logged with the steps of this function (artifacts, gate, registration)."""
    horizon, name = lineage.horizon, cfg.mlflow.registered_model
    steps = steps or StepTimes()
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    experiment = mlflow.set_experiment(cfg.mlflow.experiment)
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    # Created with the job's start time, not now: the run's duration in the UI is the job's.
    created = client.create_run(
        experiment.experiment_id, start_time=int(steps.started_at.timestamp() * 1000),
        run_name="train-" + "-".join(f"{e}{v}" for e, v in horizon.versions),
    )  # fmt: skip
    with mlflow.start_run(run_id=created.info.run_id) as active:
        mlflow.set_tags({**lineage.tags(), "app": cfg.app.type})
        mlflow.log_params(
            {**candidate.params, "feature_definitions_sha256": lineage.features_sha256, "config_sha256": lineage.config_sha256}
        )
        logged = steps.metrics()  # so far: a run that fails further on still shows them
        mlflow.log_metrics({**candidate.metrics, **logged})
        mlflow.log_dict(cfg.model_dump(mode="json"), "config.json")
        candidate.log_artifacts()
        steps.lap("artifacts")

        champion = registry.score_champion(client, name, candidate.score)
        gate = registry.decide(candidate.quality, champion)
        mlflow.set_tags(gate.tags())
        if champion is not None and champion.value is not None:
            mlflow.log_metric(f"champion_{candidate.quality.metric}", champion.value)
        log.info("quality gate: %s (%s)", gate.decision, gate.reason)
        steps.lap("gate")
        versions = candidate.register(name, {**lineage.tags(), **gate.tags()})
        registry.mark_served(client, name, versions)
        registry.apply_decision(client, name, versions, gate)
        steps.lap("registration")
        mlflow.log_metrics({k: v for k, v in steps.metrics().items() if k not in logged})
        return active.info.run_id, versions, gate


def reused_result(client: mlflow.MlflowClient, existing: ExistingVersions, horizon: Horizon) -> TrainResult:
    """The result of the earlier run that registered ``existing`` (what a re-run reports)."""
    earlier = client.get_run(existing.run_id).data
    metrics = earlier.metrics
    rows = {key.removeprefix("rows_"): int(value) for key, value in metrics.items() if key.startswith("rows_")}
    quality = registry.recorded_quality(earlier.tags)
    return TrainResult(
        existing.run_id,
        existing.versions,
        horizon,
        quality,
        dict(metrics),
        rows,
        existing.decision or "",
        reused=True,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="batch_layer/train.py",
        description="Train the application's model (app.type) on a pinned bronze snapshot, publish the batch "
        "views and register the Spark and ONNX models in MLflow.",
    )
    parser.add_argument("--config", help="platform config file (default: $LAMBDA_ML_CONFIG or conf/platform.yaml)")
    add_horizon_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.as_of is not None and args.version:
        parser.error("--as-of pins every bronze table: give it without --version")
    args.versions = dict(args.version or [])
    return args


def add_horizon_arguments(parser: argparse.ArgumentParser) -> None:
    """``--version EVENT=N`` (repeatable) and ``--as-of TIMESTAMP``: how a run pins bronze."""
    parser.add_argument(
        "--version",
        type=_event_version,
        action="append",
        metavar="EVENT=N",
        help="pin bronze/EVENT at Delta version N, e.g. --version orders=12 (repeatable; default: the latest of each)",
    )
    parser.add_argument(
        "--as-of",
        type=_timestamp,
        metavar="TIMESTAMP",
        help="pin each bronze table at its version as of this ISO 8601 time, e.g. 2026-01-01T12:00:00Z "
        "(naive times are UTC); not with --version",
    )


def _event_version(text: str) -> tuple[str, int]:
    event, sep, number = text.partition("=")
    if not sep or not event:
        raise argparse.ArgumentTypeError(f"a pinned version is EVENT=N, e.g. orders=12, not {text!r}")
    return event, _version(number)


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an as-of time is ISO 8601, e.g. 2026-01-01T12:00:00Z, not {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _version(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a Delta version is a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a Delta version is 0 or more, not {value}")
    return value


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """Command-line entry point; returns the result for callers running it in-process."""
    started_at = datetime.now(UTC)
    args = parse_args(argv)
    setup_logging(args.verbose)
    cfg = load_config(args.config)
    with job_session(cfg, "batch-train") as spark:
        result = run(spark, cfg, args.versions, args.as_of, started_at)
    log.info("%s", result.summary())
    return result


if __name__ == "__main__":
    main()

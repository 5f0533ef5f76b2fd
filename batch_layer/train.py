"""Batch layer: train the click-through model from a pinned bronze snapshot.

One run reads bronze impressions and clicks at fixed Delta versions (the horizon), writes the
per-user and per-item batch views, builds a point-in-time training set, fits the configured
model (``ctr.model``: logistic regression or gradient-boosted trees, parameters chosen on a
validation split of the training rows) on all but the most recent impressions, evaluates it on
those (AUC, log loss, calibration), exports it to ONNX, checks that ONNX and Spark agree, and
registers both in MLflow with the horizon. The quality gate then makes the new version
``champion`` or ``challenger`` (see :mod:`batch_layer.registry`). A second run for the same
horizon, config and feature definitions registers nothing and reports the first run's versions.

    spark-submit batch_layer/train.py [--config conf/platform.yaml]
        [--version impressions=N --version clicks=N | --as-of 2026-01-01T12:00:00Z]

(``lambda-ml submit batch_layer/train.py`` adds the platform's jars and settings.) Every step
but :func:`run` and :func:`main` is a function of DataFrames and config.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import mlflow
import numpy as np
import onnx
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from batch_layer import registry
from batch_layer.evaluation import (
    CLICK_PROBABILITY,
    Evaluation,
    TrainingError,
    auc,
    calibration_figure,
    evaluate,
    in_sample,
    score,
    split_by_time,
)
from batch_layer.models import Selection, select_model
from batch_layer.registry import ExistingVersions, Lineage
from batch_layer.snapshot import Snapshot, read_snapshot
from batch_layer.views import build_views, write_views
from lambda_ml import contract
from lambda_ml.config import PlatformConfig, load_config
from lambda_ml.contract import Horizon
from lambda_ml.features import (
    IMPRESSIONS,
    KIND,
    LABEL,
    attribute_clicks,
    dedup_events,
    definitions_hash,
    event_window_features,
    feature_events,
    impressions_with_labels,
    latest_event_time,
    model_input_columns,
)
from lambda_ml.logs import setup_logging
from lambda_ml.model_registry import RegisteredVersions, register_models
from lambda_ml.onnx_export import ParityError, check_parity, export_onnx, onnx_click_probabilities, onnx_inputs
from lambda_ml.schemas import event_type
from lambda_ml.spark import job_session, shuffle_partitions

log = logging.getLogger(__name__)

# Rows of the holdout compared between ONNX and Spark: all of them up to this many.
PARITY_MAX_ROWS = 100_000


@dataclass(frozen=True)
class TrainResult:
    """What a batch training run produced (or found already registered, ``reused``)."""

    run_id: str
    versions: RegisteredVersions
    horizon: Horizon
    auc: float
    log_loss: float
    rows: dict[str, int] = field(default_factory=dict)
    decision: str = ""  # the gate's: "champion" or "challenger"
    reason: str = ""
    reused: bool = False

    def summary(self) -> str:
        if self.reused:
            return (
                f"{self.horizon} was already trained with this config and these feature definitions: "
                f"reusing Spark version {self.versions.spark} and ONNX version {self.versions.onnx} "
                f"({self.decision or 'no gate decision recorded'}, AUC {self.auc:.3f}) of MLflow run {self.run_id}; "
                "nothing trained or registered"
            )
        return (
            f"trained on {self.horizon}: {self.rows.get('train', 0)} training rows, "
            f"{self.rows.get('holdout', 0)} holdout rows, AUC {self.auc:.3f}, log loss {self.log_loss:.4f}; "
            f"registered Spark version {self.versions.spark} and ONNX version {self.versions.onnx} "
            f"as {self.decision} ({self.reason}) in MLflow run {self.run_id}"
        )


# --------------------------------------------------------------------------- pure transforms


def clean_events(snapshot: Snapshot, cfg: PlatformConfig) -> tuple[DataFrame, DataFrame]:
    """The snapshot's impressions and clicks, one row per event id, with the event fields only
    (bronze's Kafka coordinates are not needed past this point, and pruned before the shuffle)."""
    return (
        dedup_events(snapshot["impressions"].select(*event_type(cfg, "impressions").field_names)),
        dedup_events(snapshot["clicks"].select(*event_type(cfg, "clicks").field_names)),
    )


def labelled_events(impressions: DataFrame, clicks: DataFrame, cfg: PlatformConfig, as_of: datetime) -> DataFrame:
    """The snapshot's feature events (impressions and attributed clicks), impressions carrying
    their ``label`` (null while their attribution window is open at ``as_of``) and the model's
    context fields. What both the batch views and the training set are computed from.

    Inputs must be deduplicated; ``as_of`` is the latest event time in the snapshot.
    """
    window = cfg.ctr.attribution_window_minutes
    attributed = attribute_clicks(impressions, clicks, window)
    shown = impressions_with_labels(impressions, attributed, window, as_of)
    inputs = contract.model_inputs(cfg.features)
    carried = ["user_id", "item_id", *inputs.categorical, *cfg.features.context.numeric, LABEL]
    return feature_events(shown, attributed, cfg.features, extra=carried)


def training_rows(events: DataFrame, cfg: PlatformConfig, bucket_rows: Mapping[str, DataFrame] | None = None) -> DataFrame:
    """Labelled impressions of :func:`labelled_events` with point-in-time window features.

    Columns: ``event_id, event_time, user_id, item_id``, the model inputs declared in
    ``cfg.features`` (numbers as doubles) and ``label``. A row's window features use only
    events strictly before its event time; unlabelled impressions are left out but their
    events still count for later ones. ``bucket_rows`` are the batch views of the same events,
    by entity (computed here when not given).
    """
    with_features = event_window_features(events, cfg.features, bucket_rows)
    labelled = with_features.where((F.col(KIND) == IMPRESSIONS) & F.col(LABEL).isNotNull())
    inputs = contract.model_inputs(cfg.features)
    return labelled.select("event_id", "event_time", "user_id", "item_id", *model_input_columns(inputs), F.col(LABEL))


def build_training_set(impressions: DataFrame, clicks: DataFrame, cfg: PlatformConfig, as_of: datetime) -> DataFrame:
    """Deduplicated impressions and clicks -> the training set (:func:`training_rows`)."""
    return training_rows(labelled_events(impressions, clicks, cfg, as_of), cfg)


def split_counts(labelled: DataFrame, cutoff: datetime) -> dict[str, int]:
    """Rows and positives of the labelled impressions up to ``cutoff`` (train) and after it
    (holdout), in one pass; fail with a plain reason if either lacks a class."""
    held = F.col("event_time") > F.lit(cutoff)
    row = labelled.agg(
        F.count(F.when(~held, 1)).alias("train"),
        F.sum(F.when(~held, F.col(LABEL))).alias("train_positives"),
        F.count(F.when(held, 1)).alias("holdout"),
        F.sum(F.when(held, F.col(LABEL))).alias("holdout_positives"),
    ).first()
    assert row is not None  # a global aggregate always has one row
    counts = {name: int(row[name] or 0) for name in ("train", "train_positives", "holdout", "holdout_positives")}
    _require_both_classes(counts)
    return counts


def _require_both_classes(counts: dict[str, int]) -> None:
    for part in ("train", "holdout"):
        rows, positives = counts[part], counts[f"{part}_positives"]
        if positives == 0 or positives == rows:
            raise TrainingError(f"the {part} set has {rows} rows of which {positives} clicked: both classes are needed")


def check_trainable(train: DataFrame, holdout: DataFrame) -> dict[str, int]:
    """Row and positive counts; fail with a plain reason if the split cannot train or evaluate.

    A numeric feature constant over the training rows is refused too: the model learns
    nothing from it (a declaration or the data is wrong). The numeric features
    are the double columns other than the label (see :func:`build_training_set`).
    """
    numeric = [name for name, kind in train.dtypes if kind == "double" and name != LABEL]
    spreads = [F.stddev_pop(name).alias(name) for name in numeric]
    stats = train.agg(F.count("*").alias("rows"), F.sum(LABEL).alias("positives"), *spreads).first()
    held = holdout.agg(F.count("*").alias("rows"), F.sum(LABEL).alias("positives")).first()
    assert stats is not None and held is not None  # a global aggregate always has one row
    counts = {
        "train": int(stats["rows"]),
        "train_positives": int(stats["positives"] or 0),
        "holdout": int(held["rows"]),
        "holdout_positives": int(held["positives"] or 0),
    }
    _require_both_classes(counts)
    constant = [name for name in numeric if not stats[name]]
    if constant:
        raise TrainingError(f"numeric features {constant} are constant over the {counts['train']} training rows")
    return counts


# --------------------------------------------------------------------------- the job


def run(
    spark: SparkSession,
    cfg: PlatformConfig,
    versions: Mapping[str, int] | None = None,
    snapshot_as_of: datetime | None = None,
) -> TrainResult:
    """The whole batch run: snapshot -> views -> training set -> model -> ONNX -> MLflow -> gate.

    Bronze is pinned at the given versions (event type -> Delta version), or at the versions each table had at
    ``snapshot_as_of``, or at the latest ones. Nothing is registered unless ONNX reproduces
    Spark's holdout probabilities within ``ctr.parity_atol``; the MLflow run is then left FAILED
    with ``parity=failed``. If versions with the same lineage (horizon, config and feature
    definitions) are already registered, nothing is trained and they are returned (``reused``).
    Shuffles use ``spark.batch_shuffle_partitions`` for the run.
    """
    with shuffle_partitions(spark, cfg.spark.batch_shuffle_partitions):
        return _run(spark, cfg, versions, snapshot_as_of)


def _run(spark: SparkSession, cfg: PlatformConfig, versions: Mapping[str, int] | None, snapshot_as_of: datetime | None) -> TrainResult:
    snapshot = read_snapshot(spark, cfg, versions, as_of=snapshot_as_of)
    horizon = snapshot.horizon
    log.info("pinned %s", horizon)
    lineage = Lineage(horizon, registry.training_config_hash(cfg), definitions_hash(cfg.features))
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    existing = registry.find_registered(client, cfg.mlflow.registered_model, lineage)
    if existing is not None:
        log.info(
            "%s was already trained with this config and these feature definitions (MLflow run %s): "
            "skipping training, no new model version",
            horizon,
            existing.run_id,
        )
        return reused_result(client, existing, horizon)
    impressions, clicks = (frame.cache() for frame in clean_events(snapshot, cfg))
    events = training = None
    try:
        as_of = latest_event_time(impressions, clicks)
        if as_of is None:
            raise TrainingError(f"{horizon} holds no events")
        counted = {"impressions": impressions.count(), "clicks": clicks.count()}
        # One pass labels and attributes: the views and the training set share these events.
        events = labelled_events(impressions, clicks, cfg, as_of).cache()
        paths = write_views(build_views(events, cfg.features, horizon), cfg)
        impressions.unpersist()
        clicks.unpersist()
        # Whole-bucket window values come from the published views themselves.
        views = {entity: spark.read.format("delta").load(path) for entity, path in paths.items()}

        # The split and its counts come from the narrow events; window features are then kept
        # (cached) for the holdout and for the training rows the model is fitted on only.
        labelled = events.where((F.col(KIND) == IMPRESSIONS) & F.col(LABEL).isNotNull())
        _, _, cutoff = split_by_time(labelled, cfg.ctr.holdout_fraction)
        split = split_counts(labelled, cutoff)
        held = F.col("event_time") > F.lit(cutoff)
        fitted = in_sample(split["train"], cfg.ctr.max_training_rows)
        training = training_rows(events, cfg, views).where(held | fitted).cache()
        train, holdout = training.where(~held), training.where(held)
        fitted_counts = check_trainable(train, holdout)
        events.unpersist()
        rows = {**counted, **split, "train_fitted": fitted_counts["train"], "labelled": split["train"] + split["holdout"]}
        log.info(
            "labelled %d impressions up to %s; holdout after %s (%d rows); fitting on %d of %d training rows",
            rows["labelled"], as_of, cutoff, rows["holdout"], rows["train_fitted"], rows["train"],
        )  # fmt: skip

        selection = select_model(train, cfg, rows["train"])
        model = selection.model
        inputs = contract.model_inputs(cfg.features)
        # Only what the metrics and the parity check read is cached (not the model's vectors).
        scored = score(model, holdout).select(*inputs.names, LABEL, CLICK_PROBABILITY).cache()
        evaluation = evaluate(scored, cfg.ctr.calibration_bins)
        log.info(
            "holdout AUC %.4f, log loss %.4f, ECE %.4f over %d rows",
            evaluation.auc,
            evaluation.log_loss,
            evaluation.ece,
            evaluation.rows,
        )

        onnx_model = export_onnx(model, spark, inputs, name=cfg.mlflow.registered_model)
        compared = scored.select(*inputs.names, CLICK_PROBABILITY).limit(PARITY_MAX_ROWS).toPandas()
        scored.unpersist()
        spark_p = compared[CLICK_PROBABILITY].to_numpy(dtype=np.float64)
        onnx_p = onnx_click_probabilities(onnx_model, onnx_inputs(compared, inputs))

        params = {
            **registry.flat_params(cfg.ctr.model_dump(mode="json")),
            **registry.flat_params(selection.params, "chosen"),
            "labels_as_of": as_of.isoformat(),
            "holdout_after": cutoff.isoformat(),
            "validation_after": "" if selection.validation_after is None else selection.validation_after.isoformat(),
            "feature_definitions_sha256": lineage.features_sha256,
            "config_sha256": lineage.config_sha256,
        }
        metrics = {**evaluation.metrics(), **{f"rows_{k}": float(v) for k, v in rows.items()}}
        run_id, versions, gate = log_and_register(
            cfg, lineage, params, metrics, selection, evaluation, onnx_model, spark_p, onnx_p, holdout
        )
    finally:
        for frame in (impressions, clicks, events, training):
            if frame is not None:
                frame.unpersist()
    return TrainResult(
        run_id, versions, horizon, evaluation.auc, evaluation.log_loss, rows, gate.decision, gate.reason
    )


def reused_result(client: mlflow.MlflowClient, existing: ExistingVersions, horizon: Horizon) -> TrainResult:
    """The result of the earlier run that registered ``existing`` (what a re-run reports)."""
    metrics = client.get_run(existing.run_id).data.metrics
    rows = {key.removeprefix("rows_"): int(value) for key, value in metrics.items() if key.startswith("rows_")}
    return TrainResult(
        existing.run_id,
        existing.versions,
        horizon,
        metrics["auc"],
        metrics["log_loss"],
        rows,
        existing.decision or "",
        reused=True,
    )


def log_and_register(
    cfg: PlatformConfig,
    lineage: Lineage,
    params: dict[str, object],
    metrics: dict[str, float],
    selection: Selection,
    evaluation: Evaluation,
    onnx_model: onnx.ModelProto,
    spark_probabilities: np.ndarray,
    onnx_probabilities: np.ndarray,
    holdout: DataFrame,
) -> tuple[str, RegisteredVersions, registry.GateDecision]:
    """One MLflow run with the lineage, params, metrics, config, search and calibration; both
    models registered only if the parity check passes (else the run ends FAILED, tagged
    ``parity=failed``), then the gate: the champion is scored on the same ``holdout`` rows and
    the new ONNX version becomes ``champion`` or ``challenger``."""
    horizon, name = lineage.horizon, cfg.mlflow.registered_model
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_experiment(cfg.mlflow.experiment)
    with mlflow.start_run(run_name="train-" + "-".join(f"{e}{v}" for e, v in horizon.versions)) as active:
        mlflow.set_tags({**lineage.tags(), contract.TAG_MODEL_INPUTS: contract.model_inputs(cfg.features).tag()})
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.log_dict(cfg.model_dump(mode="json"), "config.json")
        mlflow.log_dict(selection.report(), "search.json")
        mlflow.log_dict(evaluation.calibration_table(), "calibration.json")
        mlflow.log_figure(calibration_figure(evaluation, f"{name} {cfg.ctr.model}, {horizon}"), "calibration.png")
        try:
            max_diff = check_parity(spark_probabilities, onnx_probabilities, cfg.ctr.parity_atol)
        except ParityError:
            mlflow.set_tag(contract.TAG_PARITY, "failed")
            raise
        mlflow.set_tag(contract.TAG_PARITY, "passed")
        mlflow.log_metric("parity_max_abs_diff", max_diff)
        log.info("ONNX matches Spark on %d holdout rows (max difference %.2g)", len(spark_probabilities), max_diff)

        client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
        champion = registry.score_champion(client, name, holdout.columns, lambda other: auc(score(other, holdout)))
        gate = registry.decide(evaluation.auc, champion, cfg.ctr.min_auc_gain)
        mlflow.set_tags(gate.tags())
        if champion is not None and champion.auc is not None:
            mlflow.log_metric("champion_auc", champion.auc)
        log.info("quality gate: %s (%s)", gate.decision, gate.reason)
        versions = register_models(selection.model, onnx_model, name, horizon, {**lineage.tags(), **gate.tags()})
        registry.apply_decision(client, name, versions, gate)
        return active.info.run_id, versions, gate


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="batch_layer/train.py",
        description="Train the click-through model on a pinned bronze snapshot, publish the batch "
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
        help="pin bronze/EVENT at Delta version N, e.g. --version impressions=12 (repeatable; default: the latest of each)",
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
        raise argparse.ArgumentTypeError(f"a pinned version is EVENT=N, e.g. impressions=12, not {text!r}")
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
    args = parse_args(argv)
    setup_logging(args.verbose)
    cfg = load_config(args.config)
    with job_session(cfg, "batch-train") as spark:
        result = run(spark, cfg, args.versions, args.as_of)
    log.info("%s", result.summary())
    return result


if __name__ == "__main__":
    main()

"""Batch layer: train the click-through model from a pinned bronze snapshot.

One run reads bronze impressions and clicks at fixed Delta versions (the horizon), writes the
per-user and per-item batch views, builds a point-in-time training set, fits a Spark ML
logistic regression on all but the most recent impressions, evaluates it on those, exports it
to ONNX, checks that ONNX and Spark agree, and registers both in MLflow with the horizon.

    spark-submit batch_layer/train.py [--config conf/platform.yaml] [--impressions-version N]

(``lambda-ml submit batch_layer/train.py`` adds the platform's jars and settings.) Every step
but :func:`run` and :func:`main` is a function of DataFrames and config.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import mlflow
import numpy as np
import onnx
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.ml.feature import OneHotEncoder, StandardScaler, StringIndexer, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from batch_layer.onnx_export import ParityError, check_parity, export_onnx, onnx_click_probabilities, onnx_inputs
from batch_layer.registry import RegisteredVersions, register_models
from batch_layer.snapshot import Snapshot, read_snapshot
from batch_layer.views import build_views, write_views
from lambda_ml import contract
from lambda_ml.config import PlatformConfig, load_config
from lambda_ml.contract import Horizon
from lambda_ml.features import (
    LABEL,
    add_point_in_time_features,
    attribute_clicks,
    count_increments,
    dedup_events,
    definitions_hash,
    label_impressions,
    latest_event_time,
    model_input_columns,
)
from lambda_ml.logs import setup_logging
from lambda_ml.spark import get_spark

log = logging.getLogger(__name__)

CLICK_PROBABILITY = "click_probability"
# Rows of the holdout compared between ONNX and Spark: all of them up to this many.
PARITY_MAX_ROWS = 100_000
_EPSILON = 1e-15  # log loss clips probabilities away from 0 and 1


class TrainingError(RuntimeError):
    """The snapshot cannot yield a meaningful model (too little data, a single class...)."""


@dataclass(frozen=True)
class Evaluation:
    """Holdout metrics of a fitted model."""

    auc: float
    log_loss: float
    rows: int
    ctr: float  # observed click rate
    mean_prediction: float  # mean P(click): calibration at a glance

    def metrics(self) -> dict[str, float]:
        return {
            "auc": self.auc,
            "log_loss": self.log_loss,
            "holdout_ctr": self.ctr,
            "holdout_mean_prediction": self.mean_prediction,
        }


@dataclass(frozen=True)
class TrainResult:
    """What a batch training run produced."""

    run_id: str
    versions: RegisteredVersions
    horizon: Horizon
    auc: float
    log_loss: float
    rows: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"trained on {self.horizon}: {self.rows.get('train', 0)} training rows, "
            f"{self.rows.get('holdout', 0)} holdout rows, AUC {self.auc:.3f}, log loss {self.log_loss:.4f}; "
            f"registered Spark version {self.versions.spark} and ONNX version {self.versions.onnx} "
            f"(now champion) in MLflow run {self.run_id}"
        )


# --------------------------------------------------------------------------- pure transforms


def clean_events(snapshot: Snapshot) -> tuple[DataFrame, DataFrame]:
    """The snapshot's impressions and clicks, one row per event id."""
    return dedup_events(snapshot.impressions), dedup_events(snapshot.clicks)


def build_training_set(impressions: DataFrame, clicks: DataFrame, cfg: PlatformConfig, as_of: datetime) -> DataFrame:
    """Labelled impressions with point-in-time features.

    Columns: ``event_id, event_time, user_id, item_id``, the contract's model inputs (numeric as
    doubles) and ``label``. Inputs must be deduplicated; ``as_of`` is the latest event time in
    the snapshot (impressions whose attribution window is still open then are left out).
    """
    window = cfg.ctr.attribution_window_minutes
    attributed = attribute_clicks(impressions, clicks, window)
    labelled = label_impressions(impressions, attributed, window, as_of)
    with_features = add_point_in_time_features(labelled, count_increments(impressions, attributed))
    return with_features.select(
        "event_id", "event_time", "user_id", "item_id", *model_input_columns(with_features), F.col(LABEL)
    )


def split_by_time(df: DataFrame, holdout_fraction: float) -> tuple[DataFrame, DataFrame, datetime]:
    """Train on the past, hold out the most recent ``holdout_fraction`` of rows by event time.

    Returns ``(train, holdout, cutoff)``: the cutoff is the last training instant, holdout rows
    have ``event_time > cutoff``. Rows tied on the cutoff all train, so the holdout may be a
    few rows smaller than asked, and the model never sees a row from the holdout's instants.
    """
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {holdout_fraction}")
    micros = df.select(F.unix_micros("event_time").alias("micros"))
    # Exact for small sets, within 1e-4 of the rank on large ones: either way a sound cutoff.
    quantiles = micros.approxQuantile("micros", [1 - holdout_fraction], 1e-4)
    if not quantiles:
        raise TrainingError("no labelled impressions: nothing to split into train and holdout")
    cutoff = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(quantiles[0]))
    holdout_rows = F.col("event_time") > F.lit(cutoff)
    return df.where(~holdout_rows), df.where(holdout_rows), cutoff


def build_pipeline(cfg: PlatformConfig) -> Pipeline:
    """Device one-hot + standardised numeric features -> logistic regression.

    Unknown devices index as "unknown" and encode as all zeros (``handleInvalid="keep"`` with
    ``dropLast``): the one setting whose ONNX export matches Spark for unseen values.
    """
    (device,) = contract.CATEGORICAL_FEATURES
    return Pipeline(
        stages=[
            StringIndexer(inputCol=device, outputCol=f"{device}_index", handleInvalid="keep"),
            OneHotEncoder(
                inputCols=[f"{device}_index"], outputCols=[f"{device}_onehot"], handleInvalid="keep", dropLast=True
            ),
            VectorAssembler(inputCols=list(contract.NUMERIC_FEATURES), outputCol="numeric"),
            StandardScaler(inputCol="numeric", outputCol="numeric_scaled", withMean=True, withStd=True),
            VectorAssembler(inputCols=["numeric_scaled", f"{device}_onehot"], outputCol="features"),
            LogisticRegression(
                featuresCol="features",
                labelCol=LABEL,
                regParam=cfg.ctr.reg_param,
                maxIter=cfg.ctr.max_iter,
            ),
        ]
    )


def check_trainable(train: DataFrame, holdout: DataFrame) -> dict[str, int]:
    """Row and positive counts; fail with a plain reason if the split cannot train or evaluate.

    A numeric feature constant over the training rows is refused too: the model learns
    nothing from it, and the ONNX scaler would divide by its zero spread.
    """
    spreads = [F.stddev_pop(name).alias(name) for name in contract.NUMERIC_FEATURES]
    stats = train.agg(F.count("*").alias("rows"), F.sum(LABEL).alias("positives"), *spreads).first()
    held = holdout.agg(F.count("*").alias("rows"), F.sum(LABEL).alias("positives")).first()
    assert stats is not None and held is not None  # a global aggregate always has one row
    counts = {
        "train": int(stats["rows"]),
        "train_positives": int(stats["positives"] or 0),
        "holdout": int(held["rows"]),
        "holdout_positives": int(held["positives"] or 0),
    }
    for part in ("train", "holdout"):
        rows, positives = counts[part], counts[f"{part}_positives"]
        if positives == 0 or positives == rows:
            raise TrainingError(f"the {part} set has {rows} rows of which {positives} clicked: both classes are needed")
    constant = [name for name in contract.NUMERIC_FEATURES if not stats[name]]
    if constant:
        raise TrainingError(f"numeric features {constant} are constant over the {counts['train']} training rows")
    return counts


def score(model: PipelineModel, df: DataFrame) -> DataFrame:
    """``df`` scored: the model's columns plus ``click_probability`` (P(click) as a double)."""
    return model.transform(df).withColumn(CLICK_PROBABILITY, vector_to_array("probability")[1])


def evaluate(scored: DataFrame) -> Evaluation:
    """AUC, log loss, click rate and mean prediction of scored rows (see :func:`score`)."""
    auc = BinaryClassificationEvaluator(labelCol=LABEL, metricName="areaUnderROC").evaluate(scored)
    p = F.least(F.greatest(F.col(CLICK_PROBABILITY), F.lit(_EPSILON)), F.lit(1 - _EPSILON))
    row = scored.agg(
        F.count("*").alias("rows"),
        F.avg(-(F.col(LABEL) * F.log(p) + (1 - F.col(LABEL)) * F.log(1 - p))).alias("log_loss"),
        F.avg(LABEL).alias("ctr"),
        F.avg(CLICK_PROBABILITY).alias("mean_prediction"),
    ).first()
    assert row is not None
    if not row["rows"]:
        raise TrainingError("no rows to evaluate on")
    return Evaluation(
        auc=float(auc),
        log_loss=float(row["log_loss"]),
        rows=int(row["rows"]),
        ctr=float(row["ctr"]),
        mean_prediction=float(row["mean_prediction"]),
    )


# --------------------------------------------------------------------------- the job


def run(
    spark: SparkSession,
    cfg: PlatformConfig,
    impressions_version: int | None = None,
    clicks_version: int | None = None,
) -> TrainResult:
    """The whole batch run: snapshot -> views -> training set -> model -> ONNX -> MLflow.

    Nothing is registered unless ONNX reproduces Spark's holdout probabilities within
    ``ctr.parity_atol``; the MLflow run is then left FAILED with ``parity=failed``.
    """
    snapshot = read_snapshot(spark, cfg, impressions_version, clicks_version)
    horizon = snapshot.horizon
    log.info("pinned %s", horizon)
    impressions, clicks = (frame.cache() for frame in clean_events(snapshot))
    training = None
    try:
        as_of = latest_event_time(impressions, clicks)
        if as_of is None:
            raise TrainingError(f"{horizon} holds no events")
        window = cfg.ctr.attribution_window_minutes
        increments = count_increments(impressions, attribute_clicks(impressions, clicks, window))
        write_views(build_views(increments, horizon), cfg)

        training = build_training_set(impressions, clicks, cfg, as_of).cache()
        train, holdout, cutoff = split_by_time(training, cfg.ctr.holdout_fraction)
        rows = {"impressions": impressions.count(), "clicks": clicks.count(), **check_trainable(train, holdout)}
        rows["labelled"] = rows["train"] + rows["holdout"]
        log.info("labelled %d impressions up to %s; holdout after %s", rows["labelled"], as_of, cutoff)

        model = build_pipeline(cfg).fit(train)
        scored = score(model, holdout).cache()
        evaluation = evaluate(scored)
        log.info("holdout AUC %.4f, log loss %.4f over %d rows", evaluation.auc, evaluation.log_loss, evaluation.rows)

        onnx_model = export_onnx(model, spark, name=cfg.mlflow.registered_model)
        compared = scored.select(*contract.MODEL_INPUTS, CLICK_PROBABILITY).limit(PARITY_MAX_ROWS).toPandas()
        scored.unpersist()
        spark_p = compared[CLICK_PROBABILITY].to_numpy(dtype=np.float64)
        onnx_p = onnx_click_probabilities(onnx_model, onnx_inputs(compared))

        params = {
            **cfg.ctr.model_dump(),
            "labels_as_of": as_of.isoformat(),
            "holdout_after": cutoff.isoformat(),
            "feature_definitions_sha256": definitions_hash(),
        }
        metrics = {**evaluation.metrics(), **{f"rows_{k}": float(v) for k, v in rows.items()}}
        run_id, versions = log_and_register(cfg, horizon, params, metrics, model, onnx_model, spark_p, onnx_p)
    finally:
        for frame in (impressions, clicks, training):
            if frame is not None:
                frame.unpersist()
    return TrainResult(run_id, versions, horizon, evaluation.auc, evaluation.log_loss, rows)


def log_and_register(
    cfg: PlatformConfig,
    horizon: Horizon,
    params: dict[str, object],
    metrics: dict[str, float],
    model: PipelineModel,
    onnx_model: onnx.ModelProto,
    spark_probabilities: np.ndarray,
    onnx_probabilities: np.ndarray,
) -> tuple[str, RegisteredVersions]:
    """One MLflow run with the horizon, params, metrics and config; both models registered
    only if the parity check passes (else the run ends FAILED, tagged ``parity=failed``)."""
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_experiment(cfg.mlflow.experiment)
    with mlflow.start_run(run_name=f"train-{horizon.impressions}-{horizon.clicks}") as active:
        mlflow.set_tags({**horizon.tags(), contract.TAG_MODEL_INPUTS: ",".join(contract.MODEL_INPUTS)})
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.log_dict(cfg.model_dump(mode="json"), "config.json")
        try:
            max_diff = check_parity(spark_probabilities, onnx_probabilities, cfg.ctr.parity_atol)
        except ParityError:
            mlflow.set_tag(contract.TAG_PARITY, "failed")
            raise
        mlflow.set_tag(contract.TAG_PARITY, "passed")
        mlflow.log_metric("parity_max_abs_diff", max_diff)
        log.info("ONNX matches Spark on %d holdout rows (max difference %.2g)", len(spark_probabilities), max_diff)
        versions = register_models(model, onnx_model, cfg.mlflow.registered_model, horizon)
        return active.info.run_id, versions


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="batch_layer/train.py",
        description="Train the click-through model on a pinned bronze snapshot, publish the batch "
        "views and register the Spark and ONNX models in MLflow.",
    )
    parser.add_argument("--config", help="platform config file (default: $LAMBDA_ML_CONFIG or conf/platform.yaml)")
    parser.add_argument(
        "--impressions-version", type=_version, metavar="N", help="bronze impressions Delta version (default: latest)"
    )
    parser.add_argument("--clicks-version", type=_version, metavar="N", help="bronze clicks Delta version (default: latest)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


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
    # A session already running (a notebook, a test) is borrowed and left running.
    owns_session = SparkSession.getActiveSession() is None
    spark = get_spark(cfg, "batch-train")
    try:
        result = run(spark, cfg, args.impressions_version, args.clicks_version)
    finally:
        if owns_session:
            spark.stop()
    log.info("%s", result.summary())
    return result


if __name__ == "__main__":
    main()

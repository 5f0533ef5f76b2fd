"""The click-through application's batch update: a pinned snapshot -> a labelled, point-in-time
training set -> a model (``ctr.model``: logistic regression or gradient-boosted trees,
parameters chosen on a validation split of the training rows) fitted on all but the most
recent impressions and evaluated on those (AUC, log loss, calibration), exported to ONNX and
checked against Spark. The batch layer logs, gates and registers the candidate.

Every step but :meth:`CtrBatchUpdate.train` is a function of DataFrames and config.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import mlflow
import mlflow.spark
import numpy as np
import onnx
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lambda_ml import contract
from lambda_ml.apps import Quality, Registered, Snapshot, flat_params
from lambda_ml.config import PlatformConfig
from lambda_ml.metrics import split_by_time
from lambda_ml.features import (
    KIND,
    LABEL,
    event_window_features,
    latest_event_time,
    model_input_columns,
)
from lambda_ml_apps.ctr.evaluation import (
    CLICK_PROBABILITY,
    Evaluation,
    TrainingError,
    auc,
    calibration_figure,
    evaluate,
    in_sample,
    score,
)
from lambda_ml_apps.ctr.events import IMPRESSIONS, LABELS_FINAL_UNTIL, labelled_events, labels_final_until
from lambda_ml.spark import jvm_logger_off
from lambda_ml_apps.ctr.model_registry import register_models
from lambda_ml_apps.ctr.models import Selection, select_model
from lambda_ml_apps.ctr.onnx_export import ParityError, check_parity, export_onnx, onnx_click_probabilities, onnx_inputs

log = logging.getLogger(__name__)

# Rows of the holdout compared between ONNX and Spark: all of them up to this many.
PARITY_MAX_ROWS = 100_000


# --------------------------------------------------------------------------- pure transforms


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


# --------------------------------------------------------------------------- the contract


@dataclass
class CtrCandidate:
    """A click model trained on a snapshot: its Spark pipeline and ONNX export, its holdout
    evaluation, and the holdout rows (cached) the gate scores the champion on."""

    cfg: PlatformConfig
    selection: Selection
    evaluation: Evaluation
    onnx_model: onnx.ModelProto
    spark_probabilities: np.ndarray
    onnx_probabilities: np.ndarray
    holdout: DataFrame
    training: DataFrame
    quality: Quality
    metrics: Mapping[str, float]
    params: Mapping[str, str]
    horizon_text: str = ""

    def log_artifacts(self) -> None:
        """Search, calibration table and plot; then the ONNX-vs-Spark parity check, which
        refuses the model (tag ``parity=failed``) when they disagree."""
        name = self.cfg.mlflow.registered_model
        mlflow.set_tag(contract.TAG_MODEL_INPUTS, contract.model_inputs(self.cfg.features).tag())
        mlflow.log_dict(self.selection.report(), "search.json")
        mlflow.log_dict(self.evaluation.calibration_table(), "calibration.json")
        mlflow.log_figure(calibration_figure(self.evaluation, f"{name} {self.cfg.ctr.model}, {self.horizon_text}"), "calibration.png")
        try:
            max_diff = check_parity(self.spark_probabilities, self.onnx_probabilities, self.cfg.ctr.parity_atol)
        except ParityError:
            mlflow.set_tag(contract.TAG_PARITY, "failed")
            raise
        mlflow.set_tag(contract.TAG_PARITY, "passed")
        mlflow.log_metric("parity_max_abs_diff", max_diff)
        log.info("ONNX matches Spark on %d holdout rows (max difference %.2g)", len(self.spark_probabilities), max_diff)

    def score(self, version: Any) -> tuple[float | None, str]:
        """The AUC of a registered version on this holdout, from its Spark twin; None when it
        reads inputs the holdout lacks or has no Spark twin."""
        inputs = [name for name in version.tags.get(contract.TAG_MODEL_INPUTS, "").split(",") if name]
        missing = [name for name in inputs if name not in self.holdout.columns]
        if not inputs or missing:
            return None, f"it reads inputs the holdout lacks: {missing}" if missing else "it has no model_inputs tag"
        flavor = version.tags.get(contract.TAG_FLAVOR)
        twin = version.version if flavor == "spark" else version.tags.get(contract.TAG_SPARK_VERSION)
        if twin is None:
            return None, "it has no Spark twin to score with"
        with jvm_logger_off("org.apache.spark.ml.util.Instrumentation"):
            model = mlflow.spark.load_model(f"models:/{version.name}/{twin}")
        return auc(score(model, self.holdout)), ""

    def register(self, registered_model: str, tags: Mapping[str, str]) -> Registered:
        """Both flavours, the ONNX one served."""
        horizon = contract.Horizon.from_tags(tags)
        versions = register_models(self.selection.model, self.onnx_model, registered_model, horizon, dict(tags))
        return Registered(served=versions.onnx, others={"spark": versions.spark})

    def release(self) -> None:
        for frame in (self.holdout, self.training):
            frame.unpersist()


class CtrBatchUpdate:
    """The click-through application's batch update (the ``BatchUpdate`` contract)."""

    def train(self, spark: SparkSession, snapshot: Snapshot, events: DataFrame | None, cfg: PlatformConfig) -> CtrCandidate:
        """``events``: the snapshot's labelled feature events (``CtrFeatureEvents.batch``), cached."""
        if events is None:
            raise TrainingError("the click-through application needs its feature events")
        views = {
            entity: spark.read.format("delta").load(cfg.lake.table(*contract.view_table(entity))) for entity in cfg.features.entities
        }
        # Impressions from the cached events (one row each); clicks from bronze, attributed or not.
        counted = {
            "impressions": events.where(F.col(KIND) == IMPRESSIONS).count(),
            "clicks": snapshot["clicks"].select("event_id").distinct().count(),
        }
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
        rows = {**counted, **split, "train_fitted": fitted_counts["train"], "labelled": split["train"] + split["holdout"]}
        as_of = latest_event_time(events)
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
            evaluation.auc, evaluation.log_loss, evaluation.ece, evaluation.rows,
        )  # fmt: skip
        onnx_model = export_onnx(model, spark, inputs, name=cfg.mlflow.registered_model)
        compared = scored.select(*inputs.names, CLICK_PROBABILITY).limit(PARITY_MAX_ROWS).toPandas()
        scored.unpersist()
        spark_p = compared[CLICK_PROBABILITY].to_numpy(dtype=np.float64)
        onnx_p = onnx_click_probabilities(onnx_model, onnx_inputs(compared, inputs))
        params = {
            **flat_params(cfg.ctr.model_dump(mode="json")),
            **flat_params(selection.params, "chosen"),
            "labels_as_of": "" if as_of is None else as_of.isoformat(),
            # Every impression at or before this instant has its final label in the training set:
            # an online model starting from this run goes on after it (lambda_ml_apps.ctr.online).
            LABELS_FINAL_UNTIL: "" if as_of is None else labels_final_until(as_of, cfg.ctr.attribution_window_minutes).isoformat(),
            "holdout_after": cutoff.isoformat(),
            "validation_after": "" if selection.validation_after is None else selection.validation_after.isoformat(),
        }
        metrics = {**evaluation.metrics(), **{f"rows_{k}": float(v) for k, v in rows.items()}}
        return CtrCandidate(
            cfg, selection, evaluation, onnx_model, spark_p, onnx_p, holdout, training,
            Quality("auc", evaluation.auc, higher_is_better=True, margin=cfg.ctr.min_auc_gain),
            metrics, params, str(snapshot.horizon),
        )  # fmt: skip

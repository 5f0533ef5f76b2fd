"""Online evaluation: the prediction log joined with the clicks that followed, scored per model
version and logged to MLflow. Run it with ``lambda-ml batch evaluate`` or
``spark-submit lambda_ml_apps/ctr/online_eval.py`` (``--every N`` repeats it, one MLflow step per pass).

- **Predictions** come from ``kafka.topics.predictions`` (read whole, as a batch): the records
  the service and the stream scorer write (see ``serving_layer.prediction_log``). Only records
  with an impression ``event_id`` and one ``version`` can be joined and attributed; one record
  per (event id, version) is kept (the stream scorer delivers at least once, and a client may ask
  twice).
- **Clicks** come from the bronze clicks table (the master copy the speed layer lands).
- **Label**: 1 when a click on the impression happened within ``ctr.attribution_window_minutes``
  of the impression's time (its ``event_time``, else the time it was scored), else 0. Only
  impressions whose window closed before ``--until`` (default: the latest click in bronze, so a
  lagging speed layer never turns late clicks into negatives) are counted.
- **Metrics** per version (and per A/B arm): rows, positives, click rate, mean prediction, log
  loss and the exact ROC AUC (no down-sampling), as ``v<version>.<metric>`` and
  ``arm.<arm>.<metric>`` in one MLflow run of the experiment ``<mlflow.experiment>-online``
  (tag ``layer=online``). With ``--tag-versions`` (default), each version's AUC is also written
  on the registered version as ``quality.progressive_auc``, which the ``quality`` policy reads.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType, IntegerType, LongType, StringType, StructField, StructType

from lambda_ml import contract
from lambda_ml.config import PlatformConfig, load_command_config
from lambda_ml.logs import setup_logging
from lambda_ml.metrics import log_loss
from lambda_ml.spark import job_session

log = logging.getLogger(__name__)


# The prediction-log record (serving_layer.prediction_log.RECORD_FIELDS), as Spark reads it.
PREDICTION_SCHEMA = StructType(
    [
        StructField("request_id", StringType()),
        StructField("event_id", StringType()),
        StructField("user_id", StringType()),
        StructField("item_id", StringType()),
        StructField("device", StringType()),
        StructField("position", IntegerType()),
        StructField("event_time", StringType()),
        StructField("scored_at", StringType()),
        StructField("registered_model", StringType()),
        StructField("policy", StringType()),
        StructField("arm", StringType()),
        StructField("version", LongType()),
        StructField("versions", ArrayType(LongType())),
        StructField("probability", DoubleType()),
        StructField("source", StringType()),
    ]
)


def read_predictions(spark: SparkSession, cfg: PlatformConfig, topic: str | None = None) -> DataFrame:
    """Every record on the predictions topic now, parsed (unparsable ones dropped)."""
    raw = (
        spark.read.format("kafka")
        .option("kafka.bootstrap.servers", cfg.kafka.bootstrap_servers)
        .option("subscribe", topic or cfg.kafka.topics.predictions.name)
        .option("startingOffsets", "earliest")
        .option("endingOffsets", "latest")
        .load()
    )
    parsed = raw.select(F.from_json(F.col("value").cast("string"), PREDICTION_SCHEMA).alias("r")).select("r.*")
    return parsed.where(F.col("probability").isNotNull())


def read_clicks(spark: SparkSession, cfg: PlatformConfig) -> DataFrame:
    """(impression_id, event_time) of every click in bronze."""
    return spark.read.format("delta").load(cfg.lake.table("bronze", "clicks")).select("impression_id", "event_time")


def label_predictions(predictions: DataFrame, clicks: DataFrame, window: timedelta, until: datetime) -> DataFrame:
    """One row per (event id, version) whose attribution window closed by ``until``:
    ``event_id, version, arm, probability, impression_us, label``."""
    window_us = int(window.total_seconds() * 1_000_000)
    until_us = int(until.timestamp() * 1_000_000)
    impression_us = F.unix_micros(F.coalesce(F.to_timestamp("event_time"), F.to_timestamp("scored_at")))
    scored = (
        predictions.where(F.col("event_id").isNotNull() & F.col("version").isNotNull())
        .withColumn("impression_us", impression_us)
        .where(F.col("impression_us") + window_us <= until_us)
        .dropDuplicates(["event_id", "version"])
        .select("event_id", "version", "arm", "probability", "impression_us")
    )
    click_us = F.unix_micros(clicks["event_time"])
    clicked = (
        scored.select("event_id", "impression_us")
        .distinct()
        .join(clicks, F.col("event_id") == clicks["impression_id"])
        .where((click_us >= F.col("impression_us")) & (click_us <= F.col("impression_us") + window_us))
        .select(F.col("event_id").alias("clicked_id"))
        .distinct()
    )
    return (
        scored.join(clicked, scored["event_id"] == clicked["clicked_id"], "left")
        .withColumn("label", F.when(F.col("clicked_id").isNotNull(), 1.0).otherwise(0.0))
        .drop("clicked_id")
    )


@dataclass(frozen=True)
class OnlineMetrics:
    """Live metrics of one group of labelled predictions (a version, or an A/B arm)."""

    rows: int
    positives: int
    mean_prediction: float
    log_loss: float
    auc: float | None  # None with a single class

    def as_dict(self, prefix: str) -> dict[str, float]:
        values = {
            "rows": float(self.rows),
            "positives": float(self.positives),
            "ctr": self.positives / self.rows,
            "mean_prediction": self.mean_prediction,
            "log_loss": self.log_loss,
        }
        if self.auc is not None:
            values["auc"] = self.auc
        return {f"{prefix}.{k}": v for k, v in values.items()}


def group_metrics(labelled: DataFrame) -> OnlineMetrics | None:
    """Metrics of labelled rows (``label``, ``probability``); None without rows."""
    row = labelled.agg(
        F.count("*").alias("rows"),
        F.sum("label").alias("positives"),
        F.avg("probability").alias("mean_prediction"),
        F.avg(log_loss(F.col("probability"), F.col("label"))).alias("log_loss"),
    ).first()
    if row is None or not row["rows"]:
        return None
    rows, positives = int(row["rows"]), int(row["positives"])
    auc = None
    if 0 < positives < rows:
        # numBins=0: the exact curve (the default down-samples to 1000 bins).
        evaluator = BinaryClassificationEvaluator(labelCol="label", rawPredictionCol="probability", metricName="areaUnderROC", numBins=0)
        auc = float(evaluator.evaluate(labelled))
    return OnlineMetrics(rows, positives, float(row["mean_prediction"]), float(row["log_loss"]), auc)


def evaluate_versions(labelled: DataFrame) -> tuple[dict[int, OnlineMetrics], dict[str, OnlineMetrics]]:
    """Metrics per version, and per A/B arm (records of the ab policy only)."""
    labelled = labelled.cache()
    try:
        by_version: dict[int, OnlineMetrics] = {}
        for (version,) in labelled.select("version").distinct().orderBy("version").collect():
            if (found := group_metrics(labelled.where(F.col("version") == version))) is not None:
                by_version[int(version)] = found
        by_arm: dict[str, OnlineMetrics] = {}
        for (arm,) in labelled.where(F.col("arm").isNotNull()).select("arm").distinct().orderBy("arm").collect():
            if (found := group_metrics(labelled.where(F.col("arm") == arm))) is not None:
                by_arm[str(arm)] = found
        return by_version, by_arm
    finally:
        labelled.unpersist()


def latest_click_time(clicks: DataFrame) -> datetime | None:
    row = clicks.agg(F.max("event_time").alias("latest")).first()
    return None if row is None else row["latest"]


@dataclass(frozen=True)
class EvaluationPass:
    until: datetime | None
    by_version: dict[int, OnlineMetrics]
    by_arm: dict[str, OnlineMetrics]

    def metrics(self) -> dict[str, float]:
        found: dict[str, float] = {}
        for version, m in self.by_version.items():
            found.update(m.as_dict(f"v{version}"))
        for arm, m in self.by_arm.items():
            found.update(m.as_dict(f"arm.{arm}"))
        return found


def evaluate_once(spark: SparkSession, cfg: PlatformConfig, until: datetime | None = None, topic: str | None = None) -> EvaluationPass:
    """One pass: read, join, label and score; nothing logged."""
    clicks = read_clicks(spark, cfg)
    until = until or latest_click_time(clicks)
    if until is None:
        log.warning("no clicks in %s yet: nothing can be labelled", cfg.lake.table("bronze", "clicks"))
        return EvaluationPass(None, {}, {})
    window = timedelta(minutes=cfg.ctr.attribution_window_minutes)
    labelled = label_predictions(read_predictions(spark, cfg, topic), clicks, window, until)
    by_version, by_arm = evaluate_versions(labelled)
    return EvaluationPass(until, by_version, by_arm)


def tag_versions(cfg: PlatformConfig, result: EvaluationPass, min_rows: int) -> list[int]:
    """Write each version's live AUC on its registry entry (``quality.progressive_auc``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.mlflow.tracking_uri)
    tagged = []
    for version, m in result.by_version.items():
        if m.auc is None or m.rows < min_rows:
            continue
        client.set_model_version_tag(cfg.mlflow.registered_model, str(version), contract.TAG_QUALITY_SCORE, f"{m.auc:.6f}")
        tagged.append(version)
    return tagged


def run(
    spark: SparkSession,
    cfg: PlatformConfig,
    *,
    until: datetime | None = None,
    topic: str | None = None,
    passes: int = 1,
    every_s: float = 60.0,
    tag: bool = True,
    min_rows: int = 100,
) -> tuple[str, list[EvaluationPass]]:
    """``passes`` evaluation passes ``every_s`` apart (0: until interrupted), logged as steps of
    one MLflow run; returns the run id and the passes."""
    import mlflow

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_experiment(f"{cfg.mlflow.experiment}-online")
    done: list[EvaluationPass] = []
    with mlflow.start_run(run_name="online-evaluation") as active:
        mlflow.set_tags({"layer": "online", "registered_model": cfg.mlflow.registered_model})
        mlflow.log_params({
            "attribution_window_minutes": cfg.ctr.attribution_window_minutes,
            "predictions_topic": topic or cfg.kafka.topics.predictions.name,
            "until": until.isoformat() if until else "latest click",
        })  # fmt: skip
        step = 0
        while passes == 0 or step < passes:
            if step:
                time.sleep(every_s)
            result = evaluate_once(spark, cfg, until, topic)
            done.append(result)
            if result.by_version:
                mlflow.log_metrics(result.metrics(), step=step)
            for version, m in result.by_version.items():
                auc = "n/a (one class)" if m.auc is None else f"{m.auc:.4f}"
                log.info("version %d: %d labelled predictions, %d clicks, AUC %s, log loss %.4f (until %s)",
                         version, m.rows, m.positives, auc, m.log_loss, result.until)  # fmt: skip
            if not result.by_version:
                log.info("no labelled predictions yet (until %s)", result.until)
            if tag:
                tagged = tag_versions(cfg, result, min_rows)
                if tagged:
                    log.info("wrote %s on version(s) %s", contract.TAG_QUALITY_SCORE, ", ".join(map(str, tagged)))
            step += 1
        return active.info.run_id, done


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lambda_ml_apps/ctr/online_eval.py",
        description="Join the prediction log with the clicks that followed and log live AUC, log loss and counts "
        "per model version and A/B arm to MLflow (experiment <mlflow.experiment>-online).",
    )
    parser.add_argument("--config", metavar="FILE", help="platform config (default: $LAMBDA_ML_CONFIG or conf/platform.yaml)")
    parser.add_argument("--until", type=datetime.fromisoformat, metavar="TIME",
                        help="count impressions whose window closed by this ISO-8601 time (default: the latest click in bronze)")  # fmt: skip
    parser.add_argument("--topic", help="predictions topic (default: kafka.topics.predictions.name)")
    parser.add_argument("--every", type=float, metavar="SECONDS", help="repeat every SECONDS until interrupted (default: once)")
    parser.add_argument("--no-tag-versions", dest="tag", action="store_false",
                        help=f"do not write {contract.TAG_QUALITY_SCORE} on the registered versions")  # fmt: skip
    parser.add_argument("--min-rows", type=int, default=100, help="labelled rows a version needs before it is tagged (default: 100)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if args.until is not None and args.until.tzinfo is None:
        parser.error("--until needs a time zone, e.g. 2026-11-22T10:00:00+00:00")
    if args.every is not None and args.every <= 0:
        parser.error(f"--every must be positive, not {args.every}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    cfg = load_command_config(args.config)
    if cfg is None:
        return 2
    try:
        with job_session(cfg, "online-eval") as spark:
            run_id, _ = run(
                spark, cfg, until=args.until, topic=args.topic, passes=0 if args.every else 1, every_s=args.every or 0,
                tag=args.tag, min_rows=args.min_rows,
            )  # fmt: skip
    except KeyboardInterrupt:
        return 130
    log.info("online evaluation logged to MLflow run %s", run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())

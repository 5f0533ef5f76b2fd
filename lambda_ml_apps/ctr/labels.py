"""Silver labels: impressions ⋈ clicks as a watermarked stream-stream join (RocksDB state).

An impression is labelled 1.0 as soon as a click for it arrives within the attribution window
(``ctr.attribution_window_minutes``), and 0.0 once the watermark has passed its window with no
such click: a left outer join on the event ids and the same time-range condition as the batch
layer's :func:`lambda_ml.features.attribute_clicks`. Each micro-batch is merged into
``silver/labels`` by impression id (a label only ever goes from 0 to 1), so a replayed batch
changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import DataStreamWriter, StreamingQuery
from pyspark.sql.types import DoubleType, LongType, StructField, StructType

from lambda_ml.config import PlatformConfig
from lambda_ml.catalog import SILVER_LABELS_TABLE
from lambda_ml.contract import increment_version_column
from lambda_ml.features import LABEL
from lambda_ml_apps.ctr.events import within_attribution_window
from lambda_ml.schemas import EventType, event_type
from speed_layer.ingest import CHANGE_FEED
from speed_layer.silver import silver_events

log = logging.getLogger(__name__)

IMPRESSION_VERSION = increment_version_column("impressions")


def label_schema(impression: EventType) -> StructType:
    """The silver labels' schema: the impression's fields, its bronze version and its label."""
    return StructType(
        [StructField(f.name, f.spark_type, nullable=False) for f in impression.fields]
        + [StructField(IMPRESSION_VERSION, LongType(), nullable=False), StructField(LABEL, DoubleType(), nullable=False)]
    )


def labels_path(cfg: PlatformConfig) -> str:
    return cfg.lake.table(*SILVER_LABELS_TABLE)


def join_labels(impressions: DataFrame, clicks: DataFrame, window_minutes: int) -> DataFrame:
    """Impressions with ``label``: one row per attributed click (1.0), or one row with 0.0 for an
    impression without one. On streams both inputs need a watermark on ``event_time``; the 0.0
    rows come once the watermark has passed the impression's window."""
    imp = impressions
    clk = clicks.select(F.col("event_id").alias("_click_id"), "impression_id", F.col("event_time").alias("_click_time"))
    condition = (clk["impression_id"] == imp["event_id"]) & within_attribution_window(
        imp["event_time"], clk["_click_time"], window_minutes
    )
    joined = imp.join(clk, condition, "leftOuter")
    label = F.when(F.col("_click_id").isNotNull(), F.lit(1.0)).otherwise(F.lit(0.0))
    return joined.select(*[imp[c] for c in imp.columns], label.alias(LABEL))


def merge_labels(batch: DataFrame, batch_id: int, cfg: PlatformConfig) -> int:
    """Merge one micro-batch of :func:`join_labels` rows into the silver labels; return the rows."""
    spark = batch.sparkSession
    columns = [f.name for f in label_schema(event_type(cfg, "impressions")).fields]
    # An impression clicked twice has two rows: it is positive.
    labels = batch.groupBy(*[c for c in columns if c != LABEL]).agg(F.max(LABEL).alias(LABEL)).persist()
    try:
        rows = labels.count()
        if rows:
            target = DeltaTable.forPath(spark, labels_path(cfg)).alias("t")
            (
                target.merge(labels.alias("s"), "t.event_id = s.event_id")
                .whenMatchedUpdate(condition=f"s.{LABEL} > t.{LABEL}", set={LABEL: f"s.{LABEL}"})
                .whenNotMatchedInsertAll()
                .execute()
            )
    finally:
        labels.unpersist()
    log.info("labels micro-batch %d: %d impressions labelled", batch_id, rows)
    return rows


def ensure_labels_table(spark: SparkSession, cfg: PlatformConfig) -> None:
    """Create ``silver/labels`` if needed, with its change feed on (the online model reads the
    newly labelled impressions from it); a table created without it gets it turned on."""
    path = labels_path(cfg)
    table = DeltaTable.createIfNotExists(spark).location(path).addColumns(label_schema(event_type(cfg, "impressions"))).property(CHANGE_FEED, "true").execute()
    if table.detail().first()["properties"].get(CHANGE_FEED) != "true":
        spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('{CHANGE_FEED}' = 'true')")
        log.info("%s: change feed turned on", path)


def start_labels(spark: SparkSession, cfg: PlatformConfig, trigger: Callable[[DataStreamWriter], DataStreamWriter]) -> StreamingQuery:
    """Start the label join: bronze impressions and clicks (deduplicated) -> ``silver/labels``."""
    from speed_layer.app import checkpoint

    ensure_labels_table(spark, cfg)
    streams = silver_events(spark, cfg, ["impressions", "clicks"])
    joined = join_labels(streams["impressions"], streams["clicks"], cfg.ctr.attribution_window_minutes)
    writer = (
        joined.writeStream.queryName("labels")
        .option("checkpointLocation", checkpoint(cfg, "labels"))
        .foreachBatch(lambda batch, batch_id: merge_labels(batch, batch_id, cfg))
    )
    query = trigger(writer).start()
    log.info("labels query started: bronze -> %s", labels_path(cfg))
    return query

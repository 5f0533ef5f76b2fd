"""The streams the silver path starts from: bronze tables read through their change feed, one
row per event id within the watermark.

Bronze keeps every Kafka delivery (the immutable master copy); duplicates are dropped here, on
the way to the labels and the feature increments, with ``dropDuplicatesWithinWatermark``: a
resent event whose first copy is less than ``speed.watermark_minutes`` of event time behind the
newest event seen is dropped. Each row keeps the bronze Delta version it was committed in, so
that the serving layer can tell the rows a batch horizon already covers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lambda_ml.config import PlatformConfig
from lambda_ml.contract import increment_version_column
from lambda_ml.schemas import event_type as declared_event_type
from speed_layer.ingest import CHANGE_FEED, bronze_path, ensure_tables

log = logging.getLogger(__name__)


def first_change_feed_version(spark: SparkSession, path: str) -> int:
    """The first version of a bronze table whose changes are recorded: 0 for a table created
    with its change feed on, else the commit that turned it on (what came before is left to the
    batch layer)."""
    history = DeltaTable.forPath(spark, path).history().select("version", "operation", "operationParameters")
    turned_on = history.where(
        (F.col("operation") == "SET TBLPROPERTIES") & F.col("operationParameters.properties").contains(CHANGE_FEED)
    ).agg(F.max("version")).first()
    version = 0 if turned_on is None or turned_on[0] is None else int(turned_on[0])
    if version:
        log.warning("%s recorded changes from version %d on: earlier events reach serving through the batch layer", path, version)
    return version


def bronze_stream(spark: SparkSession, cfg: PlatformConfig, event_type: str) -> DataFrame:
    """New rows of a bronze table as a stream: the event's fields and ``<event type>_version``.
    The table must exist (:func:`speed_layer.ingest.ensure_tables`)."""
    path = bronze_path(cfg, event_type)
    changes = (
        spark.readStream.format("delta")
        .option("readChangeFeed", "true")
        .option("startingVersion", first_change_feed_version(spark, path))
        .option("maxFilesPerTrigger", cfg.speed.max_files_per_trigger)
        .load(path)
    )
    return changes.where(F.col("_change_type") == "insert").select(
        *declared_event_type(cfg, event_type).field_names, F.col("_commit_version").alias(increment_version_column(event_type))
    )


def deduplicated(events: DataFrame, watermark_minutes: int) -> DataFrame:
    """One row per ``event_id`` within the watermark, the first delivery kept (static or streaming)."""
    return events.withWatermark("event_time", f"{int(watermark_minutes)} minutes").dropDuplicatesWithinWatermark(["event_id"])


def silver_events(spark: SparkSession, cfg: PlatformConfig, event_types: Sequence[str] | None = None) -> dict[str, DataFrame]:
    """Deduplicated streams of the given event types (default: every declared one) from bronze,
    each with its bronze version column."""
    ensure_tables(spark, cfg)
    names = list(cfg.events.types if event_types is None else event_types)
    return {name: deduplicated(bronze_stream(spark, cfg, name), cfg.speed.watermark_minutes) for name in names}

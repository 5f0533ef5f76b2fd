"""Feature and label definitions of the click-through application, written once for both
engines: every function takes and returns Spark DataFrames (or Columns) and uses only
operations that work on static frames (the batch layer) and on a micro-batch's static frame
(the speed layer's ``foreachBatch``).

The vocabulary:

- An **attributed click** is a click (deduplicated by ``event_id``) whose impression is known
  and whose event time lies in ``[impression time, impression time + attribution window]``.
  Clicks without an impression, or after the window, are not counted anywhere.
- A **label** is 1.0 for an impression with at least one attributed click, 0.0 for one without,
  and only exists once the impression's window has closed (``impression time + window <= as_of``).
- A **count increment** is one row ``(user_id, item_id, event_time, impressions, clicks)`` worth
  ``(1, 0)`` per impression at its event time and ``(0, 1)`` per attributed click at the click's
  event time. Entity counts are sums of increments, so they are monoids: counts over a snapshot
  plus counts over the increments after it equal counts over both.
- A **point-in-time count** of an impression sums the increments of its user (or item) strictly
  before the impression's event time: its own click, events at the same instant and later events
  never leak into its features.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from lambda_ml import contract

# Columns of count increments, in order.
INCREMENT_COLUMNS = ("user_id", "item_id", "event_time", "impressions", "clicks")
LABEL = "label"
_TARGET = "_pit_target"
_ORDER = "_pit_micros"


@dataclass(frozen=True)
class Entity:
    """An entity the platform counts impressions and clicks for."""

    key: str  # id column in events and in its view
    features: tuple[str, str]  # (impressions feature, clicks feature), names from the contract
    view: tuple[str, ...]  # lake table of its batch view


USER = Entity("user_id", contract.USER_COUNT_FEATURES, contract.USER_VIEW)
ITEM = Entity("item_id", contract.ITEM_COUNT_FEATURES, contract.ITEM_VIEW)
ENTITIES = (USER, ITEM)


def dedup_events(events: DataFrame) -> DataFrame:
    """One row per ``event_id``: bronze keeps every Kafka delivery, a resent event counts once."""
    return events.dropDuplicates(["event_id"])


def _minutes(minutes: int) -> Column:
    # A literal interval: foldable, so a streaming join can derive its state bound from it.
    return F.expr(f"INTERVAL {int(minutes)} MINUTES")


def within_attribution_window(impression_time: Column, click_time: Column, window_minutes: int) -> Column:
    """True when a click at ``click_time`` is attributed to an impression at ``impression_time``.

    Both ends are inclusive. Written as a time-range condition so that the speed layer can use
    it in a watermarked stream-stream join.
    """
    if window_minutes <= 0:
        raise ValueError(f"attribution window must be positive, got {window_minutes} minutes")
    return (click_time >= impression_time) & (click_time <= impression_time + _minutes(window_minutes))


def attribute_clicks(impressions: DataFrame, clicks: DataFrame, window_minutes: int) -> DataFrame:
    """Attributed clicks with their impression's user and item.

    Returns ``click_id, impression_id, event_time`` (the click's), ``impression_time,
    user_id, item_id``. Both inputs must already be deduplicated.
    """
    imp = impressions.select(
        F.col("event_id").alias("_imp_event_id"),
        F.col("event_time").alias("impression_time"),
        "user_id",
        "item_id",
    )
    clk = clicks.select(F.col("event_id").alias("click_id"), "impression_id", "event_time")
    condition = (clk["impression_id"] == imp["_imp_event_id"]) & within_attribution_window(
        imp["impression_time"], clk["event_time"], window_minutes
    )
    return clk.join(imp, condition, "inner").select(
        "click_id", "impression_id", "event_time", "impression_time", "user_id", "item_id"
    )


def label_impressions(impressions: DataFrame, attributed: DataFrame, window_minutes: int, as_of: datetime) -> DataFrame:
    """Impressions whose attribution window closed by ``as_of``, with ``label`` 1.0 or 0.0.

    ``attributed`` is the output of :func:`attribute_clicks`. An impression whose window is
    still open at ``as_of`` (``event_time + window > as_of``) has no label yet and is dropped.
    """
    clicked = attributed.select(F.col("impression_id").alias("_clicked_id")).distinct()
    closed_before = F.lit(as_of) - _minutes(window_minutes)
    return (
        impressions.where(F.col("event_time") <= closed_before)
        .join(clicked, F.col("event_id") == F.col("_clicked_id"), "left")
        .withColumn(LABEL, F.when(F.col("_clicked_id").isNotNull(), 1.0).otherwise(0.0))
        .drop("_clicked_id")
    )


def latest_event_time(*frames: DataFrame) -> datetime | None:
    """The latest ``event_time`` in any of the frames (UTC), or None if all are empty.

    Labels are final up to this instant: it is the batch layer's ``as_of``.
    """
    latest: int | None = None
    for frame in frames:
        row = frame.agg(F.max(F.unix_micros("event_time"))).first()
        value = None if row is None else row[0]
        if value is not None and (latest is None or value > latest):
            latest = int(value)
    if latest is None:
        return None
    # Through epoch microseconds: exact, and independent of the driver's local time zone.
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=latest)


def count_increments(impressions: DataFrame, attributed: DataFrame) -> DataFrame:
    """The count increments of impressions (at their time) and attributed clicks (at theirs)."""

    def worth(shown: int, clicked: int) -> list[Column]:
        return [F.lit(shown).cast("long").alias("impressions"), F.lit(clicked).cast("long").alias("clicks")]

    shown = impressions.select("user_id", "item_id", "event_time", *worth(1, 0))
    clicked = attributed.select("user_id", "item_id", "event_time", *worth(0, 1))
    return shown.unionByName(clicked)


def entity_counts(increments: DataFrame, entity: Entity) -> DataFrame:
    """Total ``impressions`` and ``clicks`` per entity key over the given increments."""
    return increments.groupBy(entity.key).agg(
        F.sum("impressions").cast("long").alias("impressions"),
        F.sum("clicks").cast("long").alias("clicks"),
    )


def point_in_time_counts(targets: DataFrame, increments: DataFrame, entity: Entity) -> DataFrame:
    """``targets`` with the entity's impressions and clicks strictly before each row's ``event_time``.

    ``targets`` needs the entity's key and ``event_time``; the two count columns are named by
    ``entity.features`` (e.g. ``user_impressions, user_clicks``) and are 0 when nothing came
    before. One sort per entity key, no self-join.
    """
    impressions_col, clicks_col = entity.features
    marked = targets.withColumn(_TARGET, F.lit(True)).withColumn("_inc_impressions", F.lit(0).cast("long"))
    marked = marked.withColumn("_inc_clicks", F.lit(0).cast("long"))
    events = increments.select(
        entity.key,
        "event_time",
        F.col("impressions").alias("_inc_impressions"),
        F.col("clicks").alias("_inc_clicks"),
        F.lit(False).alias(_TARGET),
    )
    # A range frame ending one microsecond before the row: strictly earlier events only.
    before = Window.partitionBy(entity.key).orderBy(F.col(_ORDER)).rangeBetween(Window.unboundedPreceding, -1)
    combined = marked.unionByName(events, allowMissingColumns=True).withColumn(_ORDER, F.unix_micros("event_time"))
    counted = combined.withColumn(
        impressions_col, F.coalesce(F.sum("_inc_impressions").over(before), F.lit(0)).cast("long")
    ).withColumn(clicks_col, F.coalesce(F.sum("_inc_clicks").over(before), F.lit(0)).cast("long"))
    return counted.where(F.col(_TARGET)).drop(_TARGET, _ORDER, "_inc_impressions", "_inc_clicks")


def add_point_in_time_features(targets: DataFrame, increments: DataFrame) -> DataFrame:
    """``targets`` with every entity's point-in-time counts (the contract's count features)."""
    for entity in ENTITIES:
        targets = point_in_time_counts(targets, increments, entity)
    return targets


def model_input_columns(df: DataFrame) -> list[Column]:
    """The contract's model inputs as columns: numeric features as doubles, device as string."""
    numeric = [F.col(name).cast("double").alias(name) for name in contract.NUMERIC_FEATURES]
    categorical = [F.col(name).cast("string").alias(name) for name in contract.CATEGORICAL_FEATURES]
    return numeric + categorical


def definitions_hash() -> str:
    """SHA-256 of this module's source: logged with every model so a changed definition shows."""
    return hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()

"""The click-through application's events: clicks attributed to their impressions, labels,
and the feature events the declarations aggregate (impressions at their time, attributed clicks
at the click's time with their impression's fields), the same rules on a static snapshot (the
batch layer) and on streams (the speed layer's increments and labels).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from lambda_ml import contract
from lambda_ml.apps import Snapshot
from lambda_ml.config import FeaturesConfig, PlatformConfig
from lambda_ml.contract import increment_version_column
from lambda_ml.features import KIND, LABEL, dedup_events, latest_event_time
from lambda_ml.partial_buckets import FeatureEvent, earliest_copies
from lambda_ml.schemas import event_type

IMPRESSIONS, CLICKS = "impressions", "clicks"


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


def attribute_clicks(
    impressions: DataFrame,
    clicks: DataFrame,
    window_minutes: int,
    impression_extra: Sequence[str] = (),
    click_extra: Sequence[str] = (),
) -> DataFrame:
    """Attributed clicks with their impression's fields.

    Returns ``click_id, impression_id, event_time`` (the click's), ``impression_time`` and the
    impression's other columns (``user_id, item_id, device, position``), then the
    ``impression_extra`` and ``click_extra`` columns carried along (the speed layer carries the
    bronze versions). Both inputs must already be deduplicated; on streams, both need a
    watermark on ``event_time`` (a stream-stream join).
    """
    fields = [c for c in impressions.columns if c not in ("event_id", "event_time", *impression_extra)]
    imp = impressions.select(
        F.col("event_id").alias("_imp_event_id"), F.col("event_time").alias("impression_time"), *fields, *impression_extra
    )
    clk = clicks.select(F.col("event_id").alias("click_id"), "impression_id", "event_time", *click_extra)
    condition = (clk["impression_id"] == imp["_imp_event_id"]) & within_attribution_window(
        imp["impression_time"], clk["event_time"], window_minutes
    )
    return clk.join(imp, condition, "inner").select(
        "click_id", "impression_id", "event_time", "impression_time", *fields, *impression_extra, *click_extra
    )


# The training run's param naming labels_final_until(): the online model goes on after it.
LABELS_FINAL_UNTIL = "labels_final_until"


def labels_final_until(as_of: datetime, window_minutes: int) -> datetime:
    """The instant up to which, at ``as_of``, every impression's label is final (its attribution
    window closed): the batch layer labels exactly the impressions at or before it.

    >>> labels_final_until(datetime(2026, 1, 1, 12, 0), 30)
    datetime.datetime(2026, 1, 1, 11, 30)
    """
    return as_of - timedelta(minutes=window_minutes)


def impressions_with_labels(
    impressions: DataFrame, attributed: DataFrame, window_minutes: int, as_of: datetime
) -> DataFrame:
    """Every impression with ``label``: 1.0 or 0.0 once its attribution window closed by
    ``as_of``, null while it is still open (after :func:`labels_final_until`).

    ``attributed`` is the output of :func:`attribute_clicks`.
    """
    clicked = attributed.select(F.col("impression_id").alias("_clicked_id")).distinct()
    closed = F.col("event_time") <= F.lit(labels_final_until(as_of, window_minutes))
    return (
        impressions.join(clicked, F.col("event_id") == F.col("_clicked_id"), "left")
        .withColumn(LABEL, F.when(closed, F.when(F.col("_clicked_id").isNotNull(), 1.0).otherwise(0.0)))
        .drop("_clicked_id")
    )


def label_impressions(impressions: DataFrame, attributed: DataFrame, window_minutes: int, as_of: datetime) -> DataFrame:
    """Impressions whose attribution window closed by ``as_of``, with ``label`` 1.0 or 0.0;
    the ones still open have no label yet and are dropped (see :func:`impressions_with_labels`)."""
    return impressions_with_labels(impressions, attributed, window_minutes, as_of).where(F.col(LABEL).isNotNull())


def feature_events(
    impressions: DataFrame, attributed: DataFrame, features: FeaturesConfig, extra: Sequence[str] = ()
) -> DataFrame:
    """Impressions and attributed clicks in one shape: ``kind, event_id, event_time``, the
    impression fields the declarations use (entity keys, then measures), then the ``extra``
    columns.

    ``event_id`` is the impression's or the click's own id, so that "the events after a
    horizon" is an anti-join on ``(kind, event_id)``. Works on streaming frames too. The
    ``extra`` columns are carried from whichever side has them, null on the other (the speed
    layer's bronze versions: a click has both, an impression only its own).
    """
    carried = list(features.carried_fields)
    extra = [name for name in extra if name not in carried]
    shown = impressions.select(
        F.lit(IMPRESSIONS).alias(KIND), "event_id", "event_time", *carried, *[c for c in extra if c in impressions.columns]
    )
    clicked = attributed.select(
        F.lit(CLICKS).alias(KIND), F.col("click_id").alias("event_id"), "event_time", *carried,
        *[c for c in extra if c in attributed.columns],
    )  # fmt: skip
    return shown.unionByName(clicked, allowMissingColumns=bool(extra))


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


def bucket_feature_events(
    impressions: Iterable[Mapping[str, Any]], clicks: Iterable[Mapping[str, Any]], window: int, first: int, last: int
) -> list[FeatureEvent]:
    """The feature events with a time in ``[first, last)`` (epoch microseconds).

    ``impressions`` must hold every impression copy with a time in ``[first - window, last)``
    (a click in the bucket may belong to one shown up to ``window`` microseconds, the
    attribution window, before it), ``clicks`` every click copy with a time in
    ``[first, last)``; event times are epoch microseconds. Copies of one event are assumed to
    share its event time when one of them falls in that range (the earliest copy decides).

    >>> imps = [{"event_id": "i1", "event_time": 90, "user_id": "u"}, {"event_id": "i2", "event_time": 120, "user_id": "v"}]
    >>> clks = [{"event_id": "c1", "impression_id": "i1", "event_time": 105},
    ...         {"event_id": "c1", "impression_id": "i1", "event_time": 105},
    ...         {"event_id": "c2", "impression_id": "i1", "event_time": 150}]  # after the window
    >>> [(e.kind, e.micros, e.fields["user_id"]) for e in bucket_feature_events(imps, clks, 30, 100, 200)]
    [('impressions', 120, 'v'), ('clicks', 105, 'u')]
    """
    shown = earliest_copies(impressions)
    events = [FeatureEvent(IMPRESSIONS, row["event_time"], row) for row in shown.values() if first <= row["event_time"] < last]
    for click in earliest_copies(clicks).values():
        at = click["event_time"]
        impression = shown.get(click["impression_id"])
        if first <= at < last and impression is not None and impression["event_time"] <= at <= impression["event_time"] + window:
            events.append(FeatureEvent(CLICKS, at, impression))
    return events


class CtrFeatureEvents:
    """Feature events of the click-through application (the ``FeatureEvents`` contract)."""

    def batch(self, snapshot: Snapshot, cfg: PlatformConfig) -> DataFrame:
        """:func:`labelled_events` of the snapshot's deduplicated impressions and clicks, labelled
        as of the snapshot's latest event; TrainingError when the snapshot holds no event."""
        from lambda_ml_apps.ctr.evaluation import TrainingError

        impressions, clicks = clean_events(snapshot, cfg)
        as_of = latest_event_time(impressions, clicks)
        if as_of is None:
            raise TrainingError(f"{snapshot.horizon} holds no events")
        return labelled_events(impressions, clicks, cfg, as_of)

    def stream(self, spark: SparkSession, streams: Mapping[str, DataFrame], cfg: PlatformConfig) -> DataFrame:
        return stream_feature_events(streams[IMPRESSIONS], streams[CLICKS], cfg)

    def lookback_micros(self, cfg: PlatformConfig, event_type: str) -> int:
        """A click in a bucket may belong to an impression shown up to the attribution window before it."""
        return cfg.ctr.attribution_window_minutes * 60_000_000 if event_type == IMPRESSIONS else 0

    def in_memory(self, rows: Mapping[str, Iterable[Mapping[str, Any]]], cfg: PlatformConfig, first: int, last: int) -> list[FeatureEvent]:
        window = cfg.ctr.attribution_window_minutes * 60_000_000
        return bucket_feature_events(rows[IMPRESSIONS], rows[CLICKS], window, first, last)


def stream_feature_events(impressions: DataFrame, clicks: DataFrame, cfg: PlatformConfig) -> DataFrame:
    """Feature events with the bronze versions they came from (static or streaming inputs)."""
    impression_version, click_version = (increment_version_column(e) for e in (IMPRESSIONS, CLICKS))
    attributed = attribute_clicks(
        impressions, clicks, cfg.ctr.attribution_window_minutes, impression_extra=[impression_version], click_extra=[click_version]
    )
    return feature_events(impressions, attributed, cfg.features, extra=(impression_version, click_version))

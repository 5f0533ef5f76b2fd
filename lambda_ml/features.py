"""Features in Spark, derived from the feature declarations (``features:`` in ``conf/``).
:func:`bucket_increments` uses only projections and a grouped aggregation on event-time
buckets, so the same code runs on a static DataFrame (the batch layer) and on a streaming one
(the speed layer).

The vocabulary:

- A **feature event** is one row an aggregate counts: ``kind`` (the event type an aggregate's
  ``events`` names), ``event_id``, ``event_time`` and the fields the declarations read (entity
  keys, measures). An application derives them from its events (``FeatureEvents`` in
  ``lambda_ml.apps``: the click-through application attributes a click to its impression).
- A **bucket increment** is one row per (entity keys, event-time bucket) with every declared
  aggregate of the feature events in that bucket. Aggregates are counts, sums, minima and
  maxima, so bucket rows are monoids: the rows of a snapshot merged with the rows of the events
  after it equal the rows of both (:func:`merge_buckets`).
- A **window feature** of a row at time ``t`` aggregates its entity's feature events in
  ``[bucket_start(t) - window, t)``, or all of them before ``t`` for the lifetime window
  (``all``): strictly before ``t``, so events at the same instant and later events never leak
  into its features (:func:`add_window_features`). The serving layer computes the same value
  from stored buckets with ``lambda_ml.buckets``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession, Window, WindowSpec
from pyspark.sql import functions as F

from lambda_ml import buckets, contract
from lambda_ml.apps import Snapshot
from lambda_ml.config import AggregateConfig, FeatureEntityConfig, FeaturesConfig, PlatformConfig
from lambda_ml.contract import ModelInputs
from lambda_ml.partial_buckets import FeatureEvent, declared_feature_events

LABEL = "label"
# Feature-event column naming the event type a row counts for (values: the aggregates' ``events``).
KIND = "kind"
BUCKET = contract.VIEW_BUCKET_COLUMN
_MICROS = "_pit_micros"
_INDEX = "_pit_bucket"
_HEAD = "_pit_head"  # a series row leading its bucket
_PROBE = "_pit_probe"  # a target row that is no event


def dedup_events(events: DataFrame) -> DataFrame:
    """One row per ``event_id``: bronze keeps every Kafka delivery, a resent event counts once
    (the earliest by event time when deliveries differ).

    A window rather than ``dropDuplicates``: the latter aggregates string columns by sorting
    twice, this sorts once, and leaves the rows partitioned and sorted by ``event_id`` for the
    joins on it that follow.
    """
    first = Window.partitionBy("event_id").orderBy("event_time")
    return events.withColumn("_delivery", F.row_number().over(first)).where(F.col("_delivery") == 1).drop("_delivery")


class DeclaredFeatureEvents:
    """Feature events straight from the declared event types (the ``FeatureEvents`` contract
    for events that need no application rule, e.g. a user's own): every event of each type the
    aggregates count, as it is, with the fields the declarations read. Each of those types must
    hold every entity key and measure (:meth:`check`)."""

    def check(self, cfg: PlatformConfig) -> None:
        """ValueError naming the key when an event type the aggregates count lacks a field the
        declarations read."""
        carried = cfg.features.carried_fields
        for event_type in cfg.features.source_event_types:
            fields = cfg.events.types[event_type].fields
            missing = [name for name in carried if name not in fields]
            if missing:
                raise ValueError(
                    f"{cfg.source}: events.types.{event_type}: the features read {missing}, which {event_type} events lack"
                )

    def batch(self, snapshot: Snapshot, cfg: PlatformConfig) -> DataFrame:
        return self._union({e: dedup_events(snapshot[e]) for e in cfg.features.source_event_types}, cfg)

    def stream(self, spark: SparkSession, streams: Mapping[str, DataFrame], cfg: PlatformConfig) -> DataFrame:
        return self._union(streams, cfg)

    def lookback_micros(self, cfg: PlatformConfig, event_type: str) -> int:
        return 0  # an event counts in its own bucket only

    def in_memory(self, rows: Mapping[str, Iterable[Mapping[str, Any]]], cfg: PlatformConfig, first: int, last: int) -> list[FeatureEvent]:
        return declared_feature_events(rows, first, last)

    @staticmethod
    def _union(frames: Mapping[str, DataFrame], cfg: PlatformConfig) -> DataFrame:
        carried = list(cfg.features.carried_fields)
        versions = [contract.increment_version_column(e) for e in cfg.features.source_event_types]
        parts = []
        for event_type in cfg.features.source_event_types:
            frame = frames[event_type]
            extra = [c for c in versions if c in frame.columns]
            parts.append(frame.select(F.lit(event_type).alias(KIND), "event_id", "event_time", *carried, *extra))
        union = parts[0]
        for part in parts[1:]:
            union = union.unionByName(part, allowMissingColumns=True)
        return union


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


# --------------------------------------------------------------------------- bucket increments


def _value(aggregate: AggregateConfig) -> Column:
    """What one feature event adds to an aggregate: 1 or its measure for events of the
    aggregate's kind, null (ignored by every aggregation) for the others."""
    value = F.lit(1) if aggregate.measure is None else F.col(aggregate.measure).cast("double")
    return F.when(F.col(KIND) == aggregate.events, value)


def _fold(aggregate: AggregateConfig, values: Column, over: WindowSpec | None = None) -> Column:
    """Feature events -> one aggregate value (long for counts, double otherwise), per group or
    over a window frame."""
    fold = {"count": F.count, "sum": F.sum, "min": F.min, "max": F.max}[aggregate.aggregation]
    folded = fold(values) if over is None else fold(values).over(over)
    # The sum of no events is 0, the identity of sums (a min or max of nothing stays null).
    return F.coalesce(folded, F.lit(0.0)) if aggregate.aggregation == "sum" else folded


def _merge(aggregate: AggregateConfig, partials: Column, over: WindowSpec | None = None) -> Column:
    """Aggregate values -> their combination (the monoid operation), per group or over a frame.
    Counts and sums add up, minima and maxima take the extreme."""
    merge = {"count": F.sum, "sum": F.sum, "min": F.min, "max": F.max}[aggregate.aggregation]
    merged = merge(partials) if over is None else merge(partials).over(over)
    return merged.cast("long") if aggregate.aggregation == "count" else merged


def _spark_duration(width: timedelta) -> str:
    return f"{int(width.total_seconds())} seconds"


def bucket_increments(
    events: DataFrame, entity: FeatureEntityConfig, features: FeaturesConfig, by: Sequence[str] = ()
) -> DataFrame:
    """One row per (entity keys, bucket): ``<keys>, bucket_start`` and one column per aggregate.

    ``events`` are :func:`feature_events`, static or streaming (with a watermark on
    ``event_time`` for append mode). Buckets are Spark tumbling windows, aligned on the epoch.
    ``by`` are further grouping columns, kept after the aggregates (the speed layer groups by
    the bronze versions the events came from).
    """
    bucket = F.window("event_time", _spark_duration(features.bucket_width))
    folded = [_fold(a, _value(a)).alias(name) for name, a in features.aggregates.items()]
    grouped = events.groupBy(*entity.keys, bucket.alias("_bucket"), *by).agg(*folded)
    return grouped.select(*entity.keys, F.col("_bucket.start").alias(BUCKET), *features.aggregates, *by)


def after_horizon(increments: DataFrame, horizon: contract.Horizon) -> DataFrame:
    """The speed-layer increment rows a batch view at ``horizon`` did not count.

    A row counts after the horizon if the bronze version of any of its events is newer than the
    horizon's version of that table (an attributed click of the click-through application: its
    own or its impression's; the batch attributes a click only when it holds both). A part of
    the horizon that is unknown (None) keeps every row. ``merge_buckets([view at h, after_horizon(increments, h)])``
    is the view of the lake the speed layer has seen.
    """
    versions = {e: F.col(c) for e in horizon.parts if (c := contract.increment_version_column(e)) in increments.columns}
    newer = contract.increment_after_horizon(horizon, versions)
    return increments if newer is None else increments.where(newer)


def merge_buckets(frames: Iterable[DataFrame], entity: FeatureEntityConfig, features: FeaturesConfig) -> DataFrame:
    """The ⊕ of bucket rows: rows of the same (keys, bucket) combined, each aggregate by its monoid.

    ``merge_buckets([view at v, increments after v])`` equals the view recomputed later.
    """
    frames = list(frames)
    if not frames:
        raise ValueError("merge_buckets needs at least one frame")
    columns = [*entity.keys, BUCKET, *features.aggregates]
    union = frames[0].select(*columns)
    for frame in frames[1:]:
        union = union.unionByName(frame.select(*columns))
    merged = [_merge(a, F.col(name)).alias(name) for name, a in features.aggregates.items()]
    return union.groupBy(*entity.keys, BUCKET).agg(*merged)


# --------------------------------------------------------------------------- point in time


def _bucket_index(micros: Column, width: int) -> Column:
    # Integer arithmetic (a double division could round across a bucket boundary).
    return ((micros - F.pmod(micros, F.lit(width))) / F.lit(width)).cast("long")


def _window_value(aggregate: AggregateConfig, whole: Column, partial: Column) -> Column:
    """Whole buckets before the current one, combined with the current bucket's part before t."""
    if aggregate.aggregation in ("count", "sum"):
        value = F.coalesce(whole, F.lit(0)) + F.coalesce(partial, F.lit(0))
    elif aggregate.aggregation == "min":
        value = F.least(whole, partial)  # least and greatest skip nulls
    else:
        value = F.greatest(whole, partial)
    return F.coalesce(value.cast("double"), F.lit(float(aggregate.empty)))


def bucket_series(
    bucket_rows: DataFrame, entity: FeatureEntityConfig, features: FeaturesConfig, wanted: DataFrame | None = None
) -> DataFrame:
    """Per (entity keys, bucket index): each window's combination of the whole buckets before it.

    ``bucket_rows`` are :func:`bucket_increments` (or a batch view, which has the same columns);
    ``wanted`` adds (keys, ``_pit_bucket``) rows for buckets that may hold no event. Columns:
    the keys, ``_pit_bucket`` and ``_whole_<aggregate>_<window>`` (null when no bucket of the
    window has an event). Small: one row per (keys, bucket). The lifetime window combines every
    bucket before (a running total).
    """
    keys = list(entity.keys)
    width = buckets.to_micros(features.bucket_width)
    rows = bucket_rows.select(*keys, _bucket_index(F.unix_micros(BUCKET), width).alias(_INDEX), *features.aggregates)
    if wanted is not None:
        rows = rows.unionByName(wanted.select(*keys, _INDEX), allowMissingColumns=True)
    whole_columns = []
    for window in features.windows:
        length = buckets.window_micros(window)
        first = Window.unboundedPreceding if length is None else -(length // width)
        frame = Window.partitionBy(*keys).orderBy(_INDEX).rangeBetween(first, -1)
        whole_columns += [
            _merge(aggregate, F.col(agg), over=frame).alias(f"_whole_{agg}_{window}")
            for agg, aggregate in features.aggregates.items()
        ]
    return rows.select(*keys, _INDEX, *whole_columns)


def _entity_window_features(frame: DataFrame, series: DataFrame, name: str, entity: FeatureEntityConfig, features: FeaturesConfig) -> DataFrame:
    """``frame`` with the entity's window aggregates on every row, at the row's ``event_time``.

    Rows with a ``kind`` are events and count; other rows only receive features. One shuffle
    and one sort: the series rows (each bucket's whole-bucket values) join the frame as extra
    rows sorted first in their bucket, so a single window pass per (keys, bucket) gives every
    row both the whole buckets before its bucket and its bucket's events strictly before it.
    """
    keys = list(entity.keys)
    width = buckets.to_micros(features.bucket_width)
    whole_names = [f"_whole_{agg}_{window}" for window in features.windows for agg in features.aggregates]
    heads = series.select(
        *keys, _INDEX, (F.col(_INDEX) * F.lit(width) - F.lit(1)).alias(_MICROS), *whole_names, F.lit(True).alias(_HEAD)
    )
    micros = F.unix_micros("event_time")
    rows = frame.select("*", micros.alias(_MICROS), _bucket_index(micros, width).alias(_INDEX), F.lit(False).alias(_HEAD))
    combined = rows.unionByName(heads, allowMissingColumns=True)

    ordered = Window.partitionBy(*keys, _INDEX).orderBy(_MICROS)
    before = ordered.rangeBetween(Window.unboundedPreceding, -1)  # strictly earlier instants
    bucket = ordered.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    parts = [_fold(a, _value(a), over=before).alias(f"_part_{agg}") for agg, a in features.aggregates.items()]
    wholes = [F.max(whole).over(bucket).alias(whole) for whole in whole_names]
    kept = [column for column in combined.columns if column not in whole_names]
    spread = combined.select(*kept, *wholes, *parts).where(~F.col(_HEAD))

    outputs = [
        _window_value(aggregate, F.col(f"_whole_{agg}_{window}"), F.col(f"_part_{agg}")).alias(
            contract.window_feature_name(name, agg, window)
        )
        for agg, aggregate in features.aggregates.items()
        for window in features.windows
    ]
    helpers = [*whole_names, *(f"_part_{agg}" for agg in features.aggregates), _MICROS, _INDEX, _HEAD]
    return spread.select("*", *outputs).drop(*helpers)


def _with_ratios(frame: DataFrame, features: FeaturesConfig) -> DataFrame:
    """Every entity's Beta-prior ratios from its window aggregates, added last: the sorts of
    the entity passes carry the aggregates only."""
    ratios = []
    for name in features.entities:
        for ratio_name, ratio in features.ratios.items():
            for window in features.windows:
                numerator = F.col(contract.window_feature_name(name, ratio.numerator, window))
                denominator = F.col(contract.window_feature_name(name, ratio.denominator, window))
                value = (numerator + F.lit(float(ratio.prior_alpha))) / (
                    denominator + F.lit(float(ratio.prior_alpha)) + F.lit(float(ratio.prior_beta))
                )
                ratios.append(value.alias(contract.window_feature_name(name, ratio_name, window)))
    return frame.select("*", *ratios)


def event_window_features(
    events: DataFrame, features: FeaturesConfig, bucket_rows: Mapping[str, DataFrame] | None = None
) -> DataFrame:
    """Every row of ``events`` with every declared window feature at its own ``event_time``.

    ``events`` are :func:`feature_events`, possibly with more columns (carried along); rows
    without a ``kind`` receive features without counting. ``bucket_rows`` are each entity's
    bucket rows of the same events (the batch views); by default they are computed here. A row
    at ``t`` sees its entity's events in ``[bucket_start(t) - window, t)``: whole buckets from
    the bucket rows, plus the current bucket's events strictly before ``t``. Exact: no
    approximate window, no leakage.
    """
    frame = events
    entities = list(features.entities)
    if bucket_rows is not None:
        # Each pass sorts the events plus one row per (keys, bucket), and carries the features
        # of the passes before it: the entities with the most buckets go first, while the rows
        # are narrowest (at 3M events a user has about one event per bucket, an item dozens).
        sizes = {name: bucket_rows[name].count() for name in entities}
        entities.sort(key=lambda name: -sizes[name])
    for name in entities:
        entity = features.entities[name]
        rows = bucket_increments(events, entity, features) if bucket_rows is None else bucket_rows[name]
        frame = _entity_window_features(frame, bucket_series(rows, entity, features), name, entity, features)
    return _with_ratios(frame, features)


def add_window_features(
    targets: DataFrame, events: DataFrame, features: FeaturesConfig, bucket_rows: Mapping[str, DataFrame] | None = None
) -> DataFrame:
    """``targets`` with every declared window feature at its own ``event_time``.

    ``targets`` need ``event_time`` and every entity's keys; ``events`` are
    :func:`feature_events`. A target sees what :func:`event_window_features` gives an event at
    its instant; targets add nothing to any feature.

    ``bucket_rows`` (per entity: a view merged with the increments after its horizon) give the
    whole buckets before each target's bucket instead of ``events``, which then need to hold
    only the events of the targets' own buckets (from the earliest one's start): the same
    features, without reading the events of the longest window.
    """
    width = buckets.to_micros(features.bucket_width)
    probes = targets.drop(KIND).withColumn(_PROBE, F.lit(True))
    frame = probes.unionByName(events.withColumn(_PROBE, F.lit(False)), allowMissingColumns=True)
    for name, entity in features.entities.items():
        keys = list(entity.keys)
        # The targets' own buckets join the series: a target's bucket may hold no event.
        wanted = targets.select(*keys, _bucket_index(F.unix_micros("event_time"), width).alias(_INDEX)).distinct()
        if bucket_rows is None:
            rows = bucket_increments(events, entity, features)
        else:  # only the targets' keys
            rows = bucket_rows[name].join(wanted.select(*keys).distinct(), keys, "left_semi")
        series = bucket_series(rows, entity, features, wanted)
        frame = _entity_window_features(frame, series, name, entity, features)
    event_only = [column for column in events.columns if column not in targets.columns]
    return _with_ratios(frame.where(F.col(_PROBE)).drop(_PROBE, *event_only), features)


def model_input_columns(inputs: ModelInputs) -> list[Column]:
    """The model inputs as columns, in graph order: numbers as doubles, categories as strings."""
    numeric = [F.col(name).cast("double").alias(name) for name in inputs.numeric]
    return numeric + [F.col(name).cast("string").alias(name) for name in inputs.categorical]


def definitions_hash(features: FeaturesConfig, *modules: Any) -> str:
    """SHA-256 of the declarations and of the code computing them (this module, the bucket
    arithmetic and the given ``modules``, e.g. the application's feature events): logged with
    every model so that a changed definition shows."""
    digest = hashlib.sha256(json.dumps(features.model_dump(mode="json"), sort_keys=True).encode())
    for module in (buckets, sys.modules[__name__], *modules):
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()

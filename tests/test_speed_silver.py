"""The speed layer's silver path against the batch layer's exact answers (real Spark and Delta):
labels from the stream-stream join equal the batch labels for every impression the watermark
has closed, and batch view ⊕ increments after its horizon equal the view recomputed from the
whole lake; increments a newly published horizon covers are dropped."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from support import isolated

from batch_layer.snapshot import read_snapshot
from batch_layer.views import build_views, write_views
from lambda_ml import contract, producer
from lambda_ml_apps.ctr import generator
from lambda_ml.config import PlatformConfig
from lambda_ml.features import LABEL, after_horizon, bucket_increments, dedup_events, latest_event_time, merge_buckets
from lambda_ml_apps.ctr.events import attribute_clicks, feature_events, label_impressions
from speed_layer import app, ingest
from speed_layer.increments import increments_path
from lambda_ml_apps.ctr.labels import labels_path
from lambda_ml_apps.ctr.online import labelled_features, merged_bucket_rows

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
KAFKA_COLUMNS = "key binary, value binary, topic string, partition int, offset long, timestamp timestamp"


def _land(spark: SparkSession, cfg: PlatformConfig, records: list[producer.Record], first_offset: int, batch_id: int) -> None:
    """Write records to bronze as one ingest micro-batch would (one Delta version per table)."""
    topics = {name: t.name for name, t in cfg.events.topics().items()}
    rows = [(r.key, r.value, topics[r.event_type], 0, first_offset + i, NOW) for i, r in enumerate(records)]
    ingest.ingest_batch(spark.createDataFrame(rows, KAFKA_COLUMNS), batch_id, cfg)


def _sorted_rows(frame: DataFrame, columns: list[str]) -> list[tuple[object, ...]]:
    return sorted((tuple(r) for r in frame.select(*columns).collect()), key=repr)


@pytest.mark.integration
@pytest.mark.slow
def test_silver_labels_and_increments_equal_the_batch_layer(spark: SparkSession, cfg: PlatformConfig, tmp_path: Path) -> None:
    local = isolated(cfg, "ctr-speed-silver", lake_root=tmp_path / "lake")
    gen = local.generator.model_copy(update={"impressions": 1500, "span_hours": 4, "users": 40, "items": 15, "seed": 21})
    window = local.ctr.attribution_window_minutes
    records, truth = generator.generate(gen, timedelta(minutes=window), NOW)
    cut = 2 * len(records) // 3
    ingest.ensure_tables(spark, local)
    _land(spark, local, records[: cut // 2], 0, 0)
    _land(spark, local, records[cut // 2 : cut], cut // 2, 1)

    app.run(local, ["labels", "increments"], available_now=True)
    # The batch layer publishes views at the bronze versions it sees now.
    snapshot = read_snapshot(spark, local)
    horizon = snapshot.horizon
    imp_h, clk_h = dedup_events(snapshot["impressions"]), dedup_events(snapshot["clicks"])
    write_views(build_views(feature_events(imp_h, attribute_clicks(imp_h, clk_h, window), local.features), local.features, horizon), local)
    # Bronze was at these versions before the first run, so the views cover every increment so far.
    _land(spark, local, records[cut:], cut, 2)
    app.run(local, ["labels", "increments"], available_now=True)

    bronze = read_snapshot(spark, local)
    impressions, clicks = dedup_events(bronze["impressions"]).cache(), dedup_events(bronze["clicks"]).cache()
    assert impressions.count() == truth.impressions and clicks.count() == truth.distinct_clicks
    attributed = attribute_clicks(impressions, clicks, window)

    # Labels: the watermark of the last micro-batch is the newest event time seen before it
    # (both streams) less the watermark delay; every impression whose window closed before it
    # has its label, and every silver label is the batch layer's exact one.
    seen = records[:cut]
    newest = min(
        max(datetime.fromisoformat(json.loads(r.value)["event_time"]) for r in seen if r.event_type == kind and r.key != b"bad")
        for kind in ("impressions", "clicks")
    )
    watermark = newest - timedelta(minutes=local.speed.watermark_minutes)
    as_of = latest_event_time(impressions, clicks)
    assert as_of is not None
    exact = label_impressions(impressions, attributed, window, as_of).select("event_id", "event_time", LABEL)
    silver = spark.read.format("delta").load(labels_path(local)).select("event_id", "event_time", LABEL)
    assert silver.count() == silver.select("event_id").distinct().count()
    closed = F.col("event_time") + F.expr(f"INTERVAL {window} MINUTES") < F.lit(watermark - timedelta(seconds=1))
    expected_closed = _sorted_rows(exact.where(closed), ["event_id", LABEL])
    assert len(expected_closed) > 500 and 0 < sum(label for _, label in expected_closed) < len(expected_closed)
    assert _sorted_rows(silver.where(closed), ["event_id", LABEL]) == expected_closed
    # Labels for impressions whose window was still open at the batch's as-of: positives only.
    final = exact.select("event_id", F.col(LABEL).alias("exact"))
    compared = silver.join(final, "event_id", "left")
    assert compared.where(F.col("exact").isNull() & (F.col(LABEL) == 0.0)).count() == 0
    assert compared.where(F.col("exact").isNotNull() & (F.col("exact") != F.col(LABEL))).count() == 0

    # Increments: after the horizon only (the rows the views cover were dropped), and the views
    # merged with them are the views of the whole lake.
    everything = feature_events(impressions, attributed, local.features)
    for name, entity in local.features.entities.items():
        increments = spark.read.format("delta").load(increments_path(local, name))
        assert increments.count() > 0
        assert increments.count() == after_horizon(increments, horizon).count()
        view = spark.read.format("delta").load(local.lake.table(*contract.view_table(name)))
        columns = [*entity.keys, contract.VIEW_BUCKET_COLUMN, *local.features.aggregates]
        merged = merge_buckets([view, increments], entity, local.features)
        assert _sorted_rows(merged, columns) == _sorted_rows(bucket_increments(everything, entity, local.features), columns)

    # The online model's features: whole buckets from the views merged with the increments (as
    # serving does), bronze read from the earliest labelled row's bucket on only, give every
    # labelled impression the features bronze over the longest window gives.
    labelled = spark.read.format("delta").load(labels_path(local))
    merged_rows = merged_bucket_rows(spark, local)
    assert merged_rows is not None
    from_bronze = labelled_features(labelled, bronze["impressions"], bronze["clicks"], local)
    from_views = labelled_features(labelled, bronze["impressions"], bronze["clicks"], local, merged_rows)
    columns = sorted(from_bronze.columns)
    assert sorted(from_views.columns) == columns and from_bronze.count() == labelled.count() > 1000
    assert _sorted_rows(from_views, columns) == _sorted_rows(from_bronze, columns)
    # The whole buckets do come from the merged rows: without them, the narrow bronze read alone
    # misses the older buckets.
    nothing = {name: rows.limit(0) for name, rows in merged_rows.items()}
    narrow = labelled_features(labelled, bronze["impressions"], bronze["clicks"], local, nothing)
    assert _sorted_rows(narrow, columns) != _sorted_rows(from_bronze, columns)

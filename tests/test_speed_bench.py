"""The speed benchmark's peer (bench/speed.py): its plain-Python parsing and aggregation must
do the speed layer's work, or the side-by-side figures compare different things. Compared here
with the speed layer's own functions on the same generated records in real Spark."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from bench import speed
from lambda_ml_apps.ctr import generator
from lambda_ml.config import GeneratorConfig, PlatformConfig
from lambda_ml.contract import Horizon, increment_version_column
from lambda_ml.features import BUCKET, dedup_events, merge_buckets
from speed_layer import ingest
from lambda_ml_apps.ctr.events import stream_feature_events
from speed_layer.increments import batch_increments

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
KAFKA_COLUMNS = "key binary, value binary, topic string, partition int, offset long, timestamp timestamp"


@pytest.mark.integration
def test_plain_loop_increments_equal_the_speed_layer_increments(spark: SparkSession, cfg: PlatformConfig) -> None:
    # Duplicated, late and malformed records included: the generator's defaults.
    gen = GeneratorConfig(impressions=3000, users=40, items=15, seed=21, span_hours=6)
    records, truth = generator.generate(gen, timedelta(minutes=cfg.ctr.attribution_window_minutes), NOW)
    topics = {name: topic.name for name, topic in cfg.events.topics().items()}
    kafka_ms = int(NOW.timestamp() * 1000)
    rows = [(r.key, r.value, topics[r.event_type], 0, offset, NOW) for offset, r in enumerate(records)]

    plain, plain_bad = speed.plain_increments([(topics[r.event_type], r.value, kafka_ms) for r in records], cfg)

    parsed = ingest.parse_events(spark.createDataFrame(rows, KAFKA_COLUMNS), cfg)
    # On a static frame the silver path's deduplication within the watermark is the batch layer's.
    stamped = {
        name: dedup_events(parsed[name].withColumn(increment_version_column(name), F.lit(1).cast("long")))
        for name in ("impressions", "clicks")
    }
    events = stream_feature_events(stamped["impressions"], stamped["clicks"], cfg)
    increments = batch_increments(events, cfg, {name: Horizon.of() for name in cfg.features.entities})
    aggregates = list(cfg.features.aggregates)
    expected: dict[tuple[str, tuple[object, ...], int], list[object]] = {}
    for name, frame in increments.items():
        keys = list(cfg.features.entities[name].keys)
        merged = merge_buckets([frame], cfg.features.entities[name], cfg.features)
        for row in merged.select(*keys, F.unix_micros(BUCKET).alias("micros"), *aggregates).collect():
            expected[(name, tuple(row[k] for k in keys), row["micros"])] = [row[a] for a in aggregates]
    spark_bad = Counter(r.reason for r in parsed["quarantine"].collect())

    assert sum(v[aggregates.index("impressions")] for (n, _, _), v in expected.items() if n == "user") == truth.impressions
    assert sum(v[aggregates.index("clicks")] for (n, _, _), v in expected.items() if n == "user") > 0
    assert plain_bad == spark_bad
    assert sum(plain_bad.values()) == truth.malformed_total
    assert sorted(plain) == sorted(expected)
    mismatched = {key: (plain[key], expected[key]) for key in expected if plain[key] != expected[key]}
    assert mismatched == {}

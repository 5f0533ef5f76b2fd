"""Speed-layer ingest against a real Kafka broker, real Spark and real Delta tables."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from pyspark.sql import SparkSession

from lambda_ml import generator
from lambda_ml.config import PlatformConfig
from speed_layer import ingest

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
KAFKA_COLUMNS = "key binary, value binary, topic string, partition int, offset long, timestamp timestamp"

# The quarantine reason each malformed kind of the generator must get.
EXPECTED_REASONS = {
    "not_json": "malformed JSON: not a JSON object",
    "not_object": "malformed JSON: not a JSON object",
    "missing_field": "missing field: user_id",
    "wrong_type": "bad value for position: expected an integer, got top",
    "bad_time": "bad value for event_time: expected an ISO-8601 timestamp, got yesterday",
    "absurd_time": "event_time before 1970-01-01: absurd timestamp",
    "empty": "empty payload",
}


def _static_kafka_frame(spark: SparkSession, rows: list[tuple[str, bytes]], now: datetime = NOW):  # type: ignore[no-untyped-def]
    data = [(b"k", value, topic, 0, offset, now) for offset, (topic, value) in enumerate(rows)]
    return spark.createDataFrame(data, KAFKA_COLUMNS)


@pytest.mark.integration
def test_parse_events_types_fields_and_quarantines_every_malformed_kind(spark: SparkSession, cfg: PlatformConfig) -> None:
    impression = {"event_id": "i1", "event_time": "2026-11-20T10:00:00.250Z", "user_id": "u1", "item_id": "x", "device": "mobile", "position": "3"}
    click = {"event_id": "c1", "impression_id": "i1", "event_time": "2026-11-20T10:01:00Z"}
    future = {**impression, "event_id": "i2", "event_time": "2026-11-25T10:00:00Z"}
    fractional = {**impression, "event_id": "i3", "position": 2.5}
    rows = [
        ("impressions", json.dumps(impression).encode()),
        ("clicks", json.dumps(click).encode()),
        ("clicks", b'{"event_id": "c2", "event_time": "2026-11-20T10:01:00Z"}'),
        ("impressions", json.dumps(future).encode()),
        ("impressions", json.dumps(fractional).encode()),
        ("unknown-topic", b"{}"),
    ]
    out = ingest.parse_events(_static_kafka_frame(spark, rows), cfg)

    imp = out["impressions"].collect()
    assert [(r.event_id, r.user_id, r.position, r.event_time, r.kafka_offset) for r in imp] == [
        ("i1", "u1", 3, datetime(2026, 11, 20, 10, 0, 0, 250000), 0)
    ]
    assert [(r.event_id, r.impression_id, r.kafka_offset) for r in out["clicks"].collect()] == [("c1", "i1", 1)]
    reasons = sorted((r.kafka_offset, r.reason) for r in out["quarantine"].collect())
    assert reasons == [
        (2, "missing field: impression_id"),
        (3, "event_time more than 1 days after the Kafka record time"),
        (4, "bad value for position: expected an integer, got 2.5"),
        (5, "unknown event topic: unknown-topic"),
    ]


@pytest.mark.integration
def test_ingest_batch_is_idempotent_per_batch_id(spark: SparkSession, cfg: PlatformConfig, tmp_path) -> None:  # type: ignore[no-untyped-def]
    local = cfg.model_copy(update={"lake": cfg.lake.model_copy(update={"root": str(tmp_path / "lake")})})
    ingest.ensure_tables(spark, local)
    records, truth = generator.generate(local.generator.model_copy(update={"impressions": 300}), timedelta(minutes=30), NOW)
    frame = _static_kafka_frame(spark, [(local.kafka.topics.event_topics()[r.event_type].name, r.value) for r in records])

    first = ingest.ingest_batch(frame, 0, local)
    replay = ingest.ingest_batch(frame, 0, local)  # the same micro-batch again, as after a crash
    assert first.rows == replay.rows
    paths = ingest.table_paths(local)
    assert spark.read.format("delta").load(paths["impressions"]).count() == truth.impressions
    assert spark.read.format("delta").load(paths["clicks"]).count() == truth.clicks_sent
    assert spark.read.format("delta").load(paths["quarantine"]).count() == truth.malformed_total


@pytest.mark.integration
def test_stream_from_real_broker_lands_every_event_once(running_stack: PlatformConfig, spark: SparkSession) -> None:
    cfg = running_stack
    gen = cfg.generator.model_copy(update={"impressions": 3000, "malformed_fraction": 0.01})
    records, truth = generator.generate(gen, timedelta(minutes=cfg.ctr.attribution_window_minutes), NOW)
    half = len(records) // 2
    generator.produce(cfg, records[:half], progress=False)

    query = ingest.start_ingest(spark, cfg, available_now=True)
    try:
        query.awaitTermination(300)
    finally:
        query.stop()
    # Restart from the checkpoint with the rest of the records: nothing lost, nothing twice.
    generator.produce(cfg, records[half:], progress=False)
    query = ingest.start_ingest(spark, cfg, available_now=True)
    try:
        query.awaitTermination(300)
        assert query.exception() is None
    finally:
        query.stop()

    paths = ingest.table_paths(cfg)
    impressions = spark.read.format("delta").load(paths["impressions"])
    clicks = spark.read.format("delta").load(paths["clicks"])
    quarantine = spark.read.format("delta").load(paths["quarantine"])

    sent = Counter(r.event_type for r in records)
    assert impressions.count() == truth.impressions == sent["impressions"] - truth.malformed_total
    assert clicks.count() == truth.clicks_sent
    assert clicks.select("event_id").distinct().count() == truth.distinct_clicks
    # Every Kafka offset of every topic/partition landed exactly once, in bronze or quarantine.
    offsets = impressions.select("kafka_topic", "kafka_partition", "kafka_offset").unionByName(
        clicks.select("kafka_topic", "kafka_partition", "kafka_offset")
    ).unionByName(quarantine.select("kafka_topic", "kafka_partition", "kafka_offset"))
    assert offsets.count() == len(records)
    assert offsets.distinct().count() == len(records)
    reasons = Counter({r.reason: r["count"] for r in quarantine.groupBy("reason").count().collect()})
    expected = Counter()
    for kind, n in truth.malformed.items():
        expected[EXPECTED_REASONS[kind]] += n
    assert reasons == expected
    raw = {bytes(r.raw_value or b"") for r in quarantine.select("raw_value").collect()}
    assert b"[1, 2, 3]" in raw


def _avro_config(cfg: PlatformConfig, *event_types: str) -> PlatformConfig:
    topics = cfg.kafka.topics
    avro_topics = {name: getattr(topics, name).model_copy(update={"format": "avro"}) for name in event_types}
    return cfg.model_copy(update={"kafka": cfg.kafka.model_copy(update={"topics": topics.model_copy(update=avro_topics)})})


# What each malformed kind becomes on an Avro topic: anything the producer cannot encode with
# the schema is sent as it is and does not decode.
EXPECTED_AVRO_REASONS = {
    **{kind: "malformed Avro: does not decode with impressions.avsc" for kind in ("not_json", "not_object", "missing_field", "wrong_type", "bad_time")},
    "absurd_time": EXPECTED_REASONS["absurd_time"],
    "empty": EXPECTED_REASONS["empty"],
}


@pytest.mark.integration
def test_avro_records_parse_to_the_same_events_as_json(spark: SparkSession, cfg: PlatformConfig) -> None:
    from lambda_ml import avro

    avro_cfg = _avro_config(cfg, "impressions", "clicks")
    records, truth = generator.generate(cfg.generator.model_copy(update={"impressions": 400, "malformed_fraction": 0.05}), timedelta(minutes=30), NOW)
    topics = {name: t.name for name, t in cfg.kafka.topics.event_topics().items()}
    schemas = {name: avro.load_schema(avro.schema_path(cfg.kafka.avro_schemas, name)) for name in topics}
    as_json = ingest.parse_events(_static_kafka_frame(spark, [(topics[r.event_type], r.value) for r in records]), cfg)
    encoded = [(topics[r.event_type], generator.wire_value(r, schemas[r.event_type])) for r in records]
    assert sum(value != r.value for (_, value), r in zip(encoded, records)) == truth.valid_records + truth.malformed["absurd_time"]
    as_avro = ingest.parse_events(_static_kafka_frame(spark, encoded), avro_cfg)

    for name in ("impressions", "clicks"):
        fields = [c for c in as_json[name].columns if c != "ingested_at"]
        expected = sorted(tuple(r) for r in as_json[name].select(fields).collect())
        assert len(expected) == {"impressions": truth.impressions, "clicks": truth.clicks_sent}[name]
        assert sorted(tuple(r) for r in as_avro[name].select(fields).collect()) == expected
    reasons = Counter(r.reason for r in as_avro["quarantine"].collect())
    expected_reasons: Counter[str] = Counter()
    for kind, n in truth.malformed.items():
        expected_reasons[EXPECTED_AVRO_REASONS[kind]] += n
    assert reasons == expected_reasons


@pytest.mark.integration
def test_avro_decoding_reads_what_spark_avro_writes(spark: SparkSession, cfg: PlatformConfig) -> None:
    """Stream scoring decodes Avro impressions with lambda_ml.avro; spark-avro (the speed layer's
    reader and writer) writes the bytes here, so the two agree on the wire format."""
    from pyspark.sql import functions as F
    from pyspark.sql.avro.functions import to_avro
    from pyspark.sql.types import StructField, StructType

    from lambda_ml import avro
    from lambda_ml.schemas import IMPRESSION

    path = avro.schema_path(cfg.kafka.avro_schemas, "impressions")
    schema = avro.load_schema(path)
    rows = [
        ("imp-1", datetime(2026, 11, 22, 10, 0, 0, 250_000, tzinfo=UTC), "u1", "i1", "mobile", 1),
        ("imp-2", datetime(1999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC), "Zoë 🚲", "", "smart-tv", 2**31 - 1),
        ("imp-3", datetime(2026, 1, 1, tzinfo=UTC), "u" * 300, "i\n\"x\"", "tablet", -(2**31)),
    ]
    frame = spark.createDataFrame(rows, StructType([StructField(f.name, f.spark_type, nullable=False) for f in IMPRESSION.fields]))
    fields = [f["name"] for f in schema["fields"]]
    written = frame.select(to_avro(F.struct(*fields), path.read_text()).alias("value")).collect()
    decoded = sorted((avro.decode(bytes(r.value), schema) for r in written), key=lambda d: d["event_id"])
    assert [tuple(d[f] for f in fields) for d in decoded] == rows


@pytest.mark.integration
def test_avro_and_json_topics_with_lz4_zstd_and_gzip_land_exactly_once(running_stack: PlatformConfig, spark: SparkSession, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lambda_ml import stack
    from support import isolated

    base = _avro_config(isolated(running_stack, "ctr-ingest-avro", lake_root=tmp_path / "lake", topic_prefix="avro"), "impressions")
    stack.create_topics(base)
    records, truth = generator.generate(base.generator.model_copy(update={"impressions": 1500, "seed": 3}), timedelta(minutes=30), NOW)
    parts = [records[: len(records) // 3], records[len(records) // 3 : 2 * len(records) // 3], records[2 * len(records) // 3 :]]
    for codec, part in zip(("lz4", "zstd", "gzip"), parts):
        generator.produce(base.model_copy(update={"generator": base.generator.model_copy(update={"compression": codec})}), part, progress=False)

    query = ingest.start_ingest(spark, base, available_now=True)
    try:
        query.awaitTermination(300)
        assert query.exception() is None
    finally:
        query.stop()
    paths = ingest.table_paths(base)
    assert spark.read.format("delta").load(paths["impressions"]).count() == truth.impressions
    assert spark.read.format("delta").load(paths["clicks"]).count() == truth.clicks_sent
    quarantine = spark.read.format("delta").load(paths["quarantine"])
    expected: Counter[str] = Counter()
    for kind, n in truth.malformed.items():
        expected[EXPECTED_AVRO_REASONS[kind]] += n
    assert Counter(r.reason for r in quarantine.collect()) == expected

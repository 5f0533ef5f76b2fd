"""Speed-layer ingest against a real Kafka broker, real Spark and real Delta tables."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from pyspark.sql import SparkSession

from lambda_ml import producer
from lambda_ml_apps.ctr import generator
from lambda_ml.config import PlatformConfig
from speed_layer import ingest

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
KAFKA_COLUMNS = "key binary, value binary, topic string, partition int, offset long, timestamp timestamp"

# The quarantine reason each malformed kind of the generator must get.
EXPECTED_REASONS = {
    "not_json": "malformed JSON: Expecting value at character 37",
    "not_object": "malformed JSON: the record is an array, not a JSON object",
    "missing_field": "missing field: user_id",
    "wrong_type": 'bad value for position: expected an integer, got "top"',
    "bad_time": 'bad value for event_time: expected an ISO-8601 timestamp string with a time zone, got "yesterday"',
    "absurd_time": "event_time before 1970-01-01: absurd timestamp",
    "empty": "empty payload",
}


def _static_kafka_frame(spark: SparkSession, rows: list[tuple[str, bytes]], now: datetime = NOW):  # type: ignore[no-untyped-def]
    data = [(b"k", value, topic, 0, offset, now) for offset, (topic, value) in enumerate(rows)]
    return spark.createDataFrame(data, KAFKA_COLUMNS)


def _drain(spark: SparkSession, cfg: PlatformConfig) -> None:
    """Run the ingest query until it has read what the topics hold (from its checkpoint on)."""
    query = ingest.start_ingest(spark, cfg, available_now=True)
    try:
        query.awaitTermination(300)
        assert query.exception() is None
    finally:
        query.stop()


@pytest.mark.integration
def test_parse_events_types_fields_and_quarantines_every_malformed_kind(spark: SparkSession, cfg: PlatformConfig) -> None:
    impression = {"event_id": "i1", "event_time": "2026-11-20T10:00:00.250Z", "user_id": "u1", "item_id": "x", "device": "mobile", "position": 3}
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
        ("impressions", json.dumps({**impression, "position": "3"}).encode()),
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
        (3, "event_time 4 days, 22:00:00 ahead of the Kafka record time (limit 5 minutes)"),
        (4, "bad value for position: expected an integer, got 2.5"),
        (5, "unknown event topic: unknown-topic"),
        (6, 'bad value for position: expected an integer, got "3"'),
    ]


@pytest.mark.integration
def test_ingest_batch_is_idempotent_per_batch_id(spark: SparkSession, cfg: PlatformConfig, tmp_path) -> None:  # type: ignore[no-untyped-def]
    local = cfg.model_copy(update={"lake": cfg.lake.model_copy(update={"root": str(tmp_path / "lake")})})
    ingest.ensure_tables(spark, local)
    records, truth = generator.generate(local.generator.model_copy(update={"impressions": 300}), timedelta(minutes=30), NOW)
    frame = _static_kafka_frame(spark, [(local.events.topics()[r.event_type].name, r.value) for r in records])

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
    producer.produce(cfg, records[:half], progress=False)

    _drain(spark, cfg)
    # Restart from the checkpoint with the rest of the records: nothing lost, nothing twice.
    producer.produce(cfg, records[half:], progress=False)
    _drain(spark, cfg)

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
    from support import with_topic

    for name in event_types:
        cfg = with_topic(cfg, name, format="avro")
    return cfg


def _expected_avro_reasons(values: list[bytes], schema: dict[str, object]) -> Counter[str]:
    """What the generator's malformed records become on an Avro topic: anything the producer
    cannot encode with the schema is sent as it is, and the decoder says why it does not
    decode; the absurd time encodes and fails the time check."""
    from lambda_ml import avro

    reasons: Counter[str] = Counter()
    for value in values:
        if not value:
            reasons[EXPECTED_REASONS["empty"]] += 1
            continue
        try:
            avro.decode(value, schema)
        except avro.AvroDecodeError as exc:
            reasons[f"malformed Avro: does not decode with impressions.avsc: {exc}"] += 1
        else:
            reasons[EXPECTED_REASONS["absurd_time"]] += 1
    return reasons


@pytest.mark.integration
def test_avro_records_parse_to_the_same_events_as_json(spark: SparkSession, cfg: PlatformConfig) -> None:
    from lambda_ml import avro

    avro_cfg = _avro_config(cfg, "impressions", "clicks")
    records, truth = generator.generate(cfg.generator.model_copy(update={"impressions": 400, "malformed_fraction": 0.05}), timedelta(minutes=30), NOW)
    topics = {name: t.name for name, t in cfg.events.topics().items()}
    schemas = {name: avro.load_schema(avro.schema_path(cfg.kafka.avro_schemas, name)) for name in topics}
    as_json = ingest.parse_events(_static_kafka_frame(spark, [(topics[r.event_type], r.value) for r in records]), cfg)
    encoded = [(topics[r.event_type], producer.wire_value(r, schemas[r.event_type])) for r in records]
    assert sum(value != r.value for (_, value), r in zip(encoded, records)) == truth.valid_records + truth.malformed["absurd_time"]
    as_avro = ingest.parse_events(_static_kafka_frame(spark, encoded), avro_cfg)

    for name in ("impressions", "clicks"):
        fields = [c for c in as_json[name].columns if c != "ingested_at"]
        expected = sorted(tuple(r) for r in as_json[name].select(fields).collect())
        assert len(expected) == {"impressions": truth.impressions, "clicks": truth.clicks_sent}[name]
        assert sorted(tuple(r) for r in as_avro[name].select(fields).collect()) == expected
    reasons = Counter(r.reason for r in as_avro["quarantine"].collect())
    bad = [value for (_, value), r in zip(encoded, records) if r.key == b"bad"]
    assert len(bad) == truth.malformed_total
    assert reasons == _expected_avro_reasons(bad, schemas["impressions"])
    assert reasons["event_time before 1970-01-01: absurd timestamp"] == truth.malformed["absurd_time"]


@pytest.mark.integration
def test_avro_decoding_reads_what_spark_avro_writes(spark: SparkSession, cfg: PlatformConfig) -> None:
    """Stream scoring decodes Avro impressions with lambda_ml.avro; spark-avro (the speed layer's
    reader and writer) writes the bytes here, so the two agree on the wire format."""
    from pyspark.sql import functions as F
    from pyspark.sql.avro.functions import to_avro
    from pyspark.sql.types import StructField, StructType

    from lambda_ml import avro
    from support import IMPRESSION

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
    from lambda_ml import avro
    from lambda_ml_cli import stack
    from support import isolated

    base = _avro_config(isolated(running_stack, "ctr-ingest-avro", lake_root=tmp_path / "lake", topic_prefix="avro"), "impressions")
    stack.create_topics(base)
    records, truth = generator.generate(base.generator.model_copy(update={"impressions": 1500, "seed": 3}), timedelta(minutes=30), NOW)
    parts = [records[: len(records) // 3], records[len(records) // 3 : 2 * len(records) // 3], records[2 * len(records) // 3 :]]
    for codec, part in zip(("lz4", "zstd", "gzip"), parts):
        producer.produce(base.model_copy(update={"generator": base.generator.model_copy(update={"compression": codec})}), part, progress=False)

    _drain(spark, base)
    paths = ingest.table_paths(base)
    assert spark.read.format("delta").load(paths["impressions"]).count() == truth.impressions
    assert spark.read.format("delta").load(paths["clicks"]).count() == truth.clicks_sent
    quarantine = spark.read.format("delta").load(paths["quarantine"])
    schema = avro.load_schema(avro.schema_path(base.kafka.avro_schemas, "impressions"))
    bad = [producer.wire_value(r, schema) for r in records if r.key == b"bad"]
    assert Counter(r.reason for r in quarantine.collect()) == _expected_avro_reasons(bad, schema)


# --------------------------------------------------------------------------- strict validation

RECORD_TIME = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=2)  # the Kafka record time sent
VALID_IMPRESSION = {
    "event_id": "imp-ok", "event_time": producer.iso(RECORD_TIME - timedelta(minutes=1)), "user_id": "u1", "item_id": "i1",
    "device": "mobile", "position": 3,
}  # fmt: skip
VALID_CLICK = {"event_id": "clk-ok", "impression_id": "imp-ok", "event_time": producer.iso(RECORD_TIME)}


def _impression(**changes: object) -> bytes:
    return json.dumps({**VALID_IMPRESSION, **changes}).encode()


def _strict_json_cases() -> list[tuple[str, bytes | None, str | None]]:
    """(case, the impression record's bytes, the quarantine reason or None for a valid event)."""
    first = _impression(event_id="imp-two-1")
    deep = b"[" * 10_000 + b"]" * 10_000
    huge = _impression(user_id="u" * 900_000)
    return [
        ("valid", _impression(), None),
        ("valid unicode as UTF-8", json.dumps({**VALID_IMPRESSION, "event_id": "imp-é", "user_id": "Zoë 🚲", "item_id": 'i"x"\n'}, ensure_ascii=False).encode(), None),
        ("valid unicode as escapes", _impression(event_id="imp-esc", user_id="Zoë 🚲", device="tablet"), None),
        ("valid with a 10,000-deep unknown field", _impression(event_id="imp-deep")[:-1] + b', "extra": ' + deep + b"}", None),
        ("valid with unknown fields and a time zone offset", _impression(event_id="imp-tz", event_time="2000-01-01T01:00:00+01:00", tags={"a": [1, None]}), None),
        ("two JSON objects in one record", first + _impression(event_id="imp-two-2"),
         f"malformed JSON: more data after the JSON value at character {len(first)} (one JSON value per record)"),
        ("trailing garbage", _impression(event_id="imp-garbage") + b" xyz",
         f"malformed JSON: more data after the JSON value at character {len(_impression(event_id='imp-garbage')) + 1} (one JSON value per record)"),
        ("single-quoted pseudo-JSON", b"{'event_id': 'imp-quote', 'user_id': 'u1'}",
         "malformed JSON: Expecting property name enclosed in double quotes at character 1"),
        ("a number in a string field", _impression(user_id=123), "bad value for user_id: expected a string, got 123"),
        ("an object in a string field", _impression(user_id={"id": "u1"}), "bad value for user_id: expected a string, got an object"),
        ("an array in a string field", _impression(item_id=["i1"]), "bad value for item_id: expected a string, got an array"),
        ("invalid UTF-8", _impression(user_id="uXY").replace(b"uXY", b"u\xff\xfe"),
         f"malformed JSON: invalid UTF-8 at byte {_impression(user_id='uXY').index(b'uXY') + 1}"),
        ("a 900 KB user_id", huge, f"record of {len(huge)} bytes, more than the limit of 65536 (events.max_record_bytes)"),
        ("a 257-character user_id", _impression(user_id="u" * 257),
         "bad value for user_id: 257 characters, more than the limit of 256 (events.max_string_length)"),
        ("event_time as the number 12345", _impression(event_time=12345),
         "bad value for event_time: expected an ISO-8601 timestamp string with a time zone, got 12345"),
        ("event_time without a time zone", _impression(event_time="2026-11-20T10:00:00"),
         'bad value for event_time: expected an ISO-8601 timestamp string with a time zone, got "2026-11-20T10:00:00"'),
        ("an integer as a string", _impression(position="2"), 'bad value for position: expected an integer, got "2"'),
        ("a float for an integer", _impression(position=2.0), "bad value for position: expected an integer, got 2.0"),
        ("a boolean for an integer", _impression(position=True), "bad value for position: expected an integer, got true"),
        ("null for a field", _impression(device=None), "bad value for device: expected a string, got null"),
        ("a blank string", _impression(device=" "), 'bad value for device: expected a non-blank string, got " "'),
        ("a lone surrogate", _impression(user_id="u\ud800"), "bad value for user_id: a lone UTF-16 surrogate (\\ud800) is not a character"),
        ("NaN", _impression()[:-1] + b', "score": NaN}', "malformed JSON: NaN is not a JSON value"),
        ("a duplicate key", _impression()[:-1] + b', "user_id": "u2"}', 'malformed JSON: duplicate key "user_id"'),
        ("missing field", json.dumps({k: v for k, v in VALID_IMPRESSION.items() if k != "item_id"}).encode(), "missing field: item_id"),
        ("wrong type", _impression(position="top"), 'bad value for position: expected an integer, got "top"'),
        ("empty payload", b"", "empty payload"),
        ("no payload (a tombstone)", None, "empty payload"),
        ("not an object", b'["imp-ok", 3]', "malformed JSON: the record is an array, not a JSON object"),
        ("cut short", _impression()[:25], "malformed JSON: Unterminated string starting at character 23"),
        ("absurd time", _impression(event_time="1969-12-31T23:59:59Z"), "event_time before 1970-01-01: absurd timestamp"),
        ("10 h in the future", _impression(event_time=producer.iso(RECORD_TIME + timedelta(hours=10))),
         "event_time 10:00:00 ahead of the Kafka record time (limit 5 minutes)"),
        ("5 min 1 s in the future", _impression(event_time=producer.iso(RECORD_TIME + timedelta(minutes=5, seconds=1))),
         "event_time 0:05:01 ahead of the Kafka record time (limit 5 minutes)"),
        ("5 min in the future: within the bound", _impression(event_id="imp-5min", event_time=producer.iso(RECORD_TIME + timedelta(minutes=5))), None),
    ]  # fmt: skip


def _strict_avro_cases(schema: dict[str, object]) -> list[tuple[str, bytes | None, str | None]]:
    """The same checks on an Avro topic (clicks): decoded with the schema, then the same field,
    size and time rules."""
    from lambda_ml import avro

    valid = avro.encode(VALID_CLICK, schema)
    long_id = avro.encode({**VALID_CLICK, "impression_id": "i" * 300}, schema)
    return [
        ("valid Avro click", valid, None),
        ("valid Avro unicode", avro.encode({**VALID_CLICK, "event_id": "clk-é", "impression_id": "Zoë 🚲"}, schema), None),
        ("Avro 10 h in the future", avro.encode({**VALID_CLICK, "event_time": producer.iso(RECORD_TIME + timedelta(hours=10))}, schema),
         "event_time 10:00:00 ahead of the Kafka record time (limit 5 minutes)"),
        ("Avro 300-character id", long_id, "bad value for impression_id: 300 characters, more than the limit of 256 (events.max_string_length)"),
        ("Avro blank id", avro.encode({**VALID_CLICK, "impression_id": "  "}, schema), 'bad value for impression_id: expected a non-blank string, got "  "'),
        ("Avro cut short", valid[:-1], "malformed Avro: does not decode with clicks.avsc: field event_time: the record ends inside the value"),
        ("Avro trailing bytes", valid + b"\x00", "malformed Avro: does not decode with clicks.avsc: 1 byte(s) left after the last field (event_time)"),
        ("Avro invalid UTF-8", avro.encode({**VALID_CLICK, "impression_id": "ab"}, schema).replace(b"ab", b"a\xff"),
         "malformed Avro: does not decode with clicks.avsc: field impression_id: not UTF-8 (invalid start byte)"),
        ("Avro record too large", avro.encode({**VALID_CLICK, "impression_id": "i" * 70_000}, schema),
         f"record of {len(avro.encode({**VALID_CLICK, 'impression_id': 'i' * 70_000}, schema))} bytes, more than the limit of 65536 (events.max_record_bytes)"),
        ("Avro empty", b"", "empty payload"),
    ]  # fmt: skip


def _typed(value: bytes, schema: dict[str, object] | None, fields: list[str]) -> dict[str, object]:
    """The field values a sent record holds, read without the validator: json (or the Avro
    decoder) and datetime.fromisoformat."""
    import sys

    from lambda_ml import avro

    depth = sys.getrecursionlimit()
    sys.setrecursionlimit(30_000)  # the json module recurses into the 10,000-deep unknown field
    try:
        decoded = json.loads(value) if schema is None else avro.decode(value, schema)
    finally:
        sys.setrecursionlimit(depth)
    typed = {name: decoded[name] for name in fields}
    if isinstance(typed["event_time"], str):
        typed["event_time"] = datetime.fromisoformat(typed["event_time"])
    return typed


@pytest.mark.integration
def test_every_record_lands_exactly_as_sent_or_is_quarantined_with_its_reason(
    running_stack: PlatformConfig, spark: SparkSession, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Each case is sent through the real broker (JSON impressions, Avro clicks, every record
    with the same Kafka record time) and drained by the Spark ingest: a valid event lands in
    bronze with its field values as sent, anything else in quarantine with its raw bytes and
    the exact reason; nothing is lost or doubled."""
    from deltalake import DeltaTable
    from kafka import KafkaProducer

    from lambda_ml import avro
    from lambda_ml_cli import stack
    from lambda_ml.schemas import event_types
    from support import isolated

    cfg = _avro_config(isolated(running_stack, "ctr-ingest-strict", lake_root=tmp_path / "lake", topic_prefix="strict"), "clicks")
    stack.create_topics(cfg)
    click_schema = avro.load_schema(avro.schema_path(cfg.kafka.avro_schemas, "clicks"))
    cases = [("impressions", None, *case) for case in _strict_json_cases()]
    cases += [("clicks", click_schema, *case) for case in _strict_avro_cases(click_schema)]
    assert len({name for _, _, name, _, _ in cases}) == len(cases)
    producer = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, acks="all", max_request_size=4 * 1024 * 1024)
    sent_ms = int(RECORD_TIME.timestamp() * 1000)
    where: dict[tuple[str, int, int], tuple[str, dict[str, object] | None, str, bytes | None, str | None]] = {}
    try:
        futures = [
            (case, producer.send(cfg.events.topic(case[0]).name, key=case[2].encode(), value=case[3], timestamp_ms=sent_ms))
            for case in cases
        ]
        producer.flush()
        for case, future in futures:
            metadata = future.get(timeout=30)
            where[(metadata.topic, metadata.partition, metadata.offset)] = case
    finally:
        producer.close()

    _drain(spark, cfg)

    def read(path: str) -> dict[tuple[str, int, int], dict[str, object]]:
        rows = DeltaTable(path).to_pyarrow_table().to_pylist()
        keyed = {(r["kafka_topic"], r["kafka_partition"], r["kafka_offset"]): r for r in rows}
        assert len(keyed) == len(rows)
        return keyed

    paths = ingest.table_paths(cfg)
    bronze = {**read(paths["impressions"]), **read(paths["clicks"])}
    quarantine = read(paths["quarantine"])
    assert len(bronze) + len(quarantine) == len(cases) and not set(bronze) & set(quarantine)
    landed, reasons, expected_landed, expected_reasons = {}, {}, {}, {}
    for key, (event_type, schema, name, value, reason) in where.items():
        if reason is None:
            assert value is not None
            expected_landed[name] = _typed(value, schema, event_types(cfg)[event_type].field_names)
            if key in bronze:
                landed[name] = {f: bronze[key][f] for f in event_types(cfg)[event_type].field_names}
                assert bronze[key]["kafka_timestamp"] == RECORD_TIME, name
        else:
            expected_reasons[name] = (reason, value or None)
            if key in quarantine:
                reasons[name] = (quarantine[key]["reason"], quarantine[key]["raw_value"] or None)
    assert reasons == expected_reasons
    assert landed == expected_landed

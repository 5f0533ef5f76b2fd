"""Speed layer ingest: Kafka -> bronze Delta tables, exactly once; bad records -> quarantine.

The body of the streaming query is :func:`ingest_batch`, a plain function of a DataFrame with
Kafka's columns (``key, value, topic, partition, offset, timestamp``), so tests call it on a
static frame. Each micro-batch writes with Delta's idempotent ``txnAppId``/``txnVersion``: a
batch replayed after a crash is skipped by Delta instead of appended twice.

Run it with ``lambda-ml speed ingest`` or ``spark-submit speed_layer/ingest.py``.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.avro.functions import from_avro
from pyspark.sql.streaming import DataStreamWriter, StreamingQuery
from pyspark.sql.types import StringType, StructField, StructType

from lambda_ml import avro
from lambda_ml.config import PlatformConfig, load_config
from lambda_ml.logs import setup_logging
from lambda_ml.schemas import EVENT_TYPES, KAFKA_COLUMNS, QUARANTINE_SCHEMA, EventField, EventType

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"
_CORRUPT = "_corrupt_record"


def bronze_path(cfg: PlatformConfig, event_type: str) -> str:
    return cfg.lake.table("bronze", event_type)


def quarantine_path(cfg: PlatformConfig) -> str:
    return cfg.lake.table(QUARANTINE)


def _typed(field: EventField, text: Column) -> Column:
    if field.kind == "int":
        # Integers only: "2" and 2 pass, "2.5", "top" and 2.5 do not.
        return F.when(text.rlike(r"^-?\d{1,9}$"), text.cast("int"))
    if field.kind == "timestamp":
        return F.try_to_timestamp(text)
    return F.when(F.length(F.trim(text)) > 0, text)


def _reason(event: EventType, cfg: PlatformConfig, undecodable: str) -> Column:
    """The first thing wrong with a record, or null if it is a valid event."""
    checks: list[Column] = [
        F.when(F.col("raw_value").isNull() | (F.length("raw_value") == 0), F.lit("empty payload")),
        F.when(F.col("_json").isNull() | F.col(f"_json.{_CORRUPT}").isNotNull(), F.lit(undecodable)),
    ]
    for field in event.fields:
        text = F.col(f"_json.{field.name}")
        checks.append(F.when(text.isNull(), F.lit(f"missing field: {field.name}")))
    for field in event.fields:
        text = F.col(f"_json.{field.name}")
        expected = {"int": "an integer", "timestamp": "an ISO-8601 timestamp", "string": "a non-empty string"}[field.kind]
        checks.append(
            F.when(F.col(field.name).isNull(), F.concat(F.lit(f"bad value for {field.name}: expected {expected}, got "), text))
        )
    min_time = F.to_timestamp(F.lit(cfg.speed.min_event_date))
    max_time = F.coalesce(F.col("kafka_timestamp"), F.current_timestamp()) + F.make_interval(
        days=F.lit(0), hours=F.lit(int(cfg.speed.max_future_days * 24))
    )
    checks.append(
        F.when(F.col("event_time") < min_time, F.lit(f"event_time before {cfg.speed.min_event_date}: absurd timestamp"))
    )
    checks.append(
        F.when(F.col("event_time") > max_time, F.lit(f"event_time more than {cfg.speed.max_future_days:g} days after the Kafka record time"))
    )
    return F.coalesce(*checks)


def _json_fields(event: EventType) -> Column:
    """The record's fields as text, plus the corrupt-record column when it is no JSON object.

    Every field is read as text first, so a wrong type is reported per field instead of turning
    the whole record into a parse failure."""
    text_schema = StructType([StructField(f.name, StringType()) for f in event.fields] + [StructField(_CORRUPT, StringType())])
    options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": _CORRUPT}
    return F.from_json(F.col("raw_value").cast("string"), text_schema, options)


def _avro_fields(event: EventType, cfg: PlatformConfig) -> Column:
    """The same text struct as :func:`_json_fields`, decoded with the event's Avro schema; null
    for a payload that does not decode. ``from_avro`` in PERMISSIVE mode turns one into a row
    of nulls, which a decoded event never is (the schemas' fields are not nullable)."""
    schema = avro.schema_path(cfg.kafka.avro_schemas, event.name).read_text()
    decoded = from_avro(F.col("raw_value"), schema, {"mode": "PERMISSIVE"})
    fields = [decoded[f.name].cast("string").alias(f.name) for f in event.fields]
    decodes = F.greatest(*[decoded[f.name].isNotNull() for f in event.fields])
    return F.when(decoded.isNotNull() & decodes, F.struct(*fields, F.lit(None).cast("string").alias(_CORRUPT)))


def checked_events(raw: DataFrame, cfg: PlatformConfig) -> dict[str, DataFrame]:
    """Every record of a frame of Kafka records, checked: one frame per event type with the
    event's typed fields, the Kafka columns, ``reason`` (null for a valid event) and
    ``raw_value`` (kept for invalid records only), plus ``"quarantine"``: the records of topics
    no event type reads, in the quarantine schema.

    Each record is parsed once here; :func:`split_checked` derives the bronze and quarantine
    frames from these, so a caller that caches them parses every record once.
    """
    records = raw.select(
        F.col("topic").alias("kafka_topic"),
        F.col("partition").alias("kafka_partition"),
        F.col("offset").alias("kafka_offset"),
        F.col("timestamp").alias("kafka_timestamp"),
        F.col("value").alias("raw_value"),
        F.current_timestamp().alias("ingested_at"),
    )
    topics = {topic.name: name for name, topic in cfg.kafka.topics.event_topics().items()}
    out: dict[str, DataFrame] = {}
    for topic_name, event_name in topics.items():
        event = EVENT_TYPES[event_name]
        topic = cfg.kafka.topics.event_topics()[event_name]
        subset = records.where(F.col("kafka_topic") == topic_name)
        if topic.format == "avro":
            parsed, undecodable = subset.withColumn("_json", _avro_fields(event, cfg)), f"malformed Avro: does not decode with {event_name}.avsc"
        else:
            parsed, undecodable = subset.withColumn("_json", _json_fields(event)), "malformed JSON: not a JSON object"
        typed = parsed.select("*", *[_typed(f, F.col(f"_json.{f.name}")).alias(f.name) for f in event.fields])
        checked = typed.withColumn("reason", _reason(event, cfg, undecodable))
        out[event_name] = checked.select(
            *event.field_names,
            *[c.name for c in KAFKA_COLUMNS.fields],
            F.when(F.col("reason").isNotNull(), F.col("raw_value")).alias("raw_value"),
            "reason",
        )
    unknown = records.where(~F.col("kafka_topic").isin(list(topics))).withColumn(
        "reason", F.concat(F.lit("unknown event topic: "), F.col("kafka_topic"))
    )
    out[QUARANTINE] = unknown.select(*[c.name for c in QUARANTINE_SCHEMA.fields])
    return out


def split_checked(checked: dict[str, DataFrame]) -> dict[str, DataFrame]:
    """:func:`checked_events` -> one valid-event frame per event type plus quarantine, in the
    bronze and quarantine schemas of :mod:`lambda_ml.schemas`."""
    out: dict[str, DataFrame] = {}
    bad: list[DataFrame] = []
    for event_name, frame in checked.items():
        if event_name == QUARANTINE:
            continue
        event = EVENT_TYPES[event_name]
        out[event_name] = frame.where(F.col("reason").isNull()).select(*event.field_names, *[c.name for c in KAFKA_COLUMNS.fields])
        bad.append(frame.where(F.col("reason").isNotNull()).select(*[c.name for c in QUARANTINE_SCHEMA.fields]))
    quarantine = checked[QUARANTINE]
    for frame in reversed(bad):
        quarantine = frame.unionByName(quarantine)
    out[QUARANTINE] = quarantine
    return out


def parse_events(raw: DataFrame, cfg: PlatformConfig) -> dict[str, DataFrame]:
    """Split a frame of Kafka records into one valid-event frame per event type plus quarantine.

    Returns ``{"impressions": df, "clicks": df, "quarantine": df}`` with the bronze and
    quarantine schemas of :mod:`lambda_ml.schemas`.
    """
    return split_checked(checked_events(raw, cfg))


def table_paths(cfg: PlatformConfig) -> dict[str, str]:
    paths = {name: bronze_path(cfg, name) for name in EVENT_TYPES}
    paths[QUARANTINE] = quarantine_path(cfg)
    return paths


# Bronze tables record their change feed: the speed layer's silver path reads them as streams
# with the Delta version each row was committed in (``_commit_version``).
CHANGE_FEED = "delta.enableChangeDataFeed"


def ensure_tables(spark: SparkSession, cfg: PlatformConfig) -> None:
    """Create the bronze and quarantine tables (empty) if they do not exist yet, bronze with its
    change feed on (turned on once for a bronze table created before it was)."""
    schemas = {name: event.bronze_schema() for name, event in EVENT_TYPES.items()}
    schemas[QUARANTINE] = QUARANTINE_SCHEMA
    for name, path in table_paths(cfg).items():
        builder = DeltaTable.createIfNotExists(spark).location(path).addColumns(schemas[name])
        if name in EVENT_TYPES:
            builder = builder.property(CHANGE_FEED, "true")
        builder.execute()
        if name in EVENT_TYPES:
            properties = DeltaTable.forPath(spark, path).detail().first()["properties"]  # type: ignore[index]
            if properties.get(CHANGE_FEED) != "true":
                # Before the ingest query starts: nothing else writes bronze, so no commit conflicts.
                spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('{CHANGE_FEED}' = 'true')")
                log.info("turned the change feed on for %s", path)


@dataclass(frozen=True)
class BatchCounts:
    batch_id: int
    rows: dict[str, int]

    @property
    def read(self) -> int:
        """Kafka records the micro-batch read: each lands in bronze or in quarantine."""
        return sum(self.rows.values())

    @property
    def quarantined(self) -> int:
        return self.rows.get(QUARANTINE, 0)


@dataclass
class IngestTotals:
    """What the ingest query read, landed and quarantined since this process started it."""

    batches: int = 0
    read: int = 0
    quarantined: int = 0
    reasons: Counter[str] = dataclass_field(default_factory=Counter)

    @property
    def landed(self) -> int:
        return self.read - self.quarantined

    def nothing_landed(self) -> str | None:
        """Why a run that read records but landed none of them failed, or None if it did not.

        >>> IngestTotals(2, 5, 5, Counter({"missing field: user_id": 5})).nothing_landed()
        'ingest read 5 records and quarantined every one of them (missing field: user_id: 5); nothing landed in bronze'
        """
        if self.read == 0 or self.landed > 0:
            return None
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.reasons.most_common(3))
        return f"ingest read {self.read} records and quarantined every one of them ({reasons}); nothing landed in bronze"


def quarantine_warning(batch_id: int, read: int, reasons: Counter[str], share: float) -> str | None:
    """The warning a micro-batch deserves when it quarantined more than ``share`` of what it read.

    >>> quarantine_warning(3, 10, Counter({"empty payload": 6, "missing field: user_id": 2}), 0.5)
    'micro-batch 3 quarantined 8 of 10 records (80 %, more than speed.quarantine_warning_share 50 %); most frequent reasons: empty payload (6), missing field: user_id (2)'
    >>> quarantine_warning(3, 10, Counter({"empty payload": 5}), 0.5) is None
    True
    """
    quarantined = sum(reasons.values())
    if read == 0 or quarantined <= share * read:
        return None
    top = ", ".join(f"{reason} ({n})" for reason, n in reasons.most_common(3))
    return (
        f"micro-batch {batch_id} quarantined {quarantined} of {read} records ({100 * quarantined / read:.0f} %, "
        f"more than speed.quarantine_warning_share {100 * share:.0f} %); most frequent reasons: {top}"
    )


def ingest_batch(
    batch: DataFrame, batch_id: int, cfg: PlatformConfig, app_id: str = "ingest", totals: IngestTotals | None = None
) -> BatchCounts:
    """Write one micro-batch of Kafka records to bronze and quarantine, idempotently.

    ``(app_id, batch_id)`` identifies the write: Delta skips it if it was already committed.
    A micro-batch that quarantines more than ``speed.quarantine_warning_share`` of its records
    logs a warning naming the most frequent reasons; ``totals`` (if given) adds up the counts.
    """
    batch.persist()
    # Parsed once: the bronze and quarantine frames of each event type read the same cached rows.
    checked = {name: frame.persist() for name, frame in checked_events(batch, cfg).items()}
    reasons: Counter[str] = Counter()
    try:
        counts: dict[str, int] = {}
        for name, frame in split_checked(checked).items():
            counts[name] = frame.count()
            if counts[name]:
                (
                    frame.write.format("delta")
                    .mode("append")
                    .option("txnAppId", f"{app_id}:{name}")
                    .option("txnVersion", batch_id)
                    .save(table_paths(cfg)[name])
                )
            if name == QUARANTINE and counts[name]:
                reasons.update({row["reason"]: row["count"] for row in frame.groupBy("reason").count().collect()})
    finally:
        for frame in checked.values():
            frame.unpersist()
        batch.unpersist()
    result = BatchCounts(batch_id, counts)
    log.info("micro-batch %d: %s", batch_id, ", ".join(f"{n} {name}" for name, n in counts.items()))
    warning = quarantine_warning(batch_id, result.read, reasons, cfg.speed.quarantine_warning_share)
    if warning:
        log.warning(warning)
    if totals is not None:
        totals.batches += 1
        totals.read += result.read
        totals.quarantined += result.quarantined
        totals.reasons.update(reasons)
    return result


def kafka_source(spark: SparkSession, cfg: PlatformConfig) -> DataFrame:
    topics = ",".join(t.name for t in cfg.kafka.topics.event_topics().values())
    return (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", cfg.kafka.bootstrap_servers)
        .option("subscribe", topics)
        .option("startingOffsets", "earliest")
        .option("maxOffsetsPerTrigger", cfg.speed.max_offsets_per_trigger)
        .load()
    )


def start_ingest(
    spark: SparkSession,
    cfg: PlatformConfig,
    available_now: bool = False,
    trigger: Callable[[DataStreamWriter], DataStreamWriter] | None = None,
    totals: IngestTotals | None = None,
) -> StreamingQuery:
    """Start the checkpointed ingest query; ``available_now`` drains what is in Kafka and stops.

    ``trigger`` (set by the speed application) overrides both: it sets the writer's trigger.
    ``totals`` adds up what each micro-batch read, landed and quarantined.
    """
    ensure_tables(spark, cfg)
    writer = (
        kafka_source(spark, cfg)
        .writeStream.queryName("ingest")
        .option("checkpointLocation", f"{cfg.lake.checkpoints.rstrip('/')}/ingest")
        .foreachBatch(lambda batch, batch_id: ingest_batch(batch, batch_id, cfg, totals=totals))
    )
    if trigger is not None:
        writer = trigger(writer)
    elif available_now:
        writer = writer.trigger(availableNow=True)
    else:
        writer = writer.trigger(processingTime=f"{cfg.speed.trigger_seconds:g} seconds")
    query = writer.start()
    log.info("ingest query started: %s -> %s", cfg.kafka.bootstrap_servers, cfg.lake.table("bronze"))
    return query


def run(cfg: PlatformConfig, available_now: bool = False) -> None:
    """Run the ingest query alone until it drains (``available_now``) or until SIGTERM / Ctrl-C
    (the current micro-batch is let finish)."""
    from speed_layer import app

    app.run(cfg, ["ingest"], available_now=available_now)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="speed_layer/ingest.py",
        description="Kafka -> bronze Delta tables, exactly once; malformed records -> quarantine.",
    )
    parser.add_argument("--config", help="platform config file (default: conf/platform.yaml)")
    parser.add_argument("--available-now", action="store_true", help="ingest what Kafka holds now, then stop")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    run(load_config(args.config), available_now=args.available_now)


if __name__ == "__main__":
    main()

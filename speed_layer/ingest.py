"""Speed layer ingest: Kafka -> bronze Delta tables, exactly once; bad records -> quarantine.

The body of the streaming query is :func:`ingest_batch`, a plain function of a DataFrame with
Kafka's columns (``key, value, topic, partition, offset, timestamp``), so tests call it on a
static frame. Each micro-batch writes with Delta's idempotent ``txnAppId``/``txnVersion``: a
batch replayed after a crash is skipped by Delta instead of appended twice.

Every record goes through :mod:`lambda_ml.validation` (run in the executors' Python workers
with ``mapInArrow``), the validator stream scoring and the prediction service also apply: a
valid event lands in bronze with its fields exactly as sent; anything else lands in quarantine
with its raw bytes and the reason.

Run it with ``lambda-ml speed ingest`` or ``spark-submit speed_layer/ingest.py``.
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import DataStreamWriter, StreamingQuery
from pyspark.sql.types import BinaryType, StringType, StructField, StructType

from lambda_ml import avro, validation
from lambda_ml.config import PlatformConfig, load_config
from lambda_ml.logs import setup_logging
from lambda_ml.schemas import KAFKA_COLUMNS, QUARANTINE_SCHEMA, EventType, event_types

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"
RAW_VALUE, REASON = "raw_value", "reason"


def bronze_path(cfg: PlatformConfig, event_type: str) -> str:
    return cfg.lake.table("bronze", event_type)


def quarantine_path(cfg: PlatformConfig) -> str:
    return cfg.lake.table(QUARANTINE)


def _checked_schema(event: EventType) -> StructType:
    """What :func:`check_batches` returns for an event type: its fields (null for an invalid
    record), the Kafka columns, the raw value (invalid records only) and the reason."""
    fields = [StructField(f.name, f.spark_type, nullable=True) for f in event.fields]
    return StructType(
        fields + list(KAFKA_COLUMNS.fields) + [StructField(RAW_VALUE, BinaryType()), StructField(REASON, StringType())]
    )


def check_batches(
    batches: Iterable[pa.RecordBatch], event: EventType, rules: validation.EventRules, avro_schema: dict[str, Any] | None
) -> Iterator[pa.RecordBatch]:
    """The ``mapInArrow`` body: each record (``raw_value``, ``kafka_timestamp``) through
    :func:`lambda_ml.validation.check_record`, the validator stream scoring and the service
    share; the Kafka columns pass through untouched."""
    arrow_types = {"string": pa.string(), "int": pa.int32(), "double": pa.float64(), "timestamp": pa.timestamp("us", tz="UTC")}
    names = [f.name for f in event.fields]
    check = validation.check_record
    for batch in batches:
        record_times = batch.column("kafka_timestamp").to_pylist()
        results = [check(event, v, t, rules, avro_schema) for v, t in zip(batch.column(RAW_VALUE).to_pylist(), record_times)]
        reasons = [r if isinstance(r, str) else None for r in results]
        columns = [[None if isinstance(r, str) else r[name] for r in results] for name in names]
        reason = pa.array(reasons, pa.string())
        raw = pc.if_else(pc.is_valid(reason), batch.column(RAW_VALUE), pa.scalar(None, pa.binary()))
        typed = [pa.array(column, arrow_types[f.kind]) for column, f in zip(columns, event.fields)]
        kafka = [batch.column(c.name) for c in KAFKA_COLUMNS.fields]
        yield pa.RecordBatch.from_arrays(
            [*typed, *kafka, raw, reason], names=[*names, *[c.name for c in KAFKA_COLUMNS.fields], RAW_VALUE, REASON]
        )


def checked_events(raw: DataFrame, cfg: PlatformConfig) -> dict[str, DataFrame]:
    """Every record of a frame of Kafka records, checked: one frame per event type with the
    event's typed fields, the Kafka columns, ``reason`` (null for a valid event) and
    ``raw_value`` (kept for invalid records only), plus ``"quarantine"``: the records of topics
    no event type reads, in the quarantine schema.

    Each record is validated once here, in Python (:func:`check_batches`); :func:`split_checked`
    derives the bronze and quarantine frames from these, so a caller that caches them validates
    every record once.
    """
    records = raw.select(
        F.col("topic").alias("kafka_topic"),
        F.col("partition").alias("kafka_partition"),
        F.col("offset").alias("kafka_offset"),
        F.col("timestamp").alias("kafka_timestamp"),
        F.col("value").alias(RAW_VALUE),
        F.current_timestamp().alias("ingested_at"),
    )
    rules = validation.EventRules.from_config(cfg)
    event_topics = cfg.events.topics()
    declared = event_types(cfg)
    out: dict[str, DataFrame] = {}
    for event_name, topic in event_topics.items():
        event = declared[event_name]
        schema = avro.event_schema(cfg.kafka.avro_schemas, event_name) if topic.format == "avro" else None
        subset = records.where(F.col("kafka_topic") == topic.name)
        body = functools.partial(check_batches, event=event, rules=rules, avro_schema=schema)
        checked = subset.mapInArrow(body, _checked_schema(event))
        out[event_name] = checked.select(*event.field_names, *[c.name for c in KAFKA_COLUMNS.fields], RAW_VALUE, REASON)
    known = [topic.name for topic in event_topics.values()]
    unknown = records.where(~F.col("kafka_topic").isin(known)).withColumn(
        REASON, F.concat(F.lit("unknown event topic: "), F.col("kafka_topic"))
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
        lineage = [c.name for c in KAFKA_COLUMNS.fields]
        fields = [c for c in frame.columns if c not in (*lineage, RAW_VALUE, REASON)]
        out[event_name] = frame.where(F.col("reason").isNull()).select(*fields, *lineage)
        bad.append(frame.where(F.col("reason").isNotNull()).select(*[c.name for c in QUARANTINE_SCHEMA.fields]))
    quarantine = checked[QUARANTINE]
    for frame in reversed(bad):
        quarantine = frame.unionByName(quarantine)
    out[QUARANTINE] = quarantine
    return out


def parse_events(raw: DataFrame, cfg: PlatformConfig) -> dict[str, DataFrame]:
    """Split a frame of Kafka records into one valid-event frame per event type plus quarantine.

    Returns ``{<event type>: df, ..., "quarantine": df}`` with the bronze and
    quarantine schemas of :mod:`lambda_ml.schemas`.
    """
    return split_checked(checked_events(raw, cfg))


def table_paths(cfg: PlatformConfig) -> dict[str, str]:
    paths = {name: bronze_path(cfg, name) for name in cfg.events.types}
    paths[QUARANTINE] = quarantine_path(cfg)
    return paths


# Bronze tables record their change feed: the speed layer's silver path reads them as streams
# with the Delta version each row was committed in (``_commit_version``).
CHANGE_FEED = "delta.enableChangeDataFeed"


def ensure_tables(spark: SparkSession, cfg: PlatformConfig) -> None:
    """Create the bronze and quarantine tables (empty) if they do not exist yet, bronze with its
    change feed on (turned on once for a bronze table created before it was)."""
    schemas = {name: event.bronze_schema() for name, event in event_types(cfg).items()}
    schemas[QUARANTINE] = QUARANTINE_SCHEMA
    for name, path in table_paths(cfg).items():
        builder = DeltaTable.createIfNotExists(spark).location(path).addColumns(schemas[name])
        if name != QUARANTINE:
            builder = builder.property(CHANGE_FEED, "true")
        builder.execute()
        if name != QUARANTINE:
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
    topics = ",".join(t.name for t in cfg.events.topics().values())
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

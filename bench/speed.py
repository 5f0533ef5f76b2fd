"""Benchmark: the speed layer on this machine, three measurements in one run.

1. **Sustained throughput.** A topic pre-loaded with generated events (impressions and ~5 %
   attributed clicks, JSON, the generator's compression) is drained by the real speed-layer
   queries ``ingest`` (Kafka -> bronze Delta, exactly once) and ``increments`` (bronze change
   feed -> deduplication -> stream-stream click attribution -> feature increments per entity and
   bucket), side by side in one application as ``lambda-ml speed run`` runs them. Events/s come
   from the queries' own progress events: from the start of the first ingest micro-batch to the
   end of the increments micro-batch that read the last event. The peer is a plain kafka-python consumer loop doing the same work in
   one Python process: the same validation, deduplication by event id, click attribution within
   the window, the declared aggregates per (entity keys, bucket), and the same output written
   as Delta tables (bronze appends and increment rows, with ``deltalake``) once per chunk of the
   size of one of our micro-batches. It commits its Kafka offsets after each chunk (at least
   once: a crash between the write and the commit would write a chunk twice). Beside them, the
   **Spark ceiling**: a Structured Streaming query doing only the unavoidable part (read the
   same topics with the same micro-batch size, parse the JSON, append to one Delta table). No
   Spark speed layer on this machine can beat its rate, so it says how far a target is in reach.
2. **Latency at a steady rate.** The speed layer runs continuously (``ingest`` and
   ``increments``, a micro-batch every ``speed.trigger_seconds``) while a paced kafka-python
   producer sends impressions (and some clicks) at a fixed rate. Reported: micro-batch
   duration p50/p95 per query, and freshness p50/p95: from an impression's Kafka record time
   (stamped by the producer when it sends) to the commit of the increments table version that
   first counts it (the table serving reads), from the Delta logs of bronze and increments.
   Beside it, at the same rate, the **Spark ceiling, one hop**: one query, a micro-batch every
   second, that only parses each record, appends it to its bronze table and appends one count
   per (user, hour) stamped with the bronze version just committed (no validation,
   deduplication, join or state). No Spark speed layer here makes events servable faster.
3. **Kafka bytes per event.** The same generated events sent with the platform's producer to
   fresh topics in JSON and in Avro, uncompressed and with gzip, lz4 and zstd (kafka-python
   cannot produce snappy); bytes are the broker's log segment sizes divided by the records.

Everything runs on loopback in a temporary directory: a Kafka broker (stopped by PID at the
end); each Spark workload and the peer run as child processes so that their CPU and memory are
their own.

    python bench/speed.py --quick            # 200k impressions, 30 s steady (minutes on 2 cores)
    python bench/speed.py                    # 1M impressions, 90 s steady
    python bench/speed.py --events 3M --rate 10000 --fresh-seconds 60 --parts throughput,steady
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import (  # noqa: E402
    MemorySampler,
    bench_parser,
    default_out,
    free_port,
    gib,
    human_count,
    load_average,
    local_paths,
    machine_info,
    parse_count,
    run_measured,
    write_result,
)
from bench.report import speed_tables  # noqa: E402
from lambda_ml.config import PlatformConfig, load_config, write_config  # noqa: E402
from lambda_ml.logs import setup_logging  # noqa: E402

log = logging.getLogger("bench.speed")

NAME = "speed"
PACKAGES = ("pyspark", "delta-spark", "kafka-python", "deltalake", "pyarrow")
EVENTS, QUICK_EVENTS = 1_000_000, 200_000
RATE = 10_000
FRESH_SECONDS, QUICK_FRESH_SECONDS = 90.0, 30.0
BYTES_EVENTS, QUICK_BYTES_EVENTS = 50_000, 10_000
CLICK_PERCENT = 5  # share of impressions clicked in the generated streams
CODECS = ("none", "gzip", "lz4", "zstd")
CEILING = "ceiling"  # the bare Kafka -> parse -> Delta query (see child_spark_ceiling)
STEADY_CEILING = "steady-ceiling"  # its one-hop twin at a steady rate (see child_spark_steady_ceiling)
# Its trigger: the shortest that helps (0.2 s gave the same freshness; batches take longer).
STEADY_CEILING_TRIGGER_S = 1.0
TARGET_EVENTS_PER_S = 100_000
TARGET_RATIO = 3.0
TARGET_FRESHNESS_P95_S = 5.0
TARGET_BYTES_SAVED = 0.80


def bench_config(root: Path, **extra: Any) -> PlatformConfig:
    kafka_port, controller_port = free_port(), free_port()
    return load_config(
        env={},
        overrides={
            **local_paths(root),
            "kafka.port": kafka_port,
            "kafka.controller_port": controller_port,
            "kafka.bootstrap_servers": f"127.0.0.1:{kafka_port}",
            "mlflow.tracking_uri": f"http://127.0.0.1:{free_port()}",  # not started: nothing reports to it
            "speed.report_to_mlflow": False,
            **extra,
        },
    )


# --------------------------------------------------------------------------- the plain loop (peer)


@dataclass(frozen=True)
class PlainEvent:
    """A valid event as the plain loop keeps it: its fields, event time in epoch microseconds."""

    kind: str  # event type: impressions or clicks
    fields: dict[str, Any]
    time_us: int


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PlainParser:
    """The ingest's validation in plain Python: a record -> a valid event or a quarantine reason,
    with :func:`lambda_ml.validation.check_record`, the validator the speed layer runs in Spark."""

    def __init__(self, cfg: PlatformConfig) -> None:
        from lambda_ml import validation
        from lambda_ml.schemas import event_types

        self.types = {topic.name: event_types(cfg)[name] for name, topic in cfg.events.topics().items()}
        self.rules = validation.EventRules.from_config(cfg)
        self.check = validation.check_record

    def parse(self, topic: str, value: bytes | None, kafka_ts_ms: int | None) -> PlainEvent | str:
        event = self.types.get(topic)
        if event is None:
            return f"unknown event topic: {topic}"
        record_time = None if kafka_ts_ms is None else _EPOCH + timedelta(milliseconds=kafka_ts_ms)
        fields = self.check(event, value, record_time, self.rules)
        if isinstance(fields, str):
            return fields
        time_us = (fields["event_time"] - _EPOCH) // timedelta(microseconds=1)
        return PlainEvent(event.name, fields, time_us)


class PlainAggregator:
    """The feature increments in plain Python: events deduplicated by id, clicks attributed to
    their impression within the window (whichever arrives first), then every declared aggregate
    per (entity, keys, bucket start in epoch microseconds).

    ``take()`` returns the rows folded since the last call and starts afresh (one chunk's
    increments); the id sets and the impressions kept for attribution are not bounded by a
    watermark here.
    """

    def __init__(self, cfg: PlatformConfig) -> None:
        features = cfg.features
        self.width_us = int(features.bucket_width.total_seconds() * 1_000_000)
        self.window_us = cfg.ctr.attribution_window_minutes * 60 * 1_000_000
        self.entities = [(name, tuple(entity.keys)) for name, entity in features.entities.items()]
        self.aggregates = [(name, a.events, a.aggregation, a.measure) for name, a in features.aggregates.items()]
        self.seen: dict[str, set[str]] = {"impressions": set(), "clicks": set()}
        self.impressions: dict[str, PlainEvent] = {}
        self.waiting: dict[str, list[PlainEvent]] = {}  # clicks whose impression has not come yet
        self.rows: dict[tuple[str, tuple[Any, ...], int], list[Any]] = {}

    def add(self, event: PlainEvent) -> None:
        event_id = event.fields["event_id"]
        seen = self.seen[event.kind]
        if event_id in seen:
            return
        seen.add(event_id)
        if event.kind == "impressions":
            self.impressions[event_id] = event
            self._fold("impressions", event.fields, event.time_us)
            for click in self.waiting.pop(event_id, ()):
                self._attribute(click, event)
        else:
            impression = self.impressions.get(event.fields["impression_id"])
            if impression is None:
                self.waiting.setdefault(event.fields["impression_id"], []).append(event)
            else:
                self._attribute(event, impression)

    def _attribute(self, click: PlainEvent, impression: PlainEvent) -> None:
        if impression.time_us <= click.time_us <= impression.time_us + self.window_us:
            self._fold("clicks", impression.fields, click.time_us)

    def _fold(self, kind: str, fields: Mapping[str, Any], time_us: int) -> None:
        bucket = time_us - time_us % self.width_us
        for entity, keys in self.entities:
            key = (entity, tuple(fields[k] for k in keys), bucket)
            row = self.rows.get(key)
            if row is None:
                row = self.rows[key] = [0 if how == "count" else 0.0 if how == "sum" else None for _, _, how, _ in self.aggregates]
            for i, (_, events, how, measure) in enumerate(self.aggregates):
                if events != kind:
                    continue
                value = 1 if measure is None else fields[measure]
                if how == "count":
                    row[i] += 1
                elif how == "sum":
                    row[i] += float(value)
                elif how == "min":
                    row[i] = value if row[i] is None else min(row[i], value)
                else:
                    row[i] = value if row[i] is None else max(row[i], value)

    def take(self) -> dict[tuple[str, tuple[Any, ...], int], list[Any]]:
        rows, self.rows = self.rows, {}
        return rows

    @property
    def aggregate_names(self) -> list[str]:
        return [name for name, *_ in self.aggregates]


def plain_increments(
    records: Iterable[tuple[str, bytes | None, int | None]], cfg: PlatformConfig
) -> tuple[dict[tuple[str, tuple[Any, ...], int], list[Any]], Counter[str]]:
    """(topic, value, Kafka time ms) records -> the plain loop's increments and the quarantine
    reasons counted.

    >>> from lambda_ml.config import load_config
    >>> cfg = load_config(env={})
    >>> rows, bad = plain_increments([("impressions", b'{"event_id":"a","event_time":"2026-01-01T10:20:00Z",'
    ...     b'"user_id":"u1","item_id":"i1","device":"mobile","position":3}', None), ("impressions", b"[1]", None)], cfg)
    >>> rows[("user", ("u1",), 1767261600000000)], dict(bad)
    ([1, 0, 3], {'malformed JSON: the record is an array, not a JSON object': 1})
    """
    parser, aggregator, bad = PlainParser(cfg), PlainAggregator(cfg), Counter[str]()
    for topic, value, ts in records:
        parsed = parser.parse(topic, value, ts)
        if isinstance(parsed, str):
            bad[parsed] += 1
        else:
            aggregator.add(parsed)
    return aggregator.take(), bad


def _chunk_tables(
    cfg: PlatformConfig, events: dict[str, list[tuple[PlainEvent, str, int, int, int | None]]], bad: list[tuple[str, int, int, int | None, bytes | None, str]],
    rows: Mapping[tuple[str, tuple[Any, ...], int], list[Any]], aggregate_names: Sequence[str], chunk: int,
) -> dict[str, Any]:  # fmt: skip
    """One chunk of the plain loop as Arrow tables: bronze per event type, quarantine, increments."""
    import pyarrow as pa

    from lambda_ml import contract
    from lambda_ml.schemas import event_types

    now = datetime.now(UTC)
    tables: dict[str, Any] = {}
    for name, rows_of in events.items():
        event = event_types(cfg)[name]
        columns: dict[str, Any] = {}
        for f in event.fields:
            values = [e.fields[f.name] for e, *_ in rows_of]
            if f.kind == "timestamp":
                columns[f.name] = pa.array(values, pa.timestamp("us", tz="UTC"))
            elif f.kind == "int":
                columns[f.name] = pa.array(values, pa.int32())
            else:
                columns[f.name] = pa.array(values, pa.string())
        columns["kafka_topic"] = pa.array([r[1] for r in rows_of], pa.string())
        columns["kafka_partition"] = pa.array([r[2] for r in rows_of], pa.int32())
        columns["kafka_offset"] = pa.array([r[3] for r in rows_of], pa.int64())
        columns["kafka_timestamp"] = pa.array([None if r[4] is None else r[4] * 1000 for r in rows_of], pa.timestamp("us", tz="UTC"))
        columns["ingested_at"] = pa.array([now] * len(rows_of), pa.timestamp("us", tz="UTC"))
        tables[f"bronze/{name}"] = pa.table(columns)
    tables["quarantine"] = pa.table({
        "kafka_topic": pa.array([b[0] for b in bad], pa.string()),
        "kafka_partition": pa.array([b[1] for b in bad], pa.int32()),
        "kafka_offset": pa.array([b[2] for b in bad], pa.int64()),
        "kafka_timestamp": pa.array([None if b[3] is None else b[3] * 1000 for b in bad], pa.timestamp("us", tz="UTC")),
        "raw_value": pa.array([b[4] for b in bad], pa.binary()),
        "reason": pa.array([b[5] for b in bad], pa.string()),
        "ingested_at": pa.array([now] * len(bad), pa.timestamp("us", tz="UTC")),
    })  # fmt: skip
    for entity, declared in cfg.features.entities.items():
        mine = [(key, bucket, values) for (name, key, bucket), values in rows.items() if name == entity]
        columns = {k: pa.array([key[i] for key, _, _ in mine], pa.string()) for i, k in enumerate(declared.keys)}
        columns[contract.VIEW_BUCKET_COLUMN] = pa.array([b for _, b, _ in mine], pa.timestamp("us", tz="UTC"))
        for i, agg in enumerate(aggregate_names):
            how = cfg.features.aggregates[agg].aggregation
            kind = pa.int64() if how == "count" else pa.float64()
            columns[agg] = pa.array([v[i] for _, _, v in mine], kind)
        columns[contract.INCREMENT_BATCH_COLUMN] = pa.array([chunk] * len(mine), pa.int64())
        tables["/".join(contract.increments_table(entity))] = pa.table(columns)
    return tables


def run_plain_loop(cfg: PlatformConfig, expected: int, chunk_records: int, out: Path, idle_s: float = 30.0) -> dict[str, Any]:
    """The peer: consume every event topic from the start with kafka-python until ``expected``
    records are read, parse and aggregate them, and every ``chunk_records`` records append the
    chunk's bronze, quarantine and increment rows to Delta tables and commit the offsets."""
    import pyarrow as pa  # noqa: F401  (before deltalake)
    from deltalake import write_deltalake
    from kafka import KafkaConsumer

    topics = [t.name for t in cfg.events.topics().values()]
    consumer = KafkaConsumer(
        *topics,
        bootstrap_servers=cfg.kafka.bootstrap_servers,
        group_id="bench-plain-loop",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_records=50_000,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    parser, aggregator = PlainParser(cfg), PlainAggregator(cfg)
    lake = Path(cfg.lake.root) / "plain"
    read = chunk_n = chunk = 0
    events: dict[str, list[Any]] = {"impressions": [], "clicks": []}
    bad: list[Any] = []
    started: float | None = None
    last_record = time.monotonic()

    def flush() -> None:
        nonlocal chunk, chunk_n
        for table, frame in _chunk_tables(cfg, events, bad, aggregator.take(), aggregator.aggregate_names, chunk).items():
            if frame.num_rows:
                write_deltalake(str(lake / table), frame, mode="append")
        consumer.commit()
        for rows in events.values():
            rows.clear()
        bad.clear()
        chunk, chunk_n = chunk + 1, 0

    try:
        while read < expected and time.monotonic() - last_record < idle_s:
            polled = consumer.poll(timeout_ms=1000)
            if not polled:
                continue
            if started is None:
                started = time.time()
            last_record = time.monotonic()
            for records in polled.values():
                for record in records:
                    parsed = parser.parse(record.topic, record.value, record.timestamp)
                    if isinstance(parsed, str):
                        bad.append((record.topic, record.partition, record.offset, record.timestamp, record.value, parsed))
                    else:
                        events[parsed.kind].append((parsed, record.topic, record.partition, record.offset, record.timestamp))
                        aggregator.add(parsed)
                read += len(records)
                chunk_n += len(records)
            if chunk_n >= chunk_records:
                flush()
        if chunk_n:
            flush()
        ended = time.time()
    finally:
        consumer.close()
    result = {"records": read, "chunks": chunk, "start": started, "end": ended, "seconds": ended - (started or ended)}
    out.write_text(json.dumps(result))
    return result


# --------------------------------------------------------------------------- Spark children


class ProgressLog:
    """A StreamingQueryListener writing every micro-batch's progress (JSON) as one line of a
    file; with ``stop_after``, it sends this process SIGTERM (the speed layer's graceful stop)
    once the ``increments`` query has read that many rows."""

    def __new__(cls, path: Path, stop_after: int | None = None):  # type: ignore[no-untyped-def]
        from pyspark.sql.streaming import StreamingQueryListener

        class _Listener(StreamingQueryListener):
            increments_rows = 0

            def onQueryStarted(self, event: Any) -> None:
                pass

            def onQueryProgress(self, event: Any) -> None:
                progress = event.progress
                with path.open("a") as out:
                    out.write(progress.json.replace("\n", " ") + "\n")
                if progress.name == "increments":
                    self.increments_rows += progress.numInputRows
                    if stop_after is not None and self.increments_rows >= stop_after:
                        log.info("increments read %d rows: stopping", self.increments_rows)
                        os.kill(os.getpid(), signal.SIGTERM)

            def onQueryIdle(self, event: Any) -> None:
                pass

            def onQueryTerminated(self, event: Any) -> None:
                pass

        return _Listener()


def preload_frame(spark: Any, cfg: PlatformConfig, impressions: int, now: datetime) -> Any:
    """Generated impressions (over the last 48 h, in time order) and ~CLICK_PERCENT % clicks
    1 s to 10 min after them, as Kafka records (topic, key, value JSON), built in Spark."""
    from pyspark.sql import functions as F

    span_ms = 48 * 3600 * 1000
    # Clicks come up to 10 min after their impression: the span ends 10 min before now, so that
    # no event time is ahead of its record time (speed.max_future_minutes would refuse it).
    start_ms = int(now.timestamp() * 1000) - span_ms - 600_000
    ids = spark.range(0, impressions, numPartitions=max(2, impressions // 500_000))
    h = lambda seed: F.pmod(F.xxhash64(F.col("id"), F.lit(seed)), F.lit(1_000_000))  # noqa: E731
    iso = lambda ms: F.date_format(F.timestamp_millis(ms), "yyyy-MM-dd'T'HH:mm:ss.SSS'Z'")  # noqa: E731
    t = F.lit(start_ms) + (F.col("id") * F.lit(span_ms) / F.lit(impressions)).cast("long")
    device = F.when(h(3) % 10 < 6, "mobile").when(h(3) % 10 < 9, "desktop").otherwise("tablet")
    user = F.concat(F.lit("u"), (h(1) % cfg.generator.users).cast("string"))
    imp = ids.select(
        F.lit(cfg.events.topic("impressions").name).alias("topic"),
        user.alias("key"),
        F.to_json(F.struct(
            F.concat(F.lit("imp-"), F.col("id").cast("string")).alias("event_id"), iso(t).alias("event_time"),
            user.alias("user_id"), F.concat(F.lit("i"), (h(2) % cfg.generator.items).cast("string")).alias("item_id"),
            device.alias("device"), (h(4) % 5 + 1).cast("int").alias("position"),
        )).alias("value"),
    )  # fmt: skip
    clicked = ids.where(h(5) % 100 < CLICK_PERCENT)
    click_t = t + F.lit(1000) + h(6) % 599_000
    clk = clicked.select(
        F.lit(cfg.events.topic("clicks").name).alias("topic"),
        F.concat(F.lit("imp-"), F.col("id").cast("string")).alias("key"),
        F.to_json(F.struct(
            F.concat(F.lit("clk-"), F.col("id").cast("string")).alias("event_id"),
            F.concat(F.lit("imp-"), F.col("id").cast("string")).alias("impression_id"), iso(click_t).alias("event_time"),
        )).alias("value"),
    )  # fmt: skip
    return imp.unionByName(clk)


def child_spark_drain(cfg: PlatformConfig, impressions: int, progress: Path, out: Path) -> None:
    """Pre-load the topics with Spark, then drain them with the speed layer's ingest and
    increments queries running side by side, progress to ``progress``."""
    from speed_layer import app

    from lambda_ml.spark import get_spark

    spark = get_spark(cfg, "bench-speed")
    frame = preload_frame(spark, cfg, impressions, datetime.now(UTC))
    loaded_at = time.time()
    compression = cfg.generator.compression
    writer = frame.write.format("kafka").option("kafka.bootstrap.servers", cfg.kafka.bootstrap_servers)
    writer = writer.option("kafka.linger.ms", "20").option("kafka.batch.size", str(256 * 1024))
    if compression != "none":
        writer = writer.option("kafka.compression.type", compression)
    writer.save()
    records = frame.count()
    log.info("pre-loaded %d records in %.0f s", records, time.time() - loaded_at)
    out.write_text(json.dumps({"records": records, "preload_s": time.time() - loaded_at}))
    # As in production: both queries run side by side, a micro-batch every speed.trigger_seconds
    # (or back to back when one takes longer); stopped once increments has read every event.
    spark.streams.addListener(ProgressLog(progress, stop_after=records))
    app.run(cfg, ["ingest", "increments"])
    time.sleep(2)  # progress reaches listeners asynchronously


def _parsed_records(spark: Any, cfg: PlatformConfig) -> Any:
    """The event topics as a stream, each record's JSON parsed as text fields into ``e``, beside
    Kafka's ``topic, partition, offset, timestamp``: all the ceiling queries parse."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType, StructField, StructType

    from lambda_ml.schemas import event_types
    from speed_layer.ingest import kafka_source

    fields = dict.fromkeys(name for event in event_types(cfg).values() for name in event.field_names)
    schema = StructType([StructField(name, StringType()) for name in fields])
    return kafka_source(spark, cfg).select(
        F.from_json(F.col("value").cast("string"), schema).alias("e"), "topic", "partition", "offset", "timestamp"
    )


def child_spark_ceiling(cfg: PlatformConfig, progress: Path) -> None:
    """The ceiling of any Spark speed layer here: a Structured Streaming query doing only the
    unavoidable part (read the pre-loaded topics with the ingest's micro-batch size, parse each
    record's JSON, append the rows to one Delta table), with no validation, quarantine,
    deduplication, join or aggregation; progress to ``progress``."""
    from lambda_ml.spark import get_spark

    spark = get_spark(cfg, "bench-speed-ceiling")
    spark.streams.addListener(ProgressLog(progress))
    parsed = _parsed_records(spark, cfg).select("e.*", "topic", "partition", "offset")
    query = (
        parsed.writeStream.queryName(CEILING).format("delta")
        .option("checkpointLocation", f"{cfg.lake.checkpoints.rstrip('/')}/{CEILING}")
        .trigger(availableNow=True)
        .start(cfg.lake.table(CEILING))
    )  # fmt: skip
    query.awaitTermination()
    time.sleep(2)  # progress reaches listeners asynchronously


def child_spark_steady_ceiling(cfg: PlatformConfig, progress: Path) -> None:
    """The freshness ceiling of any Spark speed layer here: one Structured Streaming query, a
    micro-batch every ``STEADY_CEILING_TRIGGER_S``, doing only the unavoidable part of making an
    event servable, in one hop: parse each record's JSON, append the impressions and the clicks
    to their bronze Delta tables, then append one count per (user, hour) stamped with the bronze
    version just committed (what serving needs of an increment). No validation, quarantine,
    deduplication, join, state or second query. Runs until SIGTERM; progress to ``progress``."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    from lambda_ml import contract
    from lambda_ml.schemas import event_types
    from lambda_ml.spark import get_spark
    from speed_layer.ingest import bronze_path

    spark = get_spark(cfg, "bench-speed-steady-ceiling")
    spark.streams.addListener(ProgressLog(progress))
    topics = {event: topic.name for event, topic in cfg.events.topics().items()}
    increments = cfg.lake.table(*contract.increments_table("user"))
    version_column = contract.increment_version_column("impressions")

    def land(batch: Any, batch_id: int) -> None:
        batch = batch.persist()
        for event, topic in topics.items():
            rows = batch.where(F.col("topic") == topic).select(
                *[F.col(f"e.{name}") for name in event_types(cfg)[event].field_names if name != "event_time"],
                F.to_timestamp("e.event_time").alias("event_time"), F.col("timestamp").alias("kafka_timestamp"),
            )  # fmt: skip
            rows.write.format("delta").mode("append").option("txnAppId", f"{CEILING}:{event}").option("txnVersion", batch_id).save(bronze_path(cfg, event))
        version = DeltaTable.forPath(spark, bronze_path(cfg, "impressions")).history(1).first()["version"]  # type: ignore[index]
        counts = (
            batch.where(F.col("topic") == topics["impressions"])
            .groupBy(F.col("e.user_id").alias("user_id"), F.date_trunc("hour", F.to_timestamp("e.event_time")).alias("bucket"))
            .count()
            .withColumn(version_column, F.lit(version).cast("long"))
            .withColumn(contract.INCREMENT_BATCH_COLUMN, F.lit(batch_id).cast("long"))
        )  # fmt: skip
        counts.write.format("delta").mode("append").option("txnAppId", f"{CEILING}:increments").option("txnVersion", batch_id).save(increments)
        batch.unpersist()

    query = (
        _parsed_records(spark, cfg)
        .writeStream.queryName(CEILING)
        .option("checkpointLocation", f"{cfg.lake.checkpoints.rstrip('/')}/{CEILING}")
        .foreachBatch(land)
        .trigger(processingTime=f"{STEADY_CEILING_TRIGGER_S:g} seconds")
        .start()
    )  # fmt: skip
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while query.isActive and not stop.is_set():
        stop.wait(1)
    query.stop()
    time.sleep(2)


def child_spark_steady(cfg: PlatformConfig, progress: Path) -> None:
    """Run ingest + increments continuously (until SIGTERM), progress to ``progress``."""
    from speed_layer import app

    from lambda_ml.spark import get_spark

    spark = get_spark(cfg, "bench-speed")
    spark.streams.addListener(ProgressLog(progress))
    app.run(cfg, ["ingest", "increments"])
    time.sleep(2)


# --------------------------------------------------------------------------- reading the results


def read_progress(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _epoch_s(iso_text: str) -> float:
    return datetime.fromisoformat(iso_text.replace("Z", "+00:00")).timestamp()


def batch_spans(progress: Sequence[Mapping[str, Any]], query: str) -> list[tuple[float, float, int]]:
    """(start, end, input rows) of each micro-batch of a query that read rows."""
    spans = []
    for p in progress:
        if p.get("name") == query and p.get("numInputRows", 0) > 0:
            start = _epoch_s(p["timestamp"])
            spans.append((start, start + p["durationMs"]["triggerExecution"] / 1000, int(p["numInputRows"])))
    return spans


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0-100), nearest rank.

    >>> percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 95), percentile([], 50)
    (10, None)
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def delta_commits(table: Path) -> list[dict[str, Any]]:
    """Each commit of a Delta table from its log: version, commit time (s), txn version and added files."""
    commits = []
    for path in sorted((table / "_delta_log").glob("*.json")):
        info: dict[str, Any] = {"version": int(path.stem), "adds": [], "txn": None, "time": None}
        for line in path.read_text().splitlines():
            action = json.loads(line)
            if "commitInfo" in action:
                info["time"] = action["commitInfo"]["timestamp"] / 1000
            elif "txn" in action:
                info["txn"] = action["txn"]["version"]
            elif "add" in action:
                info["adds"].append(action["add"]["path"])
        commits.append(info)
    return commits


def freshness(lake: Path, increments_entity: str) -> list[tuple[float, float]]:
    """(Kafka record time, time its increments first became visible) of every impression in bronze:
    the commit time of the first increments version counting the bronze version it landed in."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    from lambda_ml import contract

    bronze = lake / "bronze" / "impressions"
    increments = lake / Path(*contract.increments_table(increments_entity))
    commit_time = {c["txn"]: c["time"] for c in delta_commits(increments) if c["txn"] is not None}
    rows = DeltaTable(str(increments)).to_pyarrow_table(columns=[contract.increment_version_column("impressions"), contract.INCREMENT_BATCH_COLUMN])
    first_batch: dict[int, int] = {}
    for version, batch in zip(rows.column(0).to_pylist(), rows.column(1).to_pylist(), strict=True):
        if version is not None and (version not in first_batch or batch < first_batch[version]):
            first_batch[version] = batch
    pairs: list[tuple[float, float]] = []
    for commit in delta_commits(bronze):
        batch = first_batch.get(commit["version"])
        if batch is None or batch not in commit_time:
            continue  # not counted yet when the run stopped
        for add in commit["adds"]:
            stamps = pc.cast(pq.read_table(bronze / add, columns=["kafka_timestamp"]).column(0), pa.timestamp("us", tz="UTC"))
            micros = pc.cast(stamps, pa.int64()).to_pylist()
            pairs.extend((m / 1_000_000, commit_time[batch]) for m in micros if m is not None)
    return pairs


# --------------------------------------------------------------------------- the parent's parts


def start_broker(cfg: PlatformConfig) -> Any:
    from lambda_ml_cli import stack

    broker = stack.KafkaBroker(cfg)
    broker.start()
    stack.create_topics(cfg)
    return broker


def _child(mode: str, config_file: Path, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--config", str(config_file), *args]


def measure_throughput(cfg: PlatformConfig, config_file: Path, work: Path, impressions: int, timeout_s: float) -> dict[str, Any]:
    progress, marks = work / "drain.progress.jsonl", work / "drain.json"
    done = run_measured(_child("drain", config_file, "--events", str(impressions), "--progress", str(progress), "--marks", str(marks)), timeout_s)
    if not done.ok:
        raise RuntimeError(f"the speed-layer drain failed (exit {done.returncode}); see its log above")
    info = json.loads(marks.read_text())
    lines = read_progress(progress)
    ingest, increments = batch_spans(lines, "ingest"), batch_spans(lines, "increments")
    records = info["records"]
    if not ingest or sum(n for *_, n in ingest) < records:
        raise RuntimeError(f"ingest read {sum(n for *_, n in ingest)} of {records} records")
    start, end = ingest[0][0], max(e for _, e, _ in increments or ingest)
    ingest_s = ingest[-1][1] - ingest[0][0]
    increments_s = (increments[-1][1] - increments[0][0]) if increments else None
    ours = {
        "records": records,
        "preload_s": round(info["preload_s"], 1),
        "seconds": round(end - start, 2),
        "events_per_s": round(records / (end - start)),
        "ingest_seconds": round(ingest_s, 2),
        "ingest_events_per_s": round(records / ingest_s),
        "increments_seconds": None if increments_s is None else round(increments_s, 2),
        "increments_rows_read": sum(n for *_, n in increments),
        "ingest_batches": len(ingest),
        "increments_batches": len(increments),
        "cpu_s": round(done.sampler.cpu_s(start, end), 1),
        "peak_memory_gib": gib(done.sampler.peak()),
        "load_average": round(done.sampler.mean_load(start, end) or load_average(), 2),
        "state_update_ms": _state_times(lines),
    }
    ours["events_per_cpu_s"] = round(records / ours["cpu_s"]) if ours["cpu_s"] else None
    log.info("speed layer: %d records in %.1f s (%s events/s)", records, end - start, f"{ours['events_per_s']:,}")

    plain_out = work / "plain.json"
    chunk = cfg.speed.max_offsets_per_trigger * sum(t.partitions for t in cfg.events.topics().values())
    done = run_measured(_child("plain", config_file, "--events", str(records), "--chunk", str(chunk), "--marks", str(plain_out)), timeout_s)
    if not done.ok:
        raise RuntimeError(f"the plain loop failed (exit {done.returncode})")
    plain = json.loads(plain_out.read_text())
    peer = {
        "records": plain["records"],
        "seconds": round(plain["seconds"], 2),
        "events_per_s": round(plain["records"] / plain["seconds"]),
        "chunks": plain["chunks"],
        "cpu_s": round(done.sampler.cpu_s(plain["start"], plain["end"]), 1),
        "peak_memory_gib": gib(done.sampler.peak()),
        "load_average": round(done.sampler.mean_load(plain["start"], plain["end"]) or load_average(), 2),
    }
    peer["events_per_cpu_s"] = round(records / peer["cpu_s"]) if peer["cpu_s"] else None
    if peer["records"] != records:
        raise RuntimeError(f"the plain loop read {peer['records']} of {records} records")
    log.info("plain loop: %d records in %.1f s (%s events/s)", records, plain["seconds"], f"{peer['events_per_s']:,}")

    progress = work / "ceiling.progress.jsonl"
    done = run_measured(_child(CEILING, config_file, "--progress", str(progress)), timeout_s)
    spans = batch_spans(read_progress(progress), CEILING)
    if not done.ok or sum(n for *_, n in spans) != records:
        raise RuntimeError(f"the ceiling query failed (exit {done.returncode}, read {sum(n for *_, n in spans)} of {records} records)")
    start, end = spans[0][0], spans[-1][1]
    ceiling = {
        "records": records,
        "seconds": round(end - start, 2),
        "events_per_s": round(records / (end - start)),
        "batches": len(spans),
        "cpu_s": round(done.sampler.cpu_s(start, end), 1),
        "load_average": round(done.sampler.mean_load(start, end) or load_average(), 2),
    }
    log.info("ceiling (Kafka -> parse -> Delta, nothing else): %d records in %.1f s (%s events/s)",
             records, end - start, f"{ceiling['events_per_s']:,}")  # fmt: skip
    return {"ours": ours, "peer": peer, "ceiling": ceiling}


def paced_produce(cfg: PlatformConfig, rate: int, seconds: float, seed: int = 11) -> dict[str, Any]:
    """Send impressions at ``rate`` records/s for ``seconds`` (event time = now), with ~5 %
    clicked 1-3 s later; return what was sent and how closely the pace was held."""
    from kafka import KafkaProducer

    from lambda_ml.producer import iso

    rng = random.Random(seed)
    compression = None if cfg.generator.compression == "none" else cfg.generator.compression
    producer = KafkaProducer(
        bootstrap_servers=cfg.kafka.bootstrap_servers, compression_type=compression, acks="all", linger_ms=5, batch_size=256 * 1024
    )
    clicks: list[tuple[float, bytes, bytes]] = []
    impression_times: list[float] = []
    sent = n = 0
    start = time.time()
    try:
        while (now := time.time()) - start < seconds:
            due = int((now - start) * rate)
            while sent < due:
                if clicks and clicks[0][0] <= now:
                    _, key, value = clicks.pop(0)
                    producer.send(cfg.events.topic("clicks").name, key=key, value=value)
                else:
                    stamp = datetime.now(UTC)
                    event_id = f"imp-{seed}-{n}"
                    user = f"u{rng.randrange(cfg.generator.users)}"
                    value = json.dumps({
                        "event_id": event_id, "event_time": iso(stamp), "user_id": user,
                        "item_id": f"i{rng.randrange(cfg.generator.items)}", "device": rng.choice(("mobile", "desktop", "tablet")),
                        "position": rng.randint(1, 5),
                    }, separators=(",", ":")).encode()  # fmt: skip
                    # The record time freshness starts from, and the one the window counts by.
                    sent_ms = int(time.time() * 1000)
                    producer.send(cfg.events.topic("impressions").name, key=user.encode(), value=value, timestamp_ms=sent_ms)
                    impression_times.append(sent_ms / 1000)
                    if rng.random() < CLICK_PERCENT / 100:
                        click = {"event_id": f"clk-{seed}-{n}", "impression_id": event_id, "event_time": iso(stamp + timedelta(seconds=2))}
                        clicks.append((now + 2.0, event_id.encode(), json.dumps(click, separators=(",", ":")).encode()))
                    n += 1
                sent += 1
            time.sleep(0.005)
        producer.flush()
    finally:
        producer.close()
    elapsed = time.time() - start
    return {"records": sent, "impressions": n, "seconds": round(elapsed, 1), "records_per_s": round(sent / elapsed),
            "impression_times": impression_times}  # fmt: skip


def measure_steady(
    cfg: PlatformConfig, config_file: Path, work: Path, rate: int, seconds: float, warmup_s: float,
    mode: str = "steady", queries: Sequence[str] = ("ingest", "increments"),
) -> dict[str, Any]:
    """Run the child ``mode`` (the speed layer, or the ceiling) while producing ``rate`` records/s
    for ``seconds``; micro-batch durations of its ``queries`` and freshness after ``warmup_s``."""
    progress = work / f"{mode}.progress.jsonl"
    process = subprocess.Popen(_child(mode, config_file, "--progress", str(progress)), start_new_session=True)
    sampler = MemorySampler(process.pid).start()
    try:
        deadline = time.monotonic() + 300
        while {p.get("name") for p in read_progress(progress)} < set(queries):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {mode} child did not start its queries {list(queries)}")
            time.sleep(1)
        log.info("%s running; producing %d records/s for %.0f s", mode, rate, seconds)
        t0 = time.time()
        sent = paced_produce(cfg, rate, seconds)
        t1 = time.time()
        time.sleep(max(15.0, 3 * cfg.speed.trigger_seconds))  # let the last events through
    finally:
        sampler.stop()
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)  # the Python driver: stops after the current micro-batches
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    lines = read_progress(progress)
    durations = {q: [e - s for s, e, _ in batch_spans(lines, q) if t0 + warmup_s <= s <= t1] for q in queries}
    pairs = [(sent_at, seen - sent_at) for sent_at, seen in freshness(Path(cfg.lake.root), "user")]
    steady = [lag for sent_at, lag in pairs if t0 + warmup_s <= sent_at <= t1]
    # Impressions sent in the window but not counted when the run stopped: later than any figure.
    sent_in_window = sum(1 for at in sent.pop("impression_times") if t0 + warmup_s <= at <= t1)
    unseen = max(0, sent_in_window - len(steady))
    lags = steady + [float("inf")] * unseen
    result = {
        "rate_target": rate,
        "produced": sent,
        "warmup_s": warmup_s,
        "trigger_seconds": STEADY_CEILING_TRIGGER_S if mode == STEADY_CEILING else cfg.speed.trigger_seconds,
        "impressions_sent_in_window": sent_in_window,
        "impressions_visible_in_window": len(steady),
        "impressions_not_visible_at_stop": unseen,
        "freshness_p50_s": _round(percentile(lags, 50)),
        "freshness_p95_s": _round(percentile(lags, 95)),
        "freshness_max_visible_s": _round(max(steady, default=None)),
        "cpu_s": round(sampler.cpu_s(t0, t1), 1),
        "load_average": round(sampler.mean_load(t0, t1) or load_average(), 2),
    }
    for query, values in durations.items():
        result[f"{query}_batches"] = len(values)
        result[f"{query}_batch_p50_s"] = _round(percentile(values, 50))
        result[f"{query}_batch_p95_s"] = _round(percentile(values, 95))
    if not steady:
        raise RuntimeError("no impression became visible in the increments table during the steady run")
    return result


def _state_times(progress: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Milliseconds (summed over tasks) the increments query's state operators spent on updates,
    removals and commits, per operator position in the plan: where its micro-batches go."""
    totals: dict[str, int] = {}
    for p in progress:
        if p.get("name") != "increments":
            continue
        for i, op in enumerate(p.get("stateOperators") or []):
            name = f"{i}:{op.get('operatorName')}"
            spent = sum(int(op.get(k) or 0) for k in ("allUpdatesTimeMs", "allRemovalsTimeMs", "commitTimeMs"))
            totals[name] = totals.get(name, 0) + spent
    return totals


def _round(value: float | None, digits: int = 3) -> float | None:
    """Rounded; None for no value and for an infinite one (an event never seen)."""
    return None if value is None or value == float("inf") else round(value, digits)


def log_bytes(cfg: PlatformConfig, topic: str) -> int:
    """Bytes of a topic's log segments on the broker (every partition)."""
    data = cfg.data_path / "kafka" / "data"
    return sum(f.stat().st_size for d in data.glob(f"{topic}-*") if d.is_dir() for f in d.glob("*.log"))


def measure_bytes(cfg: PlatformConfig, events: int) -> dict[str, Any]:
    """Bytes per event on the broker for each format and codec, the same generated events each time."""
    from lambda_ml import producer
    from lambda_ml_cli import stack
    from lambda_ml_apps.ctr import generator
    from lambda_ml.config import GeneratorConfig

    gen = GeneratorConfig(impressions=events, malformed_fraction=0.0, duplicate_fraction=0.0, seed=3)
    records, _ = generator.generate(gen, timedelta(minutes=cfg.ctr.attribution_window_minutes), datetime.now(UTC))
    results: dict[str, Any] = {}
    for fmt in ("json", "avro"):
        for codec in CODECS:
            prefix = f"bytes-{fmt}-{codec}"
            variant = load_config(
                env={},
                overrides={
                    **_overrides_of(cfg),
                    "generator.compression": codec,
                    **{f"events.types.{t}.topic.{k}": v for t in ("impressions", "clicks") for k, v in
                       (("name", f"{prefix}-{t}"), ("format", fmt), ("partitions", 1))},
                },
            )  # fmt: skip
            stack.create_topics(variant)
            producer.produce(variant, records, progress=False)
            size = sum(log_bytes(variant, f"{prefix}-{t}") for t in ("impressions", "clicks"))
            results[f"{fmt}/{codec}"] = {"bytes": size, "records": len(records), "bytes_per_event": round(size / len(records), 2)}
            log.info("%s %s: %.1f bytes per event", fmt, codec, size / len(records))
    base = results["json/none"]["bytes_per_event"]
    for value in results.values():
        value["saved_vs_json_none"] = round(1 - value["bytes_per_event"] / base, 3)
    return results


def _overrides_of(cfg: PlatformConfig) -> dict[str, Any]:
    return {
        "data_dir": str(cfg.data_path),
        "lake.root": cfg.lake.root,
        "lake.checkpoints": cfg.lake.checkpoints,
        "kafka.port": cfg.kafka.port,
        "kafka.controller_port": cfg.kafka.controller_port,
        "kafka.bootstrap_servers": cfg.kafka.bootstrap_servers,
    }


# --------------------------------------------------------------------------- main


def print_tables(result: dict[str, Any]) -> None:
    """The page's tables of the parts measured (bench/report.py), then the ratios."""
    print(speed_tables(result))
    if result.get("ratios"):
        print()
        print(json.dumps(result["ratios"]))


def child_main(args: Any) -> None:
    cfg = load_config(args.config)
    if args.child == "drain":
        child_spark_drain(cfg, args.events, args.progress, args.marks)
    elif args.child == "plain":
        run_plain_loop(cfg, args.events, args.chunk, args.marks)
    elif args.child == "steady":
        child_spark_steady(cfg, args.progress)
    elif args.child == CEILING:
        child_spark_ceiling(cfg, args.progress)
    elif args.child == STEADY_CEILING:
        child_spark_steady_ceiling(cfg, args.progress)
    else:
        raise SystemExit(f"unknown child mode {args.child}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = bench_parser(NAME, "The speed layer: sustained events/s vs a plain kafka-python loop, micro-batch "
                          "duration and freshness at a steady rate, Kafka bytes per event (JSON vs Avro, codecs).")  # fmt: skip
    parser.add_argument("--events", type=parse_count, help=f"impressions pre-loaded for the drain (default {human_count(EVENTS)}, --quick {human_count(QUICK_EVENTS)}); clicks come on top")
    parser.add_argument("--rate", type=int, default=RATE, help=f"records/s of the steady run (default {RATE:,})")
    parser.add_argument("--fresh-seconds", type=float, help=f"length of the steady run (default {FRESH_SECONDS:g}, --quick {QUICK_FRESH_SECONDS:g})")
    parser.add_argument("--trigger-seconds", type=float, help="speed.trigger_seconds of the steady run (default: the config's)")
    parser.add_argument("--bytes-events", type=parse_count, help=f"impressions per format and codec (default {human_count(BYTES_EVENTS)}, --quick {human_count(QUICK_BYTES_EVENTS)})")
    parser.add_argument("--parts", default="throughput,steady,bytes", help="which measurements, comma-separated (default: all three)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (lake, logs) for inspection")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--progress", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--marks", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_logging()
    if args.child:
        child_main(args)
        return
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"throughput", "steady", "bytes"}
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; known: throughput, steady, bytes")
    impressions = args.events or (QUICK_EVENTS if args.quick else EVENTS)
    fresh_s = args.fresh_seconds or (QUICK_FRESH_SECONDS if args.quick else FRESH_SECONDS)
    bytes_events = args.bytes_events or (QUICK_BYTES_EVENTS if args.quick else BYTES_EVENTS)
    out = args.out or default_out(NAME, args.quick)

    started_at = datetime.now(UTC)
    root = Path(tempfile.mkdtemp(prefix="bench-speed-"))
    results: dict[str, Any] = {}
    peer: dict[str, Any] = {}
    errors: dict[str, str] = {}
    params = {"impressions": impressions, "click_percent": CLICK_PERCENT, "rate": args.rate, "fresh_seconds": fresh_s,
              "bytes_impressions": bytes_events, "parts": sorted(parts), "started_at": started_at.isoformat()}  # fmt: skip
    broker = None
    try:
        extra = {} if args.trigger_seconds is None else {"speed.trigger_seconds": args.trigger_seconds}
        for part in ("bytes", "throughput", "steady", STEADY_CEILING):
            if (part if part != STEADY_CEILING else "steady") not in parts:
                continue
            cfg = bench_config(root / part, **({} if part == "bytes" else extra))
            config_file = write_config(cfg, root / f"{part}.yaml")
            broker = start_broker(cfg)
            try:
                if part == "bytes":
                    results["bytes"] = measure_bytes(cfg, bytes_events)
                elif part == "throughput":
                    measured = measure_throughput(cfg, config_file, root, impressions, timeout_s=3600)
                    results["throughput"], peer["throughput"] = measured["ours"], measured["peer"]
                    results["ceiling"] = measured["ceiling"]
                    params.update(max_offsets_per_trigger=cfg.speed.max_offsets_per_trigger,
                                  shuffle_partitions=cfg.spark.shuffle_partitions, compression=cfg.generator.compression)  # fmt: skip
                elif part == "steady":
                    results["steady"] = measure_steady(cfg, config_file, root, args.rate, fresh_s, warmup_s=min(20.0, fresh_s / 3))
                else:  # the same rate through the bare one-hop query: the best any Spark speed layer does here
                    results["steady_ceiling"] = measure_steady(
                        cfg, config_file, root, args.rate, fresh_s, warmup_s=min(20.0, fresh_s / 3), mode=STEADY_CEILING, queries=(CEILING,)
                    )
            except Exception as exc:  # one failed part must not lose the others' figures
                log.exception("the %s measurement failed", part)
                errors[part] = f"{type(exc).__name__}: {exc}"
            finally:
                broker.stop()
                broker = None
    finally:
        if broker is not None:
            broker.stop()
        if args.keep:
            log.info("kept %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)

    ratios: dict[str, Any] = {}
    if "throughput" in results:
        ours_rate, peer_rate = results["throughput"]["events_per_s"], peer["throughput"]["events_per_s"]
        ratios["events_per_s_vs_plain_loop"] = round(ours_rate / peer_rate, 2)
        ours_cpu, peer_cpu = results["throughput"]["events_per_cpu_s"], peer["throughput"]["events_per_cpu_s"]
        ratios["events_per_cpu_s_vs_plain_loop"] = round(ours_cpu / peer_cpu, 2) if ours_cpu and peer_cpu else None
        ratios["events_per_s_target_met"] = ours_rate >= TARGET_EVENTS_PER_S
        ratios["vs_plain_loop_target_met"] = ours_rate >= TARGET_RATIO * peer_rate
        if "ceiling" in results:
            # Share of the bare Kafka -> Delta query's rate the whole speed layer reaches, and
            # whether the targets are within that ceiling on this machine at all.
            ceiling_rate = results["ceiling"]["events_per_s"]
            ratios["events_per_s_vs_ceiling"] = round(ours_rate / ceiling_rate, 2)
            ratios["ceiling_reaches_events_per_s_target"] = ceiling_rate >= TARGET_EVENTS_PER_S
            ratios["ceiling_reaches_plain_loop_target"] = ceiling_rate >= TARGET_RATIO * peer_rate
    if "steady" in results:
        p95 = results["steady"]["freshness_p95_s"]
        ratios["freshness_p95_target_met"] = p95 is not None and p95 <= TARGET_FRESHNESS_P95_S
    if "steady_ceiling" in results:
        # Whether even the bare one-hop query makes events servable within the target here.
        p95 = results["steady_ceiling"]["freshness_p95_s"]
        ratios["ceiling_reaches_freshness_target"] = p95 is not None and p95 <= TARGET_FRESHNESS_P95_S
    if "bytes" in results:
        best = max(results["bytes"].items(), key=lambda kv: kv[1]["saved_vs_json_none"])
        ratios["bytes_best"] = best[0]
        ratios["bytes_saved_best"] = best[1]["saved_vs_json_none"]
        ratios["bytes_target_met"] = best[1]["saved_vs_json_none"] >= TARGET_BYTES_SAVED
    result = {
        "name": NAME,
        "machine": {**machine_info(PACKAGES), "load_average_at_end": load_average()},
        "params": params,
        "targets": {"events_per_s": TARGET_EVENTS_PER_S, "vs_plain_loop": TARGET_RATIO,
                    "freshness_p95_s": TARGET_FRESHNESS_P95_S, "bytes_saved": TARGET_BYTES_SAVED},  # fmt: skip
        "results": results,
        "peer": peer,
        "ratios": ratios,
        "errors": errors,
    }
    write_result(result, out)
    print_tables(result)
    log.info("wrote %s", out)
    if errors:
        raise SystemExit(f"failed: {', '.join(errors)}")


if __name__ == "__main__":
    main()

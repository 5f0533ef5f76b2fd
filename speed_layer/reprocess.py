"""Re-process quarantined records after a config fix: what now passes lands in bronze, once.

The quarantine table keeps every record the ingest refused, with its raw bytes and its Kafka
topic, partition, offset and record time. After a config change (an older
``speed.min_event_date`` for a backfill, a topic switched to Avro, ...) this job checks those
records again with the ingest's own :func:`speed_layer.ingest.parse_events` and the current
config, and merges the valid ones into their bronze table by Kafka coordinates: a record lands
at most once, whether it came from Kafka or from quarantine, however often the job runs. The
quarantine table itself is left as it is (the audit trail of what arrived broken); a record
found in both was refused under an older config and re-processed.

The bronze change feed records the merged rows as inserts, so the running speed layer picks
them up like any late event, and the next batch run trains on them.

Run it with ``lambda-ml speed reprocess-quarantine`` or ``spark-submit speed_layer/reprocess.py``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from dataclasses import dataclass

from delta.exceptions import ConcurrentAppendException
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lambda_ml.config import PlatformConfig, load_command_config
from lambda_ml.logs import setup_logging
from speed_layer.ingest import QUARANTINE, ensure_tables, parse_events, table_paths

log = logging.getLogger(__name__)

KAFKA_KEY = ("kafka_topic", "kafka_partition", "kafka_offset")
DESCRIPTION = (
    "Check the quarantined records again with the current config and land the ones that now pass in bronze, "
    "each at most once (merged by Kafka topic, partition and offset)."
)
# Concurrent appends by the running ingest query can make a merge's commit conflict; it is
# retried on the new table state (the merge only ever inserts what is missing).
MERGE_ATTEMPTS = 5


@dataclass(frozen=True)
class ReprocessReport:
    """What one run found: records considered, landed per event type, already in bronze, and
    the reasons of those that are still invalid."""

    considered: int
    landed: dict[str, int]
    already_in_bronze: int
    still_invalid: Counter[str]

    def summary(self) -> str:
        landed = ", ".join(f"{n} {name}" for name, n in self.landed.items()) or "nothing"
        lines = [
            f"{self.considered} quarantined records checked with the current config: landed in bronze {landed}; "
            f"{self.already_in_bronze} were already in bronze; {sum(self.still_invalid.values())} still invalid"
        ]
        lines += [f"  still invalid: {reason} ({n})" for reason, n in self.still_invalid.most_common(10)]
        return "\n".join(lines)


def quarantined_records(quarantine: DataFrame, cfg: PlatformConfig, reason_contains: str | None = None) -> DataFrame:
    """The quarantined records of the event topics as Kafka records (the frame the ingest
    reads), one per Kafka coordinate, optionally only those whose reason contains a text."""
    topics = [t.name for t in cfg.events.topics().values()]
    records = quarantine.where(F.col("kafka_topic").isin(topics))
    if reason_contains:
        records = records.where(F.col("reason").contains(reason_contains))
    return records.dropDuplicates(list(KAFKA_KEY)).select(
        F.lit(None).cast("binary").alias("key"),
        F.col("raw_value").alias("value"),
        F.col("kafka_topic").alias("topic"),
        F.col("kafka_partition").alias("partition"),
        F.col("kafka_offset").alias("offset"),
        F.col("kafka_timestamp").alias("timestamp"),
    )


def _merge_missing(spark: SparkSession, path: str, rows: DataFrame) -> None:
    """Insert the rows whose Kafka coordinates the table does not hold yet."""
    condition = " AND ".join(f"t.{c} = s.{c}" for c in KAFKA_KEY)
    for attempt in range(1, MERGE_ATTEMPTS + 1):
        try:
            DeltaTable.forPath(spark, path).alias("t").merge(rows.alias("s"), condition).whenNotMatchedInsertAll().execute()
            return
        except ConcurrentAppendException:
            if attempt == MERGE_ATTEMPTS:
                raise
            log.warning("%s: the ingest appended while merging (attempt %d of %d); merging again", path, attempt, MERGE_ATTEMPTS)
            time.sleep(attempt)


def reprocess_quarantine(spark: SparkSession, cfg: PlatformConfig, reason_contains: str | None = None, dry_run: bool = False) -> ReprocessReport:
    """Check the quarantined records again with ``cfg`` and merge the valid ones into bronze."""
    ensure_tables(spark, cfg)
    paths = table_paths(cfg)
    records = quarantined_records(spark.read.format("delta").load(paths[QUARANTINE]), cfg, reason_contains).persist()
    try:
        considered = records.count()
        parsed = parse_events(records, cfg)
        still_invalid = Counter({row["reason"]: row["count"] for row in parsed[QUARANTINE].groupBy("reason").count().collect()})
        landed: dict[str, int] = {}
        already = 0
        for name, valid in parsed.items():
            if name == QUARANTINE:
                continue
            bronze = spark.read.format("delta").load(paths[name]).select(*KAFKA_KEY)
            missing = valid.join(bronze, list(KAFKA_KEY), "left_anti").persist()
            try:
                n_valid, n_missing = valid.count(), missing.count()
                already += n_valid - n_missing
                if n_missing and not dry_run:
                    _merge_missing(spark, paths[name], missing)
                if n_missing:
                    landed[name] = n_missing
            finally:
                missing.unpersist()
    finally:
        records.unpersist()
    report = ReprocessReport(considered, landed, already, still_invalid)
    log.info("%s%s", "dry run: " if dry_run else "", report.summary())
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's options, shared by ``lambda-ml speed reprocess-quarantine`` and :func:`main`."""
    parser.add_argument("--reason", help="only records whose quarantine reason contains this text")
    parser.add_argument("--dry-run", action="store_true", help="report what would land, write nothing")


def run_from_args(cfg: PlatformConfig, args: argparse.Namespace) -> int:
    """Run the job with parsed options and print its report; the exit status."""
    from lambda_ml.spark import get_spark

    report = reprocess_quarantine(get_spark(cfg, "reprocess-quarantine"), cfg, args.reason, args.dry_run)
    print(("dry run: " if args.dry_run else "") + report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speed_layer/reprocess.py", description=DESCRIPTION)
    parser.add_argument("--config", help="platform config file (default: conf/platform.yaml)")
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    cfg = load_command_config(args.config)
    return 2 if cfg is None else run_from_args(cfg, args)


if __name__ == "__main__":
    raise SystemExit(main())

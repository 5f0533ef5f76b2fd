"""``lambda-ml verify``: check a config's running stack and lake against the platform's
guarantees, with one line per check saying what was compared and the figures, and a non-zero
exit status when a check fails.

Each check reuses the code of the layers it checks (the batch layer's snapshot and views, the
service's view merge and its ``/features`` answer, the registry's tags), so that what it
compares is what the platform computes, not a second copy of it:

- **identity**: the merged views the service serves (batch view ⊕ speed increments) equal the
  views the batch layer recomputes from bronze at the versions the merge covers.
- **exactly-once**: no Kafka record is twice in bronze, and every record Kafka holds up to what
  the ingest's checkpoint consumed is in bronze or in quarantine.
- **lineage**: every aliased model version names its horizon, an existing MLflow run and the
  hashes of its config and feature definitions.
- **point-in-time**: the features the service computes at a sample of events' own times equal
  the batch layer's point-in-time features (the training set's) at those times.

:func:`run_checks` runs them and returns a :class:`Report` (the demo calls it too).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from lambda_ml import contract
from lambda_ml.config import PlatformConfig
from lambda_ml.contract import Horizon

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from lambda_ml.apps import Application
    from lambda_ml.buckets import EntityBuckets
    from serving_layer.views import BatchViews, BucketView

log = logging.getLogger(__name__)

PASS, FAIL, SKIP = "pass", "fail", "skip"
# Aggregates other than counts are doubles: a sum of the same values added in another order (the
# batch view plus the increments, or one recompute) may differ in its last bits.
RELATIVE_TOLERANCE = 1e-9
EXAMPLES = 5  # differences named per check
DEFAULT_PIT_SAMPLE = 200

Key = tuple[Any, ...]
Cells = dict[int, tuple[Any, ...]]  # bucket start (epoch microseconds) -> aggregate values


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict: ``status`` pass, fail or skip, one line of figures, the details
    (differences, per-topic counts...) and the figures for machines."""

    check: str
    status: str
    summary: str
    details: tuple[str, ...] = ()
    figures: Mapping[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def lines(self) -> list[str]:
        """The check's lines of the text report.

        >>> CheckResult("exactly-once", FAIL, "2 offsets twice", ("readings: 2",)).lines()
        ['FAIL  exactly-once: 2 offsets twice', '        readings: 2']
        """
        return [f"{self.status.upper():<4}  {TITLES.get(self.check, self.check)}: {self.summary}", *(f"        {d}" for d in self.details)]

    def as_json(self) -> dict[str, Any]:
        return {"check": self.check, "status": self.status, "summary": self.summary, "details": list(self.details), "figures": dict(self.figures)}


@dataclass(frozen=True)
class Report:
    """Every check's result, for the config file ``source``."""

    source: str
    results: tuple[CheckResult, ...]
    seconds: float = 0.0

    @property
    def failed(self) -> list[str]:
        """The names of the checks that failed."""
        return [r.check for r in self.results if r.failed]

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def exit_code(self) -> int:
        """0 when no check failed (skipped ones do not fail), 1 otherwise."""
        return 0 if self.passed else 1

    def text(self) -> str:
        lines = [line for result in self.results for line in result.lines()]
        verdict = "all passed" if self.passed else "failed: " + ", ".join(self.failed)
        lines.append(f"verify {self.source}: {len(self.results)} check(s) in {self.seconds:.0f} s, {verdict}")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "config": self.source,
            "passed": self.passed,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "checks": [r.as_json() for r in self.results],
        }


# --------------------------------------------------------------------------- comparing values


def same_value(aggregation: str, left: Any, right: Any) -> bool:
    """Two values of one aggregate (``aggregation``; a feature: any other word) are equal:
    counts, minima and maxima exactly, sums and features within :data:`RELATIVE_TOLERANCE`; a
    missing value equals only a missing one.

    >>> same_value("count", 3, 3.0), same_value("sum", 0.1 + 0.2, 0.3), same_value("max", None, 0.0)
    (True, True, False)
    """
    if left is None or right is None:
        return left is None and right is None
    if aggregation in ("count", "min", "max"):  # picked or counted, never rounded
        return bool(left == right)
    return math.isclose(float(left), float(right), rel_tol=RELATIVE_TOLERANCE, abs_tol=RELATIVE_TOLERANCE)


def served_cells(buckets: EntityBuckets, aggregates: Sequence[str]) -> Cells:
    """One key's served bucket rows as bucket start -> aggregate values."""
    return {start: tuple(buckets.values[a][n] if a in buckets.values else None for a in aggregates) for n, start in enumerate(buckets.starts)}


def key_text(key: Key) -> str:
    """A key as the ``/features`` route takes it: its values joined by ``/``."""
    return "/".join(str(part) for part in key)


def cell_difference(merged: Cells, recomputed: Cells, aggregations: Mapping[str, str]) -> str | None:
    """The first difference between one key's merged and recomputed bucket rows, in words;
    None when they are equal.

    >>> cell_difference({0: (2, 1.5)}, {0: (2, 1.5)}, {"n": "count", "top": "max"}) is None
    True
    >>> cell_difference({0: (2, 1.5)}, {0: (3, 1.5), 3600000000: (1, 2.0)}, {"n": "count", "top": "max"})
    'bucket 1970-01-01T00:00:00+00:00: n merged 2, recomputed 3'
    >>> cell_difference({}, {3600000000: (1, 2.0)}, {"n": "count", "top": "max"})
    'bucket 1970-01-01T01:00:00+00:00: only in the recompute'
    """
    from lambda_ml.buckets import from_micros

    names = list(aggregations)
    for start in sorted(set(merged) | set(recomputed)):
        when = from_micros(start).isoformat()
        if start not in merged:
            return f"bucket {when}: only in the recompute"
        if start not in recomputed:
            return f"bucket {when}: only in the merged view"
        for name, left, right in zip(names, merged[start], recomputed[start]):
            if not same_value(aggregations[name], left, right):
                return f"bucket {when}: {name} merged {left}, recomputed {right}"
    return None


def feature_differences(served: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """The features whose served value is not the expected one, as ``name served/expected``.

    >>> feature_differences({"a_n_1h": 2.0, "a_top_1h": 1.0}, {"a_n_1h": 3.0, "a_top_1h": 1.0})
    ['a_n_1h 2.0/3.0']
    """
    return [
        f"{name} {served.get(name)}/{value}"
        for name, value in expected.items()
        if name not in served or not same_value("feature", served[name], value)
    ]


# --------------------------------------------------------------------------- what the checks share


def compared_horizon(view: BucketView) -> Horizon:
    """The bronze versions one entity's merged rows cover: the view's horizon, moved on to the
    newest version the speed layer's increments merged, event type by event type (a later
    version is not processed by the speed layer yet: the merge is defined up to there only).

    >>> from serving_layer.views import BucketView, Increments
    >>> view = BucketView("sensor", ("sensor_id",), "mem", horizon=Horizon.of(readings=2, setup=1))
    >>> str(compared_horizon(view)), str(compared_horizon(replace(view, increments=Increments(through=Horizon.of(readings=5)))))
    ('bronze readings v2, setup v1', 'bronze readings v5, setup v1')
    """
    parts = view.horizon.parts
    through = view.increments.through
    for event, version in ({} if through is None else through.parts).items():
        current = parts.get(event)
        if version is not None and (current is None or version > current):
            parts[event] = version
    return Horizon.of(parts)


def horizon_groups(views: BatchViews) -> dict[Horizon, list[str]]:
    """The entities by the horizon their merged rows cover (one group when the speed layer
    wrote every entity's increments in the same micro-batches, as it does)."""
    groups: dict[Horizon, list[str]] = {}
    for entity, view in views.views.items():
        groups.setdefault(compared_horizon(view), []).append(entity)
    return groups


def describe_merge(views: BatchViews, horizon: Horizon, bronze: Mapping[str, int | None]) -> str:
    """How the compared horizon came about, in words: the views' horizon, the increments, and
    bronze's newest versions when the speed layer has not merged them yet."""
    text = f"the views at {views.horizon}"
    # The event types the increments merged rows of (a part None: none of that type after the views).
    throughs = {
        Horizon.of({e: v for e, v in through.parts.items() if v is not None})
        for view in views.views.values()
        if (through := view.increments.through) is not None
    }
    text += (" ⊕ increments through " + "; ".join(str(t) for t in throughs)) if throughs else " and no increments after them"
    later = {e: v for e, v in bronze.items() if v is not None and horizon.version(e) is not None and v > (horizon.version(e) or 0)}
    if later:
        text += "; bronze is now at " + ", ".join(f"{e} v{v}" for e, v in sorted(later.items())) + " (not merged by the speed layer yet)"
    return text


class Lake:
    """What the checks read once and share: the served views, the bronze versions, and the
    feature events the batch layer derives from bronze at a horizon (cached per horizon)."""

    def __init__(self, cfg: PlatformConfig, spark: SparkSession | None = None) -> None:
        self.cfg = cfg
        self._spark = spark
        self._views: BatchViews | None = None
        self._events: dict[Horizon, DataFrame] = {}
        self._app: Application | None = None

    @property
    def spark(self) -> SparkSession:
        """The given Spark session, or the platform's (started on first use, left running)."""
        if self._spark is None:
            from lambda_ml.spark import get_spark

            self._spark = get_spark(self.cfg, "verify")
        return self._spark

    @property
    def app(self) -> Application:
        if self._app is None:
            from lambda_ml.apps import load_application

            self._app = load_application(self.cfg)
        return self._app

    def views(self) -> BatchViews:
        """The views as the service loads them (batch view ⊕ increments), loaded once so that
        every check sees the same ones."""
        if self._views is None:
            from serving_layer.views import load_batch_views

            log.info("loading the views as the service does (batch views ⊕ speed increments) from %s", self.cfg.lake.root)
            self._views = load_batch_views(self.cfg)
        return self._views

    def bronze_versions(self) -> dict[str, int | None]:
        """The newest Delta version of each bronze table (None where there is none)."""
        from deltalake import DeltaTable
        from deltalake.exceptions import DeltaError

        versions: dict[str, int | None] = {}
        for event in self.cfg.events.types:
            try:
                versions[event] = DeltaTable(self.cfg.lake.table("bronze", event)).version()
            except (DeltaError, OSError):
                versions[event] = None
        return versions

    def feature_events(self, horizon: Horizon) -> DataFrame:
        """The feature events the batch layer derives from bronze pinned at ``horizon`` (the
        application's rule, as ``batch_layer.train`` runs it), cached."""
        events = self._events.get(horizon)
        if events is None:
            from batch_layer.snapshot import read_snapshot

            pinned = {e: v for e, v in horizon.parts.items() if v is not None}
            log.info("deriving the feature events from bronze at %s", horizon)
            snapshot = read_snapshot(self.spark, self.cfg, pinned)
            events = self.app.features.batch(snapshot, self.cfg).cache()
            self._events[horizon] = events
        return events

    def release(self) -> None:
        for events in self._events.values():
            events.unpersist()
        self._events.clear()


@dataclass(frozen=True)
class Options:
    """What the checks compare: ``sample`` keys per entity (None: all) for the identity, and
    ``pit_sample`` events for the point-in-time check, drawn with ``seed``."""

    sample: int | None = None
    pit_sample: int = DEFAULT_PIT_SAMPLE
    seed: int = 0


# --------------------------------------------------------------------------- 1. lambda identity


def collect_cells(view: DataFrame, keys: Sequence[str], aggregates: Sequence[str]) -> dict[Key, Cells]:
    """A view's rows (Spark) as key -> bucket start (epoch microseconds, exact) -> aggregate values."""
    from pyspark.sql import functions as F

    cells: dict[Key, Cells] = {}
    for row in view.select(*keys, F.unix_micros(contract.VIEW_BUCKET_COLUMN).alias("_micros"), *aggregates).collect():
        cells.setdefault(tuple(row[k] for k in keys), {})[row["_micros"]] = tuple(row[a] for a in aggregates)
    return cells


def check_identity(lake: Lake, options: Options) -> CheckResult:
    """Merged views (as served) == the views the batch layer recomputes from bronze at the
    versions the merge covers, every key (or ``options.sample`` keys) of every entity."""
    from batch_layer.views import build_view
    from lambda_ml.spark import shuffle_partitions

    cfg = lake.cfg
    views = lake.views()
    aggregates = list(cfg.features.aggregates)
    aggregations = {name: a.aggregation for name, a in cfg.features.aggregates.items()}
    groups = horizon_groups(views)
    bronze = lake.bronze_versions()
    compared = total = differing = 0
    examples: list[str] = []
    per_entity: dict[str, dict[str, Any]] = {}
    with shuffle_partitions(lake.spark, cfg.spark.batch_shuffle_partitions):
        for horizon, entities in groups.items():
            events = lake.feature_events(horizon)
            for entity in entities:
                keys = list(cfg.features.entities[entity].keys)
                view = views.views[entity]
                merged = view.rows if view.merged is None else view.merged
                log.info("lambda identity: recomputing the %s view from bronze at %s", entity, horizon)
                recomputed = build_view(events, entity, cfg.features, horizon)
                if options.sample is None:
                    cells = collect_cells(recomputed, keys, aggregates)
                    every_key = set(merged) | set(cells)
                    chosen = sorted(every_key, key=repr)
                else:
                    every_key = set(merged) | {tuple(r) for r in recomputed.select(*keys).distinct().collect()}
                    chosen = sorted(every_key, key=repr)
                    if options.sample < len(chosen):
                        chosen = sorted(random.Random(options.seed).sample(chosen, options.sample), key=repr)
                    wanted = lake.spark.createDataFrame([list(k) for k in chosen], recomputed.select(*keys).schema)
                    cells = collect_cells(recomputed.join(wanted, keys, "left_semi"), keys, aggregates)
                log.info("lambda identity: comparing %d keys of %s", len(chosen), entity)
                wrong = 0
                for key in chosen:
                    served = served_cells(merged[key], aggregates) if key in merged else {}
                    difference = cell_difference(served, cells.get(key, {}), aggregations)
                    if difference is not None:
                        wrong += 1
                        if len(examples) < EXAMPLES:
                            examples.append(f"{entity} {key_text(key)}: {difference}")
                per_entity[entity] = {"keys": len(every_key), "compared": len(chosen), "differ": wrong, "horizon": horizon.parts}
                compared, total, differing = compared + len(chosen), total + len(every_key), differing + wrong
    how = "; ".join(describe_merge(views, horizon, bronze) for horizon in groups)
    at = "; ".join(f"{horizon} ({', '.join(entities)})" if len(groups) > 1 else str(horizon) for horizon, entities in groups.items())
    of = f"{compared:,} of {total:,} keys" if compared < total else f"{compared:,} keys"
    summary = f"{of} of {len(per_entity)} entit{'y' if len(per_entity) == 1 else 'ies'} compared at {at}, {differing:,} differ"
    details = (f"compared: {how}", *(f"{e}: {f['compared']:,} of {f['keys']:,} keys, {f['differ']:,} differ" for e, f in per_entity.items()), *examples)
    figures = {"keys": total, "compared": compared, "differ": differing, "entities": per_entity, "views_horizon": views.horizon.parts}
    return CheckResult("identity", FAIL if differing else PASS, summary, details, figures)


# --------------------------------------------------------------------------- 2. exactly once


@dataclass(frozen=True)
class IngestProgress:
    """What the ingest query's checkpoint says it consumed: its last committed micro-batch and,
    per (topic, partition), the Kafka offset it read up to (exclusive)."""

    batch_id: int
    ends: Mapping[tuple[str, int], int]


def consumed_offsets(text: str) -> dict[tuple[str, int], int]:
    """The Kafka end offsets in a streaming checkpoint's offsets file (``offsets/<batch id>``:
    a version line, the batch's metadata, then one line per source).

    >>> consumed_offsets('v1\\n{"batchWatermarkMs":0}\\n{"readings":{"1":40,"0":42}}')
    {('readings', 1): 40, ('readings', 0): 42}
    >>> consumed_offsets("v1")
    Traceback (most recent call last):
    ...
    ValueError: not a streaming checkpoint's offsets file: 1 line(s)
    """
    from speed_layer.monitor import kafka_offsets

    lines = text.splitlines()
    if len(lines) < 3 or not lines[0].startswith("v"):
        raise ValueError(f"not a streaming checkpoint's offsets file: {len(lines)} line(s)")
    return {(topic, int(partition)): offset for (topic, partition), offset in kafka_offsets(lines[2]).items()}


def ingest_progress(spark: SparkSession, cfg: PlatformConfig) -> IngestProgress | None:
    """The ingest checkpoint's last committed micro-batch and its offsets; None before the
    ingest ever committed one. Read through Hadoop's file system: any checkpoint location."""
    from speed_layer.app import checkpoint

    directory = checkpoint(cfg, "ingest")
    jvm, jsc = spark.sparkContext._jvm, spark.sparkContext._jsc
    assert jvm is not None and jsc is not None
    commits = jvm.org.apache.hadoop.fs.Path(f"{directory}/commits")
    fs = commits.getFileSystem(jsc.hadoopConfiguration())
    if not fs.exists(commits):
        return None
    batches = [int(name) for status in fs.listStatus(commits) if (name := str(status.getPath().getName())).isdigit()]
    if not batches:
        return None
    batch = max(batches)
    text = spark.read.text(f"{directory}/offsets/{batch}", wholetext=True).first()
    if text is None:
        raise ValueError(f"{directory}/offsets/{batch} is empty")
    return IngestProgress(batch, consumed_offsets(text[0]))


def check_exactly_once(lake: Lake, options: Options) -> CheckResult:
    """No Kafka coordinate twice in bronze; every offset Kafka holds up to the ingest
    checkpoint in bronze or in quarantine."""
    from pyspark.sql import functions as F

    from speed_layer.ingest import bronze_path, quarantine_path
    from speed_layer.reprocess import KAFKA_KEY

    cfg, spark = lake.cfg, lake.spark
    coordinates = list(KAFKA_KEY)
    # The checkpoint first: bronze holds at least what a committed micro-batch wrote.
    progress = ingest_progress(spark, cfg)
    if progress is None:
        return CheckResult("exactly-once", FAIL, f"the ingest has committed no micro-batch yet (no commits in its checkpoint under {cfg.lake.checkpoints})")
    topics = {topic.name: event for event, topic in cfg.events.topics().items()}
    ends: dict[str, dict[str, int]] = {}
    for (topic, partition), end in progress.ends.items():
        if topic in topics:
            ends.setdefault(topic, {})[str(partition)] = end
    if not ends:
        return CheckResult("exactly-once", FAIL, f"the ingest checkpoint's micro-batch {progress.batch_id} read none of the event topics {', '.join(topics)}")
    log.info("exactly-once: the ingest checkpoint's micro-batch %d consumed %s", progress.batch_id, json.dumps(ends, sort_keys=True))
    bronze = None
    for event in cfg.events.types:
        rows = spark.read.format("delta").load(bronze_path(cfg, event)).select(*coordinates)
        bronze = rows if bronze is None else bronze.unionByName(rows)
    assert bronze is not None
    quarantine = spark.read.format("delta").load(quarantine_path(cfg)).select(*coordinates)
    kafka = (
        spark.read.format("kafka")
        .option("kafka.bootstrap.servers", cfg.kafka.bootstrap_servers)
        .option("assign", json.dumps({t: sorted(int(p) for p in parts) for t, parts in ends.items()}))
        .option("startingOffsets", json.dumps({t: dict.fromkeys(parts, -2) for t, parts in ends.items()}))  # -2: the earliest held
        .option("endingOffsets", json.dumps(ends))
        .option("failOnDataLoss", "false")  # records deleted by retention are not Kafka's to compare any more
        .load()
        .select(F.col("topic").alias("kafka_topic"), F.col("partition").alias("kafka_partition"), F.col("offset").alias("kafka_offset"))
    )
    log.info("exactly-once: reading the offsets Kafka holds up to the checkpoint and joining them with bronze and quarantine")
    in_bronze = bronze.distinct().withColumn("_bronze", F.lit(1))
    in_quarantine = quarantine.distinct().withColumn("_quarantine", F.lit(1))
    joined = kafka.join(in_bronze, coordinates, "left").join(in_quarantine, coordinates, "left")
    landed = F.col("_bronze").isNotNull()
    quarantined = F.col("_quarantine").isNotNull() & ~landed
    counted = joined.groupBy("kafka_topic").agg(
        F.count(F.lit(1)).alias("held"),
        F.sum(landed.cast("long")).alias("in_bronze"),
        F.sum(quarantined.cast("long")).alias("in_quarantine"),
        F.sum((~landed & F.col("_quarantine").isNull()).cast("long")).alias("missing"),
    )
    names = ("held", "in_bronze", "in_quarantine", "missing", "duplicated", "extra_rows")
    per_topic: dict[str, dict[str, int]] = {t: dict.fromkeys(names, 0) for t in ends}
    for row in counted.collect():
        per_topic.setdefault(row["kafka_topic"], dict.fromkeys(names, 0)).update({k: int(row[k] or 0) for k in names[:4]})
    twice = bronze.groupBy(*coordinates).count().where(F.col("count") > 1)
    for row in twice.groupBy("kafka_topic").agg(F.count(F.lit(1)).alias("n"), F.sum(F.col("count") - 1).alias("extra")).collect():
        per_topic.setdefault(row["kafka_topic"], dict.fromkeys(names, 0)).update({"duplicated": int(row["n"]), "extra_rows": int(row["extra"])})
    examples = [f"{r['kafka_topic']}/{r['kafka_partition']}@{r['kafka_offset']} is in bronze {r['count']} times" for r in twice.limit(EXAMPLES).collect()]
    missing = joined.where(~landed & F.col("_quarantine").isNull()).select(*coordinates).limit(EXAMPLES).collect()
    examples += [f"{r['kafka_topic']}/{r['kafka_partition']}@{r['kafka_offset']} is neither in bronze nor in quarantine" for r in missing]
    total = {k: sum(f[k] for f in per_topic.values()) for k in names}
    failed = total["missing"] > 0 or total["duplicated"] > 0
    summary = (
        f"{total['held']:,} Kafka records of {len(ends)} topic(s) up to the ingest checkpoint (micro-batch {progress.batch_id}): "
        f"{total['in_bronze']:,} in bronze, {total['in_quarantine']:,} in quarantine, {total['missing']:,} missing; "
        f"{total['duplicated']:,} offsets in bronze more than once"
    )
    details = [
        f"{topic}: {f['held']:,} held, {f['in_bronze']:,} in bronze, {f['in_quarantine']:,} in quarantine, "
        f"{f['missing']:,} missing, {f['duplicated']:,} offsets twice or more ({f['extra_rows']:,} extra rows)"
        for topic, f in sorted(per_topic.items())
    ]
    figures: dict[str, Any] = {"checkpoint_batch": progress.batch_id, "consumed": ends, "topics": per_topic, **total}
    return CheckResult("exactly-once", FAIL if failed else PASS, summary, (*details, *examples), figures)


# --------------------------------------------------------------------------- 3. lineage


def version_lineage(
    client: Any, registered_model: str, version: str, event_types: Sequence[str], bronze: Mapping[str, int | None]
) -> tuple[list[str], dict[str, Any]]:
    """What is missing from one registered version's lineage (empty: complete), and the lineage
    found: its horizon (every event type's ``horizon.<event>`` tag, within bronze's versions),
    its MLflow run (existing, not deleted) and its config and feature definitions hashes (a
    version the speed layer registered carries those of the batch version it started from)."""
    from mlflow.exceptions import MlflowException

    from batch_layer.registry import TAG_CONFIG_HASH, TAG_FEATURES_HASH

    found = client.get_model_version(registered_model, version)
    tags = dict(found.tags)
    problems: list[str] = []
    horizon = Horizon.from_tags(tags, event_types)
    for event in event_types:
        pinned, newest = horizon.version(event), bronze.get(event)
        if pinned is None:
            problems.append(f"no {contract.horizon_tag(event)} tag")
        elif newest is None or pinned > newest:
            problems.append(f"{contract.horizon_tag(event)} {pinned} is beyond bronze {event}'s newest version {newest}")
    lineage: dict[str, Any] = {"version": str(version), "horizon": horizon.parts, "run_id": found.run_id}
    if not found.run_id:
        problems.append("no MLflow run")
    else:
        try:
            run = client.get_run(found.run_id)
            lineage["run_status"] = run.info.status
            if run.info.lifecycle_stage == "deleted":
                problems.append(f"MLflow run {found.run_id} is deleted")
        except MlflowException as exc:
            problems.append(f"MLflow run {found.run_id} cannot be found ({exc.error_code})")
    hashed: Mapping[str, str] | None = tags
    where = ""
    if tags.get(contract.TAG_LAYER) == "speed":
        base = tags.get(contract.TAG_SPEED_BASE_VERSION, "0")
        lineage["base_version"] = base
        if base in ("", "0"):
            problems.append("a speed-layer version started from no batch version: no config or feature hashes")
            hashed = None
        else:
            where = f" on its base version {base}"
            try:
                hashed = dict(client.get_model_version(registered_model, base).tags)
            except MlflowException as exc:
                problems.append(f"its base version {base} cannot be found ({exc.error_code})")
                hashed = None
    for tag in (TAG_CONFIG_HASH, TAG_FEATURES_HASH):
        lineage[tag] = None if hashed is None else hashed.get(tag)
        if hashed is not None and not hashed.get(tag):
            problems.append(f"no {tag} tag{where}")
    return problems, lineage


def check_lineage(lake: Lake, options: Options) -> CheckResult:
    """Every aliased version resolves to a horizon, an existing run and its hashes."""
    from mlflow import MlflowClient

    from batch_layer import registry
    from batch_layer.train import features_hash

    cfg = lake.cfg
    name = cfg.mlflow.registered_model
    client = MlflowClient(cfg.mlflow.tracking_uri)
    aliases = registry.alias_versions(client, name)
    if not aliases:
        return CheckResult("lineage", FAIL, f"registered model {name} has no aliased version at {cfg.mlflow.tracking_uri}: has a batch run registered one?")
    bronze = lake.bronze_versions()
    current = {registry.TAG_CONFIG_HASH: registry.training_config_hash(cfg), registry.TAG_FEATURES_HASH: features_hash(cfg, lake.app)}
    details, incomplete, found = [], 0, {}
    for alias, version in sorted(aliases.items()):
        problems, lineage = version_lineage(client, name, version, list(cfg.events.types), bronze)
        found[alias] = {**lineage, "problems": problems}
        if problems:
            incomplete += 1
            details.append(f"{alias} -> version {version}: " + "; ".join(problems))
            continue
        same = all(lineage[tag] == value for tag, value in current.items())
        base = f" (hashes of its base version {lineage['base_version']})" if "base_version" in lineage else ""
        details.append(
            f"{alias} -> version {version}: {Horizon.of(lineage['horizon'])}, run {lineage['run_id']} ({lineage.get('run_status')}), "
            f"config {lineage[registry.TAG_CONFIG_HASH][:12]}, features {lineage[registry.TAG_FEATURES_HASH][:12]}{base}"
            + ("" if same else "; trained under another config or feature definitions than the current one")
        )
    summary = f"{len(aliases)} aliased version(s) of {name} ({', '.join(sorted(aliases))}), {incomplete} without a complete lineage"
    return CheckResult("lineage", FAIL if incomplete else PASS, summary, tuple(details), {"aliases": found, "incomplete": incomplete})


# --------------------------------------------------------------------------- 4. point in time


def check_point_in_time(lake: Lake, options: Options) -> CheckResult:
    """At a sample of events' own times, the features the service computes (``/features?at=``'s
    function, bronze pinned at the compared horizon) == the batch layer's point-in-time
    features (``add_window_features``, as the training set)."""
    from pyspark.sql import functions as F

    from lambda_ml.buckets import from_micros
    from lambda_ml.features import KIND, add_window_features
    from lambda_ml.spark import shuffle_partitions
    from serving_layer.lake_events import LakeEvents
    from serving_layer.routes.features import features_response

    cfg = lake.cfg
    views = lake.views()
    statistics = [*cfg.features.aggregates, *cfg.features.ratios]
    sampled = differing = 0
    examples: list[str] = []
    started = time.monotonic()
    horizons = []
    with shuffle_partitions(lake.spark, cfg.spark.batch_shuffle_partitions):
        for horizon, entities in horizon_groups(views).items():
            horizons.append(str(horizon))
            events = lake.feature_events(horizon)
            rank = F.xxhash64(F.col(KIND), F.col("event_id"), F.lit(options.seed))
            targets = events.where(F.col(KIND).isNotNull()).orderBy(rank).limit(options.pit_sample)
            targets = targets.withColumn("_verify_micros", F.unix_micros("event_time")).withColumn("_verify_kind", F.col(KIND))
            log.info("point in time: the batch layer's features of %d sampled events at %s", options.pit_sample, horizon)
            expected = sorted(add_window_features(targets, events, cfg.features).collect(), key=lambda r: r["_verify_micros"])
            pinned = replace(views, lake=LakeEvents(cfg, lake.app.features, {e: v for e, v in horizon.parts.items() if v is not None}))
            for n, row in enumerate(expected, 1):
                at = from_micros(row["_verify_micros"])
                wrong: list[str] = []
                for entity in entities:
                    key = tuple(row[k] for k in cfg.features.entities[entity].keys)
                    served = features_response(cfg.features, pinned, entity, key, at).merged.features
                    names = [contract.window_feature_name(entity, s, w) for s in statistics for w in cfg.features.windows]
                    wrong += [f"{entity} {key_text(key)}: {d}" for d in feature_differences(served, {name: row[name] for name in names})]
                if wrong:
                    differing += 1
                    if len(examples) < EXAMPLES:
                        examples.append(f"{row['_verify_kind']} {row['event_id']} at {at.isoformat()}: " + ", ".join(wrong[:3]))
                if n % 50 == 0:
                    log.info("point in time: %d of %d events compared (%.0f s)", n, len(expected), time.monotonic() - started)
            sampled += len(expected)
    if not sampled:
        return CheckResult("point-in-time", SKIP, "no feature event in bronze to sample")
    summary = (
        f"{sampled:,} events sampled from bronze at {'; '.join(horizons)}: the service's features at each event's time "
        f"vs the batch layer's point-in-time features, {differing:,} differ"
    )
    figures = {"events": sampled, "differ": differing, "horizons": horizons}
    return CheckResult("point-in-time", FAIL if differing else PASS, summary, tuple(examples), figures)


# --------------------------------------------------------------------------- the checks


@dataclass(frozen=True)
class Check:
    name: str
    title: str
    explanation: str
    run: Callable[[Lake, Options], CheckResult]


CHECKS: tuple[Check, ...] = (
    Check(
        "identity", "lambda identity",
        "the views the service serves (batch view ⊕ speed increments, merged as serving_layer.views merges them) equal "
        "the views the batch layer recomputes from bronze (batch_layer.views), bucket by bucket, for every key of every "
        "declared entity (or --sample N keys each). Bronze is pinned at the versions the merge covers: the views' "
        "horizon moved on to the newest bronze version the increments report (versions the speed layer has not "
        "processed yet are not compared; the report names them). A difference is a merge bug, or late data the speed "
        "layer's watermark dropped, which the next batch run corrects.",
        check_identity,
    ),
    Check(
        "exactly-once", "exactly-once",
        "no Kafka (topic, partition, offset) is twice in bronze, and every offset Kafka still holds for the event "
        "topics, up to what the ingest checkpoint's last committed micro-batch consumed, is in bronze or in "
        "quarantine; counts per topic.",
        check_exactly_once,
    ),
    Check(
        "lineage", "lineage",
        "every aliased version of mlflow.registered_model (champion, challenger, speed...) has a horizon.<event> tag "
        "per event type within bronze's versions, an existing MLflow run, and its config and feature definitions "
        "hashes (a speed-layer version: those of its base version); says when they differ from the current config's.",
        check_lineage,
    ),
    Check(
        "point-in-time", "point in time",
        "for --pit-sample events of bronze (at the identity's horizon), the features the service computes at each "
        "event's own time (the function GET /features?at= answers with) equal the batch layer's point-in-time "
        "features at that time (lambda_ml.features.add_window_features, as in the training set): only the events "
        "strictly before it count.",
        check_point_in_time,
    ),
)
TITLES = {check.name: check.title for check in CHECKS}


def run_checks(
    cfg: PlatformConfig,
    spark: SparkSession | None = None,
    checks: Iterable[str] | None = None,
    sample: int | None = None,
    pit_sample: int = DEFAULT_PIT_SAMPLE,
    seed: int = 0,
) -> Report:
    """Run ``checks`` (names of :data:`CHECKS`; default all) on ``cfg``'s stack and lake and
    return the report. ``spark``: the session to use (default: the platform's, started when a
    check needs it and left running). A check that cannot run (no views, MLflow unreachable...)
    fails, saying why; the others still run.
    """
    wanted = list(checks) if checks is not None else [c.name for c in CHECKS]
    unknown = [name for name in wanted if name not in TITLES]
    if unknown:
        raise ValueError(f"no check {unknown}: the checks are {', '.join(TITLES)}")
    if sample is not None and sample <= 0:
        raise ValueError(f"--sample must be a positive number of keys per entity, not {sample}")
    if pit_sample <= 0:
        raise ValueError(f"--pit-sample must be a positive number of events, not {pit_sample}")
    options = Options(sample, pit_sample, seed)
    lake = Lake(cfg, spark)
    started = time.monotonic()
    results = []
    try:
        for check in CHECKS:
            if check.name not in wanted:
                continue
            log.info("verify: %s ...", check.title)
            began = time.monotonic()
            try:
                result = check.run(lake, options)
            except Exception as exc:  # noqa: BLE001 - a check that cannot run fails, the others still run
                log.warning("verify: %s could not run", check.title, exc_info=log.isEnabledFor(logging.DEBUG))
                result = CheckResult(check.name, FAIL, f"could not run: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            log.info("verify: %s: %s (%.1f s)", check.title, result.status, time.monotonic() - began)
            results.append(result)
    finally:
        lake.release()
    return Report(cfg.source, tuple(results), time.monotonic() - started)


# --------------------------------------------------------------------------- the command


DESCRIPTION = "Check the running stack and lake of the config against the platform's guarantees; one line per check, exit 1 on any failure."


def epilog() -> str:
    """``--help``'s explanation of each check."""
    import textwrap

    parts = ["checks (all by default; --check picks some):"]
    for check in CHECKS:
        parts.append(textwrap.fill(f"{check.name}: {check.explanation}", width=100, initial_indent="  ", subsequent_indent="      "))
    parts.append("exit status: 0 when every check passed (or was skipped), 1 when one failed, 2 on bad arguments.")
    return "\n".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options (``lambda-ml verify``)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = epilog()
    parser.add_argument("--check", action="append", choices=list(TITLES), dest="checks", metavar="CHECK",
                        help=f"run only this check (repeatable): {', '.join(TITLES)}")  # fmt: skip
    parser.add_argument("--sample", type=int, metavar="N", help="identity: compare N keys per entity, drawn at random (default: every key)")
    parser.add_argument("--pit-sample", type=int, default=DEFAULT_PIT_SAMPLE, metavar="N",
                        help=f"point-in-time: events compared (default: {DEFAULT_PIT_SAMPLE})")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples (default: 0)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (the logs stay on stderr)")


def run_from_args(cfg: PlatformConfig, args: argparse.Namespace) -> int:
    """Run the checks with parsed options, print the report; the exit status. A Spark session
    this command started is stopped at the end."""
    from pyspark.sql import SparkSession

    had_session = SparkSession.getActiveSession() is not None
    try:
        report = run_checks(cfg, checks=args.checks, sample=args.sample, pit_sample=args.pit_sample, seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        session = SparkSession.getActiveSession()
        if not had_session and session is not None:
            session.stop()
    print(json.dumps(report.as_json(), indent=2) if args.json else report.text(), flush=True)
    return report.exit_code

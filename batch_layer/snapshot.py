"""Pin the master dataset: the bronze tables read at fixed Delta versions (the horizon).

Everything a batch run produces is computed from one :class:`Snapshot`, and records its
:class:`Horizon`, so that a view or a model can always be traced to the exact bronze versions
it came from, and the speed layer knows which increments the batch already covers.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lambda_ml.apps import Snapshot
from lambda_ml.config import PlatformConfig
from lambda_ml.contract import Horizon


class SnapshotError(RuntimeError):
    """A bronze table is missing or the requested version does not exist."""


def bronze_path(cfg: PlatformConfig, event_type: str) -> str:
    return cfg.lake.table("bronze", event_type)


def latest_version(spark: SparkSession, path: str) -> int:
    """The latest committed version of the Delta table at ``path``."""
    if not DeltaTable.isDeltaTable(spark, path):
        raise SnapshotError(f"no Delta table at {path}: has the speed layer ingested any events yet?")
    row = DeltaTable.forPath(spark, path).history(1).select("version").first()
    if row is None:
        raise SnapshotError(f"Delta table at {path} has no history")
    return int(row[0])


def read_version(spark: SparkSession, path: str, version: int | None) -> tuple[DataFrame, int]:
    """The table at ``version`` (default: its latest version) and the version read."""
    latest = latest_version(spark, path)
    if version is None:
        version = latest
    if not 0 <= version <= latest:
        raise SnapshotError(f"{path} has versions 0..{latest}; version {version} was requested")
    return spark.read.format("delta").option("versionAsOf", version).load(path), version


def version_as_of(spark: SparkSession, path: str, as_of: datetime) -> int:
    """The version of the Delta table at ``path`` as of ``as_of``: the latest one committed at
    or before that instant (what Delta's ``timestampAsOf`` reads).

    A naive ``as_of`` is taken as UTC. An instant before the table's first commit, or in the
    future (whose state is not known yet), is refused.
    """
    if as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    if as_of > datetime.now(UTC):
        raise SnapshotError(f"as-of {as_of.isoformat()} is in the future: a snapshot can only be as of a past instant")
    latest_version(spark, path)  # a clear error if there is no table
    history = DeltaTable.forPath(spark, path).history().select("version", "timestamp")
    row = history.where(F.col("timestamp") <= F.lit(as_of)).agg(F.max("version")).first()
    if row is None or row[0] is None:
        first = history.agg(F.min("timestamp")).first()
        raise SnapshotError(
            f"{path} has no version committed at or before {as_of.isoformat()}; "
            f"its oldest recorded commit is at {None if first is None else first[0]}"
        )
    return int(row[0])


def read_snapshot(
    spark: SparkSession,
    cfg: PlatformConfig,
    versions: Mapping[str, int] | None = None,
    as_of: datetime | None = None,
) -> Snapshot:
    """Every declared event type's bronze table pinned at the given versions (event type ->
    version; the latest for the others), or at the versions each table had at the instant
    ``as_of`` (see :func:`version_as_of`).

    The versions are resolved once, here: a stream appending meanwhile does not change what
    this run reads.
    """
    versions = dict(versions or {})
    unknown = [name for name in versions if name not in cfg.events.types]
    if unknown:
        raise ValueError(f"no event type {unknown} to pin; the event types are {', '.join(cfg.events.types)}")
    if as_of is not None:
        if versions:
            raise ValueError("pin the snapshot either by versions or by an as-of time, not both")
        versions = {name: version_as_of(spark, bronze_path(cfg, name), as_of) for name in cfg.events.types}
    frames: dict[str, DataFrame] = {}
    read: dict[str, int | None] = {}
    for name in cfg.events.types:
        frames[name], read[name] = read_version(spark, bronze_path(cfg, name), versions.get(name))
    return Snapshot(frames, Horizon.of(read))

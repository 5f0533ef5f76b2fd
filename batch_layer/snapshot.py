"""Pin the master dataset: the bronze tables read at fixed Delta versions (the horizon).

Everything a batch run produces is computed from one :class:`Snapshot`, and records its
:class:`Horizon`, so that a view or a model can always be traced to the exact bronze versions
it came from, and the speed layer knows which increments the batch already covers.
"""

from __future__ import annotations

from dataclasses import dataclass

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession

from lambda_ml.contract import Horizon
from lambda_ml.config import PlatformConfig
from lambda_ml.schemas import CLICK, IMPRESSION, EventType


class SnapshotError(RuntimeError):
    """A bronze table is missing or the requested version does not exist."""


@dataclass(frozen=True)
class Snapshot:
    """Bronze impressions and clicks (duplicates included) as of a horizon."""

    impressions: DataFrame
    clicks: DataFrame
    horizon: Horizon


def bronze_path(cfg: PlatformConfig, event: EventType) -> str:
    return cfg.lake.table("bronze", event.name)


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


def read_snapshot(
    spark: SparkSession,
    cfg: PlatformConfig,
    impressions_version: int | None = None,
    clicks_version: int | None = None,
) -> Snapshot:
    """Bronze impressions and clicks pinned at the given versions (default: the latest ones).

    The versions are resolved once, here: a stream appending meanwhile does not change what
    this run reads.
    """
    impressions, imp_version = read_version(spark, bronze_path(cfg, IMPRESSION), impressions_version)
    clicks, click_version = read_version(spark, bronze_path(cfg, CLICK), clicks_version)
    return Snapshot(impressions, clicks, Horizon(impressions=imp_version, clicks=click_version))

"""Delta maintenance: OPTIMIZE (compaction) and VACUUM of the lake's tables, without ever
breaking a pinned horizon still in use.

A batch run pins bronze at a Delta version (its horizon) and tags every model version it
registers with it (``horizon.<event type>``). While a version holding an
alias (``champion``, ``challenger``, ``previous-champion``...) came from bronze *v*, bronze *v*
must stay readable by time travel: the model can be reproduced and the lambda identity checked
from it. VACUUM deletes the files old versions need, so for each bronze table this job
lengthens the configured retention until it covers the oldest version in use::

    retention = max(maintenance.retention_hours,
                    now - commit time of the oldest in-use version + maintenance.safety_margin_minutes)

rounded up to whole hours: Delta counts VACUUM retention in whole hours and rounds a fraction
to the nearest one, which could shorten it by half an hour.

Delta 4.4 ignores a VACUUM retention other than 0 (it applies the table's
``delta.deletedFileRetentionDuration``, 7 days by default) and refuses one shorter than that
property; for the one VACUUM whose retention this rule computed, the job lets the retention
apply and, if it is shorter than the property, turns the check off. Table properties are never
changed: that would be a metadata commit, failing the ingest stream's concurrent appends.

If the registry cannot be read, or a version in use does not say which bronze version it came
from, the table is not vacuumed and the job exits 1 saying why; OPTIMIZE still runs (it deletes
nothing), and tables no model pins (quarantine, views, increments...) do not wait for the registry. Delta also
refuses time travel beyond a table's ``delta.deletedFileRetentionDuration`` (and loses commits
beyond its ``delta.logRetentionDuration``) whatever VACUUM keeps; a version in use that old is
reported, and the job exits 1.

    spark-submit batch_layer/maintenance.py [--config conf/platform.yaml] [--dry-run]

(``lambda-ml submit batch_layer/maintenance.py`` adds the platform's jars and settings.)
:func:`plan_vacuum` is the whole rule as a pure function; :func:`run` and :func:`main` do IO.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from delta.tables import DeltaTable
from py4j.protocol import Py4JError
from pyspark.errors import PySparkException
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from lambda_ml.catalog import lake_tables, table_names
from lambda_ml.config import MaintenanceConfig, PlatformConfig, load_command_config
from lambda_ml.contract import Horizon
from lambda_ml.logs import setup_logging
from lambda_ml.spark import job_session

log = logging.getLogger(__name__)


# Table properties bounding time travel, and Delta's defaults for them.
DELETED_FILE_RETENTION = "delta.deletedFileRetentionDuration"
LOG_RETENTION = "delta.logRetentionDuration"
DEFAULT_DELETED_FILE_RETENTION_HOURS = 168.0
DEFAULT_LOG_RETENTION_HOURS = 720.0

# Session settings of one VACUUM (see _vacuum_settings).
RETENTION_CHECK = "spark.databricks.delta.retentionDurationCheck.enabled"
RETENTION_WINDOW_IGNORE = "spark.databricks.delta.vacuum.retentionWindowIgnore.enabled"
LISTING_PARALLELISM = "spark.sql.sources.parallelPartitionDiscovery.parallelism"

_MS_PER_HOUR = 3_600_000
_HOURS_PER_UNIT = {"week": 168.0, "day": 24.0, "hour": 1.0, "minute": 1 / 60, "second": 1 / 3600, "millisecond": 1 / 3_600_000}


class RegistryUnavailable(RuntimeError):
    """The MLflow registry could not be read: which horizons are in use is unknown."""


@dataclass(frozen=True)
class ModelInUse:
    """A registered model version holding at least one alias, and the horizon it was trained on."""

    version: str
    aliases: tuple[str, ...]
    horizon: Horizon

    def __str__(self) -> str:
        return f"version {self.version} ({', '.join(self.aliases)}) on {self.horizon}"


@dataclass(frozen=True)
class TimeTravelLimits:
    """A table's retention properties, in hours: Delta refuses time travel beyond the smaller."""

    deleted_file_hours: float = DEFAULT_DELETED_FILE_RETENTION_HOURS
    log_hours: float = DEFAULT_LOG_RETENTION_HOURS

    @property
    def window_hours(self) -> float:
        return min(self.deleted_file_hours, self.log_hours)

    @classmethod
    def from_properties(cls, properties: Mapping[str, str]) -> TimeTravelLimits:
        """The limits set on a table (``DESCRIBE DETAIL``'s properties), Delta's defaults elsewhere.

        >>> TimeTravelLimits.from_properties({"delta.deletedFileRetentionDuration": "interval 2 days"})
        TimeTravelLimits(deleted_file_hours=48.0, log_hours=720.0)
        """
        deleted = properties.get(DELETED_FILE_RETENTION)
        logs = properties.get(LOG_RETENTION)
        return cls(
            DEFAULT_DELETED_FILE_RETENTION_HOURS if deleted is None else interval_hours(deleted),
            DEFAULT_LOG_RETENTION_HOURS if logs is None else interval_hours(logs),
        )


def interval_hours(text: str) -> float:
    """Hours in a Delta interval property value.

    >>> interval_hours("interval 1 week"), interval_hours("INTERVAL 1 day 12 hours"), interval_hours("90 minutes")
    (168.0, 36.0, 1.5)
    """
    words = text.lower().split()
    if words[:1] == ["interval"]:
        words = words[1:]
    if not words or len(words) % 2:
        raise ValueError(f"not an interval: {text!r}")
    total = 0.0
    for amount, unit in zip(words[::2], words[1::2], strict=True):
        hours = _HOURS_PER_UNIT.get(unit.removesuffix("s"))
        if hours is None:
            raise ValueError(f"unknown unit {unit!r} in interval {text!r}")
        total += float(amount) * hours
    return total


@dataclass(frozen=True)
class VacuumPlan:
    """How (and whether) to vacuum one table: ``retention_hours`` is None when it must not be.

    ``check_off`` says whether Delta's retention check must be off for that retention (it is
    shorter than the table's ``delta.deletedFileRetentionDuration``); ``warning`` names a
    version in use that Delta will not time travel to whatever VACUUM keeps.
    """

    table: str
    retention_hours: int | None
    pinned: tuple[int, ...]
    reason: str
    check_off: bool = False
    warning: str | None = None

    @property
    def allowed(self) -> bool:
        return self.retention_hours is not None


@dataclass
class TableReport:
    """What the job did to one table."""

    table: str
    path: str
    exists: bool = True
    files_before: int | None = None
    files_after: int | None = None
    plan: VacuumPlan | None = None
    vacuumed: bool = False
    files_to_delete: int | None = None  # --dry-run only
    error: str | None = None

    @property
    def ok(self) -> bool:
        if not self.exists:
            return True
        return self.error is None and self.plan is not None and self.plan.allowed and self.plan.warning is None

    def summary(self) -> str:
        if not self.exists:
            return f"{self.table}: no Delta table at {self.path} (skipped)"
        parts = [f"{self.table}: {self.files_before} -> {self.files_after} files"]
        if self.plan is not None:
            if self.plan.allowed:
                verb = "vacuumed" if self.vacuumed else "would vacuum"
                extra = "" if self.files_to_delete is None else f", deleting {self.files_to_delete} files"
                parts.append(f"{verb} with a retention of {self.plan.retention_hours} h ({self.plan.reason}){extra}")
            else:
                parts.append(f"NOT vacuumed: {self.plan.reason}")
            if self.plan.warning is not None:
                parts.append(f"WARNING: {self.plan.warning}")
        if self.error is not None:
            parts.append(f"FAILED: {self.error}")
        return "; ".join(parts)


@dataclass
class MaintenanceReport:
    tables: list[TableReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tables)

    def table(self, name: str) -> TableReport:
        return next(t for t in self.tables if t.table == name)


# --------------------------------------------------------------------------- the rule


def pinned_versions(part: str | None, in_use: Sequence[ModelInUse]) -> tuple[int, ...] | None:
    """Versions of the table a horizon ``part`` names (None: a table no horizon pins) that the
    models in use were trained on: () if none, None if unknown.

    >>> champion = ModelInUse("4", ("champion",), Horizon.of(views=7, orders=3))
    >>> untagged = ModelInUse("2", ("challenger",), Horizon.of())
    >>> pinned_versions("orders", [champion]), pinned_versions(None, [champion, untagged])
    ((3,), ())
    >>> pinned_versions("views", [champion, untagged]) is None
    True
    """
    if part is None:
        return ()
    versions = [model.horizon.version(part) for model in in_use]
    if any(v is None for v in versions):
        return None
    return tuple(sorted({int(v) for v in versions}))


def plan_vacuum(
    table: str,
    cfg: MaintenanceConfig,
    now_ms: int,
    pinned: tuple[int, ...] | None,
    commit_ms: Mapping[int, int],
    limits: TimeTravelLimits = TimeTravelLimits(),
) -> VacuumPlan:
    """The retention (whole hours, rounded up) that keeps every pinned version of ``table``
    readable, or a refusal.

    ``pinned`` comes from :func:`pinned_versions`; ``commit_ms`` maps the table's versions to
    their commit times (epoch milliseconds, from its Delta history).

    >>> cfg = MaintenanceConfig(retention_hours=24, safety_margin_minutes=30)
    >>> hour = 3_600_000
    >>> commits = {0: 0, 1: 50 * hour, 2: 90 * hour}
    >>> plan_vacuum("bronze/orders", cfg, 100 * hour, (1, 2), commits).retention_hours  # 100-50+0.5
    51
    >>> plan_vacuum("bronze/orders", cfg, 100 * hour, (2,), commits).retention_hours  # 24 > 100-90+0.5
    24
    >>> print(plan_vacuum("bronze/orders", cfg, 100 * hour, (5,), commits).reason)
    version 5 in use is newer than its latest version 2: is the registry this lake's?
    >>> plan_vacuum("bronze/orders", cfg, 100 * hour, None, commits).allowed
    False
    """
    margin_hours = cfg.safety_margin_minutes / 60
    floor = math.ceil(max(cfg.retention_hours, margin_hours))

    def plan(retention: int, pins: tuple[int, ...], reason: str, warning: str | None = None) -> VacuumPlan:
        return VacuumPlan(table, retention, pins, reason, retention < limits.deleted_file_hours, warning)

    if pinned is None:
        return VacuumPlan(table, None, (), "a model version in use has no horizon tag for it: what it needs is unknown")
    if not pinned:
        return plan(floor, (), "no version in use pins it")
    pinned = tuple(sorted(set(pinned)))
    oldest = pinned[0]
    if oldest not in commit_ms:
        latest = max(commit_ms, default=-1)
        if oldest > latest:
            reason = f"version {oldest} in use is newer than its latest version {latest}: is the registry this lake's?"
        else:
            reason = f"version {oldest} in use is no longer in its Delta history (log retention): it cannot be protected"
        return VacuumPlan(table, None, pinned, reason)
    age_hours = (now_ms - commit_ms[oldest]) / _MS_PER_HOUR
    warning = None
    if age_hours > limits.window_hours:
        warning = (
            f"version {oldest} in use is {age_hours:.0f} h old, beyond the {limits.window_hours:g} h Delta allows "
            f"time travel over ({DELETED_FILE_RETENTION}, {LOG_RETENTION}): raise those table properties to read it"
        )
    needed = math.ceil(age_hours + margin_hours)
    if needed > floor:
        return plan(needed, pinned, f"keeps version {oldest}, the oldest in use, and later ones", warning)
    return plan(floor, pinned, f"the configured retention already keeps version {oldest}, the oldest in use", warning)


# --------------------------------------------------------------------------- the registry


@contextmanager
def _bounded_registry_calls(timeout_s: int) -> Iterator[None]:
    """Fail in about ``timeout_s`` rather than after MLflow's default minutes of retries."""
    settings = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update({name: value for name, value in settings.items() if previous[name] is None})
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)


def models_in_use(tracking_uri: str, registered_model: str, timeout_s: int = 30) -> list[ModelInUse]:
    """Versions of ``registered_model`` holding an alias, with their horizons.

    A registered model that does not exist yet has none. Raises :class:`RegistryUnavailable`
    if the registry cannot be read.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with _bounded_registry_calls(timeout_s):
        try:
            model = client.get_registered_model(registered_model)
            by_version: dict[str, list[str]] = {}
            for alias, version in model.aliases.items():
                by_version.setdefault(str(version), []).append(alias)
            return [
                ModelInUse(version, tuple(sorted(aliases)), Horizon.from_tags(client.get_model_version(registered_model, version).tags))
                for version, aliases in sorted(by_version.items(), key=lambda item: int(item[0]))
            ]
        except MlflowException as exc:
            if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                return []
            raise RegistryUnavailable(f"cannot read registered model {registered_model!r} at {tracking_uri}: {exc.message}") from exc
        except OSError as exc:
            raise RegistryUnavailable(f"cannot read registered model {registered_model!r} at {tracking_uri}: {exc}") from exc


# --------------------------------------------------------------------------- Delta operations


def table_detail(spark: SparkSession, path: str) -> tuple[int, TimeTravelLimits]:
    """Data files in the table's latest version, and its time-travel limits."""
    row = DeltaTable.forPath(spark, path).detail().select("numFiles", "properties").first()
    assert row is not None  # DESCRIBE DETAIL always has one row
    return int(row["numFiles"]), TimeTravelLimits.from_properties(row["properties"] or {})


def file_count(spark: SparkSession, path: str) -> int:
    """Data files in the table's latest version."""
    return table_detail(spark, path)[0]


def commit_times(spark: SparkSession, path: str) -> dict[int, int]:
    """``{version: commit time in epoch milliseconds}`` over the table's Delta history."""
    history = DeltaTable.forPath(spark, path).history().select("version", F.unix_millis("timestamp").alias("ms"))
    return {int(row["version"]): int(row["ms"]) for row in history.collect()}


def optimize_table(spark: SparkSession, path: str) -> None:
    """Bin-pack small files into large ones (a new version; no data changes, nothing deleted)."""
    DeltaTable.forPath(spark, path).optimize().executeCompaction()


@contextmanager
def _session_settings(spark: SparkSession, settings: Mapping[str, str]) -> Iterator[None]:
    """Set session settings for the block, then put back what was there."""
    previous = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)


def _vacuum_settings(spark: SparkSession, plan: VacuumPlan) -> dict[str, str]:
    return {
        # Apply the planned retention instead of the table property...
        RETENTION_WINDOW_IGNORE: "false",
        # ...even when it is shorter than the property: the plan made sure that is safe.
        RETENTION_CHECK: str(not plan.check_off).lower(),
        # VACUUM lists the table with this many tasks (default 10,000: minutes of tiny tasks on a
        # laptop for a table of one directory); the shuffle partitions scale with the cluster.
        LISTING_PARALLELISM: spark.conf.get("spark.sql.shuffle.partitions") or "4",
    }


def vacuum_table(spark: SparkSession, path: str, plan: VacuumPlan) -> None:
    """VACUUM with the plan's retention (and only with a plan that allows it)."""
    if plan.retention_hours is None:
        raise ValueError(f"{plan.table} must not be vacuumed: {plan.reason}")
    with _session_settings(spark, _vacuum_settings(spark, plan)):
        DeltaTable.forPath(spark, path).vacuum(float(plan.retention_hours))


def count_vacuumable(spark: SparkSession, path: str, plan: VacuumPlan) -> int:
    """Files the plan's VACUUM would delete (``VACUUM ... DRY RUN``)."""
    if plan.retention_hours is None:
        return 0
    quoted = path.replace("`", "``")
    with _session_settings(spark, _vacuum_settings(spark, plan)):
        return spark.sql(f"VACUUM delta.`{quoted}` RETAIN {plan.retention_hours} HOURS DRY RUN").count()


# --------------------------------------------------------------------------- the job


def maintain_table(spark: SparkSession, cfg: PlatformConfig, table: str, dry_run: bool = False) -> TableReport:
    """OPTIMIZE then VACUUM one table (lake-relative name), as planned by :func:`plan_vacuum`."""
    path = cfg.lake.table(*table.split("/"))
    report = TableReport(table, path)
    if not DeltaTable.isDeltaTable(spark, path):
        report.exists = False
        return report
    report.files_before, limits = table_detail(spark, path)
    if cfg.maintenance.optimize and not dry_run:
        optimize_table(spark, path)
        report.files_after = file_count(spark, path)
    else:
        report.files_after = report.files_before
    # The registry is read just before the table is vacuumed, so an alias moved meanwhile counts.
    pinned: tuple[int, ...] | None = ()
    part = pinned_tables(cfg).get(table)
    if part is not None:
        try:
            in_use = models_in_use(cfg.mlflow.tracking_uri, cfg.mlflow.registered_model, cfg.maintenance.registry_timeout_s)
        except RegistryUnavailable as exc:
            reason = f"the MLflow registry is unreachable, so the horizons in use are unknown ({exc})"
            report.plan = VacuumPlan(table, None, (), reason)
            return report
        for model in in_use:
            log.info("%s: in use: %s", table, model)
        pinned = pinned_versions(part, in_use)
    commits = commit_times(spark, path) if pinned else {}
    report.plan = plan_vacuum(table, cfg.maintenance, int(time.time() * 1000), pinned, commits, limits)
    if not report.plan.allowed:
        return report
    if dry_run:
        report.files_to_delete = count_vacuumable(spark, path, report.plan)
    else:
        vacuum_table(spark, path, report.plan)
        report.vacuumed = True
    return report


def maintained_tables(cfg: PlatformConfig) -> list[str]:
    """The lake catalog's tables less ``maintenance.exclude``."""
    return [name for name in table_names(cfg) if name not in cfg.maintenance.exclude]


def pinned_tables(cfg: PlatformConfig) -> dict[str, str]:
    """Lake tables a model version pins -> the horizon part (event type) pinning each."""
    return {t.name: t.pinned_by for t in lake_tables(cfg) if t.pinned_by is not None}


def run(spark: SparkSession, cfg: PlatformConfig, dry_run: bool = False) -> MaintenanceReport:
    """Maintain every table of the lake catalog (less ``maintenance.exclude``); one failing
    table does not stop the others."""
    report = MaintenanceReport()
    for table in maintained_tables(cfg):
        try:
            result = maintain_table(spark, cfg, table, dry_run)
        except (PySparkException, Py4JError) as exc:
            result = TableReport(table, cfg.lake.table(*table.split("/")), error=str(exc).strip().splitlines()[0])
        (log.info if result.ok else log.error)("%s", result.summary())
        report.tables.append(result)
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="batch_layer/maintenance.py",
        description="OPTIMIZE and VACUUM the lake's Delta tables (every table of the lake catalog, less maintenance.exclude) with the configured "
        "retention, lengthened so that every bronze version a model version holding an alias was "
        "trained on stays readable. Exits 1 if a table could not be maintained or safely vacuumed.",
        epilog="Override a setting for one run with e.g. LAMBDA_ML__MAINTENANCE__RETENTION_HOURS=24.",
    )
    parser.add_argument("--config", help="platform config file (default: $LAMBDA_ML_CONFIG or conf/platform.yaml)")
    parser.add_argument(
        "--dry-run", action="store_true", help="report file counts, retentions and what VACUUM would delete; change nothing"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0: every table maintained)."""
    args = parse_args(argv)
    setup_logging(args.verbose)
    cfg = load_command_config(args.config)
    if cfg is None:
        return 2
    with job_session(cfg, "maintenance") as spark:
        report = run(spark, cfg, dry_run=args.dry_run)
    failed = [t.table for t in report.tables if not t.ok]
    if failed:
        log.error("maintenance incomplete for %s", ", ".join(failed))
        return 1
    log.info("maintenance %s for %d tables", "planned" if args.dry_run else "done", len(report.tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())

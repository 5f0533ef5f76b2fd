"""The Delta maintenance job: its retention rule on its own, then OPTIMIZE and VACUUM on real
Delta tables pinned by real model versions in the real MLflow registry.

Delta counts VACUUM retention in whole hours, so the tables are given an hours-long past: each
commit is moved back in time after it is written, as if it had been made then (its commit
file's time, which the history reports, the deletion time of the files it removed and the
modification time of the files it added, both of which VACUUM compares with the retention). Every time-travel check collects rows: a bare ``count()``
is answered from Delta's log statistics and would pass even after the files are gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from delta.tables import DeltaTable
from pyspark.sql import SparkSession

from batch_layer import maintenance
from lambda_ml import contract
from lambda_ml.catalog import table_names
from lambda_ml.config import DEFAULT_CONFIG, ConfigError, MaintenanceConfig, PlatformConfig, load_config, write_config
from lambda_ml.contract import Horizon
from lambda_ml.schemas import QUARANTINE_SCHEMA
from support import CLICK, IMPRESSION
from lambda_ml_cli.submit import run_submit, submit_command, submit_env
from conftest import free_port
from support import isolated

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR_MS = 3_600_000
MARGIN_MINUTES = 10
MISSING_FILE = "FILE_NOT_EXIST|does not exist"


# --------------------------------------------------------------------------- the rule


def test_the_oldest_version_in_use_sets_the_retention() -> None:
    cfg = MaintenanceConfig(retention_hours=0, safety_margin_minutes=30)
    commits = {0: 0, 1: 10 * HOUR_MS, 2: 40 * HOUR_MS, 3: 41 * HOUR_MS}
    plan = maintenance.plan_vacuum("bronze/impressions", cfg, 100 * HOUR_MS, (2, 1), commits)
    # 90 h since version 1 plus the margin, rounded up: Delta would round 90.5 down to 90.
    assert (plan.retention_hours, plan.pinned, plan.check_off) == (91, (1, 2), True)
    exact = maintenance.plan_vacuum("bronze/impressions", cfg.model_copy(update={"safety_margin_minutes": 0}), 100 * HOUR_MS, (1,), commits)
    assert exact.retention_hours == 90
    # A longer configured retention wins; Delta's own check then needs no switching off.
    long = MaintenanceConfig(retention_hours=199.2, safety_margin_minutes=30)
    plan = maintenance.plan_vacuum("bronze/impressions", long, 100 * HOUR_MS, (1,), commits)
    assert (plan.retention_hours, plan.check_off) == (200, False)
    # Nothing pinned: the configured retention, never less than the margin.
    plan = maintenance.plan_vacuum("quarantine", cfg, 100 * HOUR_MS, (), commits)
    assert (plan.retention_hours, plan.pinned) == (1, ())


def test_a_version_in_use_beyond_deltas_time_travel_window_is_reported() -> None:
    cfg = MaintenanceConfig(retention_hours=0, safety_margin_minutes=0)
    limits = maintenance.TimeTravelLimits.from_properties(
        {"delta.deletedFileRetentionDuration": "interval 2 days", "delta.logRetentionDuration": "interval 30 days"}
    )
    assert (limits.deleted_file_hours, limits.log_hours, limits.window_hours) == (48, 720, 48)
    commits = {0: 0, 1: 60 * HOUR_MS}
    old = maintenance.plan_vacuum("bronze/clicks", cfg, 100 * HOUR_MS, (0,), commits, limits)
    assert old.retention_hours == 100 and not old.check_off  # files kept, but Delta will not read them
    assert old.warning is not None and "version 0 in use is 100 h old, beyond the 48 h" in old.warning
    recent = maintenance.plan_vacuum("bronze/clicks", cfg, 100 * HOUR_MS, (1,), commits, limits)
    assert (recent.retention_hours, recent.check_off, recent.warning) == (40, True, None)
    with pytest.raises(ValueError, match="unknown unit 'fortnights'"):
        maintenance.interval_hours("interval 2 fortnights")


def test_unknown_or_unmatched_horizons_refuse_to_vacuum() -> None:
    cfg = MaintenanceConfig(retention_hours=0, safety_margin_minutes=0)
    commits = {4: 0, 5: HOUR_MS}  # versions 0..3 already left the Delta log
    unknown = maintenance.plan_vacuum("bronze/clicks", cfg, 2 * HOUR_MS, None, commits)
    assert not unknown.allowed and "no horizon tag" in unknown.reason
    cleaned = maintenance.plan_vacuum("bronze/clicks", cfg, 2 * HOUR_MS, (3, 5), commits)
    assert not cleaned.allowed and "version 3 in use is no longer in its Delta history" in cleaned.reason
    ahead = maintenance.plan_vacuum("bronze/clicks", cfg, 2 * HOUR_MS, (9,), commits)
    assert not ahead.allowed and "newer than its latest version 5" in ahead.reason
    with pytest.raises(ValueError, match="must not be vacuumed"):
        maintenance.vacuum_table(None, "/nowhere", unknown)  # type: ignore[arg-type]


def test_the_job_maintains_every_table_of_the_catalog_but_the_excluded_ones() -> None:
    cfg = load_config(DEFAULT_CONFIG, env={})
    entities = ("user", "item", "user_device")
    assert maintenance.maintained_tables(cfg) == [
        "bronze/impressions", "bronze/clicks", "quarantine",
        *(f"views/{e}_buckets" for e in entities), *(f"speed/{e}_increments" for e in entities),
        "silver/labels", "speed/online_model",
    ]  # fmt: skip
    assert maintenance.pinned_tables(cfg) == {"bronze/impressions": "impressions", "bronze/clicks": "clicks"}
    fewer = load_config(DEFAULT_CONFIG, env={"LAMBDA_ML__MAINTENANCE__EXCLUDE": "[speed/online_model, quarantine]"})
    assert "quarantine" not in maintenance.maintained_tables(fewer) and len(maintenance.maintained_tables(fewer)) == 9
    with pytest.raises(ConfigError, match=r"maintenance.exclude names \['views/user_counts'\], which are not lake tables"):
        load_config(DEFAULT_CONFIG, env={"LAMBDA_ML__MAINTENANCE__EXCLUDE": "[views/user_counts]"})


def test_pinned_versions_come_from_every_model_in_use() -> None:
    champion = maintenance.ModelInUse("7", ("champion",), Horizon.of(impressions=5, clicks=2))
    previous = maintenance.ModelInUse("3", ("challenger", "previous-champion"), Horizon.of(impressions=3, clicks=2))
    untagged = maintenance.ModelInUse("1", ("old",), Horizon.of(impressions=None, clicks=1))
    assert maintenance.pinned_versions("impressions", [champion, previous]) == (3, 5)
    assert maintenance.pinned_versions("clicks", [champion, previous, untagged]) == (1, 2)
    assert maintenance.pinned_versions("impressions", [champion, untagged]) is None
    assert maintenance.pinned_versions(None, [champion, untagged]) == ()
    assert maintenance.pinned_versions("impressions", []) == ()


def test_command_line_has_help_and_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        maintenance.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--dry-run" in capsys.readouterr().out
    args = maintenance.parse_args(["--config", "x.yaml", "--dry-run"])
    assert (args.config, args.dry_run) == ("x.yaml", True)


# --------------------------------------------------------------------------- real tables


def impression_rows(ids: range) -> list[tuple[object, ...]]:
    return [
        (f"e{k}", T0 + timedelta(minutes=k), f"u{k % 3}", f"i{k % 2}", "mobile", 1 + k % 5, "impressions", 0, k, T0, T0)
        for k in ids
    ]


def click_rows(ids: range) -> list[tuple[object, ...]]:
    return [(f"k{k}", f"e{k}", T0 + timedelta(minutes=k, seconds=30), "clicks", 0, k, T0, T0) for k in ids]


def append(spark: SparkSession, path: str, rows: list[tuple[object, ...]], schema: object, files: int, mode: str = "append") -> None:
    """One commit of ``files`` data files (of equal size: ``rows`` must divide evenly)."""
    frame = spark.createDataFrame(rows, schema).coalesce(1)  # type: ignore[arg-type]
    frame.write.format("delta").mode(mode).option("maxRecordsPerFile", len(rows) // files).save(path)


def event_ids(spark: SparkSession, path: str, version: int | None = None) -> list[str]:
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return sorted(row[0] for row in reader.load(path).select("event_id").collect())


def files(spark: SparkSession, path: str) -> int:
    return maintenance.file_count(spark, path)


def backdate(spark: SparkSession, path: str, hours_ago: dict[int, float]) -> None:
    """Move commits of the table at ``path`` back in time, as if made ``hours_ago``."""
    now_ms = int(time.time() * 1000)
    for version, hours in sorted(hours_ago.items()):
        at_ms = now_ms - int(hours * HOUR_MS)
        commit = Path(path) / "_delta_log" / f"{version:020d}.json"
        actions = [json.loads(line) for line in commit.read_text().splitlines() if line.strip()]
        for action in actions:
            if "commitInfo" in action:
                action["commitInfo"]["timestamp"] = at_ms
            if "remove" in action:
                action["remove"]["deletionTimestamp"] = at_ms
            if "add" in action:
                os.utime(Path(path) / action["add"]["path"], (at_ms / 1000, at_ms / 1000))
        commit.write_text("".join(json.dumps(action) + "\n" for action in actions))
        # Hadoop's local file system keeps a checksum beside each file; it no longer matches.
        (commit.parent / f".{commit.name}.crc").unlink(missing_ok=True)
        os.utime(commit, (at_ms / 1000, at_ms / 1000))
    # The session's cached snapshot still holds the old times.
    spark.sparkContext._jvm.org.apache.spark.sql.delta.DeltaLog.clearCache()  # type: ignore[union-attr]


@dataclass(frozen=True)
class Lake:
    cfg: PlatformConfig
    impressions: str
    clicks: str
    quarantine: str
    users: str


def build_lake(spark: SparkSession, cfg: PlatformConfig) -> Lake:
    """Tables with an hours-long history: bronze impressions compacted 4.5 hours ago (its v0
    and v1 files removed then), appended since; a view overwritten 4.5 hours ago."""
    lake = Lake(
        cfg,
        cfg.lake.table("bronze", "impressions"),
        cfg.lake.table("bronze", "clicks"),
        cfg.lake.table("quarantine"),
        cfg.lake.table(*contract.view_table("user")),
    )
    imp = IMPRESSION.bronze_schema()
    append(spark, lake.impressions, impression_rows(range(0, 6)), imp, 3)  # v0
    append(spark, lake.impressions, impression_rows(range(6, 12)), imp, 3)  # v1
    DeltaTable.forPath(spark, lake.impressions).optimize().executeCompaction()  # v2: v0, v1 files removed
    append(spark, lake.impressions, impression_rows(range(12, 18)), imp, 3)  # v3: pinned by champion
    append(spark, lake.impressions, impression_rows(range(18, 24)), imp, 3)  # v4: pinned by challenger
    append(spark, lake.impressions, impression_rows(range(24, 30)), imp, 3)  # v5
    backdate(spark, lake.impressions, {0: 6, 1: 5.5, 2: 4.5, 3: 3, 4: 2, 5: 1})
    append(spark, lake.clicks, click_rows(range(0, 4)), CLICK.bronze_schema(), 2)  # v0
    append(spark, lake.clicks, click_rows(range(4, 8)), CLICK.bronze_schema(), 2)  # v1: pinned
    backdate(spark, lake.clicks, {0: 6, 1: 2.5})
    quarantined = [("impressions", 0, k, T0, b"{", "malformed JSON: not a JSON object", T0) for k in range(4)]
    append(spark, lake.quarantine, quarantined[:2], QUARANTINE_SCHEMA, 2)
    append(spark, lake.quarantine, quarantined[2:], QUARANTINE_SCHEMA, 2)
    backdate(spark, lake.quarantine, {0: 6, 1: 5})
    view = "user_id string, impressions long, clicks long, horizon_impressions long, horizon_clicks long"
    append(spark, lake.users, [("u0", 1, 0, 0, 0), ("u1", 2, 1, 0, 0)], view, 2, mode="overwrite")  # v0
    append(spark, lake.users, [("u0", 3, 1, 3, 1), ("u1", 4, 2, 3, 1)], view, 2, mode="overwrite")  # v1
    backdate(spark, lake.users, {0: 6, 1: 4.5})
    return lake


def register_version(cfg: PlatformConfig, horizon: Horizon, alias: str | None) -> str:
    """A real registry entry: a model version of a small logged artifact, tagged with a horizon."""
    from mlflow import MlflowClient

    client = MlflowClient(cfg.mlflow.tracking_uri)
    name = cfg.mlflow.registered_model
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.mlflow.experiment)
    run = client.create_run(experiment_id, tags=horizon.tags())
    client.log_text(run.info.run_id, f"trained on {horizon}\n", "model/README.txt")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=horizon.tags())
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def maintenance_cfg(running_stack: PlatformConfig, model: str, root: Path, **updates: object) -> PlatformConfig:
    cfg = isolated(running_stack, model, lake_root=root / "lake")
    settings = {"retention_hours": 0.0, "safety_margin_minutes": MARGIN_MINUTES, "registry_timeout_s": 5, **updates}
    return cfg.model_copy(update={"maintenance": cfg.maintenance.model_copy(update=settings)})


@pytest.fixture(scope="module")
def pinned_lake(
    running_stack: PlatformConfig, spark: SparkSession, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Lake]:
    cfg = maintenance_cfg(running_stack, "ctr-maintenance", tmp_path_factory.mktemp("maintenance"))
    lake = build_lake(spark, cfg)
    register_version(cfg, Horizon.of(impressions=0, clicks=0), alias=None)  # no alias: not in use
    register_version(cfg, Horizon.of(impressions=3, clicks=1), alias="champion")
    register_version(cfg, Horizon.of(impressions=4, clicks=1), alias="challenger")
    yield lake


@pytest.mark.integration
def test_only_versions_holding_an_alias_are_in_use(pinned_lake: Lake) -> None:
    cfg = pinned_lake.cfg
    in_use = maintenance.models_in_use(cfg.mlflow.tracking_uri, cfg.mlflow.registered_model)
    assert [(m.version, m.aliases, m.horizon) for m in in_use] == [
        ("2", ("champion",), Horizon.of(impressions=3, clicks=1)),
        ("3", ("challenger",), Horizon.of(impressions=4, clicks=1)),
    ]
    assert maintenance.models_in_use(cfg.mlflow.tracking_uri, "no-model-registered-yet") == []


@pytest.mark.integration
def test_dry_run_plans_from_the_registry_and_changes_nothing(spark: SparkSession, pinned_lake: Lake) -> None:
    lake = pinned_lake
    before = {path: files(spark, path) for path in (lake.impressions, lake.clicks, lake.quarantine, lake.users)}
    report = maintenance.run(spark, lake.cfg, dry_run=True)
    assert report.ok, [t.summary() for t in report.tables]

    impressions = report.table("bronze/impressions")
    assert impressions.plan is not None and impressions.plan.pinned == (3, 4)
    # v3 is 3 hours old; with the 10-minute margin, rounded up: 4 hours, under Delta's 7 days.
    assert (impressions.plan.retention_hours, impressions.plan.check_off) == (4, True)
    assert impressions.files_to_delete == 6  # the three files each of v0 and v1, removed 4.5 h ago
    clicks = report.table("bronze/clicks")
    assert clicks.plan is not None and (clicks.plan.pinned, clicks.plan.retention_hours) == ((1,), 3)
    users = report.table("views/user_buckets")
    assert users.plan is not None and (users.plan.pinned, users.plan.retention_hours, users.files_to_delete) == ((), 1, 2)
    assert report.table("views/item_buckets").exists is False  # absent tables are skipped, not failed

    assert {path: files(spark, path) for path in before} == before
    assert event_ids(spark, lake.impressions, 0) == [f"e{k}" for k in range(6)]


@pytest.mark.integration
@pytest.mark.slow
def test_spark_submit_keeps_pinned_horizons_and_vacuums_the_rest(
    spark: SparkSession, pinned_lake: Lake, tmp_path: Path
) -> None:
    lake = pinned_lake
    assert files(spark, lake.impressions) == 10  # v2's compacted file, then three per append
    assert files(spark, lake.clicks) == 4
    config_file = write_config(lake.cfg, tmp_path / "platform.yaml")

    assert run_submit(lake.cfg, "batch_layer/maintenance.py", ["--config", str(config_file)]) == 0

    # OPTIMIZE compacted every table to one file.
    assert [files(spark, p) for p in (lake.impressions, lake.clicks, lake.quarantine, lake.users)] == [1, 1, 1, 1]
    # The pinned versions, and those after them, still read by time travel...
    assert event_ids(spark, lake.impressions, 3) == sorted(f"e{k}" for k in range(18))
    assert event_ids(spark, lake.impressions, 4) == sorted(f"e{k}" for k in range(24))
    assert event_ids(spark, lake.impressions) == sorted(f"e{k}" for k in range(30))
    assert event_ids(spark, lake.clicks, 1) == sorted(f"k{k}" for k in range(8))
    assert event_ids(spark, lake.clicks, 0) == sorted(f"k{k}" for k in range(4))  # its files are v1's too
    # ...while the versions before them, whose files were compacted away 4.5 hours ago, are
    # gone, although a model version without an alias was trained on v0.
    for version in (0, 1):
        with pytest.raises(Exception, match=MISSING_FILE):
            event_ids(spark, lake.impressions, version)
    # An unpinned table keeps what the configured retention (here: the margin, 1 hour) covers.
    with pytest.raises(Exception, match=MISSING_FILE):
        spark.read.format("delta").option("versionAsOf", 0).load(lake.users).collect()
    assert sorted(tuple(r)[:2] for r in spark.read.format("delta").load(lake.users).collect()) == [("u0", 3), ("u1", 4)]
    operations = [r[0] for r in DeltaTable.forPath(spark, lake.impressions).history().select("operation").collect()]
    assert {"OPTIMIZE", "VACUUM START", "VACUUM END"} <= set(operations)


@pytest.mark.integration
@pytest.mark.slow
def test_unreachable_registry_leaves_pinned_tables_unvacuumed(
    running_stack: PlatformConfig, spark: SparkSession, tmp_path: Path
) -> None:
    # One pinned and one unpinned table are enough here.
    cfg = maintenance_cfg(running_stack, "ctr-maintenance-offline", tmp_path)
    keep = ("bronze/impressions", "views/user_buckets")
    cfg = cfg.model_copy(update={"maintenance": cfg.maintenance.model_copy(update={"exclude": tuple(n for n in table_names(cfg) if n not in keep)})})
    closed = free_port()  # nothing listens there
    cfg = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": f"http://127.0.0.1:{closed}"})})
    lake = build_lake(spark, cfg)
    config_file = write_config(cfg, tmp_path / "platform.yaml")

    command = submit_command(cfg, "batch_layer/maintenance.py", ["--config", str(config_file)])
    done = subprocess.run(command, env=submit_env(), capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert "bronze/impressions: 10 -> 1 files; NOT vacuumed: the MLflow registry is unreachable" in output, output[-3000:]
    assert f"127.0.0.1:{closed}" in output
    assert "maintenance incomplete for bronze/impressions\n" in output
    # OPTIMIZE ran (it deletes nothing) but no bronze file was vacuumed: v0 still reads.
    assert files(spark, lake.impressions) == 1
    assert event_ids(spark, lake.impressions, 0) == [f"e{k}" for k in range(6)]
    # Views and quarantine are never pinned, so they do not wait for the registry.
    with pytest.raises(Exception, match=MISSING_FILE):
        spark.read.format("delta").option("versionAsOf", 0).load(lake.users).collect()

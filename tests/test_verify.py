"""``lambda-ml verify``: the report (text, JSON, exit status) and its pure comparisons, then the
whole command on the real stack: it passes on a healthy lake (bring-your-own readings through
Kafka, the speed layer and a batch run), and after deliberate corruptions (a Kafka record twice
in bronze and one lost, a batch view row changed, a horizon tag removed) it fails, naming each
check, with the figures that show why.
"""

from __future__ import annotations

import doctest
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lambda_ml.config import DEFAULT_CONFIG, PlatformConfig, load_config
from lambda_ml.contract import Horizon
from lambda_ml_cli import verify
from lambda_ml_cli.cli import build_parser
from lambda_ml_cli.verify import FAIL, PASS, SKIP, CheckResult, Report


def test_the_module_examples_hold() -> None:
    result = doctest.testmod(verify)
    assert result.attempted >= 8 and result.failed == 0


def test_the_report_has_one_line_per_check_and_fails_when_one_check_fails() -> None:
    passed = CheckResult("identity", PASS, "6 keys of 1 entity compared at bronze readings v3, 0 differ", ("sensor: 6 of 6 keys, 0 differ",))
    skipped = CheckResult("point-in-time", SKIP, "no feature event in bronze to sample")
    failed = CheckResult("exactly-once", FAIL, "10 Kafka records ...: 1 offsets in bronze more than once", ("readings/0@4 is in bronze 2 times",))
    report = Report("conf/examples/readings.yaml", (passed, failed, skipped), seconds=12.4)
    lines = report.text().splitlines()
    assert lines == [
        "PASS  lambda identity: 6 keys of 1 entity compared at bronze readings v3, 0 differ",
        "        sensor: 6 of 6 keys, 0 differ",
        "FAIL  exactly-once: 10 Kafka records ...: 1 offsets in bronze more than once",
        "        readings/0@4 is in bronze 2 times",
        "SKIP  point in time: no feature event in bronze to sample",
        "verify conf/examples/readings.yaml: 3 check(s) in 12 s, failed: exactly-once",
    ]
    assert (report.passed, report.failed, report.exit_code) == (False, ["exactly-once"], 1)
    body = json.loads(json.dumps(report.as_json()))
    assert body["passed"] is False and body["failed"] == ["exactly-once"]
    assert [(c["check"], c["status"]) for c in body["checks"]] == [("identity", "pass"), ("exactly-once", "fail"), ("point-in-time", "skip")]
    # A skipped check does not fail the command.
    healthy = Report("x.yaml", (passed, skipped))
    assert (healthy.passed, healthy.exit_code) == (True, 0) and healthy.text().endswith("all passed")


def test_values_compare_exactly_for_counts_and_within_rounding_for_doubles() -> None:
    aggregations = {"n": "count", "total": "sum", "top": "max"}
    hour = 3_600_000_000
    merged = {0: (2, 0.1 + 0.2, 5.0), hour: (1, 1.0, None)}
    assert verify.cell_difference(merged, {0: (2, 0.3, 5.0), hour: (1, 1.0, None)}, aggregations) is None
    assert verify.cell_difference(merged, {0: (2, 0.3, 5.0), hour: (1, 1.0, 0.0)}, aggregations) == (
        "bucket 1970-01-01T01:00:00+00:00: top merged None, recomputed 0.0"
    )
    assert verify.cell_difference(merged, {0: (2, 0.31, 5.0), hour: (1, 1.0, None)}, aggregations).endswith("total merged 0.30000000000000004, recomputed 0.31")  # type: ignore[union-attr]
    assert verify.cell_difference({0: (2, 0.3, 5.0)}, {0: (2, 0.3, 5.0), hour: (1, 1.0, None)}, aggregations).endswith("only in the recompute")  # type: ignore[union-attr]
    assert verify.same_value("count", 3, 4) is False and verify.same_value("min", 1e12, 1e12 + 1) is False


def test_the_checkpoint_offsets_are_read_as_spark_writes_them() -> None:
    written = (
        'v1\n{"batchWatermarkMs":0,"batchTimestampMs":1764979200000,"conf":{"spark.sql.shuffle.partitions":"4"}}\n'
        '{"verify-readings":{"1":712,"0":689}}'
    )
    assert verify.consumed_offsets(written) == {("verify-readings", 1): 712, ("verify-readings", 0): 689}
    with pytest.raises(ValueError, match="offsets file"):
        verify.consumed_offsets("")


def test_the_compared_horizon_is_the_views_moved_on_by_the_increments() -> None:
    from serving_layer.views import BatchViews, BucketView, Increments

    views = BatchViews({
        "user": BucketView("user", ("user_id",), "mem", horizon=Horizon.of(impressions=4, clicks=3),
                           increments=Increments(through=Horizon.of(impressions=6, clicks=None))),
        "item": BucketView("item", ("item_id",), "mem", horizon=Horizon.of(impressions=4, clicks=3),
                           increments=Increments(through=Horizon.of(impressions=6, clicks=2))),
    })  # fmt: skip
    assert verify.horizon_groups(views) == {Horizon.of(impressions=6, clicks=3): ["user", "item"]}
    described = verify.describe_merge(views, Horizon.of(impressions=6, clicks=3), {"impressions": 8, "clicks": 3})
    assert "increments through" in described and described.endswith("bronze is now at impressions v8 (not merged by the speed layer yet)")


def test_the_command_explains_each_check_and_refuses_unknown_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_help:
        build_parser().parse_args(["verify", "--help"])
    shown = capsys.readouterr().out
    assert exit_help.value.code == 0
    assert all(f"  {check.name}: " in shown for check in verify.CHECKS) and "--json" in shown and "--sample N" in shown
    with pytest.raises(SystemExit) as exit_bad:
        build_parser().parse_args(["verify", "--check", "nothing"])
    assert exit_bad.value.code == 2 and "invalid choice: 'nothing'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--sample must be a positive number"):
        verify.run_checks(load_config(DEFAULT_CONFIG, env={}), checks=["lineage"], sample=0)


# --------------------------------------------------------------------------- on the real stack


def _corrupt(cfg: PlatformConfig) -> tuple[str, str]:
    """A Kafka record twice in bronze and one quarantined record lost, one batch view row counting
    one reading more, and the champion's horizon tag gone. Returns the corrupted sensor and the
    lost record's coordinate."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import DeltaTable, write_deltalake
    from mlflow import MlflowClient

    from lambda_ml import contract

    bronze = cfg.lake.table("bronze", "readings")
    first = DeltaTable(bronze).to_pyarrow_table().slice(0, 1)
    write_deltalake(bronze, first, mode="append")  # the same Kafka coordinates again

    quarantine = DeltaTable(cfg.lake.table("quarantine"))
    lost = quarantine.to_pyarrow_table(columns=["kafka_topic", "kafka_partition", "kafka_offset"]).to_pylist()[0]
    quarantine.delete(f"kafka_partition = {lost['kafka_partition']} AND kafka_offset = {lost['kafka_offset']}")

    path = cfg.lake.table(*contract.view_table("sensor"))
    view = DeltaTable(path).to_pyarrow_table()
    sensor = sorted(set(view.column("sensor_id").to_pylist()))[0]
    mine = pc.equal(view.column("sensor_id"), sensor)
    earliest = pc.min(pc.filter(view.column("bucket_start"), mine))
    target = pc.and_(mine, pc.equal(view.column("bucket_start"), earliest))
    changed = pc.if_else(target, pc.add(view.column("readings"), 1), view.column("readings"))
    write_deltalake(path, view.set_column(view.schema.get_field_index("readings"), "readings", changed.cast(pa.int64())), mode="overwrite")

    client = MlflowClient(cfg.mlflow.tracking_uri)
    champion = client.get_model_version_by_alias(cfg.mlflow.registered_model, "champion")
    client.delete_model_version_tag(cfg.mlflow.registered_model, champion.version, contract.horizon_tag("readings"))
    return sensor, f"{lost['kafka_topic']}/{lost['kafka_partition']}@{lost['kafka_offset']}"


@pytest.mark.integration
def test_verify_passes_on_a_healthy_lake_and_names_each_check_a_corruption_breaks(
    running_stack: PlatformConfig, spark: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from batch_layer import train
    from lambda_ml.config import write_config
    from lambda_ml_cli import cli, stack
    from speed_layer import app as speed_app
    from support import config_on_stack, isolated
    from test_bring_your_own_events import READINGS_CONFIG, SENSORS, produce, readings

    base = config_on_stack(READINGS_CONFIG, running_stack, tmp_path / "lake")
    cfg = isolated(base, "verify-readings", lake_root=tmp_path / "lake", topic_prefix="verify")
    cfg = cfg.model_copy(update={"kmeans": cfg.kmeans.model_copy(update={"k_values": (2,), "runs": 1})})  # one fit: the model is not checked here
    stack.create_topics(cfg)
    now = datetime.now(UTC).replace(microsecond=0)
    history = readings(800, now - timedelta(hours=30), now - timedelta(hours=2), seed=5)
    bad = [b'{"event_id": "x1"', json.dumps({**history[0], "event_id": "x2", "temperature": "hot"}).encode()]
    produce(cfg, [json.dumps(r).encode() for r in history] + [json.dumps(history[3]).encode()] + bad)
    speed_app.run(cfg, ["ingest", "increments"], available_now=True)
    assert train.run(spark, cfg).decision == "champion"
    fresh = readings(150, now - timedelta(hours=2), now - timedelta(minutes=1), seed=6)
    produce(cfg, [json.dumps(r).encode() for r in fresh])
    speed_app.run(cfg, ["ingest", "increments"], available_now=True)  # after the horizon: increments only

    report = verify.run_checks(cfg, spark, pit_sample=60)
    assert report.passed, report.text()
    by_check = {r.check: r for r in report.results}
    assert list(by_check) == ["identity", "exactly-once", "lineage", "point-in-time"]
    identity = by_check["identity"].figures
    assert (identity["compared"], identity["differ"]) == (len(SENSORS), 0)
    assert identity["entities"]["sensor"]["horizon"]["readings"] > identity["views_horizon"]["readings"]  # the increments counted
    sent = len(history) + 1 + len(bad) + len(fresh)
    once = by_check["exactly-once"].figures
    assert (once["held"], once["in_bronze"], once["in_quarantine"], once["missing"], once["duplicated"]) == (sent, sent - len(bad), len(bad), 0, 0)
    lineage = by_check["lineage"].figures
    assert list(lineage["aliases"]) == ["champion"] and lineage["incomplete"] == 0
    assert by_check["point-in-time"].figures == {"events": 60, "differ": 0, "horizons": [f"bronze readings v{identity['entities']['sensor']['horizon']['readings']}"]}

    sensor, lost = _corrupt(cfg)
    broken = verify.run_checks(cfg, spark, pit_sample=60)
    text = broken.text()
    assert broken.failed == ["identity", "exactly-once", "lineage", "point-in-time"], text
    assert broken.exit_code == 1
    assert f"FAIL  lambda identity: {len(SENSORS)} keys of 1 entity compared" in text and ", 1 differ" in text
    assert f"sensor {sensor}: bucket " in text and "readings merged" in text
    once = {r.check: r for r in broken.results}["exactly-once"].figures
    assert (once["missing"], once["duplicated"], once["extra_rows"]) == (1, 1, 1), text
    assert f"{lost} is neither in bronze nor in quarantine" in text and " is in bronze 2 times" in text
    assert f"champion -> version {lineage['aliases']['champion']['version']}: no horizon.readings tag" in text
    assert {r.check: r for r in broken.results}["point-in-time"].figures["differ"] > 0

    # The command itself: one check, JSON, exit status 1.
    capsys.readouterr()
    config_file = write_config(cfg, tmp_path / "readings.yaml")
    assert cli.main(["--config", str(config_file), "verify", "--check", "lineage", "--json"]) == 1
    body = json.loads(capsys.readouterr().out)
    assert body["failed"] == ["lineage"] and [c["check"] for c in body["checks"]] == ["lineage"]


@pytest.mark.integration
@pytest.mark.slow
def test_verify_passes_on_the_click_through_application_through_its_command(
    running_stack: PlatformConfig, spark: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checks are generic: on the click-through application (two event types, clicks
    attributed to impressions, three entities with ratios) the command passes with samples."""
    from batch_layer import train
    from lambda_ml import producer
    from lambda_ml.apps import load_application
    from lambda_ml.config import write_config
    from lambda_ml_cli import cli, stack
    from speed_layer import app as speed_app
    from support import isolated

    cfg = isolated(running_stack, "verify-ctr", lake_root=tmp_path / "lake", topic_prefix="verify-ctr")
    search = cfg.ctr.search.model_copy(update={"lr": cfg.ctr.search.lr.model_copy(update={"reg_param": ()})})  # one fit
    cfg = cfg.model_copy(update={
        "generator": cfg.generator.model_copy(update={"span_hours": 4, "users": 60, "items": 20}),
        "ctr": cfg.ctr.model_copy(update={"search": search}),
    })  # fmt: skip
    application = load_application(cfg)
    assert application.demo is not None
    stack.create_topics(cfg)
    application.demo.send_events(cfg, 3000)
    speed_app.run(cfg, ["ingest", "increments"], available_now=True)
    assert train.run(spark, cfg).decision == "champion"
    producer.produce(cfg, application.demo.fresh_events(cfg, datetime.now(UTC)).records, progress=False)
    speed_app.run(cfg, ["ingest", "increments"], available_now=True)

    capsys.readouterr()
    config_file = write_config(cfg, tmp_path / "ctr.yaml")
    code = cli.main(["--config", str(config_file), "verify", "--sample", "25", "--pit-sample", "40"])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = [line for line in out.splitlines() if not line.startswith(" ")]
    assert [line.split(":")[0] for line in lines[:4]] == ["PASS  lambda identity", "PASS  exactly-once", "PASS  lineage", "PASS  point in time"], out
    # 25 keys of each entity (of the 60 users, and the user x device pairs), every one of the 20 items.
    assert lines[0].startswith("PASS  lambda identity: 70 of ") and "keys of 3 entities compared" in lines[0], out
    assert "        user: 25 of 60 keys, 0 differ" in out and "        item: 20 of 20 keys, 0 differ" in out, out
    assert "40 events sampled" in lines[3] and lines[-1].endswith("all passed"), out

"""History and quarantine through the real broker, Spark and Delta: a backfill of events from
years ago lands in bronze and reaches the batch views, the speed layer treats it as late
without harm, a run that quarantines everything says so and fails, and quarantined records
land once after a config fix."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from speed_process import app_config

from batch_layer.snapshot import read_snapshot
from batch_layer import maintenance
from batch_layer.views import build_views, write_views
from lambda_ml import contract, producer
from lambda_ml_cli import cli
from lambda_ml_apps.ctr import generator
from lambda_ml.catalog import table_names
from lambda_ml.config import PlatformConfig, write_config
from lambda_ml.features import LABEL, dedup_events
from lambda_ml_apps.ctr.events import attribute_clicks, feature_events
from speed_layer import app, reprocess
from speed_layer.increments import increments_path
from lambda_ml_apps.ctr.labels import labels_path

NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
HISTORY = datetime(1998, 3, 1, 12, 0, tzinfo=UTC)
EVENT_FIELDS = {"impressions": ["event_id", "event_time", "user_id", "item_id", "device", "position"], "clicks": ["event_id", "impression_id", "event_time"]}


def _with_min_date(cfg: PlatformConfig, day: date) -> PlatformConfig:
    return cfg.model_copy(update={"speed": cfg.speed.model_copy(update={"min_event_date": day})})


def _sent(records: list[producer.Record], event_type: str) -> list[tuple[object, ...]]:
    """The events as sent, field by field, in bronze's types."""
    out = []
    for record in records:
        if record.event_type != event_type:
            continue
        payload = json.loads(record.value)
        payload["event_time"] = datetime.fromisoformat(payload["event_time"]).astimezone(UTC).replace(tzinfo=None)
        out.append(tuple(payload[f] for f in EVENT_FIELDS[event_type]))
    return sorted(out, key=repr)


def _bronze(spark: SparkSession, cfg: PlatformConfig, event_type: str) -> DataFrame:
    return spark.read.format("delta").load(cfg.lake.table("bronze", event_type))


def _rows(frame: DataFrame, columns: list[str]) -> list[tuple[object, ...]]:
    return sorted((tuple(r) for r in frame.select(*columns).collect()), key=repr)


@pytest.mark.integration
@pytest.mark.slow
def test_history_is_quarantined_loudly_then_lands_once_after_a_config_fix_and_the_speed_layer_treats_it_as_late(
    running_stack: PlatformConfig, spark: SparkSession, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = app_config(running_stack, "ctr-backfill", tmp_path, "backfill")
    window = timedelta(minutes=base.ctr.attribution_window_minutes)
    gen = base.generator.model_copy(update={"impressions": 300, "users": 20, "items": 8, "span_hours": 6, "malformed_fraction": 0.0})
    history, history_truth = generator.generate(gen.model_copy(update={"seed": 31}), window, HISTORY)

    # 1. A config that calls 1998 absurd: every record is quarantined, each micro-batch warns,
    #    and the available-now run fails instead of exiting 0.
    strict = _with_min_date(base, date(2000, 1, 1))
    producer.produce(strict, history, progress=False)
    assert cli.main(["--config", str(write_config(strict, tmp_path / "strict.yaml")), "speed", "ingest", "--available-now"]) == 3
    err = capsys.readouterr().err
    assert f"error: ingest read {len(history)} records and quarantined every one of them" in err
    warnings = [line for line in err.splitlines() if "WARN" in line and "more than speed.quarantine_warning_share 50 %" in line]
    assert warnings and "most frequent reasons: event_time before 2000-01-01: absurd timestamp" in warnings[0]
    quarantine = spark.read.format("delta").load(base.lake.table("quarantine"))
    assert Counter(r.reason for r in quarantine.select("reason").collect()) == Counter({"event_time before 2000-01-01: absurd timestamp": len(history)})
    assert _bronze(spark, base, "impressions").count() == _bronze(spark, base, "clicks").count() == 0

    # 2. The fix: history back to 1990 is welcome. Re-processing lands every record exactly as
    #    sent, with its Kafka coordinates; a second run (and a dry run) lands nothing more.
    fixed = _with_min_date(base, date(1990, 1, 1))
    assert reprocess.reprocess_quarantine(spark, fixed, dry_run=True).landed == {"impressions": history_truth.impressions, "clicks": history_truth.clicks_sent}
    assert _bronze(spark, base, "impressions").count() == 0
    report = reprocess.reprocess_quarantine(spark, fixed, reason_contains="absurd")
    assert report.considered == len(history) and report.already_in_bronze == 0 and not report.still_invalid
    assert report.landed == {"impressions": history_truth.impressions, "clicks": history_truth.clicks_sent}
    for name in ("impressions", "clicks"):
        assert _rows(_bronze(spark, base, name), EVENT_FIELDS[name]) == _sent(history, name)
    again = reprocess.reprocess_quarantine(spark, fixed)
    assert again.landed == {} and again.already_in_bronze == len(history)
    coordinates = _bronze(spark, base, "impressions").select(*reprocess.KAFKA_KEY).unionByName(_bronze(spark, base, "clicks").select(*reprocess.KAFKA_KEY))
    assert coordinates.count() == coordinates.distinct().count() == len(history)
    # The ingest, run again on the same Kafka records, adds nothing either (its checkpoint).
    app.run(fixed, ["ingest"], available_now=True)
    assert coordinates.count() == len(history)

    # 3. The stream goes on with today's events, then more history arrives (a backfill while the
    #    speed layer runs): it lands in bronze, the speed layer leaves it to the batch layer (late
    #    for its watermark), and today's labels and increments are what they are without it.
    today, today_truth = generator.generate(gen.model_copy(update={"seed": 32}), window, NOW)
    producer.produce(fixed, today, progress=False)
    app.run(fixed, ["ingest", "labels", "increments"], available_now=True)
    labels_before = _rows(spark.read.format("delta").load(labels_path(base)), ["event_id", LABEL])
    increments_before = {name: _rows(spark.read.format("delta").load(increments_path(base, name)), [*e.keys, contract.VIEW_BUCKET_COLUMN, *base.features.aggregates]) for name, e in base.features.entities.items()}
    assert len(labels_before) > 0 and all(len(rows) > 0 for rows in increments_before.values())
    late, late_truth = generator.generate(gen.model_copy(update={"seed": 33}), window, HISTORY + timedelta(days=400))
    producer.produce(fixed, late, progress=False)
    totals = app.run(fixed, ["ingest", "labels", "increments"], available_now=True)
    assert totals.read == len(late) and totals.quarantined == 0
    assert _bronze(spark, base, "impressions").count() == history_truth.impressions + today_truth.impressions + late_truth.impressions
    assert _rows(spark.read.format("delta").load(labels_path(base)), ["event_id", LABEL]) == labels_before
    for name, entity in base.features.entities.items():
        columns = [*entity.keys, contract.VIEW_BUCKET_COLUMN, *base.features.aggregates]
        assert _rows(spark.read.format("delta").load(increments_path(base, name)), columns) == increments_before[name]

    # 4. The batch layer counts every event of bronze, history included: the user view of a
    #    new horizon holds the 1998 and 1999 buckets with every impression sent in those years.
    snapshot = read_snapshot(spark, base)
    impressions, clicks = dedup_events(snapshot["impressions"]), dedup_events(snapshot["clicks"])
    events = feature_events(impressions, attribute_clicks(impressions, clicks, base.ctr.attribution_window_minutes), base.features)
    view = build_views(events, base.features, snapshot.horizon)["user"]
    per_year: Counter[int] = Counter()
    for row in view.select(F.year(contract.VIEW_BUCKET_COLUMN).alias("year"), "impressions").collect():
        per_year[row.year] += row.impressions
    sent_per_year = Counter(t[1].year for t in _sent(history + today + late, "impressions"))  # type: ignore[attr-defined]
    assert per_year == sent_per_year and set(sent_per_year) == {1998, 1999, NOW.year}

    # 5. Every table the layers wrote is in the lake catalog, so Delta maintenance sees it.
    write_views(build_views(events, base.features, snapshot.horizon), base)
    root = Path(base.lake.root.removeprefix("file:"))
    written = {str(log.parent.relative_to(root)) for log in root.rglob("_delta_log")}
    assert written == set(table_names(base)) - {"speed/online_model"}
    report = maintenance.run(spark, base, dry_run=True)
    assert report.ok and {t.table for t in report.tables if t.exists} == written

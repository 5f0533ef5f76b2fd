"""The batch training job: its pure steps on hand-built frames, then the whole job on small
bronze Delta tables against the real MLflow server.

The integration data come from a seeded generator below with a known click model
(position, device, user and item effects), so a holdout AUC above 0.6 means the model learned
something real. Expected views are counted with pandas, independently of the Spark code.
(The views' own tests, monoid identity included, are in test_batch_views.py; the window
features' in test_features.py.)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import mlflow
import mlflow.onnx
import mlflow.pyfunc
import mlflow.spark
import numpy as np
import pandas as pd
import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from batch_layer import registry, train
from lambda_ml_apps.ctr import batch as ctr_batch
from lambda_ml_apps.ctr.onnx_export import ParityError, check_parity, onnx_click_probabilities, onnx_inputs
from batch_layer.registry import CHAMPION_ALIAS
from batch_layer.snapshot import SnapshotError, read_snapshot
from lambda_ml.apps import Snapshot
from lambda_ml_apps.ctr import evaluation as ctr_evaluation
from lambda_ml import contract
from lambda_ml.metrics import split_by_time
from lambda_ml_apps.ctr import events as ctr_events
from lambda_ml.config import FeaturesConfig, LrGridConfig, PlatformConfig, SearchConfig, write_config
from lambda_ml.contract import Horizon
from lambda_ml_apps.ctr.generator import DEVICES
from support import CLICK, IMPRESSION
from support import isolated

Row = tuple[Any, ...]  # one event's values, in schema order

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW = timedelta(minutes=30)
FITTED = 1000  # ctr.max_training_rows of the job


# --------------------------------------------------------------------------- bronze rows


def kafka_columns(topic: str, offset: int, event_time: datetime) -> Row:
    return (topic, 0, offset, event_time, T0 + timedelta(days=30))


def bronze_impressions(spark: SparkSession, rows: list[Row], first_offset: int = 0) -> DataFrame:
    """(event_id, event_time, user_id, item_id, device, position) rows as bronze impressions."""
    data = [(*row, *kafka_columns("impressions", first_offset + k, row[1])) for k, row in enumerate(rows)]
    return spark.createDataFrame(data, IMPRESSION.bronze_schema())


def bronze_clicks(spark: SparkSession, rows: list[Row], first_offset: int = 0) -> DataFrame:
    """(event_id, impression_id, event_time) rows as bronze clicks."""
    data = [(*row, *kafka_columns("clicks", first_offset + k, row[2])) for k, row in enumerate(rows)]
    return spark.createDataFrame(data, CLICK.bronze_schema())


def append(frame: DataFrame, path: str) -> None:
    frame.write.format("delta").mode("append").save(path)


# --------------------------------------------------------------------------- pure steps


# One 1 h window over users and items, with a CTR whose prior is 1 click in 21 impressions.
SMALL_FEATURES = FeaturesConfig.model_validate(
    {
        "event_type": "impressions",
        "bucket": "1h",
        "windows": ["1h"],
        "entities": {"user": {"keys": ["user_id"]}, "item": {"keys": ["item_id"]}},
        "aggregates": {
            "impressions": {"events": "impressions", "aggregation": "count"},
            "clicks": {"events": "clicks", "aggregation": "count"},
        },
        "ratios": {"ctr": {"numerator": "clicks", "denominator": "impressions", "prior_alpha": 1, "prior_beta": 20}},
        "context": {"numeric": ["position"], "categorical": ["device"]},
    }
)


def test_training_set_dedups_labels_and_counts_before(spark: SparkSession, cfg: PlatformConfig) -> None:
    def m(minutes: int) -> datetime:
        return T0 + timedelta(minutes=minutes)

    impressions = bronze_impressions(
        spark,
        [
            ("a", m(0), "u1", "i1", "mobile", 1),
            ("a", m(0), "u1", "i1", "mobile", 1),  # redelivered by Kafka
            ("b", m(10), "u1", "i2", "desktop", 3),
            ("c", m(20), "u2", "i1", "tablet", 2),
            ("d", m(100), "u1", "i1", "mobile", 1),  # 100 + 30 > 110: window open, no label
        ],
    )
    clicks = bronze_clicks(
        spark,
        [
            ("k1", "a", m(29)),  # late but inside the window
            ("k1", "a", m(29)),  # sent twice
            ("k2", "b", m(41)),  # 31 minutes after b: outside
            ("k3", "zz", m(15)),  # no impression
            ("k4", "c", m(110)),  # long after c; also the latest event time
        ],
    )
    snapshot = Snapshot({"impressions": impressions, "clicks": clicks}, Horizon.of(impressions=0, clicks=0))
    imps, clks = ctr_events.clean_events(snapshot, cfg)
    as_of = T0 + timedelta(minutes=110)
    training = ctr_batch.build_training_set(imps, clks, cfg.model_copy(update={"features": SMALL_FEATURES}), as_of)
    inputs = contract.model_inputs(SMALL_FEATURES).names
    assert inputs == (
        "user_impressions_1h", "user_clicks_1h", "user_ctr_1h", "item_impressions_1h", "item_clicks_1h", "item_ctr_1h",
        "position", "device",
    )  # fmt: skip
    assert training.columns == ["event_id", "event_time", "user_id", "item_id", *inputs, "label"]
    got = sorted((r.event_id, *(r[name] for name in inputs), r.label) for r in training.collect())
    new = (0.0, 0.0, 1 / 21)  # nothing before: the prior CTR
    assert got == [
        ("a", *new, *new, 1.0, "mobile", 1.0),
        ("b", 1.0, 0.0, 1 / 22, *new, 3.0, "desktop", 0.0),  # u1 saw a; a's click at 29 is after b (10)
        ("c", *new, 1.0, 0.0, 1 / 22, 2.0, "tablet", 0.0),  # i1 saw a; k1 at 29 is after c (20)
    ]  # d (100) has no label yet, but counts for nothing here: it is after every labelled row


def test_split_by_time_holds_out_the_most_recent_rows(spark: SparkSession) -> None:
    times = [T0 + timedelta(minutes=7 * k) for k in range(10)]
    frame = spark.createDataFrame([(f"e{k}", t) for k, t in enumerate(times)], "event_id string, event_time timestamp")
    train_part, holdout, cutoff = split_by_time(frame, 0.2)
    assert sorted(r.event_id for r in holdout.collect()) == ["e8", "e9"]
    assert sorted(r.event_id for r in train_part.collect()) == [f"e{k}" for k in range(8)]
    assert cutoff == times[7]
    with pytest.raises(ValueError, match="holdout fraction"):
        split_by_time(frame, 1.0)


def test_check_trainable_refuses_a_single_class_and_constant_features(spark: SparkSession) -> None:
    columns = ["user_impressions_1h", "user_clicks_1h", "item_impressions_1h", "item_clicks_1h", "position", "label"]

    def frame(rows: list[Row]) -> DataFrame:
        return spark.createDataFrame(rows, columns)

    good = frame([(1.0, 0.0, 2.0, 1.0, 1.0, 0.0), (2.0, 1.0, 3.0, 0.0, 2.0, 1.0)])
    assert ctr_batch.check_trainable(good, good) == {"train": 2, "train_positives": 1, "holdout": 2, "holdout_positives": 1}
    no_clicks = frame([(1.0, 0.0, 2.0, 1.0, 1.0, 0.0), (2.0, 1.0, 3.0, 0.0, 2.0, 0.0)])
    with pytest.raises(ctr_batch.TrainingError, match="holdout set has 2 rows of which 0 clicked"):
        ctr_batch.check_trainable(good, no_clicks)
    constant_position = frame([(1.0, 0.0, 2.0, 1.0, 1.0, 0.0), (2.0, 1.0, 3.0, 0.0, 1.0, 1.0)])
    with pytest.raises(ctr_batch.TrainingError, match=r"\['position'\] are constant"):
        ctr_batch.check_trainable(constant_position, good)


def test_parity_check_fails_beyond_the_tolerance() -> None:
    spark_p = np.array([0.1, 0.2, 0.3])
    assert check_parity(spark_p, spark_p + 1e-7, atol=1e-5) == pytest.approx(1e-7)
    with pytest.raises(ParityError, match="differ by up to 0.001"):
        check_parity(spark_p, spark_p + np.array([0.0, 1e-3, 0.0]), atol=1e-5)
    with pytest.raises(ParityError, match="empty holdout"):
        check_parity(np.array([]), np.array([]), atol=1e-5)


def test_command_line_rejects_bad_versions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--version", "impressions=-1"])
    assert exit_info.value.code == 2
    assert "a Delta version is 0 or more" in capsys.readouterr().err
    args = train.parse_args(["--version", "impressions=3", "--version", "clicks=0"])
    assert (args.versions, args.config) == ({"impressions": 3, "clicks": 0}, None)
    with pytest.raises(SystemExit):
        train.parse_args(["--version", "impressions"])
    assert "a pinned version is EVENT=N" in capsys.readouterr().err


# --------------------------------------------------------------------------- generated bronze


@dataclass(frozen=True)
class Generated:
    """Bronze rows in commits, and the pandas frames of the events they hold."""

    impression_commits: list[list[Row]]
    click_commits: list[list[Row]]

    def events(self, impression_commits: int, click_commits: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        imps = [row for commit in self.impression_commits[:impression_commits] for row in commit]
        clks = [row for commit in self.click_commits[:click_commits] for row in commit]
        return (
            pd.DataFrame(imps, columns=IMPRESSION.field_names),
            pd.DataFrame(clks, columns=CLICK.field_names),
        )


def generate(seed: int = 11, impressions: int = 3000, users: int = 60, items: int = 30) -> Generated:
    """Impressions over 48 h, clicked with P = sigmoid(bias + user + item + device + position).

    Most clicks come within minutes, some after the attribution window; some are sent twice,
    some point at no impression, some impressions are redelivered. Two commits of each, then a
    third commit of impressions and clicks the pinned horizon must not see.
    """
    rng = np.random.default_rng(seed)
    user_effect, item_effect = rng.normal(0, 1.0, users), rng.normal(0, 0.7, items)
    device_effect = {"mobile": 0.4, "desktop": 0.0, "tablet": -0.4}
    starts = np.sort(rng.uniform(0, 48 * 3600, impressions + 300))
    imps, clks = [], []
    for k, seconds in enumerate(starts):
        t = T0 + timedelta(seconds=float(seconds))
        user, item, position = int(rng.integers(users)), int(rng.integers(items)), int(rng.integers(1, 6))
        device = str(rng.choice(DEVICES))
        logit = -1.4 + user_effect[user] + item_effect[item] + device_effect[device] - 0.6 * (position - 1)
        imps.append((f"imp-{k}", t, f"u{user}", f"item{item}", device, position))
        if rng.random() < 1 / (1 + math.exp(-logit)):
            late = rng.random() < 0.1
            delay = rng.uniform(31, 120) if late else rng.exponential(6)
            click = (f"clk-{k}", f"imp-{k}", t + timedelta(minutes=float(delay)))
            clks.extend([click] * (2 if rng.random() < 0.05 else 1))
    past, future = imps[:impressions], imps[impressions:]
    past += [past[k] for k in rng.choice(impressions, 30, replace=False)]  # redelivered impressions
    clks += [(f"ghost-{k}", f"missing-{k}", T0 + timedelta(hours=float(rng.uniform(0, 48)))) for k in range(20)]
    in_future = {row[0] for row in future}
    past_clicks = [row for row in clks if row[1] not in in_future]
    future_clicks = [row for row in clks if row[1] in in_future]
    cut = len(past) * 3 // 5
    half = len(past_clicks) // 2
    return Generated([past[:cut], past[cut:], future], [past_clicks[:half], past_clicks[half:], future_clicks])


def expected_buckets(imps: pd.DataFrame, clks: pd.DataFrame, keys: list[str]) -> list[tuple[Any, ...]]:
    """Per (entity keys, hour) impressions, attributed clicks (in their own hour) and top
    position (the shipped declarations), counted with pandas; the hour as epoch microseconds."""
    imps = imps.drop_duplicates("event_id")
    clks = clks.drop_duplicates("event_id")
    joined = clks.merge(imps, left_on="impression_id", right_on="event_id", suffixes=("_click", ""))
    delay = joined.event_time_click - joined.event_time
    inside = joined[(delay >= timedelta(0)) & (delay <= WINDOW)]

    def hour_micros(times: pd.Series) -> pd.Series:
        return (pd.to_datetime(times, utc=True).dt.floor("h") - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1)

    shown = imps.assign(hour=hour_micros(imps.event_time)).groupby([*keys, "hour"])
    shown = shown.agg(impressions=("event_id", "size"), top_position=("position", "min"))
    clicked = inside.assign(hour=hour_micros(inside.event_time_click)).groupby([*keys, "hour"]).size().rename("clicks")
    both = shown.join(clicked, how="outer")
    return sorted(
        (*index, int(0 if pd.isna(r.impressions) else r.impressions), int(0 if pd.isna(r.clicks) else r.clicks),
         None if pd.isna(r.top_position) else float(r.top_position))
        for index, r in zip(both.index, both.itertuples())
    )  # fmt: skip


@pytest.fixture(scope="module")
def generated() -> Generated:
    return generate()


@pytest.fixture(scope="module")
def job_cfg(
    running_stack: PlatformConfig, spark: SparkSession, generated: Generated, tmp_path_factory: pytest.TempPathFactory
) -> PlatformConfig:
    """Bronze Delta tables with three commits each (versions 0, 1, 2) in an isolated lake. The
    model is fitted on a sample of about 1000 of the (about 2400) training rows."""
    job = isolated(
        running_stack, "ctr-batch-test", lake_root=tmp_path_factory.mktemp("batch") / "lake", max_training_rows=FITTED
    )
    offset = 0
    for commit in generated.impression_commits:
        append(bronze_impressions(spark, commit, offset), job.lake.table("bronze", "impressions"))
        offset += len(commit)
    offset = 0
    for commit in generated.click_commits:
        append(bronze_clicks(spark, commit, offset), job.lake.table("bronze", "clicks"))
        offset += len(commit)
    return job


@pytest.mark.integration
def test_read_snapshot_pins_delta_versions(spark: SparkSession, job_cfg: PlatformConfig, generated: Generated) -> None:
    latest = read_snapshot(spark, job_cfg)
    assert latest.horizon == Horizon.of(impressions=2, clicks=2)
    assert latest["impressions"].count() == sum(len(c) for c in generated.impression_commits)
    pinned = read_snapshot(spark, job_cfg, {"impressions": 0, "clicks": 1})
    assert pinned.horizon == Horizon.of(impressions=0, clicks=1)
    assert pinned["impressions"].count() == len(generated.impression_commits[0])
    assert pinned["clicks"].count() == len(generated.click_commits[0]) + len(generated.click_commits[1])
    with pytest.raises(SnapshotError, match="versions 0..2; version 7 was requested"):
        read_snapshot(spark, job_cfg, {"impressions": 7})
    empty_lake = isolated(job_cfg, "unused", lake_root=Path(job_cfg.lake.root).parent / "nothing-here")
    with pytest.raises(SnapshotError, match="no Delta table at .*bronze/impressions"):
        read_snapshot(spark, empty_lake)


# When the job of the ``trained`` fixture was called and when it returned (epoch milliseconds).
JOB_WINDOW: dict[str, int] = {}


@pytest.fixture(scope="module")
def trained(job_cfg: PlatformConfig, tmp_path_factory: pytest.TempPathFactory) -> train.TrainResult:
    """The job run once through its command line, pinned at impressions v1 and clicks v1."""
    config_file = tmp_path_factory.mktemp("conf") / "platform.yaml"
    write_config(job_cfg, config_file)  # keeps the order of the feature declarations, hence of the model inputs
    JOB_WINDOW["called"] = int(time.time() * 1000)
    result = train.main(["--config", str(config_file), "--version", "impressions=1", "--version", "clicks=1"])
    JOB_WINDOW["returned"] = int(time.time() * 1000)
    return result


def run_params(client: mlflow.MlflowClient, run_id: str) -> dict[str, str]:
    return dict(client.get_run(run_id).data.params)


@pytest.mark.integration
def test_job_registers_spark_and_onnx_versions_with_the_horizon(
    job_cfg: PlatformConfig, trained: train.TrainResult
) -> None:
    name = job_cfg.mlflow.registered_model
    client = mlflow.MlflowClient(job_cfg.mlflow.tracking_uri)
    assert trained.horizon == Horizon.of(impressions=1, clicks=1)

    versions = {v.version: v for v in client.search_model_versions(f"name='{name}'")}
    assert sorted(versions) == sorted([trained.versions.others["spark"], trained.versions.served])
    spark_v, onnx_v = versions[trained.versions.others["spark"]], versions[trained.versions.served]
    common = {
        "horizon.impressions": "1",
        "horizon.clicks": "1",
        "model_inputs": contract.model_inputs(job_cfg.features).tag(),
        "config_sha256": registry.training_config_hash(job_cfg),
        "feature_definitions_sha256": run_params(client, trained.run_id)["feature_definitions_sha256"],
        # The first version of a registered model passes the gate: there is no champion to beat.
        "gate.decision": "champion",
        "gate.metric": "auc",
        "gate.higher_is_better": "true",
        "gate.auc": repr(trained.quality.value),
        "gate.reason": "there was no champion",
    }
    # The ONNX version is served; its Spark twin points at it.
    assert spark_v.tags == {**common, "flavor": "spark", "served_version": trained.versions.served}
    assert onnx_v.tags == {**common, "flavor": "onnx", "spark_model_version": trained.versions.others["spark"], "served": "true"}
    assert client.get_model_version_by_alias(name, CHAMPION_ALIAS).version == trained.versions.served
    assert spark_v.run_id == onnx_v.run_id == trained.run_id

    run = client.get_run(trained.run_id)
    assert run.info.status == "FINISHED"
    assert {k: run.data.tags[k] for k in ("horizon.impressions", "horizon.clicks", "parity")} == {
        "horizon.impressions": "1",
        "horizon.clicks": "1",
        "parity": "passed",
    }
    assert run.data.metrics["auc"] == pytest.approx(trained.quality.value)
    assert run.data.metrics["auc"] > 0.6
    assert 0 < run.data.metrics["log_loss"] < math.log(2)
    assert run.data.metrics["parity_max_abs_diff"] <= job_cfg.ctr.parity_atol
    assert run.data.metrics["rows_train"] + run.data.metrics["rows_holdout"] == run.data.metrics["rows_labelled"]


@pytest.mark.integration
def test_the_mlflow_run_covers_the_whole_job_and_times_each_step(job_cfg: PlatformConfig, trained: train.TrainResult) -> None:
    run = mlflow.MlflowClient(job_cfg.mlflow.tracking_uri).get_run(trained.run_id)
    called, returned = JOB_WINDOW["called"], JOB_WINDOW["returned"]
    # The run starts when the job starts (before the snapshot is read), not when it is logged.
    assert called <= run.info.start_time <= called + 1000
    assert run.info.end_time is not None and run.info.end_time <= returned
    steps = {k.removeprefix("step_seconds."): v for k, v in run.data.metrics.items() if k.startswith("step_seconds.")}
    assert {"snapshot", "views", "training", "artifacts", "gate", "registration"} <= set(steps)
    assert all(seconds >= 0 for seconds in steps.values()) and steps["training"] > 0
    # The steps follow each other: together they are the run's duration, give or take the run's end.
    duration_s = (run.info.end_time - run.info.start_time) / 1000
    assert sum(steps.values()) == pytest.approx(duration_s, abs=1.0)


@pytest.mark.integration
def test_job_counts_exactly_the_pinned_snapshot(
    spark: SparkSession, job_cfg: PlatformConfig, generated: Generated, trained: train.TrainResult
) -> None:
    imps, clks = generated.events(impression_commits=2, click_commits=2)
    distinct = imps.drop_duplicates("event_id")
    assert trained.rows["impressions"] == len(distinct)
    assert trained.rows["clicks"] == clks.event_id.nunique()
    as_of = max(distinct.event_time.max(), clks.event_time.max())
    assert trained.rows["labelled"] == int((distinct.event_time + WINDOW <= as_of).sum())
    assert trained.rows["holdout"] == pytest.approx(0.2 * trained.rows["labelled"], abs=2)
    # Fitted on a uniform sample of the training rows; every holdout row is evaluated.
    assert trained.rows["train"] > 2 * FITTED
    assert trained.rows["train_fitted"] == pytest.approx(FITTED, abs=150)  # binomial: standard deviation about 24

    aggregates = ["impressions", "clicks", "top_position"]
    assert list(job_cfg.features.aggregates) == aggregates
    for entity, declared in job_cfg.features.entities.items():
        keys = list(declared.keys)
        table = spark.read.format("delta").load(job_cfg.lake.table(*contract.view_table(entity)))
        assert table.columns == [*keys, "bucket_start", *aggregates, "horizon_clicks", "horizon_impressions"]
        counts = sorted(tuple(r) for r in table.select(*keys, F.unix_micros("bucket_start"), *aggregates).collect())
        expected = expected_buckets(imps, clks, keys)
        assert counts == expected and len(expected) > 50, entity
        horizons = {tuple(r) for r in table.select("horizon_impressions", "horizon_clicks").distinct().collect()}
        assert horizons == {(1, 1)}


@pytest.mark.integration
def test_registered_onnx_scores_equal_registered_spark(
    spark: SparkSession, job_cfg: PlatformConfig, trained: train.TrainResult
) -> None:
    name = job_cfg.mlflow.registered_model
    rng = np.random.default_rng(3)
    inputs = contract.model_inputs(job_cfg.features)
    # Plausible values: counts, CTRs in [0, 1), positions 1 to 5, minimum positions 0 to 5.
    rows = pd.DataFrame(
        {
            column: rng.uniform(0, 0.3, 50) if "_ctr_" in column else rng.integers(0, 6 if "position" in column else 60, 50).astype(float)
            for column in inputs.numeric
        }
    )
    rows["position"] = rng.integers(1, 6, 50).astype(float)
    rows["device"] = [*rng.choice(DEVICES, 49), "smart-tv"]  # one device never seen in training
    spark_model = mlflow.spark.load_model(f"models:/{name}/{trained.versions.others['spark']}")
    scored = ctr_evaluation.score(spark_model, spark.createDataFrame(rows)).select(ctr_evaluation.CLICK_PROBABILITY)
    spark_p = np.array([r[0] for r in scored.collect()])
    onnx_model = mlflow.onnx.load_model(f"models:/{name}@{CHAMPION_ALIAS}")
    onnx_p = onnx_click_probabilities(onnx_model, onnx_inputs(rows, inputs))
    np.testing.assert_allclose(onnx_p, spark_p, rtol=0, atol=job_cfg.ctr.parity_atol)
    assert spark_p.std() > 0.01  # the rows really get different scores

    # Through MLflow's ONNX pyfunc too, which takes a dict of [n, 1] arrays.
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION_ALIAS}")
    predicted = pyfunc.predict(onnx_inputs(rows, inputs))
    pyfunc_p = predicted[contract.ONNX_PROBABILITY_OUTPUT][:, 1]
    np.testing.assert_allclose(pyfunc_p, spark_p, rtol=0, atol=job_cfg.ctr.parity_atol)


@pytest.mark.integration
def test_failed_parity_registers_nothing(spark: SparkSession, job_cfg: PlatformConfig) -> None:
    # Same bronze, its own model; one candidate (no search): only the parity check matters here.
    one_candidate = SearchConfig(lr=LrGridConfig(reg_param=(), elastic_net_param=()))
    strict = isolated(job_cfg, "ctr-parity-test", parity_atol=1e-15, search=one_candidate)  # type: ignore[arg-type]
    with pytest.raises(ParityError, match="differ by up to"):
        train.run(spark, strict, {"impressions": 1, "clicks": 1})
    client = mlflow.MlflowClient(strict.mlflow.tracking_uri)
    assert client.search_model_versions(f"name='{strict.mlflow.registered_model}'") == []
    experiment = client.get_experiment_by_name(strict.mlflow.experiment)
    assert experiment is not None
    (failed,) = client.search_runs([experiment.experiment_id])
    assert (failed.info.status, failed.data.tags["parity"]) == ("FAILED", "failed")

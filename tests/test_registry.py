"""The registry side of the batch layer against the real MLflow server: the quality gate,
idempotent re-runs, rollback, and backfills pinned with ``--as-of``.

One small seeded bronze lake (two commits per table) and three real training runs on the same
horizon, hence on the same holdout rows:

- A: a logistic regression with an L1 penalty so strong every weight is 0 (a constant model,
  AUC 1/2) -> champion, as there is none;
- B: gradient-boosted trees with a 2-point search -> beats A -> champion, A previous-champion;
- C: another constant model -> does not beat B -> challenger, the champion stays B.

Scores are checked against scikit-learn on the champion's ONNX export, not against the code
that computed them.
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
import numpy as np
import pytest
from mlflow import MlflowClient
from pyspark.sql import DataFrame, SparkSession
from sklearn.metrics import roc_auc_score

from batch_layer import registry, train
from lambda_ml_apps.ctr import batch as ctr_batch
from lambda_ml.metrics import split_by_time
from lambda_ml_apps.ctr.onnx_export import onnx_click_probabilities, onnx_inputs
from batch_layer.snapshot import SnapshotError, read_snapshot, version_as_of
from lambda_ml import contract
from lambda_ml_cli import cli
from lambda_ml_apps.ctr import events as ctr_events
from lambda_ml.config import GbtGridConfig, LrGridConfig, PlatformConfig, SearchConfig, write_config
from lambda_ml.apps import load_application
from lambda_ml.features import latest_event_time
from lambda_ml_apps.ctr.generator import DEVICES
from support import CLICK, IMPRESSION
from support import isolated

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MODEL = "ctr-gate-test"


# --------------------------------------------------------------------------- pure parts


def test_config_hash_ignores_where_things_run_but_not_what_is_trained(cfg: PlatformConfig) -> None:
    elsewhere = cfg.model_copy(
        update={
            "mlflow": cfg.mlflow.model_copy(update={"port": 1, "tracking_uri": "http://x:1", "registered_model": "y"}),
            "lake": cfg.lake.model_copy(update={"root": "/somewhere/else"}),
        }
    )
    assert registry.training_config_hash(elsewhere) == registry.training_config_hash(cfg)
    other_model = cfg.model_copy(update={"ctr": cfg.ctr.model_copy(update={"reg_param": cfg.ctr.reg_param * 2})})
    other_features = cfg.model_copy(update={"features": cfg.features.model_copy(update={"windows": ("1h",)})})
    hashes = {registry.training_config_hash(c) for c in (cfg, other_model, other_features)}
    assert len(hashes) == 3 and all(len(h) == 64 for h in hashes)


def test_gate_decisions_and_their_tags() -> None:
    from lambda_ml.apps import Quality

    def auc(value: float, margin: float = 0.0) -> Quality:
        return Quality("auc", value, higher_is_better=True, margin=margin)

    first = registry.decide(auc(0.61), None)
    assert (first.decision, first.tags()) == (
        "champion",
        {"gate.decision": "champion", "gate.metric": "auc", "gate.higher_is_better": "true", "gate.auc": "0.61",
         "gate.reason": "there was no champion"},
    )  # fmt: skip
    worse = registry.decide(auc(0.61), registry.ChampionScore("7", 0.64))
    assert worse.decision == "challenger" and not worse.promoted
    assert {k: worse.tags()[k] for k in ("gate.champion_version", "gate.champion_auc")} == {
        "gate.champion_version": "7",
        "gate.champion_auc": "0.64",
    }
    assert registry.decide(auc(0.64), registry.ChampionScore("7", 0.64)).decision == "challenger"  # a tie does not move it
    assert registry.decide(auc(0.65), registry.ChampionScore("7", 0.64)).decision == "champion"
    assert registry.decide(auc(0.65, margin=0.02), registry.ChampionScore("7", 0.64)).decision == "challenger"
    # A quality where lower is better (k-means inertia): 9 beats 10, 11 does not.
    inertia = lambda value: Quality("inertia", value, higher_is_better=False)  # noqa: E731
    assert [registry.decide(inertia(v), registry.ChampionScore("7", 10.0)).decision for v in (9.0, 11.0)] == ["champion", "challenger"]
    assert registry.recorded_quality(worse.tags()) == auc(0.61)
    stale = registry.decide(auc(0.55), registry.ChampionScore("7", None, "it reads inputs the holdout lacks: ['x_1h']"))
    assert stale.decision == "champion" and "x_1h" in stale.reason and "gate.champion_auc" not in stale.tags()


def test_as_of_must_be_iso_and_alone(capsys: pytest.CaptureFixture[str]) -> None:
    assert train.parse_args(["--as-of", "2026-01-01T12:00:00Z"]).as_of == datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert train.parse_args(["--as-of", "2026-01-01T13:00:00+01:00"]).as_of == datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert train.parse_args(["--as-of", "2026-01-01 12:00"]).as_of == datetime(2026, 1, 1, 12, tzinfo=UTC)  # naive: UTC
    for argv, message in (
        (["--as-of", "yesterday"], "an as-of time is ISO 8601"),
        (["--as-of", "2026-01-01T12:00:00Z", "--version", "clicks=2"], "--as-of pins every bronze table"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- a small lake


def bronze_rows(seed: int = 5, impressions: int = 1500, users: int = 40, items: int = 20) -> tuple[list[Any], list[Any]]:
    """Impressions over 48 h clicked with P = sigmoid(bias + user + item + device + position),
    most clicks within minutes; rows in bronze column order."""
    rng = np.random.default_rng(seed)
    user_effect, item_effect = rng.normal(0, 1.0, users), rng.normal(0, 0.7, items)
    device_effect = {"mobile": 0.4, "desktop": 0.0, "tablet": -0.4}
    kafka_time = T0 + timedelta(days=30)
    imps, clks = [], []
    for k, seconds in enumerate(np.sort(rng.uniform(0, 48 * 3600, impressions))):
        t = T0 + timedelta(seconds=float(seconds))
        user, item, position = int(rng.integers(users)), int(rng.integers(items)), int(rng.integers(1, 6))
        device = str(rng.choice(DEVICES))
        imps.append((f"imp-{k}", t, f"u{user}", f"item{item}", device, position, "impressions", 0, k, t, kafka_time))
        logit = -1.2 + user_effect[user] + item_effect[item] + device_effect[device] - 0.6 * (position - 1)
        if rng.random() < 1 / (1 + math.exp(-logit)):
            clicked = t + timedelta(minutes=float(rng.exponential(5)))
            clks.append((f"clk-{k}", f"imp-{k}", clicked, "clicks", 0, len(clks), clicked, kafka_time))
    return imps, clks


@dataclass(frozen=True)
class Lake:
    cfg: PlatformConfig
    between: datetime  # an instant after both tables' version 0 and before their version 1
    counts: dict[str, tuple[int, int]]  # rows at versions 0 and 1 per table


@pytest.fixture(scope="module")
def lake(running_stack: PlatformConfig, spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> Lake:
    """Bronze impressions and clicks in two commits each (versions 0 and 1), a pause between."""
    cfg = isolated(running_stack, MODEL, lake_root=tmp_path_factory.mktemp("gate") / "lake")
    imps, clks = bronze_rows()

    def write(rows: list[Any], event: Any) -> None:
        frame: DataFrame = spark.createDataFrame(rows, event.bronze_schema())
        frame.write.format("delta").mode("append").save(cfg.lake.table("bronze", event.name))

    imp_cut, clk_cut = len(imps) * 2 // 3, len(clks) * 2 // 3
    write(imps[:imp_cut], IMPRESSION)
    write(clks[:clk_cut], CLICK)
    time.sleep(1.2)  # Delta commit times have millisecond resolution
    between = datetime.now(UTC)
    time.sleep(1.2)
    write(imps[imp_cut:], IMPRESSION)
    write(clks[clk_cut:], CLICK)
    return Lake(cfg, between, {"impressions": (imp_cut, len(imps)), "clicks": (clk_cut, len(clks))})


def test_as_of_resolves_the_version_delta_time_travel_reads(spark: SparkSession, lake: Lake) -> None:
    for name, (at_v0, at_v1) in lake.counts.items():
        path = lake.cfg.lake.table("bronze", name)
        assert version_as_of(spark, path, lake.between) == 0
        assert version_as_of(spark, path, datetime.now(UTC)) == 1
        assert version_as_of(spark, path, lake.between.replace(tzinfo=None)) == 0  # naive is UTC
        # Delta's own timestampAsOf reads the same snapshot.
        by_time = spark.read.format("delta").option("timestampAsOf", lake.between.isoformat()).load(path)
        assert by_time.count() == at_v0
        with pytest.raises(SnapshotError, match="no version committed at or before 2025-"):
            version_as_of(spark, path, T0 - timedelta(days=1))
        with pytest.raises(SnapshotError, match="is in the future"):
            version_as_of(spark, path, datetime.now(UTC) + timedelta(hours=1))
    pinned = read_snapshot(spark, lake.cfg, as_of=lake.between)
    assert pinned.horizon == contract.Horizon.of(impressions=0, clicks=0)
    assert (pinned["impressions"].count(), pinned["clicks"].count()) == (lake.counts["impressions"][0], lake.counts["clicks"][0])
    with pytest.raises(ValueError, match="either by versions or by an as-of time"):
        read_snapshot(spark, lake.cfg, {"impressions": 1}, as_of=lake.between)


# --------------------------------------------------------------------------- three runs, one holdout


def variant(cfg: PlatformConfig, **ctr: Any) -> PlatformConfig:
    """``cfg`` with ctr settings replaced and no search unless one is given."""
    no_search = SearchConfig(lr=LrGridConfig(reg_param=(), elastic_net_param=()), gbt=GbtGridConfig(max_depth=(), max_iter=()))
    updates = {"search": no_search, **ctr}
    return cfg.model_copy(update={"ctr": cfg.ctr.model_copy(update=updates)})


def constant_model(cfg: PlatformConfig, reg_param: float) -> PlatformConfig:
    return variant(cfg, model="lr", reg_param=reg_param, elastic_net_param=1.0)


def small_trees(cfg: PlatformConfig) -> PlatformConfig:
    gbt = cfg.ctr.gbt.model_copy(update={"max_iter": 10, "max_depth": 3})
    search = SearchConfig(validation_fraction=0.25, gbt=GbtGridConfig(max_depth=(2, 3), max_iter=()))
    return variant(cfg, model="gbt", gbt=gbt, search=search)


@dataclass(frozen=True)
class GateRuns:
    a: train.TrainResult
    b: train.TrainResult
    c: train.TrainResult
    aliases: list[dict[str, str]]  # after A, B and C
    cfg_a: PlatformConfig
    cfg_b: PlatformConfig
    features_sha256: str  # of the feature definitions the runs saw


@pytest.fixture(scope="module")
def gate_runs(spark: SparkSession, lake: Lake) -> GateRuns:
    client = MlflowClient(lake.cfg.mlflow.tracking_uri)
    results, aliases = [], []
    cfg_a, cfg_b, cfg_c = constant_model(lake.cfg, 50.0), small_trees(lake.cfg), constant_model(lake.cfg, 20.0)
    features_sha256 = train.features_hash(lake.cfg, load_application(lake.cfg))
    for run_cfg in (cfg_a, cfg_b, cfg_c):
        results.append(train.run(spark, run_cfg))
        aliases.append(registry.alias_versions(client, MODEL))
    return GateRuns(*results, aliases=aliases, cfg_a=cfg_a, cfg_b=cfg_b, features_sha256=features_sha256)


def versions_of(client: MlflowClient) -> dict[str, Any]:
    return {v.version: v for v in client.search_model_versions(f"name='{MODEL}'")}


@pytest.mark.integration
def test_the_gate_crowns_only_a_better_model(gate_runs: GateRuns) -> None:
    a, b, c = gate_runs.a, gate_runs.b, gate_runs.c
    assert a.horizon == b.horizon == c.horizon == contract.Horizon.of(impressions=1, clicks=1)
    assert a.rows["holdout"] == b.rows["holdout"] == c.rows["holdout"] > 100
    assert a.quality.value == c.quality.value == 0.5  # constant models
    assert b.quality.value > 0.6
    assert [r.decision for r in (a, b, c)] == ["champion", "champion", "challenger"]
    assert gate_runs.aliases == [
        {"champion": a.versions.served},
        {"champion": b.versions.served, "previous-champion": a.versions.served},
        {"champion": b.versions.served, "previous-champion": a.versions.served, "challenger": c.versions.served},
    ]


@pytest.mark.integration
def test_versions_carry_lineage_and_the_verdict(lake: Lake, gate_runs: GateRuns) -> None:
    client = MlflowClient(lake.cfg.mlflow.tracking_uri)
    versions = versions_of(client)
    a, b, c = gate_runs.a, gate_runs.b, gate_runs.c
    assert sorted(versions, key=int) == [str(v) for v in range(1, 7)]
    for result in (a, b, c):
        spark_v, onnx_v = versions[result.versions.others["spark"]], versions[result.versions.served]
        assert spark_v.run_id == onnx_v.run_id == result.run_id
        assert (spark_v.tags["flavor"], onnx_v.tags["flavor"], onnx_v.tags["spark_model_version"]) == (
            "spark",
            "onnx",
            result.versions.others["spark"],
        )
        for tags in (spark_v.tags, onnx_v.tags):
            assert (tags["horizon.impressions"], tags["horizon.clicks"]) == ("1", "1")
            assert tags["feature_definitions_sha256"] == gate_runs.features_sha256
            assert tags["gate.decision"] == result.decision
            assert float(tags["gate.auc"]) == result.quality.value
    config_hashes = {versions[r.versions.served].tags["config_sha256"] for r in (a, b, c)}
    assert len(config_hashes) == 3

    assert "gate.champion_version" not in versions[a.versions.served].tags
    b_tags, c_tags = versions[b.versions.served].tags, versions[c.versions.served].tags
    # B was compared with A, C with B: each champion re-scored on the same holdout rows gets
    # exactly the AUC its own run measured there.
    assert (b_tags["gate.champion_version"], float(b_tags["gate.champion_auc"])) == (a.versions.served, 0.5)
    assert c_tags["gate.champion_version"] == b.versions.served
    assert float(c_tags["gate.champion_auc"]) == pytest.approx(b.quality.value, abs=1e-12)
    assert b_tags["previous_champion"] == a.versions.served
    run_c = client.get_run(c.run_id).data
    assert run_c.tags["gate.decision"] == "challenger" and run_c.metrics["champion_auc"] == pytest.approx(b.quality.value, abs=1e-12)


@pytest.mark.integration
def test_the_champions_auc_agrees_with_scikit_learn_on_its_onnx_export(
    spark: SparkSession, lake: Lake, gate_runs: GateRuns
) -> None:
    cfg = gate_runs.cfg_b
    snapshot = read_snapshot(spark, cfg, {"impressions": 1, "clicks": 1})
    impressions, clicks = ctr_events.clean_events(snapshot, cfg)
    labels_as_of = latest_event_time(impressions, clicks)
    assert labels_as_of is not None
    training = ctr_batch.build_training_set(impressions, clicks, cfg, labels_as_of)
    holdout = split_by_time(training, cfg.ctr.holdout_fraction)[1].toPandas()
    assert len(holdout) == gate_runs.b.rows["holdout"]

    onnx_model = mlflow.onnx.load_model(f"models:/{MODEL}@champion")
    p = onnx_click_probabilities(onnx_model, onnx_inputs(holdout, contract.model_inputs(cfg.features)))
    assert roc_auc_score(holdout["label"], p) == pytest.approx(gate_runs.b.quality.value, abs=1e-3)


@pytest.mark.integration
def test_the_run_logs_the_search_and_the_calibration(lake: Lake, gate_runs: GateRuns, tmp_path: Path) -> None:
    client = MlflowClient(lake.cfg.mlflow.tracking_uri)
    run = client.get_run(gate_runs.b.run_id)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"calibration.png", "calibration.json", "search.json", "config.json"} <= artifacts

    search = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/search.json")
    aucs = {c["params"]["max_depth"]: c["validation_auc"] for c in search["candidates"]}
    assert sorted(aucs) == [2, 3]
    best = max(aucs, key=lambda depth: aucs[depth])
    assert search["chosen"]["max_depth"] == best and run.data.params["chosen.max_depth"] == str(best)
    assert search["validation_after"] < run.data.params["holdout_after"]  # chosen before the holdout starts

    calibration = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/calibration.json")
    assert sum(b["rows"] for b in calibration["bins"]) == run.data.metrics["rows_holdout"]
    gaps = sum(b["rows"] * abs(b["mean_prediction"] - b["observed_rate"]) for b in calibration["bins"])
    assert run.data.metrics["ece"] == pytest.approx(gaps / run.data.metrics["rows_holdout"], abs=1e-12)
    png = Path(mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/calibration.png", dst_path=str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_a_second_run_of_the_same_horizon_registers_nothing(
    lake: Lake, gate_runs: GateRuns, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = MlflowClient(lake.cfg.mlflow.tracking_uri)
    before, aliases = sorted(versions_of(client), key=int), registry.alias_versions(client, MODEL)
    experiment = client.get_experiment_by_name(lake.cfg.mlflow.experiment)
    assert experiment is not None
    runs_before = len(client.search_runs([experiment.experiment_id]))

    # A again, through the command line, pinned by time: now is after both version 1 commits.
    # One view is gone meanwhile (a lake rebuilt under the same registry): it is written again.
    import shutil

    user_view = Path(gate_runs.cfg_a.lake.table(*contract.view_table("user")))
    shutil.rmtree(user_view)
    config_file = tmp_path / "platform.yaml"
    write_config(gate_runs.cfg_a, config_file)
    again = train.main(["--config", str(config_file), "--as-of", datetime.now(UTC).isoformat()])
    from deltalake import DeltaTable

    rewritten = DeltaTable(str(user_view)).to_pandas(columns=["horizon_impressions", "horizon_clicks"]).drop_duplicates()
    assert rewritten.values.tolist() == [[1, 1]]
    assert again.reused and again.horizon == contract.Horizon.of(impressions=1, clicks=1)
    assert (again.run_id, again.versions, again.decision) == (gate_runs.a.run_id, gate_runs.a.versions, "champion")
    assert again.rows == gate_runs.a.rows and again.quality.value == gate_runs.a.quality.value
    logged = capsys.readouterr().err
    assert "already trained with this config" in logged and "skipping training, no new model version" in logged

    assert sorted(versions_of(client), key=int) == before
    assert registry.alias_versions(client, MODEL) == aliases
    assert len(client.search_runs([experiment.experiment_id])) == runs_before

    # An earlier horizon is new lineage: found nothing, so it would train.
    config_hash = registry.training_config_hash(gate_runs.cfg_a)
    lineage = registry.Lineage(contract.Horizon.of(impressions=0, clicks=0), config_hash, gate_runs.features_sha256)
    assert registry.find_registered(client, MODEL, lineage) is None


# --------------------------------------------------------------------------- rollback


@pytest.mark.integration
def test_rollback_moves_the_champion_back_and_forth(
    lake: Lake, gate_runs: GateRuns, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = MlflowClient(lake.cfg.mlflow.tracking_uri)
    a, b, c = (r.versions for r in (gate_runs.a, gate_runs.b, gate_runs.c))

    def aliases() -> dict[str, str]:
        return {k: v for k, v in registry.alias_versions(client, MODEL).items() if k != "challenger"}

    moved = registry.rollback(client, MODEL)
    assert (moved.previous, moved.champion) == (b.served, a.served)
    assert aliases() == {"champion": a.served, "previous-champion": b.served}
    assert client.get_model_version(MODEL, a.served).tags["previous_champion"] == b.served
    registry.rollback(client, MODEL)  # a second rollback undoes the first
    assert aliases() == {"champion": b.served, "previous-champion": a.served}

    registry.rollback(client, MODEL, to=c.served)
    assert aliases() == {"champion": c.served, "previous-champion": b.served}
    assert registry.rollback(client, MODEL, to=c.served).summary().endswith("already is the champion: nothing moved")
    with pytest.raises(registry.RollbackError, match=f"version {c.others['spark']} .* is a spark model serving does not load; the version served in its place is {c.served}"):
        registry.rollback(client, MODEL, to=c.others["spark"])
    with pytest.raises(registry.RollbackError, match="has no version 999"):
        registry.rollback(client, MODEL, to="999")
    assert aliases() == {"champion": c.served, "previous-champion": b.served}

    # The command line: back to the previous champion, B.
    config_file = tmp_path / "platform.yaml"
    write_config(lake.cfg, config_file)
    assert cli.main(["--config", str(config_file), "batch", "rollback"]) == 0
    assert f"version {c.served} -> version {b.served}" in capsys.readouterr().out
    assert aliases() == {"champion": b.served, "previous-champion": c.served}
    assert cli.main(["--config", str(config_file), "batch", "rollback", "--to", "nine"]) == 1
    assert "a model version is a whole number, not 'nine'" in capsys.readouterr().err


@pytest.mark.integration
def test_rollback_without_a_previous_champion_says_what_to_do(running_stack: PlatformConfig) -> None:
    client = MlflowClient(running_stack.mlflow.tracking_uri)
    client.create_registered_model("ctr-never-moved")
    with pytest.raises(registry.RollbackError, match="no 'previous-champion' alias .* --to VERSION"):
        registry.rollback(client, "ctr-never-moved")
    assert registry.alias_versions(client, "ctr-no-such-model") == {}
    assert registry.find_registered(client, "ctr-no-such-model", registry.Lineage(contract.Horizon.of(impressions=0, clicks=0), "x", "y")) is None

"""The k-means application through the three layers, on the real broker, Spark + Delta and
MLflow: generated points whose true centres move land in bronze (Delta appends with the bronze
schema; the ingest of points from Kafka has its own test below); the batch layer trains, gates and registers the centres (and reuses them for the same lineage); the
speed layer moves the champion's centres over the points after its horizon and publishes them;
the serving side loads the registered version and the published update and answers /assign."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from support import prefixed_topics

from batch_layer import train
from lambda_ml import contract
from lambda_ml_cli import stack
from lambda_ml.apps import VersionInfo, load_application
from lambda_ml.config import PROJECT_ROOT, PlatformConfig, load_config
from lambda_ml.contract import Horizon, parse_model_update
from lambda_ml.producer import Record, produce
from lambda_ml_apps.kmeans.generator import MovingClusters, PointBatch
from lambda_ml_apps.kmeans.model import KMeansCentres
from lambda_ml_apps.kmeans.serving import KMeansServingModel, KMeansServingModels
from serving_layer.reloadable import NotReadyError
from speed_layer import app

KMEANS_CONFIG = PROJECT_ROOT / "conf" / "kmeans.yaml"
# Four clusters 12 apart moving 1 unit per hour, 600 points an hour: the batch layer sees the
# first four hours, the speed layer the next four.
GEN = MovingClusters(k=4, dimensions=2, spread=0.5, separation=12.0, speed_per_hour=1.0, events_per_hour=600.0, seed=3)
BATCH_POINTS = SPEED_POINTS = 2400
DUPLICATES = 60  # speed points sent twice: counted once


def kmeans_config(base: PlatformConfig, root: Path, model: str) -> PlatformConfig:
    """conf/kmeans.yaml on the session's broker and MLflow server, with its own lake, topics and
    registered model; a smaller silhouette search than the shipped one (two cores)."""
    cfg = load_config(
        KMEANS_CONFIG,
        env={},
        overrides={
            "data_dir": str(root / "data"),
            "kafka.port": base.kafka.port,
            "kafka.controller_port": base.kafka.controller_port,
            "kafka.bootstrap_servers": base.kafka.bootstrap_servers,
            "mlflow.port": base.mlflow.port,
            "mlflow.tracking_uri": base.mlflow.tracking_uri,
            "mlflow.experiment": model,
            "mlflow.registered_model": model,
            "lake.root": str(root / "lake"),
            "lake.checkpoints": str(root / "checkpoints"),
            "spark.master": base.spark.master,
            "kmeans.k_values": [3, 4, 5],
            "kmeans.runs": 2,
        },
    )
    kafka, events = prefixed_topics(cfg, model)
    return cfg.model_copy(update={"kafka": kafka, "events": events})


def records(batch: PointBatch) -> list[Record]:
    return [Record("points", e["source_id"].encode(), json.dumps(e).encode()) for e in batch.events]


def land_in_bronze(spark: SparkSession, cfg: PlatformConfig, events: list[dict[str, Any]], first_offset: int) -> None:
    """One bronze commit of ``events`` as the ingest query writes them: the declared fields
    typed, with Kafka coordinates (partition 0, consecutive offsets)."""
    from lambda_ml.schemas import event_type
    from speed_layer.ingest import bronze_path, ensure_tables

    ensure_tables(spark, cfg)
    points = event_type(cfg, "points")
    landed = datetime.now(UTC)
    rows = [
        (
            *(datetime.fromisoformat(e[f.name]) if f.kind == "timestamp" else e[f.name] for f in points.fields),
            cfg.events.topic("points").name, 0, first_offset + i, landed, landed,
        )
        for i, e in enumerate(events)
    ]
    spark.createDataFrame(rows, points.bronze_schema()).write.format("delta").mode("append").save(bronze_path(cfg, "points"))


def matched_distances(truth: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Distance of each true centre to the centre matched with it (Hungarian matching)."""
    cost = cdist(truth, centres)
    rows, cols = linear_sum_assignment(cost)
    return cost[rows, cols]


@dataclass(frozen=True)
class Trained:
    cfg: PlatformConfig
    first: train.TrainResult
    batch: PointBatch


@pytest.fixture(scope="module")
def trained(running_stack: PlatformConfig, spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """The first four hours of points in bronze, then one batch run."""
    cfg = kmeans_config(running_stack, tmp_path_factory.mktemp("kmeans"), "kmeans-app")
    stack.create_topics(cfg)
    batch = GEN.sample(BATCH_POINTS)
    land_in_bronze(spark, cfg, batch.events, 0)
    yield Trained(cfg, train.run(spark, cfg), batch)


@pytest.mark.integration
def test_batch_run_registers_gated_centres_near_the_truth_and_a_rerun_reuses_them(trained: Trained, spark: SparkSession) -> None:
    cfg, first, batch = trained.cfg, trained.first, trained.batch
    assert not first.reused and first.decision == contract.CHAMPION_ALIAS
    assert first.horizon == Horizon.of(points=1)  # bronze points: created empty, then one ingest commit
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    name = cfg.mlflow.registered_model
    version = client.get_model_version(name, first.versions.served)
    assert first.versions.others == {}
    assert client.get_model_version_by_alias(name, contract.CHAMPION_ALIAS).version == version.version
    tags = version.tags
    assert tags["horizon.points"] == "1" and tags["flavor"] == "centres" and tags["kmeans.features"] == "x0,x1"
    assert tags["gate.decision"] == "champion" and tags["gate.metric"] == "inertia" and tags["gate.higher_is_better"] == "false"
    run = client.get_run(first.run_id).data
    assert run.tags["app"] == "kmeans" and run.tags["horizon.points"] == "1" and run.tags["gate.decision"] == "champion"
    assert run.params["chosen.k"] == "4"
    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"centres.json", "silhouette.json", "silhouette.png", "config.json"} <= artifacts

    centres = KMeansCentres.from_dict(json.loads(Path(mlflow.artifacts.download_artifacts(run_id=first.run_id, artifact_path="centres.json")).read_text()))
    # The holdout is the most recent 20 % of the points: its inertia per point, by NumPy.
    cutoff = np.datetime64(run.params["holdout_after"].replace("+00:00", ""))
    times = np.array([np.datetime64(e["event_time"].rstrip("Z")) for e in batch.events])
    held, fitted = batch.points[times > cutoff], batch.points[times <= cutoff]
    squared = cdist(held, centres.array, "sqeuclidean").min(axis=1)
    assert len(held) == run.metrics["rows_holdout"] == pytest.approx(0.2 * BATCH_POINTS, abs=2)
    assert float(tags["gate.inertia"]) == pytest.approx(squared.mean(), rel=1e-9) == first.quality.value
    assert run.metrics["holdout_inertia"] == pytest.approx(squared.sum(), rel=1e-9)
    # Fitted on the training hours, each centre sits at its cluster's mean position there: the
    # true centre at the middle of those hours (the motion is a straight line).
    # Clusters 12 apart with a spread of 0.5 are separated: k-means ends at the mean of each
    # true cluster's training points.
    labels = batch.clusters[times <= cutoff]
    means = np.array([fitted[labels == c].mean(axis=0) for c in range(GEN.k)])
    assert matched_distances(means, centres.array).max() < 1e-6
    middle = GEN.start + timedelta(hours=float(GEN.hours_since_start(GEN.event_time(len(fitted) - 1))) / 2)
    errors = matched_distances(GEN.true_centres(middle), centres.array)
    print(f"batch centres: largest distance to the true centres at {middle:%H:%M}: {errors.max():.3f}")
    assert errors.max() < 0.2

    again = train.run(spark, cfg)
    assert again.reused and again.versions == first.versions and again.run_id == first.run_id
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


def read_updates(cfg: PlatformConfig) -> list[tuple[bytes, bytes]]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        cfg.kafka.topics.model_updates.name, bootstrap_servers=cfg.kafka.bootstrap_servers,
        auto_offset_reset="earliest", consumer_timeout_ms=10000,
    )  # fmt: skip
    try:
        return [(m.key, m.value) for m in consumer]
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def speed_update(trained: Trained, spark: SparkSession) -> tuple[bytes, bytes]:
    """The next four hours of points (some delivered twice) in bronze, then the increments and
    centres queries; the last update the centres query published."""
    cfg = trained.cfg
    later = GEN.sample(SPEED_POINTS, first_index=BATCH_POINTS)
    land_in_bronze(spark, cfg, later.events + later.events[:DUPLICATES], BATCH_POINTS)
    app.run(cfg, ["increments", "centres"], available_now=True)
    updates = read_updates(cfg)
    assert updates, "the centres query published no update"
    return updates[-1]


@pytest.mark.integration
def test_speed_layer_moves_the_champion_centres_after_its_horizon(
    trained: Trained, speed_update: tuple[bytes, bytes], spark: SparkSession
) -> None:
    cfg = trained.cfg
    # The declared features run for points too: per source, the increments after the view's
    # horizon count each new point once, with its x0 sum, minimum and maximum.
    increments = spark.read.format("delta").load(cfg.lake.table(*contract.increments_table("source")))
    per_source = {
        r["source_id"]: (r["points"], r["x0_sum"], r["x0_min"], r["x0_max"])
        for r in increments.where("points_version > 1").groupBy("source_id")
        .agg(F.sum("points").alias("points"), F.sum("x0_sum").alias("x0_sum"), F.min("x0_min").alias("x0_min"), F.max("x0_max").alias("x0_max"))
        .collect()
    }  # fmt: skip
    later_events = GEN.sample(SPEED_POINTS, first_index=BATCH_POINTS).events
    sources = sorted({e["source_id"] for e in later_events})
    assert sorted(per_source) == sources
    for source in sources:
        x0 = np.array([e["x0"] for e in later_events if e["source_id"] == source])
        count, total, low, high = per_source[source]
        assert (count, low, high) == (len(x0), x0.min(), x0.max()) and total == pytest.approx(x0.sum(), rel=1e-12)
    key, value = speed_update
    update = parse_model_update(value)
    assert key == f"{cfg.mlflow.registered_model}@speed".encode()
    assert (update.alias, update.version, update.generation) == ("speed", int(trained.first.versions.served), Horizon.of(points=1))
    moved = KMeansCentres.from_dict(update.data or {})
    champion = KMeansCentres.from_dict(
        json.loads(Path(mlflow.artifacts.download_artifacts(run_id=trained.first.run_id, artifact_path="centres.json")).read_text())
    )
    # Every point after the horizon counted once (the duplicates not), in event-time order, in
    # steps of 100: what an independent NumPy run of Sculley's update with forgetting gives.
    later = GEN.sample(SPEED_POINTS, first_index=BATCH_POINTS)
    steps = math.ceil(SPEED_POINTS / cfg.kmeans.mini_batch_size)
    assert update.updates == steps
    expected, weights = sculley(champion.array, champion.count_array, later.points, cfg.kmeans.decay, cfg.kmeans.mini_batch_size)
    np.testing.assert_allclose(moved.array, expected, rtol=1e-9)
    np.testing.assert_allclose(moved.count_array, weights, rtol=1e-9)
    end = GEN.event_time(BATCH_POINTS + SPEED_POINTS - 1)
    truth = GEN.true_centres(end)
    before, after = matched_distances(truth, champion.array), matched_distances(truth, moved.array)
    print(f"distance to the true centres at the end: champion {before.max():.3f}, speed centres {after.max():.3f} (largest)")
    # Decay 0.9 remembers about ten steps: in steady state the centres lag the truth by about
    # 9.5 steps of 1/6 hour (1.6 units at 1 unit per hour); after 24 steps the champion's weight
    # (about 480 points a centre) is down to 0.9^24 = 8 % of it, some 14 % of a centre's weight,
    # and it sits 6.4 units behind: about 0.86 * 1.6 + 0.14 * 6.4 = 2.3 units in all.
    assert after.max() < 2.6 and before.min() > 5.5


def sculley(centres: np.ndarray, counts: np.ndarray, points: np.ndarray, decay: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mini-batch k-means with a forgetting factor, step by step: decay the weights, assign the
    step's points to the centres as they are, move each centre to the weighted mean."""
    centres, counts = centres.copy(), counts.copy()
    for start in range(0, len(points), size):
        chunk = points[start : start + size]
        nearest = cdist(chunk, centres, "sqeuclidean").argmin(axis=1)
        counts *= decay
        for j in range(len(centres)):
            mine = chunk[nearest == j]
            if len(mine):
                centres[j] = (counts[j] * centres[j] + mine.sum(axis=0)) / (counts[j] + len(mine))
                counts[j] += len(mine)
    return centres, counts


@dataclass
class Served:
    """What the serving layer swaps in: every loaded alias -> its model."""

    by_alias: dict[str, KMeansServingModel]

    @property
    def champion(self) -> KMeansServingModel:
        return self.by_alias["champion"]


@dataclass
class Harness:
    """The test's service: the config and the models it loaded (the ``Service`` contract)."""

    cfg: PlatformConfig
    models: Served

    def served(self) -> Served:
        if not self.models.by_alias:
            raise NotReadyError("no champion of kmeans is loaded yet")
        return self.models


@pytest.mark.integration
def test_serving_loads_the_registered_centres_applies_the_update_and_assigns(
    trained: Trained, speed_update: tuple[bytes, bytes], tmp_path: Path
) -> None:
    cfg = trained.cfg
    serving = load_application(cfg).serving
    assert isinstance(serving, KMeansServingModels)
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    version = client.get_model_version_by_alias(cfg.mlflow.registered_model, contract.CHAMPION_ALIAS)
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    local = mlflow.artifacts.download_artifacts(f"models:/{cfg.mlflow.registered_model}/{version.version}", dst_path=str(tmp_path))
    info = VersionInfo(int(version.version), version.run_id, dict(version.tags))
    champion = serving.load(cfg, info, "champion", Path(local))
    speed = serving.apply(cfg, parse_model_update(speed_update[1]))
    assert speed is not None and speed.updates == math.ceil(SPEED_POINTS / cfg.kmeans.mini_batch_size)
    assert champion.quality == pytest.approx(-trained.first.quality.value) and speed.quality is None
    assert champion.identity == (info.version, "") and speed.identity == (info.version, "speed")
    assert serving.apply(cfg, parse_model_update(contract.ModelUpdate(cfg.mlflow.registered_model, "champion", 1, Horizon.of(points=1)).value())) is None
    # The pyfunc registered beside the JSON answers like the service.
    pyfunc = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.registered_model}/{version.version}")

    api = FastAPI()
    api.include_router(serving.router(Harness(cfg, Served({"champion": champion, "speed": speed}))))
    http = TestClient(api)
    rng = np.random.default_rng(0)
    points = rng.uniform(-25, 25, size=(50, 2))
    body = {"points": [{"x0": float(x), "x1": float(y)} for x, y in points]}
    for policy, model in (("champion", champion), ("latest", speed)):
        answer = http.post("/assign", params={"policy": policy}, json=body)
        assert answer.status_code == 200, answer.text
        reply = answer.json()
        distances = np.sqrt(((points[:, None, :] - np.array(model.centres.centres)[None, :, :]) ** 2).sum(axis=2))
        assert [a["cluster"] for a in reply["assignments"]] == distances.argmin(axis=1).tolist()
        np.testing.assert_allclose([a["distance"] for a in reply["assignments"]], distances.min(axis=1), rtol=1e-12)
        assert reply["model"] == {"version": info.version, "alias": model.alias, "horizon": {"points": 1}, "updates": model.updates}
        if policy == "champion":
            frame = pyfunc.predict(__import__("pandas").DataFrame(points, columns=["x0", "x1"]))
            assert frame["cluster"].tolist() == distances.argmin(axis=1).tolist()
    assert http.post("/assign", json=body).json()["model"]["alias"] == "champion"  # the default policy

    bad: list[tuple[Any, str, str]] = [
        ({"points": [{"x0": 1.0}]}, "points.0.x1", "missing"),
        ({"points": [{"x0": 1.0, "x1": 2.0}, {"x0": "3", "x1": 2.0}]}, "points.1.x0", 'bad value for x0: expected a finite number, got "3"'),
        ({"points": [{"x0": True, "x1": 2.0}]}, "points.0.x0", "bad value for x0: expected a finite number, got true"),
        ({"points": [{"x0": 1.0, "x1": None}]}, "points.0.x1", "bad value for x1: expected a finite number, got null"),
        ({"points": [{"x0": 1.0, "x1": 2.0, "event_time": 1764547200}]}, "points.0.event_time", "expected an ISO-8601 timestamp string"),
        ({"points": []}, "points", "at least one point"),
        ({"points": [{"x0": 0.0, "x1": 0.0}] * (cfg.serving.max_rows + 1)}, "points", "more than serving.max_rows"),
    ]
    for payload, field, message in bad:
        answer = http.post("/assign", json=payload)
        assert answer.status_code == 422, (payload, answer.text)
        (error,) = answer.json()["detail"]
        assert error["field"] == field and message in error["message"], (payload, answer.text)
    not_finite = http.post("/assign", content=b'{"points": [{"x0": NaN, "x1": 1.0}]}', headers={"content-type": "application/json"})
    assert not_finite.status_code == 422 and not_finite.json()["detail"][0]["field"] == "points.0.x0"
    unknown = http.post("/assign", json={"points": [{"x0": 1.0, "x1": 1.0}], "rows": []})
    assert unknown.status_code == 422 and "rows" in unknown.text
    policy = http.post("/assign", params={"policy": "quality"}, json=body)
    assert policy.status_code == 422 and "policy" in policy.text

    # The routes mounted on a service: behind its guard; a 503 while nothing is loaded.
    mounted = FastAPI()
    serving.mount(mounted, Harness(cfg, Served({})))
    waiting = TestClient(mounted).post("/assign", json=body)
    assert waiting.status_code == 503 and waiting.headers["retry-after"] and "no champion" in waiting.json()["detail"]

    with pytest.raises(ValueError, match="model update field data: .*feature_names"):
        serving.apply(cfg, contract.ModelUpdate(cfg.mlflow.registered_model, "speed", 1, Horizon.of(points=1), 1, data={"centres": [[0.0, 0.0]], "counts": [1.0]}))
    wrong = {"feature_names": ["x0", "x2"], "centres": [[0.0, 0.0]], "counts": [1.0]}
    with pytest.raises(ValueError, match="data.feature_names"):
        serving.apply(cfg, contract.ModelUpdate(cfg.mlflow.registered_model, "speed", 1, Horizon.of(points=1), 1, data=wrong))


@pytest.mark.integration
def test_ingest_lands_points_with_double_fields(running_stack: PlatformConfig, spark: SparkSession, tmp_path: Path) -> None:
    from speed_layer.ingest import bronze_path

    cfg = kmeans_config(running_stack, tmp_path, "kmeans-ingest")
    stack.create_topics(cfg)
    sample = GEN.sample(20)
    produce(cfg, records(sample), progress=False)
    app.run(cfg, ["ingest"], available_now=True)
    landed = spark.read.format("delta").load(bronze_path(cfg, "points")).orderBy("event_time").select("x0", "x1").collect()
    np.testing.assert_array_equal([[r["x0"], r["x1"]] for r in landed], sample.points)


@pytest.mark.integration
def test_centres_start_again_from_a_new_champion_and_catch_up_on_the_points_after_its_horizon(
    trained: Trained, speed_update: tuple[bytes, bytes], spark: SparkSession
) -> None:
    """The stream passes bronze v3 under champion v1; a batch run pinned at v2 then wins the
    gate; at v4 the query starts from the new champion and first applies v3 (bronze's change
    feed), then v4, never v1-v2 again."""
    cfg = trained.cfg
    size, decay = cfg.kmeans.mini_batch_size, cfg.kmeans.decay
    v3 = GEN.sample(600, first_index=BATCH_POINTS + SPEED_POINTS)
    land_in_bronze(spark, cfg, v3.events, 10_000)
    app.run(cfg, ["centres"], available_now=True)
    under_v1 = parse_model_update(read_updates(cfg)[-1][1])
    assert (under_v1.version, under_v1.generation, under_v1.updates) == (1, Horizon.of(points=1), 24 + 6)

    second = train.run(spark, cfg, {"points": 2})
    assert second.decision == contract.CHAMPION_ALIAS and second.horizon == Horizon.of(points=2), second.reason
    champion = KMeansCentres.from_dict(
        json.loads(Path(mlflow.artifacts.download_artifacts(run_id=second.run_id, artifact_path="centres.json")).read_text())
    )
    v4 = GEN.sample(300, first_index=BATCH_POINTS + SPEED_POINTS + 600)
    land_in_bronze(spark, cfg, v4.events, 20_000)
    app.run(cfg, ["centres"], available_now=True)
    update = parse_model_update(read_updates(cfg)[-1][1])
    assert (update.version, update.generation, update.updates) == (int(second.versions.served), Horizon.of(points=2), 6 + 3)
    caught_up, counts = sculley(champion.array, champion.count_array, v3.points, decay, size)
    expected, weights = sculley(caught_up, counts, v4.points, decay, size)
    moved = KMeansCentres.from_dict(update.data or {})
    np.testing.assert_allclose(moved.array, expected, rtol=1e-9)
    np.testing.assert_allclose(moved.count_array, weights, rtol=1e-9)


@pytest.mark.integration
def test_centres_wait_for_a_champion_with_one_log_line(
    running_stack: PlatformConfig, spark: SparkSession, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from lambda_ml_apps.kmeans.speed import CentresUpdater, state_path

    cfg = kmeans_config(running_stack, tmp_path, "kmeans-no-champion")
    frame = spark.createDataFrame(
        [(e["event_id"], datetime.fromisoformat(e["event_time"]), e["x0"], e["x1"], 1) for e in GEN.sample(10).events],
        "event_id string, event_time timestamp, x0 double, x1 double, points_version long",
    )
    updater = CentresUpdater(cfg)
    with caplog.at_level("INFO", logger="lambda_ml_apps.kmeans.speed"):
        updater(frame, 0)
        updater(frame, 1)
    waiting = [r.getMessage() for r in caplog.records if "until the batch layer registers one" in r.getMessage()]
    assert waiting == [f"centres: {cfg.mlflow.registered_model} has no champion yet: the micro-batches are skipped until the batch layer registers one"]
    assert updater.state is None and updater.published == 0 and not Path(state_path(cfg)).exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kmeans.features": ["x0", "x9"]}, "kmeans.features: 'x9' is not a field of events.types.points"),
        ({"kmeans.features": ["x0", "source_id"]}, "kmeans.features: 'source_id' is a string field of points"),
        ({"speed.queries": ["ingest", "online"]}, "speed.queries: ['online'] are not queries"),
    ],
)
def test_the_application_refuses_a_config_it_cannot_run_naming_file_and_key(overrides: dict[str, Any], message: str) -> None:
    assert load_application(load_config(KMEANS_CONFIG, env={})).name == "kmeans"
    with pytest.raises(ValueError, match=re.escape(f"{KMEANS_CONFIG}: {message}")):
        load_application(load_config(KMEANS_CONFIG, env={}, overrides=overrides))


def test_the_feature_declarations_must_find_their_fields_in_the_points() -> None:
    cfg = load_config(KMEANS_CONFIG, env={})
    # A declaration over a second event type lacking the key: DeclaredFeatureEvents.check refuses it.
    types = {**cfg.events.types, "marks": cfg.events.types["points"].model_copy(update={"fields": {"event_id": "string", "event_time": "timestamp"}})}
    aggregates = {**cfg.features.aggregates, "marks": cfg.features.aggregates["points"].model_copy(update={"events": "marks"})}
    wrong = cfg.model_copy(update={"events": cfg.events.model_copy(update={"types": types}), "features": cfg.features.model_copy(update={"aggregates": aggregates})})
    with pytest.raises(ValueError, match=re.escape("events.types.marks: the features read ['source_id', 'x0'], which marks events lack")):
        load_application(wrong)

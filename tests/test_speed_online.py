"""Online logistic regression: SGD steps computed with Spark aggregates equal a NumPy reference,
progressive validation scores each batch before learning from it, and the streaming
application's ``online`` query, fed by the silver labels, learns exactly what a plain NumPy SGD
learns from the same rows with the batch layer's features, one step per stretch of event time
once its labels are final, warm-started from the champion, whatever order the labels arrive in;
on a stationary stream through the real labels query it scores within 5 % of the champion; a
replayed micro-batch does not step twice; its updates reach the serving layer's model store over
the real broker (stale ones ignored) and a ``layer=speed`` version is registered (real Spark,
Delta, Kafka and MLflow)."""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from delta.tables import DeltaTable
from mlflow import MlflowClient
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from sklearn.metrics import roc_auc_score
from support import IMPRESSION, isolated

from lambda_ml_apps.ctr.models import build_pipeline
from batch_layer.snapshot import read_snapshot
from lambda_ml_apps.ctr.events import LABELS_FINAL_UNTIL, clean_events, labels_final_until
from lambda_ml_apps.ctr.batch import build_training_set
from lambda_ml import contract, producer
from lambda_ml_cli import stack
from lambda_ml_apps.ctr import generator
from lambda_ml.config import OnlineConfig, PlatformConfig
from lambda_ml.contract import Horizon, LinearWeights, ModelUpdate
from lambda_ml.features import LABEL, latest_event_time
from lambda_ml_apps.ctr.model_registry import register_models
from lambda_ml_apps.ctr.onnx_export import export_onnx
from lambda_ml_apps.ctr.model_inputs import build_model_inputs
from lambda_ml_apps.ctr.serving import CtrServingModels
from serving_layer.model_store import ModelStore
from serving_layer.updates import ModelUpdateListener
from speed_layer import app, ingest
from lambda_ml_apps.ctr.labels import ensure_labels_table, label_schema, labels_path, merge_labels
from speed_layer.monitor import metrics_experiment
from lambda_ml.contract import publish_updates
from lambda_ml_apps.ctr.online import OnlineLearner, update_of
from lambda_ml_apps.ctr.online_state import load_state, model_table, save_state
from lambda_ml_apps.ctr.online_steps import FtrlState, LinearModel, closed_stretches, ftrl_step, sgd_step

NAMES = ("x1", "x2", "x3")
TRUE_W, TRUE_B = np.array([1.5, -2.0, 0.5]), -0.3
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
KAFKA_COLUMNS = "key binary, value binary, topic string, partition int, offset long, timestamp timestamp"


def _data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, len(NAMES)))
    y = (rng.random(rows) < 1 / (1 + np.exp(-(x @ TRUE_W + TRUE_B)))).astype(float)
    return x, y


def _frame_in_batches(spark: SparkSession, seed: int, split_seed: int) -> tuple[DataFrame, list[DataFrame]]:
    """2,400 generated rows (x1, x2, x3, label) as a Spark frame, and the same split in four micro-batches."""
    x, y = _data(2400, seed=seed)
    rows = [(*map(float, features), float(label)) for features, label in zip(x, y)]
    frame = spark.createDataFrame(rows, "x1 double, x2 double, x3 double, label double").repartition(3)
    return frame, frame.randomSplit([1.0] * 4, seed=split_seed)


def _scales(x: np.ndarray) -> np.ndarray:
    """Each column's root mean square (1 for a column of zeros): the terms' scales."""
    rms = np.sqrt(np.mean(x**2, axis=0))
    return np.where(rms > 0, rms, 1.0)


class _RunningScales:
    """SGD's scales: each column's root mean square over every row stepped on so far."""

    def __init__(self) -> None:
        self.squares: np.ndarray | None = None
        self.rows = 0

    def add(self, x: np.ndarray) -> np.ndarray:
        squares = (x**2).sum(axis=0)
        self.squares = squares if self.squares is None else self.squares + squares
        self.rows += len(x)
        rms = np.sqrt(self.squares / self.rows)
        return np.where(rms > 0, rms, 1.0)


def _reference_step(
    w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray, lr: float, l2: float, s: np.ndarray
) -> tuple[np.ndarray, float, float]:
    """SGD on the standardised columns x / s (weights w·s), written back on the raw scale."""
    p = 1 / (1 + np.exp(-(x @ w + b)))
    clipped = np.clip(p, 1e-15, 1 - 1e-15)
    loss = float(np.mean(-(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))))
    w_s = w * s - lr * ((p - y) @ (x / s) / len(y) + l2 * w * s)
    return w_s / s, b - lr * float(np.mean(p - y)), loss


@pytest.mark.integration
def test_sgd_steps_match_numpy_and_validate_before_learning(spark: SparkSession) -> None:
    frame, batches = _frame_in_batches(spark, seed=1, split_seed=5)
    champion = LinearModel(NAMES, (1.0, -1.0, 0.0), 0.0, generation=Horizon.of(impressions=5, clicks=4))
    model, w, b = champion, np.array(champion.weights), champion.intercept
    lr, l2 = 0.5, 0.01
    losses = []
    running = _RunningScales()
    for batch in batches:
        part = np.array([[r.x1, r.x2, r.x3, r.label] for r in batch.collect()])  # the reference's copy only
        scales = running.add(part[:, :3])  # over every row so far, this batch's included
        model, metrics = sgd_step(batch, model, lr, l2, baseline=champion)
        w_ref, b_ref, loss_ref = _reference_step(w, b, part[:, :3], part[:, 3], lr, l2, scales)
        champion_loss = _reference_step(np.array(champion.weights), champion.intercept, part[:, :3], part[:, 3], lr, l2, scales)[2]
        np.testing.assert_allclose(model.scales, scales, rtol=1e-12)
        assert metrics.rows == len(part)
        np.testing.assert_allclose(model.weights, w_ref, rtol=1e-9)
        assert model.intercept == pytest.approx(b_ref, rel=1e-9)
        assert metrics.log_loss == pytest.approx(loss_ref, rel=1e-9)  # before this step's update
        assert metrics.baseline_log_loss == pytest.approx(champion_loss, rel=1e-9)
        w, b = w_ref, b_ref
        losses.append(metrics.log_loss)
    assert model.updates == 4 and model.generation == champion.generation
    assert losses[-1] < losses[0]  # it learns: later batches are scored better before learning
    # An empty batch changes nothing.
    same, nothing = sgd_step(frame.limit(0), model, lr)
    assert same == model and nothing.rows == 0


def _reference_ftrl(theta: np.ndarray, z: np.ndarray, n: np.ndarray, x: np.ndarray, y: np.ndarray,
                    alpha: float, beta: float, l1: np.ndarray, l2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FTRL-Proximal (McMahan et al., 2013, algorithm 1) on the batch's mean gradient, over
    theta = (weights, intercept)."""
    p = 1 / (1 + np.exp(-(x @ theta[:-1] + theta[-1])))
    g = np.append((p - y) @ x / len(y), np.mean(p - y))
    sigma = (np.sqrt(n + g**2) - np.sqrt(n)) / alpha
    z, n = z + g - sigma * theta, n + g**2
    theta = np.where(np.abs(z) <= l1, 0.0, -(z - np.sign(z) * l1) / ((beta + np.sqrt(n)) / alpha + l2))
    return theta, z, n


@pytest.mark.integration
def test_ftrl_steps_match_numpy_keep_the_warm_start_and_zero_weak_weights(spark: SparkSession) -> None:
    _, batches = _frame_in_batches(spark, seed=2, split_seed=7)
    champion = LinearModel(NAMES, (1.0, -1.0, 0.0), -0.2, generation=Horizon.of(impressions=5, clicks=4))
    alpha, beta, l1, l2 = 0.5, 1.0, 0.3, 0.01
    # The reference's own warm start: z such that the closed form gives the champion's weights at n = 0.
    parts = [np.array([[r.x1, r.x2, r.x3, r.label] for r in batch.collect()]) for batch in batches]
    # FTRL works on the standardised columns (x / s, weights w·s), s fixed by the first batch.
    s = np.append(_scales(parts[0][:, :3]), 1.0)  # the intercept's column is 1
    theta = np.array([*champion.weights, champion.intercept]) * s
    l1s, l2s = np.array([l1, l1, l1, 0.0]), np.array([l2, l2, l2, 0.0])  # the intercept is not penalised
    z = np.where(theta == 0, 0.0, -(theta * (beta / alpha + l2s) + np.sign(theta) * l1s))
    n = np.zeros(4)
    model = champion
    for step, (batch, part) in enumerate(zip(batches, parts)):
        model, metrics = ftrl_step(batch, model, alpha, beta, l1, l2, baseline=champion)
        if step == 0:  # scored before learning, from the warm start: the champion itself
            assert metrics.log_loss == pytest.approx(metrics.baseline_log_loss, rel=1e-12)
        theta, z, n = _reference_ftrl(theta, z, n, part[:, :3] / s[:3], part[:, 3], alpha, beta, l1s, l2s)
        np.testing.assert_allclose([*model.weights, model.intercept], theta / s, rtol=1e-9, atol=1e-15)
        assert model.ftrl is not None
        np.testing.assert_allclose(model.ftrl.z, z, rtol=1e-9)
        np.testing.assert_allclose(model.ftrl.n, n, rtol=1e-9)
    # x3 started at 0 and its evidence over four batches stays under l1: exactly 0 (sparse), the others learned.
    assert model.weights[2] == 0.0 and theta[2] == 0.0 and model.weights[0] != champion.weights[0]
    assert model.updates == 4
    # A new category joins at weight 0 with an empty FTRL state; the intercept's stays last.
    wider = model.with_terms(["device=tablet"])
    assert wider.weights[-1] == 0.0 and wider.ftrl is not None
    assert (wider.ftrl.z[-2:], wider.ftrl.n[-2:]) == ((0.0, model.ftrl.z[-1]), (0.0, model.ftrl.n[-1]))


@pytest.mark.integration
def test_the_newest_non_click_closes_the_stretches_before_its_own(spark: SparkSession) -> None:
    """Final labels: a non-click at t means every impression at or before t has its final label,
    so the stretches ending at or before it can be learned from, and no other."""
    width = 15 * 60_000_000
    start = int(NOW.timestamp() * 1_000_000)  # on a stretch boundary
    assert start % width == 0

    def labels(*rows: tuple[float, float]) -> DataFrame:
        return spark.createDataFrame([(NOW + timedelta(minutes=m), y) for m, y in rows], "event_time timestamp, label double")

    minutes = 60_000_000
    stream = labels((1, 1.0), (14, 0.0), (20, 1.0), (31, 0.0), (50, 1.0), (58, 1.0))
    # The non-click at 12:31 closes the stretches of 12:00 and 12:15, not its own (12:30).
    assert closed_stretches(stream, None, width) == (start, start + 30 * minutes)
    assert closed_stretches(stream, start + 15 * minutes, width) == (start + 15 * minutes, start + 30 * minutes)
    assert closed_stretches(stream, start + 30 * minutes, width) is None  # learned up to there already
    assert closed_stretches(labels((1, 1.0), (50, 1.0)), None, width) is None  # clicks alone close nothing
    # The first stretch starts at the earliest labelled impression's.
    assert closed_stretches(labels((-7, 1.0), (40, 0.0)), None, width) == (start - width, start + 30 * minutes)


def test_the_online_config_picks_the_algorithm_and_refuses_bad_values() -> None:
    from lambda_ml.config import ConfigError, load_config

    cfg = load_config(env={}, overrides={"speed.online.algorithm": "ftrl", "speed.online.l1": 0.5})
    assert (cfg.speed.online.algorithm, cfg.speed.online.l1, cfg.speed.online.ftrl_alpha) == ("ftrl", 0.5, 0.05)
    for key, value in (("speed.online.algorithm", "adam"), ("speed.online.ftrl_alpha", 0), ("speed.online.l1", -1)):
        with pytest.raises(ConfigError, match=key.rsplit(".", 1)[1]):
            load_config(env={}, overrides={key: value})


@pytest.mark.integration
def test_the_saved_state_brings_back_ftrl_accumulators_and_the_generation_auc(spark: SparkSession, cfg: PlatformConfig, tmp_path: Path) -> None:
    """What a restart of the online query reads back: the FTRL state of the last step, and the
    progressive AUC of every saved micro-batch of its generation (bins summed), not of other
    generations."""
    from lambda_ml.metrics import area_under_roc

    local = isolated(cfg, "ctr-online-state", lake_root=tmp_path / "lake")

    def saved(batch_id: int, generation: int, bins: list[tuple[int, float, float]], z: list[float] | None) -> None:
        save_state(spark, local, batch_id, {
            "generation_impressions": generation, "generation_clicks": generation, "base_version": 3, "updates": batch_id + 1,
            "terms": ["x1"], "weights": [0.5], "intercept": -1.0, "rows": 10, "log_loss": 0.5, "champion_log_loss": 0.6,
            "auc": None, "champion_auc": None, "champion_version": 3, "cumulative_auc": None, "champion_cumulative_auc": None,
            "auc_bins": [{"bin": b, "positives": p, "negatives": q} for b, p, q in bins],
            "champion_auc_bins": [{"bin": b, "positives": q, "negatives": p} for b, p, q in bins],
            "ftrl_z": z, "ftrl_n": None if z is None else [4.0, 9.0], "scales": None if z is None else [2.5],
            "query_id": "q", "sequence": batch_id,
        })  # fmt: skip

    saved(0, 1, [(5, 9.0, 1.0)], None)  # an older generation: its bins do not count
    saved(1, 2, [(-3, 1.0, 4.0), (2, 2.0, 1.0)], [0.1, 0.2])
    saved(2, 2, [(2, 1.0, 0.0), (7, 3.0, 1.0)], [-0.3, 0.4])
    state = load_state(spark, local)
    assert state is not None and state.batch_id == 2 and state.model.ftrl == FtrlState((-0.3, 0.4), (4.0, 9.0))
    assert state.model.scales == (2.5,)
    # Bins of batches 1 and 2 in score order: -3 -> (1, 4), 2 -> (3, 1), 7 -> (3, 1).
    assert state.auc == pytest.approx(area_under_roc([(1.0, 4.0), (3.0, 1.0), (3.0, 1.0)]), abs=1e-15)
    assert state.champion_bins == {-3: (4.0, 1.0), 2: (1.0, 3.0), 7: (1.0, 3.0)}


@pytest.mark.integration
def test_updates_reach_the_compacted_topic_with_their_generation(running_stack: PlatformConfig) -> None:
    from kafka import KafkaConsumer

    cfg = isolated(running_stack, "ctr-speed-online", topic_prefix="online")
    stack.create_topics(cfg)
    first = LinearModel(NAMES, (0.1, 0.2, 0.3), -1.0, generation=Horizon.of(impressions=5, clicks=4), updates=1, base_version=2)
    second = LinearModel(NAMES, (0.4, 0.5, 0.6), -0.5, generation=Horizon.of(impressions=7, clicks=6), updates=1, base_version=4)
    publish_updates(cfg, [update_of(first, "ctr"), update_of(second, "ctr", quality=0.7)])
    with pytest.raises(ValueError, match="non-finite"):
        update_of(LinearModel(NAMES, (float("nan"), 0.0, 0.0), 0.0, Horizon.of()), "ctr")

    consumer = KafkaConsumer(
        cfg.kafka.topics.model_updates.name, bootstrap_servers=cfg.kafka.bootstrap_servers,
        auto_offset_reset="earliest", consumer_timeout_ms=10000,
    )  # fmt: skip
    try:
        received = [(m.key, json.loads(m.value)) for m in consumer]
    finally:
        consumer.close()
    assert [key for key, _ in received] == [b"ctr@speed", b"ctr@speed"]
    assert [(v["generation"], v["version"], v["updates"]) for _, v in received] == [
        ({"impressions": 5, "clicks": 4}, 2, 1),
        ({"impressions": 7, "clicks": 6}, 4, 1),
    ]
    last = received[-1][1]
    assert last["linear"] == {"terms": list(NAMES), "weights": [0.4, 0.5, 0.6], "intercept": -0.5} and last["quality"] == 0.7


GOOD_UPDATE = {"registered_model": "ctr", "alias": "speed", "version": 2, "generation": {"impressions": 5, "clicks": 4}}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"version": "2"}, "version"),
        ({"generation": [5, 4]}, "generation"),
        ({"generation": {"impressions": 1.5, "clicks": 4}}, "generation"),
        ({"updates": "3"}, "updates"),
        ({"quality": "high"}, "quality"),
        ({"linear": {"terms": ["position"], "weights": [0.1]}}, "linear"),
        ({"linear": {"terms": ["position", "device=mobile"], "weights": [0.1], "intercept": 0.0}}, "2 terms but 1 weights"),
        ({"linear": {"terms": ["position"], "weights": ["NaN"], "intercept": 0.0}}, "non-finite"),
    ],
)
def test_a_bad_model_update_is_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    from lambda_ml.contract import parse_model_update

    with pytest.raises(ValueError, match=field):
        parse_model_update(json.dumps({**GOOD_UPDATE, **change}).encode())
    listener = ModelUpdateListener("unused:9092", "model-updates", "ctr", ["champion", "speed"], lambda *_: None)
    assert not listener.handle(json.dumps({**GOOD_UPDATE, **change}).encode()) and listener.invalid == 1


# --------------------------------------------------------------------------- the online query


def _land(spark: SparkSession, cfg: PlatformConfig, records: list[producer.Record], first_offset: int = 0, batch_id: int = 0) -> None:
    """Write records to bronze as one ingest micro-batch would."""
    topics = {name: t.name for name, t in cfg.events.topics().items()}
    rows = [(r.key, r.value, topics[r.event_type], 0, first_offset + i, NOW) for i, r in enumerate(records)]
    ingest.ingest_batch(spark.createDataFrame(rows, KAFKA_COLUMNS), batch_id, cfg)


def _design(rows: list[Any], numeric: tuple[str, ...], device_slots: list[str]) -> np.ndarray:
    """The champion pipeline's feature vector, built by hand: numbers, then the one-hot device
    over the indexer's labels plus the unknown slot."""
    return np.array([[float(r[n]) for n in numeric] + [float(r["device"] == d) for d in device_slots] for r in rows])


def _wait(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting until {what}")


def _stretches(rows: list[Any], width: int) -> dict[int, list[Any]]:
    """Rows (with ``_micros``, their event time) by stretch of event time, in order."""
    found: dict[int, list[Any]] = {}
    for r in rows:
        found.setdefault(r["_micros"] // width, []).append(r)
    return dict(sorted(found.items()))


def _closed_until(rows: list[Any], width: int) -> int:
    """Where the newest non-click of ``rows`` closes the stretches: the start of its own."""
    newest = max(r["_micros"] for r in rows if r[LABEL] == 0.0)
    return newest - newest % width


@pytest.mark.integration
@pytest.mark.slow
def test_the_online_query_learns_like_numpy_sgd_whatever_the_label_order_and_reaches_serving(
    running_stack: PlatformConfig, spark: SparkSession, tmp_path: Path
) -> None:
    """The online query learns from final labels, one SGD step per stretch of event time, as a
    NumPy SGD does over the same stretches; labels arriving as time-ordered chunks or as all the
    clicks first then all the non-clicks (as the labels query writes them) give the same
    weights: within rtol 1e-9, the float rounding of Spark's sums in another order."""
    lr, l2, step_minutes = 0.002, 0.01, 15
    width = step_minutes * 60_000_000
    local = isolated(running_stack, "ctr-online", lake_root=tmp_path / "lake", topic_prefix="onl")
    name, inputs = local.mlflow.registered_model, contract.model_inputs(local.features)
    gen = local.generator.model_copy(
        update={"impressions": 1600, "span_hours": 6, "users": 30, "items": 10, "seed": 11, "malformed_fraction": 0.0}
    )
    records, _ = generator.generate(gen, timedelta(minutes=local.ctr.attribution_window_minutes), NOW)
    ingest.ensure_tables(spark, local)
    _land(spark, local, records)

    # The batch layer's own training rows: every labelled impression with its features.
    snapshot = read_snapshot(spark, local)
    impressions, clicks = (frame.cache() for frame in clean_events(snapshot, local))
    as_of = latest_event_time(impressions, clicks)
    assert as_of is not None
    training = build_training_set(impressions, clicks, local, as_of).withColumn("_micros", F.unix_micros("event_time")).cache()
    rows = sorted(training.collect(), key=lambda r: (r["event_time"], r["event_id"]))
    assert len(rows) > 1000 and 0 < sum(r[LABEL] for r in rows) < len(rows)
    first, rest = rows[: 2 * len(rows) // 5], rows[2 * len(rows) // 5 :]
    third = len(rest) // 3
    chunks = [rest[:third], rest[third : 2 * third], rest[2 * third :]]  # three stretches of time, in order

    # A champion fitted on the earliest rows, registered as the batch layer does.
    pipeline, versions = _register_champion(
        spark, local, training.where(F.col("event_id").isin([r["event_id"] for r in first])), snapshot.horizon
    )
    client = MlflowClient(local.mlflow.tracking_uri)

    # NumPy SGD over the final labels' stretches, from the champion's coefficients: micro-batch k
    # learns the stretches its chunks closed (up to the newest non-click so far).
    devices = list(pipeline.stages[0].labelsArray[0])
    slots = devices + ["<unknown>"]
    w = pipeline.stages[-1].coefficients.toArray().astype(np.float64)
    b = float(pipeline.stages[-1].intercept)
    w0, b0 = w.copy(), b
    learned_until = None
    running = _RunningScales()
    per_batch: list[dict[str, Any]] = []
    seen_y, seen_scores, seen_champion = [], [], []  # every row so far: the progressive AUC over the generation
    for k in range(3):
        until = _closed_until([r for c in chunks[: k + 1] for r in c], width)
        closed = [r for r in rest if (learned_until is None or r["_micros"] >= learned_until) and r["_micros"] < until]
        stretches = _stretches(closed, width)
        learned_until = until
        ys, scores, champion_scores, losses, champion_losses = [], [], [], [], []
        for part in stretches.values():
            x, y = _design(part, inputs.numeric, slots), np.array([r[LABEL] for r in part])
            scales = running.add(x)  # each term's, over every row stepped on so far
            champion_losses.append(_reference_step(w0, b0, x, y, lr, l2, scales)[2] * len(y))
            ys.append(y)
            scores.append(x @ w + b)  # scored before learning from the rows
            champion_scores.append(x @ w0 + b0)
            w, b, loss = _reference_step(w, b, x, y, lr, l2, scales)
            losses.append(loss * len(y))
        seen_y += ys
        seen_scores += scores
        seen_champion += champion_scores
        y_all = np.concatenate(ys)
        per_batch.append({
            "rows": len(y_all), "steps": len(stretches), "log_loss": sum(losses) / len(y_all),
            "champion_log_loss": sum(champion_losses) / len(y_all), "auc": roc_auc_score(y_all, np.concatenate(scores)),
            "cumulative_auc": roc_auc_score(np.concatenate(seen_y), np.concatenate(seen_scores)),
            "champion_cumulative_auc": roc_auc_score(np.concatenate(seen_y), np.concatenate(seen_champion)),
            "learned_until": until, "weights": w.copy(), "intercept": b,
        })  # fmt: skip
    updates = [int(u) for u in np.cumsum([p["steps"] for p in per_batch])]
    assert all(p["steps"] >= 2 for p in per_batch)  # several stretches per micro-batch
    assert w[-1] == 0.0  # the unknown slot: never set, never learned
    # Registered once, at the last micro-batch's update count.
    local = local.model_copy(
        update={
            "speed": local.speed.model_copy(
                update={"online": OnlineConfig(learning_rate=lr, l2=l2, step_minutes=step_minutes, register_every=updates[-1])}
            ),
            "serving": local.serving.model_copy(update={"candidate_aliases": (contract.SPEED_ALIAS,)}),
        }
    )
    stack.create_topics(local)

    # The same events in a second lake, whose labels arrive as the labels query writes them under
    # delay: every click first, then every non-click.
    late = isolated(running_stack, "ctr-online", lake_root=tmp_path / "clicks-first" / "lake", topic_prefix="onl-cf")
    late = late.model_copy(update={"speed": late.speed.model_copy(update={
        "report_to_mlflow": False, "online": OnlineConfig(learning_rate=lr, l2=l2, step_minutes=step_minutes, register_every=0),
    })})  # fmt: skip
    stack.create_topics(late)
    ingest.ensure_tables(spark, late)
    _land(spark, late, records)

    # The labels arrive in the silver table one commit at a time; the online query runs after each.
    # As in a `lambda-ml speed run` process, the process-wide MLflow URI is not the server's:
    # the query must reach the registry through its config alone.
    mlflow.set_tracking_uri(f"file:{tmp_path / 'not-the-registry'}")
    label_columns = [f.name for f in label_schema(IMPRESSION).fields]

    def deliver(cfg: PlatformConfig, batch_id: int, part: list[Any]) -> None:
        labels = spark.createDataFrame([(r["event_id"], r[LABEL]) for r in part], "event_id string, label double")
        silver = impressions.join(labels, "event_id").withColumn("impressions_version", F.lit(0).cast("long"))
        merge_labels(silver.select(*label_columns), batch_id, cfg)
        app.run(cfg, ["online"], available_now=True)

    try:
        ensure_labels_table(spark, local)
        for batch_id, chunk in enumerate(chunks):
            deliver(local, batch_id, chunk)
        ensure_labels_table(spark, late)
        deliver(late, 0, [r for r in rest if r[LABEL] == 1.0])
        assert load_state(spark, late) is None  # clicks alone close nothing: nothing learned yet
        deliver(late, 1, [r for r in rest if r[LABEL] == 0.0])
    finally:
        mlflow.set_tracking_uri(local.mlflow.tracking_uri)

    saved = spark.read.format("delta").load(model_table(local)).orderBy("batch_id").collect()
    assert [r["batch_id"] for r in saved] == [0, 1, 2] and [r["updates"] for r in saved] == updates
    assert [r["rows"] for r in saved] == [p["rows"] for p in per_batch]
    assert [r["learned_until"] for r in saved] == [p["learned_until"] for p in per_batch]
    for row, expected in zip(saved, per_batch):
        np.testing.assert_allclose(row["weights"], expected["weights"][:-1], rtol=1e-9, atol=1e-15)
        assert row["intercept"] == pytest.approx(expected["intercept"], rel=1e-9)
    final = saved[-1]
    expected_terms = [*inputs.numeric, *(f"device={d}" for d in devices)]
    assert list(final["terms"]) == expected_terms
    assert (final["generation_impressions"], final["generation_clicks"]) == (snapshot.horizon.version("impressions"), snapshot.horizon.version("clicks"))
    assert final["base_version"] == int(versions.onnx)
    # Clicks first, then non-clicks: one micro-batch learns every closed stretch, to the same weights.
    (clicks_first,) = spark.read.format("delta").load(model_table(late)).collect()
    assert (clicks_first["updates"], clicks_first["learned_until"], clicks_first["rows"]) == (
        final["updates"], final["learned_until"], sum(p["rows"] for p in per_batch)
    )
    np.testing.assert_allclose(clicks_first["weights"], final["weights"], rtol=1e-9, atol=1e-15)
    assert clicks_first["intercept"] == pytest.approx(final["intercept"], rel=1e-9)

    # Progressive validation in MLflow: the NumPy log losses, the champion's on the same rows.
    experiment = client.get_experiment_by_name(metrics_experiment(local))
    (run,) = client.search_runs([experiment.experiment_id], "tags.query = 'online'")
    history = lambda metric: {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}  # noqa: E731
    logged, champion_logged, auc_logged = history("online.log_loss"), history("online.champion_log_loss"), history("online.auc")
    cumulative_logged, champion_cumulative_logged = history("online.cumulative_auc"), history("online.champion_cumulative_auc")
    assert sorted(logged) == [0, 1, 2]
    for step, expected in enumerate(per_batch):
        assert logged[step] == pytest.approx(expected["log_loss"], rel=1e-9)
        assert champion_logged[step] == pytest.approx(expected["champion_log_loss"], rel=1e-9)
        # AUCs rank the rows in log-odds bins of 1e-3 (pairs inside one bin are ties): within 5e-4.
        assert auc_logged[step] == pytest.approx(expected["auc"], abs=5e-4)
        assert cumulative_logged[step] == pytest.approx(expected["cumulative_auc"], abs=5e-4)
        assert champion_cumulative_logged[step] == pytest.approx(expected["champion_cumulative_auc"], abs=5e-4)
    # The later micro-batches' AUCs differ from the first's, so a per-batch figure would not pass for the whole.
    assert abs(cumulative_logged[2] - auc_logged[2]) > 1e-3 or abs(cumulative_logged[2] - auc_logged[0]) > 1e-3
    assert [r["cumulative_auc"] for r in saved] == [cumulative_logged[s] for s in range(3)]
    # The champion's tag, which the quality policy compares, is its AUC over the whole generation.
    champion_tag = client.get_model_version(name, versions.onnx).tags[contract.TAG_QUALITY_SCORE]
    assert float(champion_tag) == pytest.approx(champion_cumulative_logged[2], abs=1e-12)
    # A restart adds the saved micro-batches' bins up again to the same AUC, and goes on from the frontier.
    restarted = load_state(spark, local)
    assert restarted is not None and restarted.auc == pytest.approx(cumulative_logged[2], abs=1e-12)
    assert restarted.learned_until == per_batch[-1]["learned_until"]

    # A replayed micro-batch (its commit lost in a crash) does not step again.
    commits = Path(local.lake.checkpoints) / "online" / "commits"
    (commits / "2").unlink()
    shutil.rmtree(commits / ".2.crc", ignore_errors=True)
    (commits / ".2.crc").unlink(missing_ok=True)
    app.run(local, ["online"], available_now=True)
    again = spark.read.format("delta").load(model_table(local)).orderBy("batch_id").collect()
    assert len(again) == 3 and list(again[-1]["weights"]) == list(final["weights"])
    assert len(client.get_metric_history(run.info.run_id, "online.log_loss")) == 3

    # A layer=speed version was registered at the last update, with its generation and update count.
    speed_versions = client.search_model_versions(f"name = '{name}' AND tags.`{contract.TAG_LAYER}` = 'speed'")
    assert sorted(v.tags[contract.TAG_FLAVOR] for v in speed_versions) == ["onnx", "spark"]
    onnx_version = next(v for v in speed_versions if v.tags[contract.TAG_FLAVOR] == "onnx")
    assert onnx_version.tags[contract.TAG_SPEED_UPDATES] == str(updates[-1]) and onnx_version.tags[contract.TAG_PARITY] == "passed"
    assert Horizon.from_tags(onnx_version.tags) == snapshot.horizon
    assert client.get_model_version_by_alias(name, contract.SPEED_ALIAS).version == onnx_version.version

    # Serving: the store loads the champion and the registered speed version, then the update
    # from the compacted topic replaces it with the model in memory; stale updates are ignored.
    store = ModelStore.from_config(local, CtrServingModels())
    registered_speed = store.reload().by_alias[contract.SPEED_ALIAS]
    assert registered_speed.linear is None and registered_speed.version == int(onnx_version.version)
    listener = ModelUpdateListener(
        local.kafka.bootstrap_servers, local.kafka.topics.model_updates.name, name, local.serving.aliases, store.reload
    )
    listener.start()
    try:
        # The records come in order (one per micro-batch, then the last again from the replay).
        served = _wait(
            lambda: (s := store.current) and s.by_alias[contract.SPEED_ALIAS].updates == updates[-1] and s, 30, "the last update is applied"
        )
        speed = served.by_alias[contract.SPEED_ALIAS]
        assert speed.linear is not None and speed.version == int(versions.onnx) and speed.horizon == snapshot.horizon
        assert speed.quality == pytest.approx(cumulative_logged[2], abs=1e-12)  # what the quality policy compares
        sample = [r.asDict() for r in chunks[0][:50]]
        expected = 1 / (1 + np.exp(-(_design(sample, inputs.numeric, slots) @ w + b)))
        np.testing.assert_allclose(speed.predict(build_model_inputs(sample, speed.inputs)), expected, rtol=1e-5)
        np.testing.assert_allclose(registered_speed.predict(build_model_inputs(sample, registered_speed.inputs)), expected, rtol=1e-4)
        # Policies: latest prefers the online model to the champion it started from.
        from lambda_ml_apps.ctr.policies import PolicyRunner

        runner = PolicyRunner("mean", 1.0, 0.05)
        try:
            assert runner.answer("latest", served, lambda m: np.zeros(1), 1).models == (speed,)
        finally:
            runner.close()
        # An older generation, and fewer updates in the same generation: both ignored.
        other = LinearWeights(tuple(inputs.numeric), (0.0,) * len(inputs.numeric), 5.0)
        older = Horizon.of(impressions=snapshot.horizon.version("impressions") - 1, clicks=snapshot.horizon.version("clicks"))  # type: ignore[operator]
        publish_updates(local, [
            ModelUpdate(name, contract.SPEED_ALIAS, int(versions.onnx), older, 99, None, other),
            ModelUpdate(name, contract.SPEED_ALIAS, int(versions.onnx), snapshot.horizon, 1, None, other),
        ])  # fmt: skip
        _wait(lambda: listener.stale >= 2, 30, "the stale updates are seen")
        kept = store.current.by_alias[contract.SPEED_ALIAS] if store.current is not None else None
        assert kept is not None and (kept.linear, kept.updates) == (speed.linear, updates[-1])
    finally:
        listener.stop()
        impressions.unpersist()
        clicks.unpersist()
        training.unpersist()


def _register_champion(
    spark: SparkSession, cfg: PlatformConfig, training: DataFrame, horizon: Horizon, final_until: datetime | None = None
) -> Any:
    """A logistic-regression champion fitted on ``training`` and registered as the batch layer
    does (Spark twin and ONNX export; with ``final_until``, the run's ``labels_final_until``);
    returns the fitted pipeline and the registered versions."""
    name, inputs = cfg.mlflow.registered_model, contract.model_inputs(cfg.features)
    pipeline = build_pipeline(cfg, {"reg_param": 0.01, "elastic_net_param": 0.0, "max_iter": 30}).fit(training)
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_experiment(cfg.mlflow.experiment)
    with mlflow.start_run():
        if final_until is not None:
            mlflow.log_param(LABELS_FINAL_UNTIL, final_until.isoformat())
        versions = register_models(pipeline, export_onnx(pipeline, spark, inputs, name), name, horizon)
    MlflowClient(cfg.mlflow.tracking_uri).set_registered_model_alias(name, contract.CHAMPION_ALIAS, versions.onnx)
    return pipeline, versions


@pytest.mark.integration
@pytest.mark.slow
def test_on_a_stationary_stream_the_online_model_scores_within_5_percent_of_the_champion(
    running_stack: PlatformConfig, spark: SparkSession, tmp_path: Path
) -> None:
    """The generator's clicks follow fixed probabilities, so a champion fitted on the stream's
    first quarter stays right for the rest. The rest arrives in bronze in send order, a chunk at
    a time; after each, the real labels query runs, and the online query's micro-batch body
    (shipped config) is fed each labels commit's change feed in turn, as a running online query
    keeping pace with the labels query sees them: clicks at once, non-clicks once the watermark
    closes their window, each commit one kind or the other. Over its whole generation the online
    model's progressive log loss (each row scored before it is learned from) must stay within
    5 % of the champion's on the same rows."""
    local = isolated(running_stack, "ctr-online-stationary", lake_root=tmp_path / "lake", topic_prefix="stat")
    local = local.model_copy(update={"speed": local.speed.model_copy(update={"report_to_mlflow": False})})
    stack.create_topics(local)
    gen = local.generator.model_copy(
        update={"impressions": 3200, "span_hours": 8, "users": 40, "items": 12, "seed": 23, "malformed_fraction": 0.0}
    )
    records, _ = generator.generate(gen, timedelta(minutes=local.ctr.attribution_window_minutes), NOW)
    ingest.ensure_tables(spark, local)
    head = len(records) // 4
    _land(spark, local, records[:head])
    snapshot = read_snapshot(spark, local)
    impressions, clicks = clean_events(snapshot, local)
    as_of = latest_event_time(impressions, clicks)
    assert as_of is not None
    # Registered as a batch run does: it says up to when its training labels were final.
    final_until = labels_final_until(as_of, local.ctr.attribution_window_minutes)
    _register_champion(spark, local, build_training_set(impressions, clicks, local, as_of), snapshot.horizon, final_until)

    learner, fed, batch_id, kinds = OnlineLearner(local), -1, 0, []
    rest = records[head:]
    chunk = -(-len(rest) // 3)
    for part, start in enumerate(range(0, len(rest), chunk), start=1):
        _land(spark, local, rest[start : start + chunk], head + start, part)
        app.run(local, ["labels"], available_now=True)
        newest = DeltaTable.forPath(spark, labels_path(local)).history(1).first()["version"]
        for version in range(fed + 1, newest + 1):
            changes = (
                spark.read.format("delta").option("readChangeFeed", "true")
                .option("startingVersion", version).option("endingVersion", version).load(labels_path(local))
            )  # fmt: skip
            kinds.append(sorted(r[0] for r in changes.select(LABEL).distinct().collect()))
            learner(changes, batch_id)
            batch_id += 1
        fed = newest
    assert [0.0] in kinds and [1.0] in kinds  # commits of non-clicks alone and of clicks alone

    saved = spark.read.format("delta").load(model_table(local)).collect()
    horizon = (snapshot.horizon.version("impressions"), snapshot.horizon.version("clicks"))
    assert {(r["generation_impressions"], r["generation_clicks"]) for r in saved} == {horizon}
    rows = sum(r["rows"] for r in saved)
    # The generation learned every labelled impression after its champion's training labels
    # and before its frontier, each once, and none the champion had learned from.
    learned_until = max(r["learned_until"] for r in saved)
    labels = spark.read.format("delta").load(labels_path(local)).select(F.unix_micros("event_time").alias("t")).collect()
    final_micros = int(final_until.timestamp() * 1_000_000)
    assert rows == sum(1 for r in labels if final_micros < r["t"] < learned_until)
    assert sum(1 for r in labels if r["t"] <= final_micros) > 500  # the champion's, not learned again
    online_loss = sum(r["rows"] * r["log_loss"] for r in saved) / rows
    champion_loss = sum(r["rows"] * r["champion_log_loss"] for r in saved) / rows
    print(f"progressive log loss over {rows} rows in {len(saved)} micro-batches: online {online_loss:.4f}, champion {champion_loss:.4f}")
    assert rows > 1800
    assert online_loss <= 1.05 * champion_loss

"""Online logistic regression: SGD steps computed with Spark aggregates equal a NumPy reference,
progressive validation scores each batch before learning from it, and updates reach the
compacted model-updates topic stamped with their generation (real Spark and broker)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pyspark.sql import SparkSession
from support import isolated

from lambda_ml import stack
from lambda_ml.config import PlatformConfig
from speed_layer.online import LinearModel, publish_updates, sgd_step, update_record

NAMES = ("x1", "x2", "x3")
TRUE_W, TRUE_B = np.array([1.5, -2.0, 0.5]), -0.3


def _data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, len(NAMES)))
    y = (rng.random(rows) < 1 / (1 + np.exp(-(x @ TRUE_W + TRUE_B)))).astype(float)
    return x, y


def _reference_step(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray, lr: float, l2: float) -> tuple[np.ndarray, float, float]:
    p = 1 / (1 + np.exp(-(x @ w + b)))
    clipped = np.clip(p, 1e-15, 1 - 1e-15)
    loss = float(np.mean(-(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))))
    return w - lr * ((p - y) @ x / len(y) + l2 * w), b - lr * float(np.mean(p - y)), loss


@pytest.mark.integration
def test_sgd_steps_match_numpy_and_validate_before_learning(spark: SparkSession) -> None:
    x, y = _data(2400, seed=1)
    rows = [(*map(float, features), float(label)) for features, label in zip(x, y)]
    frame = spark.createDataFrame(rows, "x1 double, x2 double, x3 double, label double").repartition(3)
    batches = frame.randomSplit([1.0] * 4, seed=5)
    champion = LinearModel(NAMES, (1.0, -1.0, 0.0), 0.0, generation="impressions=5,clicks=4")
    model, w, b = champion, np.array(champion.weights), champion.intercept
    lr, l2 = 0.5, 0.01
    losses = []
    for batch in batches:
        part = np.array([[r.x1, r.x2, r.x3, r.label] for r in batch.collect()])  # the reference's copy only
        model, metrics = sgd_step(batch, model, lr, l2, baseline=champion)
        w_ref, b_ref, loss_ref = _reference_step(w, b, part[:, :3], part[:, 3], lr, l2)
        champion_loss = _reference_step(np.array(champion.weights), champion.intercept, part[:, :3], part[:, 3], lr, l2)[2]
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


@pytest.mark.integration
def test_updates_reach_the_compacted_topic_with_their_generation(running_stack: PlatformConfig) -> None:
    from kafka import KafkaConsumer

    cfg = isolated(running_stack, "ctr-speed-online", topic_prefix="online")
    stack.create_topics(cfg)
    first = LinearModel(NAMES, (0.1, 0.2, 0.3), -1.0, generation="impressions=5,clicks=4", updates=1)
    second = LinearModel(NAMES, (0.4, 0.5, 0.6), -0.5, generation="impressions=7,clicks=6", updates=1)
    publish_updates(cfg, [update_record(first, "ctr", 0), update_record(second, "ctr", 1)])
    with pytest.raises(ValueError, match="non-finite"):
        update_record(LinearModel(NAMES, (float("nan"), 0.0, 0.0), 0.0, "g"), "ctr", 2)

    consumer = KafkaConsumer(
        cfg.kafka.topics.model_updates.name, bootstrap_servers=cfg.kafka.bootstrap_servers,
        auto_offset_reset="earliest", consumer_timeout_ms=10000,
    )  # fmt: skip
    try:
        received = [(m.key, json.loads(m.value)) for m in consumer]
    finally:
        consumer.close()
    assert [key for key, _ in received] == [b"speed:ctr", b"speed:ctr"]
    assert [(v["generation"], v["batch_id"]) for _, v in received] == [("impressions=5,clicks=4", 0), ("impressions=7,clicks=6", 1)]
    assert received[-1][1]["weights"] == {"x1": 0.4, "x2": 0.5, "x3": 0.6} and received[-1][1]["intercept"] == -0.5

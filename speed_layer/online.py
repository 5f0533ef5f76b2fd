"""Online logistic regression for the speed layer: one SGD step per micro-batch of newly
labelled rows, computed with Spark aggregates, and model updates published over Kafka.

A step reads the batch once: a single ``agg`` sums the gradient of the log loss over every
partition (``Σ (p - y)·x`` per weight, ``Σ (p - y)`` for the intercept) together with the log
loss of the model *before* the step and, if given, of a baseline (the champion): progressive
validation, each row scored before it is learned from. Only that one row of sums reaches the
driver, never the batch.

An update travels to the compacted model-updates topic keyed ``speed:<registered model>``,
stamped with its generation (the batch horizon it was warm-started from), so that serving keeps
the last update per key and ignores one from an older generation.

Not wired into the streaming application yet: the labelled rows need their point-in-time
window features, and the warm start needs the champion's weights mapped through its feature
pipeline (see the README's list of what is missing).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from lambda_ml.config import PlatformConfig
from lambda_ml.features import LABEL

# Probabilities are clipped to [EPSILON, 1 - EPSILON] in the log loss (log 0 is -inf).
EPSILON = 1e-15


@dataclass(frozen=True)
class LinearModel:
    """A logistic regression over named numeric columns, and where it comes from."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    intercept: float
    generation: str  # the batch horizon it was warm-started from, e.g. "impressions=5,clicks=4"
    updates: int = 0  # SGD steps taken since the warm start

    def __post_init__(self) -> None:
        if len(self.names) != len(self.weights):
            raise ValueError(f"{len(self.names)} feature names but {len(self.weights)} weights")

    def probability(self) -> Column:
        """P(click) of each row as a Spark column: ``sigmoid(intercept + Σ w·x)``."""
        margin = F.lit(self.intercept)
        for name, weight in zip(self.names, self.weights):
            margin = margin + F.col(name).cast("double") * F.lit(weight)
        return F.lit(1.0) / (F.lit(1.0) + F.exp(-margin))


@dataclass(frozen=True)
class StepMetrics:
    rows: int
    log_loss: float | None  # of the model before the step, on the batch (progressive validation)
    baseline_log_loss: float | None  # of the baseline (champion) on the same rows


def _log_loss(p: Column, y: Column) -> Column:
    clipped = F.least(F.greatest(p, F.lit(EPSILON)), F.lit(1 - EPSILON))
    return -(y * F.log(clipped) + (F.lit(1.0) - y) * F.log(F.lit(1.0) - clipped))


def sgd_step(
    batch: DataFrame, model: LinearModel, learning_rate: float, l2: float = 0.0, baseline: LinearModel | None = None
) -> tuple[LinearModel, StepMetrics]:
    """One step of SGD on the mean log loss (+ ``l2/2·|w|²``) over ``batch`` (the model's
    columns and ``label``); the model unchanged if the batch is empty."""
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    p, y = model.probability(), F.col(LABEL).cast("double")
    error = p - y
    sums = [F.count(F.lit(1)).alias("rows"), F.sum(error).alias("g_intercept"), F.sum(_log_loss(p, y)).alias("loss")]
    sums += [F.sum(error * F.col(name).cast("double")).alias(f"g_{i}") for i, name in enumerate(model.names)]
    if baseline is not None:
        sums.append(F.sum(_log_loss(baseline.probability(), y)).alias("baseline_loss"))
    row = batch.agg(*sums).first()
    assert row is not None  # a global aggregate has one row
    n = int(row["rows"])
    if n == 0:
        return model, StepMetrics(0, None, None)
    weights = tuple(
        w - learning_rate * (float(row[f"g_{i}"]) / n + l2 * w) for i, w in enumerate(model.weights)
    )
    intercept = model.intercept - learning_rate * float(row["g_intercept"]) / n
    baseline_loss = float(row["baseline_loss"]) / n if baseline is not None else None
    stepped = replace(model, weights=weights, intercept=intercept, updates=model.updates + 1)
    return stepped, StepMetrics(n, float(row["loss"]) / n, baseline_loss)


def update_record(model: LinearModel, registered_model: str, batch_id: int) -> tuple[bytes, bytes]:
    """The Kafka key and value of a model update (JSON), keyed per registered model so that the
    compacted topic keeps the latest one."""
    if not all(math.isfinite(w) for w in (*model.weights, model.intercept)):
        raise ValueError("refusing to publish a model with non-finite weights")
    value = {
        "layer": "speed",
        "model": registered_model,
        "generation": model.generation,
        "updates": model.updates,
        "batch_id": batch_id,
        "intercept": model.intercept,
        "weights": dict(zip(model.names, model.weights)),
    }
    return f"speed:{registered_model}".encode(), json.dumps(value, sort_keys=True).encode()


def publish_updates(cfg: PlatformConfig, records: list[tuple[bytes, bytes]]) -> None:
    """Send model updates to the model-updates topic (acks=all; at least once, idempotent by
    key and generation on the consumer side)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, acks="all")
    try:
        for key, value in records:
            producer.send(cfg.kafka.topics.model_updates.name, key=key, value=value)
        producer.flush()
    finally:
        producer.close()

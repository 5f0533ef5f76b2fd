"""The speed layer's online model: a logistic regression learning from each micro-batch of newly
labelled impressions, between two batch runs.

The ``online`` query reads the silver labels' change feed (the impressions whose label just
became known). Each micro-batch (:class:`OnlineLearner`):

1. attaches the labelled impressions' point-in-time window features with the batch layer's own
   code (:func:`lambda_ml.features.add_window_features` over the bronze events before them), so
   the model sees what the batch model was trained on and what serving computes;
2. scores every row with the current model *and* with the champion before learning from it
   (progressive validation: log loss and AUC of both, to MLflow, step = micro-batch id). The
   AUC is also kept over the whole generation so far (``cumulative_auc``: the micro-batches'
   log-odds bins, :func:`batch_layer.evaluation.auc_bins`, add up, so no row is kept): the
   champion's as its version tag ``quality.progressive_auc``, the online model's in its update,
   so that serving's ``quality`` policy compares the two on the same rows, and on all of them
   rather than on the last micro-batch's few hundred;
3. takes one step on the mean log loss, SGD (``+ l2/2·|w|²``) or FTRL-Proximal
   (``speed.online.algorithm``: per-coordinate step sizes, exact zeros with ``l1``): a single
   Spark aggregate sums the gradient over every partition, and only that one row of sums
   reaches the driver;
4. saves the model in ``speed/online_model`` (one row per micro-batch, an idempotent Delta
   append keyed by the batch id) and publishes it to the compacted model-updates topic
   (``lambda_ml.contract.ModelUpdate``, alias ``speed``, stamped with its generation);
5. every ``speed.online.register_every`` updates, registers it in MLflow (see
   :mod:`speed_layer.online_registry`).

The model starts from the champion's weights (a Spark logistic regression: its coefficients are
on the raw feature scale, one-hot terms ``<input>=<category>`` from its string indexer), and
starts again from the new champion when the alias moves: its generation is the champion's bronze
horizon. A champion that is not a logistic regression is still the baseline it is validated
against, but the weights come from the latest registered logistic regression, else zeros.
Categories the model has not seen yet join it with weight 0 (what a wider model would hold).

A restart resumes from the last saved micro-batch; a micro-batch replayed after a crash finds
its row already saved and does not step again (its update is published again: at least once,
idempotent by key, generation and update count).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType, LongType, StringType, StructField, StructType

from batch_layer.evaluation import AucBins, add_bins, area_under_roc, auc_bins, sorted_bins
from lambda_ml import buckets, contract
from lambda_ml.config import OnlineConfig, PlatformConfig
from lambda_ml.contract import INDICATOR, Horizon, LinearWeights, ModelInputs, ModelUpdate
from lambda_ml.features import (
    IMPRESSION_FIELDS,
    LABEL,
    add_window_features,
    after_horizon,
    attribute_clicks,
    dedup_events,
    feature_events,
    merge_buckets,
)
from lambda_ml.schemas import CLICK, IMPRESSION
from speed_layer.ingest import bronze_path

log = logging.getLogger(__name__)

# Probabilities are clipped to [EPSILON, 1 - EPSILON] in the log loss (log 0 is -inf).
EPSILON = 1e-15
MODEL_TABLE = ("speed", "online_model")
SPEED_P, CHAMPION_P = "_speed_p", "_champion_p"


def term_column(term: str) -> Column:
    """The value of one term on a row: a numeric input as a double, or 1.0 / 0.0 for an
    ``<input>=<category>`` indicator."""
    name, _, value = term.partition(INDICATOR)
    if value:
        return F.coalesce((F.col(name).cast("string") == F.lit(value)).cast("double"), F.lit(0.0))
    return F.col(name).cast("double")


@dataclass(frozen=True)
class FtrlState:
    """FTRL-Proximal's accumulators per coordinate: the weights' in order, the intercept's last."""

    z: tuple[float, ...]
    n: tuple[float, ...]


@dataclass(frozen=True)
class LinearModel:
    """A logistic regression over named terms (see :func:`term_column`), and where it comes from."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    intercept: float
    generation: Horizon  # the batch horizon it was warm-started from
    updates: int = 0  # steps taken since the warm start
    base_version: int = 0  # the registry version it was warm-started from (0: none)
    ftrl: FtrlState | None = None  # FTRL-Proximal's per-coordinate state, when it learns with FTRL
    # Each term's scale (root mean square on the first micro-batch it appeared in; None until
    # then): steps are taken on the standardised terms x / scale, so that a count in the
    # thousands and a rate near 0.05 move the margin alike.
    scales: tuple[float | None, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.names) != len(self.weights):
            raise ValueError(f"{len(self.names)} feature names but {len(self.weights)} weights")
        if self.scales is not None and len(self.scales) != len(self.weights):
            raise ValueError(f"{len(self.scales)} scales for {len(self.weights)} weights")
        if self.ftrl is not None and len(self.ftrl.z) != len(self.weights) + 1:
            raise ValueError(f"FTRL state for {len(self.ftrl.z) - 1} weights, the model has {len(self.weights)}")

    def probability(self) -> Column:
        """P(click) of each row as a Spark column: ``sigmoid(intercept + Σ w·x)``."""
        margin = F.lit(self.intercept)
        for name, weight in zip(self.names, self.weights):
            margin = margin + term_column(name) * F.lit(weight)
        return F.lit(1.0) / (F.lit(1.0) + F.exp(-margin))

    def with_terms(self, terms: list[str]) -> LinearModel:
        """The model with ``terms`` it lacks appended at weight 0 (same predictions)."""
        new = [t for t in terms if t not in self.names]
        if not new:
            return self
        ftrl = self.ftrl
        if ftrl is not None:  # a new weight 0 is z = n = 0; the intercept's state stays last
            zeros = (0.0,) * len(new)
            ftrl = FtrlState(ftrl.z[:-1] + zeros + ftrl.z[-1:], ftrl.n[:-1] + zeros + ftrl.n[-1:])
        scales = None if self.scales is None else self.scales + (None,) * len(new)
        return replace(self, names=self.names + tuple(new), weights=self.weights + (0.0,) * len(new), ftrl=ftrl, scales=scales)

    def scaled(self, rms: tuple[float, ...]) -> LinearModel:
        """The model with a scale for every term: those it has kept, ``rms`` (of this batch)
        for the others (1 for a term that was 0 on every row)."""
        known = self.scales or (None,) * len(self.weights)
        return replace(self, scales=tuple(s if s is not None else (r if r > 0 else 1.0) for s, r in zip(known, rms)))

    def as_weights(self) -> LinearWeights:
        return LinearWeights(self.names, self.weights, self.intercept)


def zero_model(inputs: ModelInputs) -> LinearModel:
    """All weights 0 over the numeric inputs (categories join as they are seen)."""
    return LinearModel(inputs.numeric, (0.0,) * len(inputs.numeric), 0.0, Horizon())


@dataclass(frozen=True)
class StepMetrics:
    rows: int
    log_loss: float | None  # of the model before the step, on the batch (progressive validation)
    baseline_log_loss: float | None  # of the baseline (champion) on the same rows
    positives: int = 0


def _log_loss(p: Column, y: Column) -> Column:
    clipped = F.least(F.greatest(p, F.lit(EPSILON)), F.lit(1 - EPSILON))
    return -(y * F.log(clipped) + (F.lit(1.0) - y) * F.log(F.lit(1.0) - clipped))


@dataclass(frozen=True)
class Gradient:
    """The mean log-loss gradient of a model over a batch, and what it was scored (before the step)."""

    weights: tuple[float, ...]
    intercept: float
    metrics: StepMetrics
    rms: tuple[float, ...]  # root mean square of each term over the batch


def batch_gradient(batch: DataFrame, model: LinearModel, baseline: LinearModel | Column | None = None) -> Gradient | None:
    """The mean gradient of the log loss over ``batch`` (the model's columns and ``label``) in
    one Spark aggregate, with the log loss of the model and of ``baseline`` (a model, or a
    column holding its probability) on the same rows; None for an empty batch."""
    p, y = model.probability(), F.col(LABEL).cast("double")
    error = p - y
    sums = [
        F.count(F.lit(1)).alias("rows"),
        F.sum(y).alias("positives"),
        F.sum(error).alias("g_intercept"),
        F.sum(_log_loss(p, y)).alias("loss"),
    ]
    sums += [F.sum(error * term_column(name)).alias(f"g_{i}") for i, name in enumerate(model.names)]
    sums += [F.sum(term_column(name) * term_column(name)).alias(f"x2_{i}") for i, name in enumerate(model.names)]
    if baseline is not None:
        q = baseline.probability() if isinstance(baseline, LinearModel) else baseline
        sums.append(F.sum(_log_loss(q, y)).alias("baseline_loss"))
    row = batch.agg(*sums).first()
    assert row is not None  # a global aggregate has one row
    n = int(row["rows"])
    if n == 0:
        return None
    baseline_loss = float(row["baseline_loss"]) / n if baseline is not None else None
    return Gradient(
        tuple(float(row[f"g_{i}"]) / n for i in range(len(model.names))),
        float(row["g_intercept"]) / n,
        StepMetrics(n, float(row["loss"]) / n, baseline_loss, int(row["positives"] or 0)),
        tuple(math.sqrt(float(row[f"x2_{i}"] or 0.0) / n) for i in range(len(model.names))),
    )


def scaled_gradient(
    batch: DataFrame, model: LinearModel, baseline: LinearModel | Column | None = None
) -> tuple[LinearModel, Gradient] | None:
    """:func:`batch_gradient`, and the model with a scale for every term (new terms take this
    batch's root mean square); None for an empty batch. What every step starts from."""
    gradient = batch_gradient(batch, model, baseline)
    return None if gradient is None else (model.scaled(gradient.rms), gradient)


def sgd_step(
    batch: DataFrame,
    model: LinearModel,
    learning_rate: float,
    l2: float = 0.0,
    baseline: LinearModel | Column | None = None,
) -> tuple[LinearModel, StepMetrics]:
    """One step of SGD on the mean log loss (+ ``l2/2·|w̃|²``) over ``batch`` (the model's
    columns and ``label``), with the log loss before the step of the model and of ``baseline``
    (a model, or a column holding its probability); the model unchanged if the batch is empty.

    The step is taken on the standardised terms (``x / scale``, weights ``w̃ = w·scale``): in
    the raw weights, ``w -= learning_rate · (g / scale² + l2·w)``."""
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    found = scaled_gradient(batch, model, baseline)
    if found is None:
        return model, StepMetrics(0, None, None)
    model, gradient = found
    assert model.scales is not None
    weights = tuple(
        w - learning_rate * (g / (s * s) + l2 * w) for w, g, s in zip(model.weights, gradient.weights, model.scales)  # type: ignore[operator]
    )
    intercept = model.intercept - learning_rate * gradient.intercept
    # An FTRL state no longer matches the weights once SGD moved them.
    return replace(model, weights=weights, intercept=intercept, updates=model.updates + 1, ftrl=None), gradient.metrics


def _ftrl_weight(z: float, n: float, alpha: float, beta: float, l1: float, l2: float) -> float:
    """FTRL-Proximal's closed-form weight of one coordinate."""
    if abs(z) <= l1:
        return 0.0
    return -(z - math.copysign(l1, z)) / ((beta + math.sqrt(n)) / alpha + l2)


def ftrl_start(model: LinearModel, alpha: float, beta: float, l1: float, l2: float) -> LinearModel:
    """The model with an FTRL state (n = 0) whose weights are its own: the warm start. FTRL
    works on the standardised weights ``w̃ = w·scale`` (the model must have its scales); one
    needs ``z = -(w̃·(beta/alpha + l2) + sign(w̃)·l1)``; the intercept is not penalised."""
    assert model.scales is not None and None not in model.scales

    def z_of(w: float, l1: float, l2: float) -> float:
        return -(w * (beta / alpha + l2) + math.copysign(l1, w)) if w else 0.0

    z = tuple(z_of(w * s, l1, l2) for w, s in zip(model.weights, model.scales)) + (z_of(model.intercept, 0.0, 0.0),)  # type: ignore[operator]
    return replace(model, ftrl=FtrlState(z, (0.0,) * len(z)))


def ftrl_step(
    batch: DataFrame,
    model: LinearModel,
    alpha: float,
    beta: float = 1.0,
    l1: float = 0.0,
    l2: float = 0.0,
    baseline: LinearModel | Column | None = None,
) -> tuple[LinearModel, StepMetrics]:
    """One FTRL-Proximal step (McMahan et al., 2013) on the batch's mean log-loss gradient:
    per coordinate of the standardised weights ``w̃ = w·scale`` (gradient ``g / scale``),
    ``sigma = (sqrt(n + g²) - sqrt(n)) / alpha``, ``z += g - sigma·w``,
    ``n += g²``, then the closed-form weight
    ``-(z - sign(z)·l1) / ((beta + sqrt(n)) / alpha + l2)``, exactly 0 while ``|z| <= l1``
    (sparse; the intercept is not penalised). Starts from :func:`ftrl_start` of the model if it
    has no state yet; the model unchanged if the batch is empty."""
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    found = scaled_gradient(batch, model, baseline)
    if found is None:
        return model, StepMetrics(0, None, None)
    model, gradient = found
    if model.ftrl is None:
        model = ftrl_start(model, alpha, beta, l1, l2)
    assert model.ftrl is not None and model.scales is not None
    scales = (*model.scales, 1.0)  # the intercept's term is 1
    z, n, weights = [], [], []
    coordinates = zip((*model.weights, model.intercept), (*gradient.weights, gradient.intercept), scales, model.ftrl.z, model.ftrl.n)
    for i, (w, g, s, z_i, n_i) in enumerate(coordinates):
        w_s, g_s = w * s, g / s  # the standardised weight and its gradient
        sigma = (math.sqrt(n_i + g_s * g_s) - math.sqrt(n_i)) / alpha
        z.append(z_i + g_s - sigma * w_s)
        n.append(n_i + g_s * g_s)
        penalised = i < len(model.weights)
        weights.append(_ftrl_weight(z[-1], n[-1], alpha, beta, l1 if penalised else 0.0, l2 if penalised else 0.0) / s)
    stepped = replace(
        model, weights=tuple(weights[:-1]), intercept=weights[-1], updates=model.updates + 1, ftrl=FtrlState(tuple(z), tuple(n))
    )
    return stepped, gradient.metrics


def learn_step(
    batch: DataFrame, model: LinearModel, online: OnlineConfig, baseline: LinearModel | Column | None = None
) -> tuple[LinearModel, StepMetrics]:
    """One step of the configured algorithm (``speed.online.algorithm``)."""
    if online.algorithm == "ftrl":
        return ftrl_step(batch, model, online.ftrl_alpha, online.ftrl_beta, online.l1, online.l2, baseline)
    return sgd_step(batch, model, online.learning_rate, online.l2, baseline)


def update_of(model: LinearModel, registered_model: str, quality: float | None = None) -> ModelUpdate:
    """The model-update record of an online model (alias ``speed``)."""
    if not all(math.isfinite(w) for w in (*model.weights, model.intercept)):
        raise ValueError("refusing to publish a model with non-finite weights")
    return ModelUpdate(
        registered_model, contract.SPEED_ALIAS, model.base_version, model.generation, model.updates, quality, model.as_weights()
    )


def publish_updates(cfg: PlatformConfig, updates: list[ModelUpdate]) -> None:
    """Send model updates to the model-updates topic (acks=all; at least once, idempotent by
    key and generation on the consumer side)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, acks="all")
    try:
        for update in updates:
            producer.send(cfg.kafka.topics.model_updates.name, key=update.key(), value=update.value())
        producer.flush()
    finally:
        producer.close()


# --------------------------------------------------------------------------- features


def labelled_features(
    labelled: DataFrame,
    impressions: DataFrame,
    clicks: DataFrame,
    cfg: PlatformConfig,
    bucket_rows: Mapping[str, DataFrame] | None = None,
) -> DataFrame:
    """Labelled impressions (silver label rows) with their point-in-time window features.

    ``impressions`` and ``clicks`` are bronze events (deliveries; deduplicated here). Only the
    events that can fall in a window of some labelled row are read: from the start of the
    earliest row's bucket less the longest window (less the attribution window for the
    impressions a click is attributed to) up to the latest row's time. With ``bucket_rows``
    (:func:`merged_bucket_rows`: each entity's view ⊕ the increments after its horizon, what
    serving merges), the whole buckets come from them and bronze is read from the earliest
    row's bucket on only: an hour or so instead of the longest window.
    """
    features = cfg.features
    bounds = labelled.agg(F.min(F.unix_micros("event_time")), F.max(F.unix_micros("event_time"))).first()
    assert bounds is not None
    if bounds[0] is None:
        earliest = latest = 0
    else:
        earliest, latest = int(bounds[0]), int(bounds[1])
    width = buckets.to_micros(features.bucket_width)
    reach = buckets.reach_micros(features)
    if bucket_rows is not None:
        lower = earliest - earliest % width
    else:  # the lifetime window (no reach) reads all of bronze before the rows
        lower = None if reach is None else earliest - earliest % width - reach
    attribution = cfg.ctr.attribution_window_minutes * 60_000_000
    micros = F.unix_micros("event_time")
    imp_kept = clk_kept = micros < latest
    if lower is not None:
        imp_kept, clk_kept = imp_kept & (micros >= lower - attribution), clk_kept & (micros >= lower)
    imp = dedup_events(impressions.select(*IMPRESSION.field_names).where(imp_kept))
    clk = dedup_events(clicks.select(*CLICK.field_names).where(clk_kept))
    events = feature_events(imp, attribute_clicks(imp, clk, cfg.ctr.attribution_window_minutes), features)
    targets = labelled.select("event_id", "event_time", *IMPRESSION_FIELDS, F.col(LABEL).cast("double").alias(LABEL))
    return add_window_features(targets, events, features, bucket_rows)


def merged_bucket_rows(spark: SparkSession, cfg: PlatformConfig) -> dict[str, DataFrame] | None:
    """Each entity's bucket rows as serving merges them: its batch view ⊕ the speed layer's
    increments after the view's horizon; None while some entity has no view (no batch run yet).

    They equal the bucket rows of every event in bronze (the lambda contract) for the buckets
    the increments query has caught up with; events its watermark dropped count from the next
    batch run on, as in serving.
    """
    from delta.tables import DeltaTable

    from speed_layer.increments import increments_path, view_horizon

    rows = {}
    for name, entity in cfg.features.entities.items():
        view_path = cfg.lake.table(*contract.view_table(name))
        if not DeltaTable.isDeltaTable(spark, view_path):
            return None
        parts = [spark.read.format("delta").load(view_path)]
        if DeltaTable.isDeltaTable(spark, increments_path(cfg, name)):
            increments = spark.read.format("delta").load(increments_path(cfg, name))
            parts.append(after_horizon(increments, view_horizon(spark, cfg, name)))
        rows[name] = merge_buckets(parts, entity, cfg.features)
    return rows


# --------------------------------------------------------------------------- state


BIN_TYPE = StructType(
    [StructField("bin", LongType(), False), StructField("positives", DoubleType(), False), StructField("negatives", DoubleType(), False)]
)
STATE_SCHEMA = StructType(
    [
        StructField("batch_id", LongType(), False),
        StructField("generation_impressions", LongType(), True),
        StructField("generation_clicks", LongType(), True),
        StructField("base_version", LongType(), False),
        StructField("updates", LongType(), False),
        StructField("terms", ArrayType(StringType(), False), False),
        StructField("weights", ArrayType(DoubleType(), False), False),
        StructField("intercept", DoubleType(), False),
        StructField("rows", LongType(), False),
        StructField("log_loss", DoubleType(), True),
        StructField("champion_log_loss", DoubleType(), True),
        StructField("auc", DoubleType(), True),
        StructField("champion_auc", DoubleType(), True),
        StructField("champion_version", LongType(), True),
        # Progressive AUC over the generation so far, and this micro-batch's log-odds bins it
        # sums (bin, positives, negatives): a restart adds the bins of the generation's rows.
        StructField("cumulative_auc", DoubleType(), True),
        StructField("champion_cumulative_auc", DoubleType(), True),
        StructField("auc_bins", ArrayType(BIN_TYPE, False), True),
        StructField("champion_auc_bins", ArrayType(BIN_TYPE, False), True),
        # FTRL-Proximal's z and n per coordinate (the weights', then the intercept's); null for SGD.
        StructField("ftrl_z", ArrayType(DoubleType(), False), True),
        StructField("ftrl_n", ArrayType(DoubleType(), False), True),
        # Each term's scale (see LinearModel.scales; null for a term not seen in a batch yet).
        StructField("scales", ArrayType(DoubleType(), True), True),
        # The streaming query (its checkpoint) whose micro-batch this was: batch ids restart
        # from 0 with a new checkpoint, and only the same query's ids mean a replay.
        StructField("query_id", StringType(), True),
        # Counts the saved rows: the latest is the one with the highest (batch ids restart).
        StructField("sequence", LongType(), False),
    ]
)


def model_table(cfg: PlatformConfig) -> str:
    return cfg.lake.table(*MODEL_TABLE)


@dataclass(frozen=True)
class SavedState:
    batch_id: int
    model: LinearModel
    champion_version: int | None
    auc: float | None  # progressive AUC over the generation so far (the update's quality)
    query_id: str | None = None
    sequence: int = 0
    bins: AucBins | None = None  # the generation's log-odds bins, the online model's
    champion_bins: AucBins | None = None  # and the champion's, on the same rows

    def continues(self, model: LinearModel, champion_version: int | None) -> bool:
        """Whether ``model`` belongs to this state's generation (its bins go on adding up)."""
        mine = self.model
        return (mine.generation, mine.base_version, self.champion_version) == (model.generation, model.base_version, champion_version)


def _bins_of(rows: Any) -> AucBins:
    return {int(r["bin"]): (float(r["positives"]), float(r["negatives"])) for r in rows or ()}


def _bin_rows(bins: AucBins) -> list[dict[str, Any]]:
    return [{"bin": index, "positives": p, "negatives": n} for index, (p, n) in sorted(bins.items())]


def cumulative_auc(bins: AucBins | None) -> float | None:
    """The AUC of bins (None without both classes)."""
    value = area_under_roc(sorted_bins(bins or {}))
    return None if math.isnan(value) else value


def load_state(spark: SparkSession, cfg: PlatformConfig) -> SavedState | None:
    """The model saved by the latest micro-batch, None if none was saved yet."""
    from delta.tables import DeltaTable

    path = model_table(cfg)
    if not DeltaTable.isDeltaTable(spark, path):
        return None
    saved = spark.read.format("delta").load(path)
    row = saved.orderBy(F.col("sequence").desc()).limit(1).first()
    if row is None:
        return None
    generation = Horizon(row["generation_impressions"], row["generation_clicks"])
    ftrl = None
    if "ftrl_z" in saved.columns and row["ftrl_z"] is not None:
        ftrl = FtrlState(tuple(row["ftrl_z"]), tuple(row["ftrl_n"]))
    scales = tuple(row["scales"]) if "scales" in saved.columns and row["scales"] is not None else None
    model = LinearModel(
        tuple(row["terms"]), tuple(row["weights"]), row["intercept"], generation, row["updates"], row["base_version"], ftrl, scales
    )
    # The progressive-validation bins of every micro-batch of the same generation.
    same = F.lit(True)
    for column in ("generation_impressions", "generation_clicks", "base_version", "champion_version"):
        same = same & F.col(column).eqNullSafe(row[column])
    bins: AucBins = {}
    champion_bins: AucBins = {}
    if "auc_bins" in saved.columns:  # rows saved before the bins were kept have none
        for part in saved.where(same).select("auc_bins", "champion_auc_bins").collect():
            bins, champion_bins = add_bins(bins, _bins_of(part[0])), add_bins(champion_bins, _bins_of(part[1]))
    return SavedState(
        row["batch_id"], model, row["champion_version"], cumulative_auc(bins), row["query_id"], row["sequence"], bins, champion_bins
    )


def checkpoint_query_id(spark: SparkSession, cfg: PlatformConfig) -> str | None:
    """The id of the online query, from its checkpoint's metadata (kept across restarts)."""
    from pyspark.errors import AnalysisException

    from speed_layer.app import checkpoint

    try:
        row = spark.read.text(f"{checkpoint(cfg, 'online')}/metadata").first()
    except AnalysisException:
        return None
    return None if row is None else str(json.loads(row[0]).get("id"))


def save_state(spark: SparkSession, cfg: PlatformConfig, batch_id: int, state: dict[str, Any]) -> None:
    """Append one micro-batch's model, once: a replayed batch id of the same query (checkpoint)
    is skipped by Delta."""
    frame = spark.createDataFrame([{"batch_id": batch_id, **state}], STATE_SCHEMA)
    (
        # mergeSchema: a table saved before a column was added gains it.
        frame.coalesce(1).write.format("delta").mode("append").option("mergeSchema", "true")
        .option("txnAppId", f"online-model:{state.get('query_id')}").option("txnVersion", batch_id)
        .save(model_table(cfg))
    )  # fmt: skip


# --------------------------------------------------------------------------- champion


@dataclass
class Champion:
    """The registry's champion as the online query uses it: its version, its Spark pipeline (the
    baseline it is validated against) and the weights the online model starts from."""

    version: int | None
    pipeline: Any = None  # a Spark PipelineModel, None without a champion
    start: LinearModel | None = None
    linear: LinearModel | None = None  # the champion itself, when it is a logistic regression

    def probability(self, frame: DataFrame) -> tuple[DataFrame, Column | None]:
        """``frame`` with the champion's P(click) as a column (None without a champion)."""
        if self.linear is not None:
            return frame.withColumn(CHAMPION_P, self.linear.probability()), F.col(CHAMPION_P)
        if self.pipeline is None:
            return frame, None
        from pyspark.ml.functions import vector_to_array

        scored = self.pipeline.transform(frame)
        extra = [c for c in scored.columns if c not in frame.columns]
        scored = scored.withColumn(CHAMPION_P, vector_to_array("probability")[1]).drop(*extra)
        return scored, F.col(CHAMPION_P)


def linear_from_pipeline(pipeline: Any, inputs: ModelInputs) -> tuple[tuple[str, ...], tuple[float, ...], float] | None:
    """A fitted Spark pipeline's logistic regression as (terms, weights, intercept), None when
    its classifier is not a binary logistic regression over ``inputs``.

    The batch pipeline assembles the numeric inputs, then each categorical input one-hot encoded
    over its string indexer's labels plus one slot for an unknown category (the indexer keeps
    unknowns): one ``<input>=<label>`` term per label. The unknown slot never holds a 1 in
    training, so its coefficient is 0 and unknown categories add nothing, as in the online model.
    """
    from pyspark.ml.classification import LogisticRegressionModel
    from pyspark.ml.feature import StringIndexerModel

    classifier = pipeline.stages[-1]
    if not isinstance(classifier, LogisticRegressionModel) or classifier.numClasses != 2:
        return None
    labels: dict[str, list[str]] = {}
    for stage in pipeline.stages:
        if isinstance(stage, StringIndexerModel):
            labels.update(zip(stage.getInputCols(), stage.labelsArray))
    if any(name not in labels for name in inputs.categorical):
        return None
    coefficients = [float(c) for c in classifier.coefficients.toArray()]
    if len(coefficients) != len(inputs.numeric) + sum(len(labels[n]) + 1 for n in inputs.categorical):
        return None
    terms, weights = list(inputs.numeric), coefficients[: len(inputs.numeric)]
    at = len(inputs.numeric)
    for name in inputs.categorical:
        terms += [f"{name}{INDICATOR}{label}" for label in labels[name]]
        weights += coefficients[at : at + len(labels[name])]
        at += len(labels[name]) + 1  # past the unknown slot
    return tuple(terms), tuple(weights), float(classifier.intercept)


def _load_spark_twin(cfg: PlatformConfig, name: str, version: Any) -> Any:
    import mlflow.spark

    twin = version.version if version.tags.get(contract.TAG_FLAVOR) == "spark" else version.tags.get(contract.TAG_SPARK_VERSION)
    if twin is None:
        return None
    # models:/ URIs resolve through the process-wide tracking URI, which nothing else in a
    # `lambda-ml speed run` process sets: without it they went to a local store and the
    # registered model was "not found".
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    return mlflow.spark.load_model(f"models:/{name}/{twin}")


def find_champion(cfg: PlatformConfig) -> Champion:
    """The champion and the weights to start from (see the module docstring); raises if the
    registry cannot be read."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, inputs = cfg.mlflow.registered_model, contract.model_inputs(cfg.features)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    try:
        version = client.get_model_version_by_alias(name, contract.CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc.message):
            log.info("no %s@%s yet: the online model starts from zeros", name, contract.CHAMPION_ALIAS)
            return Champion(None, start=zero_model(inputs))
        raise
    pipeline = _load_spark_twin(cfg, name, version)
    number, horizon = int(version.version), Horizon.from_tags(version.tags)
    linear = linear_from_pipeline(pipeline, inputs) if pipeline is not None else None
    if linear is not None:
        model = LinearModel(*linear, generation=horizon, base_version=number)
        log.info("online model starts from champion %s v%d (%s)", name, number, horizon)
        return Champion(number, pipeline, model, model)
    log.warning(
        "champion %s v%d is not a logistic regression over the declared inputs: it stays the baseline, and the online "
        "model starts from the latest registered logistic regression instead",
        name, number,
    )  # fmt: skip
    for candidate in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: -int(v.version)):
        tags = candidate.tags or {}
        if tags.get(contract.TAG_FLAVOR) != "onnx" or tags.get(contract.TAG_LAYER) == "speed" or not candidate.run_id:
            continue
        if client.get_run(candidate.run_id).data.params.get("ctr.model") != "lr":
            continue
        other = _load_spark_twin(cfg, name, candidate)
        found = linear_from_pipeline(other, inputs) if other is not None else None
        if found is not None:
            log.info("online model starts from logistic regression %s v%s", name, candidate.version)
            start = LinearModel(*found, generation=Horizon.from_tags(tags), base_version=int(candidate.version))
            return Champion(number, pipeline, start)
    log.warning("no logistic regression is registered: the online model starts from zeros")
    return Champion(number, pipeline, replace(zero_model(inputs), generation=horizon, base_version=number))


def champion_version(cfg: PlatformConfig) -> int | None:
    """The version the champion alias points at now (None without one); raises if unreachable."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        version = MlflowClient(cfg.mlflow.tracking_uri).get_model_version_by_alias(cfg.mlflow.registered_model, contract.CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc.message):
            return None
        raise
    return int(version.version)


# --------------------------------------------------------------------------- the query


@dataclass(frozen=True)
class Progress:
    """Progressive-validation log-odds bins of the online model and of the champion (empty
    without a champion), over one micro-batch or a whole generation."""

    bins: AucBins
    champion_bins: AucBins


@dataclass
class OnlineLearner:
    """The ``foreachBatch`` body of the ``online`` query (see the module docstring)."""

    cfg: PlatformConfig
    state: SavedState | None = None
    champion: Champion | None = None
    run_id: str | None = None
    query_id: str | None = None  # the id in the query's checkpoint
    _run_key: str = ""
    published: int = 0  # updates this process published
    _merged_views: bool | None = None  # where the last micro-batch's whole buckets came from

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        spark = batch.sparkSession
        cfg, online = self.cfg, self.cfg.speed.online
        if self.state is None:
            self.state = load_state(spark, cfg)
        if self.query_id is None:
            self.query_id = checkpoint_query_id(spark, cfg)
        query_id = self.query_id
        if self.state is not None and self.state.query_id == query_id and self.state.batch_id >= batch_id:
            log.info("online micro-batch %d was learned from before (replayed): no new step", batch_id)
            self._publish(update_of(self.state.model, cfg.mlflow.registered_model, self.state.auc))
            return
        labelled = batch.where(F.col("_change_type") == "insert").drop("_change_type", "_commit_version", "_commit_timestamp")
        model = self._current_model(spark)
        impressions = spark.read.format("delta").load(bronze_path(cfg, "impressions"))
        clicks = spark.read.format("delta").load(bronze_path(cfg, "clicks"))
        inputs = contract.model_inputs(cfg.features)
        bucket_rows = merged_bucket_rows(spark, cfg)
        if (bucket_rows is not None) != self._merged_views:
            self._merged_views = bucket_rows is not None
            log.info(
                "online features: whole buckets from %s",
                "the batch views merged with the speed increments (as serving)" if bucket_rows is not None
                else "bronze over the longest window (no batch views yet)",
            )  # fmt: skip
        featured = labelled_features(labelled, impressions, clicks, cfg, bucket_rows).select(
            *[F.col(n).cast("double").alias(n) for n in inputs.numeric],
            *[F.col(n).cast("string").alias(n) for n in inputs.categorical],
            F.col(LABEL),
        )
        assert self.champion is not None
        featured, champion_p = self.champion.probability(featured)
        featured = featured.persist()
        try:
            seen = featured.select(*inputs.categorical).distinct().collect() if inputs.categorical else []
            terms = sorted({f"{n}{INDICATOR}{row[n]}" for row in seen for n in inputs.categorical if row[n] is not None})
            model = model.with_terms(terms)
            scored = featured.withColumn(SPEED_P, model.probability())
            stepped, metrics = learn_step(scored, model, online, F.col(CHAMPION_P) if champion_p is not None else None)
            if metrics.rows == 0:
                log.info("online micro-batch %d: no newly labelled impressions", batch_id)
                return
            bins = Progress(auc_bins(scored, SPEED_P), auc_bins(scored, CHAMPION_P) if champion_p is not None else {})
            self._commit(spark, batch_id, query_id, stepped, metrics, bins, featured)
        finally:
            featured.unpersist()

    def _commit(
        self,
        spark: SparkSession,
        batch_id: int,
        query_id: str | None,
        stepped: LinearModel,
        metrics: StepMetrics,
        batch: Progress,
        featured: DataFrame,
    ) -> None:
        """Save the stepped model for ``batch_id``, then report, publish and maybe register it."""
        cfg, online = self.cfg, self.cfg.speed.online
        assert self.champion is not None
        sequence = 0 if self.state is None else self.state.sequence + 1
        so_far = batch
        if self.state is not None and self.state.continues(stepped, self.champion.version):
            so_far = Progress(add_bins(self.state.bins or {}, batch.bins), add_bins(self.state.champion_bins or {}, batch.champion_bins))
        auc, champion_auc = cumulative_auc(batch.bins), cumulative_auc(batch.champion_bins)
        total_auc, champion_total_auc = cumulative_auc(so_far.bins), cumulative_auc(so_far.champion_bins)
        state = {
            "generation_impressions": stepped.generation.impressions,
            "generation_clicks": stepped.generation.clicks,
            "base_version": stepped.base_version,
            "updates": stepped.updates,
            "terms": list(stepped.names),
            "weights": list(stepped.weights),
            "intercept": stepped.intercept,
            "rows": metrics.rows,
            "log_loss": metrics.log_loss,
            "champion_log_loss": metrics.baseline_log_loss,
            "auc": auc,
            "champion_auc": champion_auc,
            "champion_version": self.champion.version,
            "cumulative_auc": total_auc,
            "champion_cumulative_auc": champion_total_auc,
            "auc_bins": _bin_rows(batch.bins),
            "champion_auc_bins": _bin_rows(batch.champion_bins),
            "ftrl_z": None if stepped.ftrl is None else list(stepped.ftrl.z),
            "ftrl_n": None if stepped.ftrl is None else list(stepped.ftrl.n),
            "scales": None if stepped.scales is None else list(stepped.scales),
            "query_id": query_id,
            "sequence": sequence,
        }
        save_state(spark, cfg, batch_id, state)
        self.state = SavedState(batch_id, stepped, self.champion.version, total_auc, query_id, sequence, so_far.bins, so_far.champion_bins)
        log.info(
            "online micro-batch %d: %d labelled impressions (%d clicked); progressive log loss %.4f (champion %s), "
            "AUC %s (champion %s), over the generation so far %s (champion %s); update %d of %s",
            batch_id, metrics.rows, metrics.positives, metrics.log_loss or 0.0, _fmt(metrics.baseline_log_loss),
            _fmt(auc), _fmt(champion_auc), _fmt(total_auc), _fmt(champion_total_auc), stepped.updates, stepped.generation,
        )  # fmt: skip
        self._log_metrics(batch_id, metrics, {
            "online.auc": auc, "online.champion_auc": champion_auc,
            "online.cumulative_auc": total_auc, "online.champion_cumulative_auc": champion_total_auc,
        })  # fmt: skip
        self._publish(update_of(stepped, cfg.mlflow.registered_model, total_auc))
        if online.register_every and stepped.updates % online.register_every == 0:
            self._register(spark, stepped, total_auc, batch_id, featured)

    def _current_model(self, spark: SparkSession) -> LinearModel:
        """The model to step: the saved one, or the champion's when the champion moved."""
        try:
            current = champion_version(self.cfg)
        except Exception as exc:  # noqa: BLE001 - an MLflow outage must not stop learning
            log.warning("could not read the champion from MLflow (%s): the online model goes on from its last state", exc)
            current = self.champion.version if self.champion is not None else (self.state.champion_version if self.state else None)
            if self.champion is None:
                self.champion = Champion(current, start=None)
            if self.state is not None:
                return self.state.model
            return zero_model(contract.model_inputs(self.cfg.features))
        if self.champion is None or self.champion.version != current or (current is not None and self.champion.pipeline is None):
            self.champion = find_champion(self.cfg)
        if self.state is not None and self.state.champion_version == self.champion.version:
            return self.state.model
        if self.state is not None:
            log.info(
                "the champion moved (v%s -> v%s): the online model starts again from it", self.state.champion_version, self.champion.version
            )
        assert self.champion.start is not None
        return self.champion.start

    def _publish(self, update: ModelUpdate) -> None:
        try:
            publish_updates(self.cfg, [update])
            self.published += 1
        except Exception as exc:  # noqa: BLE001 - Kafka down: serving keeps the last update; the next one follows
            log.warning("could not publish the online model update (%s)", exc)

    def _log_metrics(self, batch_id: int, metrics: StepMetrics, aucs: dict[str, float | None]) -> None:
        if not self.cfg.speed.report_to_mlflow:
            return
        values = {
            "online.rows": float(metrics.rows),
            "online.log_loss": metrics.log_loss,
            "online.champion_log_loss": metrics.baseline_log_loss,
            **aucs,
            "online.updates": float(self.state.model.updates) if self.state else None,
        }
        champion_auc = aucs["online.champion_cumulative_auc"]
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Metric

            client = MlflowClient(self.cfg.mlflow.tracking_uri)
            assert self.state is not None
            model = self.state.model
            key = f"{model.base_version}:{model.generation.impressions}:{model.generation.clicks}"
            if self.run_id is None or self._run_key != key:
                self.run_id, self._run_key = self._generation_run(client, model, key), key
            now = int(time.time() * 1000)
            client.log_batch(self.run_id, metrics=[Metric(k, v, now, batch_id) for k, v in values.items() if v is not None])
            if champion_auc is not None and self.champion is not None and self.champion.version is not None:
                # The quality policy then compares the champion and the online model on the same rows.
                client.set_model_version_tag(
                    self.cfg.mlflow.registered_model, str(self.champion.version), contract.TAG_QUALITY_SCORE, repr(champion_auc)
                )
        except Exception as exc:  # noqa: BLE001 - an MLflow outage costs metrics, never the stream
            log.warning("could not send the online model's metrics to MLflow (%s)", exc)

    def _generation_run(self, client: Any, model: LinearModel, key: str) -> str:
        """The MLflow run of one generation of the online model, in ``<mlflow.experiment>-speed``,
        found again after a restart: its metrics form one series per generation."""
        from speed_layer.monitor import metrics_experiment

        name = metrics_experiment(self.cfg)
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        found = client.search_runs([experiment_id], f"tags.query = 'online' AND tags.generation = '{key}'", max_results=1)
        if found:
            return str(found[0].info.run_id)
        tags = {
            contract.TAG_LAYER: "speed",
            "query": "online",
            "generation": key,
            "base_version": str(model.base_version),
            **model.generation.tags(),
        }
        run_name = f"online-v{model.base_version}-{model.generation.impressions}-{model.generation.clicks}"
        return str(client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id)

    def _register(self, spark: SparkSession, model: LinearModel, auc: float | None, batch_id: int, rows: DataFrame) -> None:
        try:
            from speed_layer.online_registry import register_speed_version

            register_speed_version(spark, self.cfg, model, rows, auc, batch_id)
        except Exception as exc:  # noqa: BLE001 - registration is periodic; the next one retries
            log.warning("could not register the online model in MLflow (%s)", exc)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def start_online(spark: SparkSession, cfg: PlatformConfig, trigger: Any) -> Any:
    """Start the online query: the silver labels' change feed -> the online model."""
    from speed_layer.app import checkpoint
    from speed_layer.labels import ensure_labels_table, labels_path
    from speed_layer.silver import first_change_feed_version

    ensure_labels_table(spark, cfg)
    changes = (
        spark.readStream.format("delta")
        .option("readChangeFeed", "true")
        .option("startingVersion", first_change_feed_version(spark, labels_path(cfg)))
        .option("maxFilesPerTrigger", cfg.speed.max_files_per_trigger)
        .load(labels_path(cfg))
    )
    writer = (
        changes.writeStream.queryName("online")
        .option("checkpointLocation", checkpoint(cfg, "online"))
        .foreachBatch(OnlineLearner(cfg))
    )
    query = trigger(writer).start()
    log.info("online query started: %s -> %s and %s", labels_path(cfg), model_table(cfg), cfg.kafka.topics.model_updates.name)
    return query

"""The online model's maths: a logistic regression over named terms and its steps.

One step of SGD or FTRL-Proximal on the mean log loss of a batch of rows, its gradient summed by
one Spark aggregate (only that row of sums reaches the driver), on standardised terms; and the
stretches of event time the online query learns from, one step each, once their labels are
final (see :mod:`lambda_ml_apps.ctr.online`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from lambda_ml.config import OnlineConfig
from lambda_ml.contract import INDICATOR, Horizon, LinearWeights, ModelInputs
from lambda_ml.features import LABEL
from lambda_ml.metrics import AucBins, add_bins, auc_bins, log_loss

SPEED_P, CHAMPION_P = "_speed_p", "_champion_p"
STRETCH = "_stretch"  # a row's stretch of event time: floor(event time / step width)


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
    # Each term's scale (None until it appeared): steps are taken on the standardised terms
    # x / scale, so that a count in the thousands and a rate near 0.05 move the margin alike.
    # SGD: the root mean square over every row learned from in the generation (see rescaled);
    # FTRL: the root mean square on the first step the term appeared in (its z and n hold it).
    scales: tuple[float | None, ...] | None = None
    squares: tuple[float, ...] | None = None  # SGD: each term's sum of squares over the rows learned from
    square_rows: int = 0  # and how many rows that is

    def __post_init__(self) -> None:
        if len(self.names) != len(self.weights):
            raise ValueError(f"{len(self.names)} feature names but {len(self.weights)} weights")
        if self.scales is not None and len(self.scales) != len(self.weights):
            raise ValueError(f"{len(self.scales)} scales for {len(self.weights)} weights")
        if self.squares is not None and len(self.squares) != len(self.weights):
            raise ValueError(f"{len(self.squares)} sums of squares for {len(self.weights)} weights")
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
        squares = None if self.squares is None else self.squares + (0.0,) * len(new)  # 0 on every earlier row
        return replace(
            self, names=self.names + tuple(new), weights=self.weights + (0.0,) * len(new), ftrl=ftrl, scales=scales, squares=squares
        )

    def scaled(self, rms: tuple[float, ...]) -> LinearModel:
        """The model with a scale for every term: those it has kept, ``rms`` (of this batch)
        for the others (1 for a term that was 0 on every row)."""
        known = self.scales or (None,) * len(self.weights)
        return replace(self, scales=tuple(s if s is not None else (r if r > 0 else 1.0) for s, r in zip(known, rms)))

    def rescaled(self, rms: tuple[float, ...], rows: int) -> LinearModel:
        """The model with each term's scale the root mean square over every row learned from so
        far, these ``rows`` (of root mean square ``rms``) included; 1 for a term 0 on all of them.
        A scale fixed on the first rows would stay tiny for counts that start near 0 at the head
        of a stream, and blow up the steps on later rows."""
        known = self.squares or (0.0,) * len(self.weights)
        squares = tuple(q + r * r * rows for q, r in zip(known, rms))
        total = self.square_rows + rows
        scales = tuple(math.sqrt(q / total) if q > 0 else 1.0 for q in squares)
        return replace(self, squares=squares, square_rows=total, scales=scales)

    def as_weights(self) -> LinearWeights:
        return LinearWeights(self.names, self.weights, self.intercept)


def zero_model(inputs: ModelInputs) -> LinearModel:
    """All weights 0 over the numeric inputs (categories join as they are seen)."""
    return LinearModel(inputs.numeric, (0.0,) * len(inputs.numeric), 0.0, Horizon.of())


@dataclass(frozen=True)
class StepMetrics:
    rows: int
    log_loss: float | None  # of the model before the step, on the batch (progressive validation)
    baseline_log_loss: float | None  # of the baseline (champion) on the same rows
    positives: int = 0


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
        F.sum(log_loss(p, y)).alias("loss"),
    ]
    sums += [F.sum(error * term_column(name)).alias(f"g_{i}") for i, name in enumerate(model.names)]
    sums += [F.sum(term_column(name) * term_column(name)).alias(f"x2_{i}") for i, name in enumerate(model.names)]
    if baseline is not None:
        q = baseline.probability() if isinstance(baseline, LinearModel) else baseline
        sums.append(F.sum(log_loss(q, y)).alias("baseline_loss"))
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
    batch's root mean square); None for an empty batch. What an FTRL step starts from."""
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

    The step is taken on the standardised terms (``x / scale``, weights ``w̃ = w·scale``, each
    scale the root mean square over every row learned from so far, :meth:`LinearModel.rescaled`):
    in the raw weights, ``w -= learning_rate · (g / scale² + l2·w)``."""
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    gradient = batch_gradient(batch, model, baseline)
    if gradient is None:
        return model, StepMetrics(0, None, None)
    model = model.rescaled(gradient.rms, gradient.metrics.rows)
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


def stretch_index(event_time: Column, width_micros: int) -> Column:
    """The stretch of event time a row belongs to: ``floor(micros / width)`` (aligned on the epoch)."""
    return F.floor(F.unix_micros(event_time) / F.lit(width_micros)).cast("long")


def closed_stretches(labels: DataFrame, learned_until: int | None, width_micros: int) -> tuple[int, int] | None:
    """The stretches of event time whose labels are all final and not learned from yet, as
    ``[start, end)`` in epoch microseconds (whole stretches of ``width_micros``); None if none.

    ``labels`` are silver label rows. The newest non-click (label 0) closes every stretch ending
    at or before it: the labels query writes a non-click for ``t`` only once its watermark has
    passed ``t`` plus the attribution window, when every impression at or before ``t`` has its
    final label in the table (see the module docstring). Learning goes on from ``learned_until``,
    else from the stretch of the earliest labelled impression.
    """
    micros = F.unix_micros("event_time")
    pending = labels if learned_until is None else labels.where(micros >= F.lit(learned_until))
    row = pending.agg(F.min(micros), F.max(F.when(F.col(LABEL) == 0.0, micros))).first()
    assert row is not None  # a global aggregate has one row
    earliest, newest_negative = row
    if newest_negative is None:
        return None
    start = learned_until if learned_until is not None else int(earliest) - int(earliest) % width_micros
    end = int(newest_negative) - int(newest_negative) % width_micros  # the stretches before the one it is in
    return (start, end) if end > start else None


def learn_stretches(
    featured: DataFrame,
    model: LinearModel,
    online: OnlineConfig,
    categorical: tuple[str, ...] = (),
    baseline: Column | None = None,
) -> tuple[LinearModel, StepMetrics, AucBins]:
    """One step of :func:`learn_step` per stretch of ``featured`` (rows with the model's inputs,
    ``label`` and :data:`STRETCH`), in stretch order, each stretch scored before it is learned
    from: the stepped model, the rows' progressive log loss (the model's and ``baseline``'s, a
    column holding the champion's probability) and the model's log-odds bins.

    Categories of ``categorical`` inputs a stretch brings join the model (weight 0) before its
    step, so that the terms, like the weights, depend on the stretches alone.
    """
    seen = featured.select(STRETCH, *categorical).distinct().collect()
    terms: dict[int, set[str]] = {}
    for row in seen:
        terms.setdefault(int(row[STRETCH]), set()).update(f"{n}{INDICATOR}{row[n]}" for n in categorical if row[n] is not None)
    rows = positives = 0
    loss = baseline_loss = 0.0
    bins: AucBins = {}
    for stretch in sorted(terms):
        model = model.with_terms(sorted(terms[stretch]))
        scored = featured.where(F.col(STRETCH) == stretch).withColumn(SPEED_P, model.probability())
        model, metrics = learn_step(scored, model, online, baseline)
        if metrics.rows == 0:
            continue
        rows, positives = rows + metrics.rows, positives + metrics.positives
        loss += metrics.rows * (metrics.log_loss or 0.0)
        baseline_loss += metrics.rows * (metrics.baseline_log_loss or 0.0)
        bins = add_bins(bins, auc_bins(scored, SPEED_P))
    if rows == 0:
        return model, StepMetrics(0, None, None), bins
    return model, StepMetrics(rows, loss / rows, baseline_loss / rows if baseline is not None else None, positives), bins

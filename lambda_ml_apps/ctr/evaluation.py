"""How a click model is judged: time-based splits, and AUC, log loss and calibration on scored
rows.

The holdout and the validation split are both "the most recent rows": a model is always
judged on impressions later than every one it learned from, as it will be in production.
Metrics are computed by Spark on scored rows (a DataFrame with ``label`` and
``click_probability``); only per-bin counts (calibration bins, AUC's score bins) reach the driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from matplotlib.figure import Figure
from pyspark.ml import Transformer
from pyspark.ml.functions import vector_to_array
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from lambda_ml.features import LABEL
from lambda_ml.metrics import auc_bins, bins_auc, log_loss

CLICK_PROBABILITY = "click_probability"


class TrainingError(RuntimeError):
    """The snapshot cannot yield a meaningful model (too little data, a single class...)."""


# Sampling keeps a row when a hash of its event id, reduced modulo this, is below the share.
_SAMPLE_RESOLUTION = 1 << 30


def in_sample(rows: int, max_rows: int) -> Column:
    """True for the rows of a uniform sample of about ``max_rows`` out of ``rows`` (all of them
    if there are no more): a row is in when a hash of its ``event_id`` falls under
    ``max_rows / rows``. A smaller sample of the same rows is a subset of a larger one."""
    if rows <= max_rows:
        return F.lit(True)
    threshold = int(_SAMPLE_RESOLUTION * max_rows / rows)
    return F.pmod(F.xxhash64("event_id"), F.lit(_SAMPLE_RESOLUTION)) < F.lit(threshold)


def sample_rows(df: DataFrame, rows: int, max_rows: int) -> DataFrame:
    """About ``max_rows`` of ``rows`` rows (see :func:`in_sample`); ``df`` itself when there are
    no more. ``df`` may hold the ``rows`` or any part of them that contains the sample.

    Deterministic: the same rows always give the same sample, whatever their partitioning, so a
    re-run for the same horizon fits the same model.
    """
    return df if rows <= max_rows else df.where(in_sample(rows, max_rows))


def score(model: Transformer, df: DataFrame) -> DataFrame:
    """``df`` scored by a fitted model (a whole pipeline, or a classifier on encoded rows): its
    columns plus ``click_probability`` (P(click) as a double)."""
    return model.transform(df).withColumn(CLICK_PROBABILITY, vector_to_array("probability")[1])


def auc(scored: DataFrame) -> float:
    """Area under the ROC curve of ``click_probability`` against ``label`` (NaN without both
    classes).

    One aggregation: positives and negatives per bin of log-odds (width
    :data:`lambda_ml.metrics.AUC_LOGIT_BIN`; :func:`lambda_ml.metrics.auc_bins`), then the
    Mann-Whitney sum on the driver, each (positive, negative) pair in one bin counted as a tie
    (one half). That is exact for probabilities more than a bin apart, and off by at most half
    the share of pairs sharing a bin otherwise (about 1e-5 on a click model's scores); Spark's
    evaluator, which sorts every row and down-samples the curve to 1,000 points, is both slower
    and coarser.

    Ranks on the probability rather than on a model-specific raw score, so any two models
    scored on the same rows (the gate's new model and champion) are measured the same way.
    """
    return bins_auc(auc_bins(scored, CLICK_PROBABILITY))


@dataclass(frozen=True)
class CalibrationBin:
    """Scored rows whose P(click) falls in ``[lower, upper)`` (the last bin includes 1)."""

    index: int
    lower: float
    upper: float
    rows: int
    mean_prediction: float
    observed_rate: float


def calibration_bins(scored: DataFrame, bins: int = 10) -> tuple[CalibrationBin, ...]:
    """Equal-width bins of ``click_probability``: rows, mean prediction and click rate of each
    non-empty bin, in order."""
    if bins < 1:
        raise ValueError(f"bins must be positive, got {bins}")
    index = F.least(F.floor(F.col(CLICK_PROBABILITY) * bins).cast("int"), F.lit(bins - 1))
    rows = (
        scored.groupBy(index.alias("bin"))
        .agg(
            F.count("*").alias("rows"),
            F.avg(CLICK_PROBABILITY).alias("mean_prediction"),
            F.avg(LABEL).alias("observed_rate"),
        )
        .orderBy("bin")
        .collect()
    )
    return tuple(
        CalibrationBin(
            index=int(r["bin"]),
            lower=r["bin"] / bins,
            upper=(r["bin"] + 1) / bins,
            rows=int(r["rows"]),
            mean_prediction=float(r["mean_prediction"]),
            observed_rate=float(r["observed_rate"]),
        )
        for r in rows
    )


def expected_calibration_error(bins: Sequence[CalibrationBin]) -> float:
    """Expected calibration error: the row-weighted mean of ``|mean prediction - click rate|``
    over the bins.

    >>> expected_calibration_error([
    ...     CalibrationBin(0, 0.0, 0.5, rows=3, mean_prediction=0.2, observed_rate=0.0),
    ...     CalibrationBin(1, 0.5, 1.0, rows=1, mean_prediction=0.6, observed_rate=1.0),
    ... ])
    0.25
    """
    total = sum(b.rows for b in bins)
    if total == 0:
        raise ValueError("no rows in any bin: calibration is undefined")
    return sum(b.rows * abs(b.mean_prediction - b.observed_rate) for b in bins) / total


@dataclass(frozen=True)
class Evaluation:
    """Holdout metrics of a fitted model."""

    auc: float
    log_loss: float
    rows: int
    ctr: float  # observed click rate
    mean_prediction: float  # mean P(click): calibration at a glance
    calibration: tuple[CalibrationBin, ...] = ()

    @property
    def ece(self) -> float:
        return expected_calibration_error(self.calibration)

    def metrics(self) -> dict[str, float]:
        return {
            "auc": self.auc,
            "log_loss": self.log_loss,
            "holdout_ctr": self.ctr,
            "holdout_mean_prediction": self.mean_prediction,
            "ece": self.ece,
        }

    def calibration_table(self) -> dict[str, Any]:
        """The calibration summary as JSON: the ECE and every non-empty bin."""
        return {"ece": self.ece, "rows": self.rows, "bins": [asdict(b) for b in self.calibration]}


def evaluate(scored: DataFrame, bins: int = 10) -> Evaluation:
    """AUC, log loss, click rate, mean prediction and calibration of scored rows (see :func:`score`)."""
    row = scored.agg(
        F.count("*").alias("rows"),
        F.avg(log_loss(F.col(CLICK_PROBABILITY))).alias("log_loss"),
        F.avg(LABEL).alias("ctr"),
        F.avg(CLICK_PROBABILITY).alias("mean_prediction"),
    ).first()
    assert row is not None  # a global aggregate always has one row
    if not row["rows"]:
        raise TrainingError("no rows to evaluate on")
    return Evaluation(
        auc=auc(scored),
        log_loss=float(row["log_loss"]),
        rows=int(row["rows"]),
        ctr=float(row["ctr"]),
        mean_prediction=float(row["mean_prediction"]),
        calibration=calibration_bins(scored, bins),
    )


def calibration_figure(evaluation: Evaluation, title: str) -> Figure:
    """A reliability diagram (observed click rate against mean prediction per bin, the
    diagonal being perfect calibration) over a histogram of the predictions.

    Built on a bare :class:`~matplotlib.figure.Figure`, which renders PNG with Agg whatever
    backend pyplot would pick, and keeps no global state between runs.
    """
    figure = Figure(figsize=(6, 6.5), layout="constrained")
    diagram, histogram = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    bins = evaluation.calibration
    top = max([0.05, *(max(b.mean_prediction, b.observed_rate, b.upper) for b in bins)])
    top = min(1.0, top * 1.05)
    diagram.plot([0, top], [0, top], linestyle="--", color="grey", label="perfectly calibrated")
    diagram.plot(
        [b.mean_prediction for b in bins], [b.observed_rate for b in bins], marker="o", label="model (per bin)"
    )
    diagram.set_xlim(0, top)
    diagram.set_ylim(0, top)
    diagram.set_ylabel("observed click rate")
    diagram.set_title(f"{title}\nECE {evaluation.ece:.4f}, AUC {evaluation.auc:.3f} on {evaluation.rows} holdout rows")
    diagram.legend(loc="upper left")
    histogram.bar(
        [(b.lower + b.upper) / 2 for b in bins],
        [b.rows for b in bins],
        width=[(b.upper - b.lower) * 0.9 for b in bins],
        color="tab:blue",
        alpha=0.6,
    )
    histogram.set_xlabel("predicted P(click)")
    histogram.set_ylabel("rows")
    return figure

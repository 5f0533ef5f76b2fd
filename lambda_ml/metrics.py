"""Metrics shared by the layers and the applications: log loss, the AUC from per-bin counts that
add up across sets of rows, and the time-based split every holdout is taken by.

Both are computed by Spark on a DataFrame with ``label`` and a probability column; only one row
of sums, or the counts per log-odds bin, reach the driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from lambda_ml.features import LABEL

# Probabilities are clipped to [EPSILON, 1 - EPSILON] in the log loss and the log-odds (log 0 is -inf).
EPSILON = 1e-15
# The AUC ranks rows by their log-odds in bins of this width: rows in one bin count as tied.
AUC_LOGIT_BIN = 1e-3

AucBins = dict[int, tuple[float, float]]  # log-odds bin -> (positives, negatives)


def clipped(probability: Column) -> Column:
    """``probability`` as a double kept within [EPSILON, 1 - EPSILON]."""
    return F.least(F.greatest(probability.cast("double"), F.lit(EPSILON)), F.lit(1 - EPSILON))


def log_loss(probability: Column, label: Column | None = None) -> Column:
    """Each row's log loss, ``-(y·log p + (1 - y)·log(1 - p))``, p clipped (see :func:`clipped`);
    ``label`` defaults to the ``label`` column. Average it for a set of rows."""
    p = clipped(probability)
    y = (F.col(LABEL) if label is None else label).cast("double")
    return -(y * F.log(p) + (F.lit(1.0) - y) * F.log(F.lit(1.0) - p))


def auc_bins(scored: DataFrame, probability: str) -> AucBins:
    """Positives and negatives of ``label`` per log-odds bin (width :data:`AUC_LOGIT_BIN`) of the
    ``probability`` column, in one aggregation: at most ~70,000 bins whatever the row count. Bins
    of several sets of rows add up (:func:`add_bins`), so an AUC over rows seen in many passes
    needs only the bins, never the rows."""
    p = clipped(F.col(probability))
    index = F.floor(F.log(p / (F.lit(1.0) - p)) / F.lit(AUC_LOGIT_BIN))
    label = F.col(LABEL).cast("double")
    counts = scored.groupBy(index.alias("bin")).agg(F.sum(label).alias("positives"), F.sum(F.lit(1.0) - label).alias("negatives"))
    return {int(r["bin"]): (float(r["positives"]), float(r["negatives"])) for r in counts.collect()}


def add_bins(*parts: AucBins) -> AucBins:
    """The bins of the union of the rows ``parts`` were counted over.

    >>> add_bins({1: (1.0, 0.0)}, {1: (0.0, 2.0), 3: (1.0, 1.0)})
    {1: (1.0, 2.0), 3: (1.0, 1.0)}
    """
    total: AucBins = {}
    for part in parts:
        for index, (positives, negatives) in part.items():
            before = total.get(index, (0.0, 0.0))
            total[index] = (before[0] + positives, before[1] + negatives)
    return total


def sorted_bins(bins: AucBins) -> list[tuple[float, float]]:
    """The (positives, negatives) of ``bins`` in increasing score order, for :func:`area_under_roc`."""
    return [bins[index] for index in sorted(bins)]


def area_under_roc(bins: Sequence[tuple[float, float]]) -> float:
    """AUC from (positives, negatives) per score bin, in increasing score order; pairs within
    a bin count one half (NaN without both classes).

    >>> area_under_roc([(0, 2), (1, 1), (2, 0)])  # 9 pairs: 8 ranked right, 1 tie
    0.9444444444444444
    >>> area_under_roc([(1, 1)])
    0.5
    """
    total_positives = sum(p for p, _ in bins)
    total_negatives = sum(n for _, n in bins)
    if not total_positives or not total_negatives:
        return float("nan")
    negatives_below = 0.0
    right = 0.0
    for positives, negatives in bins:
        right += positives * (negatives_below + negatives / 2)
        negatives_below += negatives
    return right / (total_positives * total_negatives)


def bins_auc(bins: AucBins) -> float:
    """The AUC of log-odds bins (see :func:`auc_bins`; NaN without both classes)."""
    return area_under_roc(sorted_bins(bins))


def split_by_time(df: DataFrame, holdout_fraction: float) -> tuple[DataFrame, DataFrame, datetime]:
    """Train on the past, hold out the most recent ``holdout_fraction`` of rows by event time.

    Returns ``(train, holdout, cutoff)``: the cutoff is the last training instant, holdout rows
    have ``event_time > cutoff``. Rows tied on the cutoff all train, so the holdout may be a
    few rows smaller than asked, and the model never sees a row from the holdout's instants.
    """
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {holdout_fraction}")
    micros = df.select(F.unix_micros("event_time").alias("micros"))
    # Exact for small sets, within 1e-4 of the rank on large ones: either way a sound cutoff.
    quantiles = micros.approxQuantile("micros", [1 - holdout_fraction], 1e-4)
    if not quantiles:
        raise ValueError("no rows: nothing to split into train and holdout")
    cutoff = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(quantiles[0]))
    holdout_rows = F.col("event_time") > F.lit(cutoff)
    return df.where(~holdout_rows), df.where(holdout_rows), cutoff

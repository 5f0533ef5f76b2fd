"""Batch training and holdout evaluation of the k-means model, in Spark.

:func:`train_kmeans` fits ``pyspark.ml.clustering.KMeans`` (k-means|| initialisation) for each
candidate k and keeps the k with the best silhouette (squared Euclidean); :func:`evaluate`
measures a model's inertia on any rows without collecting them, so two models can be compared
on the same holdout (lower is better). :class:`KMeansBatchUpdate` is the application's batch
layer contract built on them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import reduce
from typing import TYPE_CHECKING, Any

import mlflow

from pyspark.ml.clustering import KMeans, KMeansModel
from pyspark.ml.evaluation import ClusteringEvaluator
from pyspark.ml.feature import VectorAssembler
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import NumericType

from lambda_ml.apps import Quality, Registered, Snapshot, flat_params
from lambda_ml.config import PlatformConfig
from lambda_ml.features import dedup_events
from lambda_ml_apps.kmeans.model import KMeansCentres

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

_FEATURES = "features"
_CLUSTER = "cluster"


@dataclass(frozen=True)
class KMeansResult:
    """A batch run's outcome: the chosen k and its model, the silhouette of every k tried, the
    exact inertia of the model on the training rows, and how many rows were used."""

    k: int
    centres: KMeansCentres  # counts = cluster sizes on the training rows
    silhouettes: dict[int, float]
    inertia: float
    rows: int


def _check_columns(points_df: DataFrame, feature_columns: Sequence[str]) -> list[str]:
    columns = list(feature_columns)
    if not columns:
        raise ValueError("feature_columns must name at least one column")
    if len(set(columns)) != len(columns):
        raise ValueError(f"feature_columns must be distinct, got {columns}")
    fields = {f.name: f.dataType for f in points_df.schema.fields}
    for name in columns:
        if name not in fields:
            raise ValueError(f"feature_columns: {name!r} is not a column of the points (columns: {sorted(fields)})")
        if not isinstance(fields[name], NumericType):
            raise ValueError(f"feature_columns: {name!r} must be numeric, it is {fields[name].simpleString()}")
    return columns


def complete_rows(points_df: DataFrame, feature_columns: Sequence[str]) -> DataFrame:
    """The rows whose features are all set and are not NaN: the rows a model is trained and
    evaluated on (a point with a missing coordinate has no distance to a centre)."""
    conditions = [F.col(c).isNotNull() & ~F.isnan(F.col(c).cast("double")) for c in feature_columns]
    return points_df.where(reduce(lambda a, b: a & b, conditions))


def _squared_distance(centre: Sequence[float], feature_columns: Sequence[str]) -> Column:
    terms = [(F.col(c).cast("double") - F.lit(float(v))) ** 2 for c, v in zip(feature_columns, centre, strict=True)]
    return reduce(lambda a, b: a + b, terms)


def _nearest_stats(centres: KMeansCentres, points_df: DataFrame) -> tuple[list[int], float]:
    """Per centre, how many rows are nearest to it, and the sum of the squared distances to
    the nearest centre: one Spark job, aggregated on the executors."""
    columns = _check_columns(points_df, centres.feature_names)
    distances = [_squared_distance(c, columns).alias(f"d{j}") for j, c in enumerate(centres.centres)]
    scored = complete_rows(points_df, columns).select(*distances)
    each = [F.col(f"d{j}") for j in range(centres.k)]
    scored = scored.withColumn("d_min", F.least(*each) if centres.k > 1 else each[0])
    # Ties go to the lower index, as in model.assign.
    index = F.coalesce(*(F.when(d == F.col("d_min"), F.lit(j)) for j, d in enumerate(each)))
    stats = scored.groupBy(index.alias(_CLUSTER)).agg(F.count(F.lit(1)).alias("n"), F.sum("d_min").alias("sse")).collect()
    counts = [0] * centres.k
    total = 0.0
    for row in stats:
        counts[int(row[_CLUSTER])] = int(row["n"])
        total += float(row["sse"])
    return counts, total


def evaluate(centres: KMeansCentres, points_df: DataFrame) -> dict[str, float]:
    """The model's inertia on ``points_df`` (sum of squared distances to the nearest centre), its
    mean per row, and the number of rows with every feature set, computed in Spark. Lower is
    better when two models are evaluated on the same rows. Rows with a missing or NaN feature
    are left out; no such row at all raises ``ValueError``."""
    counts, total = _nearest_stats(centres, points_df)
    rows = sum(counts)
    if rows == 0:
        raise ValueError(f"points_df has no row with every feature of {list(centres.feature_names)} set")
    return {"inertia": total, "mean_squared_distance": total / rows, "rows": rows}


def _check_k_values(k_values: Sequence[int]) -> list[int]:
    values = list(k_values)
    if not values:
        raise ValueError("k_values must hold at least one k")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 2 for k in values):
        raise ValueError(f"k_values must be integers >= 2 (the silhouette needs two clusters), got {values}")
    return sorted(set(values))


def _fit_best(vectors: DataFrame, k: int, seed: int, max_iter: int, tol: float, runs: int) -> KMeansModel:
    """The k-means|| model with the lowest training cost over ``runs`` seeds (seed, seed+1, ...):
    k-means finds a local optimum, and several starts make a poor one unlikely."""
    best: KMeansModel | None = None
    for run in range(runs):
        model = KMeans(featuresCol=_FEATURES, predictionCol=_CLUSTER, k=k, seed=seed + run, maxIter=max_iter, tol=tol, initMode="k-means||").fit(vectors)
        if best is None or model.summary.trainingCost < best.summary.trainingCost:
            best = model
    assert best is not None  # runs >= 1
    return best


def train_kmeans(
    points_df: DataFrame,
    feature_columns: Sequence[str],
    k_values: Sequence[int],
    seed: int = 0,
    max_iter: int = 50,
    tol: float = 1e-6,
    runs: int = 3,
) -> KMeansResult:
    """Train k-means on the rows of ``points_df`` with every feature set, for each k in
    ``k_values``, and keep the k with the best silhouette (squared Euclidean; ties go to the
    smaller k). One k means no search (its silhouette is still reported).

    ``max_iter`` and ``tol`` default tighter than Spark's (20, 1e-4) so that Lloyd's
    iterations run to convergence. k-means stops in a local optimum that depends on its start:
    each k is fitted ``runs`` times (k-means|| seeded ``seed``, ``seed + 1``, ...) and the run
    with the lowest training cost is kept. On scikit-learn's digits with k=10, one start ended
    0.05 % to 6.2 % above scikit-learn's best of ten k-means++ starts (five seeds), three
    starts within 0.6 %. The inertia returned is recomputed exactly on the final centres
    (Spark's ``trainingCost`` is the cost before the last centre update).
    """
    columns = _check_columns(points_df, feature_columns)
    candidates = _check_k_values(k_values)
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    rows = complete_rows(points_df, columns)
    vectors = VectorAssembler(inputCols=columns, outputCol=_FEATURES).transform(rows).select(_FEATURES).cache()
    try:
        row_count = vectors.count()
        if row_count < candidates[-1]:
            raise ValueError(f"k_values: k={candidates[-1]} needs at least as many complete rows, there are {row_count}")
        evaluator = ClusteringEvaluator(featuresCol=_FEATURES, predictionCol=_CLUSTER, metricName="silhouette", distanceMeasure="squaredEuclidean")
        models: dict[int, KMeansModel] = {}
        silhouettes: dict[int, float] = {}
        for k in candidates:
            models[k] = _fit_best(vectors, k, seed, max_iter, tol, runs)
            silhouettes[k] = float(evaluator.evaluate(models[k].transform(vectors)))
            log.info("k-means with k=%d on %d rows: silhouette %.4f, training cost %.6g", k, row_count, silhouettes[k], models[k].summary.trainingCost)
    finally:
        vectors.unpersist()
    chosen = max(candidates, key=lambda k: (silhouettes[k], -k))
    centres = models[chosen].clusterCenters()
    trained = KMeansCentres.of(centres, columns, [0.0] * len(centres))
    counts, total = _nearest_stats(trained, rows)
    if len(candidates) > 1:
        log.info("chose k=%d, the best silhouette among %s", chosen, {k: round(s, 4) for k, s in silhouettes.items()})
    return KMeansResult(
        k=chosen,
        centres=KMeansCentres.of(trained.centres, columns, counts),
        silhouettes=silhouettes,
        inertia=total,
        rows=row_count,
    )


# --------------------------------------------------------------------------- the contract


def silhouette_figure(silhouettes: Mapping[int, float], chosen: int, title: str) -> Figure:
    """The silhouette of every k tried, the chosen one highlighted."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    ks = sorted(silhouettes)
    axes.bar(ks, [silhouettes[k] for k in ks], color=["tab:orange" if k == chosen else "tab:blue" for k in ks])
    axes.set_xticks(ks)
    axes.set_xlabel("k (number of clusters)")
    axes.set_ylabel("silhouette (squared Euclidean)")
    axes.set_title(title)
    return figure


@dataclass
class KMeansCandidate:
    """Centres trained on a snapshot's older points, with their holdout evaluation and the
    holdout points (cached) the gate scores the champion on."""

    cfg: PlatformConfig
    result: KMeansResult
    holdout: DataFrame
    quality: Quality
    metrics: Mapping[str, float]
    params: Mapping[str, str]
    horizon_text: str = ""

    def log_artifacts(self) -> None:
        """The centres, the silhouette table and its plot."""
        result = self.result
        mlflow.log_dict(result.centres.to_dict(), "centres.json")
        table = {"k": sorted(result.silhouettes), "silhouette": [result.silhouettes[k] for k in sorted(result.silhouettes)], "chosen": result.k}
        mlflow.log_dict(table, "silhouette.json")
        title = f"{self.cfg.mlflow.registered_model}: k={result.k} chosen, {self.horizon_text}"
        mlflow.log_figure(silhouette_figure(result.silhouettes, result.k, title), "silhouette.png")

    def score(self, version: Any) -> tuple[float | None, str]:
        """A registered version's holdout inertia per point (mean squared distance to its
        nearest centre) on this candidate's holdout; None when its features differ."""
        from lambda_ml_apps.kmeans import registry

        ours = self.result.centres.feature_names
        theirs = registry.feature_names_tag(version.tags or {})
        if theirs != ours:
            return None, f"its features {list(theirs)} are not the holdout's {list(ours)}"
        centres = registry.download_centres(self.cfg.mlflow.tracking_uri, version.name, version.version)
        if centres.feature_names != ours:
            return None, f"its centres are over {list(centres.feature_names)}, not the holdout's {list(ours)}"
        return float(evaluate(centres, self.holdout)["mean_squared_distance"]), ""

    def register(self, registered_model: str, tags: Mapping[str, str]) -> Registered:
        """One version, served (``flavor=centres``)."""
        from lambda_ml_apps.kmeans import registry

        return Registered(served=registry.register_centres(self.result.centres, registered_model, tags), others={})

    def release(self) -> None:
        self.holdout.unpersist()


def split_points(points: DataFrame, holdout_fraction: float) -> tuple[DataFrame, DataFrame, datetime]:
    """Deduplicated points with every feature set -> (train, holdout, cutoff): the holdout is
    the most recent ``holdout_fraction`` by event time (``lambda_ml_apps.ctr.evaluation.split_by_time``)."""
    from lambda_ml.metrics import split_by_time

    return split_by_time(points, holdout_fraction)


class KMeansBatchUpdate:
    """The k-means application's batch update (the ``BatchUpdate`` contract): deduplicated
    points of the snapshot, a time-based holdout, the silhouette search and k-means on the
    older points, the holdout inertia per point as the gate's quality (lower is better)."""

    def train(self, spark: SparkSession, snapshot: Snapshot, events: DataFrame | None, cfg: PlatformConfig) -> KMeansCandidate:
        """``events`` (the declared feature events) are not read: the model reads the points'
        coordinates, which the feature events do not all carry."""
        settings = cfg.kmeans
        columns = list(settings.features)
        raw = snapshot[cfg.kmeans.event_type]
        points = complete_rows(dedup_events(raw).select("event_id", "event_time", *columns), columns)
        train, holdout, cutoff = split_points(points, settings.holdout_fraction)
        train, holdout = train.cache(), holdout.cache()
        counted = {"train": train.count(), "holdout": holdout.count()}
        if counted["holdout"] == 0 or counted["train"] == 0:
            train.unpersist()
            holdout.unpersist()
            raise ValueError(
                f"{snapshot.horizon}: {counted['train']} training and {counted['holdout']} holdout points with every one of "
                f"{columns} set: both are needed (kmeans.holdout_fraction {settings.holdout_fraction})"
            )
        log.info("points up to %s train (%d), after it are held out (%d)", cutoff, counted["train"], counted["holdout"])
        try:
            result = train_kmeans(train, columns, settings.k_values, settings.seed, settings.max_iter, settings.tol, settings.runs)
        finally:
            train.unpersist()
        held = evaluate(result.centres, holdout)
        log.info(
            "k=%d: holdout inertia %.6g over %d points (%.6g per point), training inertia %.6g",
            result.k, held["inertia"], held["rows"], held["mean_squared_distance"], result.inertia,
        )  # fmt: skip
        metrics = {
            "holdout_inertia": float(held["inertia"]),
            "holdout_mean_squared_distance": float(held["mean_squared_distance"]),
            "train_inertia": result.inertia,
            "train_mean_squared_distance": result.inertia / result.rows,
            "k": float(result.k),
            **{f"silhouette_k{k}": value for k, value in result.silhouettes.items()},
            "rows_points": float(raw.count()),
            "rows_train": float(counted["train"]),
            "rows_holdout": float(held["rows"]),
        }
        params = {
            **flat_params(settings.model_dump(mode="json"), "kmeans"),
            "chosen.k": str(result.k),
            "holdout_after": cutoff.isoformat(),
        }
        quality = Quality("inertia", float(held["mean_squared_distance"]), higher_is_better=False, margin=settings.min_inertia_gain)
        return KMeansCandidate(cfg, result, holdout, quality, metrics, params, str(snapshot.horizon))

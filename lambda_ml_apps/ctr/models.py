"""The click model: a Spark ML pipeline for ``ctr.model`` (``lr`` or ``gbt``), and the small
hyper-parameter search that chooses its parameters.

The search compares the candidates of ``ctr.search.<model>`` on a time-based validation split
carved from the *training* rows (their most recent ``validation_fraction``, within a sample of
at most ``ctr.search.max_rows``), then refits the winner on all training rows (a sample of at
most ``ctr.max_training_rows``). The holdout is not an argument of anything here: it cannot
leak into the choice.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pyspark.ml import Estimator, Pipeline, PipelineModel
from pyspark.ml.classification import GBTClassifier, LogisticRegression
from pyspark.ml.feature import OneHotEncoder, StringIndexer, VectorAssembler
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lambda_ml.metrics import split_by_time
from lambda_ml_apps.ctr.evaluation import TrainingError, auc, sample_rows, score
from lambda_ml import contract
from lambda_ml.config import CtrConfig, PlatformConfig
from lambda_ml.features import LABEL

log = logging.getLogger(__name__)

Params = dict[str, Any]  # one model's parameters, named as in ``ctr`` (snake_case)


def _logistic_regression(params: Params) -> Estimator:
    return LogisticRegression(
        featuresCol="features",
        labelCol=LABEL,
        # Optimised and regularised on standardised inputs, coefficients returned on the raw
        # scale: no scaler stage is needed, and none has to pass over the rows.
        standardization=True,
        regParam=params["reg_param"],
        elasticNetParam=params["elastic_net_param"],
        maxIter=params["max_iter"],
    )


def _gradient_boosted_trees(params: Params) -> Estimator:
    return GBTClassifier(
        featuresCol="features",
        labelCol=LABEL,
        maxDepth=params["max_depth"],
        maxIter=params["max_iter"],
        stepSize=params["step_size"],
        subsamplingRate=params["subsampling_rate"],
        maxBins=params["max_bins"],
        seed=params["seed"],
    )


# ``ctr.model`` -> its classifier; the config's Literal and this table must list the same names.
CLASSIFIERS: dict[str, Callable[[Params], Estimator]] = {
    "lr": _logistic_regression,
    "gbt": _gradient_boosted_trees,
}


def base_params(ctr: CtrConfig) -> Params:
    """The selected model's parameters as configured, before any search.

    >>> base_params(CtrConfig(reg_param=0.5))
    {'reg_param': 0.5, 'elastic_net_param': 0.0, 'max_iter': 50}
    """
    if ctr.model == "lr":
        return {"reg_param": ctr.reg_param, "elastic_net_param": ctr.elastic_net_param, "max_iter": ctr.max_iter}
    return ctr.gbt.model_dump()


def param_grid(ctr: CtrConfig) -> list[Params]:
    """Every combination of the selected model's grid values, over its base parameters.

    >>> from lambda_ml.config import LrGridConfig, SearchConfig
    >>> grid = LrGridConfig(reg_param=(0.1, 1.0), elastic_net_param=())
    >>> [p["reg_param"] for p in param_grid(CtrConfig(search=SearchConfig(lr=grid)))]
    [0.1, 1.0]
    """
    base = base_params(ctr)
    grid = getattr(ctr.search, ctr.model).model_dump()
    axes = [(name, values) for name, values in grid.items() if values]
    names = [name for name, _ in axes]
    return [{**base, **dict(zip(names, combination))} for combination in itertools.product(*(v for _, v in axes))]


FEATURES = "features"  # the assembled input vector the classifier reads


def encoding_pipeline(cfg: PlatformConfig) -> Pipeline:
    """The stages before the classifier: categorical inputs one-hot encoded, numbers assembled
    into :data:`FEATURES`.

    Unknown categories index as "unknown" and encode as all zeros (``handleInvalid="keep"`` with
    ``dropLast``): the one setting whose ONNX export matches Spark for unseen values.
    """
    inputs = contract.model_inputs(cfg.features)
    indexed = [f"{name}_index" for name in inputs.categorical]
    encoded = [f"{name}_onehot" for name in inputs.categorical]
    stages: list[Any] = []
    if inputs.categorical:
        stages += [
            StringIndexer(inputCols=list(inputs.categorical), outputCols=indexed, handleInvalid="keep"),
            OneHotEncoder(inputCols=indexed, outputCols=encoded, handleInvalid="keep", dropLast=True),
        ]
    stages.append(VectorAssembler(inputCols=list(inputs.numeric), outputCol="numeric"))
    stages.append(VectorAssembler(inputCols=["numeric", *encoded], outputCol=FEATURES))
    return Pipeline(stages=stages)


def classifier(cfg: PlatformConfig, params: Params | None = None) -> Estimator:
    """The classifier of ``cfg.ctr.model`` with ``params`` (default: :func:`base_params`)."""
    return CLASSIFIERS[cfg.ctr.model](base_params(cfg.ctr) if params is None else params)


def build_pipeline(cfg: PlatformConfig, params: Params | None = None) -> Pipeline:
    """The whole model: :func:`encoding_pipeline`, then :func:`classifier`."""
    return Pipeline(stages=[*encoding_pipeline(cfg).getStages(), classifier(cfg, params)])


@dataclass(frozen=True)
class Candidate:
    """One point of the grid and its validation AUC (None when there was nothing to choose)."""

    params: Params
    validation_auc: float | None


@dataclass(frozen=True)
class Selection:
    """The chosen parameters, the model refitted with them on the training rows, and the search."""

    model: PipelineModel
    params: Params
    candidates: tuple[Candidate, ...]
    validation_after: datetime | None  # the validation rows' lower bound; None without a search

    def report(self) -> dict[str, Any]:
        """The search as JSON (logged with the run)."""
        return {
            "chosen": self.params,
            "validation_after": None if self.validation_after is None else self.validation_after.isoformat(),
            "candidates": [{"params": c.params, "validation_auc": c.validation_auc} for c in self.candidates],
        }


def _class_counts(df: DataFrame) -> tuple[int, int]:
    row = df.agg(F.count("*"), F.sum(LABEL)).first()
    assert row is not None  # a global aggregate always has one row
    return int(row[0]), int(row[1] or 0)


def select_model(train: DataFrame, cfg: PlatformConfig, rows: int | None = None) -> Selection:
    """Fit the model of ``cfg.ctr.model``, choosing its parameters on a validation split.

    ``rows`` is the number of training rows (counted when not given); ``train`` holds them, or
    any part of them containing the fitting sample. The model is fitted on all of them, or on
    a uniform sample of ``ctr.max_training_rows`` when there are more.
    With a single candidate there is nothing to compare. Otherwise the candidates are compared
    on a sample of at most ``ctr.search.max_rows`` training rows: each is fitted on the sample's
    rows up to the validation cutoff and scored on the rows after it; the best AUC wins (the
    first in grid order on a tie).

    The encoding stages are fitted once, on the fitting sample, and its rows encoded once
    (cached): every candidate and the final fit read the same vectors.
    """
    rows = train.count() if rows is None else rows
    fit_rows = sample_rows(train, rows, cfg.ctr.max_training_rows)
    encoder = encoding_pipeline(cfg).fit(fit_rows)
    kept = [name for name in (LABEL, "event_time", "event_id") if name in train.columns]
    vectors = encoder.transform(fit_rows).select(FEATURES, *kept).cache()
    try:
        grid = param_grid(cfg.ctr)
        if len(grid) == 1:
            (params,) = grid
            candidates, cutoff = [Candidate(params, None)], None
        else:
            # A smaller sample of the same rows is a subset of the fitting sample.
            if cfg.ctr.search.max_rows <= cfg.ctr.max_training_rows:
                searched = sample_rows(vectors, rows, cfg.ctr.search.max_rows)
            else:
                searched = encoder.transform(sample_rows(train, rows, cfg.ctr.search.max_rows))
            candidates, cutoff = _search(searched, grid, cfg)
            params = max(candidates, key=lambda c: c.validation_auc or 0.0).params  # max keeps the first of ties
            log.info("chose %s %s of %d candidates (validation after %s)", cfg.ctr.model, params, len(grid), cutoff)
        fitted = classifier(cfg, params).fit(vectors)
    finally:
        vectors.unpersist()
    return Selection(PipelineModel(stages=[*encoder.stages, fitted]), params, tuple(candidates), cutoff)


def _search(searched: DataFrame, grid: list[Params], cfg: PlatformConfig) -> tuple[list[Candidate], datetime]:
    """Each candidate fitted on the older rows of ``searched`` (encoded rows) and scored on its
    latest ones."""
    fit_part, validation, cutoff = split_by_time(searched, cfg.ctr.search.validation_fraction)
    for name, part in (("fitting", fit_part), ("validation", validation)):
        rows, positives = _class_counts(part)
        if positives in (0, rows):
            raise TrainingError(
                f"the {name} part of the search has {rows} rows of which {positives} clicked: both classes "
                "are needed (lower ctr.search.validation_fraction, or leave one value per grid list)"
            )

    def judge(params: Params) -> Candidate:
        validation_auc = auc(score(classifier(cfg, params).fit(fit_part), validation))
        log.info("%s %s: validation AUC %.4f", cfg.ctr.model, params, validation_auc)
        return Candidate(params, validation_auc)

    # One after the other: fitted side by side (three threads), the same search took 12 %
    # longer on two cores at 3M events (55 s against 49 s), the fits competing for them.
    return [judge(params) for params in grid], cutoff

"""Model options, the hyper-parameter search and the holdout metrics of the batch layer, on
small hand-built frames: expected values are worked out by hand (or with scikit-learn) in the
tests, never with the code under test."""

from __future__ import annotations

import math
import typing
from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from sklearn.metrics import roc_auc_score

from lambda_ml_apps.ctr import evaluation, models
from lambda_ml_apps.ctr.evaluation import CalibrationBin, TrainingError
from lambda_ml_apps.ctr.onnx_export import check_parity, export_onnx, onnx_click_probabilities, onnx_inputs
from lambda_ml import contract
from lambda_ml.config import (
    DEFAULT_CONFIG,
    ConfigError,
    CtrConfig,
    GbtGridConfig,
    LrGridConfig,
    PlatformConfig,
    SearchConfig,
    load_config,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def with_ctr(cfg: PlatformConfig, **updates: object) -> PlatformConfig:
    return cfg.model_copy(update={"ctr": cfg.ctr.model_copy(update=updates)})


def no_search() -> SearchConfig:
    return SearchConfig(lr=LrGridConfig(reg_param=(), elastic_net_param=()), gbt=GbtGridConfig(max_depth=(), max_iter=()))


def scored_frame(spark: SparkSession, probabilities: list[float], labels: list[float]) -> DataFrame:
    rows = list(zip(probabilities, labels, strict=True))
    return spark.createDataFrame(rows, f"{evaluation.CLICK_PROBABILITY} double, label double")


# --------------------------------------------------------------------------- metrics


def test_calibration_bins_and_ece_match_a_hand_computation(spark: SparkSession) -> None:
    p = [0.05, 0.15, 0.12, 0.95, 0.91, 0.55, 1.0]
    y = [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    result = evaluation.evaluate(scored_frame(spark, p, y), bins=10)

    # Bins of width 0.1; P = 1.0 belongs to the last one.
    got = [(b.index, b.rows, round(b.mean_prediction, 6), b.observed_rate) for b in result.calibration]
    assert got == [(0, 1, 0.05, 0.0), (1, 2, 0.135, 0.5), (5, 1, 0.55, 0.0), (9, 3, round(2.86 / 3, 6), 1.0)]
    # |gap| x rows: 0.05 + 2 x 0.365 + 0.55 + 3 x (1 - 2.86/3) = 0.05 + 0.73 + 0.55 + 0.14 = 1.47 over 7 rows.
    assert result.ece == pytest.approx(1.47 / 7, abs=1e-12)
    # Positive/negative pairs ranked right: 0.12 beats 0.05 only; 0.95, 0.91 and 1.0 beat all three.
    assert result.auc == pytest.approx(10 / 12, abs=1e-12)
    clipped = np.clip(p, 1e-15, 1 - 1e-15)
    expected_log_loss = -np.mean([math.log(q) if label else math.log(1 - q) for q, label in zip(clipped, y)])
    assert result.log_loss == pytest.approx(expected_log_loss, rel=1e-12)
    assert (result.rows, result.ctr, result.mean_prediction) == (7, pytest.approx(4 / 7), pytest.approx(sum(p) / 7))
    assert result.metrics()["ece"] == result.ece
    table = result.calibration_table()
    assert sum(b["rows"] for b in table["bins"]) == 7 and table["ece"] == result.ece


def test_ece_is_zero_when_every_bin_is_calibrated_and_refuses_no_rows() -> None:
    perfect = [CalibrationBin(2, 0.2, 0.3, 10, 0.25, 0.25), CalibrationBin(7, 0.7, 0.8, 4, 0.75, 0.75)]
    assert evaluation.expected_calibration_error(perfect) == 0.0
    with pytest.raises(ValueError, match="no rows"):
        evaluation.expected_calibration_error([])


def test_a_constant_model_has_auc_one_half(spark: SparkSession) -> None:
    assert evaluation.auc(scored_frame(spark, [0.3] * 6, [0.0, 1.0, 0.0, 1.0, 1.0, 0.0])) == 0.5


def test_auc_equals_scikit_learn_on_many_continuous_scores(spark: SparkSession) -> None:
    # 50,000 rows of a click model's scores: the binned AUC may differ from the exact one only
    # by pairs sharing a log-odds bin, which is far below what tells two models apart.
    rng = np.random.default_rng(3)
    logits = rng.normal(-2.5, 1.0, 50_000)
    p = 1 / (1 + np.exp(-logits))
    y = (rng.random(50_000) < 1 / (1 + np.exp(-(logits + rng.normal(0, 1.5, 50_000))))).astype(float)
    got = evaluation.auc(scored_frame(spark, p.tolist(), y.tolist()))
    assert got == pytest.approx(roc_auc_score(y, p), abs=2e-5)
    # One class only: no ROC curve.
    assert math.isnan(evaluation.auc(scored_frame(spark, [0.1, 0.2], [0.0, 0.0])))


def test_calibration_figure_renders_a_png(spark: SparkSession, tmp_path: typing.Any) -> None:
    result = evaluation.evaluate(scored_frame(spark, [0.1, 0.2, 0.8, 0.7], [0.0, 0.0, 1.0, 0.0]), bins=10)
    path = tmp_path / "calibration.png"
    evaluation.calibration_figure(result, "test").savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- configuration


def test_model_kinds_match_the_config_choices() -> None:
    allowed = typing.get_args(CtrConfig.model_fields["model"].annotation)
    assert sorted(allowed) == sorted(models.CLASSIFIERS) == ["gbt", "lr"]


def test_an_unknown_model_or_grid_key_is_named(tmp_path: typing.Any) -> None:
    with pytest.raises(ConfigError, match=r"ctr\.model: Input should be 'lr' or 'gbt'"):
        load_config(DEFAULT_CONFIG, env={"LAMBDA_ML__CTR__MODEL": "xgboost"})
    with pytest.raises(ConfigError, match=r"ctr\.search\.lr\.max_depth: unknown key"):
        load_config(DEFAULT_CONFIG, env={"LAMBDA_ML__CTR__SEARCH__LR__MAX_DEPTH": "[3]"})
    with pytest.raises(ConfigError, match=r"ctr\.search\.lr\.elastic_net_param\.1: Input should be less than or equal to 1"):
        load_config(DEFAULT_CONFIG, env={"LAMBDA_ML__CTR__SEARCH__LR__ELASTIC_NET_PARAM": "[0.5, 2]"})


def test_param_grid_is_the_product_of_the_selected_models_lists() -> None:
    lr = CtrConfig(
        reg_param=0.3, max_iter=7, search=SearchConfig(lr=LrGridConfig(reg_param=(0.1, 1.0), elastic_net_param=(0.0, 0.5)))
    )
    assert models.param_grid(lr) == [
        {"reg_param": 0.1, "elastic_net_param": 0.0, "max_iter": 7},
        {"reg_param": 0.1, "elastic_net_param": 0.5, "max_iter": 7},
        {"reg_param": 1.0, "elastic_net_param": 0.0, "max_iter": 7},
        {"reg_param": 1.0, "elastic_net_param": 0.5, "max_iter": 7},
    ]
    gbt = lr.model_copy(update={"model": "gbt", "search": SearchConfig(gbt=GbtGridConfig(max_depth=(2, 6), max_iter=()))})
    assert [(p["max_depth"], p["max_iter"], p["step_size"]) for p in models.param_grid(gbt)] == [(2, 30, 0.1), (6, 30, 0.1)]
    assert models.param_grid(lr.model_copy(update={"search": no_search()})) == [
        {"reg_param": 0.3, "elastic_net_param": 0.0, "max_iter": 7}
    ]


# --------------------------------------------------------------------------- training


def model_rows(cfg: PlatformConfig, n: int, seed: int, minutes_from: int = 0) -> list[dict[str, object]]:
    """Rows with the model inputs of ``cfg.features``: P(click) rises with position 1 -> 5 reversed
    and with the first window feature; the other inputs are noise."""
    rng = np.random.default_rng(seed)
    inputs = contract.model_inputs(cfg.features)
    rows = []
    for k in range(n):
        values: dict[str, object] = {name: float(rng.integers(0, 20)) for name in inputs.numeric}
        values["position"] = float(rng.integers(1, 6))
        for name in inputs.categorical:
            values[name] = str(rng.choice(["mobile", "desktop", "tablet"]))
        signal = inputs.numeric[0]
        logit = 1.5 - 0.9 * float(values["position"]) + 0.15 * float(values[signal])  # type: ignore[arg-type]
        values["label"] = float(rng.random() < 1 / (1 + math.exp(-logit)))
        values["event_time"] = T0 + timedelta(minutes=minutes_from + k)
        rows.append(values)
    return rows


def test_search_chooses_on_the_latest_training_rows_and_refits(spark: SparkSession, cfg: PlatformConfig) -> None:
    # Candidate 1: L1 so strong every weight is 0 (a constant model, validation AUC 1/2);
    # candidate 2: a light L2. The search must pick the second and refit it on all rows.
    grid = SearchConfig(validation_fraction=0.25, lr=LrGridConfig(reg_param=(50.0, 0.001), elastic_net_param=(1.0,)))
    lr_cfg = with_ctr(cfg, model="lr", search=grid)
    train_rows = spark.createDataFrame(model_rows(cfg, 400, seed=1))
    selection = models.select_model(train_rows, lr_cfg)

    assert [c.params["reg_param"] for c in selection.candidates] == [50.0, 0.001]
    assert selection.candidates[0].validation_auc == 0.5
    assert selection.candidates[1].validation_auc is not None and selection.candidates[1].validation_auc > 0.7
    assert selection.params == {"reg_param": 0.001, "elastic_net_param": 1.0, "max_iter": lr_cfg.ctr.max_iter}
    # The validation rows are the most recent quarter: rows 0..299 fit (minutes 0..299).
    assert selection.validation_after == T0 + timedelta(minutes=299)
    fitted = selection.model.stages[-1]
    assert (fitted.getRegParam(), fitted.getElasticNetParam()) == (0.001, 1.0)
    assert fitted.summary.totalIterations > 0 and fitted.numFeatures > 0
    assert selection.report()["chosen"] == selection.params


def test_search_needs_both_classes_in_its_validation_rows(spark: SparkSession, cfg: PlatformConfig) -> None:
    rows = model_rows(cfg, 80, seed=2)
    for row in rows[60:]:
        row["label"] = 0.0
    grid = SearchConfig(validation_fraction=0.25, lr=LrGridConfig(reg_param=(0.1, 1.0), elastic_net_param=()))
    with pytest.raises(TrainingError, match="validation part of the search has 20 rows of which 0 clicked"):
        models.select_model(spark.createDataFrame(rows), with_ctr(cfg, search=grid))


def test_a_single_candidate_is_fitted_without_a_search(spark: SparkSession, cfg: PlatformConfig) -> None:
    lr_cfg = with_ctr(cfg, model="lr", reg_param=0.02, search=no_search())
    selection = models.select_model(spark.createDataFrame(model_rows(cfg, 100, seed=3)), lr_cfg)
    assert (selection.validation_after, [c.validation_auc for c in selection.candidates]) == (None, [None])
    assert selection.model.stages[-1].getRegParam() == 0.02


@pytest.mark.parametrize("model", ["lr", "gbt"])
def test_onnx_export_matches_spark_for_each_model(spark: SparkSession, cfg: PlatformConfig, model: str) -> None:
    small = with_ctr(cfg, model=model, search=no_search(), gbt=cfg.ctr.gbt.model_copy(update={"max_iter": 8, "max_depth": 3}))
    train_rows = spark.createDataFrame(model_rows(cfg, 300, seed=4))
    fitted = models.build_pipeline(small).fit(train_rows)
    kind = type(fitted.stages[-1]).__name__
    assert kind == {"lr": "LogisticRegressionModel", "gbt": "GBTClassificationModel"}[model]

    unseen = model_rows(cfg, 120, seed=5, minutes_from=1000)
    unseen[0]["device"] = "smart-tv"  # a category never seen in training
    scored = evaluation.score(fitted, spark.createDataFrame(unseen)).toPandas()
    inputs = contract.model_inputs(cfg.features)
    onnx_p = onnx_click_probabilities(export_onnx(fitted, spark, inputs), onnx_inputs(scored, inputs))
    spark_p = scored[evaluation.CLICK_PROBABILITY].to_numpy()
    np.testing.assert_allclose(onnx_p, spark_p, rtol=0, atol=cfg.ctr.parity_atol)
    assert check_parity(spark_p, onnx_p, cfg.ctr.parity_atol) <= cfg.ctr.parity_atol
    assert spark_p.std() > 0.05  # really different scores, not a constant
    assert roc_auc_score(scored["label"], spark_p) > 0.7  # it learned the planted signal


# --------------------------------------------------------------------------- sampling


def numbered_ids(spark: SparkSession, n: int) -> DataFrame:
    return spark.range(n).select(F.concat(F.lit("imp-"), F.col("id").cast("string")).alias("event_id"))


def test_samples_are_uniform_deterministic_and_whole_under_the_cap(spark: SparkSession) -> None:
    frame = numbered_ids(spark, 20_000)
    assert evaluation.sample_rows(frame, 20_000, 20_000) is frame
    ids = [int(r.event_id.removeprefix("imp-")) for r in evaluation.sample_rows(frame, 20_000, 5_000).collect()]
    # Binomial(20000, 1/4): mean 5000, standard deviation 61.
    assert 4_500 < len(ids) < 5_500 and len(set(ids)) == len(ids)
    # Uniform: each quarter of the ids and each parity holds its share.
    quarters = Counter(i * 4 // 20_000 for i in ids)
    assert all(abs(quarters[q] - len(ids) / 4) < 300 for q in range(4)), quarters
    assert abs(sum(i % 2 for i in ids) / len(ids) - 0.5) < 0.05
    # The same rows in another partitioning and order give the same sample.
    shuffled = frame.repartition(7).sortWithinPartitions(F.rand(3))
    again = [int(r.event_id.removeprefix("imp-")) for r in evaluation.sample_rows(shuffled, 20_000, 5_000).collect()]
    assert sorted(again) == sorted(ids)


def test_the_model_is_fitted_on_at_most_max_training_rows(spark: SparkSession, cfg: PlatformConfig) -> None:
    rows = model_rows(cfg, 600, seed=6)
    for k, row in enumerate(rows):
        row["event_id"] = f"imp-{k}"
    frame = spark.createDataFrame(rows)
    whole = models.select_model(frame, with_ctr(cfg, model="lr", search=no_search()))
    assert whole.model.stages[-1].summary.predictions.count() == 600
    capped = models.select_model(frame, with_ctr(cfg, model="lr", search=no_search(), max_training_rows=200))
    fitted_on = capped.model.stages[-1].summary.predictions.count()
    assert 130 < fitted_on < 270  # Binomial(600, 1/3): mean 200, standard deviation 12

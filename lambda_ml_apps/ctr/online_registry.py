"""Periodic registration of the online model: the same Spark pipeline shape as the batch
layer's logistic regression (string indexer, one-hot encoder, assemblers, classifier) carrying
the online weights, exported to ONNX, checked for parity on the micro-batch's rows and registered
as two versions of the registered model with the batch layer's own registration code
(:mod:`lambda_ml_apps.ctr.model_registry`), tagged ``layer=speed``, with the generation (horizon tags) and
the update count; the alias ``speed`` moves to the ONNX version.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from pyspark.ml import PipelineModel
from pyspark.ml.classification import LogisticRegressionModel
from pyspark.ml.common import _py2java
from pyspark.ml.feature import OneHotEncoder, StringIndexerModel, VectorAssembler
from pyspark.ml.linalg import Vectors
from pyspark.sql import DataFrame, SparkSession

from lambda_ml import contract
from lambda_ml.config import PlatformConfig
from lambda_ml.contract import INDICATOR, ModelInputs
from lambda_ml_apps.ctr.model_registry import RegisteredVersions, register_models
from lambda_ml_apps.ctr.onnx_export import check_parity, export_onnx, onnx_click_probabilities, onnx_inputs
from speed_layer.monitor import metrics_experiment
from lambda_ml_apps.ctr.online_steps import LinearModel

log = logging.getLogger(__name__)

PARITY_ROWS = 1000  # rows of the micro-batch compared between ONNX and Spark


def speed_pipeline(spark: SparkSession, model: LinearModel, inputs: ModelInputs) -> PipelineModel:
    """A Spark pipeline scoring like ``model``: the batch layer's layout, the online weights."""
    labels = {name: [t.partition(INDICATOR)[2] for t in model.names if t.partition(INDICATOR)[0] == name] for name in inputs.categorical}
    weight = dict(zip(model.names, model.weights))
    coefficients = [weight.get(name, 0.0) for name in inputs.numeric]
    stages: list[Any] = []
    encoded = [f"{name}_onehot" for name in inputs.categorical]
    if inputs.categorical:
        indexed = [f"{name}_index" for name in inputs.categorical]
        # An empty vocabulary cannot build an indexer: such an input gets one label of weight 0.
        vocabulary = [labels[name] or [""] for name in inputs.categorical]
        indexer = StringIndexerModel.from_arrays_of_labels(
            vocabulary, inputCols=list(inputs.categorical), outputCols=indexed, handleInvalid="keep"
        )
        # Fitted on the indexer's own output, as in the batch pipeline: one slot per label plus
        # the unknown one.
        sample = spark.createDataFrame([tuple(v[0] for v in vocabulary)], list(inputs.categorical))
        encoder = OneHotEncoder(inputCols=indexed, outputCols=encoded, handleInvalid="keep", dropLast=True).fit(
            indexer.transform(sample)
        )
        stages += [indexer, encoder]
        for name, values in zip(inputs.categorical, vocabulary):
            coefficients += [weight.get(f"{name}{INDICATOR}{value}", 0.0) for value in values] + [0.0]
    stages.append(VectorAssembler(inputCols=list(inputs.numeric), outputCol="numeric"))
    stages.append(VectorAssembler(inputCols=["numeric", *encoded], outputCol="features"))
    jvm = spark.sparkContext._jvm
    assert jvm is not None
    vector = _py2java(spark.sparkContext, Vectors.dense(coefficients))
    # The constructor Spark's own fitting and reading use (public in the bytecode).
    java_lr = jvm.org.apache.spark.ml.classification.LogisticRegressionModel("speed-lr", vector, float(model.intercept))
    classifier = LogisticRegressionModel(java_lr)
    classifier._transfer_params_from_java()
    stages.append(classifier.setFeaturesCol("features"))
    return PipelineModel(stages)


def register_speed_version(
    spark: SparkSession, cfg: PlatformConfig, model: LinearModel, rows: DataFrame, quality: float | None, batch_id: int
) -> RegisteredVersions:
    """Register the online model (after an ONNX-vs-Spark parity check on up to
    :data:`PARITY_ROWS` of ``rows``, which hold the model inputs) and point alias ``speed`` at
    its ONNX version. Raises ``ParityError`` without registering when ONNX disagrees."""
    from pyspark.ml.functions import vector_to_array

    inputs = contract.model_inputs(cfg.features)
    pipeline = speed_pipeline(spark, model, inputs)
    onnx_model = export_onnx(pipeline, spark, inputs, name=cfg.mlflow.registered_model)
    sample = pipeline.transform(rows.select(*inputs.names).limit(PARITY_ROWS))
    compared = sample.select(*inputs.names, vector_to_array("probability")[1].alias("p")).toPandas()
    max_diff = check_parity(compared["p"].to_numpy(dtype=np.float64), onnx_click_probabilities(onnx_model, onnx_inputs(compared, inputs)), cfg.ctr.parity_atol)
    name, generation = cfg.mlflow.registered_model, model.generation
    tags = {
        contract.TAG_LAYER: "speed",
        contract.TAG_SPEED_UPDATES: str(model.updates),
        contract.TAG_PARITY: "passed",
        contract.TAG_SPEED_BASE_VERSION: str(model.base_version),
        "speed.batch_id": str(batch_id),
    }
    if quality is not None:
        tags[contract.TAG_QUALITY_SCORE] = repr(quality)
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_experiment(metrics_experiment(cfg))
    with mlflow.start_run(run_name=f"speed-{generation.version('impressions')}-{generation.version('clicks')}-{model.updates}"):
        mlflow.set_tags(tags)
        mlflow.log_metric("parity_max_abs_diff", max_diff)
        versions = register_models(pipeline, onnx_model, name, generation, tags)
    MlflowClient(cfg.mlflow.tracking_uri).set_registered_model_alias(name, contract.SPEED_ALIAS, versions.onnx)
    log.info(
        "registered the online model (%d updates since %s) as %s version %s (ONNX; Spark twin %s), alias %s; "
        "ONNX matches Spark within %.2g on %d rows",
        model.updates, generation, name, versions.onnx, versions.spark, contract.SPEED_ALIAS, max_diff, len(compared),
    )  # fmt: skip
    return versions

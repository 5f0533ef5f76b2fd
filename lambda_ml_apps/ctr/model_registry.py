"""Registering a fitted Spark pipeline and its ONNX export as two versions of one registered
model, with their signatures and tags: what a batch run does for its model and the speed layer
for its online model, in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version as package_version

import mlflow
import mlflow.onnx
import mlflow.spark
import numpy as np
import onnx
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema, TensorSpec
from pyspark.ml import PipelineModel

from lambda_ml import contract
from lambda_ml.contract import Horizon, ModelInputs
from lambda_ml.spark import jvm_logger_off
from lambda_ml_apps.ctr.onnx_export import graph_inputs

log = logging.getLogger(__name__)

SPARK_ARTIFACT = "spark-model"
ONNX_ARTIFACT = "onnx-model"


@dataclass(frozen=True)
class RegisteredVersions:
    """The two model versions one batch run registered."""

    spark: str
    onnx: str


def spark_signature(model_inputs: ModelInputs) -> ModelSignature:
    """Columns in, Spark's ``prediction`` (0.0 / 1.0) out, as the Spark pyfunc returns it."""
    inputs = [ColSpec("double", name) for name in model_inputs.numeric]
    inputs += [ColSpec("string", name) for name in model_inputs.categorical]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([ColSpec("double")]))


def onnx_signature(model_inputs: ModelInputs) -> ModelSignature:
    """A dict of ``[n, 1]`` tensors in (MLflow's ONNX pyfunc takes no DataFrame for this model)."""
    inputs = [TensorSpec(np.dtype(np.float32), (-1, 1), name) for name in model_inputs.numeric]
    inputs += [TensorSpec(np.dtype(object), (-1, 1), name) for name in model_inputs.categorical]
    outputs = [TensorSpec(np.dtype(np.float32), (-1, 2), contract.ONNX_PROBABILITY_OUTPUT)]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def version_tags(flavor: str, horizon: Horizon, model_inputs: ModelInputs) -> dict[str, str]:
    """Tags every registered version carries."""
    return {
        contract.TAG_FLAVOR: flavor,
        contract.TAG_MODEL_INPUTS: model_inputs.tag(),
        **horizon.tags(),
    }


def _register(model_uri: str, name: str, tags: dict[str, str]) -> ModelVersion:
    registered = mlflow.register_model(model_uri, name, tags=tags)
    log.info("registered %s version %s (%s)", name, registered.version, tags[contract.TAG_FLAVOR])
    return registered


def register_models(
    spark_model: PipelineModel,
    onnx_model: onnx.ModelProto,
    registered_model: str,
    horizon: Horizon,
    tags: Mapping[str, str] | None = None,
) -> RegisteredVersions:
    """Log both models to the active run and register them, with ``tags`` (lineage, gate
    verdict) on both; aliases are moved separately (:func:`apply_decision`).

    Requirements are pinned explicitly: letting MLflow infer them would load each model in a
    subprocess (a second Spark session) just to list its imports.
    """
    # The flavor first tries Spark's own writer on the proxied ``mlflow-artifacts:`` URI, which
    # Hadoop cannot open; Spark logs that expected failure at ERROR before MLflow falls back to
    # saving locally and uploading.
    model_inputs = graph_inputs(onnx_model)  # the Spark twin takes the same columns
    with jvm_logger_off("org.apache.spark.ml.util.Instrumentation"):
        spark_info = mlflow.spark.log_model(
            spark_model,
            SPARK_ARTIFACT,
            signature=spark_signature(model_inputs),
            pip_requirements=[f"pyspark=={package_version('pyspark')}"],
        )
    onnx_info = mlflow.onnx.log_model(
        onnx_model,
        name=ONNX_ARTIFACT,
        signature=onnx_signature(model_inputs),
        pip_requirements=[f"onnx=={package_version('onnx')}", f"onnxruntime=={package_version('onnxruntime')}"],
        save_as_external_data=False,
    )
    extra = dict(tags or {})
    spark_tags = {**version_tags("spark", horizon, model_inputs), **extra}
    spark_version = _register(spark_info.model_uri, registered_model, spark_tags)
    onnx_tags = {
        **version_tags("onnx", horizon, model_inputs),
        **extra,
        contract.TAG_SPARK_VERSION: str(spark_version.version),
    }
    onnx_version = _register(onnx_info.model_uri, registered_model, onnx_tags)
    return RegisteredVersions(spark=str(spark_version.version), onnx=str(onnx_version.version))

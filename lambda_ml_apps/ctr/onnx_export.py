"""ONNX export of the Spark pipeline and the parity check that guards its registration.

The graph's inputs are the model inputs derived from the feature declarations
(``contract.model_inputs``), one ``[None, 1]`` tensor each, named after the columns (float32
numbers, strings for categorical fields); its output ``contract.ONNX_PROBABILITY_OUTPUT`` holds
``[P(no click), P(click)]`` per row.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
from onnxmltools import convert_sparkml
from onnxmltools.convert.common.data_types import FloatTensorType, StringTensorType
from pyspark.ml import PipelineModel
from pyspark.sql import SparkSession

from lambda_ml import contract
from lambda_ml.contract import ModelInputs

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The ONNX graph does not have the inputs or outputs the contract promises."""


class ParityError(AssertionError):
    """ONNX and Spark disagree on the probabilities: the export must not be registered."""


def initial_types(inputs: ModelInputs) -> list[tuple[str, FloatTensorType | StringTensorType]]:
    """The ONNX graph inputs, in ``inputs`` order."""
    return [(name, FloatTensorType([None, 1])) for name in inputs.numeric] + [
        (name, StringTensorType([None, 1])) for name in inputs.categorical
    ]


def graph_inputs(onnx_model: onnx.ModelProto) -> ModelInputs:
    """The model inputs an ONNX graph takes: float tensors are numbers, string tensors categories."""
    numeric, categorical, other = [], [], []
    for graph_input in onnx_model.graph.input:
        element = graph_input.type.tensor_type.elem_type
        if element == onnx.TensorProto.FLOAT:
            numeric.append(graph_input.name)
        elif element == onnx.TensorProto.STRING:
            categorical.append(graph_input.name)
        else:
            other.append(graph_input.name)
    if other:
        raise ExportError(f"the ONNX graph has inputs {other} that are neither float nor string tensors")
    return ModelInputs(tuple(numeric), tuple(categorical))


def export_onnx(model: PipelineModel, spark: SparkSession, inputs: ModelInputs, name: str = "ctr") -> onnx.ModelProto:
    """Convert the fitted pipeline; fail if the probability output is not where serving looks."""
    # The LR converter pprints its coefficients to stdout; keep them out of the job's output.
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        onnx_model = convert_sparkml(model, name, initial_types(inputs), spark_session=spark)
    log.debug("convert_sparkml said: %s", chatter.getvalue())
    outputs = [output.name for output in onnx_model.graph.output]
    if contract.ONNX_PROBABILITY_OUTPUT not in outputs:
        raise ExportError(
            f"the ONNX graph has outputs {outputs}, not {contract.ONNX_PROBABILITY_OUTPUT!r} as the contract says"
        )
    _merge_default_domain(onnx_model)
    found = [graph_input.name for graph_input in onnx_model.graph.input]
    if found != list(inputs.names):
        raise ExportError(f"the ONNX graph has inputs {found}, the declarations say {list(inputs.names)}")
    onnx.checker.check_model(onnx_model)
    return onnx_model


def _merge_default_domain(model: onnx.ModelProto) -> None:
    """Fold the ``ai.onnx`` opset into the default ``""`` one (the same domain by the spec).

    onnxmltools 1.16 emits Reshape under ``ai.onnx`` v13 next to ``""`` v8 for the other ops;
    onnxruntime accepts that but ``onnx.checker`` (which ``mlflow.onnx.load_model`` runs)
    rejects it. Every default-domain op the converter emits exists unchanged at the higher version.
    """
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    if "ai.onnx" not in versions:
        return
    versions[""] = max(versions.pop("ai.onnx"), versions.get("", 0))
    for node in model.graph.node:
        if node.domain == "ai.onnx":
            node.domain = ""
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in versions.items())


def onnx_inputs(rows: pd.DataFrame, inputs: ModelInputs) -> dict[str, np.ndarray]:
    """The ONNX feed for rows holding the model input columns: one ``[n, 1]`` array per input."""
    missing = [name for name in inputs.names if name not in rows.columns]
    if missing:
        raise ValueError(f"rows lack model inputs {missing}")
    feed = {name: rows[name].to_numpy(dtype=np.float32).reshape(-1, 1) for name in inputs.numeric}
    for name in inputs.categorical:
        feed[name] = rows[name].astype(str).to_numpy(dtype=object).reshape(-1, 1)
    return feed


def onnx_click_probabilities(onnx_model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> np.ndarray:
    """P(click) per row from onnxruntime."""
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run([contract.ONNX_PROBABILITY_OUTPUT], dict(feed))
    return np.asarray(probabilities)[:, 1]


def check_parity(spark_probabilities: np.ndarray, onnx_probabilities: np.ndarray, atol: float) -> float:
    """The largest absolute difference; raise :class:`ParityError` if any exceeds ``atol``."""
    if len(spark_probabilities) == 0:
        raise ParityError("no rows to compare: parity cannot be shown on an empty holdout")
    if spark_probabilities.shape != onnx_probabilities.shape:
        raise ParityError(f"shape mismatch: Spark {spark_probabilities.shape}, ONNX {onnx_probabilities.shape}")
    max_diff = float(np.max(np.abs(spark_probabilities - onnx_probabilities)))
    try:
        np.testing.assert_allclose(onnx_probabilities, spark_probabilities, rtol=0, atol=atol)
    except AssertionError as exc:
        raise ParityError(f"ONNX and Spark probabilities differ by up to {max_diff:.3g} (> {atol:g}):\n{exc}") from None
    return max_diff

"""The click-through application's serving models: the ONNX version behind a registry alias,
opened in onnxruntime, and the speed layer's online model arriving as data. Its inputs are read
from the graph: float tensors are numeric features, string tensors categorical ones; each must
be a feature the declarations in ``conf/`` define, so the service can compute it. The session
the service scores with takes the numeric ones packed in one tensor (``pack_numeric_inputs``):
feeding it one tensor per feature cost about a fifth of a request's CPU time.

Everything about one loaded version (session, version number, run, horizon) lives in one
immutable ``CtrServingModel``. The speed layer's online model is one too: it arrives as data on
the model-update topic (a logistic regression's weights, see ``lambda_ml.contract``), is scored
in memory on the same feature vector, and is served under its alias (``speed``) with the version
number of the registry version it was warm-started from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lambda_ml import contract
from lambda_ml.apps import VersionInfo
from lambda_ml.config import FeaturesConfig, PlatformConfig
from lambda_ml.contract import Horizon, LinearWeights, ModelInputs, ModelUpdate
from lambda_ml_apps.ctr.model_inputs import FeatureValue, PackedInputs, build_model_inputs
from serving_layer.model_store import ModelLoadError

log = logging.getLogger(__name__)

ONNX_FLAVOR = "onnx"
# ONNX element types of numeric and categorical model inputs.
_NUMERIC_TYPE = "tensor(float)"
_STRING_TYPE = "tensor(string)"
# The input a packed graph takes its numeric features in (see pack_numeric_inputs).
PACKED_INPUT = "numeric_features"


@dataclass(frozen=True)
class CtrServingModel:
    """One registered ONNX version of the click-through model, ready to score."""

    name: str
    version: int
    alias: str
    run_id: str | None
    horizon: Horizon
    session: ort.InferenceSession | None  # None for a model served from memory (``linear``)
    inputs: ModelInputs  # as the graph takes them
    holdout_auc: float | None = None  # the training run's holdout AUC
    quality: float | None = None  # see quality_score()
    linear: LinearWeights | None = None  # an online model's weights, scored in memory
    updates: int = 0  # an online model's steps since its warm start
    packed: PackedInputs | None = None  # how a packed session takes its inputs (pack_numeric_inputs)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def identity(self) -> tuple[int, str]:
        """What tells loaded models apart: the registry version, and the alias of a model
        served from memory (it shares the version number it was warm-started from)."""
        return (self.version, "" if self.linear is None else self.alias)

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """P(click) per row, as float64 of shape [n], for one ``[n, 1]`` tensor per input."""
        if self.linear is not None:
            return linear_probabilities(self.linear, inputs)
        if self.packed is not None:
            inputs = self.packed.from_tensors(inputs)
        return self._run(inputs)

    def predict_rows(self, rows: Sequence[Mapping[str, FeatureValue]]) -> np.ndarray:
        """P(click) per row of feature values by name (as ``lookup_features`` gives them), fed
        to the session in the shape it takes."""
        if self.packed is None:
            return self.predict(build_model_inputs(rows, self.inputs))
        return self._run(self.packed.build(rows))

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        assert self.session is not None  # a registry version always has one
        (probability,) = self.session.run([contract.ONNX_PROBABILITY_OUTPUT], feeds)
        return np.asarray(probability, dtype=np.float64)[:, 1]

    def relabel(self, alias: str, tags: Mapping[str, str]) -> CtrServingModel:
        """This version served under ``alias``, its quality score read again from ``tags``."""
        return replace(self, alias=alias, quality=quality_score(tags, self.holdout_auc))

    def describe(self) -> str:
        """One line for the logs.

        >>> from lambda_ml.contract import Horizon
        >>> from lambda_ml.contract import ModelInputs
        >>> CtrServingModel("ctr", 3, "champion", "r1", Horizon.of(impressions=5, clicks=4), None, ModelInputs((), ())).describe()
        'ctr version 3 (alias champion), trained on bronze clicks v4, impressions v5 in MLflow run r1'
        """
        return f"{self.name} version {self.version} (alias {self.alias}), trained on {self.horizon} in MLflow run {self.run_id}"


def linear_probabilities(model: LinearWeights, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """P(click) per row of a linear model over ``[n, 1]`` input tensors (as for ONNX).

    >>> w = LinearWeights(("position", "device=mobile"), (-0.5, 1.0), 0.25)
    >>> x = {"position": np.array([[1.0], [2.0]], dtype=np.float32), "device": np.array([["mobile"], ["tablet"]], dtype=object)}
    >>> linear_probabilities(w, x).round(6).tolist()
    [0.679179, 0.320821]
    """
    first = next(iter(inputs.values()))
    margin = np.full(len(first), model.intercept, dtype=np.float64)
    for term, weight in zip(model.terms, model.weights):
        field, _, value = term.partition(contract.INDICATOR)
        column = inputs[field].reshape(-1)
        margin += weight * (column == value if value else column.astype(np.float64))
    return np.asarray(1.0 / (1.0 + np.exp(-margin)), dtype=np.float64)


def linear_serving_model(update: ModelUpdate, features: FeaturesConfig) -> CtrServingModel:
    """An online model update as a servable model; ModelLoadError if it reads an input the
    declarations do not define."""
    assert update.linear is not None
    inputs = update.linear.inputs()
    declared = contract.model_inputs(features)
    unknown = [n for n in inputs.numeric if n not in declared.numeric]
    unknown += [n for n in inputs.categorical if n not in declared.categorical]
    if unknown:
        raise ModelLoadError(
            f"the {update.alias} model update reads inputs {unknown} that the feature declarations do not define"
        )
    return CtrServingModel(
        name=update.registered_model,
        version=update.version,
        alias=update.alias,
        run_id=None,
        horizon=update.generation,
        session=None,
        inputs=inputs,
        quality=update.quality,
        linear=update.linear,
        updates=update.updates or 0,
    )


def open_onnx_session(model: str | Path | bytes) -> ort.InferenceSession:
    """An onnxruntime session on one thread per request (small models, many requests)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def check_session(session: ort.InferenceSession, what: str, features: FeaturesConfig) -> ModelInputs:
    """The graph's inputs; fail unless the declarations define each of them, with its type, and
    the graph gives the contract's probability output."""
    numeric = [i.name for i in session.get_inputs() if i.type == _NUMERIC_TYPE]
    categorical = [i.name for i in session.get_inputs() if i.type == _STRING_TYPE]
    other = [f"{i.name} ({i.type})" for i in session.get_inputs() if i.type not in (_NUMERIC_TYPE, _STRING_TYPE)]
    if other:
        raise ModelLoadError(f"{what} has inputs that are neither float nor string tensors: {', '.join(other)}")
    declared = contract.model_inputs(features)
    unknown = [n for n in numeric if n not in declared.numeric] + [n for n in categorical if n not in declared.categorical]
    if unknown:
        raise ModelLoadError(
            f"{what} takes inputs {unknown} that the feature declarations do not define "
            f"(they define {', '.join(declared.names)}): serve it with the configuration it was trained with"
        )
    outputs = [o.name for o in session.get_outputs()]
    if contract.ONNX_PROBABILITY_OUTPUT not in outputs:
        raise ModelLoadError(f"{what} has no output {contract.ONNX_PROBABILITY_OUTPUT!r}; its outputs are {outputs}")
    return ModelInputs(tuple(numeric), tuple(categorical))


def pack_numeric_inputs(model_bytes: bytes, numeric: Sequence[str]) -> bytes | None:
    """The graph with its ``numeric`` inputs (each ``[n, 1]`` float) replaced by one ``[n, k]``
    float input ``PACKED_INPUT`` that a ``Split`` node cuts back into the tensors of the old
    names: the same computation on the same values, fed with one tensor instead of k (each
    input costs onnxruntime conversion and checks per call). None when there is nothing to
    gain or the graph is not one this can rewrite safely; then the graph is served as it is."""
    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    by_name = {i.name: i for i in graph.input}
    if len(numeric) < 2 or opset is None or any(name not in by_name for name in numeric):
        return None
    for name in numeric:
        shape = by_name[name].type.tensor_type.shape.dim
        if len(shape) != 2 or shape[1].dim_value != 1:
            return None  # not [n, 1]: packing could change the meaning
    numeric_names = set(numeric)
    if any(i.name in numeric_names for i in graph.initializer):
        return None  # an input with a default value
    used = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {v.name for v in graph.value_info}
    used |= {o.name for o in graph.output} | {name for node in graph.node for name in (*node.input, *node.output)}
    packed = PACKED_INPUT
    while packed in used:
        packed += "_"
    batch = by_name[numeric[0]].type.tensor_type.shape.dim[0]
    new_input = onnx.helper.make_tensor_value_info(packed, onnx.TensorProto.FLOAT, [batch.dim_param or None, len(numeric)])
    if opset >= 13:  # the sizes are an input from opset 13 on, an attribute before
        sizes = onnx.numpy_helper.from_array(np.ones(len(numeric), dtype=np.int64), f"{packed}_sizes")
        graph.initializer.append(sizes)
        split = onnx.helper.make_node("Split", [packed, sizes.name], list(numeric), axis=1)
    else:
        split = onnx.helper.make_node("Split", [packed], list(numeric), axis=1, split=[1] * len(numeric))
    kept = [i for i in graph.input if i.name not in numeric_names]
    del graph.input[:]
    graph.input.extend([new_input, *kept])
    graph.node.insert(0, split)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        log.warning("serving a graph with its %d numeric inputs as they are: the packed graph is invalid (%s)",
                    len(numeric), exc)  # fmt: skip
        return None
    return model.SerializeToString()


def open_serving_session(
    model_bytes: bytes, what: str, features: FeaturesConfig
) -> tuple[ort.InferenceSession, ModelInputs, PackedInputs | None]:
    """A session on the graph checked against the declarations (``check_session``): its inputs
    as the graph declares them, and, when its numeric inputs could be packed
    (``pack_numeric_inputs``), how to feed the packed session."""
    session = open_onnx_session(model_bytes)
    inputs = check_session(session, what, features)
    packed_bytes = pack_numeric_inputs(model_bytes, inputs.numeric)
    if packed_bytes is None:
        return session, inputs, None
    packed_session = open_onnx_session(packed_bytes)
    packed = PackedInputs(packed_session.get_inputs()[0].name, inputs)
    # Belt and braces: both graphs must give the very same probabilities on the same rows.
    rows = _probe_rows(inputs)
    plain = build_model_inputs(rows, inputs)
    output = [contract.ONNX_PROBABILITY_OUTPUT]
    if not np.array_equal(session.run(output, plain)[0], packed_session.run(output, packed.build(rows))[0]):
        log.warning("%s is served with its %d numeric inputs as they are: the packed graph answers differently",
                    what, len(inputs.numeric))  # fmt: skip
        return session, inputs, None
    return packed_session, inputs, packed


def _probe_rows(inputs: ModelInputs, n: int = 16, seed: int = 0) -> list[dict[str, FeatureValue]]:
    """Rows of feature values of varied scales (rates, counts, positions); what packing changes
    is how the numbers reach the graph, so one category value will do."""
    rng = np.random.default_rng(seed)
    scales = rng.choice([1.0, 10.0, 1000.0], size=len(inputs.numeric))
    return [
        {**{name: float(rng.random() * scale) for name, scale in zip(inputs.numeric, scales)},
         **{name: "" for name in inputs.categorical}}
        for _ in range(n)
    ]  # fmt: skip


def find_onnx_file(model_dir: Path) -> Path:
    """The ONNX file of a downloaded MLflow model directory (named in its MLmodel file)."""
    from mlflow.models import Model

    try:
        flavor = Model.load(str(model_dir)).flavors.get(ONNX_FLAVOR, {})
    except Exception:  # noqa: BLE001 - fall back to looking for the file itself
        flavor = {}
    if "data" in flavor and (model_dir / flavor["data"]).is_file():
        return model_dir / str(flavor["data"])
    found = sorted(model_dir.rglob("*.onnx"))
    if not found:
        raise ModelLoadError(f"no ONNX file in the downloaded model at {model_dir}")
    return found[0]


def quality_score(tags: Mapping[str, str], holdout_auc: float | None) -> float | None:
    """A version's quality score: its recent progressive-validation AUC (tag
    ``quality.progressive_auc``, written by online evaluation) if any, else its holdout AUC.

    >>> quality_score({"quality.progressive_auc": "0.71"}, 0.65), quality_score({}, 0.65), quality_score({}, None)
    (0.71, 0.65, None)
    """
    tagged = tags.get(contract.TAG_QUALITY_SCORE)
    try:
        return float(tagged) if tagged is not None else holdout_auc
    except ValueError:
        return holdout_auc


def load_onnx_version(cfg: PlatformConfig, info: VersionInfo, alias: str, local_dir: Path) -> CtrServingModel:
    """One registered ONNX version, downloaded into ``local_dir``, opened and checked against
    the declarations and its ``model_inputs`` tag."""
    name = cfg.mlflow.registered_model
    flavor = info.tags.get(contract.TAG_FLAVOR)
    if flavor != ONNX_FLAVOR:
        raise ModelLoadError(
            f"models:/{name}@{alias} is version {info.version} with flavor {flavor!r}; the service needs the {ONNX_FLAVOR!r} version"
        )
    what = f"models:/{name}/{info.version}"
    onnx_file = find_onnx_file(local_dir)
    # The session keeps the graph in memory; the downloaded file can go.
    session, inputs, packed = open_serving_session(onnx_file.read_bytes(), what, cfg.features)
    tagged = info.tags.get(contract.TAG_MODEL_INPUTS)
    if tagged is not None and tagged.split(",") != list(inputs.names):
        raise ModelLoadError(f"{what} is tagged with inputs {tagged!r} but its graph takes {inputs.tag()!r}")
    holdout_auc = None
    if info.run_id:
        from mlflow.tracking import MlflowClient

        holdout_auc = MlflowClient(cfg.mlflow.tracking_uri).get_run(info.run_id).data.metrics.get("auc")
    return CtrServingModel(
        name=name,
        version=info.version,
        alias=alias,
        run_id=info.run_id,
        horizon=Horizon.from_tags(info.tags),
        session=session,
        inputs=inputs,
        holdout_auc=holdout_auc,
        quality=quality_score(info.tags, holdout_auc),
        packed=packed,
    )

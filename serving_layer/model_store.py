"""The model the service scores with: the ONNX version behind a registry alias
(``models:/<registered_model>@<alias>``), opened in onnxruntime. Its inputs are read from the
graph: float tensors are numeric features, string tensors categorical ones; each must be a
feature the declarations in ``conf/`` define, so the service can compute it.

Everything about one loaded version (session, version number, run, horizon) lives in one
immutable ``CtrServingModel``; the ``ModelStore`` swaps that object whole, so hot-swapping
on an alias move is a call to ``ModelStore.reload()``.
"""

from __future__ import annotations

import logging
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lambda_ml import contract
from lambda_ml.config import FeaturesConfig, PlatformConfig
from lambda_ml.contract import Horizon, ModelInputs
from serving_layer.reloadable import Reloadable

log = logging.getLogger(__name__)

ONNX_FLAVOR = "onnx"
# ONNX element types of numeric and categorical model inputs.
_NUMERIC_TYPE = "tensor(float)"
_STRING_TYPE = "tensor(string)"


class ModelLoadError(RuntimeError):
    """The alias resolves to nothing usable; the message says what and where."""


@dataclass(frozen=True)
class CtrServingModel:
    """One registered ONNX version of the click-through model, ready to score."""

    name: str
    version: int
    alias: str
    run_id: str | None
    horizon: Horizon
    session: ort.InferenceSession
    inputs: ModelInputs  # as the graph takes them

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def predict(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """P(click) per row, as float64 of shape [n], for one ``[n, 1]`` tensor per input."""
        (probability,) = self.session.run([contract.ONNX_PROBABILITY_OUTPUT], inputs)
        return np.asarray(probability, dtype=np.float64)[:, 1]

    def describe(self) -> str:
        """One line for the logs.

        >>> from lambda_ml.contract import Horizon
        >>> from lambda_ml.contract import ModelInputs
        >>> CtrServingModel("ctr", 3, "champion", "r1", Horizon(5, 4), None, ModelInputs((), ())).describe()
        'ctr version 3 (alias champion), trained on bronze impressions v5, clicks v4 in MLflow run r1'
        """
        return f"{self.name} version {self.version} (alias {self.alias}), trained on {self.horizon} in MLflow run {self.run_id}"


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


def check_registry_reachable(tracking_uri: str, timeout_s: float = 3.0) -> None:
    """Fail fast when an HTTP tracking server does not answer (the MLflow client would retry
    for minutes); other URIs (sqlite, file) are left to the client."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # it answers; the client will report what is wrong
    except OSError as exc:
        raise ModelLoadError(f"the MLflow tracking server at {tracking_uri} does not answer ({exc})") from exc


def load_registered_model(cfg: PlatformConfig) -> CtrServingModel:
    """Resolve ``models:/<registered_model>@<alias>``, download its ONNX file and open it."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, alias, uri = cfg.mlflow.registered_model, cfg.serving.model_alias, cfg.mlflow.tracking_uri
    check_registry_reachable(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ModelLoadError(
                f"no version of registered model {name!r} has alias {alias!r} in {uri} yet: run the batch layer first"
            ) from exc
        raise ModelLoadError(f"could not resolve models:/{name}@{alias} in {uri}: {exc.message}") from exc
    tags = dict(version.tags or {})
    flavor = tags.get(contract.TAG_FLAVOR)
    if flavor != ONNX_FLAVOR:
        raise ModelLoadError(
            f"models:/{name}@{alias} is version {version.version} with flavor {flavor!r}; "
            f"the service needs the {ONNX_FLAVOR!r} version"
        )
    what = f"models:/{name}/{version.version}"
    with tempfile.TemporaryDirectory(prefix="lambda-ml-model-") as tmp:
        import mlflow.artifacts

        started = time.monotonic()
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=what, dst_path=tmp, tracking_uri=uri, registry_uri=uri
        )
        onnx_file = find_onnx_file(Path(local))
        # The session keeps the graph in memory; the downloaded file can go.
        session = open_onnx_session(onnx_file.read_bytes())
        log.debug("downloaded %s in %.1f s", what, time.monotonic() - started)
    inputs = check_session(session, what, cfg.features)
    tagged = tags.get(contract.TAG_MODEL_INPUTS)
    if tagged is not None and tagged.split(",") != list(inputs.names):
        raise ModelLoadError(f"{what} is tagged with inputs {tagged!r} but its graph takes {inputs.tag()!r}")
    return CtrServingModel(
        name=name,
        version=int(version.version),
        alias=alias,
        run_id=version.run_id,
        horizon=Horizon.from_tags(tags),
        session=session,
        inputs=inputs,
    )


class ModelStore(Reloadable[CtrServingModel]):
    """The model being served; ``reload()`` re-resolves the alias and swaps atomically."""

    @classmethod
    def from_config(cls, cfg: PlatformConfig, retry_interval_s: float = 5.0) -> ModelStore:
        return cls(
            f"models:/{cfg.mlflow.registered_model}@{cfg.serving.model_alias}",
            lambda: load_registered_model(cfg),
            retry_interval_s,
        )

"""The k-means model in the MLflow registry: one version per batch run (``flavor=centres``), an
MLflow pyfunc logged from code (:mod:`.pyfunc_model`) whose artefacts hold the centres as JSON
(``artifacts/centres.json``). The batch layer's gate, the speed layer and the serving layer read
that JSON file back, never a pickle.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from importlib.metadata import version as package_version
from pathlib import Path

import mlflow
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from lambda_ml import contract
from lambda_ml_apps.kmeans.model import KMeansCentres

log = logging.getLogger(__name__)

FLAVOR = "centres"  # the flavor tag of a k-means version
MODEL_ARTIFACT = "centres-model"  # the logged model's name in its run
CENTRES_FILE = "centres.json"
# Where the centres are in a downloaded model version (MLflow's pyfunc keeps artefacts there).
CENTRES_PATH = ("artifacts", CENTRES_FILE)
TAG_FEATURES = "kmeans.features"  # on a version: its feature names, comma-separated
TAG_K = "kmeans.k"
_PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def signature(centres: KMeansCentres) -> ModelSignature:
    """One double column per feature in; the nearest centre and the distance to it out."""
    inputs = Schema([ColSpec("double", name) for name in centres.feature_names])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("long", "cluster"), ColSpec("double", "distance")]))


def register_centres(centres: KMeansCentres, registered_model: str, tags: Mapping[str, str]) -> str:
    """Log ``centres`` as a model in the active run and register it as one version with ``tags``
    plus ``flavor=centres``, the feature names and k; returns the version number."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / CENTRES_FILE
        path.write_text(centres.to_json())
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(_PYFUNC_CODE),
            artifacts={"centres": str(path)},
            signature=signature(centres),
            # Pinned rather than inferred: inferring loads the model in a subprocess. Loading it
            # also needs this project's lambda_ml_apps package (the code imports its model).
            pip_requirements=[f"{p}=={package_version(p)}" for p in ("mlflow", "numpy", "pandas")],
        )
    version_tags = {
        **tags,
        contract.TAG_FLAVOR: FLAVOR,
        TAG_FEATURES: ",".join(centres.feature_names),
        TAG_K: str(centres.k),
    }
    registered = mlflow.register_model(info.model_uri, registered_model, tags=version_tags)
    log.info("registered %s version %s (k=%d centres over %s)", registered_model, registered.version, centres.k, list(centres.feature_names))
    return str(registered.version)


def read_centres(local_dir: Path) -> KMeansCentres:
    """The centres of a downloaded model version (its folder); ValueError naming the file when
    it is missing or malformed."""
    path = Path(local_dir).joinpath(*CENTRES_PATH)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: not a k-means model version (flavor {FLAVOR})") from None
    try:
        return KMeansCentres.from_json(text)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def download_centres(tracking_uri: str, registered_model: str, version: str | int) -> KMeansCentres:
    """The centres of a registered version, downloaded from MLflow into a temporary folder."""
    # models:/ URIs resolve through the process-wide tracking URI.
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        local = mlflow.artifacts.download_artifacts(f"models:/{registered_model}/{version}", dst_path=folder)
        return read_centres(Path(local))


def feature_names_tag(tags: Mapping[str, str]) -> tuple[str, ...]:
    """The feature names a version's tags record (empty when it has none).

    >>> feature_names_tag({TAG_FEATURES: "x0,x1"})
    ('x0', 'x1')
    """
    return tuple(name for name in tags.get(TAG_FEATURES, "").split(",") if name)


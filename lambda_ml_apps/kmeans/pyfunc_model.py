"""The registered k-means model as an MLflow pyfunc, logged from this file (MLflow's models
from code: no pickle in the artefacts). ``mlflow.pyfunc.load_model("models:/kmeans/3")``
answers a frame of points (one column per feature) with the nearest centre's index and the
distance to it; the serving layer does not load it, it reads ``artifacts/centres.json`` beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc.model import PythonModel

from lambda_ml_apps.kmeans.model import KMeansCentres, assign


class KMeansPyfunc(PythonModel):
    """Nearest-centre assignment of the centres logged with it (artifact ``centres``)."""

    centres: KMeansCentres | None = None

    def load_context(self, context: Any) -> None:
        self.centres = KMeansCentres.from_json(Path(context.artifacts["centres"]).read_text())

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        assert self.centres is not None  # load_context ran
        missing = [name for name in self.centres.feature_names if name not in model_input.columns]
        if missing:
            raise ValueError(f"the points lack the feature columns {missing}")
        index, distance = assign(self.centres, model_input[list(self.centres.feature_names)].to_numpy(dtype="float64"))
        return pd.DataFrame({"cluster": index, "distance": distance})


set_model(KMeansPyfunc())

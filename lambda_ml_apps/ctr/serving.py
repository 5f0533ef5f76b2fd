"""The click-through application's serving side (the ``ServingModels`` contract): its ONNX
versions, its online model arriving as data, and ``POST /predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lambda_ml.apps import VersionInfo
from lambda_ml.config import PlatformConfig
from lambda_ml.contract import ModelUpdate
from lambda_ml_apps.ctr.serving_model import CtrServingModel, linear_serving_model, load_onnx_version


class CtrServingModels:
    """Loads registered ONNX versions, applies online updates, mounts ``POST /predict``."""

    def load(self, cfg: PlatformConfig, info: VersionInfo, alias: str, local_dir: Path) -> CtrServingModel:
        return load_onnx_version(cfg, info, alias, local_dir)

    def apply(self, cfg: PlatformConfig, update: ModelUpdate) -> CtrServingModel | None:
        return None if update.linear is None else linear_serving_model(update, cfg.features)

    def mount(self, app: Any, service: Any) -> None:
        from lambda_ml_apps.ctr.predict import mount_predict

        mount_predict(app, service)

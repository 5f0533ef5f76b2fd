"""Request rows + batch views -> the model's input tensors, per ``lambda_ml.contract``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lambda_ml import contract
from serving_layer.views import BatchViews, EntityCounts


class ScoringRow(Protocol):
    """What the service is asked to score: who, what, and the context."""

    @property
    def user_id(self) -> str: ...
    @property
    def item_id(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def position(self) -> int: ...


@dataclass(frozen=True)
class RowFeatures:
    """The feature values one row was scored with (returned to the caller, loggable)."""

    user: EntityCounts
    item: EntityCounts
    position: int
    device: str


def lookup_features(rows: Sequence[ScoringRow], views: BatchViews) -> list[RowFeatures]:
    """The view counts and context of every row; unknown users and items count zero."""
    return [
        RowFeatures(views.users.lookup(row.user_id), views.items.lookup(row.item_id), row.position, row.device)
        for row in rows
    ]


def build_model_inputs(features: Sequence[RowFeatures]) -> dict[str, np.ndarray]:
    """One ``[n, 1]`` tensor per contract input: float32 counts and position, object device.

    >>> from serving_layer.views import EntityCounts
    >>> x = build_model_inputs([RowFeatures(EntityCounts(10, 2), EntityCounts(0, 0), 3, "mobile")])
    >>> list(x) == list(contract.MODEL_INPUTS)
    True
    >>> x["user_impressions"].tolist(), x["position"].dtype.name, x["device"].tolist()
    ([[10.0]], 'float32', [['mobile']])
    """
    if not features:
        raise ValueError("at least one row is needed to build model inputs")
    columns: dict[str, list[float] | list[str]] = {
        "user_impressions": [float(f.user.impressions) for f in features],
        "user_clicks": [float(f.user.clicks) for f in features],
        "item_impressions": [float(f.item.impressions) for f in features],
        "item_clicks": [float(f.item.clicks) for f in features],
        "position": [float(f.position) for f in features],
        "device": [f.device for f in features],
    }
    if set(columns) != set(contract.MODEL_INPUTS):
        # The contract changed without this function: fail loudly rather than feed a wrong graph.
        raise RuntimeError(f"build_model_inputs knows {sorted(columns)}, the contract wants {contract.MODEL_INPUTS}")
    inputs: dict[str, np.ndarray] = {}
    for name in contract.MODEL_INPUTS:
        dtype = object if name in contract.CATEGORICAL_FEATURES else np.float32
        inputs[name] = np.asarray(columns[name], dtype=dtype).reshape(-1, 1)
    return inputs

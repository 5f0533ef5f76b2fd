"""Request rows + batch views -> feature values -> the model's input tensors.

Window features are read off the entities' bucket rows with ``lambda_ml.buckets``, the same
declarations and definitions the batch layer trains with: at scoring time ``t`` (the row's
``event_time``, or now), a window ``W`` covers the events in ``[bucket_start(t) - W, t)``. The
whole buckets before ``t``'s come from the views; ``t``'s own bucket is its row in the views when
no event of the lake is at or after ``t`` (scoring now), else the bucket's events strictly
before ``t``, read from bronze (``serving_layer.lake_events``). Context features are the row's
own fields.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from operator import attrgetter, itemgetter
from typing import Protocol

import numpy as np

from lambda_ml.buckets import WindowPlan, to_micros, window_plan
from lambda_ml.config import FeaturesConfig
from lambda_ml.contract import ModelInputs
from serving_layer.views import BatchViews

FeatureValue = float | int | str


class ScoringRow(Protocol):
    """What the service is asked to score: who, what, the context, and (optionally) when."""

    @property
    def user_id(self) -> str: ...
    @property
    def item_id(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def position(self) -> int: ...
    @property
    def event_time(self) -> datetime | None: ...


def row_features(row: ScoringRow, views: BatchViews, features: FeaturesConfig, now: datetime) -> dict[str, FeatureValue]:
    """Every declared feature of one row: each entity's window features, then the context."""
    plan = _row_plan(features)
    micros = to_micros(row.event_time or now)
    found: dict[str, FeatureValue] = {}
    part = views.current_part(micros)
    if part is None:  # no event is that late: the current bucket's row holds only events before t
        for entity, key_of, windows in plan.entities:
            windows.add_features(found, views.lookup(entity, key_of(row)), micros)
    else:  # the current bucket's events before t, from the lake
        for entity, key_of, windows in plan.entities:
            key = key_of(row)
            windows.add_features(found, views.lookup(entity, key), micros, part.before(entity, key, micros))
    for field in plan.numeric:
        found[field] = getattr(row, field)
    for field in plan.categorical:
        found[field] = str(getattr(row, field))
    return found


@dataclass(frozen=True)
class _RowPlan:
    """What :func:`row_features` needs of the declarations, worked out once per config."""

    entities: tuple[tuple[str, Callable[[ScoringRow], tuple[str, ...]], WindowPlan], ...]  # name, key of a row, windows
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]


_ROW_PLANS: dict[int, tuple[FeaturesConfig, _RowPlan]] = {}


def _row_plan(features: FeaturesConfig) -> _RowPlan:
    cached = _ROW_PLANS.get(id(features))
    if cached is not None and cached[0] is features:
        return cached[1]
    plan = _RowPlan(
        tuple((name, _key_of(entity.keys), window_plan(features, name)) for name, entity in features.entities.items()),
        tuple(features.context.numeric),
        tuple(features.context.categorical),
    )
    _ROW_PLANS[id(features)] = (features, plan)  # keeps the config alive: its id stays its own
    return plan


def _key_of(fields: Sequence[str]) -> Callable[[ScoringRow], tuple[str, ...]]:
    """A row's key of an entity: the values of its key fields, as strings.

    >>> from types import SimpleNamespace
    >>> row = SimpleNamespace(user_id="u1", device="mobile", item_id=7)
    >>> _key_of(["user_id", "device"])(row), _key_of(["item_id"])(row)
    (('u1', 'mobile'), ('7',))
    """
    get = attrgetter(*fields)
    if len(fields) == 1:
        return lambda row: (str(get(row)),)
    return lambda row: tuple(map(str, get(row)))


def lookup_features(
    rows: Sequence[ScoringRow], views: BatchViews, features: FeaturesConfig, now: datetime
) -> list[dict[str, FeatureValue]]:
    """:func:`row_features` of every row, all scored at ``now`` unless a row gives its time."""
    return [row_features(row, views, features, now) for row in rows]


def build_model_inputs(rows: Sequence[Mapping[str, FeatureValue]], inputs: ModelInputs) -> dict[str, np.ndarray]:
    """One ``[n, 1]`` tensor per model input, in graph order: float32 numbers, object strings.

    >>> x = build_model_inputs([{"user_clicks_1h": 2.0, "position": 3, "device": "mobile", "unused": 1.0}],
    ...                        ModelInputs(("user_clicks_1h", "position"), ("device",)))
    >>> list(x), x["position"].dtype.name, x["device"].tolist()
    (['user_clicks_1h', 'position', 'device'], 'float32', [['mobile']])
    """
    if not rows:
        raise ValueError("at least one row is needed to build model inputs")
    missing = [name for name in inputs.names if name not in rows[0]]
    if missing:
        # The model store refuses such a model at load; reaching this is a bug, not a bad request.
        raise RuntimeError(f"the model needs inputs {missing} that the feature declarations do not define")
    tensors: dict[str, np.ndarray] = {}
    for name in inputs.numeric:
        tensors[name] = np.asarray([float(row[name]) for row in rows], dtype=np.float32).reshape(-1, 1)
    for name in inputs.categorical:
        tensors[name] = np.asarray([str(row[name]) for row in rows], dtype=object).reshape(-1, 1)
    return tensors


@dataclass(frozen=True)
class PackedInputs:
    """The feeds of a graph whose numeric inputs come packed in one ``[n, k]`` float32 tensor
    ``name`` (columns in ``inputs.numeric`` order), categorical ones as ``[n, 1]`` strings:
    two tensors to hand to onnxruntime instead of one per feature.

    >>> packed = PackedInputs("numeric_features", ModelInputs(("user_clicks_1h", "position"), ("device",)))
    >>> x = packed.build([{"user_clicks_1h": 2.0, "position": 3, "device": "mobile", "unused": 1.0}])
    >>> list(x), x["numeric_features"].tolist(), x["numeric_features"].dtype.name, x["device"].tolist()
    (['numeric_features', 'device'], [[2.0, 3.0]], 'float32', [['mobile']])
    """

    name: str
    inputs: ModelInputs

    def build(self, rows: Sequence[Mapping[str, FeatureValue]]) -> dict[str, np.ndarray]:
        """The feeds for ``rows`` of feature values by name."""
        if not rows:
            raise ValueError("at least one row is needed to build model inputs")
        numeric = self._numeric_values
        try:
            feeds = {self.name: np.array([numeric(row) for row in rows], dtype=np.float32)}
            for name in self.inputs.categorical:
                feeds[name] = np.array([[str(row[name])] for row in rows], dtype=object)
        except KeyError as exc:
            # The model store refuses such a model at load; reaching this is a bug, not a bad request.
            raise RuntimeError(f"the model needs input {exc} that the feature declarations do not define") from None
        return feeds

    def from_tensors(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feeds for one ``[n, 1]`` tensor per input (as :func:`build_model_inputs` gives)."""
        numeric = np.hstack([tensors[name] for name in self.inputs.numeric]).astype(np.float32)
        return {self.name: numeric, **{name: tensors[name] for name in self.inputs.categorical}}

    @cached_property
    def _numeric_values(self) -> Callable[[Mapping[str, FeatureValue]], tuple[FeatureValue, ...]]:
        # Worked out once per loaded model rather than per request.
        getter = itemgetter(*self.inputs.numeric)
        if len(self.inputs.numeric) == 1:
            return lambda row: (getter(row),)
        return getter

"""The k-means application's serving side: a registered version's centres (read from its
downloaded artefacts), the speed layer's centres (travelling as data in a model update), and
``POST /assign``, which answers each point with its nearest centre.

A model's quality for the serving layer's policies is minus its holdout inertia per point (the
gate's ``gate.inertia`` tag: higher is better, like every quality there); the speed layer's
centres have none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, HTTPException, Query
from pydantic import BaseModel, ConfigDict

from lambda_ml import contract
from lambda_ml.apps import Service, VersionInfo
from lambda_ml.config import PlatformConfig
from lambda_ml.contract import Horizon, ModelUpdate
from lambda_ml_apps.kmeans.model import KMeansCentres, assign
from lambda_ml.schemas import EventField, event_type
from lambda_ml.validation import DEFAULT_MAX_STRING_LENGTH, InvalidEvent, field_value
from lambda_ml_apps.kmeans.registry import read_centres
from serving_layer.http_api import body_error_responses, field_errors, unavailable
from serving_layer.model_store import no_version_yet
from serving_layer.reloadable import NotReadyError

# The gate's quality metric of a k-means version (KMeansBatchUpdate: lower is better).
QUALITY_METRIC = "inertia"


def quality_of(tags: Mapping[str, str]) -> float | None:
    """Minus the holdout inertia per point a version's gate tags record; None without one.

    >>> quality_of({"gate.metric": "inertia", "gate.inertia": "2.5", "gate.higher_is_better": "false"})
    -2.5
    >>> quality_of({}) is None
    True
    """
    from batch_layer.registry import recorded_quality

    recorded = recorded_quality(tags)
    if recorded.metric != QUALITY_METRIC or not math.isfinite(recorded.value):
        return None
    return recorded.value if recorded.higher_is_better else -recorded.value


@dataclass(frozen=True)
class KMeansServingModel:
    """One loaded set of centres (the ``ServingModel`` contract)."""

    name: str
    version: int
    alias: str
    run_id: str | None
    horizon: Horizon
    quality: float | None
    centres: KMeansCentres
    updates: int | None = None  # mini-batch steps since the champion (the speed layer's centres only)

    @property
    def identity(self) -> tuple[int, str]:
        """The registry version, and the alias of centres served from memory (the speed
        layer's carry the version of the champion they started from)."""
        return (self.version, "" if self.updates is None else self.alias)

    def relabel(self, alias: str, tags: Mapping[str, str]) -> KMeansServingModel:
        """These centres under ``alias``, the quality read again from the version's ``tags``
        (centres from memory keep none)."""
        return replace(self, alias=alias, quality=None if self.updates is not None else quality_of(tags))

    def describe(self) -> str:
        """One line for the logs.

        >>> m = KMeansServingModel("kmeans", 3, "champion", "r1", Horizon.of(points=5), None, KMeansCentres.of([[0.0]], ["x0"], [1]))
        >>> m.describe()
        'kmeans version 3 (alias champion): k=1 centres over x0, trained on bronze points v5 in MLflow run r1'
        """
        what = f"{self.name} version {self.version} (alias {self.alias}): k={self.centres.k} centres over {', '.join(self.centres.feature_names)}"
        if self.updates is not None:
            return f"{what}, the champion's moved by {self.updates} mini-batch steps after {self.horizon}"
        return f"{what}, trained on {self.horizon} in MLflow run {self.run_id}"

    def assign(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centre and Euclidean distance per point (an ``(n, d)`` array in feature order)."""
        return assign(self.centres, points)


def _check_features(cfg: PlatformConfig, centres: KMeansCentres, what: str) -> None:
    if centres.feature_names != tuple(cfg.kmeans.features):
        raise ValueError(f"{what} has centres over {list(centres.feature_names)}, but kmeans.features is {list(cfg.kmeans.features)}")


class AssignRequest(BaseModel):
    """``POST /assign``: the points, each an object with one JSON number per feature."""

    model_config = ConfigDict(extra="forbid")
    points: list[dict[str, Any]]


# A point refused, and the 422 the service answers to it (the OpenAPI example).
INVALID_POINTS: dict[str, Any] = {"points": [{"x0": 1.5, "x1": -0.2, "event_time": 1764547200}]}
INVALID_POINTS_EXAMPLE: dict[str, Any] = {
    "detail": [{"field": "points.0.event_time",
                "message": "bad value for event_time: expected an ISO-8601 timestamp string with a time zone, got 1764547200"}]
}  # fmt: skip


class InvalidPoints(ValueError):
    """A refused ``/assign`` body; ``field`` is the JSON path of the value (``points.0.x0``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def request_points(
    body: AssignRequest, features: tuple[str, ...], max_rows: int, fields: Sequence[EventField] = (),
    max_string_length: int = DEFAULT_MAX_STRING_LENGTH,
) -> np.ndarray:  # fmt: skip
    """The request's points as an ``(n, d)`` array; InvalidPoints naming the field when one is
    missing or is not a finite number, or when there are none or more than ``max_rows``. A
    point's other fields of its event type (``fields``: ``event_time``, ``source_id``...) may be
    left out, but one given must be typed as declared: the event validator
    (``lambda_ml.validation``) checks it, so an ``event_time`` is an ISO-8601 string, never a number.

    >>> request_points(AssignRequest(points=[{"x0": 1, "x1": 2.5}]), ("x0", "x1"), 10).tolist()
    [[1.0, 2.5]]
    >>> request_points(AssignRequest(points=[{"x0": True, "x1": 2.5}]), ("x0", "x1"), 10)
    Traceback (most recent call last):
    ...
    lambda_ml_apps.kmeans.serving.InvalidPoints: points.0.x0: bad value for x0: expected a finite number, got true
    """
    if not body.points:
        raise InvalidPoints("points", "at least one point is needed")
    if len(body.points) > max_rows:
        raise InvalidPoints("points", f"{len(body.points)} points are more than serving.max_rows ({max_rows})")
    declared = {field.name: field for field in fields}
    rows = np.empty((len(body.points), len(features)), dtype=np.float64)
    for i, point in enumerate(body.points):
        for name, value in point.items():
            if name in declared and name not in features:
                _checked(declared[name], value, f"points.{i}.{name}", max_string_length)
        for j, name in enumerate(features):
            if name not in point:
                raise InvalidPoints(f"points.{i}.{name}", f"missing (every point needs {', '.join(features)})")
            rows[i, j] = float(_checked(declared.get(name, EventField(name, "double")), point[name], f"points.{i}.{name}", max_string_length))
    return rows


def _checked(field: EventField, value: Any, path: str, max_string_length: int) -> Any:
    try:
        return field_value(field, value, max_string_length)
    except InvalidEvent as exc:
        raise InvalidPoints(path, str(exc)) from None


class KMeansServingModels:
    """The k-means application's serving side (the ``ServingModels`` contract)."""

    def load(self, cfg: PlatformConfig, info: VersionInfo, alias: str, local_dir: Path) -> KMeansServingModel:
        """The centres of a downloaded version; RuntimeError naming the version and what is wrong."""
        name = cfg.mlflow.registered_model
        try:
            centres = read_centres(local_dir)
            _check_features(cfg, centres, f"{name} version {info.version}")
        except ValueError as exc:
            raise RuntimeError(f"cannot load {name} version {info.version} (alias {alias}): {exc}") from exc
        return KMeansServingModel(name, info.version, alias, info.run_id, Horizon.from_tags(info.tags), quality_of(info.tags), centres)

    def apply(self, cfg: PlatformConfig, update: ModelUpdate) -> KMeansServingModel | None:
        """The centres an update carries in ``data`` (the speed layer's), None when it carries
        none; ValueError naming the field when they are malformed."""
        if update.data is None:
            return None
        try:
            centres = KMeansCentres.from_dict(update.data)
        except ValueError as exc:
            raise ValueError(f"model update field data: {exc}") from exc
        if update.registered_model != cfg.mlflow.registered_model:
            raise ValueError(f"model update field registered_model: {update.registered_model!r} is not {cfg.mlflow.registered_model!r}")
        _check_features(cfg, centres, "model update field data.feature_names")
        return KMeansServingModel(
            update.registered_model, update.version, update.alias, None, update.generation, None, centres, update.updates or 0
        )

    def mount(self, app: FastAPI, service: Service) -> None:
        """Add ``POST /assign`` to the service's ``app``, behind the service's API-key guard
        when it has one (its ``guarded`` dependencies)."""
        app.include_router(self.router(service), dependencies=list(getattr(service, "guarded", ())))

    def router(self, service: Service) -> APIRouter:
        """``POST /assign``; 422 naming the field for a bad point, 503 while no champion is loaded."""
        router = APIRouter(tags=["kmeans"])
        features = tuple(service.cfg.kmeans.features)
        max_rows = service.cfg.serving.max_rows
        declared, max_string_length = event_type(service.cfg, service.cfg.kmeans.event_type).fields, service.cfg.events.max_string_length
        default_policy = "latest" if service.cfg.serving.policy == "latest" else "champion"

        @router.post(
            "/assign",
            summary="The nearest centre of each point",
            responses={
                **body_error_responses(max_rows, INVALID_POINTS_EXAMPLE, "Invalid points; each error names its field."),
                503: {"description": "No champion loaded yet.", "content": {"application/json": {"example": {
                    "detail": f"not ready to assign: models:/{service.cfg.mlflow.registered_model}@{service.cfg.serving.model_alias} "
                              f"could not be loaded: {no_version_yet(service.cfg.mlflow.registered_model, service.cfg.serving.model_alias)}"}}}},
            },
        )  # fmt: skip
        def assign_points(
            body: AssignRequest,
            policy: Literal["champion", "latest"] | None = Query(
                None, description="champion (default) or latest: the speed layer's centres when they are loaded"
            ),
        ) -> dict[str, Any]:
            try:
                points = request_points(body, features, max_rows, declared, max_string_length)
            except InvalidPoints as exc:
                raise HTTPException(status_code=422, detail=field_errors(exc.field, exc.message)["detail"]) from None
            try:
                served = service.served()
            except NotReadyError as exc:
                raise unavailable(f"not ready to assign: {exc}") from None
            model: KMeansServingModel = served.champion
            if (policy or default_policy) == "latest":
                model = served.by_alias.get(contract.SPEED_ALIAS, model)
            index, distance = model.assign(points)
            return {
                "assignments": [{"cluster": int(i), "distance": float(d)} for i, d in zip(index, distance, strict=True)],
                "model": {"version": model.version, "alias": model.alias, "horizon": model.horizon.parts, "updates": model.updates},
            }

        return router

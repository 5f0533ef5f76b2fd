"""What the service gives the routes, its own and an application's (the ``Service`` contract of
``lambda_ml.apps``): the config, the model and view slots, the metrics, the clock, the prediction
log, the model-update listener and the API-key guard."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lambda_ml.config import PlatformConfig
from serving_layer.dependencies import DependencyStatus
from serving_layer.metrics import ServiceMetrics
from serving_layer.model_store import ServedModels
from serving_layer.prediction_log import PredictionLog
from serving_layer.reloadable import Reloadable
from serving_layer.updates import ModelUpdateListener
from serving_layer.views import BatchViews


@dataclass
class ServiceContext:
    """One per service; routes read the slots' current values per request."""

    cfg: PlatformConfig
    models: Reloadable[ServedModels]
    views: Reloadable[BatchViews]
    metrics: ServiceMetrics
    clock: Callable[[], datetime]
    prediction_log: PredictionLog | None
    guarded: list[Any]  # route dependencies checking the API key (empty without one)
    unauthorized: dict[int | str, dict[str, Any]]  # the 401 of the OpenAPI document, when guarded
    model_updates: ModelUpdateListener | None = None
    # The registry's, the lake's and Kafka's state, reported by the slots and the Kafka probe.
    dependencies: DependencyStatus = field(default_factory=DependencyStatus)
    shutdown: list[Callable[[], None]] = field(default_factory=list)  # run when the service stops
    # Tags of request bodies that are unions (e.g. one row or a batch): left out of error paths.
    union_tags: set[str] = field(default_factory=set)

    def served(self) -> ServedModels:
        """The models loaded now; NotReadyError (a 503) while no champion is loaded."""
        return self.models.get()

    def readiness(self) -> tuple[bool, list[str]]:
        """Whether models and views are loaded, and what is missing when they are not."""
        served, loaded = self.models.current, self.views.current
        problems = []
        if served is None:
            problems.append(self.models.last_error or f"{self.models.name} is not loaded yet")
        if loaded is None:
            problems.append(self.views.last_error or f"{self.views.name} are not loaded yet")
        return served is not None and loaded is not None, problems

    def problems(self) -> tuple[bool, list[str]]:
        """Readiness, and everything wrong now: what is not loaded, each dependency that fails
        (named first: ``registry: ...``, ``lake: ...``, ``kafka: ...``), the aliases that could
        not be refreshed and why the champion could not be reloaded."""
        ready, problems = self.readiness()
        problems += self.dependencies.problems()
        if (served := self.models.current) is not None:
            problems += served.problems
            if self.models.last_error:
                problems.append(self.models.last_error)
        return ready, problems

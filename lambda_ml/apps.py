"""Applications and the registry that picks one by config.

The layers are generic machinery: ingest, bronze, quarantine, horizons, feature views and
increments, the registry and its quality gate, model updates over Kafka, the model store with
hot swap, the service. An application supplies what is specific to it: its labels, training,
online updates and serving model, one small contract per layer (below), named after it:
``<App>BatchUpdate``, ``<App>SpeedUpdater``, ``<App>ServingModels``.

``app.type`` in the config names the application; the registry below maps each type to the
object binding its contracts, imported only when a layer asks for it (so that loading the
config never imports Spark or an application's dependencies). A type that is not registered
fails when the config is loaded, naming the file and the key.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from fastapi import FastAPI
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.streaming.query import StreamingQuery
    from pyspark.sql.streaming.readwriter import DataStreamWriter

    from lambda_ml.config import PlatformConfig
    from lambda_ml.contract import Horizon, ModelUpdate
    from lambda_ml.partial_buckets import FeatureEvent
    from lambda_ml.producer import Record

# --------------------------------------------------------------------------- batch


@dataclass(frozen=True)
class Snapshot:
    """The master dataset pinned at a horizon: each event type's bronze rows (duplicates
    included, with their Kafka coordinates) at the horizon's Delta version."""

    events: Mapping[str, DataFrame]
    horizon: Horizon

    def __getitem__(self, event_type: str) -> DataFrame:
        return self.events[event_type]


@dataclass(frozen=True)
class Quality:
    """The figure the quality gate compares, measured on the candidate's holdout rows.

    >>> Quality("auc", 0.71, higher_is_better=True).beats(0.70, margin=0.005)
    True
    >>> Quality("inertia", 10.0, higher_is_better=False).beats(10.0, margin=0.0)
    False
    """

    metric: str
    value: float
    higher_is_better: bool
    margin: float = 0.0  # what the gate requires beyond the champion's value (config)

    def beats(self, other: float, margin: float | None = None) -> bool:
        """True when this value is better than ``other`` by more than ``margin`` (default: the
        quality's own)."""
        margin = self.margin if margin is None else margin
        return self.value > other + margin if self.higher_is_better else self.value < other - margin


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested mapping as MLflow params: dotted keys, lists and scalars as text.

    >>> flat_params({"model": "lr", "gbt": {"max_depth": 4}, "grid": [0.1, 1.0]}, "ctr")
    {'ctr.model': 'lr', 'ctr.gbt.max_depth': '4', 'ctr.grid': '[0.1, 1.0]'}
    """
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flat_params(value, name))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


@dataclass(frozen=True)
class Registered:
    """The model versions one batch run registered: the one serving loads (aliases point at
    it) and the others, by flavour (e.g. the Spark twin of an ONNX version)."""

    served: str
    others: Mapping[str, str]


@runtime_checkable
class Candidate(Protocol):
    """A model an application trained; the batch layer logs it in an MLflow run with its
    lineage, gates it against the champion and registers it."""

    quality: Quality
    metrics: Mapping[str, float]  # holdout figures and row counts, logged as run metrics
    params: Mapping[str, str]  # logged as run params (besides the lineage)

    def log_artifacts(self) -> None:
        """Log plots, tables and checks in the active MLflow run; raising refuses the model
        (the run ends FAILED, nothing is registered)."""

    def score(self, version: Any) -> tuple[float | None, str]:
        """The quality of another registered version (an MLflow ``ModelVersion``, the champion)
        on this candidate's holdout rows, or None and why it cannot be scored on them."""

    def register(self, registered_model: str, tags: Mapping[str, str]) -> Registered:
        """Log the model in the active run and register it (every flavour) with ``tags``."""

    def release(self) -> None:
        """Free what the candidate keeps cached (called once the run is over)."""


@runtime_checkable
class BatchUpdate(Protocol):
    """The application's batch layer (``<App>BatchUpdate``): a pinned snapshot -> a candidate."""

    def train(self, spark: SparkSession, snapshot: Snapshot, events: DataFrame | None, cfg: PlatformConfig) -> Candidate:
        """Build the training set from ``snapshot`` (and the feature ``events`` the batch views
        were built from, cached, when features are declared), train and evaluate."""


# --------------------------------------------------------------------------- features


@runtime_checkable
class FeatureEvents(Protocol):
    """How an application turns its event types into the feature events the declarations
    aggregate (``features:``): one row per event counted, with ``kind`` (the event type an
    aggregate's ``events`` names), ``event_time``, every field the declarations read, and the
    bronze version column of each event type it comes from. The same rule on a static snapshot
    (batch views) and on streams (speed increments)."""

    def batch(self, snapshot: Snapshot, cfg: PlatformConfig) -> DataFrame:
        """Feature events of a snapshot (deduplicated), for the batch views and training."""

    def stream(self, spark: SparkSession, streams: Mapping[str, DataFrame], cfg: PlatformConfig) -> DataFrame:
        """Feature events of bronze change streams (event type -> streaming frame carrying
        ``<event type>_version``), deduplicated within the watermark."""

    def lookback_micros(self, cfg: PlatformConfig, event_type: str) -> int:
        """How long before a bucket the rule needs events of ``event_type`` to derive the
        bucket's feature events (0: only the bucket's own)."""

    def in_memory(self, rows: Mapping[str, Iterable[Mapping[str, Any]]], cfg: PlatformConfig, first: int, last: int) -> list[FeatureEvent]:
        """The same rule in plain Python, for serving at a past time: the feature events with a
        time in ``[first, last)`` (epoch microseconds) of bronze rows (event type -> rows, every
        copy, event times in microseconds, from ``first - lookback_micros`` on)."""


# --------------------------------------------------------------------------- speed


# Sets a query's trigger on its writer (processing time, or available-now for a catch-up run).
Trigger = Callable[["DataStreamWriter"], "DataStreamWriter"]
# Starts one streaming query, checkpointed under lake.checkpoints/<its name>.
QueryBuilder = Callable[["SparkSession", "PlatformConfig", Trigger], "StreamingQuery"]


# The speed layer's own queries, which every application runs: Kafka -> bronze, and the feature
# increments of the declarations.
SPEED_LAYER_QUERIES = ("ingest", "increments")


@runtime_checkable
class SpeedUpdater(Protocol):
    """The application's speed layer (``<App>SpeedUpdater``): the streaming queries it adds to
    the layer's own (``ingest``: Kafka -> bronze, ``increments``: feature increments), e.g.
    labels and an online model publishing updates on the model-updates topic."""

    def queries(self) -> Mapping[str, QueryBuilder]:
        """Query name -> builder, in the order they start (upstream first)."""


# --------------------------------------------------------------------------- serving


@dataclass(frozen=True)
class VersionInfo:
    """What the registry says of the version an alias points at (no artefact downloaded)."""

    version: int
    run_id: str | None
    tags: Mapping[str, str]


@runtime_checkable
class ServingModel(Protocol):
    """One loaded model version (``<App>ServingModel``), swapped in whole by the model store
    (read-only: a frozen dataclass satisfies it)."""

    @property
    def name(self) -> str:
        """The registered model."""

    @property
    def version(self) -> int: ...

    @property
    def alias(self) -> str: ...

    @property
    def run_id(self) -> str | None: ...

    @property
    def horizon(self) -> Horizon: ...

    @property
    def quality(self) -> float | None:
        """The quality policy's score, higher is better (None: unknown)."""

    @property
    def identity(self) -> tuple[int, str]:
        """What tells loaded models apart: the registry version, and the alias of a model served
        from memory (it shares the version number it was warm-started from)."""

    def relabel(self, alias: str, tags: Mapping[str, str]) -> ServingModel:
        """This model served under ``alias``, its quality read again from the version's ``tags``
        (they may change without a new artefact)."""

    def describe(self) -> str:
        """One line for the logs: the version, the alias and what it was trained on."""


@runtime_checkable
class Service(Protocol):
    """What the serving layer gives an application's routes."""

    cfg: PlatformConfig

    def served(self) -> Any:
        """The models loaded now, swapped in as one object (``serving_layer.model_store.ServedModels``:
        ``by_alias``, ``champion``, ``distinct()``); raises ``NotReadyError`` (answered 503) while
        no champion is loaded."""


@runtime_checkable
class ServingModels(Protocol):
    """The application's serving side (``<App>ServingModels``): how its registered versions
    load, how a model travelling as data applies, and the routes that answer with them. (An
    application with a FastAPI ``APIRouter`` mounts it with ``app.include_router``.)"""

    def load(self, cfg: PlatformConfig, info: VersionInfo, alias: str, local_dir: Path) -> ServingModel:
        """Open a registered version whose artefacts the store downloaded into ``local_dir``;
        ModelLoadError-like ``RuntimeError`` naming what is wrong."""

    def apply(self, cfg: PlatformConfig, update: ModelUpdate) -> ServingModel | None:
        """The model an update carries as data (e.g. the speed layer's), None when it carries
        none (a registry version travels by reference)."""

    def mount(self, app: FastAPI, service: Service) -> None:
        """Add the application's routes (e.g. ``POST /predict``, ``POST /assign``) to the
        service's ``app``, with any middleware they need (added first, so innermost)."""


# --------------------------------------------------------------------------- the demo


@dataclass(frozen=True)
class FreshEvents:
    """Events the demo sends once everything runs, and where the service's merged features show
    them: ``count`` more of ``aggregate`` for ``entity``'s ``key`` (its path, ``a/b`` for
    several key fields)."""

    records: list[Record]
    entity: str
    key: str
    aggregate: str
    count: int


@runtime_checkable
class DemoScript(Protocol):
    """What ``lambda-ml demo`` does that depends on the application."""

    # The application's queries the demo's first, catch-up pass of the speed layer runs (before
    # there is a champion); every configured query runs afterwards.
    warm_queries: tuple[str, ...]

    def send_events(self, cfg: PlatformConfig, count: int | None) -> str:
        """Send generated events (``count``, default the config's) to Kafka; one summary line."""

    def fresh_events(self, cfg: PlatformConfig, now: Any) -> FreshEvents:
        """New events at ``now`` (a datetime) the running platform should count."""

    def example(self, cfg: PlatformConfig) -> tuple[str, dict[str, Any]]:
        """One request to the application's route: its path and JSON body."""

    def update_pending(self, cfg: PlatformConfig, fresh_at: Any) -> str | None:
        """None when, with the fresh events sent at ``fresh_at`` (a datetime), the running speed
        layer is to publish an update from the current champion; else why it cannot yet (the
        demo then says so rather than wait for it)."""


# --------------------------------------------------------------------------- the application


@dataclass(frozen=True)
class Application:
    """An application: its contracts for the three layers, and what it needs from the config."""

    name: str
    event_types: tuple[str, ...]  # the event types it reads; each must be declared
    features: FeatureEvents
    batch: BatchUpdate
    speed: SpeedUpdater
    serving: ServingModels | None = None
    demo: DemoScript | None = None
    check_config: Callable[[PlatformConfig], None] = lambda cfg: None
    # A complete config running the application (relative to the project root): what its demo
    # and the contract tests start from.
    example_config: str = "conf/platform.yaml"

    def check(self, cfg: PlatformConfig) -> None:
        """Refuse a config the application cannot run with; ValueError naming the key."""
        missing = [name for name in self.event_types if name not in cfg.events.types]
        if missing:
            raise ValueError(
                f"{cfg.source}: events.types: the {self.name} application needs the event types {missing} "
                f"(declared: {', '.join(cfg.events.types)})"
            )
        known = [*SPEED_LAYER_QUERIES, *self.speed.queries()]
        unknown = [name for name in cfg.speed.queries if name not in known]
        if unknown:
            raise ValueError(f"{cfg.source}: speed.queries: {unknown} are not queries of the speed layer or of {self.name} ({', '.join(known)})")
        self.check_config(cfg)


# Application type -> "module:attribute" of its Application object.
APPLICATION_TYPES: dict[str, str] = {
    "ctr": "lambda_ml_apps.ctr:APPLICATION",
    "kmeans": "lambda_ml_apps.kmeans:APPLICATION",
}


def load_application(cfg: PlatformConfig) -> Application:
    """The application ``cfg.app.type`` names, checked against the config it will run with.

    Raises ValueError naming the key when the application cannot run with ``cfg`` (e.g. an
    event type it needs is not declared).
    """
    return application(cfg.app.type, cfg)


def application(name: str, cfg: PlatformConfig) -> Application:
    """The registered application ``name``, checked against ``cfg`` (see :func:`load_application`)."""
    if name not in APPLICATION_TYPES:
        raise ValueError(f"app.type: {name!r} is not a registered application; registered: {', '.join(APPLICATION_TYPES)}")
    module_name, attribute = APPLICATION_TYPES[name].split(":")
    app: Application = getattr(importlib.import_module(module_name), attribute)
    app.check(cfg)
    return app

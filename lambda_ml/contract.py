"""What the batch layer publishes and the serving layer reads: model inputs, registry tags and
view tables. The layers never import each other; they agree on these names only.

Model inputs are derived from the feature declarations (``features:`` in ``conf/``) by
:func:`model_inputs`: one window feature ``<entity>_<aggregate or ratio>_<window>`` per entity,
aggregate or ratio and window, then the context fields. They are the ONNX graph's inputs, one
``[None, 1]`` tensor each (float for numbers, string for categorical fields), and are recorded
on every registered version in the ``model_inputs`` tag.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from lambda_ml.config import FeaturesConfig, PlatformConfig


def window_feature_name(entity: str, statistic: str, window: str) -> str:
    """The name of one window feature (a model input and a training-set column).

    >>> window_feature_name("item", "ctr", "7d")
    'item_ctr_7d'
    """
    return f"{entity}_{statistic}_{window}"


@dataclass(frozen=True)
class ModelInputs:
    """A model's inputs, in graph order: float tensors, then string tensors."""

    numeric: tuple[str, ...]
    categorical: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return self.numeric + self.categorical

    def tag(self) -> str:
        """The value of the ``model_inputs`` registry tag.

        >>> ModelInputs(("user_clicks_1h", "position"), ("device",)).tag()
        'user_clicks_1h,position,device'
        """
        return ",".join(self.names)


def model_inputs(features: FeaturesConfig) -> ModelInputs:
    """The model inputs the declarations define: per entity, per aggregate then ratio, per window,
    then the numeric and categorical context fields."""
    statistics = [*features.aggregates, *features.ratios]
    window_features = tuple(
        window_feature_name(entity, statistic, window)
        for entity in features.entities
        for statistic in statistics
        for window in features.windows
    )
    return ModelInputs(window_features + features.context.numeric, features.context.categorical)


# Batch views (Delta tables under lake.root), one per declared entity: its key columns, the
# bucket start, one column per declared aggregate, and the horizon columns.
VIEW_BUCKET_COLUMN = "bucket_start"
# The view columns holding the horizon: horizon_<event type>, that bronze table's Delta version.
VIEW_HORIZON_PREFIX = "horizon_"


def view_horizon_column(event_type: str) -> str:
    """The view column holding the Delta version of one bronze table at the view's horizon.

    >>> view_horizon_column("clicks")
    'horizon_clicks'
    """
    return f"{VIEW_HORIZON_PREFIX}{event_type}"


def view_table(entity: str) -> tuple[str, ...]:
    """Path parts, under ``lake.root``, of an entity's batch view.

    >>> view_table("user_device")
    ('views', 'user_device_buckets')
    """
    return ("views", f"{entity}_buckets")


# Speed-layer feature increments (Delta tables under lake.root), one per declared entity: its key
# columns, the bucket start, one column per declared aggregate (the events of one micro-batch),
# and, per event type, the bronze Delta version the row's events came from (<event type>_version,
# null when the row has no event of that type: an impression's row of the click-through
# application has only its own version; an attributed click's row has its impression's and its
# own). The serving layer adds to a batch view at horizon h the rows the batch did not see: those
# with any version above h's version of that table (:func:`increment_after_horizon`, the one
# definition Spark and the serving layer both apply). Exact: a row is either wholly in the batch
# view or wholly after it. Rows of the same (keys, bucket) add up like the views' rows (monoids).
INCREMENT_BATCH_COLUMN = "speed_batch_id"  # the micro-batch that wrote the row


def increment_version_column(event_type: str) -> str:
    """The increments column holding the bronze version of a row's event of one type.

    >>> increment_version_column("impressions")
    'impressions_version'
    """
    return f"{event_type}_version"


def increments_table(entity: str) -> tuple[str, ...]:
    """Path parts, under ``lake.root``, of an entity's speed-layer increments.

    >>> increments_table("user")
    ('speed', 'user_increments')
    """
    return ("speed", f"{entity}_increments")


class VersionTerm(Protocol):
    """A column expression compared with operators: a Spark ``Column`` or a
    ``pyarrow.compute.Expression`` (null > v is null, and filters drop null)."""

    def __gt__(self, other: int, /) -> Any: ...


def increment_after_horizon(horizon: Horizon, versions: Mapping[str, VersionTerm]) -> Any:
    """The condition under which an increment row is one the batch view at ``horizon`` did not
    count, built from the row's version columns (event type -> column term); None when a part of
    ``horizon`` is unknown (then every row counts). Filter with it: on a row without an event of
    some type (its version null) the term is null rather than false, and filters drop null.

    >>> import pyarrow as pa, pyarrow.compute as pc
    >>> rows = pa.table({"impressions_version": [3, 6, 3, 3], "clicks_version": [None, None, 4, 5]})
    >>> terms = {e: pc.field(increment_version_column(e)) for e in ("impressions", "clicks")}
    >>> rows.filter(increment_after_horizon(Horizon.of(impressions=5, clicks=4), terms)).to_pylist()
    [{'impressions_version': 6, 'clicks_version': None}, {'impressions_version': 3, 'clicks_version': 5}]
    >>> increment_after_horizon(Horizon.of(impressions=5), terms) is None
    True
    """
    condition: Any = None
    for event_type, term in versions.items():
        version = horizon.version(event_type)
        if version is None:
            return None
        condition = term > version if condition is None else condition | (term > version)
    return condition




# Model updates: records on the compacted topic kafka.topics.model_updates, keyed
# model_update_key(registered_model, alias), valued with JSON (ModelUpdate.value())
#   {"registered_model": "ctr", "alias": "champion", "version": 7,
#    "generation": {"impressions": 12, "clicks": 11}}   (event type -> bronze version)
# announcing that the alias now points at that version, trained at that bronze horizon (the
# generation). A registry version travels by reference: the registry stays the source of truth
# and is read on the update. The speed layer's online model travels as data: alias "speed",
# ``version`` the registry version it was warm-started from (0 for none), and the extra fields
#   "updates": 42, "quality": 0.71,
#   "linear": {"terms": ["user_ctr_1h", ..., "device=mobile"], "weights": [...], "intercept": -2.1}
# (the click-through application's logistic regression over the model inputs: numeric inputs by
# name, categorical ones as "<input>=<value>" indicators); another application's model as data
# travels in "data", a JSON object of its own (k-means: its centres). Serving ignores an update whose generation is older than one it
# already applied for the alias, and an online update with fewer ``updates`` than one applied in
# the same generation (a rollback moves an alias back in the registry, where the poll sees it).
MODEL_UPDATE_FIELDS = ("registered_model", "alias", "version", "generation")
SPEED_ALIAS = "speed"  # the alias of the speed layer's online model
INDICATOR = "="  # "<categorical input>=<value>": a one-hot term of a linear model


def model_update_key(registered_model: str, alias: str) -> bytes:
    """The Kafka key of an alias's model updates (compaction keeps the last per alias).

    >>> model_update_key("ctr", "champion")
    b'ctr@champion'
    """
    return f"{registered_model}@{alias}".encode()


@dataclass(frozen=True)
class LinearWeights:
    """A logistic regression as data: ``P(click) = sigmoid(intercept + Σ weight·term)``, a term
    being a numeric model input or a ``<categorical input>=<value>`` indicator (1 or 0)."""

    terms: tuple[str, ...]
    weights: tuple[float, ...]
    intercept: float

    def __post_init__(self) -> None:
        if len(self.terms) != len(self.weights):
            raise ValueError(f"linear model has {len(self.terms)} terms but {len(self.weights)} weights")
        if not all(math.isfinite(w) for w in (*self.weights, self.intercept)):
            raise ValueError("linear model has non-finite weights")

    def inputs(self) -> ModelInputs:
        """The model inputs the terms read, numeric then categorical, in term order.

        >>> LinearWeights(("position", "device=mobile", "device=tablet"), (0.1, 0.2, 0.3), 0.0).inputs()
        ModelInputs(numeric=('position',), categorical=('device',))
        """
        numeric = [t for t in self.terms if INDICATOR not in t]
        categorical = dict.fromkeys(t.split(INDICATOR, 1)[0] for t in self.terms if INDICATOR in t)
        return ModelInputs(tuple(numeric), tuple(categorical))


@dataclass(frozen=True)
class ModelUpdate:
    """One model-update record (see the comment above)."""

    registered_model: str
    alias: str
    version: int
    generation: Horizon
    updates: int | None = None  # online steps since the warm start (online models only)
    quality: float | None = None  # recent progressive-validation AUC (online models only)
    linear: LinearWeights | None = None  # the click-through online model, when it travels as data
    data: Mapping[str, Any] | None = None  # another application's model as data (a JSON object)

    def key(self) -> bytes:
        return model_update_key(self.registered_model, self.alias)

    def value(self) -> bytes:
        """The record's JSON value.

        >>> ModelUpdate("ctr", "champion", 7, Horizon.of(impressions=12, clicks=11)).value()
        b'{"alias": "champion", "generation": {"clicks": 11, "impressions": 12}, "registered_model": "ctr", "version": 7}'
        """
        body: dict[str, Any] = {
            "registered_model": self.registered_model,
            "alias": self.alias,
            "version": self.version,
            "generation": self.generation.parts,
        }
        if self.updates is not None:
            body["updates"] = self.updates
        if self.quality is not None:
            body["quality"] = self.quality
        if self.linear is not None:
            body["linear"] = {"terms": list(self.linear.terms), "weights": list(self.linear.weights), "intercept": self.linear.intercept}
        if self.data is not None:
            body["data"] = dict(self.data)
        return json.dumps(body, sort_keys=True).encode()

    def is_stale(self, applied: ModelUpdate | None) -> bool:
        """True when this update is older than ``applied`` (the last applied for its alias):
        a bronze version of its generation went back, or, in the same generation, an online
        model with fewer updates.

        >>> h = Horizon.of(impressions=6, clicks=4)
        >>> new, old = ModelUpdate("ctr", "speed", 3, h, 5), ModelUpdate("ctr", "speed", 3, h, 9)
        >>> older = ModelUpdate("ctr", "speed", 3, Horizon.of(impressions=5, clicks=9), 50)
        >>> new.is_stale(old), old.is_stale(new), older.is_stale(old)
        (True, False, True)
        """
        if applied is None:
            return False
        ours, theirs = self.generation, applied.generation
        events = {*ours.parts, *theirs.parts}
        # An unknown part is older than any version.
        if any(_known(ours.version(e)) < _known(theirs.version(e)) for e in events):
            return True
        same = ours == theirs
        return same and self.updates is not None and applied.updates is not None and self.updates < applied.updates


def _known(version: int | None) -> int:
    return -1 if version is None else version


def parse_model_update(value: bytes) -> ModelUpdate:
    """One update record's value; ValueError naming what is wrong.

    >>> parse_model_update(b'{"registered_model": "ctr", "alias": "champion", "version": 7, '
    ...                    b'"generation": {"impressions": 12, "clicks": 11}}')
    ModelUpdate(registered_model='ctr', alias='champion', version=7, generation=Horizon(versions=(('clicks', 11), ('impressions', 12))), updates=None, quality=None, linear=None, data=None)
    >>> parse_model_update(b'{"alias": "champion"}')
    Traceback (most recent call last):
    ...
    ValueError: model update lacks registered_model, version, generation
    >>> parse_model_update(ModelUpdate("ctr", "speed", 0, Horizon.of(), 2, None, LinearWeights(("position",), (0.5,), -1.0)).value()).linear
    LinearWeights(terms=('position',), weights=(0.5,), intercept=-1.0)
    """
    try:
        body = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"model update is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ValueError("model update is not a JSON object")
    missing = [f for f in MODEL_UPDATE_FIELDS if f not in body]
    if missing:
        raise ValueError(f"model update lacks {', '.join(missing)}")
    generation = body["generation"] if isinstance(body["generation"], dict) else None
    if generation is None or not all(isinstance(e, str) and (_is_int(v) or v is None) for e, v in generation.items()):
        raise ValueError("model update field generation must map event types to integer (or null) bronze versions")
    if not _is_int(body["version"]):
        raise ValueError("model update field version must be an integer")
    updates = body.get("updates")
    if updates is not None and not _is_int(updates):
        raise ValueError("model update field updates must be an integer")
    quality = body.get("quality")
    if quality is not None and (not isinstance(quality, int | float) or isinstance(quality, bool)):
        raise ValueError("model update field quality must be a number")
    linear = None
    if body.get("linear") is not None:
        spec = body["linear"]
        try:
            terms, weights = tuple(str(t) for t in spec["terms"]), tuple(float(w) for w in spec["weights"])
            linear = LinearWeights(terms, weights, float(spec["intercept"]))
        except (TypeError, KeyError) as exc:
            raise ValueError(f"model update field linear must hold terms, weights and intercept ({exc})") from exc
    data = body.get("data")
    if data is not None and not isinstance(data, dict):
        raise ValueError("model update field data must be a JSON object")
    horizon = Horizon.of(generation)
    return ModelUpdate(str(body["registered_model"]), str(body["alias"]), body["version"], horizon, updates, quality, linear, data)


def publish_updates(cfg: PlatformConfig, updates: Sequence[ModelUpdate]) -> None:
    """Send model updates to the model-updates topic (acks=all; at least once, idempotent by
    key and generation on the consumer side)."""
    from kafka import KafkaProducer  # type: ignore[import-untyped]

    producer = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, acks="all")
    try:
        for update in updates:
            producer.send(cfg.kafka.topics.model_updates.name, key=update.key(), value=update.value())
        producer.flush()
    finally:
        producer.close()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Registry alias of the model serving answers with by default.
CHAMPION_ALIAS = "champion"

# Tags on the MLflow run and on every registered model version.
TAG_FLAVOR = "flavor"  # "spark" | "onnx"
TAG_HORIZON_PREFIX = "horizon."  # horizon.<event type>: that bronze table's Delta version
TAG_SPARK_VERSION = "spark_model_version"  # on the ONNX version: its Spark twin
TAG_MODEL_INPUTS = "model_inputs"  # ModelInputs.tag(): comma-separated input names
TAG_PARITY = "parity"  # "passed" | "failed": the ONNX-vs-Spark check of the run
# On a model version: its recent progressive-validation AUC (a float), written by online
# evaluation; the serving layer's quality policy prefers it to the run's holdout ``auc`` metric.
TAG_QUALITY_SCORE = "quality.progressive_auc"
# On a version the speed layer registered: its layer ("speed"), and its online steps since the warm start.
TAG_LAYER = "layer"
TAG_SPEED_UPDATES = "speed.updates"
# On a version the speed layer registered: the batch version it was warm-started from ("0": none),
# whose lineage (config and feature definitions hashes) it carries on.
TAG_SPEED_BASE_VERSION = "speed.base_version"
# Name of the ONNX output holding [P(no click), P(click)] per row.
ONNX_PROBABILITY_OUTPUT = "probability"


def horizon_tag(event_type: str) -> str:
    """The tag holding one bronze table's version at a run's horizon.

    >>> horizon_tag("clicks")
    'horizon.clicks'
    """
    return f"{TAG_HORIZON_PREFIX}{event_type}"


@dataclass(frozen=True)
class Horizon:
    """The Delta version of each bronze table (one per event type) a batch run read; a part
    missing or None is unknown (e.g. an untagged model).

    >>> h = Horizon.of(impressions=5, clicks=4)
    >>> str(h), h.version("clicks"), h.version("points"), str(Horizon.of())
    ('bronze clicks v4, impressions v5', 4, None, 'bronze v?')
    """

    versions: tuple[tuple[str, int | None], ...] = ()

    @classmethod
    def of(cls, versions: Mapping[str, int | None] | None = None, /, **named: int | None) -> Horizon:
        """A horizon from event type -> version (in any order: horizons compare by content)."""
        return cls(tuple(sorted({**(versions or {}), **named}.items())))

    @property
    def parts(self) -> dict[str, int | None]:
        """Event type -> bronze version."""
        return dict(self.versions)

    def version(self, event_type: str) -> int | None:
        """The bronze version of one event type's table, None if unknown."""
        return self.parts.get(event_type)

    def is_known(self, event_types: Iterable[str]) -> bool:
        """True when every one of ``event_types`` has a version."""
        return all(self.version(e) is not None for e in event_types)

    def tags(self) -> dict[str, str]:
        """The horizon as MLflow tags (run and model versions).

        >>> Horizon.of(impressions=3, clicks=5).tags()
        {'horizon.clicks': '5', 'horizon.impressions': '3'}
        """
        return {horizon_tag(event): str(version) for event, version in self.versions}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str], event_types: Iterable[str] = ()) -> Horizon:
        """The horizon recorded in registry tags; ``event_types`` missing or unreadable are None.

        >>> Horizon.from_tags({"horizon.impressions": "5", "horizon.clicks": "4", "flavor": "onnx"})
        Horizon(versions=(('clicks', 4), ('impressions', 5)))
        >>> Horizon.from_tags({"horizon.clicks": "x"}, ["clicks", "impressions"])
        Horizon(versions=(('clicks', None), ('impressions', None)))
        """
        found: dict[str, int | None] = dict.fromkeys(event_types)
        for key, value in tags.items():
            if key.startswith(TAG_HORIZON_PREFIX):
                found[key.removeprefix(TAG_HORIZON_PREFIX)] = int(value) if value.isdigit() else None
        return cls.of(found)

    def __str__(self) -> str:
        if not self.versions:
            return "bronze v?"
        return "bronze " + ", ".join(f"{event} v{'?' if v is None else v}" for event, v in self.versions)

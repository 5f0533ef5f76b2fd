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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from lambda_ml.config import FeaturesConfig


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
# Horizon part (bronze table) -> the view column holding its Delta version.
VIEW_HORIZON_COLUMNS = {"impressions": "horizon_impressions", "clicks": "horizon_clicks"}


def view_table(entity: str) -> tuple[str, ...]:
    """Path parts, under ``lake.root``, of an entity's batch view.

    >>> view_table("user_device")
    ('views', 'user_device_buckets')
    """
    return ("views", f"{entity}_buckets")


# Speed-layer feature increments (Delta tables under lake.root), one per declared entity: its key
# columns, the bucket start, one column per declared aggregate (the events of one micro-batch),
# and the bronze Delta versions the events came from. An impression's row has only its own
# version (clicks version null); an attributed click's row has its impression's and its own.
# The serving layer adds to a batch view at horizon h the rows the batch did not see:
# impressions_version > h.impressions or clicks_version > h.clicks
# (:func:`increment_after_horizon`, the one definition Spark and the serving layer both apply).
# Exact: a row is either wholly in the batch view or wholly after it. Rows of the same
# (keys, bucket) add up like the views' rows (monoids).
INCREMENT_VERSION_COLUMNS = {"impressions": "impressions_version", "clicks": "clicks_version"}
INCREMENT_BATCH_COLUMN = "speed_batch_id"  # the micro-batch that wrote the row


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


def increment_after_horizon(horizon: Horizon, impressions_version: VersionTerm, clicks_version: VersionTerm) -> Any:
    """The condition under which an increment row is one the batch view at ``horizon`` did not
    count, built from the row's version columns; None when a part of ``horizon`` is unknown
    (then every row counts). Filter with it: on an impression's row (clicks version null) it is
    null rather than false when the impression is old, and filters drop null.

    >>> import pyarrow as pa, pyarrow.compute as pc
    >>> rows = pa.table({"impressions_version": [3, 6, 3, 3], "clicks_version": [None, None, 4, 5]})
    >>> after = increment_after_horizon(Horizon(5, 4), pc.field("impressions_version"), pc.field("clicks_version"))
    >>> rows.filter(after).to_pylist()
    [{'impressions_version': 6, 'clicks_version': None}, {'impressions_version': 3, 'clicks_version': 5}]
    >>> increment_after_horizon(Horizon(5, None), pc.field("impressions_version"), pc.field("clicks_version")) is None
    True
    """
    if horizon.impressions is None or horizon.clicks is None:
        return None
    return (impressions_version > horizon.impressions) | (clicks_version > horizon.clicks)


# Silver labels the speed layer writes: one row per impression whose label is known.
SILVER_LABELS_TABLE = ("silver", "labels")


# Model updates: records on the compacted topic kafka.topics.model_updates, keyed
# model_update_key(registered_model, alias), valued with JSON (ModelUpdate.value())
#   {"registered_model": "ctr", "alias": "champion", "version": 7,
#    "generation": {"impressions": 12, "clicks": 11}}
# announcing that the alias now points at that version, trained at that bronze horizon (the
# generation). A registry version travels by reference: the registry stays the source of truth
# and is read on the update. The speed layer's online model travels as data: alias "speed",
# ``version`` the registry version it was warm-started from (0 for none), and the extra fields
#   "updates": 42, "quality": 0.71,
#   "linear": {"terms": ["user_ctr_1h", ..., "device=mobile"], "weights": [...], "intercept": -2.1}
# (a logistic regression over the model inputs: numeric inputs by name, categorical ones as
# "<input>=<value>" indicators). Serving ignores an update whose generation is older than one it
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
    linear: LinearWeights | None = None  # the model itself, when it travels as data

    def key(self) -> bytes:
        return model_update_key(self.registered_model, self.alias)

    def value(self) -> bytes:
        """The record's JSON value.

        >>> ModelUpdate("ctr", "champion", 7, Horizon(12, 11)).value()
        b'{"alias": "champion", "generation": {"clicks": 11, "impressions": 12}, "registered_model": "ctr", "version": 7}'
        """
        body: dict[str, Any] = {
            "registered_model": self.registered_model,
            "alias": self.alias,
            "version": self.version,
            "generation": {"impressions": self.generation.impressions, "clicks": self.generation.clicks},
        }
        if self.updates is not None:
            body["updates"] = self.updates
        if self.quality is not None:
            body["quality"] = self.quality
        if self.linear is not None:
            body["linear"] = {"terms": list(self.linear.terms), "weights": list(self.linear.weights), "intercept": self.linear.intercept}
        return json.dumps(body, sort_keys=True).encode()

    def is_stale(self, applied: ModelUpdate | None) -> bool:
        """True when this update is older than ``applied`` (the last applied for its alias):
        either bronze version of its generation went back, or, in the same generation, an
        online model with fewer updates.

        >>> new, old = ModelUpdate("ctr", "speed", 3, Horizon(6, 4), 5), ModelUpdate("ctr", "speed", 3, Horizon(6, 4), 9)
        >>> new.is_stale(old), old.is_stale(new), ModelUpdate("ctr", "speed", 3, Horizon(5, 9), 50).is_stale(old)
        (True, False, True)
        """
        if applied is None:
            return False
        ours, theirs = self.generation, applied.generation
        if _part(ours.impressions) < _part(theirs.impressions) or _part(ours.clicks) < _part(theirs.clicks):
            return True
        same = (ours.impressions, ours.clicks) == (theirs.impressions, theirs.clicks)
        return same and self.updates is not None and applied.updates is not None and self.updates < applied.updates


def _part(version: int | None) -> int:
    return -1 if version is None else version  # an unknown horizon is older than any


def parse_model_update(value: bytes) -> ModelUpdate:
    """One update record's value; ValueError naming what is wrong.

    >>> parse_model_update(b'{"registered_model": "ctr", "alias": "champion", "version": 7, '
    ...                    b'"generation": {"impressions": 12, "clicks": 11}}')
    ModelUpdate(registered_model='ctr', alias='champion', version=7, generation=Horizon(impressions=12, clicks=11), updates=None, quality=None, linear=None)
    >>> parse_model_update(b'{"alias": "champion"}')
    Traceback (most recent call last):
    ...
    ValueError: model update lacks registered_model, version, generation
    >>> parse_model_update(ModelUpdate("ctr", "speed", 0, Horizon(), 2, None, LinearWeights(("position",), (0.5,), -1.0)).value()).linear
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
    parts = ("impressions", "clicks")
    if generation is None or not all(p in generation and (_is_int(generation[p]) or generation[p] is None) for p in parts):
        raise ValueError("model update field generation must be {impressions, clicks} with integer (or null) versions")
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
    horizon = Horizon(generation.get("impressions"), generation.get("clicks"))
    return ModelUpdate(str(body["registered_model"]), str(body["alias"]), body["version"], horizon, updates, quality, linear)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Registry alias of the model serving answers with by default.
CHAMPION_ALIAS = "champion"

# Tags on the MLflow run and on every registered model version.
TAG_FLAVOR = "flavor"  # "spark" | "onnx"
TAG_HORIZON_IMPRESSIONS = "horizon.impressions"  # bronze impressions Delta version
TAG_HORIZON_CLICKS = "horizon.clicks"  # bronze clicks Delta version
TAG_SPARK_VERSION = "spark_model_version"  # on the ONNX version: its Spark twin
TAG_MODEL_INPUTS = "model_inputs"  # ModelInputs.tag(): comma-separated input names
TAG_PARITY = "parity"  # "passed" | "failed": the ONNX-vs-Spark check of the run
# On a model version: its recent progressive-validation AUC (a float), written by online
# evaluation; the serving layer's quality policy prefers it to the run's holdout ``auc`` metric.
TAG_QUALITY_SCORE = "quality.progressive_auc"
# On a version the speed layer registered: its layer ("speed"), and its online steps since the warm start.
TAG_LAYER = "layer"
TAG_SPEED_UPDATES = "speed.updates"
# Name of the ONNX output holding [P(no click), P(click)] per row.
ONNX_PROBABILITY_OUTPUT = "probability"


@dataclass(frozen=True)
class Horizon:
    """The bronze Delta versions a batch run read (None where unknown, e.g. an untagged model).

    >>> str(Horizon(5, 4)), str(Horizon())
    ('bronze impressions v5, clicks v4', 'bronze impressions v?, clicks v?')
    """

    impressions: int | None = None
    clicks: int | None = None

    def tags(self) -> dict[str, str]:
        """The horizon as MLflow tags (run and model versions).

        >>> Horizon(impressions=3, clicks=5).tags()
        {'horizon.impressions': '3', 'horizon.clicks': '5'}
        """
        return {TAG_HORIZON_IMPRESSIONS: str(self.impressions), TAG_HORIZON_CLICKS: str(self.clicks)}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Horizon:
        """The horizon recorded in registry tags; parts missing or unreadable are None.

        >>> Horizon.from_tags({"horizon.impressions": "5", "horizon.clicks": "4"})
        Horizon(impressions=5, clicks=4)
        >>> Horizon.from_tags({"horizon.clicks": "x"})
        Horizon(impressions=None, clicks=None)
        """

        def number(key: str) -> int | None:
            value = tags.get(key)
            return int(value) if value is not None and value.isdigit() else None

        return cls(number(TAG_HORIZON_IMPRESSIONS), number(TAG_HORIZON_CLICKS))

    def __str__(self) -> str:
        def part(version: int | None) -> str:
            return "?" if version is None else str(version)

        return f"bronze impressions v{part(self.impressions)}, clicks v{part(self.clicks)}"

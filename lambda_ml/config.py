"""Typed platform configuration loaded from ``conf/*.yaml``.

Values may reference environment variables as ``${VAR}`` or ``${VAR:-default}``, and any key
can be overridden by ``LAMBDA_ML__<SECTION>__<KEY>=value``. Unknown keys are rejected, and every
error names the file and the key, e.g. ``conf/platform.yaml: kafka.port: Input should be a
valid integer``.
"""

from __future__ import annotations

import os
import re
import sys
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = PROJECT_ROOT / "conf" / "platform.yaml"
ENV_PREFIX = "LAMBDA_ML__"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """A configuration file is unreadable or invalid; the message names the file and key."""


class _ConfigLoader(yaml.SafeLoader):
    """YAML as the config reads it: a date-like scalar stays a string.

    YAML 1.1 turns an unquoted ``1990-01-01`` into a ``date``; the config's fields parse their
    own values, so the file (quoted or not) and an environment override give the same type.
    """


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_yaml(text: str) -> Any:
    """A YAML document or scalar, read as the config reads it (see :class:`_ConfigLoader`).

    >>> parse_yaml("1990-01-01"), parse_yaml("19092"), parse_yaml("[a, b]")
    ('1990-01-01', 19092, ['a', 'b'])
    """
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JvmConfig(_Model):
    dir: Path = Path(".jvm")


class SparkConfig(_Model):
    master: str = "local[2]"
    app_name: str = "lambda-ml"
    shuffle_partitions: int = Field(4, gt=0)
    batch_shuffle_partitions: int = Field(16, gt=0)
    driver_memory: str = "2g"
    java_options: str = "-XX:+UseParallelGC"
    ui_enabled: bool = False
    extra: dict[str, str] = {}


class TopicConfig(_Model):
    name: str = Field(min_length=1)
    partitions: int = Field(1, gt=0)
    retention_ms: int = -1
    compacted: bool = False
    format: Literal["json", "avro"] = "json"


class TopicsConfig(_Model):
    """The platform's own topics; each event type's topic is declared with it (``events.types``)."""

    model_updates: TopicConfig
    # Optional in older config files: the prediction log and the stream scorer's output.
    predictions: TopicConfig = TopicConfig(name="predictions", partitions=2, retention_ms=604800000)

    @model_validator(mode="before")
    @classmethod
    def _event_topics_moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [name for name in data if name not in cls.model_fields]
            if moved and all(isinstance(data[name], dict) and "name" in data[name] for name in moved):
                raise ValueError(
                    f"event topics {moved} are declared with their event types now: events.types.<event type>.topic"
                )
        return data


class KafkaConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(9092, gt=0, lt=65536)
    controller_port: int = Field(9093, gt=0, lt=65536)
    heap: str = "512m"
    bootstrap_servers: str = "127.0.0.1:9092"
    start_timeout_s: float = Field(60, gt=0)
    avro_schemas: Path = Path("conf/avro")
    topics: TopicsConfig


class MlflowConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(5000, gt=0, lt=65536)
    tracking_uri: str = "http://127.0.0.1:5000"
    experiment: str = "ctr"
    registered_model: str = "ctr"
    start_timeout_s: float = Field(120, gt=0)


class LakeConfig(_Model):
    root: str = ".data/lake"
    checkpoints: str = ".data/checkpoints"

    def table(self, *parts: str) -> str:
        """Path of a Delta table under the lake root, e.g. ``table("bronze", "clicks")``."""
        return "/".join([self.root.rstrip("/"), *parts])


class GbtConfig(_Model):
    """Spark ``GBTClassifier`` parameters, used when ``ctr.model`` is ``gbt``."""

    max_depth: int = Field(4, ge=1, le=30)
    max_iter: int = Field(30, gt=0)
    step_size: float = Field(0.1, gt=0, le=1)
    subsampling_rate: float = Field(1.0, gt=0, le=1)
    max_bins: int = Field(32, ge=2)
    seed: int = 7


class LrGridConfig(_Model):
    """Values of the logistic regression's parameters to try; an empty list keeps ``ctr.<name>``."""

    reg_param: tuple[Annotated[float, Field(ge=0)], ...] = (0.001, 0.01, 0.1)
    elastic_net_param: tuple[Annotated[float, Field(ge=0, le=1)], ...] = (0.0,)


class GbtGridConfig(_Model):
    """Values of the trees' parameters to try; an empty list keeps ``ctr.gbt.<name>``."""

    max_depth: tuple[Annotated[int, Field(ge=1, le=30)], ...] = (3, 5)
    max_iter: tuple[Annotated[int, Field(gt=0)], ...] = ()


class SearchConfig(_Model):
    """The hyper-parameter search: every combination of the selected model's grid is fitted on
    the older training rows and scored (AUC) on the most recent ``validation_fraction`` of them;
    the best is refitted on all training rows. The holdout is never looked at."""

    validation_fraction: float = Field(0.2, gt=0, lt=1)
    max_rows: int = Field(500_000, gt=0)
    lr: LrGridConfig = LrGridConfig()
    gbt: GbtGridConfig = GbtGridConfig()


class CtrConfig(_Model):
    attribution_window_minutes: int = Field(30, gt=0)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    max_training_rows: int = Field(1_000_000, gt=0)
    model: Literal["lr", "gbt"] = "lr"
    # Logistic regression (model: lr).
    reg_param: float = Field(0.01, ge=0)
    elastic_net_param: float = Field(0.0, ge=0, le=1)
    max_iter: int = Field(50, gt=0)
    gbt: GbtConfig = GbtConfig()
    search: SearchConfig = SearchConfig()
    calibration_bins: int = Field(10, ge=2, le=100)
    min_auc_gain: float = Field(0.0, ge=0, lt=1)
    parity_atol: float = Field(1e-5, gt=0)


class KMeansConfig(_Model):
    """The k-means application (``app.type: kmeans``): batch training, its quality gate and the
    speed layer's mini-batch updates."""

    # The event type whose points are clustered, and its numeric fields, in vector order.
    event_type: str = Field("points", min_length=1)
    features: tuple[str, ...] = Field(("x0", "x1"), min_length=1)
    # Candidate k of the silhouette search (each at least 2).
    k_values: tuple[Annotated[int, Field(ge=2)], ...] = Field((2, 3, 4, 5, 6), min_length=1)
    seed: int = 0
    max_iter: int = Field(50, gt=0)
    tol: float = Field(1e-6, ge=0)
    runs: int = Field(3, gt=0)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    # Absolute, in squared distance per holdout point.
    min_inertia_gain: float = Field(0.0, ge=0)
    decay: float = Field(0.9, gt=0, le=1)
    mini_batch_size: int = Field(100, gt=0)
    publish_every: int = Field(1, gt=0)

    @field_validator("features")
    @classmethod
    def _distinct_features(cls, features: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(features)) != len(features):
            raise ValueError(f"features must be distinct, got {list(features)}")
        return features


_DURATION = re.compile(r"^([1-9][0-9]*)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def parse_duration(text: str) -> timedelta:
    """A duration written as a whole number and a unit (``s``, ``m``, ``h`` or ``d``).

    >>> parse_duration("90s"), parse_duration("7d")
    (datetime.timedelta(seconds=90), datetime.timedelta(days=7))
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 30m, 1h or 7d")
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def _check_duration(text: str) -> str:
    parse_duration(text)
    return text


# A duration kept as written ("24h"): the text is part of the feature names of a window.
Duration = Annotated[str, AfterValidator(_check_duration)]

# The window over all history: every event strictly before the scoring time. Its aggregates are
# the same monoids over an unbounded range, so batch views and speed increments still merge.
LIFETIME = "all"


def window_span(window: str) -> timedelta | None:
    """A declared window's length, or None for the lifetime window (all history).

    >>> window_span("24h"), window_span("all")
    (datetime.timedelta(days=1), None)
    """
    return None if window == LIFETIME else parse_duration(window)


def _check_window(text: str) -> str:
    if text != LIFETIME and _DURATION.match(text) is None:
        raise ValueError(f"{text!r} is neither a duration such as 30m, 1h or 7d nor {LIFETIME} (all history)")
    return text


# A window as written: a duration, or LIFETIME.
WindowName = Annotated[str, AfterValidator(_check_window)]


class FeatureEntityConfig(_Model):
    """Something features are aggregated per: one or more impression columns."""

    keys: tuple[str, ...] = Field(min_length=1)


class AggregateConfig(_Model):
    """One monoid aggregate per (entity, bucket): a count of events or a sum/min/max of a measure."""

    events: str = Field(min_length=1)
    aggregation: Literal["count", "sum", "min", "max"]
    measure: str | None = None
    empty: float = 0.0  # the feature over a window without events (min and max; counts and sums are 0)

    @model_validator(mode="after")
    def _measure_fits_the_aggregation(self) -> AggregateConfig:
        if self.aggregation == "count" and self.measure is not None:
            raise ValueError("a count has no measure: drop measure, or use sum, min or max")
        if self.aggregation != "count" and self.measure is None:
            raise ValueError(f"a {self.aggregation} needs a measure, a numeric impression field such as position")
        return self


class RatioConfig(_Model):
    """``(numerator + prior_alpha) / (denominator + prior_alpha + prior_beta)`` per entity and window:
    the posterior mean of a Beta(alpha, beta) prior, so an entity with no history gets the prior."""

    numerator: str
    denominator: str
    prior_alpha: float = Field(ge=0)
    prior_beta: float = Field(ge=0)

    @model_validator(mode="after")
    def _prior_is_proper(self) -> RatioConfig:
        if self.prior_alpha + self.prior_beta <= 0:
            raise ValueError("prior_alpha + prior_beta must be positive, or an empty window divides 0 by 0")
        return self


class ContextConfig(_Model):
    """Impression fields fed to the model as they are (known when the impression is scored)."""

    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()


class FeaturesConfig(_Model):
    """The feature declarations: aggregates per (entity, event-time bucket), read over windows.

    Every window feature is named ``<entity>_<aggregate or ratio>_<window>``, e.g.
    ``user_clicks_24h`` (see ``lambda_ml.contract.model_inputs``).
    """

    event_type: str = Field(min_length=1)
    bucket: Duration
    windows: tuple[WindowName, ...] = Field(min_length=1)
    entities: dict[str, FeatureEntityConfig] = Field(min_length=1)
    aggregates: dict[str, AggregateConfig] = Field(min_length=1)
    ratios: dict[str, RatioConfig] = {}
    context: ContextConfig = ContextConfig()

    @property
    def bucket_width(self) -> timedelta:
        return parse_duration(self.bucket)

    @property
    def measures(self) -> tuple[str, ...]:
        """The impression fields the aggregates fold, each once, in declaration order."""
        return tuple(dict.fromkeys(a.measure for a in self.aggregates.values() if a.measure is not None))

    @property
    def source_event_types(self) -> tuple[str, ...]:
        """The event types feature events come from: ``event_type``, then those the aggregates count."""
        return tuple(dict.fromkeys([self.event_type, *(a.events for a in self.aggregates.values())]))

    @property
    def carried_fields(self) -> tuple[str, ...]:
        """Impression fields a feature event carries: every entity key, then every measure."""
        keys = [key for entity in self.entities.values() for key in entity.keys]
        return tuple(dict.fromkeys([*keys, *self.measures]))

    @field_validator("windows")
    @classmethod
    def _windows_are_whole_buckets(cls, windows: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        bucket = info.data.get("bucket")
        if bucket is None:
            return windows  # the bucket's own error is reported
        width = parse_duration(bucket)
        seen: set[timedelta | str] = set()
        for window in windows:
            span = window_span(window)
            if span is None:
                if window in seen:
                    raise ValueError(f"window {window} is declared twice")
                seen.add(window)
                continue
            if span % width:
                raise ValueError(f"window {window} is not a whole number of {bucket} buckets")
            if span in seen:
                raise ValueError(f"window {window} repeats the length of another window")
            seen.add(span)
        return windows

    @field_validator("entities", "aggregates", "ratios")
    @classmethod
    def _names_are_identifiers(cls, named: dict[str, Any]) -> dict[str, Any]:
        for name in named:
            if not _NAME.match(name):
                raise ValueError(f"{name!r} is not a lower-case identifier (it names columns and features)")
        return named

    @field_validator("ratios")
    @classmethod
    def _ratios_divide_declared_aggregates(cls, ratios: dict[str, RatioConfig], info: ValidationInfo) -> dict[str, RatioConfig]:
        aggregates: dict[str, AggregateConfig] | None = info.data.get("aggregates")
        if aggregates is None:
            return ratios
        for name, ratio in ratios.items():
            for role, aggregate in (("numerator", ratio.numerator), ("denominator", ratio.denominator)):
                if aggregate not in aggregates:
                    raise ValueError(
                        f"{name}.{role}: {aggregate!r} is not a declared aggregate (one of {', '.join(aggregates)})"
                    )
                if aggregates[aggregate].aggregation not in ("count", "sum"):
                    raise ValueError(f"{name}.{role}: {aggregate!r} is a {aggregates[aggregate].aggregation}; ratios divide counts or sums")
        return ratios

    def check_fields(self, kinds: dict[str, str], event_type: str) -> None:
        """Refuse declarations naming fields ``event_type`` (``kinds``: its fields) lacks, and
        feature names derived twice; ValueError naming the key."""
        from lambda_ml import contract  # pyspark-free, but imports this module

        strings = [name for name, kind in kinds.items() if kind == "string" and name not in (EVENT_ID, EVENT_TIME)]
        numbers = [name for name, kind in kinds.items() if kind in ("int", "double")]
        used = [(f"entities.{name}.keys", key, strings) for name, e in self.entities.items() for key in e.keys]
        used += [(f"aggregates.{name}.measure", a.measure, numbers) for name, a in self.aggregates.items() if a.measure]
        used += [("context.numeric", field, numbers) for field in self.context.numeric]
        used += [("context.categorical", field, strings) for field in self.context.categorical]
        for where, field, allowed in used:
            if field not in allowed:
                raise ValueError(f"features.{where}: {field!r} is not one of the {event_type} fields {', '.join(allowed)}")
        for name in self.aggregates:
            if name in kinds or name == contract.VIEW_BUCKET_COLUMN or name.startswith(contract.VIEW_HORIZON_PREFIX):
                raise ValueError(f"features.aggregates.{name}: the name is taken by a column of the view tables")
        names = list(contract.model_inputs(self).names)
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"feature names {repeated} are derived twice: rename an entity, aggregate or ratio")




class OnlineConfig(_Model):
    """The speed layer's online logistic regression (the ``online`` query)."""

    algorithm: Literal["sgd", "ftrl"] = "sgd"
    learning_rate: float = Field(0.05, gt=0)
    l2: float = Field(0.0, ge=0)
    ftrl_alpha: float = Field(0.05, gt=0)
    ftrl_beta: float = Field(1.0, gt=0)
    l1: float = Field(0.0, ge=0)
    register_every: int = Field(50, ge=0)
    step_minutes: int = Field(15, gt=0)


class SpeedConfig(_Model):
    trigger_seconds: float = Field(5, gt=0)
    max_future_minutes: float = Field(5, ge=0)
    min_event_date: date = date(1970, 1, 1)
    quarantine_warning_share: float = Field(0.5, gt=0, le=1)
    max_offsets_per_trigger: int = Field(200000, gt=0)
    # ingest and increments are the layer's; the others the application's (checked when it loads).
    queries: tuple[str, ...] = Field(("ingest", "increments"), min_length=1)
    stop_timeout_seconds: float = Field(60, gt=0)
    watermark_minutes: int = Field(15, gt=0)
    max_files_per_trigger: int = Field(1000, gt=0)
    report_to_mlflow: bool = True
    online: OnlineConfig = OnlineConfig()

    @model_validator(mode="before")
    @classmethod
    def _max_future_days_was_replaced(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_future_days" in data:
            raise ValueError("speed.max_future_days was replaced by speed.max_future_minutes (less than speed.watermark_minutes)")
        return data

    @model_validator(mode="after")
    def _future_bound_below_the_watermark(self) -> SpeedConfig:
        # An accepted event may run ahead of the record time by the bound; if the bound reached
        # the watermark delay, that one event would move the watermark past events on time.
        if self.max_future_minutes >= self.watermark_minutes:
            raise ValueError(
                f"speed.max_future_minutes ({self.max_future_minutes:g}) must be less than speed.watermark_minutes "
                f"({self.watermark_minutes}): an event that far ahead of its Kafka record time would move the "
                "watermark past events arriving on time"
            )
        return self


# The kinds a field of an event may be declared as (see ``lambda_ml.validation`` for what each
# accepts in JSON and in Avro).
FieldKind = Literal["string", "int", "double", "timestamp"]
# The fields every event type has: its id (duplicates are dropped by it) and its event time.
EVENT_ID, EVENT_TIME = "event_id", "event_time"


class EventTypeConfig(_Model):
    """One event type: its Kafka topic and its fields (name -> kind), each required in a record."""

    topic: TopicConfig
    fields: dict[str, FieldKind] = Field(min_length=2)

    @field_validator("fields")
    @classmethod
    def _has_id_and_time(cls, fields: dict[str, str]) -> dict[str, str]:
        for name, kind in ((EVENT_ID, "string"), (EVENT_TIME, "timestamp")):
            if fields.get(name) != kind:
                raise ValueError(f"every event type needs the field {name}: {kind}")
        for name in fields:
            if not _NAME.match(name):
                raise ValueError(f"{name!r} is not a lower-case identifier (it names a column)")
        return fields


class EventsConfig(_Model):
    """The event types (their topics and fields), and the size limits of the event validator
    (``lambda_ml.validation``): the speed layer's ingest, stream scoring and the service's
    request model apply the same ones."""

    types: dict[str, EventTypeConfig] = Field(min_length=1)
    max_record_bytes: int = Field(65_536, gt=0)
    max_string_length: int = Field(256, gt=0)

    @field_validator("types")
    @classmethod
    def _names_are_identifiers(cls, types: dict[str, EventTypeConfig]) -> dict[str, EventTypeConfig]:
        for name in types:
            if not _NAME.match(name):
                raise ValueError(f"{name!r} is not a lower-case identifier (it names a bronze table)")
        topics = [t.topic.name for t in types.values()]
        repeated = sorted({t for t in topics if topics.count(t) > 1})
        if repeated:
            raise ValueError(f"topics {repeated} carry more than one event type")
        return types

    def topics(self) -> dict[str, TopicConfig]:
        """The topics carrying raw events, keyed by event type."""
        return {name: event.topic for name, event in self.types.items()}

    def topic(self, event_type: str) -> TopicConfig:
        """The topic of one declared event type."""
        return self.types[event_type].topic


class PredictionLogConfig(_Model):
    """Every answer of the service sent to ``kafka.topics.predictions``, off the request path."""

    enabled: bool = True
    buffer_size: int = Field(100_000, gt=0)
    linger_ms: int = Field(50, ge=0)


class AbConfig(_Model):
    """The ``ab`` policy: users split between two aliases by a stable hash of the user id."""

    challenger_alias: str = Field("challenger", min_length=1)
    challenger_fraction: float = Field(0.1, ge=0, le=1)
    salt: str = "ab"


class ServingConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    model_alias: str = "champion"
    candidate_aliases: tuple[str, ...] = ("challenger", "speed")
    poll_interval_s: float = Field(10, gt=0)
    views_refresh_s: float = Field(10, gt=0)
    policy: Literal["champion", "latest", "quality", "consensus", "deadline", "ab"] = "champion"
    consensus: Literal["mean", "vote"] = "mean"
    deadline_ms: float = Field(20, gt=0)
    prior_probability: float = Field(1 / 21, ge=0, le=1)
    api_key: str = ""
    model_updates: bool = True
    max_rows: int = Field(1000, gt=0)
    point_in_time_buckets: int = Field(48, gt=0)
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "[::1]")
    prediction_log: PredictionLogConfig = PredictionLogConfig()
    ab: AbConfig = AbConfig()

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        if not hosts:
            raise ValueError("list at least one host name (or * for any)")
        for host in hosts:
            if not host or any(c in host for c in "/ ,") or host.startswith(("http:", "https:")):
                raise ValueError(f"{host!r} is not a host name: write localhost, 10.0.0.5:8000, [::1], *.example.com or *")
        return hosts

    @property
    def aliases(self) -> tuple[str, ...]:
        """Every alias the service loads: ``model_alias`` first, then the candidates."""
        return tuple(dict.fromkeys((self.model_alias, *self.candidate_aliases)))

    @model_validator(mode="after")
    def _ab_challenger_loaded(self) -> ServingConfig:
        if self.policy == "ab" and self.ab.challenger_alias not in self.candidate_aliases:
            raise ValueError(
                f"ab.challenger_alias {self.ab.challenger_alias!r} must be one of candidate_aliases "
                f"{list(self.candidate_aliases)} for the ab policy"
            )
        return self


class GeneratorConfig(_Model):
    seed: int = 7
    users: int = Field(500, gt=0)
    items: int = Field(100, gt=0)
    impressions: int = Field(20000, ge=0)
    span_hours: float = Field(48, gt=0)
    late_fraction: float = Field(0.05, ge=0, le=1)
    duplicate_fraction: float = Field(0.02, ge=0, le=1)
    malformed_fraction: float = Field(0.01, ge=0, le=1)
    compression: Literal["none", "gzip", "lz4", "zstd"] = "zstd"


class MaintenanceConfig(_Model):
    """The Delta maintenance job (``batch_layer/maintenance.py``): OPTIMIZE, then VACUUM."""

    retention_hours: float = Field(168, ge=0)
    safety_margin_minutes: float = Field(60, ge=0)
    optimize: bool = True
    exclude: tuple[str, ...] = ()
    registry_timeout_s: int = Field(30, gt=0)


class AppConfig(_Model):
    """The application the layers run, by its registered type (``lambda_ml.apps``)."""

    type: str = "ctr"

    @field_validator("type")
    @classmethod
    def _registered(cls, name: str) -> str:
        from lambda_ml.apps import APPLICATION_TYPES

        if name not in APPLICATION_TYPES:
            raise ValueError(f"{name!r} is not a registered application; registered: {', '.join(APPLICATION_TYPES)}")
        return name


class PlatformConfig(_Model):
    app: AppConfig = AppConfig()
    data_dir: Path = Path(".data")
    jvm: JvmConfig = JvmConfig()
    spark: SparkConfig = SparkConfig()
    kafka: KafkaConfig
    mlflow: MlflowConfig = MlflowConfig()
    lake: LakeConfig = LakeConfig()
    ctr: CtrConfig = CtrConfig()
    kmeans: KMeansConfig = KMeansConfig()
    features: FeaturesConfig
    speed: SpeedConfig = SpeedConfig()
    events: EventsConfig
    serving: ServingConfig = ServingConfig()
    generator: GeneratorConfig = GeneratorConfig()
    maintenance: MaintenanceConfig = MaintenanceConfig()
    source: str = Field("<defaults>", exclude=True)

    @model_validator(mode="after")
    def _features_read_declared_events(self) -> PlatformConfig:
        types = self.events.types
        features = self.features
        if features.event_type not in types:
            raise ValueError(f"features.event_type: {features.event_type!r} is not a declared event type ({', '.join(types)})")
        for name, aggregate in features.aggregates.items():
            if aggregate.events not in types:
                raise ValueError(f"features.aggregates.{name}.events: {aggregate.events!r} is not a declared event type ({', '.join(types)})")
        features.check_fields(dict(types[features.event_type].fields), features.event_type)
        return self

    @model_validator(mode="after")
    def _excluded_tables_exist(self) -> PlatformConfig:
        from lambda_ml.catalog import table_names

        known = table_names(self)
        unknown = [name for name in self.maintenance.exclude if name not in known]
        if unknown:
            raise ValueError(f"maintenance.exclude names {unknown}, which are not lake tables; the lake's tables are {list(known)}")
        return self

    @property
    def jvm_dir(self) -> Path:
        return _absolute(self.jvm.dir)

    @property
    def data_path(self) -> Path:
        return _absolute(self.data_dir)


def _absolute(path: Path) -> Path:
    return path if path.is_absolute() else PROJECT_ROOT / path


def _absolute_uri(value: str) -> str:
    """A relative lake path becomes absolute under the project root; URIs stay as they are."""
    if "://" in value or value.startswith("/"):
        return value
    return str(PROJECT_ROOT / value)


def expand_env(value: Any, env: dict[str, str]) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a parsed YAML tree.

    >>> expand_env({"a": "${X:-1}", "b": ["${Y}"]}, {"Y": "2"})
    {'a': '1', 'b': ['2']}
    """
    if isinstance(value, dict):
        return {k: expand_env(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env) for v in value]
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise KeyError(name)

        return _ENV_REF.sub(replace, value)
    return value


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``"kafka.port"``) in a nested dict, creating sections as needed.

    >>> apply_overrides({"kafka": {"port": 1}}, {"kafka.port": 2, "a.b": 3})
    {'kafka': {'port': 2}, 'a': {'b': 3}}
    """
    result = _deep_copy(tree)
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[leaf] = value
    return result


def env_overrides(env: dict[str, str]) -> dict[str, Any]:
    """``LAMBDA_ML__KAFKA__PORT=19092`` becomes ``{"kafka.port": 19092}``: the value typed as the
    same text would be in the file (see :func:`parse_yaml`).

    >>> env_overrides({"LAMBDA_ML__KAFKA__PORT": "19092", "LAMBDA_ML__SPEED__MIN_EVENT_DATE": "1990-01-01", "HOME": "/root"})
    {'kafka.port': 19092, 'speed.min_event_date': '1990-01-01'}
    """
    found: dict[str, Any] = {}
    for key, name in env_override_names(env).items():
        raw = env[name]
        found[key] = parse_yaml(raw) if raw != "" else ""
    return found


def env_override_names(env: dict[str, str]) -> dict[str, str]:
    """The dotted key each ``LAMBDA_ML__...`` variable overrides -> the variable's name.

    >>> env_override_names({"LAMBDA_ML__SPEED__MIN_EVENT_DATE": "1990-01-01"})
    {'speed.min_event_date': 'LAMBDA_ML__SPEED__MIN_EVENT_DATE'}
    """
    return {
        ".".join(p.lower() for p in name[len(ENV_PREFIX) :].split("__")): name
        for name in env
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX)
    }


def _deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _format_error(source: str, error: ValidationError, env_names: dict[str, str] | None = None) -> str:
    """One line per error naming where the value came from: the file and the key, or the
    environment variable that overrides the key (or a section holding it).

    >>> class S(BaseModel):
    ...     port: int
    >>> try:
    ...     S.model_validate({"port": "x"})
    ... except ValidationError as exc:
    ...     print(_format_error("conf/a.yaml", exc, {"port": "LAMBDA_ML__PORT"}))
    environment variable LAMBDA_ML__PORT: port: Input should be a valid integer, unable to parse string as an integer
    """
    env_names = env_names or {}
    lines = []
    for item in error.errors():
        parts = [str(p) for p in item["loc"]]
        key = ".".join(parts) or "<root>"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        if not parts and message.startswith("Value error, "):
            # A check across sections names its keys itself (e.g. features.aggregates.n.events).
            lines.append(f"{source}: {message.removeprefix('Value error, ')}")
            continue
        origin = next(
            (f"environment variable {env_names[k]}" for k in (".".join(parts[:n]) for n in range(len(parts), 0, -1)) if k in env_names),
            source,
        )
        lines.append(f"{origin}: {key}: {message}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> PlatformConfig:
    """Load, expand and validate the platform config.

    ``path`` defaults to ``$LAMBDA_ML_CONFIG`` or ``conf/platform.yaml``; ``overrides`` are
    dotted keys applied after the environment overrides (tests use them for free ports).
    """
    env = dict(os.environ if env is None else env)
    config_path = Path(path or env.get("LAMBDA_ML_CONFIG") or DEFAULT_CONFIG)
    source = str(config_path)
    try:
        raw = parse_yaml(config_path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{source}: file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping of sections")
    try:
        tree = expand_env(raw, env)
    except KeyError as exc:
        raise ConfigError(f"{source}: environment variable {exc.args[0]} is not set") from exc
    tree = apply_overrides(tree, {**env_overrides(env), **(overrides or {})})
    # A key the caller's overrides set is not blamed on the environment.
    env_names = {k: v for k, v in env_override_names(env).items() if k not in (overrides or {})}
    try:
        config = PlatformConfig.model_validate({**tree, "source": source})
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc, env_names)) from None
    lake = config.lake.model_copy(
        update={"root": _absolute_uri(config.lake.root), "checkpoints": _absolute_uri(config.lake.checkpoints)}
    )
    return config.model_copy(update={"lake": lake})


def load_command_config(path: str | Path | None) -> PlatformConfig | None:
    """The config of a command-line entry point, or None after saying on stderr why it is
    invalid (file and key named); the command then exits with 2."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        return None


def write_config(cfg: PlatformConfig, path: str | Path) -> Path:
    """Write a resolved config as YAML, for child processes (spark-submit jobs, the service)."""
    target = Path(path)
    target.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return target

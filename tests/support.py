"""Helpers shared by the integration tests (imported as ``support``)."""

from __future__ import annotations

from pathlib import Path

from lambda_ml.config import DEFAULT_CONFIG, EventsConfig, KafkaConfig, PlatformConfig, TopicConfig, load_config
from lambda_ml.schemas import EventType, event_type


def isolated(
    cfg: PlatformConfig, model: str, lake_root: Path | None = None, topic_prefix: str | None = None, **ctr: float
) -> PlatformConfig:
    """The session config with its own registered model and experiment, and, if given, its own
    lake (and checkpoints beside it) and event topics, so that tests sharing the MLflow server
    and the broker cannot interfere."""
    update: dict[str, object] = {
        "mlflow": cfg.mlflow.model_copy(update={"registered_model": model, "experiment": f"{model}-experiment"}),
        "ctr": cfg.ctr.model_copy(update=ctr),
    }
    if lake_root is not None:
        update["lake"] = cfg.lake.model_copy(update={"root": str(lake_root), "checkpoints": str(lake_root.parent / "checkpoints")})
    if topic_prefix is not None:
        update["kafka"], update["events"] = prefixed_topics(cfg, topic_prefix)
    return cfg.model_copy(update=update)


def prefixed_topics(cfg: PlatformConfig, prefix: str) -> tuple[KafkaConfig, EventsConfig]:
    """The Kafka and events sections with every topic name prefixed (the platform's and each
    event type's)."""

    def renamed(topic: TopicConfig) -> TopicConfig:
        return topic.model_copy(update={"name": f"{prefix}-{topic.name}"})

    topics = cfg.kafka.topics
    kafka = cfg.kafka.model_copy(
        update={"topics": topics.model_copy(update={n: renamed(getattr(topics, n)) for n in ("model_updates", "predictions")})}
    )
    types = {name: t.model_copy(update={"topic": renamed(t.topic)}) for name, t in cfg.events.types.items()}
    return kafka, cfg.events.model_copy(update={"types": types})


def with_topic(cfg: PlatformConfig, event_type: str, **changes: object) -> PlatformConfig:
    """The config with one event type's topic changed (e.g. ``format="avro"``)."""
    declared = cfg.events.types[event_type]
    types = {**cfg.events.types, event_type: declared.model_copy(update={"topic": declared.topic.model_copy(update=changes)})}
    return cfg.model_copy(update={"events": cfg.events.model_copy(update={"types": types})})


def default_event_type(name: str) -> EventType:
    """An event type as the default config (conf/platform.yaml) declares it."""
    return event_type(load_config(DEFAULT_CONFIG, env={}), name)


# The click-through application's event types, as declared by default.
IMPRESSION, CLICK = default_event_type("impressions"), default_event_type("clicks")


def config_on_stack(path: str | Path, stack_cfg: PlatformConfig, lake_root: Path) -> PlatformConfig:
    """Another config file (e.g. another application's) on the session's running stack: its
    ports, data dir and Spark master, with its own lake (and checkpoints beside it)."""
    return load_config(
        path,
        overrides={
            "data_dir": str(stack_cfg.data_dir),
            "kafka.port": stack_cfg.kafka.port,
            "kafka.controller_port": stack_cfg.kafka.controller_port,
            "kafka.bootstrap_servers": stack_cfg.kafka.bootstrap_servers,
            "mlflow.port": stack_cfg.mlflow.port,
            "mlflow.tracking_uri": stack_cfg.mlflow.tracking_uri,
            "serving.port": stack_cfg.serving.port,
            "lake.root": str(lake_root),
            "lake.checkpoints": str(lake_root.parent / "checkpoints"),
            "spark.master": stack_cfg.spark.master,
        },
        env={},
    )

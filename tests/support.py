"""Helpers shared by the integration tests (imported as ``support``)."""

from __future__ import annotations

from pathlib import Path

from lambda_ml.config import PlatformConfig


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
        topics = cfg.kafka.topics
        update["kafka"] = cfg.kafka.model_copy(
            update={
                "topics": topics.model_copy(
                    update={
                        name: getattr(topics, name).model_copy(update={"name": f"{topic_prefix}-{getattr(topics, name).name}"})
                        for name in ("impressions", "clicks", "model_updates", "predictions")
                    }
                )
            }
        )
    return cfg.model_copy(update=update)

"""What ``lambda-ml demo`` does for k-means: points from clusters that move (the generator's
ground truth), fresh points of one source, one ``POST /assign``."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from lambda_ml import producer
from lambda_ml.apps import FreshEvents
from lambda_ml.config import PlatformConfig
from lambda_ml_apps.kmeans.generator import MovingClusters

FRESH_POINTS = 5


def moving_clusters(cfg: PlatformConfig, count: int, end: datetime) -> MovingClusters:
    """Four clusters in the space of ``kmeans.features`` moving one unit an hour, ``count``
    points over ``generator.span_hours`` ending at ``end``."""
    span = cfg.generator.span_hours
    return MovingClusters(
        k=4, dimensions=len(cfg.kmeans.features), spread=1.0, separation=12.0, speed_per_hour=1.0,
        events_per_hour=count / span, start=end - timedelta(hours=span), seed=cfg.generator.seed,
    )  # fmt: skip


def _entity(cfg: PlatformConfig) -> tuple[str, str, str]:
    """The first entity keyed by one field, that field, and the first count aggregate."""
    name, entity = next((n, e) for n, e in cfg.features.entities.items() if len(e.keys) == 1)
    aggregate = next(n for n, a in cfg.features.aggregates.items() if a.aggregation == "count")
    return name, entity.keys[0], aggregate


class KMeansDemo:
    """The ``DemoScript`` of k-means."""

    warm_queries: tuple[str, ...] = ()

    def send_events(self, cfg: PlatformConfig, count: int | None) -> str:
        count = count or cfg.generator.impressions
        clusters = moving_clusters(cfg, count, datetime.now(UTC) - timedelta(minutes=1))
        batch = clusters.sample(count)
        # The generator's coordinates and source become the configured features and entity key.
        names = {**dict(zip(clusters.feature_names, cfg.kmeans.features, strict=True)), "source_id": _entity(cfg)[1]}
        event_type = cfg.kmeans.event_type
        records = [
            producer.Record(event_type, str(e["source_id"]).encode(), json.dumps({names.get(k, k): v for k, v in e.items()}).encode())
            for e in batch.events
        ]
        producer.produce(cfg, records, progress=False)
        return f"{len(records)} points from {clusters.k} clusters moving {clusters.speed_per_hour:g} unit(s) an hour"

    def fresh_events(self, cfg: PlatformConfig, now: datetime) -> FreshEvents:
        entity, key, aggregate = _entity(cfg)
        source = "demo-source"
        records = [
            producer.Record(cfg.kmeans.event_type, source.encode(), json.dumps({
                "event_id": f"demo-{uuid.uuid4().hex}", "event_time": producer.iso(now), key: source,
                **{name: float(n) for n, name in enumerate(cfg.kmeans.features)},
            }).encode())  # fmt: skip
            for _ in range(FRESH_POINTS)
        ]
        return FreshEvents(records, entity, source, aggregate, FRESH_POINTS)

    def example(self, cfg: PlatformConfig) -> tuple[str, dict[str, Any]]:
        return "/assign", {"points": [{name: 0.0 for name in cfg.kmeans.features}]}

    def update_pending(self, cfg: PlatformConfig, fresh_at: datetime) -> str | None:
        return None  # the centres move on the fresh points themselves

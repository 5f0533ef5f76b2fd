"""What ``lambda-ml demo`` does for the click-through application: generated impressions and
clicks with a known ground truth, fresh impressions of one user, one ``POST /predict``."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from lambda_ml import producer
from lambda_ml_apps.ctr import generator
from lambda_ml.apps import FreshEvents
from lambda_ml.config import PlatformConfig

FRESH_USER, FRESH_IMPRESSIONS = "u1", 5


class CtrDemo:
    """The ``DemoScript`` of the click-through application."""

    warm_queries = ("labels",)

    def send_events(self, cfg: PlatformConfig, count: int | None) -> str:
        if count is not None:
            cfg = cfg.model_copy(update={"generator": cfg.generator.model_copy(update={"impressions": count})})
        truth = generator.run(cfg)
        return f"{truth.impressions} impressions, {truth.clicks_sent} clicks, {truth.malformed_total} malformed"

    def fresh_events(self, cfg: PlatformConfig, now: datetime) -> FreshEvents:
        records = [
            producer.Record("impressions", FRESH_USER.encode(), json.dumps({
                "event_id": f"demo-{uuid.uuid4().hex}", "event_time": producer.iso(now), "user_id": FRESH_USER,
                "item_id": "i1", "device": "mobile", "position": 1,
            }).encode())  # fmt: skip
            for _ in range(FRESH_IMPRESSIONS)
        ]
        return FreshEvents(records, "user", FRESH_USER, "impressions", FRESH_IMPRESSIONS)

    def example(self, cfg: PlatformConfig) -> tuple[str, dict[str, Any]]:
        return "/predict", {"user_id": FRESH_USER, "item_id": "i1", "device": "mobile", "position": 1}

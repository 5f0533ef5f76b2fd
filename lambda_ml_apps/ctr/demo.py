"""What ``lambda-ml demo`` does for the click-through application: generated impressions and
clicks with a known ground truth, fresh impressions of one user, one ``POST /predict``."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from lambda_ml import contract, producer
from lambda_ml_apps.ctr import generator
from lambda_ml.apps import FreshEvents
from lambda_ml.config import PlatformConfig

FRESH_USER, FRESH_IMPRESSIONS = "u1", 5


def history_end(cfg: PlatformConfig, now: datetime) -> datetime:
    """Where the generated history ends: before ``now`` by the attribution window, the labels
    watermark and one online step. The champion learns every impression whose label is final
    at the end of the history; the fresh events, at ``now``, move the labels query's watermark
    far enough to close the labels of the history's last stretches, which the speed layer's
    online model then learns from (history ending at ``now`` would leave it nothing to learn
    until 45 minutes of new events had come)."""
    lag = cfg.ctr.attribution_window_minutes + cfg.speed.watermark_minutes + cfg.speed.online.step_minutes
    return now - timedelta(minutes=lag)


class CtrDemo:
    """The ``DemoScript`` of the click-through application."""

    warm_queries = ("labels",)

    def send_events(self, cfg: PlatformConfig, count: int | None) -> str:
        if count is not None:
            cfg = cfg.model_copy(update={"generator": cfg.generator.model_copy(update={"impressions": count})})
        end = history_end(cfg, datetime.now(UTC))
        truth = generator.run(cfg, now=end)
        return (
            f"{truth.impressions} impressions, {truth.clicks_sent} clicks, {truth.malformed_total} malformed "
            f"over {cfg.generator.span_hours:g} h up to {end:%H:%M} UTC"
        )

    def fresh_events(self, cfg: PlatformConfig, now: datetime) -> FreshEvents:
        """Impressions of one user and a click on the first: the labels query attributes clicks to
        impressions with a stream-stream join, whose watermark is the lower of the two streams'
        (Spark's default policy), so it moves, and closes the history's last labels, only when
        both impressions and clicks come."""
        ids = [f"demo-{uuid.uuid4().hex}" for _ in range(FRESH_IMPRESSIONS)]
        records = [
            producer.Record("impressions", FRESH_USER.encode(), json.dumps({
                "event_id": event_id, "event_time": producer.iso(now), "user_id": FRESH_USER,
                "item_id": "i1", "device": "mobile", "position": 1,
            }).encode())  # fmt: skip
            for event_id in ids
        ]
        click = {"event_id": f"demo-click-{uuid.uuid4().hex}", "impression_id": ids[0], "event_time": producer.iso(now)}
        records.append(producer.Record("clicks", ids[0].encode(), json.dumps(click).encode()))
        return FreshEvents(records, "user", FRESH_USER, "impressions", FRESH_IMPRESSIONS)

    def example(self, cfg: PlatformConfig) -> tuple[str, dict[str, Any]]:
        return "/predict", {"user_id": FRESH_USER, "item_id": "i1", "device": "mobile", "position": 1}

    def update_pending(self, cfg: PlatformConfig, fresh_at: datetime) -> str | None:
        """Why the online model cannot step from the champion yet: it learns from impressions
        after the last one its champion's training run had a final label for, and the labels of
        those close only when events come ``ctr.attribution_window_minutes`` +
        ``speed.watermark_minutes`` later. A demo run soon after another trains on the earlier
        run's fresh events, so its champion's labels end later than this run's can close."""
        from mlflow import MlflowClient

        from lambda_ml_apps.ctr.online import labels_final_of

        client = MlflowClient(cfg.mlflow.tracking_uri)
        champion = client.get_model_version_by_alias(cfg.mlflow.registered_model, contract.CHAMPION_ALIAS)
        learned = labels_final_of(client, champion.run_id)
        if learned is None:
            return None
        delay = timedelta(minutes=cfg.ctr.attribution_window_minutes + cfg.speed.watermark_minutes)
        step_s = cfg.speed.online.step_minutes * 60
        closes = (fresh_at - delay).timestamp()  # the newest impression whose label the fresh events close
        if datetime.fromtimestamp(closes - closes % step_s, UTC) > learned:  # the stretches before its own
            return None
        ready = learned + delay + timedelta(seconds=step_s)
        return (
            f"no update yet from champion v{champion.version}: it learned every label final until {learned:%H:%M} UTC, later "
            f"than the fresh events can close; the online model steps once events from about {ready:%H:%M} UTC come"
        )

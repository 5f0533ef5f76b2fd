"""Events from the future (real broker, the speed application's ingest, labels and increments
queries): an impression and its click stamped 10 hours ahead of their Kafka record time are
quarantined with the reason, and every other event is counted, labelled and attributed exactly
as if they had never been sent. Accepted, they would have moved the watermark 10 hours ahead:
every later event dropped as late, every pending impression labelled 0 at once."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from deltalake import DeltaTable
from speed_process import app_config

from lambda_ml import catalog, contract, producer
from lambda_ml_apps.ctr import generator
from lambda_ml.config import PlatformConfig
from speed_layer import app

NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)


def _expected(records: list[producer.Record], window: timedelta) -> tuple[dict[str, tuple[int, int]], set[str], dict[str, datetime]]:
    """From the records sent, without the platform: per user (impressions, attributed clicks),
    the impressions clicked within the attribution window (both ends inclusive), and every
    impression's event time."""
    impressions: dict[str, dict[str, str]] = {}
    clicks: dict[str, dict[str, str]] = {}
    for record in records:
        event = json.loads(record.value)
        (impressions if record.event_type == "impressions" else clicks)[event["event_id"]] = event  # a resent click counts once
    times = {i: datetime.fromisoformat(e["event_time"]) for i, e in impressions.items()}
    counts = Counter(e["user_id"] for e in impressions.values())
    positives: set[str] = set()
    attributed: Counter[str] = Counter()
    for click in clicks.values():
        shown = times.get(click["impression_id"])
        if shown is not None and shown <= datetime.fromisoformat(click["event_time"]) <= shown + window:
            positives.add(click["impression_id"])
            attributed[impressions[click["impression_id"]]["user_id"]] += 1
    return {user: (n, attributed[user]) for user, n in counts.items()}, positives, times


def _send_from_the_future(cfg: PlatformConfig) -> tuple[datetime, datetime]:
    """An impression and its click whose event times are 10 h (and 10 h 1 min) ahead of their
    Kafka record time (set explicitly); returns (record time, impression event time)."""
    from kafka import KafkaProducer

    record_time = datetime.now(UTC).replace(microsecond=0)
    ahead = record_time + timedelta(hours=10)
    impression = {"event_id": "imp-future", "event_time": producer.iso(ahead), "user_id": "u1", "item_id": "i1", "device": "mobile", "position": 1}
    click = {"event_id": "clk-future", "impression_id": "imp-future", "event_time": producer.iso(ahead + timedelta(minutes=1))}
    sender = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, acks="all")
    try:
        ms = int(record_time.timestamp() * 1000)
        sender.send(cfg.events.topic("impressions").name, key=b"u1", value=json.dumps(impression).encode(), timestamp_ms=ms)
        sender.send(cfg.events.topic("clicks").name, key=b"imp-future", value=json.dumps(click).encode(), timestamp_ms=ms)
        sender.flush()
    finally:
        sender.close()
    return record_time, ahead


def _table(cfg: PlatformConfig, *parts: str) -> list[dict[str, object]]:
    return DeltaTable(cfg.lake.table(*parts)).to_pyarrow_table().to_pylist()  # type: ignore[no-any-return]


@pytest.mark.integration
@pytest.mark.slow
def test_events_from_the_future_are_quarantined_and_blind_nothing(running_stack: PlatformConfig, tmp_path: Path) -> None:
    cfg, _ = app_config(running_stack, "ctr-speed-future", tmp_path, "future")
    window = timedelta(minutes=cfg.ctr.attribution_window_minutes)
    gen = cfg.generator.model_copy(update={"impressions": 600, "seed": 13, "span_hours": 2, "users": 25, "items": 10, "malformed_fraction": 0.0})
    records, truth = generator.generate(gen, window, NOW)
    cut = 2 * len(records) // 3
    queries = ["ingest", "labels", "increments"]

    # The future pair arrives with the first part; the rest (later impressions, and clicks of
    # impressions still pending) afterwards, in later micro-batches.
    producer.produce(cfg, records[:cut], progress=False)
    record_time, ahead = _send_from_the_future(cfg)
    app.run(cfg, queries, available_now=True)
    producer.produce(cfg, records[cut:], progress=False)
    app.run(cfg, queries, available_now=True)

    # Quarantined with the amount and the limit, nothing else.
    quarantine = sorted((r["kafka_topic"], r["reason"], r["kafka_timestamp"]) for r in _table(cfg, "quarantine"))
    assert quarantine == [
        (cfg.events.topic("clicks").name, "event_time 10:01:00 ahead of the Kafka record time (limit 5 minutes)", record_time),
        (cfg.events.topic("impressions").name, "event_time 10:00:00 ahead of the Kafka record time (limit 5 minutes)", record_time),
    ]
    assert ahead - record_time == timedelta(hours=10)

    counts, positives, times = _expected(records, window)
    assert sum(n for n, _ in counts.values()) == truth.impressions and len(positives) == truth.positives > 10
    # Later clicks of impressions sent before the future pair: the events a moved watermark drops.
    first_part = {json.loads(r.value)["event_id"] for r in records[:cut] if r.event_type == "impressions"}
    later_clicks = {json.loads(r.value)["impression_id"] for r in records[cut:] if r.event_type == "clicks"}
    assert len(positives & first_part & later_clicks) > 0

    # Feature increments: every impression and every attributed click, per user.
    increments: dict[str, list[int]] = {}
    for row in _table(cfg, *contract.increments_table("user")):
        total = increments.setdefault(str(row["user_id"]), [0, 0])
        total[0] += int(row["impressions"])  # type: ignore[call-overload]
        total[1] += int(row["clicks"])  # type: ignore[call-overload]
    assert {user: tuple(n) for user, n in increments.items()} == counts

    # Labels: every attributed click made its impression positive; an impression is labelled 0
    # only once the watermark of the events on time has passed its window, never at once.
    labels = {str(r["event_id"]): float(r["label"]) for r in _table(cfg, *catalog.SILVER_LABELS_TABLE)}  # type: ignore[arg-type]
    assert {i for i, label in labels.items() if label == 1.0} == positives
    negatives = {i for i, label in labels.items() if label == 0.0}
    assert not negatives & positives

    def watermark(part: list[producer.Record]) -> datetime:
        newest = {kind: max(datetime.fromisoformat(json.loads(r.value)["event_time"]) for r in part if r.event_type == kind)
                  for kind in ("impressions", "clicks")}  # fmt: skip
        return min(newest.values()) - timedelta(minutes=cfg.speed.watermark_minutes)

    # At least the windows the first part's watermark closed; at most those the whole stream's closes.
    margin = timedelta(seconds=1)
    closed_early = {i for i, t in times.items() if i not in positives and t + window < watermark(records[:cut]) - margin}
    closable = {i for i, t in times.items() if i not in positives and t + window <= watermark(records) + margin}
    still_open = set(times) - positives - closable
    assert len(closed_early) > 100 and len(still_open) > 10
    assert closed_early <= negatives <= closable

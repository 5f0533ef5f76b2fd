"""Bring your own events, no code: a second event schema, declared only in its own config file
(``conf/examples/readings.yaml``: sensor readings, clustered by the k-means application), goes
Kafka -> bronze (bad records to quarantine with the reason) -> batch views -> speed increments
-> merged features served, and the lambda identity holds on it: the service's merged features
equal a recompute from every reading in bronze, computed here independently with pandas.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from lambda_ml.config import PROJECT_ROOT, PlatformConfig

READINGS_CONFIG = PROJECT_ROOT / "conf" / "examples" / "readings.yaml"
SENSORS = [f"s-{n}" for n in range(6)]
NOW = datetime.now(UTC).replace(microsecond=0)


def readings(count: int, start: datetime, end: datetime, seed: int) -> list[dict[str, Any]]:
    """Readings of the sensors between ``start`` and ``end``: two climates (cool and damp, hot
    and dry), so that there is something to cluster."""
    rng = random.Random(seed)
    span = (end - start).total_seconds()
    out = []
    for n in range(count):
        hot = rng.random() < 0.5
        at = start + timedelta(seconds=rng.random() * span)
        out.append({
            "event_id": f"r-{seed}-{n}", "event_time": at.isoformat().replace("+00:00", "Z"),
            "sensor_id": rng.choice(SENSORS),
            "temperature": round(rng.gauss(31.0 if hot else 12.0, 1.5), 3),
            "humidity": round(rng.gauss(20.0 if hot else 80.0, 4.0), 3),
        })  # fmt: skip
    return out


def produce(cfg: PlatformConfig, values: list[bytes]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, acks="all")
    try:
        for value in values:
            producer.send(cfg.events.topic("readings").name, value=value)
        producer.flush()
    finally:
        producer.close()


def expected_features(rows: pd.DataFrame, sensor: str, at: datetime) -> dict[str, float]:
    """The declared features of one sensor at ``at``, from the readings themselves: counts and
    the hottest reading over [start of at's hour - window, at), and over all readings before at."""
    mine = rows[(rows.sensor_id == sensor) & (rows.event_time < at)]
    hour = at.replace(minute=0, second=0, microsecond=0)
    out: dict[str, float] = {}
    for window, since in (("1h", hour - timedelta(hours=1)), ("24h", hour - timedelta(hours=24)), ("all", None)):
        part = mine if since is None else mine[mine.event_time >= since]
        out[f"sensor_readings_{window}"] = float(len(part))
        out[f"sensor_hottest_{window}"] = float(part.temperature.max()) if len(part) else 0.0
    return out


def test_the_readings_config_declares_a_schema_of_its_own() -> None:
    from lambda_ml.apps import load_application
    from lambda_ml.config import load_config

    cfg = load_config(READINGS_CONFIG, env={})
    assert list(cfg.events.types) == ["readings"]
    assert dict(cfg.events.types["readings"].fields) == {
        "event_id": "string", "event_time": "timestamp", "sensor_id": "string", "temperature": "double", "humidity": "double",
    }  # fmt: skip
    assert load_application(cfg).name == cfg.app.type == "kmeans"


@pytest.mark.integration
def test_your_own_events_go_from_kafka_to_merged_features_and_the_lambda_identity_holds(
    running_stack: PlatformConfig, spark, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    from deltalake import DeltaTable
    from fastapi.testclient import TestClient

    from batch_layer import train
    from lambda_ml_cli import stack
    from serving_layer.app import create_app
    from speed_layer import app as speed_app
    from support import config_on_stack, isolated

    base = config_on_stack(READINGS_CONFIG, running_stack, tmp_path / "lake")
    cfg = isolated(base, "byo-readings", lake_root=tmp_path / "lake", topic_prefix="byo")
    stack.create_topics(cfg)

    # History, with a duplicate and records that are not valid readings.
    history = readings(1500, NOW - timedelta(hours=30), NOW - timedelta(hours=2), seed=1)
    bad = [b'{"event_id": "x1"', json.dumps({**history[0], "event_id": "x2", "temperature": "hot"}).encode(),
           json.dumps({k: v for k, v in history[1].items() if k != "sensor_id"} | {"event_id": "x3"}).encode()]  # fmt: skip
    produce(cfg, [json.dumps(r).encode() for r in history] + [json.dumps(history[5]).encode()] + bad)
    speed_app.run(cfg, ["ingest", "increments"], available_now=True)
    result = train.run(spark, cfg)  # the batch views at this horizon (and a k-means champion)
    assert result.decision == "champion" and result.horizon.version("readings") is not None

    # Fresh readings after the horizon: only the speed layer's increments count them so far.
    fresh = readings(300, NOW - timedelta(hours=2), NOW - timedelta(minutes=1), seed=2)
    produce(cfg, [json.dumps(r).encode() for r in fresh])
    speed_app.run(cfg, ["ingest", "increments"], available_now=True)

    quarantined = DeltaTable(cfg.lake.table("quarantine")).to_pandas()
    reasons = sorted(quarantined.reason)
    assert len(reasons) == 3 and reasons[0].startswith('bad value for temperature: expected a finite number, got "hot"')
    assert reasons[1].startswith("malformed JSON") and reasons[2] == "missing field: sensor_id"
    bronze = DeltaTable(cfg.lake.table("bronze", "readings")).to_pandas()
    assert len(bronze) == len(history) + 1 + len(fresh)  # every valid record, the duplicate too
    landed = bronze.drop_duplicates("event_id")
    landed["event_time"] = pd.to_datetime(landed.event_time, utc=True)

    at = NOW + timedelta(seconds=1)
    with TestClient(create_app(cfg, poll=False), base_url="http://localhost") as http:
        for sensor in SENSORS:
            answer = http.get(f"/features/sensor/{sensor}", params={"at": at.isoformat()})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["merged"]["features"] == pytest.approx(expected_features(landed, sensor, at)), sensor
            assert body["increments"]["rows_merged"] > 0  # the fresh readings came through the speed layer
        assigned = http.post("/assign", json={"points": [{"temperature": 31.0, "humidity": 20.0}, {"temperature": 12.0, "humidity": 80.0}]})
        assert assigned.status_code == 200, assigned.text
        clusters = [a["cluster"] for a in assigned.json()["assignments"]]
        assert clusters[0] != clusters[1]  # the two climates are told apart

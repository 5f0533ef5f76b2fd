"""Broker restart under the running speed layer (real broker, Spark, Delta): nothing is lost or
counted twice."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from speed_process import app_config, kill, rows, start, terminate, total, wait_for

from lambda_ml import contract, producer
from lambda_ml_cli import stack
from lambda_ml_apps.ctr import generator
from lambda_ml.config import PlatformConfig

NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)


@pytest.mark.integration
@pytest.mark.slow
def test_a_broker_restart_mid_stream_loses_and_doubles_nothing(running_stack: PlatformConfig, tmp_path: Path) -> None:
    cfg, config_file = app_config(running_stack, "ctr-speed-faults", tmp_path, "faults")
    gen = cfg.generator.model_copy(update={"impressions": 1000, "seed": 17, "span_hours": 6})
    records, truth = generator.generate(gen, timedelta(minutes=cfg.ctr.attribution_window_minutes), NOW)
    half = len(records) // 2
    tables = [cfg.lake.table("bronze", "impressions"), cfg.lake.table("bronze", "clicks"), cfg.lake.table("quarantine")]
    user_increments = cfg.lake.table(*contract.increments_table("user"))
    log = tmp_path / "speed.log"
    broker = stack.KafkaBroker(running_stack)

    producer.produce(cfg, records[:half], progress=False)
    process = start(config_file, log, ["ingest", "increments"])
    try:
        wait_for(lambda: sum(max(0, rows(t)) for t in tables) >= half, process, log)
        assert broker.stop()
        time.sleep(5)  # the stream polls a broker that is down
        assert process.poll() is None, log.read_text()[-4000:]
        broker.start()  # the same port and log directory: the topics and their offsets survive
        producer.produce(cfg, records[half:], progress=False)
        wait_for(
            lambda: sum(max(0, rows(t)) for t in tables) >= len(records) and total(user_increments, "clicks") >= truth.positives,
            process,
            log,
        )
        assert terminate(process, log) == 0
    finally:
        if process.poll() is None:
            kill(process)
        broker.start()  # no-op if it is up: later tests need it

    assert [rows(t) for t in tables] == [truth.impressions, truth.clicks_sent, truth.malformed_total]
    for entity in cfg.features.entities:
        path = cfg.lake.table(*contract.increments_table(entity))
        assert (total(path, "impressions"), total(path, "clicks")) == (truth.impressions, truth.positives), entity

"""The speed-layer application as a process: several checkpointed queries, SIGTERM lets the
running micro-batch finish, a restart resumes from the checkpoints (real broker, Spark, Delta)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from deltalake import DeltaTable
from speed_process import app_config, batches, kill, rows, start, terminate, total, wait_for

from lambda_ml import catalog, contract, producer
from lambda_ml_cli import cli
from lambda_ml_apps.ctr import generator
from lambda_ml.config import PlatformConfig, write_config
from lambda_ml_cli.submit import run_submit
from speed_layer import app

NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)


def test_the_application_entry_point_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        app.main(["--help"])
    assert done.value.code == 0
    assert "usage: speed_layer/app.py" in capsys.readouterr().out


# A process holding the ingest query's checkpoint, as a running speed layer does.
HOLD_INGEST = """
import sys, time
from lambda_ml.config import load_config
from speed_layer import app
with app.checkpoint_locks(load_config(sys.argv[1]), ["ingest"]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_process_cannot_run_a_query_on_a_checkpoint_in_use(
    cfg: PlatformConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = cfg.model_copy(update={"lake": cfg.lake.model_copy(update={"checkpoints": str(tmp_path / "checkpoints")})})
    config_file = write_config(local, tmp_path / "platform.yaml")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_INGEST, str(config_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(app.CheckpointInUse, match=rf"query ingest: its checkpoint .* in use by another speed layer \(PID {holder.pid}\)"):
            with app.checkpoint_locks(local, ["labels", "ingest"]):
                pass
        # The failed attempt let go of the lock it had taken; other queries stay free.
        with app.checkpoint_locks(local, ["labels", "increments"]):
            pass
        # The command says so and exits before starting Spark.
        assert cli.main(["--config", str(config_file), "speed", "run", "--query", "ingest"]) == 1
        assert f"in use by another speed layer (PID {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    with app.checkpoint_locks(local, ["ingest"]):
        assert (tmp_path / "checkpoints" / "ingest.lock").read_text().strip() == str(os.getpid())


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_kill_9_and_restarts_neither_lose_nor_double_an_event(running_stack: PlatformConfig, tmp_path: Path) -> None:
    """Three runs of the whole application: stopped by SIGTERM mid-stream (every planned
    micro-batch is committed), killed with -9 mid-stream, then resumed with spark-submit until
    drained. Bronze,
    the labels and the feature increments equal the generator's ground truth exactly."""
    cfg, config_file = app_config(running_stack, "ctr-speed-app", tmp_path, "speedapp")
    gen = cfg.generator.model_copy(update={"impressions": 1200, "seed": 5, "span_hours": 6})
    records, truth = generator.generate(gen, timedelta(minutes=cfg.ctr.attribution_window_minutes), NOW)
    parts = [records[: len(records) // 3], records[len(records) // 3 : 2 * len(records) // 3], records[2 * len(records) // 3 :]]
    bronze = {name: cfg.lake.table("bronze", name) for name in ("impressions", "clicks")}
    bronze["quarantine"] = cfg.lake.table("quarantine")
    user_increments = cfg.lake.table(*contract.increments_table("user"))
    queries = list(app.queries(cfg))
    log = tmp_path / "speed.log"

    def landed() -> int:
        return sum(max(0, rows(path)) for path in bronze.values())

    # Run 1: SIGTERM while records keep arriving.
    producer.produce(cfg, parts[0], progress=False)
    process = start(config_file, log, queries)
    try:
        wait_for(lambda: landed() >= len(parts[0]) and total(user_increments, "impressions") > 0, process, log)
        producer.produce(cfg, parts[1][:300], progress=False)
        assert terminate(process, log) == 0, log.read_text()[-4000:]
    finally:
        if process.poll() is None:
            kill(process)
    text = log.read_text()
    assert "received SIGTERM" in text
    for name in queries:
        # Every planned micro-batch was committed: none was cut short by the stop.
        folder = Path(app.checkpoint(cfg, name))
        assert batches(folder / "offsets"), f"no micro-batch ran for {name}"
        assert batches(folder / "offsets") == batches(folder / "commits"), name
        assert f"query {name} stopped between micro-batches" in text
    # The join's state lives in RocksDB: its changelog files (changelog checkpointing) or zipped
    # snapshots with SST files, never the HDFS-backed store's deltas.
    state = Path(app.checkpoint(cfg, "labels")) / "state"
    rocksdb = any(state.rglob("*.changelog")) or (any(state.rglob("*.zip")) and any(state.rglob("*.sst")))
    assert rocksdb and not any(state.rglob("*.delta"))

    # Run 2: kill -9 in the middle of the stream.
    producer.produce(cfg, parts[1][300:], progress=False)
    process = start(config_file, log, queries)
    try:
        wait_for(lambda: landed() > len(parts[0]) + 300, process, log)
        producer.produce(cfg, parts[2][:500], progress=False)
        time.sleep(2)
    finally:
        kill(process)

    # Run 3: resume from the checkpoints through spark-submit, drain what Kafka holds and stop.
    producer.produce(cfg, parts[2][500:], progress=False)
    assert run_submit(cfg, "speed_layer/app.py", ["--config", str(config_file), "--available-now"]) == 0

    assert rows(bronze["impressions"]) == truth.impressions
    assert rows(bronze["clicks"]) == truth.clicks_sent
    assert rows(bronze["quarantine"]) == truth.malformed_total
    offsets = set()
    for path in bronze.values():
        table = DeltaTable(path).to_pyarrow_table(columns=["kafka_topic", "kafka_partition", "kafka_offset"]).to_pylist()
        offsets |= {(r["kafka_topic"], r["kafka_partition"], r["kafka_offset"]) for r in table}
    assert len(offsets) == len(records)  # every Kafka record once, none twice
    # Feature totals: each impression once, each click within the attribution window once.
    for entity in cfg.features.entities:
        path = cfg.lake.table(*contract.increments_table(entity))
        assert (total(path, "impressions"), total(path, "clicks")) == (truth.impressions, truth.positives), entity
    # Labels: every click within the window made its impression positive, once.
    labels = DeltaTable(cfg.lake.table(*catalog.SILVER_LABELS_TABLE)).to_pyarrow_table(columns=["event_id", "label"]).to_pylist()
    assert len({r["event_id"] for r in labels}) == len(labels)
    assert sum(r["label"] for r in labels) == truth.positives

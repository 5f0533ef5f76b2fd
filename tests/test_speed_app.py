"""The speed-layer application as a process: several checkpointed queries, SIGTERM lets the
running micro-batch finish, a restart resumes from the checkpoints (real broker, Spark, Delta)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from deltalake import DeltaTable
from support import isolated

from lambda_ml import generator, stack
from lambda_ml.config import PROJECT_ROOT, PlatformConfig, write_config
from speed_layer import app

NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)


def _rows(path: str) -> int:
    try:
        return DeltaTable(path).to_pyarrow_table(columns=["kafka_offset"]).num_rows
    except Exception:  # the table does not exist yet
        return -1


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the speed layer exited with {process.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out; speed layer log:\n{log.read_text()[-4000:]}"
        time.sleep(1)


def _start(config_file: Path, log: Path, queries: list[str]) -> subprocess.Popen[bytes]:
    args = [sys.executable, str(PROJECT_ROOT / "speed_layer" / "app.py"), "--config", str(config_file)]
    for name in queries:
        args += ["--query", name]
    with log.open("ab") as out:
        # Its own process group, so that the finally below can stop the JVM child as well.
        return subprocess.Popen(args, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _terminate(process: subprocess.Popen[bytes], log: Path) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError(f"no exit within 120 s of SIGTERM:\n{log.read_text()[-4000:]}") from None


def _batches(folder: Path) -> set[int]:
    return {int(p.name) for p in folder.iterdir() if p.name.isdigit()} if folder.exists() else set()


@pytest.mark.integration
@pytest.mark.slow
def test_sigterm_finishes_the_micro_batch_and_a_restart_resumes(running_stack: PlatformConfig, tmp_path: Path) -> None:
    cfg = isolated(running_stack, "ctr-speed-app", lake_root=tmp_path / "lake", topic_prefix="speedapp")
    cfg = cfg.model_copy(update={"speed": cfg.speed.model_copy(update={"trigger_seconds": 1.0})})
    config_file = write_config(cfg, tmp_path / "platform.yaml")
    stack.create_topics(cfg)
    records, truth = generator.generate(cfg.generator.model_copy(update={"impressions": 2000, "seed": 5}), timedelta(minutes=30), NOW)
    half = len(records) // 2
    bronze = {name: cfg.lake.table("bronze", name) for name in ("impressions", "clicks")}
    bronze["quarantine"] = cfg.lake.table("quarantine")
    queries = ["ingest"]
    log = tmp_path / "speed.log"

    def landed() -> int:
        return sum(max(0, _rows(path)) for path in bronze.values())

    generator.produce(cfg, records[:half], progress=False)
    process = _start(config_file, log, queries)
    try:
        _wait_for(lambda: landed() >= half, process, log)
        # More records while it runs: SIGTERM may arrive in the middle of their micro-batch.
        generator.produce(cfg, records[half : half + 200], progress=False)
        assert _terminate(process, log) == 0, log.read_text()[-4000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = log.read_text()
    assert "received SIGTERM" in text
    for name in queries:
        # Every planned micro-batch was committed: none was cut short by the stop.
        folder = Path(app.checkpoint(cfg, name))
        assert _batches(folder / "offsets"), f"no micro-batch ran for {name}"
        assert _batches(folder / "offsets") == _batches(folder / "commits")
        assert f"query {name} stopped between micro-batches" in text

    generator.produce(cfg, records[half + 200 :], progress=False)
    process = _start(config_file, log, queries)
    try:
        _wait_for(lambda: landed() >= len(records), process, log)
        assert _terminate(process, log) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)

    assert _rows(bronze["impressions"]) == truth.impressions
    assert _rows(bronze["clicks"]) == truth.clicks_sent
    assert _rows(bronze["quarantine"]) == truth.malformed_total
    offsets = set()
    for path in bronze.values():
        table = DeltaTable(path).to_pyarrow_table(columns=["kafka_topic", "kafka_partition", "kafka_offset"]).to_pylist()
        offsets |= {(r["kafka_topic"], r["kafka_partition"], r["kafka_offset"]) for r in table}
    assert len(offsets) == len(records)  # every Kafka record once, none twice

"""Helpers of the speed-layer process tests: start the application as a process, stop it by PID
(SIGTERM, or kill -9 of its process group), and read its Delta tables without Spark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from deltalake import DeltaTable
from support import isolated

from lambda_ml_cli import stack
from lambda_ml.config import PROJECT_ROOT, PlatformConfig, write_config


def app_config(running_stack: PlatformConfig, model: str, tmp_path: Path, topic_prefix: str) -> tuple[PlatformConfig, Path]:
    """A config of its own for one application test (lake under ``tmp_path``, own topics,
    created), micro-batches every second, no MLflow reporting; and the file it is written to."""
    cfg = isolated(running_stack, model, lake_root=tmp_path / "lake", topic_prefix=topic_prefix)
    cfg = cfg.model_copy(update={"speed": cfg.speed.model_copy(update={"trigger_seconds": 1.0, "report_to_mlflow": False})})
    config_file = write_config(cfg, tmp_path / "platform.yaml")
    stack.create_topics(cfg)
    return cfg, config_file


def rows(path: str) -> int:
    """Rows of a bronze or quarantine table, -1 before it exists."""
    try:
        return DeltaTable(path).to_pyarrow_table(columns=["kafka_offset"]).num_rows
    except Exception:  # the table does not exist yet
        return -1


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, timeout_s: float = 240) -> None:
    """Poll ``condition`` every second; fail with the application's log if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the speed layer exited with {process.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out; speed layer log:\n{log.read_text()[-4000:]}"
        time.sleep(1)


def start(config_file: Path, log: Path, queries: list[str]) -> subprocess.Popen[bytes]:
    """``speed_layer/app.py`` with these queries, its output appended to ``log``."""
    args = [sys.executable, str(PROJECT_ROOT / "speed_layer" / "app.py"), "--config", str(config_file)]
    for name in queries:
        args += ["--query", name]
    with log.open("ab") as out:
        # Its own process group, so that kill() stops the JVM child as well.
        return subprocess.Popen(args, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def terminate(process: subprocess.Popen[bytes], log: Path) -> int:
    """SIGTERM to the driver; its exit code (kill -9 of the group and a failure after 120 s)."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError(f"no exit within 120 s of SIGTERM:\n{log.read_text()[-4000:]}") from None


def batches(folder: Path) -> set[int]:
    """Micro-batch ids logged in a checkpoint's ``offsets`` or ``commits`` folder."""
    return {int(p.name) for p in folder.iterdir() if p.name.isdigit()} if folder.exists() else set()


def kill(process: subprocess.Popen[bytes]) -> None:
    """kill -9 the application and its JVM (its whole process group), as a crash would."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def total(path: str, column: str) -> float:
    """Sum of a column of a Delta table, -1 before it exists."""
    try:
        return float(sum(v for v in DeltaTable(path).to_pyarrow_table(columns=[column]).column(column).to_pylist() if v is not None))
    except Exception:  # no table yet
        return -1.0

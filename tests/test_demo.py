"""The demo as a user runs it (``lambda-ml --config FILE demo``), end to end on small sizes, on
the session's broker and MLflow server with its own lake, topics and registered model; its
summary is checked against the registry and the lake read independently."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from lambda_ml import contract
from lambda_ml.config import LrGridConfig, PlatformConfig, SearchConfig, write_config
from lambda_ml_apps.ctr.demo import CtrDemo
from lambda_ml_apps.ctr.events import LABELS_FINAL_UNTIL
from lambda_ml_cli import stack
from tests.conftest import free_port
from tests.support import isolated


def _summary(stdout: str) -> dict[str, str]:
    """The summary's ``name: value`` lines (continuation lines joined to the one before)."""
    lines: dict[str, str] = {}
    last = None
    for line in stdout.split("=== lambda-ml demo summary", 1)[1].splitlines()[1:]:
        if m := re.match(r"^([a-zA-Z ()]+):\s{2,}(.*)$", line):
            last = m.group(1).strip()
            lines[last] = m.group(2)
        elif last is not None and line.startswith(" " * 10):
            lines[last] += " " + line.strip()
    return lines


@pytest.mark.integration
@pytest.mark.slow
def test_the_demo_runs_end_to_end_and_its_summary_is_true(running_stack: PlatformConfig, tmp_path: Path) -> None:
    cfg = isolated(running_stack, "demo-ctr", tmp_path / "lake", topic_prefix="demo")
    cfg = cfg.model_copy(
        update={
            "generator": cfg.generator.model_copy(update={"impressions": 3000, "users": 60, "items": 20, "span_hours": 6}),
            # One model fitted, no hyper-parameter search: the demo's path is what is tested.
            "ctr": cfg.ctr.model_copy(update={"search": SearchConfig(lr=LrGridConfig(reg_param=(), elastic_net_param=()))}),
            # Micro-batches every second, and the service looking for a new champion and new
            # views every second: the demo's waits for fresh events to reach serving and for the
            # online model's update are mostly these intervals.
            "speed": cfg.speed.model_copy(update={"trigger_seconds": 1.0}),
            "serving": cfg.serving.model_copy(update={"port": free_port(), "poll_interval_s": 1.0, "views_refresh_s": 1.0}),
        }
    )
    config_file = write_config(cfg, tmp_path / "demo.yaml")
    try:
        code, printed, logged = _run_demo(config_file, tmp_path / "first")
        assert code == 0, printed[-3000:] + logged[-5000:]
        _check_first_run(cfg, printed, logged)
        # A second run soon after: it keeps the speed layer and the service the first left
        # running (the same processes), which land its events and swap in its champion.
        left = _summary(printed)["speed layer"]
        code, printed, logged = _run_demo(config_file, tmp_path / "second")
        assert code == 0, printed[-3000:] + logged[-5000:]
        _check_second_run(cfg, left, printed, logged)
    finally:
        stopped = [part.stop() for part in (stack.ServingProcess(cfg), stack.SpeedProcess(cfg))]
    assert stopped == [True, True], "the demo leaves its service and speed layer running"


def _run_demo(config_file: Path, base: Path) -> tuple[int, str, str]:
    """``lambda-ml --config FILE demo`` as a user runs it: exit code, stdout, stderr."""
    out, err = base.with_suffix(".out"), base.with_suffix(".log")
    try:
        with out.open("w") as stdout, err.open("w") as stderr:
            # Its progress goes to the log file as it happens: a slow or stuck step shows there.
            code = subprocess.run(
                [sys.executable, "-m", "lambda_ml_cli.cli", "--config", str(config_file), "demo"],
                stdout=stdout, stderr=stderr, text=True, timeout=1500,
            ).returncode  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the demo did not end within 25 min; its log ends with:\n" + err.read_text()[-5000:])
    return code, out.read_text(), err.read_text()


def _check_first_run(cfg: PlatformConfig, printed: str, logged: str) -> None:
    from mlflow import MlflowClient

    summary = _summary(printed)

    # Every step said it started and ended, in order.
    steps = re.findall(r"\[(\d+)/(\d+)\] .*: done in", logged)
    assert [int(n) for n, _ in steps] == list(range(1, int(steps[0][1]) + 1))

    # The model it names is the registry's champion, and the speed model stepped from it.
    client = MlflowClient(cfg.mlflow.tracking_uri)
    champion = client.get_model_version_by_alias(cfg.mlflow.registered_model, "champion")
    assert summary["model"].startswith(f"{cfg.mlflow.registered_model} version {champion.version}")
    assert re.match(rf"[1-9]\d* update\(s\) since champion v{champion.version} ", summary["speed model"]), summary["speed model"]
    assert "counted by serving after" in summary["fresh events"], summary["fresh events"]

    # The summary counts bronze as the batch run pinned it (the fresh events came after): read
    # here with another Delta reader at the champion's horizon.
    bronze = {
        name: len(DeltaTable(cfg.lake.table("bronze", name), version=int(champion.tags[contract.horizon_tag(name)])).to_pyarrow_table())
        for name in cfg.events.types
    }
    assert summary["bronze (all runs)"] == ", ".join(f"{n} {name}" for name, n in bronze.items())
    assert bronze["impressions"] == 3000  # every generated impression once, duplicates dropped

    # One prediction, a probability, from the champion.
    answer = json.loads(summary["one request"].split("-> ", 1)[1])
    (prediction,) = answer["predictions"]
    assert 0.0 < prediction["probability"] < 1.0
    assert answer["model"]["version"] == int(champion.version)

    # The champion's run says up to when its training labels were final: the attribution window
    # before the newest event at its horizon (read here from bronze). A run soon after this one
    # would train on these fresh events: it says the online model cannot step yet, and when.
    tables = [DeltaTable(cfg.lake.table("bronze", name), version=int(champion.tags[contract.horizon_tag(name)])) for name in cfg.events.types]
    newest = max(pc.max(t.to_pyarrow_table(columns=["event_time"])["event_time"]).as_py() for t in tables)
    final_until = newest - timedelta(minutes=cfg.ctr.attribution_window_minutes)
    assert client.get_run(champion.run_id).data.params[LABELS_FINAL_UNTIL] == final_until.isoformat()
    script = CtrDemo()
    assert script.update_pending(cfg, datetime.now(UTC)) is None  # this run's fresh events closed labels after it
    delay = timedelta(minutes=cfg.ctr.attribution_window_minutes + cfg.speed.watermark_minutes)
    pending = script.update_pending(cfg, final_until + delay)
    assert pending is not None and f"champion v{champion.version}" in pending and f"{final_until:%H:%M} UTC" in pending
    assert script.update_pending(cfg, final_until + delay + timedelta(minutes=cfg.speed.online.step_minutes + 1)) is None

    # It ends with verify's four checks on what it left, all passed.
    assert re.search(r"^  verify \S+: 4 check\(s\) in \d+ s, all passed$", printed, flags=re.M), printed[-3000:]


def _check_second_run(cfg: PlatformConfig, first_speed_layer: str, printed: str, logged: str) -> None:
    from mlflow import MlflowClient

    summary = _summary(printed)
    steps = re.findall(r"\[(\d+)/(\d+)\] .*: done in", logged)
    assert [int(n) for n, _ in steps] == list(range(1, int(steps[0][1]) + 1))
    # The same speed-layer process as the first run left (its pid in both summaries), not restarted.
    pid = re.match(r"running \(pid (\d+)\)", first_speed_layer)
    assert pid is not None and summary["speed layer"].startswith(f"running (pid {pid.group(1)})"), summary["speed layer"]
    assert f"running since an earlier demo (pid {pid.group(1)}): wait until it has read these events: done in" in logged
    assert "starting the speed layer" not in logged and "starting prediction service" not in logged

    # The model this run registered has the alias the gate gave it (champion, or challenger when
    # the first run's stays better); the kept service answers with the registry's champion, and
    # the counts are bronze's at the new model's horizon.
    client = MlflowClient(cfg.mlflow.tracking_uri)
    champion = client.get_model_version_by_alias(cfg.mlflow.registered_model, "champion")
    registered = re.match(rf"{cfg.mlflow.registered_model} version (\d+)(?:, .*)? \(alias (champion|challenger)\)$", summary["model"])
    assert registered is not None, summary["model"]
    new = client.get_model_version_by_alias(cfg.mlflow.registered_model, registered.group(2))
    assert new.version == registered.group(1) and (champion.version == new.version) == (registered.group(2) == "champion")
    answer = json.loads(summary["one request"].split("-> ", 1)[1])
    assert answer["model"]["version"] == int(champion.version)
    bronze = {
        name: len(DeltaTable(cfg.lake.table("bronze", name), version=int(new.tags[contract.horizon_tag(name)])).to_pyarrow_table())
        for name in cfg.events.types
    }
    assert summary["bronze (all runs)"] == ", ".join(f"{n} {name}" for name, n in bronze.items())
    assert bronze["impressions"] > 3000  # the first run's, its fresh events and this run's
    assert "counted by serving after" in summary["fresh events"], summary["fresh events"]
    # A new champion learned labels later than this run's fresh events can close (the first
    # run's fresh events): the summary says when the online model can step instead of waiting.
    # A champion kept from the first run has the updates the running speed layer made from it.
    if registered.group(2) == "champion":
        assert summary["speed model"].startswith(f"no update yet from champion v{champion.version}"), summary["speed model"]
    else:
        assert re.match(rf"[1-9]\d* update\(s\) since champion v{champion.version} ", summary["speed model"]), summary["speed model"]
    assert re.search(r"^  verify \S+: 4 check\(s\) in \d+ s, all passed$", printed, flags=re.M), printed[-3000:]

"""The embedded stack: topics as configured, status, process handling, set-up messages."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lambda_ml import jvm
from lambda_ml_cli import stack
from lambda_ml.config import PlatformConfig


@pytest.mark.integration
def test_topics_have_the_configured_partitions_retention_and_compaction(running_stack: PlatformConfig) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    cfg = running_stack
    topics = cfg.kafka.topics
    wanted = [cfg.events.topic("impressions"), cfg.events.topic("clicks"), topics.model_updates, topics.predictions]
    admin = KafkaAdminClient(bootstrap_servers=cfg.kafka.bootstrap_servers)
    try:
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics([t.name for t in wanted])}
        assert described == {t.name: t.partitions for t in wanted}
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t.name) for t in wanted])["topic"]
        found = {name: (c["cleanup.policy"]["value"], c["retention.ms"]["value"]) for name, c in configs.items()}
    finally:
        admin.close()
    assert found == {
        cfg.events.topic("impressions").name: ("delete", "604800000"),
        cfg.events.topic("clicks").name: ("delete", "604800000"),
        cfg.kafka.topics.model_updates.name: ("compact", "-1"),
        cfg.kafka.topics.predictions.name: ("delete", "604800000"),
    }
    assert stack.create_topics(cfg) == []  # a second `stack up` creates nothing


@pytest.mark.integration
def test_status_reports_pids_and_readiness(running_stack: PlatformConfig) -> None:
    report = stack.status(running_stack)
    assert report["kafka"]["ready"] is True and isinstance(report["kafka"]["pid"], int)
    assert report["mlflow"]["ready"] is True and isinstance(report["mlflow"]["pid"], int)
    assert report["serving"]["pid"] is None
    stack.up(running_stack)  # idempotent: both already running, nothing restarted
    assert stack.status(running_stack)["kafka"]["pid"] == report["kafka"]["pid"]


def test_managed_process_stops_its_whole_group_by_pid(tmp_path: Path) -> None:
    process = stack.ManagedProcess("sleeper", tmp_path)
    # A parent that starts a child: stopping must end both.
    pid = process.start([sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"])
    assert process.pid() == pid
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    assert process.stop(timeout_s=10) is True
    assert process.pid() is None and not process.pid_file.exists()
    for child in children:
        assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert process.stop() is False  # stopping a stopped process is a no-op


def test_a_running_process_is_kept_only_when_it_would_be_started_the_same_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What lets a second demo keep the speed layer and the service the first one left: the same
    command, the same LAMBDA_ML__ overrides, a config file older than the process."""
    config = tmp_path / "platform.yaml"
    config.write_text("{}\n")
    os.utime(config, (time.time() - 60, time.time() - 60))
    monkeypatch.setenv("LAMBDA_ML__SERVING__PORT", "18000")
    process = stack.ManagedProcess("sleeper", tmp_path)
    command = [sys.executable, "-c", "import time; time.sleep(300)", str(config)]
    assert process.running_as(command, str(config)) is None  # not started
    pid = process.start(command)
    try:
        assert process.running_as(command, str(config)) == pid
        assert process.running_as([*command, "--other"], str(config)) is None
        monkeypatch.setenv("LAMBDA_ML__SERVING__PORT", "18001")
        assert process.running_as(command, str(config)) is None
        monkeypatch.setenv("LAMBDA_ML__SERVING__PORT", "18000")
        assert process.running_as(command, str(config)) == pid
        config.write_text("{}\n")  # edited after the process started
        assert process.running_as(command, str(config)) is None
    finally:
        process.stop(timeout_s=10)
    assert process.running_as(command, None) is None


def test_a_wait_says_what_was_awaited_when_it_times_out_or_the_process_exits(tmp_path: Path) -> None:
    """A wait other than a start (the demo's wait for a running service to swap a model in)
    names its own goal, not a start-up, on both ways it can fail."""
    process = stack.ManagedProcess("service", tmp_path)
    process.start([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(300)"])
    try:
        with pytest.raises(stack.StackError) as timed_out:
            stack.wait_until(lambda: False, 1, "the service (pid 1)", process, goal="swap in version 4")
        assert str(timed_out.value).startswith("the service (pid 1) did not swap in version 4 in 1 s; see ")
        assert "up" in str(timed_out.value)  # the log's last lines
    finally:
        process.stop(timeout_s=10)
    with pytest.raises(stack.StackError, match=r"^the service \(pid 1\) exited before it could swap in version 4; last log lines of "):
        stack.wait_until(lambda: False, 5, "the service (pid 1)", process, goal="swap in version 4")
    with pytest.raises(stack.StackError, match=r"^Kafka broker exited before it could become ready; "):
        stack.wait_until(lambda: False, 5, "Kafka broker", process)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def test_stack_down_stops_a_service_started_by_hand_from_the_project_and_nothing_else(tmp_path: Path) -> None:
    """``python -m serving_layer`` started by hand (no PID file) from the project's folder is
    reported by ``stack status`` and stopped by ``stack down`` (what ``make stop`` runs); the
    same service started from another folder, on another port, is left alone."""
    from lambda_ml.config import DEFAULT_CONFIG, PROJECT_ROOT, load_config, write_config

    nowhere = _free_port()  # no registry nor broker: the service starts and answers 503

    def service_config(name: str) -> tuple[PlatformConfig, Path]:
        cfg = load_config(DEFAULT_CONFIG, env={}, overrides={
            "data_dir": str(tmp_path / "data"), "lake.root": str(tmp_path / "lake"), "serving.port": _free_port(),
            "mlflow.tracking_uri": f"http://127.0.0.1:{nowhere}", "kafka.bootstrap_servers": f"127.0.0.1:{nowhere}",
            "serving.prediction_log.enabled": False, "serving.model_updates": False,
        })  # fmt: skip
        return cfg, write_config(cfg, tmp_path / f"{name}.yaml")

    ours_cfg, ours_file = service_config("ours")
    theirs_cfg, theirs_file = service_config("theirs")
    started: dict[str, subprocess.Popen[bytes]] = {}
    for name, file, folder in (("ours", ours_file, PROJECT_ROOT), ("theirs", theirs_file, tmp_path)):
        with (tmp_path / f"{name}.log").open("wb") as out:
            started[name] = subprocess.Popen(
                [sys.executable, "-m", "serving_layer", "--config", str(file)], cwd=folder, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
            )  # fmt: skip
    try:
        for name, cfg in (("ours", ours_cfg), ("theirs", theirs_cfg)):
            deadline = time.monotonic() + 90
            while not _answers(f"{stack.ServingProcess(cfg).url}/health"):
                assert started[name].poll() is None, (tmp_path / f"{name}.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / f"{name}.log").read_text()
                time.sleep(0.5)
        assert [p.pid for p in stack.hand_started_services(theirs_cfg)] == []  # not from the project's folder
        assert stack.status(ours_cfg)["serving"]["pid"] == started["ours"].pid
        assert stack.down(theirs_cfg) == [] and started["theirs"].poll() is None
        stopped = stack.down(ours_cfg)
        assert stopped == [f"prediction service started by hand (pid {started['ours'].pid}: {sys.executable} -m serving_layer --config {ours_file})"]
        assert started["ours"].wait(timeout=5) is not None and started["theirs"].poll() is None
        assert stack.down(ours_cfg) == []
    finally:
        for process in started.values():
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=20)


def test_setup_names_missing_java_and_maven(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: neither java nor mvn
    with pytest.raises(jvm.SetupError, match=r"^java and mvn not found on PATH: install OpenJDK 17 and Maven"):
        jvm.require_tools()


def test_missing_jars_say_how_to_resolve_them(cfg: PlatformConfig, tmp_path: Path) -> None:
    empty = cfg.model_copy(update={"jvm": cfg.jvm.model_copy(update={"dir": tmp_path / "jvm"})})
    with pytest.raises(jvm.SetupError, match="run `lambda-ml setup`"):
        jvm.resolved_jars(empty, jvm.SPARK_JARS)


@pytest.mark.integration
@pytest.mark.slow
def test_the_demo_speed_layer_runs_in_the_background_until_stack_down(running_stack: PlatformConfig, tmp_path: Path) -> None:
    """``SpeedProcess`` (what the demo leaves running) starts the application with the given
    config and queries, lands every event sent to it, shows in the status, and ``stack down``
    stops it by its PID with SIGTERM: it finishes its micro-batch and exits cleanly."""
    from datetime import timedelta

    from speed_process import rows
    from support import isolated

    from lambda_ml import producer
    from lambda_ml_apps.ctr import generator
    from lambda_ml.config import write_config

    cfg = isolated(running_stack, "ctr-speed-bg", lake_root=tmp_path / "lake", topic_prefix="speedbg")
    # A data directory of its own: `down` finds only this speed layer there, not the session's stack.
    cfg = cfg.model_copy(update={"data_dir": tmp_path / "data", "speed": cfg.speed.model_copy(update={"trigger_seconds": 1.0, "report_to_mlflow": False})})
    config_file = write_config(cfg, tmp_path / "platform.yaml")
    stack.create_topics(cfg)
    gen = cfg.generator.model_copy(update={"impressions": 300, "seed": 3, "malformed_fraction": 0.0})
    records, truth = generator.generate(gen, timedelta(minutes=cfg.ctr.attribution_window_minutes))
    producer.produce(cfg, records, progress=False)

    speed = stack.SpeedProcess(cfg)
    pid = speed.start(str(config_file), ["ingest"])
    try:
        assert stack.status(cfg)["speed"]["pid"] == pid
        bronze = [cfg.lake.table("bronze", name) for name in ("impressions", "clicks")]
        deadline = time.monotonic() + 180
        while sum(max(0, rows(path)) for path in bronze) < truth.valid_records and time.monotonic() < deadline:
            time.sleep(1)
        assert sum(rows(path) for path in bronze) == truth.valid_records
        assert stack.down(cfg) == ["speed layer"]  # the session's broker and MLflow live elsewhere
    finally:
        speed.stop()
    assert speed.process.pid() is None and not speed.process.pid_file.exists()
    assert stack.group_members(pid) == []  # its Spark JVM is gone too: nothing left in its group
    # SIGTERM reached the driver alone, which stopped its queries before its JVM went.
    text = speed.process.log_file.read_text()
    assert "received SIGTERM" in text and "speed layer stopped" in text

"""Batch jobs on a real Spark standalone cluster: a master and one worker started from the
pyspark install on loopback, the training job sent to it with ``spark-submit``, both stopped
by PID afterwards (also when a test fails)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

from lambda_ml import contract
from lambda_ml_apps.ctr import generator
from lambda_ml_cli.cluster import ClusterSpec, StandaloneCluster
from lambda_ml.config import PlatformConfig, write_config
from lambda_ml_cli.submit import run_submit
from conftest import free_port
from speed_layer import ingest
from support import isolated

KAFKA_RECORD = "key binary, value binary, topic string, partition int, offset long, timestamp timestamp"


def loopback_spec() -> ClusterSpec:
    """One core and 1 GB (one executor's worth) on four distinct free loopback ports."""
    ports: list[int] = []
    while len(ports) < 4:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ClusterSpec(port=ports[0], webui_port=ports[1], worker_port=ports[2], worker_webui_port=ports[3], cores=1, memory="1g")


def accepts_connections(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneCluster]:
    cluster = StandaloneCluster(tmp_path_factory.mktemp("spark-cluster"), loopback_spec())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_cluster_spec_rejects_clashing_ports_and_no_cores() -> None:
    with pytest.raises(ValueError, match="four ports must be distinct"):
        ClusterSpec(port=7077, webui_port=7077)
    with pytest.raises(ValueError, match="at least one core"):
        ClusterSpec(cores=0)


@pytest.mark.integration
def test_cluster_starts_on_loopback_and_stops_by_pid(tmp_path: Path) -> None:
    cluster = StandaloneCluster(tmp_path / "cluster", loopback_spec())
    try:
        cluster.start()
        status = cluster.status()
        assert (status["ready"], status["alive_workers"], status["cores"]) == (True, 1, 1)
        master_pid, worker_pid = cluster.master.pid(), cluster.worker.pid()
        assert isinstance(master_pid, int) and isinstance(worker_pid, int)
        state = cluster.master_state()
        assert state is not None and state["url"] == cluster.master_url
        (worker,) = state["workers"]
        assert (worker["host"], worker["port"], worker["cores"], worker["memory"]) == ("127.0.0.1", cluster.spec.worker_port, 1, 1024)
        # Another handle on the same folder finds the ports and the PIDs.
        assert StandaloneCluster(tmp_path / "cluster").status()["master"]["pid"] == master_pid  # type: ignore[index]
        cluster.start()  # idempotent: nothing restarted
        assert (cluster.master.pid(), cluster.worker.pid()) == (master_pid, worker_pid)
    finally:
        stopped = cluster.stop()
    assert stopped == ["worker", "master"]
    assert cluster.master.pid() is None and cluster.worker.pid() is None
    assert not Path(f"/proc/{master_pid}").exists() and not Path(f"/proc/{worker_pid}").exists()
    assert not accepts_connections(cluster.spec.port) and not accepts_connections(cluster.spec.webui_port)
    assert cluster.stop() == []


def ingest_generated(spark: SparkSession, cfg: PlatformConfig, impressions: int, seed: int) -> None:
    """Generated events through the speed layer's own micro-batch function, in two batches:
    bronze versions 0 (about 80% of the records) and 1 (the rest)."""
    now = datetime.now(UTC) - timedelta(minutes=1)
    gen = cfg.generator.model_copy(update={"impressions": impressions, "seed": seed})
    records, _ = generator.generate(gen, timedelta(minutes=cfg.ctr.attribution_window_minutes), now)
    topics = cfg.events.topics()
    rows = [(r.key, r.value, topics[r.event_type].name, 0, offset, now) for offset, r in enumerate(records)]
    cut = len(rows) * 4 // 5
    for batch_id, batch in enumerate((rows[:cut], rows[cut:])):
        counts = ingest.ingest_batch(spark.createDataFrame(batch, KAFKA_RECORD), batch_id, cfg)
        assert counts.rows["impressions"] > 0 and counts.rows["clicks"] > 0


@pytest.mark.integration
@pytest.mark.slow
def test_batch_training_runs_on_the_standalone_cluster(
    running_stack: PlatformConfig, spark: SparkSession, standalone: StandaloneCluster, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    cfg = isolated(running_stack, "ctr-standalone", lake_root=tmp_path / "lake")
    ingest_generated(spark, cfg, impressions=4000, seed=23)
    config_file = write_config(cfg, tmp_path / "platform.yaml")

    job_args = ["--config", str(config_file), "--version", "impressions=0", "--version", "clicks=0"]
    assert run_submit(cfg, "batch_layer/train.py", job_args, master=standalone.master_url) == 0

    client = MlflowClient(cfg.mlflow.tracking_uri)
    versions = client.search_model_versions(f"name='{cfg.mlflow.registered_model}'")
    tagged = sorted(
        (v.tags[contract.TAG_FLAVOR], v.tags[contract.horizon_tag("impressions")], v.tags[contract.horizon_tag("clicks")])
        for v in versions
    )
    # Pinned at version 0 of both tables although version 1 is the latest.
    assert tagged == [("onnx", "0", "0"), ("spark", "0", "0")]
    champion = client.get_model_version_by_alias(cfg.mlflow.registered_model, contract.CHAMPION_ALIAS)
    assert champion.tags[contract.TAG_FLAVOR] == "onnx"
    assert client.get_run(champion.run_id).data.metrics["auc"] > 0.55

    # The job ran as an application of this cluster, with the worker's core, and finished.
    state = standalone.master_state()
    assert state is not None
    apps = [(a["name"], a["state"], a["cores"]) for a in state["completedapps"]]
    assert apps == [(f"{cfg.spark.app_name}-batch-train", "FINISHED", 1)]

"""Session fixtures: one real stack (Kafka broker in KRaft mode, MLflow server) on free
loopback ports, one Spark session with Delta, all under a temporary directory, all stopped at
the end. Nothing is skipped: if a component cannot start, the tests fail."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lambda_ml import jvm
from lambda_ml_cli import stack
from lambda_ml.config import PlatformConfig, load_config, write_config
from lambda_ml.logs import setup_logging


def _name_the_xdist_worker_main_file() -> None:
    """pytest-xdist runs each worker as ``python -c``: a ``__main__`` without a spec or a file,
    which pyspark takes for its own doctest runner. There, importing ``pyspark.sql.connect``
    (MLflow does, to tell a Spark Connect model from a classic one when it logs a Spark model)
    calls ``sys.exit(0)`` instead of raising the ImportError MLflow expects when Spark Connect's
    dependencies are not installed, and every Spark model logged later in that worker fails.
    The code a worker runs is xdist's ``remote`` module (sent as source): its file is the main
    module's file."""
    main = sys.modules["__main__"]
    if os.environ.get("PYTEST_XDIST_WORKER") and main.__spec__ is None and not hasattr(main, "__file__"):
        import xdist.remote

        main.__file__ = xdist.remote.__file__


_name_the_xdist_worker_main_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> PlatformConfig:
    """Platform config isolated under a temp dir, with free ports for every service."""
    setup_logging()
    root: Path = tmp_path_factory.mktemp("platform")
    kafka_port, controller_port, mlflow_port, serving_port = (free_port() for _ in range(4))
    config = load_config(
        overrides={
            "data_dir": str(root / "data"),
            "kafka.port": kafka_port,
            "kafka.controller_port": controller_port,
            "kafka.bootstrap_servers": f"127.0.0.1:{kafka_port}",
            "mlflow.port": mlflow_port,
            "mlflow.tracking_uri": f"http://127.0.0.1:{mlflow_port}",
            "serving.port": serving_port,
            "lake.root": str(root / "lake"),
            "lake.checkpoints": str(root / "checkpoints"),
            "spark.master": "local[2]",
        }
    )
    jvm.resolve_all(config)
    return config


@pytest.fixture(scope="session")
def config_file(cfg: PlatformConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test config written to a file, for child processes (spark-submit, the service)."""
    return write_config(cfg, tmp_path_factory.mktemp("conf") / "platform.yaml")


@pytest.fixture(scope="session")
def running_stack(cfg: PlatformConfig) -> Iterator[PlatformConfig]:
    """The real broker and MLflow server, started once for the session and stopped after."""
    try:
        stack.up(cfg)
        os.environ["MLFLOW_TRACKING_URI"] = cfg.mlflow.tracking_uri
        yield cfg
    finally:
        stack.down(cfg)


@pytest.fixture(scope="session")
def spark(cfg: PlatformConfig):  # type: ignore[no-untyped-def]
    """One Spark session (local[2], Delta, the platform's jars) for the whole test session."""
    from lambda_ml.spark import get_spark

    session = get_spark(cfg, "tests")
    try:
        yield session
    finally:
        session.stop()


# Fixtures that start a real component: a test using one (directly or through another fixture)
# is an integration test, so that `pytest -m "not integration"` runs the pure tests alone.
REAL_COMPONENT_FIXTURES = frozenset({"spark", "running_stack"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if REAL_COMPONENT_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)

"""The one Spark session factory every layer and every ``spark-submit`` entry point uses."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from pyspark.sql import SparkSession

from lambda_ml.config import PlatformConfig
from lambda_ml.jvm import SPARK_JARS, resolved_jars


def spark_settings(cfg: PlatformConfig) -> dict[str, str]:
    """Spark settings for the platform: Delta, connector jars, RocksDB state, small shuffles."""
    jars = ",".join(str(p) for p in resolved_jars(cfg, SPARK_JARS))
    settings = {
        "spark.jars": jars,
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.streaming.stateStore.providerClass": (
            "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider"
        ),
        "spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions),
        # Delta reads its log with 50 partitions by default: far too many for a laptop.
        "spark.databricks.delta.snapshotPartitions": str(max(1, cfg.spark.shuffle_partitions // 2)),
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.enabled": str(cfg.spark.ui_enabled).lower(),
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.memory": cfg.spark.driver_memory,
        "spark.sql.warehouse.dir": str(cfg.data_path / "spark-warehouse"),
        "spark.driver.extraJavaOptions": f"-Dderby.system.home={cfg.data_path} {cfg.spark.java_options}".strip(),
        "spark.executor.extraJavaOptions": cfg.spark.java_options,
    }
    if cfg.spark.master.startswith("local"):
        settings["spark.driver.host"] = "127.0.0.1"
        settings["spark.driver.bindAddress"] = "127.0.0.1"
    settings.update(cfg.spark.extra)
    return settings


def get_spark(cfg: PlatformConfig, app_suffix: str = "") -> SparkSession:
    """Create (or return the running) Spark session configured for the platform.

    Under ``spark-submit`` the master comes from the command line; otherwise from config.
    """
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if cfg.spark.master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = SparkSession.builder.appName(f"{cfg.spark.app_name}{'-' + app_suffix if app_suffix else ''}")
    if not _under_spark_submit():
        builder = builder.master(cfg.spark.master)
    for key, value in spark_settings(cfg).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


@contextmanager
def job_session(cfg: PlatformConfig, app_suffix: str) -> Iterator[SparkSession]:
    """The session of a command-line job: a session already running (a notebook, a test) is
    borrowed and left running; one started here is stopped at the end."""
    owns_session = SparkSession.getActiveSession() is None
    spark = get_spark(cfg, app_suffix)
    try:
        yield spark
    finally:
        if owns_session:
            spark.stop()


@contextmanager
def shuffle_partitions(spark: SparkSession, partitions: int) -> Iterator[None]:
    """Run a block with ``partitions`` shuffle partitions, then restore the session's setting
    (a batch job and the streaming queries of one session want different ones)."""
    key = "spark.sql.shuffle.partitions"
    previous = spark.conf.get(key)
    spark.conf.set(key, str(partitions))
    try:
        yield
    finally:
        spark.conf.set(key, previous)


def _under_spark_submit() -> bool:
    # spark-submit starts the Python driver with the gateway already running.
    return "PYSPARK_GATEWAY_PORT" in os.environ


@contextmanager
def jvm_logger_off(name: str) -> Iterator[None]:
    """Silence one JVM logger for the duration of the block (no-op without a Spark session)."""
    spark = SparkSession.getActiveSession()
    if spark is None:
        yield
        return
    jvm = spark.sparkContext._jvm
    assert jvm is not None
    log4j = jvm.org.apache.logging.log4j
    previous = log4j.LogManager.getLogger(name).getLevel()
    log4j.core.config.Configurator.setLevel(name, log4j.Level.OFF)
    try:
        yield
    finally:
        log4j.core.config.Configurator.setLevel(name, previous)

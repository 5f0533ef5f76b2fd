"""The Spark JVMs the platform starts: in-process sessions and spark-submit command lines carry
the configured JVM options (``spark.java_options``), on the driver and on the executors."""

from __future__ import annotations

from pyspark.sql import SparkSession

from lambda_ml.config import DEFAULT_CONFIG, PlatformConfig, load_config
from lambda_ml_cli.submit import submit_command


def test_the_shipped_config_runs_spark_with_the_throughput_collector(spark: SparkSession, cfg: PlatformConfig) -> None:
    assert load_config(DEFAULT_CONFIG, env={}).spark.java_options == "-XX:+UseParallelGC"
    assert cfg.spark.java_options == "-XX:+UseParallelGC"
    jvm = spark.sparkContext._jvm
    assert jvm is not None
    collectors = [bean.getName() for bean in jvm.java.lang.management.ManagementFactory.getGarbageCollectorMXBeans()]
    # ParallelGC's collectors; G1, the JVM's default, names its own "G1 Young Generation" etc.
    assert sorted(collectors) == ["PS MarkSweep", "PS Scavenge"], collectors
    assert spark.conf.get("spark.executor.extraJavaOptions") == "-XX:+UseParallelGC"


def test_spark_submit_passes_the_java_options_to_driver_and_executors(cfg: PlatformConfig) -> None:
    other = cfg.model_copy(update={"spark": cfg.spark.model_copy(update={"java_options": "-XX:+UseSerialGC -Xss4m"})})
    command = submit_command(other, "batch_layer/train.py", [])
    settings = [command[i + 1] for i, part in enumerate(command) if part == "--conf"]
    driver = next(s for s in settings if s.startswith("spark.driver.extraJavaOptions="))
    assert driver.endswith(" -XX:+UseSerialGC -Xss4m") and "-Dderby.system.home=" in driver
    assert "spark.executor.extraJavaOptions=-XX:+UseSerialGC -Xss4m" in settings

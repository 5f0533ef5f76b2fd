"""Build ``spark-submit`` command lines for the platform's jobs.

Under ``spark-submit`` the JVM starts before any Python runs, so the jars and settings must be
on the command line: this module turns :func:`lambda_ml.spark.spark_settings` into
``--jars``/``--conf`` arguments. ``lambda-ml submit batch_layer/train.py`` runs it;
``lambda-ml submit --print ...`` prints it for a cron line or a cluster.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from lambda_ml.config import PROJECT_ROOT, PlatformConfig
from lambda_ml.spark import spark_settings


def spark_submit_binary() -> str:
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-submit")


def submit_command(cfg: PlatformConfig, script: str, args: list[str], master: str | None = None) -> list[str]:
    """The full ``spark-submit`` command running ``script`` with the platform's jars and settings."""
    settings = spark_settings(cfg)
    command = [spark_submit_binary(), "--master", master or cfg.spark.master, "--jars", settings.pop("spark.jars")]
    command += ["--driver-memory", settings.pop("spark.driver.memory")]
    for key, value in settings.items():
        command += ["--conf", f"{key}={value}"]
    command += ["--conf", f"spark.pyspark.python={sys.executable}", "--conf", f"spark.pyspark.driver.python={sys.executable}"]
    script_path = Path(script)
    if not script_path.is_absolute():
        script_path = PROJECT_ROOT / script_path
    return [*command, str(script_path), *args]


def submit_env() -> dict[str, str]:
    """Environment for spark-submit: the project's interpreter for driver and workers."""
    env = dict(os.environ)
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    env.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_submit(cfg: PlatformConfig, script: str, args: list[str], master: str | None = None) -> int:
    """Run the job with spark-submit and return its exit code."""
    return subprocess.call(submit_command(cfg, script, args, master), env=submit_env())


def printable(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)

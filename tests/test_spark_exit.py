"""A Spark JVM that dies under a command-line verb: one plain error line, not py4j's tracebacks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lambda_ml.config import PROJECT_ROOT, PlatformConfig, write_config
from support import isolated


def test_the_examples_of_the_command_lines_helpers_run() -> None:
    """lambda_ml_cli is outside pytest's doctest paths: its helpers' examples run here."""
    import doctest

    from lambda_ml_cli import errors, stack

    results = [doctest.testmod(module) for module in (errors, stack)]
    assert [r.failed for r in results] == [0, 0] and all(r.attempted for r in results)


def test_only_a_lost_connection_is_read_as_a_dead_jvm() -> None:
    from py4j.protocol import Py4JError, Py4JNetworkError

    from lambda_ml_cli.errors import lost_jvm_reason

    try:
        try:
            raise Py4JNetworkError("Answer from Java side is empty")
        except Py4JNetworkError as exc:
            raise Py4JError("An error occurred while calling o42.exception") from exc
    except Py4JError as wrapped:
        assert lost_jvm_reason(wrapped) == "Answer from Java side is empty"
    assert lost_jvm_reason(Py4JError("An error occurred while calling o42.stop: java.lang.IllegalStateException")) is None
    assert lost_jvm_reason(ValueError("bad config")) is None


@pytest.mark.integration
def test_a_killed_spark_jvm_ends_the_verb_with_one_line_naming_it(running_stack: PlatformConfig, tmp_path: Path) -> None:
    """``lambda-ml speed ingest`` (a real Spark session, its JVM a child of the command) runs until
    its JVM is killed: the command exits 1 with one line saying so, and no traceback."""
    cfg = isolated(running_stack, "spark-exit", lake_root=tmp_path / "lake")
    config_file = write_config(cfg, tmp_path / "platform.yaml")
    err_file = tmp_path / "stderr.log"
    with err_file.open("wb") as err:
        command = subprocess.Popen(
            [sys.executable, "-m", "lambda_ml_cli.cli", "--config", str(config_file), "speed", "ingest"],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while "speed layer running:" not in err_file.read_text():
            assert command.poll() is None and time.monotonic() < deadline, err_file.read_text()
            time.sleep(1)
        (jvm,) = [c for c in psutil.Process(command.pid).children(recursive=True) if c.name() == "java"]
        jvm.send_signal(signal.SIGKILL)
        assert command.wait(timeout=120) == 1
    finally:
        if command.poll() is None:
            command.kill()
            command.wait(timeout=30)
    text = err_file.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: the Spark JVM (pid {jvm.pid}) was killed (SIGKILL) (see {err_file}): lost the connection to it ("
        + errors[0].split(": lost the connection to it (", 1)[-1]
    ], text
    assert "Traceback" not in text and "py4j" not in text.lower(), text


def test_a_lost_jvm_connection_logged_as_an_error_by_py4j_is_dropped_and_other_errors_are_kept() -> None:
    """The JVM dying during a micro-batch's Python callback makes py4j log the lost connection at
    ERROR with a traceback; the verb's one line says it instead. Other py4j errors still show."""
    import logging

    from py4j.protocol import Py4JNetworkError

    from lambda_ml_cli.errors import Py4jConnectionNoise

    def record(level: int, exc: BaseException) -> logging.LogRecord:
        path = f"{os.sep}venv{os.sep}py4j{os.sep}clientserver.py"
        return logging.LogRecord("py4j.clientserver", level, path, 1, "failed", None, (type(exc), exc, None))

    noise = Py4jConnectionNoise()
    assert not noise.filter(record(logging.ERROR, Py4JNetworkError("Error while sending or receiving")))
    assert not noise.filter(record(logging.INFO, ValueError("anything below WARNING")))
    assert noise.filter(record(logging.ERROR, ValueError("a real error")))

"""Failures of a verb said in one plain line instead of a traceback.

A Spark JVM that dies under a verb (killed, out of memory) leaves the Python side with py4j's
network errors, raised from wherever the driver next called it, each with a page of traceback
that never says the JVM is gone. :func:`run_verb` turns them into one line naming the JVM, how
it exited and where its own output went.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from lambda_ml.config import PlatformConfig

# What a call to a JVM that is gone raises, from py4j or from the socket under it.
_GONE = (ConnectionRefusedError, ConnectionResetError, BrokenPipeError, EOFError)


def lost_jvm_reason(exc: BaseException) -> str | None:
    """What ``exc`` (or an exception it was raised from or during) says of a lost connection
    to the Spark JVM; None when it is about something else.

    >>> lost_jvm_reason(RuntimeError("a query failed"))
    >>> try:
    ...     try:
    ...         raise ConnectionRefusedError(111, "Connection refused")
    ...     except OSError:
    ...         raise RuntimeError("stopping the queries failed")
    ... except RuntimeError as exc:
    ...     lost_jvm_reason(exc)
    '[Errno 111] Connection refused'
    """
    from py4j.protocol import Py4JNetworkError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (Py4JNetworkError, *_GONE)):
            return str(current) or type(current).__name__
        current = current.__cause__ or current.__context__
    return None


def exited_spark_jvm(wait_s: float = 5.0) -> tuple[int, int] | None:
    """The PID and exit code of this process's Spark JVM once it has exited (waiting up to
    ``wait_s`` for a dying one); None when no JVM was started here or it still runs."""
    import subprocess

    from pyspark import SparkContext

    process = getattr(SparkContext._gateway, "proc", None)
    if process is None:
        return None
    try:
        return process.pid, process.wait(wait_s)
    except subprocess.TimeoutExpired:
        return None


def _how(code: int) -> str:
    """An exit code as words.

    >>> _how(-9), _how(137), _how(1)
    ('was killed (SIGKILL)', 'was killed (SIGKILL)', 'exited with code 1')
    """
    number = -code if code < 0 else code - 128 if code > 128 else None
    if number is not None:
        try:
            return f"was killed ({signal.Signals(number).name})"
        except ValueError:
            pass
    return f"exited with code {code}"


def _its_output(pid: int | None) -> str:
    """Where the JVM's own lines went: this process's stderr when it is a file (a log), else
    the terminal; and the JVM's crash report if it wrote one."""
    try:
        stderr = os.readlink("/proc/self/fd/2")
    except OSError:
        stderr = ""
    where = stderr if Path(stderr).is_file() else "its lines above"
    report = Path(f"hs_err_pid{pid}.log")
    return f"{where} and {report.resolve()}" if pid is not None and report.exists() else where


class Py4jConnectionNoise(logging.Filter):
    """Drops what py4j logs with a traceback below WARNING (through the root logger, e.g.
    "Exception while sending command." each time a call finds the JVM gone), and at any level
    when the traceback is a lost connection to the JVM (logged as ERROR when the JVM dies during
    a micro-batch's Python callback): the exception itself still reaches the caller, which says
    it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}py4j{os.sep}" not in record.pathname or not record.exc_info:
            return True
        if record.levelno < logging.WARNING:
            return False
        exc = record.exc_info[1]
        return exc is None or lost_jvm_reason(exc) is None


def run_verb(handler: Callable[[PlatformConfig, argparse.Namespace], int], cfg: PlatformConfig, args: argparse.Namespace) -> int:
    """``handler(cfg, args)``; when the Spark JVM it runs on dies, one line on stderr ("the Spark
    JVM ... exited (see ...): ...") and exit code 1 instead of py4j's tracebacks."""
    for output in logging.getLogger().handlers:
        if not any(isinstance(f, Py4jConnectionNoise) for f in output.filters):
            output.addFilter(Py4jConnectionNoise())
    try:
        return int(handler(cfg, args))
    except Exception as exc:
        reason = lost_jvm_reason(exc)
        jvm = exited_spark_jvm() if reason is not None else None
        if reason is None or jvm is None:
            raise  # not a JVM that went away
        pid, code = jvm
        # py4j's own loggers would narrate every later call that finds the JVM gone.
        logging.getLogger("py4j").setLevel(logging.CRITICAL)
        print(f"error: the Spark JVM (pid {pid}) {_how(code)} (see {_its_output(pid)}): lost the connection to it ({reason})",
              file=sys.stderr)  # fmt: skip
        return 1

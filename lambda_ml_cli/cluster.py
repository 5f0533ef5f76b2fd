"""A Spark standalone cluster on this machine: one master and one worker, run from the pyspark
install (the pip package ships ``bin/spark-class`` but no ``sbin/start-master.sh``).

Both bind to loopback, each is a :class:`~lambda_ml_cli.stack.ManagedProcess` with a PID file and a
log file under ``<data_dir>/spark-cluster``, and ``stop`` ends each by its PID. The ports in use
are kept in ``cluster.json`` beside them, so ``status`` and ``stop`` find a cluster started by
another process. Jobs run on it with ``lambda-ml submit --master spark://127.0.0.1:7077 ...``.

    lambda-ml cluster up [--port 7077] [--cores 2] [--memory 2g]
    lambda-ml cluster status
    lambda-ml cluster down
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from lambda_ml.config import PlatformConfig
from lambda_ml_cli.stack import ManagedProcess, wait_until

log = logging.getLogger(__name__)

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"


def spark_home() -> Path:
    """The pyspark install, which is a complete Spark home (``bin/``, ``jars/``)."""
    import pyspark

    return Path(pyspark.__file__).parent


@dataclass(frozen=True)
class ClusterSpec:
    """Addresses and size of the local cluster; one worker offering ``cores`` and ``memory``."""

    host: str = "127.0.0.1"
    port: int = 7077
    webui_port: int = 8080
    worker_port: int = 7078
    worker_webui_port: int = 8081
    cores: int = 1
    memory: str = "1g"  # for executors; one executor takes spark.executor.memory (1g) of it
    daemon_memory: str = "512m"  # heap of the master and worker JVMs themselves

    def __post_init__(self) -> None:
        if self.cores < 1:
            raise ValueError(f"a worker needs at least one core, not {self.cores}")
        ports = (self.port, self.webui_port, self.worker_port, self.worker_webui_port)
        if len(set(ports)) != len(ports) or not all(0 < p < 65536 for p in ports):
            raise ValueError(f"the cluster's four ports must be distinct and in 1..65535, got {ports}")

    @property
    def master_url(self) -> str:
        return f"spark://{self.host}:{self.port}"

    @property
    def webui_url(self) -> str:
        return f"http://{self.host}:{self.webui_port}"


class StandaloneCluster:
    """One standalone master and one worker, started and stopped by PID."""

    def __init__(self, home: Path, spec: ClusterSpec | None = None) -> None:
        self.home = home
        self.spec = spec or self._recorded_spec() or ClusterSpec()
        self.master = ManagedProcess("spark-master", home)
        self.worker = ManagedProcess("spark-worker", home)

    @classmethod
    def for_config(cls, cfg: PlatformConfig, spec: ClusterSpec | None = None) -> StandaloneCluster:
        return cls(cfg.data_path / "spark-cluster", spec)

    @property
    def master_url(self) -> str:
        return self.spec.master_url

    @property
    def _spec_file(self) -> Path:
        return self.home / "cluster.json"

    def _recorded_spec(self) -> ClusterSpec | None:
        try:
            return ClusterSpec(**json.loads(self._spec_file.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def _env(self) -> dict[str, str]:
        return {
            "SPARK_HOME": str(spark_home()),
            # Binds the RPC endpoints and the web UIs to loopback (they default to every interface).
            "SPARK_LOCAL_IP": self.spec.host,
            "SPARK_DAEMON_MEMORY": self.spec.daemon_memory,
            # No REST submission server: jobs are submitted in client mode, and its fixed port
            # (6066) would clash with a second cluster.
            "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false",
            # Executors start Python workers with this interpreter unless the job says otherwise.
            "PYSPARK_PYTHON": sys.executable,
        }

    def _command(self, main_class: str, *args: str) -> list[str]:
        return [str(spark_home() / "bin" / "spark-class"), main_class, *args]

    def start(self, timeout_s: float = 120) -> None:
        """Start the master, then the worker, each only if not running; wait until the worker
        has registered. A part started here is stopped again if the cluster does not come up."""
        if self.master.pid() is None and self.worker.pid() is None:
            self.home.mkdir(parents=True, exist_ok=True)
            self._spec_file.write_text(json.dumps(asdict(self.spec), indent=2))
        started: list[ManagedProcess] = []
        try:
            if self.master.pid() is None:
                s = self.spec
                pid = self.master.start(
                    self._command(MASTER_CLASS, "--host", s.host, "--port", str(s.port), "--webui-port", str(s.webui_port)),
                    env=self._env(),
                )
                started.append(self.master)
                log.info("starting Spark master (pid %d) at %s", pid, self.master_url)
                wait_until(self._master_ready, timeout_s, "Spark master", self.master)
            if self.worker.pid() is None:
                s = self.spec
                work_dir = self.home / "work"
                pid = self.worker.start(
                    self._command(
                        WORKER_CLASS, self.master_url,
                        "--host", s.host, "--port", str(s.worker_port), "--webui-port", str(s.worker_webui_port),
                        "--cores", str(s.cores), "--memory", s.memory, "--work-dir", str(work_dir),
                    ),  # fmt: skip
                    env=self._env(),
                )
                started.append(self.worker)
                log.info("starting Spark worker (pid %d): %d cores, %s", pid, s.cores, s.memory)
                wait_until(lambda: bool(self.alive_workers()), timeout_s, "Spark worker", self.worker)
        except BaseException:
            for process in reversed(started):
                process.stop(timeout_s=15)
            raise
        log.info("Spark standalone cluster ready at %s (UI %s)", self.master_url, self.spec.webui_url)

    def stop(self) -> list[str]:
        """Stop the worker (and its executors), then the master; return the parts stopped.

        Returns once each JVM is gone, not only its main thread: a JVM whose main thread has
        ended already looks like a zombie while its shutdown hooks still hold the ports.
        """
        stopped = []
        for name, process in (("worker", self.worker), ("master", self.master)):
            pid = process.pid()
            if process.stop(timeout_s=20):
                stopped.append(name)
                if pid is not None:
                    _wait_gone(pid, timeout_s=20)
        if self.master.pid() is None and self.worker.pid() is None:
            self._spec_file.unlink(missing_ok=True)
        return stopped

    def master_state(self) -> dict[str, Any] | None:
        """The master's own JSON status (``/json/`` on its web UI), or None if it does not answer."""
        try:
            with urllib.request.urlopen(f"{self.spec.webui_url}/json/", timeout=2) as response:
                state: dict[str, Any] = json.loads(response.read())
                return state
        except (OSError, ValueError):
            return None

    def _master_ready(self) -> bool:
        state = self.master_state()
        return state is not None and state.get("status") == "ALIVE"

    def alive_workers(self) -> list[dict[str, Any]]:
        state = self.master_state() or {}
        return [w for w in state.get("workers", []) if w.get("state") == "ALIVE"]

    def status(self) -> dict[str, object]:
        """PIDs, addresses, live workers and log files."""
        workers = self.alive_workers()
        return {
            "master": {"pid": self.master.pid(), "url": self.master_url, "ui": self.spec.webui_url, "log": str(self.master.log_file)},
            "worker": {"pid": self.worker.pid(), "log": str(self.worker.log_file)},
            "alive_workers": len(workers),
            "cores": sum(int(w.get("cores", 0)) for w in workers),
            "ready": self.master.pid() is not None and bool(workers),
        }


def _wait_gone(pid: int, timeout_s: float) -> None:
    """Wait until ``pid`` (ours, already signalled) has fully exited; SIGKILL it after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while psutil.pid_exists(pid):  # a zombie counts until its parent reaps it
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        except ChildProcessError:
            pass
        if time.monotonic() > deadline:
            log.warning("pid %d still exiting after %.0f s: killing it", pid, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout_s
        time.sleep(0.1)


def default_cores() -> int:
    return max(1, os.cpu_count() or 1)


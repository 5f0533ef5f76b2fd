"""The embedded local stack: a single-node Kafka broker in KRaft mode and an MLflow tracking
server, both on loopback, each with a PID file and a log file under the data directory.

``up`` is idempotent (a running part is left alone), ``down`` stops each part by its PID, and a
prediction service started by hand from the project's folder on ``serving.port`` too.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from lambda_ml.config import ENV_PREFIX, PROJECT_ROOT, PlatformConfig, TopicConfig
from lambda_ml.jvm import KAFKA_BROKER, resolved_jars

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    """A stack component failed to start or to answer."""


@dataclass(frozen=True)
class ManagedProcess:
    """A background process known by its PID file, logging to its own file."""

    name: str
    home: Path

    @property
    def pid_file(self) -> Path:
        return self.home / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.home / f"{self.name}.log"

    def pid(self) -> int | None:
        """The PID if the process recorded in the PID file is alive, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return None if _is_gone(pid) else pid

    def start(self, command: list[str], env: dict[str, str] | None = None) -> int:
        self.home.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # its own process group: stopped as one by `down`
                cwd=self.home,
            )
        self.pid_file.write_text(f"{process.pid}\n")
        return process.pid

    def running_as(self, command: Sequence[str], config_file: str | None) -> int | None:
        """The PID if the recorded process is alive and would be started the same way now: the
        same command line, the same ``LAMBDA_ML__*`` overrides, and ``config_file`` (if any) not
        changed since it started. None otherwise (not running, or running something else)."""
        pid = self.pid()
        if pid is None:
            return None
        try:
            process = psutil.Process(pid)
            same = process.cmdline() == list(command) and _overrides(process.environ()) == _overrides(os.environ)
            if same and config_file:
                same = Path(config_file).stat().st_mtime <= process.create_time()
        except (psutil.Error, OSError):
            return None
        return pid if same else None

    def stop(self, timeout_s: float = 30, leader_first: bool = False) -> bool:
        """SIGTERM the process group, SIGKILL it after ``timeout_s``; True if it was running.

        ``leader_first``: SIGTERM goes to the process alone, which stops its children itself
        (the speed layer's driver needs its JVM for its graceful stop); whatever is left of
        its group once it has exited is then stopped too."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        if leader_first:
            os.kill(pid, signal.SIGTERM)
        else:
            _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.2)
        if self.pid() is not None:
            log.warning("%s (pid %d) did not stop in %.0f s: killing it", self.name, pid, timeout_s)
            _signal_group(pid, signal.SIGKILL)
            while self.pid() is not None:
                time.sleep(0.1)
        _stop_leftovers(pid)
        self.pid_file.unlink(missing_ok=True)
        return True

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(os.getpgid(pid), sig)
    except ProcessLookupError:
        return
    # Reap it if it is our own child, so it does not linger as a zombie.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def group_members(group: int) -> list[int]:
    """The live processes of a process group (zombies left for their new parent to reap are not)."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == group and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except OSError:
            continue  # gone meanwhile, or (macOS) in a session we may not look into
    return members


def _stop_leftovers(group: int, timeout_s: float = 10) -> None:
    """Stop what is left of a process group whose leader has exited (started with its own
    session, so the group id is the leader's PID): SIGTERM, then SIGKILL after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_members(group):
            return
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and group_members(group):
            time.sleep(0.2)


def _overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """The configuration overrides in a process's environment (see ``lambda_ml.config``)."""
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}


def _is_gone(pid: int) -> bool:
    """True when ``pid`` has exited, or is a zombie (reaped here if it is our own child)."""
    try:
        if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False  # alive, someone else's
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return True


def wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, process: ManagedProcess, goal: str = "become ready"
) -> None:
    """Poll ``check`` until it holds; StackError saying that ``what`` exited, or did not
    ``goal`` in time, with the last lines of its log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.pid() is None:
            raise StackError(f"{what} exited before it could {goal}; last log lines of {process.log_file}:\n{process.tail()}")
        if check():
            return
        time.sleep(0.5)
    raise StackError(f"{what} did not {goal} in {timeout_s:.0f} s; see {process.log_file}:\n{process.tail()}")


# --------------------------------------------------------------------------- Kafka broker


def broker_properties(cfg: PlatformConfig, log_dir: Path) -> str:
    """The ``server.properties`` of the single-node KRaft broker (controller and broker)."""
    k = cfg.kafka
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{k.host}:{k.controller_port}",
            f"listeners=PLAINTEXT://{k.host}:{k.port},CONTROLLER://{k.host}:{k.controller_port}",
            f"advertised.listeners=PLAINTEXT://{k.host}:{k.port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={log_dir}",
            "num.partitions=1",
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=false",
            "",
        ]
    )


_BROKER_LOG4J = """\
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
"""


def new_cluster_id() -> str:
    """A random KRaft cluster id (22 URL-safe base64 characters) that does not start with "-":
    the storage tool would read such an id as an option and fail (as Kafka's own ids avoid)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class KafkaBroker:
    """A single-node KRaft broker run from the jars in ``.jvm/kafka-broker``."""

    def __init__(self, cfg: PlatformConfig) -> None:
        self.cfg = cfg
        self.home = cfg.data_path / "kafka"
        self.process = ManagedProcess("kafka", self.home)

    def _classpath(self) -> str:
        return os.pathsep.join(str(p) for p in resolved_jars(self.cfg, KAFKA_BROKER))

    def _java(self, main: str, *args: str, heap: str = "256m") -> list[str]:
        return [
            "java", f"-Xmx{heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp", self._classpath(), main, *args,
        ]  # fmt: skip

    def format_storage(self) -> None:
        """Format the KRaft storage once; later starts reuse it (and its topics)."""
        data = self.home / "data"
        if (data / "meta.properties").exists():
            return
        self.home.mkdir(parents=True, exist_ok=True)
        cluster_id = new_cluster_id()
        done = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.home / "server.properties")),
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise StackError(f"formatting Kafka storage in {data} failed:\n{done.stdout}{done.stderr}")
        log.info("formatted Kafka storage in %s (cluster id %s)", data, cluster_id)

    def start(self) -> None:
        if (pid := self.process.pid()) is not None:
            log.info("Kafka broker already running (pid %d) on %s", pid, self.cfg.kafka.bootstrap_servers)
            return
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "server.properties").write_text(broker_properties(self.cfg, self.home / "data"))
        (self.home / "log4j2.properties").write_text(_BROKER_LOG4J)
        self.format_storage()
        pid = self.process.start(
            self._java("kafka.Kafka", str(self.home / "server.properties"), heap=self.cfg.kafka.heap)
        )
        log.info("starting Kafka broker (pid %d) on %s:%d", pid, self.cfg.kafka.host, self.cfg.kafka.port)
        wait_until(self.is_ready, self.cfg.kafka.start_timeout_s, "Kafka broker", self.process)
        log.info("Kafka broker ready on %s", self.cfg.kafka.bootstrap_servers)

    def is_ready(self) -> bool:
        """True when a real client can fetch cluster metadata from the broker."""
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        # Refused connections are expected while the broker starts: keep them out of the log.
        client_log = logging.getLogger("kafka")
        level = client_log.level
        client_log.setLevel(logging.CRITICAL)
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.cfg.kafka.bootstrap_servers, request_timeout_ms=3000)
        except (KafkaError, OSError, ValueError):
            return False
        finally:
            client_log.setLevel(level)
        try:
            admin.describe_cluster()
            return True
        except (KafkaError, OSError):
            return False
        finally:
            admin.close()

    def stop(self) -> bool:
        return self.process.stop(timeout_s=30)


def topic_configs(topic: TopicConfig) -> dict[str, str]:
    """Kafka topic-level configs for a configured topic.

    >>> topic_configs(TopicConfig(name="m", compacted=True))
    {'cleanup.policy': 'compact', 'retention.ms': '-1'}
    """
    return {"cleanup.policy": "compact" if topic.compacted else "delete", "retention.ms": str(topic.retention_ms)}


def create_topics(cfg: PlatformConfig) -> list[str]:
    """Create the configured topics that do not exist yet; return the names created."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    topics = cfg.kafka.topics
    wanted = [*cfg.events.topics().values(), topics.model_updates, topics.predictions]
    admin = KafkaAdminClient(bootstrap_servers=cfg.kafka.bootstrap_servers)
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(t.name, num_partitions=t.partitions, replication_factor=1, topic_configs=topic_configs(t))
            for t in wanted
            if t.name not in existing
        ]
        if new:
            admin.create_topics(new)
        for topic in new:
            log.info("created topic %s (%d partitions)", topic.name, topic.num_partitions)
        return [t.name for t in new]
    finally:
        admin.close()


# --------------------------------------------------------------------------- MLflow server


class MlflowServer:
    """``mlflow server`` with a sqlite backend and a local artifact store, one worker."""

    def __init__(self, cfg: PlatformConfig) -> None:
        self.cfg = cfg
        self.home = cfg.data_path / "mlflow"
        self.process = ManagedProcess("mlflow", self.home)

    @property
    def url(self) -> str:
        return f"http://{self.cfg.mlflow.host}:{self.cfg.mlflow.port}"

    def start(self) -> None:
        if (pid := self.process.pid()) is not None:
            log.info("MLflow server already running (pid %d) at %s", pid, self.url)
            return
        self.home.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--host", self.cfg.mlflow.host, "--port", str(self.cfg.mlflow.port),
            "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}",
            "--artifacts-destination", str(self.home / "artifacts"),
            "--workers", "1",
        ]  # fmt: skip
        # The default server forks 4 workers and a job runner (~3.3 GB); this needs ~0.5 GB.
        bin_dir = str(Path(sys.executable).parent)
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        pid = self.process.start(command, env=env)
        log.info("starting MLflow server (pid %d) at %s", pid, self.url)
        wait_until(self.is_ready, self.cfg.mlflow.start_timeout_s, "MLflow server", self.process)
        log.info("MLflow server ready at %s", self.url)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> bool:
        return self.process.stop(timeout_s=30)


# --------------------------------------------------------------------------- prediction service


class ServingProcess:
    """The prediction service (``python -m serving_layer``) run in the background by the demo."""

    def __init__(self, cfg: PlatformConfig) -> None:
        self.cfg = cfg
        self.process = ManagedProcess("serving", cfg.data_path / "serving")

    @property
    def url(self) -> str:
        return f"http://{self.cfg.serving.host}:{self.cfg.serving.port}"

    def command(self, config_file: str | None = None) -> list[str]:
        command = [sys.executable, "-m", "serving_layer", "--host", self.cfg.serving.host, "--port", str(self.cfg.serving.port)]
        if config_file:
            # The child runs in its own folder: a path relative to ours would not be found there.
            command += ["--config", str(Path(config_file).resolve())]
        return command

    def running(self, config_file: str | None = None) -> int | None:
        """The PID of a service started as ``start(config_file)`` would start it now, else None."""
        return self.process.running_as(self.command(config_file), config_file)

    def start(self, config_file: str | None = None) -> None:
        if (pid := self.process.pid()) is not None:
            log.info("prediction service already running (pid %d) at %s: restarting it", pid, self.url)
            self.stop()
        pid = self.process.start(self.command(config_file))
        log.info("starting prediction service (pid %d) at %s", pid, self.url)
        wait_until(self.is_ready, 120, "prediction service", self.process)
        log.info("prediction service ready at %s", self.url)

    def health(self) -> dict[str, Any]:
        """The service's ``/health`` answer; empty if it does not answer."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                answer = json.loads(response.read())
                return answer if isinstance(answer, dict) else {}
        except (OSError, ValueError):
            return {}

    def is_ready(self) -> bool:
        """True once the service has loaded a model and the views (its /health says ready)."""
        return bool(self.health().get("ready"))

    def wait_until_serving(self, version: int | None, views: Mapping[str, int | None], timeout_s: float = 120) -> None:
        """Wait until the running service has swapped in the champion ``version`` (None: any)
        and the batch views at horizon ``views`` (it polls the registry and the lake:
        ``serving.poll_interval_s``, ``serving.views_refresh_s``)."""

        def serving() -> bool:
            health = self.health()
            model, loaded = health.get("model") or {}, health.get("views") or {}
            return version in (None, model.get("version")) and loaded.get("horizon") == dict(views)

        swapped = f"swap in {'' if version is None else f'version {version} and '}the new views"
        wait_until(serving, timeout_s, f"the prediction service (pid {self.process.pid()})", self.process, goal=swapped)

    def stop(self) -> bool:
        return self.process.stop(timeout_s=15)


def is_service_command(command: Sequence[str]) -> bool:
    """True for the command line of the platform's HTTP service: ``python -m serving_layer ...``
    or ``lambda-ml [--config F] serve [http]`` (not ``serve stream``, which listens on no port).

    >>> is_service_command(["/p/.venv/bin/python", "-m", "serving_layer", "--port", "8000"])
    True
    >>> is_service_command(["/p/.venv/bin/python", "/p/.venv/bin/lambda-ml", "--config", "c.yaml", "serve"])
    True
    >>> is_service_command(["python", "-m", "lambda_ml_cli.cli", "serve", "stream"]), is_service_command(["python", "-m", "http.server"])
    (False, False)
    """
    args = list(command)
    if any(a == "-m" and b == "serving_layer" for a, b in zip(args, args[1:])):
        return True
    cli = next((n for n, a in enumerate(args) if Path(a).name == "lambda-ml" or a == "lambda_ml_cli.cli"), None)
    if cli is None or "serve" not in args[cli + 1 :]:
        return False
    after = args[args.index("serve", cli + 1) + 1 :]
    return not after or after[0] != "stream"


def hand_started_services(cfg: PlatformConfig, project: Path = PROJECT_ROOT) -> list[psutil.Process]:
    """Prediction services no PID file records (started by hand: ``python -m serving_layer``,
    ``lambda-ml serve``): this user's processes running the service's command line, started
    from the project's folder (their working directory is in it) and listening on
    ``serving.port``. Nothing started elsewhere qualifies."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd", "uids"]):
        try:
            info = process.info
            if info["uids"] is None or info["uids"].real != os.getuid() or not is_service_command(info["cmdline"] or []):
                continue
            if info["cwd"] is None or not Path(info["cwd"]).resolve().is_relative_to(project.resolve()):
                continue
            listening = {c.laddr.port for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cfg.serving.port in listening:
            found.append(process)
    return found


def stop_process(process: psutil.Process, timeout_s: float = 15) -> None:
    """SIGTERM one process (not its group: started by hand, its group may be the user's shell's),
    SIGKILL after ``timeout_s``."""
    try:
        process.terminate()
        process.wait(timeout_s)
    except psutil.TimeoutExpired:
        log.warning("pid %d did not stop in %.0f s: killing it", process.pid, timeout_s)
        process.kill()
        process.wait(10)
    except psutil.NoSuchProcess:
        pass


class SpeedProcess:
    """The speed layer (``lambda-ml speed run``) run continuously in the background by the demo:
    its queries resume from their checkpoints, and SIGTERM (``stop``) lets each finish its
    micro-batch."""

    READY_LINE = "speed layer running:"  # what speed_layer.app logs once every query has started

    def __init__(self, cfg: PlatformConfig) -> None:
        self.cfg = cfg
        self.process = ManagedProcess("speed", cfg.data_path / "speed")

    def start(self, config_file: str | None = None, queries: Sequence[str] = ()) -> int:
        """Start the application (``queries``, default ``speed.queries``); return its PID once
        every query has started."""
        if (pid := self.process.pid()) is not None:
            log.info("speed layer already running (pid %d): restarting it", pid)
            self.stop()
        command = self.command(config_file, queries)
        logged_before = self.process.log_file.stat().st_size if self.process.log_file.exists() else 0
        pid = self.process.start(command)
        log.info("starting the speed layer (pid %d): %s", pid, ", ".join(queries or self.cfg.speed.queries))
        wait_until(lambda: self._logged_since(logged_before, self.READY_LINE), 300, "speed layer", self.process)
        log.info("speed layer running (pid %d); log: %s", pid, self.process.log_file)
        return pid

    def command(self, config_file: str | None = None, queries: Sequence[str] = ()) -> list[str]:
        command = [sys.executable, "-m", "lambda_ml_cli.cli"]
        if config_file:
            command += ["--config", str(Path(config_file).resolve())]  # see ServingProcess.command
        command += ["speed", "run"]
        for query in queries:
            command += ["--query", query]
        return command

    def running(self, config_file: str | None = None, queries: Sequence[str] = ()) -> int | None:
        """The PID of a speed layer started as ``start(config_file, queries)`` would start it
        now, else None."""
        return self.process.running_as(self.command(config_file, queries), config_file)

    def _logged_since(self, offset: int, text: str) -> bool:
        with self.process.log_file.open("rb") as log_file:
            log_file.seek(offset)
            return text.encode() in log_file.read()

    def stop(self) -> bool:
        # SIGTERM to the driver alone: it lets every query finish its micro-batch (at most
        # speed.stop_timeout_seconds) before its Spark JVM goes.
        return self.process.stop(timeout_s=self.cfg.speed.stop_timeout_seconds + 60, leader_first=True)


# --------------------------------------------------------------------------- the stack


def up(cfg: PlatformConfig) -> None:
    """Start the broker and the MLflow server (those not running) and create the topics."""
    KafkaBroker(cfg).start()
    create_topics(cfg)
    MlflowServer(cfg).start()


def down(cfg: PlatformConfig) -> list[str]:
    """Stop every running part (service, speed layer, MLflow, broker) by its PID; return those
    stopped."""
    stopped = []
    parts: tuple[tuple[str, ServingProcess | SpeedProcess | MlflowServer | KafkaBroker], ...] = (
        ("prediction service", ServingProcess(cfg)),
        ("speed layer", SpeedProcess(cfg)),
        ("MLflow server", MlflowServer(cfg)),
        ("Kafka broker", KafkaBroker(cfg)),
    )
    for name, part in parts:
        if part.stop():
            log.info("stopped %s", name)
            stopped.append(name)
        if isinstance(part, ServingProcess):
            for process in hand_started_services(cfg):
                what = f"prediction service started by hand (pid {process.pid}: {' '.join(process.cmdline())})"
                stop_process(process)
                log.info("stopped the %s", what)
                stopped.append(what)
    return stopped


def status(cfg: PlatformConfig) -> dict[str, dict[str, object]]:
    """Each part's PID, address, readiness and log file."""
    broker, server, service, speed = KafkaBroker(cfg), MlflowServer(cfg), ServingProcess(cfg), SpeedProcess(cfg)
    broker_pid, server_pid, service_pid = broker.process.pid(), server.process.pid(), service.process.pid()
    by_hand = [] if service_pid is not None else [p.pid for p in hand_started_services(cfg)]
    return {
        "kafka": {
            "pid": broker_pid,
            "address": cfg.kafka.bootstrap_servers,
            "ready": broker_pid is not None and broker.is_ready(),
            "log": str(broker.process.log_file),
        },
        "mlflow": {
            "pid": server_pid,
            "address": server.url,
            "ready": server_pid is not None and server.is_ready(),
            "log": str(server.process.log_file),
        },
        "serving": {
            "pid": service_pid if service_pid is not None else (by_hand[0] if by_hand else None),
            "address": service.url,
            "ready": (service_pid is not None or bool(by_hand)) and service.is_ready(),
            "log": str(service.process.log_file) if not by_hand else "(started by hand: its own terminal)",
        },
        "speed": {"pid": speed.process.pid(), "log": str(speed.process.log_file)},
    }

"""What the service depends on while it runs, and whether each answers: the MLflow registry
(polled for alias moves), the lake (the views polled for new Delta versions) and Kafka (model
updates in, the prediction log out).

The service keeps answering through an outage with what it loaded, so an outage must be
visible elsewhere: :class:`DependencyStatus` is the one place that knows. Whoever talks to a
dependency reports each attempt (:meth:`Dependency.failed` or :meth:`Dependency.ok`); the
status logs one line when a dependency fails and one when it answers again, counts every
failure, and gives ``/health``, ``/ready`` and ``/metrics`` their problems and gauges.

>>> times = iter([0.0, 42.0])
>>> status = DependencyStatus(clock=lambda: next(times))
>>> registry = status.declare("registry", "MLflow registry at http://127.0.0.1:5000")
>>> registry.failed("unreachable (connection refused)", "serving the loaded versions")
>>> status.problems()
['registry: MLflow registry at http://127.0.0.1:5000: unreachable (connection refused); serving the loaded versions']
>>> registry.ok()
>>> status.problems(), [(name, up, failures) for name, up, failures in status.states()]
([], [('registry', True, 1)])
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class _State:
    description: str  # plain words for the logs: "MLflow registry at http://..."
    problem: str | None = None  # reason and consequence while failing, None while it answers
    down_since: float | None = None
    failures: int = 0


class Dependency:
    """One dependency's reporter: what a component holds to report its attempts."""

    def __init__(self, status: DependencyStatus, name: str) -> None:
        self.status, self.name = status, name

    def failed(self, reason: str, consequence: str) -> None:
        """An attempt failed: ``reason`` (e.g. "unreachable (...)") and what the service does
        meanwhile (``consequence``, e.g. "serving the loaded versions")."""
        self.status.failed(self.name, reason, consequence)

    def ok(self) -> None:
        """An attempt succeeded."""
        self.status.ok(self.name)

    @property
    def up(self) -> bool:
        return self.status.is_up(self.name)


class DependencyStatus:
    """Each declared dependency's state: up or failing (since when, why), and its failures."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[str, _State] = {}
        self._lock = threading.Lock()

    def declare(self, name: str, description: str) -> Dependency:
        """The reporter of dependency ``name`` (the metrics' label: registry, lake, kafka),
        declared up until an attempt fails."""
        with self._lock:
            self._states.setdefault(name, _State(description))
        return Dependency(self, name)

    def failed(self, name: str, reason: str, consequence: str) -> None:
        with self._lock:
            state = self._states[name]
            state.failures += 1
            problem = f"{reason}; {consequence}"
            if state.problem == problem:
                return
            first = state.problem is None
            state.problem = problem
            if first:
                state.down_since = self._clock()
        # Once when it fails, and again only if the reason changes (not at every poll).
        log.warning("%s: %s", state.description, problem)

    def ok(self, name: str) -> None:
        with self._lock:
            state = self._states[name]
            if state.problem is None:
                return
            down_for = self._clock() - (state.down_since or 0.0)
            state.problem, state.down_since = None, None
        log.info("%s: reachable again after %.0f s", state.description, down_for)

    def is_up(self, name: str) -> bool:
        state = self._states.get(name)
        return state is None or state.problem is None

    def problems(self) -> list[str]:
        """One line per failing dependency, naming it: ``"registry: MLflow registry at ...: unreachable (...); ..."``."""
        with self._lock:
            return [f"{name}: {s.description}: {s.problem}" for name, s in self._states.items() if s.problem is not None]

    def states(self) -> list[tuple[str, bool, int]]:
        """(name, up, failures so far) of each declared dependency."""
        with self._lock:
            return [(name, s.problem is None, s.failures) for name, s in self._states.items()]

    def gauges(self) -> list[tuple[str, str, dict[str, str], float]]:
        """The values ``/metrics`` exposes: ``lambda_ml_dependency_up`` and
        ``lambda_ml_dependency_failures_total`` by dependency."""
        values: list[tuple[str, str, dict[str, str], float]] = []
        for name, up, failures in self.states():
            labels = {"dependency": name}
            values.append(("lambda_ml_dependency_up", "1 while the dependency answers, 0 while it fails.", labels, float(up)))
            values.append(("lambda_ml_dependency_failures_total", "Failed attempts to reach the dependency.", labels, failures))
        return values


def check_tcp_reachable(addresses: str, timeout_s: float = 2.0) -> None:
    """Return when one of ``addresses`` (``host:port,host:port``, Kafka's bootstrap servers)
    accepts a connection; OSError naming the last failure otherwise.

    >>> check_tcp_reachable("127.0.0.1:1", 0.5)
    Traceback (most recent call last):
    ...
    ConnectionRefusedError: [Errno 111] Connection refused
    """
    error: OSError = OSError(f"no address in {addresses!r}")
    for address in addresses.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
                return
        except (OSError, ValueError) as exc:
            error = exc if isinstance(exc, OSError) else OSError(f"bad address {address!r}")
    raise error


class KafkaProbe:
    """Checks every poll that a Kafka broker accepts connections, for the status of ``kafka``:
    the clients themselves stay quiet through an outage (a consumer's poll returns nothing, a
    producer holds its records), so the outage would otherwise go unseen."""

    def __init__(self, bootstrap_servers: str, dependency: Dependency, consequence: str) -> None:
        self.bootstrap_servers, self.dependency, self.consequence = bootstrap_servers, dependency, consequence

    @classmethod
    def for_clients(
        cls, bootstrap_servers: str, dependencies: DependencyStatus, model_updates: bool, prediction_log: Any | None
    ) -> KafkaProbe:
        """The probe of the service's Kafka clients: the model-update listener (``model_updates``)
        and the ``prediction_log`` (its ``buffer_size``), whose outage it says the effect of.

        >>> KafkaProbe.for_clients("k:9092", DependencyStatus(), True, None).consequence
        'model updates wait for the registry poll'
        """
        effects = ["model updates wait for the registry poll"] if model_updates else []
        if prediction_log is not None:
            effects.append(f"prediction records queue (up to {prediction_log.buffer_size})")
        return cls(bootstrap_servers, dependencies.declare("kafka", f"Kafka at {bootstrap_servers}"), ", ".join(effects))

    def try_reload(self) -> bool:
        """One check (the poller's call); True when a broker answered."""
        try:
            check_tcp_reachable(self.bootstrap_servers)
        except OSError as exc:
            self.dependency.failed(f"unreachable ({exc})", self.consequence)
            return False
        self.dependency.ok()
        return True

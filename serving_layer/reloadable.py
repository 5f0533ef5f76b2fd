"""One slot holding the value the service currently serves (a model, the batch views), loaded
by a function the slot is given and replaced atomically.

Requests read ``slot.current`` once and use that object to the end, so a reload never mixes
an old and a new value within one request. A failed load keeps the last good value.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class NotReadyError(RuntimeError):
    """The slot has no value yet; the message says why (e.g. no champion registered)."""


class Reloadable(Generic[T]):
    """A value loaded by ``loader`` and swapped in whole.

    ``get()`` returns the current value; when there is none it tries to load one, at most once
    every ``retry_interval_s`` seconds, so a service started before the first batch run picks
    up the first champion without a restart and without hammering the registry.

    >>> slot = Reloadable("answer", lambda: 42)
    >>> slot.current is None, slot.get(), slot.current
    (True, 42, 42)
    """

    def __init__(
        self,
        name: str,
        loader: Callable[[], T],
        retry_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._loader = loader
        self._retry_interval_s = retry_interval_s
        self._clock = clock
        self._current: T | None = None
        self._last_error: str | None = None
        self._last_attempt: float | None = None
        self._lock = threading.Lock()
        self.loads = 0  # successful loads
        self.failures = 0  # failed loads

    @property
    def current(self) -> T | None:
        """The value being served, or None before the first successful load."""
        return self._current

    @property
    def last_error(self) -> str | None:
        """Why the last load failed, or None if it succeeded (or none was tried)."""
        return self._last_error

    def swap(self, value: T) -> T | None:
        """Serve ``value`` from now on; return the value it replaces."""
        previous, self._current = self._current, value
        return previous

    def reload(self) -> T:
        """Load now and swap the new value in; on failure keep the old one and raise."""
        with self._lock:
            return self._load_locked()

    def try_reload(self) -> bool:
        """Load now; on failure keep the old value (the failure is logged and counted). False
        when the load failed, or kept part of the old value."""
        try:
            value = self.reload()
        except Exception:  # noqa: BLE001 - logged and counted by _load_locked
            return False
        return not self._is_partial(value)

    def get_or_report(self, problems: list[str]) -> T | None:
        """The current value (loading one if there is none), or None with the reason appended
        to ``problems``."""
        try:
            return self.get()
        except NotReadyError as exc:
            problems.append(str(exc))
            return None

    def get(self) -> T:
        """The current value, loading one first if there is none (throttled).

        Raises NotReadyError with the reason when no value is available.
        """
        value = self._current
        if value is not None:
            return value
        # Another thread is loading: answer at once rather than queue behind it.
        if not self._lock.acquire(blocking=False):
            raise NotReadyError(f"{self.name} is being loaded; retry shortly")
        try:
            if self._current is not None:
                return self._current
            now = self._clock()
            if self._last_attempt is not None and now - self._last_attempt < self._retry_interval_s:
                raise NotReadyError(self._last_error or f"{self.name} is not loaded")
            try:
                return self._load_locked()
            except Exception as exc:  # noqa: BLE001 - the reason is reported to the caller
                raise NotReadyError(self._last_error or str(exc)) from exc
        finally:
            self._lock.release()

    def _load_locked(self) -> T:
        self._last_attempt = self._clock()
        try:
            value = self._loader()
        except Exception as exc:
            self.failures += 1
            error = f"{self.name} could not be loaded: {exc}"
            self._on_failure(error, exc)
            self._last_error = error
            raise
        # A value that kept part of the last good one (an alias the registry could not refresh)
        # is served, but the load counts as a failure: /metrics must not show an outage as reloads.
        if self._is_partial(value):
            self.failures += 1
        else:
            self.loads += 1
        self._last_error = None
        self.swap(value)
        self._on_success()
        return value

    def _is_partial(self, value: T) -> bool:
        """True when ``value`` keeps part of the last good value because part of the load failed."""
        return False

    def _on_failure(self, error: str, exc: Exception) -> None:
        """Say that a load failed (``error`` names the slot and the reason): once per distinct
        reason, not at every poll of an outage."""
        if error != self._last_error:
            log.warning("%s", error)

    def _on_success(self) -> None:
        """A load succeeded (a slot reporting to a dependency's status says so here)."""


class BackgroundLoop:
    """A daemon thread running ``_run`` until ``stop()`` (``_stop`` tells it when)."""

    thread_name = "background"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        raise NotImplementedError


class Polled(Protocol):
    """What the poller calls: a slot's reload, or a dependency check; False when it failed."""

    def try_reload(self) -> bool: ...


class Poller(BackgroundLoop):
    """Reloads each slot (or runs each check) every ``interval_s`` seconds on one background
    thread, until ``stop()``.

    Loads happen here, off the request path; requests keep using the value they read, so a
    slow download or an unreachable registry never delays or fails a request.
    """

    thread_name = "reload-poller"

    def __init__(self, slots: Sequence[tuple[Polled, float]], tick_s: float = 0.2) -> None:
        super().__init__()
        self._slots = slots
        self._tick_s = tick_s

    def _run(self) -> None:
        due = [time.monotonic() + interval for _, interval in self._slots]
        while not self._stop.wait(self._tick_s):
            for n, (slot, interval) in enumerate(self._slots):
                if time.monotonic() < due[n]:
                    continue
                slot.try_reload()  # a failure is logged by the slot; the last good value stays
                due[n] = time.monotonic() + interval

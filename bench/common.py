"""What every benchmark shares: the machine it ran on, peak memory (summed RSS) and CPU time of
a process tree sampled with psutil, child processes run under a time limit, the result JSON and its
markdown tables.

A benchmark runs each measured workload in a child process of its own, so that the memory
figure is that workload's alone (a JVM never hands its heap back), and an over-long peer can
be stopped without losing the rest of the run:

    >>> import sys
    >>> done = run_measured([sys.executable, "-c", "import time; x = b'1' * 50_000_000; time.sleep(1)"], timeout_s=60)
    >>> done.ok, done.peak_memory_bytes > 50_000_000
    (True, True)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import psutil

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"
GIB = 1024**3


# --------------------------------------------------------------------------- command line


def bench_parser(name: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has: ``--quick`` and ``--out``."""
    parser = argparse.ArgumentParser(prog=f"bench/{name}.py", description=description)
    parser.add_argument("--quick", action="store_true", help="a small run that finishes in about a minute")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"result JSON (default: bench/results/{name}.json, or {name}.quick.json with --quick)",
    )
    return parser


def default_out(name: str, quick: bool) -> Path:
    return RESULTS_DIR / (f"{name}.quick.json" if quick else f"{name}.json")


# --------------------------------------------------------------------------- the machine


def machine_info(packages: Iterable[str] = ()) -> dict[str, Any]:
    """Cores, RAM, CPU model, OS, Python and Java, and the versions of ``packages``."""
    software: dict[str, str | None] = {"python": platform.python_version(), "java": _java_version()}
    for name in packages:
        try:
            software[name] = package_version(name)
        except PackageNotFoundError:
            software[name] = None
    return {
        "cores": os.cpu_count(),
        "cores_usable": _usable_cores(),
        "ram_gib": round(_meminfo_kib("MemTotal") / 1024**2, 1),
        "cpu": _cpu_model(),
        "os": platform.platform(),
        "software": software,
    }


def _usable_cores() -> int | None:
    """The cores this process may run on (its CPU affinity; macOS has none to set: all)."""
    affinity = getattr(psutil.Process(), "cpu_affinity", None)
    return len(affinity()) if affinity is not None else os.cpu_count()


def _meminfo_kib(key: str) -> int:
    """``MemTotal`` or ``MemAvailable`` in KiB, as Linux's ``/proc/meminfo`` names them."""
    memory = psutil.virtual_memory()
    fields = {"MemTotal": memory.total, "MemAvailable": memory.available}
    if key not in fields:
        raise KeyError(key)
    return fields[key] // 1024


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _java_version() -> str | None:
    try:
        done = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = (done.stderr or done.stdout).splitlines()
    return first[0].strip() if first else None


# --------------------------------------------------------------------------- memory and CPU


@dataclass(frozen=True)
class ProcessStat:
    pid: int
    parent: int
    name: str
    cpu_s: float  # user + system time so far
    rss_bytes: int
    vsize_bytes: int


def _read_stat(process: psutil.Process) -> ProcessStat | None:
    try:
        with process.oneshot():
            times, memory = process.cpu_times(), process.memory_info()
            return ProcessStat(
                pid=process.pid,
                parent=process.ppid(),
                name=process.name(),
                cpu_s=times.user + times.system,
                rss_bytes=memory.rss,
                vsize_bytes=memory.vms,
            )
    except psutil.Error:
        return None  # gone meanwhile, or not ours to read


def process_tree(root: int) -> list[ProcessStat]:
    """``root`` and all its descendants (children, grandchildren...) alive now."""
    try:
        top = psutil.Process(root)
        processes = [top, *top.children(recursive=True)]
    except psutil.Error:
        return []
    return [s for s in map(_read_stat, processes) if s is not None]


def tree_memory_bytes(tree: list[ProcessStat]) -> int:
    """Summed RSS of a process tree, where a child still sharing its parent's address space
    counts once: between its vfork and its exec, a helper the JVM spawns (Hadoop runs ``chmod``
    and the like that way) shows the JVM's whole RSS as its own.

    (PSS would split shared pages exactly, but reading it walks the page tables: a quarter of a
    second for a 5 GB JVM, too costly to sample.)
    """
    by_pid = {s.pid: s for s in tree}

    def shares_parent_memory(stat: ProcessStat) -> bool:
        parent = by_pid.get(stat.parent)
        return parent is not None and (parent.vsize_bytes, parent.rss_bytes) == (stat.vsize_bytes, stat.rss_bytes)

    return sum(s.rss_bytes for s in tree if not shares_parent_memory(s))


def load_average() -> float:
    """The 1-minute load average: how busy the machine was, this benchmark included."""
    return float(psutil.getloadavg()[0])


@dataclass(frozen=True)
class Sample:
    t: float  # unix time
    memory_bytes: int  # RSS summed over the tree (see tree_memory_bytes)
    cpu_s: float  # CPU seconds the tree has used so far (processes that ended keep counting)
    load: float  # 1-minute load average of the machine
    rss_by_process: dict[str, int]  # RSS of each process, keyed "name (pid)"


@dataclass
class MemorySampler:
    """Samples a process tree's memory (summed RSS), its CPU time and the machine's load on a
    thread until stopped. ``samples`` are kept, so a caller can look at any interval (say, the part of
    a child's life that was timed).
    """

    root: int
    interval_s: float = 0.5
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _cpu_seen: dict[int, float] = field(default_factory=dict)

    def start(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._run, name=f"sampler-{self.root}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> Sample:
        tree = process_tree(self.root)
        for stat in tree:
            self._cpu_seen[stat.pid] = stat.cpu_s
        taken = Sample(
            t=time.time(),
            memory_bytes=tree_memory_bytes(tree),
            cpu_s=sum(self._cpu_seen.values()),
            load=load_average(),
            rss_by_process={f"{s.name} ({s.pid})": s.rss_bytes for s in tree},
        )
        self.samples.append(taken)
        return taken

    def _within(self, start: float | None, end: float | None) -> list[Sample]:
        lo, hi = start if start is not None else float("-inf"), end if end is not None else float("inf")
        return [s for s in self.samples if lo <= s.t <= hi]

    def peak(self, start: float | None = None, end: float | None = None) -> int:
        """Highest memory (summed RSS), over the interval ``[start, end]`` (unix times) when given."""
        return max((s.memory_bytes for s in self._within(start, end)), default=0)

    def rss_at_peak(self, start: float | None = None, end: float | None = None) -> dict[str, int]:
        """RSS of each process of the tree at the peak sample."""
        samples = self._within(start, end)
        return max(samples, key=lambda s: s.memory_bytes).rss_by_process if samples else {}

    def peak_rss(self, start: float | None = None, end: float | None = None) -> int:
        """Highest RSS of any single process of the tree (the JVM, for a Spark job)."""
        return max((max(s.rss_by_process.values(), default=0) for s in self._within(start, end)), default=0)

    def cpu_s(self, start: float | None = None, end: float | None = None) -> float:
        """CPU seconds the tree used over the interval (between its first and last sample)."""
        samples = self._within(start, end)
        return samples[-1].cpu_s - samples[0].cpu_s if len(samples) > 1 else 0.0

    def mean_load(self, start: float | None = None, end: float | None = None) -> float | None:
        samples = self._within(start, end)
        return sum(s.load for s in samples) / len(samples) if samples else None


# --------------------------------------------------------------------------- child processes


def local_paths(root: Path) -> dict[str, str]:
    """Config overrides putting a benchmark's data, lake and checkpoints under ``root``."""
    return {"data_dir": str(root / "data"), "lake.root": str(root / "lake"), "lake.checkpoints": str(root / "checkpoints")}


def free_port() -> int:
    """A TCP port free on loopback now, for a component the benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



@dataclass(frozen=True)
class Measured:
    """A finished (or stopped) child process: exit code, wall time and memory samples."""

    returncode: int | None  # None when it was stopped at its time limit
    wall_s: float
    sampler: MemorySampler

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def peak_memory_bytes(self) -> int:
        return self.sampler.peak()


def run_measured(
    command: Sequence[str],
    timeout_s: float,
    env: dict[str, str] | None = None,
    cwd: Path = PROJECT_ROOT,
    interval_s: float = 0.5,
) -> Measured:
    """Run ``command`` in its own process group, sampling its tree's memory; after
    ``timeout_s`` the whole group is stopped (SIGTERM, then SIGKILL) and ``returncode`` is None.

    The child's output goes to this process's stdout/stderr, so a long run's log shows it.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout must be positive, got {timeout_s}")
    started = time.monotonic()
    process = subprocess.Popen(
        list(command), cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, start_new_session=True
    )
    sampler = MemorySampler(process.pid, interval_s).start()
    try:
        returncode: int | None = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop_group(process)
        returncode = None
    except BaseException:
        _stop_group(process)  # Ctrl-C or an error here: leave no orphaned JVM behind
        raise
    finally:
        sampler.stop()
    return Measured(returncode, time.monotonic() - started, sampler)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    for sig, grace_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------- output


def write_result(result: dict[str, Any], path: Path) -> Path:
    """Write the result JSON atomically (a half-written file never replaces a good one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    partial.replace(path)
    return path


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table: what a benchmark prints and what the benchmarks page
    holds (bench/report.py). Cells are shown as given, so the caller formats its figures; None
    is an empty cell.

    >>> print(markdown_table(["size", "s"], [["1M", "1.5"], ["10M", None]]))
    | size | s |
    |---|---|
    | 1M | 1.5 |
    | 10M | |
    """

    def line(cells: Sequence[object]) -> str:
        shown = ["" if c is None else str(c).replace("|", "\\|") for c in cells]
        return "|" + "|".join(f" {c} " if c else " " for c in shown) + "|"

    return "\n".join([line(headers), "|" + "|".join("---" for _ in headers) + "|", *(line(r) for r in rows)])


def gib(n_bytes: int | None) -> float | None:
    """Bytes as GiB rounded to 2 decimals (None stays None)."""
    return None if n_bytes is None else round(n_bytes / GIB, 2)


def human_count(n: int) -> str:
    """``1_000_000`` -> ``"1M"``, ``100_000`` -> ``"100k"``, ``2_500_000`` -> ``"2.5M"``.

    >>> [human_count(n) for n in (100_000, 1_000_000, 2_500_000, 999)]
    ['100k', '1M', '2.5M', '999']
    """
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return str(n)


def parse_count(text: str) -> int:
    """``"10M"`` -> 10_000_000, ``"100k"`` -> 100_000, ``"2500"`` -> 2500.

    >>> [parse_count(t) for t in ("10M", "100k", "2.5m", "2500")]
    [10000000, 100000, 2500000, 2500]
    """
    raw = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(raw[-1:], 1)
    number = raw[:-1] if scale > 1 else raw
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"a count like 100k, 1M or 2500, not {text!r}") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"a count is a positive whole number, not {text!r}")
    return int(value)

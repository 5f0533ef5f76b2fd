"""Point events with a known ground truth: ``k`` clusters whose true centres move in a straight
line at a set speed over event time.

Each event is a flat JSON object, ``{"event_id", "event_time", "source_id", "x0", "x1", ...}``,
one float field per dimension, so a generic ingest can validate it field by field; the source
(``src-0`` .. ``src-<sources - 1>``, drawn uniformly) is a string key the declared features
aggregate per. Event ``i`` happens
at ``start + i / events_per_hour`` hours, belongs to a cluster drawn uniformly, and lies at that
cluster's true centre at its event time plus Gaussian noise of standard deviation ``spread``
per dimension. :meth:`MovingClusters.true_centres` says where the centres are at any time.
The same settings and seed give the same events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from numpy.typing import NDArray

from lambda_ml.producer import iso

# Tries at drawing initial centres at least ``separation`` apart before giving up.
_PLACEMENT_TRIES = 1000


@dataclass(frozen=True)
class PointBatch:
    """Generated events with their ground truth, row for row."""

    events: list[dict[str, Any]]
    points: NDArray[np.float64]  # (n, d), the events' coordinates
    clusters: NDArray[np.int64]  # (n,), the true cluster of each event
    hours: NDArray[np.float64]  # (n,), each event's time in hours after ``start``


@dataclass(frozen=True)
class MovingClusters:
    """The generator's settings; the initial centres and the directions of travel are drawn
    from ``seed``.

    >>> gen = MovingClusters(k=2, dimensions=3, seed=1)
    >>> batch = gen.sample(2)
    >>> sorted(batch.events[0])
    ['event_id', 'event_time', 'source_id', 'x0', 'x1', 'x2']
    >>> batch.events[1]["event_time"]
    '2026-01-01T00:00:01.000Z'
    """

    k: int = 4
    dimensions: int = 2
    spread: float = 1.0  # standard deviation of the noise, per dimension
    separation: float = 10.0  # the least distance between two initial centres
    speed_per_hour: float = 0.0  # distance each centre travels per hour of event time
    events_per_hour: float = 3600.0
    start: datetime = field(default_factory=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    seed: int = 0
    sources: int = 8  # distinct source_id values

    def __post_init__(self) -> None:
        if self.sources < 1:
            raise ValueError(f"sources must be at least 1, got {self.sources}")
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {self.dimensions}")
        for name in ("spread", "separation", "speed_per_hour"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not np.isfinite(self.events_per_hour) or self.events_per_hour <= 0:
            raise ValueError(f"events_per_hour must be a finite number > 0, got {self.events_per_hour!r}")
        if self.start.tzinfo is None:
            raise ValueError("start must be a timezone-aware datetime")

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The coordinate fields of an event, in vector order."""
        return tuple(f"x{i}" for i in range(self.dimensions))

    def initial_centres(self) -> NDArray[np.float64]:
        """The (k, d) true centres at ``start``, each pair at least ``separation`` apart: drawn
        uniformly in a cube large enough to hold them, redrawn until they are."""
        rng = np.random.default_rng([self.seed, 0])
        side = 2.0 * self.separation * max(1.0, self.k ** (1.0 / self.dimensions))
        for _ in range(_PLACEMENT_TRIES):
            centres = rng.uniform(-side / 2, side / 2, size=(self.k, self.dimensions))
            gaps = np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=2)
            if self.k == 1 or gaps[np.triu_indices(self.k, 1)].min() >= self.separation:
                return centres
        raise ValueError(f"could not place {self.k} centres {self.separation} apart in {self.dimensions} dimension(s)")

    def velocities(self) -> NDArray[np.float64]:
        """The (k, d) velocity of each centre per hour: a random direction, ``speed_per_hour``
        long."""
        rng = np.random.default_rng([self.seed, 1])
        directions = rng.normal(size=(self.k, self.dimensions))
        norms = np.linalg.norm(directions, axis=1, keepdims=True)
        return self.speed_per_hour * directions / np.where(norms > 0, norms, 1.0)

    def hours_since_start(self, at: datetime) -> float:
        if at.tzinfo is None:
            raise ValueError("at must be a timezone-aware datetime")
        return (at - self.start) / timedelta(hours=1)

    def true_centres(self, at: datetime) -> NDArray[np.float64]:
        """Where the k centres are at event time ``at`` (before ``start`` too: the motion is a
        straight line)."""
        return self.initial_centres() + self.hours_since_start(at) * self.velocities()

    def event_time(self, index: int) -> datetime:
        """The event time of event number ``index``."""
        return self.start + timedelta(hours=index / self.events_per_hour)

    def sample(self, count: int, first_index: int = 0) -> PointBatch:
        """Events ``first_index`` to ``first_index + count - 1``. The draws depend on the seed
        and ``first_index``, so a stream generated in consecutive slices is reproducible."""
        if count < 0 or first_index < 0:
            raise ValueError(f"count and first_index must be >= 0, got {count} and {first_index}")
        rng = np.random.default_rng([self.seed, 2, first_index])
        indices = np.arange(first_index, first_index + count)
        hours = indices / self.events_per_hour
        clusters = rng.integers(0, self.k, size=count)
        centres = self.initial_centres()[clusters] + hours[:, None] * self.velocities()[clusters]
        points = centres + rng.normal(scale=self.spread, size=(count, self.dimensions))
        sources = rng.integers(0, self.sources, size=count)
        names = self.feature_names
        events = [
            {
                "event_id": f"pt-{self.seed}-{index}",
                "event_time": iso(self.event_time(int(index))),
                "source_id": f"src-{source}",
                **{name: float(value) for name, value in zip(names, row, strict=True)},
            }
            for index, source, row in zip(indices, sources, points, strict=True)
        ]
        return PointBatch(events, points, clusters.astype(np.int64), hours)

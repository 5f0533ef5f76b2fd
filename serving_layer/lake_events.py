"""Bronze as the service reads it for features at a past time: the newest event time it holds,
and the feature events of the buckets asked about (``lambda_ml.partial_buckets``), cached.

A bucket's row in the views counts all of the bucket's events, so it gives the features at
``t`` exactly only when no event of the lake is at or after ``t``: :meth:`LakeEvents.covers`
tells. Otherwise the service reads ``t``'s bucket from bronze (the master dataset), at the
bronze versions pinned when the views were loaded, derives its feature events with the
application's rule (``FeatureEvents.in_memory``) and takes the part before ``t``. A bucket is
read once (each event type from as far before it as the rule needs, pruned by the files'
event-time statistics) and kept, up to ``serving.point_in_time_buckets`` buckets, the
least recently used dropped first; the cache goes with the views it was loaded with, so it is
refreshed when they are.
"""

from __future__ import annotations

# pyarrow before deltalake (see serving_layer.views).
import pyarrow  # isort: skip
import pyarrow.compute as pc  # isort: skip
from deltalake import DeltaTable  # isort: skip
from deltalake.exceptions import DeltaError, TableNotFoundError  # isort: skip

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from lambda_ml.buckets import from_micros, to_micros
from lambda_ml.config import PlatformConfig
from lambda_ml.apps import FeatureEvents, load_application
from lambda_ml.partial_buckets import BucketPart, bucket_part
from lambda_ml.schemas import EventType, event_type

log = logging.getLogger(__name__)

_TIME = pyarrow.timestamp("us", tz="UTC")
# Delta keeps timestamp statistics in milliseconds, rounded down: a file's newest event may be
# up to this much later than its statistic says.
_STATISTICS_SLACK_US = 999


class LakeEventsError(RuntimeError):
    """Bronze cannot be read, so features at a past time cannot be computed exactly."""


def _micros(column: pyarrow.ChunkedArray | pyarrow.Array) -> list[int]:
    return [int(v) for v in column.cast(_TIME).cast(pyarrow.int64()).to_pylist()]


class BronzeTable:
    """One bronze table at a pinned Delta version (None: no table yet, so no events): the given
    ``version``, by default its latest."""

    def __init__(self, cfg: PlatformConfig, event: EventType, version: int | None = None) -> None:
        self.event = event
        self.path = cfg.lake.table("bronze", event.name)
        try:
            self.table: DeltaTable | None = DeltaTable(self.path, version=version)
        except TableNotFoundError:
            if version is not None:
                raise LakeEventsError(f"no bronze table at {self.path} to read at version {version}") from None
            self.table = None
        except (DeltaError, OSError) as exc:
            raise LakeEventsError(f"cannot read the bronze table at {self.path}: {exc}") from exc

    @property
    def version(self) -> int | None:
        return None if self.table is None else self.table.version()

    def newest_event(self) -> int | None:
        """An upper bound of the newest event time (epoch microseconds), None when empty: from
        the files' statistics, or from the column itself where a file has none."""
        if self.table is None:
            return None
        actions = pyarrow.table(self.table.get_add_actions(flatten=True))
        if actions.num_rows == 0:
            return None
        column = "max.event_time"
        if column in actions.column_names and actions.column(column).null_count == 0:
            return max(_micros(actions.column(column))) + _STATISTICS_SLACK_US
        times = _micros(self.table.to_pyarrow_dataset().to_table(columns=["event_time"]).column("event_time"))
        return max(times, default=None)

    def rows(self, first: int, last: int) -> list[dict[str, Any]]:
        """The event fields of the rows (every copy) with an event time in ``[first, last)``,
        event times as epoch microseconds."""
        if self.table is None:
            return []
        low, high = (pyarrow.scalar(v, type=pyarrow.int64()).cast(_TIME) for v in (first, last))
        when = pc.field("event_time")
        found = self.table.to_pyarrow_dataset().to_table(columns=self.event.field_names, filter=(when >= low) & (when < high))
        rows = found.to_pylist()
        for row, micros in zip(rows, _micros(found.column("event_time"))):
            row["event_time"] = micros
        return rows


class LakeEvents:
    """What bronze holds at the versions pinned when the views were loaded: the newest event
    time, and the feature events of the buckets asked about (read on first use, cached).

    ``versions`` (event type -> Delta version) pins tables at older versions than their latest,
    e.g. at the horizon a check recomputes the views at (``lambda-ml verify``)."""

    def __init__(self, cfg: PlatformConfig, rule: FeatureEvents | None = None, versions: Mapping[str, int] | None = None) -> None:
        self.cfg = cfg
        self.rule = rule if rule is not None else load_application(cfg).features
        pinned = versions or {}
        self.tables = {
            name: BronzeTable(cfg, event_type(cfg, name), pinned.get(name)) for name in cfg.features.source_event_types
        }
        newest = [t for t in (table.newest_event() for table in self.tables.values()) if t is not None]
        self.newest: int | None = max(newest) if newest else None
        self.width = to_micros(cfg.features.bucket_width)
        self.keep = cfg.serving.point_in_time_buckets
        self._parts: OrderedDict[int, BucketPart] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # buckets read from bronze

    def covers(self, micros: int) -> bool:
        """True when bronze may hold an event at or after ``micros`` (so a bucket's row may count
        events after it); False when every event is before it."""
        return self.newest is not None and micros <= self.newest

    def is_cached(self, micros: int) -> bool:
        """True when the bucket holding ``micros`` is in memory (no bronze read needed)."""
        return micros - micros % self.width in self._parts

    def bucket(self, micros: int) -> BucketPart:
        """The feature events of the bucket holding ``micros``, read from bronze once."""
        start = micros - micros % self.width
        part = self._parts.get(start)
        if part is None:
            with self._lock:  # one read at a time; buckets in memory are served meanwhile
                part = self._parts.get(start)  # read by another thread while this one waited?
                if part is None:
                    part = self._read(start)
                    self._parts[start] = part
                    if len(self._parts) > self.keep:
                        self._parts.popitem(last=False)
        try:
            self._parts.move_to_end(start)  # the least recently used goes first
        except KeyError:
            pass  # dropped by a read meanwhile: it was the least recently used
        return part

    def _read(self, start: int) -> BucketPart:
        began = time.monotonic()
        end = start + self.width
        at = from_micros(start).isoformat()
        try:
            rows = {
                name: table.rows(start - self.rule.lookback_micros(self.cfg, name), end) for name, table in self.tables.items()
            }
        except (DeltaError, OSError) as exc:
            raise LakeEventsError(f"cannot read bronze for the events of the bucket starting {at}: {exc}") from exc
        part = bucket_part(self.rule.in_memory(rows, self.cfg, start, end), self.cfg.features, start)
        self.reads += 1
        log.info(
            "read the bucket starting %s from bronze (%s): %s, %d feature event(s) over all entities, in %.0f ms",
            at, ", ".join(f"{name} v{table.version}" for name, table in self.tables.items()),
            ", ".join(f"{len(found)} {name} row(s)" for name, found in rows.items()), part.size,
            (time.monotonic() - began) * 1000,
        )  # fmt: skip
        return part

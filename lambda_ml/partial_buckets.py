"""The part of one event-time bucket before an instant, in plain Python (no Spark).

A window feature at ``t`` covers ``[bucket_start(t) - W, t)``: the whole buckets before ``t``'s
bucket, which the views hold, and the events of ``t``'s own bucket strictly before ``t``, which
no per-bucket row can give (the bucket's row also counts its events at or after ``t``). The
training set computes that part with Spark (``lambda_ml.features.add_window_features``); the
serving layer computes it here from the bucket's events read from bronze, following the same
definitions:

- an event counts once (the earliest copy of an ``event_id``, as ``features.dedup_events``);
- the **feature events** are the application's (``FeatureEvents.in_memory``, the same rule as
  its Spark one: each declared event as it is, or, for the click-through application, an
  impression at its time and an attributed click at the click's time with its impression's
  fields);
- each declared aggregate folds the feature events of its kind (``features.aggregates``: a
  count, or the sum, min or max of a measure), the same declarations the Spark code reads.

A :class:`BucketPart` holds, per entity and key, the bucket's feature events in time order with
each aggregate's running value, so the part before any ``t`` is one binary search.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lambda_ml.config import FeaturesConfig

Value = float | int | None


@dataclass(frozen=True)
class FeatureEvent:
    """One event an aggregate counts: ``kind`` (the event type its ``events`` names), its time,
    and the fields the declarations read (entity keys and measures)."""

    kind: str
    micros: int  # event time, epoch microseconds
    fields: Mapping[str, Any]


def earliest_copies(rows: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """One row per ``event_id``: the copy with the earliest ``event_time`` (bronze keeps every
    delivery; a resent event counts once).

    >>> sorted(earliest_copies([{"event_id": "a", "event_time": 5}, {"event_id": "a", "event_time": 3}]).values(),
    ...        key=str)
    [{'event_id': 'a', 'event_time': 3}]
    """
    kept: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        seen = kept.get(row["event_id"])
        if seen is None or row["event_time"] < seen["event_time"]:
            kept[row["event_id"]] = row
    return kept


def declared_feature_events(
    rows: Mapping[str, Iterable[Mapping[str, Any]]], first: int, last: int
) -> list[FeatureEvent]:
    """Each event type's events with a time in ``[first, last)``, as they are (the rule of
    ``lambda_ml.features.DeclaredFeatureEvents``): the earliest copy of each.

    >>> rows = {"views": [{"event_id": "a", "event_time": 150, "page": "p"}, {"event_id": "a", "event_time": 150, "page": "p"},
    ...                   {"event_id": "b", "event_time": 250, "page": "q"}]}
    >>> [(e.kind, e.micros, e.fields["page"]) for e in declared_feature_events(rows, 100, 200)]
    [('views', 150, 'p')]
    """
    return [
        FeatureEvent(kind, row["event_time"], row)
        for kind, events in rows.items()
        for row in earliest_copies(events).values()
        if first <= row["event_time"] < last
    ]


def _step(aggregation: str, running: Value, value: Value) -> Value:
    """One event folded into an aggregate's running value (missing values are ignored)."""
    if value is None:
        return running
    if running is None:
        return 1 if aggregation == "count" else value
    if aggregation == "count":  # counts the events with a value, as Spark's count
        return running + 1
    if aggregation == "sum":
        return running + value
    return min(running, value) if aggregation == "min" else max(running, value)


@dataclass(frozen=True)
class BucketPart:
    """One bucket's feature events per entity key, in time order, with every aggregate's running
    value after each event: ``before`` gives the bucket's part strictly before an instant."""

    start: int  # the bucket's start, epoch microseconds
    aggregates: tuple[str, ...]  # the value order of ``before``
    # entity -> key -> (event times ascending, running values after each event)
    events: Mapping[str, Mapping[tuple[str, ...], tuple[tuple[int, ...], tuple[tuple[Value, ...], ...]]]]

    @property
    def empty(self) -> tuple[Value, ...]:
        return (None,) * len(self.aggregates)

    def before(self, entity: str, key: tuple[str, ...], micros: int) -> tuple[Value, ...]:
        """Each aggregate over the key's events in ``[start, micros)``: None where no event counts
        (so ``lambda_ml.buckets`` combines it as an empty bucket)."""
        found = self.events[entity].get(key)
        if found is None:
            return self.empty
        times, running = found
        n = bisect_left(times, micros)  # events strictly before micros
        return running[n - 1] if n else self.empty

    @property
    def size(self) -> int:
        """Feature events held, over every entity."""
        return sum(len(times) for keys in self.events.values() for times, _ in keys.values())


def bucket_part(events: Sequence[FeatureEvent], features: FeaturesConfig, start: int) -> BucketPart:
    """The :class:`BucketPart` of one bucket's feature events, folded as ``features`` declares.

    >>> from lambda_ml.config import FeaturesConfig
    >>> cfg = FeaturesConfig.model_validate({
    ...     "event_type": "impressions", "bucket": "1h", "windows": ["1h"], "entities": {"user": {"keys": ["user_id"]}},
    ...     "aggregates": {"shown": {"events": "impressions", "aggregation": "count"},
    ...                    "top": {"events": "impressions", "aggregation": "min", "measure": "position"}}})
    >>> part = bucket_part([FeatureEvent("impressions", 20, {"user_id": "u", "position": 3}),
    ...                     FeatureEvent("impressions", 10, {"user_id": "u", "position": 4})], cfg, 0)
    >>> part.before("user", ("u",), 10), part.before("user", ("u",), 11), part.before("user", ("u",), 21)
    ((None, None), (1, 4.0), (2, 3.0))
    """
    declared = [(a.events, a.measure, a.aggregation) for a in features.aggregates.values()]
    ordered = sorted(events, key=lambda e: e.micros)
    by_entity: dict[str, dict[tuple[str, ...], tuple[tuple[int, ...], tuple[tuple[Value, ...], ...]]]] = {}
    for name, entity in features.entities.items():
        grouped: dict[tuple[str, ...], list[FeatureEvent]] = {}
        for event in ordered:
            grouped.setdefault(tuple(str(event.fields[k]) for k in entity.keys), []).append(event)
        keyed = {}
        for key, mine in grouped.items():
            running: list[tuple[Value, ...]] = []
            values: tuple[Value, ...] = (None,) * len(declared)
            for event in mine:
                values = tuple(
                    value if kind != event.kind else _step(aggregation, value, 1 if measure is None else _number(event.fields[measure]))
                    for value, (kind, measure, aggregation) in zip(values, declared)
                )
                running.append(values)
            keyed[key] = (tuple(e.micros for e in mine), tuple(running))
        by_entity[name] = keyed
    return BucketPart(start, tuple(features.aggregates), by_entity)


def _number(value: Any) -> float | None:
    # A measure counts as a double, as in the Spark aggregation (null is no value).
    return None if value is None else float(value)

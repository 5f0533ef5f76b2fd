"""Event-time buckets and the window features read from them, in plain Python (no Spark).

The serving layer computes a request's features here, from the view rows it loaded;
``lambda_ml.features`` computes the same declarations with Spark for training. Both follow one
definition: at scoring time ``t``, window ``W`` covers the events in ``[bucket_start(t) - W, t)``.
At serving time those are the stored buckets starting in ``[bucket_start(t) - W, bucket_start(t)]``
when the current bucket holds only events before ``t`` (scoring now); otherwise the buckets
before ``t``'s and the current bucket's part before ``t`` (``WindowPlan.add_features``). The
lifetime window (``all``) covers every stored bucket up to ``t``'s bucket in the same way: read
off running totals each entity's rows work out once, not summed bucket by bucket at every
request.

Buckets combine as monoids: counts and sums add (0 when empty), min and max take the smallest
or largest value present (None when empty).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache, partial
from typing import Any, cast

from lambda_ml import contract
from lambda_ml.config import FeaturesConfig, window_span

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_micros(value: datetime | timedelta) -> int:
    """A UTC instant as epoch microseconds, or a duration in microseconds, exactly.

    >>> to_micros(datetime(1970, 1, 1, 0, 0, 1, 5, tzinfo=UTC)), to_micros(timedelta(hours=1))
    (1000005, 3600000000)
    """
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{value} has no time zone; event times are UTC instants")
        value = value - _EPOCH
    return (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds


def from_micros(micros: int) -> datetime:
    """Epoch microseconds as a UTC datetime."""
    return _EPOCH + timedelta(microseconds=micros)


def bucket_start(at: datetime, width: timedelta) -> datetime:
    """Start of the bucket holding ``at``; buckets are aligned on the epoch, as Spark's ``window``.

    >>> bucket_start(datetime(2026, 1, 1, 10, 59, 59, tzinfo=UTC), timedelta(hours=1))
    datetime.datetime(2026, 1, 1, 10, 0, tzinfo=datetime.timezone.utc)
    """
    micros, step = to_micros(at), to_micros(width)
    return from_micros(micros - micros % step)


def combine(aggregation: str, values: Iterable[float | None]) -> float | None:
    """Combine bucket values of one aggregate (the monoid's operation over many).

    >>> combine("count", [3, None, 2]), combine("sum", []), combine("min", [4.0, None, 2.0]), combine("max", [])
    (5.0, 0.0, 2.0, None)
    """
    present = [float(v) for v in values if v is not None]
    if aggregation in ("count", "sum"):
        return float(sum(present))
    if aggregation == "min":
        return min(present, default=None)
    if aggregation == "max":
        return max(present, default=None)
    raise ValueError(f"unknown aggregation {aggregation!r}: expected count, sum, min or max")


def _sum_of(values: Sequence[float | None]) -> float:
    try:
        return float(sum(cast("Sequence[float]", values)))
    except TypeError:  # a missing value among them
        return float(sum(v for v in values if v is not None))


def _extreme_of(pick: Callable[..., float | None], values: Sequence[float | None]) -> float | None:
    try:
        value = pick(values, default=None)  # min or max
    except TypeError:  # a missing value among them
        value = pick((v for v in values if v is not None), default=None)
    return None if value is None else float(value)


# combine() for a sequence of bucket values, one function per aggregation: the service calls
# these a few dozen times per request row, so each skips combine()'s dispatch and list.
COMBINE_SEQUENCE: Mapping[str, Callable[[Sequence[float | None]], float | None]] = {
    "count": _sum_of, "sum": _sum_of, "min": partial(_extreme_of, min), "max": partial(_extreme_of, max),
}  # fmt: skip


def ratio(numerator: float, denominator: float, prior_alpha: float, prior_beta: float) -> float:
    """``(numerator + alpha) / (denominator + alpha + beta)``: a rate shrunk towards the prior.

    >>> ratio(0, 0, 1, 20), ratio(3, 10, 1, 20)
    (0.047619047619047616, 0.12903225806451613)
    """
    return (numerator + prior_alpha) / (denominator + prior_alpha + prior_beta)


@dataclass(frozen=True)
class EntityBuckets:
    """One entity's bucket rows: starts in ascending epoch microseconds, one value column per
    aggregate (a missing column reads as empty)."""

    starts: tuple[int, ...] = ()
    values: Mapping[str, tuple[float | None, ...]] = field(default_factory=dict)
    # Running combinations per aggregate (see running()), filled on first use: the rows are
    # loaded once and read by many requests.
    _running: dict[str, tuple[float | None, ...]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if any(later <= earlier for earlier, later in zip(self.starts, self.starts[1:])):
            raise ValueError("bucket starts must be strictly ascending (one row per bucket)")
        for name, column in self.values.items():
            if len(column) != len(self.starts):
                raise ValueError(f"aggregate {name} has {len(column)} values for {len(self.starts)} buckets")

    def between(self, aggregate: str, first: int, last: int) -> tuple[float | None, ...]:
        """The aggregate's values in the buckets starting in ``[first, last]`` (microseconds)."""
        column = self.values.get(aggregate)
        if column is None:
            return ()
        return column[bisect_left(self.starts, first) : bisect_right(self.starts, last)]

    def running(self, aggregate: str, aggregation: str) -> tuple[float | None, ...]:
        """The aggregate's combination over the first ``n`` buckets, for ``n`` = 0 .. len(starts):
        the lifetime window up to any bucket is one look-up. Worked out once per aggregate.

        >>> EntityBuckets((0, 10, 20), {"n": (1, None, 2), "low": (None, 5.0, 3.0)}).running("low", "min")
        (None, None, 5.0, 3.0)
        >>> EntityBuckets((0, 10, 20), {"n": (1, None, 2)}).running("n", "count")
        (0.0, 1.0, 1.0, 3.0)
        """
        cached = self._running.get(aggregate)
        if cached is not None:
            return cached
        column = self.values.get(aggregate, (None,) * len(self.starts))
        combine_values = COMBINE_SEQUENCE[aggregation]
        totals: list[float | None] = [combine_values(())]
        for value in column:
            totals.append(combine_values((totals[-1], value)))
        self._running[aggregate] = cached = tuple(totals)
        return cached


NO_BUCKETS = EntityBuckets()


@lru_cache(maxsize=256)
def window_micros(window: str) -> int | None:
    """A window's length in microseconds (parsed once: the service reads windows per request),
    None for the lifetime window.

    >>> window_micros("1h"), window_micros("all")
    (3600000000, None)
    """
    span = window_span(window)
    return None if span is None else to_micros(span)


def reach_micros(features: FeaturesConfig) -> int | None:
    """How far before the current bucket the declared windows reach, in microseconds; None
    when one of them is the lifetime window (all history).

    >>> from lambda_ml.config import FeaturesConfig
    >>> base = {"event_type": "impressions", "bucket": "1h", "entities": {"u": {"keys": ["user_id"]}}, "aggregates": {"n": {"events": "impressions", "aggregation": "count"}}}
    >>> [reach_micros(FeaturesConfig.model_validate({**base, "windows": w})) for w in (["1h", "2h"], ["1h", "all"])]
    [7200000000, None]
    """
    lengths = [window_micros(w) for w in features.windows]
    return None if None in lengths else max(cast("list[int]", lengths))


def merge_entity_buckets(parts: Iterable[EntityBuckets], aggregations: Mapping[str, str]) -> EntityBuckets:
    """The ⊕ of one entity's bucket rows: rows of the same bucket combined per aggregate by its
    monoid (``aggregations``: aggregate -> count, sum, min or max). Python's twin of
    ``lambda_ml.features.merge_buckets``: batch view ⊕ increments after its horizon.

    >>> a = EntityBuckets((0, 10), {"n": (1, 2), "low": (5.0, None)})
    >>> b = EntityBuckets((10, 20), {"n": (3, 4), "low": (7.0, 1.0)})
    >>> merge_entity_buckets([a, b], {"n": "count", "low": "min"})
    EntityBuckets(starts=(0, 10, 20), values={'n': (1, 5, 4), 'low': (5.0, 7.0, 1.0)})
    """
    parts = [p for p in parts if p.starts]
    if len(parts) == 1:
        return parts[0]
    starts = sorted({start for part in parts for start in part.starts})
    merged: dict[str, tuple[float | None, ...]] = {}
    for name, aggregation in aggregations.items():
        cells: dict[int, list[float | None]] = {start: [] for start in starts}
        for part in parts:
            column = part.values.get(name)
            if column is not None:
                for start, value in zip(part.starts, column):
                    cells[start].append(value)
        merged[name] = tuple(combine_exact(aggregation, cells[start]) for start in starts)
    return EntityBuckets(tuple(starts), merged)


def combine_exact(aggregation: str, values: list[float | None]) -> float | None:
    """Like :func:`combine`, keeping integers integers (counts stay exact and print as counts)."""
    present = [v for v in values if v is not None]
    if aggregation in ("count", "sum"):
        return sum(present)
    if aggregation in ("min", "max"):
        return (min if aggregation == "min" else max)(present, default=None)
    raise ValueError(f"unknown aggregation {aggregation!r}: expected count, sum, min or max")


def window_features(features: FeaturesConfig, entity: str, buckets: EntityBuckets, at: datetime) -> dict[str, float]:
    """Every window feature of one entity at scoring time ``at``, named as in the contract.

    >>> from lambda_ml.config import FeaturesConfig
    >>> cfg = FeaturesConfig.model_validate({
    ...     "event_type": "impressions", "bucket": "1h", "windows": ["1h", "2h"], "entities": {"user": {"keys": ["user_id"]}},
    ...     "aggregates": {"clicks": {"events": "clicks", "aggregation": "count"},
    ...                    "shown": {"events": "impressions", "aggregation": "count"}},
    ...     "ratios": {"ctr": {"numerator": "clicks", "denominator": "shown", "prior_alpha": 1, "prior_beta": 1}}})
    >>> hour = to_micros(timedelta(hours=1))
    >>> rows = EntityBuckets((7 * hour, 8 * hour, 9 * hour), {"clicks": (1, 1, 2), "shown": (2, 4, 5)})
    >>> window_features(cfg, "user", rows, from_micros(9 * hour + 60_000_000))  # 09:01: 08:00-09:01, 07:00-09:01
    {'user_clicks_1h': 3.0, 'user_clicks_2h': 4.0, 'user_shown_1h': 9.0, 'user_shown_2h': 11.0, 'user_ctr_1h': 0.36363636363636365, 'user_ctr_2h': 0.38461538461538464}
    """
    found: dict[str, float] = {}
    window_plan(features, entity).add_features(found, buckets, to_micros(at))
    return found


@dataclass(frozen=True)
class WindowPlan:
    """What :func:`window_features` needs of the declarations for one entity, worked out once
    (the service computes every entity's features per request row)."""

    width: int  # of a bucket, in microseconds
    lengths: tuple[int | None, ...]  # of each window, in microseconds (None: lifetime), in declaration order
    # (aggregate, its aggregation, how its bucket values combine, value of an empty window, its
    # feature per window)
    aggregates: tuple[tuple[str, str, Callable[[Sequence[float | None]], float | None], float | None, tuple[str, ...]], ...]
    # (index of the numerator in aggregates, of the denominator, prior alpha, beta, feature per window)
    ratios: tuple[tuple[int, int, float, float, tuple[str, ...]], ...]

    def add_features(
        self, found: dict[str, Any], buckets: EntityBuckets, micros: int, partial: Sequence[float | None] | None = None
    ) -> None:
        """Add the entity's window features at ``micros`` (epoch microseconds) to ``found`` (a
        row's features so far), in the contract's order: aggregates by name then window, then
        ratios.

        ``partial`` (one value per aggregate, in declaration order) is the current bucket's part
        before ``micros``; the current bucket's row in ``buckets`` then does not count. Without
        it the row counts whole: exact when no event of the bucket is at or after ``micros``."""
        current = micros - micros % self.width
        starts = buckets.starts
        last = bisect_right(starts, current) if partial is None else bisect_left(starts, current)
        # The same buckets for every aggregate of a window: search them once per window.
        firsts = [None if length is None else bisect_left(starts, current - length, 0, last) for length in self.lengths]
        values = buckets.values
        totals: list[list[float | None]] = []
        for index, (name, aggregation, combine_values, empty, names) in enumerate(self.aggregates):
            column = values.get(name, ())
            extra = None if partial is None else partial[index]
            per_window = []
            for first in firsts:
                if first is None:  # the lifetime window: every bucket before ``last``, read off running totals
                    whole = buckets.running(name, aggregation)[last]
                    per_window.append(whole if extra is None else combine_values((whole, extra)))
                else:
                    per_window.append(combine_values(column[first:last] if extra is None else (*column[first:last], extra)))
            for feature, value in zip(names, per_window):
                found[feature] = empty if value is None else value
            totals.append(per_window)
        for numerator, denominator, alpha, beta, names in self.ratios:
            for feature, top, bottom in zip(names, totals[numerator], totals[denominator]):
                assert top is not None and bottom is not None  # counts and sums are never None
                found[feature] = ratio(top, bottom, alpha, beta)


_PLANS: dict[tuple[int, str], tuple[FeaturesConfig, WindowPlan]] = {}


def window_plan(features: FeaturesConfig, entity: str) -> WindowPlan:
    """The window plan of one declared entity (made once per config object)."""
    cached = _PLANS.get((id(features), entity))
    if cached is not None and cached[0] is features:
        return cached[1]
    name_of = contract.window_feature_name
    aggregates = list(features.aggregates)
    plan = WindowPlan(
        width=to_micros(features.bucket_width),
        lengths=tuple(window_micros(w) for w in features.windows),
        aggregates=tuple(
            (n, a.aggregation, COMBINE_SEQUENCE[a.aggregation], a.empty, tuple(name_of(entity, n, w) for w in features.windows))
            for n, a in features.aggregates.items()
        ),
        ratios=tuple(
            (aggregates.index(r.numerator), aggregates.index(r.denominator), r.prior_alpha, r.prior_beta,
             tuple(name_of(entity, n, w) for w in features.windows))
            for n, r in features.ratios.items()
        ),  # fmt: skip
    )
    _PLANS[(id(features), entity)] = (features, plan)  # keeps the config alive: its id stays its own
    return plan

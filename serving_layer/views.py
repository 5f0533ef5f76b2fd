"""The views the service reads features from: for every declared entity, the bucket rows
``(keys, bucket_start, aggregates)`` the batch layer publishes at a horizon *v*, merged with the
speed layer's increments after *v* (``speed/<entity>_increments``, ``contract.increments_table``),
read from Delta with pyarrow (no Spark here). An increment row carries the bronze versions its
events came from, so which rows count after *v* is exact (``contract.increment_after_horizon``,
the rule the speed layer writes by), and buckets are monoids: batch view(v) ⊕ increments(after v)
equals the batch view recomputed at the increments' bronze versions. Window features are read off
the merged rows at request time (``lambda_ml_apps.ctr.model_inputs``).

An entity the views have never seen has no buckets, so its counts are zero, exactly what the
batch layer computed for it at training time (no events before the scoring time).
"""

from __future__ import annotations

# pyarrow must be imported before deltalake: importing deltalake first can abort the
# interpreter at exit (and to_pandas() does so always); to_pyarrow_table() is safe.
import pyarrow  # isort: skip
from deltalake import DeltaTable  # isort: skip
from deltalake.exceptions import DeltaError, TableNotFoundError  # isort: skip
import pyarrow.compute as pc  # isort: skip

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from lambda_ml import contract
from lambda_ml.buckets import NO_BUCKETS, EntityBuckets, combine_exact, merge_entity_buckets
from lambda_ml.config import PlatformConfig
from lambda_ml.contract import Horizon
from lambda_ml.partial_buckets import BucketPart
from serving_layer.dependencies import Dependency, DependencyStatus
from serving_layer.lake_events import LakeEvents, LakeEventsError
from serving_layer.reloadable import Reloadable

BUCKET = contract.VIEW_BUCKET_COLUMN


class ViewLoadError(RuntimeError):
    """A view table is missing or does not have the columns the declarations need."""


@dataclass(frozen=True)
class Increments:
    """One entity's speed-layer increments after a batch horizon: key -> bucket rows (already
    combined per bucket), the latest bronze versions they came from, and the rows left out."""

    rows: Mapping[tuple[str, ...], EntityBuckets] = field(default_factory=dict)
    through: Horizon | None = None  # the newest bronze version of each event type merged
    used: int = 0  # increment rows after the horizon, merged
    already_in_batch: int = 0  # rows the batch view counts (the speed layer deletes them soon)


NO_INCREMENTS = Increments()


@dataclass(frozen=True)
class BucketView:
    """One entity's view: its key -> its bucket rows (the batch view at ``horizon`` ⊕ the
    speed layer's increments after it), the horizon, and both parts."""

    entity: str
    keys: tuple[str, ...]
    path: str
    rows: Mapping[tuple[str, ...], EntityBuckets] = field(default_factory=dict)
    horizon: Horizon = Horizon.of()
    increments: Increments = NO_INCREMENTS
    merged: Mapping[tuple[str, ...], EntityBuckets] | None = None  # None: no increments, rows as they are

    def lookup(self, key: tuple[str, ...]) -> EntityBuckets:
        """The merged buckets of one entity; none for an entity the views have never seen.

        >>> view = BucketView("user", ("user_id",), "mem", {("u1",): EntityBuckets((0,), {"orders": (2,)})})
        >>> view.lookup(("u1",)).values["orders"], view.lookup(("nobody",)).starts
        ((2,), ())
        """
        return (self.rows if self.merged is None else self.merged).get(key, NO_BUCKETS)

    def batch_part(self, key: tuple[str, ...]) -> EntityBuckets:
        return self.rows.get(key, NO_BUCKETS)

    def speed_part(self, key: tuple[str, ...]) -> EntityBuckets:
        return self.increments.rows.get(key, NO_BUCKETS)

    def with_increments(self, increments: Increments, aggregations: Mapping[str, str]) -> BucketView:
        """This batch view with ``increments`` merged in (batch ⊕ speed, per key and bucket)."""
        merged = dict(self.rows)
        for key, speed in increments.rows.items():
            merged[key] = merge_entity_buckets([self.rows.get(key, NO_BUCKETS), speed], aggregations)
        return replace(self, increments=increments, merged=MappingProxyType(merged))

    def __len__(self) -> int:
        return len(self.rows if self.merged is None else self.merged)


@dataclass(frozen=True)
class BatchViews:
    """Every entity's view, served together (swapped as one object), from one batch run, with
    bronze as it was when they were loaded (``lake``: for features at a time whose bucket's
    row also counts later events; None for views with no lake behind them)."""

    views: Mapping[str, BucketView]
    lake: LakeEvents | None = None

    def current_part(self, micros: int) -> BucketPart | None:
        """The bucket holding ``micros`` as events, when its row in the views may count events
        at or after ``micros``; None when the row holds only events before it (no event of the
        lake is that late: the usual case of scoring now), so the views alone are exact.

        Raises ``LakeEventsError`` when the bucket is needed and bronze cannot be read."""
        lake = self.lake
        if lake is None or not lake.covers(micros):
            return None
        return lake.bucket(micros)

    def reads_lake(self, micros: int) -> bool:
        """True when features at ``micros`` need a read of bronze (their bucket is not cached)."""
        lake = self.lake
        return lake is not None and lake.covers(micros) and not lake.is_cached(micros)

    @property
    def horizon(self) -> Horizon:
        return next(iter(self.views.values())).horizon if self.views else Horizon.of()

    def lookup(self, entity: str, key: tuple[str, ...]) -> EntityBuckets:
        return self.views[entity].lookup(key)

    def size(self, entity: str) -> int:
        """Distinct keys in the view of ``entity`` (0 when no such entity is declared)."""
        view = self.views.get(entity)
        return 0 if view is None else len(view)


def _epoch_micros(path: str, column: pyarrow.ChunkedArray) -> list[int]:
    if not pyarrow.types.is_timestamp(column.type):
        raise ViewLoadError(f"view {path}: {BUCKET} is {column.type}, not a timestamp")
    micros = column.cast(pyarrow.timestamp("us", tz="UTC")).cast(pyarrow.int64())
    return [int(v) for v in micros.to_pylist()]


def bucket_view_from_arrow(
    path: str, table: pyarrow.Table, entity: str, keys: Sequence[str], aggregates: Sequence[str]
) -> BucketView:
    """Turn a view table (keys, bucket_start, aggregates, horizon columns) into a BucketView.

    >>> from datetime import datetime, timezone
    >>> hours = [datetime(1970, 1, 1, h, tzinfo=timezone.utc) for h in (2, 1, 1)]
    >>> t = pyarrow.table({"user_id": ["a", "a", "b"], "bucket_start": hours, "orders": [1, 0, 3],
    ...                    "horizon_views": [7, 7, 7], "horizon_orders": [4, 4, 4]})
    >>> view = bucket_view_from_arrow("mem", t, "user", ["user_id"], ["orders"])
    >>> view.lookup(("a",)), view.horizon
    (EntityBuckets(starts=(3600000000, 7200000000), values={'orders': (0, 1)}), Horizon(versions=(('orders', 4), ('views', 7))))
    """
    wanted = [*keys, BUCKET, *aggregates]
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise ViewLoadError(f"view {path} lacks column(s) {', '.join(missing)}; it has {', '.join(table.column_names)}")
    by_key = bucket_rows_from_arrow(path, table, keys, aggregates)
    return BucketView(entity, tuple(keys), path, by_key, _horizon(path, table))


def bucket_rows_from_arrow(
    path: str,
    table: pyarrow.Table,
    keys: Sequence[str],
    aggregates: Sequence[str],
    combine: Mapping[str, str] | None = None,
) -> Mapping[tuple[str, ...], EntityBuckets]:
    """Rows ``(keys, bucket_start, aggregates)`` -> key -> its buckets. A view holds one row per
    (key, bucket); increments may hold several, combined with the ``combine`` monoids."""
    key_values = list(zip(*(table.column(k).to_pylist() for k in keys)))
    starts = _epoch_micros(path, table.column(BUCKET))
    values = {a: table.column(a).to_pylist() for a in aggregates}
    order = sorted(range(table.num_rows), key=lambda i: (key_values[i], starts[i]))
    grouped: dict[tuple[str, ...], list[list[int]]] = {}
    for i in order:
        if any(part is None for part in key_values[i]):
            raise ViewLoadError(f"view {path} has a row without its key {', '.join(keys)}")
        rows = grouped.setdefault(key_values[i], [])
        if rows and starts[rows[-1][0]] == starts[i]:
            if combine is None:
                raise ViewLoadError(f"view {path} has more than one row for {key_values[i]} at bucket {starts[i]}")
            rows[-1].append(i)
        else:
            rows.append([i])
    by_key = {}
    for key, rows in grouped.items():
        columns = {}
        for a in aggregates:
            if combine is None:
                columns[a] = tuple(values[a][cell[0]] for cell in rows)
            else:
                columns[a] = tuple(combine_exact(combine[a], [values[a][i] for i in cell]) for cell in rows)
        by_key[key] = EntityBuckets(tuple(starts[cell[0]] for cell in rows), columns)
    return MappingProxyType(by_key)


def _horizon(path: str, table: pyarrow.Table) -> Horizon:
    found: dict[str, int | None] = {}
    for column in table.column_names:
        if not column.startswith(contract.VIEW_HORIZON_PREFIX):
            continue
        name = column.removeprefix(contract.VIEW_HORIZON_PREFIX)
        values = {v for v in table.column(column).to_pylist() if v is not None}
        if len(values) > 1:
            raise ViewLoadError(f"view {path} mixes horizons in {column}: {sorted(values)}")
        found[name] = int(values.pop()) if values else None
    return Horizon.of(found)


def increments_from_arrow(
    path: str, table: pyarrow.Table, keys: Sequence[str], aggregations: Mapping[str, str], horizon: Horizon
) -> Increments:
    """The increment rows the batch view at ``horizon`` did not count, by the speed layer's rule
    (``contract.increment_after_horizon``), combined per (key, bucket); the rows it counted are
    counted and left out.

    >>> from datetime import datetime, timezone
    >>> hour = datetime(1970, 1, 1, 1, tzinfo=timezone.utc)
    >>> t = pyarrow.table({"user_id": ["a", "a", "a", "b"], "bucket_start": [hour] * 4, "orders": [1, 2, 9, 4],
    ...                    "views_version": [6, 3, 5, 7], "orders_version": [None, 6, None, 2]})
    >>> inc = increments_from_arrow("mem", t, ["user_id"], {"orders": "count"}, Horizon.of(views=5, orders=5))
    >>> inc.rows[("a",)].values, str(inc.through), (inc.used, inc.already_in_batch)
    ({'orders': (3,)}, 'bronze orders v6, views v7', (3, 1))
    """
    # The version columns of the event types feature events come from (a horizon part without
    # one is a table no increment row comes from).
    versions = {e: c for e in horizon.parts if (c := contract.increment_version_column(e)) in table.column_names}
    names = [*keys, BUCKET, *aggregations]
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise ViewLoadError(f"increments {path} lack column(s) {', '.join(missing)}; they have {', '.join(table.column_names)}")
    after = contract.increment_after_horizon(horizon, {e: pc.field(c) for e, c in versions.items()})
    kept = table if after is None else table.filter(after)
    view = bucket_rows_from_arrow(path, kept, keys, list(aggregations), combine=aggregations)
    newest = {e: pc.max(kept.column(c)).as_py() for e, c in versions.items()}
    through = Horizon.of(newest) if kept.num_rows else None
    return Increments(view, through, kept.num_rows, table.num_rows - kept.num_rows)


def read_increments(path: str, keys: Sequence[str], aggregations: Mapping[str, str], horizon: Horizon) -> Increments:
    """The speed layer's increments of one entity after ``horizon``; none if it has not
    published any yet (no table)."""
    try:
        delta = DeltaTable(path)
    except TableNotFoundError:
        return NO_INCREMENTS
    except (DeltaError, OSError) as exc:
        raise ViewLoadError(f"cannot read the Delta table at {path}: {exc}") from exc
    names = [*keys, BUCKET, *aggregations, *(contract.increment_version_column(e) for e in horizon.parts)]
    present = {f.name for f in delta.schema().fields}
    columns = [c for c in names if c in present]
    return increments_from_arrow(path, delta.to_pyarrow_table(columns=columns), keys, aggregations, horizon)


def read_bucket_view(path: str, entity: str, keys: Sequence[str], aggregates: Sequence[str]) -> BucketView:
    """Read one entity's view table at ``path`` (latest version)."""
    try:
        delta = DeltaTable(path)
    except TableNotFoundError as exc:
        raise ViewLoadError(f"no Delta table at {path}: has the batch layer run yet?") from exc
    except (DeltaError, OSError) as exc:
        raise ViewLoadError(f"cannot read the Delta table at {path}: {exc}") from exc
    schema_names = {f.name for f in delta.schema().fields}
    columns = [*keys, BUCKET, *aggregates]
    missing = [c for c in columns if c not in schema_names]
    if missing:
        raise ViewLoadError(f"view {path} lacks column(s) {', '.join(missing)}: was it written with other feature declarations?")
    columns += sorted(c for c in schema_names if c.startswith(contract.VIEW_HORIZON_PREFIX))
    return bucket_view_from_arrow(path, delta.to_pyarrow_table(columns=columns), entity, keys, aggregates)


def load_batch_views(cfg: PlatformConfig) -> BatchViews:
    """Read the view of every declared entity under ``cfg.lake`` (all must come from one
    batch run) and merge the speed layer's increments after its horizon into each; then pin
    bronze (read after the views, its newest event bounds every event they count)."""
    aggregates = list(cfg.features.aggregates)
    aggregations = {name: a.aggregation for name, a in cfg.features.aggregates.items()}
    views = {
        name: read_bucket_view(cfg.lake.table(*contract.view_table(name)), name, entity.keys, aggregates)
        for name, entity in cfg.features.entities.items()
    }
    horizons = {name: view.horizon for name, view in views.items()}
    if len(set(horizons.values())) > 1:
        described = "; ".join(f"{name}: {horizon}" for name, horizon in horizons.items())
        raise ViewLoadError(f"the views come from different batch runs: {described}")
    for name, entity in cfg.features.entities.items():
        path = cfg.lake.table(*contract.increments_table(name))
        increments = read_increments(path, entity.keys, aggregations, views[name].horizon)
        if increments.rows or increments.used:
            views[name] = views[name].with_increments(increments, aggregations)
        elif increments is not NO_INCREMENTS:
            views[name] = replace(views[name], increments=increments)
    try:
        lake = LakeEvents(cfg)
    except LakeEventsError as exc:
        raise ViewLoadError(str(exc)) from exc
    return BatchViews(MappingProxyType(views), lake)


def table_versions(cfg: PlatformConfig) -> tuple[int | None, ...]:
    """The Delta version of every view and increment table (None where there is none yet)."""
    versions: list[int | None] = []
    for name in cfg.features.entities:
        for parts in (contract.view_table(name), contract.increments_table(name)):
            try:
                versions.append(DeltaTable(cfg.lake.table(*parts)).version())
            except (DeltaError, OSError):
                versions.append(None)
    return tuple(versions)


class ViewStore(Reloadable[BatchViews]):
    """The views being served (batch ⊕ increments), reloaded whole when a table has a new
    Delta version (checked every ``serving.views_refresh_s`` by the service's poller). A load
    that fails is the lake's failure (``dependency``); the views loaded before stay."""

    def __init__(self, name: str, cfg: PlatformConfig, retry_interval_s: float = 5.0, dependency: Dependency | None = None) -> None:
        super().__init__(name, self._refresh, retry_interval_s)
        self.cfg = cfg
        self.dependency = dependency or DependencyStatus().declare("lake", f"the lake at {cfg.lake.root}")
        self._versions: tuple[int | None, ...] | None = None

    @classmethod
    def from_config(cls, cfg: PlatformConfig, retry_interval_s: float = 5.0, dependencies: DependencyStatus | None = None) -> ViewStore:
        """The views of ``cfg``'s lake, reporting its state to ``dependencies``."""
        dependency = (dependencies or DependencyStatus()).declare("lake", f"the lake at {cfg.lake.root}")
        return cls("batch views", cfg, retry_interval_s, dependency)

    def _on_failure(self, error: str, exc: Exception) -> None:
        if self.current is not None:
            consequence = f"serving the views loaded at {self.current.horizon}"
        else:
            consequence = "no views to serve: the routes that read features answer 503"
        self.dependency.failed(str(exc), consequence)

    def _on_success(self) -> None:
        self.dependency.ok()

    def _refresh(self) -> BatchViews:
        versions = table_versions(self.cfg)
        if self.current is not None and versions == self._versions:
            return self.current
        loaded = load_batch_views(self.cfg)
        self._versions = versions
        return loaded

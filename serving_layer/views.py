"""The batch views the service reads features from: for every declared entity, the bucket rows
``(keys, bucket_start, aggregates)`` the batch layer publishes, read from Delta (no Spark here).
Window features are read off them at request time (``serving_layer.features``).

An entity the views have never seen has no buckets, so its counts are zero, exactly what the
batch layer computed for it at training time (no events before the scoring time).
"""

from __future__ import annotations

# pyarrow must be imported before deltalake: importing deltalake first can abort the
# interpreter at exit (and to_pandas() does so always); to_pyarrow_table() is safe.
import pyarrow  # isort: skip
from deltalake import DeltaTable  # isort: skip
from deltalake.exceptions import DeltaError, TableNotFoundError  # isort: skip

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from lambda_ml import contract
from lambda_ml.buckets import NO_BUCKETS, EntityBuckets
from lambda_ml.config import PlatformConfig
from lambda_ml.contract import Horizon
from serving_layer.reloadable import Reloadable

BUCKET = contract.VIEW_BUCKET_COLUMN


class ViewLoadError(RuntimeError):
    """A view table is missing or does not have the columns the declarations need."""


@dataclass(frozen=True)
class BucketView:
    """One entity's batch view: its key -> its bucket rows, and the horizon it was computed at."""

    entity: str
    keys: tuple[str, ...]
    path: str
    rows: Mapping[tuple[str, ...], EntityBuckets] = field(default_factory=dict)
    horizon: Horizon = Horizon()

    def lookup(self, key: tuple[str, ...]) -> EntityBuckets:
        """The buckets of one entity; none for an entity the view has never seen.

        >>> view = BucketView("user", ("user_id",), "mem", {("u1",): EntityBuckets((0,), {"clicks": (2,)})})
        >>> view.lookup(("u1",)).values["clicks"], view.lookup(("nobody",)).starts
        ((2,), ())
        """
        return self.rows.get(key, NO_BUCKETS)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class BatchViews:
    """Every entity's view, served together (swapped as one object), from one batch run."""

    views: Mapping[str, BucketView]

    @property
    def horizon(self) -> Horizon:
        return next(iter(self.views.values())).horizon if self.views else Horizon()

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
    >>> t = pyarrow.table({"user_id": ["a", "a", "b"], "bucket_start": hours, "clicks": [1, 0, 3],
    ...                    "horizon_impressions": [7, 7, 7], "horizon_clicks": [4, 4, 4]})
    >>> view = bucket_view_from_arrow("mem", t, "user", ["user_id"], ["clicks"])
    >>> view.lookup(("a",)), view.horizon
    (EntityBuckets(starts=(3600000000, 7200000000), values={'clicks': (0, 1)}), Horizon(impressions=7, clicks=4))
    """
    wanted = [*keys, BUCKET, *aggregates]
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise ViewLoadError(f"view {path} lacks column(s) {', '.join(missing)}; it has {', '.join(table.column_names)}")
    key_values = list(zip(*(table.column(k).to_pylist() for k in keys)))
    starts = _epoch_micros(path, table.column(BUCKET))
    values = {a: table.column(a).to_pylist() for a in aggregates}
    order = sorted(range(table.num_rows), key=lambda i: (key_values[i], starts[i]))
    grouped: dict[tuple[str, ...], list[int]] = {}
    for i in order:
        if any(part is None for part in key_values[i]):
            raise ViewLoadError(f"view {path} has a row without its key {', '.join(keys)}")
        rows = grouped.setdefault(key_values[i], [])
        if rows and starts[rows[-1]] == starts[i]:
            raise ViewLoadError(f"view {path} has more than one row for {key_values[i]} at bucket {starts[i]}")
        rows.append(i)
    by_key = {
        key: EntityBuckets(tuple(starts[i] for i in rows), {a: tuple(values[a][i] for i in rows) for a in aggregates})
        for key, rows in grouped.items()
    }
    return BucketView(entity, tuple(keys), path, MappingProxyType(by_key), _horizon(path, table))


def _horizon(path: str, table: pyarrow.Table) -> Horizon:
    found: dict[str, int | None] = {}
    for name, column in contract.VIEW_HORIZON_COLUMNS.items():
        if column not in table.column_names:
            found[name] = None
            continue
        values = {v for v in table.column(column).to_pylist() if v is not None}
        if len(values) > 1:
            raise ViewLoadError(f"view {path} mixes horizons in {column}: {sorted(values)}")
        found[name] = int(values.pop()) if values else None
    return Horizon(**found)


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
    columns += [c for c in contract.VIEW_HORIZON_COLUMNS.values() if c in schema_names]
    return bucket_view_from_arrow(path, delta.to_pyarrow_table(columns=columns), entity, keys, aggregates)


def load_batch_views(cfg: PlatformConfig) -> BatchViews:
    """Read the view of every declared entity under ``cfg.lake``; all must come from one run."""
    aggregates = list(cfg.features.aggregates)
    views = {
        name: read_bucket_view(cfg.lake.table(*contract.view_table(name)), name, entity.keys, aggregates)
        for name, entity in cfg.features.entities.items()
    }
    horizons = {name: view.horizon for name, view in views.items()}
    if len(set(horizons.values())) > 1:
        described = "; ".join(f"{name}: {horizon}" for name, horizon in horizons.items())
        raise ViewLoadError(f"the views come from different batch runs: {described}")
    return BatchViews(MappingProxyType(views))


class ViewStore(Reloadable[BatchViews]):
    """The batch views being served, reloaded whole."""

    @classmethod
    def from_config(cls, cfg: PlatformConfig, retry_interval_s: float = 5.0) -> ViewStore:
        return cls("batch views", lambda: load_batch_views(cfg), retry_interval_s)

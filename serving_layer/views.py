"""The batch views the service serves features from: per-user and per-item counts of
impressions and clicks, read from the Delta tables the batch layer publishes (no Spark here).

An entity the views have never seen has zero counts, which is exactly what the batch layer
computed for it at training time (no events strictly before the scoring time).
"""

from __future__ import annotations

# pyarrow must be imported before deltalake: importing deltalake first can abort the
# interpreter at exit (and to_pandas() does so always); to_pyarrow_table() is safe.
import pyarrow  # isort: skip
from deltalake import DeltaTable  # isort: skip
from deltalake.exceptions import DeltaError, TableNotFoundError  # isort: skip

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from lambda_ml import contract
from lambda_ml.config import PlatformConfig
from lambda_ml.contract import Horizon
from serving_layer.reloadable import Reloadable

class ViewLoadError(RuntimeError):
    """A view table is missing or does not have the contract's columns."""


@dataclass(frozen=True)
class EntityCounts:
    """Counts of one entity in a batch view."""

    impressions: int = 0
    clicks: int = 0


ZERO_COUNTS = EntityCounts()


@dataclass(frozen=True)
class CountView:
    """One batch view: entity id -> counts, and the horizon it was computed at."""

    path: str
    counts: Mapping[str, EntityCounts] = field(default_factory=dict)
    horizon: Horizon = Horizon()

    def lookup(self, entity_id: str) -> EntityCounts:
        """Counts of ``entity_id``; zero for an entity the view has never seen.

        >>> view = CountView("mem", {"u1": EntityCounts(3, 1)})
        >>> view.lookup("u1"), view.lookup("nobody")
        (EntityCounts(impressions=3, clicks=1), EntityCounts(impressions=0, clicks=0))
        """
        return self.counts.get(entity_id, ZERO_COUNTS)

    def __len__(self) -> int:
        return len(self.counts)


@dataclass(frozen=True)
class BatchViews:
    """The user and item views served together (swapped as one object)."""

    users: CountView
    items: CountView

    @property
    def horizon(self) -> Horizon:
        return self.users.horizon


def count_view_from_arrow(path: str, table: pyarrow.Table, key_column: str) -> CountView:
    """Turn a view table (key, impressions, clicks, horizon columns) into a CountView.

    >>> t = pyarrow.table({"user_id": ["a", "b"], "impressions": [5, 2], "clicks": [1, 0],
    ...                    "horizon_impressions": [7, 7], "horizon_clicks": [4, 4]})
    >>> view = count_view_from_arrow("mem", t, "user_id")
    >>> view.lookup("a"), view.horizon
    (EntityCounts(impressions=5, clicks=1), Horizon(impressions=7, clicks=4))
    """
    wanted = [key_column, *contract.VIEW_COUNT_COLUMNS]
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise ViewLoadError(f"view {path} lacks column(s) {', '.join(missing)}; it has {', '.join(table.column_names)}")
    keys = table.column(key_column).to_pylist()
    impressions, clicks = (table.column(c).to_pylist() for c in contract.VIEW_COUNT_COLUMNS)
    counts = {
        key: EntityCounts(int(i or 0), int(c or 0)) for key, i, c in zip(keys, impressions, clicks) if key is not None
    }
    if len(counts) != sum(k is not None for k in keys):
        raise ViewLoadError(f"view {path} has more than one row for some {key_column}")
    return CountView(path, MappingProxyType(counts), _horizon(path, table))


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


def read_count_view(path: str, key_column: str) -> CountView:
    """Read one view's Delta table at ``path`` (latest version)."""
    try:
        delta = DeltaTable(path)
    except TableNotFoundError as exc:
        raise ViewLoadError(f"no Delta table at {path}: has the batch layer run yet?") from exc
    except (DeltaError, OSError) as exc:
        raise ViewLoadError(f"cannot read the Delta table at {path}: {exc}") from exc
    columns = [key_column, *contract.VIEW_COUNT_COLUMNS]
    schema_names = {f.name for f in delta.schema().fields}
    columns += [c for c in contract.VIEW_HORIZON_COLUMNS.values() if c in schema_names]
    missing = [c for c in columns if c not in schema_names]
    if missing:
        raise ViewLoadError(f"view {path} lacks column(s) {', '.join(missing)}")
    return count_view_from_arrow(path, delta.to_pyarrow_table(columns=columns), key_column)


def load_batch_views(cfg: PlatformConfig) -> BatchViews:
    """Read the user and item views named by the contract under ``cfg.lake``."""
    users = read_count_view(cfg.lake.table(*contract.USER_VIEW), "user_id")
    items = read_count_view(cfg.lake.table(*contract.ITEM_VIEW), "item_id")
    if users.horizon != items.horizon:
        raise ViewLoadError(
            f"the user and item views come from different batch runs: {users.horizon} vs {items.horizon}"
        )
    return BatchViews(users, items)


class ViewStore(Reloadable[BatchViews]):
    """The batch views being served, reloaded whole."""

    @classmethod
    def from_config(cls, cfg: PlatformConfig, retry_interval_s: float = 5.0) -> ViewStore:
        return cls("batch views", lambda: load_batch_views(cfg), retry_interval_s)

"""The lake catalog: every Delta table the platform writes under ``lake.root``, named once.

Jobs that act on the whole lake (Delta maintenance, checks of the lake) take their list from
here instead of keeping one by hand, so a table a layer adds is maintained from the day it
exists. Names are relative to ``lake.root``; :meth:`lambda_ml.config.LakeConfig.table` gives
the path.
"""

from __future__ import annotations

from dataclasses import dataclass

from lambda_ml import contract
from lambda_ml.config import PlatformConfig

QUARANTINE_TABLE = ("quarantine",)
# The applications' own tables, by application type: path parts under lake.root -> the writer.
# They are named here, once, so that the catalog (and maintenance) knows them without importing
# an application; each application reads its paths from here.
SILVER_LABELS_TABLE = ("silver", "labels")
ONLINE_MODEL_TABLE = ("speed", "online_model")
CENTRES_STATE_TABLE = ("speed", "kmeans_centres")
APPLICATION_TABLES: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {
    "ctr": ((SILVER_LABELS_TABLE, "speed layer labels"), (ONLINE_MODEL_TABLE, "speed layer online model")),
    "kmeans": ((CENTRES_STATE_TABLE, "speed layer centres"),),
}


@dataclass(frozen=True)
class LakeTable:
    """One Delta table of the lake: its name under ``lake.root``, who writes it, and the horizon
    part (a bronze table's event type) whose versions registered models pin, if any."""

    name: str
    writer: str
    pinned_by: str | None = None


def lake_tables(cfg: PlatformConfig) -> tuple[LakeTable, ...]:
    """Every table of the lake for this config, in the order data flows through them.

    >>> from lambda_ml.config import DEFAULT_CONFIG, load_config
    >>> [t.name for t in lake_tables(load_config(DEFAULT_CONFIG, env={}))][:4]
    ['bronze/impressions', 'bronze/clicks', 'quarantine', 'views/user_buckets']
    """
    entities = list(cfg.features.entities)
    return (
        *(LakeTable(f"bronze/{event}", "speed layer ingest", pinned_by=event) for event in cfg.events.types),
        LakeTable("/".join(QUARANTINE_TABLE), "speed layer ingest"),
        *(LakeTable("/".join(contract.view_table(entity)), "batch layer") for entity in entities),
        *(LakeTable("/".join(contract.increments_table(entity)), "speed layer increments") for entity in entities),
        *(LakeTable("/".join(parts), writer) for parts, writer in APPLICATION_TABLES.get(cfg.app.type, ())),
    )


def table_names(cfg: PlatformConfig) -> tuple[str, ...]:
    """The names of :func:`lake_tables`."""
    return tuple(t.name for t in lake_tables(cfg))

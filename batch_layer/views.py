"""The batch views: per-user and per-item totals of impressions and attributed clicks over a
whole snapshot, stamped with its horizon, overwritten by each batch run.

The serving layer reads them; the speed layer adds its increments after the horizon on top.
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from lambda_ml import contract
from lambda_ml.config import PlatformConfig
from lambda_ml.contract import Horizon
from lambda_ml.features import ENTITIES, Entity, entity_counts

log = logging.getLogger(__name__)



def build_view(increments: DataFrame, entity: Entity, horizon: Horizon) -> DataFrame:
    """``<key>, impressions, clicks, horizon_impressions, horizon_clicks`` for one entity."""
    return entity_counts(increments, entity).select(
        entity.key,
        "impressions",
        "clicks",
        F.lit(horizon.impressions).cast("long").alias(contract.VIEW_HORIZON_COLUMNS["impressions"]),
        F.lit(horizon.clicks).cast("long").alias(contract.VIEW_HORIZON_COLUMNS["clicks"]),
    )


def build_views(increments: DataFrame, horizon: Horizon) -> dict[Entity, DataFrame]:
    """Every entity's view from the snapshot's count increments."""
    return {entity: build_view(increments, entity, horizon) for entity in ENTITIES}


def write_views(views: dict[Entity, DataFrame], cfg: PlatformConfig) -> dict[str, str]:
    """Overwrite each view's Delta table; return ``{entity key: path}``."""
    paths = {}
    for entity, view in views.items():
        path = cfg.lake.table(*entity.view)
        view.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(path)
        log.info("wrote the %s view to %s", entity.key.removesuffix("_id"), path)
        paths[entity.key] = path
    return paths

"""The batch views: one Delta table per declared entity with a row per (entity keys, event-time
bucket) holding every declared aggregate, stamped with the horizon, overwritten by each run.

The serving layer reads them and reads windows off the buckets; the speed layer merges its
increments after the horizon on top (the rows are monoids, see ``lambda_ml.features``).
Writing the same horizon twice gives the same table.
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from lambda_ml import contract
from lambda_ml.config import FeaturesConfig, PlatformConfig
from lambda_ml.contract import Horizon
from lambda_ml.features import BUCKET, bucket_increments

log = logging.getLogger(__name__)


def build_view(events: DataFrame, entity: str, features: FeaturesConfig, horizon: Horizon) -> DataFrame:
    """``<keys>, bucket_start, <aggregates>, horizon_<event type>...`` for one entity.

    ``events`` are the snapshot's feature events (``lambda_ml.features.feature_events``).
    """
    declared = features.entities[entity]
    return bucket_increments(events, declared, features).select(
        *declared.keys,
        BUCKET,
        *features.aggregates,
        *(F.lit(version).cast("long").alias(contract.view_horizon_column(event)) for event, version in horizon.versions),
    )


def build_views(events: DataFrame, features: FeaturesConfig, horizon: Horizon) -> dict[str, DataFrame]:
    """Every declared entity's view, by entity name."""
    return {entity: build_view(events, entity, features, horizon) for entity in features.entities}


def write_views(views: dict[str, DataFrame], cfg: PlatformConfig) -> dict[str, str]:
    """Overwrite each entity's view table (schema included); return ``{entity: path}``."""
    paths = {}
    for entity, view in views.items():
        path = cfg.lake.table(*contract.view_table(entity))
        view.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(path)
        log.info("wrote the %s view to %s", entity, path)
        paths[entity] = path
    return paths


def views_at(spark: SparkSession, cfg: PlatformConfig, horizon: Horizon) -> bool:
    """True when every declared entity's view exists and was built at ``horizon``."""
    from pyspark.sql.utils import AnalysisException

    wanted = {contract.view_horizon_column(event): version for event, version in horizon.versions}
    for entity in cfg.features.entities:
        try:
            view = spark.read.format("delta").load(cfg.lake.table(*contract.view_table(entity)))
        except AnalysisException:
            return False
        if not set(wanted) <= set(view.columns):
            return False
        row = view.select(*wanted).limit(1).first()
        if row is not None and any(row[column] != version for column, version in wanted.items()):
            return False
    return True

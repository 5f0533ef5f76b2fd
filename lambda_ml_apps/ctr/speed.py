"""The click-through application's speed layer: the label join (bronze impressions x clicks ->
``silver/labels``) and the online logistic regression learning from the final labels."""

from __future__ import annotations

from collections.abc import Mapping

from pyspark.sql import SparkSession
from pyspark.sql.streaming import StreamingQuery

from lambda_ml.apps import QueryBuilder, Trigger
from lambda_ml.config import PlatformConfig


def _labels(spark: SparkSession, cfg: PlatformConfig, trigger: Trigger) -> StreamingQuery:
    from lambda_ml_apps.ctr import labels

    return labels.start_labels(spark, cfg, trigger)


def _online(spark: SparkSession, cfg: PlatformConfig, trigger: Trigger) -> StreamingQuery:
    from lambda_ml_apps.ctr import online

    return online.start_online(spark, cfg, trigger)


class CtrSpeedUpdater:
    """The click-through application's speed updater (the ``SpeedUpdater`` contract)."""

    def queries(self) -> Mapping[str, QueryBuilder]:
        # labels before online: the online model learns from the labels table.
        return {"labels": _labels, "online": _online}

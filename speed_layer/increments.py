"""Feature increments: the declared features (``features:`` in ``conf/``) applied to the stream.

The bronze tables feature events come from (deduplicated within the watermark) are turned into
feature events by the application's own rule (``FeatureEvents.stream``, the rule its batch
views use), and each micro-batch is folded with :func:`~lambda_ml.features.bucket_increments`
into rows per (entity keys, bucket, bronze versions) appended to ``speed/<entity>_increments``
(idempotently, by micro-batch id).

Only events the current batch view does not count are written (``after_horizon`` of the
horizon the entity's view was built at), and when a newer horizon is published the rows it
covers are deleted: increments at or before a horizon stop counting. The serving layer merges
``view ⊕ after_horizon(increments, view horizon)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import DataStreamWriter, StreamingQuery
from pyspark.sql.utils import AnalysisException

from lambda_ml import contract
from lambda_ml.config import PlatformConfig
from lambda_ml.contract import INCREMENT_BATCH_COLUMN, Horizon, increment_version_column
from lambda_ml.apps import FeatureEvents
from lambda_ml.features import after_horizon, bucket_increments
from speed_layer.silver import silver_events

log = logging.getLogger(__name__)



def version_columns(cfg: PlatformConfig) -> tuple[str, ...]:
    """The increments' bronze version columns: one per event type feature events come from."""
    return tuple(increment_version_column(e) for e in cfg.features.source_event_types)


def increments_path(cfg: PlatformConfig, entity: str) -> str:
    return cfg.lake.table(*contract.increments_table(entity))


def view_horizon(spark: SparkSession, cfg: PlatformConfig, entity: str) -> Horizon:
    """The horizon the entity's batch view was built at; unknown (None) if there is no view yet."""
    columns = {e: contract.view_horizon_column(e) for e in cfg.events.types}
    try:
        view = spark.read.format("delta").load(cfg.lake.table(*contract.view_table(entity)))
        present = {e: c for e, c in columns.items() if c in view.columns}
        row = view.select(*present.values()).limit(1).first() if present else None
    except AnalysisException:  # no view table yet
        return Horizon.of()
    if row is None:
        return Horizon.of()
    return Horizon.of({e: row[c] for e, c in present.items()})


def batch_increments(events: DataFrame, cfg: PlatformConfig, horizons: dict[str, Horizon]) -> dict[str, DataFrame]:
    """One micro-batch of feature events -> increment rows per entity, only what each entity's
    view horizon does not cover."""
    out = {}
    for name, entity in cfg.features.entities.items():
        rows = bucket_increments(events, entity, cfg.features, by=version_columns(cfg))
        out[name] = after_horizon(rows, horizons[name])
    return out


class IncrementsWriter:
    """The ``foreachBatch`` body: append each entity's increments, prune what a new horizon covers."""

    def __init__(self, cfg: PlatformConfig) -> None:
        self.cfg = cfg
        self.pruned: dict[str, Horizon] = {}

    def __call__(self, batch: DataFrame, batch_id: int) -> dict[str, int]:
        spark = batch.sparkSession
        horizons = {name: view_horizon(spark, self.cfg, name) for name in self.cfg.features.entities}
        events = batch.persist()
        counts: dict[str, int] = {}
        try:
            for name, rows in batch_increments(events, self.cfg, horizons).items():
                self._prune(spark, name, horizons[name])
                rows = rows.withColumn(INCREMENT_BATCH_COLUMN, F.lit(batch_id).cast("long")).persist()
                counts[name] = rows.count()
                if counts[name]:
                    (
                        rows.write.format("delta").mode("append")
                        .option("txnAppId", f"increments:{name}").option("txnVersion", batch_id)
                        .save(increments_path(self.cfg, name))
                    )  # fmt: skip
                rows.unpersist()
        finally:
            events.unpersist()
        log.info("increments micro-batch %d: %s", batch_id, ", ".join(f"{n} {name} rows" for name, n in counts.items()))
        return counts

    def _prune(self, spark: SparkSession, entity: str, horizon: Horizon) -> None:
        """Delete the rows a newly published horizon covers (once per horizon and process)."""
        sources = self.cfg.features.source_event_types
        if not horizon.is_known(sources) or self.pruned.get(entity) == horizon:
            return
        path = increments_path(self.cfg, entity)
        if DeltaTable.isDeltaTable(spark, path):
            # The rows :func:`after_horizon` would drop: every event in them at or before the horizon.
            covered = [f"({c} IS NULL OR {c} <= {horizon.version(e)})" for e in sources if (c := increment_version_column(e))]
            DeltaTable.forPath(spark, path).delete(" AND ".join(covered))
            log.info("%s increments: dropped the rows %s covers", entity, horizon)
        self.pruned[entity] = horizon


def start_increments(
    spark: SparkSession, cfg: PlatformConfig, trigger: Callable[[DataStreamWriter], DataStreamWriter], features: FeatureEvents
) -> StreamingQuery:
    """Start the feature-increments query: bronze -> ``features`` (the application's rule) ->
    ``speed/<entity>_increments``."""
    from speed_layer.app import checkpoint

    streams = silver_events(spark, cfg, cfg.features.source_event_types)
    writer = (
        features.stream(spark, streams, cfg)
        .writeStream.queryName("increments")
        .option("checkpointLocation", checkpoint(cfg, "increments"))
        .foreachBatch(IncrementsWriter(cfg))
    )
    query = trigger(writer).start()
    log.info("increments query started: bronze -> %s", cfg.lake.table("speed"))
    return query

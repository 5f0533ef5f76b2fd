"""The k-means application's speed layer: the ``centres`` query moves the champion's centres
with mini-batch updates over the points that arrived after its horizon, and publishes them.

The query reads the deduplicated bronze points (``speed_layer.silver.silver_events``). Each
micro-batch (:class:`CentresUpdater`):

1. reads the registry's champion (its centres are downloaded again only when the alias moves);
   before the first champion it skips the micro-batch with one log line;
2. starts from the saved centres of the same champion, or, when the champion is new (a new
   generation), from the champion's own centres, catching up first on the points committed
   after its horizon that earlier micro-batches already passed (read from bronze's change feed);
3. keeps the points committed after the champion's horizon (the speed layer only compensates:
   the champion was trained on the others), in event-time order, and takes one
   :func:`~lambda_ml_apps.kmeans.model.mini_batch_update` with ``kmeans.decay`` per
   ``kmeans.mini_batch_size`` of them;
4. saves the centres in ``speed/kmeans_centres`` (one row per micro-batch, an idempotent Delta
   append keyed by the query and the batch id) and, every ``kmeans.publish_every`` micro-batches,
   publishes them on the model-updates topic as alias ``speed``: version = the champion's,
   generation = its horizon, ``updates`` = steps since it, ``data`` = the centres.

A restart goes on from the last saved row; a micro-batch replayed after a crash finds its row
saved, takes no step and publishes the saved centres again (at least once, idempotent by key,
generation and update count). A micro-batch's points are collected to the driver to be stepped
through in order: ``speed.max_files_per_trigger`` bounds them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming.query import StreamingQuery
from pyspark.sql.types import LongType, StringType, StructField, StructType

from lambda_ml import contract
from lambda_ml.apps import QueryBuilder, Trigger
from lambda_ml.catalog import CENTRES_STATE_TABLE
from lambda_ml.config import PlatformConfig
from speed_layer.app import checkpoint_query_id
from lambda_ml.contract import Horizon, ModelUpdate
from lambda_ml.features import dedup_events
from lambda_ml_apps.kmeans.batch import complete_rows
from lambda_ml_apps.kmeans.model import KMeansCentres, mini_batch_update

log = logging.getLogger(__name__)

QUERY = "centres"
# The query's state, under lake.root (a lake table the catalog should name).

STATE_SCHEMA = StructType(
    [
        StructField("batch_id", LongType(), False),
        # The streaming query (its checkpoint) whose micro-batch this was: only the same query's ids mean a replay.
        StructField("query_id", StringType(), True),
        # Counts the saved rows: the latest is the one with the highest.
        StructField("sequence", LongType(), False),
        StructField("champion_version", LongType(), False),
        StructField("generation", StringType(), False),  # the champion's horizon, as JSON (event type -> version)
        StructField("updates", LongType(), False),  # mini-batch steps since the champion
        StructField("batches", LongType(), False),  # micro-batches that moved the centres since the champion
        StructField("points", LongType(), False),  # points this micro-batch applied
        StructField("centres", StringType(), False),  # KMeansCentres.to_json()
    ]
)


def state_path(cfg: PlatformConfig) -> str:
    return cfg.lake.table(*CENTRES_STATE_TABLE)


@dataclass(frozen=True)
class CentresState:
    """The centres saved by one micro-batch, and where they come from."""

    batch_id: int
    query_id: str | None
    sequence: int
    champion_version: int
    generation: Horizon
    updates: int
    batches: int
    centres: KMeansCentres

    def update(self, registered_model: str) -> ModelUpdate:
        """The model-update record publishing these centres (alias ``speed``)."""
        return ModelUpdate(
            registered_model, contract.SPEED_ALIAS, self.champion_version, self.generation, self.updates, data=self.centres.to_dict()
        )


def load_state(spark: SparkSession, cfg: PlatformConfig) -> CentresState | None:
    """The centres saved by the latest micro-batch, None before the first."""
    from delta.tables import DeltaTable

    path = state_path(cfg)
    if not DeltaTable.isDeltaTable(spark, path):
        return None
    row = spark.read.format("delta").load(path).orderBy(F.col("sequence").desc()).limit(1).first()
    if row is None:
        return None
    return CentresState(
        row["batch_id"], row["query_id"], row["sequence"], row["champion_version"], Horizon.of(json.loads(row["generation"])),
        row["updates"], row["batches"], KMeansCentres.from_json(row["centres"]),
    )  # fmt: skip


def save_state(spark: SparkSession, cfg: PlatformConfig, state: CentresState, points: int) -> None:
    """Append one micro-batch's centres, once: a replayed batch id of the same query is skipped by Delta."""
    row = {
        "batch_id": state.batch_id, "query_id": state.query_id, "sequence": state.sequence,
        "champion_version": state.champion_version, "generation": json.dumps(state.generation.parts, sort_keys=True),
        "updates": state.updates, "batches": state.batches, "points": points, "centres": state.centres.to_json(),
    }  # fmt: skip
    (
        spark.createDataFrame([row], STATE_SCHEMA).coalesce(1).write.format("delta").mode("append")
        .option("txnAppId", f"kmeans-centres:{state.query_id}").option("txnVersion", state.batch_id)
        .save(state_path(cfg))
    )  # fmt: skip


def step_through(centres: KMeansCentres, points: np.ndarray, decay: float, size: int) -> tuple[KMeansCentres, int]:
    """Mini-batch updates over ``points`` (in the order given) ``size`` at a time; the centres
    and the number of steps taken.

    >>> m = KMeansCentres.of([[0.0], [10.0]], ("x0",), [1, 1])
    >>> moved, steps = step_through(m, np.array([[1.0], [9.0], [2.0]]), 1.0, 2)
    >>> steps, moved.counts
    (2, (3.0, 2.0))
    """
    steps = 0
    for start in range(0, len(points), size):
        centres = mini_batch_update(centres, points[start : start + size], decay)
        steps += 1
    return centres, steps


def ordered_points(frame: DataFrame, features: tuple[str, ...]) -> np.ndarray:
    """The points of a frame with every feature set, in event-time order (event id breaking
    ties), as an ``(n, d)`` array on the driver."""
    columns = list(features)
    rows = complete_rows(frame, columns).orderBy("event_time", "event_id").select(*[F.col(c).cast("double") for c in columns])
    values: np.ndarray = np.asarray(rows.toPandas(), dtype=np.float64)
    return values.reshape(len(values), len(columns))


@dataclass(frozen=True)
class ChampionCentres:
    """The registry's champion as the query starts from it."""

    version: int
    horizon: Horizon
    centres: KMeansCentres


class NoChampion(LookupError):
    """The registered model has no champion alias yet."""


def read_champion(cfg: PlatformConfig, known: ChampionCentres | None) -> ChampionCentres:
    """The champion now (``known`` again when the alias has not moved: nothing downloaded);
    :class:`NoChampion` without one; other errors when the registry cannot be read."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from lambda_ml_apps.kmeans.registry import download_centres

    name = cfg.mlflow.registered_model
    try:
        version = MlflowClient(cfg.mlflow.tracking_uri).get_model_version_by_alias(name, contract.CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc.message):
            raise NoChampion(f"{name} has no {contract.CHAMPION_ALIAS} yet") from None
        raise
    number = int(version.version)
    if known is not None and known.version == number:
        return known
    centres = download_centres(cfg.mlflow.tracking_uri, name, number)
    return ChampionCentres(number, Horizon.from_tags(version.tags or {}, [cfg.kmeans.event_type]), centres)


@dataclass
class CentresUpdater:
    """The ``foreachBatch`` body of the ``centres`` query (see the module docstring)."""

    cfg: PlatformConfig
    state: CentresState | None = None
    champion: ChampionCentres | None = None
    query_id: str | None = None
    loaded: bool = False
    published: int = 0  # updates this process published
    _waiting_logged: bool = False

    @property
    def version_column(self) -> str:
        """The bronze version column of the clustered event type's stream."""
        return contract.increment_version_column(self.cfg.kmeans.event_type)

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        spark, cfg = batch.sparkSession, self.cfg
        if not self.loaded:
            self.state, self.query_id, self.loaded = load_state(spark, cfg), checkpoint_query_id(spark, cfg, QUERY), True
        state = self.state
        if state is not None and state.query_id == self.query_id and state.batch_id >= batch_id:
            log.info("centres micro-batch %d was applied before (replayed): no new step, the saved centres are published again", batch_id)
            self._publish(state.update(cfg.mlflow.registered_model))
            return
        bounds = batch.agg(F.min(self.version_column), F.max(self.version_column)).first()
        if bounds is None or bounds[0] is None:
            log.info("centres micro-batch %d: no new points", batch_id)
            return
        champion = self._read_champion()
        if champion is None:
            return
        horizon = champion.horizon.version(self.cfg.kmeans.event_type)
        after = -1 if horizon is None else horizon
        if state is not None and state.champion_version == champion.version:
            centres, updates, batches = state.centres, state.updates, state.batches
            caught_up = 0
        else:
            log.info(
                "centres start from champion %s v%d (%s)%s", cfg.mlflow.registered_model, champion.version, champion.horizon,
                "" if state is None else f"; the champion moved from v{state.champion_version}",
            )  # fmt: skip
            centres, updates, batches = champion.centres, 0, 0
            # Points after the horizon that earlier micro-batches passed: from bronze's change feed.
            passed = int(bounds[0]) - 1
            caught_up = 0
            if passed > after:
                earlier = ordered_points(self._committed(spark, after + 1, passed), champion.centres.feature_names)
                centres, steps = step_through(centres, earlier, cfg.kmeans.decay, cfg.kmeans.mini_batch_size)
                updates, caught_up = updates + steps, len(earlier)
                log.info("centres caught up on %d points of bronze versions %d to %d (%d steps)", len(earlier), after + 1, passed, steps)
        points = ordered_points(batch.where(F.col(self.version_column) > after), champion.centres.feature_names)
        if len(points) == 0 and caught_up == 0:
            log.info("centres micro-batch %d: no points after the champion's horizon (%s)", batch_id, champion.horizon)
            return
        centres, steps = step_through(centres, points, cfg.kmeans.decay, cfg.kmeans.mini_batch_size)
        sequence = 0 if state is None else state.sequence + 1
        new = CentresState(batch_id, self.query_id, sequence, champion.version, champion.horizon, updates + steps, batches + 1, centres)
        save_state(spark, cfg, new, len(points) + caught_up)
        self.state = new
        log.info(
            "centres micro-batch %d: %d points after %s in %d steps (decay %g); %d steps since champion v%d",
            batch_id, len(points), champion.horizon, steps, cfg.kmeans.decay, new.updates, champion.version,
        )  # fmt: skip
        if new.batches % cfg.kmeans.publish_every == 0:
            self._publish(new.update(cfg.mlflow.registered_model))

    def _read_champion(self) -> ChampionCentres | None:
        try:
            self.champion = read_champion(self.cfg, self.champion)
        except NoChampion as exc:
            if not self._waiting_logged:
                log.info("centres: %s: the micro-batches are skipped until the batch layer registers one", exc)
                self._waiting_logged = True
            return None
        except Exception as exc:  # noqa: BLE001 - an MLflow outage must not stop the stream
            if self.champion is None:
                log.warning("could not read the champion from MLflow (%s): this micro-batch is skipped", exc)
                return None
            log.warning("could not read the champion from MLflow (%s): the centres go on from v%d", exc, self.champion.version)
        return self.champion

    def _committed(self, spark: SparkSession, first: int, last: int) -> DataFrame:
        """The points bronze committed in versions ``first`` to ``last``, deduplicated."""
        from speed_layer.ingest import bronze_path

        changes = (
            spark.read.format("delta").option("readChangeFeed", "true")
            .option("startingVersion", first).option("endingVersion", last).load(bronze_path(self.cfg, self.cfg.kmeans.event_type))
        )  # fmt: skip
        return dedup_events(changes.where(F.col("_change_type") == "insert"))

    def _publish(self, update: ModelUpdate) -> None:
        try:
            publish_update(self.cfg, update)
            self.published += 1
        except Exception as exc:  # noqa: BLE001 - Kafka down: serving keeps the last update; the next one follows
            log.warning("could not publish the centres update (%s)", exc)


def publish_update(cfg: PlatformConfig, update: ModelUpdate) -> None:
    """Send one model update to the model-updates topic (acks=all)."""
    from lambda_ml.contract import publish_updates

    publish_updates(cfg, [update])


def start_centres(spark: SparkSession, cfg: PlatformConfig, trigger: Trigger) -> StreamingQuery:
    """Start the ``centres`` query: deduplicated bronze points -> mini-batch updates -> the model-updates topic."""
    from speed_layer.app import checkpoint
    from speed_layer.silver import silver_events

    event_type = cfg.kmeans.event_type
    points = silver_events(spark, cfg, [event_type])[event_type]
    writer = points.writeStream.queryName(QUERY).option("checkpointLocation", checkpoint(cfg, QUERY)).foreachBatch(CentresUpdater(cfg))
    query = trigger(writer).start()
    log.info("centres query started: bronze %s -> %s and %s", event_type, state_path(cfg), cfg.kafka.topics.model_updates.name)
    return query


class KMeansSpeedUpdater:
    """The k-means application's speed updater (the ``SpeedUpdater`` contract)."""

    def queries(self) -> Mapping[str, QueryBuilder]:
        return {QUERY: start_centres}

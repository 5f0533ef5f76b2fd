"""The speed layer's online model: a logistic regression learning from impressions whose label is
final, between two batch runs.

The silver labels get an impression's click as soon as it arrives, but its non-click only once
the labels query's watermark has passed its attribution window (``ctr.attribution_window_minutes``
+ ``speed.watermark_minutes`` of event time later), and each of that query's commits holds one
kind or the other: learning from labels as they arrive would feed the model a micro-batch of
clicks, then one of non-clicks, pulling it to and fro. So the model learns from **final labels
only**, in **stretches of event time** (``speed.online.step_minutes``, aligned on the epoch):

* a label is final once the labels query has closed its window. When that query writes a
  non-click for an impression at ``t``, its watermark has passed ``t`` + the window, so it has
  already written the final label of every impression at or before ``t``: the newest non-click
  in the labels table closes every stretch that ends at or before it
  (:func:`lambda_ml_apps.ctr.online_steps.closed_stretches`);
* each closed stretch is one step, in event-time order, on its clicks and non-clicks together;
  ``learned_until`` (saved with the model) is the end of the last stretch learned from, the
  frontier the next micro-batch goes on from. The weights are then a function of the final
  labels alone, whatever the order and the micro-batches they arrived in. A label written after
  its stretch was learned from (an impression the labels query took as late) is skipped and
  counted in the log: the next batch run has it.

The ``online`` query reads the silver labels' change feed, which tells it when labels were
written; it then reads the labels table at the newest version of the micro-batch (a replay reads
the same). Each micro-batch that closes stretches (:class:`OnlineLearner`):

1. attaches the final labels' point-in-time window features with the batch layer's own
   code (:func:`lambda_ml.features.add_window_features` over the bronze events before them), so
   the model sees what the batch model was trained on and what serving computes;
2. scores every row of a stretch with the current model *and* with the champion before learning
   from the stretch
   (progressive validation: log loss and AUC of both, to MLflow, step = micro-batch id). The
   AUC is also kept over the whole generation so far (``cumulative_auc``: the micro-batches'
   log-odds bins, :func:`lambda_ml.metrics.auc_bins`, add up, so no row is kept): the
   champion's as its version tag ``quality.progressive_auc``, the online model's in its update,
   so that serving's ``quality`` policy compares the two on the same rows, and on all of them
   rather than on the last micro-batch's few hundred;
3. takes one step per stretch on its mean log loss, SGD (``+ l2/2·|w|²``) or FTRL-Proximal
   (``speed.online.algorithm``: per-coordinate step sizes, exact zeros with ``l1``): a single
   Spark aggregate sums the gradient over every partition, and only that one row of sums
   reaches the driver;
4. saves the model and ``learned_until`` in ``speed/online_model`` (one row per micro-batch, an
   idempotent Delta append keyed by the batch id) and publishes it to the compacted model-updates topic
   (``lambda_ml.contract.ModelUpdate``, alias ``speed``, stamped with its generation);
5. every ``speed.online.register_every`` updates, registers it in MLflow (see
   :mod:`lambda_ml_apps.ctr.online_registry`).

The model starts from the champion's weights (a Spark logistic regression: its coefficients are
on the raw feature scale, one-hot terms ``<input>=<category>`` from its string indexer), and
starts again from the new champion when the alias moves: its generation is the champion's bronze
horizon. A champion that is not a logistic regression is still the baseline it is validated
against, but the weights come from the latest registered logistic regression, else zeros.
Categories the model has not seen yet join it with weight 0 (what a wider model would hold).

A new generation (the first start, or the champion moved) learns from the impressions after
the last one its champion's training run had a final label for (the run's
``labels_final_until`` param): the champion learned every impression before, none after, so the
online model adds exactly what the batch run could not see, and its first update follows the
first stretch closed after it rather than a replay of the whole history. A restart resumes from
the last saved micro-batch and its ``learned_until``, so an impression is learned from once
across crashes; a micro-batch replayed after a crash finds its row already saved and does not
step again (its update is published again: at least once, idempotent by key, generation and
update count). A champion whose run does not say (registered by hand) is followed from the saved
frontier, else from the stretch of the earliest labelled impression.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from lambda_ml import buckets, contract
from lambda_ml.config import PlatformConfig
from lambda_ml.contract import INDICATOR, Horizon, ModelInputs, ModelUpdate, publish_updates
from lambda_ml.features import LABEL, add_window_features, after_horizon, dedup_events, merge_buckets
from lambda_ml_apps.ctr.events import LABELS_FINAL_UNTIL, attribute_clicks, feature_events
from lambda_ml.metrics import AucBins, add_bins, auc_bins
from lambda_ml.schemas import event_type
from speed_layer.app import checkpoint_query_id
from speed_layer.ingest import bronze_path
from lambda_ml_apps.ctr.online_state import (
    SavedState,
    bin_rows,
    cumulative_auc,
    load_state,
    model_table,
    save_state,
)
from lambda_ml_apps.ctr.online_steps import (
    CHAMPION_P,
    STRETCH,
    LinearModel,
    StepMetrics,
    closed_stretches,
    learn_stretches,
    stretch_index,
    zero_model,
)

log = logging.getLogger(__name__)


def update_of(model: LinearModel, registered_model: str, quality: float | None = None) -> ModelUpdate:
    """The model-update record of an online model (alias ``speed``)."""
    if not all(math.isfinite(w) for w in (*model.weights, model.intercept)):
        raise ValueError("refusing to publish a model with non-finite weights")
    return ModelUpdate(
        registered_model, contract.SPEED_ALIAS, model.base_version, model.generation, model.updates, quality, model.as_weights()
    )


# --------------------------------------------------------------------------- features


def labelled_features(
    labelled: DataFrame,
    impressions: DataFrame,
    clicks: DataFrame,
    cfg: PlatformConfig,
    bucket_rows: Mapping[str, DataFrame] | None = None,
) -> DataFrame:
    """Labelled impressions (silver label rows) with their point-in-time window features.

    ``impressions`` and ``clicks`` are bronze events (deliveries; deduplicated here). Only the
    events that can fall in a window of some labelled row are read: from the start of the
    earliest row's bucket less the longest window (less the attribution window for the
    impressions a click is attributed to) up to the latest row's time. With ``bucket_rows``
    (:func:`merged_bucket_rows`: each entity's view ⊕ the increments after its horizon, what
    serving merges), the whole buckets come from them and bronze is read from the earliest
    row's bucket on only: an hour or so instead of the longest window.
    """
    features = cfg.features
    bounds = labelled.agg(F.min(F.unix_micros("event_time")), F.max(F.unix_micros("event_time"))).first()
    assert bounds is not None
    if bounds[0] is None:
        earliest = latest = 0
    else:
        earliest, latest = int(bounds[0]), int(bounds[1])
    width = buckets.to_micros(features.bucket_width)
    reach = buckets.reach_micros(features)
    if bucket_rows is not None:
        lower = earliest - earliest % width
    else:  # the lifetime window (no reach) reads all of bronze before the rows
        lower = None if reach is None else earliest - earliest % width - reach
    attribution = cfg.ctr.attribution_window_minutes * 60_000_000
    micros = F.unix_micros("event_time")
    imp_kept = clk_kept = micros < latest
    if lower is not None:
        imp_kept, clk_kept = imp_kept & (micros >= lower - attribution), clk_kept & (micros >= lower)
    impression = event_type(cfg, "impressions")
    imp = dedup_events(impressions.select(*impression.field_names).where(imp_kept))
    clk = dedup_events(clicks.select(*event_type(cfg, "clicks").field_names).where(clk_kept))
    events = feature_events(imp, attribute_clicks(imp, clk, cfg.ctr.attribution_window_minutes), features)
    targets = labelled.select(*impression.field_names, F.col(LABEL).cast("double").alias(LABEL))
    return add_window_features(targets, events, features, bucket_rows)


def merged_bucket_rows(spark: SparkSession, cfg: PlatformConfig) -> dict[str, DataFrame] | None:
    """Each entity's bucket rows as serving merges them: its batch view ⊕ the speed layer's
    increments after the view's horizon; None while some entity has no view (no batch run yet).

    They equal the bucket rows of every event in bronze (the lambda contract) for the buckets
    the increments query has caught up with; events its watermark dropped count from the next
    batch run on, as in serving.
    """
    from delta.tables import DeltaTable

    from speed_layer.increments import increments_path, view_horizon

    rows = {}
    for name, entity in cfg.features.entities.items():
        view_path = cfg.lake.table(*contract.view_table(name))
        if not DeltaTable.isDeltaTable(spark, view_path):
            return None
        parts = [spark.read.format("delta").load(view_path)]
        if DeltaTable.isDeltaTable(spark, increments_path(cfg, name)):
            increments = spark.read.format("delta").load(increments_path(cfg, name))
            parts.append(after_horizon(increments, view_horizon(spark, cfg, name)))
        rows[name] = merge_buckets(parts, entity, cfg.features)
    return rows


# --------------------------------------------------------------------------- champion


@dataclass
class Champion:
    """The registry's champion as the online query uses it: its version, its Spark pipeline (the
    baseline it is validated against) and the weights the online model starts from."""

    version: int | None
    pipeline: Any = None  # a Spark PipelineModel, None without a champion
    start: LinearModel | None = None
    linear: LinearModel | None = None  # the champion itself, when it is a logistic regression
    # Epoch microseconds: the model ``start`` came from learned every impression before it (its
    # training run's labels_final_until, plus one microsecond); None when unknown.
    learned_until: int | None = None

    def probability(self, frame: DataFrame) -> tuple[DataFrame, Column | None]:
        """``frame`` with the champion's P(click) as a column (None without a champion)."""
        if self.linear is not None:
            return frame.withColumn(CHAMPION_P, self.linear.probability()), F.col(CHAMPION_P)
        if self.pipeline is None:
            return frame, None
        from pyspark.ml.functions import vector_to_array

        scored = self.pipeline.transform(frame)
        extra = [c for c in scored.columns if c not in frame.columns]
        scored = scored.withColumn(CHAMPION_P, vector_to_array("probability")[1]).drop(*extra)
        return scored, F.col(CHAMPION_P)


def linear_from_pipeline(pipeline: Any, inputs: ModelInputs) -> tuple[tuple[str, ...], tuple[float, ...], float] | None:
    """A fitted Spark pipeline's logistic regression as (terms, weights, intercept), None when
    its classifier is not a binary logistic regression over ``inputs``.

    The batch pipeline assembles the numeric inputs, then each categorical input one-hot encoded
    over its string indexer's labels plus one slot for an unknown category (the indexer keeps
    unknowns): one ``<input>=<label>`` term per label. The unknown slot never holds a 1 in
    training, so its coefficient is 0 and unknown categories add nothing, as in the online model.
    """
    from pyspark.ml.classification import LogisticRegressionModel
    from pyspark.ml.feature import StringIndexerModel

    classifier = pipeline.stages[-1]
    if not isinstance(classifier, LogisticRegressionModel) or classifier.numClasses != 2:
        return None
    labels: dict[str, list[str]] = {}
    for stage in pipeline.stages:
        if isinstance(stage, StringIndexerModel):
            labels.update(zip(stage.getInputCols(), stage.labelsArray))
    if any(name not in labels for name in inputs.categorical):
        return None
    coefficients = [float(c) for c in classifier.coefficients.toArray()]
    if len(coefficients) != len(inputs.numeric) + sum(len(labels[n]) + 1 for n in inputs.categorical):
        return None
    terms, weights = list(inputs.numeric), coefficients[: len(inputs.numeric)]
    at = len(inputs.numeric)
    for name in inputs.categorical:
        terms += [f"{name}{INDICATOR}{label}" for label in labels[name]]
        weights += coefficients[at : at + len(labels[name])]
        at += len(labels[name]) + 1  # past the unknown slot
    return tuple(terms), tuple(weights), float(classifier.intercept)


def _load_spark_twin(cfg: PlatformConfig, name: str, version: Any) -> Any:
    import mlflow.spark

    twin = version.version if version.tags.get(contract.TAG_FLAVOR) == "spark" else version.tags.get(contract.TAG_SPARK_VERSION)
    if twin is None:
        return None
    # models:/ URIs resolve through the process-wide tracking URI, which nothing else in a
    # `lambda-ml speed run` process sets: without it they went to a local store and the
    # registered model was "not found".
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    return mlflow.spark.load_model(f"models:/{name}/{twin}")


def find_champion(cfg: PlatformConfig) -> Champion:
    """The champion and the weights to start from (see the module docstring); raises if the
    registry cannot be read."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, inputs = cfg.mlflow.registered_model, contract.model_inputs(cfg.features)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    try:
        version = client.get_model_version_by_alias(name, contract.CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc.message):
            log.info("no %s@%s yet: the online model starts from zeros", name, contract.CHAMPION_ALIAS)
            return Champion(None, start=zero_model(inputs))
        raise
    pipeline = _load_spark_twin(cfg, name, version)
    number, horizon = int(version.version), Horizon.from_tags(version.tags)
    linear = linear_from_pipeline(pipeline, inputs) if pipeline is not None else None
    if linear is not None:
        model = LinearModel(*linear, generation=horizon, base_version=number)
        learned_until = _learned_until(client, version.run_id)
        log.info("online model starts from champion %s v%d (%s); %s", name, number, horizon, _learns_from(learned_until))
        return Champion(number, pipeline, model, model, learned_until)
    log.warning(
        "champion %s v%d is not a logistic regression over the declared inputs: it stays the baseline, and the online "
        "model starts from the latest registered logistic regression instead",
        name, number,
    )  # fmt: skip
    for candidate in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: -int(v.version)):
        tags = candidate.tags or {}
        if tags.get(contract.TAG_FLAVOR) != "onnx" or tags.get(contract.TAG_LAYER) == "speed" or not candidate.run_id:
            continue
        if client.get_run(candidate.run_id).data.params.get("ctr.model") != "lr":
            continue
        other = _load_spark_twin(cfg, name, candidate)
        found = linear_from_pipeline(other, inputs) if other is not None else None
        if found is not None:
            learned_until = _learned_until(client, candidate.run_id)
            log.info("online model starts from logistic regression %s v%s; %s", name, candidate.version, _learns_from(learned_until))
            start = LinearModel(*found, generation=Horizon.from_tags(tags), base_version=int(candidate.version))
            return Champion(number, pipeline, start, learned_until=learned_until)
    log.warning("no logistic regression is registered: the online model starts from zeros")
    return Champion(number, pipeline, replace(zero_model(inputs), generation=horizon, base_version=number))


def labels_final_of(client: Any, run_id: str | None) -> datetime | None:
    """The ``labels_final_until`` param of a registered model's training run (UTC): it learned
    every impression at or before it; None when the run does not say."""
    final = client.get_run(run_id).data.params.get(LABELS_FINAL_UNTIL) if run_id else None
    if not final:
        return None
    instant = datetime.fromisoformat(final)
    return instant if instant.tzinfo is not None else instant.replace(tzinfo=UTC)


def _learned_until(client: Any, run_id: str | None) -> int | None:
    """The frontier after the impressions a registered model's training run learned from (epoch
    microseconds, exclusive); None when the run does not say."""
    instant = labels_final_of(client, run_id)
    if instant is None:
        return None
    return int(instant.timestamp() * 1_000_000) + 1  # the impressions *at* that instant were learned too


def _learns_from(learned_until: int | None) -> str:
    if learned_until is None:
        return "its training run does not say which labels it had: learning goes on from the saved frontier, else the earliest label"
    return f"it learns from the impressions after {_instant(learned_until - 1)}, the last its training run had final labels for"


def champion_version(cfg: PlatformConfig) -> int | None:
    """The version the champion alias points at now (None without one); raises if unreachable."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        version = MlflowClient(cfg.mlflow.tracking_uri).get_model_version_by_alias(cfg.mlflow.registered_model, contract.CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc.message):
            return None
        raise
    return int(version.version)


# --------------------------------------------------------------------------- the query


@dataclass(frozen=True)
class Progress:
    """Progressive-validation log-odds bins of the online model and of the champion (empty
    without a champion), over one micro-batch or a whole generation."""

    bins: AucBins
    champion_bins: AucBins


@dataclass
class OnlineLearner:
    """The ``foreachBatch`` body of the ``online`` query (see the module docstring)."""

    cfg: PlatformConfig
    state: SavedState | None = None
    champion: Champion | None = None
    run_id: str | None = None
    query_id: str | None = None  # the id in the query's checkpoint
    _run_key: str = ""
    published: int = 0  # updates this process published
    _merged_views: bool | None = None  # where the last micro-batch's whole buckets came from

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        spark = batch.sparkSession
        cfg, online = self.cfg, self.cfg.speed.online
        if self.state is None:
            self.state = load_state(spark, cfg)
        if self.query_id is None:
            self.query_id = checkpoint_query_id(spark, cfg, "online")
        query_id = self.query_id
        if self.state is not None and self.state.query_id == query_id and self.state.batch_id >= batch_id:
            log.info("online micro-batch %d was learned from before (replayed): no new step", batch_id)
            self._publish(update_of(self.state.model, cfg.mlflow.registered_model, self.state.auc))
            return
        model = self._current_model(spark)
        learned_until, continues = self._frontier(model)
        # Labels before the frontier of the model being stepped came too late for it; before a
        # champion's frontier they are what the champion learned from.
        version = self._labels_version(batch, batch_id, learned_until if continues else None)
        if version is None:
            return
        from lambda_ml_apps.ctr.labels import labels_path

        width = online.step_minutes * 60_000_000
        labels = spark.read.format("delta").option("versionAsOf", version).load(labels_path(cfg))
        stretches = closed_stretches(labels, learned_until, width)
        if stretches is None:
            log.info(
                "online micro-batch %d: no stretch of %d minutes of event time has all its labels final yet (learned until %s)",
                batch_id, online.step_minutes, _instant(learned_until),
            )  # fmt: skip
            return
        start, end = stretches
        micros = F.unix_micros("event_time")
        final = labels.where((micros >= F.lit(start)) & (micros < F.lit(end)))
        impressions = spark.read.format("delta").load(bronze_path(cfg, "impressions"))
        clicks = spark.read.format("delta").load(bronze_path(cfg, "clicks"))
        inputs = contract.model_inputs(cfg.features)
        bucket_rows = merged_bucket_rows(spark, cfg)
        if (bucket_rows is not None) != self._merged_views:
            self._merged_views = bucket_rows is not None
            log.info(
                "online features: whole buckets from %s",
                "the batch views merged with the speed increments (as serving)" if bucket_rows is not None
                else "bronze over the longest window (no batch views yet)",
            )  # fmt: skip
        featured = labelled_features(final, impressions, clicks, cfg, bucket_rows).select(
            *[F.col(n).cast("double").alias(n) for n in inputs.numeric],
            *[F.col(n).cast("string").alias(n) for n in inputs.categorical],
            F.col(LABEL),
            stretch_index(F.col("event_time"), width).alias(STRETCH),
        )
        assert self.champion is not None
        featured, champion_p = self.champion.probability(featured)
        featured = featured.persist()
        try:
            stepped, metrics, bins = learn_stretches(featured, model, online, inputs.categorical, champion_p)
            if metrics.rows == 0:
                log.info("online micro-batch %d: no labelled impressions in the closed stretches", batch_id)
                return
            progress = Progress(bins, auc_bins(featured, CHAMPION_P) if champion_p is not None else {})
            self._commit(spark, batch_id, query_id, stepped, metrics, progress, featured, model.updates, stretches)
        finally:
            featured.unpersist()

    def _labels_version(self, batch: DataFrame, batch_id: int, learned_until: int | None) -> int | None:
        """The newest labels-table version of a change-feed micro-batch (None if it has no
        rows); logs the labels it inserts before ``learned_until``, which are skipped."""
        late = F.lit(False)
        if learned_until is not None:
            late = (F.col("_change_type") == "insert") & (F.unix_micros("event_time") < F.lit(learned_until))
        row = batch.agg(F.max("_commit_version"), F.sum(late.cast("long"))).first()
        assert row is not None  # a global aggregate has one row
        if row[0] is None:
            log.info("online micro-batch %d: no new labels", batch_id)
            return None
        if row[1]:
            log.warning(
                "online micro-batch %d: %d impressions were labelled after their stretch of event time was learned from "
                "(before %s): the online model skips them, the next batch run learns from them",
                batch_id, row[1], _instant(learned_until),
            )  # fmt: skip
        return int(row[0])

    def _commit(
        self,
        spark: SparkSession,
        batch_id: int,
        query_id: str | None,
        stepped: LinearModel,
        metrics: StepMetrics,
        batch: Progress,
        featured: DataFrame,
        updates_before: int,
        stretches: tuple[int, int],
    ) -> None:
        """Save the stepped model and the stretches it learned from (``[start, end)``, epoch
        microseconds) for ``batch_id``, then report, publish and maybe register it."""
        cfg, online = self.cfg, self.cfg.speed.online
        assert self.champion is not None
        sequence = 0 if self.state is None else self.state.sequence + 1
        so_far = batch
        if self.state is not None and self.state.continues(stepped, self.champion.version):
            so_far = Progress(add_bins(self.state.bins or {}, batch.bins), add_bins(self.state.champion_bins or {}, batch.champion_bins))
        auc, champion_auc = cumulative_auc(batch.bins), cumulative_auc(batch.champion_bins)
        total_auc, champion_total_auc = cumulative_auc(so_far.bins), cumulative_auc(so_far.champion_bins)
        state = {
            "generation_impressions": stepped.generation.version("impressions"),
            "generation_clicks": stepped.generation.version("clicks"),
            "base_version": stepped.base_version,
            "updates": stepped.updates,
            "terms": list(stepped.names),
            "weights": list(stepped.weights),
            "intercept": stepped.intercept,
            "rows": metrics.rows,
            "log_loss": metrics.log_loss,
            "champion_log_loss": metrics.baseline_log_loss,
            "auc": auc,
            "champion_auc": champion_auc,
            "champion_version": self.champion.version,
            "cumulative_auc": total_auc,
            "champion_cumulative_auc": champion_total_auc,
            "auc_bins": bin_rows(batch.bins),
            "champion_auc_bins": bin_rows(batch.champion_bins),
            "ftrl_z": None if stepped.ftrl is None else list(stepped.ftrl.z),
            "ftrl_n": None if stepped.ftrl is None else list(stepped.ftrl.n),
            "scales": None if stepped.scales is None else list(stepped.scales),
            "squares": None if stepped.squares is None else list(stepped.squares),
            "square_rows": stepped.square_rows,
            "query_id": query_id,
            "sequence": sequence,
            "learned_until": stretches[1],
        }
        save_state(spark, cfg, batch_id, state)
        self.state = SavedState(
            batch_id, stepped, self.champion.version, total_auc, query_id, sequence, so_far.bins, so_far.champion_bins, stretches[1]
        )
        log.info(
            "online micro-batch %d: %d impressions with final labels (%d clicked) of event time [%s, %s); progressive "
            "log loss %.4f (champion %s), AUC %s (champion %s), over the generation so far %s (champion %s); update %d of %s",
            batch_id, metrics.rows, metrics.positives, _instant(stretches[0]), _instant(stretches[1]), metrics.log_loss or 0.0,
            _fmt(metrics.baseline_log_loss), _fmt(auc), _fmt(champion_auc), _fmt(total_auc), _fmt(champion_total_auc),
            stepped.updates, stepped.generation,
        )  # fmt: skip
        self._log_metrics(batch_id, metrics, {
            "online.auc": auc, "online.champion_auc": champion_auc,
            "online.cumulative_auc": total_auc, "online.champion_cumulative_auc": champion_total_auc,
        })  # fmt: skip
        self._publish(update_of(stepped, cfg.mlflow.registered_model, total_auc))
        # Several steps per micro-batch: register when they passed a multiple of register_every.
        if online.register_every and stepped.updates // online.register_every > updates_before // online.register_every:
            self._register(spark, stepped, total_auc, batch_id, featured)

    def _current_model(self, spark: SparkSession) -> LinearModel:
        """The model to step: the saved one, or the champion's when the champion moved."""
        try:
            current = champion_version(self.cfg)
        except Exception as exc:  # noqa: BLE001 - an MLflow outage must not stop learning
            log.warning("could not read the champion from MLflow (%s): the online model goes on from its last state", exc)
            current = self.champion.version if self.champion is not None else (self.state.champion_version if self.state else None)
            if self.champion is None:
                self.champion = Champion(current, start=None)
            if self.state is not None:
                return self.state.model
            return zero_model(contract.model_inputs(self.cfg.features))
        if self.champion is None or self.champion.version != current or (current is not None and self.champion.pipeline is None):
            self.champion = find_champion(self.cfg)
        if self.state is not None and self.state.champion_version == self.champion.version:
            return self.state.model
        if self.state is not None:
            log.info(
                "the champion moved (v%s -> v%s): the online model starts again from it", self.state.champion_version, self.champion.version
            )
        assert self.champion.start is not None
        return self.champion.start

    def _frontier(self, model: LinearModel) -> tuple[int | None, bool]:
        """Where learning goes on from (epoch microseconds; None: the earliest labelled
        impression) and whether ``model`` is the saved model going on: the saved frontier then,
        else the frontier of the champion it starts from, so that a new generation learns from
        what its champion's training run had no final label for, no more, no less."""
        if self.state is not None and model is self.state.model:
            return self.state.learned_until, True
        if self.champion is not None and self.champion.learned_until is not None:
            return self.champion.learned_until, False
        return (self.state.learned_until if self.state is not None else None), False

    def _publish(self, update: ModelUpdate) -> None:
        try:
            publish_updates(self.cfg, [update])
            self.published += 1
        except Exception as exc:  # noqa: BLE001 - Kafka down: serving keeps the last update; the next one follows
            log.warning("could not publish the online model update (%s)", exc)

    def _log_metrics(self, batch_id: int, metrics: StepMetrics, aucs: dict[str, float | None]) -> None:
        if not self.cfg.speed.report_to_mlflow:
            return
        values = {
            "online.rows": float(metrics.rows),
            "online.log_loss": metrics.log_loss,
            "online.champion_log_loss": metrics.baseline_log_loss,
            **aucs,
            "online.updates": float(self.state.model.updates) if self.state else None,
        }
        champion_auc = aucs["online.champion_cumulative_auc"]
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Metric

            client = MlflowClient(self.cfg.mlflow.tracking_uri)
            assert self.state is not None
            model = self.state.model
            key = f"{model.base_version}:{model.generation.version('impressions')}:{model.generation.version('clicks')}"
            if self.run_id is None or self._run_key != key:
                self.run_id, self._run_key = self._generation_run(client, model, key), key
            now = int(time.time() * 1000)
            client.log_batch(self.run_id, metrics=[Metric(k, v, now, batch_id) for k, v in values.items() if v is not None])
            if champion_auc is not None and self.champion is not None and self.champion.version is not None:
                # The quality policy then compares the champion and the online model on the same rows.
                client.set_model_version_tag(
                    self.cfg.mlflow.registered_model, str(self.champion.version), contract.TAG_QUALITY_SCORE, repr(champion_auc)
                )
        except Exception as exc:  # noqa: BLE001 - an MLflow outage costs metrics, never the stream
            log.warning("could not send the online model's metrics to MLflow (%s)", exc)

    def _generation_run(self, client: Any, model: LinearModel, key: str) -> str:
        """The MLflow run of one generation of the online model, in ``<mlflow.experiment>-speed``,
        found again after a restart: its metrics form one series per generation."""
        from speed_layer.monitor import metrics_experiment

        name = metrics_experiment(self.cfg)
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        found = client.search_runs([experiment_id], f"tags.query = 'online' AND tags.generation = '{key}'", max_results=1)
        if found:
            return str(found[0].info.run_id)
        tags = {
            contract.TAG_LAYER: "speed",
            "query": "online",
            "generation": key,
            "base_version": str(model.base_version),
            **model.generation.tags(),
        }
        run_name = f"online-v{model.base_version}-{model.generation.version('impressions')}-{model.generation.version('clicks')}"
        return str(client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id)

    def _register(self, spark: SparkSession, model: LinearModel, auc: float | None, batch_id: int, rows: DataFrame) -> None:
        try:
            from lambda_ml_apps.ctr.online_registry import register_speed_version

            register_speed_version(spark, self.cfg, model, rows, auc, batch_id)
        except Exception as exc:  # noqa: BLE001 - registration is periodic; the next one retries
            log.warning("could not register the online model in MLflow (%s)", exc)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _instant(micros: int | None) -> str:
    """Epoch microseconds as a UTC time for the logs."""
    if micros is None:
        return "nothing yet"
    return datetime.fromtimestamp(micros / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def start_online(spark: SparkSession, cfg: PlatformConfig, trigger: Any) -> Any:
    """Start the online query: the silver labels' change feed -> the online model."""
    from speed_layer.app import checkpoint
    from lambda_ml_apps.ctr.labels import ensure_labels_table, labels_path
    from speed_layer.silver import first_change_feed_version

    ensure_labels_table(spark, cfg)
    changes = (
        spark.readStream.format("delta")
        .option("readChangeFeed", "true")
        .option("startingVersion", first_change_feed_version(spark, labels_path(cfg)))
        .option("maxFilesPerTrigger", cfg.speed.max_files_per_trigger)
        .load(labels_path(cfg))
    )
    writer = (
        changes.writeStream.queryName("online")
        .option("checkpointLocation", checkpoint(cfg, "online"))
        .foreachBatch(OnlineLearner(cfg))
    )
    query = trigger(writer).start()
    log.info("online query started: %s -> %s and %s", labels_path(cfg), model_table(cfg), cfg.kafka.topics.model_updates.name)
    return query

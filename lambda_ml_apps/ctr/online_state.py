"""The online model's state in ``speed/online_model``: one row per micro-batch that learned (the
model, the frontier ``learned_until``, the progressive-validation figures and bins), appended
once per batch id of the query's checkpoint, and read back at a restart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType, LongType, StringType, StructField, StructType

from lambda_ml.catalog import ONLINE_MODEL_TABLE
from lambda_ml.config import PlatformConfig
from lambda_ml.contract import Horizon
from lambda_ml.metrics import AucBins, add_bins, bins_auc
from lambda_ml_apps.ctr.online_steps import FtrlState, LinearModel



BIN_TYPE = StructType(
    [StructField("bin", LongType(), False), StructField("positives", DoubleType(), False), StructField("negatives", DoubleType(), False)]
)
STATE_SCHEMA = StructType(
    [
        StructField("batch_id", LongType(), False),
        StructField("generation_impressions", LongType(), True),
        StructField("generation_clicks", LongType(), True),
        StructField("base_version", LongType(), False),
        StructField("updates", LongType(), False),
        StructField("terms", ArrayType(StringType(), False), False),
        StructField("weights", ArrayType(DoubleType(), False), False),
        StructField("intercept", DoubleType(), False),
        StructField("rows", LongType(), False),
        StructField("log_loss", DoubleType(), True),
        StructField("champion_log_loss", DoubleType(), True),
        StructField("auc", DoubleType(), True),
        StructField("champion_auc", DoubleType(), True),
        StructField("champion_version", LongType(), True),
        # Progressive AUC over the generation so far, and this micro-batch's log-odds bins it
        # sums (bin, positives, negatives): a restart adds the bins of the generation's rows.
        StructField("cumulative_auc", DoubleType(), True),
        StructField("champion_cumulative_auc", DoubleType(), True),
        StructField("auc_bins", ArrayType(BIN_TYPE, False), True),
        StructField("champion_auc_bins", ArrayType(BIN_TYPE, False), True),
        # FTRL-Proximal's z and n per coordinate (the weights', then the intercept's); null for SGD.
        StructField("ftrl_z", ArrayType(DoubleType(), False), True),
        StructField("ftrl_n", ArrayType(DoubleType(), False), True),
        # Each term's scale (see LinearModel.scales; null for a term not seen in a batch yet).
        StructField("scales", ArrayType(DoubleType(), True), True),
        # SGD: each term's sum of squares over the rows learned from, and their count (the scales' source).
        StructField("squares", ArrayType(DoubleType(), False), True),
        StructField("square_rows", LongType(), True),
        # The streaming query (its checkpoint) whose micro-batch this was: batch ids restart
        # from 0 with a new checkpoint, and only the same query's ids mean a replay.
        StructField("query_id", StringType(), True),
        # Counts the saved rows: the latest is the one with the highest (batch ids restart).
        StructField("sequence", LongType(), False),
        # Every impression before this instant (epoch microseconds) was learned from: the end of
        # the last stretch of event time learned from, where the next step goes on.
        StructField("learned_until", LongType(), True),
    ]
)


def model_table(cfg: PlatformConfig) -> str:
    return cfg.lake.table(*ONLINE_MODEL_TABLE)


@dataclass(frozen=True)
class SavedState:
    batch_id: int
    model: LinearModel
    champion_version: int | None
    auc: float | None  # progressive AUC over the generation so far (the update's quality)
    query_id: str | None = None
    sequence: int = 0
    bins: AucBins | None = None  # the generation's log-odds bins, the online model's
    champion_bins: AucBins | None = None  # and the champion's, on the same rows
    learned_until: int | None = None  # epoch microseconds: every impression before it was learned from

    def continues(self, model: LinearModel, champion_version: int | None) -> bool:
        """Whether ``model`` belongs to this state's generation (its bins go on adding up)."""
        mine = self.model
        return (mine.generation, mine.base_version, self.champion_version) == (model.generation, model.base_version, champion_version)


def _bins_of(rows: Any) -> AucBins:
    return {int(r["bin"]): (float(r["positives"]), float(r["negatives"])) for r in rows or ()}


def bin_rows(bins: AucBins) -> list[dict[str, Any]]:
    return [{"bin": index, "positives": p, "negatives": n} for index, (p, n) in sorted(bins.items())]


def cumulative_auc(bins: AucBins | None) -> float | None:
    """The AUC of bins (None without both classes)."""
    value = bins_auc(bins or {})
    return None if math.isnan(value) else value


def load_state(spark: SparkSession, cfg: PlatformConfig) -> SavedState | None:
    """The model saved by the latest micro-batch, None if none was saved yet."""
    from delta.tables import DeltaTable

    path = model_table(cfg)
    if not DeltaTable.isDeltaTable(spark, path):
        return None
    saved = spark.read.format("delta").load(path)
    row = saved.orderBy(F.col("sequence").desc()).limit(1).first()
    if row is None:
        return None
    generation = Horizon.of(impressions=row["generation_impressions"], clicks=row["generation_clicks"])
    ftrl = None
    if "ftrl_z" in saved.columns and row["ftrl_z"] is not None:
        ftrl = FtrlState(tuple(row["ftrl_z"]), tuple(row["ftrl_n"]))
    scales = tuple(row["scales"]) if "scales" in saved.columns and row["scales"] is not None else None
    squares = tuple(row["squares"]) if "squares" in saved.columns and row["squares"] is not None else None
    square_rows = int(row["square_rows"] or 0) if "square_rows" in saved.columns else 0
    model = LinearModel(
        tuple(row["terms"]), tuple(row["weights"]), row["intercept"], generation, row["updates"], row["base_version"], ftrl, scales,
        squares, square_rows,
    )  # fmt: skip
    # The progressive-validation bins of every micro-batch of the same generation.
    same = F.lit(True)
    for column in ("generation_impressions", "generation_clicks", "base_version", "champion_version"):
        same = same & F.col(column).eqNullSafe(row[column])
    bins: AucBins = {}
    champion_bins: AucBins = {}
    if "auc_bins" in saved.columns:  # rows saved before the bins were kept have none
        for part in saved.where(same).select("auc_bins", "champion_auc_bins").collect():
            bins, champion_bins = add_bins(bins, _bins_of(part[0])), add_bins(champion_bins, _bins_of(part[1]))
    learned_until = row["learned_until"] if "learned_until" in saved.columns else None
    return SavedState(
        row["batch_id"], model, row["champion_version"], cumulative_auc(bins), row["query_id"], row["sequence"], bins, champion_bins,
        learned_until,
    )  # fmt: skip


def save_state(spark: SparkSession, cfg: PlatformConfig, batch_id: int, state: dict[str, Any]) -> None:
    """Append one micro-batch's model, once: a replayed batch id of the same query (checkpoint)
    is skipped by Delta."""
    frame = spark.createDataFrame([{"batch_id": batch_id, **state}], STATE_SCHEMA)
    (
        # mergeSchema: a table saved before a column was added gains it.
        frame.coalesce(1).write.format("delta").mode("append").option("mergeSchema", "true")
        .option("txnAppId", f"online-model:{state.get('query_id')}").option("txnVersion", batch_id)
        .save(model_table(cfg))
    )  # fmt: skip

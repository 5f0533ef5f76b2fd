"""Benchmark: the whole batch retrain on 1 M, 3 M and 10 M events, against a single-process peer.

What is timed is ``batch_layer.train.run(spark, cfg)`` and nothing else: pin bronze, write the
batch views, build the point-in-time training set, choose and fit the model (the configured
search), evaluate it on the holdout, export it to ONNX, check parity and register both models
in a real MLflow server. The peer does the same retrain in one Python process with pandas,
NumPy and scikit-learn, from the same declarations (``features:`` and ``ctr:``) on the same
bronze tables (see :func:`peer_retrain`).

Bronze is written straight to Delta by Spark (``spark.range`` plus random columns that
implement the click model of :mod:`lambda_ml_apps.ctr.generator`): producing 10 M events through Kafka
would take far longer than the retrain itself. Generation, the platform's retrain and the peer
each run in a child process of their own, so each one's peak memory (Python process, Spark JVM
and their children, sampled from ``/proc``) is its alone.

    python bench/batch_retrain.py                  # 1M, 3M and 10M events (an hour or more)
    python bench/batch_retrain.py --quick          # 100k events (a few minutes)
    python bench/batch_retrain.py --sizes 2M --no-peer --out /tmp/r.json
    python bench/batch_retrain.py --sizes 10M --set 'ctr.search.lr.reg_param=[]' --set 'ctr.search.lr.elastic_net_param=[]'
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import (  # noqa: E402
    Measured,
    bench_parser,
    default_out,
    gib,
    human_count,
    machine_info,
    parse_count,
    run_measured,
    markdown_table,
    write_result,
)
from bench.report import batch_retrain_table  # noqa: E402
from lambda_ml.config import LIFETIME, PlatformConfig, load_config, write_config  # noqa: E402
from lambda_ml_apps.ctr.generator import BIAS, DEVICES, DEVICE_EFFECT, LATE_CLICK_SHARE, MAX_POSITION, POSITION_EFFECT  # noqa: E402
from lambda_ml.logs import setup_logging  # noqa: E402
from lambda_ml.schemas import event_type  # noqa: E402

import numpy as np  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger("bench.batch_retrain")

NAME = "batch_retrain"
SIZES = (1_000_000, 3_000_000, 10_000_000)
QUICK_SIZES = (100_000,)
TARGET_EVENTS = 10_000_000
TARGET_WALL_S = 300.0
TARGET_PEAK_GIB = 8.0
# Spark driver memory (the platform's default is 2g): room for the 10M run. The JVM grows its
# heap towards this limit under load, so the peak memory follows it (about 1 GiB above).
DRIVER_MEMORY = "4g"
PACKAGES = ("pyspark", "delta-spark", "mlflow", "onnxmltools", "onnxruntime", "pandas", "scikit-learn", "skl2onnx", "deltalake")

# The click model's parts that lambda_ml_apps.ctr.generator keeps inline: device shares and the spread
# of user affinities and item qualities.
DEVICE_WEIGHTS = (0.6, 0.3, 0.1)
USER_AFFINITY_SD = 0.6
ITEM_QUALITY_SD = 0.8
# The generator's defaults (500 users, 100 items, 20k impressions) scaled with the size: about
# 40 impressions per user and 1000 per item.
IMPRESSIONS_PER_USER = 40
IMPRESSIONS_PER_ITEM = 1000
ROWS_PER_FILE = 1_000_000


# --------------------------------------------------------------------------- the click model


def population(cfg: PlatformConfig, impressions: int) -> tuple[int, int]:
    """Distinct users and items for a run of ``impressions``: the generator's, scaled up."""
    gen = cfg.generator
    return max(gen.users, impressions // IMPRESSIONS_PER_USER), max(gen.items, impressions // IMPRESSIONS_PER_ITEM)


def clicks_per_impression(cfg: PlatformConfig, draws: int = 400_000) -> float:
    """Expected bronze click rows per impression (duplicates included), by simulation.

    >>> 0.05 < clicks_per_impression(load_config(), draws=20_000) < 0.15
    True
    """
    rng = np.random.default_rng(cfg.generator.seed)
    logit = (
        BIAS
        + rng.normal(0, USER_AFFINITY_SD, draws)
        + rng.normal(0, ITEM_QUALITY_SD, draws)
        + rng.choice([DEVICE_EFFECT[d] for d in DEVICES], draws, p=DEVICE_WEIGHTS)
        + POSITION_EFFECT * rng.integers(0, MAX_POSITION, draws)
    )
    return float(np.mean(1 / (1 + np.exp(-logit)))) * (1 + cfg.generator.duplicate_fraction)


def impressions_for(cfg: PlatformConfig, events: int) -> int:
    """Impressions to generate so that impressions + click rows come to about ``events``."""
    return max(1, round(events / (1 + clicks_per_impression(cfg))))


def _unit_interval(key: Column, salt: str) -> Column:
    """A uniform double in (0, 1] that depends only on ``key`` and ``salt``."""
    from pyspark.sql import functions as F

    bits = F.xxhash64(key, F.lit(salt)).bitwiseAND(F.lit((1 << 53) - 1))
    return (bits + 1) / F.lit(float(1 << 53))


def _gaussian(key: Column, salt: str, sd: float) -> Column:
    """N(0, sd) drawn once per entity (Box-Muller on two hashes): the same id, the same value,
    without a table of affinities to join."""
    from pyspark.sql import functions as F

    radius = F.sqrt(F.lit(-2.0) * F.log(_unit_interval(key, f"{salt}-r")))
    return radius * F.cos(F.lit(2 * math.pi) * _unit_interval(key, f"{salt}-a")) * F.lit(sd)


def bronze_frames(spark: SparkSession, cfg: PlatformConfig, impressions: int, now: datetime) -> tuple[DataFrame, DataFrame]:
    """Bronze impressions and clicks as the speed layer would land them from the generator.

    Same model as :func:`lambda_ml_apps.ctr.generator.generate`: P(click) = sigmoid(bias + user affinity
    + item quality + device + position); most clicks a few minutes later (exponential, mean
    2 min, capped at the window), a share after the window; clicks later than ``now`` not yet
    sent; some sent out of order (their Kafka time up to 10 min late), some twice. Ids, Kafka
    lineage columns and millisecond event times follow the generator and the ingest. Both
    frames derive from one seeded frame: Spark's ``rand(seed)`` gives the same values each time
    a partition is computed, so every click matches its impression.
    """
    from pyspark.sql import functions as F

    gen = cfg.generator
    users, items = population(cfg, impressions)
    now_ms = int(now.timestamp() * 1000)
    span_ms = int(gen.span_hours * 3600 * 1000)
    window_ms = cfg.ctr.attribution_window_minutes * 60 * 1000
    run_tag = f"{gen.seed}-{int(now.timestamp())}"
    seeds = itertools.count(gen.seed * 1000)

    def uniform() -> Column:
        return F.rand(next(seeds))

    # Every draw is a column of its own: a rand() referenced twice in one expression would be
    # two generators, and a CASE evaluates them on different rows.
    base = spark.range(0, impressions, numPartitions=max(2, math.ceil(impressions / ROWS_PER_FILE))).select(
        F.col("id").alias("n"),
        (F.lit(now_ms - span_ms) + (uniform() * span_ms).cast("long")).alias("ts_ms"),
        F.floor(uniform() * users).cast("long").alias("user"),
        F.floor(uniform() * items).cast("long").alias("item"),
        (F.floor(uniform() * MAX_POSITION) + 1).cast("int").alias("position"),
        *(uniform().alias(f"u_{name}") for name in ("device", "click", "late", "delay", "out_of_order", "send", "duplicate")),
    )
    device = F.lit(DEVICES[-1])
    for name, upper in reversed(list(zip(DEVICES, itertools.accumulate(DEVICE_WEIGHTS)))[:-1]):
        device = F.when(F.col("u_device") < upper, F.lit(name)).otherwise(device)
    base = base.withColumn("device", device)
    device_effect = F.lit(0.0)
    for name, effect in DEVICE_EFFECT.items():
        device_effect = F.when(F.col("device") == name, F.lit(effect)).otherwise(device_effect)
    logit = (
        F.lit(BIAS)
        + _gaussian(F.col("user"), "user", USER_AFFINITY_SD)
        + _gaussian(F.col("item"), "item", ITEM_QUALITY_SD)
        + device_effect
        + F.lit(POSITION_EFFECT) * (F.col("position") - 1)
    )
    delay_ms = F.when(
        F.col("u_late") < LATE_CLICK_SHARE, F.lit(window_ms + 1000) + F.col("u_delay") * 3_599_000
    ).otherwise(F.least(-F.log1p(-F.col("u_delay")) * 120_000, F.lit(float(window_ms))))
    base = base.withColumn("click_ms", F.col("ts_ms") + delay_ms.cast("long")).withColumn(
        "clicked", F.col("u_click") < 1 / (1 + F.exp(-logit))
    )

    ingested_at = F.timestamp_millis(F.lit(now_ms))
    impression_id = F.concat(F.lit(f"imp-{run_tag}-"), F.col("n").cast("string"))
    user_id = F.concat(F.lit("u"), F.col("user").cast("string"))
    impression_rows = base.select(
        impression_id.alias("event_id"),
        F.timestamp_millis("ts_ms").alias("event_time"),
        user_id.alias("user_id"),
        F.concat(F.lit("i"), F.col("item").cast("string")).alias("item_id"),
        "device",
        "position",
        F.lit(cfg.events.topic("impressions").name).alias("kafka_topic"),
        F.pmod(F.hash(user_id), F.lit(cfg.events.topic("impressions").partitions)).alias("kafka_partition"),
        F.col("n").alias("kafka_offset"),  # unique per partition, not dense: nothing reads it
        F.timestamp_millis("ts_ms").alias("kafka_timestamp"),
        ingested_at.alias("ingested_at"),
    )
    send_delay_ms = F.when(F.col("u_out_of_order") < gen.late_fraction, 60_000 + F.col("u_send") * 540_000).otherwise(0)
    copies = F.when(F.col("u_duplicate") < gen.duplicate_fraction, 2).otherwise(1)
    click_rows = (
        base.where(F.col("clicked") & (F.col("click_ms") <= now_ms))
        .withColumn("copy", F.explode(F.sequence(F.lit(1), copies)))
        .select(
            F.concat(F.lit(f"clk-{run_tag}-"), F.col("n").cast("string")).alias("event_id"),
            impression_id.alias("impression_id"),
            F.timestamp_millis("click_ms").alias("event_time"),
            F.lit(cfg.events.topic("clicks").name).alias("kafka_topic"),
            F.pmod(F.hash(impression_id), F.lit(cfg.events.topic("clicks").partitions)).alias("kafka_partition"),
            (F.col("n") * 2 + F.col("copy") - 1).alias("kafka_offset"),
            F.timestamp_millis(F.col("click_ms") + send_delay_ms.cast("long")).alias("kafka_timestamp"),
            ingested_at.alias("ingested_at"),
        )
    )
    return impression_rows, click_rows


def write_bronze(spark: SparkSession, cfg: PlatformConfig, impressions: int, now: datetime) -> dict[str, int]:
    """Create the bronze tables with their declared schemas and append the generated events."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    counts = {}
    frames = dict(zip((event_type(cfg, "impressions"), event_type(cfg, "clicks")), bronze_frames(spark, cfg, impressions, now)))
    for event, frame in frames.items():
        path = cfg.lake.table("bronze", event.name)
        schema = event.bronze_schema()
        DeltaTable.createIfNotExists(spark).location(path).addColumns(schema).execute()
        frame.select(*[F.col(f.name).cast(f.dataType) for f in schema.fields]).write.format("delta").mode("append").save(path)
        counts[event.name] = spark.read.format("delta").load(path).count()
    return counts


# --------------------------------------------------------------------------- child phases


class Timeline:
    """Marks of a timed run's steps, each also appended to a file as it happens, so that a run
    stopped at its time limit still tells how far it got and how long each step took."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.time()
        self.marks: list[dict[str, Any]] = []
        path.write_text(json.dumps({"t": self.start, "step": "(start)"}) + "\n")

    def mark(self, step: str, at: float | None = None) -> None:
        entry = {"t": at if at is not None else time.time(), "step": step[:140]}
        self.marks.append(entry)
        with self.path.open("a") as out:
            out.write(json.dumps(entry) + "\n")

    def relative(self) -> list[dict[str, Any]]:
        return [{"t": round(m["t"] - self.start, 2), "step": m["step"]} for m in self.marks]


def read_timeline(path: Path) -> list[dict[str, Any]]:
    """The marks a child appended to ``path``, in seconds since its start (empty if none)."""
    try:
        entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []
    if not entries:
        return []
    start = entries[0]["t"]
    return [{"t": round(e["t"] - start, 2), "step": e["step"]} for e in entries[1:]]


class LogTimeline(logging.Handler):
    """Turns the batch layer's log lines into timeline marks: the only view into
    ``train.run``'s steps that needs no change to it."""

    def __init__(self, timeline: Timeline, prefixes: tuple[str, ...]) -> None:
        super().__init__(logging.INFO)
        self.timeline = timeline
        self.prefixes = prefixes

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(self.prefixes):
            self.timeline.mark(record.getMessage(), at=record.created)


def phase_generate(cfg: PlatformConfig, impressions: int, now: datetime) -> dict[str, Any]:
    from lambda_ml.spark import get_spark

    spark = get_spark(cfg, "bench-generate")
    try:
        started = time.perf_counter()
        counts = write_bronze(spark, cfg, impressions, now)
        seconds = time.perf_counter() - started
    finally:
        spark.stop()
    return {"impressions": counts["impressions"], "clicks": counts["clicks"], "seconds": seconds}


def phase_platform(cfg: PlatformConfig, timeline_file: Path) -> dict[str, Any]:
    from batch_layer import train
    from lambda_ml.spark import get_spark

    spark = get_spark(cfg, "bench-retrain")
    timeline = Timeline(timeline_file)
    logging.getLogger().addHandler(LogTimeline(timeline, ("batch_layer", "lambda_ml")))
    try:
        result = train.run(spark, cfg)
        end = time.time()
    finally:
        spark.stop()
    if getattr(result, "reused", False):
        raise RuntimeError("the registry already held versions of this lineage: train.run trained nothing")
    versions = getattr(result, "versions", None)
    return {
        "start": timeline.start,
        "end": end,
        "rows": dict(getattr(result, "rows", {})),
        "auc": getattr(result, "auc", None),
        "log_loss": getattr(result, "log_loss", None),
        "registered_versions": None if versions is None else {k: str(v) for k, v in vars(versions).items()},
        "timeline": timeline.relative(),
    }


def phase_peer(cfg: PlatformConfig, timeline_file: Path) -> dict[str, Any]:
    # Imports first: the platform's are done before its clock starts too.
    import mlflow  # noqa: F401
    import sklearn  # noqa: F401
    import skl2onnx  # noqa: F401

    timeline = Timeline(timeline_file)
    outcome = peer_retrain(cfg, timeline.mark)
    return {"start": timeline.start, "end": time.time(), **outcome, "timeline": timeline.relative()}


def run_phase(args: argparse.Namespace) -> int:
    """Body of a child process: one phase on one size, its outcome written as JSON."""
    setup_logging()
    cfg = load_config(args.config)
    if args.phase == "generate":
        outcome = phase_generate(cfg, args.impressions, datetime.fromtimestamp(args.now, UTC))
    elif args.phase == "platform":
        outcome = phase_platform(cfg, Path(args.result + ".timeline"))
    else:
        outcome = phase_peer(cfg, Path(args.result + ".timeline"))
    Path(args.result).write_text(json.dumps(outcome, indent=1, default=str))
    return 0


# --------------------------------------------------------------------------- the peer


def peer_retrain(cfg: PlatformConfig, mark: Any) -> dict[str, Any]:
    """The same retrain in this one process: pandas and NumPy for the data, scikit-learn for
    the model, skl2onnx + onnxruntime for the export and parity check, MLflow to register.

    It follows the same declarations as the platform (``features:`` and ``ctr:`` in the
    config): dedup, attributed clicks, labels once the window closed, per-entity bucket views,
    window features over ``[bucket_start(t) - window, t)`` with ratios and priors, a time-based
    holdout, the same grid search on a validation split of the training rows, a standardised
    logistic regression with Spark's penalty (``C = 1 / (reg_param * n)``, ``l1_ratio =
    elastic_net_param``) and iteration cap. Only ``ctr.model: lr`` is implemented.
    """
    import warnings
    from importlib.metadata import version as package_version

    import mlflow
    import mlflow.onnx
    import mlflow.sklearn
    import onnxruntime as ort
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss, roc_auc_score
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    ctr = cfg.ctr
    if ctr.model != "lr":
        raise NotImplementedError(f"the peer implements ctr.model 'lr' only, not {ctr.model!r}")
    labelled, numeric, categorical, info = peer_training_set(cfg, mark)
    horizon = info["horizon"]
    cutoff = np.quantile(labelled["micros"], 1 - ctr.holdout_fraction, method="inverted_cdf")
    train, holdout = labelled[labelled["micros"] <= cutoff], labelled[labelled["micros"] > cutoff]
    for part, frame in (("train", train), ("holdout", holdout)):
        if frame["label"].nunique() < 2:
            raise RuntimeError(f"the peer's {part} set has a single class")

    def pipeline(params: dict[str, float], rows: int) -> Any:
        elastic = params["elastic_net_param"]
        classifier = LogisticRegression(
            C=1 / (params["reg_param"] * rows) if params["reg_param"] > 0 else 1e12,
            l1_ratio=elastic,
            solver="saga" if elastic > 0 else "lbfgs",
            max_iter=ctr.max_iter,
        )
        encode = ColumnTransformer(
            [("numeric", StandardScaler(), numeric), ("categorical", OneHotEncoder(handle_unknown="ignore"), categorical)]
        )
        return Pipeline([("features", encode), ("lr", classifier)])

    inputs = numeric + categorical
    grid = [
        {"reg_param": r, "elastic_net_param": e}
        for r in (ctr.search.lr.reg_param or (ctr.reg_param,))
        for e in (ctr.search.lr.elastic_net_param or (ctr.elastic_net_param,))
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # Spark stops at max_iter silently too
        chosen = grid[0]
        if len(grid) > 1:
            vcut = np.quantile(train["micros"], 1 - ctr.search.validation_fraction, method="inverted_cdf")
            fit_part, validation = train[train["micros"] <= vcut], train[train["micros"] > vcut]
            scores = []
            for params in grid:
                candidate = pipeline(params, len(fit_part)).fit(fit_part[inputs], fit_part["label"])
                scores.append(roc_auc_score(validation["label"], candidate.predict_proba(validation[inputs])[:, 1]))
            chosen = grid[int(np.argmax(scores))]
            mark(f"searched {len(grid)} candidates; chose {chosen}")
        model = pipeline(chosen, len(train)).fit(train[inputs], train["label"])
    p = model.predict_proba(holdout[inputs])[:, 1]
    auc = float(roc_auc_score(holdout["label"], p))
    loss = float(log_loss(holdout["label"], np.clip(p, 1e-15, 1 - 1e-15)))
    mark(f"fitted; holdout AUC {auc:.4f}, log loss {loss:.4f}")

    initial_types = [(n, FloatTensorType([None, 1])) for n in numeric] + [(c, StringTensorType([None, 1])) for c in categorical]
    onnx_model = convert_sklearn(model, initial_types=initial_types, options={id(model.named_steps["lr"]): {"zipmap": False}})
    compared = holdout.head(100_000)
    feeds = {n: compared[n].to_numpy(np.float32).reshape(-1, 1) for n in numeric}
    feeds.update({c: compared[c].astype(str).to_numpy(object).reshape(-1, 1) for c in categorical})
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_p = session.run(["probabilities"], feeds)[0][:, 1]
    max_diff = float(np.max(np.abs(onnx_p - p[: len(compared)])))
    if max_diff > ctr.parity_atol:
        raise RuntimeError(f"ONNX differs from scikit-learn by {max_diff:.2g} > {ctr.parity_atol}")
    mark(f"exported to ONNX; parity max difference {max_diff:.2g}")

    name = f"{cfg.mlflow.registered_model}-peer"
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_experiment(f"{cfg.mlflow.experiment}-peer")
    with mlflow.start_run(run_name=f"peer-{horizon['horizon_impressions']}-{horizon['horizon_clicks']}"):
        mlflow.log_params({**{f"chosen.{k}": v for k, v in chosen.items()}, "holdout_after_micros": int(cutoff)})
        mlflow.log_metrics({"auc": auc, "log_loss": loss, "rows_train": len(train), "rows_holdout": len(holdout)})
        mlflow.log_dict(cfg.model_dump(mode="json"), "config.json")
        sk_info = mlflow.sklearn.log_model(
            model, name="sklearn-model", pip_requirements=[f"scikit-learn=={package_version('scikit-learn')}"]
        )
        onnx_info = mlflow.onnx.log_model(
            onnx_model, name="onnx-model", pip_requirements=[f"onnxruntime=={package_version('onnxruntime')}"],
            save_as_external_data=False,
        )  # fmt: skip
        mlflow.register_model(sk_info.model_uri, name)
        onnx_version = mlflow.register_model(onnx_info.model_uri, name)
        mlflow.MlflowClient().set_registered_model_alias(name, "champion", onnx_version.version)
    mark("registered both models")
    rows = {"impressions": info["impressions"], "clicks": info["clicks"], "train": len(train), "holdout": len(holdout)}
    return {"rows": rows, "auc": auc, "log_loss": loss, "model_inputs": len(inputs), "candidates": len(grid)}


def peer_training_set(cfg: PlatformConfig, mark: Any) -> tuple[pd.DataFrame, list[str], list[str], dict[str, Any]]:
    """The peer's bucket views (written) and labelled training rows with their window features:
    ``(rows, numeric inputs, categorical inputs, info)``; ``rows`` also hold ``event_id``,
    ``micros`` (event time) and ``label``; ``info`` the horizon and the deduplicated counts."""
    import pandas as pd
    from deltalake import DeltaTable, write_deltalake

    features = cfg.features
    window_us = cfg.ctr.attribution_window_minutes * 60_000_000
    impression, click = event_type(cfg, "impressions"), event_type(cfg, "clicks")
    imp_table = DeltaTable(cfg.lake.table("bronze", impression.name))
    clk_table = DeltaTable(cfg.lake.table("bronze", click.name))
    horizon = {"horizon_impressions": imp_table.version(), "horizon_clicks": clk_table.version()}
    imp = imp_table.to_pandas(columns=impression.field_names).drop_duplicates("event_id", ignore_index=True)
    clk = clk_table.to_pandas(columns=click.field_names).drop_duplicates("event_id", ignore_index=True)
    imp["micros"], clk["micros"] = epoch_micros(imp["event_time"]), epoch_micros(clk["event_time"])
    mark("read and deduplicated bronze")

    # Attributed clicks carry their impression's fields; feature events are both kinds.
    carried = [c for c in impression.field_names if c not in ("event_id", "event_time")]
    shown = imp[["event_id", "micros", *carried]].rename(columns={"event_id": "impression_id", "micros": "impression_micros"})
    attributed = clk[["impression_id", "micros"]].merge(shown, on="impression_id")
    delay = attributed["micros"] - attributed["impression_micros"]
    attributed = attributed[(delay >= 0) & (delay <= window_us)]
    events = pd.concat(
        [imp[["micros", *carried]].assign(kind="impressions"), attributed[["micros", *carried]].assign(kind="clicks")],
        ignore_index=True,
    )
    width = int(features.bucket_width.total_seconds()) * 1_000_000
    events["bucket"] = events["micros"] // width
    values = _aggregate_values(events, features)
    for name, entity in features.entities.items():
        keys = list(entity.keys)
        grouped = pd.concat([events[keys + ["bucket"]], values], axis=1).groupby(keys + ["bucket"], as_index=False)
        view = grouped.agg({agg: a.aggregation if a.aggregation != "count" else "sum" for agg, a in features.aggregates.items()})
        view = view.replace([np.inf, -np.inf], np.nan)  # a min or max over no event is null, as in Spark
        view.insert(len(keys), "bucket_start", pd.to_datetime(view.pop("bucket") * width, unit="us", utc=True))
        write_deltalake(cfg.lake.table("peer", "views", f"{name}_buckets"), view.assign(**horizon), mode="overwrite", schema_mode="overwrite")
    mark("attributed clicks and wrote the bucket views")

    as_of = max(imp["micros"].max(), clk["micros"].max())
    labelled = imp[imp["micros"] <= as_of - window_us].reset_index(drop=True)
    labelled["label"] = labelled["event_id"].isin(attributed["impression_id"]).astype("float64")
    for name, entity in features.entities.items():
        computed = window_features(labelled, events, values, list(entity.keys), features, width)
        for column, series in computed.items():
            labelled[f"{name}_{column}"] = series
    numeric = [c for c in labelled.columns if _is_window_feature(c, features)] + list(features.context.numeric)
    categorical = list(features.context.categorical)
    labelled[numeric] = labelled[numeric].astype("float64")
    mark(f"built the point-in-time training set ({len(numeric)} numeric inputs)")
    return labelled, numeric, categorical, {"horizon": horizon, "impressions": len(imp), "clicks": len(clk)}


def epoch_micros(times: pd.Series) -> np.ndarray:
    """UTC timestamps (time-zone aware or naive UTC) as int64 epoch microseconds.

    >>> import pandas as pd
    >>> epoch_micros(pd.Series(pd.to_datetime(["1970-01-01T00:00:01Z"]))).tolist()
    [1000000]
    """
    if times.dt.tz is not None:
        times = times.dt.tz_convert("UTC").dt.tz_localize(None)
    return times.to_numpy().astype("datetime64[us]").astype(np.int64)


def _aggregate_values(events: pd.DataFrame, features: Any) -> pd.DataFrame:
    """What each feature event adds to each declared aggregate: 1 or its measure for events of
    the aggregate's kind; the operation's neutral element (0, +inf, -inf) for the others."""
    import pandas as pd

    neutral = {"count": 0.0, "sum": 0.0, "min": np.inf, "max": -np.inf}
    columns = {}
    for name, a in features.aggregates.items():
        value = 1.0 if a.measure is None else events[a.measure].astype("float64")
        columns[name] = np.where(events["kind"] == a.events, value, neutral[a.aggregation])
    return pd.DataFrame(columns, index=events.index)


def _is_window_feature(column: str, features: Any) -> bool:
    statistics = [*features.aggregates, *features.ratios]
    return any(
        column == f"{entity}_{stat}_{window}" for entity in features.entities for stat in statistics for window in features.windows
    )


def window_features(
    targets: pd.DataFrame, events: pd.DataFrame, values: pd.DataFrame, keys: list[str], features: Any, width: int
) -> dict[str, np.ndarray]:
    """Per target at time ``t``, every aggregate and ratio of its entity's events in
    ``[bucket_start(t) - window, t)``, for every window: ``{"<stat>_<window>": values}``.

    Events are sorted once by (entity, time), so a target's window is a contiguous range found
    by binary search: counts and sums are differences of running sums over it. Minima and
    maxima are split as in the platform: whole buckets before the target's bucket (a range of
    per-bucket values, at most one per bucket) and the target's bucket up to ``t`` (a running
    minimum or maximum within the bucket).
    """
    import pandas as pd

    codes = pd.concat([targets[keys], events[keys]], ignore_index=True).groupby(keys, sort=False).ngroup().to_numpy()
    target_codes, event_codes = codes[: len(targets)], codes[len(targets) :]
    base = int(min(targets["micros"].min(), events["micros"].min()))
    spans = {w: parse_window(w) for w in features.windows if w != LIFETIME}
    longest = max(spans.values(), default=0)
    offset = longest + width  # window starts before the first event stay non-negative
    time_bits = (int(max(targets["micros"].max(), events["micros"].max())) - base + offset).bit_length()
    if time_bits + int(codes.max()).bit_length() > 62:
        raise ValueError("too many entities over too long a span for 64-bit sort keys")

    def composite(code: np.ndarray, micros: np.ndarray) -> np.ndarray:
        # (entity, time) as one sortable int64: entity in the high bits.
        return (code.astype(np.int64) << time_bits) | (micros.astype(np.int64) - base + offset)

    event_keys = composite(event_codes, events["micros"].to_numpy())
    order = np.argsort(event_keys, kind="stable")
    sorted_keys = event_keys[order]
    sorted_micros = events["micros"].to_numpy()[order]
    t = targets["micros"].to_numpy()
    bucket_start = t - t % width
    end = np.searchsorted(sorted_keys, composite(target_codes, t), side="left")  # strictly before t
    in_bucket = np.searchsorted(sorted_keys, composite(target_codes, bucket_start), side="left")
    # Per-(entity, bucket) groups of the sorted events, for minima and maxima.
    group_key = composite(event_codes[order], sorted_micros - sorted_micros % width)
    group_starts = np.flatnonzero(np.r_[True, group_key[1:] != group_key[:-1]])
    bucket_keys = group_key[group_starts]
    bucket_of_target = composite(target_codes, bucket_start)
    out: dict[str, np.ndarray] = {}
    for window in features.windows:
        # The lifetime window starts at the earliest instant the sort keys hold.
        low = np.full_like(bucket_start, base - offset) if window == LIFETIME else bucket_start - spans[window]
        start = np.searchsorted(sorted_keys, composite(target_codes, low), side="left")
        first_bucket = np.searchsorted(bucket_keys, composite(target_codes, low), side="left")
        last_bucket = np.searchsorted(bucket_keys, bucket_of_target, side="left")  # buckets before the target's
        for name, a in features.aggregates.items():
            column = values[name].to_numpy()[order]
            if a.aggregation in ("count", "sum"):
                running = np.concatenate([[0.0], np.cumsum(column)])
                out[f"{name}_{window}"] = running[end] - running[start]
                continue
            ufunc = np.minimum if a.aggregation == "min" else np.maximum
            per_bucket = ufunc.reduceat(column, group_starts)
            whole = _range_reduce(ufunc, per_bucket, first_bucket, last_bucket)
            running_in_bucket = pd.Series(column).groupby(np.repeat(np.arange(len(group_starts)), np.diff(np.r_[group_starts, len(column)])))
            running_in_bucket = (running_in_bucket.cummin() if ufunc is np.minimum else running_in_bucket.cummax()).to_numpy()
            identity = np.inf if ufunc is np.minimum else -np.inf
            partial = np.where(end > in_bucket, running_in_bucket[np.maximum(end - 1, 0)], identity)
            result = ufunc(whole, partial)
            out[f"{name}_{window}"] = np.where(np.isfinite(result), result, float(a.empty))
        for name, r in features.ratios.items():
            numerator, denominator = out[f"{r.numerator}_{window}"], out[f"{r.denominator}_{window}"]
            out[f"{name}_{window}"] = (numerator + r.prior_alpha) / (denominator + r.prior_alpha + r.prior_beta)
    return out


def _range_reduce(ufunc: np.ufunc, values: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """``ufunc.reduce(values[start[i]:end[i]])`` for every i; the identity (±inf) for empty ranges.

    Ranges are visited in order of their start, so ``reduceat`` also walks the gaps between
    them only once: the cost is the total length of the ranges plus ``len(values)``.

    >>> _range_reduce(np.minimum, np.array([3.0, 1.0, 2.0]), np.array([2, 0, 1]), np.array([2, 1, 3])).tolist()
    [inf, 3.0, 1.0]
    """
    identity = np.inf if ufunc is np.minimum else -np.inf
    by_start = np.argsort(start, kind="stable")
    padded = np.append(values, identity)  # reduceat needs every index below the length
    bounds = np.empty(2 * len(start), dtype=np.int64)
    bounds[0::2], bounds[1::2] = start[by_start], end[by_start]
    reduced = np.empty(len(start))
    reduced[by_start] = ufunc.reduceat(padded, bounds)[0::2]
    return np.where(end > start, reduced, identity)


def parse_window(text: str) -> int:
    """A declared duration (``30m``, ``24h``, ``7d``) in microseconds.

    >>> parse_window("1h"), parse_window("7d") // 86_400_000_000
    (3600000000, 7)
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    return int(text[:-1]) * units[text[-1]] * 1_000_000


# --------------------------------------------------------------------------- orchestration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser(
        NAME,
        "Time the batch retrain (views + training set + train + ONNX + register) on generated "
        "bronze tables of 1M, 3M and 10M events, beside a single-process pandas/scikit-learn "
        "peer; print a table and write a JSON result.",
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: [parse_count(t) for t in text.split(",")],
        help="comma-separated event counts, e.g. 1M,3M,10M (default: 1M,3M,10M; 100k with --quick)",
    )
    parser.add_argument("--driver-memory", default=DRIVER_MEMORY, help=f"Spark driver memory (default: {DRIVER_MEMORY})")
    parser.add_argument("--no-peer", action="store_true", help="measure the platform only")
    parser.add_argument(
        "--peer-timeout", type=float, default=600, metavar="S",
        help="stop the peer after this many seconds per size; larger sizes it is projected to "
        "exceed are skipped (default: 600)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1800, metavar="S", help="limit per platform step (default: 1800)")
    parser.add_argument(
        "--tracking-uri", help="use this running MLflow server instead of starting one (e.g. http://127.0.0.1:5000)"
    )
    parser.add_argument(
        "--work-dir", type=Path,
        help="keep each size's lake here, and reuse bronze generated there by an earlier run "
        "(default: a temp dir, removed); MLflow always starts empty",
    )  # fmt: skip
    parser.add_argument(
        "--resume", type=Path, metavar="FILE",
        help="keep the finished measurements of this earlier result (same sizes and settings) and "
        "measure only the rest; use with the same --work-dir to reuse its bronze",
    )  # fmt: skip
    parser.add_argument("--config", help="platform config file (default: $LAMBDA_ML_CONFIG or conf/platform.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], type=_override, metavar="KEY=VALUE", dest="overrides",
        help="override a config key for this run (YAML value), e.g. --set 'ctr.search.lr.reg_param=[]'; repeatable",
    )  # fmt: skip
    # Internal: how this file runs one phase in a child process.
    parser.add_argument("--phase", choices=("generate", "platform", "peer"), help=argparse.SUPPRESS)
    parser.add_argument("--impressions", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--now", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _override(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. ctr.max_iter=20, not {text!r}")
    return key.strip(), yaml.safe_load(value)


def child(args: argparse.Namespace, phase: str, config_file: Path, result: Path, timeout_s: float, **extra: object) -> tuple[Measured, dict[str, Any] | None]:
    """Run one phase in a child process; return its measurement and its JSON outcome."""
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--config", str(config_file), "--result", str(result)]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    result.unlink(missing_ok=True)
    measured = run_measured(command, timeout_s)
    if measured.ok and result.exists():
        return measured, json.loads(result.read_text())
    return measured, None


def failure(measured: Measured, timeout_s: float) -> str:
    if measured.timed_out:
        return f"stopped after {timeout_s:.0f} s (time limit)"
    return f"failed with exit code {measured.returncode} (see the log above)"


def measure_size(
    args: argparse.Namespace,
    cfg: PlatformConfig,
    events: int,
    now: datetime,
    workdir: Path,
    peer_skip: str | None,
    done: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Generate bronze for one size, then time the platform's retrain and the peer's on it;
    ``done`` holds the entries (``platform``, ``peer``) an earlier run finished, kept as they are."""
    label = human_count(events)
    impressions = impressions_for(cfg, events)
    users, items = population(cfg, impressions)
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = write_config(cfg, workdir / "platform.yaml")
    entry: dict[str, Any] = {"target_events": events, "impressions_generated": impressions, "users": users, "items": items}

    generated = workdir / "generated.json"
    previous = json.loads(generated.read_text()) if generated.exists() else None
    if previous and previous.get("impressions_generated") == impressions and previous.get("seed") == cfg.generator.seed:
        log.info("%s: reusing the bronze tables generated in %s", label, workdir)
        gen = previous
    else:
        shutil.rmtree(workdir / "lake", ignore_errors=True)
        log.info("%s: generating %d impressions (%d users, %d items) into %s", label, impressions, users, items, workdir / "lake")
        measured, outcome = child(args, "generate", config_file, workdir / "generate.out.json", args.timeout, impressions=impressions, now=now.timestamp())
        if outcome is None:
            entry["error"] = f"generation {failure(measured, args.timeout)}"
            return {"platform": entry, "peer": {"skipped": "no bronze tables"}}
        gen = {
            "impressions_generated": impressions,
            "seed": cfg.generator.seed,
            "bronze_impressions": outcome["impressions"],
            "bronze_clicks": outcome["clicks"],
            "generate_s": round(outcome["seconds"], 1),
            "generate_peak_memory_gib": gib(measured.peak_memory_bytes),
        }
        generated.write_text(json.dumps(gen, indent=1))
    bronze_events = gen["bronze_impressions"] + gen["bronze_clicks"]
    entry.update({k: gen.get(k) for k in ("bronze_impressions", "bronze_clicks", "generate_s", "generate_peak_memory_gib")})
    entry["events"] = bronze_events

    if "platform" in done:
        log.info("%s: keeping the platform's retrain measured by the resumed run", label)
        entry = done["platform"]
    else:
        log.info("%s: platform retrain on %d bronze events", label, bronze_events)
        measured, outcome = child(args, "platform", config_file, workdir / "platform.out.json", args.timeout)
        entry.update(_timed(measured, outcome, bronze_events, args.timeout, workdir / "platform.out.json.timeline"))
        if outcome is not None:
            log.info("%s: platform retrain took %.1f s, peak %.2f GiB", label, entry["wall_s"], entry["peak_memory_gib"])

    peer: dict[str, Any] = {"events": bronze_events}
    if "peer" in done:
        log.info("%s: keeping the peer's retrain measured by the resumed run", label)
        peer = done["peer"]
    elif peer_skip is not None:
        peer["skipped"] = peer_skip
    else:
        log.info("%s: peer retrain (pandas + scikit-learn)", label)
        measured, outcome = child(args, "peer", config_file, workdir / "peer.out.json", args.peer_timeout)
        peer.update(_timed(measured, outcome, bronze_events, args.peer_timeout, workdir / "peer.out.json.timeline"))
        if outcome is not None:
            log.info("%s: peer retrain took %.1f s, peak %.2f GiB", label, peer["wall_s"], peer["peak_memory_gib"])
    return {"platform": entry, "peer": peer}


def _timed(measured: Measured, outcome: dict[str, Any] | None, events: int, timeout_s: float, timeline_file: Path) -> dict[str, Any]:
    if outcome is None:
        return {
            "error": failure(measured, timeout_s),
            "peak_memory_gib": gib(measured.peak_memory_bytes),
            "process_s": round(measured.wall_s, 1),
            "timeline_until_stopped": read_timeline(timeline_file),
        }
    start, end = outcome["start"], outcome["end"]
    wall, sampler = end - start, measured.sampler
    load = sampler.mean_load(start, end)
    return {
        "wall_s": round(wall, 1),
        "events_per_s": round(events / wall),
        "cpu_s": round(sampler.cpu_s(start, end), 1),
        "peak_memory_gib": gib(measured.peak_memory_bytes),
        "peak_memory_during_retrain_gib": gib(sampler.peak(start, end)),
        "peak_rss_largest_process_gib": gib(sampler.peak_rss()),
        "rss_at_peak_gib": {name: gib(n) for name, n in sampler.rss_at_peak().items()},
        "process_s": round(measured.wall_s, 1),
        "machine_load_1m": None if load is None else round(load, 1),
        "rows": outcome.get("rows"),
        "auc": None if outcome.get("auc") is None else round(outcome["auc"], 4),
        "log_loss": None if outcome.get("log_loss") is None else round(outcome["log_loss"], 4),
        "timeline": outcome.get("timeline", []),
    }


def peer_skip_reason(done: dict[str, dict[str, Any]], events: int, timeout_s: float) -> str | None:
    """Why the peer is not run on ``events`` (None to run it): it failed on a smaller size, or a
    linear projection from the largest size it managed exceeds its time limit or the RAM."""
    from bench.common import _meminfo_kib

    finished = [(v["events"], v) for v in done.values() if "wall_s" in v]
    failed = [label for label, v in done.items() if "error" in v or "skipped" in v]
    if failed:
        return f"not run: the peer did not finish the {failed[0]} size"
    if not finished:
        return None
    base_events, base = max(finished, key=lambda item: item[0])
    scale = events / base_events
    projected_s = base["wall_s"] * scale
    if projected_s > timeout_s:
        return f"not run: projected {projected_s:.0f} s from its {human_count(base_events)} run, over the {timeout_s:.0f} s budget"
    projected_gib = base["peak_memory_gib"] * scale
    ram_gib = _meminfo_kib("MemTotal") / 1024**2
    if projected_gib > 0.75 * ram_gib:
        return f"not run: projected {projected_gib:.1f} GiB peak memory, over 75% of the {ram_gib:.0f} GiB RAM"
    return None


def run_benchmark(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Start MLflow, measure every size (result JSON rewritten after each), stop MLflow."""
    from lambda_ml import jvm
    from lambda_ml_cli.stack import MlflowServer

    sizes = args.sizes or list(QUICK_SIZES if args.quick else SIZES)
    keep = args.work_dir is not None
    root = args.work_dir.resolve() if keep else Path(tempfile.mkdtemp(prefix="bench-batch-retrain-"))
    root.mkdir(parents=True, exist_ok=True)
    # MLflow and Spark's scratch data are always fresh: a registry holding this lineage already
    # would make train.run return the earlier versions without training.
    scratch = Path(tempfile.mkdtemp(prefix="bench-batch-retrain-data-"))
    port = free_port()
    # Whole seconds: the generator's id tag (stable across runs reusing a work dir's bronze).
    now = datetime.now(UTC).replace(microsecond=0)
    base = load_config(
        args.config,
        overrides={
            "data_dir": str(scratch),
            "mlflow.port": port,
            "mlflow.tracking_uri": args.tracking_uri or f"http://127.0.0.1:{port}",
            "mlflow.experiment": "bench-batch-retrain",
            "spark.driver_memory": args.driver_memory,
            **dict(args.overrides),
        },
    )
    jvm.resolve(base, jvm.SPARK_JARS)
    resumed: dict[str, dict[str, Any]] = {"platform": {}, "peer": {}}
    if args.resume is not None:
        previous = json.loads(args.resume.read_text())
        resumed = {"platform": previous["results"]["sizes"], "peer": previous["peer"]["sizes"]}
    server = None if args.tracking_uri else MlflowServer(base)
    platform: dict[str, Any] = {}
    peer: dict[str, Any] = {}
    reused: list[str] = []  # entries kept from a resumed run
    try:
        if server is not None:
            server.start()
        for events in sizes:
            label = human_count(events)
            workdir = root / label
            # One registered model per size and run: each retrain is a first one (no champion to
            # beat), and a shared server (--tracking-uri) never mixes runs.
            model_name = f"bench-ctr-{label}-{datetime.now(UTC):%Y%m%d%H%M%S}"
            cfg = base.model_copy(
                update={
                    "lake": base.lake.model_copy(update={"root": str(workdir / "lake"), "checkpoints": str(workdir / "checkpoints")}),
                    "mlflow": base.mlflow.model_copy(update={"registered_model": model_name}),
                }
            )
            kept = {side: entries[label] for side, entries in resumed.items() if "wall_s" in entries.get(label, {})}
            unfinished = [done for done, entry in platform.items() if "wall_s" not in entry]
            if unfinished:
                # A larger size would only take longer: record why it was not run.
                platform[label] = {"target_events": events, "skipped": f"not run: the {unfinished[0]} retrain did not finish"}
                peer[label] = {"skipped": "not run: no bronze tables"}
            else:
                skip = "not run: --no-peer" if args.no_peer else peer_skip_reason(peer, events, args.peer_timeout)
                measured = measure_size(args, cfg, events, now, workdir, skip, kept)
                platform[label], peer[label] = measured["platform"], measured["peer"]
                reused += [f"{label} {side}" for side in kept]
            # After every size, so that an interrupted run still leaves what it measured.
            write_result(assemble(args, base, sizes, platform, peer, reused, started_at=now), out)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return assemble(args, base, sizes, platform, peer, reused, started_at=now)


def assemble(
    args: argparse.Namespace,
    cfg: PlatformConfig,
    sizes: list[int],
    platform: dict[str, Any],
    peer: dict[str, Any],
    kept: Sequence[str] = (),
    started_at: datetime | None = None,
) -> dict[str, Any]:
    """The result object of DESIGN.md section 9, with the targets checked."""
    measured = {k: v for k, v in platform.items() if "wall_s" in v}
    ratios: dict[str, Any] = {"platform_over_peer": {}, "scaling": {}}
    for label, p in measured.items():
        q = peer.get(label, {})
        if "wall_s" in q:
            ratios["platform_over_peer"][label] = {
                "wall_time": round(p["wall_s"] / q["wall_s"], 2),
                "peak_memory": round(p["peak_memory_gib"] / q["peak_memory_gib"], 2),
            }
    labels = list(measured)
    for smaller, larger in itertools.combinations(labels, 2):
        a, b = measured[smaller], measured[larger]
        events, seconds = b["events"] / a["events"], b["wall_s"] / a["wall_s"]
        ratios["scaling"][f"{larger}_over_{smaller}"] = {
            "events": round(events, 2),
            "wall_time": round(seconds, 2),
            "time_per_event": round(seconds / events, 2),
            # CPU time is steadier than wall time when the machine is shared.
            "cpu_time": round(b["cpu_s"] / a["cpu_s"], 2) if a.get("cpu_s") else None,
            "cpu_per_event": round(b["cpu_s"] / a["cpu_s"] / events, 2) if a.get("cpu_s") else None,
        }
    targets: dict[str, Any] = {"description": (
        f"{human_count(TARGET_EVENTS)} events in under {TARGET_WALL_S:.0f} s, time growing no faster than "
        f"linearly, peak memory under {TARGET_PEAK_GIB:.0f} GiB"
    )}  # fmt: skip
    big = [v for v in measured.values() if v["events"] >= 0.95 * TARGET_EVENTS]
    slow_smaller = [label for label, v in measured.items() if v["wall_s"] >= TARGET_WALL_S]
    if big:
        targets["10M_under_300_s"] = all(v["wall_s"] < TARGET_WALL_S for v in big)
    elif slow_smaller:
        # A smaller snapshot already took longer than the whole budget for 10M.
        targets["10M_under_300_s"] = False
        targets["10M_under_300_s_evidence"] = f"the {slow_smaller[0]} retrain alone took {measured[slow_smaller[0]]['wall_s']:.0f} s"
    else:
        targets["10M_under_300_s"] = None
    targets["peak_under_8_GiB"] = None if not measured else all(v["peak_memory_gib"] < TARGET_PEAK_GIB for v in measured.values())
    targets["at_most_linear"] = (
        None if len(labels) < 2 else all(r["time_per_event"] <= 1.0 for r in ratios["scaling"].values())
    )
    users_items = {human_count(n): population(cfg, impressions_for(cfg, n)) for n in sizes}
    return {
        "name": NAME,
        "machine": machine_info(PACKAGES),
        "params": {
            "sizes_events": sizes,
            "quick": args.quick,
            "started_at": None if started_at is None else started_at.isoformat(),
            "config_overrides": dict(args.overrides),
            "resumed_from": None if args.resume is None else str(args.resume),
            "kept_from_resumed_run": list(kept),
            "measured": "wall time of batch_layer.train.run(spark, cfg) in a fresh process with its "
            "Spark session already up: pin bronze, views, point-in-time training set, model choice (the "
            "configured grid search) and fit, holdout evaluation, ONNX export + parity, MLflow logging "
            "and registration of both models",
            "events": "bronze impression rows + bronze click rows (duplicates included)",
            "peak_memory": "highest summed RSS of the child process tree (Python driver + Spark JVM + "
            "any children) over the process's whole life, sampled every 0.5 s from /proc; a child still "
            "sharing its parent's address space (a helper the JVM vforks, before its exec) is not "
            "counted twice; rss_at_peak_gib lists each process's RSS at that moment",
            "cpu": "CPU seconds (user + system) the child process tree used during the timed retrain",
            "machine_load_1m": "mean 1-minute load average during the retrain; the machine is shared, "
            "and figures taken at a load well above 2 (its cores) are slowed by other work",
            "spark_master": cfg.spark.master,
            "spark_driver_memory": cfg.spark.driver_memory,
            "spark_shuffle_partitions": cfg.spark.shuffle_partitions,
            "ctr": cfg.ctr.model_dump(),
            "generator": {
                "how": "Spark writes bronze Delta directly (spark.range + seeded rand columns) with the "
                "click model of lambda_ml_apps.ctr.generator; one parquet file per table per 1M impressions; "
                "no malformed records (they go to quarantine, which the batch layer does not read)",
                "seed": cfg.generator.seed,
                "span_hours": cfg.generator.span_hours,
                "late_fraction": cfg.generator.late_fraction,
                "duplicate_fraction": cfg.generator.duplicate_fraction,
                "users_items": {label: {"users": u, "items": i} for label, (u, i) in users_items.items()},
            },
            "peer_timeout_s": args.peer_timeout,
        },
        "results": {
            "complete": len(platform) == len(sizes),
            "pending": [human_count(n) for n in sizes if human_count(n) not in platform],
            "sizes": platform,
            "targets": targets,
        },
        "peer": {
            "name": "pandas + NumPy + scikit-learn, one Python process",
            "what": "the same retrain without Spark, from the same declarations (features: and ctr: of "
            "the config) on the same bronze tables: deltalake reads bronze and writes the per-entity "
            "bucket views; pandas/NumPy dedup, attribute clicks, label once the window closed and "
            "compute every window feature over [bucket_start(t) - window, t) (one sort per entity, "
            "binary search for each window's range, running sums for counts/sums, range reductions "
            "for min/max, Beta-prior ratios); the same time-based holdout and grid search on a "
            "validation split of the training rows; scikit-learn StandardScaler + OneHotEncoder -> "
            "LogisticRegression (C = 1/(reg_param * n), l1_ratio = elastic_net_param, saga when it "
            "is > 0, max_iter as configured); skl2onnx export + onnxruntime parity check; MLflow "
            "logging and registration of both models on the same server",
            "not_done": "the calibration summary and plot, and the champion quality gate (each size "
            "registers into a fresh model, so the platform's gate has no champion to compare either)",
            "sizes": peer,
        },
        "ratios": ratios,
    }


# --------------------------------------------------------------------------- report


def report(result: dict[str, Any]) -> str:
    """The page's table (bench/report.py), then what only a run's log needs: why a size was not
    measured and where the largest retrain's time went."""
    platform, peer = result["results"]["sizes"], result["peer"]["sizes"]
    lines = [batch_retrain_table(result)]
    for side, sizes in (("platform", platform), ("peer", peer)):
        for label, entry in sizes.items():
            if "skipped" in entry or "error" in entry:
                lines.append(f"{side} {label}: {entry.get('skipped') or entry.get('error')}")
    profiled = [(label, p) for label, p in platform.items() if p.get("timeline") or p.get("timeline_until_stopped")]
    if profiled:
        label, largest = profiled[-1]
        if largest.get("timeline"):
            lines += ["", f"where the {label} retrain's time goes (step ending with this log line):", ""]
            lines.append(markdown_table(["s", "share", "step"], _steps(largest["timeline"], largest["wall_s"])))
        else:
            lines += ["", f"the {label} retrain until it was stopped (step ending with this log line):", ""]
            lines.append(markdown_table(["s", "share", "step"], _steps(largest["timeline_until_stopped"], largest["process_s"], "(stopped)")))
    if result["results"]["pending"]:
        lines.append(f"not measured (run interrupted): {', '.join(result['results']['pending'])}")
    return "\n".join(lines)


def _steps(timeline: list[dict[str, Any]], wall_s: float, last: str = "(end of run)") -> list[list[object]]:
    rows, previous = [], 0.0
    for mark in [*timeline, {"t": wall_s, "step": last}]:
        seconds = mark["t"] - previous
        rows.append([round(seconds, 1), f"{100 * seconds / wall_s:.0f}%", mark["step"][:90]])
        previous = mark["t"]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase:
        return run_phase(args)
    setup_logging()
    # SIGTERM unwinds like Ctrl-C: the running child's process group and MLflow are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    out = args.out or default_out(NAME, args.quick)
    result = run_benchmark(args, out)
    write_result(result, out)
    print(report(result))
    print(f"\nresult written to {out}")
    failed = [label for label, v in result["results"]["sizes"].items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

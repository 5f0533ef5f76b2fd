"""Real-data benchmark: MovieLens 100k replayed as impressions and clicks, the batch layer's
champion against simple baselines computed independently on the same time split.

    python bench/real_data.py [--quick] [--out FILE]

The data set is ``ml-100k.inter`` (100,000 ratings of 1,682 films by 943 users, September 1997
to April 1998, one-second timestamps) as the PyPI package ``recbole`` ships it. Only its data
file is read (it is located without importing the package, whose own dependencies are not
needed): ``pip install --no-deps recbole==1.2.1``, or ``pip install -e ".[real-data]"`` with
them. Nothing is downloaded at run time.

Each rating becomes an impression at its timestamp (``desktop``, position 1: the data has
neither) carrying what the data set says of the film (``ml-100k.item``: its first listed genre,
its release year and decade) and of the user (``ml-100k.user``: age, age group, gender,
occupation), as a catalogue and a user profile would, the film's taste cluster (from the
oldest ratings only, :func:`taste_clusters`), and the rating itself as a measure
(:data:`RATING_FIELD`); a rating of 4 or 5 becomes a click :data:`CLICK_DELAY` later, well inside
the attribution window. The rating is read only by aggregates, whose windows end strictly before
the impression being scored (a point-in-time feature, as a rating site knows each user's and each
film's mean rating so far); it is no model input, so no impression sees its own. The records
go through Kafka with the platform's own producer (:func:`lambda_ml.producer.produce`), into
bronze with the speed layer's ingest (run until the topics are drained), and the batch layer
(:func:`batch_layer.train.run`) trains, evaluates on its time-based holdout and registers the
champion. Timestamps are not shifted; the run's config overrides (:data:`OVERRIDES`) declare
those impression fields and the features read from them (taste entities such as user x genre
and user x taste cluster, 5-minute buckets for the rating session), and feed the model no
context the data lacks.

The peer is a few lines of pandas on the ratings themselves, on exactly the holdout rows of the
batch run (impressions after its ``holdout_after`` cutoff whose attribution window closed by its
``labels_as_of``; their count must equal the run's):

- **item popularity**: the item's impressions before the impression;
- **user + item click rates**: the user's and the item's click rate over all history before
  the impression (the training rows' click rate where there is none), added up;
- **smoothed user + item click rates**: the same rates shrunk towards the training rows' click
  rate by :data:`SMOOTHING` impressions;
- **smoothed user + item mean ratings**: the user's and the film's mean rating over all history
  before the impression, shrunk towards the training rows' mean rating by :data:`SMOOTHING`
  ratings, added up (what the champion's rating aggregates know, given to the peer too).

Target: the champion's holdout AUC beats the best baseline by :data:`TARGET_MARGIN`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import MemorySampler, bench_parser, default_out, free_port, local_paths, machine_info, write_result  # noqa: E402
from bench.report import real_data_table  # noqa: E402
from lambda_ml.config import PlatformConfig, load_config  # noqa: E402
from lambda_ml.producer import Record, iso  # noqa: E402
from lambda_ml.logs import setup_logging  # noqa: E402

log = logging.getLogger("bench.real_data")

NAME = "real_data"
PACKAGES = ("pyspark", "delta-spark", "mlflow", "kafka-python", "recbole")
DATA_PACKAGE, DATA_VERSION, DATA_FILE = "recbole", "1.2.1", "dataset_example/ml-100k/ml-100k.inter"
QUICK_USERS = 200  # --quick keeps the users with the smallest ids (about a fifth of the ratings)
CLICKED_RATING = 4  # a rating of at least this is a click
CLICK_DELAY = timedelta(seconds=1)
SMOOTHING = 10.0  # prior impressions of the smoothed rates baseline
TARGET_MARGIN = 0.02
# What the impressions carry beyond the default event type: the film's and the user's attributes.
ATTRIBUTE_FIELDS: dict[str, str] = {
    "genre": "string",  # the film's first listed genre (ml-100k lists them alphabetically)
    "release_year": "int",  # 0 when unknown
    "release_decade": "string",  # "1990s", "unknown"
    "age": "int",
    "age_group": "string",  # "under 18", "18-24", ..., "55+"
    "gender": "string",
    "occupation": "string",
    "taste": "string",  # the film's taste cluster (see taste_clusters), "unrated" when it has none
}
# The rating on its impression, as a share of the scale: 0 for one star, 1 for five. Scaled so
# that the platform's ratio (a Beta posterior mean) is the mean rating shrunk towards a prior:
# RATING_PRIOR_WEIGHT ratings of RATING_PRIOR_STARS (the data's mean is 3.53).
RATING_FIELD = "rating_scaled"
RATING_PRIOR_STARS, RATING_PRIOR_WEIGHT = 3.5, 5.0


def scaled_rating(rating: float) -> float:
    """A rating of 1 to 5 stars as a share of the scale.

    >>> [scaled_rating(r) for r in (1, 3, 5)]
    [0.0, 0.5, 1.0]
    """
    return (float(rating) - 1.0) / 4.0


# Films' taste clusters: a film is its centred ratings by each user (a user's rating minus their
# mean), reduced to TASTE_DIMENSIONS by a singular value decomposition and grouped by k-means into
# TASTE_CLUSTERS, from the oldest CATALOGUE_SHARE of the ratings only: what a catalogue job run on
# the data of that day knows, long before the holdout (compare() checks it).
TASTE_CLUSTERS, TASTE_DIMENSIONS, CATALOGUE_SHARE = 20, 10, 0.6
UNRATED = "unrated"

AGE_GROUPS = ((18, "under 18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (55, "45-54"), (200, "55+"))
# What the real data needs of the platform's config (see the module docstring). Each choice was
# compared offline first (scikit-learn trees on the same point-in-time features and split).
OVERRIDES: dict[str, Any] = {
    "events.types.impressions.fields": {
        "event_id": "string", "event_time": "timestamp", "user_id": "string", "item_id": "string",
        "device": "string", "position": "int", **ATTRIBUTE_FIELDS, RATING_FIELD: "double",
    },  # fmt: skip
    # A user rates a page of films at once, pages minutes apart: 5-minute buckets let a window
    # see the pages just before (the user's mood of the session), as hour buckets cannot.
    "features.bucket": "5m",
    "features.windows": ["5m", "1h", "24h", "7d", "all"],
    # Taste: a user's click rate and mean rating on a genre and on a decade of films; a film's
    # among users of the same gender, occupation and age group (demographic collaborative
    # filtering).
    # The data has one device: no user x device.
    "features.entities": {
        "user": {"keys": ["user_id"]},
        "item": {"keys": ["item_id"]},
        "user_genre": {"keys": ["user_id", "genre"]},
        "user_decade": {"keys": ["user_id", "release_decade"]},
        "item_gender": {"keys": ["item_id", "gender"]},
        "item_occupation": {"keys": ["item_id", "occupation"]},
        "item_age": {"keys": ["item_id", "age_group"]},
        # Collaborative: a user's click rate and mean rating on films of one taste cluster.
        "user_taste": {"keys": ["user_id", "taste"]},
    },
    # Every position is 1: the default min-position aggregate would only say "has events". The
    # sum of the scaled ratings gives each entity's mean rating: a user's scale (one who gives
    # threes where another gives ones) and a film's standing, finer than the share of 4s and 5s.
    "features.aggregates": {
        "impressions": {"events": "impressions", "aggregation": "count"},
        "clicks": {"events": "clicks", "aggregation": "count"},
        "rating_sum": {"events": "impressions", "aggregation": "sum", "measure": RATING_FIELD},
    },
    # Over half of the ratings are clicks: a prior of 10 impressions at 55 %, not the default's
    # 5 %. The mean rating's: RATING_PRIOR_WEIGHT ratings of RATING_PRIOR_STARS.
    "features.ratios": {
        "ctr": {"numerator": "clicks", "denominator": "impressions", "prior_alpha": 5.5, "prior_beta": 4.5},
        "mean_rating": {
            "numerator": "rating_sum", "denominator": "impressions",
            "prior_alpha": RATING_PRIOR_WEIGHT * scaled_rating(RATING_PRIOR_STARS),
            "prior_beta": RATING_PRIOR_WEIGHT * (1.0 - scaled_rating(RATING_PRIOR_STARS)),
        },  # fmt: skip
    },
    # The data has no position (a constant model input is refused); the film's age and the
    # user's age go in as they are.
    "features.context.numeric": ["release_year", "age"],
    # Lifetime and recent windows interact (a film's long-run rate, a user's session): trees,
    # shallow and many. Depth 3 and 100 trees: the platform's search, validating on the latest
    # 20 % of the training rows, preferred them (validation AUC 0.7793 against 0.7784 for depth 4
    # and 0.7731 for depth 5; before the taste clusters, 0.7770 against 0.7767 and 0.7763 for
    # 150 and 200 trees). One candidate, one fit.
    "ctr.model": "gbt",
    "ctr.gbt.max_depth": 3,
    "ctr.gbt.max_iter": 100,
    "ctr.search.gbt.max_depth": [],
    "ctr.search.gbt.max_iter": [],
}


# --------------------------------------------------------------------------- the data set


def dataset_path() -> Path:
    """``ml-100k.inter`` inside the installed ``recbole`` package, found without importing it."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"the MovieLens 100k ratings come with the PyPI package {DATA_PACKAGE}: "
            f"pip install --no-deps {DATA_PACKAGE}=={DATA_VERSION}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DATA_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing: reinstall {DATA_PACKAGE}=={DATA_VERSION}")
    return path


def load_ratings(path: Path, users: int | None = None) -> pd.DataFrame:
    """Ratings as ``user, item, rating, ts`` (epoch seconds) and the :data:`ATTRIBUTE_FIELDS` of
    the film and of the user (from ``ml-100k.item`` and ``ml-100k.user`` beside ``path``), oldest
    first; with ``users``, only the users with ids up to it."""
    ratings = pd.read_csv(path, sep="\t", header=0, names=["user", "item", "rating", "ts"])
    ratings = ratings.astype({"user": "int64", "item": "int64", "rating": "float64", "ts": "int64"})
    if users is not None:
        ratings = ratings[ratings["user"] <= users]
    films, people = film_attributes(path.with_suffix(".item")), user_attributes(path.with_suffix(".user"))
    ratings = ratings.merge(films, on="item", how="left", validate="many_to_one").merge(
        people, on="user", how="left", validate="many_to_one"
    )
    ratings = ratings.sort_values(["ts", "user", "item"], kind="stable").reset_index(drop=True)
    ratings["taste"] = ratings["item"].map(taste_clusters(catalogue_ratings(ratings))).fillna(UNRATED)
    missing = ratings[list(ATTRIBUTE_FIELDS)].isna().any(axis=1)
    if missing.any():
        raise ValueError(f"{int(missing.sum())} ratings name a film or a user the data set does not describe")
    return ratings


def catalogue_ratings(ratings: pd.DataFrame) -> pd.DataFrame:
    """The oldest :data:`CATALOGUE_SHARE` of ``ratings`` (sorted oldest first): the taste
    clusters' data."""
    return ratings.iloc[: int(len(ratings) * CATALOGUE_SHARE)]


def catalogue_end(ratings: pd.DataFrame, holdout_after: datetime) -> datetime:
    """The time of the newest rating the taste clusters read; an error if it is not before
    ``holdout_after`` (the clusters would know some of the holdout's ratings)."""
    until = datetime.fromtimestamp(int(catalogue_ratings(ratings)["ts"].max()), UTC)
    if until >= holdout_after:
        raise RuntimeError(
            f"the taste clusters were fitted on ratings up to {iso(until)}, "
            f"not before the holdout's start {iso(holdout_after)}: they would know the holdout"
        )
    return until


def taste_clusters(ratings: pd.DataFrame, clusters: int = TASTE_CLUSTERS, dimensions: int = TASTE_DIMENSIONS) -> pd.Series:
    """Each rated film's taste cluster (``"taste 0"``, ``"taste 1"``...), indexed by film: films
    that the same users rate above their own mean, and others below it, share a cluster.

    A film is the vector of its ratings minus each rater's mean rating (0 where a user did not
    rate it), reduced to its ``dimensions`` strongest directions (a singular value
    decomposition), scaled to unit length and grouped by k-means (scikit-learn, a fixed seed).
    """
    from sklearn.cluster import KMeans

    films, film = np.unique(ratings["item"].to_numpy(), return_inverse=True)
    _, user = np.unique(ratings["user"].to_numpy(), return_inverse=True)
    stars = ratings["rating"].to_numpy(dtype=np.float64)
    centred = np.zeros((len(films), int(user.max()) + 1))
    centred[film, user] = stars - ratings.groupby("user")["rating"].transform("mean").to_numpy()
    left, strength, _ = np.linalg.svd(centred, full_matrices=False)
    vectors = left[:, :dimensions] * strength[:dimensions]
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    labels = KMeans(n_clusters=min(clusters, len(films)), n_init=4, random_state=7).fit_predict(vectors)
    return pd.Series([f"taste {label}" for label in labels], index=films, name="taste")


def film_attributes(path: Path) -> pd.DataFrame:
    """``item, genre, release_year, release_decade`` of ``ml-100k.item`` (latin-1 titles).

    >>> films = pd.DataFrame({"item": [1, 2], "year": [1995.0, None], "class": ["Animation Comedy", None]})
    >>> film_attributes_of(films).to_dict("records")  # doctest: +NORMALIZE_WHITESPACE
    [{'item': 1, 'genre': 'Animation', 'release_year': 1995, 'release_decade': '1990s'},
     {'item': 2, 'genre': 'unknown', 'release_year': 0, 'release_decade': 'unknown'}]
    """
    films = pd.read_csv(path, sep="\t", header=0, names=["item", "title", "year", "class"], encoding="latin-1")
    return film_attributes_of(films)


def film_attributes_of(films: pd.DataFrame) -> pd.DataFrame:
    year = pd.to_numeric(films["year"], errors="coerce")
    genres = films["class"].fillna("unknown").astype(str).str.split()
    return pd.DataFrame({
        "item": films["item"].astype("int64"),
        "genre": genres.str[0].fillna("unknown"),
        "release_year": year.fillna(0).astype("int64"),
        "release_decade": [f"{int(y) // 10 * 10}s" if y == y else "unknown" for y in year],
    })  # fmt: skip


def age_group(age: int) -> str:
    """The age group of an age, as in the later MovieLens data sets.

    >>> [age_group(a) for a in (7, 18, 34, 55)]
    ['under 18', '18-24', '25-34', '55+']
    """
    return next(name for below, name in AGE_GROUPS if age < below)


def user_attributes(path: Path) -> pd.DataFrame:
    """``user, age, age_group, gender, occupation`` of ``ml-100k.user``."""
    people = pd.read_csv(path, sep="\t", header=0, names=["user", "age", "gender", "occupation", "zip"], dtype={"zip": str})
    people = people.astype({"user": "int64", "age": "int64", "gender": str, "occupation": str})
    people["age_group"] = people["age"].map(age_group)
    return people[["user", "age", "age_group", "gender", "occupation"]]


def impression_id(user: int, item: int) -> str:
    return f"ml-{user}-{item}"  # a user rates a film once


def to_records(ratings: pd.DataFrame) -> list[Record]:
    """The Kafka records of the ratings, in time order: an impression per rating, a click
    ``CLICK_DELAY`` after each rating of ``CLICKED_RATING`` or more."""
    timed: list[tuple[int, int, Record]] = []
    attributes = list(ATTRIBUTE_FIELDS)
    for user, item, rating, ts, *values in ratings[["user", "item", "rating", "ts", *attributes]].itertuples(index=False):
        shown = datetime.fromtimestamp(int(ts), UTC)
        event_id = impression_id(user, item)
        impression = {
            "event_id": event_id, "event_time": iso(shown), "user_id": f"u{user}", "item_id": f"i{item}",
            "device": "desktop", "position": 1,
            **{name: int(v) if ATTRIBUTE_FIELDS[name] == "int" else str(v) for name, v in zip(attributes, values, strict=True)},
            RATING_FIELD: scaled_rating(rating),
        }  # fmt: skip
        timed.append((int(ts), len(timed), Record("impressions", f"u{user}".encode(), json.dumps(impression).encode())))
        if rating >= CLICKED_RATING:
            click = {"event_id": f"{event_id}-click", "impression_id": event_id, "event_time": iso(shown + CLICK_DELAY)}
            delay = int(CLICK_DELAY.total_seconds())
            timed.append((int(ts) + delay, len(timed), Record("clicks", event_id.encode(), json.dumps(click).encode())))
    timed.sort(key=lambda t: (t[0], t[1]))
    return [record for _, _, record in timed]


# --------------------------------------------------------------------------- the peer (pandas)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic, ties counted half.

    >>> auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])), auc(np.array([0, 1]), np.array([2.0, 2.0]))
    (0.75, 0.5)
    """
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("an AUC needs both classes")
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _before(
    times: pd.Series, keys: pd.Series, event_times: pd.Series, event_keys: pd.Series, weights: pd.Series | None = None
) -> np.ndarray:
    """Per row (key, time): the sum of ``weights`` (one per event; 1 each by default, a count)
    of the events of the same key strictly before the time."""
    found = np.zeros(len(times), dtype=np.float64)
    weight = np.ones(len(event_times)) if weights is None else weights.to_numpy(dtype=np.float64)
    events = pd.DataFrame({"key": event_keys.to_numpy(), "t": event_times.to_numpy(), "w": weight}).sort_values("t", kind="stable")
    by_key = {key: (group["t"].to_numpy(), np.concatenate([[0.0], np.cumsum(group["w"].to_numpy())])) for key, group in events.groupby("key")}
    rows = pd.DataFrame({"key": keys.to_numpy(), "t": times.to_numpy()})
    for key, group in rows.groupby("key"):
        if key in by_key:
            event_t, running = by_key[key]
            found[group.index.to_numpy()] = running[np.searchsorted(event_t, group["t"].to_numpy(), side="left")]
    return found


def holdout_baselines(ratings: pd.DataFrame, cutoff: datetime, as_of: datetime, attribution: timedelta) -> dict[str, Any]:
    """The baselines on the batch run's holdout rows: the impressions after ``cutoff`` whose
    attribution window closed by ``as_of``, each scored from the ratings strictly before it.

    Returns the holdout size, its clicks, the training rows' click rate and mean rating, and each
    baseline's AUC (with the per-row scores under ``scores``, for checks).
    """
    shown = pd.to_datetime(ratings["ts"], unit="s", utc=True).reset_index(drop=True)
    clicked = (ratings["rating"] >= CLICKED_RATING).to_numpy()
    clicks_at = shown[clicked] + CLICK_DELAY
    users, items = ratings["user"].reset_index(drop=True), ratings["item"].reset_index(drop=True)
    labelled = (shown + attribution) <= as_of
    held = labelled & (shown > cutoff)
    train = labelled & ~held
    base_rate = float(clicked[train.to_numpy()].mean())
    stars = ratings["rating"].reset_index(drop=True).astype(np.float64)
    base_rating = float(stars[train].mean())

    t, u, i = shown[held].reset_index(drop=True), users[held].reset_index(drop=True), items[held].reset_index(drop=True)
    seen = {"user": _before(t, u, shown, users), "item": _before(t, i, shown, items)}
    clicks = {"user": _before(t, u, clicks_at, users[clicked]), "item": _before(t, i, clicks_at, items[clicked])}
    raw = {e: np.where(seen[e] > 0, clicks[e] / np.maximum(seen[e], 1), base_rate) for e in seen}
    smoothed = {e: (clicks[e] + SMOOTHING * base_rate) / (seen[e] + SMOOTHING) for e in seen}
    star_sums = {"user": _before(t, u, shown, users, stars), "item": _before(t, i, shown, items, stars)}
    mean_ratings = {e: (star_sums[e] + SMOOTHING * base_rating) / (seen[e] + SMOOTHING) for e in seen}
    scores = {
        "item_popularity": seen["item"],
        "user_item_rates": raw["user"] + raw["item"],
        "user_item_smoothed_rates": smoothed["user"] + smoothed["item"],
        "user_item_mean_ratings": mean_ratings["user"] + mean_ratings["item"],
    }
    labels = clicked[held.to_numpy()].astype(np.int64)
    return {
        "holdout_rows": int(held.sum()),
        "holdout_clicks": int(labels.sum()),
        "train_rows": int(train.sum()),
        "train_click_rate": base_rate,
        "train_mean_rating": base_rating,
        "auc": {name: auc(labels, values) for name, values in scores.items()},
        "scores": scores,
    }


# --------------------------------------------------------------------------- the platform


def real_data_config(base: PlatformConfig) -> PlatformConfig:
    """``base`` with :data:`OVERRIDES` applied (through the typed config: a wrong key fails)."""
    data = base.model_dump(mode="json")
    for dotted, value in OVERRIDES.items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"config has no key {dotted}")
        node[leaf] = value
    return PlatformConfig.model_validate(data)


def run_platform(cfg: PlatformConfig, records: list[Record]) -> dict[str, Any]:
    """Replay ``records`` through Kafka, ingest them into bronze, run the batch layer; the stack
    (broker and MLflow) must be running. Returns the run's figures and split."""
    import mlflow

    from batch_layer import train
    from lambda_ml import producer
    from lambda_ml_cli import stack
    from lambda_ml.spark import get_spark
    from speed_layer import app

    stack.create_topics(cfg)
    started = time.monotonic()
    producer.produce(cfg, records)
    produced = time.monotonic()
    app.run(cfg, ["ingest"], available_now=True)
    ingested = time.monotonic()
    spark = get_spark(cfg, "bench-real-data")
    result = train.run(spark, cfg)
    trained = time.monotonic()
    params = mlflow.MlflowClient(cfg.mlflow.tracking_uri).get_run(result.run_id).data.params
    return {
        "champion_auc": result.quality.value,
        "decision": result.decision,
        "rows": result.rows,
        "holdout_after": datetime.fromisoformat(params["holdout_after"]),
        "labels_as_of": datetime.fromisoformat(params["labels_as_of"]),
        "chosen": {k.removeprefix("chosen."): v for k, v in params.items() if k.startswith("chosen.")},
        "seconds": {"produce": produced - started, "ingest": ingested - produced, "train": trained - ingested},
    }


def compare(cfg: PlatformConfig, ratings: pd.DataFrame) -> dict[str, Any]:
    """The whole comparison on a running stack: the platform, then the baselines on its split."""
    records = to_records(ratings)
    log.info("replaying %d ratings as %d records", len(ratings), len(records))
    platform = run_platform(cfg, records)
    attribution = timedelta(minutes=cfg.ctr.attribution_window_minutes)
    peer = holdout_baselines(ratings, platform["holdout_after"], platform["labels_as_of"], attribution)
    if peer["holdout_rows"] != platform["rows"].get("holdout"):
        raise RuntimeError(
            f"the baselines' holdout has {peer['holdout_rows']} rows, the batch run's {platform['rows'].get('holdout')}: "
            "not the same split"
        )
    catalogue_until = catalogue_end(ratings, platform["holdout_after"])
    best = max(peer["auc"], key=peer["auc"].get)
    margin = platform["champion_auc"] - peer["auc"][best]
    return {
        "name": NAME,
        "params": {
            "dataset": f"MovieLens 100k ({DATA_PACKAGE}=={DATA_VERSION}, {DATA_FILE})",
            "ratings": len(ratings),
            "users": int(ratings["user"].nunique()),
            "items": int(ratings["item"].nunique()),
            "first_rating": iso(datetime.fromtimestamp(int(ratings["ts"].min()), UTC)),
            "last_rating": iso(datetime.fromtimestamp(int(ratings["ts"].max()), UTC)),
            "click": f"rating >= {CLICKED_RATING}, {CLICK_DELAY.total_seconds():g} s after the impression",
            "records": len(records),
            "taste_clusters": f"{TASTE_CLUSTERS} of {TASTE_DIMENSIONS} dimensions, from the ratings up to {iso(catalogue_until)}",
            "holdout_fraction": cfg.ctr.holdout_fraction,
            "windows": list(cfg.features.windows),
            "config_overrides": OVERRIDES,
            "chosen": platform["chosen"],
        },
        "results": {
            "champion_auc": platform["champion_auc"],
            "decision": platform["decision"],
            "holdout_after": platform["holdout_after"].isoformat(),
            "labels_as_of": platform["labels_as_of"].isoformat(),
            "rows": platform["rows"],
            "seconds": platform["seconds"],
        },
        "peer": {
            "holdout_rows": peer["holdout_rows"],
            "holdout_clicks": peer["holdout_clicks"],
            "train_click_rate": peer["train_click_rate"],
            "train_mean_rating": peer["train_mean_rating"],
            **{f"{name}_auc": value for name, value in peer["auc"].items()},
        },
        "ratios": {
            "best_baseline": best,
            "champion_minus_best_baseline_auc": margin,
            "target_margin": TARGET_MARGIN,
            "target_met": margin >= TARGET_MARGIN,
        },
    }


def bench_platform_config(root: Path) -> PlatformConfig:
    """The shipped config with its data, ports and lake under ``root``."""
    kafka_port, controller_port, mlflow_port = free_port(), free_port(), free_port()
    base = load_config(
        env={},
        overrides={
            **local_paths(root),
            "kafka.port": kafka_port,
            "kafka.controller_port": controller_port,
            "kafka.bootstrap_servers": f"127.0.0.1:{kafka_port}",
            "mlflow.port": mlflow_port,
            "mlflow.tracking_uri": f"http://127.0.0.1:{mlflow_port}",
            "speed.report_to_mlflow": False,
        },
    )
    return real_data_config(base)


def result_json(
    compared: dict[str, Any], quick: bool, wall_s: float, started_at: datetime | None = None, load: float | None = None
) -> dict[str, Any]:
    """The result JSON (DESIGN section 9) of a :func:`compare` run; ``load`` is the machine's mean
    1-minute load average during it."""
    return {
        "name": compared["name"],
        "machine": machine_info(PACKAGES),
        "params": {**compared["params"], "quick": quick, "started_at": None if started_at is None else started_at.isoformat()},
        "results": {**compared["results"], "wall_s": wall_s, "load_average": None if load is None else round(load, 2)},
        "peer": compared["peer"],
        "ratios": compared["ratios"],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = bench_parser(NAME, "MovieLens 100k through Kafka, bronze and the batch layer, against pandas baselines")
    args = parser.parse_args(argv)
    setup_logging()
    ratings = load_ratings(dataset_path(), QUICK_USERS if args.quick else None)
    from lambda_ml import jvm
    from lambda_ml_cli import stack

    with tempfile.TemporaryDirectory(prefix="bench-real-data-") as tmp:
        cfg = bench_platform_config(Path(tmp))
        jvm.resolve_all(cfg)
        started, started_at = time.monotonic(), datetime.now(UTC)
        # How busy the machine was: a figure taken on a loaded machine is slower, not wrong.
        sampler = MemorySampler(os.getpid(), interval_s=5.0).start()
        try:
            stack.up(cfg)
            compared = compare(cfg, ratings)
        finally:
            stack.down(cfg)
            sampler.stop()
        result = result_json(compared, args.quick, time.monotonic() - started, started_at, sampler.mean_load())
    out = write_result(result, args.out or default_out(NAME, args.quick))
    print(real_data_table(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

"""The real-data benchmark (bench/real_data.py): its baselines on a split small enough to check
by hand, its records, and a run on a subset of MovieLens 100k through the real broker, bronze,
Spark and MLflow, checking the result JSON's shape and that the baselines scored exactly the
batch run's holdout rows."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import real_data
from lambda_ml import contract
from lambda_ml.config import PlatformConfig, load_config
from support import isolated

ATTRIBUTION = timedelta(minutes=30)


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# (user, item, rating, epoch seconds); a rating of 4 or 5 is a click one second later.
TINY = pd.DataFrame(
    [
        (1, 10, 5, 100),  # train, clicked at 101
        (1, 20, 2, 200),  # train
        (2, 10, 4, 300),  # train, clicked at 301
        (2, 20, 1, 400),  # train (the cutoff is its instant)
        (1, 30, 5, 500),  # holdout, clicked at 501
        (2, 30, 3, 600),  # holdout
        (3, 10, 4, 700),  # holdout, clicked at 701
        (3, 20, 5, 9_000),  # its attribution window is still open at as_of: no label, not scored
    ],
    columns=["user", "item", "rating", "ts"],
)


def test_baselines_on_a_hand_checked_split() -> None:
    """By hand, with the training rows' click rate 2/4 = 0.5 standing in for no history:

    - item popularity (impressions before): i30 at 500: 0; i30 at 600: 1; i10 at 700: 2.
    - rates: u1 at 500: 1 click (101) / 2 seen, i30: none -> 0.5 + 0.5; u2 at 600: 1/2, i30:
      1 click (501) / 1 -> 0.5 + 1.0; u3 at 700: none, i10: 2/2 -> 0.5 + 1.0.
    - smoothed by 10 impressions at 0.5: u1 6/12 + i30 5/10; u2 6/12 + i30 6/11; u3 5/10 + i10 7/12.
    - mean ratings smoothed by 10 ratings at the training rows' mean, (5 + 2 + 4 + 1) / 4 = 3:
      u1 (5 + 2 + 30)/12 + i30 30/10; u2 (4 + 1 + 30)/12 + i30 (5 + 30)/11; u3 30/10 + i10 (5 + 4 + 30)/12.

    The labels are 1, 0, 1, so the AUCs are 1/2, 1/4 (a loss and a tie), 1/2 and 1/2 (6.08 loses
    to 6.10, 6.25 beats it).
    """
    found = real_data.holdout_baselines(TINY, cutoff=at(400), as_of=at(9_001), attribution=ATTRIBUTION)
    assert (found["holdout_rows"], found["holdout_clicks"], found["train_rows"], found["train_click_rate"]) == (3, 2, 4, 0.5)
    assert found["train_mean_rating"] == 3.0
    scores = found["scores"]
    np.testing.assert_allclose(scores["item_popularity"], [0, 1, 2])
    np.testing.assert_allclose(scores["user_item_rates"], [1.0, 1.5, 1.5])
    np.testing.assert_allclose(scores["user_item_smoothed_rates"], [6 / 12 + 5 / 10, 6 / 12 + 6 / 11, 5 / 10 + 7 / 12])
    np.testing.assert_allclose(scores["user_item_mean_ratings"], [37 / 12 + 3, 35 / 12 + 35 / 11, 3 + 39 / 12])
    assert found["auc"] == {"item_popularity": 0.5, "user_item_rates": 0.25, "user_item_smoothed_rates": 0.5, "user_item_mean_ratings": 0.5}


def test_events_at_the_same_instant_do_not_count() -> None:
    """A click one second after an impression is unseen by an impression in that second."""
    same = pd.DataFrame([(1, 10, 5, 100), (1, 20, 2, 100), (2, 10, 5, 101), (2, 20, 1, 101)], columns=TINY.columns)
    found = real_data.holdout_baselines(same, cutoff=at(100), as_of=at(5_000), attribution=ATTRIBUTION)
    # At 101 the item i10 has been seen once (at 100) and its click (at 101) is not before 101.
    np.testing.assert_allclose(found["scores"]["item_popularity"], [1, 1])
    np.testing.assert_allclose(found["scores"]["user_item_rates"], [0.5 + 0 / 1, 0.5 + 0 / 1])
    # The films' mean ratings count their ratings at 100 (5 and 2 stars); the user u2 rates both
    # at 101, so neither sees the other: the user's is the prior, the training rows' mean 3.5.
    np.testing.assert_allclose(found["scores"]["user_item_mean_ratings"], [3.5 + (5 + 35) / 11, 3.5 + (2 + 35) / 11])


# What the film and user files say, for the records of TINY.
ATTRIBUTES = {
    "genre": "Drama", "release_year": 1995, "release_decade": "1990s", "age": 24, "age_group": "18-24", "gender": "M",
    "occupation": "technician", "taste": "taste 3",
}  # fmt: skip


def test_records_are_an_impression_per_rating_and_a_click_per_high_rating() -> None:
    records = real_data.to_records(TINY.assign(**ATTRIBUTES))
    payloads = [(r.event_type, json.loads(r.value)) for r in records]
    impressions = [p for kind, p in payloads if kind == "impressions"]
    clicks = [p for kind, p in payloads if kind == "clicks"]
    assert len(impressions) == len(TINY) and len(clicks) == int((TINY.rating >= 4).sum()) == 5
    assert impressions[0] == {
        "event_id": "ml-1-10", "event_time": "1970-01-01T00:01:40.000Z", "user_id": "u1", "item_id": "i10",
        "device": "desktop", "position": 1, **ATTRIBUTES, "rating_scaled": 1.0,
    }  # fmt: skip
    # The rating travels on its impression as a share of the scale, (stars - 1) / 4.
    assert [p["rating_scaled"] for p in impressions] == [(stars - 1) / 4 for stars in TINY.rating]
    assert clicks[0] == {"event_id": "ml-1-10-click", "impression_id": "ml-1-10", "event_time": "1970-01-01T00:01:41.000Z"}
    assert [p["event_time"] for _, p in payloads] == sorted(p["event_time"] for _, p in payloads)


def test_ratings_carry_the_film_and_the_user_as_the_data_set_describes_them() -> None:
    """Read back from the raw files with the csv module: each rating's film (first listed genre,
    release year and decade) and user (age, its group, gender, occupation)."""
    path = real_data.dataset_path()
    with path.with_suffix(".item").open(encoding="latin-1") as f:
        films = {int(row[0]): row for row in list(csv.reader(f, delimiter="\t"))[1:]}
    with path.with_suffix(".user").open() as f:
        people = {int(row[0]): row for row in list(csv.reader(f, delimiter="\t"))[1:]}
    ratings = real_data.load_ratings(path, users=30)
    assert len(ratings) > 1000 and set(ratings["user"]) == set(range(1, 31))
    for row in ratings.itertuples(index=False):
        _, _, year, genres = films[row.item]
        age, gender, occupation = int(people[row.user][1]), people[row.user][2], people[row.user][3]
        expected_year = int(year) if year.isdigit() else 0  # the file has an "unkonwn" year
        decade = f"{expected_year // 10 * 10}s" if year.isdigit() else "unknown"
        group = next(g for low, high, g in ((0, 17, "under 18"), (18, 24, "18-24"), (25, 34, "25-34"), (35, 44, "35-44"),
                                            (45, 54, "45-54"), (55, 999, "55+")) if low <= age <= high)  # fmt: skip
        assert (row.genre, row.release_year, row.release_decade) == ((genres.split() or ["unknown"])[0], expected_year, decade)
        assert (row.age, row.age_group, row.gender, row.occupation) == (age, group, gender, occupation)
    # A film has a taste cluster when it was rated in the oldest 60 % of these ratings.
    cut = int(len(ratings) * 0.6)
    catalogued = set(ratings["item"].iloc[:cut])
    assert {row.item for row in ratings.itertuples() if row.taste == "unrated"} == set(ratings["item"]) - catalogued
    assert ratings["taste"][ratings["item"].isin(catalogued)].str.fullmatch(r"taste \d+").all()


def test_the_taste_clusters_must_end_before_the_holdout() -> None:
    """TINY's 8 ratings: the clusters read the oldest 60 %, 4 ratings, up to 400 s."""
    assert real_data.catalogue_end(TINY, at(401)) == at(400)
    with pytest.raises(RuntimeError, match="up to 1970-01-01T00:06:40.000Z, not before the holdout's start 1970-01-01T00:06:40.000Z"):
        real_data.catalogue_end(TINY, at(400))


def test_taste_clusters_group_the_films_the_same_users_like() -> None:
    """Users 1-3 rate films 10 and 11 five stars and films 12 and 13 one star, users 4-6 the
    reverse (user 6 rates film 11 four stars, not one): two clusters, {10, 11} and {12, 13}."""
    rows = [(u, f, 5.0 if (f < 12) == (u < 4) else 1.0) for u in range(1, 7) for f in (10, 11, 12, 13)]
    rows[-3] = (6, 11, 4.0)
    ratings = pd.DataFrame(rows, columns=["user", "item", "rating"])
    clusters = real_data.taste_clusters(ratings, clusters=2, dimensions=2)
    assert clusters[10] == clusters[11] != clusters[12] == clusters[13]
    assert set(clusters) == {"taste 0", "taste 1"}
    # Every rating mirrored (each user now likes what they disliked): the same two groups.
    mirrored = real_data.taste_clusters(ratings.assign(rating=6.0 - ratings["rating"]), clusters=2, dimensions=2)
    assert mirrored[10] == mirrored[11] != mirrored[12] == mirrored[13]


def test_the_benchmark_config_reads_the_new_fields() -> None:
    """The overrides type the new impression fields and key taste entities and context on them."""
    cfg = real_data.real_data_config(load_config(env={}))
    fields = cfg.events.types["impressions"].fields
    assert {name: fields[name] for name in real_data.ATTRIBUTE_FIELDS} == real_data.ATTRIBUTE_FIELDS
    assert fields[real_data.RATING_FIELD] == "double"
    assert cfg.features.entities["user_genre"].keys == ("user_id", "genre")
    assert cfg.features.entities["user_taste"].keys == ("user_id", "taste")
    inputs = contract.model_inputs(cfg.features)
    assert {"user_genre_ctr_all", "item_gender_clicks_5m", "user_mean_rating_all", "release_year", "age"} <= set(inputs.numeric)
    # The rating reaches the model only through aggregates over earlier events, never as an input.
    assert real_data.RATING_FIELD not in {*inputs.numeric, *inputs.categorical}
    # The shipped config is untouched: its generator's impressions have none of these fields.
    shipped = load_config(env={})
    assert not {*real_data.ATTRIBUTE_FIELDS, real_data.RATING_FIELD} & set(shipped.events.types["impressions"].fields)


def test_the_auc_counts_ties_half() -> None:
    assert real_data.auc(np.array([1, 0, 1, 0]), np.array([3.0, 1.0, 1.0, 0.0])) == 0.875  # 3.5 of 4 pairs
    with pytest.raises(ValueError, match="both classes"):
        real_data.auc(np.array([1, 1]), np.array([0.1, 0.2]))


@pytest.mark.integration
@pytest.mark.slow
def test_a_quick_run_on_a_subset(running_stack: PlatformConfig, spark: object, tmp_path: Path) -> None:
    """MovieLens ratings of the first users through Kafka, the ingest and the batch layer; the
    baselines score the batch run's own holdout rows (compare() refuses a different count)."""
    ratings = real_data.load_ratings(real_data.dataset_path(), users=60)
    base = isolated(running_stack, "ctr-real-data", lake_root=tmp_path / "lake", topic_prefix="real-data")
    cfg = real_data.real_data_config(base)
    # The path is what is tested, not the model: 15 trees instead of the benchmark's 100.
    cfg = cfg.model_copy(update={"ctr": cfg.ctr.model_copy(update={"gbt": cfg.ctr.gbt.model_copy(update={"max_iter": 15})})})
    # 60 users rarely rate one film within the same hour: the short windows of the film's
    # entities would be constant, which training refuses. The long ones keep every entity.
    cfg = cfg.model_copy(update={"features": cfg.features.model_copy(update={"windows": ("24h", "all")})})
    # The ratings (1997-98) are history the default config takes in as it is.
    assert cfg.speed.min_event_date < datetime.fromtimestamp(int(ratings["ts"].min()), UTC).date() and "all" in cfg.features.windows
    compared = real_data.compare(cfg, ratings)
    result = real_data.result_json(compared, quick=True, wall_s=1.0)
    # Bronze holds the film's and the user's fields of every impression as sent.
    attributes = [*real_data.ATTRIBUTE_FIELDS, real_data.RATING_FIELD]
    bronze = spark.read.format("delta").load(cfg.lake.table("bronze", "impressions")).select("event_id", *attributes)  # type: ignore[attr-defined]
    landed = bronze.dropDuplicates(["event_id"]).toPandas().sort_values("event_id").reset_index(drop=True)
    sent = ratings.assign(
        event_id=[real_data.impression_id(u, i) for u, i in zip(ratings["user"], ratings["item"], strict=True)],
        **{real_data.RATING_FIELD: (ratings["rating"] - 1) / 4},
    )
    sent = sent[["event_id", *attributes]].sort_values("event_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(landed, sent, check_dtype=False)
    out = real_data.write_result(result, tmp_path / "real_data.json")

    loaded = json.loads(out.read_text())
    assert list(loaded) == ["name", "machine", "params", "results", "peer", "ratios"]
    assert loaded["name"] == "real_data" and loaded["params"]["ratings"] == len(ratings)
    peer, results = loaded["peer"], loaded["results"]
    assert peer["holdout_rows"] == results["rows"]["holdout"] > 100
    assert peer["holdout_clicks"] == results["rows"]["holdout_positives"]
    aucs = {k: v for k, v in peer.items() if k.endswith("_auc")}
    assert set(aucs) == {"item_popularity_auc", "user_item_rates_auc", "user_item_smoothed_rates_auc", "user_item_mean_ratings_auc"}
    assert all(0.3 < v < 1.0 for v in [*aucs.values(), results["champion_auc"]])
    best = max(aucs.values())
    assert loaded["ratios"]["champion_minus_best_baseline_auc"] == pytest.approx(results["champion_auc"] - best)
    assert results["decision"] == "champion"

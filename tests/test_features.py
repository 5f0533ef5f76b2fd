"""Labels and point-in-time features on small hand-built frames, expected values worked out by
hand (attribution window: 30 minutes).

The shared story, all on 2026-01-01 (UTC):

    impressions                          clicks
    i1 u1 A 10:00 mobile  1              c1 -> i1 10:25  inside the window (sent twice)
    i2 u1 B 10:10 desktop 2              c2 -> i2 10:45  35 min later: after the window
    i3 u2 A 10:20 tablet  3              c3 -> i3 10:50  exactly 30 min: inside (inclusive)
    i4 u1 A 11:00 mobile  1              c4 -> ?? 10:30  no such impression: ignored
    i5 u2 B 11:00 desktop 2              c5 -> i4 11:00  same instant as its impression: inside
    i6 u3 A 12:00 mobile  1              c6 -> i1 09:59  before its impression: ignored

The latest event is i6 at 12:00, so windows closed by then are i1..i5 (i6 has no label yet).
Attributed clicks: c1 (u1, A, 10:25), c3 (u2, A, 10:50), c5 (u1, A, 11:00).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructField, StructType

from lambda_ml import contract, features
from lambda_ml.schemas import CLICK, IMPRESSION

WINDOW = 30
Row = tuple[Any, ...]  # one event's values, in schema order


def at(hhmm: str, second: int = 0) -> datetime:
    hour, minute = (int(part) for part in hhmm.split(":"))
    return datetime(2026, 1, 1, hour, minute, second, tzinfo=UTC)


def impressions_frame(spark: SparkSession, rows: list[Row]) -> DataFrame:
    """Rows of (event_id, "HH:MM", user_id, item_id, device, position), typed as in bronze."""
    schema = StructType([StructField(f.name, f.spark_type, False) for f in IMPRESSION.fields])
    return spark.createDataFrame([(eid, at(t), *rest) for eid, t, *rest in rows], schema)


def clicks_frame(spark: SparkSession, rows: list[Row]) -> DataFrame:
    """Rows of (event_id, impression_id, "HH:MM"), typed as in bronze."""
    schema = StructType([StructField(f.name, f.spark_type, False) for f in CLICK.fields])
    return spark.createDataFrame([(eid, imp, at(t)) for eid, imp, t in rows], schema)


IMPRESSIONS = [
    ("i1", "10:00", "u1", "A", "mobile", 1),
    ("i2", "10:10", "u1", "B", "desktop", 2),
    ("i3", "10:20", "u2", "A", "tablet", 3),
    ("i4", "11:00", "u1", "A", "mobile", 1),
    ("i5", "11:00", "u2", "B", "desktop", 2),
    ("i6", "12:00", "u3", "A", "mobile", 1),
]
CLICKS = [
    ("c1", "i1", "10:25"),
    ("c1", "i1", "10:25"),  # the same click delivered twice
    ("c2", "i2", "10:45"),
    ("c3", "i3", "10:50"),
    ("c4", "nope", "10:30"),
    ("c5", "i4", "11:00"),
    ("c6", "i1", "09:59"),
]


@pytest.fixture(scope="module")
def story(spark: SparkSession) -> tuple[DataFrame, DataFrame]:
    """The story's impressions and clicks, deduplicated as the batch layer does."""
    impressions = features.dedup_events(impressions_frame(spark, IMPRESSIONS))
    clicks = features.dedup_events(clicks_frame(spark, CLICKS))
    return impressions, clicks


def test_dedup_keeps_one_row_per_event_id(spark: SparkSession) -> None:
    clicks = clicks_frame(spark, CLICKS)
    assert clicks.count() == 7
    deduped = features.dedup_events(clicks)
    assert sorted(r.event_id for r in deduped.collect()) == ["c1", "c2", "c3", "c4", "c5", "c6"]


def test_attributed_clicks_are_inside_the_window_and_have_an_impression(story: tuple[DataFrame, DataFrame]) -> None:
    impressions, clicks = story
    attributed = features.attribute_clicks(impressions, clicks, WINDOW)
    rows = attributed.select("click_id", "impression_id", "user_id", "item_id", F.date_format("event_time", "HH:mm"))
    assert sorted(tuple(r) for r in rows.collect()) == [
        ("c1", "i1", "u1", "A", "10:25"),
        ("c3", "i3", "u2", "A", "10:50"),
        ("c5", "i4", "u1", "A", "11:00"),
    ]


def test_labels(story: tuple[DataFrame, DataFrame]) -> None:
    impressions, clicks = story
    attributed = features.attribute_clicks(impressions, clicks, WINDOW)
    as_of = features.latest_event_time(impressions, clicks)
    assert as_of == at("12:00")
    labelled = features.label_impressions(impressions, attributed, WINDOW, as_of)
    got = sorted((r.event_id, r.label) for r in labelled.collect())
    # i1: late click inside; i2: click after the window; i3: click on the boundary;
    # i4: click at the impression's instant; i5: no click; i6: window still open -> no row.
    assert got == [("i1", 1.0), ("i2", 0.0), ("i3", 1.0), ("i4", 1.0), ("i5", 0.0)]


def test_an_impression_is_unlabelled_until_its_window_closes(story: tuple[DataFrame, DataFrame]) -> None:
    impressions, clicks = story
    attributed = features.attribute_clicks(impressions, clicks, WINDOW)
    # At 11:29:59 the 11:00 windows are still open; at 11:30 they have just closed.
    before = features.label_impressions(impressions, attributed, WINDOW, at("11:29", 59))
    assert sorted(r.event_id for r in before.collect()) == ["i1", "i2", "i3"]
    closed = features.label_impressions(impressions, attributed, WINDOW, at("11:30"))
    assert sorted(r.event_id for r in closed.collect()) == ["i1", "i2", "i3", "i4", "i5"]


def test_duplicate_click_counts_once(spark: SparkSession) -> None:
    impressions = features.dedup_events(impressions_frame(spark, [("i1", "10:00", "u1", "A", "mobile", 1)]))
    twice = clicks_frame(spark, [("c1", "i1", "10:05"), ("c1", "i1", "10:05")])
    raw = features.count_increments(impressions, features.attribute_clicks(impressions, twice, WINDOW))
    deduped = features.count_increments(
        impressions, features.attribute_clicks(impressions, features.dedup_events(twice), WINDOW)
    )
    assert [tuple(r) for r in features.entity_counts(raw, features.USER).collect()] == [("u1", 1, 2)]
    assert [tuple(r) for r in features.entity_counts(deduped, features.USER).collect()] == [("u1", 1, 1)]


def test_point_in_time_counts_by_hand(story: tuple[DataFrame, DataFrame]) -> None:
    impressions, clicks = story
    increments = features.count_increments(impressions, features.attribute_clicks(impressions, clicks, WINDOW))
    with_features = features.add_point_in_time_features(impressions, increments)
    got = sorted(
        (r.event_id, r.user_impressions, r.user_clicks, r.item_impressions, r.item_clicks)
        for r in with_features.collect()
    )
    assert got == [
        ("i1", 0, 0, 0, 0),  # nothing before the first impression
        ("i2", 1, 0, 0, 0),  # u1 saw i1; c1 (10:25) is still in the future
        ("i3", 0, 0, 1, 0),  # item A had i1; c1 still in the future
        ("i4", 2, 1, 2, 2),  # u1: i1, i2, c1; A: i1, i3, c1, c3; its own c5 at 11:00 is not before
        ("i5", 1, 1, 1, 0),  # u2: i3, c3; B: i2 (c2 was never attributed); i4 at 11:00 is not before
        ("i6", 0, 0, 3, 3),  # A: i1, i3, i4 and c1, c3, c5
    ]


def test_own_click_and_later_events_never_leak(spark: SparkSession) -> None:
    """An impression's own click (even one second later) and anything after it are not its features."""
    impressions = impressions_frame(
        spark,
        [
            ("x", "10:00", "u9", "Z", "mobile", 1),
            ("y", "10:30", "u9", "Z", "mobile", 1),
        ],
    )
    clicks = clicks_frame(spark, [("cx", "x", "10:00"), ("cy", "y", "10:31")])
    increments = features.count_increments(impressions, features.attribute_clicks(impressions, clicks, WINDOW))
    rows = {r.event_id: r for r in features.add_point_in_time_features(impressions, increments).collect()}
    assert [rows["x"][name] for name in contract.NUMERIC_FEATURES[:4]] == [0, 0, 0, 0]
    # y sees x and x's click, not its own click one minute later.
    assert [rows["y"][name] for name in contract.NUMERIC_FEATURES[:4]] == [1, 1, 1, 1]


def test_features_of_past_rows_do_not_change_when_the_future_arrives(story: tuple[DataFrame, DataFrame]) -> None:
    """Point-in-time: cutting every event at or after 11:00 leaves earlier rows' features unchanged."""
    impressions, clicks = story
    cut = at("11:00")

    def features_before(imps: DataFrame, clks: DataFrame) -> list[Row]:
        increments = features.count_increments(imps, features.attribute_clicks(imps, clks, WINDOW))
        frame = features.add_point_in_time_features(imps, increments).where(F.col("event_time") < F.lit(cut))
        return sorted(tuple(r[c] for c in ("event_id", *contract.NUMERIC_FEATURES[:4])) for r in frame.collect())

    full = features_before(impressions, clicks)
    past_only = features_before(
        impressions.where(F.col("event_time") < F.lit(cut)), clicks.where(F.col("event_time") < F.lit(cut))
    )
    assert [row[0] for row in full] == ["i1", "i2", "i3"]
    assert full == past_only


def test_entity_counts_are_snapshot_totals(story: tuple[DataFrame, DataFrame]) -> None:
    impressions, clicks = story
    increments = features.count_increments(impressions, features.attribute_clicks(impressions, clicks, WINDOW))
    users = sorted(tuple(r) for r in features.entity_counts(increments, features.USER).collect())
    items = sorted(tuple(r) for r in features.entity_counts(increments, features.ITEM).collect())
    assert users == [("u1", 3, 2), ("u2", 2, 1), ("u3", 1, 0)]
    assert items == [("A", 4, 3), ("B", 2, 0)]


def test_counts_are_a_monoid(story: tuple[DataFrame, DataFrame]) -> None:
    """Totals of the increments before 11:00 plus those after equal the totals over all."""
    impressions, clicks = story
    increments = features.count_increments(impressions, features.attribute_clicks(impressions, clicks, WINDOW))
    early = increments.where(F.col("event_time") < F.lit(at("11:00")))
    late = increments.where(F.col("event_time") >= F.lit(at("11:00")))
    merged = (
        features.entity_counts(early, features.USER)
        .unionByName(features.entity_counts(late, features.USER))
        .groupBy("user_id")
        .agg(F.sum("impressions").alias("impressions"), F.sum("clicks").alias("clicks"))
    )
    whole = features.entity_counts(increments, features.USER)
    assert sorted(tuple(r) for r in merged.collect()) == sorted(tuple(r) for r in whole.collect())
    assert merged.count() == 3


def test_model_input_columns_follow_the_contract(story: tuple[DataFrame, DataFrame]) -> None:
    impressions, clicks = story
    increments = features.count_increments(impressions, features.attribute_clicks(impressions, clicks, WINDOW))
    frame = features.add_point_in_time_features(impressions, increments)
    inputs = frame.select(*features.model_input_columns(frame))
    assert inputs.columns == list(contract.MODEL_INPUTS)
    assert [t for _, t in inputs.dtypes] == ["double"] * len(contract.NUMERIC_FEATURES) + ["string"]


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="attribution window must be positive"):
        features.within_attribution_window(F.col("a"), F.col("b"), 0)


def test_latest_event_time_of_empty_frames_is_none(story: tuple[DataFrame, DataFrame]) -> None:
    impressions, clicks = story
    assert features.latest_event_time(impressions.limit(0), clicks.limit(0)) is None

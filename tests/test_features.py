"""Labels, bucket increments and point-in-time window features on small hand-built frames,
expected values worked out by hand (attribution window: 30 minutes), then against a plain-Python
reference over the raw events, on a streaming frame, and the declarations' validation.

The shared story, all on 2026-01-01 (UTC):

    impressions                          clicks
    i1 u1 A 10:00 mobile  1              c1 -> i1 10:25  inside the window (sent twice)
    i2 u1 B 10:10 desktop 2              c2 -> i2 10:45  35 min later: after the window
    i3 u2 A 10:20 tablet  3              c3 -> i3 10:50  exactly 30 min: inside (inclusive)
    i4 u1 A 11:00 mobile  1              c4 -> ?? 10:30  no such impression: ignored
    i5 u2 B 11:00 desktop 2              c5 -> i4 11:00  same instant as its impression: inside
    i6 u3 A 12:00 mobile  1              c6 -> i1 09:59  before its impression: ignored

The latest event is i6 at 12:00, so windows closed by then are i1..i5 (i6 has no label yet).
Attributed clicks: c1 (u1, A, position 1, 10:25), c3 (u2, A, 3, 10:50), c5 (u1, A, 1, 11:00).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructField, StructType

from lambda_ml import buckets, contract, features
from lambda_ml_apps.ctr import events as ctr_events
from lambda_ml.config import DEFAULT_CONFIG, ConfigError, FeaturesConfig, PlatformConfig, load_config, parse_duration
from support import CLICK, IMPRESSION

WINDOW = 30
Row = tuple[Any, ...]  # one event's values, in schema order

# Declarations small enough to work out by hand, using every aggregation.
UNIT = FeaturesConfig.model_validate(
    {
        "event_type": "impressions",
        "bucket": "1h",
        "windows": ["1h", "2h"],
        "entities": {"user": {"keys": ["user_id"]}, "item": {"keys": ["item_id"]}},
        "aggregates": {
            "impressions": {"events": "impressions", "aggregation": "count"},
            "clicks": {"events": "clicks", "aggregation": "count"},
            "top_position": {"events": "impressions", "aggregation": "min", "measure": "position", "empty": 0},
            "clicked_positions": {"events": "clicks", "aggregation": "sum", "measure": "position"},
            "worst_clicked": {"events": "clicks", "aggregation": "max", "measure": "position", "empty": -1},
        },
        "ratios": {"ctr": {"numerator": "clicks", "denominator": "impressions", "prior_alpha": 1, "prior_beta": 1}},
        "context": {"numeric": ["position"], "categorical": ["device"]},
    }
)
STATISTICS = ("impressions", "clicks", "top_position", "clicked_positions", "worst_clicked", "ctr")


def at(hhmm: str, second: int = 0) -> datetime:
    hour, minute = (int(part) for part in hhmm.split(":"))
    return datetime(2026, 1, 1, hour, minute, second, tzinfo=UTC)


def impressions_frame(spark: SparkSession, rows: list[Row]) -> DataFrame:
    """Rows of (event_id, "HH:MM" or datetime, user_id, item_id, device, position), typed as in bronze."""
    schema = StructType([StructField(f.name, f.spark_type, False) for f in IMPRESSION.fields])
    return spark.createDataFrame([(eid, at(t) if isinstance(t, str) else t, *rest) for eid, t, *rest in rows], schema)


def clicks_frame(spark: SparkSession, rows: list[Row]) -> DataFrame:
    """Rows of (event_id, impression_id, "HH:MM" or datetime), typed as in bronze."""
    schema = StructType([StructField(f.name, f.spark_type, False) for f in CLICK.fields])
    return spark.createDataFrame([(eid, imp, at(t) if isinstance(t, str) else t) for eid, imp, t in rows], schema)


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


def story_events(impressions: DataFrame, clicks: DataFrame, declared: FeaturesConfig = UNIT) -> DataFrame:
    return ctr_events.feature_events(impressions, ctr_events.attribute_clicks(impressions, clicks, WINDOW), declared)


def window_rows(frame: DataFrame, entity: str, window: str) -> dict[str, tuple[float, ...]]:
    """event_id -> the entity's window features, in STATISTICS order."""
    names = [contract.window_feature_name(entity, s, window) for s in STATISTICS]
    return {r.event_id: tuple(r[n] for n in names) for r in frame.collect()}


# --------------------------------------------------------------------------- labels


def test_dedup_keeps_one_row_per_event_id(spark: SparkSession) -> None:
    clicks = clicks_frame(spark, CLICKS)
    assert clicks.count() == 7
    deduped = features.dedup_events(clicks)
    assert sorted(r.event_id for r in deduped.collect()) == ["c1", "c2", "c3", "c4", "c5", "c6"]


def test_attributed_clicks_are_inside_the_window_and_carry_their_impression(story: tuple[DataFrame, DataFrame]) -> None:
    impressions, clicks = story
    attributed = ctr_events.attribute_clicks(impressions, clicks, WINDOW)
    rows = attributed.select(
        "click_id", "impression_id", "user_id", "item_id", "device", "position", F.date_format("event_time", "HH:mm")
    )
    assert sorted(tuple(r) for r in rows.collect()) == [
        ("c1", "i1", "u1", "A", "mobile", 1, "10:25"),
        ("c3", "i3", "u2", "A", "tablet", 3, "10:50"),
        ("c5", "i4", "u1", "A", "mobile", 1, "11:00"),
    ]


def test_labels(story: tuple[DataFrame, DataFrame]) -> None:
    impressions, clicks = story
    attributed = ctr_events.attribute_clicks(impressions, clicks, WINDOW)
    as_of = features.latest_event_time(impressions, clicks)
    assert as_of == at("12:00")
    labelled = ctr_events.label_impressions(impressions, attributed, WINDOW, as_of)
    got = sorted((r.event_id, r.label) for r in labelled.collect())
    # i1: late click inside; i2: click after the window; i3: click on the boundary;
    # i4: click at the impression's instant; i5: no click; i6: window still open -> no row.
    assert got == [("i1", 1.0), ("i2", 0.0), ("i3", 1.0), ("i4", 1.0), ("i5", 0.0)]


def test_an_impression_is_unlabelled_until_its_window_closes(story: tuple[DataFrame, DataFrame]) -> None:
    impressions, clicks = story
    attributed = ctr_events.attribute_clicks(impressions, clicks, WINDOW)
    # At 11:29:59 the 11:00 windows are still open; at 11:30 they have just closed.
    before = ctr_events.label_impressions(impressions, attributed, WINDOW, at("11:29", 59))
    assert sorted(r.event_id for r in before.collect()) == ["i1", "i2", "i3"]
    closed = ctr_events.label_impressions(impressions, attributed, WINDOW, at("11:30"))
    assert sorted(r.event_id for r in closed.collect()) == ["i1", "i2", "i3", "i4", "i5"]


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="attribution window must be positive"):
        ctr_events.within_attribution_window(F.col("a"), F.col("b"), 0)


def test_latest_event_time_of_empty_frames_is_none(story: tuple[DataFrame, DataFrame]) -> None:
    impressions, clicks = story
    assert features.latest_event_time(impressions.limit(0), clicks.limit(0)) is None


# --------------------------------------------------------------------------- bucket increments


def test_feature_events_are_impressions_and_attributed_clicks(story: tuple[DataFrame, DataFrame]) -> None:
    impressions, clicks = story
    events = story_events(impressions, clicks)
    assert events.columns == ["kind", "event_id", "event_time", "user_id", "item_id", "position"]
    got = sorted((r.kind, r.event_id, r.event_time.strftime("%H:%M"), r.user_id, r.item_id, r.position) for r in events.collect())
    assert got == [
        ("clicks", "c1", "10:25", "u1", "A", 1),
        ("clicks", "c3", "10:50", "u2", "A", 3),
        ("clicks", "c5", "11:00", "u1", "A", 1),
        ("impressions", "i1", "10:00", "u1", "A", 1),
        ("impressions", "i2", "10:10", "u1", "B", 2),
        ("impressions", "i3", "10:20", "u2", "A", 3),
        ("impressions", "i4", "11:00", "u1", "A", 1),
        ("impressions", "i5", "11:00", "u2", "B", 2),
        ("impressions", "i6", "12:00", "u3", "A", 1),
    ]


def test_bucket_increments_by_hand(story: tuple[DataFrame, DataFrame]) -> None:
    impressions, clicks = story
    rows = features.bucket_increments(story_events(impressions, clicks), UNIT.entities["item"], UNIT)
    assert rows.columns == ["item_id", "bucket_start", *UNIT.aggregates]
    got = sorted((r.item_id, r.bucket_start.strftime("%H:%M"), *(r[a] for a in UNIT.aggregates)) for r in rows.collect())
    # (impressions, clicks, top position, sum of clicked positions, worst clicked position)
    assert got == [
        ("A", "10:00", 2, 2, 1.0, 4.0, 3.0),  # i1, i3; c1 (position 1), c3 (position 3)
        ("A", "11:00", 1, 1, 1.0, 1.0, 1.0),  # i4; c5
        ("A", "12:00", 1, 0, 1.0, 0.0, None),  # i6; no click: the max has nothing to take
        ("B", "10:00", 1, 0, 2.0, 0.0, None),  # i2 (c2 is outside its window)
        ("B", "11:00", 1, 0, 2.0, 0.0, None),  # i5
    ]


def test_duplicate_click_counts_once(spark: SparkSession) -> None:
    impressions = features.dedup_events(impressions_frame(spark, [("i1", "10:00", "u1", "A", "mobile", 1)]))
    twice = clicks_frame(spark, [("c1", "i1", "10:05"), ("c1", "i1", "10:05")])

    def user_rows(clicks: DataFrame) -> list[Row]:
        rows = features.bucket_increments(story_events(impressions, clicks), UNIT.entities["user"], UNIT)
        return [(r.user_id, r.impressions, r.clicks) for r in rows.collect()]

    assert user_rows(twice) == [("u1", 1, 2)]
    assert user_rows(features.dedup_events(twice)) == [("u1", 1, 1)]


def test_bucket_rows_are_a_monoid(story: tuple[DataFrame, DataFrame]) -> None:
    """Rows of the events before 10:30 merged with rows of those after equal rows of all: the
    10:00 bucket is split across the two parts and must come back whole."""
    impressions, clicks = story
    events = story_events(impressions, clicks)
    item = UNIT.entities["item"]
    early = features.bucket_increments(events.where(F.col("event_time") < F.lit(at("10:30"))), item, UNIT)
    late = features.bucket_increments(events.where(F.col("event_time") >= F.lit(at("10:30"))), item, UNIT)
    assert early.count() == 2 and late.count() == 4  # A and B at 10:00 on the early side, A 10:00 late too

    def rows(frame: DataFrame) -> list[Row]:
        return sorted(tuple(r[c] for c in frame.columns) for r in frame.select("item_id", "bucket_start", *UNIT.aggregates).collect())

    merged = features.merge_buckets([early, late], item, UNIT)
    assert rows(merged) == rows(features.bucket_increments(events, item, UNIT))
    assert len(rows(merged)) == 5


def test_bucket_increments_on_a_streaming_frame_equal_the_static_ones(
    spark: SparkSession, story: tuple[DataFrame, DataFrame], tmp_path: Path
) -> None:
    """The same declarations on a stream (two file sources, unioned, watermarked) give the rows
    the batch layer computes on the static frames."""
    impressions, clicks = story
    attributed = ctr_events.attribute_clicks(impressions, clicks, WINDOW)
    # Parquet rather than Delta sources: the same streaming plan, and a much faster first batch.
    impressions.write.parquet(str(tmp_path / "impressions"))
    attributed.write.parquet(str(tmp_path / "attributed"))

    def stream(name: str) -> DataFrame:
        path = str(tmp_path / name)
        return spark.readStream.schema(spark.read.parquet(path).schema).parquet(path).withWatermark("event_time", "2 hours")

    streamed_events = ctr_events.feature_events(stream("impressions"), stream("attributed"), UNIT)
    assert streamed_events.isStreaming
    user = UNIT.entities["user"]
    partitions = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", "1")  # one state store: a few rows need no more
    try:
        query = (
            features.bucket_increments(streamed_events, user, UNIT)
            .writeStream.format("memory")
            .queryName("user_buckets")
            .outputMode("complete")
            .option("checkpointLocation", str(tmp_path / "checkpoint"))
            .start()
        )
        try:
            query.processAllAvailable()
        finally:
            query.stop()
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", partitions)
    columns = ["user_id", "bucket_start", *UNIT.aggregates]
    streamed = sorted(tuple(r) for r in spark.table("user_buckets").select(*columns).collect())
    static = features.bucket_increments(ctr_events.feature_events(impressions, attributed, UNIT), user, UNIT)
    assert streamed == sorted(tuple(r) for r in static.select(*columns).collect())
    # u1 at 10:00 (i1, i2, c1) and 11:00 (i4, c5), u2 at 10:00 (i3, c3) and 11:00 (i5), u3 at 12:00 (i6).
    assert [(r[0], r[2], r[3]) for r in streamed] == [("u1", 2, 1), ("u1", 1, 1), ("u2", 1, 1), ("u2", 1, 0), ("u3", 1, 0)]


# --------------------------------------------------------------------------- point in time


def test_window_features_by_hand(story: tuple[DataFrame, DataFrame]) -> None:
    impressions, clicks = story
    with_features = features.add_window_features(impressions, story_events(impressions, clicks), UNIT)
    # (impressions, clicks, top position, clicked positions, worst clicked, ctr = (clicks + 1) / (impressions + 2))
    nothing = (0.0, 0.0, 0.0, 0.0, -1.0, 0.5)
    assert window_rows(with_features, "user", "1h") == {
        "i1": nothing,
        "i2": (1.0, 0.0, 1.0, 0.0, -1.0, 1 / 3),  # u1: i1; c1 (10:25) is still in the future
        "i3": nothing,  # u2 had nothing before 10:20
        "i4": (2.0, 1.0, 1.0, 1.0, 1.0, 0.5),  # u1 in [10:00, 11:00): i1, i2, c1; its own c5 at 11:00 is not before
        "i5": (1.0, 1.0, 3.0, 3.0, 3.0, 2 / 3),  # u2: i3, c3
        "i6": nothing,  # u3 is new
    }
    assert window_rows(with_features, "item", "1h") == {
        "i1": nothing,
        "i2": nothing,  # B had nothing before
        "i3": (1.0, 0.0, 1.0, 0.0, -1.0, 1 / 3),  # A: i1
        "i4": (2.0, 2.0, 1.0, 4.0, 3.0, 0.75),  # A in [10:00, 11:00): i1, i3, c1, c3
        "i5": (1.0, 0.0, 2.0, 0.0, -1.0, 1 / 3),  # B: i2 (c2 was never attributed); i4 at 11:00 is not before
        "i6": (1.0, 1.0, 1.0, 1.0, 1.0, 2 / 3),  # A in [11:00, 12:00): i4, c5
    }
    two_hours = window_rows(with_features, "item", "2h")
    assert two_hours["i6"] == (3.0, 3.0, 1.0, 5.0, 3.0, 0.8)  # A in [10:00, 12:00): i1, i3, i4, c1, c3, c5
    # Nothing happened before 10:00, so every other 2 h window equals its 1 h one.
    one_hour = window_rows(with_features, "item", "1h")
    assert {k: v for k, v in two_hours.items() if k != "i6"} == {k: v for k, v in one_hour.items() if k != "i6"}


def test_own_click_same_instant_and_later_events_never_leak(spark: SparkSession) -> None:
    """An impression's features see only events strictly before it: not its own click (even at
    the same instant), not another event at the same instant, not anything later."""
    impressions = impressions_frame(
        spark,
        [
            ("early", "09:59", "u9", "Z", "mobile", 4),
            ("x", "10:00", "u9", "Z", "mobile", 1),
            ("twin", "10:00", "u9", "Z", "mobile", 2),  # same user, item and instant as x
            ("y", "10:30", "u9", "Z", "mobile", 3),
            ("later", "10:45", "u9", "Z", "mobile", 1),
        ],
    )
    # cx at x's own instant; cy and ct (twin's click) at y's instant.
    clicks = clicks_frame(spark, [("cx", "x", "10:00"), ("cy", "y", "10:30"), ("ct", "twin", "10:30")])
    events = story_events(impressions, clicks)
    rows = window_rows(features.add_window_features(impressions, events, UNIT), "user", "2h")
    # x at 10:00 sees only "early" (09:59): not cx or twin at 10:00, nothing after.
    assert rows["x"] == (1.0, 0.0, 4.0, 0.0, -1.0, 1 / 3)
    assert rows["twin"] == rows["x"]
    # y at 10:30 sees early, x, twin and cx (10:00); not its own click cy nor twin's click ct,
    # both at 10:30, nor "later" at 10:45.
    assert rows["y"] == (3.0, 1.0, 1.0, 1.0, 1.0, 0.4)
    # later at 10:45 sees all four impressions before it and the three clicks.
    assert rows["later"] == (4.0, 3.0, 1.0, 6.0, 3.0, 4 / 6)


def test_features_of_past_rows_do_not_change_when_the_future_arrives(story: tuple[DataFrame, DataFrame]) -> None:
    """Point-in-time: cutting every event at or after 11:00 leaves earlier rows' features unchanged."""
    impressions, clicks = story
    cut = at("11:00")
    names = contract.model_inputs(UNIT).numeric

    def features_before(imps: DataFrame, clks: DataFrame) -> list[Row]:
        frame = features.add_window_features(imps, story_events(imps, clks), UNIT).where(F.col("event_time") < F.lit(cut))
        return sorted(tuple(r[c] for c in ("event_id", *names)) for r in frame.collect())

    full = features_before(impressions, clicks)
    past_only = features_before(
        impressions.where(F.col("event_time") < F.lit(cut)), clicks.where(F.col("event_time") < F.lit(cut))
    )
    assert [row[0] for row in full] == ["i1", "i2", "i3"]
    assert full == past_only


def test_model_input_columns_follow_the_declarations(story: tuple[DataFrame, DataFrame]) -> None:
    impressions, clicks = story
    frame = features.add_window_features(impressions, story_events(impressions, clicks), UNIT)
    inputs = contract.model_inputs(UNIT)
    selected = frame.select(*features.model_input_columns(inputs))
    assert selected.columns == list(inputs.names)
    assert inputs.names[:3] == ("user_impressions_1h", "user_impressions_2h", "user_clicks_1h")
    assert inputs.names[-2:] == ("position", "device")
    assert len(inputs.names) == 2 * len(STATISTICS) * 2 + 2  # entities x statistics x windows + context
    assert [t for _, t in selected.dtypes] == ["double"] * len(inputs.numeric) + ["string"]


# --------------------------------------------------------------------------- against a reference


def reference_window_features(
    impressions: list[Row], clicks: list[Row], declared: FeaturesConfig, at_time: datetime, key: dict[str, str]
) -> dict[str, float]:
    """Plain Python, straight from the definition: for each entity and window, the events with
    the entity's key and a time in [start of at_time's bucket - window, at_time)."""
    shown = {row[0]: row for row in impressions}  # deduplicated by event id
    fields = IMPRESSION.field_names
    events = [("impressions", dict(zip(fields, row))) for row in shown.values()]
    for click_id, impression_id, click_time in {row[0]: row for row in clicks}.values():
        if impression_id in shown:
            impression = dict(zip(fields, shown[impression_id]))
            if impression["event_time"] <= click_time <= impression["event_time"] + timedelta(minutes=WINDOW):
                events.append(("clicks", {**impression, "event_time": click_time}))
    width = int(declared.bucket_width.total_seconds())
    epoch_seconds = int((at_time - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds())
    current = at_time - timedelta(seconds=epoch_seconds % width, microseconds=at_time.microsecond)
    found: dict[str, float] = {}
    for entity_name, entity in declared.entities.items():
        for window in declared.windows:
            # The lifetime window "all": every event before at_time.
            start = datetime.min.replace(tzinfo=UTC) if window == "all" else current - parse_duration(window)
            inside = [
                (kind, e) for kind, e in events
                if all(e[k] == key[k] for k in entity.keys) and start <= e["event_time"] < at_time
            ]  # fmt: skip
            totals = {}
            for name, aggregate in declared.aggregates.items():
                values = [1 if aggregate.measure is None else e[aggregate.measure] for kind, e in inside if kind == aggregate.events]
                if aggregate.aggregation in ("count", "sum"):
                    totals[name] = float(sum(values))
                else:
                    pick = min if aggregate.aggregation == "min" else max
                    totals[name] = float(pick(values)) if values else aggregate.empty
                found[f"{entity_name}_{name}_{window}"] = totals[name]
            for name, ratio in declared.ratios.items():
                prior = ratio.prior_alpha + ratio.prior_beta
                value = (totals[ratio.numerator] + ratio.prior_alpha) / (totals[ratio.denominator] + prior)
                found[f"{entity_name}_{name}_{window}"] = value
    return found


OLD_EVENTS = 12


def random_events(seed: int = 5, n: int = 90) -> tuple[list[Row], list[Row]]:
    """Impressions on a 5-minute grid over 10 hours (ties and bucket edges are common), clicks at
    the same instant, inside, on and after the window's end; duplicates and an orphan click;
    and OLD_EVENTS impressions 8 to 30 days earlier, half clicked, which only the lifetime
    window sees."""
    rng = random.Random(seed)
    start = datetime(2026, 3, 1, 6, tzinfo=UTC)
    impressions, clicks = [], []
    for k in range(n):
        t = start + timedelta(minutes=5 * rng.randrange(120))
        row = (f"imp{k}", t, f"u{rng.randrange(3)}", f"i{rng.randrange(3)}", rng.choice(["mobile", "desktop"]), rng.randint(1, 5))
        impressions.append(row)
        if rng.random() < 0.5:
            delay = timedelta(minutes=rng.choice([0, 0, 5, 25, 30, 35, 90]))
            clicks.append((f"clk{k}", f"imp{k}", t + delay))
    old = random.Random(seed + 1)
    for k in range(OLD_EVENTS):
        t = start - timedelta(days=old.randint(8, 30), minutes=5 * old.randrange(120))
        impressions.append((f"old{k}", t, f"u{old.randrange(3)}", f"i{old.randrange(3)}", old.choice(["mobile", "desktop"]), 3))
        if k % 2:
            clicks.append((f"oldclk{k}", f"old{k}", t + timedelta(minutes=1)))
    impressions += impressions[:4]
    clicks += clicks[:3] + [("orphan", "imp-none", start + timedelta(hours=2))]
    return impressions, clicks


@pytest.fixture(scope="module")
def default_features() -> FeaturesConfig:
    return load_config(DEFAULT_CONFIG, env={}).features


@pytest.mark.parametrize("path", ["targets", "events"])
def test_training_features_equal_a_plain_python_reference(
    spark: SparkSession, default_features: FeaturesConfig, path: str
) -> None:
    """Every declared window feature of every impression (the shipped declarations: 1 h, 24 h,
    7 d and lifetime windows over user, item and user x device), against the definition computed directly:
    for impressions as separate targets, and as the feature events themselves (the training
    set's way, with the bucket rows given as the views)."""
    impressions, clicks = random_events()
    imps = features.dedup_events(impressions_frame(spark, impressions))
    clks = features.dedup_events(clicks_frame(spark, clicks))
    events = ctr_events.feature_events(imps, ctr_events.attribute_clicks(imps, clks, WINDOW), default_features)
    if path == "targets":
        frame = features.add_window_features(imps, events, default_features)
    else:
        views = {name: features.bucket_increments(events, e, default_features) for name, e in default_features.entities.items()}
        frame = features.event_window_features(events, default_features, views).where(F.col(features.KIND) == "impressions")
    # Through epoch microseconds: collected timestamps are naive, in the driver's time zone.
    computed = frame.withColumn("micros", F.unix_micros("event_time")).collect()
    names = contract.model_inputs(default_features).numeric[:-1]  # all but position
    assert len(computed) == 90 + OLD_EVENTS and len(names) == 48
    nonzero = older = 0
    for row in computed:
        key = {"user_id": row.user_id, "item_id": row.item_id, "device": row.device}
        expected = reference_window_features(impressions, clicks, default_features, buckets.from_micros(row.micros), key)
        assert {name: row[name] for name in names} == expected, row.event_id
        nonzero += expected["user_device_clicks_1h"] > 0
        older += expected["item_clicks_all"] > expected["item_clicks_7d"]
    assert nonzero > 5  # the data exercise the short windows, not only empty ones
    assert older > 50  # and the lifetime window sees what the 7 d one does not


def test_serving_windows_over_bucket_rows_equal_the_reference(spark: SparkSession, default_features: FeaturesConfig) -> None:
    """What serving computes in plain Python from stored bucket rows (lambda_ml.buckets) is the
    definition too, for scoring times inside a bucket after the events the rows hold."""
    impressions, clicks = random_events(seed=8)
    imps = features.dedup_events(impressions_frame(spark, impressions))
    clks = features.dedup_events(clicks_frame(spark, clicks))
    events = ctr_events.feature_events(imps, ctr_events.attribute_clicks(imps, clks, WINDOW), default_features)
    keys = [{"user_id": u, "item_id": i, "device": d} for u in ("u0", "u1", "u2", "nobody") for i in ("i0", "i2") for d in ("mobile", "desktop")]
    statistics = [*default_features.aggregates, *default_features.ratios]
    own_names = {
        name: [contract.window_feature_name(name, s, w) for s in statistics for w in default_features.windows]
        for name in default_features.entities
    }
    checked = lifetime = 0
    for cut in (datetime(2026, 3, 1, 9, tzinfo=UTC), datetime(2026, 3, 1, 13, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC)):
        before = events.where(F.col("event_time") < F.lit(cut))
        scoring_time = cut + timedelta(minutes=41)  # nothing happens between the cut and the scoring time
        kept_impressions = [r for r in impressions if r[1] < cut]
        kept_clicks = [r for r in clicks if r[2] < cut]
        for name, entity in default_features.entities.items():
            stored: dict[tuple[str, ...], list[Any]] = {}
            increments = features.bucket_increments(before, entity, default_features)
            for r in increments.withColumn("micros", F.unix_micros("bucket_start")).orderBy("micros").collect():
                stored.setdefault(tuple(r[k] for k in entity.keys), []).append(r)
            for key in keys:
                rows = stored.get(tuple(key[k] for k in entity.keys), [])
                entity_buckets = buckets.EntityBuckets(
                    tuple(r.micros for r in rows),
                    {a: tuple(r[a] for r in rows) for a in default_features.aggregates},
                )
                served = buckets.window_features(default_features, name, entity_buckets, scoring_time)
                expected = reference_window_features(kept_impressions, kept_clicks, default_features, scoring_time, key)
                assert served == {k: expected[k] for k in own_names[name]}
                checked += any(v > 0 for k, v in served.items() if "_clicks_" in k)
                lifetime += served[f"{name}_impressions_all"] > served[f"{name}_impressions_7d"]
    assert checked > 10 and lifetime > 10


# --------------------------------------------------------------------------- declarations


def test_the_shipped_declarations_load() -> None:
    declared = load_config(DEFAULT_CONFIG, env={}).features
    assert declared.bucket_width == timedelta(hours=1)
    assert declared.windows == ("1h", "24h", "7d", "all")
    assert [parse_duration(w) for w in declared.windows[:-1]] == [timedelta(hours=1), timedelta(hours=24), timedelta(days=7)]
    inputs = contract.model_inputs(declared)
    assert inputs.categorical == ("device",) and inputs.numeric[-1] == "position"
    assert {"user_clicks_24h", "item_ctr_7d", "user_device_impressions_1h"} <= set(inputs.numeric)
    assert declared.carried_fields == ("user_id", "item_id", "device", "position")


def _load_with(**declarations: Any) -> PlatformConfig:
    overrides = {f"features.{key}": value for key, value in declarations.items()}
    return load_config(DEFAULT_CONFIG, env={}, overrides=overrides)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"bucket": "1 hour"}, r"features\.bucket: .*'1 hour' is not a duration"),
        ({"windows": ["1h", "90m"]}, r"features\.windows: .*window 90m is not a whole number of 1h buckets"),
        ({"windows": ["24h", "1d"]}, r"features\.windows: .*window 1d repeats the length"),
        ({"windows": []}, r"features\.windows: .*at least 1"),
        ({"windows": ["1h", "all", "all"]}, r"features\.windows: .*window all is declared twice"),
        ({"windows": ["1h", "ever"]}, r"features\.windows\.1: .*'ever' is neither a duration such as 30m, 1h or 7d nor all"),
        ({"aggregates": {"n": {"events": "impressions", "aggregation": "avg"}}}, r"features\.aggregates\.n\.aggregation: "),
        ({"aggregates": {"n": {"events": "views", "aggregation": "count"}}, "ratios": {}},
         r"features\.aggregates\.n\.events: 'views' is not a declared event type \(impressions, clicks\)"),
        (
            {"aggregates": {"n": {"events": "impressions", "aggregation": "count", "measure": "position"}}},
            r"features\.aggregates\.n: .*a count has no measure",
        ),
        ({"aggregates": {"n": {"events": "clicks", "aggregation": "sum"}}}, r"features\.aggregates\.n: .*a sum needs a measure"),
        (
            {"aggregates": {"n": {"events": "clicks", "aggregation": "max", "measure": "device"}}, "ratios": {}},
            r"platform\.yaml: features\.aggregates\.n\.measure: 'device' is not one of the impressions fields position",
        ),
        ({"aggregates": {"n": {"events": "clicks", "aggregation": "count", "colour": 1}}}, r"features\.aggregates\.n\.colour: unknown key"),
        (
            {"ratios": {"ctr": {"numerator": "clickz", "denominator": "impressions", "prior_alpha": 1, "prior_beta": 1}}},
            r"features\.ratios: .*ctr\.numerator: 'clickz' is not a declared aggregate",
        ),
        (
            {"ratios": {"r": {"numerator": "top_position", "denominator": "impressions", "prior_alpha": 1, "prior_beta": 1}}},
            r"features\.ratios: .*r\.numerator: 'top_position' is a min; ratios divide counts or sums",
        ),
        (
            {"ratios": {"ctr": {"numerator": "clicks", "denominator": "impressions", "prior_alpha": 0, "prior_beta": 0}}},
            r"features\.ratios\.ctr: .*prior_alpha \+ prior_beta must be positive",
        ),
        ({"entities": {"user": {"keys": ["user"]}}}, r"platform\.yaml: features\.entities\.user\.keys: 'user' is not one of the impressions fields"),
        ({"entities": {"User": {"keys": ["user_id"]}}}, r"features\.entities: .*'User' is not a lower-case identifier"),
        (
            {"entities": {"user": {"keys": ["user_id"]}, "user_top": {"keys": ["user_id"]}},
             "aggregates": {"top_impressions": {"events": "impressions", "aggregation": "count"},
                            "impressions": {"events": "impressions", "aggregation": "count"}},
             "ratios": {}},
            r"feature names \['user_top_impressions_1h'.* are derived twice",
        ),
        ({"context": {"numeric": ["event_time"]}}, r"context\.numeric: 'event_time' is not one of the impressions fields"),
    ],
)  # fmt: skip
def test_bad_declarations_fail_naming_the_file_and_key(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        _load_with(**override)
    assert str(error.value).startswith(str(DEFAULT_CONFIG))


def test_definitions_hash_changes_with_the_declarations(default_features: FeaturesConfig) -> None:
    changed = default_features.model_copy(update={"windows": ("1h", "24h")})
    assert features.definitions_hash(default_features) == features.definitions_hash(default_features)
    assert features.definitions_hash(changed) != features.definitions_hash(default_features)


@pytest.fixture(autouse=True)
def _no_leftover_streams(spark: SparkSession) -> Iterator[None]:
    yield
    for query in spark.streams.active:
        query.stop()


def test_buckets_are_aligned_on_the_epoch() -> None:
    width = timedelta(hours=1)
    assert buckets.bucket_start(at("10:00"), width) == at("10:00")
    assert buckets.bucket_start(at("10:59", 59), width) == at("10:00")
    assert buckets.bucket_start(datetime(2026, 1, 1, 10, 7, tzinfo=UTC), timedelta(minutes=15)) == at("10:00")
    assert math.isclose(buckets.ratio(1, 3, 1, 1), 0.4)


def test_bucket_values_combine_per_aggregation_with_missing_values_left_out() -> None:
    rng = random.Random(11)
    for _ in range(500):
        values = tuple(
            rng.choice([None, rng.randint(0, 50), round(rng.uniform(-5, 5), 3)]) for _ in range(rng.randint(0, 6))
        )
        present = [float(v) for v in values if v is not None]
        expected = {
            "count": math.fsum(present), "sum": math.fsum(present),
            "min": min(present) if present else None, "max": max(present) if present else None,
        }  # fmt: skip
        for aggregation, want in expected.items():
            got = buckets.COMBINE_SEQUENCE[aggregation](values)
            assert got == pytest.approx(want, abs=1e-9) if want is not None else got is None, (aggregation, values)
            assert got == buckets.combine(aggregation, values), (aggregation, values)
            assert got is None or type(got) is float

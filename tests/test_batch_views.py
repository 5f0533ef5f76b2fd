"""Batch views on real Delta tables: one table per declared entity, a row per (keys, bucket)
with the horizon; idempotent for a horizon; and monoids: the views at horizon v merged with the
bucket increments of the events after v equal the views recomputed at the later horizon, exactly.

Bronze is written in two commits (2026-01-01, UTC, 1 h buckets, 30 min attribution):

    commit 1 (version 0)                          commit 2 (version 1)
    a u1 i1 mobile  2 10:05   ka -> a 10:15       z u2 i2 tablet 4 10:30  (late: kx of commit 1 is its click)
    b u1 i2 desktop 1 10:20   kx -> z 10:40       d u1 i1 mobile 1 10:50  (joins a and b's 10:00 bucket)
    c u2 i1 mobile  3 11:10                       e u3 i1 mobile 5 12:00
                                                  a again (redelivered)   kd -> d 10:55, kc -> c 11:20, ka again
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pytest
from pyspark.sql import DataFrame, Row, SparkSession
from pyspark.sql import functions as F

from batch_layer.snapshot import read_snapshot
from batch_layer.views import build_views, write_views
from lambda_ml import contract, features
from lambda_ml_apps.ctr import events as ctr_events
from lambda_ml.buckets import EntityBuckets, merge_entity_buckets, window_features
from lambda_ml.config import PlatformConfig
from support import CLICK, IMPRESSION
from support import isolated

WINDOW = 30


def at(hhmm: str) -> datetime:
    hour, minute = (int(part) for part in hhmm.split(":"))
    return datetime(2026, 1, 1, hour, minute, tzinfo=UTC)


def bronze(spark: SparkSession, event: Any, rows: list[tuple[Any, ...]], first_offset: int) -> DataFrame:
    time_index = event.field_names.index("event_time")
    data = [
        (*row, event.name, 0, first_offset + k, row[time_index], datetime(2026, 1, 2, tzinfo=UTC))
        for k, row in enumerate(rows)
    ]
    return spark.createDataFrame(data, event.bronze_schema())


COMMITS = [
    (
        [
            ("a", at("10:05"), "u1", "i1", "mobile", 2),
            ("b", at("10:20"), "u1", "i2", "desktop", 1),
            ("c", at("11:10"), "u2", "i1", "mobile", 3),
        ],
        [("ka", "a", at("10:15")), ("kx", "z", at("10:40"))],
    ),
    (
        [
            ("z", at("10:30"), "u2", "i2", "tablet", 4),
            ("d", at("10:50"), "u1", "i1", "mobile", 1),
            ("e", at("12:00"), "u3", "i1", "mobile", 5),
            ("a", at("10:05"), "u1", "i1", "mobile", 2),
        ],
        [("kd", "d", at("10:55")), ("kc", "c", at("11:20")), ("ka", "a", at("10:15"))],
    ),
]


@pytest.fixture(scope="module")
def lake(spark: SparkSession, cfg: PlatformConfig, tmp_path_factory: pytest.TempPathFactory) -> PlatformConfig:
    """Bronze impressions and clicks at versions 0 and 1, in this module's own lake."""
    lake_cfg = isolated(cfg, "ctr-views-test", lake_root=tmp_path_factory.mktemp("views") / "lake")
    offsets = {"impressions": 0, "clicks": 0}
    for impressions, clicks in COMMITS:
        for event, rows in ((IMPRESSION, impressions), (CLICK, clicks)):
            frame = bronze(spark, event, rows, offsets[event.name])
            frame.write.format("delta").mode("append").save(lake_cfg.lake.table("bronze", event.name))
            offsets[event.name] += len(rows)
    return lake_cfg


def events_at(spark: SparkSession, cfg: PlatformConfig, version: int) -> DataFrame:
    snapshot = read_snapshot(spark, cfg, {"impressions": version, "clicks": version})
    impressions, clicks = features.dedup_events(snapshot["impressions"]), features.dedup_events(snapshot["clicks"])
    return ctr_events.feature_events(impressions, ctr_events.attribute_clicks(impressions, clicks, WINDOW), cfg.features)


def publish(spark: SparkSession, cfg: PlatformConfig, version: int) -> dict[str, DataFrame]:
    """Write the views of bronze version ``version`` and read them back from Delta."""
    snapshot = read_snapshot(spark, cfg, {"impressions": version, "clicks": version})
    paths = write_views(build_views(events_at(spark, cfg, version), cfg.features, snapshot.horizon), cfg)
    return {entity: spark.read.format("delta").load(path) for entity, path in paths.items()}


def rows(frame: DataFrame, cfg: PlatformConfig, entity: str) -> list[tuple[Any, ...]]:
    """Sorted (keys..., bucket start as HH:MM, aggregates...) rows."""
    keys = cfg.features.entities[entity].keys
    selected = frame.select(*keys, F.date_format("bucket_start", "HH:mm"), *cfg.features.aggregates)
    return sorted(tuple(r) for r in selected.collect())


@dataclass(frozen=True)
class Published:
    """What a batch run's views hold once written to Delta and read back."""

    rows: dict[str, list[tuple[Any, ...]]]  # entity -> rows (see rows())
    columns: dict[str, list[str]]
    horizons: dict[str, set[tuple[int, int]]]


def read_back(views: dict[str, DataFrame], cfg: PlatformConfig) -> Published:
    horizon_columns = list((contract.view_horizon_column(e) for e in ("clicks", "impressions")))
    return Published(
        rows={entity: rows(view, cfg, entity) for entity, view in views.items()},
        columns={entity: view.columns for entity, view in views.items()},
        horizons={entity: {tuple(r) for r in view.select(*horizon_columns).distinct().collect()} for entity, view in views.items()},
    )


@pytest.fixture(scope="module")
def at_v1(spark: SparkSession, lake: PlatformConfig) -> Published:
    """The views of bronze version 1 (collected: later tests overwrite the tables)."""
    return read_back(publish(spark, lake, 1), lake)


def test_views_per_entity_and_bucket_with_the_horizon(lake: PlatformConfig, at_v1: Published) -> None:
    assert set(at_v1.rows) == set(lake.features.entities) == {"user", "item", "user_device"}
    assert at_v1.columns["user"] == [
        "user_id", "bucket_start", "impressions", "clicks", "top_position", "horizon_clicks", "horizon_impressions",
    ]  # fmt: skip
    # (user, bucket, impressions, attributed clicks, top position): by hand from the story above.
    assert at_v1.rows["user"] == [
        ("u1", "10:00", 3, 2, 1.0),  # a, b, d; ka, kd (the resent a and ka count once)
        ("u2", "10:00", 1, 1, 4.0),  # z; kx, attributed now that z has arrived
        ("u2", "11:00", 1, 1, 3.0),  # c; kc
        ("u3", "12:00", 1, 0, 5.0),  # e
    ]
    assert at_v1.rows["user_device"] == [
        ("u1", "desktop", "10:00", 1, 0, 1.0),
        ("u1", "mobile", "10:00", 2, 2, 1.0),
        ("u2", "mobile", "11:00", 1, 1, 3.0),
        ("u2", "tablet", "10:00", 1, 1, 4.0),
        ("u3", "mobile", "12:00", 1, 0, 5.0),
    ]
    assert at_v1.horizons == {entity: {(1, 1)} for entity in lake.features.entities}


def test_writing_a_horizon_twice_gives_the_same_table(spark: SparkSession, lake: PlatformConfig, at_v1: Published) -> None:
    again = publish(spark, lake, 1)
    for entity, view in again.items():
        assert rows(view, lake, entity) == at_v1.rows[entity]
        keys = [*lake.features.entities[entity].keys, "bucket_start"]
        assert view.count() == view.select(*keys).distinct().count() == len(at_v1.rows[entity])  # no duplicates


def test_views_at_v_merged_with_later_increments_equal_the_views_at_the_later_version(
    spark: SparkSession, lake: PlatformConfig, at_v1: Published
) -> None:
    """batch_view(v0) ⊕ increments(events after v0) == batch_view(v1), on every entity's table.

    The events after v0 are those of v1 that v0 did not have (an anti-join on kind and id): the
    new impressions, and the clicks newly attributed, including kx, which was in v0 but whose
    impression only arrived in v1."""
    at_v0 = publish(spark, lake, 0)
    after = events_at(spark, lake, 1).join(events_at(spark, lake, 0), ["kind", "event_id"], "left_anti")
    assert sorted((r.kind, r.event_id) for r in after.collect()) == [
        ("clicks", "kc"), ("clicks", "kd"), ("clicks", "kx"),
        ("impressions", "d"), ("impressions", "e"), ("impressions", "z"),
    ]  # fmt: skip
    expected_v0_user = [("u1", "10:00", 2, 1, 1.0), ("u2", "11:00", 1, 0, 3.0)]
    assert rows(at_v0["user"], lake, "user") == expected_v0_user
    for entity, declared in lake.features.entities.items():
        increments = features.bucket_increments(after, declared, lake.features)
        merged = features.merge_buckets([at_v0[entity], increments], declared, lake.features)
        assert rows(merged, lake, entity) == at_v1.rows[entity], entity
    # The identity is not trivial: the 10:00 bucket of u1 is in both parts and adds up.
    assert ("u1", "10:00", 3, 2, 1.0) in at_v1.rows["user"] and at_v1.rows["user"] != expected_v0_user


def lifetime_reference(entity_keys: tuple[str, ...], key: tuple[str, ...], t: datetime, cfg: PlatformConfig) -> dict[str, float]:
    """The entity's lifetime aggregates and ratios at ``t`` in pandas, from the story's rows as
    sent (both commits): deduplicated, clicks attributed within the window, events before ``t``."""
    fields = list(IMPRESSION.field_names)
    shown = pd.DataFrame([r for imps, _ in COMMITS for r in imps], columns=fields).drop_duplicates("event_id")
    clicks = pd.DataFrame([r for _, clks in COMMITS for r in clks], columns=["click_id", "impression_id", "click_time"])
    clicks = clicks.drop_duplicates("click_id").merge(shown, left_on="impression_id", right_on="event_id")
    clicks = clicks[(clicks.click_time >= clicks.event_time) & (clicks.click_time <= clicks.event_time + pd.Timedelta(minutes=WINDOW))]
    mine_shown = shown[(shown[list(entity_keys)].apply(tuple, axis=1) == key) & (shown.event_time < t)]
    mine_clicks = clicks[(clicks[list(entity_keys)].apply(tuple, axis=1) == key) & (clicks.click_time < t)]
    ratio = cfg.features.ratios["ctr"]
    n, c = float(len(mine_shown)), float(len(mine_clicks))
    return {
        "impressions": n,
        "clicks": c,
        "top_position": float(mine_shown.position.min()) if n else cfg.features.aggregates["top_position"].empty,
        "ctr": (c + ratio.prior_alpha) / (n + ratio.prior_alpha + ratio.prior_beta),
    }


def test_lifetime_features_of_merged_views_equal_the_later_views_and_pandas(spark: SparkSession, lake: PlatformConfig) -> None:
    """The lifetime window over batch_view(v0) ⊕ increments(after v0) equals it over
    batch_view(v1), in Spark (training sets, the online model) and in serving's plain Python,
    and both equal pandas on the raw rows; on 9 January the 7 d window is empty and the
    lifetime one still holds the whole story."""
    declared = lake.features
    assert "all" in declared.windows
    v0, v1 = events_at(spark, lake, 0), events_at(spark, lake, 1)
    after = v1.join(v0, ["kind", "event_id"], "left_anti")
    times = [at("10:45"), at("11:15"), at("12:30"), datetime(2026, 1, 9, 12, tzinfo=UTC)]
    users = ["u1", "u2", "u3", "nobody"]
    targets = spark.createDataFrame(
        [(f"t{n}", t, u, "i1", "mobile", 1) for n, (t, u) in enumerate((t, u) for t in times for u in users)],
        "event_id string, event_time timestamp, user_id string, item_id string, device string, position int",
    )
    merged, later = {}, {}
    for entity, spec in declared.entities.items():
        increments = features.bucket_increments(after, spec, declared)
        merged[entity] = features.merge_buckets([features.bucket_increments(v0, spec, declared), increments], spec, declared)
        later[entity] = features.bucket_increments(v1, spec, declared)
    names = [contract.window_feature_name(e, s, "all") for e in declared.entities for s in [*declared.aggregates, *declared.ratios]]

    def lifetime(bucket_rows: dict[str, DataFrame]) -> dict[str, dict[str, float]]:
        frame = features.add_window_features(targets, v1, declared, bucket_rows)
        return {r.event_id: {n: r[n] for n in names} for r in frame.collect()}

    from_merged, from_later = lifetime(merged), lifetime(later)
    aggregations = {name: a.aggregation for name, a in declared.aggregates.items()}
    rows_of = {  # each entity's bucket rows of the view at v0 and of the increments after it, collected
        entity: {
            part: features.bucket_increments(frame, spec, declared).withColumn("micros", F.unix_micros("bucket_start")).collect()
            for part, frame in (("v0", v0), ("after", after))
        }
        for entity, spec in declared.entities.items()
    }
    assert from_merged == from_later
    by_id = {f"t{n}": (t, u) for n, (t, u) in enumerate((t, u) for t in times for u in users)}
    for event_id, (t, user) in by_id.items():
        row = {"user_id": user, "item_id": "i1", "device": "mobile"}
        expected = {}
        for entity, spec in declared.entities.items():
            values = lifetime_reference(spec.keys, tuple(row[k] for k in spec.keys), t, lake)
            expected.update({contract.window_feature_name(entity, s, "all"): v for s, v in values.items()})
        assert from_merged[event_id] == expected, (t, user)
        if t < at("12:30"):
            continue  # serving reads a current bucket whole: only once no event in it is after t
        # Serving: the same merge and windows in plain Python, from the collected bucket rows.
        for entity, spec in declared.entities.items():
            key = tuple(row[k] for k in spec.keys)
            parts = [entity_buckets(rows_of[entity][part], spec.keys, key, declared) for part in ("v0", "after")]
            served = window_features(declared, entity, merge_entity_buckets(parts, aggregations), t)
            lifetime_served = {k: v for k, v in served.items() if k.endswith("_all")}
            assert lifetime_served == {k: expected[k] for k in lifetime_served}, (entity, t, user)
    late = from_merged["t12"]  # u1 on 9 January: all of the story, none of it in 7 d
    assert late["user_impressions_all"] == 3 and late["user_clicks_all"] == 2


def entity_buckets(rows: list[Row], keys: tuple[str, ...], key: tuple[str, ...], declared: Any) -> EntityBuckets:
    """One key's bucket rows (collected, with ``micros``) as serving holds them."""
    mine = sorted((r for r in rows if tuple(r[k] for k in keys) == key), key=lambda r: r.micros)
    return EntityBuckets(tuple(r.micros for r in mine), {a: tuple(r[a] for r in mine) for a in declared.aggregates})

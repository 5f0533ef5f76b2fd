"""Serving layer: pure functions (request -> model inputs, views, error bodies), the HTTP API on
a small hand-built ONNX graph, and (integration) the real service on a model and views that
the real batch job produced from a seeded bronze dataset."""

from __future__ import annotations

import doctest
import importlib
import json
import logging
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hypothesis
import numpy as np
import pyarrow as pa  # before deltalake, see serving_layer.views
import pytest
import schemathesis
from deltalake import write_deltalake
from fastapi.testclient import TestClient
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from lambda_ml import contract
from lambda_ml.buckets import EntityBuckets, to_micros, window_features
from lambda_ml.config import DEFAULT_CONFIG, PROJECT_ROOT, ConfigError, PlatformConfig, load_config, parse_duration
from lambda_ml.contract import Horizon, ModelInputs
from lambda_ml_apps.ctr.answers import AnswerWriter, Scored, predict_response
from lambda_ml_apps.ctr.api_models import REQUEST_KINDS, PredictRow
from serving_layer.app import create_app
from serving_layer.http_api import format_validation_errors, max_body_bytes
from lambda_ml_apps.ctr.predict import score_rows
from lambda_ml_apps.ctr.model_inputs import build_model_inputs, lookup_features
from serving_layer.dependencies import DependencyStatus, KafkaProbe
from serving_layer.model_store import (
    ModelLoadError,
    ModelStore,
    RegistryUnavailable,
    ServedModels,
    VersionInfo,
    check_registry_reachable,
)
from lambda_ml_apps.ctr.serving_model import CtrServingModel, quality_score, check_session, find_onnx_file, open_onnx_session, open_serving_session
from lambda_ml_apps.ctr.policies import PolicyRunner
from serving_layer.reloadable import NotReadyError, Reloadable
from serving_layer.updates import ModelUpdateListener
from serving_layer.views import (
    BatchViews,
    BucketView,
    Increments,
    ViewStore,
    ViewLoadError,
    bucket_view_from_arrow,
    load_batch_views,
    read_bucket_view,
)
from support import isolated

SERVING_MODULES = [
    "lambda_ml.partial_buckets",
    "lambda_ml_apps.ctr.ab",
    "lambda_ml_apps.ctr.answers",
    "serving_layer.app",
    "serving_layer.dependencies",
    "serving_layer.http_api",
    "serving_layer.api_models",
    "lambda_ml_apps.ctr.model_inputs",
    "serving_layer.metrics",
    "serving_layer.model_store",
    "lambda_ml_apps.ctr.policies",
    "serving_layer.prediction_log",
    "serving_layer.reloadable",
    "serving_layer.updates",
    "serving_layer.views",
]

# --------------------------------------------------------------------------- a toy model
# A logistic model written directly in ONNX over a few of the declared features, so the API can
# be tested without MLflow and its answers checked against a formula. The service computes
# every declared feature; the model reads only the ones it was built with.

TOY_WEIGHTS = {
    "user_impressions_24h": 0.01,
    "user_clicks_24h": 0.2,
    "item_ctr_7d": 3.0,
    "user_device_clicks_1h": 0.5,
    "position": -0.3,
}
TOY_DEVICE_WEIGHTS = {"mobile": 0.3, "desktop": -0.2, "tablet": 0.1}
TOY_UNKNOWN_DEVICE = -0.5
TOY_BIAS = -1.0
TOY_INPUTS = ModelInputs(tuple(TOY_WEIGHTS), ("device",))


def toy_onnx_bytes(input_names: tuple[str, ...] = TOY_INPUTS.numeric, bias: float = TOY_BIAS) -> bytes:
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 1]) for n in input_names]
    inputs.append(helper.make_tensor_value_info("device", TensorProto.STRING, [None, 1]))
    weights = np.array([[TOY_WEIGHTS.get(n, 0.0)] for n in input_names], dtype=np.float32)
    nodes = [
        helper.make_node(
            "LabelEncoder", ["device"], ["device_w"], domain="ai.onnx.ml",
            keys_strings=list(TOY_DEVICE_WEIGHTS), values_floats=list(TOY_DEVICE_WEIGHTS.values()),
            default_float=TOY_UNKNOWN_DEVICE,
        ),
        helper.make_node("Concat", list(input_names), ["x"], axis=1),
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "device_w"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p"]),
        helper.make_node("Sub", ["one", "p"], ["q"]),
        helper.make_node("Concat", ["q", "p"], [contract.ONNX_PROBABILITY_OUTPUT], axis=1),
    ]  # fmt: skip
    initializers = [
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(np.array([[bias]], np.float32), "b"),
        numpy_helper.from_array(np.array([[1.0]], np.float32), "one"),
    ]
    output = helper.make_tensor_value_info(contract.ONNX_PROBABILITY_OUTPUT, TensorProto.FLOAT, [None, 2])
    graph = helper.make_graph(nodes, "toy_ctr", inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def int_input_onnx_bytes() -> bytes:
    """A graph taking an int64 tensor, which no declared feature is."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["user_clicks_24h"], [contract.ONNX_PROBABILITY_OUTPUT], to=TensorProto.FLOAT)],
        "int_input",
        [helper.make_tensor_value_info("user_clicks_24h", TensorProto.INT64, [None, 1])],
        [helper.make_tensor_value_info(contract.ONNX_PROBABILITY_OUTPUT, TensorProto.FLOAT, [None, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def toy_probability(features: dict[str, Any], bias: float = TOY_BIAS) -> float:
    z = bias + sum(w * features[name] for name, w in TOY_WEIGHTS.items())
    z += TOY_DEVICE_WEIGHTS.get(features["device"], TOY_UNKNOWN_DEVICE)
    return 1 / (1 + math.exp(-z))


# Toy views at NOW (the shipped declarations: 1 h buckets; 1 h, 24 h and 7 d windows; CTR prior
# 1 click in 21 impressions). A window W at NOW covers the buckets starting in [10:00 - W, 10:00].
NOW = datetime(2026, 11, 22, 10, 30, tzinfo=UTC)
HORIZON = Horizon.of(impressions=5, clicks=4)


def hours_before(hours: int) -> int:
    """Start of the bucket ``hours`` before NOW's, in epoch microseconds."""
    return to_micros(datetime(2026, 11, 22, 10, tzinfo=UTC) - timedelta(hours=hours))


# key -> [(bucket hours before NOW's, impressions, clicks, top position or None)]
TOY_BUCKETS: dict[str, dict[tuple[str, ...], list[tuple[int, int, int, float | None]]]] = {
    "user": {
        ("u1",): [
            (24 * 7 + 1, 100, 50, 1.0),  # before every window
            (24 * 7, 4, 4, 1.0),  # the first bucket of the 7 d window
            (25, 1, 0, 3.0),  # in 7 d only
            (24, 7, 2, 1.0),  # the first bucket of the 24 h window
            (1, 3, 0, 2.0),  # the first bucket of the 1 h window
            (0, 2, 1, 1.0),  # the current bucket
        ],
        ("u2",): [(3, 40, 1, 3.0)],
    },
    "item": {("i1",): [(2, 100, 5, 1.0)], ("i2",): [(30, 7, 0, 4.0)]},
    "user_device": {("u1", "mobile"): [(0, 1, 1, 1.0)], ("u1", "desktop"): [(0, 1, 0, 2.0)]},
}
KEYS = {"user": ("user_id",), "item": ("item_id",), "user_device": ("user_id", "device")}
# The toy model's features of some (user, item, device), worked out by hand from TOY_BUCKETS.
U1_I1_MOBILE = {
    "user_impressions_24h": 12.0,  # 7 + 3 + 2
    "user_clicks_24h": 3.0,  # 2 + 0 + 1
    "item_ctr_7d": 6 / 121,  # (5 + 1) / (100 + 21)
    "user_device_clicks_1h": 1.0,
}
U2_I2_DESKTOP = {"user_impressions_24h": 40.0, "user_clicks_24h": 1.0, "item_ctr_7d": 1 / 28, "user_device_clicks_1h": 0.0}
STRANGER = {"user_impressions_24h": 0.0, "user_clicks_24h": 0.0, "item_ctr_7d": 1 / 21, "user_device_clicks_1h": 0.0}


def entity_buckets(rows: list[tuple[int, int, int, float | None]]) -> EntityBuckets:
    rows = sorted(rows, key=lambda r: -r[0])
    return EntityBuckets(
        tuple(hours_before(h) for h, *_ in rows),
        {
            "impressions": tuple(r[1] for r in rows),
            "clicks": tuple(r[2] for r in rows),
            "top_position": tuple(r[3] for r in rows),
        },
    )


def toy_model() -> CtrServingModel:
    return CtrServingModel("ctr", 3, "champion", "run-1", HORIZON, open_onnx_session(toy_onnx_bytes()), TOY_INPUTS)


def served(*models: CtrServingModel) -> ServedModels:
    """Loaded versions by alias, the first one's alias primary."""
    return ServedModels(models[0].alias, {m.alias: m for m in models})


def toy_views() -> BatchViews:
    return BatchViews(
        {
            entity: BucketView(entity, KEYS[entity], f"mem:{entity}", {k: entity_buckets(v) for k, v in by_key.items()}, HORIZON)
            for entity, by_key in TOY_BUCKETS.items()
        }
    )


def unit_cfg(**overrides: Any) -> PlatformConfig:
    return load_config(DEFAULT_CONFIG, env={}, overrides={"serving.max_rows": 5, "serving.prediction_log.enabled": False, **overrides})


@pytest.fixture()
def client() -> Iterator[TestClient]:
    app = create_app(
        unit_cfg(), models=Reloadable("models:/ctr@champion", lambda: served(toy_model())), views=Reloadable("views", toy_views), clock=lambda: NOW
    )
    with TestClient(app, base_url="http://localhost") as test_client:
        yield test_client


def row(**changes: Any) -> dict[str, Any]:
    return {"user_id": "u1", "item_id": "i1", "device": "mobile", "position": 2, **changes}


@dataclass
class Row:
    user_id: str
    item_id: str
    device: str
    position: int
    event_time: datetime | None = None


# --------------------------------------------------------------------------- pure functions


def test_every_declared_feature_is_computed_from_the_buckets() -> None:
    features = unit_cfg().features
    (found,) = lookup_features([Row("u1", "i1", "mobile", 2)], toy_views(), features, NOW)
    assert list(found) == list(contract.model_inputs(features).names)
    prior = 1 / 21
    assert {k: v for k, v in found.items() if k.startswith("user_") and not k.startswith("user_device_")} == {
        "user_impressions_1h": 5.0, "user_impressions_24h": 12.0, "user_impressions_7d": 17.0,
        "user_clicks_1h": 1.0, "user_clicks_24h": 3.0, "user_clicks_7d": 7.0,
        "user_top_position_1h": 1.0, "user_top_position_24h": 1.0, "user_top_position_7d": 1.0,
        "user_ctr_1h": 2 / 26, "user_ctr_24h": 4 / 33, "user_ctr_7d": 8 / 38,
        # Lifetime: every bucket, the one before the 7 d window too (100 + 4 + 1 + 7 + 3 + 2).
        "user_impressions_all": 117.0, "user_clicks_all": 57.0, "user_top_position_all": 1.0, "user_ctr_all": 58 / 138,
    }  # fmt: skip
    assert [found[f"item_{s}_24h"] for s in ("impressions", "clicks", "top_position", "ctr")] == [100.0, 5.0, 1.0, 6 / 121]
    assert [found[f"item_{s}_1h"] for s in ("impressions", "clicks", "top_position", "ctr")] == [0.0, 0.0, 0.0, prior]
    assert [found[f"user_device_{s}_1h"] for s in ("impressions", "clicks", "ctr")] == [1.0, 1.0, 2 / 22]
    assert (found["position"], found["device"]) == (2, "mobile")


def test_unknown_users_and_items_have_empty_windows() -> None:
    features = unit_cfg().features
    (found,) = lookup_features([Row("nobody", "nothing", "tablet", 3)], toy_views(), features, NOW)
    numeric = {k: v for k, v in found.items() if k not in ("position", "device")}
    # Counts are 0, the top position is its "empty" value 0, every CTR is the prior.
    assert numeric == {k: (1 / 21 if "_ctr_" in k else 0.0) for k in numeric}
    assert len(numeric) == 48  # 3 entities x 4 statistics x 4 windows


def test_a_row_can_be_scored_at_its_own_event_time() -> None:
    """At 10:30 yesterday the 24 h window covers the buckets from 10:00 the day before to 10:00
    yesterday: u1's 25 h and 24 h buckets, not today's."""
    features = unit_cfg().features
    yesterday = Row("u1", "i1", "mobile", 1, event_time=NOW - timedelta(days=1))
    (found,) = lookup_features([yesterday], toy_views(), features, NOW)
    assert (found["user_impressions_24h"], found["user_clicks_24h"], found["user_impressions_1h"]) == (8.0, 2.0, 8.0)
    assert found["item_impressions_7d"] == 0.0  # i1's only bucket is 2 h before NOW


def test_model_inputs_are_the_models_in_graph_order() -> None:
    rows = lookup_features([Row("u1", "i1", "mobile", 2), Row("u2", "i2", "fridge", 9)], toy_views(), unit_cfg().features, NOW)
    inputs = build_model_inputs(rows, TOY_INPUTS)
    assert list(inputs) == list(TOY_INPUTS.names)
    for name in TOY_INPUTS.numeric:
        assert inputs[name].dtype == np.float32 and inputs[name].shape == (2, 1), name
    assert inputs["device"].dtype == object and inputs["device"].ravel().tolist() == ["mobile", "fridge"]
    expected = {**{k: [U1_I1_MOBILE[k], U2_I2_DESKTOP[k]] for k in U1_I1_MOBILE}, "position": [2.0, 9.0]}
    assert {k: inputs[k].ravel().tolist() for k in TOY_INPUTS.numeric} == {
        k: np.asarray(v, dtype=np.float32).tolist() for k, v in expected.items()
    }


def test_model_inputs_need_a_row_and_declared_features() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        build_model_inputs([], TOY_INPUTS)
    with pytest.raises(RuntimeError, match=r"needs inputs \['user_age'\]"):
        build_model_inputs([{"position": 1, "device": "mobile"}], ModelInputs(("user_age", "position"), ("device",)))


def test_toy_model_scores_like_its_formula() -> None:
    features = [{**U1_I1_MOBILE, "position": 2, "device": "mobile"}, {**STRANGER, "position": 1, "device": "tv"}]
    expected = [toy_probability(f) for f in features]
    np.testing.assert_allclose(toy_model().predict(build_model_inputs(features, TOY_INPUTS)), expected, atol=1e-6)


def with_opset(graph: bytes, version: int) -> bytes:
    """The graph declaring another version of the default ONNX opset."""
    model = onnx.load_from_string(graph)
    for opset in model.opset_import:
        if opset.domain == "":
            opset.version = version
    return bytes(model.SerializeToString())


@pytest.mark.parametrize("opset", [11, 17])  # Split takes its sizes as an attribute before 13
def test_a_packed_graph_scores_exactly_like_the_graph_it_was_made_from(opset: int) -> None:
    graph = with_opset(toy_onnx_bytes(), opset)
    session, inputs, packed = open_serving_session(graph, "models:/ctr/3", unit_cfg().features)
    assert inputs == TOY_INPUTS and packed is not None
    # Two tensors to feed instead of six: the numbers in one, in the graph's input order.
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("numeric_features", [None, 5]), ("device", [None, 1])]
    rows = [
        {**U1_I1_MOBILE, "position": 2, "device": "mobile"},
        {**U2_I2_DESKTOP, "position": 9, "device": "desktop"},
        {**STRANGER, "position": 1, "device": "fridge"},
        {**STRANGER, "user_impressions_24h": 1234.5, "item_ctr_7d": 0.3, "position": 40, "device": "tablet"},
    ]
    model = CtrServingModel("ctr", 3, "champion", "run-1", HORIZON, session, inputs, packed=packed)
    (plain,) = open_onnx_session(graph).run([contract.ONNX_PROBABILITY_OUTPUT], build_model_inputs(rows, TOY_INPUTS))
    np.testing.assert_array_equal(model.predict_rows(rows), plain[:, 1].astype(np.float64))
    np.testing.assert_array_equal(model.predict(build_model_inputs(rows, TOY_INPUTS)), plain[:, 1].astype(np.float64))
    np.testing.assert_allclose(model.predict_rows(rows), [toy_probability(r) for r in rows], rtol=1e-6)
    # One row alone gets what it gets within the batch.
    assert model.predict_rows(rows[1:2])[0] == model.predict_rows(rows)[1]


def test_a_graph_with_one_numeric_input_is_served_as_it_is() -> None:
    session, inputs, packed = open_serving_session(toy_onnx_bytes(("position",)), "models:/ctr/3", unit_cfg().features)
    assert packed is None and [i.name for i in session.get_inputs()] == ["position", "device"]
    model = CtrServingModel("ctr", 3, "champion", "run-1", HORIZON, session, inputs)
    expected = 1 / (1 + math.exp(-(TOY_BIAS + TOY_WEIGHTS["position"] * 4 + TOY_DEVICE_WEIGHTS["tablet"])))
    assert model.predict_rows([{"position": 4, "device": "tablet"}])[0] == pytest.approx(expected, rel=1e-6)


def _view_table(key_columns: dict[str, list[str]], hours: list[int], **columns: list[Any]) -> pa.Table:
    starts = pa.array([hours_before(h) for h in hours], pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    return pa.table({**key_columns, "bucket_start": starts, **columns})


def test_view_from_arrow_groups_buckets_per_key_with_the_horizon() -> None:
    table = _view_table(
        {"user_id": ["a", "b", "a"], "device": ["mobile", "mobile", "mobile"]},
        [0, 3, 5],
        impressions=pa.array([2, 1, 4], pa.int64()),
        clicks=pa.array([1, 0, 0], pa.int64()),
        top_position=pa.array([1.0, None, 3.0]),
        horizon_impressions=pa.array([7, 7, 7], pa.int64()),
        horizon_clicks=pa.array([3, 3, 3], pa.int64()),
    )
    view = bucket_view_from_arrow("mem", table, "user_device", ["user_id", "device"], ["impressions", "clicks", "top_position"])
    assert view.horizon == Horizon.of(impressions=7, clicks=3) and len(view) == 2
    a = view.lookup(("a", "mobile"))
    assert a.starts == (hours_before(5), hours_before(0))  # ascending, whatever the table order
    assert a.values == {"impressions": (4, 2), "clicks": (0, 1), "top_position": (3.0, 1.0)}
    assert view.lookup(("b", "mobile")).values["top_position"] == (None,)
    assert view.lookup(("a", "desktop")).starts == ()


@pytest.mark.parametrize(
    ("hours", "columns", "message"),
    [
        ([1, 1], {"impressions": [1, 2], "clicks": [0, 0], "top_position": [1.0, 1.0]}, "more than one row for"),
        ([1], {"impressions": [1], "top_position": [1.0]}, "lacks column"),
        (
            [1, 2],
            {"impressions": [1, 1], "clicks": [0, 0], "top_position": [1.0, 1.0], "horizon_impressions": [1, 2]},
            "mixes horizons",
        ),
    ],
)
def test_bad_view_tables_are_refused(hours: list[int], columns: dict[str, list[Any]], message: str) -> None:
    table = _view_table({"user_id": ["a"] * len(hours)}, hours, **columns)
    with pytest.raises(ViewLoadError, match=message):
        bucket_view_from_arrow("mem", table, "user", ["user_id"], ["impressions", "clicks", "top_position"])


def _write_views(cfg: PlatformConfig, horizons: dict[str, tuple[int, int]]) -> None:
    for entity, by_key in TOY_BUCKETS.items():
        flat = [(key, bucket) for key, buckets in by_key.items() for bucket in buckets]
        keys = {name: [key[i] for key, _ in flat] for i, name in enumerate(KEYS[entity])}
        table = _view_table(
            keys,
            [b[0] for _, b in flat],
            impressions=pa.array([b[1] for _, b in flat], pa.int64()),
            clicks=pa.array([b[2] for _, b in flat], pa.int64()),
            top_position=pa.array([b[3] for _, b in flat], pa.float64()),
            horizon_impressions=pa.array([horizons[entity][0]] * len(flat), pa.int64()),
            horizon_clicks=pa.array([horizons[entity][1]] * len(flat), pa.int64()),
        )
        write_deltalake(cfg.lake.table(*contract.view_table(entity)), table, mode="overwrite")


def test_views_are_read_from_delta_tables(tmp_path: Path) -> None:
    cfg = unit_cfg(**{"lake.root": str(tmp_path / "lake")})
    _write_views(cfg, {entity: (5, 4) for entity in TOY_BUCKETS})
    views = load_batch_views(cfg)
    assert views.horizon == HORIZON
    assert (views.size("user"), views.size("item"), views.size("user_device"), views.size("nothing")) == (2, 2, 2, 0)
    # Every bucket of every key, as written.
    assert {e: dict(v.rows) for e, v in views.views.items()} == {e: dict(v.rows) for e, v in toy_views().views.items()}
    (found,) = lookup_features([Row("u1", "i1", "mobile", 2)], views, cfg.features, NOW)
    assert {k: found[k] for k in U1_I1_MOBILE} == U1_I1_MOBILE


def test_the_view_store_reloads_new_delta_versions_and_keeps_the_last_good_views(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Views re-read only when a table has a new version; increments appended later are merged
    on the next refresh; a lake that cannot be read leaves the last views served."""
    cfg = unit_cfg(**{"lake.root": str(tmp_path / "lake")})
    _write_views(cfg, {entity: (5, 4) for entity in TOY_BUCKETS})
    store = ViewStore.from_config(cfg)
    first = store.reload()
    assert store.reload() is first  # nothing changed: not re-read
    increments = pa.table({
        "user_id": ["u2", "u2"], "bucket_start": pa.array([hours_before(3), hours_before(3)], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        "impressions": pa.array([6, 1], pa.int64()), "clicks": pa.array([2, 0], pa.int64()), "top_position": [2.0, 5.0],
        "impressions_version": pa.array([5, 3], pa.int64()), "clicks_version": pa.array([5, None], pa.int64()),
        "speed_batch_id": pa.array([1, 0], pa.int64()),
    })  # fmt: skip
    write_deltalake(cfg.lake.table(*contract.increments_table("user")), increments)
    merged = store.reload()
    assert merged is not first and store.current is merged
    # u2's bucket 3 h back: 40 impressions, 1 click, top 3 in the batch; + 6, 2, top 2 after v;
    # the second row (impressions v3, no click) is already in the batch view at (5, 4).
    assert merged.lookup("user", ("u2",)) == EntityBuckets((hours_before(3),), {"impressions": (46,), "clicks": (3,), "top_position": (2.0,)})
    assert (merged.views["user"].increments.used, merged.views["user"].increments.already_in_batch) == (1, 1)
    assert merged.views["item"].increments.used == 0 and merged.lookup("item", ("i1",)) == first.lookup("item", ("i1",))
    # The lake unreadable: the last views stay, the reason is kept, the lake is reported failing
    # (logged once however many polls fail) and answering again once it is back.
    lake = Path(cfg.lake.root)
    lake.rename(lake.with_name("lake-gone"))
    with caplog.at_level(logging.INFO, logger="serving_layer"):
        for _ in range(3):
            assert not store.try_reload()
        assert store.current is merged and "no Delta table" in (store.last_error or "")
        assert not store.dependency.up and (store.failures, store.loads) == (3, 3)
        lake.with_name("lake-gone").rename(lake)
        assert store.try_reload() and store.dependency.up
    lines = [r.getMessage() for r in caplog.records if r.name == "serving_layer.dependencies"]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"the lake at {lake}: no Delta table at ") and lines[0].endswith(f"; serving the views loaded at {merged.horizon}")
    assert re.fullmatch(rf"the lake at {re.escape(str(lake))}: reachable again after \d+ s", lines[1])


def test_views_from_two_batch_runs_are_refused(tmp_path: Path) -> None:
    cfg = unit_cfg(**{"lake.root": str(tmp_path / "lake")})
    _write_views(cfg, {"user": (4, 2), "item": (5, 2), "user_device": (4, 2)})
    with pytest.raises(ViewLoadError, match="different batch runs: user: bronze clicks v2, impressions v4; item: bronze clicks v2, impressions v5"):
        load_batch_views(cfg)


def test_a_missing_view_names_its_path(tmp_path: Path) -> None:
    path = str(tmp_path / "lake" / "views" / "user_buckets")
    with pytest.raises(ViewLoadError, match="no Delta table at .*user_buckets: has the batch layer run yet"):
        read_bucket_view(path, "user", ["user_id"], ["impressions"])


def test_a_view_written_with_other_declarations_is_refused(tmp_path: Path) -> None:
    cfg = unit_cfg(**{"lake.root": str(tmp_path / "lake")})
    _write_views(cfg, {entity: (5, 4) for entity in TOY_BUCKETS})
    path = cfg.lake.table(*contract.view_table("user"))
    with pytest.raises(ViewLoadError, match="lacks column.* best_position: was it written with other feature declarations"):
        read_bucket_view(path, "user", ["user_id"], ["impressions", "best_position"])


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            {"loc": ("body", "batch", "rows", 3, "position"), "type": "greater_than_equal", "msg": "Input should be >= 1"},
            {"field": "rows.3.position", "message": "Input should be >= 1"},
        ),
        ({"loc": ("body", "row", "device"), "type": "missing", "msg": "Field required"}, {"field": "device", "message": "Field required"}),
        ({"loc": ("body", "row", "colour"), "type": "extra_forbidden", "msg": "Extra inputs"}, {"field": "colour", "message": "unknown field"}),
        ({"loc": ("body",), "type": "missing", "msg": "Field required"}, {"field": "body", "message": "a JSON body is required"}),
        (
            {"loc": ("body", 1), "type": "json_invalid", "msg": "JSON decode error", "ctx": {"error": "Expecting value"}},
            {"field": "body", "message": "invalid JSON at character 1: Expecting value"},
        ),
        ({"loc": ("query", "limit"), "type": "int_parsing", "msg": "bad"}, {"field": "query.limit", "message": "bad"}),
    ],
)
def test_validation_errors_name_the_field_as_the_client_wrote_it(error: dict[str, Any], expected: dict[str, str]) -> None:
    assert format_validation_errors([error], REQUEST_KINDS) == [expected]


def test_a_failed_load_keeps_the_last_good_value_and_retries_are_throttled() -> None:
    now = [0.0]
    outcomes: list[Any] = [RuntimeError("registry down"), "v1", RuntimeError("registry down again"), "v2"]
    calls = []

    def load() -> str:
        calls.append(now[0])
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return str(outcome)

    slot: Reloadable[str] = Reloadable("thing", load, retry_interval_s=5, clock=lambda: now[0])
    with pytest.raises(NotReadyError, match="thing could not be loaded: registry down"):
        slot.get()
    now[0] = 1.0
    with pytest.raises(NotReadyError, match="registry down"):
        slot.get()  # within the retry interval: no second call
    assert calls == [0.0]
    now[0] = 6.0
    assert slot.get() == "v1" and slot.current == "v1" and slot.last_error is None
    with pytest.raises(RuntimeError, match="again"):
        slot.reload()
    assert slot.current == "v1"  # the last good value is still served
    assert slot.reload() == "v2" and slot.get() == "v2"
    assert calls == [0.0, 6.0, 6.0, 6.0]


def test_the_model_inputs_come_from_the_graph() -> None:
    features = unit_cfg().features
    # Any subset of the declared features, in the graph's order.
    assert check_session(open_onnx_session(toy_onnx_bytes()), "models:/ctr/3", features) == TOY_INPUTS
    reordered = ("position", "item_ctr_7d")
    assert check_session(open_onnx_session(toy_onnx_bytes(reordered)), "models:/ctr/4", features).numeric == reordered


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        (toy_onnx_bytes(("user_impressions", "position")), r"takes inputs \['user_impressions'\] that the feature declarations do not define"),
        (toy_onnx_bytes(("user_clicks_24h", "device_clicks_1h")), r"\['device_clicks_1h'\] that the feature declarations do not define"),
        (int_input_onnx_bytes(), r"neither float nor string tensors: user_clicks_24h \(tensor\(int64\)\)"),
    ],
)
def test_a_graph_the_declarations_cannot_feed_is_refused(graph: bytes, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        check_session(open_onnx_session(graph), "models:/ctr/9", unit_cfg().features)


def test_the_onnx_file_is_found_through_the_mlmodel_file(tmp_path: Path) -> None:
    import mlflow.onnx
    import onnx

    mlflow.onnx.save_model(onnx.load_from_string(toy_onnx_bytes()), str(tmp_path / "model"))
    found = find_onnx_file(tmp_path / "model")
    assert found.suffix == ".onnx" and found.is_file()
    assert check_session(open_onnx_session(found), str(found), unit_cfg().features) == TOY_INPUTS


def test_an_unreachable_registry_fails_fast() -> None:
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="does not answer"):
        check_registry_reachable("http://127.0.0.1:9", timeout_s=2)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("module_name", SERVING_MODULES)
def test_docstring_examples_run(module_name: str) -> None:
    result = doctest.testmod(importlib.import_module(module_name))
    assert result.failed == 0


def test_docstring_examples_exist() -> None:
    attempted = sum(doctest.testmod(importlib.import_module(m)).attempted for m in SERVING_MODULES)
    assert attempted >= 10


# --------------------------------------------------------------------------- the HTTP API


def test_one_row_is_scored_with_its_window_features(client: TestClient) -> None:
    response = client.post("/predict", json=row())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {
        "name": "ctr",
        "version": 3,
        "alias": "champion",
        "run_id": "run-1",
        "horizon": {"impressions": 5, "clicks": 4},
        "quality": None,
    }
    assert body["models"] == [body["model"]] and body["policy"] == "champion"
    # Distinct keys of the toy views (VIEW_ROWS): u1, u2; i1, i2; (u1, mobile), (u1, desktop).
    assert body["views"] == {"horizon": {"impressions": 5, "clicks": 4}, "keys": {"user": 2, "item": 2, "user_device": 2}}
    (prediction,) = body["predictions"]
    # The model's own inputs, in its order, computed at the service's clock (NOW).
    assert prediction["features"] == {**U1_I1_MOBILE, "position": 2, "device": "mobile"}
    assert list(prediction["features"]) == list(TOY_INPUTS.names)
    assert prediction["probability"] == pytest.approx(toy_probability(prediction["features"]), abs=1e-6)


def test_a_row_with_an_event_time_is_scored_at_that_time(client: TestClient) -> None:
    yesterday = (NOW - timedelta(days=1)).isoformat()
    response = client.post("/predict", json=row(event_time=yesterday))
    assert response.status_code == 200, response.text
    features = response.json()["predictions"][0]["features"]
    # u1's buckets 25 h and 24 h before NOW; i1's only bucket (2 h before NOW) is in the future.
    assert features == {**U1_I1_MOBILE, "user_impressions_24h": 8.0, "user_clicks_24h": 2.0, "item_ctr_7d": 1 / 21,
                        "user_device_clicks_1h": 0.0, "position": 2, "device": "mobile"}  # fmt: skip


def test_a_batch_is_answered_in_order_and_matches_single_rows(client: TestClient) -> None:
    rows = [
        row(),
        row(user_id="u2", item_id="i2", device="desktop", position=1),
        row(user_id="stranger", item_id="unseen", device="smart-tv", position=4),
    ]
    response = client.post("/predict", json={"rows": rows})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [(p["user_id"], p["item_id"]) for p in predictions] == [(r["user_id"], r["item_id"]) for r in rows]
    expected_features = [
        {**features, "position": r["position"], "device": r["device"]}
        for features, r in zip((U1_I1_MOBILE, U2_I2_DESKTOP, STRANGER), rows, strict=True)
    ]
    assert [p["features"] for p in predictions] == expected_features
    expected = [toy_probability(f) for f in expected_features]
    np.testing.assert_allclose([p["probability"] for p in predictions], expected, atol=1e-6)
    singles = [client.post("/predict", json=r).json()["predictions"][0]["probability"] for r in rows]
    np.testing.assert_allclose(singles, [p["probability"] for p in predictions], rtol=1e-5)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({k: v for k, v in row().items() if k != "item_id"}, "item_id"),
        (row(position="top"), "position"),
        (row(position=0), "position"),
        (row(position=2.5), "position"),
        (row(position=True), "position"),
        (row(user_id=17), "user_id"),
        (row(device=""), "device"),
        (row(user_id="u" * 300), "user_id"),
        (row(colour="red"), "colour"),
        (row(event_time="2026-11-22T10:00:00"), "event_time"),  # no time zone
        (row(event_time="yesterday"), "event_time"),
        (row(event_time=1764547200), "event_time"),  # epoch seconds: a timestamp is an ISO-8601 string
        (row(event_time=1764547200.5), "event_time"),
        ({"rows": [row(event_time=1764547200)]}, "rows.0.event_time"),
        ({"rows": [row(), row(position=-1)]}, "rows.1.position"),
        ({"rows": [row(), {k: v for k, v in row().items() if k != "device"}]}, "rows.1.device"),
        ({"rows": []}, "rows"),
        ({"rows": [row()] * 6}, "rows"),  # serving.max_rows is 5 here
        ({"rows": "all of them"}, "rows"),
        ({"rows": [row()], "extra": 1}, "extra"),
        ([row()], "body"),
        ("u1", "body"),
        (None, "body"),
    ],
)
def test_invalid_requests_get_a_4xx_naming_the_field(client: TestClient, body: Any, field: str) -> None:
    response = client.post("/predict", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert field in [error["field"] for error in detail], detail
    assert all(set(error) == {"field", "message"} and error["message"] for error in detail)


def test_malformed_json_is_a_422_on_the_body(client: TestClient) -> None:
    response = client.post("/predict", content=b'{"user_id": "u1",', headers={"content-type": "application/json"})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["field"] == "body" and error["message"].startswith("invalid JSON")


def test_a_body_that_is_not_json_is_a_415(client: TestClient) -> None:
    response = client.post("/predict", content=json.dumps(row()).encode(), headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert response.json()["detail"][0]["field"] == "body"


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_body_is_a_413_before_parsing(client: TestClient, chunked: bool) -> None:
    payload = b'{"rows": [' + b" " * (max_body_bytes(5) + 1) + b"]}"
    content: Any = iter([payload[i : i + 65536] for i in range(0, len(payload), 65536)]) if chunked else payload
    response = client.post("/predict", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 413
    (error,) = response.json()["detail"]
    assert error["field"] == "body" and "at most 5 rows" in error["message"]


def test_wrong_method_and_path_are_4xx(client: TestClient) -> None:
    assert client.get("/predict").status_code == 405
    assert client.post("/predictions", json=row()).status_code == 404


def test_without_a_champion_predict_is_503_and_health_still_answers() -> None:
    now = [0.0]
    champion: list[CtrServingModel] = []

    def load_model() -> ServedModels:
        if not champion:
            raise ModelLoadError("no version of registered model 'ctr' has alias 'champion' yet")
        return served(champion[0])

    models = Reloadable("models:/ctr@champion", load_model, retry_interval_s=5, clock=lambda: now[0])
    app = create_app(unit_cfg(), models=models, views=Reloadable("views", toy_views), clock=lambda: NOW)
    with TestClient(app, base_url="http://localhost") as client:
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json()["ready"] is False and health.json()["model"] is None
        assert "alias 'champion'" in health.json()["problems"][0]

        response = client.post("/predict", json=row())
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert "no version of registered model 'ctr' has alias 'champion'" in response.json()["detail"]

        # The first champion is picked up without a restart, once the retry interval has passed.
        champion.append(toy_model())
        assert client.post("/predict", json=row()).status_code == 503
        now[0] = 10.0
        response = client.post("/predict", json=row())
        assert response.status_code == 200 and response.json()["model"]["version"] == 3
        assert client.get("/health").json()["ready"] is True


def test_the_openapi_document_describes_requests_responses_and_errors(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    predict = document["paths"]["/predict"]["post"]
    body = predict["requestBody"]["content"]["application/json"]
    refs = {option["$ref"].rsplit("/", 1)[1] for option in body["schema"]["oneOf"]}
    assert refs == {"PredictRow", "PredictBatch"}
    assert set(body["examples"]) == {"one row", "batch"}
    responses = predict["responses"]
    assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictResponse")
    for status in ("413", "415", "422"):
        assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ValidationErrorResponse")
    assert responses["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    schemas = document["components"]["schemas"]
    assert schemas["PredictBatch"]["properties"]["rows"]["maxItems"] == 5
    assert schemas["PredictRow"]["additionalProperties"] is False
    assert schemas["PredictRow"]["properties"]["position"]["minimum"] == 1
    for name in ("PredictRow", "PredictBatch", "PredictResponse", "HealthResponse", "ValidationErrorResponse"):
        assert schemas[name].get("examples"), name
    health = document["paths"]["/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert health["$ref"].endswith("/HealthResponse")
    assert set(document["paths"]) >= {"/predict", "/models", "/health", "/ready", "/metrics"}
    parameters = {p["name"]: p for p in predict["parameters"]}
    assert set(parameters) == {"policy", "deadline_ms"} and all(p["in"] == "query" for p in parameters.values())
    for path, operation in ((p, o) for p, item in document["paths"].items() for o in item.values()):
        assert operation.get("summary") and operation.get("description"), path
        assert "200" in operation["responses"], path


# --------------------------------------------------------------------------- HTTP hygiene


@pytest.mark.parametrize("host", ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "localhost"])
def test_loopback_host_names_are_answered(client: TestClient, host: str) -> None:
    assert client.get("/health", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example:8000", "localhost.evil.example", "127.0.0.2:8000", "[::2]:8000"])
def test_another_host_name_is_a_400_naming_the_header(client: TestClient, host: str) -> None:
    for answer in (client.get("/health", headers={"host": host}), client.post("/predict", json=row(), headers={"host": host})):
        assert answer.status_code == 400
        (error,) = answer.json()["detail"]
        assert error["field"] == "header.Host" and repr(host) in error["message"] and "serving.allowed_hosts" in error["message"]
        assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])


def test_allowed_hosts_are_configurable_by_name_port_and_subdomain() -> None:
    cfg = unit_cfg(**{"serving.allowed_hosts": ["*.example.com", "10.0.0.5:8000"]})
    app = create_app(cfg, models=Reloadable("m", lambda: served(toy_model())), views=Reloadable("v", toy_views), clock=lambda: NOW, poll=False)
    with TestClient(app, base_url="http://localhost") as http:
        statuses = {host: http.get("/health", headers={"host": host}).status_code
                    for host in ("api.example.com", "example.com", "10.0.0.5:8000", "10.0.0.5:9000", "localhost:8000")}  # fmt: skip
    assert statuses == {"api.example.com": 200, "example.com": 400, "10.0.0.5:8000": 200, "10.0.0.5:9000": 400, "localhost:8000": 400}
    with pytest.raises(ConfigError, match="serving.allowed_hosts: .*'http://api.example.com' is not a host name"):
        unit_cfg(**{"serving.allowed_hosts": ["http://api.example.com"]})


def test_a_clients_request_id_is_returned_on_every_answer_and_an_invalid_one_replaced(client: TestClient) -> None:
    sent = {"x-request-id": "trace-42.a_b"}
    answers = {
        "fast path": client.post("/predict", json=row(), headers=sent),
        "routed": client.post("/predict", params={"policy": "champion"}, json=row(), headers=sent),
        "422": client.post("/predict", json=row(position=0), headers=sent),
        "415": client.post("/predict", content=b"{}", headers={**sent, "content-type": "text/plain"}),
        "413": client.post("/predict", content=b" " * (max_body_bytes(5) + 1), headers={**sent, "content-type": "application/json"}),
        "404": client.get("/nowhere", headers=sent),
        "health": client.get("/health", headers=sent),
    }
    assert {name: (a.headers.get("x-request-id"), a.headers.get_list("x-request-id")) for name, a in answers.items()} == {
        name: ("trace-42.a_b", ["trace-42.a_b"]) for name in answers
    }
    assert [a.status_code for a in answers.values()] == [200, 200, 422, 415, 413, 404, 200]
    # The answer names the request by the same id (the prediction log does too).
    assert answers["fast path"].json()["request_id"] == answers["routed"].json()["request_id"] == "trace-42.a_b"
    generated = [client.post("/predict", json=row(), headers=h) for h in ({"x-request-id": "has space"}, {"x-request-id": "x" * 129}, {})]
    ids = [a.headers["x-request-id"] for a in generated]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == 3
    assert [a.json()["request_id"] for a in generated] == ids


def test_an_unhandled_error_is_a_json_500_with_the_request_id_in_its_log_line(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(unit_cfg(), models=Reloadable("m", lambda: served(toy_model())), views=Reloadable("v", toy_views), clock=lambda: NOW, poll=False)

    @app.get("/broken")
    def broken() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, base_url="http://localhost") as http, caplog.at_level(logging.ERROR, logger="serving_layer"):
        answer = http.get("/broken", headers={"x-request-id": "bug-1"})
    assert (answer.status_code, answer.headers["x-request-id"]) == (500, "bug-1")
    assert answer.json() == {"detail": "internal error: the service's log names request bug-1"}
    (record,) = [r for r in caplog.records if r.name == "serving_layer.http_api"]
    assert record.getMessage() == "GET /broken failed (request bug-1)" and record.exc_info is not None


def _documented(document: dict[str, Any], path: str, status: int) -> Any:
    return document["paths"][path]["post"]["responses"][str(status)]["content"]["application/json"]["example"]


def test_each_documented_error_of_predict_is_what_the_service_answers() -> None:
    """The OpenAPI example of each error status of /predict, compared with the answer to a request
    that causes it: each status has its own (413 and 415 are not a copy of the 422's)."""
    from lambda_ml_apps.ctr.api_models import INVALID_BATCH

    cfg = unit_cfg(**{"serving.api_key": "s3cret"})
    registry = MemoryRegistry()  # no champion yet: the 503
    store = ModelStore(f"models:/{cfg.mlflow.registered_model}@{cfg.serving.model_alias}", registry, ["champion"])
    app = create_app(cfg, models=store, views=Reloadable("v", toy_views), clock=lambda: NOW, poll=False)
    key = {"x-api-key": "s3cret"}
    with TestClient(app, base_url="http://localhost") as http:
        document = http.get("/openapi.json").json()
        answers = {
            401: http.post("/predict", json=row()),
            413: http.post("/predict", content=b" " * (max_body_bytes(5) + 1), headers={**key, "content-type": "application/json"}),
            415: http.post("/predict", content=json.dumps(row()).encode(), headers={**key, "content-type": "text/plain"}),
            422: http.post("/predict", json=INVALID_BATCH, headers=key),
            503: http.post("/predict", json=row(), headers=key),
        }
    for status, answer in answers.items():
        assert answer.status_code == status, answer.text
        assert answer.json() == _documented(document, "/predict", status), status
    assert len({json.dumps(_documented(document, "/predict", status)) for status in answers}) == len(answers)


def test_each_documented_error_of_assign_is_what_the_service_answers() -> None:
    from lambda_ml_apps.kmeans.model import KMeansCentres
    from lambda_ml_apps.kmeans.serving import INVALID_POINTS, KMeansServingModel

    cfg = load_config(PROJECT_ROOT / "conf" / "kmeans.yaml", env={}, overrides={"serving.max_rows": 5, "serving.prediction_log.enabled": False})
    centres = KMeansServingModel("kmeans", 2, "champion", "r", Horizon.of(points=1), None, KMeansCentres.of([[0.0, 0.0], [10.0, 10.0]], ["x0", "x1"], [1, 1]))
    models: Reloadable[ServedModels] = Reloadable(f"models:/{cfg.mlflow.registered_model}@champion", lambda: ServedModels("champion", {"champion": centres}))
    app = create_app(cfg, models=models, views=Reloadable("v", lambda: BatchViews({})), poll=False)
    with TestClient(app, base_url="http://localhost") as http:
        document = http.get("/openapi.json").json()
        answers = {
            413: http.post("/assign", content=b" " * (max_body_bytes(5) + 1), headers={"content-type": "application/json"}),
            415: http.post("/assign", content=b'{"points": []}', headers={"content-type": "text/plain"}),
            422: http.post("/assign", json=INVALID_POINTS),
        }
        for status, answer in answers.items():
            assert answer.status_code == status, answer.text
            assert answer.json() == _documented(document, "/assign", status), status
        # A point's declared fields are typed as the event validator types them; a valid
        # event_time (or none) is accepted, an unknown field ignored.
        point = {"x0": 9.0, "x1": 9.5}
        ok = [http.post("/assign", json={"points": [{**point, **extra}]}) for extra in ({}, {"event_time": "2026-12-01T00:00:00Z"}, {"note": 1})]
        assert [(a.status_code, a.json()["assignments"][0]["cluster"]) for a in ok] == [(200, 1)] * 3
        refused = {
            "points.0.event_time": {**point, "event_time": "2026-12-01 00:00"},
            "points.0.source_id": {**point, "source_id": 7},
            "points.0.x1": {"x0": 1.0, "x1": "2"},
            "points.1.x0": {"x1": 1.0},
        }
        for field, bad in refused.items():
            answer = http.post("/assign", json={"points": [point, bad] if field.startswith("points.1") else [bad]})
            assert answer.status_code == 422 and [e["field"] for e in answer.json()["detail"]] == [field], answer.text


# --------------------------------------------------------------------------- model store, policies


class MemoryRegistry:
    """A registry held in memory for the unit tests of the store (the integration tests use
    the real MLflow server): version -> (graph bias, tags), alias -> version."""

    name = "ctr"

    def __init__(self) -> None:
        self.versions: dict[int, tuple[float, dict[str, str]]] = {}
        self.aliases: dict[str, int] = {}
        self.loads: list[int] = []
        self.down = False

    def resolve(self, alias: str) -> VersionInfo | None:
        if self.down:  # as MlflowRegistry reports a server that does not answer
            raise RegistryUnavailable("the MLflow tracking server does not answer", "unreachable (connection refused)")
        version = self.aliases.get(alias)
        return None if version is None else VersionInfo(version, f"run-{version}", self.versions[version][1])

    def load(self, info: VersionInfo, alias: str) -> CtrServingModel:
        self.loads.append(info.version)
        bias, tags = self.versions[info.version]
        # Opened as the MLflow registry opens a version: its numeric inputs packed.
        session, inputs, packed = open_serving_session(toy_onnx_bytes(bias=bias), f"models:/ctr/{info.version}", unit_cfg().features)
        return CtrServingModel(
            "ctr", info.version, alias, info.run_id, HORIZON, session, inputs, 0.6, quality_score(tags, 0.6), packed=packed
        )


def test_the_store_follows_alias_moves_and_reuses_loaded_versions() -> None:
    registry = MemoryRegistry()
    registry.versions = {1: (-1.0, {}), 2: (0.5, {contract.TAG_QUALITY_SCORE: "0.7"})}
    registry.aliases = {"champion": 1}
    store = ModelStore("models:/ctr@champion", registry, ["champion", "challenger"])
    first = store.reload()
    assert first.versions() == {"champion": 1} and store.swaps == 0
    assert store.reload() is first  # nothing moved: the very same object stays
    registry.aliases = {"champion": 2, "challenger": 1}
    moved = store.reload()
    assert moved.versions() == {"champion": 2, "challenger": 1} and store.current is moved
    assert moved.champion.quality == 0.7 and moved.by_alias["challenger"].quality == 0.6
    assert [m.version for m in moved.distinct()] == [2, 1]
    registry.aliases = {"champion": 1}  # rollback: version 1 is still loaded
    assert store.reload().versions() == {"champion": 1}
    assert registry.loads == [1, 2] and store.swaps == 2
    # The registry unreachable: the loaded versions stay, the registry is reported failing.
    registry.down = True
    kept = store.reload()
    assert kept.versions() == {"champion": 1} and not store.dependency.up
    registry.down = False
    assert store.reload().problems == () and store.dependency.up
    # The champion alias removed by mistake: the last champion keeps serving, the error says why.
    registry.aliases = {}
    with pytest.raises(ModelLoadError, match="has alias 'champion'"):
        store.reload()
    assert store.current is not None and store.current.versions() == {"champion": 1}


def test_a_store_without_a_champion_is_not_ready() -> None:
    registry = MemoryRegistry()
    registry.versions = {1: (-1.0, {})}
    registry.aliases = {"challenger": 1}
    store = ModelStore("models:/ctr@champion", registry, ["champion", "challenger"])
    with pytest.raises(ModelLoadError, match="has alias 'champion'"):
        store.reload()
    assert store.current is None


def _models(*specs: tuple[int, str, float | None]) -> ServedModels:
    session = open_onnx_session(toy_onnx_bytes())
    return served(*(CtrServingModel("ctr", v, a, None, HORIZON, session, TOY_INPUTS, quality=q) for v, a, q in specs))


def test_each_policy_picks_and_names_its_versions() -> None:
    models = _models((3, "champion", 0.61), (5, "challenger", 0.64), (4, "old", None))
    answers = {3: np.array([0.2, 0.9]), 5: np.array([0.6, 0.3]), 4: np.array([0.7, 0.4])}
    runner = PolicyRunner("mean", deadline_s=5, prior=0.05)
    try:

        def pick(policy: str, **kw: Any) -> tuple[list[int], list[float]]:
            answer = runner.answer(policy, models, lambda m: answers[m.version], 2, **kw)
            return [m.version for m in answer.models], answer.probabilities.tolist()

        assert pick("champion") == ([3], [0.2, 0.9])
        assert pick("latest") == ([5], [0.6, 0.3])
        assert pick("quality") == ([5], [0.6, 0.3])
        versions, mean = pick("consensus")
        assert versions == [3, 5, 4] and mean == pytest.approx([0.5, 1.6 / 3])
        runner.consensus = "vote"
        assert pick("consensus")[1] == pytest.approx([2 / 3, 1 / 3])
        assert pick("deadline") == ([5], [0.6, 0.3])
        with pytest.raises(ValueError, match="unknown policy 'best'"):
            pick("best")
    finally:
        runner.close()


def test_the_deadline_policy_answers_within_its_budget() -> None:
    models = _models((3, "champion", 0.61), (5, "challenger", 0.64))
    delays = {3: 0.0, 5: 1.5}  # the better version is slow

    def score(model: CtrServingModel) -> np.ndarray:
        time.sleep(delays[model.version])
        return np.array([model.version / 10])

    # Budgets generous enough for a loaded 2-core machine, far below the slow version's time.
    runner = PolicyRunner("mean", deadline_s=0.3, prior=0.05)
    try:
        started = time.monotonic()
        answer = runner.answer("deadline", models, score, 1)
        assert time.monotonic() - started < 1.2
        assert [m.version for m in answer.models] == [3] and answer.probabilities.tolist() == [0.3]
        # Given the time, the better version answers.
        answer = runner.answer("deadline", models, score, 1, deadline_s=5.0)
        assert [m.version for m in answer.models] == [5] and answer.probabilities.tolist() == [0.5]
        # Nobody in time: the prior, and no version named.
        delays[3] = 1.5
        started = time.monotonic()
        answer = runner.answer("deadline", models, score, 3, deadline_s=0.05)
        assert time.monotonic() - started < 1.2
        assert answer.models == () and answer.probabilities.tolist() == [0.05] * 3 and "prior" in answer.how
    finally:
        runner.close()


def test_policies_are_chosen_per_request_and_named_in_the_answer() -> None:
    registry = MemoryRegistry()
    registry.versions = {1: (-1.0, {}), 2: (0.5, {contract.TAG_QUALITY_SCORE: "0.9"})}
    registry.aliases = {"champion": 1, "challenger": 2}
    store = ModelStore("models:/ctr@champion", registry, ["champion", "challenger"])
    app = create_app(unit_cfg(), models=store, views=Reloadable("views", toy_views), clock=lambda: NOW, poll=False)
    with TestClient(app, base_url="http://localhost") as client:
        expected = {v: toy_probability(U1_I1_MOBILE | {"position": 2, "device": "mobile"}, bias=b) for v, (b, _) in registry.versions.items()}
        body = client.post("/predict", json=row()).json()
        assert body["policy"] == "champion" and [m["version"] for m in body["models"]] == [1]
        assert body["predictions"][0]["probability"] == pytest.approx(expected[1], rel=1e-6)
        for policy, versions, probability in (
            ("latest", [2], expected[2]),
            ("quality", [2], expected[2]),
            ("consensus", [1, 2], (expected[1] + expected[2]) / 2),
            ("deadline", [2], expected[2]),
        ):
            body = client.post(f"/predict?policy={policy}&deadline_ms=5000", json=row()).json()
            assert body["policy"] == policy and [m["version"] for m in body["models"]] == versions, body
            assert body["model"]["version"] == versions[0]
            assert body["predictions"][0]["probability"] == pytest.approx(probability, rel=1e-6)
        response = client.post("/predict?policy=best", json=row())
        assert response.status_code == 422 and response.json()["detail"][0]["field"].endswith("policy")
        response = client.post("/predict?policy=deadline&deadline_ms=0", json=row())
        assert response.status_code == 422 and response.json()["detail"][0]["field"].endswith("deadline_ms")

        models = client.get("/models").json()
        assert models["aliases"] == {"champion": 1, "challenger": 2} and models["primary_alias"] == "champion"
        assert [(v["version"], v["alias"], v["quality"]) for v in models["versions"]] == [(1, "champion", 0.6), (2, "challenger", 0.9)]


def _expected_arm(user_id: str, fraction: float, salt: str) -> str:
    """The documented split, computed here apart from lambda_ml_apps.ctr.ab."""
    import hashlib

    bucket = int.from_bytes(hashlib.sha256(f"{salt}\x00{user_id}".encode()).digest()[:8], "big") / 2**64
    return "challenger" if bucket < fraction else "champion"


def test_the_ab_split_is_stable_and_near_its_fraction() -> None:
    from lambda_ml_apps.ctr.ab import arm_of

    users = [f"user-{n}" for n in range(20_000)]
    arms = [arm_of(u, 0.3, "s1") for u in users]
    assert arms == [arm_of(u, 0.3, "s1") for u in users]  # stable
    assert arms == [_expected_arm(u, 0.3, "s1") for u in users]
    share = arms.count("challenger") / len(users)
    assert abs(share - 0.3) < 0.015, share  # 4.6 standard deviations of a fair split
    assert [arm_of(u, 0.3, "s2") for u in users] != arms  # another salt reshuffles
    assert {arm_of(u, 0.0, "s1") for u in users} == {"champion"} and {arm_of(u, 1.0, "s1") for u in users} == {"challenger"}


def test_the_ab_policy_scores_each_user_with_its_arms_version() -> None:
    registry = MemoryRegistry()
    registry.versions = {1: (-1.0, {}), 2: (0.5, {})}
    registry.aliases = {"champion": 1, "challenger": 2}
    store = ModelStore("models:/ctr@champion", registry, ["champion", "challenger"])
    cfg = unit_cfg(**{"serving.max_rows": 100, "serving.ab.challenger_fraction": 0.5, "serving.ab.salt": "t"})
    app = create_app(cfg, models=store, views=Reloadable("views", toy_views), clock=lambda: NOW, poll=False)
    rows = [row(user_id=f"x{n}", item_id="nobody", device="tablet", position=1 + n % 3, event_id=f"imp-{n}") for n in range(40)]
    with TestClient(app, base_url="http://localhost") as client:
        body = client.post("/predict?policy=ab", json={"rows": rows}).json()
        single = [client.post("/predict?policy=ab", json=r).json()["predictions"][0] for r in rows]
    assert body["policy"] == "ab" and body["request_id"]
    arms = [_expected_arm(r["user_id"], 0.5, "t") for r in rows]
    assert 0 < arms.count("challenger") < len(rows)
    version_of = {"champion": 1, "challenger": 2}
    for r, p, one, arm in zip(rows, body["predictions"], single, arms, strict=True):
        bias = registry.versions[version_of[arm]][0]
        expected = toy_probability(STRANGER | {"position": r["position"], "device": "tablet"}, bias=bias)
        assert (p["arm"], p["version"], p["event_id"]) == (arm, version_of[arm], r["event_id"])
        assert p["probability"] == pytest.approx(expected, rel=1e-6)
        assert (one["arm"], one["version"], one["probability"]) == (p["arm"], p["version"], p["probability"])
    assert sorted(m["version"] for m in body["models"]) == [1, 2]
    # Without a challenger loaded, everyone gets the champion.
    registry.aliases = {"champion": 1}
    store.reload()
    with TestClient(app, base_url="http://localhost") as client:
        body = client.post("/predict?policy=ab", json={"rows": rows}).json()
    assert {(p["arm"], p["version"]) for p in body["predictions"]} == {("champion", 1)}


def test_the_written_answer_is_what_the_response_model_dumps() -> None:
    """The JSON /predict sends is written without building the pydantic models: byte for byte
    what ``PredictResponse`` dumps, on real answers of every policy, and where it cannot be
    written directly (a probability out of range, a number JSON cannot hold, a string UTF-8
    cannot encode) the model's own result or error."""
    registry = MemoryRegistry()
    registry.versions = {1: (-1.0, {}), 2: (0.5, {contract.TAG_QUALITY_SCORE: "0.9"})}
    registry.aliases = {"champion": 1, "challenger": 2}
    store = ModelStore("models:/ctr@champion", registry, ["champion", "challenger"])
    models = store.reload()
    views = toy_views()
    cfg = unit_cfg(**{"serving.ab.challenger_fraction": 0.5, "serving.ab.salt": "t"})
    rows = [
        PredictRow(user_id="u1", item_id="i1", device="mobile", position=2, event_id="imp-1"),
        PredictRow(user_id="u2", item_id="i2", device="desktop", position=9, event_time=NOW - timedelta(hours=30)),
        PredictRow(user_id="Zoë 🚲", item_id="i\"3\"\n", device="fridge", position=1, event_id="é"),
        *(PredictRow(user_id=f"x{n}", item_id="i1", device="tablet", position=1 + n) for n in range(6)),
    ]
    writer = AnswerWriter()
    runner = PolicyRunner("mean", deadline_s=5, prior=0.05)
    try:
        scored = {
            policy: score_rows(rows, models, views, cfg.features, NOW, runner, policy, None, cfg.serving.ab, f"req-{policy}")
            for policy in ("champion", "latest", "quality", "consensus", "deadline", "ab")
        }
    finally:
        runner.close()
    assert {a for _, _, a in scored["ab"].answers} == {"champion", "challenger"}  # both arms are in it
    names = contract.model_inputs(cfg.features).names
    prior = Scored("req-prior", "deadline", "prior: no version answered within 1 ms", [], views, rows,
                   lookup_features(rows, views, cfg.features, NOW), [(0.05, None, None)] * len(rows), names)  # fmt: skip
    for answer in [*scored.values(), prior]:
        expected = predict_response(answer).model_dump_json().encode()
        assert writer.write(answer) == expected, answer.policy
        assert writer.write(answer) == expected  # its parts now reused
    body = json.loads(writer.write(scored["consensus"]))
    assert [m["version"] for m in body["models"]] == [1, 2] and body["predictions"][2]["user_id"] == "Zoë 🚲"
    assert json.loads(writer.write(prior))["model"] is None

    # A version swapped in (here: its quality score changed) is written as it is now.
    champion = scored["champion"]
    rescored = replace(champion, models=[replace(champion.models[0], quality=0.75)])
    assert json.loads(writer.write(rescored))["model"]["quality"] == 0.75 == json.loads(writer.write(rescored))["models"][0]["quality"]

    one = replace(champion, rows=rows[:1], features=champion.features[:1], answers=champion.answers[:1])
    infinite = replace(one, features=[{**one.features[0], "user_clicks_24h": math.inf}])
    assert writer.write(infinite) == predict_response(infinite).model_dump_json().encode()
    assert json.loads(writer.write(infinite))["predictions"][0]["features"]["user_clicks_24h"] is None
    for bad in (math.nan, 1.5, -0.1):
        with pytest.raises(ValidationError, match="probability"):
            writer.write(replace(one, answers=[(bad, 1, None)]))
    surrogate = replace(one, request_id="\ud800")
    with pytest.raises(PydanticSerializationError, match="surrogates not allowed"):
        predict_response(surrogate).model_dump_json()
    with pytest.raises(PydanticSerializationError, match="surrogates not allowed"):
        writer.write(surrogate)


def test_ready_and_metrics_report_what_is_loaded() -> None:
    registry = MemoryRegistry()
    registry.versions = {4: (-1.0, {})}
    store = ModelStore("models:/ctr@champion", registry, ["champion"])
    app = create_app(unit_cfg(), models=store, views=Reloadable("views", toy_views), clock=lambda: NOW, poll=False)
    with TestClient(app, base_url="http://localhost") as client:
        response = client.get("/ready")
        assert response.status_code == 503 and response.json()["ready"] is False
        assert "has alias 'champion'" in response.json()["problems"][0]
        assert client.get("/models").status_code == 503
        registry.aliases = {"champion": 4}
        store.reload()
        assert client.get("/ready").json() == {"ready": True, "problems": []}
        for _ in range(3):
            assert client.post("/predict", json=row()).status_code == 200
        assert client.post("/predict", json=row(position=0)).status_code == 422
        client.get("/features/user/u1")
        text = client.get("/metrics")
        assert text.headers["content-type"].startswith("text/plain")
        lines = set(text.text.splitlines())
        assert 'lambda_ml_http_requests_total{method="POST",route="/predict",status="200"} 3.0' in lines
        assert 'lambda_ml_http_requests_total{method="POST",route="/predict",status="422"} 1.0' in lines
        assert 'lambda_ml_http_request_duration_seconds_count{route="/predict"} 4.0' in lines
        assert 'lambda_ml_predictions_total{policy="champion",versions="4"} 3.0' in lines
        assert 'lambda_ml_model_version{alias="champion"} 4.0' in lines
        assert 'lambda_ml_http_errors_total{route="/predict"} 0.0' in lines and "lambda_ml_ready 1.0" in lines


def _metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus exposition text."""
    from prometheus_client.parser import text_string_to_metric_families

    found = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_a_registry_outage_is_logged_once_counted_and_named_until_it_recovers(caplog: pytest.LogCaptureFixture) -> None:
    """The registry down for three polls: requests keep the loaded champion; one log line when
    it fails and one when it answers again; every failed poll counted as a failed reload and a
    dependency failure; /health degraded and /ready still 200, both naming the registry."""
    clock = [100.0]
    dependencies = DependencyStatus(clock=lambda: clock[0])
    registry = MemoryRegistry()
    registry.versions, registry.aliases = {4: (-1.0, {})}, {"champion": 4}
    store = ModelStore("models:/ctr@champion", registry, ["champion", "challenger"],
                       dependency=dependencies.declare("registry", "MLflow registry at http://registry.test:5000"))  # fmt: skip
    app = create_app(unit_cfg(), models=store, views=Reloadable("views", toy_views), clock=lambda: NOW, poll=False, dependencies=dependencies)
    with TestClient(app, base_url="http://localhost") as client, caplog.at_level(logging.INFO, logger="serving_layer"):
        assert client.get("/health").json()["status"] == "ok"
        registry.down = True
        for _ in range(3):
            clock[0] += 10
            assert not store.try_reload()
        problem = "registry: MLflow registry at http://registry.test:5000: unreachable (connection refused); serving the loaded versions (champion v4)"
        health = client.get("/health").json()
        assert (health["status"], health["ready"], health["problems"], health["model"]["version"]) == ("degraded", True, [problem], 4)
        ready = client.get("/ready")
        assert (ready.status_code, ready.json()) == (200, {"ready": True, "problems": [problem]})
        assert client.get("/models").json()["problems"] == [problem]
        answer = client.post("/predict", json=row())
        assert answer.status_code == 200 and answer.json()["model"]["version"] == 4
        text = client.get("/metrics").text
        assert _metric(text, "lambda_ml_dependency_up", dependency="registry") == 0
        assert _metric(text, "lambda_ml_dependency_failures_total", dependency="registry") == 3
        assert (_metric(text, "lambda_ml_reloads_total", what="models"), _metric(text, "lambda_ml_reload_failures_total", what="models")) == (1, 3)
        registry.down = False
        clock[0] += 12
        assert store.try_reload()
        health = client.get("/health").json()
        assert (health["status"], health["problems"]) == ("ok", [])
        text = client.get("/metrics").text
        assert _metric(text, "lambda_ml_dependency_up", dependency="registry") == 1
        assert _metric(text, "lambda_ml_dependency_failures_total", dependency="registry") == 3
    # Only this registry's lines: a background thread of an earlier test may log too.
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "registry.test" in r.getMessage()]
    assert lines == [
        ("WARNING", problem.removeprefix("registry: ")),
        # Down from the first failed poll (t=110) to the first good one (t=142).
        ("INFO", "MLflow registry at http://registry.test:5000: reachable again after 32 s"),
    ]


def test_without_a_champion_a_registry_outage_is_named_and_the_service_not_ready() -> None:
    dependencies = DependencyStatus()
    registry = MemoryRegistry()
    registry.down = True
    store = ModelStore("models:/ctr@champion", registry, ["champion"], dependency=dependencies.declare("registry", "the registry"))
    app = create_app(unit_cfg(), models=store, views=Reloadable("views", toy_views), clock=lambda: NOW, poll=False, dependencies=dependencies)
    with TestClient(app, base_url="http://localhost") as client:
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert "registry: the registry: unreachable (connection refused); no model to serve: the application's routes answer 503" in ready.json()["problems"]
        assert client.post("/predict", json=row()).status_code == 503


def test_the_kafka_probe_reports_a_broker_that_stops_and_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    """A real listening socket stands for the broker: closed, the probe reports Kafka failing;
    listening again, Kafka answering."""
    dependencies = DependencyStatus()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        probe = KafkaProbe(f"127.0.0.1:{port}", dependencies.declare("kafka", f"Kafka at 127.0.0.1:{port}"), "prediction records queue")
        with caplog.at_level(logging.INFO, logger="serving_layer"):
            assert not probe.try_reload() and not probe.try_reload()  # bound, not listening: refused
            assert dependencies.problems() == [f"kafka: Kafka at 127.0.0.1:{port}: unreachable ([Errno 111] Connection refused); prediction records queue"]
            listener.listen()
            assert probe.try_reload() and dependencies.problems() == []
    assert dependencies.states() == [("kafka", True, 2)]
    assert [r.levelname for r in caplog.records if r.name == "serving_layer.dependencies"] == ["WARNING", "INFO"]


def test_metrics_of_two_services_in_one_process_count_apart_and_parse_as_prometheus_text() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from serving_layer.metrics import LATENCY_BUCKETS, ServiceMetrics

    first, second = ServiceMetrics(), ServiceMetrics()
    latencies = [0.0005, 0.001, 0.003, 0.003, 0.2, 3.0]
    for n, seconds in enumerate(latencies):
        first.observe_request("POST", "/predict", 503 if n == 0 else 200, seconds)
    second.observe_request("GET", "/health", 200, 0.001)
    first.observe_predictions("consensus", [], 4)
    text = first.render([("lambda_ml_model_version", "Version per alias.", {"alias": "champion"}, 7),
                         ("lambda_ml_reloads_total", "Loads.", {"what": 'a "quoted" \\ name'}, 2)])  # fmt: skip
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    # By hand: a request counts in every bucket whose bound it does not exceed.
    for bound in [*LATENCY_BUCKETS, float("inf")]:
        le = "+Inf" if bound == float("inf") else str(bound)
        expected = sum(seconds <= bound for seconds in latencies)
        assert samples["lambda_ml_http_request_duration_seconds_bucket", (("le", le), ("route", "/predict"))] == expected
    assert samples["lambda_ml_http_request_duration_seconds_sum", (("route", "/predict"),)] == pytest.approx(sum(latencies))
    assert samples["lambda_ml_http_requests_total", (("method", "POST"), ("route", "/predict"), ("status", "200"))] == 5
    assert samples["lambda_ml_http_errors_total", (("route", "/predict"),)] == 1
    assert samples["lambda_ml_predictions_total", (("policy", "consensus"), ("versions", "prior"))] == 4
    assert samples["lambda_ml_model_version", (("alias", "champion"),)] == 7
    assert samples["lambda_ml_reloads_total", (("what", 'a "quoted" \\ name'),)] == 2
    assert not any(name.startswith("lambda_ml_http") and ("route", "/health") in labels for name, labels in samples)
    assert 'lambda_ml_http_requests_total{method="GET",route="/health",status="200"} 1.0' in second.render([]).splitlines()


def test_an_api_key_guards_the_api_and_is_named_when_missing() -> None:
    cfg = unit_cfg(**{"serving.api_key": "s3cret"})
    app = create_app(cfg, models=Reloadable("m", lambda: served(toy_model())), views=Reloadable("views", toy_views), clock=lambda: NOW)
    with TestClient(app, base_url="http://localhost") as client:
        for response in (client.post("/predict", json=row()), client.get("/models")):
            assert response.status_code == 401
            assert response.json()["detail"] == [
                {"field": "header.X-API-Key", "message": "missing X-API-Key header: this service requires an API key"}
            ]
        wrong = client.post("/predict", json=row(), headers={"X-API-Key": "guess"})
        assert wrong.status_code == 401 and "wrong API key" in wrong.json()["detail"][0]["message"]
        assert client.post("/predict", json=row(), headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get("/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        # Probes and scrapers need no key.
        assert client.get("/health").status_code == client.get("/ready").status_code == client.get("/metrics").status_code == 200
        document = client.get("/openapi.json").json()
        assert document["components"]["securitySchemes"]["APIKeyHeader"] == {
            "type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The key set in serving.api_key."
        }  # fmt: skip
        assert document["paths"]["/predict"]["post"]["security"] == [{"APIKeyHeader": []}]
        assert "401" in document["paths"]["/predict"]["post"]["responses"]


def test_features_show_the_merge_and_both_parts() -> None:
    """u1's batch buckets ⊕ increments: one adds to the current bucket, one is a new bucket;
    the expectation sums the hand-written rows per hour (not with the merge code)."""
    speed_rows = [(0, 5, 2, 1.0), (2, 4, 0, None)]
    combined: dict[int, list[Any]] = {h: [h, i, c, p] for h, i, c, p in TOY_BUCKETS["user"][("u1",)]}
    for h, i, c, p in speed_rows:
        old = combined.get(h, [h, 0, 0, None])
        tops = [t for t in (old[3], p) if t is not None]
        combined[h] = [h, old[1] + i, old[2] + c, min(tops) if tops else None]
    aggregations = {name: a.aggregation for name, a in unit_cfg().features.aggregates.items()}
    increments = Increments({("u1",): entity_buckets(speed_rows)}, Horizon.of(impressions=7, clicks=6), used=2)
    views = toy_views()
    views = BatchViews({**views.views, "user": views.views["user"].with_increments(increments, aggregations)})
    app = create_app(unit_cfg(), models=Reloadable("m", lambda: served(toy_model())), views=Reloadable("v", lambda: views), clock=lambda: NOW)
    declared = unit_cfg().features
    with TestClient(app, base_url="http://localhost") as client:
        body = client.get("/features/user/u1").json()
        assert body["key"] == {"user_id": "u1"} and body["horizon"] == {"impressions": 5, "clicks": 4}
        assert body["increments"] == {"through": {"impressions": 7, "clicks": 6}, "rows_merged": 2, "rows_in_batch": 0}
        merged_expected = window_features(declared, "user", entity_buckets([tuple(r) for r in combined.values()]), NOW)
        assert body["merged"]["features"] == merged_expected
        assert body["batch"]["features"] == window_features(declared, "user", entity_buckets(TOY_BUCKETS["user"][("u1",)]), NOW)
        assert body["speed"]["features"]["user_impressions_24h"] == 9 and body["merged"]["features"]["user_impressions_24h"] == 12 + 9
        # Buckets within the longest window: the lifetime one reads them all, 7 d + 1 h back too.
        assert len(body["batch"]["buckets"]) == 6 and body["speed"]["buckets"][0]["values"] == {"impressions": 4, "clicks": 0, "top_position": None}
        # /predict scores on the merge too.
        features = client.post("/predict", json=row()).json()["predictions"][0]["features"]
        assert features["user_impressions_24h"] == 21 and features["user_clicks_24h"] == 5
        assert client.get("/features/user/u1", params={"at": "1960-01-01T00:00:00Z"}).json()["detail"][0]["field"] == "query.at"
        assert client.get("/features/user_device/u1").status_code == 422
        assert client.get("/features/user/").status_code in (404, 422)


def fuzz_never_5xx(schema: Any, max_examples: int) -> None:
    """Every operation of ``schema`` called with generated valid and invalid requests
    (schemathesis positive and negative modes); fails on any 5xx."""
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {"POST /predict", "GET /features/{entity}/{key}", "GET /models"}
    calls: list[tuple[str, int]] = []
    for operation in operations:
        for mode in GenerationMode:

            @hypothesis.settings(
                max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(hypothesis.HealthCheck)
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                response = case.call_and_validate(checks=[not_a_server_error])
                calls.append((operation.path, response.status_code))

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                # An operation without parameters or body has no invalid request to generate.
                assert mode is GenerationMode.NEGATIVE, operation.path
    statuses = {status for _, status in calls}
    assert len(calls) > 100 and max(statuses) < 500 and 200 in statuses and 422 in statuses, sorted(statuses)


def test_the_api_fuzzed_in_process_never_answers_5xx() -> None:
    """The same fuzzing as against the real service, in process on the toy model and views
    (fast, so it can run more examples)."""
    # schemathesis calls the app as host testserver.
    cfg = unit_cfg(**{"serving.allowed_hosts": ["testserver"]})
    app = create_app(cfg, models=Reloadable("m", lambda: served(toy_model())), views=Reloadable("v", toy_views), clock=lambda: NOW)
    with TestClient(app, base_url="http://testserver"):
        fuzz_never_5xx(schemathesis.openapi.from_asgi("/openapi.json", app), max_examples=60)


def _update(version: int, generation: tuple[int, int], alias: str = "champion", model: str = "ctr") -> bytes:
    body = {"registered_model": model, "alias": alias, "version": version,
            "generation": {"impressions": generation[0], "clicks": generation[1]}}  # fmt: skip
    return json.dumps(body).encode()


def test_model_updates_reload_once_per_fresh_generation() -> None:
    reloads: list[int] = []
    listener = ModelUpdateListener("unused:9092", "model-updates", "ctr", ["champion", "challenger"], lambda: reloads.append(1))
    assert listener.handle(_update(3, (5, 4))) and listener.handle(_update(4, (6, 4)))
    assert not listener.handle(_update(2, (5, 9)))  # impressions went back: stale
    assert listener.handle(_update(2, (5, 4), alias="challenger"))  # generations are per alias
    assert not listener.handle(_update(9, (9, 9), model="other")) and not listener.handle(_update(9, (9, 9), alias="canary"))
    assert not listener.handle(b"{not json") and not listener.handle(_update(1, (1, 1))[:-2])
    assert (len(reloads), listener.applied, listener.stale, listener.invalid) == (3, 3, 1, 2)
    assert listener.generations == {"champion": Horizon.of(impressions=6, clicks=4), "challenger": Horizon.of(impressions=5, clicks=4)}


def test_stream_scoring_and_online_evaluation_have_help(capsys: pytest.CaptureFixture[str]) -> None:
    from lambda_ml_apps.ctr import online_eval
    from lambda_ml_apps.ctr import stream

    for main in (stream.main, online_eval.parse_args):
        with pytest.raises(SystemExit) as done:
            main(["--help"])
        assert done.value.code == 0
    out = capsys.readouterr().out
    assert "At least once" in out and "--stop-when-idle" in out and "--until" in out and "--every" in out
    with pytest.raises(SystemExit) as done:
        online_eval.parse_args(["--until", "2026-11-22T10:00:00"])
    assert done.value.code == 2 and "--until needs a time zone" in capsys.readouterr().err


def avro_impressions(cfg: PlatformConfig) -> PlatformConfig:
    """The config with its impressions topic in Avro."""
    from support import with_topic

    return with_topic(cfg, "impressions", format="avro")


def test_stream_scoring_decodes_avro_impressions_and_skips_what_does_not_decode(caplog: pytest.LogCaptureFixture) -> None:
    from lambda_ml import avro
    from lambda_ml_apps.ctr.stream import StreamScorer

    def scorer(cfg: PlatformConfig) -> StreamScorer:
        models = Reloadable("models:/ctr@champion", lambda: served(toy_model()))
        return StreamScorer(cfg, models=models, views=Reloadable("views", toy_views), clock=lambda: NOW)

    cfg = avro_impressions(unit_cfg())
    schema = avro.load_schema(avro.schema_path(cfg.kafka.avro_schemas, "impressions"))
    at = NOW.isoformat()
    rows = [
        {"event_id": "imp-1", "event_time": at, "user_id": "u1", "item_id": "i1", "device": "mobile", "position": 2},
        {"event_id": "imp-2", "event_time": at, "user_id": "u2", "item_id": "i2", "device": "desktop", "position": 9},
        {"event_id": "imp-3", "event_time": at, "user_id": "nobody", "item_id": "nothing", "device": "fridge", "position": 1},
    ]
    encoded = [avro.encode(r, schema) for r in rows]
    bad = [encoded[0][:-1], encoded[1] + b"\x00", avro.encode({**rows[2], "position": 0}, schema), json.dumps(rows[0]).encode()]
    values = [(f"impressions/0@{n}", v) for n, v in enumerate([encoded[0], *bad[:2], encoded[1], *bad[2:], encoded[2]])]
    with caplog.at_level("WARNING", logger="lambda_ml_apps.ctr.stream"):
        streamed = scorer(cfg).score(values)
    from_json = scorer(unit_cfg()).score([(f"impressions/0@{n}", json.dumps(r).encode()) for n, r in enumerate(rows)])

    hand_made = [U1_I1_MOBILE | {"position": 2, "device": "mobile"}, U2_I2_DESKTOP | {"position": 9, "device": "desktop"},
                 STRANGER | {"position": 1, "device": "fridge"}]  # fmt: skip
    assert [r["event_id"] for r in streamed] == ["imp-1", "imp-2", "imp-3"]
    for record, json_record, features in zip(streamed, from_json, hand_made, strict=True):
        assert record["probability"] == json_record["probability"]
        assert record["probability"] == pytest.approx(toy_probability(features), rel=1e-6)
        assert (record["event_time"], record["source"], record["version"]) == (NOW, "stream", 3)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert [m.split(": ", 1)[0] for m in skipped] == [f"skipped the record at impressions/0@{n}" for n in (1, 2, 4, 5)]
    avro_error = "malformed Avro: does not decode with impressions.avsc: "
    assert skipped[0].endswith(f": {avro_error}field position: the record ends inside the value")
    assert skipped[1].endswith(f": {avro_error}1 byte(s) left after the last field (position)")
    assert skipped[2].endswith(": not a valid impression: position: Input should be greater than or equal to 1")
    assert avro_error in skipped[3]  # JSON on an Avro topic


def test_stream_scoring_of_avro_needs_a_readable_schema(tmp_path: Path) -> None:
    from lambda_ml.config import ConfigError
    from lambda_ml_apps.ctr.stream import StreamScorer

    cfg = avro_impressions(unit_cfg(**{"kafka.avro_schemas": str(tmp_path)}))
    with pytest.raises(ConfigError, match=f"kafka.avro_schemas: cannot decode Avro impressions with {tmp_path}/impressions.avsc"):
        StreamScorer(cfg, models=Reloadable("m", lambda: served(toy_model())), views=Reloadable("v", toy_views))


def test_the_prediction_log_never_holds_up_a_request_and_counts_what_it_drops() -> None:
    """No broker listens on the log's port: requests answer at once, the log keeps at most its
    buffer and /metrics counts the rest as dropped."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    cfg = unit_cfg(**{"serving.prediction_log.enabled": True, "serving.prediction_log.buffer_size": 3,
                      "kafka.bootstrap_servers": f"127.0.0.1:{closed_port}"})  # fmt: skip
    app = create_app(cfg, models=Reloadable("models:/ctr@champion", lambda: served(toy_model())), views=Reloadable("views", toy_views),
                     clock=lambda: NOW)  # fmt: skip
    with TestClient(app, base_url="http://localhost") as client:
        started = time.monotonic()
        statuses = [client.post("/predict", json=row(event_id=f"e{n}")).status_code for n in range(5)]
        took = time.monotonic() - started
        metrics = client.get("/metrics").text
    assert statuses == [200] * 5 and took < 2, took
    assert 'lambda_ml_prediction_log_records_total{outcome="dropped"} 2.0' in metrics
    assert 'lambda_ml_prediction_log_records_total{outcome="sent"} 0.0' in metrics
    assert "lambda_ml_prediction_log_queued 3.0" in metrics


def test_the_ab_policy_needs_its_challenger_among_the_candidates() -> None:
    from lambda_ml.config import ConfigError

    with pytest.raises(ConfigError, match="ab.challenger_alias 'challenger' must be one of candidate_aliases"):
        unit_cfg(**{"serving.policy": "ab", "serving.candidate_aliases": []})


def test_runner_help_and_bad_config() -> None:
    python = sys.executable
    done = subprocess.run([python, "-m", "serving_layer", "--help"], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert done.returncode == 0
    for option in ("--config", "--host", "--port"):
        assert option in done.stdout
    done = subprocess.run(
        [python, "-m", "serving_layer", "--config", "/nonexistent/platform.yaml"], capture_output=True, text=True, cwd=PROJECT_ROOT
    )
    assert done.returncode == 2
    assert "/nonexistent/platform.yaml: file not found" in done.stderr


# --------------------------------------------------------------------------- integration
# The real batch job trains on a seeded bronze dataset and registers its models in the real
# MLflow server; the real service (python -m serving_layer) then answers over HTTP. The lake
# root and the registered model name are this module's own, so other tests' tables and
# champions are left alone.

SEED = 11
N_USERS, N_ITEMS, N_IMPRESSIONS = 60, 20, 3000
SPAN = timedelta(hours=48)
WINDOW = timedelta(minutes=30)  # ctr.attribution_window_minutes
DEVICE_EFFECT = {"mobile": 0.3, "desktop": -0.2, "tablet": 0.0}
REGISTERED_MODEL = "ctr-serving-test"
# Bronze commits: impressions in 2 appends (version 1), clicks in 3 (version 2).
IMPRESSION_BATCHES, CLICK_BATCHES = 2, 3


@dataclass(frozen=True)
class FeatureEvent:
    kind: str  # "impressions" or "clicks"
    user_id: str
    item_id: str
    device: str
    position: int
    time: datetime


@dataclass(frozen=True)
class SeededBronze:
    """Bronze rows as the speed layer would land them, and the feature events they imply."""

    impressions: list[tuple[Any, ...]]
    clicks: list[tuple[Any, ...]]
    events: list[FeatureEvent]

    @property
    def users(self) -> list[str]:
        return sorted({e.user_id for e in self.events})

    @property
    def items(self) -> list[str]:
        return sorted({e.item_id for e in self.events})


# Every served row is scored at this time: after the last event (clicks come up to 90 minutes
# after the 48 h of impressions), so the views hold exactly the events before it.
SCORING_TIME = datetime(2026, 11, 3, 1, 40, 17, tzinfo=UTC)


def seeded_bronze() -> SeededBronze:
    """Impressions with a known click model (user and item affinity, position, device), clicks
    a few minutes later; plus what the lake really holds: resent events, late clicks outside
    the attribution window, double clicks and clicks of unknown impressions."""
    rng = random.Random(SEED)
    base = datetime(2026, 11, 1, tzinfo=UTC)
    ingested = datetime(2026, 11, 3, 1, tzinfo=UTC)
    user_effect = {f"u{n}": rng.gauss(0, 0.8) for n in range(N_USERS)}
    item_effect = {f"i{n}": rng.gauss(0, 0.6) for n in range(N_ITEMS)}
    impressions: list[tuple[Any, ...]] = []
    clicks: list[tuple[Any, ...]] = []
    shown: dict[str, tuple[str, str, str, int, datetime]] = {}  # impression id -> user, item, device, position, time
    click_events: list[tuple[str, str, datetime]] = []  # click id, impression id, time

    def land_impression(event: tuple[Any, ...]) -> None:
        impressions.append((*event, "impressions", 0, len(impressions), event[1], ingested))

    def land_click(event: tuple[Any, ...]) -> None:
        clicks.append((*event, "clicks", 0, len(clicks), event[2], ingested))

    for n in range(N_IMPRESSIONS):
        event_id = f"imp-{n}"
        user, item = f"u{rng.randrange(N_USERS)}", f"i{rng.randrange(N_ITEMS)}"
        device, position = rng.choice(list(DEVICE_EFFECT)), rng.randint(1, 5)
        time_ = base + timedelta(seconds=rng.uniform(0, SPAN.total_seconds()))
        event = (event_id, time_, user, item, device, position)
        land_impression(event)
        if rng.random() < 0.03:
            land_impression(event)  # resent by the producer: counts once
        shown[event_id] = (user, item, device, position, time_)
        z = -1.2 + user_effect[user] + item_effect[item] - 0.35 * (position - 1) + DEVICE_EFFECT[device]
        if rng.random() < 1 / (1 + math.exp(-z)):
            late = rng.random() < 0.08
            delay = timedelta(minutes=rng.uniform(31, 90)) if late else timedelta(seconds=rng.uniform(5, 25 * 60))
            click = (f"clk-{n}", event_id, time_ + delay)
            land_click(click)
            click_events.append(click)
            if rng.random() < 0.05:
                land_click(click)  # resent: counts once
            if rng.random() < 0.02:
                second = (f"clk-{n}-again", event_id, time_ + delay + timedelta(seconds=3))
                land_click(second)
                click_events.append(second)
    for n in range(20):
        orphan = (f"clk-orphan-{n}", f"imp-missing-{n}", base + timedelta(hours=n))
        land_click(orphan)
        click_events.append(orphan)

    # The feature events, by the platform's definitions, from the events themselves (no Spark):
    # every distinct impression at its time, every distinct attributed click at the click's.
    events: list[FeatureEvent] = [FeatureEvent("impressions", *shown[e]) for e in shown]
    for _, impression_id, click_time in {c[0]: c for c in click_events}.values():
        if impression_id in shown:
            user, item, device, position, shown_at = shown[impression_id]
            if shown_at <= click_time <= shown_at + WINDOW:
                events.append(FeatureEvent("clicks", user, item, device, position, click_time))
    return SeededBronze(impressions=impressions, clicks=clicks, events=events)


def reference_features(bronze: SeededBronze, declared: Any, row: dict[str, Any], at: datetime) -> dict[str, float]:
    """The declared window features of a request row at ``at``, straight from the definition:
    per entity and window, the row's entity's events in [start of at's hour - window, at), or
    all of them before at for the lifetime window."""
    hour = at.replace(minute=0, second=0, microsecond=0)
    assert declared.bucket == "1h"
    found: dict[str, float] = {}
    for entity, spec in declared.entities.items():
        for window in declared.windows:
            start = datetime.min.replace(tzinfo=UTC) if window == "all" else hour - parse_duration(window)
            mine = [e for e in bronze.events if all(getattr(e, k) == row[k] for k in spec.keys) and start <= e.time < at]
            totals = {}
            for name, aggregate in declared.aggregates.items():
                values = [1 if aggregate.measure is None else getattr(e, aggregate.measure) for e in mine if e.kind == aggregate.events]
                if aggregate.aggregation in ("count", "sum"):
                    totals[name] = float(sum(values))
                else:
                    totals[name] = float((min if aggregate.aggregation == "min" else max)(values)) if values else aggregate.empty
                found[f"{entity}_{name}_{window}"] = totals[name]
            for name, ratio in declared.ratios.items():
                denominator = totals[ratio.denominator] + ratio.prior_alpha + ratio.prior_beta
                found[f"{entity}_{name}_{window}"] = (totals[ratio.numerator] + ratio.prior_alpha) / denominator
    return found


def write_bronze(spark: Any, cfg: PlatformConfig, bronze: SeededBronze) -> None:
    from support import CLICK, IMPRESSION

    for event, rows, batches in ((IMPRESSION, bronze.impressions, IMPRESSION_BATCHES), (CLICK, bronze.clicks, CLICK_BATCHES)):
        size = math.ceil(len(rows) / batches)
        for start in range(0, len(rows), size):
            frame = spark.createDataFrame(rows[start : start + size], event.bronze_schema())
            frame.write.format("delta").mode("append").save(cfg.lake.table("bronze", event.name))


@dataclass(frozen=True)
class Trained:
    cfg: PlatformConfig
    bronze: SeededBronze
    result: Any  # batch_layer.train.TrainResult


@pytest.fixture(scope="module")
def trained(running_stack: PlatformConfig, spark: Any, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Seeded bronze in this module's own lake, and one real batch run on it."""
    from batch_layer import train

    root = tmp_path_factory.mktemp("serving-lake")
    cfg = isolated(running_stack, REGISTERED_MODEL, lake_root=root / "lake")
    bronze = seeded_bronze()
    write_bronze(spark, cfg, bronze)
    return Trained(cfg, bronze, train.run(spark, cfg))


POLL_S = 0.5


@dataclass(frozen=True)
class Service:
    url: str
    log_file: Path


def _get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _post_json(url: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def service(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """``python -m serving_layer`` on serving.port, stopped (SIGTERM, then SIGKILL) after."""
    from lambda_ml.config import write_config

    home = tmp_path_factory.mktemp("service")
    # Short polls so that the hot-swap and outage tests see alias moves within a second.
    fast = trained.cfg.serving.model_copy(update={"poll_interval_s": POLL_S, "views_refresh_s": POLL_S})
    config_file = write_config(trained.cfg.model_copy(update={"serving": fast}), home / "platform.yaml")
    log_file = home / "service.log"
    url = f"http://127.0.0.1:{trained.cfg.serving.port}"
    command = [sys.executable, "-m", "serving_layer", "--config", str(config_file), "--port", str(trained.cfg.serving.port)]
    with log_file.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=PROJECT_ROOT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"the service exited with {process.returncode}:\n{log_file.read_text()}")
            try:
                status, body = _get_json(f"{url}/health")
                if status == 200 and body["ready"]:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the service was not ready in 120 s:\n{log_file.read_text()}")
            time.sleep(0.5)
        yield Service(url, log_file)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _champion(cfg: PlatformConfig) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(cfg.mlflow.tracking_uri).get_model_version_by_alias(cfg.mlflow.registered_model, "champion")


def _rows_covering_every_entity(bronze: SeededBronze) -> list[dict[str, Any]]:
    """Every user and every item at least once, unknown ones, and a pair at positions 1 and 5;
    all scored at SCORING_TIME."""
    users, items = bronze.users, bronze.items
    devices = [*DEVICE_EFFECT, "smart-tv"]  # the last one the model never saw
    rows = [
        {"user_id": u, "item_id": items[n % len(items)], "device": devices[n % len(devices)], "position": 1 + n % 5}
        for n, u in enumerate(users)
    ]
    rows += [{"user_id": users[0], "item_id": i, "device": "mobile", "position": 1 + n % 5} for n, i in enumerate(items)]
    rows += [
        {"user_id": "new-user", "item_id": items[0], "device": "tablet", "position": 2},
        {"user_id": users[1], "item_id": "new-item", "device": "desktop", "position": 3},
        {"user_id": users[2], "item_id": items[2], "device": "mobile", "position": 1},
        {"user_id": users[2], "item_id": items[2], "device": "mobile", "position": 5},
    ]
    return [{**r, "event_time": SCORING_TIME.isoformat()} for r in rows]


@pytest.mark.integration
@pytest.mark.slow
def test_the_service_serves_the_champion_with_its_horizon(trained: Trained, service: Service) -> None:
    champion = _champion(trained.cfg)
    assert champion.version == trained.result.versions.served
    assert champion.tags[contract.TAG_FLAVOR] == "onnx"
    assert champion.tags[contract.TAG_MODEL_INPUTS] == contract.model_inputs(trained.cfg.features).tag()
    status, health = _get_json(f"{service.url}/health")
    assert status == 200 and health["ready"] is True and health["problems"] == []
    horizon = {"impressions": IMPRESSION_BATCHES - 1, "clicks": CLICK_BATCHES - 1}
    assert health["model"] == {
        "name": REGISTERED_MODEL,
        "version": int(champion.version),
        "alias": "champion",
        "run_id": trained.result.run_id,
        "horizon": horizon,
        "quality": pytest.approx(trained.result.quality.value),
    }
    events = trained.bronze.events
    keys = {"user": len({e.user_id for e in events}), "item": len({e.item_id for e in events}),
            "user_device": len({(e.user_id, e.device) for e in events})}  # fmt: skip
    assert health["views"] == {"horizon": horizon, "keys": keys}
    log_text = service.log_file.read_text()
    assert (
        f"serving {REGISTERED_MODEL} version {champion.version} (alias champion), "
        f"trained on bronze clicks v2, impressions v1 in MLflow run {trained.result.run_id}"
    ) in log_text
    line = next(line for line in log_text.splitlines() if "batch views: " in line)
    assert line.split("batch views: ", 1)[1].startswith(f"{keys['user']} user keys, {keys['item']} item keys, ")
    assert line.endswith("from bronze clicks v2, impressions v1")


@pytest.mark.integration
@pytest.mark.slow
def test_served_features_match_the_bronze_data(trained: Trained, service: Service) -> None:
    """Every served feature equals the definition computed from the raw events in plain Python:
    the batch views, their reading and the window arithmetic of the service are exact."""
    declared = trained.cfg.features
    inputs = contract.model_inputs(declared)
    rows = _rows_covering_every_entity(trained.bronze)
    status, body = _post_json(f"{service.url}/predict", {"rows": rows})
    assert status == 200, body
    for r, p in zip(rows, body["predictions"], strict=True):
        expected = reference_features(trained.bronze, declared, r, SCORING_TIME)
        assert p["features"] == {**expected, "position": r["position"], "device": r["device"]}, r
        assert list(p["features"]) == list(inputs.names)
    by_user = {r["user_id"]: p["features"] for r, p in zip(rows, body["predictions"], strict=True)}
    by_item = {r["item_id"]: p["features"] for r, p in zip(rows, body["predictions"], strict=True)}
    assert by_user.pop("new-user")["user_impressions_7d"] == 0 and by_item.pop("new-item")["item_clicks_7d"] == 0
    # The dataset exercises what the counts must skip (resent events, late and orphan clicks),
    # and the windows tell recent from old: 7 d holds all 48 h, 24 h about half, 1 h little.
    impressions_7d = sum(f["user_impressions_7d"] for f in by_user.values())
    assert impressions_7d == sum(f["item_impressions_7d"] for f in by_item.values()) == N_IMPRESSIONS
    assert N_IMPRESSIONS < len(trained.bronze.impressions)
    assert 0 < sum(f["user_clicks_7d"] for f in by_user.values()) < len(trained.bronze.clicks)
    impressions_24h = sum(f["user_impressions_24h"] for f in by_user.values())
    assert 0.3 * N_IMPRESSIONS < impressions_24h < 0.7 * N_IMPRESSIONS
    assert sum(f["user_impressions_1h"] for f in by_user.values()) < impressions_24h


@pytest.mark.integration
@pytest.mark.slow
def test_predictions_equal_onnxruntime_on_the_registered_model(trained: Trained, service: Service, tmp_path: Path) -> None:
    import mlflow.artifacts
    import onnxruntime as ort

    cfg = trained.cfg
    rows = _rows_covering_every_entity(trained.bronze)
    status, body = _post_json(f"{service.url}/predict", {"rows": rows})
    assert status == 200, body
    champion = _champion(cfg)
    assert body["model"]["name"] == REGISTERED_MODEL and body["model"]["version"] == int(champion.version)
    served = np.array([p["probability"] for p in body["predictions"]])

    # The same rows scored here: inputs from the raw events in plain Python, the champion's
    # ONNX file downloaded from the registry and run in onnxruntime directly, fed by the names
    # and types its graph declares.
    local = mlflow.artifacts.download_artifacts(
        f"models:/{REGISTERED_MODEL}/{champion.version}", dst_path=str(tmp_path), tracking_uri=cfg.mlflow.tracking_uri
    )
    (onnx_file,) = Path(local).rglob("*.onnx")
    session = ort.InferenceSession(str(onnx_file))
    features = [{**reference_features(trained.bronze, cfg.features, r, SCORING_TIME), **r} for r in rows]
    inputs = {}
    for graph_input in session.get_inputs():
        kind = np.float32 if graph_input.type == "tensor(float)" else object
        inputs[graph_input.name] = np.array([f[graph_input.name] for f in features], dtype=kind).reshape(-1, 1)
    assert len(inputs) == len(contract.model_inputs(cfg.features).names) == 50  # 48 window features, position, device
    (probability,) = session.run([contract.ONNX_PROBABILITY_OUTPUT], inputs)
    np.testing.assert_allclose(served, probability[:, 1], rtol=1e-5, atol=1e-7)

    assert len(served) == len(rows) and np.all((served > 0) & (served < 1))
    assert served.std() > 0.01  # the model tells rows apart
    # Same user, item and device at positions 1 and 5: the top slot is clicked more.
    assert served[-2] > served[-1]
    # One row alone gets the same answer as within the batch (float32 kernels may differ in
    # the last bits between batch sizes).
    status, single = _post_json(f"{service.url}/predict", rows[-1])
    assert status == 200
    assert single["predictions"][0]["probability"] == pytest.approx(served[-1], rel=1e-5)


@pytest.mark.integration
@pytest.mark.slow
def test_without_an_event_time_rows_are_scored_now(trained: Trained, service: Service) -> None:
    """The service's clock is the wall clock: weeks after the seeded data, every window but the
    lifetime one is empty, and that one holds the row's whole history."""
    row_now = {k: v for k, v in _rows_covering_every_entity(trained.bronze)[0].items() if k != "event_time"}
    assert datetime.now(UTC) - SCORING_TIME > timedelta(days=8)
    status, body = _post_json(f"{service.url}/predict", row_now)
    assert status == 200, body
    features = body["predictions"][0]["features"]
    numeric = {k: v for k, v in features.items() if k not in ("position", "device")}
    timed = {k: v for k, v in numeric.items() if not k.endswith("_all")}
    assert timed == {k: (1 / 21 if "_ctr_" in k else 0.0) for k in timed}
    expected = reference_features(trained.bronze, trained.cfg.features, row_now, datetime.now(UTC))
    lifetime = {k: v for k, v in numeric.items() if k.endswith("_all")}
    assert lifetime == {k: expected[k] for k in lifetime} and lifetime["user_impressions_all"] > 0


@pytest.mark.integration
@pytest.mark.slow
def test_bad_requests_over_http_name_the_field(trained: Trained, service: Service) -> None:
    status, body = _post_json(
        f"{service.url}/predict", {"user_id": "u1", "item_id": "i1", "device": "mobile", "position": "top"}
    )
    assert status == 422 and [e["field"] for e in body["detail"]] == ["position"]
    too_many = [{"user_id": "u1", "item_id": "i1", "device": "mobile", "position": 1}] * (trained.cfg.serving.max_rows + 1)
    status, body = _post_json(f"{service.url}/predict", {"rows": too_many})
    assert status == 422 and [e["field"] for e in body["detail"]] == ["rows"]


@pytest.mark.integration
@pytest.mark.slow
def test_the_model_store_reads_the_registry(trained: Trained) -> None:
    from mlflow.tracking import MlflowClient

    from serving_layer.model_store import load_registered_model

    model = load_registered_model(trained.cfg)
    assert model.inputs == contract.model_inputs(trained.cfg.features)
    assert model.version == int(trained.result.versions.served)
    assert model.run_id == trained.result.run_id
    assert model.horizon == Horizon.of(impressions=trained.result.horizon.version("impressions"), clicks=trained.result.horizon.version("clicks"))

    # An alias on the Spark twin is refused: the service only runs ONNX.
    client = MlflowClient(trained.cfg.mlflow.tracking_uri)
    spark_version = _champion(trained.cfg).tags[contract.TAG_SPARK_VERSION]
    client.set_registered_model_alias(REGISTERED_MODEL, "spark-twin", spark_version)
    try:
        on_spark = trained.cfg.model_copy(
            update={"serving": trained.cfg.serving.model_copy(update={"model_alias": "spark-twin"})}
        )
        with pytest.raises(ModelLoadError, match=f"version {spark_version} with flavor 'spark'"):
            load_registered_model(on_spark)
    finally:
        client.delete_registered_model_alias(REGISTERED_MODEL, "spark-twin")


@pytest.mark.integration
def test_without_a_registered_model_the_service_answers_503(trained: Trained) -> None:
    cfg = trained.cfg.model_copy(
        update={"mlflow": trained.cfg.mlflow.model_copy(update={"registered_model": "never-registered"})}
    )
    with TestClient(create_app(cfg), base_url="http://localhost") as client:
        health = client.get("/health").json()
        assert health["ready"] is False and health["views"] is not None
        assert "no version of registered model 'never-registered' has alias 'champion'" in health["problems"][0]
        response = client.post("/predict", json=row())
        assert response.status_code == 503
        assert "never-registered" in response.json()["detail"]


# --------------------------------------------------------------------------- hot swap, outage


def register_toy_version(cfg: PlatformConfig, horizon: Horizon) -> int:
    """The toy ONNX graph registered as a new version of the module's model, tagged as the
    batch layer tags its ONNX versions; returns its version number."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_experiment(cfg.mlflow.experiment)
    with mlflow.start_run():
        info = mlflow.onnx.log_model(onnx.load_from_string(toy_onnx_bytes()), name="toy-onnx",
                                     registered_model_name=cfg.mlflow.registered_model)  # fmt: skip
    version = str(info.registered_model_version)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    tags = {contract.TAG_FLAVOR: "onnx", contract.TAG_MODEL_INPUTS: TOY_INPUTS.tag(), **horizon.tags()}
    for key, value in tags.items():
        client.set_model_version_tag(cfg.mlflow.registered_model, version, key, value)
    return int(version)


class LoadGenerator:
    """``threads`` clients posting the same row back to back until stopped, each keeping every
    (status, version, probability) it got, in order. Bounded: stops by itself after ``max_s``."""

    def __init__(self, url: str, body: dict[str, Any], threads: int = 4, max_s: float = 120) -> None:
        import threading

        self.url, self.body, self.max_s = url, body, max_s
        self.results: list[list[tuple[int, int | None, float | None]]] = [[] for _ in range(threads)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def _run(self, n: int) -> None:
        deadline = time.monotonic() + self.max_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                status, body = _post_json(self.url, self.body)
            except OSError:
                status, body = -1, {}
            if status == 200:
                self.results[n].append((status, body["model"]["version"], body["predictions"][0]["probability"]))
            else:
                self.results[n].append((status, None, None))

    def __enter__(self) -> LoadGenerator:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    @property
    def count(self) -> int:
        return sum(len(r) for r in self.results)


def wait_for(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {timeout_s} s")


def _alias_version(url: str, alias: str) -> int | None:
    status, body = _get_json(f"{url}/models")
    return body["aliases"].get(alias) if status == 200 else None


@pytest.mark.integration
@pytest.mark.slow
def test_alias_moves_are_hot_swapped_without_a_failed_request(trained: Trained, service: Service) -> None:
    """Under concurrent load, the champion alias moves to a new version and back (a rollback):
    the service follows both moves by itself, every request succeeds, and each answer is the
    named version's own probability."""
    from mlflow.tracking import MlflowClient

    cfg = trained.cfg
    client = MlflowClient(cfg.mlflow.tracking_uri)
    original = int(_champion(cfg).version)
    wait_for(lambda: _alias_version(service.url, "champion") == original, 30, "the service serves the registry's champion")
    toy = register_toy_version(cfg, Horizon.of(impressions=IMPRESSION_BATCHES - 1, clicks=CLICK_BATCHES - 1))
    scored = _rows_covering_every_entity(trained.bronze)[0]
    # Expected answers, computed apart from the service: the toy formula on the reference
    # features, and the registered champion's own probability in onnxruntime.
    reference = {**reference_features(trained.bronze, cfg.features, scored, SCORING_TIME), **scored}
    toy_expected = toy_probability(reference)
    _, before = _post_json(f"{service.url}/predict", scored)
    original_expected = before["predictions"][0]["probability"]
    assert before["model"]["version"] == original and abs(toy_expected - original_expected) > 1e-3
    _, models_before = _get_json(f"{service.url}/models")
    try:
        with LoadGenerator(f"{service.url}/predict", scored) as load:
            time.sleep(1)
            client.set_registered_model_alias(cfg.mlflow.registered_model, "champion", str(toy))
            wait_for(lambda: _alias_version(service.url, "champion") == toy, 30, "the new champion is served")
            served_toy_at = load.count
            wait_for(lambda: load.count > served_toy_at + 20, 30, "requests on the new champion")
            client.set_registered_model_alias(cfg.mlflow.registered_model, "champion", str(original))  # rollback
            wait_for(lambda: _alias_version(service.url, "champion") == original, 30, "the rollback is served")
            rolled_back_at = load.count
            wait_for(lambda: load.count > rolled_back_at + 20, 30, "requests after the rollback")
    finally:
        client.set_registered_model_alias(cfg.mlflow.registered_model, "champion", str(original))
    answers = [a for thread in load.results for a in thread]
    assert len(answers) > 60 and {status for status, _, _ in answers} == {200}
    by_version: dict[int, set[float]] = {}
    for _, version, probability in answers:
        by_version.setdefault(version, set()).add(probability)  # type: ignore[arg-type]
    assert set(by_version) == {original, toy}
    (toy_answer,) = by_version[toy]  # one answer per version: never a mix of the two
    assert toy_answer == pytest.approx(toy_expected, rel=1e-5)
    assert by_version[original] == {original_expected}
    # Per client: old version, then the new, then the old again; never back and forth.
    for thread in load.results:
        versions = [v for _, v, _ in thread]
        changes = [b for a, b in zip(versions, versions[1:]) if a != b]
        assert changes in ([toy, original], [toy], [original], []), changes
    status, models = _get_json(f"{service.url}/models")
    assert status == 200 and models["aliases"]["champion"] == original
    assert models["swaps"] >= models_before["swaps"] + 2
    loaded = {v["version"]: v for v in models["versions"]}
    assert loaded[original]["horizon"] == {"impressions": IMPRESSION_BATCHES - 1, "clicks": CLICK_BATCHES - 1}
    metrics = urllib.request.urlopen(f"{service.url}/metrics", timeout=10).read().decode()
    assert f'lambda_ml_model_version{{alias="champion"}} {original}.0' in metrics
    assert 'lambda_ml_http_errors_total{route="/predict"} 0.0' in metrics


@pytest.mark.integration
@pytest.mark.slow
def test_the_api_fuzzed_from_its_openapi_document_never_answers_5xx(service: Service) -> None:
    """Requests generated from the running service's own OpenAPI document, valid and invalid
    (schemathesis positive and negative modes), against the real champion and views: never a
    server error. Strategies are drawn per operation here: schemathesis' pytest loader
    (``from_fixture``) sets ``Function._nodeid``, which pytest 9 no longer has."""
    fuzz_never_5xx(schemathesis.openapi.from_url(f"{service.url}/openapi.json"), max_examples=40)


@pytest.mark.integration
@pytest.mark.slow
def test_a_model_update_on_kafka_swaps_at_once_and_a_stale_one_is_ignored(trained: Trained) -> None:
    """With the registry polled only hourly, an update record on the real broker's compacted
    topic makes the service load the moved alias within seconds; an update from an older
    generation is ignored, a newer one applied."""
    from kafka import KafkaProducer
    from mlflow.tracking import MlflowClient

    from lambda_ml_cli import stack

    cfg = isolated(trained.cfg, REGISTERED_MODEL, topic_prefix="upd")  # own topics; same model and lake
    cfg = cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"poll_interval_s": 3600, "views_refresh_s": 3600})})
    stack.create_topics(cfg)
    topic = cfg.kafka.topics.model_updates.name
    client = MlflowClient(cfg.mlflow.tracking_uri)
    original = int(_champion(cfg).version)
    toy = register_toy_version(cfg, Horizon.of(impressions=IMPRESSION_BATCHES - 1, clicks=CLICK_BATCHES - 1))
    producer = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, acks="all")

    def publish(version: int, generation: tuple[int, int]) -> None:
        producer.send(topic, key=contract.model_update_key(REGISTERED_MODEL, "champion"),
                      value=_update(version, generation, model=REGISTERED_MODEL)).get(timeout=30)  # fmt: skip

    try:
        with TestClient(create_app(cfg), base_url="http://localhost") as http:
            listener = http.app.state.model_updates  # type: ignore[attr-defined]
            assert http.get("/models").json()["aliases"]["champion"] == original
            client.set_registered_model_alias(REGISTERED_MODEL, "champion", str(toy))
            time.sleep(2)
            assert http.get("/models").json()["aliases"]["champion"] == original  # no poll for an hour
            publish(toy, (10, 10))
            wait_for(lambda: http.get("/models").json()["aliases"]["champion"] == toy, 30, "the update is applied")
            # Older generation: ignored, even though the registry moved.
            client.set_registered_model_alias(REGISTERED_MODEL, "champion", str(original))
            publish(original, (9, 10))
            wait_for(lambda: listener.stale == 1, 30, "the stale update is seen")
            assert http.get("/models").json()["aliases"]["champion"] == toy
            publish(original, (11, 10))
            wait_for(lambda: http.get("/models").json()["aliases"]["champion"] == original, 30, "the newer update is applied")
            metrics = http.get("/metrics").text
            assert 'lambda_ml_model_updates_total{outcome="applied"} 2.0' in metrics
            assert 'lambda_ml_model_updates_total{outcome="stale"} 1.0' in metrics
    finally:
        producer.close()
        client.set_registered_model_alias(REGISTERED_MODEL, "champion", str(original))


@pytest.mark.integration
@pytest.mark.slow
def test_mlflow_down_keeps_serving_the_loaded_model_and_recovers(trained: Trained, service: Service) -> None:
    """The MLflow server stopped (by its PID) under load: every request is still answered by the
    loaded champion; the log says so once, /metrics counts it, /health (degraded) and /ready
    (still 200) name the registry. Started again, the log says so once, /health is ok, and the
    service reads the registry by itself: an alias moved afterwards is swapped in."""
    from mlflow.tracking import MlflowClient

    from lambda_ml_cli.stack import MlflowServer

    cfg = trained.cfg
    server = MlflowServer(cfg)
    pid = server.process.pid()
    assert pid is not None
    champion = int(_champion(cfg).version)
    wait_for(lambda: _alias_version(service.url, "champion") == champion, 30, "the service serves the registry's champion")
    scored = _rows_covering_every_entity(trained.bronze)[0]
    _, before = _post_json(f"{service.url}/predict", scored)
    described = f"MLflow registry at {cfg.mlflow.tracking_uri}"
    logged_before = len(service.log_file.read_text().splitlines())
    try:
        with LoadGenerator(f"{service.url}/predict", scored, threads=2) as load:
            assert server.process.stop()  # SIGTERM to its process group, by PID
            assert server.process.pid() is None and not server.is_ready()
            outage = wait_for(
                lambda: [p for p in _get_json(f"{service.url}/health")[1]["problems"] if p.startswith("registry: ")],
                30, "/health reports the registry outage",
            )  # fmt: skip
            during = load.count
            wait_for(lambda: load.count > during + 20, 30, "requests during the outage")
            ready_status, ready = _get_json(f"{service.url}/ready")
            health = _get_json(f"{service.url}/health")[1]
            metrics = urllib.request.urlopen(f"{service.url}/metrics", timeout=10).read().decode()
    finally:
        server.start()  # same port, same sqlite store
    assert outage[0].startswith(f"registry: {described}: unreachable (") and "serving the loaded versions (champion v" in outage[0]
    assert ready_status == 200 and ready["ready"] is True and outage[0] in ready["problems"]
    assert health["status"] == "degraded" and health["ready"] is True
    assert _metric(metrics, "lambda_ml_dependency_up", dependency="registry") == 0
    assert _metric(metrics, "lambda_ml_dependency_failures_total", dependency="registry") >= 1
    assert _metric(metrics, "lambda_ml_reload_failures_total", what="models") >= 1
    answers = [a for thread in load.results for a in thread]
    assert {status for status, _, _ in answers} == {200}
    assert {(v, p) for _, v, p in answers} == {(champion, before["predictions"][0]["probability"])}
    wait_for(lambda: _get_json(f"{service.url}/health")[1]["problems"] == [], 30, "/health clears after MLflow returns")
    assert _get_json(f"{service.url}/health")[1]["status"] == "ok"
    metrics = urllib.request.urlopen(f"{service.url}/metrics", timeout=10).read().decode()
    assert _metric(metrics, "lambda_ml_dependency_up", dependency="registry") == 1
    # One line when it failed, one when it came back, however many polls failed in between.
    logged = service.log_file.read_text().splitlines()[logged_before:]
    failed = [line for line in logged if f"{described}: unreachable (" in line]
    back = [line for line in logged if re.search(rf"{re.escape(described)}: reachable again after \d+ s$", line)]
    assert len(failed) == 1 and failed[0].endswith(outage[0].split(": unreachable ", 1)[1]) and len(back) == 1, logged
    client = MlflowClient(cfg.mlflow.tracking_uri)
    toy = register_toy_version(cfg, Horizon.of(impressions=IMPRESSION_BATCHES - 1, clicks=CLICK_BATCHES - 1))
    try:
        client.set_registered_model_alias(cfg.mlflow.registered_model, "champion", str(toy))
        wait_for(lambda: _alias_version(service.url, "champion") == toy, 30, "an alias move after the outage is served")
    finally:
        client.set_registered_model_alias(cfg.mlflow.registered_model, "champion", str(champion))
    wait_for(lambda: _alias_version(service.url, "champion") == champion, 30, "the champion is restored")


# --------------------------------------------------------------------------- view merge, exact


def _bucket_cells(rows: Any, keys: tuple[str, ...], aggregates: list[str]) -> dict[tuple[str, ...], dict[int, tuple[Any, ...]]]:
    """Collected Spark rows -> key -> bucket start (epoch µs) -> aggregate values."""
    cells: dict[tuple[str, ...], dict[int, tuple[Any, ...]]] = {}
    for r in rows:
        start = to_micros(r[contract.VIEW_BUCKET_COLUMN].astimezone(UTC))
        cells.setdefault(tuple(r[k] for k in keys), {})[start] = tuple(r[a] for a in aggregates)
    return cells


def _entity_part(features: dict[str, float], declared: Any, entity: str) -> dict[str, float]:
    names = {contract.window_feature_name(entity, s, w) for s in [*declared.aggregates, *declared.ratios] for w in declared.windows}
    return {k: v for k, v in features.items() if k in names}


def _served_cells(buckets: EntityBuckets, aggregates: list[str]) -> dict[int, tuple[Any, ...]]:
    return {start: tuple(buckets.values[a][n] for a in aggregates) for n, start in enumerate(buckets.starts)}


@pytest.mark.integration
@pytest.mark.slow
def test_batch_view_merged_with_increments_equals_the_batch_recompute(cfg: PlatformConfig, spark: Any, tmp_path: Path) -> None:
    """views(v) ⊕ increments(after v) == views recomputed at v', exactly, for every entity, key
    and bucket; increments written by the speed layer's own foreachBatch body
    (``IncrementsWriter``) on the bronze change feed read as a static frame (resent events
    across the horizon, late clicks of old impressions and clicks whose impression arrives later
    included). A row the batch view already counts is left out. /features serves the merge,
    equal to the definition on the raw events."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from batch_layer.snapshot import read_snapshot
    from lambda_ml_apps.ctr.events import clean_events
    from batch_layer.views import build_views, write_views
    from lambda_ml_apps.ctr.events import attribute_clicks, feature_events
    from support import CLICK, IMPRESSION
    from lambda_ml_apps.ctr.events import stream_feature_events
    from speed_layer.increments import IncrementsWriter, increments_path
    from speed_layer.ingest import ensure_tables

    cfg = isolated(cfg, "merge-test", lake_root=tmp_path / "lake")
    declared = cfg.features
    aggregates = list(declared.aggregates)
    bronze = seeded_bronze()

    def append(event: Any, rows: list[tuple[Any, ...]]) -> None:
        spark.createDataFrame(rows, event.bronze_schema()).write.format("delta").mode("append").save(
            cfg.lake.table("bronze", event.name)
        )

    def events_of(snapshot: Any) -> Any:
        impressions, clicks = clean_events(snapshot, cfg)
        attributed = attribute_clicks(impressions, clicks, cfg.ctr.attribution_window_minutes)
        return feature_events(impressions, attributed, declared)

    def first_deliveries(event: Any) -> Any:
        """Bronze as the speed layer's silver stream sees it, static: the change feed's inserts
        stamped with their commit version, the first delivery of each event id kept."""
        version = contract.increment_version_column(event.name)
        changes = spark.read.format("delta").option("readChangeFeed", "true").option("startingVersion", 0).load(
            cfg.lake.table("bronze", event.name)
        )
        stamped = changes.where(F.col("_change_type") == "insert").select(*event.field_names, F.col("_commit_version").alias(version))
        first = Window.partitionBy("event_id").orderBy(version, "event_time")
        return stamped.withColumn("_delivery", F.row_number().over(first)).where(F.col("_delivery") == 1).drop("_delivery")

    # Bronze (created with its change feed, version 0) up to v: two commits per table; after v:
    # one more, with the rest of the events.
    ensure_tables(spark, cfg)
    cut_i, cut_c = int(len(bronze.impressions) * 0.6), int(len(bronze.clicks) * 0.6)
    for event, rows, cut in ((IMPRESSION, bronze.impressions, cut_i), (CLICK, bronze.clicks, cut_c)):
        append(event, rows[: cut // 2])
        append(event, rows[cut // 2 : cut])
    at_v = read_snapshot(spark, cfg)
    assert at_v.horizon == Horizon.of(impressions=2, clicks=2)
    write_views(build_views(events_of(at_v), declared, at_v.horizon), cfg)
    append(IMPRESSION, bronze.impressions[cut_i:])
    append(CLICK, bronze.clicks[cut_c:])
    at_w = read_snapshot(spark, cfg)
    assert at_w.horizon == Horizon.of(impressions=3, clicks=3)

    # The speed layer's increments: its micro-batch body on every bronze event, which keeps
    # only the rows after the published views' horizon v.
    events = stream_feature_events(first_deliveries(IMPRESSION), first_deliveries(CLICK), cfg)
    written = IncrementsWriter(cfg)(events, 0)
    assert all(n > 0 for n in written.values()), written
    recomputed = build_views(events_of(at_w), declared, at_w.horizon)
    expected: dict[str, dict[tuple[str, ...], dict[int, tuple[Any, ...]]]] = {}
    imp_version, clk_version = contract.increment_version_column("impressions"), contract.increment_version_column("clicks")
    for name, entity in declared.entities.items():
        path = increments_path(cfg, name)
        # A row the merge must leave out, with absurd counts: an impression of bronze v1 (in
        # the batch view at v), as a speed layer that has not pruned yet still holds it.
        old = spark.read.format("delta").load(path).limit(1).withColumn("impressions", F.lit(10**6).cast("long"))
        old.withColumn(imp_version, F.lit(1).cast("long")).withColumn(clk_version, F.lit(None).cast("long")) \
            .write.format("delta").mode("append").save(path)  # fmt: skip
        expected[name] = _bucket_cells(recomputed[name].collect(), entity.keys, aggregates)

    views = load_batch_views(cfg)
    assert views.horizon == Horizon.of(impressions=2, clicks=2)
    overlapping = changed = 0
    for name, entity in declared.entities.items():
        view = views.views[name]
        assert view.increments.through == Horizon.of(impressions=3, clicks=3)
        assert (view.increments.used, view.increments.already_in_batch) == (written[name], 1)
        assert set(view.merged or {}) == set(expected[name]), name
        for key, cells in expected[name].items():
            assert _served_cells(view.lookup(key), aggregates) == cells, (name, key)
            batch, speed = _served_cells(view.batch_part(key), aggregates), _served_cells(view.speed_part(key), aggregates)
            overlapping += len(set(batch) & set(speed))
            changed += batch != cells
    # The increments are not trivial: they change many keys and add to buckets the batch has.
    assert changed > 50 and overlapping > 50

    # /features serves the merge: equal to the definition on every raw event, batch and speed
    # parts beside it.
    models: Reloadable[ServedModels] = Reloadable("models", lambda: served(toy_model()))
    with TestClient(create_app(cfg, models=models, poll=False, clock=lambda: SCORING_TIME), base_url="http://localhost") as client:
        for user in bronze.users[:10]:
            body = client.get(f"/features/user/{user}").json()
            reference = reference_features(bronze, declared, {"user_id": user, "item_id": "-", "device": "-"}, SCORING_TIME)
            assert body["merged"]["features"] == _entity_part(reference, declared, "user"), user
            assert body["horizon"] == {"impressions": 2, "clicks": 2}
            assert body["increments"] == {"through": {"impressions": 3, "clicks": 3}, "rows_merged": written["user"], "rows_in_batch": 1}
            batch_n, speed_n = body["batch"]["features"]["user_impressions_7d"], body["speed"]["features"]["user_impressions_7d"]
            assert batch_n + speed_n == body["merged"]["features"]["user_impressions_7d"]
        user, device = bronze.users[0], "mobile"
        body = client.get(f"/features/user_device/{user}/{device}").json()
        assert body["key"] == {"user_id": user, "device": device}
        reference = reference_features(bronze, declared, {"user_id": user, "item_id": "-", "device": device}, SCORING_TIME)
        assert body["merged"]["features"] == _entity_part(reference, declared, "user_device")
        assert client.get("/features/user_device/u1").status_code == 422
        missing = client.get("/features/shop/s1")
        assert missing.status_code == 404 and missing.json()["detail"][0]["field"] == "path.entity"
        bad_time = client.get("/features/user/u1?at=yesterday")
        assert bad_time.status_code == 422 and bad_time.json()["detail"][0]["field"] == "query.at"


# --------------------------------------------------------------------------- prediction log, A/B, online evaluation


def read_topic(cfg: PlatformConfig, topic: str, expected: int, timeout_s: float = 60) -> list[dict[str, Any]]:
    """Every record of ``topic`` as JSON, waiting until there are at least ``expected``."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=cfg.kafka.bootstrap_servers, group_id=None, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert partitions, f"topic {topic} does not exist"
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records += [json.loads(r.value) for r in batch]
            ends = consumer.end_offsets(partitions)
            if len(records) >= expected and all(consumer.position(p) >= ends[p] for p in partitions):
                return records
        pytest.fail(f"{topic}: {len(records)} record(s), expected {expected}, within {timeout_s} s")
    finally:
        consumer.close()


def _logged_fields(record: dict[str, Any]) -> tuple[Any, ...]:
    return (record["request_id"], record["event_id"], record["user_id"], record["item_id"], record["policy"],
            record["arm"], record["version"], record["probability"])  # fmt: skip


def _write_clicks(spark: Any, cfg: PlatformConfig, clicks: list[tuple[str, str, datetime]]) -> None:
    from support import CLICK

    landed = datetime.now(UTC)
    rows = [(f"clk-{n}", impression, at, "clicks", 0, n, at, landed) for n, (_, impression, at) in enumerate(clicks)]
    spark.createDataFrame(rows, CLICK.bronze_schema()).write.format("delta").mode("append").save(cfg.lake.table("bronze", "clicks"))


@pytest.mark.integration
@pytest.mark.slow
def test_the_prediction_log_equals_the_answers_and_online_auc_equals_sklearn(trained: Trained, spark: Any, tmp_path: Path) -> None:
    """Under the ab policy (40 % of users to the challenger), every answer reaches the real
    predictions topic as a record equal to it; each user keeps one arm. The evaluation job joins
    the log with clicks written to bronze; the AUC, log loss and counts it logs to MLflow per
    version equal scikit-learn's over the same rows joined here, apart from the job."""
    from mlflow.tracking import MlflowClient
    from sklearn.metrics import log_loss, roc_auc_score

    from lambda_ml_apps.ctr import online_eval
    from lambda_ml_cli import stack

    cfg = isolated(trained.cfg, REGISTERED_MODEL, topic_prefix="plog", lake_root=tmp_path / "lake")
    serving = cfg.serving.model_copy(update={
        "policy": "ab", "ab": cfg.serving.ab.model_copy(update={"challenger_fraction": 0.4}),
        "poll_interval_s": 3600.0, "views_refresh_s": 3600.0,
    })  # fmt: skip
    cfg = cfg.model_copy(update={"serving": serving})
    # The service reads the module's views; only bronze clicks come from this test's own lake.
    service_cfg = cfg.model_copy(update={"lake": trained.cfg.lake})
    stack.create_topics(cfg)
    topic = cfg.kafka.topics.predictions.name
    client = MlflowClient(cfg.mlflow.tracking_uri)
    champion = int(_champion(cfg).version)
    toy = register_toy_version(cfg, Horizon.of(impressions=IMPRESSION_BATCHES - 1, clicks=CLICK_BATCHES - 1))
    client.set_registered_model_alias(REGISTERED_MODEL, "challenger", str(toy))
    users = [*trained.bronze.users, *(f"visitor-{n}" for n in range(400))]
    items = trained.bronze.items
    rows = [
        {"user_id": u, "item_id": items[n % len(items)], "device": ("mobile", "desktop", "tablet")[n % 3],
         "position": 1 + n % 5, "event_id": f"ev-{n}", "event_time": (SCORING_TIME + timedelta(seconds=n)).isoformat()}
        for n, u in enumerate(users)
    ]  # fmt: skip
    answers: list[tuple[Any, ...]] = []
    try:
        with TestClient(create_app(service_cfg), base_url="http://localhost") as http:
            requests = [rows[n : n + 7] for n in range(0, len(rows), 7)] + [rows[:3]]  # the last one asked twice
            for batch in requests:
                response = http.post("/predict", json={"rows": batch})
                assert response.status_code == 200, response.text
                body = response.json()
                assert response.headers["x-request-id"] == body["request_id"]
                answers += [(body["request_id"], p["event_id"], p["user_id"], p["item_id"], body["policy"], p["arm"],
                             p["version"], p["probability"]) for p in body["predictions"]]  # fmt: skip
            plog = http.app.state.prediction_log  # type: ignore[attr-defined]
            wait_for(lambda: plog.sent == len(answers), 60, "every prediction acknowledged by the broker")
            metrics = http.get("/metrics").text
        assert f'lambda_ml_prediction_log_records_total{{outcome="sent"}} {len(answers)}.0' in metrics
        assert 'lambda_ml_prediction_log_records_total{outcome="dropped"} 0.0' in metrics
        records = read_topic(cfg, topic, len(answers))
        assert sorted(map(_logged_fields, records)) == sorted(answers)
        assert {r["source"] for r in records} == {"http"} and {r["registered_model"] for r in records} == {REGISTERED_MODEL}

        # A/B: one arm per user, the documented hash, near the configured share.
        arm_of_user: dict[str, set[str]] = {}
        for r in records:
            arm_of_user.setdefault(r["user_id"], set()).add(r["arm"])
        assert all(len(a) == 1 for a in arm_of_user.values())
        assert {u: a.pop() for u, a in arm_of_user.items()} == {u: _expected_arm(u, 0.4, cfg.serving.ab.salt) for u in arm_of_user}
        share = sum(1 for u in users if _expected_arm(u, 0.4, cfg.serving.ab.salt) == "challenger") / len(users)
        assert abs(share - 0.4) < 0.1, share  # about 4 standard deviations for this many users
        assert {(r["arm"], r["version"]) for r in records} == {("champion", champion), ("challenger", toy)}

        # Clicks: about a third of the impressions, half of them inside the 30-minute window, one
        # twice, one before its impression and one on an impression never scored.
        rng = random.Random(11)
        window = timedelta(minutes=cfg.ctr.attribution_window_minutes)
        times = {r["event_id"]: datetime.fromisoformat(r["event_time"]) for r in rows}
        clicks = []
        for event_id, at in times.items():
            if rng.random() < 0.35:
                clicks.append(("c", event_id, at + timedelta(minutes=rng.uniform(0, 60))))
        clicks += [clicks[0], ("c", "ev-5", times["ev-5"] - timedelta(minutes=1)), ("c", "never-scored", SCORING_TIME)]
        _write_clicks(spark, cfg, clicks)
        until = SCORING_TIME + timedelta(seconds=len(rows) - 60) + window  # the last 59 impressions are too recent

        run_id, (result,) = online_eval.run(spark, cfg, until=until, tag=True, min_rows=10)
        logged = client.get_run(run_id).data.metrics

        # The same join, here: one record per (event, version), labels from the click list.
        kept: dict[tuple[str, int], dict[str, Any]] = {}
        for r in records:
            if times[r["event_id"]] + window <= until:
                kept.setdefault((r["event_id"], r["version"]), r)
        clicked = {e for _, e, at in clicks if e in times and times[e] <= at <= times[e] + window}
        assert 0 < len(clicked) < len(kept) and len(kept) == len(rows) - 59  # ev-0 .. ev-(n - 60) inclusive
        for version in (champion, toy):
            mine = [r for (_, v), r in kept.items() if v == version]
            labels = [1.0 if r["event_id"] in clicked else 0.0 for r in mine]
            scores = [r["probability"] for r in mine]
            assert logged[f"v{version}.rows"] == len(mine) and logged[f"v{version}.positives"] == sum(labels)
            assert logged[f"v{version}.auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
            assert logged[f"v{version}.log_loss"] == pytest.approx(log_loss(labels, scores), rel=1e-9)
            assert result.by_version[version].auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
            arm = "champion" if version == champion else "challenger"
            assert logged[f"arm.{arm}.rows"] == len(mine)
            tags = client.get_model_version(REGISTERED_MODEL, str(version)).tags
            assert float(tags[contract.TAG_QUALITY_SCORE]) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    finally:
        client.delete_registered_model_alias(REGISTERED_MODEL, "challenger")
        for version in (champion, toy):
            try:
                client.delete_model_version_tag(REGISTERED_MODEL, str(version), contract.TAG_QUALITY_SCORE)
            except Exception:  # noqa: BLE001 - not written if the test failed before
                pass


@pytest.mark.integration
@pytest.mark.slow
def test_stream_scoring_equals_predict_and_stops_cleanly_on_sigterm(trained: Trained, tmp_path: Path) -> None:
    """``lambda-ml serve stream`` scores impressions from the real broker into the predictions
    topic with the probabilities /predict gives the same rows; invalid records are skipped and
    counted; SIGTERM exits 0 with the offsets committed, so a restart scores nothing twice."""
    from kafka import KafkaProducer

    from lambda_ml_cli import stack
    from lambda_ml.config import write_config

    cfg = isolated(trained.cfg, REGISTERED_MODEL, topic_prefix="stream")
    stack.create_topics(cfg)
    config_file = write_config(cfg, tmp_path / "platform.yaml")
    rows = [{**r, "event_id": f"imp-{n}"} for n, r in enumerate(_rows_covering_every_entity(trained.bronze))]
    producer = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, acks="all")
    for r in rows[:20]:
        producer.send(cfg.events.topic("impressions").name, key=r["user_id"].encode(), value=json.dumps(r).encode())
    producer.send(cfg.events.topic("impressions").name, value=b'{"event_id": "broken"')
    producer.send(cfg.events.topic("impressions").name, value=json.dumps({**rows[0], "position": "top"}).encode())
    producer.flush()
    log_file = tmp_path / "stream.log"
    command = [sys.executable, "-m", "lambda_ml_cli.cli", "--config", str(config_file), "serve", "stream", "--batch-size", "16"]
    with log_file.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT, start_new_session=True)
    try:
        read_topic(cfg, cfg.kafka.topics.predictions.name, 20, timeout_s=120)
        for r in rows[20:]:  # while it runs
            producer.send(cfg.events.topic("impressions").name, key=r["user_id"].encode(), value=json.dumps(r).encode())
        producer.flush()
        records = read_topic(cfg, cfg.kafka.topics.predictions.name, len(rows), timeout_s=120)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_file.read_text()
    finally:
        producer.close()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    output = log_file.read_text()
    assert "skipped 2 invalid" in output and "SIGTERM received" in output, output
    assert 'bad value for position: expected an integer, got "top"' in output  # the bad field is named
    by_event = {r["event_id"]: r for r in records}
    assert len(records) == len(by_event) == len(rows) and {r["source"] for r in records} == {"stream"}

    with TestClient(create_app(cfg, poll=False), base_url="http://localhost") as http:
        answer = http.post("/predict", json={"rows": rows}).json()
    for r, p in zip(rows, answer["predictions"], strict=True):
        streamed = by_event[r["event_id"]]
        assert (streamed["user_id"], streamed["item_id"], streamed["version"]) == (r["user_id"], r["item_id"], answer["model"]["version"])
        # The same code and graph; float32 kernels may differ in the last bits between batch sizes.
        assert streamed["probability"] == pytest.approx(p["probability"], rel=1e-6)

    # Restarted on the same consumer group: everything was committed, nothing is scored again.
    again = subprocess.run([*command, "--stop-when-idle", "5"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(read_topic(cfg, cfg.kafka.topics.predictions.name, len(rows))) == len(rows)


@pytest.mark.integration
@pytest.mark.slow
def test_stream_scoring_reads_an_avro_impressions_topic_as_predict_scores_its_rows(trained: Trained) -> None:
    """With kafka.topics.impressions.format avro, the impressions the producers' encoder wrote to
    the real broker are scored with the probabilities /predict gives the same rows; a record
    that does not decode is skipped and counted, and the stream goes on."""
    import threading

    from kafka import KafkaProducer

    from lambda_ml import avro
    from lambda_ml_cli import stack
    from lambda_ml_apps.ctr.stream import StreamScorer

    cfg = avro_impressions(isolated(trained.cfg, REGISTERED_MODEL, topic_prefix="stream-avro"))
    stack.create_topics(cfg)
    topic = cfg.events.topic("impressions").name
    schema = avro.load_schema(avro.schema_path(cfg.kafka.avro_schemas, "impressions"))
    rows = [{**r, "event_id": f"avro-{n}"} for n, r in enumerate(_rows_covering_every_entity(trained.bronze))]
    producer = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers, acks="all")
    try:
        for n, r in enumerate(rows):
            producer.send(topic, key=r["user_id"].encode(), value=avro.encode(r, schema))
            if n == 10:
                producer.send(topic, key=r["user_id"].encode(), value=json.dumps(r).encode())  # JSON on an Avro topic
                producer.send(topic, key=r["user_id"].encode(), value=avro.encode(r, schema)[:-1])  # cut short
        producer.flush()
    finally:
        producer.close()

    scorer = StreamScorer(cfg, group_id="stream-avro-test", batch_size=16)
    stop = threading.Event()
    running = threading.Thread(target=scorer.run, args=(stop,), daemon=True)
    running.start()
    try:
        records = read_topic(cfg, cfg.kafka.topics.predictions.name, len(rows), timeout_s=120)
    finally:
        stop.set()
        running.join(timeout=60)
    assert not running.is_alive()
    assert (scorer.progress.read, scorer.progress.scored, scorer.progress.invalid) == (len(rows) + 2, len(rows), 2)
    by_event = {r["event_id"]: r for r in records}
    assert len(records) == len(by_event) == len(rows) and {r["source"] for r in records} == {"stream"}

    with TestClient(create_app(cfg, poll=False), base_url="http://localhost") as http:
        answer = http.post("/predict", json={"rows": rows}).json()
    assert answer["predictions"] and len(answer["predictions"]) == len(rows)
    for r, p in zip(rows, answer["predictions"], strict=True):
        streamed = by_event[r["event_id"]]
        assert (streamed["user_id"], streamed["item_id"], streamed["device"], streamed["position"], streamed["event_time"]) == (
            r["user_id"], r["item_id"], r["device"], r["position"], r["event_time"])  # fmt: skip
        assert streamed["version"] == answer["model"]["version"]
        # The same code and graph; float32 kernels may differ in the last bits between batch sizes.
        assert streamed["probability"] == pytest.approx(p["probability"], rel=1e-6)


@pytest.mark.integration
@pytest.mark.slow
def test_kafka_down_keeps_serving_and_the_prediction_log_recovers(trained: Trained, service: Service) -> None:
    """The broker stopped (by its PID) under the running service: every request is still
    answered, with the same views and model; the prediction log holds its records meanwhile and
    delivers them, and the ones after, once the broker is back."""
    from lambda_ml_cli.stack import KafkaBroker

    cfg = trained.cfg
    topic = cfg.kafka.topics.predictions.name
    broker = KafkaBroker(cfg)
    assert broker.process.pid() is not None
    base = _rows_covering_every_entity(trained.bronze)[0]
    _, before = _post_json(f"{service.url}/predict", {**base, "event_id": "kafka-before"})
    expected = (before["model"]["version"], before["predictions"][0]["probability"], before["views"])
    existing = len(read_topic(cfg, topic, 1))
    during: list[tuple[int, Any]] = []
    try:
        assert broker.stop() and broker.process.pid() is None and not broker.is_ready()
        started = time.monotonic()
        for n in range(40):
            during.append(_post_json(f"{service.url}/predict", {**base, "event_id": f"kafka-during-{n}"}))
        took = time.monotonic() - started
        metrics = urllib.request.urlopen(f"{service.url}/metrics", timeout=10).read().decode()
    finally:
        broker.start()
    assert {status for status, _ in during} == {200}
    assert {(b["model"]["version"], b["predictions"][0]["probability"], json.dumps(b["views"])) for _, b in during} == {
        (expected[0], expected[1], json.dumps(expected[2]))
    }
    assert took < 10, f"40 requests took {took:.1f} s with Kafka down"
    assert 'lambda_ml_prediction_log_records_total{outcome="dropped"} 0.0' in metrics
    for n in range(5):
        assert _post_json(f"{service.url}/predict", {**base, "event_id": f"kafka-after-{n}"})[0] == 200
    records = read_topic(cfg, topic, existing + 45, timeout_s=180)
    ids = {r["event_id"] for r in records}
    assert {f"kafka-during-{n}" for n in range(40)} <= ids and {f"kafka-after-{n}" for n in range(5)} <= ids


# --------------------------------------------------------------------------- point in time
# A hand-made lake (written with deltalake, no Spark): user u9's impressions P (09:50, desktop)
# and A, B, C (10:05, 10:20, 10:40, mobile), clicks on A at 10:10 (sent twice), on P at 10:15,
# on B at 10:20 (B's own instant) and on A at 10:50 (after the 30 min window: never counted).

def _at(hhmm: str, micros: int = 0) -> datetime:
    hours, minutes = map(int, hhmm.split(":"))
    return datetime(2026, 11, 22, hours, minutes, tzinfo=UTC) + timedelta(microseconds=micros)


def _write_small_lake(cfg: PlatformConfig) -> None:
    from support import CLICK, IMPRESSION

    time_type = pa.timestamp("us", tz="UTC")
    shown = [("P", "09:50", "desktop", 2), ("A", "10:05", "mobile", 3), ("B", "10:20", "mobile", 1), ("C", "10:40", "mobile", 4)]
    impressions = pa.table({
        "event_id": [e for e, *_ in shown], "event_time": pa.array([_at(t) for _, t, *_ in shown], time_type),
        "user_id": ["u9"] * 4, "item_id": ["i9"] * 4, "device": [d for *_, d, _ in shown],
        "position": pa.array([p for *_, p in shown], pa.int32()),
    })  # fmt: skip
    clicked = [("cA", "A", "10:10"), ("cA", "A", "10:10"), ("cP", "P", "10:15"), ("cB", "B", "10:20"), ("cA2", "A", "10:50")]
    clicks = pa.table({
        "event_id": [c for c, _, _ in clicked], "impression_id": [i for _, i, _ in clicked],
        "event_time": pa.array([_at(t) for *_, t in clicked], time_type),
    })  # fmt: skip
    for event, table in ((IMPRESSION, impressions), (CLICK, clicks)):
        write_deltalake(cfg.lake.table("bronze", event.name), table, mode="overwrite")
    # The batch views of these events: (hour, impressions, clicks, top position) per key.
    nine, ten = to_micros(_at("09:00")), to_micros(_at("10:00"))
    rows = {
        "user": {("u9",): [(nine, 1, 0, 2.0), (ten, 3, 3, 1.0)]},
        "item": {("i9",): [(nine, 1, 0, 2.0), (ten, 3, 3, 1.0)]},
        "user_device": {("u9", "desktop"): [(nine, 1, 0, 2.0), (ten, 0, 1, None)], ("u9", "mobile"): [(ten, 3, 2, 1.0)]},
    }
    for entity, by_key in rows.items():
        flat = [(key, bucket) for key, buckets in by_key.items() for bucket in buckets]
        table = pa.table({
            **{name: [key[i] for key, _ in flat] for i, name in enumerate(KEYS[entity])},
            "bucket_start": pa.array([b[0] for _, b in flat], pa.int64()).cast(time_type),
            "impressions": pa.array([b[1] for _, b in flat], pa.int64()), "clicks": pa.array([b[2] for _, b in flat], pa.int64()),
            "top_position": pa.array([b[3] for _, b in flat], pa.float64()),
            "horizon_impressions": pa.array([0] * len(flat), pa.int64()), "horizon_clicks": pa.array([0] * len(flat), pa.int64()),
        })  # fmt: skip
        write_deltalake(cfg.lake.table(*contract.view_table(entity)), table, mode="overwrite")


@pytest.mark.parametrize(
    ("at", "shown_1h", "shown_24h", "clicked", "device_clicked", "top"),
    [
        (_at("10:05"), 1, 1, 0, 0, 2.0),  # A's own time: P only; not A, nor A's click
        (_at("10:20"), 2, 2, 2, 1, 2.0),  # B's own time: P, A, the clicks at 10:10 and 10:15; not B's click
        (_at("10:20", 1), 3, 3, 3, 2, 1.0),  # one microsecond later: B and its click too
        (None, 3, 3, 3, 2, 1.0),  # now (10:30 by the clock): C and the click at 10:50 are later
        (_at("11:30"), 3, 4, 3, 2, 1.0),  # after every event: the views' 10:00 row as it is (P's hour left the 1 h)
    ],
)
def test_a_bucket_counts_only_its_events_before_the_scoring_time(
    tmp_path: Path, at: datetime | None, shown_1h: int, shown_24h: int, clicked: int, device_clicked: int, top: float
) -> None:
    from lambda_ml_apps.ctr.model_inputs import row_features

    cfg = unit_cfg(**{"lake.root": str(tmp_path / "lake")})
    _write_small_lake(cfg)
    views = load_batch_views(cfg)
    found = row_features(Row("u9", "i9", "mobile", 2, at), views, cfg.features, NOW)
    names = ["user_impressions_1h", "user_impressions_24h", "user_clicks_1h", "item_clicks_24h", "user_device_clicks_1h",
             "user_top_position_24h", "user_ctr_24h"]  # fmt: skip
    assert {name: found[name] for name in names} == {
        "user_impressions_1h": shown_1h, "user_impressions_24h": shown_24h, "user_clicks_1h": clicked, "item_clicks_24h": clicked,
        "user_device_clicks_1h": device_clicked, "user_top_position_24h": top, "user_ctr_24h": (clicked + 1) / (shown_24h + 21),
    }  # fmt: skip
    assert views.lake is not None and views.lake.reads == (0 if at == _at("11:30") else 1)


def test_a_past_time_whose_bronze_cannot_be_read_is_a_503_never_the_whole_bucket(tmp_path: Path) -> None:
    cfg = unit_cfg(**{"lake.root": str(tmp_path / "lake")})
    _write_small_lake(cfg)
    loaded = load_batch_views(cfg)
    for data in Path(cfg.lake.table("bronze", "clicks")).glob("*.parquet"):
        data.unlink()  # bronze lost its files after the views were loaded
    app = create_app(cfg, models=Reloadable("models", lambda: served(toy_model())), views=Reloadable("views", lambda: loaded), clock=lambda: NOW)
    with TestClient(app, base_url="http://localhost") as test_client:
        response = test_client.get("/features/user/u9", params={"at": _at("10:20").isoformat()})
        assert response.status_code == 503 and "cannot compute the features at" in response.json()["detail"], response.text
        response = test_client.post("/predict", json=row(user_id="u9", event_time=_at("10:20").isoformat()))
        assert response.status_code == 503 and "bronze" in response.json()["detail"], response.text
        # After every event of the lake the views alone are exact: no read, an answer.
        response = test_client.post("/predict", json=row(user_id="u9", event_time=_at("11:30").isoformat()))
        assert response.status_code == 200, response.text
# Features at a past time t count [start of t's bucket - window, t): the views' whole buckets
# before t's bucket, and t's own bucket's events strictly before t, read from bronze. Checked
# against the batch layer's point-in-time training set on generated events landed by the
# ingest's micro-batch body, for impressions whose bucket holds later events and clicks.

PIT_NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
PIT_KAFKA_COLUMNS = "key binary, value binary, topic string, partition int, offset long, timestamp timestamp"


@dataclass(frozen=True)
class PitLake:
    cfg: PlatformConfig
    training: list[dict[str, Any]]  # the training set's rows, in event-time order
    events: list[dict[str, Any]]  # the snapshot's feature events (kind, event_time, user_id, item_id, device)
    impressions: dict[str, bytes]  # event id -> the impression's Kafka record value


@pytest.fixture(scope="module")
def pit_lake(cfg: PlatformConfig, spark: Any, tmp_path_factory: pytest.TempPathFactory) -> PitLake:
    """Generated events landed in bronze in two micro-batches, then the batch layer's views and
    training set of that snapshot (its own code, as ``lambda-ml batch train`` runs it)."""
    from pyspark.sql import functions as F

    from batch_layer.snapshot import read_snapshot
    from lambda_ml_apps.ctr.events import clean_events, labelled_events
    from lambda_ml_apps.ctr.batch import training_rows
    from batch_layer.views import build_views, write_views
    from lambda_ml_apps.ctr import generator
    from lambda_ml.features import KIND, latest_event_time
    from speed_layer import ingest

    lake = isolated(cfg, "pit-serving", lake_root=tmp_path_factory.mktemp("pit") / "lake")
    window = timedelta(minutes=lake.ctr.attribution_window_minutes)
    # Dense enough that most impressions share their hour with later events of their user.
    gen = lake.generator.model_copy(update={"impressions": 2500, "users": 25, "items": 12, "span_hours": 10, "seed": 23})
    records, truth = generator.generate(gen, window, PIT_NOW)
    topics = lake.events.topics()
    ingest.ensure_tables(spark, lake)
    half = len(records) // 2
    for batch_id, part in enumerate((records[:half], records[half:])):
        rows = [(b"k", r.value, topics[r.event_type].name, 0, half * batch_id + n, PIT_NOW) for n, r in enumerate(part)]
        ingest.ingest_batch(spark.createDataFrame(rows, PIT_KAFKA_COLUMNS), batch_id, lake)

    snapshot = read_snapshot(spark, lake)
    impressions, clicks = clean_events(snapshot, lake)
    as_of = latest_event_time(impressions, clicks)
    assert as_of is not None
    events = labelled_events(impressions, clicks, lake, as_of).cache()
    try:
        paths = write_views(build_views(events, lake.features, snapshot.horizon), lake)
        views = {entity: spark.read.format("delta").load(path) for entity, path in paths.items()}
        training = [r.asDict() for r in training_rows(events, lake, views).orderBy("event_time", "event_id").collect()]
        feature_events = [
            r.asDict() for r in events.select(KIND, "event_time", "user_id", "item_id", "device").where(F.col(KIND).isNotNull()).collect()
        ]
    finally:
        events.unpersist()
    shown = {}
    for record in records:
        try:
            shown[json.loads(record.value)["event_id"]] = record.value
        except (ValueError, KeyError, TypeError):
            pass  # a malformed record: quarantined, never an impression
    assert len(training) >= 2000 and truth.impressions == 2500
    return PitLake(lake, training, feature_events, shown)


def _as_utc(value: datetime) -> datetime:
    # Spark hands naive datetimes in the session's time zone (UTC in the tests' sessions).
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _pit_row(training_row: dict[str, Any]) -> PredictRow:
    fields = ("user_id", "item_id", "device")
    return PredictRow(
        **{f: training_row[f] for f in fields}, position=int(training_row["position"]), event_time=_as_utc(training_row["event_time"]),
        event_id=training_row["event_id"],
    )  # fmt: skip


def _later_in_bucket(lake: PitLake) -> tuple[int, int]:
    """Training rows whose user's bucket holds a feature event after the row's time, and those
    whose user's bucket holds an attributed click at or after it (the lake's own events,
    counted here without the service)."""
    def hour_of(at: datetime) -> datetime:
        return at.replace(minute=0, second=0, microsecond=0)

    by_user: dict[tuple[str, datetime], list[tuple[datetime, str]]] = {}
    for event in lake.events:
        at = _as_utc(event["event_time"])
        by_user.setdefault((event["user_id"], hour_of(at)), []).append((at, event["kind"]))
    later = later_clicks = 0
    for r in lake.training:
        at = _as_utc(r["event_time"])
        mine = by_user[(r["user_id"], hour_of(at))]
        later += any(t > at for t, _ in mine)
        later_clicks += any(t >= at and kind == "clicks" for t, kind in mine)
    return later, later_clicks


@pytest.mark.integration
def test_features_at_each_impressions_time_equal_its_training_row(pit_lake: PitLake) -> None:
    from lambda_ml_apps.ctr.model_inputs import row_features
    from serving_layer.views import load_batch_views

    cfg, training = pit_lake.cfg, pit_lake.training
    inputs = contract.model_inputs(cfg.features)
    views = load_batch_views(cfg)
    assert views.lake is not None and views.lake.newest is not None
    whole_bucket = replace(views, lake=None)  # what the service counted before: the bucket's row whole
    mismatched = leaked = 0
    for r in training:
        found = row_features(_pit_row(r), views, cfg.features, PIT_NOW)
        assert {n: float(found[n]) for n in inputs.numeric} == {n: r[n] for n in inputs.numeric}, r["event_id"]
        assert {n: str(found[n]) for n in inputs.categorical} == {n: r[n] for n in inputs.categorical}, r["event_id"]
        old = row_features(_pit_row(r), whole_bucket, cfg.features, PIT_NOW)
        mismatched += old != found
        leaked += any(old[f"{e}_clicks_1h"] > found[f"{e}_clicks_1h"] for e in cfg.features.entities)
    later, later_clicks = _later_in_bucket(pit_lake)
    assert len(training) >= 2000 and later >= len(training) // 2 and later_clicks >= 300, (len(training), later, later_clicks)
    # Counting whole buckets would have got most rows wrong, and shown many their bucket's later clicks.
    assert mismatched >= len(training) // 2 and leaked >= 300, (mismatched, leaked)
    buckets = {to_micros(_as_utc(r["event_time"])) // 3_600_000_000 for r in training}
    assert views.lake.reads == len(buckets)  # each bucket read from bronze once

    # After every event of the lake the bucket's row is exact as it is: no bronze read.
    after = views.lake.newest + 1
    assert views.current_part(after) is None and not views.reads_lake(after)


@pytest.mark.integration
def test_features_and_predict_over_http_at_past_times_equal_the_training_rows(pit_lake: PitLake) -> None:
    from serving_layer.views import load_batch_views

    cfg = pit_lake.cfg
    sample = pit_lake.training[::7]
    app = create_app(
        cfg, models=Reloadable("models", lambda: served(toy_model())), views=Reloadable("views", lambda: load_batch_views(cfg)),
        clock=lambda: PIT_NOW, poll=False,
    )  # fmt: skip
    with TestClient(app, base_url="http://localhost") as test_client:
        for r in sample:
            at = _as_utc(r["event_time"]).isoformat()
            for entity, spec in cfg.features.entities.items():
                key = "/".join(str(r[k]) for k in spec.keys)
                response = test_client.get(f"/features/{entity}/{key}", params={"at": at})
                assert response.status_code == 200, response.text
                body = response.json()
                expected = {name: r[name] for name in body["merged"]["features"]}
                assert body["merged"]["features"] == expected, (entity, key, at)
                statistics = [*cfg.features.aggregates, *cfg.features.ratios]
                assert set(expected) == {contract.window_feature_name(entity, s, w) for s in statistics for w in cfg.features.windows}
        for start in range(0, len(sample), 100):
            rows = sample[start : start + 100]
            body = [{**_pit_row(r).model_dump(mode="json", exclude_none=True)} for r in rows]
            response = test_client.post("/predict", json={"rows": body})
            assert response.status_code == 200, response.text
            for r, prediction in zip(rows, response.json()["predictions"], strict=True):
                assert prediction["features"] == {n: r[n] for n in prediction["features"]}
                assert prediction["probability"] == pytest.approx(toy_probability(r), rel=1e-5)


@pytest.mark.integration
def test_stream_scoring_of_a_backlog_sees_only_the_past_of_each_impression(pit_lake: PitLake) -> None:
    from lambda_ml_apps.ctr.stream import StreamScorer
    from serving_layer.views import load_batch_views

    loaded = load_batch_views(pit_lake.cfg)
    scorer = StreamScorer(
        pit_lake.cfg, models=Reloadable("models", lambda: served(toy_model())), views=Reloadable("views", lambda: loaded),
        clock=lambda: PIT_NOW,
    )  # fmt: skip
    by_id = {r["event_id"]: r for r in pit_lake.training}
    backlog = [(f"impressions/0@{n}", pit_lake.impressions[r["event_id"]]) for n, r in enumerate(pit_lake.training)]
    records = []
    for start in range(0, len(backlog), 500):
        records += scorer.score(backlog[start : start + 500])
    assert len(records) == len(pit_lake.training)
    for record in records:
        r = by_id[record["event_id"]]
        assert record["event_time"] == _as_utc(r["event_time"])
        assert record["probability"] == pytest.approx(toy_probability(r), rel=1e-5), record["event_id"]
    assert loaded.lake is not None
    assert loaded.lake.reads == len({to_micros(_as_utc(r["event_time"])) // 3_600_000_000 for r in pit_lake.training})

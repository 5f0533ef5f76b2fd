"""Serving layer: pure functions (request -> model inputs, views, error bodies), the HTTP API on
a small hand-built ONNX graph, and (integration) the real service on a model and views that
the real batch job produced from a seeded bronze dataset."""

from __future__ import annotations

import doctest
import importlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # before deltalake, see serving_layer.views
import pytest
from deltalake import write_deltalake
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from lambda_ml import contract
from lambda_ml.config import DEFAULT_CONFIG, PROJECT_ROOT, PlatformConfig, load_config
from lambda_ml.contract import Horizon
from serving_layer.app import create_app, format_validation_errors, max_body_bytes
from serving_layer.features import RowFeatures, build_model_inputs, lookup_features
from serving_layer.model_store import (
    CtrServingModel,
    ModelLoadError,
    check_registry_reachable,
    check_session,
    find_onnx_file,
    open_onnx_session,
)
from serving_layer.reloadable import NotReadyError, Reloadable
from serving_layer.views import (
    BatchViews,
    CountView,
    EntityCounts,
    ViewLoadError,
    count_view_from_arrow,
    load_batch_views,
    read_count_view,
)
from support import isolated

SERVING_MODULES = [
    "serving_layer.app",
    "serving_layer.api_models",
    "serving_layer.features",
    "serving_layer.model_store",
    "serving_layer.reloadable",
    "serving_layer.views",
]

# --------------------------------------------------------------------------- a toy model
# A logistic model written directly in ONNX, with the contract's inputs and output, so the API
# can be tested without MLflow and its answers checked against a formula.

TOY_WEIGHTS = {
    "user_impressions": 0.01,
    "user_clicks": 0.2,
    "item_impressions": 0.002,
    "item_clicks": 0.05,
    "position": -0.3,
}
TOY_DEVICE_WEIGHTS = {"mobile": 0.3, "desktop": -0.2, "tablet": 0.1}
TOY_UNKNOWN_DEVICE = -0.5
TOY_BIAS = -1.0


def toy_onnx_bytes(input_names: tuple[str, ...] = contract.NUMERIC_FEATURES) -> bytes:
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
        numpy_helper.from_array(np.array([[TOY_BIAS]], np.float32), "b"),
        numpy_helper.from_array(np.array([[1.0]], np.float32), "one"),
    ]
    output = helper.make_tensor_value_info(contract.ONNX_PROBABILITY_OUTPUT, TensorProto.FLOAT, [None, 2])
    graph = helper.make_graph(nodes, "toy_ctr", inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def toy_probability(user: EntityCounts, item: EntityCounts, position: int, device: str) -> float:
    z = (
        TOY_BIAS
        + TOY_WEIGHTS["user_impressions"] * user.impressions
        + TOY_WEIGHTS["user_clicks"] * user.clicks
        + TOY_WEIGHTS["item_impressions"] * item.impressions
        + TOY_WEIGHTS["item_clicks"] * item.clicks
        + TOY_WEIGHTS["position"] * position
        + TOY_DEVICE_WEIGHTS.get(device, TOY_UNKNOWN_DEVICE)
    )
    return 1 / (1 + math.exp(-z))


HORIZON = Horizon(impressions=5, clicks=4)
USERS = {"u1": EntityCounts(10, 2), "u2": EntityCounts(40, 1)}
ITEMS = {"i1": EntityCounts(100, 5), "i2": EntityCounts(7, 0)}


def toy_model() -> CtrServingModel:
    return CtrServingModel("ctr", 3, "champion", "run-1", HORIZON, open_onnx_session(toy_onnx_bytes()))


def toy_views() -> BatchViews:
    return BatchViews(CountView("mem:users", USERS, HORIZON), CountView("mem:items", ITEMS, HORIZON))


def unit_cfg(**overrides: Any) -> PlatformConfig:
    return load_config(DEFAULT_CONFIG, env={}, overrides={"serving.max_rows": 5, **overrides})


@pytest.fixture()
def client() -> Iterator[TestClient]:
    app = create_app(unit_cfg(), models=Reloadable("models:/ctr@champion", toy_model), views=Reloadable("views", toy_views))
    with TestClient(app) as test_client:
        yield test_client


def row(**changes: Any) -> dict[str, Any]:
    return {"user_id": "u1", "item_id": "i1", "device": "mobile", "position": 2, **changes}


# --------------------------------------------------------------------------- pure functions


def test_model_inputs_follow_the_contract() -> None:
    features = [
        RowFeatures(EntityCounts(10, 2), EntityCounts(100, 5), 2, "mobile"),
        RowFeatures(EntityCounts(0, 0), EntityCounts(7, 0), 9, "fridge"),
    ]
    inputs = build_model_inputs(features)
    assert list(inputs) == list(contract.MODEL_INPUTS)
    for name in contract.NUMERIC_FEATURES:
        assert inputs[name].dtype == np.float32 and inputs[name].shape == (2, 1), name
    assert inputs["device"].dtype == object and inputs["device"].shape == (2, 1)
    assert inputs["user_impressions"].ravel().tolist() == [10.0, 0.0]
    assert inputs["user_clicks"].ravel().tolist() == [2.0, 0.0]
    assert inputs["item_impressions"].ravel().tolist() == [100.0, 7.0]
    assert inputs["item_clicks"].ravel().tolist() == [5.0, 0.0]
    assert inputs["position"].ravel().tolist() == [2.0, 9.0]
    assert inputs["device"].ravel().tolist() == ["mobile", "fridge"]


def test_model_inputs_need_a_row() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        build_model_inputs([])


def test_unknown_users_and_items_count_zero() -> None:
    @dataclass
    class Row:
        user_id: str
        item_id: str
        device: str
        position: int

    found = lookup_features([Row("u2", "nothing", "tablet", 1), Row("nobody", "i2", "mobile", 3)], toy_views())
    assert found == [
        RowFeatures(EntityCounts(40, 1), EntityCounts(0, 0), 1, "tablet"),
        RowFeatures(EntityCounts(0, 0), EntityCounts(7, 0), 3, "mobile"),
    ]


def test_toy_model_scores_like_its_formula() -> None:
    features = [RowFeatures(USERS["u1"], ITEMS["i1"], 2, "mobile"), RowFeatures(EntityCounts(), ITEMS["i2"], 1, "tv")]
    expected = [toy_probability(f.user, f.item, f.position, f.device) for f in features]
    np.testing.assert_allclose(toy_model().predict(build_model_inputs(features)), expected, atol=1e-6)


def test_view_from_arrow_keeps_counts_and_horizon() -> None:
    table = pa.table(
        {
            "item_id": ["i1", "i2", "i3"],
            "impressions": pa.array([5, 2, 0], pa.int64()),
            "clicks": pa.array([1, 0, 0], pa.int64()),
            "horizon_impressions": pa.array([7, 7, 7], pa.int64()),
            "horizon_clicks": pa.array([3, 3, 3], pa.int64()),
        }
    )
    view = count_view_from_arrow("mem", table, "item_id")
    assert sorted(view.counts.items()) == [("i1", EntityCounts(5, 1)), ("i2", EntityCounts(2, 0)), ("i3", EntityCounts(0, 0))]
    assert view.horizon == Horizon(7, 3)
    assert view.lookup("missing") == EntityCounts(0, 0)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"user_id": ["a", "a"], "impressions": [1, 2], "clicks": [0, 0]}, "more than one row"),
        ({"user_id": ["a"], "impressions": [1]}, "lacks column"),
        (
            {"user_id": ["a", "b"], "impressions": [1, 1], "clicks": [0, 0], "horizon_impressions": [1, 2]},
            "mixes horizons",
        ),
    ],
)
def test_bad_view_tables_are_refused(columns: dict[str, list[Any]], message: str) -> None:
    with pytest.raises(ViewLoadError, match=message):
        count_view_from_arrow("mem", pa.table(columns), "user_id")


def _write_view(path: str, key: str, counts: dict[str, tuple[int, int]], horizon: tuple[int, int]) -> None:
    keys = sorted(counts)
    table = pa.table(
        {
            key: keys,
            "impressions": pa.array([counts[k][0] for k in keys], pa.int64()),
            "clicks": pa.array([counts[k][1] for k in keys], pa.int64()),
            "horizon_impressions": pa.array([horizon[0]] * len(keys), pa.int64()),
            "horizon_clicks": pa.array([horizon[1]] * len(keys), pa.int64()),
        }
    )
    write_deltalake(path, table, mode="overwrite")


def test_views_are_read_from_delta_tables(tmp_path: Path) -> None:
    cfg = unit_cfg(**{"lake.root": str(tmp_path / "lake")})
    _write_view(cfg.lake.table(*contract.USER_VIEW), "user_id", {"u1": (3, 1), "u2": (1, 0)}, (4, 2))
    _write_view(cfg.lake.table(*contract.ITEM_VIEW), "item_id", {"i9": (4, 1)}, (4, 2))
    views = load_batch_views(cfg)
    assert sorted(views.users.counts.items()) == [("u1", EntityCounts(3, 1)), ("u2", EntityCounts(1, 0))]
    assert sorted(views.items.counts.items()) == [("i9", EntityCounts(4, 1))]
    assert views.horizon == Horizon(4, 2)


def test_views_from_two_batch_runs_are_refused(tmp_path: Path) -> None:
    cfg = unit_cfg(**{"lake.root": str(tmp_path / "lake")})
    _write_view(cfg.lake.table(*contract.USER_VIEW), "user_id", {"u1": (3, 1)}, (4, 2))
    _write_view(cfg.lake.table(*contract.ITEM_VIEW), "item_id", {"i9": (4, 1)}, (5, 2))
    with pytest.raises(ViewLoadError, match="different batch runs"):
        load_batch_views(cfg)


def test_a_missing_view_names_its_path(tmp_path: Path) -> None:
    path = str(tmp_path / "lake" / "views" / "user_counts")
    with pytest.raises(ViewLoadError, match="no Delta table at .*user_counts: has the batch layer run yet"):
        read_count_view(path, "user_id")


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
    assert format_validation_errors([error]) == [expected]


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


def test_a_graph_with_other_inputs_is_refused() -> None:
    session = open_onnx_session(toy_onnx_bytes(input_names=("user_impressions", "position")))
    with pytest.raises(ModelLoadError, match="takes inputs .* but the contract's model inputs are"):
        check_session(session, "models:/ctr/9")
    check_session(open_onnx_session(toy_onnx_bytes()), "models:/ctr/3")  # the contract's graph passes


def test_the_onnx_file_is_found_through_the_mlmodel_file(tmp_path: Path) -> None:
    import mlflow.onnx
    import onnx

    mlflow.onnx.save_model(onnx.load_from_string(toy_onnx_bytes()), str(tmp_path / "model"))
    found = find_onnx_file(tmp_path / "model")
    assert found.suffix == ".onnx" and found.is_file()
    check_session(open_onnx_session(found), str(found))


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


def test_one_row_is_scored_with_its_view_counts(client: TestClient) -> None:
    response = client.post("/predict", json=row())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {
        "name": "ctr",
        "version": 3,
        "alias": "champion",
        "run_id": "run-1",
        "horizon": {"impressions": 5, "clicks": 4},
    }
    assert body["views"] == {"horizon": {"impressions": 5, "clicks": 4}, "users": 2, "items": 2}
    (prediction,) = body["predictions"]
    assert prediction["features"] == {
        "user_impressions": 10, "user_clicks": 2, "item_impressions": 100, "item_clicks": 5, "position": 2, "device": "mobile",
    }  # fmt: skip
    assert prediction["probability"] == pytest.approx(toy_probability(USERS["u1"], ITEMS["i1"], 2, "mobile"), abs=1e-6)


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
    assert predictions[2]["features"]["user_impressions"] == 0 and predictions[2]["features"]["item_clicks"] == 0
    expected = [
        toy_probability(USERS.get(r["user_id"], EntityCounts()), ITEMS.get(r["item_id"], EntityCounts()), r["position"], r["device"])
        for r in rows
    ]
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

    def load_model() -> CtrServingModel:
        if not champion:
            raise ModelLoadError("no version of registered model 'ctr' has alias 'champion' yet")
        return champion[0]

    models = Reloadable("models:/ctr@champion", load_model, retry_interval_s=5, clock=lambda: now[0])
    app = create_app(unit_cfg(), models=models, views=Reloadable("views", toy_views))
    with TestClient(app) as client:
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
class SeededBronze:
    """Bronze rows as the speed layer would land them, and the counts they imply."""

    impressions: list[tuple[Any, ...]]
    clicks: list[tuple[Any, ...]]
    user_counts: dict[str, EntityCounts]
    item_counts: dict[str, EntityCounts]


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
    shown: dict[str, tuple[str, str, datetime]] = {}  # impression id -> user, item, time
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
        shown[event_id] = (user, item, time_)
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

    # The counts, by the platform's definitions, from the events themselves (no Spark).
    user_counts: Counter[tuple[str, str]] = Counter()
    item_counts: Counter[tuple[str, str]] = Counter()
    for user, item, _ in shown.values():
        user_counts[(user, "impressions")] += 1
        item_counts[(item, "impressions")] += 1
    for click_id, impression_id, click_time in {c[0]: c for c in click_events}.values():
        if impression_id in shown:
            user, item, shown_at = shown[impression_id]
            if shown_at <= click_time <= shown_at + WINDOW:
                user_counts[(user, "clicks")] += 1
                item_counts[(item, "clicks")] += 1
    users = {u for u, _ in user_counts}
    items = {i for i, _ in item_counts}
    return SeededBronze(
        impressions=impressions,
        clicks=clicks,
        user_counts={u: EntityCounts(user_counts[(u, "impressions")], user_counts[(u, "clicks")]) for u in users},
        item_counts={i: EntityCounts(item_counts[(i, "impressions")], item_counts[(i, "clicks")]) for i in items},
    )


def write_bronze(spark: Any, cfg: PlatformConfig, bronze: SeededBronze) -> None:
    from lambda_ml.schemas import CLICK, IMPRESSION

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
    config_file = write_config(trained.cfg, home / "platform.yaml")
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


def _views_read_with_spark(spark: Any, cfg: PlatformConfig) -> tuple[dict[str, EntityCounts], dict[str, EntityCounts]]:
    def read(view: tuple[str, ...], key: str) -> dict[str, EntityCounts]:
        rows = spark.read.format("delta").load(cfg.lake.table(*view)).collect()
        return {r[key]: EntityCounts(r["impressions"], r["clicks"]) for r in rows}

    return read(contract.USER_VIEW, "user_id"), read(contract.ITEM_VIEW, "item_id")


def _rows_covering_every_entity(bronze: SeededBronze) -> list[dict[str, Any]]:
    users, items = sorted(bronze.user_counts), sorted(bronze.item_counts)
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
    return rows


@pytest.mark.integration
@pytest.mark.slow
def test_the_service_serves_the_champion_with_its_horizon(trained: Trained, service: Service) -> None:
    champion = _champion(trained.cfg)
    assert champion.version == trained.result.versions.onnx
    assert champion.tags[contract.TAG_FLAVOR] == "onnx"
    status, health = _get_json(f"{service.url}/health")
    assert status == 200 and health["ready"] is True and health["problems"] == []
    horizon = {"impressions": IMPRESSION_BATCHES - 1, "clicks": CLICK_BATCHES - 1}
    assert health["model"] == {
        "name": REGISTERED_MODEL,
        "version": int(champion.version),
        "alias": "champion",
        "run_id": trained.result.run_id,
        "horizon": horizon,
    }
    assert health["views"] == {
        "horizon": horizon,
        "users": len(trained.bronze.user_counts),
        "items": len(trained.bronze.item_counts),
    }
    log_text = service.log_file.read_text()
    assert (
        f"serving {REGISTERED_MODEL} version {champion.version} (alias champion), "
        f"trained on bronze impressions v1, clicks v2 in MLflow run {trained.result.run_id}"
    ) in log_text
    users, items = len(trained.bronze.user_counts), len(trained.bronze.item_counts)
    assert f"batch views: {users} users, {items} items, from bronze impressions v1, clicks v2" in log_text


@pytest.mark.integration
@pytest.mark.slow
def test_predictions_equal_onnxruntime_on_the_registered_model(
    trained: Trained, service: Service, spark: Any, tmp_path: Path
) -> None:
    import mlflow.artifacts
    import onnxruntime as ort

    cfg = trained.cfg
    rows = _rows_covering_every_entity(trained.bronze)
    status, body = _post_json(f"{service.url}/predict", {"rows": rows})
    assert status == 200, body
    champion = _champion(cfg)
    assert body["model"]["name"] == REGISTERED_MODEL and body["model"]["version"] == int(champion.version)
    served = np.array([p["probability"] for p in body["predictions"]])

    # The same rows scored here: inputs built from the view tables (read with Spark), the
    # champion's ONNX file downloaded from the registry and run in onnxruntime directly.
    users, items = _views_read_with_spark(spark, cfg)
    zero = EntityCounts(0, 0)
    columns = {
        "user_impressions": [users.get(r["user_id"], zero).impressions for r in rows],
        "user_clicks": [users.get(r["user_id"], zero).clicks for r in rows],
        "item_impressions": [items.get(r["item_id"], zero).impressions for r in rows],
        "item_clicks": [items.get(r["item_id"], zero).clicks for r in rows],
        "position": [r["position"] for r in rows],
    }
    inputs = {name: np.array(values, dtype=np.float32).reshape(-1, 1) for name, values in columns.items()}
    inputs["device"] = np.array([r["device"] for r in rows], dtype=object).reshape(-1, 1)
    local = mlflow.artifacts.download_artifacts(
        f"models:/{REGISTERED_MODEL}/{champion.version}", dst_path=str(tmp_path), tracking_uri=cfg.mlflow.tracking_uri
    )
    (onnx_file,) = Path(local).rglob("*.onnx")
    (probability,) = ort.InferenceSession(str(onnx_file)).run([contract.ONNX_PROBABILITY_OUTPUT], inputs)
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
def test_served_counts_match_the_bronze_data(trained: Trained, service: Service) -> None:
    rows = _rows_covering_every_entity(trained.bronze)
    status, body = _post_json(f"{service.url}/predict", {"rows": rows})
    assert status == 200, body
    served_users: dict[str, EntityCounts] = {}
    served_items: dict[str, EntityCounts] = {}
    for r, p in zip(rows, body["predictions"], strict=True):
        f = p["features"]
        served_users[r["user_id"]] = EntityCounts(f["user_impressions"], f["user_clicks"])
        served_items[r["item_id"]] = EntityCounts(f["item_impressions"], f["item_clicks"])
        assert (f["position"], f["device"]) == (r["position"], r["device"])
    assert served_users.pop("new-user") == EntityCounts(0, 0)
    assert served_items.pop("new-item") == EntityCounts(0, 0)
    assert served_users == trained.bronze.user_counts
    assert served_items == trained.bronze.item_counts
    # The dataset exercises what the counts must skip: resent events, late and orphan clicks.
    assert sum(c.impressions for c in served_users.values()) == N_IMPRESSIONS < len(trained.bronze.impressions)
    assert 0 < sum(c.clicks for c in served_users.values()) < len(trained.bronze.clicks)


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
    assert model.version == int(trained.result.versions.onnx)
    assert model.run_id == trained.result.run_id
    assert model.horizon == Horizon(trained.result.horizon.impressions, trained.result.horizon.clicks)

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
    with TestClient(create_app(cfg)) as client:
        health = client.get("/health").json()
        assert health["ready"] is False and health["views"] is not None
        assert "no version of registered model 'never-registered' has alias 'champion'" in health["problems"][0]
        response = client.post("/predict", json=row())
        assert response.status_code == 503
        assert "never-registered" in response.json()["detail"]

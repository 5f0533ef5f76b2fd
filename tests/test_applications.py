"""Contract tests across applications: every registered application (``APPLICATION_TYPES``)
passes the same checks, so adding one to the registry adds it here with no new test code.

- its parts satisfy the contracts of the three layers, its example config runs it, and a config
  lacking what it needs is refused naming the key;
- batch -> update -> serve on the real stack: its generated events go through Kafka and the
  speed layer into bronze, the batch layer trains, gates and registers its candidate with the
  horizon, the service answers its example request with that version, and its speed queries
  publish a model from that champion which its serving side applies.
"""

from __future__ import annotations

import importlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lambda_ml.apps import (
    APPLICATION_TYPES,
    SPEED_LAYER_QUERIES,
    Application,
    BatchUpdate,
    DemoScript,
    FeatureEvents,
    ServingModels,
    SpeedUpdater,
    load_application,
)
from lambda_ml.config import PROJECT_ROOT, ConfigError, PlatformConfig, load_config

APPS = sorted(APPLICATION_TYPES)


def registered(name: str) -> Application:
    """The application object the registry names, imported without a config check."""
    module, attribute = APPLICATION_TYPES[name].split(":")
    app: Application = getattr(importlib.import_module(module), attribute)
    return app


def example_config(app: Application) -> PlatformConfig:
    return load_config(PROJECT_ROOT / app.example_config, env={})


@pytest.mark.parametrize("name", APPS)
def test_every_application_binds_one_contract_per_layer(name: str) -> None:
    app = registered(name)
    cfg = example_config(app)
    assert (app.name, cfg.app.type) == (name, name)
    assert load_application(cfg) is app
    parts = ((app.features, FeatureEvents), (app.batch, BatchUpdate), (app.speed, SpeedUpdater),
             (app.serving, ServingModels), (app.demo, DemoScript))  # fmt: skip
    assert [isinstance(part, protocol) for part, protocol in parts] == [True] * len(parts)
    queries = app.speed.queries()
    assert queries and not set(queries) & set(SPEED_LAYER_QUERIES)
    assert set(cfg.speed.queries) <= {*SPEED_LAYER_QUERIES, *queries}
    assert all(event in cfg.events.types for event in app.event_types)
    path, body = app.demo.example(cfg)
    assert path.startswith("/") and body


@pytest.mark.parametrize("name", APPS)
def test_a_config_lacking_what_the_application_needs_is_refused_naming_the_key(name: str) -> None:
    app = registered(name)
    cfg = example_config(app)
    # An event type it reads is not declared (the one its features read, if it names none).
    needed = app.event_types[0] if app.event_types else cfg.features.event_type
    kept = {event: declared for event, declared in cfg.events.types.items() if event != needed}
    lacking = cfg.model_copy(update={"events": cfg.events.model_copy(update={"types": kept})})
    with pytest.raises(ValueError, match=rf"{cfg.source}: .*{needed}"):
        app.check(lacking)
    unknown_query = cfg.model_copy(update={"speed": cfg.speed.model_copy(update={"queries": (*cfg.speed.queries, "no-such-query")})})
    with pytest.raises(ValueError, match=r"speed\.queries.*no-such-query"):
        app.check(unknown_query)
    with pytest.raises(ConfigError, match=r"app\.type: .*'no-such-app' is not a registered application"):
        load_config(PROJECT_ROOT / app.example_config, overrides={"app.type": "no-such-app"}, env={})


@pytest.mark.integration
@pytest.mark.parametrize("name", APPS)
def test_every_application_goes_through_batch_update_and_serve(
    name: str, running_stack: PlatformConfig, spark, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    from mlflow import MlflowClient

    from batch_layer import train
    from lambda_ml import contract, producer
    from lambda_ml_cli import stack
    from lambda_ml_cli.demo import latest_speed_update
    from serving_layer.app import create_app
    from speed_layer import app as speed_app
    from support import config_on_stack, isolated

    app = registered(name)
    base = config_on_stack(PROJECT_ROOT / app.example_config, running_stack, tmp_path / "lake")
    cfg = isolated(base, f"contract-{name}", lake_root=tmp_path / "lake", topic_prefix=f"contract-{name}")
    # A few hours of events: enough to train on, and few enough steps for the speed queries.
    cfg = cfg.model_copy(update={"generator": cfg.generator.model_copy(update={"span_hours": 4, "users": 60, "items": 20})})
    assert app.demo is not None and app.serving is not None
    stack.create_topics(cfg)
    app.demo.send_events(cfg, 3000)
    speed_app.run(cfg, ["ingest", "increments", *app.demo.warm_queries], available_now=True)

    # batch: the layer trains through the application, then logs, gates and registers.
    result = train.run(spark, cfg)
    assert result.decision == "champion" and result.quality.value == result.quality.value  # a number, not NaN
    assert result.horizon.is_known(cfg.events.types)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    served = client.get_model_version(cfg.mlflow.registered_model, result.versions.served)
    assert served.tags["served"] == "true" and contract.Horizon.from_tags(served.tags) == result.horizon
    assert client.get_model_version_by_alias(cfg.mlflow.registered_model, "champion").version == result.versions.served
    assert client.get_run(result.run_id).data.tags["app"] == name

    # serve: the application's route answers with that version.
    path, body = app.demo.example(cfg)
    with TestClient(create_app(cfg, poll=False), base_url="http://localhost") as http:
        answer = http.post(path, json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"]["version"] == int(result.versions.served)
        assert http.get("/models").json()["aliases"]["champion"] == int(result.versions.served)

    # update: with fresh events after the horizon, the application's speed queries publish a
    # model from this champion, and its serving side applies it.
    producer.produce(cfg, app.demo.fresh_events(cfg, datetime.now(UTC)).records, progress=False)
    speed_app.run(cfg, ["ingest", *app.speed.queries()], available_now=True)
    update = latest_speed_update(cfg)
    assert update is not None and update.generation == result.horizon and update.version == int(result.versions.served)
    model = app.serving.apply(cfg, update)
    assert model is not None and (model.version, model.horizon) == (int(result.versions.served), result.horizon)

"""The service: the application's routes (``ServingModels.mount``: e.g. ``POST /predict`` of the
CTR application, ``POST /assign`` of k-means) answer with the model versions loaded
from the registry and, where they read features, the batch views merged with the speed layer's
increments. ``GET /features/...`` shows a merge (``routes.features``), ``GET /models``,
``/health``, ``/ready`` and ``/metrics`` are for operators (``routes.operations``). This module
wires them to the slots and background loops (``create_app``) and runs it (``serve``).

Bad requests get a 4xx naming the field (``{"detail": [{"field", "message"}]}``, ``http_api``),
never a 5xx; with no model registered yet the application's routes answer 503 and /health still
answers.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import metadata

from fastapi import Depends, FastAPI

from lambda_ml.apps import load_application
from lambda_ml.config import PlatformConfig
from serving_layer.dependencies import DependencyStatus, KafkaProbe
from serving_layer.http_api import api_key_guard, install_request_handling, unauthorized_responses
from serving_layer.metrics import ServiceMetrics
from serving_layer.model_store import ModelStore, ServedModels
from serving_layer.prediction_log import PredictionLog
from serving_layer.reloadable import Polled, Poller, Reloadable
from serving_layer.routes.docs import mount_docs
from serving_layer.routes.features import features_router
from serving_layer.routes.operations import operations_router
from serving_layer.service import ServiceContext
from serving_layer.updates import ModelUpdateListener
from serving_layer.views import BatchViews, ViewStore

log = logging.getLogger(__name__)


def create_app(
    cfg: PlatformConfig,
    *,
    models: Reloadable[ServedModels] | None = None,
    views: Reloadable[BatchViews] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    poll: bool = True,
    prediction_log: PredictionLog | None = None,
    dependencies: DependencyStatus | None = None,
) -> FastAPI:
    """The prediction service for ``cfg``. Tests pass their own ``models``/``views`` slots and
    clock; by default the models come from the MLflow registry (every alias in
    ``serving.aliases``), the views from the lake and the scoring time from the wall clock.
    With ``poll``, a background thread reloads models and views while the app runs. Answers go
    to ``prediction_log`` (by default, with ``poll`` and ``serving.prediction_log.enabled``, a
    producer on ``kafka.topics.predictions``). The registry, the lake and Kafka report their
    state to ``dependencies`` (pass the one given to the test's own slots)."""
    application = load_application(cfg)
    if application.serving is None:
        raise ValueError(f"{cfg.source}: app.type: the {application.name} application has no serving side")
    dependencies = dependencies or DependencyStatus()
    model_slot = models if models is not None else ModelStore.from_config(cfg, application.serving, dependencies)
    view_slot = views if views is not None else ViewStore.from_config(cfg, dependencies=dependencies)
    metrics = ServiceMetrics()
    polled: list[tuple[Polled, float]] = [(model_slot, cfg.serving.poll_interval_s), (view_slot, cfg.serving.views_refresh_s)]
    listener = None
    if poll and cfg.serving.model_updates and isinstance(model_slot, ModelStore):
        listener = ModelUpdateListener(
            cfg.kafka.bootstrap_servers, cfg.kafka.topics.model_updates.name, cfg.mlflow.registered_model,
            cfg.serving.aliases, model_slot.reload,
        )  # fmt: skip
    logged = cfg.serving.prediction_log
    if prediction_log is None and poll and logged.enabled:
        prediction_log = PredictionLog(
            cfg.kafka.bootstrap_servers, cfg.kafka.topics.predictions.name, logged.buffer_size, logged.linger_ms
        )
    if poll and (listener is not None or prediction_log is not None):
        probe = KafkaProbe.for_clients(cfg.kafka.bootstrap_servers, dependencies, listener is not None, prediction_log)
        polled.append((probe, cfg.serving.poll_interval_s))
    poller = Poller(polled)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        view_slot.try_reload()
        model_slot.try_reload()
        if (served := model_slot.current) is not None:
            for model in served.distinct():
                log.info("serving %s", model.describe())
        else:
            log.warning("no model to serve yet; its routes answer 503 until %s exists", model_slot.name)
        if (loaded := view_slot.current) is not None:
            sizes = ", ".join(f"{loaded.size(entity)} {entity} keys" for entity in loaded.views)
            log.info("batch views: %s, from %s", sizes, loaded.horizon)
        if poll:
            poller.start()
        if listener is not None:
            listener.start()
        if prediction_log is not None:
            prediction_log.start()
            log.info("logging predictions to %s on %s", prediction_log.topic, prediction_log.bootstrap_servers)
        try:
            yield
        finally:
            if prediction_log is not None:
                prediction_log.stop()
            if listener is not None:
                listener.stop()
            poller.stop()
            for close in service.shutdown:
                close()

    app = FastAPI(
        title="lambda-ml prediction service",
        summary=f"The {application.name} application's answers from the registry's model versions and the merged feature views.",
        version=_package_version(),
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc from local files: mount_docs
        redoc_url=None,
    )
    mount_docs(app)
    app.state.cfg = cfg
    app.state.models = model_slot
    app.state.views = view_slot
    app.state.metrics = metrics
    app.state.model_updates = listener
    app.state.prediction_log = prediction_log

    guarded = [Depends(api_key_guard(cfg.serving.api_key))] if cfg.serving.api_key else []
    unauthorized = unauthorized_responses(cfg.serving.api_key)
    service = ServiceContext(
        cfg, model_slot, view_slot, metrics, clock, prediction_log, guarded, unauthorized, listener, dependencies=dependencies
    )
    # The application's routes (and any middleware of theirs, innermost), then the service's.
    application.serving.mount(app, service)
    app.include_router(operations_router(service))
    app.include_router(features_router(service))
    install_request_handling(app, cfg.serving.max_rows, metrics, service.union_tags, cfg.serving.allowed_hosts)
    return app


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost.

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(cfg: PlatformConfig, host: str | None = None, port: int | None = None, access_log: bool = False) -> None:
    """Serve ``create_app(cfg)`` with uvicorn until SIGINT/SIGTERM (blocks).

    ``host``/``port`` default to ``cfg.serving``. Logs go through the root logger, so call
    ``lambda_ml.logs.setup_logging()`` first.
    """
    import uvicorn

    host = host or cfg.serving.host
    port = port or cfg.serving.port
    if not is_loopback(host) and not cfg.serving.api_key:
        log.warning("binding to %s without serving.api_key: the service has no authentication", host)
    if not is_loopback(host) and all(is_loopback(h.strip("[]")) for h in cfg.serving.allowed_hosts):
        log.warning("binding to %s, but serving.allowed_hosts admits loopback names only: other clients get a 400", host)
    # The registry poller runs off the request path; still, an unreachable MLflow should not
    # keep it retrying for minutes before it reports (MLflow's defaults: 7 retries, 120 s).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # Every MLflow call of the process (a models:/ download resolves the registry itself) goes
    # to the configured server, not to a file store in the service's folder.
    os.environ.setdefault("MLFLOW_TRACKING_URI", cfg.mlflow.tracking_uri)
    os.environ.setdefault("MLFLOW_REGISTRY_URI", cfg.mlflow.tracking_uri)
    log.info(
        "prediction service for models:/%s@%s starting on http://%s:%d (OpenAPI at /docs)",
        cfg.mlflow.registered_model, cfg.serving.model_alias, host, port,
    )  # fmt: skip
    uvicorn.run(
        create_app(cfg),
        host=host,
        port=port,
        log_config=None,  # keep the platform's logging set-up
        access_log=access_log,
        timeout_graceful_shutdown=10,
    )


def _package_version() -> str:
    try:
        return metadata.version("lambda-ml")
    except metadata.PackageNotFoundError:
        return "0.0.0"

"""The service: the application's routes (``ServingModels.mount``: e.g. ``POST /predict`` of the
CTR application, ``POST /assign`` of k-means) answer with the model versions loaded
from the registry and, where they read features, the batch views merged with the speed layer's
increments. ``GET /features/...`` shows a merge, ``GET /models`` the loaded versions,
``/health``, ``/ready`` and ``/metrics`` are for operators. ``serve(cfg)`` runs it.

Bad requests get a 4xx naming the field (``{"detail": [{"field", "message"}]}``), never a
5xx; with no model registered yet the application's routes answer 503 and /health still answers.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from typing import Annotated, Any, TypeVar

from pydantic import AwareDatetime

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import APIKeyHeader
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lambda_ml.apps import load_application
from lambda_ml.buckets import EntityBuckets, bucket_start, from_micros, reach_micros, to_micros, window_plan
from lambda_ml.config import FeaturesConfig, PlatformConfig
from serving_layer.api_models import BucketRow, ErrorResponse, FeaturePart, FeaturesResponse, HealthResponse, IncrementsOut, ModelsResponse, ReadyResponse, ValidationErrorResponse, ViewsOut, check_scoring_time, horizon_out, model_out
from serving_layer.lake_events import LakeEventsError
from serving_layer.metrics import CONTENT_TYPE, ServiceMetrics
from serving_layer.model_store import ModelStore, ServedModels
from serving_layer.prediction_log import PredictionLog
from serving_layer.reloadable import NotReadyError, Poller, Reloadable
from serving_layer.updates import ModelUpdateListener
from serving_layer.views import BatchViews, ViewStore

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_AFTER_S = 5
# Bytes of JSON allowed per row: a row at its longest ids is ~650 bytes; the rest is room
# for pretty-printing. Bodies beyond max_rows rows of this are refused before parsing.
BODY_BYTES_PER_ROW = 2048
BODY_BYTES_BASE = 64 * 1024


def max_body_bytes(max_rows: int) -> int:
    """Largest request body read, so an oversized request costs no parsing.

    >>> max_body_bytes(1000)
    2113536
    """
    return BODY_BYTES_BASE + max_rows * BODY_BYTES_PER_ROW


def format_validation_errors(errors: Sequence[dict[str, Any]], union_tags: Collection[str] = ()) -> list[dict[str, str]]:
    """Pydantic/FastAPI validation errors as ``[{"field": "rows.0.position", "message": ...}]``.

    The ``body`` prefix and the tag of a union body (``union_tags``, e.g. row or batch) are
    dropped, so ``field`` is the path a client wrote in its JSON.

    >>> format_validation_errors([{"loc": ("body", "batch", "rows", 0, "position"), "type": "greater_than_equal",
    ...                            "msg": "Input should be greater than or equal to 1"}], {"batch", "row"})
    [{'field': 'rows.0.position', 'message': 'Input should be greater than or equal to 1'}]
    >>> format_validation_errors([{"loc": ("body", "row", "colour"), "type": "extra_forbidden", "msg": "x"}], {"batch", "row"})
    [{'field': 'colour', 'message': 'unknown field'}]
    """
    formatted = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ())]
        kind = error.get("type", "")
        if loc[:1] == ["body"]:
            loc = loc[1:]
            if loc[:1] and loc[0] in union_tags:
                loc = loc[1:]
        if kind == "json_invalid":
            # FastAPI puts the character offset in loc; it belongs in the message.
            reason = (error.get("ctx") or {}).get("error", "")
            where = f" at character {loc[0]}" if loc else ""
            formatted.append({"field": "body", "message": f"invalid JSON{where}: {reason}".rstrip(": ")})
            continue
        field = ".".join(loc) or "body"
        if kind == "extra_forbidden":
            message = "unknown field"
        elif kind == "missing" and field == "body":
            message = "a JSON body is required"
        elif kind == "model_attributes_type" and field == "body":
            message = 'expected a JSON object: one row, or {"rows": [...]}'
        else:
            message = str(error.get("msg", "invalid value"))
        formatted.append({"field": field, "message": message})
    return formatted


def is_json_content_type(content_type: str) -> bool:
    """``application/json`` or any ``+json`` type, parameters ignored.

    >>> is_json_content_type("application/json; charset=utf-8"), is_json_content_type("text/plain")
    (True, False)
    """
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _part(
    features: FeaturesConfig, entity: str, buckets: EntityBuckets, at: datetime, partial: tuple[float | None, ...] | None
) -> FeaturePart:
    """One part's window features at ``at`` and its buckets within the longest window. With
    ``partial`` (the current bucket's events before ``at``, from the lake) the current bucket's
    row is left out and ``partial`` shows as that bucket's row when it holds an event."""
    micros = to_micros(at)
    current = to_micros(bucket_start(at, features.bucket_width))
    reach = reach_micros(features)
    first = None if reach is None else current - reach  # None: the lifetime window reads every bucket
    last = current if partial is None else current - 1
    rows = [
        BucketRow(bucket_start=from_micros(start), values={a: buckets.values[a][n] for a in buckets.values})
        for n, start in enumerate(buckets.starts)
        if (first is None or first <= start) and start <= last
    ]
    if partial is not None and any(v is not None for v in partial):
        rows.append(BucketRow(bucket_start=from_micros(current), values=dict(zip(features.aggregates, partial, strict=True))))
    found: dict[str, Any] = {}
    window_plan(features, entity).add_features(found, buckets, micros, partial)
    return FeaturePart(features=found, buckets=rows)


def features_response(features: FeaturesConfig, views: BatchViews, entity: str, key: tuple[str, ...], at: datetime) -> FeaturesResponse:
    """The /features answer for one key of one entity's view at ``at``.

    When the lake holds events at or after ``at``, the current bucket's part before ``at``
    (read from bronze) counts in ``merged`` only; ``batch`` and ``speed`` then show the whole
    buckets before it (bronze does not tell which layer counted an event)."""
    view = views.views[entity]
    increments = view.increments
    micros = to_micros(at)
    part = views.current_part(micros)
    partial = None if part is None else part.before(entity, key, micros)
    before = None if part is None else part.empty
    return FeaturesResponse(
        entity=view.entity,
        key=dict(zip(view.keys, key, strict=True)),
        at=at,
        horizon=horizon_out(view.horizon),
        increments=IncrementsOut(
            through=horizon_out(increments.through) if increments.through is not None else None,
            rows_merged=increments.used,
            rows_in_batch=increments.already_in_batch,
        ),
        merged=_part(features, view.entity, view.lookup(key), at, partial),
        batch=_part(features, view.entity, view.batch_part(key), at, before),
        speed=_part(features, view.entity, view.speed_part(key), at, before),
    )


def _too_large_response(max_rows: int) -> JSONResponse:
    message = f"the body is larger than {max_body_bytes(max_rows)} bytes; send at most {max_rows} rows per request"
    return JSONResponse(status_code=413, content={"detail": [{"field": "body", "message": message}]})


class ContentLengthLimit:
    """ASGI middleware answering ``response`` to requests declaring a body over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int, response: Response) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.response = response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = Headers(scope=scope).get("content-length", "")
            if length.isdigit() and int(length) > self.max_bytes:
                await self.response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestMetrics:
    """ASGI middleware timing every HTTP request into ``metrics``, by route template (so
    /features/user/u1 and /features/user/u2 count as one route)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(scope.get("method", "?"), route, status[0], time.perf_counter() - started)


def get_or_report(slot: Reloadable[T], problems: list[str]) -> T | None:
    """The slot's value, or None with the reason appended to ``problems``."""
    try:
        return slot.get()
    except NotReadyError as exc:
        problems.append(str(exc))
        return None


def _try_load(slot: Reloadable[Any]) -> None:
    try:
        slot.reload()
    except Exception:  # noqa: BLE001 - already logged by the slot; /predict retries later
        pass


API_KEY_HEADER = "X-API-Key"


def api_key_guard(expected: str) -> Callable[..., None]:
    """A dependency refusing requests without ``X-API-Key: <expected>`` (401 naming the header)."""
    scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="The key set in serving.api_key.")

    def check(key: Any) -> None:
        if key is None:
            message = f"missing {API_KEY_HEADER} header: this service requires an API key"
        elif not hmac.compare_digest(key.encode(), expected.encode()):
            message = f"wrong API key in the {API_KEY_HEADER} header"
        else:
            return
        raise HTTPException(
            status_code=401, detail=[{"field": f"header.{API_KEY_HEADER}", "message": message}],
            headers={"WWW-Authenticate": API_KEY_HEADER},
        )  # fmt: skip

    # Set here, not in the signature: a string annotation could not see ``scheme``.
    check.__annotations__["key"] = Annotated[str | None, Security(scheme)]
    return check


@dataclass
class ServiceContext:
    """What the service gives an application's routes (the ``Service`` contract): the config,
    the model and view slots, the metrics, the clock, the prediction log, the API-key guard."""

    cfg: PlatformConfig
    models: Reloadable[ServedModels]
    views: Reloadable[BatchViews]
    metrics: ServiceMetrics
    clock: Callable[[], datetime]
    prediction_log: PredictionLog | None
    guarded: list[Any]  # route dependencies checking the API key (empty without one)
    unauthorized: dict[int | str, dict[str, Any]]  # the 401 of the OpenAPI document, when guarded
    shutdown: list[Callable[[], None]] = field(default_factory=list)  # run when the service stops
    # Tags of request bodies that are unions (e.g. one row or a batch): left out of error paths.
    union_tags: set[str] = field(default_factory=set)

    def served(self) -> ServedModels:
        """The models loaded now; NotReadyError (a 503) while no champion is loaded."""
        return self.models.get()


def unavailable(reason: str) -> HTTPException:
    """A 503 with Retry-After: something the answer needs is not loaded or not readable yet."""
    return HTTPException(status_code=503, detail=reason, headers={"Retry-After": str(RETRY_AFTER_S)})


def create_app(
    cfg: PlatformConfig,
    *,
    models: Reloadable[ServedModels] | None = None,
    views: Reloadable[BatchViews] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    poll: bool = True,
    prediction_log: PredictionLog | None = None,
) -> FastAPI:
    """The prediction service for ``cfg``. Tests pass their own ``models``/``views`` slots and
    clock; by default the models come from the MLflow registry (every alias in
    ``serving.aliases``), the views from the lake and the scoring time from the wall clock.
    With ``poll``, a background thread reloads models and views while the app runs. Answers go
    to ``prediction_log`` (by default, with ``poll`` and ``serving.prediction_log.enabled``, a
    producer on ``kafka.topics.predictions``)."""
    application = load_application(cfg)
    if application.serving is None:
        raise ValueError(f"{cfg.source}: app.type: the {application.name} application has no serving side")
    model_slot = models if models is not None else ModelStore.from_config(cfg, application.serving)
    view_slot = views if views is not None else ViewStore.from_config(cfg)
    metrics = ServiceMetrics()
    poller = Poller([(model_slot, cfg.serving.poll_interval_s), (view_slot, cfg.serving.views_refresh_s)])
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

    shutdown: list[Callable[[], None]] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        _try_load(view_slot)
        _try_load(model_slot)
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
            for close in shutdown:
                close()

    app = FastAPI(
        title="lambda-ml prediction service",
        summary=f"The {application.name} application's answers from the registry's model versions and the merged feature views.",
        version=_package_version(),
        lifespan=lifespan,
    )
    app.state.cfg = cfg
    app.state.models = model_slot
    app.state.views = view_slot
    app.state.metrics = metrics
    app.state.model_updates = listener
    app.state.prediction_log = prediction_log

    guarded = [Depends(api_key_guard(cfg.serving.api_key))] if cfg.serving.api_key else []
    unauthorized = (
        {401: {"model": ValidationErrorResponse, "description": f"Missing or wrong {API_KEY_HEADER} header."}}
        if guarded
        else {}
    )
    service = ServiceContext(cfg, model_slot, view_slot, metrics, clock, prediction_log, guarded, unauthorized, shutdown)
    # The application's routes (and any middleware of theirs, innermost), then the service's.
    application.serving.mount(app, service)
    too_large = _too_large_response(cfg.serving.max_rows)
    # A declared Content-Length is refused before reading; a chunked body is cut off by the
    # route's max_body_size, which raises the 413 handled here.
    app.add_middleware(ContentLengthLimit, max_bytes=max_body_bytes(cfg.serving.max_rows), response=too_large)
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.exception_handler(413)
    async def on_too_large(_: Request, __: Exception) -> JSONResponse:
        return too_large

    @app.exception_handler(RequestValidationError)
    async def on_invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if content_type and not is_json_content_type(content_type):
            message = f"the body must be JSON sent with Content-Type: application/json, not {content_type}"
            return JSONResponse(status_code=415, content={"detail": [{"field": "body", "message": message}]})
        return JSONResponse(status_code=422, content={"detail": format_validation_errors(exc.errors(), service.union_tags)})

    @app.get(
        "/models",
        response_model=ModelsResponse,
        summary="The loaded model versions, the aliases they serve and their horizons",
        dependencies=guarded,
        responses={**unauthorized, 503: {"model": ErrorResponse, "description": "No model loaded yet."}},
    )
    def list_models() -> ModelsResponse:
        """What the registry poller loaded: alias -> version, and each version's run, horizon
        and quality score. A moved alias shows here once its version is loaded and swapped in."""
        served = model_slot.current
        if served is None:
            raise unavailable(model_slot.last_error or f"{model_slot.name} is not loaded yet")
        problems = list(served.problems)
        if model_slot.last_error:
            problems.append(model_slot.last_error)
        return ModelsResponse(
            registered_model=cfg.mlflow.registered_model,
            primary_alias=served.primary,
            aliases=served.versions(),
            versions=[model_out(m) for m in served.distinct()],
            default_policy=cfg.serving.policy,
            poll_interval_s=cfg.serving.poll_interval_s,
            swaps=getattr(model_slot, "swaps", 0),
            problems=problems,
        )

    entity_names = list(cfg.features.entities)

    def entity_features(entity: str, key: str, at: Any = None) -> FeaturesResponse:
        """The key's values, one path segment per key field in declaration order (e.g.
        ``/features/user_device/u42/mobile``). Window features at ``at`` (default now) from
        the merged buckets, from the batch view alone and from the increments alone. They count
        the events strictly before ``at``: when the lake holds events at or after it, ``at``'s
        own bucket is its events before ``at`` (read from bronze), in ``merged`` only."""
        declared = cfg.features.entities.get(entity)
        if declared is None:
            raise HTTPException(404, detail=[{"field": "path.entity", "message": f"unknown entity {entity!r}: one of {', '.join(entity_names)}"}])
        parts = key.split("/")
        if len(parts) != len(declared.keys) or not all(parts):
            message = f"entity {entity} is keyed by {'/'.join(declared.keys)}: give {len(declared.keys)} non-empty segment(s)"
            raise HTTPException(422, detail=[{"field": "path.key", "message": message}])
        if at is not None:
            try:
                check_scoring_time(at)
            except ValueError as exc:
                raise HTTPException(422, detail=[{"field": "query.at", "message": str(exc)}]) from exc
        problems: list[str] = []
        loaded = get_or_report(view_slot, problems)
        if loaded is None:
            raise unavailable("no views to read: " + "; ".join(problems))
        try:
            return features_response(cfg.features, loaded, entity, tuple(parts), at or clock())
        except LakeEventsError as exc:
            raise unavailable(f"cannot compute the features at {at} exactly: {exc}") from exc

    # Set before registering the route (FastAPI reads annotations then); see predict.
    entity_features.__annotations__["at"] = Annotated[
        AwareDatetime | None, Query(description="Time to compute the window features at (ISO-8601 with a time zone); default now.")
    ]
    app.get(
        "/features/{entity}/{key:path}",
        response_model=FeaturesResponse,
        summary="One entity's window features: batch view ⊕ speed increments, and both parts",
        dependencies=guarded,
        responses={
            **unauthorized,
            404: {"model": ValidationErrorResponse, "description": "No such entity is declared."},
            422: {"model": ValidationErrorResponse, "description": "The key or the time is invalid; the error names it."},
            503: {"model": ErrorResponse, "description": "No views loaded yet, or bronze cannot be read for features at `at`."},
        },
    )(entity_features)

    def readiness() -> tuple[bool, list[str]]:
        served, loaded = model_slot.current, view_slot.current
        problems = []
        if served is None:
            problems.append(model_slot.last_error or f"{model_slot.name} is not loaded yet")
        if loaded is None:
            problems.append(view_slot.last_error or f"{view_slot.name} are not loaded yet")
        return served is not None and loaded is not None, problems

    @app.get("/health", response_model=HealthResponse, summary="Liveness, and whether /predict can answer")
    def health() -> HealthResponse:
        """Always 200 while the process is up; ``ready`` says whether a model and views are
        loaded, ``problems`` also lists a registry or lake that could not be read at the last
        poll (the service then keeps serving what it has)."""
        ready, problems = readiness()
        served, loaded = model_slot.current, view_slot.current
        if served is not None:
            problems += list(served.problems) + ([model_slot.last_error] if model_slot.last_error else [])
        if loaded is not None and view_slot.last_error:
            problems.append(view_slot.last_error)
        return HealthResponse(
            status="ok",
            ready=ready,
            model=model_out(served.champion) if served is not None else None,
            views=views_out(loaded) if loaded is not None else None,
            problems=problems,
        )

    @app.get(
        "/ready",
        response_model=ReadyResponse,
        summary="Readiness: 200 when models and views are loaded, else 503",
        responses={503: {"model": ReadyResponse, "description": "Not ready; problems says why."}},
    )
    def ready() -> JSONResponse:
        """For a load balancer or an orchestrator's readiness probe."""
        is_ready, problems = readiness()
        body = ReadyResponse(ready=is_ready, problems=problems).model_dump()
        return JSONResponse(status_code=200 if is_ready else 503, content=body)

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Text format 0.0.4."}},
    )
    def prometheus_metrics() -> PlainTextResponse:
        """Requests, 5xx errors and latency histograms by route; rows scored by policy and
        version; the loaded versions per alias; registry and view reloads."""
        gauges: list[tuple[str, str, dict[str, str], float]] = []
        served = model_slot.current
        for alias, version in (served.versions() if served is not None else {}).items():
            gauges.append(("lambda_ml_model_version", "Model version loaded per registry alias.", {"alias": alias}, version))
        for what, slot in (("models", model_slot), ("views", view_slot)):
            gauges.append(("lambda_ml_reloads_total", "Successful loads of models or views.", {"what": what}, slot.loads))
            gauges.append(("lambda_ml_reload_failures_total", "Failed loads of models or views.", {"what": what}, slot.failures))
        gauges.append(("lambda_ml_model_swaps_total", "Alias moves swapped in.", {}, getattr(model_slot, "swaps", 0)))
        if listener is not None:
            for outcome in ("applied", "stale", "invalid"):
                gauges.append(("lambda_ml_model_updates_total", "Kafka model updates by outcome.", {"outcome": outcome},
                               getattr(listener, outcome)))  # fmt: skip
        if prediction_log is not None:
            for outcome, n in prediction_log.counts():
                gauges.append(("lambda_ml_prediction_log_records_total",
                               "Prediction-log records: sent (acknowledged), dropped (buffer full) or failed (not delivered).",
                               {"outcome": outcome}, n))  # fmt: skip
            gauges.append(("lambda_ml_prediction_log_queued", "Prediction-log records waiting to be sent.", {}, prediction_log.queued))
        gauges.append(("lambda_ml_ready", "1 when models and views are loaded.", {}, float(readiness()[0])))
        return PlainTextResponse(metrics.render(gauges), media_type=CONTENT_TYPE)

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


def views_out(views: BatchViews) -> ViewsOut:
    return ViewsOut(horizon=horizon_out(views.horizon), users=views.size("user"), items=views.size("item"))

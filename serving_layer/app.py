"""The prediction service: ``POST /predict`` scores impressions with the champion ONNX model on
window features read off the batch views at the time of the request (or the row's
``event_time``); ``GET /health`` says whether it can. ``serve(cfg)`` runs it.

Bad requests get a 4xx naming the field (``{"detail": [{"field", "message"}]}``), never a
5xx; with no model registered yet /predict answers 503 and /health still answers.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, TypeVar

from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from lambda_ml.config import FeaturesConfig, PlatformConfig
from lambda_ml.contract import Horizon
from serving_layer.api_models import (
    BATCH_EXAMPLE,
    REQUEST_KINDS,
    ROW_EXAMPLE,
    ErrorResponse,
    HealthResponse,
    HorizonOut,
    ModelOut,
    Prediction,
    PredictBatch,
    PredictResponse,
    PredictRow,
    ValidationErrorResponse,
    ViewsOut,
    batch_type_with_limit,
    predict_request_type,
)
from serving_layer.features import build_model_inputs, lookup_features
from serving_layer.model_store import CtrServingModel, ModelStore
from serving_layer.reloadable import NotReadyError, Reloadable
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


def format_validation_errors(errors: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Pydantic/FastAPI validation errors as ``[{"field": "rows.0.position", "message": ...}]``.

    The ``body`` prefix and the internal row/batch tag are dropped, so ``field`` is the path a
    client wrote in its JSON.

    >>> format_validation_errors([{"loc": ("body", "batch", "rows", 0, "position"), "type": "greater_than_equal",
    ...                            "msg": "Input should be greater than or equal to 1"}])
    [{'field': 'rows.0.position', 'message': 'Input should be greater than or equal to 1'}]
    >>> format_validation_errors([{"loc": ("body", "row", "colour"), "type": "extra_forbidden", "msg": "x"}])
    [{'field': 'colour', 'message': 'unknown field'}]
    """
    formatted = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ())]
        kind = error.get("type", "")
        if loc[:1] == ["body"]:
            loc = loc[1:]
            if loc[:1] and loc[0] in REQUEST_KINDS:
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


def model_out(model: CtrServingModel) -> ModelOut:
    return ModelOut(
        name=model.name, version=model.version, alias=model.alias, run_id=model.run_id, horizon=horizon_out(model.horizon)
    )


def horizon_out(horizon: Horizon) -> HorizonOut:
    return HorizonOut(impressions=horizon.impressions, clicks=horizon.clicks)


def views_out(views: BatchViews) -> ViewsOut:
    return ViewsOut(horizon=horizon_out(views.horizon), users=views.size("user"), items=views.size("item"))


def score_rows(
    rows: Sequence[PredictRow], model: CtrServingModel, views: BatchViews, features: FeaturesConfig, now: datetime
) -> PredictResponse:
    """Compute the rows' features at ``now`` (or their own ``event_time``), run the model and
    shape the answer with the inputs the model took."""
    found = lookup_features(rows, views, features, now)
    probabilities = model.predict(build_model_inputs(found, model.inputs))
    predictions = [
        Prediction(
            user_id=row.user_id,
            item_id=row.item_id,
            probability=float(p),
            features={name: f[name] for name in model.inputs.names},
        )
        for row, f, p in zip(rows, found, probabilities, strict=True)
    ]
    return PredictResponse(model=model_out(model), views=views_out(views), predictions=predictions)


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


def _unavailable(reason: str) -> HTTPException:
    return HTTPException(status_code=503, detail=reason, headers={"Retry-After": str(RETRY_AFTER_S)})


def _get(slot: Reloadable[T], problems: list[str]) -> T | None:
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


def create_app(
    cfg: PlatformConfig,
    *,
    models: Reloadable[CtrServingModel] | None = None,
    views: Reloadable[BatchViews] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> FastAPI:
    """The prediction service for ``cfg``. Tests pass their own ``models``/``views`` slots and
    clock; by default the model comes from the MLflow registry, the views from the lake and the
    scoring time from the wall clock."""
    model_slot = models if models is not None else ModelStore.from_config(cfg)
    view_slot = views if views is not None else ViewStore.from_config(cfg)
    batch_type = batch_type_with_limit(cfg.serving.max_rows)
    request_type = predict_request_type(batch_type)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        _try_load(view_slot)
        _try_load(model_slot)
        if (model := model_slot.current) is not None:
            log.info("serving %s", model.describe())
        else:
            log.warning("no model to serve yet; /predict answers 503 until %s exists", model_slot.name)
        if (loaded := view_slot.current) is not None:
            log.info("batch views: %d users, %d items, from %s", loaded.size("user"), loaded.size("item"), loaded.horizon)
        yield

    app = FastAPI(
        title="lambda-ml prediction service",
        summary="Click-through probabilities from the champion model and the batch views.",
        version=_package_version(),
        lifespan=lifespan,
    )
    app.state.cfg = cfg
    app.state.models = model_slot
    app.state.views = view_slot

    too_large = _too_large_response(cfg.serving.max_rows)
    # A declared Content-Length is refused before reading; a chunked body is cut off by the
    # route's max_body_size, which raises the 413 handled here.
    app.add_middleware(ContentLengthLimit, max_bytes=max_body_bytes(cfg.serving.max_rows), response=too_large)

    @app.exception_handler(413)
    async def on_too_large(_: Request, __: Exception) -> JSONResponse:
        return too_large

    @app.exception_handler(RequestValidationError)
    async def on_invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if content_type and not is_json_content_type(content_type):
            message = f"the body must be JSON sent with Content-Type: application/json, not {content_type}"
            return JSONResponse(status_code=415, content={"detail": [{"field": "body", "message": message}]})
        return JSONResponse(status_code=422, content={"detail": format_validation_errors(exc.errors())})

    def predict(request: PredictRow | PredictBatch) -> PredictResponse:
        """Score each row with the model behind the configured registry alias, on window
        features (per user, item... as declared) read off the batch views at the row's
        ``event_time`` or now; unknown users and items have empty windows."""
        rows: list[PredictRow] = list(request.rows) if isinstance(request, PredictBatch) else [request]
        problems: list[str] = []
        views_now = _get(view_slot, problems)
        model = _get(model_slot, problems)
        if views_now is None or model is None:
            raise _unavailable("not ready to predict: " + "; ".join(problems))
        try:
            return score_rows(rows, model, views_now, cfg.features, clock())
        except Exception as exc:
            # A request that passed validation should always score; if the graph still fails,
            # say which version failed rather than answer a bare 500.
            log.exception("%s failed to score %d row(s)", model.uri, len(rows))
            raise HTTPException(status_code=500, detail=f"{model.uri} failed to score the request: {exc}") from exc

    # The body type depends on serving.max_rows, so it is set here rather than written in the
    # signature (FastAPI reads annotations, and a string one could not see this closure).
    predict.__annotations__["request"] = Annotated[
        request_type,
        Body(
            openapi_examples={
                "one row": {"summary": "One impression", "value": ROW_EXAMPLE},
                "batch": {"summary": f"Up to {cfg.serving.max_rows} impressions", "value": BATCH_EXAMPLE},
            }
        ),
    ]
    predict.__annotations__["return"] = PredictResponse
    app.post(
        "/predict",
        response_model=PredictResponse,
        summary="Click probability of one impression or a batch",
        max_body_size=max_body_bytes(cfg.serving.max_rows),
        responses={
            413: {"model": ValidationErrorResponse, "description": "The body is larger than max_rows rows."},
            415: {"model": ValidationErrorResponse, "description": "The body is not sent as JSON."},
            422: {"model": ValidationErrorResponse, "description": "Invalid request; each error names its field."},
            503: {"model": ErrorResponse, "description": "No model or no batch views to serve yet."},
        },
    )(predict)

    @app.get("/health", response_model=HealthResponse, summary="Liveness, and whether /predict can answer")
    def health() -> HealthResponse:
        """Always 200 while the process is up; ``ready`` says whether a model and views are loaded."""
        model, loaded = model_slot.current, view_slot.current
        problems = []
        if model is None:
            problems.append(model_slot.last_error or f"{model_slot.name} is not loaded yet")
        if loaded is None:
            problems.append(view_slot.last_error or f"{view_slot.name} are not loaded yet")
        return HealthResponse(
            status="ok",
            ready=model is not None and loaded is not None,
            model=model_out(model) if model is not None else None,
            views=views_out(loaded) if loaded is not None else None,
            problems=problems,
        )

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
    if not is_loopback(host):
        log.warning("binding to %s: the service has no authentication; keep it behind a gateway", host)
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
        return version("lambda-ml")
    except PackageNotFoundError:
        return "0.0.0"

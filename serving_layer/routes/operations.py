"""The operators' routes: ``GET /models`` (the loaded versions), ``/health`` (liveness and
problems), ``/ready`` (a readiness probe) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from serving_layer.api_models import ErrorResponse, HealthResponse, ModelsResponse, ReadyResponse, model_out, views_out
from serving_layer.http_api import unavailable
from serving_layer.metrics import CONTENT_TYPE
from serving_layer.service import ServiceContext



def operations_router(service: ServiceContext) -> APIRouter:
    """/models, /health, /ready and /metrics over ``service``'s slots."""
    router = APIRouter()
    cfg, model_slot, view_slot = service.cfg, service.models, service.views

    @router.get(
        "/models",
        response_model=ModelsResponse,
        summary="The loaded model versions, the aliases they serve and their horizons",
        dependencies=service.guarded,
        responses={**service.unauthorized, 503: {"model": ErrorResponse, "description": "No model loaded yet."}},
    )
    def list_models() -> ModelsResponse:
        """What the registry poller loaded: alias -> version, and each version's run, horizon
        and quality score. A moved alias shows here once its version is loaded and swapped in."""
        served = model_slot.current
        if served is None:
            raise unavailable(model_slot.last_error or f"{model_slot.name} is not loaded yet")
        problems = [p for p in service.dependencies.problems() if p.startswith("registry: ")] + list(served.problems)
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

    @router.get("/health", response_model=HealthResponse, summary="Liveness, and whether the application's routes can answer")
    def health() -> HealthResponse:
        """Always 200 while the process is up; ``ready`` says whether a model and views are
        loaded; ``status`` is ``degraded`` when ``problems`` lists anything: a dependency (the
        registry, the lake, Kafka) failing now, named first, while the service keeps serving
        what it loaded, or an alias that could not be refreshed."""
        ready, problems = service.problems()
        served, loaded = model_slot.current, view_slot.current
        return HealthResponse(
            status="degraded" if problems else "ok",
            ready=ready,
            model=model_out(served.champion) if served is not None else None,
            views=views_out(loaded) if loaded is not None else None,
            problems=problems,
        )

    @router.get(
        "/ready",
        response_model=ReadyResponse,
        summary="Readiness: 200 when models and views are loaded, else 503",
        responses={503: {"model": ReadyResponse, "description": "Not ready; problems says why."}},
    )
    def ready() -> JSONResponse:
        """For a load balancer or an orchestrator's readiness probe. A replica that serves the
        last good model and views through a registry, lake or Kafka outage stays ready (200):
        taking it out would leave nothing to answer; ``problems`` names the failing dependency."""
        is_ready, problems = service.problems()
        body = ReadyResponse(ready=is_ready, problems=problems).model_dump()
        return JSONResponse(status_code=200 if is_ready else 503, content=body)

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Text format 0.0.4."}},
    )
    def prometheus_metrics() -> PlainTextResponse:
        """Requests, 5xx errors and latency histograms by route; rows scored by policy and
        version; the loaded versions per alias; registry and view reloads (a reload that kept
        a version it could not refresh counts as a failure); each dependency's state and
        failures (``lambda_ml_dependency_up``, ``lambda_ml_dependency_failures_total``)."""
        gauges: list[tuple[str, str, dict[str, str], float]] = []
        served = model_slot.current
        for alias, version in (served.versions() if served is not None else {}).items():
            gauges.append(("lambda_ml_model_version", "Model version loaded per registry alias.", {"alias": alias}, version))
        for what, slot in (("models", model_slot), ("views", view_slot)):
            gauges.append(("lambda_ml_reloads_total", "Successful loads of models or views.", {"what": what}, slot.loads))
            gauges.append(("lambda_ml_reload_failures_total", "Failed loads of models or views.", {"what": what}, slot.failures))
        gauges.append(("lambda_ml_model_swaps_total", "Alias moves swapped in.", {}, getattr(model_slot, "swaps", 0)))
        if (listener := service.model_updates) is not None:
            for outcome in ("applied", "stale", "invalid"):
                gauges.append(("lambda_ml_model_updates_total", "Kafka model updates by outcome.", {"outcome": outcome},
                               getattr(listener, outcome)))  # fmt: skip
        if (prediction_log := service.prediction_log) is not None:
            for outcome, n in prediction_log.counts():
                gauges.append(("lambda_ml_prediction_log_records_total",
                               "Prediction-log records: sent (acknowledged), dropped (buffer full) or failed (not delivered).",
                               {"outcome": outcome}, n))  # fmt: skip
            gauges.append(("lambda_ml_prediction_log_queued", "Prediction-log records waiting to be sent.", {}, prediction_log.queued))
        gauges += service.dependencies.gauges()
        gauges.append(("lambda_ml_ready", "1 when models and views are loaded.", {}, float(service.readiness()[0])))
        return PlainTextResponse(service.metrics.render(gauges), media_type=CONTENT_TYPE)

    return router

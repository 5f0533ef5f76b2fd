"""The click-through application's route: ``POST /predict`` scores impressions with the model
version(s) a serving policy picks among those loaded from the registry, on window features read
off the batch views merged with the speed layer's increments at the time of the request (or the
row's ``event_time``). A plain request takes a fast path around FastAPI's routing
(:class:`PredictFastPath`); every answer goes to the prediction log.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, Any

from fastapi import Body, FastAPI, HTTPException, Query
from fastapi.responses import Response
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lambda_ml import contract
from lambda_ml.buckets import to_micros
from lambda_ml.config import AbConfig, FeaturesConfig
from lambda_ml_apps.ctr.ab import CHALLENGER_ARM, CHAMPION_ARM, split_rows
from lambda_ml_apps.ctr.answers import AnswerWriter, Scored
from lambda_ml_apps.ctr.api_models import (
    BATCH_EXAMPLE,
    INVALID_ROW_EXAMPLE,
    REQUEST_KINDS,
    ROW_EXAMPLE,
    PolicyName,
    PredictBatch,
    PredictResponse,
    PredictRow,
    batch_type_with_limit,
    predict_request_type,
    row_type_with_limits,
)
from lambda_ml_apps.ctr.model_inputs import lookup_features
from lambda_ml_apps.ctr.policies import PolicyRunner
from serving_layer.api_models import ErrorResponse
from serving_layer.http_api import (
    API_KEY_HEADER,
    body_error_responses,
    current_request_id,
    is_json_content_type,
    max_body_bytes,
    unavailable,
)
from serving_layer.service import ServiceContext
from serving_layer.lake_events import LakeEventsError
from serving_layer.model_store import ServedModels, no_version_yet
from serving_layer.views import BatchViews

log = logging.getLogger(__name__)

# Requests of at most this many rows are scored on the event loop (see predict).
INLINE_ROWS = 16


def score_rows(
    rows: Sequence[PredictRow],
    served: ServedModels,
    views: BatchViews,
    features: FeaturesConfig,
    now: datetime,
    runner: PolicyRunner,
    policy: str,
    deadline_s: float | None = None,
    ab: AbConfig | None = None,
    request_id: str = "",
) -> Scored:
    """Compute the rows' features at ``now`` (or their own ``event_time``), answer with
    ``policy`` over the loaded versions and shape the answer with the inputs the first answering
    version took (all declared features when the prior answered). Under the ``ab`` policy each
    row's user picks its arm (``ab``: the split), and each arm's rows are scored by its version.
    ``answers.predict_response`` makes it the /predict answer, an ``AnswerWriter`` its JSON."""
    found = lookup_features(rows, views, features, now)
    if policy == "ab":
        answers = _ab_answers(rows, found, served, runner, ab or AbConfig())
    else:
        answer = runner.answer(policy, served, lambda m: m.predict_rows(found), len(rows), deadline_s)
        version = answer.models[0].version if len(answer.models) == 1 else None
        answers = [(float(p), version, None) for p in answer.probabilities]
        how, models = answer.how, list(answer.models)
    if policy == "ab":
        by_version = {m.version: m for m in served.distinct()}
        models = [by_version[v] for v in dict.fromkeys(v for _, v, _ in answers if v is not None)]
        arms = {arm: sum(1 for _, _, a in answers if a == arm) for arm in (CHAMPION_ARM, CHALLENGER_ARM)}
        how = ", ".join(f"{n} row(s) to {arm}" for arm, n in arms.items() if n)
    names = models[0].inputs.names if models else contract.model_inputs(features).names
    return Scored(request_id, policy, how, models, views, rows, found, answers, names)


def _ab_answers(
    rows: Sequence[PredictRow], found: list[dict[str, Any]], served: ServedModels, runner: PolicyRunner, ab: AbConfig
) -> list[tuple[float, int | None, str | None]]:
    """(probability, version, arm) per row: the champion's version for the users in its arm,
    the challenger's for the others; everyone gets the champion while no challenger is loaded."""
    answers: list[tuple[float, int | None, str | None]] = [(0.0, None, None)] * len(rows)
    challenger_loaded = ab.challenger_alias in served.by_alias
    fraction = ab.challenger_fraction if challenger_loaded else 0.0
    for arm, indexes in split_rows([r.user_id for r in rows], fraction, ab.salt).items():
        if not indexes:
            continue
        arm_served = served if arm == CHAMPION_ARM else ServedModels(ab.challenger_alias, served.by_alias)
        subset = [found[n] for n in indexes]
        answer = runner.answer("champion", arm_served, lambda m: m.predict_rows(subset), len(indexes))
        (model,) = answer.models
        for n, p in zip(indexes, answer.probabilities, strict=True):
            answers[n] = (float(p), model.version, arm)
    return answers


def prediction_records(scored: Scored, registered_model: str, scored_at: datetime, source: str) -> list[dict[str, Any]]:
    """The prediction-log records of an answer, one per row (see ``serving_layer.prediction_log``)::

        {"request_id": "9b1d...", "event_id": "imp-7-12", "user_id": "u42", "item_id": "i7",
         "device": "mobile", "position": 1, "event_time": "2026-11-22T10:00:00+00:00",
         "scored_at": "2026-11-22T10:00:00.120+00:00", "registered_model": "ctr", "policy": "ab",
         "arm": "challenger", "version": 7, "versions": [7], "probability": 0.0731, "source": "http"}

    ``event_time`` is the impression's time when the row gave one; ``version`` is null under
    the consensus policy and when the deadline policy answered the prior."""
    versions = [m.version for m in scored.models]
    return [
        {
            "request_id": scored.request_id, "event_id": row.event_id, "user_id": row.user_id, "item_id": row.item_id,
            "device": row.device, "position": row.position, "event_time": row.event_time, "scored_at": scored_at,
            "registered_model": registered_model, "policy": scored.policy, "arm": arm, "version": version,
            "versions": versions, "probability": p, "source": source,
        }  # fmt: skip
        for row, (p, version, arm) in zip(scored.rows, scored.answers, strict=True)
    ]


class PredictFastPath:
    """ASGI middleware answering a plain ``POST /predict`` without FastAPI's routing and
    dependency resolution, which take most of a small request's time: the body is read and
    validated in one pass by pydantic-core (``answer`` returns None when it should not, or
    cannot, answer). Anything else, and any request ``answer`` declines (an invalid body, a
    query string, a missing API key, nothing loaded yet...), goes to FastAPI with the body replayed, so
    errors and the OpenAPI document stay FastAPI's."""

    class _Route:
        path = "/predict"  # what RequestMetrics labels the request with

    def __init__(self, app: ASGIApp, answer: Callable[[Headers, bytes], tuple[bytes, str] | None], max_bytes: int) -> None:
        self.app, self.answer, self.max_bytes = app, answer, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST" or scope.get("query_string"):
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                break
        body = b"".join(chunks)
        done = None if more else self.answer(Headers(scope=scope), body)
        if done is None:
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": more}
                return await receive()

            await self.app(scope, replay, send)
            return
        out, request_id = done
        scope["route"] = self._Route
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode()),
                   (b"x-request-id", request_id.encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})


def mount_predict(app: FastAPI, service: ServiceContext) -> None:
    """Add ``POST /predict`` (and its fast path) to the service's ``app``."""
    cfg, clock, metrics, prediction_log = service.cfg, service.clock, service.metrics, service.prediction_log
    model_slot, view_slot, guarded, unauthorized = service.models, service.views, service.guarded, service.unauthorized
    row_type = row_type_with_limits(cfg.events.max_string_length)
    batch_type = batch_type_with_limit(cfg.serving.max_rows, row_type)
    request_type = predict_request_type(batch_type, row_type)
    service.union_tags.update(REQUEST_KINDS)
    runner = PolicyRunner(cfg.serving.consensus, cfg.serving.deadline_ms / 1000, cfg.serving.prior_probability)
    service.shutdown.append(runner.close)
    # answer_plain is defined below; the fast path looks it up at request time.
    app.add_middleware(PredictFastPath, answer=lambda h, b: answer_plain(h, b), max_bytes=max_body_bytes(cfg.serving.max_rows))

    writer = AnswerWriter()

    def answer(
        rows: list[PredictRow], served: ServedModels, views_now: BatchViews, chosen: str, budget_s: float | None, request_id: str
    ) -> bytes:
        now = clock()
        try:
            scored = score_rows(rows, served, views_now, cfg.features, now, runner, chosen, budget_s, cfg.serving.ab, request_id)
            body = writer.write(scored)
        except LakeEventsError as exc:
            log.error("cannot compute features at the rows' event times: %s", exc)
            raise unavailable(f"cannot compute the features at the rows' event times exactly: {exc}") from exc
        except Exception as exc:
            # A request that passed validation should always score; if the graph still fails,
            # say which version failed rather than answer a bare 500.
            log.exception("%s failed to score %d row(s)", served.champion.uri, len(rows))
            raise HTTPException(status_code=500, detail=f"{chosen} policy failed to score the request: {exc}") from exc
        metrics.observe_predictions(chosen, (m.version for m in scored.models), len(rows))
        if prediction_log is not None:
            prediction_log.submit(prediction_records(scored, cfg.mlflow.registered_model, now, "http"))
        return body

    request_adapter: TypeAdapter[Any] = TypeAdapter(request_type)

    def reads_lake(rows: Sequence[PredictRow], views_now: BatchViews) -> bool:
        # A bronze read takes milliseconds: such a request goes to the thread pool, not the event loop.
        if views_now.lake is None:
            return False
        now = to_micros(clock())
        return any(views_now.reads_lake(now if r.event_time is None else to_micros(r.event_time)) for r in rows)

    def answer_plain(headers: Headers, body: bytes) -> tuple[bytes, str] | None:
        """The answer and request id of a plain /predict request (JSON, a few rows, the default
        policy unless it waits, models and views loaded, the API key if one is set), else None."""
        if guarded and not hmac.compare_digest(headers.get(API_KEY_HEADER, "").encode(), cfg.serving.api_key.encode()):
            return None
        if not is_json_content_type(headers.get("content-type", "")) or cfg.serving.policy == "deadline":
            return None
        views_now, served = view_slot.current, model_slot.current
        if views_now is None or served is None:
            return None
        try:
            request = request_adapter.validate_json(body)
        except ValidationError:
            return None
        rows: list[PredictRow] = list(request.rows) if isinstance(request, PredictBatch) else [request]
        if len(rows) > INLINE_ROWS or reads_lake(rows, views_now):
            return None
        request_id = current_request_id()
        try:
            return answer(rows, served, views_now, cfg.serving.policy, None, request_id), request_id
        except HTTPException:
            return None  # FastAPI answers it again, with the error

    async def predict(request: PredictRow | PredictBatch, policy: Any = None, deadline_ms: Any = None) -> Response:
        """Score each row with the loaded model version(s) the policy picks, on window features
        (per user, item... as declared: batch view merged with the speed layer's increments)
        at the row's ``event_time`` or now; unknown users and items have empty windows. The
        answer names the version(s) that produced it."""
        rows: list[PredictRow] = list(request.rows) if isinstance(request, PredictBatch) else [request]
        views_now, served = view_slot.current, model_slot.current
        if views_now is None or served is None:
            problems: list[str] = []  # a first load may take a while: off the event loop
            views_now = await run_in_threadpool(view_slot.get_or_report, problems)
            served = await run_in_threadpool(model_slot.get_or_report, problems)
            if views_now is None or served is None:
                raise unavailable("not ready to predict: " + "; ".join(problems))
        chosen = policy or cfg.serving.policy
        budget_s = None if deadline_ms is None else deadline_ms / 1000
        request_id = current_request_id()  # the client's X-Request-ID, if valid
        # A few rows score in a fraction of a millisecond: on the event loop, without a thread
        # hop. Large batches and the deadline policy (which waits) go to the thread pool so they
        # never hold up other requests. The body is serialised once here (returning a Response
        # skips FastAPI's second validation of the response model).
        if len(rows) <= INLINE_ROWS and chosen != "deadline" and not reads_lake(rows, views_now):
            body = answer(rows, served, views_now, chosen, budget_s, request_id)
        else:
            body = await run_in_threadpool(answer, rows, served, views_now, chosen, budget_s, request_id)
        return Response(body, media_type="application/json", headers={"X-Request-ID": request_id})

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
    predict.__annotations__["policy"] = Annotated[
        PolicyName | None,
        Query(description=f"Serving policy for this request; default serving.policy ({cfg.serving.policy})."),
    ]
    predict.__annotations__["deadline_ms"] = Annotated[
        float | None,
        Query(
            gt=0,
            le=60_000,
            description=f"Time budget of the deadline policy, ms; default serving.deadline_ms ({cfg.serving.deadline_ms:g}).",
        ),
    ]
    predict.__annotations__["return"] = Response
    app.post(
        "/predict",
        response_model=PredictResponse,
        summary="Click probability of one impression or a batch",
        max_body_size=max_body_bytes(cfg.serving.max_rows),
        dependencies=guarded,
        responses={
            **unauthorized,
            **body_error_responses(
                cfg.serving.max_rows, INVALID_ROW_EXAMPLE, "Invalid request; each error names its field, as the client wrote it."
            ),
            503: {
                "model": ErrorResponse,
                "description": "No model or no batch views to serve yet, or bronze cannot be read for features at an event time.",
                "content": {"application/json": {"example": {"detail": f"not ready to predict: {model_slot.name} could not be loaded: "
                                                                  f"{no_version_yet(cfg.mlflow.registered_model, cfg.serving.model_alias)}"}}},
            },
        },
    )(predict)

"""``GET /features/{entity}/{key}``: one key's window features at a time, from the batch view
merged with the speed layer's increments, and from each part alone."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import AwareDatetime

from lambda_ml.buckets import EntityBuckets, bucket_start, from_micros, reach_micros, to_micros, window_plan
from lambda_ml.config import FeaturesConfig
from serving_layer.api_models import BucketRow, ErrorResponse, FeaturePart, FeaturesResponse, IncrementsOut, ValidationErrorResponse, check_scoring_time, horizon_out
from serving_layer.http_api import unavailable
from serving_layer.lake_events import LakeEventsError
from serving_layer.service import ServiceContext
from serving_layer.views import BatchViews


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


def features_router(service: ServiceContext) -> APIRouter:
    """The /features route over ``service``'s view slot."""
    router = APIRouter()
    entity_names = list(service.cfg.features.entities)

    def entity_features(entity: str, key: str, at: Any = None) -> FeaturesResponse:
        """The key's values, one path segment per key field in declaration order (e.g.
        ``/features/user_device/u42/mobile``). Window features at ``at`` (default now) from
        the merged buckets, from the batch view alone and from the increments alone. They count
        the events strictly before ``at``: when the lake holds events at or after it, ``at``'s
        own bucket is its events before ``at`` (read from bronze), in ``merged`` only."""
        declared = service.cfg.features.entities.get(entity)
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
        loaded = service.views.get_or_report(problems)
        if loaded is None:
            raise unavailable("no views to read: " + "; ".join(problems))
        try:
            return features_response(service.cfg.features, loaded, entity, tuple(parts), at or service.clock())
        except LakeEventsError as exc:
            raise unavailable(f"cannot compute the features at {at} exactly: {exc}") from exc

    # Set before registering the route (FastAPI reads annotations then); see predict.
    entity_features.__annotations__["at"] = Annotated[
        AwareDatetime | None, Query(description="Time to compute the window features at (ISO-8601 with a time zone); default now.")
    ]
    router.get(
        "/features/{entity}/{key:path}",
        response_model=FeaturesResponse,
        summary="One entity's window features: batch view ⊕ speed increments, and both parts",
        dependencies=service.guarded,
        responses={
            **service.unauthorized,
            404: {"model": ValidationErrorResponse, "description": "No such entity is declared."},
            422: {"model": ValidationErrorResponse, "description": "The key or the time is invalid; the error names it."},
            503: {"model": ErrorResponse, "description": "No views loaded yet, or bronze cannot be read for features at `at`."},
        },
    )(entity_features)
    return router

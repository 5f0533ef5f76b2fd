"""Request and response bodies of the prediction service (they are its OpenAPI document)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from lambda_ml.apps import ServingModel
from lambda_ml.contract import Horizon

if TYPE_CHECKING:
    from serving_layer.views import BatchViews

# Scoring times accepted: windows reach back 7 days or so, which must stay a valid datetime.
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST_TIME = datetime(2200, 1, 1, tzinfo=timezone.utc)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_scoring_time(value: datetime) -> None:
    """Refuse times the bucket arithmetic cannot hold (before 1970, from 2200 on).

    >>> check_scoring_time(datetime(1960, 1, 1, tzinfo=timezone.utc))
    Traceback (most recent call last):
    ...
    ValueError: must be between 1970-01-01T00:00:00Z and 2200-01-01T00:00:00Z
    """
    if not EARLIEST_TIME <= value < LATEST_TIME:
        raise ValueError("must be between 1970-01-01T00:00:00Z and 2200-01-01T00:00:00Z")


# --------------------------------------------------------------------------- responses


# Bronze Delta versions a batch run read, by event type (e.g. {"views": 12, "orders": 11});
# null where unknown.
HorizonOut = dict[str, int | None]


class ModelOut(_Body):
    """The registered model version that scored the request."""

    name: str = Field(description="Registered model name in MLflow.")
    version: int = Field(description="Registered model version number.")
    alias: str = Field(description="Registry alias the service follows.")
    run_id: str | None = Field(description="MLflow run that produced the version.")
    horizon: HorizonOut = Field(description="Bronze versions the model was trained at.")
    quality: float | None = Field(
        None, description="Quality score used by the quality and deadline policies: the version's recent "
        "progressive-validation AUC (tag quality.progressive_auc), else its holdout AUC; null if neither is known."
    )


class ViewsOut(_Body):
    """The batch views the features were read from."""

    horizon: HorizonOut
    keys: dict[str, int] = Field(description="Distinct keys in each entity's view, by entity.")


class HealthResponse(_Body):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"status": "degraded", "ready": False, "model": None, "views": None,
                 "problems": ["models:/ctr@champion could not be loaded: no version of registered model 'ctr' "
                              "has alias 'champion' yet: run the batch layer first"]},
            ]
        }
    )  # fmt: skip

    status: Literal["ok", "degraded"] = Field(
        description="The process is up and answering: ok, or degraded while problems lists anything."
    )
    ready: bool = Field(description="A model and the batch views are loaded: /predict can answer.")
    model: ModelOut | None = Field(description="The model being served, if any.")
    views: ViewsOut | None = Field(description="The batch views being served, if any.")
    problems: list[str] = Field(
        description="Why the service is not ready, each dependency failing now (named first: registry, lake, kafka; "
        "the service keeps serving what it loaded) and aliases that could not be refreshed. Empty when all is well."
    )


class FieldError(_Body):
    field: str = Field(description="Dotted path of the offending field, e.g. rows.0.position; 'body' for the whole body.")
    message: str


class ValidationErrorResponse(_Body):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"detail": [{"field": "rows.0.position", "message": "Input should be greater than or equal to 1"}]}]}
    )

    detail: list[FieldError]


class ErrorResponse(_Body):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"detail": "no model to serve yet: models:/ctr@champion could not be loaded: ..."}]}
    )

    detail: str


class ModelsResponse(_Body):
    """The versions loaded from the registry and the aliases they serve."""

    registered_model: str = Field(description="Registered model name in MLflow.")
    primary_alias: str = Field(description="Alias the champion policy answers with (serving.model_alias).")
    aliases: dict[str, int] = Field(description="Alias -> the version loaded for it.")
    versions: list[ModelOut] = Field(description="Each loaded version once, with its horizon and quality score.")
    default_policy: str = Field(description="Policy used when a request names none (serving.policy).")
    poll_interval_s: float = Field(description="Seconds between two polls of the registry's aliases.")
    swaps: int = Field(description="Times a moved alias was swapped in since the start.")
    problems: list[str] = Field(description="Aliases that could not be resolved or refreshed at the last poll.")


class ReadyResponse(_Body):
    ready: bool = Field(description="True when a model and the views are loaded (also while a dependency fails: the loaded ones serve).")
    problems: list[str] = Field(description="Why not ready, and each dependency failing now (as in /health).")


class BucketRow(_Body):
    bucket_start: AwareDatetime = Field(description="Start of the event-time bucket (UTC).")
    values: dict[str, float | None] = Field(description="Aggregate -> its value in the bucket (null: min/max of no event).")


class FeaturePart(_Body):
    features: dict[str, float] = Field(description="The entity's window features computed from this part alone.")
    buckets: list[BucketRow] = Field(description="This part's buckets within the longest window, oldest first.")


class IncrementsOut(_Body):
    through: HorizonOut | None = Field(
        description="Newest bronze versions (views_version, orders_version) of the merged increments (null: none merged)."
    )
    rows_merged: int = Field(
        description="Increment rows after the batch horizon (a bronze version of one of their events "
        "above the horizon's version of that table), merged into the view."
    )
    rows_in_batch: int = Field(description="Increment rows the batch view already counts (left out; the speed layer deletes them).")


class FeaturesResponse(_Body):
    """One entity's window features: the batch view at its horizon ⊕ the speed layer's
    increments after it, and both parts on their own."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "entity": "user",
                    "key": {"user_id": "u42"},
                    "at": "2026-11-22T10:30:00Z",
                    "horizon": {"views": 12, "orders": 11},
                    "increments": {"through": {"views": 14, "orders": 13}, "rows_merged": 2,
                                   "rows_in_batch": 0},
                    "merged": {"features": {"user_views_1h": 3.0}, "buckets": [
                        {"bucket_start": "2026-11-22T10:00:00Z", "values": {"views": 3}}]},
                    "batch": {"features": {"user_views_1h": 1.0}, "buckets": [
                        {"bucket_start": "2026-11-22T10:00:00Z", "values": {"views": 1}}]},
                    "speed": {"features": {"user_views_1h": 2.0}, "buckets": [
                        {"bucket_start": "2026-11-22T10:00:00Z", "values": {"views": 2}}]},
                }
            ]
        }
    )  # fmt: skip

    entity: str = Field(description="Entity name, as declared under features.entities.")
    key: dict[str, str] = Field(description="Key field -> value identifying the entity.")
    at: AwareDatetime = Field(description="Time the window features are computed at.")
    horizon: HorizonOut = Field(description="Bronze versions of the batch view.")
    increments: IncrementsOut
    merged: FeaturePart = Field(description="What /predict uses: batch ⊕ speed.")
    batch: FeaturePart = Field(description="The batch view alone.")
    speed: FeaturePart = Field(description="The speed layer's increments after the horizon alone.")


def horizon_out(horizon: Horizon) -> HorizonOut:
    return horizon.parts


def model_out(model: ServingModel) -> ModelOut:
    return ModelOut(
        name=model.name,
        version=model.version,
        alias=model.alias,
        run_id=model.run_id,
        horizon=horizon_out(model.horizon),
        quality=model.quality,
    )


def views_out(views: BatchViews) -> ViewsOut:
    """The views' horizon and distinct keys per entity."""
    return ViewsOut(horizon=horizon_out(views.horizon), keys={entity: views.size(entity) for entity in views.views})

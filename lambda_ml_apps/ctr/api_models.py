"""The click-through application's request and answer models for ``POST /predict``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AwareDatetime,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    Tag,
    ValidationInfo,
    create_model,
    field_validator,
)
from pydantic_core import PydanticCustomError

from lambda_ml.schemas import EventField
from lambda_ml.validation import DEFAULT_MAX_STRING_LENGTH, InvalidEvent, field_value
from serving_layer.api_models import ModelOut, ViewsOut, _Body, check_scoring_time

# float32 holds every integer up to 2**24 exactly; positions are small anyway.
MAX_POSITION = 1_000_000
ROW_EXAMPLE: dict[str, JsonValue] = {"user_id": "u42", "item_id": "i7", "device": "mobile", "position": 1}
BATCH_EXAMPLE: dict[str, JsonValue] = {
    "rows": [ROW_EXAMPLE, {"user_id": "u9", "item_id": "i3", "device": "desktop", "position": 4}]
}
# A batch whose second row is refused, and the 422 the service answers to it.
INVALID_BATCH: dict[str, JsonValue] = {"rows": [ROW_EXAMPLE, {"user_id": "u9", "item_id": "i3", "device": "desktop", "position": 0}]}
INVALID_ROW_EXAMPLE: dict[str, JsonValue] = {
    "detail": [{"field": "rows.1.position", "message": "Input should be greater than or equal to 1"}]
}
# A row's fields, typed as an impression's: their values pass the event validator's checks.
_ROW_FIELDS = {
    name: EventField(name, kind)
    for name, kind in (("user_id", "string"), ("item_id", "string"), ("device", "string"), ("position", "int"),
                       ("event_time", "timestamp"), ("event_id", "string"))
}  # fmt: skip


PolicyName = Literal["champion", "latest", "quality", "consensus", "deadline", "ab"]


class PredictRow(_Body):
    """One impression to score: who sees which item, on what device, at which position.

    Values are checked by the event validator (``lambda_ml.validation``) the speed layer and
    stream scoring apply, with the same messages: strings must be JSON strings, not blank and
    at most ``events.max_string_length`` characters; ``position`` a JSON integer (``"2"`` is
    refused); ``event_time`` an ISO-8601 string with a time zone."""

    model_config = ConfigDict(json_schema_extra={"examples": [ROW_EXAMPLE]})
    # events.max_string_length of the service's config (see row_type_with_limits).
    max_string_length: ClassVar[int] = DEFAULT_MAX_STRING_LENGTH

    user_id: str = Field(min_length=1, max_length=DEFAULT_MAX_STRING_LENGTH, description="User id; unknown users count zero.")
    item_id: str = Field(min_length=1, max_length=DEFAULT_MAX_STRING_LENGTH, description="Item id; unknown items count zero.")
    device: str = Field(
        min_length=1,
        max_length=DEFAULT_MAX_STRING_LENGTH,
        description="Device, e.g. mobile, desktop or tablet; the model scores other values as an unknown device.",
    )
    position: int = Field(ge=1, le=MAX_POSITION, strict=True, description="Ad position on the page, 1 = top.")
    event_time: AwareDatetime | None = Field(
        None,
        description="When the impression is shown (ISO-8601 with a time zone); default: now. Window features "
        "cover the events before it, so a time earlier than the views' latest events also sees later ones.",
    )
    event_id: str | None = Field(
        None,
        min_length=1,
        max_length=DEFAULT_MAX_STRING_LENGTH,
        description="The impression's event id, if it has one: the prediction log carries it, so that "
        "online evaluation can join the prediction with the impression's click.",
    )

    @field_validator("user_id", "item_id", "device", "position", "event_time", "event_id", mode="before")
    @classmethod
    def _event_value(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.field_name in ("event_time", "event_id"):
            return None  # optional in a request (an impression on Kafka must have them)
        try:
            return field_value(_ROW_FIELDS[str(info.field_name)], value, cls.max_string_length)
        except InvalidEvent as exc:
            raise PydanticCustomError("invalid_event_value", "{reason}", {"reason": str(exc)}) from None

    @field_validator("event_time")
    @classmethod
    def _in_range(cls, value: datetime | None) -> datetime | None:
        if value is not None:
            check_scoring_time(value)
        return value


def row_type_with_limits(max_string_length: int) -> type[PredictRow]:
    """PredictRow with ``events.max_string_length`` (the limit shows in the OpenAPI schema)."""

    def text(base: str) -> Any:
        spec = PredictRow.model_fields[base]
        return (spec.annotation, Field(spec.default, min_length=1, max_length=max_string_length, description=spec.description))

    limited: type[PredictRow] = create_model(
        "PredictRow",
        __base__=PredictRow,
        __doc__=PredictRow.__doc__,
        **{name: text(name) for name in ("user_id", "item_id", "device", "event_id")},
    )
    limited.max_string_length = max_string_length
    return limited


class PredictBatch(_Body):
    """Several impressions scored in one call (at most ``serving.max_rows``)."""

    model_config = ConfigDict(json_schema_extra={"examples": [BATCH_EXAMPLE]})

    rows: list[PredictRow] = Field(min_length=1, description="The rows to score, answered in the same order.")


def request_kind(value: Any) -> str:
    """Which body shape a request has: ``{"rows": [...]}`` is a batch, anything else one row.

    >>> request_kind({"rows": []}), request_kind({"user_id": "u"}), request_kind([1])
    ('batch', 'row', 'row')
    """
    if isinstance(value, dict) and "rows" in value:
        return "batch"
    if isinstance(value, PredictBatch):
        return "batch"
    return "row"


REQUEST_KINDS = ("batch", "row")


def predict_request_type(batch_type: type[PredictBatch], row_type: type[PredictRow] = PredictRow) -> Any:
    """The /predict body: one row or a batch, told apart by the ``rows`` key (so an error names
    the fields of the shape the client meant, not of both)."""
    return Annotated[
        Union[Annotated[batch_type, Tag("batch")], Annotated[row_type, Tag("row")]],
        Discriminator(request_kind),
    ]


def batch_type_with_limit(max_rows: int, row_type: type[PredictRow] = PredictRow) -> type[PredictBatch]:
    """PredictBatch accepting at most ``max_rows`` rows of ``row_type`` (the limit shows in the
    OpenAPI schema)."""
    limited: type[PredictBatch] = create_model(
        "PredictBatch",
        __base__=PredictBatch,
        __doc__=f"Several impressions scored in one call (1 to {max_rows}).",
        rows=(
            list[row_type],  # type: ignore[valid-type]
            Field(min_length=1, max_length=max_rows, description="The rows to score, answered in the same order."),
        ),
    )
    return limited



class Prediction(_Body):
    user_id: str
    item_id: str
    event_id: str | None = Field(None, description="The row's event_id, if it gave one.")
    probability: float = Field(ge=0, le=1, description="Click probability, P(click), of this impression.")
    version: int | None = Field(
        None, description="The model version that produced this probability; null under consensus and for the prior."
    )
    arm: Literal["champion", "challenger"] | None = Field(
        None, description="Under the ab policy, the arm the row's user is in (a stable hash of the user id); else null."
    )
    features: dict[str, int | float | str] = Field(
        description="The model inputs the row was scored with, by name: window features such as "
        "user_clicks_24h or item_ctr_7d (see features: in the platform config), then the context fields."
    )


class PredictResponse(_Body):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": {
                        "name": "ctr",
                        "version": 2,
                        "alias": "champion",
                        "run_id": "8f0c2d1e5a7b4c3d9e8f7a6b5c4d3e2f",
                        "horizon": {"impressions": 12, "clicks": 11},
                        "quality": 0.71,
                    },
                    "models": [{"name": "ctr", "version": 2, "alias": "champion", "run_id": "8f0c2d1e5a7b4c3d9e8f7a6b5c4d3e2f",
                                "horizon": {"impressions": 12, "clicks": 11}, "quality": 0.71}],
                    "request_id": "4f9c1a0e7d2b4e38a1c5f0b9d8e7c6a5",
                    "policy": "champion",
                    "how": "version 2 (alias champion)",
                    "views": {"horizon": {"impressions": 12, "clicks": 11}, "keys": {"user": 500, "item": 100, "user_device": 1200}},
                    "predictions": [
                        {
                            "user_id": "u42",
                            "item_id": "i7",
                            "event_id": None,
                            "probability": 0.0731,
                            "version": 2,
                            "arm": None,
                            "features": {
                                "user_impressions_24h": 38.0,
                                "user_clicks_24h": 3.0,
                                "user_ctr_24h": 0.0678,
                                "item_ctr_7d": 0.0731,
                                "position": 1,
                                "device": "mobile",
                            },
                        }
                    ],
                }
            ]
        }
    )

    model: ModelOut | None = Field(
        description="The version that produced the answer; under the consensus policy the first of models; "
        "null when the deadline policy answered with the prior."
    )
    models: list[ModelOut] = Field(description="Every version that produced the answer (empty: the prior).")
    request_id: str = Field(description="Id of this request, also in the prediction log and the X-Request-ID header.")
    policy: PolicyName = Field(description="The serving policy that answered.")
    how: str = Field(description="How the policy answered, e.g. 'mean of 2 version(s)'.")
    views: ViewsOut
    predictions: list[Prediction] = Field(description="One per request row, in request order.")



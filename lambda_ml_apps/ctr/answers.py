"""The answer to a scoring request, as computed (``Scored``: the rows, their features, each
row's probability, version and arm, the versions that answered and how) and as sent: the
``PredictResponse`` of the OpenAPI document, or the same answer's JSON written directly by an
``AnswerWriter``. Building and dumping the pydantic models took about a tenth of a small
request's time; the writer gives the very bytes the model would dump, and hands what it cannot
write that way (a probability outside [0, 1], a string UTF-8 cannot encode) to the model,
which then fails as it would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError, to_json

from lambda_ml_apps.ctr.api_models import Prediction, PredictResponse, PredictRow
from serving_layer.api_models import model_out, views_out
from lambda_ml_apps.ctr.model_inputs import FeatureValue
from lambda_ml_apps.ctr.serving_model import CtrServingModel
from serving_layer.views import BatchViews

# (probability, the version that produced it or None, the A/B arm or None) per row.
RowAnswer = tuple[float, int | None, str | None]


@dataclass(frozen=True)
class Scored:
    """A scored request: per row its features and answer; the versions that answered (none:
    the prior), how, and the features each prediction shows (``names``)."""

    request_id: str
    policy: str
    how: str
    models: Sequence[CtrServingModel]
    views: BatchViews
    rows: Sequence[PredictRow]
    features: Sequence[Mapping[str, FeatureValue]]
    answers: Sequence[RowAnswer]
    names: Sequence[str]


def predict_response(scored: Scored) -> PredictResponse:
    """The answer as the pydantic model of the OpenAPI document (validated)."""
    predictions = [
        Prediction(
            user_id=row.user_id,
            item_id=row.item_id,
            event_id=row.event_id,
            probability=p,
            version=version,
            arm=arm,  # type: ignore[arg-type]
            features={name: f[name] for name in scored.names},
        )
        for row, f, (p, version, arm) in zip(scored.rows, scored.features, scored.answers, strict=True)
    ]
    outs = [model_out(m) for m in scored.models]
    return PredictResponse(
        model=outs[0] if outs else None,
        models=outs,
        request_id=scored.request_id,
        policy=scored.policy,  # type: ignore[arg-type]
        how=scored.how,
        views=views_out(scored.views),
        predictions=predictions,
    )


class AnswerWriter:
    """Writes an answer's JSON with pydantic-core's serializer on plain dicts and lists, as the
    model's own dump would (the same number formatting, NaN and infinity as null). The parts
    that change only with the loaded versions and views (``model``, ``models``, ``views``) are
    their pydantic models, made once per version or views object and reused. Thread-safe (a
    request reads and adds whole entries; a race at worst makes a part twice)."""

    def __init__(self, max_parts: int = 64) -> None:
        self.max_parts = max_parts
        # id -> (the object, its part): holding the object keeps its id from being reused.
        self._parts: dict[int, tuple[object, BaseModel]] = {}

    def write(self, scored: Scored) -> bytes:
        """The JSON of ``predict_response(scored)``, written directly when it can be."""
        if not all(0.0 <= p <= 1.0 for p, _, _ in scored.answers):
            return predict_response(scored).model_dump_json().encode()  # raises as the model does
        names = scored.names
        models = [self._part(m, model_out) for m in scored.models]
        answer = {
            "model": models[0] if models else None,
            "models": models,
            "request_id": scored.request_id,
            "policy": scored.policy,
            "how": scored.how,
            "views": self._part(scored.views, views_out),
            "predictions": [
                {"user_id": row.user_id, "item_id": row.item_id, "event_id": row.event_id, "probability": p,
                 "version": version, "arm": arm, "features": {name: f[name] for name in names}}
                for row, f, (p, version, arm) in zip(scored.rows, scored.features, scored.answers, strict=True)
            ],
        }  # fmt: skip
        try:
            return to_json(answer, inf_nan_mode="null")
        except PydanticSerializationError:  # e.g. a string UTF-8 cannot encode: as the model would
            return predict_response(scored).model_dump_json().encode()

    def _part(self, source: Any, model: Callable[[Any], BaseModel]) -> BaseModel:
        found = self._parts.get(id(source))
        if found is not None and found[0] is source:
            return found[1]
        part = model(source)
        if len(self._parts) >= self.max_parts:
            self._parts.clear()  # versions and views come and go; only the current ones matter
        self._parts[id(source)] = (source, part)
        return part

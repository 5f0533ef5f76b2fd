"""k-means clustering on the platform.

The batch layer trains the centres on the whole lake with Spark's k-means|| (:mod:`.batch`),
choosing k by silhouette; the speed layer moves them between batch runs with Sculley's
mini-batch updates and a forgetting factor (:func:`.model.mini_batch_update`); serving assigns
each point to its nearest centre (:func:`.model.assign`). The model travels as data
(:class:`.model.KMeansCentres`, a small JSON object). :mod:`.generator` makes point events whose
true centres move at a known speed; :mod:`.datasets` loads a real public data set shipped
with scikit-learn.
"""

from __future__ import annotations

from lambda_ml.apps import Application
from lambda_ml.config import PlatformConfig
from lambda_ml.features import DeclaredFeatureEvents
from lambda_ml_apps.kmeans.batch import KMeansBatchUpdate
from lambda_ml_apps.kmeans.demo import KMeansDemo
from lambda_ml_apps.kmeans.serving import KMeansServingModels
from lambda_ml_apps.kmeans.speed import KMeansSpeedUpdater

_FEATURE_EVENTS = DeclaredFeatureEvents()


def check_config(cfg: PlatformConfig) -> None:
    """Refuse a config k-means cannot run with (ValueError naming the file and the key): its
    features must be numeric fields of the points, and the feature declarations must find the
    fields they read in the events they count."""
    points = cfg.kmeans.event_type
    if points not in cfg.events.types:
        raise ValueError(f"{cfg.source}: kmeans.event_type: {points!r} is not a declared event type ({', '.join(cfg.events.types)})")
    fields = cfg.events.types[points].fields
    for name in cfg.kmeans.features:
        kind = fields.get(name)
        if kind is None:
            raise ValueError(
                f"{cfg.source}: kmeans.features: {name!r} is not a field of events.types.{points} ({', '.join(fields)})"
            )
        if kind not in ("int", "double"):
            raise ValueError(f"{cfg.source}: kmeans.features: {name!r} is a {kind} field of {points}; the centres need numbers (int or double)")
    _FEATURE_EVENTS.check(cfg)


APPLICATION = Application(
    name="kmeans",
    event_types=(),  # the one it clusters is kmeans.event_type
    features=_FEATURE_EVENTS,
    batch=KMeansBatchUpdate(),
    speed=KMeansSpeedUpdater(),
    serving=KMeansServingModels(),
    demo=KMeansDemo(),
    check_config=check_config,
    example_config="conf/kmeans.yaml",
)

"""Click-through prediction: impressions and clicks in, P(click) out.

A click labels its impression when it comes within the attribution window (``ctr:``); the
batch layer trains a Spark pipeline (logistic regression or gradient-boosted trees) on a
point-in-time training set and serves its ONNX export; the speed layer joins the labels and
moves an online logistic regression warm-started from the champion; the service answers
``POST /predict``.
"""

from __future__ import annotations

from lambda_ml.apps import Application
from lambda_ml_apps.ctr.batch import CtrBatchUpdate
from lambda_ml_apps.ctr.demo import CtrDemo
from lambda_ml_apps.ctr.events import CLICKS, IMPRESSIONS, CtrFeatureEvents
from lambda_ml_apps.ctr.serving import CtrServingModels
from lambda_ml_apps.ctr.speed import CtrSpeedUpdater

APPLICATION = Application(
    name="ctr",
    event_types=(IMPRESSIONS, CLICKS),
    features=CtrFeatureEvents(),
    batch=CtrBatchUpdate(),
    speed=CtrSpeedUpdater(),
    serving=CtrServingModels(),
    demo=CtrDemo(),
)

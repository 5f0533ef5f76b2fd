"""What the batch layer publishes and the serving layer reads: model inputs, registry tags and
view tables. The layers never import each other; they agree on these names only.

Model inputs (in this order) are the ONNX graph's inputs, one ``[None, 1]`` tensor each:
per-user and per-item counts of impressions and clicks strictly before the scoring time,
the ad position (floats), and the device (string).
"""

from __future__ import annotations

# Numeric model inputs, float tensors of shape [None, 1].
USER_COUNT_FEATURES = ("user_impressions", "user_clicks")
ITEM_COUNT_FEATURES = ("item_impressions", "item_clicks")
CONTEXT_NUMERIC_FEATURES = ("position",)
NUMERIC_FEATURES = USER_COUNT_FEATURES + ITEM_COUNT_FEATURES + CONTEXT_NUMERIC_FEATURES
# String model inputs, string tensors of shape [None, 1].
CATEGORICAL_FEATURES = ("device",)
MODEL_INPUTS = NUMERIC_FEATURES + CATEGORICAL_FEATURES

# Batch views (Delta tables under lake.root): entity key, impressions, clicks, horizon columns.
USER_VIEW = ("views", "user_counts")
ITEM_VIEW = ("views", "item_counts")
VIEW_COUNT_COLUMNS = ("impressions", "clicks")

# Registry alias of the model serving answers with by default.
CHAMPION_ALIAS = "champion"

# Tags on the MLflow run and on every registered model version.
TAG_FLAVOR = "flavor"  # "spark" | "onnx"
TAG_HORIZON_IMPRESSIONS = "horizon.impressions"  # bronze impressions Delta version
TAG_HORIZON_CLICKS = "horizon.clicks"  # bronze clicks Delta version
TAG_SPARK_VERSION = "spark_model_version"  # on the ONNX version: its Spark twin
TAG_MODEL_INPUTS = "model_inputs"  # comma-separated MODEL_INPUTS
TAG_PARITY = "parity"  # "passed" | "failed": the ONNX-vs-Spark check of the run
# Name of the ONNX output holding [P(no click), P(click)] per row.
ONNX_PROBABILITY_OUTPUT = "probability"

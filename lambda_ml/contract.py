"""What the batch layer publishes and the serving layer reads: model inputs, registry tags and
view tables. The layers never import each other; they agree on these names only.

Model inputs (in this order) are the ONNX graph's inputs, one ``[None, 1]`` tensor each:
per-user and per-item counts of impressions and clicks strictly before the scoring time,
the ad position (floats), and the device (string).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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
# Horizon part (bronze table) -> the view column holding its Delta version.
VIEW_HORIZON_COLUMNS = {"impressions": "horizon_impressions", "clicks": "horizon_clicks"}

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


@dataclass(frozen=True)
class Horizon:
    """The bronze Delta versions a batch run read (None where unknown, e.g. an untagged model).

    >>> str(Horizon(5, 4)), str(Horizon())
    ('bronze impressions v5, clicks v4', 'bronze impressions v?, clicks v?')
    """

    impressions: int | None = None
    clicks: int | None = None

    def tags(self) -> dict[str, str]:
        """The horizon as MLflow tags (run and model versions).

        >>> Horizon(impressions=3, clicks=5).tags()
        {'horizon.impressions': '3', 'horizon.clicks': '5'}
        """
        return {TAG_HORIZON_IMPRESSIONS: str(self.impressions), TAG_HORIZON_CLICKS: str(self.clicks)}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Horizon:
        """The horizon recorded in registry tags; parts missing or unreadable are None.

        >>> Horizon.from_tags({"horizon.impressions": "5", "horizon.clicks": "4"})
        Horizon(impressions=5, clicks=4)
        >>> Horizon.from_tags({"horizon.clicks": "x"})
        Horizon(impressions=None, clicks=None)
        """

        def number(key: str) -> int | None:
            value = tags.get(key)
            return int(value) if value is not None and value.isdigit() else None

        return cls(number(TAG_HORIZON_IMPRESSIONS), number(TAG_HORIZON_CLICKS))

    def __str__(self) -> str:
        def part(version: int | None) -> str:
            return "?" if version is None else str(version)

        return f"bronze impressions v{part(self.impressions)}, clicks v{part(self.clicks)}"

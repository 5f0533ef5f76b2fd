"""Real public data sets for k-means, read from the files scikit-learn ships inside its wheel
(no network). scikit-learn is a test dependency of the platform (the ``test`` extra); these
functions import it only when called.

- ``wine``: UCI Wine recognition data, 178 wines from three cultivars, 13 chemical
  measurements. Standardised (zero mean, unit variance per column): the raw columns differ in
  scale by four orders of magnitude (proline is in the hundreds, hue below 2), so Euclidean
  distances on raw values would be proline's alone.
- ``digits``: UCI optical handwritten digits, 1,797 8x8 images, 64 pixel intensities 0-16.
  Kept as they are: every column is on the same scale already, and standardising would blow
  up the near-constant border pixels (three are always 0).
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
from numpy.typing import NDArray

DatasetName = Literal["wine", "digits"]
DATASETS: tuple[DatasetName, ...] = ("wine", "digits")


class PointDataset(NamedTuple):
    """A data set as points: float feature columns (in vector order) and each row's class in
    the source data (a reference labelling, not used for training)."""

    name: str
    points: pd.DataFrame
    classes: NDArray[np.int64]


def column_name(feature: str) -> str:
    """A feature name as a plain column name (letters, digits and underscores), so that it
    needs no quoting in Spark SQL or in event fields.

    >>> column_name("od280/od315_of_diluted_wines")
    'od280_od315_of_diluted_wines'
    """
    return re.sub(r"[^0-9A-Za-z_]+", "_", feature).strip("_")


def standardised(frame: pd.DataFrame) -> pd.DataFrame:
    """Each column centred and scaled to unit (population) standard deviation.

    >>> standardised(pd.DataFrame({"a": [1.0, 3.0]}))["a"].tolist()
    [-1.0, 1.0]
    """
    spread = frame.std(ddof=0)
    if (spread == 0).any():
        raise ValueError(f"cannot standardise constant column(s) {list(spread.index[spread == 0])}")
    return (frame - frame.mean()) / spread


def load_points(name: DatasetName = "wine") -> PointDataset:
    """The data set ``name`` as float points (see the module docstring for how each is scaled)."""
    from sklearn import datasets

    if name == "wine":
        bunch = datasets.load_wine()
        raw = pd.DataFrame(bunch.data, columns=[column_name(f) for f in bunch.feature_names], dtype=np.float64)
        points = standardised(raw)
    elif name == "digits":
        bunch = datasets.load_digits()
        points = pd.DataFrame(bunch.data, columns=[column_name(f) for f in bunch.feature_names], dtype=np.float64)
    else:
        raise ValueError(f"name must be one of {list(DATASETS)}, got {name!r}")
    return PointDataset(name, points, np.asarray(bunch.target, dtype=np.int64))

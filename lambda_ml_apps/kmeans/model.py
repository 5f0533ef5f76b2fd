"""The k-means model as data, and the pure NumPy functions the layers apply to it.

A model is its centres, the names of the features in vector order, and the weight each centre
carries (:class:`KMeansCentres`). Serving calls :func:`assign`; the speed layer calls
:func:`mini_batch_update` on each micro-batch; the batch layer and its quality gate compare
models with :func:`inertia` (lower is better on the same rows).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

# Points are assigned in chunks so that the (chunk, k, d) difference array stays near 32 MB.
_CHUNK_ELEMENTS = 4_000_000
_JSON_FIELDS = ("feature_names", "centres", "counts")


@dataclass(frozen=True)
class KMeansCentres:
    """k centres in d dimensions, the feature names giving the vector order, and per centre
    the weight (number of points, possibly decayed) it carries into mini-batch updates.

    Fields are stored as tuples of floats so that the model is immutable and compares by value;
    :meth:`of` takes arrays. Invalid input raises ``ValueError`` naming the field.

    >>> m = KMeansCentres.of([[0, 0], [10, 0]], ("x0", "x1"), [5, 3])
    >>> m.k, m.dimensions, m.counts
    (2, 2, (5.0, 3.0))
    >>> KMeansCentres.from_json(m.to_json()) == m
    True
    """

    centres: tuple[tuple[float, ...], ...]
    feature_names: tuple[str, ...]
    counts: tuple[float, ...]

    def __post_init__(self) -> None:
        centres = _finite_array(self.centres, "centres", 2)
        if centres.shape[0] == 0 or centres.shape[1] == 0:
            raise ValueError(f"centres must hold at least one centre of at least one dimension, got shape {centres.shape}")
        names = self.feature_names
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            raise ValueError("feature_names must be a sequence of non-empty strings")
        names = tuple(names)
        if len(names) != centres.shape[1]:
            raise ValueError(f"feature_names has {len(names)} names but the centres have {centres.shape[1]} dimensions")
        if len(set(names)) != len(names):
            raise ValueError(f"feature_names must be distinct, got {list(names)}")
        counts = _finite_array(self.counts, "counts", 1)
        if counts.shape[0] != centres.shape[0]:
            raise ValueError(f"counts has {counts.shape[0]} values but there are {centres.shape[0]} centres")
        if (counts < 0).any():
            raise ValueError(f"counts must be non-negative, got {counts.tolist()}")
        object.__setattr__(self, "centres", tuple(tuple(float(v) for v in row) for row in centres))
        object.__setattr__(self, "feature_names", names)
        object.__setattr__(self, "counts", tuple(float(c) for c in counts))

    @classmethod
    def of(cls, centres: ArrayLike, feature_names: Sequence[str], counts: ArrayLike) -> KMeansCentres:
        """A model from array-likes (NumPy arrays, nested lists), validated like the constructor.

        >>> KMeansCentres.of(np.zeros((1, 2)), ["a", "b"], [3]).counts
        (3.0,)
        """
        if isinstance(feature_names, str):
            raise ValueError("feature_names must be a sequence of non-empty strings, not one string")
        return cls(_tuples(centres), tuple(feature_names), _tuples(counts))

    @property
    def k(self) -> int:
        return len(self.centres)

    @property
    def dimensions(self) -> int:
        return len(self.feature_names)

    @property
    def array(self) -> NDArray[np.float64]:
        """The centres as a new (k, d) float array."""
        return np.array(self.centres, dtype=np.float64)

    @property
    def count_array(self) -> NDArray[np.float64]:
        return np.array(self.counts, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form: plain lists, no generation (the layer that publishes the model
        stamps it)."""
        return {
            "feature_names": list(self.feature_names),
            "centres": [list(row) for row in self.centres],
            "counts": list(self.counts),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KMeansCentres:
        """The inverse of :meth:`to_dict`; unknown or missing fields raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a k-means model must be a JSON object, got {type(data).__name__}")
        missing = [f for f in _JSON_FIELDS if f not in data]
        if missing:
            raise ValueError(f"k-means model is missing field(s) {missing}")
        unknown = sorted(set(data) - set(_JSON_FIELDS))
        if unknown:
            raise ValueError(f"k-means model has unknown field(s) {unknown}")
        for name in _JSON_FIELDS:
            if not isinstance(data[name], list):
                raise ValueError(f"{name} must be a JSON array, got {type(data[name]).__name__}")
        return cls.of(data["centres"], data["feature_names"], data["counts"])

    def to_json(self) -> str:
        """Compact JSON; floats are written with ``repr`` so they read back bit for bit."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> KMeansCentres:
        """Parse and validate; malformed JSON, NaN or Infinity raise ``ValueError``."""
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"k-means model is not valid JSON: {e}") from e
        return cls.from_dict(data)


def _tuples(values: Any) -> Any:
    """Nested sequences (or an array) as nested tuples, for the frozen fields; left as they are
    when not iterable, so that validation names the field."""
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if isinstance(values, (list, tuple)):
        return tuple(_tuples(v) for v in values)
    return values


def _reject_constant(name: str) -> float:
    raise ValueError(f"k-means model holds {name}, which is not a finite number")


def _finite_array(values: Any, field: str, ndim: int) -> NDArray[np.float64]:
    """``values`` as a float array of ``ndim`` dimensions, rectangular and finite."""
    shape = "a (k, d) array" if ndim == 2 else "a flat array"
    try:
        array = np.asarray(values, dtype=object)
    except ValueError as e:  # ragged nesting
        raise ValueError(f"{field} must be {shape} of numbers: {e}") from e
    if array.ndim != ndim:
        raise ValueError(f"{field} must be {shape} of numbers, got {array.ndim} dimension(s)")
    # Booleans and strings convert to floats in NumPy; in a model they are a mistake in the input.
    if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) for v in array.ravel()):
        raise ValueError(f"{field} must hold numbers only")
    floats = array.astype(np.float64)
    if not np.isfinite(floats).all():
        raise ValueError(f"{field} must hold finite numbers only")
    return floats


def as_points(points: ArrayLike, dimensions: int) -> NDArray[np.float64]:
    """Points as an (n, d) float array, checked: a wrong shape or a non-finite value raises
    ``ValueError`` naming ``points``.

    >>> as_points([[1, 2]], 2).shape
    (1, 2)
    """
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != dimensions:
        raise ValueError(f"points must be an (n, {dimensions}) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("points must hold finite numbers only")
    return array


def _nearest(centres: NDArray[np.float64], points: NDArray[np.float64]) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Index of the nearest centre and squared distance to it, per point. Differences are taken
    directly (not through ``|x|^2 - 2x.c + |c|^2``) so that distances are exact to rounding even
    far from the origin."""
    n, k, d = points.shape[0], centres.shape[0], centres.shape[1]
    index = np.empty(n, dtype=np.int64)
    squared = np.empty(n, dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // (k * d))
    for start in range(0, n, step):
        chunk = points[start : start + step]
        d2 = ((chunk[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
        nearest = d2.argmin(axis=1)
        index[start : start + step] = nearest
        squared[start : start + step] = d2[np.arange(len(chunk)), nearest]
    return index, squared


def assign(centres: KMeansCentres, points: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """The nearest centre of each point (ties go to the lower index) and the Euclidean distance
    to it.

    >>> m = KMeansCentres.of([[0.0, 0.0], [10.0, 0.0]], ("x0", "x1"), [1, 1])
    >>> index, distance = assign(m, [[1.0, 0.0], [7.0, 4.0]])
    >>> index.tolist(), distance.tolist()
    ([0, 1], [1.0, 5.0])
    """
    index, squared = _nearest(centres.array, as_points(points, centres.dimensions))
    return index, np.sqrt(squared)


def inertia(centres: KMeansCentres, points: ArrayLike) -> float:
    """The sum of squared Euclidean distances from each point to its nearest centre (k-means'
    objective; lower is better when two models are compared on the same points).

    >>> m = KMeansCentres.of([[0.0, 0.0], [10.0, 0.0]], ("x0", "x1"), [1, 1])
    >>> inertia(m, [[1.0, 0.0], [7.0, 4.0]])
    26.0
    """
    _, squared = _nearest(centres.array, as_points(points, centres.dimensions))
    return float(squared.sum())


def mini_batch_update(centres: KMeansCentres, points: ArrayLike, decay: float) -> KMeansCentres:
    """One step of Sculley's web-scale mini-batch k-means (WWW 2010) with a forgetting factor.

    First every centre's count is multiplied by ``decay`` (in (0, 1]). Then each point of the
    batch is assigned to its nearest centre *before* any centre moves (as in Sculley's
    algorithm), and moves it towards itself with the per-centre learning rate ``1 / count``,
    the count having been raised by one for that point. Taken point by point, a centre ``c``
    with count ``v`` receiving points ``x_1 .. x_m`` ends at ``(v c + sum x_i) / (v + m)``
    whatever their order, which is what is computed here in one vectorised step.

    ``decay = 1`` is plain mini-batch k-means: each centre is the mean of every point it ever
    received (and the weight it started with), so it converges on a stationary stream but lags
    ever more behind a moving one. With ``decay < 1`` a batch that arrived ``t`` batches ago
    weighs ``decay ** t``: in steady state a centre receiving ``m`` points a batch carries a
    count near ``m / (1 - decay)``, that is the memory of about ``1 / (1 - decay)`` batches
    (0.9: ten batches, 0.99: a hundred), so centres follow clusters that move. A large count
    from the batch layer (its cluster sizes) therefore shrinks geometrically until new points
    weigh in. An empty batch returns ``centres`` unchanged (no decay either: time is counted
    in batches that carry points).

    >>> m = KMeansCentres.of([[0.0], [10.0]], ("x0",), [1, 2])
    >>> mini_batch_update(m, [[1.0], [3.0], [12.0]], decay=1.0)
    KMeansCentres(centres=((1.3333333333333333,), (10.666666666666666,)), feature_names=('x0',), counts=(3.0, 3.0))
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be a number in (0, 1], got {decay!r}")
    batch = as_points(points, centres.dimensions)
    if batch.shape[0] == 0:
        return centres
    current = centres.array
    index, _ = _nearest(current, batch)
    received = np.bincount(index, minlength=centres.k).astype(np.float64)
    sums = np.zeros_like(current)
    np.add.at(sums, index, batch)
    counts = centres.count_array * decay
    new_counts = counts + received
    moved = received > 0
    updated = current.copy()
    updated[moved] = (counts[moved, None] * current[moved] + sums[moved]) / new_counts[moved, None]
    return KMeansCentres.of(updated, centres.feature_names, new_counts)


def memory_batches(decay: float) -> float:
    """The effective memory of a forgetting factor, in batches: ``1 / (1 - decay)`` (infinite
    for 1).

    >>> memory_batches(0.75)
    4.0
    """
    return math.inf if decay >= 1.0 else 1.0 / (1.0 - decay)


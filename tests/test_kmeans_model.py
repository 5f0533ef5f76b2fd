"""The k-means model as data and its NumPy functions, checked against SciPy / scikit-learn and
against a point-by-point reference of Sculley's mini-batch algorithm; the generator's ground
truth drives the tracking tests."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from sklearn.cluster import KMeans

from lambda_ml_apps.kmeans.generator import MovingClusters
from lambda_ml_apps.kmeans.model import KMeansCentres, assign, inertia, memory_batches, mini_batch_update


def matched_distances(estimated: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Distance from each true centre to the estimated centre matched to it (Hungarian
    matching on Euclidean distance), so that the comparison does not depend on centre order."""
    cost = cdist(truth, estimated)
    rows, cols = linear_sum_assignment(cost)
    return cost[rows, cols]


def least_gap(centres: np.ndarray) -> float:
    gaps = cdist(centres, centres)
    return float(gaps[np.triu_indices(len(centres), 1)].min())


# --- the model as data ---------------------------------------------------------------------


def test_json_round_trip_keeps_every_bit() -> None:
    rng = np.random.default_rng(3)
    model = KMeansCentres.of(rng.normal(size=(5, 3)) * 1e3, ("a", "b", "c"), rng.uniform(0, 100, size=5))
    text = model.to_json()
    assert set(json.loads(text)) == {"feature_names", "centres", "counts"}
    again = KMeansCentres.from_json(text)
    assert again == model
    np.testing.assert_array_equal(again.array, model.array)
    assert (again.k, again.dimensions) == (5, 3)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"centres": [[1, 2]], "feature_names": ["a", "b"], "counts": [NaN]}', "NaN"),
        ('{"centres": [[1, 1e999]], "feature_names": ["a", "b"], "counts": [1]}', "centres"),
        ('{"centres": [[1, 2], [3]], "feature_names": ["a", "b"], "counts": [1, 1]}', "centres"),
        ('{"centres": [[1, "2"]], "feature_names": ["a", "b"], "counts": [1]}', "centres"),
        ('{"centres": [[1, true]], "feature_names": ["a", "b"], "counts": [1]}', "centres"),
        ('{"centres": [], "feature_names": [], "counts": []}', "centres"),
        ('{"centres": [[1, 2]], "feature_names": ["a"], "counts": [1]}', "feature_names"),
        ('{"centres": [[1, 2]], "feature_names": ["a", "a"], "counts": [1]}', "feature_names"),
        ('{"centres": [[1, 2]], "feature_names": ["a", 2], "counts": [1]}', "feature_names"),
        ('{"centres": [[1, 2]], "feature_names": "ab", "counts": [1]}', "feature_names"),
        ('{"centres": [[1, 2]], "feature_names": ["a", "b"], "counts": [1, 2]}', "counts"),
        ('{"centres": [[1, 2]], "feature_names": ["a", "b"], "counts": [-1]}', "counts"),
        ('{"centres": [[1, 2]], "feature_names": ["a", "b"]}', "counts"),
        ('{"centres": [[1, 2]], "feature_names": ["a", "b"], "counts": [1], "generation": 7}', "generation"),
        ("[1, 2]", "JSON object"),
        ('{"centres": ', "not valid JSON"),
    ],
)
def test_bad_json_names_the_field(text: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        KMeansCentres.from_json(text)


def test_bad_points_and_decay_are_refused() -> None:
    model = KMeansCentres.of([[0.0, 0.0]], ("x0", "x1"), [1.0])
    with pytest.raises(ValueError, match="points"):
        assign(model, [[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="points"):
        inertia(model, [[1.0, np.nan]])
    with pytest.raises(ValueError, match="feature_names"):
        KMeansCentres.of([[0.0, 0.0]], "ab", [1.0])
    for decay in (0.0, -0.5, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="decay"):
            mini_batch_update(model, [[1.0, 1.0]], decay)  # type: ignore[arg-type]


# --- assignment and inertia ----------------------------------------------------------------


def test_assign_and_inertia_match_scipy_and_scikit_learn() -> None:
    rng = np.random.default_rng(11)
    # Far from the origin, where |x|^2 - 2x.c + |c|^2 would lose digits.
    points = rng.normal(size=(2_000, 5)) * 3 + 1e4
    fitted = KMeans(n_clusters=6, n_init=3, random_state=0).fit(points)
    model = KMeansCentres.of(fitted.cluster_centers_, tuple(f"x{i}" for i in range(5)), np.bincount(fitted.labels_, minlength=6))

    index, distance = assign(model, points)
    reference = cdist(points, fitted.cluster_centers_)
    np.testing.assert_array_equal(index, reference.argmin(axis=1))
    np.testing.assert_allclose(distance, reference.min(axis=1), rtol=1e-12)
    np.testing.assert_array_equal(index, fitted.predict(points))
    assert inertia(model, points) == pytest.approx(fitted.inertia_, rel=1e-9)
    assert inertia(model, points) == pytest.approx(float((reference.min(axis=1) ** 2).sum()), rel=1e-12)


def test_assign_of_no_points_is_empty() -> None:
    model = KMeansCentres.of([[0.0], [1.0]], ("x0",), [1.0, 1.0])
    index, distance = assign(model, np.empty((0, 1)))
    assert index.shape == distance.shape == (0,)
    assert inertia(model, np.empty((0, 1))) == 0.0


# --- mini-batch updates --------------------------------------------------------------------


def sculley_reference(centres: np.ndarray, counts: np.ndarray, batch: np.ndarray, decay: float) -> tuple[np.ndarray, np.ndarray]:
    """Sculley's mini-batch step written point by point: counts decayed, every point assigned
    to its nearest centre first, then each moves its centre with learning rate 1/count."""
    centres, counts = centres.copy(), counts * decay
    nearest = cdist(batch, centres).argmin(axis=1)
    for point, c in zip(batch, nearest, strict=True):
        counts[c] += 1
        rate = 1.0 / counts[c]
        centres[c] = (1 - rate) * centres[c] + rate * point
    return centres, counts


@pytest.mark.parametrize("decay", [1.0, 0.7])
def test_mini_batch_update_equals_the_point_by_point_algorithm(decay: float) -> None:
    rng = np.random.default_rng(5)
    start = rng.normal(size=(4, 3)) * 5
    counts = np.array([0.0, 3.0, 50.0, 7.5])  # a centre with no weight yet jumps to its points
    model = KMeansCentres.of(start, ("a", "b", "c"), counts)
    for _ in range(5):
        batch = rng.normal(size=(60, 3)) * 6
        expected_centres, expected_counts = sculley_reference(model.array, model.count_array, batch, decay)
        model = mini_batch_update(model, batch, decay)
        np.testing.assert_allclose(model.array, expected_centres, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(model.count_array, expected_counts, rtol=1e-12)


def test_an_empty_batch_changes_nothing() -> None:
    model = KMeansCentres.of([[0.0, 1.0], [2.0, 3.0]], ("x0", "x1"), [4.0, 5.0])
    assert mini_batch_update(model, np.empty((0, 2)), decay=0.5) is model
    assert memory_batches(0.8) == pytest.approx(5.0)
    assert memory_batches(1.0) == float("inf")


BATCH_MINUTES = 5
BATCH_EVENTS = 400


def stream_errors(gen: MovingClusters, start: KMeansCentres, batches: int, decay: float) -> list[float]:
    """Feed ``batches`` consecutive batches of the generator's stream to mini-batch updates and
    return, after each, the mean distance from the true centres (at the batch's end) to the
    matched estimated centres."""
    model, errors = start, []
    for b in range(batches):
        batch = gen.sample(BATCH_EVENTS, first_index=b * BATCH_EVENTS)
        model = mini_batch_update(model, batch.points, decay)
        truth = gen.true_centres(gen.event_time((b + 1) * BATCH_EVENTS))
        errors.append(float(matched_distances(model.array, truth).mean()))
    return errors


def moving_stream() -> tuple[MovingClusters, KMeansCentres]:
    # 400 events every 5 minutes; each centre moves 2 units an hour (0.17 a batch, 8 over the
    # 4 hours below), clusters 20 apart with noise 1.
    gen = MovingClusters(k=4, dimensions=2, spread=1.0, separation=20.0, speed_per_hour=2.0, events_per_hour=BATCH_EVENTS * 60 / BATCH_MINUTES, seed=7)
    # The batch layer's model at the start: near the truth, with the weight of 500 points each.
    rng = np.random.default_rng(1)
    start = KMeansCentres.of(gen.initial_centres() + rng.normal(scale=0.5, size=(4, 2)), gen.feature_names, [500.0] * 4)
    return gen, start


def test_decayed_mini_batches_track_moving_centres() -> None:
    gen, start = moving_stream()
    batches = 48  # 4 hours
    times = [gen.start + timedelta(minutes=m) for m in range(0, batches * BATCH_MINUTES + 1, BATCH_MINUTES)]
    gap = min(least_gap(gen.true_centres(t)) for t in times)
    assert gap > 10 * gen.spread  # the clusters stay apart, so tracking is well defined

    errors = stream_errors(gen, start, batches, decay=0.8)  # a memory of about 5 batches
    # Bound: after a 10-batch burn-in, at every batch, the mean distance to the true centres is
    # under 10 % of the least distance between true centres (here under about 1.2 units,
    # against 8 units travelled).
    assert max(errors[10:]) < 0.1 * gap, (max(errors[10:]), gap)


def test_forgetting_tracks_a_moving_stream_better_than_plain_mini_batches() -> None:
    gen, start = moving_stream()
    batches = 48
    decayed = stream_errors(gen, start, batches, decay=0.8)
    plain = stream_errors(gen, start, batches, decay=1.0)
    # Plain mini-batch k-means averages every point since the start, so it lags by about half
    # the distance travelled (4 units here); with a memory of 5 batches the lag is about
    # 4 batches of travel (0.7 units).
    assert np.mean(decayed[24:]) * 3 < np.mean(plain[24:]), (np.mean(decayed[24:]), np.mean(plain[24:]))
    assert plain[-1] > plain[24]  # and the plain model's lag keeps growing


def test_plain_mini_batches_converge_to_the_batch_solution_on_a_stationary_stream() -> None:
    gen = MovingClusters(k=4, dimensions=3, spread=1.0, separation=10.0, speed_per_hour=0.0, seed=3)
    rng = np.random.default_rng(2)
    # A poor start: 2 units off, carrying the weight of one point each.
    model = KMeansCentres.of(gen.initial_centres() + rng.normal(scale=2.0, size=(4, 3)), gen.feature_names, [1.0] * 4)
    seen = []
    for b in range(40):
        batch = gen.sample(250, first_index=b * 250)
        model = mini_batch_update(model, batch.points, decay=1.0)
        seen.append(batch.points)
    everything = np.vstack(seen)
    batch_solution = KMeans(n_clusters=4, n_init=10, random_state=0).fit(everything)
    # Bound: every centre within 1 % of the noise spread of the batch solution on the same
    # 10,000 points, and the same inertia within 0.01 %.
    assert matched_distances(model.array, batch_solution.cluster_centers_).max() < 0.01 * gen.spread
    assert inertia(model, everything) == pytest.approx(batch_solution.inertia_, rel=1e-4)

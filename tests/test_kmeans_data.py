"""The k-means data: the point generator's ground truth and the real data sets as shipped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from lambda_ml_apps.kmeans.datasets import load_points
from lambda_ml_apps.kmeans.generator import MovingClusters



def test_generator_is_deterministic_and_its_points_follow_the_true_centres() -> None:
    gen = MovingClusters(k=3, dimensions=4, spread=0.5, separation=8.0, speed_per_hour=3.0, events_per_hour=600.0, seed=9)
    first, again = gen.sample(3_000), gen.sample(3_000)
    assert first.events == again.events
    assert MovingClusters(k=3, dimensions=4, seed=10).sample(5).events != MovingClusters(k=3, dimensions=4, seed=9).sample(5).events
    event = first.events[600]
    assert list(event) == ["event_id", "event_time", "source_id", "x0", "x1", "x2", "x3"]
    assert event["event_time"] == "2026-01-01T01:00:00.000Z"
    assert datetime.fromisoformat(event["event_time"]) == gen.start + timedelta(hours=1)
    assert len({e["event_id"] for e in first.events}) == 3_000
    np.testing.assert_array_equal(first.points, [[e[f"x{i}"] for i in range(4)] for e in first.events])

    # Residuals against the true centre at each event's time are the configured noise.
    truth = np.array([gen.true_centres(gen.start + timedelta(hours=float(h)))[c] for h, c in zip(first.hours, first.clusters, strict=True)])
    residual = first.points - truth
    assert abs(residual.mean()) < 0.03
    assert residual.std() == pytest.approx(0.5, rel=0.03)
    # Centres move at the configured speed and start at least `separation` apart.
    moved = gen.true_centres(datetime(2026, 1, 1, 2, tzinfo=UTC)) - gen.initial_centres()
    np.testing.assert_allclose(np.linalg.norm(moved, axis=1), 6.0)
    gaps = cdist(gen.initial_centres(), gen.initial_centres())
    assert gaps[np.triu_indices(3, 1)].min() >= 8.0


def test_generator_refuses_bad_settings() -> None:
    for settings, field in [({"k": 0}, "k"), ({"spread": -1.0}, "spread"), ({"events_per_hour": 0.0}, "events_per_hour"), ({"start": datetime(2026, 1, 1)}, "start")]:
        with pytest.raises(ValueError, match=field):
            MovingClusters(**settings)  # type: ignore[arg-type]


def test_wine_is_standardised_and_digits_are_raw() -> None:
    wine = load_points("wine")
    assert wine.name == "wine"
    assert wine.points.shape == (178, 13) and wine.classes.shape == (178,)
    assert "od280_od315_of_diluted_wines" in wine.points.columns
    assert (wine.points.dtypes == np.float64).all()
    np.testing.assert_allclose(wine.points.mean(), 0.0, atol=1e-12)
    np.testing.assert_allclose(wine.points.std(ddof=0), 1.0, rtol=1e-12)

    digits = load_points("digits")
    assert digits.points.shape == (1797, 64)
    assert digits.points.to_numpy().min() == 0.0 and digits.points.to_numpy().max() == 16.0
    assert sorted(set(digits.classes.tolist())) == list(range(10))
    with pytest.raises(ValueError, match="name"):
        load_points("iris")  # type: ignore[arg-type]

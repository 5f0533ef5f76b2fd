"""Serving policies: which loaded model version(s) answer a request, and how their answers
combine. Every answer names the versions that produced it (none when the prior answered).

- ``champion``: the version behind ``serving.model_alias``.
- ``latest``: the newest model: the highest loaded version number; the speed layer's online
  model (alias ``speed``, numbered after the version it was warm-started from) ranks above that
  version, since it has learned from the events after it, and below any later version.
- ``quality``: the loaded version with the best quality score (its recent progressive-validation
  AUC, else its holdout AUC; see ``serving_model.quality_score``); ties go to the newer model.
- ``consensus``: every loaded version; ``mean`` of the probabilities, or ``vote``: the share of
  versions whose probability is at least 0.5.
- ``deadline``: every loaded version at once on a thread pool; the answer of the best-ranked
  version (by quality) that finished within the budget, else the prior probability: the
  request's time is bounded whatever the models do.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from serving_layer.model_store import ServedModels
from lambda_ml_apps.ctr.serving_model import CtrServingModel

Policy = Literal["champion", "latest", "quality", "consensus", "deadline"]
POLICIES: tuple[str, ...] = ("champion", "latest", "quality", "consensus", "deadline")
VOTE_THRESHOLD = 0.5

# Scores a model on the request's rows: P(click) per row.
Scorer = Callable[[CtrServingModel], np.ndarray]


@dataclass(frozen=True)
class Answer:
    """Probabilities per row, the versions that produced them (empty: the prior), and how."""

    probabilities: np.ndarray
    models: tuple[CtrServingModel, ...]
    policy: str
    how: str


def newness(model: CtrServingModel) -> tuple[int, bool, int]:
    """The order of ``latest``: version, then an online model above the version it started
    from, then its updates."""
    return (model.version, model.linear is not None, model.updates)


def by_quality(models: Sequence[CtrServingModel]) -> list[CtrServingModel]:
    """Best first: a known quality score before none, higher scores first, then newer models."""
    return sorted(models, key=lambda m: (m.quality is not None, m.quality or 0.0, *newness(m)), reverse=True)


def combine(probabilities: Sequence[np.ndarray], how: Literal["mean", "vote"]) -> np.ndarray:
    """Consensus of several versions' probabilities, per row.

    >>> combine([np.array([0.2, 0.9]), np.array([0.6, 0.7]), np.array([0.7, 0.8])], "vote").tolist()
    [0.6666666666666666, 1.0]
    >>> combine([np.array([0.2, 0.9]), np.array([0.4, 0.7])], "mean").tolist()
    [0.30000000000000004, 0.8]
    """
    stacked = np.vstack(probabilities)
    if how == "mean":
        return np.asarray(stacked.mean(axis=0), dtype=np.float64)
    if how == "vote":
        return np.asarray((stacked >= VOTE_THRESHOLD).mean(axis=0), dtype=np.float64)
    raise ValueError(f"unknown consensus {how!r}: expected mean or vote")


class PolicyRunner:
    """Runs a policy over the loaded versions; owns the thread pool of the deadline policy."""

    def __init__(self, consensus: Literal["mean", "vote"], deadline_s: float, prior: float, workers: int = 4) -> None:
        self.consensus = consensus
        self.deadline_s = deadline_s
        self.prior = prior
        self._pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deadline")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def answer(
        self, policy: str, served: ServedModels, score: Scorer, n_rows: int, deadline_s: float | None = None
    ) -> Answer:
        """The answer of ``policy`` for a request of ``n_rows`` rows."""
        if policy == "champion":
            return self._single(policy, served.champion, score)
        if policy == "latest":
            return self._single(policy, max(served.distinct(), key=newness), score)
        if policy == "quality":
            return self._single(policy, by_quality(served.distinct())[0], score)
        if policy == "consensus":
            models = served.distinct()
            combined = combine([score(m) for m in models], self.consensus)
            return Answer(combined, tuple(models), policy, f"{self.consensus} of {len(models)} version(s)")
        if policy == "deadline":
            return self._deadline(served, score, n_rows, self.deadline_s if deadline_s is None else deadline_s)
        raise ValueError(f"unknown policy {policy!r}: expected one of {', '.join(POLICIES)}")

    @staticmethod
    def _single(policy: str, model: CtrServingModel, score: Scorer) -> Answer:
        return Answer(score(model), (model,), policy, f"version {model.version} (alias {model.alias})")

    def _deadline(self, served: ServedModels, score: Scorer, n_rows: int, budget_s: float) -> Answer:
        started = time.monotonic()
        ranked = by_quality(served.distinct())
        futures = [self._pool.submit(score, m) for m in ranked]
        while True:
            # Final as soon as every version ranked above the best finished one is done.
            for n, future in enumerate(futures):
                if not future.done():
                    break
                if future.exception() is None:
                    how = f"best of {len(ranked)} version(s) within {budget_s * 1000:g} ms"
                    return Answer(future.result(), (ranked[n],), "deadline", how)
            else:
                break  # every version failed
            remaining = budget_s - (time.monotonic() - started)
            if remaining <= 0:
                break
            cf.wait([f for f in futures if not f.done()], timeout=remaining, return_when=cf.FIRST_COMPLETED)
        # Out of time: the best-ranked version that did finish, else the prior.
        for n, future in enumerate(futures):
            if future.done() and not future.cancelled() and future.exception() is None:
                how = f"best of {len(ranked)} version(s) finished within {budget_s * 1000:g} ms"
                return Answer(future.result(), (ranked[n],), "deadline", how)
        for future in futures:
            future.cancel()  # those not started yet; running ones finish in the background
        how = f"prior: no version answered within {budget_s * 1000:g} ms"
        return Answer(np.full(n_rows, self.prior, dtype=np.float64), (), "deadline", how)

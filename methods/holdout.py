"""``keep="holdout"``, shared by the distillation methods: which train images are held out of the
set, and which of the checked sets is returned.

A fixed part of the train split (``holdout_images``: at most a fifth of its images, drawn from a fixed
seed, the same for every budget, seed and variant) never initialises the set and is never matched
against. Every ``every`` iterations (and at 0 and the last) a student trained on the set under the
protocol's recipe is scored on it; the best-scoring set is returned (ties keep the earlier one).
Early stopping on train data: val and test are never looked at. With ``patience`` P > 0 the method
stops once P checks in a row bring no better score (``stale``): the same set is kept as by the
whole run whenever no later check would have beaten it, at the cost of the iterations saved.
"""
from __future__ import annotations

import numpy as np
import torch

from bench.errors import BenchError
from bench.protocol.training import TrainingDiverged

HOLDOUT_SEED = 2_024
MIN_HOLDOUT = 8
CHECK_SEED = 1_000  # + the selection seed: a check's student is not initialised like an eval seed's


def holdout_images(n_images: int, budget: int, wanted: int) -> np.ndarray:
    """Train images held out for ``keep="holdout"``: ``min(wanted, n_images // 5, n_images - budget)``
    drawn from a fixed seed, so that ``budget`` images are left to initialise the set from."""
    n = min(wanted, n_images // 5, n_images - budget)
    if n < MIN_HOLDOUT:
        raise BenchError(f"tm keep=holdout needs {MIN_HOLDOUT} held-out train images beside the {budget} "
                         f"initial ones, and the train split has {n_images} images; use --set <method>.keep=best")
    return np.sort(np.random.default_rng(HOLDOUT_SEED).choice(n_images, size=n, replace=False))


def _stale(curve, kept: int, patience: int) -> bool:
    """The patience rule: ``patience`` (> 0) checks of ``curve`` came after the kept one."""
    return patience > 0 and sum(it > kept for it, _ in curve) >= patience


def replay(curve, patience: int) -> tuple[int, int]:
    """(iteration stopped at, iteration kept) of a run with held-out ``curve`` [(iteration, score)]
    under ``patience`` (0: the whole run): what ``HeldOut`` would have done, read off a stored cell."""
    best, kept = -np.inf, curve[0][0]
    for k, (it, score) in enumerate(curve):
        if score > best:
            best, kept = score, it
        elif _stale(curve[:k + 1], kept, patience):
            return it, kept
    return curve[-1][0], kept


class HeldOut:
    """The held-out images of one distillation and the checks on them.

    ``rest`` are the train images the set may start from and match against; ``check`` scores a set
    and remembers it when it is the best so far (``kept``: minus the score, the iteration, the state);
    ``curve`` is every check's (iteration, score)."""

    def __init__(self, protocol, budget: int, wanted: int, seed: int, iterations: int, every: int, patience: int = 0):
        tr = protocol.train
        self.images = holdout_images(tr.n_images, budget, wanted)
        self.split = tr.images_subset(self.images)
        self.rest = np.setdiff1d(np.arange(tr.n_images), self.images)
        self.protocol, self.seed, self.iterations, self.every = protocol, seed, iterations, every
        self.patience = patience
        self.curve: list[tuple[int, float]] = []
        self.kept: tuple = (float("inf"), iterations, None)

    def due(self, done: int) -> bool:
        """Whether a check follows iteration ``done`` (counted from 1)."""
        return done % self.every == 0 or done == self.iterations

    def check(self, it: int, state, pairs, recipe=None) -> float:
        """Score ``pairs`` (``state`` is what to return if it is the best) under its own ``recipe``; a
        set whose student diverges scores 0, below any set that trains (a collapse, for the back-off)."""
        with torch.random.fork_rng(devices=[]):
            try:
                score = self.protocol.evaluate(pairs, [CHECK_SEED + self.seed], split=self.split, recipe=recipe)[0]["mean"]
            except TrainingDiverged:
                score = 0.0
        self.curve.append((it, round(score, 2)))
        if -score < self.kept[0]:
            self.kept = (-score, it, state)
        return score

    def stale(self) -> bool:
        """Whether the last ``patience`` checks (0: never) all came after the best one."""
        return _stale(self.curve, self.kept[1], self.patience)

    def result(self, last_iteration: int, last_state) -> tuple:
        """(iteration, state) of the set to return: the best checked one, else the last."""
        return (self.kept[1], self.kept[2]) if self.kept[2] is not None else (last_iteration, last_state)

    def info(self) -> dict:
        stopped = {"stopped_at": self.curve[-1][0]} if self.curve and self.curve[-1][0] < self.iterations else {}
        return {"holdout_images": len(self.images), "holdout_curve": self.curve} | stopped

"""``kcenter``: greedy k-center / farthest-point selection (Sener and Savarese 2018).

Definition for image-text pairs. Candidates are the train images, each paired with its
representative caption, with feature ``phi_i = [l2(image_i), l2(text_c(i))]`` (see
``methods/coreset_features.py``); distance is Euclidean in that space. The first center is a
candidate drawn uniformly with ``numpy.random.default_rng(seed)`` (there is no initial labelled
pool here). Every further step selects the candidate whose distance to its nearest selected center
is largest (ties: lowest image index), which is the 2-approximation of the minimax-radius k-center
problem. Pairs have distinct images since no candidate is picked twice.

Memory is O(N) beyond the features: one running vector ``d_i = min over selected c of
||phi_i - phi_c||^2`` is updated after every pick with the distances to the new center, computed as
``|phi_i|^2 - 2 <phi_i, phi_c> + |phi_c|^2`` in blocks of candidates (never a budget x N matrix,
never an N x d difference). The vector is updated in place after every pick, and the radius after
each pick is recorded (``info``: ``radius_first``, ``radius``): k-center code that never updates its
state silently degrades to near-random picks, a known failure of public implementations;
``tests/test_coresets.py`` checks one pick per well-separated cluster and the 2x bound on the
optimal radius, which such code fails.

Randomness: the start point only (so selections differ across seeds).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from methods.base import Artifact, MethodContext, register_method
from methods.coreset_features import TransposedRows, candidate_features, check_budget


def kcenter_order(x: np.ndarray, budget: int, start: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Greedy farthest-point order from ``start``; returns ``(picked, radii)`` where ``radii[k]`` is
    the covering radius (max distance of any candidate to its nearest center) after ``k+1`` picks."""
    n = len(x)
    check_budget(budget, n, "kcenter")
    if not 0 <= start < n:
        raise ValueError(f"kcenter: start {start} out of range for {n} candidates")
    rows = TransposedRows(x, chunk)
    picked = np.empty(budget, dtype=np.int64)
    radii = np.empty(budget, dtype=np.float64)
    taken = np.zeros(n, dtype=bool)
    mind = np.full(n, np.inf)  # squared distance of each candidate to its nearest selected center
    c = int(start)
    for k in range(budget):
        picked[k] = c
        taken[c] = True
        # ||x_i - x_c||^2 = |x_i|^2 - 2 <x_i, x_c> + |x_c|^2, in blocks of candidates; O(N) memory
        d = rows.sq - 2.0 * rows.dot(rows.row(c)) + rows.sq[c]
        np.maximum(d, 0.0, out=d)
        d[c] = 0.0
        np.minimum(mind, d, out=mind)
        radii[k] = float(np.sqrt(mind.max()))
        free = np.where(taken, -1.0, mind)  # selected candidates can never be picked again
        c = int(np.argmax(free))  # first maximum: lowest index on ties
    if len(np.unique(picked)) != budget:
        raise RuntimeError("kcenter: a candidate was selected twice")
    return picked, radii


@register_method("kcenter", "coreset", help="greedy k-center (farthest point) on image+text features")
class KCenter:
    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: "KCenter.Config"):
        self.config = config

    def build(self, ctx: MethodContext, budget: int, seed: int) -> Artifact:
        t0 = time.time()
        x, caps = candidate_features(ctx.protocol.features_train)
        start = int(np.random.default_rng(seed).integers(len(x)))
        picked, radii = kcenter_order(x, budget, start)
        return Artifact("selected", indices=caps[picked],
                        info={"start": start, "radius": float(radii[-1]), "radius_first": float(radii[0]),
                              "select_s": round(time.time() - t0, 2)})

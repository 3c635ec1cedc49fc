"""``herding``: greedy herding (Welling 2009), as used for exemplar selection in iCaRL.

Definition for image-text pairs. Candidates are the train images, each paired with its
representative caption, with feature ``phi_i = [l2(image_i), l2(text_c(i))]`` (see
``methods/coreset_features.py``). Let ``mu`` be the mean of ``phi`` over all candidates and ``S_k``
the sum of the first ``k`` selected features. Step ``k = 1..budget`` selects, among the candidates not
yet selected, the one minimising ``|| mu - (S_{k-1} + phi_i) / k ||``, i.e. the candidate that brings
the running mean of the selected features closest to the full mean. Since every ``phi_i`` has the
same norm this is exactly Welling's herding update ``argmax_i <w_k, phi_i>`` with
``w_k = k mu - S_{k-1}`` (``w_1 = mu``). Ties go to the lowest image index. No candidate is picked
twice, so the pairs have distinct images.

Randomness: none. Herding is deterministic; the selection seed is not used (every seed gives the
same set, so across selection seeds herding shows no selection variance, only eval-seed variance).

Cost: one matrix-vector product over the candidates per step (O(N d) time, O(N) extra memory).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from methods.base import Artifact, MethodContext, register_method
from methods.coreset_features import TransposedRows, candidate_features, check_budget


def herding_order(x: np.ndarray, budget: int) -> np.ndarray:
    """Row indices of ``x`` ``[N, d]`` picked by greedy herding, in the order they were picked."""
    n = len(x)
    check_budget(budget, n, "herding")
    rows = TransposedRows(x)
    mu = np.asarray(x, dtype=np.float32).mean(0, dtype=np.float64)
    total = np.zeros(len(mu), dtype=np.float64)
    taken = np.zeros(n, dtype=bool)
    out = np.empty(budget, dtype=np.int64)
    for k in range(1, budget + 1):
        w = k * mu - total  # ||k mu - S - phi||^2 = ||w||^2 - 2 <w, phi> + ||phi||^2
        obj = rows.sq - 2.0 * rows.dot(w)
        obj[taken] = np.inf
        i = int(np.argmin(obj))  # first minimum: lowest index on ties
        out[k - 1] = i
        taken[i] = True
        total += rows.row(i)
    return out


@register_method("herding", "coreset", help="greedy herding on image+text features (Welling 2009)")
class Herding:
    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: "Herding.Config"):
        self.config = config

    def build(self, ctx: MethodContext, budget: int, seed: int) -> Artifact:
        t0 = time.time()
        x, caps = candidate_features(ctx.protocol.features_train)
        order = herding_order(x, budget)
        mean_gap = float(np.linalg.norm(x[order].mean(0, dtype=np.float64) - x.mean(0, dtype=np.float64)))
        return Artifact("selected", indices=caps[order],
                        info={"mean_gap": mean_gap, "seed_used": False, "select_s": round(time.time() - t0, 2)})

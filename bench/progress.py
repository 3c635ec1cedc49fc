"""Progress bars: tqdm on a terminal, silent otherwise (logs and CI stay clean)."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(total=None, desc: str = "", unit: str = "it", **kw):
    disable = os.environ.get("VLBENCH_PROGRESS", "") == "0" or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True, **kw)


# Seconds per cell on 2 CPU cores with features and expert buffers cached (docs/findings.md): the
# prior of the grid's ETA until the run has timed cells of its own. At 100 pairs, per method; other
# budgets scale as ``tm``'s cells do (BUDGET_SCALE, interpolated in log budget).
PRIOR_S_AT_100 = {"random": 1.0, "herding": 2.0, "kcenter": 2.0, "forgetting": 2.0, "full": 10.0, "full_tuned": 30.0,
                  "tm": 230.0, "tm_image": 230.0, "tm_text": 230.0, "tm_lora": 230.0, "lors": 290.0,
                  "repblend": 325.0, "mdm": 87.0, "covmatch": 260.0}
PRIOR_BY_GROUP = {"coreset": 2.0, "reference": 10.0, "distill": 230.0, "test": 5.0}
BUDGET_SCALE = {100: 1.0, 200: 2.2, 500: 2.1, 1000: 3.5}  # tm on 2 cores: 171-186, 388-392, 360-381, 610-621 s
# Under frozen-pixels every distillation iteration also runs the frozen tower forward and backward
# on the synthetic pixels: a 100-pair tm iteration's seconds over heads', per image size
# (``python -m methods.tm.profile --part frozen``, 2 cores: 0.094 s heads; 0.434, 1.178, 17.851 s).
FROZEN_PIXELS_FACTOR = {64: 4.6, 112: 12.5, 224: 190.0}


def _interp(table: dict, x) -> float:
    """``table`` interpolated in log x, linear in x beyond its ends."""
    import math
    pts = sorted(table.items())
    if x <= pts[0][0]:
        return pts[0][1] * x / pts[0][0]
    if x >= pts[-1][0]:
        return pts[-1][1] * x / pts[-1][0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            w = math.log(x / x0) / math.log(x1 / x0)
            return y0 + w * (y1 - y0)
    return 1.0


def _scale(budget) -> float:
    return 1.0 if budget is None else _interp(BUDGET_SCALE, budget)


def cut_factor(cut: str, image_size=None) -> float:
    """How much a distillation cell's prior grows at the cut (heads: 1)."""
    return _interp(FROZEN_PIXELS_FACTOR, image_size or 224) if cut == "frozen-pixels" else 1.0


class GridClock:
    """An ETA for a grid: each cell's time estimated from this run's (and the results folder's)
    measured cells of the same method and config (``tm``, ``tm~<hash>``), scaled by budget, else
    from the 2-core prior (distillations' times ``factor`` for the cut, :func:`cut_factor`)."""

    def __init__(self, history=(), factor: float = 1.0):
        self.factor = factor
        self.seen: dict = {}  # (method, budget) -> [seconds]
        for method, budget, seconds in history:
            self.add(method, budget, seconds)

    def add(self, method: str, budget, seconds: float) -> None:
        if seconds and seconds > 0:
            self.seen.setdefault((method, budget), []).append(float(seconds))

    def estimate(self, method: str, group: str, budget) -> float:
        if (method, budget) in self.seen:
            v = self.seen[(method, budget)]
            return sum(v) / len(v)
        same = [(b, sum(v) / len(v)) for (m, b), v in self.seen.items() if m == method and b is not None]
        if same and budget is not None:
            b, s = min(same, key=lambda x: abs(x[0] - budget))
            return s * _scale(budget) / _scale(b)
        name = method.split("~")[0]  # another config of a method: its prior until measured
        base = PRIOR_S_AT_100.get(name, PRIOR_BY_GROUP.get(group, 60.0))
        return base * (_scale(budget) if group != "coreset" else 1.0) * (self.factor if group == "distill" else 1.0)

    def eta(self, cells) -> float:
        """Seconds for ``cells``: (method, group, budget) triples."""
        return sum(self.estimate(*c) for c in cells)


def duration(seconds: float) -> str:
    """``1h 05m``, ``4m 10s``, ``12s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"

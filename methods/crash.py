"""``test_crash``: a CI-only method whose worker process dies mid-cell on request.

It selects like ``random``, unless the file named by its ``marker`` option exists and holds
``BUDGET SEED`` of the cell being built: then it ends its process at once (``os._exit``), as an
out-of-memory kill or a lost node would, with no exception and no result. Tests use it to check that
a distributed run records that one cell as failed, stores the others, and that a rerun redoes only
that cell. Group ``test``: never in ``all``. Under the local executor it would end the run itself.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from methods.base import Artifact, MethodContext, register_method
from methods.random_subset import random_pairs

CRASH_EXIT_CODE = 71


@register_method("test_crash", "test", help="random, but its process dies mid-cell when a marker file says so (CI)")
class CrashOnMarker:
    @dataclass(frozen=True)
    class Config:
        marker: str = ""  # path of the trigger file; its content "BUDGET SEED" names the cell that dies

    def __init__(self, config: "CrashOnMarker.Config"):
        self.config = config

    def build(self, ctx: MethodContext, budget: int, seed: int) -> Artifact:
        m = Path(self.config.marker) if self.config.marker else None
        if m is not None and m.exists() and m.read_text().split() == [str(budget), str(seed)]:
            os._exit(CRASH_EXIT_CODE)
        cap = ctx.protocol.train.caption_image.numpy()
        return Artifact("selected", indices=random_pairs(cap, budget, np.random.default_rng(seed)))

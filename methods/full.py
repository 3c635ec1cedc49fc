"""``full``: the full-data reference row (every train pair; the upper bound). Never in ``all``."""
from __future__ import annotations

from dataclasses import dataclass

from methods.base import Artifact, MethodContext, register_method


@register_method("full", "reference", help="full train split (reference row, always run)")
class FullData:
    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: "FullData.Config"):
        self.config = config

    def build(self, ctx: MethodContext, budget, seed: int) -> Artifact:
        return Artifact("full")

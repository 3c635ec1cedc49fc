"""The full-data reference rows (every train pair; never in ``all``, always run).

* ``full``: the full train split under the protocol's recipe, the one every set is trained with.
* ``full_tuned``: the full train split under a recipe of its own, tuned for the full data on Flickr8k
  **val**. The protocol's recipe (momentum 0.9, lr 0.1, 20 epochs) is the best single recipe for
  small sets, and it over-trains 30,000 pairs (``docs/findings.md``, "full_tuned"). "x% of full data"
  against ``full`` flatters every method; ``full_tuned`` is the upper bound the student can reach
  with all the data, reported beside it.
"""
from __future__ import annotations

from dataclasses import dataclass

from methods.base import Artifact, MethodContext, register_method


@register_method("full", "reference", help="full train split, protocol recipe (reference row, always run)")
class FullData:
    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: "FullData.Config"):
        self.config = config

    def build(self, ctx: MethodContext, budget, seed: int) -> Artifact:
        return Artifact("full")


@register_method("full_tuned", "reference", help="full train split, its own recipe tuned on Flickr8k val (reference row, always run)")
class FullDataTuned:
    @dataclass(frozen=True)
    class Config:
        lr: float = 0.01  # momentum, weight decay, batch: the protocol's
        epochs: int = 3

    def __init__(self, config: "FullDataTuned.Config"):
        self.config = config

    def build(self, ctx: MethodContext, budget, seed: int) -> Artifact:
        return Artifact("full", recipe={"lr": self.config.lr, "epochs": self.config.epochs, "lr_policy": "fixed"})

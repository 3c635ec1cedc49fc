"""``random``: uniformly random pairs with distinct images.

Draws ``budget`` distinct train images uniformly without replacement, then one of each image's
captions uniformly, all from ``numpy.random.default_rng(seed)`` (the selection seed, recorded).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from methods.base import Artifact, MethodContext, register_method


def random_pairs(caption_image: np.ndarray, budget: int, rng: np.random.Generator,
                 images: np.ndarray | None = None) -> np.ndarray:
    """Caption indices of ``budget`` pairs with distinct images; ``images`` fixes which images."""
    n_images = int(caption_image.max()) + 1
    if images is None:
        images = rng.choice(n_images, size=budget, replace=False)
    order = np.argsort(caption_image, kind="stable")
    starts = np.searchsorted(caption_image[order], np.arange(n_images + 1))
    counts = starts[images + 1] - starts[images]
    pick = (rng.random(len(images)) * counts).astype(np.int64)
    return order[starts[images] + pick]


@register_method("random", "coreset", help="uniform random pairs, distinct images")
class RandomSubset:
    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: "RandomSubset.Config"):
        self.config = config

    def build(self, ctx: MethodContext, budget: int, seed: int) -> Artifact:
        cap = ctx.protocol.train.caption_image.numpy()
        return Artifact("selected", indices=random_pairs(cap, budget, np.random.default_rng(seed)))

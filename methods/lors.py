"""``lors`` (Xu et al., ICML 2024) and ``repblend`` (Zhang et al., NeurIPS 2025): trajectory matching
with learned low-rank similarity targets, on the engine of ``methods/trajectory_matching.py``.

``lors``: the synthetic set carries ``S = diag(a) + (α/r)·L·Rᵀ`` (a = 1, L ~ N(0, 1), R = 0 at the
start, so S = I) and one learned step size per tower. Each unrolled step trains the heads with WBCE
against the minibatch's block ``S[b][:, b]``; data, factors and step sizes move by SGD with momentum
0.5. The paper's per-budget settings (Flickr30K: rank, α, lr of S, data lr, minibatch, max start
epoch) are the defaults at 100 / 200 / 500 pairs: a budget takes the row of the largest listed
budget not above it (the 100 row below 100; the 500 row above 500, which the paper does not give).
``syn_steps`` 8, ``expert_epochs`` 1, 3000 iterations, step sizes from 0.1 at lr 0.01. Experts are
``tm``'s buffers (5 experts x 10 epochs, where LoRS trains 20), and ``keep=holdout`` picks the
returned set by held-out score under its native loss, as for ``tm`` (with ``tm``'s clipping and
back-off, which LoRS does not have).

``repblend``: ``lors`` with representation blending in every unrolled step (one λ ~ Beta(1, 1) and
one permutation per minibatch, the same for images and texts; targets not blended; nothing blended
at evaluation), minibatch 20 at every budget; both heads matched under one normalisation (RepBlend's
COCO setting; ``match=per_head`` normalises each head on its own, its Flickr30K setting).

Any setting left at ``-1`` takes the per-budget default; ``info.resolved`` records what was used.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from methods.base import register_method
from methods.trajectory_matching import AUTO, TMConfig, TrajectoryMatching

# Flickr30K defaults of LoRS's configs, per budget: rank, α, lr of S, data lr, minibatch, max start epoch
LORS_TABLE = {
    100: dict(targets_rank=10, targets_alpha=3.0, lr_targets=10.0, lr_image=100.0, lr_text=100.0, batch_syn=20,
              max_start_epoch=2),
    200: dict(targets_rank=5, targets_alpha=1.0, lr_targets=10.0, lr_image=1000.0, lr_text=1000.0, batch_syn=20,
              max_start_epoch=2),
    500: dict(targets_rank=20, targets_alpha=0.01, lr_targets=100.0, lr_image=1000.0, lr_text=1000.0, batch_syn=40,
              max_start_epoch=3),
}


def table_row(budget: int) -> dict:
    """The row of the largest listed budget not above ``budget`` (the smallest row below it)."""
    listed = sorted(LORS_TABLE)
    return dict(LORS_TABLE[max([b for b in listed if b <= budget] or [listed[0]])])


@dataclass(frozen=True)
class LoRSConfig(TMConfig):
    iterations: int = 3000
    syn_steps: int = 8
    expert_epochs: int = 1
    max_start_epoch: int = AUTO
    batch_syn: int = AUTO
    whole_below: int = 0  # minibatches at every budget
    lr_image: float = AUTO
    lr_text: float = AUTO
    targets_rank: int = AUTO
    targets_alpha: float = AUTO
    lr_targets: float = AUTO
    tower_lrs: bool = True

    AUTO_FIELDS = tuple(LORS_TABLE[100])

    def resolved(self, budget: int) -> "LoRSConfig":
        row = table_row(budget)
        return dataclasses.replace(self, **{k: v for k, v in row.items() if getattr(self, k) == AUTO})


@dataclass(frozen=True)
class RepBlendConfig(LoRSConfig):
    batch_syn: int = 20  # RepBlend: minibatch 20 at every budget
    blend: bool = True
    # RepBlend normalises each head's distance on its own for Flickr30K and merged for COCO; merged is
    # the default here: per head, an expert epoch in which one head barely moves makes that head's
    # term explode (docs/findings.md); --set repblend.match=per_head gives the Flickr setting
    match: str = "joint"


@register_method("lors", "distill", help="trajectory matching with learned low-rank similarity targets (Xu et al. 2024)")
class LoRS(TrajectoryMatching):
    Config = LoRSConfig


@register_method("repblend", "distill", help="lors + representation blending, per-head matching (Zhang et al. 2025)")
class RepBlend(TrajectoryMatching):
    Config = RepBlendConfig


_TINY = dict(iterations=6, syn_steps=3, n_experts=2, expert_train_epochs=3, expert_epochs=1, max_start_epoch=2)


@register_method("test_lors", "test", help="tiny lors for CI")
class TinyLoRS(TrajectoryMatching):
    Config = dataclass(frozen=True)(type("test_lors_config", (LoRSConfig,), {
        "__annotations__": {k: type(v) for k, v in _TINY.items()}, **_TINY}))


@register_method("test_repblend", "test", help="tiny repblend for CI")
class TinyRepBlend(TrajectoryMatching):
    Config = dataclass(frozen=True)(type("test_repblend_config", (RepBlendConfig,), {
        "__annotations__": {k: type(v) for k, v in _TINY.items()}, **_TINY}))

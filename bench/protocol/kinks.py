"""Piecewise-linear activations whose kink pattern can be recorded at one point and replayed.

Why: the finite-difference meta-gradient (``methods/tm/unroll.py``, mode ``fd``) differences two
gradients taken at ``θ ± εμ``. Through ReLU-type activations that difference is dominated by units
whose pre-activation crosses a kink between the two points: each jumps by a full gradient entry,
divided by 2ε, and their number shrinks only like ε, so the estimate does not converge to the
Hessian-vector product autograd computes (which treats the activation pattern as fixed, the
derivative almost everywhere). On the pixels cut's EfficientNet-Lite0 (ReLU6) the plain estimate of
the image gradient had cosine about 0 with the exact one at every ε, in float64 too. Replaying the
pattern recorded at ``θ`` when evaluating at ``θ ± εμ`` differences the function that is linear
between kinks around ``θ``: the limit is then exactly autograd's, and the error O(ε²) from the
smooth parts.

``relu6`` / ``relu`` (and the ``ReLU6`` / ``ReLU`` modules) behave as usual outside the two context
managers. Inside ``recording()`` each call stores its pattern; inside ``replaying()`` the calls, in
the same order, use the stored patterns instead of their own inputs' (``x`` where the recorded input
was in the linear piece, the recorded constant elsewhere). Not thread-safe (one unroll at a time).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class _State:
    def __init__(self):
        self.mode = ""  # "", "record" or "replay"
        self.patterns: list = []
        self.i = 0


_S = _State()


def _act(x: torch.Tensor, hi: float | None) -> torch.Tensor:
    if _S.mode == "replay":
        if _S.i >= len(_S.patterns):
            raise RuntimeError("kink replay: more activation calls than were recorded")
        lin, const = _S.patterns[_S.i]
        _S.i += 1
        return torch.where(lin, x, const)
    if _S.mode == "record":
        x_ = x.detach()
        if hi is None:
            _S.patterns.append((x_ > 0, torch.zeros((), dtype=x.dtype, device=x.device)))
        else:
            _S.patterns.append(((x_ > 0) & (x_ < hi), torch.where(x_ >= hi, hi, 0.0).to(x.dtype)))
    return F.relu6(x) if hi == 6.0 else F.relu(x)


def relu6(x: torch.Tensor) -> torch.Tensor:
    return _act(x, 6.0)


def relu(x: torch.Tensor) -> torch.Tensor:
    return _act(x, None)


class ReLU6(nn.Module):
    def forward(self, x):
        return relu6(x)


class ReLU(nn.Module):
    def forward(self, x):
        return relu(x)


def replace_relus(net: nn.Module) -> nn.Module:
    """Swap ``nn.ReLU`` / ``nn.ReLU6`` modules for the replayable ones (in place)."""
    for name, child in list(net.named_children()):
        if type(child) is nn.ReLU6:
            setattr(net, name, ReLU6())
        elif type(child) is nn.ReLU:
            setattr(net, name, ReLU())
        else:
            replace_relus(child)
    return net


@contextmanager
def recording():
    """Record the kink pattern of every activation call; yields the list (empty: nothing kinked)."""
    prev = (_S.mode, _S.patterns, _S.i)
    _S.mode, _S.patterns, _S.i = "record", [], 0
    try:
        yield _S.patterns
    finally:
        _S.mode, _S.patterns, _S.i = prev


@contextmanager
def replaying(patterns: list):
    """Replay ``patterns`` (from ``recording()``), call by call."""
    prev = (_S.mode, _S.patterns, _S.i)
    _S.mode, _S.patterns, _S.i = "replay", patterns, 0
    try:
        yield
        if _S.i != len(patterns):
            raise RuntimeError(f"kink replay: {_S.i} activation calls, {len(patterns)} recorded")
    finally:
        _S.mode, _S.patterns, _S.i = prev

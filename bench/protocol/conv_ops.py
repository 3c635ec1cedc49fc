"""A 2-D convolution whose derivatives of every order run on first-order convolution kernels.

Why: a meta-gradient through an unrolled inner loop needs the derivative of a convolution's backward
(double backward). PyTorch computes it in ``aten::_convolution_double_backward``, which for a
grouped convolution loops over the groups and issues one small convolution per group: for a
depthwise convolution with C channels that is about C separate convolutions per layer and step (C
up to 1152 in EfficientNet-Lite0). The CPU profiler shows it directly (a 144-channel depthwise 3x3
layer: 147 ``mkldnn_convolution`` calls per double backward); on a GPU each is a kernel launch.
``python -m methods.tm.profile`` measures it.

``conv2d(x, w, b, stride, padding, groups)`` gives the same values as ``F.conv2d``; its backward is
expressed with three bilinear primitives, each a custom autograd function whose own backward uses
the other two:

* ``conv(x, w)``: the forward convolution;
* ``igrad(go, w)``: the input gradient (``convolution_backward`` with output mask (1, 0, 0));
* ``wgrad(x, go)``: the weight gradient (``convolution_backward`` with output mask (0, 1, 0));

using ``⟨ggx, igrad(go, w)⟩ = ⟨conv(ggx, w), go⟩`` and ``⟨ggw, wgrad(x, go)⟩ = ⟨conv(x, ggw), go⟩``.
So derivatives of any order call only the forward convolution and the two first-order backward
kernels, grouped natively (cuDNN / oneDNN), never the per-group loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_aten = torch.ops.aten


def _ig(go, w, x_shape, stride, padding, groups):
    x = go.new_empty(1).expand(x_shape)
    return _aten.convolution_backward(go, x, w, None, stride, padding, [1, 1], False, [0, 0], groups,
                                      (True, False, False))[0]


def _wg(x, go, w_shape, stride, padding, groups):
    w = go.new_empty(1).expand(w_shape)
    return _aten.convolution_backward(go, x, w, None, stride, padding, [1, 1], False, [0, 0], groups,
                                      (False, True, False))[1]


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, stride, padding, groups):
        ctx.save_for_backward(x, w)
        ctx.geom = (stride, padding, groups)
        return F.conv2d(x, w, None, stride, padding, 1, groups)

    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors
        gx = _IGrad.apply(go, w, x.shape, *ctx.geom) if ctx.needs_input_grad[0] else None
        gw = _WGrad.apply(x, go, w.shape, *ctx.geom) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None, None


class _IGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, go, w, x_shape, stride, padding, groups):
        ctx.save_for_backward(go, w)
        ctx.geom = (stride, padding, groups)
        return _ig(go, w, x_shape, stride, padding, groups)

    @staticmethod
    def backward(ctx, ggx):
        go, w = ctx.saved_tensors
        d_go = _Conv.apply(ggx, w, *ctx.geom) if ctx.needs_input_grad[0] else None
        d_w = _WGrad.apply(ggx, go, w.shape, *ctx.geom) if ctx.needs_input_grad[1] else None
        return d_go, d_w, None, None, None, None


class _WGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, go, w_shape, stride, padding, groups):
        ctx.save_for_backward(x, go)
        ctx.geom = (stride, padding, groups)
        return _wg(x, go, w_shape, stride, padding, groups)

    @staticmethod
    def backward(ctx, ggw):
        x, go = ctx.saved_tensors
        d_x = _IGrad.apply(go, ggw, x.shape, *ctx.geom) if ctx.needs_input_grad[0] else None
        d_go = _Conv.apply(x, ggw, *ctx.geom) if ctx.needs_input_grad[1] else None
        return d_x, d_go, None, None, None, None


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def conv2d(x: torch.Tensor, w: torch.Tensor, b=None, stride=1, padding=0, groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` (dilation 1, numeric padding) with efficient derivatives of every order. Under
    ``torch.autocast`` the convolution runs in the autocast dtype (input and weight cast up front, so
    the saved tensors and every derivative share one dtype; custom functions are not autocast)."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, w, b = x.to(dt), w.to(dt), None if b is None else b.to(dt)
    y = _Conv.apply(x, w, _pair(stride), _pair(padding), int(groups))
    return y if b is None else y + b.view(1, -1, 1, 1)

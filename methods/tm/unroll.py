"""Meta-gradients through an unrolled SGD inner loop, in three modes (used by trajectory matching).

The inner loop: ``θ_{i+1} = θ_i − α·D·g_i`` with ``g_i = ∇_θ ℓ(θ_i, X[b_i])`` for i = 0..N-1, from a
fixed ``θ_0``; ``D`` is an optional constant per-parameter step scale (a smaller step for a
pretrained tower, for instance; ``D = 1`` when absent). The outer loss is ``L(θ_N)``. Wanted:
``∂L/∂X`` for every learnable data tensor X and ``∂L/∂α``.

* ``naive``: build the whole unrolled graph (``create_graph=True`` at every step) and call
  ``backward`` once. Simple, but every step's activations (and their backward graphs) stay alive
  until the meta-backward: peak memory grows linearly with N (too much for a pixel-space unroll on
  a GPU; ``docs/pixels.md``).
* ``exact``: store only the parameter vectors θ_0..θ_N in the forward pass (no graph), then walk back
  one step at a time with the adjoint ``λ_N = ∂L/∂θ_N`` (as TESLA does, Cui et al. 2023)::

      μ        = D λ_{i+1}
      ∂L/∂X_i  += −α (∂g_i/∂X_i)ᵀ μ          (scattered into X at the rows b_i)
      ∂L/∂α    += −g_iᵀ μ
      λ_i       = λ_{i+1} − α H_i μ          (H_i = ∂g_i/∂θ_i, the Hessian; symmetric)

  Each step recomputes ``g_i`` with a graph and takes one vector-Jacobian product of it (a
  Hessian-vector product: double backward). Only one step's graph is alive at a time, so peak
  memory does not grow with N (apart from the N parameter vectors). The result equals ``naive`` up
  to float rounding.
* ``fd``: the same reverse walk without any double backward: the products with ``∂g/∂(θ, X)`` come
  from a central finite difference of two ordinary gradients (as in DARTS' second-order
  approximation)::

      [∇_{θ,X} ℓ(θ_i + εμ, X_i) − ∇_{θ,X} ℓ(θ_i − εμ, X_i)] / 2ε ≈ (H_i μ, (∂g_i/∂X_i)ᵀ μ),
      ε = r / ‖μ‖

  and ``g_i ≈`` the mean of the two gradients (second-order accurate). Two forward+backward
  passes per step; accuracy is O(r²) (r = ``fd_radius``) plus float rounding, and exact for a
  quadratic loss. Through ReLU-type activations the two gradients are taken with the activation
  pattern recorded at ``θ_i`` (one extra forward, ``bench/protocol/kinks.py``): otherwise units crossing a
  kink between ``θ_i ± εμ`` dominate the difference and the estimate does not converge to the
  Hessian-vector product at all (cosine about 0 with the exact image gradient on the pixels cut's
  ReLU6 tower). Models without such activations skip the extra forward after the first step.

The random state (e.g. dropout) of every inner step is recorded in the forward pass and restored
for its recomputation, so ``exact`` and ``fd`` see the same function as the forward pass.

``meta_backward`` accumulates the gradients into ``.grad`` of the learnable leaves (``α`` and the
data tensors with ``requires_grad``), like ``loss.backward()`` would, and returns the detached
outer loss; so callers can switch modes without other changes.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional, Sequence

import torch

from bench.protocol import kinks

MODES = ("naive", "exact", "fd")


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _accumulate(leaf: torch.Tensor, grad: torch.Tensor) -> None:
    leaf.grad = grad if leaf.grad is None else leaf.grad + grad


def meta_backward(step_loss: Callable[..., torch.Tensor], theta0: torch.Tensor, data: Sequence[torch.Tensor],
                  batches: Sequence[torch.Tensor], lr: torch.Tensor, outer_loss: Callable[[torch.Tensor], torch.Tensor],
                  mode: str = "exact", fd_radius: float = 1e-3, lr_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unroll ``len(batches)`` SGD steps from ``theta0`` and accumulate ``∂L/∂`` into ``.grad`` of
    ``lr`` (if it requires grad) and of each tensor in ``data`` that requires grad.

    ``step_loss(theta, *[x[b] for x in data])`` is the inner loss on one minibatch (``b`` =
    ``batches[i]``, indices into the rows of every data tensor); ``outer_loss(theta_N)`` the outer one.
    Returns the outer loss (detached)."""
    if mode not in MODES:
        raise ValueError(f"unroll mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "naive":
        return _naive(step_loss, theta0, data, batches, lr, outer_loss, lr_scale)
    return _reverse(step_loss, theta0, data, batches, lr, outer_loss, mode, fd_radius, lr_scale)


def _naive(step_loss, theta0, data, batches, lr, outer_loss, lr_scale) -> torch.Tensor:
    theta = theta0.clone().requires_grad_(True)
    for b in batches:
        g = torch.autograd.grad(step_loss(theta, *[x[b] for x in data]), theta, create_graph=True)[0]
        theta = theta - lr * (g if lr_scale is None else lr_scale * g)
    loss = outer_loss(theta)
    loss.backward()
    return loss.detach()


def _reverse(step_loss, theta0, data, batches, lr, outer_loss, mode, fd_radius, lr_scale) -> torch.Tensor:
    alpha = lr.detach()
    scale = (lambda v: v) if lr_scale is None else (lambda v: lr_scale * v)
    device = theta0.device
    # forward: parameter vectors and random states only, no graph
    thetas, states = [theta0.detach().clone()], []
    theta = thetas[0]
    for b in batches:
        states.append(_rng_state(device))
        th = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            g = torch.autograd.grad(step_loss(th, *[x[b].detach() for x in data]), th)[0]
        theta = theta - alpha * scale(g)
        thetas.append(theta)
    after_forward = _rng_state(device)  # restored at the end: callers see the RNG advance as in naive
    # outer loss and its gradient at θ_N
    th_n = thetas[-1].detach().requires_grad_(True)
    with torch.enable_grad():
        loss = outer_loss(th_n)
        lam = torch.autograd.grad(loss, th_n)[0]
    learn = [i for i, x in enumerate(data) if x.requires_grad]
    data_grads = {i: torch.zeros_like(data[i]) for i in learn}
    d_alpha = torch.zeros((), dtype=theta0.dtype, device=device)
    kinked = True  # fd: until a recording shows the model has no replayable activations
    for i in range(len(batches) - 1, -1, -1):
        b, mu = batches[i], scale(lam)
        xs = [x[b].detach().requires_grad_(k in data_grads) for k, x in enumerate(data)]
        wrt = [xs[k] for k in learn]
        if mode == "exact":
            _set_rng_state(states[i], device)
            th = thetas[i].detach().requires_grad_(True)
            with torch.enable_grad():
                g = torch.autograd.grad(step_loss(th, *xs), th, create_graph=True)[0]
                vjp = torch.autograd.grad(g, [th, *wrt], grad_outputs=mu, allow_unused=True)
            g = g.detach()
        else:
            norm = mu.norm()
            if norm == 0:  # nothing flows back through this step (nor through earlier ones)
                continue
            eps = fd_radius / norm
            patterns = None
            if kinked:  # the activation pattern at θ_i, replayed at θ_i ± εμ
                _set_rng_state(states[i], device)
                with torch.no_grad(), kinks.recording() as patterns:
                    step_loss(thetas[i], *[x.detach() for x in xs])
                kinked = bool(patterns)
            grads = []
            for sign in (1.0, -1.0):
                _set_rng_state(states[i], device)
                th = (thetas[i] + sign * eps * mu).requires_grad_(True)
                with torch.enable_grad(), (kinks.replaying(patterns) if kinked else nullcontext()):
                    grads.append(torch.autograd.grad(step_loss(th, *xs), [th, *wrt], allow_unused=True))
            plus, minus = grads
            g = 0.5 * (plus[0] + minus[0])
            vjp = [None if p is None else (p - m) / (2 * eps) for p, m in zip(plus, minus)]
        d_alpha -= (g * mu).sum()
        for k, v in zip(learn, vjp[1:]):
            if v is not None:
                data_grads[k].index_add_(0, b, -alpha * v)
        if vjp[0] is not None:
            lam = lam - alpha * vjp[0]
    _set_rng_state(after_forward, device)
    if lr.requires_grad:
        _accumulate(lr, d_alpha.reshape(lr.shape))
    for k, gk in data_grads.items():
        _accumulate(data[k], gk)
    return loss.detach()

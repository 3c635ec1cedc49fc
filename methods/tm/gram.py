"""The unrolled inner loop of linear heads, computed in the space of the synthetic samples.

Under the ``heads`` cut with ``linear`` heads the student is ``z = x Wᵀ + b`` per tower (then
normalised). An SGD step on a minibatch ``B`` moves ``W`` by ``−α G_Bᵀ X_B`` (``G = ∂ℓ/∂z``, one row
per pair in the batch), so after any number of steps from ``W_0``::

    W_s = W_0 − α Aᵀ X          A = Σ over earlier steps of G scattered into the rows of its batch
    b_s = b_0 − α Σ G           (N × d_out accumulator A, N = synthetic pairs)

and the pre-activations of batch ``B`` at step s are ``X_B W_sᵀ + b_s = P_B + b_s − α K_B A`` with
``P = X W_0ᵀ`` and ``K = X Xᵀ`` computed once per unroll. A step then costs ``|B| × N × d_out``
multiply-adds instead of ``|B| × d_in × d_out`` for the forward alone (and again for the backward
and twice more in the meta-backward; timings: ``tests/benchmarks/test_bench_tm.py``,
``docs/findings.md``). The mathematics is that of ``naive`` mode
(``methods/tm/unroll.py``), so the gradients agree with it up to float rounding (tested in float64);
the final ``θ_N`` is assembled explicitly and given to the same outer loss.

Only for plain linear heads without a tower, LoRA or dropout (the caller checks, see
``supports``); everything else uses ``methods/tm/unroll.py``.

The inner loss's gradient ``G`` (``InfoNCEHeads``: normalise, symmetric InfoNCE) is written in closed
form, so a step records a dozen operations instead of autograd's double-backward graph of the loss;
an unrolled step is made of many small operations on ``|B| × d_out`` tensors, so their number is what
a step costs on a CPU.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from bench.protocol.student import contrastive_loss
from methods.tm.experts import unflatten

HEADS = ("image_head", "text_head")  # the data tensors, in order, feed these heads


class InfoNCEHeads:
    """The inner loss on one batch's pre-activations, ``contrastive_loss`` of the L2-normalised
    embeddings, and its gradient with respect to them in closed form (``grad``, differentiable):

        u = z_v / |z_v|, v = z_t / |z_t|, L = u vᵀ / T, D = (softmax_rows(L) + softmax_cols(L) − 2I) / (2BT)
        ∂ℓ/∂u = D v, ∂ℓ/∂v = Dᵀ u, ∂ℓ/∂z = (g − x (x · g)) / |z| per row (x = u or v, g its gradient)

    (as ``F.normalize`` for any row with |z| above its 1e-12 floor)."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, z_img: torch.Tensor, z_txt: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(F.normalize(z_img, dim=-1), F.normalize(z_txt, dim=-1), self.temperature)

    def grad(self, z_img: torch.Tensor, z_txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_img = z_img.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        n_txt = z_txt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        u, v = z_img / n_img, z_txt / n_txt
        logits = (u @ v.T) / self.temperature
        b = len(logits)
        scale = 0.5 / (b * self.temperature)
        d = (logits.softmax(1) + logits.softmax(0)) * scale - torch.eye(b, dtype=u.dtype, device=u.device) * (2 * scale)
        g_u, g_v = d @ v, d.T @ u
        return (g_u - u * (u * g_u).sum(-1, keepdim=True)) / n_img, (g_v - v * (v * g_v).sum(-1, keepdim=True)) / n_txt


def head_grads(head_loss: Callable, zs: Sequence[torch.Tensor], extra: Sequence[torch.Tensor] = ()) -> Sequence[torch.Tensor]:
    """``∂ head_loss(*zs, *extra) / ∂ zs``, differentiable: in closed form where the loss has one
    (``grad``), else through autograd's double-backward graph."""
    if hasattr(head_loss, "grad") and not extra:
        return head_loss.grad(*zs)
    return torch.autograd.grad(head_loss(*zs, *extra), zs, create_graph=True)


def supports(spec: list) -> bool:
    """True when the trainable parameters are exactly one linear layer (weight, bias) per head."""
    return [n for n, _ in spec] == [f"{h}.{p}" for h in HEADS for p in ("weight", "bias")]


def cheaper(spec: list, n: int, rows: int) -> bool:
    """Whether the Gram unroll costs less than ``naive``: a step's ``n`` (synthetic pairs) per head
    against the heads' input widths, and the three products over all ``n`` pairs per unroll (``X W_0ᵀ``,
    ``X Xᵀ``, the final weights) against naive's over the ``rows`` batch rows an unroll draws
    (syn_steps × batch): measured faster at ``n = 1.25 × rows`` and slower at ``1.56 × rows``, so up to
    ``1.5 × rows`` (docs/findings.md)."""
    return len(HEADS) * n < sum(shape[1] for name, shape in spec if name.endswith(".weight")) and 2 * n <= 3 * rows


def gram_meta_backward(head_loss: Callable[..., torch.Tensor], theta0: torch.Tensor, spec: list,
                       data: Sequence[torch.Tensor], batches: Sequence[torch.Tensor], lr: torch.Tensor,
                       outer_loss: Callable[[torch.Tensor], torch.Tensor], extra: Sequence[torch.Tensor] = (),
                       lr_text: "torch.Tensor | None" = None,
                       mix: "Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None" = None) -> torch.Tensor:
    """``meta_backward`` (same contract: accumulates into ``.grad`` of ``lr`` and of each data
    tensor that requires grad; returns the detached outer loss) for linear heads.
    ``head_loss(z_image, z_text, *extra rows)`` is the inner loss on one batch's pre-activations (an
    ``InfoNCEHeads`` for its closed-form gradient).

    The LoRS family: ``extra`` are tensors whose batch rows follow into ``head_loss`` (the learned
    target factors, differentiated like the data); ``lr_text`` the text head's own step size (``lr``
    the image head's); ``mix(batch size) -> (λ, π)`` blends each step's batch as RepBlend does. On
    linear heads a blend of inputs is the same blend of pre-activations, ``λ z_B + (1 − λ) z_B[π]``,
    and its gradient reaches the weights through ``λ G`` at rows B and ``(1 − λ) G`` at rows B[π]."""
    if not supports(spec):
        raise ValueError(f"the Gram unroll needs linear heads only, got parameters {[n for n, _ in spec]}")
    params = unflatten(theta0.detach(), spec)
    heads = []
    for h, x, step in zip(HEADS, data, (lr, lr if lr_text is None else lr_text)):
        w0, b0 = params[f"{h}.weight"], params[f"{h}.bias"]
        heads.append({"x": x, "w0": w0, "b0": b0, "p": x @ w0.T, "k": x @ x.T, "lr": step,
                      "a": x.new_zeros(len(x), w0.shape[0]), "g": x.new_zeros(w0.shape[0])})
    for b in batches:
        zs = [h["p"][b] + h["b0"] - h["lr"] * h["g"] - h["lr"] * (h["k"][b] @ h["a"]) for h in heads]
        if mix is not None:
            lam, perm = mix(len(b))
            lam = lam.to(zs[0].dtype)  # 1 − λ in the data's precision
            zs = [lam * z + (1 - lam) * z[perm] for z in zs]
        grads = head_grads(head_loss, zs, [t[b] for t in extra])
        for h, g in zip(heads, grads):
            if mix is None:
                h["a"] = h["a"].index_add(0, b, g)
            else:
                h["a"] = h["a"].index_add(0, b, lam * g).index_add(0, b[perm], (1 - lam) * g)
            h["g"] = h["g"] + g.sum(0)
    final = []
    for h in heads:
        final += [(h["w0"] - h["lr"] * (h["a"].T @ h["x"])).reshape(-1), h["b0"] - h["lr"] * h["g"]]
    loss = outer_loss(torch.cat(final))
    loss.backward()
    return loss.detach()

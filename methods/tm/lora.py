"""The unrolled inner loop of LoRA heads (``tm_lora`` under the ``heads`` cut), frozen base computed once.

Under the ``heads`` cut ``tm_lora``'s student is, per tower, ``z = x W0ᵀ + b0 + s·(x Aᵀ) Bᵀ``: the base
layer ``W0, b0`` is fixed (``base_seed``) and only the rank-r adapters ``A`` (r × d_in) and ``B``
(d_out × r) train (peft's ``Linear``, scaling ``s = lora_alpha / r``). The base part of a batch's
pre-activations is the same in every unrolled step, so ``P = X W0ᵀ + b0`` is computed once per unroll
for all N synthetic pairs (and backpropagated once), instead of once per step for its batch and again
in each step's backward and in the meta-backward. A step then costs ``|B|·r·(d_in + d_out)``
multiply-adds on the adapter path instead of ``|B|·d_in·d_out`` more for the base layer (timings:
``tests/benchmarks/test_bench_tm.py``, ``docs/findings.md``). The adapters themselves are unrolled as in ``naive`` mode
(``methods/tm/unroll.py``), so the gradients agree with it up to float rounding (tested in float64).

Only for LoRA on plain linear heads (the layout ``make_lora_student`` builds under the heads cut,
see ``supports``); everything else uses ``methods/tm/unroll.py`` or ``methods/tm/gram.py``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from methods.tm.gram import HEADS  # the data tensors, in order, feed these heads
from methods.tm.experts import unflatten

PREFIX = "base_model.model."  # where peft puts the wrapped student


def names(head: str) -> dict[str, str]:
    """The parameter names of one LoRA-wrapped linear head: adapters A and B, base weight and bias."""
    return {"A": f"{PREFIX}{head}.lora_A.default.weight", "B": f"{PREFIX}{head}.lora_B.default.weight",
            "w": f"{PREFIX}{head}.base_layer.weight", "b": f"{PREFIX}{head}.base_layer.bias"}


def supports(spec: list) -> bool:
    """True when the trainable parameters are exactly one LoRA adapter pair (A, B) per linear head."""
    return [n for n, _ in spec] == [names(h)[k] for h in HEADS for k in ("A", "B")]


def cheaper(n: int, rows: int) -> bool:
    """Whether computing the base layer once for all ``n`` synthetic pairs costs less than for the
    ``rows`` batch rows an unroll draws (syn_steps × batch): true for every budget up to 1000 at the
    defaults (20 × 128 rows)."""
    return n < rows


def lora_scaling(model: torch.nn.Module) -> float:
    """The one LoRA scaling (alpha / rank) of the model's adapters."""
    found = {float(m.scaling["default"]) for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)}
    if len(found) != 1:
        raise ValueError(f"expected one LoRA scaling in the model, found {sorted(found)}")
    return found.pop()


def lora_meta_backward(head_loss: Callable[..., torch.Tensor], theta0: torch.Tensor, spec: list, frozen: dict,
                       scaling: float, data: Sequence[torch.Tensor], batches: Sequence[torch.Tensor],
                       lr: torch.Tensor, outer_loss: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``meta_backward`` (same contract: accumulates into ``.grad`` of ``lr`` and of each data tensor
    that requires grad; returns the detached outer loss) for LoRA heads. ``frozen`` holds the base
    weights by name; ``head_loss(z_image, z_text)`` is the inner loss on one batch's pre-activations
    (an ``InfoNCEHeads`` for its closed-form gradient, ``methods/tm/gram.py``)."""
    if not supports(spec):
        raise ValueError(f"the LoRA unroll needs LoRA adapters on linear heads only, got parameters {[n for n, _ in spec]}")
    params = unflatten(theta0.detach(), spec)
    heads = []
    for h, x in zip(HEADS, data):
        k = names(h)
        heads.append({"x": x, "p": x @ frozen[k["w"]].T + frozen[k["b"]],
                      "A": params[k["A"]].clone().requires_grad_(True), "B": params[k["B"]].clone().requires_grad_(True)})
    for b in batches:
        low = [h["x"][b] @ h["A"].T for h in heads]  # [|B|, r]
        zs = [h["p"][b] + scaling * (t @ h["B"].T) for h, t in zip(heads, low)]
        if hasattr(head_loss, "grad"):  # closed form: dz -> dB = s dzᵀ (x Aᵀ), dA = s (dz B)ᵀ x
            grads = [g for h, t, dz in zip(heads, low, head_loss.grad(*zs))
                     for g in (scaling * (dz @ h["B"]).T @ h["x"][b], scaling * dz.T @ t)]
        else:
            grads = torch.autograd.grad(head_loss(*zs), [t for h in heads for t in (h["A"], h["B"])], create_graph=True)
        for i, h in enumerate(heads):
            h["A"], h["B"] = h["A"] - lr * grads[2 * i], h["B"] - lr * grads[2 * i + 1]
    loss = outer_loss(torch.cat([h[k].reshape(-1) for h in heads for k in ("A", "B")]))
    loss.backward()
    return loss.detach()

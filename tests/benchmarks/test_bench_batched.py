"""Batched against one-at-a-time distillation: is it worth running the independent cells of one budget
(selection seeds; ``tm``, ``tm_image``, ``tm_text``) as one stacked unroll?

The unroll is ``tm``'s Gram form (``methods/tm/gram.py``: linear heads 1280->512 and 384->512, 20
differentiable SGD steps on 100 synthetic pairs, InfoNCE, then the meta-backward to the data and the
step size), written here with a leading cell axis so that B cells' matrix products become one batched
product. Each round times one iteration of B cells; the per-cell figure is the round over B. The
check: each cell of the stack computes what it computes alone (rounding apart).
"""
import pytest
import torch
import torch.nn.functional as F

N, STEPS, D_OUT, DIMS, T = 100, 20, 512, (1280, 384), 0.07


def _loss(zi, zt):
    zi, zt = F.normalize(zi, dim=-1), F.normalize(zt, dim=-1)
    logits = zi @ zt.transpose(-1, -2) / T
    lab = torch.arange(zi.shape[-2]).expand(zi.shape[:-1]).reshape(-1)
    n = logits.shape[-1]
    return (F.cross_entropy(logits.reshape(-1, n), lab, reduction="sum")
            + F.cross_entropy(logits.transpose(-1, -2).reshape(-1, n), lab, reduction="sum")) / (2 * zi.shape[-2])


def stacked_iteration(xs, ws, lr):
    """One Gram-unroll iteration of B stacked cells (leading axis); returns the matching loss summed
    over the cells (each cell's gradients are its own: the sum separates)."""
    heads = [dict(x=x, w=w, p=x @ w.transpose(-1, -2), k=x @ x.transpose(-1, -2), a=x.new_zeros(x.shape[0], N, D_OUT),
                  g=x.new_zeros(x.shape[0], 1, D_OUT)) for x, w in zip(xs, ws)]
    for _ in range(STEPS):
        zs = [h["p"] - lr * h["g"] - lr * (h["k"] @ h["a"]) for h in heads]
        grads = torch.autograd.grad(_loss(*zs), zs, create_graph=True)
        for h, gr in zip(heads, grads):
            h["a"], h["g"] = h["a"] + gr, h["g"] + gr.sum(-2, keepdim=True)
    final = [h["w"] - lr * (h["a"].transpose(-1, -2) @ h["x"]) for h in heads]
    loss = sum(((f - 1.01 * h["w"]) ** 2).sum() for f, h in zip(final, heads))
    loss.backward()
    return loss.detach()


def cells(b):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(b, N, d, generator=g).requires_grad_(True) for d in DIMS]
    ws = [0.03 * torch.randn(b, D_OUT, d, generator=g) for d in DIMS]
    return xs, ws, torch.full((b, 1, 1), 0.1, requires_grad=True)


def check_cells_are_independent(b):
    """Each cell of a stack of ``b`` gets the gradients it gets alone (rounding apart)."""
    xs, ws, lr = cells(b)
    stacked_iteration(xs, ws, lr)
    for i in range(b):
        x1 = [x[i:i + 1].detach().clone().requires_grad_(True) for x in xs]
        l1 = lr[i:i + 1].detach().clone().requires_grad_(True)
        stacked_iteration(x1, [w[i:i + 1] for w in ws], l1)
        for x, a in zip(xs, x1):
            torch.testing.assert_close(x.grad[i:i + 1], a.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lr.grad[i:i + 1], l1.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.benchmark(group="batched")
@pytest.mark.parametrize("b", [1, 3, 9])
def test_bench_batched_unroll(benchmark, b):
    def setup():
        return cells(b), {}

    loss = benchmark.pedantic(lambda xs, ws, lr: stacked_iteration(xs, ws, lr), setup=setup, rounds=5, iterations=1,
                              warmup_rounds=1)
    benchmark.extra_info["cells"] = b
    assert torch.isfinite(loss) and loss > 0
    if b > 1:
        check_cells_are_independent(b)

"""Speed of one trajectory-matching iteration (``methods.trajectory_matching.tm_iteration`` with the
``tm`` defaults: an unroll of ``syn_steps`` = 20 differentiable SGD steps of the linear heads
student, 1280->512 and 384->512, on minibatches of ``batch_syn`` synthetic pairs, then the
meta-backward and the optimiser steps) at 100 and 1000 synthetic pairs, through the full unrolled
graph (``naive``) and in the synthetic samples' space (``gram``, ``methods/tm/gram.py``: what ``auto``
picks below 832 pairs); and the same for ``tm_lora``'s student (rank-16 LoRA adapters on fixed
linear heads), naive against ``lora`` (``methods/tm/lora.py``, the base layer computed once per
unroll). The expert trajectory is a fake one of the real shape ([expert epochs + 1, trainable
parameters] float16, a seeded random walk from the student's initialisation): timing does not depend
on its values.

The inner gradient of the Gram and LoRA unrolls at 100 pairs, from autograd's double-backward graph
of the loss against the closed form the methods use (``InfoNCEHeads``, ``methods/tm/gram.py``).

``lors`` and ``repblend`` at 100, 200 and 500 pairs (their per-budget rows: 8 steps of 20 pairs, 40
for ``lors`` at 500; WBCE against low-rank targets, a step size per head; repblend blends), through
the naive unroll and the Gram unroll: where ``auto``'s rule for the LoRS family comes from.

The frozen-pixels cut (``--cut frozen-pixels``) at 64 and 112 px: the same gram iteration with the
synthetic images as pixels seen through the frozen EfficientNet-Lite0 tower (``image_fn``: one tower
forward, the unroll on its features, one backward into the pixels).
"""
import pytest
import torch

from bench.protocol.student import StudentConfig, build_student
from methods.tm.experts import ExpertConfig, flatten, make_lora_student, trainable
from methods.trajectory_matching import TMConfig, tm_iteration

D_IMG, D_TXT = 1280, 384
CFG = TMConfig()


def fake_expert(model):
    params = trainable(model)
    spec = [(n, tuple(p.shape)) for n, p in params]
    g = torch.Generator().manual_seed(1)
    steps = 0.01 * torch.randn(CFG.expert_train_epochs, sum(p.numel() for _, p in params), generator=g)
    traj = torch.cat([flatten(params)[None], flatten(params)[None] + steps.cumsum(0)]).half()
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad} | dict(model.named_buffers())
    return model, frozen, spec, traj


@pytest.fixture(scope="module")
def expert():
    return fake_expert(build_student(StudentConfig(), D_IMG, D_TXT, seed=0))


@pytest.fixture(scope="module")
def lora_expert():  # tm_lora's student: rank-16 adapters on fixed linear heads
    return fake_expert(make_lora_student(build_student(StudentConfig(), D_IMG, D_TXT, seed=0), ExpertConfig(lora_rank=16)))


@pytest.mark.benchmark(group="tm")
@pytest.mark.parametrize("unroll", ["naive", "gram"])
@pytest.mark.parametrize("n_pairs", [100, 1000])
def test_bench_tm_iteration(benchmark, expert, n_pairs, unroll):
    run_iteration(benchmark, expert, n_pairs, unroll)


@pytest.mark.benchmark(group="tm_lora")
@pytest.mark.parametrize("unroll", ["naive", "lora"])
@pytest.mark.parametrize("n_pairs", [100, 1000])
def test_bench_tm_lora_iteration(benchmark, lora_expert, n_pairs, unroll):
    run_iteration(benchmark, lora_expert, n_pairs, unroll)


@pytest.mark.benchmark(group="tm_inner_gradient")
@pytest.mark.parametrize("inner", ["autograd", "closed_form"])
@pytest.mark.parametrize("unroll", ["gram", "lora"])
def test_bench_tm_inner_gradient(benchmark, expert, lora_expert, monkeypatch, unroll, inner):
    import torch.nn.functional as F
    import methods.trajectory_matching as tm_module
    from bench.protocol.student import contrastive_loss

    if inner == "autograd":  # a plain loss function: the unrolls take its gradient through autograd
        monkeypatch.setattr(tm_module, "InfoNCEHeads", lambda t: lambda zi, zt: contrastive_loss(
            F.normalize(zi, dim=-1), F.normalize(zt, dim=-1), t))
    run_iteration(benchmark, expert if unroll == "gram" else lora_expert, 100, unroll)


@pytest.mark.benchmark(group="lors")
@pytest.mark.parametrize("unroll", ["naive", "gram"])
@pytest.mark.parametrize("n_pairs", [100, 200, 500])
@pytest.mark.parametrize("method", ["lors", "repblend"])
def test_bench_lors_iteration(benchmark, expert, method, n_pairs, unroll):
    from methods.lors import LoRSConfig, RepBlendConfig

    c = (LoRSConfig if method == "lors" else RepBlendConfig)().resolved(n_pairs)
    model, frozen, spec, traj = expert
    start, target = traj[0].float(), traj[c.expert_epochs].float()
    is_text = torch.cat([torch.full((int(torch.Size(shape).numel()),), n.startswith("text_head."), dtype=torch.bool)
                         for n, shape in spec])
    state = {}

    def setup():
        g = torch.Generator().manual_seed(100)
        img = torch.randn(n_pairs, D_IMG, generator=g).requires_grad_(True)
        txt = torch.randn(n_pairs, D_TXT, generator=g).requires_grad_(True)
        sim = [torch.ones(n_pairs).requires_grad_(True), *(torch.randn(n_pairs, c.targets_rank, generator=g).requires_grad_(True)
                                                        for _ in range(2))]
        lr, lr_txt = (torch.tensor(c.lr_init, requires_grad=True) for _ in range(2))
        opts = [torch.optim.SGD([img], lr=c.lr_image, momentum=c.momentum), torch.optim.SGD([txt], lr=c.lr_text, momentum=c.momentum),
                torch.optim.SGD([lr, lr_txt], lr=c.lr_lr, momentum=c.momentum), torch.optim.SGD(sim, lr=c.lr_targets, momentum=0.5)]
        state.update(img=img, sim=sim, img0=img.detach().clone())
        return (model, frozen, spec, start, target, img, txt, lr, opts), dict(
            syn_steps=c.syn_steps, batch=c.unroll_batch(n_pairs), temperature=StudentConfig().temperature, min_lr=c.min_lr,
            gen=torch.Generator().manual_seed(0), unroll=unroll, targets=(*sim, c.targets_alpha), lr_text=lr_txt,
            text_mask=is_text, blend=method == "repblend")

    loss = benchmark.pedantic(tm_iteration, setup=setup, rounds=5, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss) and loss.item() > 0
    assert not torch.equal(state["img"].detach(), state["img0"]) and all(t.grad is not None for t in state["sim"])


@pytest.mark.benchmark(group="tm_frozen_pixels")
@pytest.mark.parametrize("size", [64, 112])
def test_bench_tm_frozen_pixels_iteration(benchmark, expert, size):
    from bench.protocol.towers import effnet_lite0_tower

    tower = effnet_lite0_tower(size).requires_grad_(False)
    run_iteration(benchmark, expert, 100, "gram", image_fn=tower, pixels=size)


def run_iteration(benchmark, expert, n_pairs, unroll, image_fn=None, pixels=None):
    model, frozen, spec, traj = expert
    start, target = traj[0].float(), traj[CFG.expert_epochs].float()
    state = {}

    def setup():  # a fresh synthetic set and optimisers per round: every round times the same work
        g = torch.Generator().manual_seed(n_pairs)
        shape = (n_pairs, D_IMG) if pixels is None else (n_pairs, 3, pixels, pixels)
        img = torch.randn(shape, generator=g).requires_grad_(True)
        txt = torch.randn(n_pairs, D_TXT, generator=g).requires_grad_(True)
        lr = torch.tensor(CFG.lr_init, requires_grad=True)
        opts = [torch.optim.SGD([lr], lr=CFG.lr_lr, momentum=CFG.momentum),
                torch.optim.SGD([img], lr=CFG.lr_image, momentum=CFG.momentum),
                torch.optim.SGD([txt], lr=CFG.lr_text, momentum=CFG.momentum)]
        state.update(img=img, txt=txt, lr=lr, img0=img.detach().clone())
        return (model, frozen, spec, start, target, img, txt, lr, opts), dict(
            syn_steps=CFG.syn_steps, batch=min(CFG.batch_syn, n_pairs), temperature=StudentConfig().temperature,
            min_lr=CFG.min_lr, gen=torch.Generator().manual_seed(0), unroll=unroll, image_fn=image_fn)

    loss = benchmark.pedantic(tm_iteration, setup=setup, rounds=5, iterations=1, warmup_rounds=1)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    assert state["lr"].grad is not None and torch.isfinite(state["lr"].grad)
    assert state["lr"].item() >= torch.tensor(CFG.min_lr).item() and state["lr"].item() != CFG.lr_init  # the step size learned
    assert not torch.equal(state["img"].detach(), state["img0"])  # the synthetic images moved

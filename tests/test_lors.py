"""``lors`` and ``repblend``: the meta-gradient into the similarity factors against finite differences,
per-tower step sizes against the single one, blending with λ = 1 against no blending, per-head
matching by hand, the paper's per-budget defaults, and tiny variants end to end (native + plain)."""
import json
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.protocol.student import StudentConfig, build_student
from methods import METHODS
from methods.lors import LORS_TABLE, LoRSConfig, RepBlendConfig, table_row
from methods.tm.experts import flatten, trainable
from methods.trajectory_matching import AUTO, head_groups, matching_loss, tm_iteration

TINY = ["--limit", "80,30", "--set", "recipe.epochs=2", "--set", "recipe.batch_size=16"]


def small_problem(n=8, rank=2, seed=0):
    """A float64 student (linear heads 9 -> 6 and 7 -> 6), a synthetic set, similarity factors, a target."""
    student = build_student(StudentConfig(embed_dim=6), 9, 7, seed=0).double()
    spec = [(name, p.shape) for name, p in trainable(student)]
    g = torch.Generator().manual_seed(seed)
    theta0 = flatten(trainable(student))
    target = theta0 + 0.3 * torch.randn(theta0.shape, generator=g, dtype=torch.double)
    img = torch.randn(n, 9, generator=g, dtype=torch.double)
    txt = torch.randn(n, 7, generator=g, dtype=torch.double)
    a = torch.full((n,), 0.9, dtype=torch.double) + 0.05 * torch.rand(n, generator=g, dtype=torch.double)
    left = torch.randn(n, rank, generator=g, dtype=torch.double)
    right = 0.1 * torch.randn(n, rank, generator=g, dtype=torch.double)
    is_text = torch.cat([torch.full((int(torch.Size(s).numel()),), name.startswith("text_head."))
                         for name, s in spec])
    return student, spec, theta0, target, img, txt, [a, left, right], is_text


def iteration(student, spec, theta0, target, img, txt, sim, is_text, *, lr=0.5, lr_text=None, blend=False,
              groups=None, alpha=2.0, gen_seed=1, unroll="naive"):
    """One tm_iteration (naive unroll unless said) without optimiser steps; returns the loss (the
    gradients sit in .grad)."""
    lr = torch.tensor(lr, dtype=torch.double, requires_grad=True)
    lr_t = None if lr_text is None else torch.tensor(lr_text, dtype=torch.double, requires_grad=True)
    loss = tm_iteration(student, {}, spec, theta0, target, img, txt, lr, [], syn_steps=3, batch=5,
                        temperature=0.5, min_lr=1e-9, gen=torch.Generator().manual_seed(gen_seed), unroll=unroll,
                        targets=None if sim is None else (*sim, alpha), lr_text=lr_t,
                        text_mask=is_text if lr_t is not None else None, blend=blend, groups=groups)
    return loss, lr, lr_t


def test_the_meta_gradient_into_the_similarity_factors_matches_finite_differences():
    student, spec, theta0, target, img, txt, sim, is_text = small_problem()
    sim = [t.clone().requires_grad_(True) for t in sim]
    img.requires_grad_(True)
    loss, _, _ = iteration(student, spec, theta0, target, img, txt, sim, is_text)
    grads = [t.grad.clone() for t in sim]
    assert all(g.abs().sum() > 0 for g in grads)

    def outer(k, idx, eps):
        pert = [t.detach().clone() for t in sim]
        pert[k].view(-1)[idx] += eps
        value, _, _ = iteration(student, spec, theta0, target, img.detach(), txt, pert, is_text)
        return float(value)

    for k in range(3):
        for idx in (0, 3):
            eps = 1e-6
            fd = (outer(k, idx, eps) - outer(k, idx, -eps)) / (2 * eps)
            assert fd == pytest.approx(float(grads[k].view(-1)[idx]), rel=1e-5, abs=1e-10), (k, idx)


def test_two_equal_tower_step_sizes_are_the_single_step_size():
    student, spec, theta0, target, img, txt, sim, is_text = small_problem()
    s1 = [t.clone().requires_grad_(True) for t in sim]
    l1, lr1, _ = iteration(student, spec, theta0, target, img, txt, s1, is_text, lr=0.5)
    s2 = [t.clone().requires_grad_(True) for t in sim]
    l2, lr2, lr2_t = iteration(student, spec, theta0, target, img, txt, s2, is_text, lr=0.5, lr_text=0.5)
    assert torch.allclose(l1, l2, rtol=1e-12)
    # the single step size's gradient is the sum of the two towers' (chain rule through the mask)
    assert float(lr1.grad) == pytest.approx(float(lr2.grad + lr2_t.grad), rel=1e-9)
    assert all(torch.allclose(a.grad, b.grad, rtol=1e-9) for a, b in zip(s1, s2))
    assert float(lr2.grad) != pytest.approx(float(lr2_t.grad))  # the towers differ


def test_blending_with_lambda_one_is_no_blending(monkeypatch):
    student, spec, theta0, target, img, txt, sim, is_text = small_problem()

    def run(blend):
        s = [t.clone().requires_grad_(True) for t in sim]
        x = img.clone().requires_grad_(True)
        torch.manual_seed(5)
        loss, lr, _ = iteration(student, spec, theta0, target, x, txt, s, is_text, blend=blend)
        return loss, x.grad, [t.grad for t in s], lr.grad

    plain = run(False)
    with monkeypatch.context() as m:
        m.setattr(torch.distributions.Beta, "sample", lambda self, shape=torch.Size(): torch.tensor(1.0))
        fixed = run(True)
    assert torch.equal(plain[0], fixed[0]) and torch.equal(plain[1], fixed[1]) and torch.equal(plain[3], fixed[3])
    assert all(torch.equal(a, b) for a, b in zip(plain[2], fixed[2]))
    blended = run(True)  # a real λ changes the steps
    assert not torch.equal(plain[1], blended[1])


@pytest.mark.parametrize("blend,per_head,with_targets", [(False, False, True), (True, True, True), (True, False, False)])
def test_the_gram_unroll_of_the_lors_family_gives_the_naive_meta_gradient(blend, per_head, with_targets):
    """Linear heads: the Gram unroll with learned targets (WBCE), two step sizes, blending and
    per-head matching is the naive unroll's mathematics (float64): the same loss and gradients into
    the data, the target factors and both step sizes (minibatches of 5 of 8 pairs)."""
    student, spec, theta0, target, img, txt, sim, is_text = small_problem()
    groups = head_groups(is_text) if per_head else None

    def run(unroll):
        s = [t.clone().requires_grad_(True) for t in sim] if with_targets else None
        x, y = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        torch.manual_seed(5)  # the blend's draws
        loss, lr, lr_t = iteration(student, spec, theta0, target, x, y, s, is_text, lr_text=0.3, blend=blend,
                                   groups=groups, unroll=unroll)
        return [loss, x.grad, y.grad, lr.grad, lr_t.grad, *([t.grad for t in s] if s else [])]

    ref, got = run("naive"), run("gram")
    assert all(g is not None and g.abs().sum() > 0 for g in ref[1:])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_per_head_matching_is_the_sum_of_each_heads_own_normalised_distance():
    theta = torch.tensor([1.0, 2.0, 3.0, 4.0])
    start = torch.tensor([0.0, 0.0, 0.0, 0.0])
    target = torch.tensor([2.0, 2.0, 1.0, 5.0])
    m = torch.tensor([True, True, False, False])
    by_hand = (1 + 0) / (4 + 4) + (4 + 1) / (1 + 25)
    assert float(matching_loss(theta, start, target, [m, ~m])) == pytest.approx(by_hand)
    assert float(matching_loss(theta, start, target)) == pytest.approx((1 + 0 + 4 + 1) / (4 + 4 + 1 + 25))


def test_the_papers_defaults_per_budget():
    assert table_row(100) == LORS_TABLE[100] and table_row(150) == LORS_TABLE[100] and table_row(50) == LORS_TABLE[100]
    assert table_row(200)["targets_rank"] == 5 and table_row(1000) == LORS_TABLE[500]
    c = LoRSConfig(targets_rank=7).resolved(500)
    assert (c.targets_rank, c.targets_alpha, c.lr_targets, c.batch_syn, c.max_start_epoch) == (7, 0.01, 100.0, 40, 3)
    assert (c.syn_steps, c.expert_epochs, c.iterations, c.tower_lrs, c.whole_below) == (8, 1, 3000, True, 0)
    assert LoRSConfig().targets_rank == AUTO
    r = RepBlendConfig().resolved(500)
    assert r.batch_syn == 20 and r.blend and r.match == "joint" and r.targets_rank == 20
    assert {"lors", "repblend"} <= set(METHODS.select("distill"))
    assert LoRSConfig().experts() == RepBlendConfig().experts()  # the same buffers as tm's defaults
    from methods.trajectory_matching import TMConfig
    assert LoRSConfig().experts() == TMConfig().experts()


def test_tiny_variants_run_and_are_scored_natively_and_plainly(tmp_path, cache):
    out = tmp_path / "runs"
    args = ["run", "--methods", "test_lors,test_repblend", "--ipc", "10", "--seeds", "1", "--out", str(out),
            "--cache-dir", str(cache), *TINY]
    assert main(args) == 0
    recs = {r["method"]: r for r in (json.loads(f.read_text()) for f in (out / "cells").rglob("test_*/*.json"))}
    d = 1280 + 384
    for name, rec in recs.items():
        assert rec["native"] == {"loss": "wbce"} and rec["plain"]["metrics_mean"]["mean"] >= 0
        rank = rec["info"]["resolved"]["targets_rank"]
        assert rank == 10
        assert rec["storage_bytes"] == 4 * (10 * d + 2 + 10 + 2 * 10 * rank)
    # same seed, same set
    first = {m: torch.load(r["artifact"], weights_only=True) for m, r in recs.items()}
    assert main(args + ["--force"]) == 0
    for m, r in recs.items():
        again = torch.load(r["artifact"], weights_only=True)
        assert torch.equal(again["image"], first[m]["image"]) and torch.equal(again["extras"]["sim_left"],
                                                                            first[m]["extras"]["sim_left"])


def test_head_groups_are_slices_of_the_students_layout():
    from methods.trajectory_matching import head_groups
    m = torch.tensor([False, False, False, True, True])
    assert head_groups(m) == [slice(0, 3), slice(3, None)]
    odd = torch.tensor([False, True, False])
    assert [g.tolist() for g in head_groups(odd)] == [[True, False, True], [False, True, False]]
    theta, start, target = torch.randn(5), torch.zeros(5), torch.randn(5)
    assert torch.allclose(matching_loss(theta, start, target, head_groups(m)), matching_loss(theta, start, target, [~m, m]))

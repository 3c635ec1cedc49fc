"""Expert buffers and trajectory matching on the tiny generated protocol."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.cli import main
from bench.errors import BenchError
from bench.protocol import CutSplit
from bench.protocol.training import PairSet
from methods.tm.experts import ExpertBuffer, ExpertConfig, expert_student, flatten, trainable
from methods import METHODS, MethodContext
from methods.base import method_config
from methods.holdout import CHECK_SEED, holdout_images, replay
from methods.trajectory_matching import matching_loss

TINY = ["--limit", "80,30", "--set", "recipe.epochs=4", "--set", "recipe.batch_size=16"]


def build(name, protocol, cache, budget=10, seed=0, **opts):
    cls = METHODS.get(name)
    cfg = method_config(cls, {k: str(v) for k, v in opts.items()})
    return cls(cfg).build(MethodContext(protocol, cache, log=lambda m: None), budget, seed)


def test_matching_loss_known_values_and_scale_invariance():
    g = torch.Generator().manual_seed(0)
    start, target, end = (torch.randn(50, generator=g) for _ in range(3))
    assert matching_loss(start, start, target).item() == pytest.approx(1.0)
    assert matching_loss(target, start, target).item() == 0.0
    for c in (1e-3, 7.0, 1e4):
        assert matching_loss(c * end, c * start, c * target).item() == pytest.approx(matching_loss(end, start, target).item(), rel=1e-5)


def test_expert_buffer_is_float16_per_epoch_and_resumes(tiny_protocol, cache):
    cfg = ExpertConfig(n_experts=2, epochs=3)
    buf = ExpertBuffer(tiny_protocol, cfg, cache).build(log=lambda m: None)
    trajs = buf.load()
    n_params = sum(p.numel() for _, p in trainable(tiny_protocol.fresh_student(0)))
    assert buf.storage == "float16" and [t.params.shape for t in trajs] == [torch.Size([4, n_params])] * 2
    assert trajs[0].params.dtype == torch.float16 and trajs[0].base is None and len(trajs[0]) == 4
    # snapshot 0 is the expert's initialisation (read back as float32); training moves it
    init = flatten(trainable(expert_student(tiny_protocol, cfg, 10_000))).half().float()
    assert trajs[0][0].dtype == torch.float32
    assert torch.equal(trajs[0][0], init) and not torch.equal(trajs[0][0], trajs[0][-1])
    kept = buf.path(0).stat().st_mtime_ns
    buf.path(1).unlink()
    assert buf.missing() == [1]
    buf.build(log=lambda m: None)
    assert buf.path(0).stat().st_mtime_ns == kept and torch.equal(buf.load()[1].params, trajs[1].params)  # resumed, deterministic
    other = ExpertBuffer(tiny_protocol, ExpertConfig(n_experts=2, epochs=4), cache)
    assert other.key != buf.key  # the recipe is in the key


def test_tm_is_deterministic_per_seed_and_moves_the_data(tiny_protocol, cache):
    a = build("test_tm", tiny_protocol, cache, seed=0, keep="last")
    b = build("test_tm", tiny_protocol, cache, seed=0, keep="last")
    c = build("test_tm", tiny_protocol, cache, seed=1, keep="last")
    assert torch.equal(a.image, b.image) and torch.equal(a.text, b.text) and a.lr == b.lr
    assert not torch.equal(a.image, c.image)
    init = torch.as_tensor(a.info["init_caption_indices"])
    tr = tiny_protocol.train
    assert not torch.allclose(a.image, tr.image[tr.caption_image[init]])  # images were distilled
    assert not torch.allclose(a.text, tr.text[init])  # texts were distilled
    assert a.lr != 0.1 and a.lr > 0


@pytest.mark.parametrize("modality,fixed", [("image", "text"), ("text", "image")])
def test_single_modality_variants_keep_the_other_side_real(tiny_protocol, cache, modality, fixed):
    a = build("test_tm", tiny_protocol, cache, modality=modality, keep="last")
    init = torch.as_tensor(a.info["init_caption_indices"])
    tr = tiny_protocol.train
    real = {"image": tr.image[tr.caption_image[init]], "text": tr.text[init]}
    assert torch.equal(getattr(a, fixed), real[fixed])
    assert not torch.allclose(getattr(a, modality), real[modality])


def test_registered_variants_differ_only_in_modality_or_lora():
    base = METHODS.get("tm").Config()
    assert METHODS.get("tm_image").Config().modality == "image" and METHODS.get("tm_text").Config().modality == "text"
    assert METHODS.get("tm_lora").Config().lora_rank > 0 and base.lora_rank == 0
    assert set(METHODS.select("distill")) >= {"tm", "tm_image", "tm_text", "tm_lora"}
    assert "test_tm" not in METHODS.select("all")


def test_lora_experts_train_only_adapters(tiny_protocol, cache):
    cfg = ExpertConfig(n_experts=1, epochs=2, lora_rank=4)
    model = expert_student(tiny_protocol, cfg, 0)
    names = [n for n, _ in trainable(model)]
    assert names and all("lora_" in n for n in names)
    d_i, d_t, e = 1280, 384, tiny_protocol.cfg.student.embed_dim
    assert sum(p.numel() for _, p in trainable(model)) == 4 * (d_i + e) + 4 * (d_t + e)
    # the frozen base is the same whatever the adapter seed
    base = {n: p for n, p in model.named_parameters() if "base_layer" in n}
    base2 = {n: p for n, p in expert_student(tiny_protocol, cfg, 1).named_parameters() if "base_layer" in n}
    assert all(torch.equal(base[n], base2[n]) for n in base)
    art = build("test_tm_lora", tiny_protocol, cache)
    assert art.extras["lora_base_seed"].item() == METHODS.get("test_tm_lora").Config().base_seed
    assert art.storage_bytes(tiny_protocol) == (10 * (1280 + 384) + 2) * 4  # pairs + step size + base seed


def test_tm_cell_round_trips_through_evaluate(tmp_path, cache, capsys):
    out = tmp_path / "runs"
    assert main(["run", "--out", str(out), "--cache-dir", str(cache), *TINY, "--methods", "test_tm", "--ipc", "10"]) == 0
    rec = json.loads(next(Path(out, "cells").rglob("test_tm/10_s0.json")).read_text())
    assert rec["status"] == "ok" and rec["learned_lr"] == rec["info"]["learned_lr"]
    assert rec["metrics_per_seed"][0]["lr"] == pytest.approx(rec["learned_lr"] * 0.1)  # lr_policy learned, momentum 0.9
    assert rec["storage_bytes"] == (10 * (1280 + 384) + 1) * 4
    capsys.readouterr()
    assert main(["evaluate", "--artifact", rec["artifact"], "--seeds", "1", "--cache-dir", str(cache)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["metrics_per_seed"][0]["mean"] == pytest.approx(rec["metrics_per_seed"][0]["mean"])


def test_experts_command_builds_once_and_reports_size(tmp_path, capsys):
    argv = ["experts", "--cache-dir", str(tmp_path), *TINY, "--methods", "test_tm"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 experts x 3 epochs ready" in out and "MiB" in out
    files = sorted(tmp_path.rglob("expert_*.pt"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert main(argv) == 0  # cached: nothing retrained
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert main(["experts", "--cache-dir", str(tmp_path), *TINY, "--methods", "random"]) == 2


def test_keep_best_returns_the_lowest_loss_window_and_last_is_the_final_set(tiny_protocol, cache):
    last = build("test_tm", tiny_protocol, cache, iterations=30, keep="last")
    best = build("test_tm", tiny_protocol, cache, iterations=30, keep="best")
    assert last.info["kept_iteration"] == 30
    k = best.info["kept_iteration"]
    assert 25 <= k <= 30 and k % 5 == 0
    if k == 30:  # the best window is the last one: the same set
        assert torch.equal(best.image, last.image) and best.lr == last.lr
    with pytest.raises(BenchError, match="keep must be"):
        build("test_tm", tiny_protocol, cache, iterations=2, keep="middle")


def test_images_subset_keeps_chosen_images_and_all_their_captions():
    split = CutSplit(torch.arange(5.0)[:, None], torch.arange(8.0)[:, None], torch.tensor([0, 0, 1, 2, 2, 2, 3, 4]))
    sub = split.images_subset([3, 1])
    assert sub.image.flatten().tolist() == [3.0, 1.0]
    assert sub.text.flatten().tolist() == [2.0, 6.0]  # captions 2 (image 1) and 6 (image 3), in caption order
    assert sub.caption_image.tolist() == [1, 0]


def test_holdout_images_are_fixed_capped_and_refused_when_too_few():
    a = holdout_images(6000, 100, 1000)
    assert len(a) == 1000 == len(set(a.tolist())) and a.max() < 6000
    assert np.array_equal(a, holdout_images(6000, 1000, 1000))  # the same for every budget that leaves room
    assert len(holdout_images(500, 10, 1000)) == 100  # a fifth of the train images
    assert len(holdout_images(100, 70, 1000)) == 20
    with pytest.raises(BenchError, match="keep=holdout needs .* use --set <method>.keep=best"):
        holdout_images(100, 95, 1000)


def test_keep_holdout_returns_the_checked_set_with_the_best_held_out_score(tiny_protocol, cache):
    art = build("test_tm", tiny_protocol, cache, iterations=6, check_every=2)
    curve = art.info["holdout_curve"]
    assert [it for it, _ in curve] == [0, 2, 4, 6]
    scores = [s for _, s in curve]
    k = scores.index(max(scores))  # ties keep the earlier set
    assert art.info["kept_iteration"] == curve[k][0]
    held = holdout_images(tiny_protocol.train.n_images, 10, 1000)
    assert art.info["holdout_images"] == len(held) == 16
    # the set starts from images outside the held-out part
    init = torch.as_tensor(art.info["init_caption_indices"])
    assert not set(tiny_protocol.train.caption_image[init].tolist()) & set(held.tolist())
    # the returned set, trained and scored again the same way, gets the recorded score
    again = tiny_protocol.evaluate(art.pairs(tiny_protocol), [CHECK_SEED + 0], split=tiny_protocol.train.images_subset(held))
    assert round(again[0]["mean"], 2) == curve[k][1]
    # and a set scored differently from the recorded held-out curve: the real initial pairs
    tr = tiny_protocol.train
    real = PairSet.aligned(tr.image[tr.caption_image[init]], tr.text[init], 0.1)
    first = tiny_protocol.evaluate(real, [CHECK_SEED + 0], split=tr.images_subset(held))
    assert round(first[0]["mean"], 2) == curve[0][1]
    # the test split plays no part: replaced by noise, the same set comes back
    blind = copy.copy(tiny_protocol)
    t = tiny_protocol.test
    blind.splits = dict(tiny_protocol.splits, test=CutSplit(torch.randn_like(t.image), torch.randn_like(t.text), t.caption_image))
    again = build("test_tm", blind, cache, iterations=6, check_every=2)
    assert torch.equal(again.image, art.image) and again.info["holdout_curve"] == curve


def _scripted_checks(protocol, scores):
    """The protocol with its held-out check replaced by a script: check i scores ``scores[i]``; the
    checked sets are recorded."""
    seen = []

    def evaluate(pairs, seeds, split=None, recipe=None):
        t = pairs.targets
        seen.append((pairs.image.clone(), pairs.text.clone()) + (() if t is None else (t.a.clone(), t.left.clone(), t.right.clone())))
        return [{"mean": scores[len(seen) - 1]}]
    scripted = copy.copy(protocol)
    scripted.evaluate = evaluate
    return scripted, seen


def test_backoff_restores_the_best_set_and_scales_the_data_lr(tiny_protocol, cache):
    # checks at iterations 0..3 score 10, 20, 5, 19: the collapse at 2 (below backoff_below 0.5 x 20)
    # restores the set of iteration 1 and multiplies the data lr by `backoff`, so iteration 3 is one
    # step from set 1 whose length scales with `backoff` (same set, same batches, same gradient)
    moves, runs = {}, {}
    for backoff in (0.5, 1.0):
        p, seen = _scripted_checks(tiny_protocol, [10, 20, 5, 19])
        runs[backoff] = build("test_tm", p, cache, iterations=3, check_every=1, backoff=backoff)
        assert runs[backoff].info["backoffs"] == [2] and runs[backoff].info["kept_iteration"] == 1
        moves[backoff] = [a - b for a, b in zip(seen[3], seen[1])]
        assert torch.equal(runs[backoff].image, seen[1][0])  # the best checked set is returned
    for half, full in zip(moves[0.5], moves[1.0]):
        assert float(full.abs().max()) > 0
        torch.testing.assert_close(half, 0.5 * full, rtol=1e-3, atol=1e-5)
    # without backoff, iteration 3 continues from set 2
    p, seen = _scripted_checks(tiny_protocol, [10, 20, 5, 19])
    never = build("test_tm", p, cache, iterations=3, check_every=1, backoff_below=0)
    assert never.info["backoffs"] == []
    assert not torch.allclose(seen[3][0] - seen[1][0], moves[1.0][0])
    # a drop that is not a collapse (15 >= 0.5 x 20) does not back off
    p, _ = _scripted_checks(tiny_protocol, [10, 20, 15, 19])
    assert build("test_tm", p, cache, iterations=3, check_every=1).info["backoffs"] == []
    with pytest.raises(BenchError, match="backoff must be in"):
        build("test_tm", tiny_protocol, cache, backoff=0)


@pytest.mark.parametrize("name", ["test_tm", "test_lors", "test_mdm", "test_covmatch"])
def test_patience_stops_after_that_many_checks_without_a_better_score(tiny_protocol, cache, name):
    # checks at iterations 0, 1, ... score 10, 20, 15, 18, 12, 25, 11: with patience 3 the run stops at
    # the check of iteration 4 (three after the best, 20 at 1) and returns the set of iteration 1, the
    # one the whole run returns when no later check beats it; with patience 4, 25 at 5 comes in time
    opts = dict(iterations=6, check_every=1) | ({"backoff_below": 0} if name in ("test_tm", "test_lors") else {})
    if name == "test_covmatch":
        opts["reset_every"] = 3
    p, seen = _scripted_checks(tiny_protocol, [10, 20, 15, 18, 12, 25, 11])
    whole = build(name, p, cache, **opts)
    assert whole.info["kept_iteration"] == 5 and "stopped_at" not in whole.info
    assert torch.equal(whole.image, seen[5][0])
    p, seen3 = _scripted_checks(tiny_protocol, [10, 20, 15, 18, 12, 25, 11])
    three = build(name, p, cache, patience=3, **opts)
    assert three.info["stopped_at"] == 4 and [it for it, _ in three.info["holdout_curve"]] == [0, 1, 2, 3, 4]
    assert three.info["kept_iteration"] == 1 and torch.equal(three.image, seen[1][0])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(seen3, seen))  # the same run up to the stop
    p, _ = _scripted_checks(tiny_protocol, [10, 20, 15, 18, 12, 25, 11])
    four = build(name, p, cache, patience=4, **opts)
    assert four.info["kept_iteration"] == 5 and torch.equal(four.image, whole.image)
    # replayed on the whole run's stored curve, the same stops and kept sets
    curve = whole.info["holdout_curve"]
    assert replay(curve, 3) == (4, 1) and replay(curve, 4) == (6, 5) == replay(curve, 0)
    with pytest.raises(BenchError, match="patience >= 0"):
        build(name, tiny_protocol, cache, patience=-1)


def test_backoff_slows_the_lors_targets_factors_like_the_data(tiny_protocol, cache):
    # the collapse at check 2 restores set 1 (targets included) and scales the lr of the data and of
    # the factors by `backoff`: every part of iteration 3's step from set 1 halves
    moves = {}
    for backoff in (0.5, 1.0):
        p, seen = _scripted_checks(tiny_protocol, [10, 20, 5, 19])
        art = build("test_lors", p, cache, iterations=3, check_every=1, backoff=backoff, grad_clip=0)
        assert art.info["backoffs"] == [2] and torch.equal(art.targets.left, seen[1][3])
        moves[backoff] = [a - b for a, b in zip(seen[3], seen[1])]
    assert len(moves[1.0]) == 5  # image, text, a, L, R
    for half, full in zip(moves[0.5], moves[1.0]):
        assert float(full.abs().max()) > 0
        torch.testing.assert_close(half, 0.5 * full, rtol=1e-3, atol=1e-6)


def test_a_non_finite_matching_loss_backs_off_to_the_best_set(tiny_protocol, cache, monkeypatch):
    # iteration 2's matching loss is NaN, so its step fills the set with NaN: the run goes back to the
    # best checked set (iteration 1's, scored 20) as on a collapse, and iteration 3 steps from there
    import methods.trajectory_matching as tmm
    calls = []

    def poisoned(theta, *args, **kw):
        calls.append(1)
        loss = matching_loss(theta, *args, **kw)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(tmm, "matching_loss", poisoned)
    p, seen = _scripted_checks(tiny_protocol, [10, 20, 15, 19])
    art = build("test_tm", p, cache, iterations=4, check_every=1)
    assert art.info["diverged"] == [3] and art.info["backoffs"] == [3]
    assert len(seen) == 4  # checks at 0, 1, 2 and 4: the diverged iteration is not checked
    assert torch.isfinite(seen[3][0]).all() and torch.isfinite(art.image).all()
    assert torch.equal(art.image, seen[1][0]) and art.info["kept_iteration"] == 1
    # iteration 3 is one step from set 1 at a quarter of the data lr, not from the NaN set
    assert 0 < float((seen[3][0] - seen[1][0]).abs().max()) < float((seen[2][0] - seen[1][0]).abs().max())
    # with nothing checked to go back to, a divergence fails the cell in one line
    calls.clear()
    with pytest.raises(RuntimeError, match="diverged at iteration 2"):
        build("test_tm", tiny_protocol, cache, iterations=4, keep="last")


def test_a_check_whose_student_diverges_scores_zero_and_backs_off(tiny_protocol, cache):
    # check 2's student training diverges (e.g. exploded learned targets): it scores 0, a collapse
    # below 0.5 x the best (20), so the run backs off to set 1 as for a check that scored 0
    from bench.protocol.training import TrainingDiverged
    p, seen = _scripted_checks(tiny_protocol, [10, 20, None, 19])
    evaluate = p.evaluate

    def diverging(pairs, seeds, split=None, recipe=None):
        out = evaluate(pairs, seeds, split, recipe)
        if out[0]["mean"] is None:
            raise TrainingDiverged("training diverged (loss nan) at epoch 1 with step size 1e-05")
        return out
    p.evaluate = diverging
    art = build("test_tm", p, cache, iterations=3, check_every=1)
    assert art.info["holdout_curve"][2] == (2, 0.0) and art.info["backoffs"] == [2]
    assert torch.equal(art.image, seen[1][0]) and art.info["kept_iteration"] == 1


@pytest.mark.parametrize("lr", [0.03, 0.2])
def test_adam_data_update_first_step_moves_every_coordinate_by_its_lr(tiny_protocol, cache, lr):
    # Adam's first step is lr * g / (|g| + eps): a coordinate moves by lr, less only where |g| is
    # near eps (1e-8); an SGD step would scale with the gradient instead
    art = build("test_tm", tiny_protocol, cache, iterations=1, keep="last", data_optimizer="adam", lr_image=lr, lr_text=lr / 2)
    j = torch.as_tensor(art.info["init_caption_indices"])
    tr = tiny_protocol.train
    for d, step in (((art.image - tr.image[tr.caption_image[j]]).abs(), lr), ((art.text - tr.text[j]).abs(), lr / 2)):
        assert float(d.max()) <= step * (1 + 1e-5)
        assert float((d > 0.99 * step).float().mean()) > 0.99


def test_default_data_update_is_the_papers_sgd_and_its_first_step_is_linear_in_the_lr(tiny_protocol, cache):
    cfg = METHODS.get("tm").Config()
    assert (cfg.data_optimizer, cfg.lr_image, cfg.lr_text, cfg.momentum) == ("sgd", 1000.0, 1000.0, 0.5)
    # SGD's first step is -lr * g (the momentum buffer starts at g) with g independent of the lr:
    # doubling the lr doubles every coordinate's move exactly (up to rounding); Adam's would not
    moves = []
    for lr in (500.0, 1000.0):
        art = build("test_tm", tiny_protocol, cache, iterations=1, keep="last", lr_image=lr, lr_text=lr)
        j = torch.as_tensor(art.info["init_caption_indices"])
        tr = tiny_protocol.train
        moves.append((art.image - tr.image[tr.caption_image[j]], art.text - tr.text[j]))
    for a, b in zip(*moves):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(b, 2 * a, rtol=1e-3, atol=1e-5)
    adam = build("test_tm", tiny_protocol, cache, iterations=1, keep="last", data_optimizer="adam", lr_image=0.03)
    assert not torch.equal(adam.image, art.image)
    with pytest.raises(BenchError, match="data_optimizer must be"):
        build("test_tm", tiny_protocol, cache, data_optimizer="rmsprop")


def naive_and_fast_meta_gradients(model, frozen, theta0, target, g, n, batch, learn_text, fast, closed_form=False):
    """Float64 meta-gradients of one 4-step unroll of ``model`` (flat trainable parameters at
    ``theta0``, plus ``frozen``) on random data drawn from ``g``: through ``meta_backward(naive)`` and
    through ``fast(head_loss, data, batches, lr, outer)``, ``head_loss`` a plain function (autograd's
    inner gradient) or, with ``closed_form``, ``InfoNCEHeads``. Returns ``[(loss, image grad, text
    grad, lr grad)]`` for naive then fast, and the batches."""
    import torch.nn.functional as F
    from torch.func import functional_call
    from bench.protocol.student import contrastive_loss
    from methods.tm.experts import unflatten
    from methods.tm.unroll import meta_backward

    spec = [(name, p.shape) for name, p in trainable(model)]
    img0, txt0 = torch.randn(n, 9, generator=g, dtype=torch.double), torch.randn(n, 7, generator=g, dtype=torch.double)
    batches = [torch.randperm(n, generator=g)[:batch] for _ in range(4)]
    outer = lambda th: matching_loss(th, theta0, target)  # noqa: E731

    def step_loss(theta, img, txt):
        return contrastive_loss(*functional_call(model, unflatten(theta, spec) | frozen, (img, txt)), 0.07)

    def head_loss(zi, zt):
        return contrastive_loss(F.normalize(zi, dim=-1), F.normalize(zt, dim=-1), 0.07)

    if closed_form:
        from methods.tm.gram import InfoNCEHeads
        head_loss = InfoNCEHeads(0.07)

    got = []
    for use_fast in (False, True):
        img, txt = img0.clone().requires_grad_(True), txt0.clone().requires_grad_(learn_text)
        lr = torch.tensor(0.8, dtype=torch.double, requires_grad=True)
        if use_fast:
            loss = fast(head_loss, [img, txt], batches, lr, outer)
        else:
            loss = meta_backward(step_loss, theta0, [img, txt], batches, lr, outer, mode="naive")
        got.append((loss, img.grad, txt.grad, lr.grad))
    return got, batches


@pytest.mark.parametrize("closed_form", [False, True])
@pytest.mark.parametrize("n,batch,learn_text", [(12, 12, True), (12, 5, True), (12, 5, False)])
def test_gram_unroll_gives_the_naive_meta_gradient(n, batch, learn_text, closed_form):
    """The Gram-space unroll of linear heads is the naive unrolled graph's mathematics: the same
    outer loss and gradients (float64), with full batches, minibatches that leave rows out, and one
    side fixed; with the inner gradient from autograd and in closed form."""
    from methods.tm.gram import gram_meta_backward
    from bench.protocol.student import StudentConfig, build_student

    student = build_student(StudentConfig(embed_dim=6), 9, 7, seed=0).double()
    spec = [(name, p.shape) for name, p in trainable(student)]
    g = torch.Generator().manual_seed(0)
    theta0 = flatten(trainable(student))
    target = theta0 + 0.3 * torch.randn(theta0.shape, generator=g, dtype=torch.double)
    got, batches = naive_and_fast_meta_gradients(
        student, {}, theta0, target, g, n, batch, learn_text,
        lambda head_loss, data, batches, lr, outer: gram_meta_backward(head_loss, theta0, spec, data, batches, lr, outer),
        closed_form)
    (l_ref, i_ref, t_ref, a_ref), (l, i, t, a) = got
    assert torch.isfinite(l_ref) and l_ref > 0 and i_ref.abs().sum() > 0 and a_ref != 0
    if batch < n:  # a row no batch drew gets no gradient in either
        unused = sorted(set(range(n)) - set(torch.cat(batches).tolist()))
        assert all(i_ref[r].abs().sum() == 0 for r in unused)
    assert torch.allclose(l, l_ref, rtol=1e-12)
    assert torch.allclose(i, i_ref, rtol=1e-9, atol=1e-12) and torch.allclose(a, a_ref, rtol=1e-9)
    assert (t is None and t_ref is None) if not learn_text else torch.allclose(t, t_ref, rtol=1e-9, atol=1e-12)


def test_closed_form_infonce_gradient_is_autograds():
    """InfoNCEHeads.grad is the gradient of the normalised symmetric InfoNCE (float64), and its own
    derivative (the unroll's second order) is autograd's double backward: compared as a
    Hessian-vector product."""
    import torch.nn.functional as F
    from bench.protocol.student import contrastive_loss
    from methods.tm.gram import InfoNCEHeads

    g = torch.Generator().manual_seed(3)
    zi, zt = (torch.randn(7, 5, generator=g, dtype=torch.double).mul(3).requires_grad_(True) for _ in range(2))
    heads = InfoNCEHeads(0.07)
    loss = contrastive_loss(F.normalize(zi, dim=-1), F.normalize(zt, dim=-1), 0.07)
    assert heads(zi, zt).item() == pytest.approx(loss.item(), rel=1e-12)
    ref = torch.autograd.grad(loss, (zi, zt), create_graph=True)
    got = heads.grad(zi, zt)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    w = [torch.randn(7, 5, generator=g, dtype=torch.double) for _ in range(2)]
    hv_ref = torch.autograd.grad(sum((r * v).sum() for r, v in zip(ref, w)), (zi, zt))
    hv = torch.autograd.grad(sum((r * v).sum() for r, v in zip(got, w)), (zi, zt))
    for a, b in zip(hv, hv_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_auto_unroll_picks_gram_only_for_linear_heads_where_it_is_cheaper():
    from methods.trajectory_matching import TMConfig

    linear = [("image_head.weight", (512, 1280)), ("image_head.bias", (512,)),
              ("text_head.weight", (512, 384)), ("text_head.bias", (512,))]
    mlp = [("image_head.proj.weight", (512, 1280)), ("image_head.proj.bias", (512,))]
    auto = TMConfig()
    assert auto.unroll_mode("heads", linear, 100) == "gram"
    assert auto.unroll_mode("heads", linear, 831) == "gram"  # 2 x 831 < 1280 + 384
    assert auto.unroll_mode("heads", linear, 832) == "naive"
    assert auto.unroll_mode("heads", mlp, 100) == "naive"
    assert auto.unroll_mode("pixels", [("tower.w", (3, 3))] + linear, 100) == "exact"
    assert TMConfig(unroll="naive").unroll_mode("heads", linear, 100) == "naive"
    # the LoRS family draws syn_steps x batch = 8 x 20 rows per unroll (lors 8 x 40 from 500 pairs):
    # gram up to 1.5 x those rows, naive beyond; naive under pixels (no exact mode for it)
    from methods.lors import LoRSConfig, RepBlendConfig
    lors, repblend = LoRSConfig(), RepBlendConfig()
    assert [lors.resolved(n).unroll_mode("heads", linear, n) for n in (100, 240, 241, 500)] == ["gram", "gram", "naive", "naive"]
    assert [repblend.resolved(n).unroll_mode("heads", linear, n) for n in (100, 240, 241, 1000)] == ["gram", "gram", "naive", "naive"]
    assert TMConfig(syn_steps=8, batch_syn=40, whole_below=0).unroll_mode("heads", linear, 480) == "gram"  # 1.5 x 320
    assert lors.resolved(100).unroll_mode("pixels", [("tower.w", (3, 3))] + linear, 100) == "naive"
    with pytest.raises(BenchError, match="linear heads"):
        TMConfig(unroll="gram").unroll_mode("heads", mlp, 100)


def test_tm_records_the_gram_unroll_and_matches_naive_closely(tiny_protocol, cache):
    """Both unrolls of a whole (tiny) distillation land on nearly the same set: only float rounding differs."""
    a = build("test_tm", tiny_protocol, cache, keep="last")
    b = build("test_tm", tiny_protocol, cache, keep="last", unroll="naive")
    assert a.info["unroll"] == "gram" and b.info["unroll"] == "naive"
    assert torch.allclose(a.image, b.image, atol=1e-4) and torch.allclose(a.text, b.text, atol=1e-4)
    assert a.lr == pytest.approx(b.lr, rel=1e-4)


@pytest.mark.parametrize("closed_form", [False, True])
@pytest.mark.parametrize("n,batch,learn_text", [(12, 12, True), (12, 5, False)])
def test_lora_unroll_gives_the_naive_meta_gradient(n, batch, learn_text, closed_form):
    """The LoRA-heads unroll (base layer computed once per unroll) is the naive unrolled graph of the
    peft-wrapped student: the same outer loss and gradients (float64), adapters started away from
    peft's B = 0, with minibatches and with the text side fixed."""
    from methods.tm.lora import lora_meta_backward, lora_scaling, supports
    from bench.protocol.student import StudentConfig, build_student
    from methods.tm.experts import make_lora_student

    model = make_lora_student(build_student(StudentConfig(embed_dim=6), 9, 7, seed=0), ExpertConfig(lora_rank=2, lora_alpha=3)).double()
    spec = [(name, p.shape) for name, p in trainable(model)]
    assert supports(spec) and lora_scaling(model) == 1.5
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(flatten(trainable(model)).shape, generator=g, dtype=torch.double)
    target = theta0 + 0.3 * torch.randn(theta0.shape, generator=g, dtype=torch.double)
    got, _ = naive_and_fast_meta_gradients(
        model, frozen, theta0, target, g, n, batch, learn_text,
        lambda head_loss, data, batches, lr, outer: lora_meta_backward(head_loss, theta0, spec, frozen, 1.5, data, batches, lr, outer),
        closed_form)
    (l_ref, i_ref, t_ref, a_ref), (l, i, t, a) = got
    assert torch.isfinite(l_ref) and l_ref > 0 and i_ref.abs().sum() > 0 and a_ref != 0
    assert torch.allclose(l, l_ref, rtol=1e-12)
    assert torch.allclose(i, i_ref, rtol=1e-9, atol=1e-12) and torch.allclose(a, a_ref, rtol=1e-9)
    assert (t is None and t_ref is None) if not learn_text else torch.allclose(t, t_ref, rtol=1e-9, atol=1e-12)


def test_auto_unroll_picks_lora_for_lora_heads_and_tm_lora_records_it(tiny_protocol, cache):
    """auto: lora for LoRA heads below syn_steps x batch pairs; a tiny tm_lora lands on nearly the
    set the naive unroll gives (float rounding only); unroll=lora without LoRA is one clear error."""
    from methods.trajectory_matching import TMConfig

    lora = [(f"base_model.model.{h}.lora_{x}.default.weight", (1, 1)) for h in ("image_head", "text_head") for x in "AB"]
    linear = [("image_head.weight", (512, 1280)), ("image_head.bias", (512,)),
              ("text_head.weight", (512, 384)), ("text_head.bias", (512,))]
    assert TMConfig().unroll_mode("heads", lora, 1000) == "lora"  # 1000 < 20 x 128
    assert TMConfig(syn_steps=5).unroll_mode("heads", lora, 640) == "naive"  # 5 x 128
    with pytest.raises(BenchError, match="LoRA on linear heads"):
        TMConfig(unroll="lora").unroll_mode("heads", linear, 100)
    a = build("test_tm_lora", tiny_protocol, cache, keep="last")
    b = build("test_tm_lora", tiny_protocol, cache, keep="last", unroll="naive")
    assert a.info["unroll"] == "lora" and b.info["unroll"] == "naive"
    tr, j = tiny_protocol.train, torch.as_tensor(a.info["init_caption_indices"])
    assert float((a.image - tr.image[tr.caption_image[j]]).abs().max()) > 1e-3  # the set moved
    # float rounding only (the texts reach ~50 here, where float32 rounding is ~1e-5 per step)
    assert torch.allclose(a.image, b.image, rtol=1e-4, atol=1e-4) and torch.allclose(a.text, b.text, rtol=1e-4, atol=1e-4)
    assert a.lr == pytest.approx(b.lr, rel=1e-4)


def test_sets_below_whole_below_unroll_whole_and_larger_ones_on_minibatches(tiny_protocol, cache):
    """Budgets below ``whole_below`` unroll the whole set at every step whatever ``batch_syn`` says;
    from ``whole_below`` on, ``batch_syn`` pairs per step (a different run); bad values are refused."""
    from methods.trajectory_matching import TMConfig

    assert [TMConfig().unroll_batch(n) for n in (10, 100, 200, 255, 256, 1000)] == [10, 100, 200, 255, 128, 128]
    whole = build("test_tm", tiny_protocol, cache, keep="last", batch_syn=4)
    also_whole = build("test_tm", tiny_protocol, cache, keep="last", batch_syn=7)
    mini = build("test_tm", tiny_protocol, cache, keep="last", batch_syn=4, whole_below=10)
    assert whole.info["unroll_batch"] == also_whole.info["unroll_batch"] == 10 and mini.info["unroll_batch"] == 4
    assert torch.equal(whole.image, also_whole.image) and torch.equal(whole.text, also_whole.text)
    assert not torch.allclose(whole.image, mini.image, atol=1e-4)
    with pytest.raises(BenchError, match="batch_syn"):
        build("test_tm", tiny_protocol, cache, batch_syn=0)


def test_grad_clip_caps_data_steps_at_a_multiple_of_the_recent_median(tiny_protocol, cache):
    """With momentum 0, a cap of ~0 after the 10-iteration warm-up freezes the set: iterations 11-15
    leave it where iteration 10 left it; without the cap they move it; bad values are refused."""
    common = dict(keep="last", momentum=0)
    at10 = build("test_tm", tiny_protocol, cache, iterations=10, **common)
    frozen = build("test_tm", tiny_protocol, cache, iterations=15, grad_clip=1e-9, **common)
    free = build("test_tm", tiny_protocol, cache, iterations=15, grad_clip=0, **common)
    assert torch.allclose(frozen.image, at10.image, atol=1e-5) and torch.allclose(frozen.text, at10.text, atol=1e-5)
    assert not torch.allclose(free.image, at10.image, atol=1e-3)
    assert len(frozen.info["clipped"]) == 2 * 5 and all(r > 1e6 for _, _, r in frozen.info["clipped"])
    assert "clipped" not in free.info
    with pytest.raises(BenchError, match="grad_clip"):
        build("test_tm", tiny_protocol, cache, grad_clip=-1)


def test_grad_clip_caps_the_lors_targets_factors_too(tiny_protocol, cache):
    """The learned targets' factors are clipped like the data: with a cap of ~0 after the warm-up,
    iterations 11-15 leave a, L and R where iteration 10 left them; without it they move."""
    common = dict(keep="last", momentum=0, lr_image=1, lr_text=1, lr_targets=1)  # small steps: 15 iterations stay finite
    at10 = build("test_lors", tiny_protocol, cache, iterations=10, **common)
    frozen = build("test_lors", tiny_protocol, cache, iterations=15, grad_clip=1e-9, **common)
    free = build("test_lors", tiny_protocol, cache, iterations=15, grad_clip=0, **common)
    for f in ("a", "left", "right"):
        before = getattr(at10.targets, f)
        torch.testing.assert_close(getattr(frozen.targets, f), before, rtol=0, atol=1e-6)
        assert not torch.allclose(getattr(free.targets, f), before, atol=1e-4), f
    assert {n for _, n, _ in frozen.info["clipped"]} == {"image", "text", "targets_a", "targets_left", "targets_right"}

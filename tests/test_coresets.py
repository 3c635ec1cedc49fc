"""Coreset baselines: herding, kcenter, forgetting (and their shared candidate features)."""
import dataclasses
import itertools
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import methods
from bench.protocol import CutSplit, Protocol, ProtocolConfig
from bench.protocol.student import StudentConfig
from bench.protocol.training import Recipe, train_student
from datasets.base import CaptionDataset, Split
from methods import METHODS, Artifact, MethodContext
from methods import forgetting as fg
from methods.coreset_features import candidate_features, representative_captions
from methods.herding import herding_order
from methods.kcenter import kcenter_order

CORESETS = ("herding", "kcenter", "forgetting")


# -- helpers ---------------------------------------------------------------------------------------

def fake_protocol(image, text, caption_image):
    """Just what herding and kcenter read (and Artifact.validate checks): the train split (at the
    cut, and as features: the same under the heads cut)."""
    train = CutSplit(torch.as_tensor(image, dtype=torch.float32), torch.as_tensor(text, dtype=torch.float32),
                     torch.as_tensor(caption_image, dtype=torch.long))
    return SimpleNamespace(train=train, features_train=train)


def random_protocol(n_images=30, caps_per=3, d_img=10, d_txt=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    cap = torch.arange(n_images).repeat_interleave(caps_per)
    return fake_protocol(torch.randn(n_images, d_img, generator=g), torch.randn(len(cap), d_txt, generator=g), cap)


def toy_protocol(n_images=40, caps_per=2, d_img=12, d_txt=6, epochs=3, head="linear", seed=0):
    """A real Protocol on small random features (texts are a noisy linear map of their images)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d_img, d_txt))

    def split(n):
        img = rng.normal(size=(n, d_img))
        cap = np.repeat(np.arange(n), caps_per)
        txt = img[cap] @ w + 0.3 * rng.normal(size=(len(cap), d_txt))
        return Split([f"im{i}" for i in range(n)], [f"c{j}" for j in range(len(cap))], cap), (img, txt)

    (tr, ftr), (te, fte) = split(n_images), split(10)
    ds = CaptionDataset("toy", {"train": tr, "test": te}, f"toy-{seed}-{n_images}", lambda ref: None)
    cfg = ProtocolConfig(dataset="toy", student=StudentConfig(head=head, embed_dim=16, dropout=0.3),
                         recipe=Recipe(epochs=epochs, batch_size=16, lr=0.05))
    return Protocol(cfg, ds, {"train": ftr, "test": fte}, {"image": "fake-img", "text": "fake-txt"})


def build(name, protocol, budget, seed, tmp_path=None, **config):
    cls = METHODS.get(name)
    art = cls(cls.Config(**config)).build(MethodContext(protocol, tmp_path, log=lambda m: None), budget, seed)
    art.validate(protocol, budget)
    return art


def covering_radius(x, centers):
    d = np.linalg.norm(x[:, None, :] - x[None, list(centers), :], axis=2)
    return d.min(1).max()


# -- registry and contract -------------------------------------------------------------------------

@pytest.mark.parametrize("name", CORESETS)
def test_registered_as_coreset_with_a_frozen_config(name):
    cls = methods.METHODS.get(name)
    assert METHODS.entry(name).groups == ("coreset",) and cls.group == "coreset" and cls.name == name
    assert name in METHODS.select("coreset") and name in METHODS.select("all")
    cfg = cls.Config()
    dataclasses.asdict(cfg)  # recorded in results
    if dataclasses.fields(cfg):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, dataclasses.fields(cfg)[0].name, 1)
    doc = sys.modules[cls.__module__].__doc__
    assert "Definition" in doc and "Randomness" in doc  # the exact definition for pairs is documented


@pytest.fixture(scope="module")
def forgetting_ctx(tmp_path_factory):
    """A real protocol whose forgetting statistics are computed once for the module."""
    tmp = tmp_path_factory.mktemp("cache")
    p = toy_protocol()
    build("forgetting", p, 5, 0, tmp)
    return p, tmp


@pytest.mark.parametrize("name", CORESETS)
def test_deterministic_per_seed_valid_and_budget_equal_to_all_images(name, forgetting_ctx):
    if name == "forgetting":
        p, tmp = forgetting_ctx
    else:
        p, tmp = random_protocol(n_images=40, caps_per=2), None
    n = len(p.train.image)
    for budget in (1, 7, n):
        a, b = build(name, p, budget, 3, tmp), build(name, p, budget, 3, tmp)
        np.testing.assert_array_equal(a.indices, b.indices)
        idx = np.asarray(a.indices)
        assert a.kind == "selected" and len(idx) == budget and len(np.unique(idx)) == budget
        assert idx.min() >= 0 and idx.max() < len(p.train.text)
        assert len(np.unique(p.train.caption_image[torch.as_tensor(idx)].numpy())) == budget
    # the full budget selects every image once, with its representative caption
    full = build(name, p, n, 0, tmp).indices
    caps = representative_captions(p.train.text, p.train.caption_image, n)
    assert sorted(full) == sorted(caps)
    with pytest.raises(ValueError, match="larger than the train split"):
        build(name, p, n + 1, 0, tmp)


def test_seed_dependence_kcenter_differs_herding_does_not():
    p = random_protocol(n_images=60)
    ks = {tuple(build("kcenter", p, 10, s).indices) for s in range(4)}
    assert len(ks) > 1  # the start point is drawn from the seed
    hs = {tuple(build("herding", p, 10, s).indices) for s in range(4)}
    assert len(hs) == 1  # documented: herding is deterministic, the seed is unused


def test_kcenter_start_point_comes_from_the_seed():
    p = random_protocol(n_images=60)
    art = build("kcenter", p, 5, 11)
    start = int(np.random.default_rng(11).integers(60))
    assert art.info["start"] == start
    x, caps = candidate_features(p.train)
    assert art.indices[0] == caps[start]


# -- candidates ------------------------------------------------------------------------------------

def test_representative_caption_is_nearest_the_mean_of_the_image_captions():
    # image 0: captions 0, 2, 4 (interleaved with image 1's); caption 4 lies between the other two
    e = np.eye(3)
    text = np.stack([e[0], e[1], e[1], e[2], (e[0] + e[1]) / np.sqrt(2) + 0.1 * e[2], e[2]]) * 5.0  # scale is ignored
    cap = np.array([0, 1, 0, 1, 0, 1])
    rep = representative_captions(torch.tensor(text, dtype=torch.float32), torch.tensor(cap), 2)
    assert rep[0] == 4
    assert rep[1] == 3  # image 1 has captions 1, 3, 5 with 3 and 5 equal: the lower index wins
    # a single caption is its own representative; two captions tie -> the lower index
    rep = representative_captions(torch.randn(3, 4), torch.tensor([1, 0, 1]), 2)
    assert list(rep) == [1, 0]
    with pytest.raises(ValueError, match="at least one caption"):
        representative_captions(torch.randn(2, 4), torch.tensor([0, 0]), 2)


def test_candidate_features_are_normalised_halves():
    p = random_protocol(n_images=5, caps_per=2, d_img=4, d_txt=3)
    x, caps = candidate_features(p.train)
    assert x.shape == (5, 7) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x[:, :4], axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(x[:, 4:], axis=1), 1, atol=1e-6)
    ti = p.train.text[torch.as_tensor(caps)]
    np.testing.assert_allclose(x[:, 4:], (ti / ti.norm(dim=1, keepdim=True)).numpy(), atol=1e-6)
    assert list(p.train.caption_image[torch.as_tensor(caps)].numpy()) == list(range(5))


# -- k-center --------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_kcenter_radius_within_twice_the_optimum(seed):
    x = np.random.default_rng(seed).normal(size=(12, 2)).astype(np.float32)
    k = 3
    opt = min(covering_radius(x, c) for c in itertools.combinations(range(12), k))
    for start in range(12):
        picked, radii = kcenter_order(x, k, start)
        r = covering_radius(x, picked)
        assert r <= 2 * opt + 1e-5
        assert radii[-1] == pytest.approx(r, rel=1e-5)
        assert np.all(np.diff(radii) <= 1e-6)  # the covering radius never grows


def test_kcenter_picks_one_point_per_well_separated_cluster():
    rng = np.random.default_rng(0)
    k = 5
    centers = rng.normal(size=(k, 6)) * 100
    label = rng.permutation(np.repeat(np.arange(k), 30))
    x = (centers[label] + rng.normal(size=(len(label), 6))).astype(np.float32)
    for start in (0, 17, 149):
        picked, _ = kcenter_order(x, k, start)
        assert sorted(label[picked]) == list(range(k))


def test_kcenter_end_to_end_covers_every_cluster_of_pairs():
    # 4 clusters of pairs: image and text features near a cluster-specific direction
    rng = np.random.default_rng(1)
    k, per = 4, 25
    label = rng.permutation(np.repeat(np.arange(k), per))
    dirs_i, dirs_t = rng.normal(size=(k, 16)), rng.normal(size=(k, 8))
    img = dirs_i[label] + 0.05 * rng.normal(size=(len(label), 16))
    cap = np.repeat(np.arange(len(label)), 2)
    txt = dirs_t[label[cap]] + 0.05 * rng.normal(size=(len(cap), 8))
    p = fake_protocol(img, txt, cap)
    for seed in range(4):
        art = build("kcenter", p, k, seed)
        assert sorted(label[cap[art.indices]]) == list(range(k))
    # random pairs miss a cluster most of the time: the check above is not vacuous
    from methods.random_subset import random_pairs
    misses = sum(len(set(label[cap[random_pairs(cap, k, np.random.default_rng(s))]])) < k for s in range(50))
    assert misses > 25


def test_kcenter_with_duplicate_points_still_selects_distinct_candidates():
    x = np.zeros((6, 3), dtype=np.float32)
    picked, radii = kcenter_order(x, 6, 2)
    assert sorted(picked) == list(range(6)) and picked[0] == 2 and list(picked[1:]) == [0, 1, 3, 4, 5]
    assert np.all(radii == 0)


# -- herding ---------------------------------------------------------------------------------------

def test_herding_hand_computed_order():
    # mean 3.25; greedy: 2 (|2-3.25|), then 1 (mean 1.5), then 10 (mean 4.33), then 0
    x = np.array([[0.0], [1.0], [2.0], [10.0]], dtype=np.float32)
    assert list(herding_order(x, 4)) == [2, 1, 3, 0]  # "nearest to the mean" would give 2, 1, 0, 3


def test_herding_matches_brute_force_greedy_and_breaks_ties_low():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    mu = x.astype(np.float64).mean(0)
    chosen = []
    for k in range(1, 16):
        best = min((i for i in range(40) if i not in chosen),
                   key=lambda i: np.linalg.norm(mu - x[chosen + [i]].astype(np.float64).mean(0)))
        chosen.append(best)
    assert list(herding_order(x, 15)) == chosen
    dup = np.array([[1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0]], dtype=np.float32)
    assert list(herding_order(dup, 4)) == [0, 1, 2, 3]


@pytest.mark.parametrize("budget", (5, 10, 20, 40))
def test_herding_mean_closer_to_full_mean_than_random(budget):
    p = random_protocol(n_images=200, caps_per=2, d_img=16, d_txt=8, seed=budget)
    x, caps = candidate_features(p.train)
    mu = x.mean(0)
    art = build("herding", p, budget, 0)
    row = {c: i for i, c in enumerate(caps)}
    gap_h = np.linalg.norm(x[[row[c] for c in art.indices]].mean(0) - mu)
    rng = np.random.default_rng(0)
    gap_r = np.mean([np.linalg.norm(x[rng.choice(200, budget, replace=False)].mean(0) - mu) for _ in range(50)])
    assert gap_h < 0.6 * gap_r  # measured: about 0.5x at 5 pairs, 0.3x at 10
    assert art.info["mean_gap"] == pytest.approx(gap_h, rel=1e-4)


# -- forgetting ------------------------------------------------------------------------------------

SCRIPT = np.array([  # epochs x pairs; pair columns p0..p6
    [1, 0, 1, 0, 0, 1, 0],
    [0, 0, 1, 1, 1, 0, 0],
    [1, 0, 1, 1, 0, 0, 0],
    [0, 0, 1, 0, 1, 0, 0],
    [1, 0, 1, 0, 0, 0, 1],
], dtype=bool)


def test_count_forgetting_events_on_a_scripted_sequence():
    assert list(fg.count_forgetting_events(SCRIPT)) == [2, 0, 0, 1, 2, 1, 0]
    assert list(fg.count_forgetting_events(SCRIPT[:1])) == [0] * 7  # one epoch: nothing to forget
    with pytest.raises(ValueError):
        fg.count_forgetting_events(SCRIPT[0])


def test_forgetting_order_and_tie_break():
    # never learned (p1); then 2 events: p4 (2 epochs learned) before p0 (3); then 1 event: p5 (1) before
    # p3 (2); then 0 events: p6 (1) before p2 (5)
    for seed in range(3):
        assert list(fg.forgetting_order(SCRIPT, np.random.default_rng(seed))) == [1, 4, 0, 5, 3, 6, 2]
    # exact ties fall back to the seed's random order, and never-learned pairs come first
    learned = np.zeros((4, 9), dtype=bool)
    learned[:, 6:] = [[1, 1, 1], [0, 0, 0], [0, 0, 1], [0, 0, 0]]  # p6, p7: 1 event, 1 epoch each; p8: 2 events
    orders = [fg.forgetting_order(learned, np.random.default_rng(s)) for s in range(6)]
    for s, o in enumerate(orders):
        assert set(o[:6]) == set(range(6)) and set(o[6:]) == {6, 7, 8}
        perm = list(np.random.default_rng(s).permutation(9))
        assert list(o[6:]) == [8, *sorted([6, 7], key=perm.index)]  # ties: as listed in the permutation
        assert list(o[:6]) == [i for i in perm if i < 6]
        np.testing.assert_array_equal(o, fg.forgetting_order(learned, np.random.default_rng(s)))
    assert len({tuple(o[:6]) for o in orders}) > 1


def test_retrieved_both_ways_needs_both_directions_and_ties_count_against():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # pair 0: ok both ways. pair 1: image 1 scores caption 2 (1.0) above caption 1 (0.8): fail.
    # pair 2: image 2's top caption is 2 (1.0), but caption 2 ties between images 1 and 2: fail.
    assert list(fg.retrieved_both_ways(img, txt, chunk=2)) == [True, False, False]
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.0]])
    # row 0: 1.0 vs 0.1 and -1; column 0: 1.0 vs 0.1 -> ok; pair 1 ok; pair 2 ok
    for chunk in (1, 2, 5):
        assert list(fg.retrieved_both_ways(img, txt, chunk=chunk)) == [True, True, True]
    # caption 1 is retrieved best by image 0 (an i2t success for image 1 is not enough)
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.9], [-1.0, 0.0]])
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert list(fg.retrieved_both_ways(img, txt)) == [False, False, True]


def test_forgetting_selection_follows_its_cached_statistics(forgetting_ctx, monkeypatch):
    p, tmp = forgetting_ctx
    method = fg.Forgetting(fg.Forgetting.Config())
    ctx = MethodContext(p, tmp, log=lambda m: None)
    path = method.cache_path(ctx)
    assert path.exists() and path.parent == tmp / "forgetting" and path.name.startswith(p.id)
    assert not [f for f in path.parent.iterdir() if f.name.endswith(".tmp")]
    with np.load(path) as z:
        learned = z["learned"]
    assert learned.shape == (3, 40) and learned.dtype == bool

    # a second build reads the cache (no training at all) and keeps the documented order
    monkeypatch.setattr(fg, "train_student", lambda *a, **k: pytest.fail("trained again despite the cache"))
    caps = representative_captions(p.train.text, p.train.caption_image, 40)
    for seed in (0, 4):
        art = build("forgetting", p, 12, seed, tmp)
        assert art.info["stats_cached"] is True
        order = fg.forgetting_order(learned, np.random.default_rng(seed))
        assert list(art.indices) == list(caps[order[:12]])

    # a scripted matrix in the cache: all never learned -> random order from the seed, differs by seed
    fg._atomic_savez(path, learned=np.zeros((3, 40), dtype=bool), probe_captions=caps)
    sels = {tuple(build("forgetting", p, 10, s, tmp).indices) for s in range(4)}
    assert len(sels) > 1
    assert list(build("forgetting", p, 10, 2, tmp).indices) == list(caps[np.random.default_rng(2).permutation(40)[:10]])

    # another epoch count is another cache entry
    assert fg.Forgetting(fg.Forgetting.Config(epochs=5)).cache_path(ctx) != path
    assert fg.Forgetting(fg.Forgetting.Config(train_seed=1)).cache_path(ctx) != path


def test_forgetting_stale_cache_is_recomputed(tmp_path):
    p = toy_protocol(n_images=20, epochs=2)
    method = fg.Forgetting(fg.Forgetting.Config())
    ctx = MethodContext(p, tmp_path, log=lambda m: None)
    path = method.cache_path(ctx)
    fg._atomic_savez(path, learned=np.zeros((2, 19), dtype=bool), probe_captions=np.arange(19))
    art = build("forgetting", p, 4, 0, tmp_path)
    assert art.info["stats_cached"] is False
    with np.load(path) as z:
        assert z["learned"].shape == (2, 20)
    path.write_bytes(b"garbage")
    assert build("forgetting", p, 4, 0, tmp_path).info["stats_cached"] is False


def test_forgetting_probe_leaves_training_as_without_it(tmp_path, monkeypatch):
    """The per-epoch probe must not change the training run (e.g. by leaving dropout off)."""
    p = toy_protocol(n_images=32, epochs=3, head="mlp")
    seen = {}

    def spy(student, *a, **k):
        seen["student"] = student
        return train_student(student, *a, **k)

    monkeypatch.setattr(fg, "train_student", spy)
    art = build("forgetting", p, 4, 0, tmp_path)
    assert art.info["epochs"] == 3 and art.info["stats_cached"] is False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = p.fresh_student(0)
        train_student(ref, p.train.all_pairs(), p.cfg.recipe, 0)
    for a, b in zip(seen["student"].parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_forgetting_learns_something_on_easy_pairs(tmp_path):
    p = toy_protocol(n_images=24, epochs=6)
    method = fg.Forgetting(fg.Forgetting.Config())
    caps = representative_captions(p.train.text, p.train.caption_image, 24)
    learned, cached = method.learned_matrix(MethodContext(p, tmp_path, log=lambda m: None), caps)
    assert not cached and learned.shape == (6, 24)
    assert learned[-1].mean() > 0.5  # texts are a linear map of their images: most pairs get learned


def test_artifact_contract_for_selected_sets():
    p = random_protocol(n_images=10)
    art = build("herding", p, 4, 0)
    assert isinstance(art, Artifact) and art.pairs(p).image.shape == (4, 10)

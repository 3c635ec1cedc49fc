"""The frozen-pixels cut: distilled images are pixels seen through the frozen image tower; the
student, the real data and the expert buffers are the heads cut's. CPU, 32 px, tiny sizes."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.cli import main
from bench.protocol import ProtocolConfig, build_protocol
from bench.protocol.student import StudentConfig, build_student
from bench.protocol.training import PairSet, Recipe
from datasets.encoders import get_encoder
from datasets.features import features
from methods.tm.experts import ExpertBuffer, ExpertConfig, flatten, trainable
from methods.trajectory_matching import tm_iteration
from tests.test_pixels import TINY_TM, _cells

RECIPE = Recipe(epochs=2, batch_size=16)
FROZEN = ["--cut", "frozen-pixels", "--image-size", "32", "--limit", "40,20", "--set", "recipe.epochs=2",
          "--set", "recipe.batch_size=16"]


def frozen(cache, size=32):
    cfg = ProtocolConfig(limit=(40, 20), student=StudentConfig(cut="frozen-pixels", image_size=size), recipe=RECIPE)
    return build_protocol(cfg, cache_dir=cache, log=None)


@pytest.fixture(scope="module")
def frozen_protocol(cache):
    return frozen(cache)


def test_unmoved_pixels_give_the_frozen_encoders_features(frozen_protocol, cache):
    """The cut is the heads cut when the images do not move: the tower's features of the train
    pixels are the frozen encoder's cached features at the same size (float16 rounding apart)."""
    p = frozen_protocol
    idx = torch.arange(p.train.n_images)
    x = p.synthetic_images(idx)
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.float32
    cached = torch.from_numpy(features(p.dataset, "train", get_encoder("effnet_lite0", "image", image_size=32), cache,
                                       log=None).astype("float32"))
    with torch.no_grad():
        raw = p.frozen_tower.net(x)
        got = p.image_features(x)
    torch.testing.assert_close(raw, cached, rtol=2 ** -10, atol=1e-4)
    mu, sd = p.frozen_tower.out_mean, p.frozen_tower.out_std
    assert torch.all((got - p.train.image).abs() <= 2 ** -10 * cached.abs() / sd + 1e-4)
    # dead units (constant on the train images; most of them at 32 px) are divided by the live
    # units' median std, not by the 1e-6 floor: pixels that wake one up move it like any other
    floor = p._stats["image"][1] <= 1e-5
    assert floor.float().mean() > 0.5
    assert torch.all(sd[floor] == p._stats["image"][1][~floor].median()) and torch.all(sd[floor] > 1e-3)
    # a set of those pixels is scored on the features the heads student trains on
    pairs = p.at_cut(PairSet.aligned(x[:6], p.train.text[:6]))
    # (another batch size may take another convolution kernel: float32 rounding of the raw
    # features, scaled up by the standardisation's 1/sd)
    assert pairs.image.shape == (6, 1280)
    assert torch.all((pairs.image - got[:6]).abs() <= 1e-4 * (raw[:6].abs() + 1) / sd + 1e-4)
    assert p.id != build_protocol(ProtocolConfig(limit=(40, 20), recipe=RECIPE), cache_dir=cache, log=None).id


def test_at_224_px_features_and_experts_are_the_heads_cuts(cache):
    p, heads = frozen(cache, 224), build_protocol(ProtocolConfig(limit=(40, 20), recipe=RECIPE), cache_dir=cache, log=None)
    assert p.id != heads.id and torch.equal(p.train.image, heads.train.image) and torch.equal(p.test.text, heads.test.text)
    cfg = ExpertConfig(n_experts=1, epochs=2)
    assert ExpertBuffer(p, cfg, cache).key == ExpertBuffer(heads, cfg, cache).key
    assert ExpertBuffer(frozen(cache, 32), cfg, cache).key != ExpertBuffer(heads, cfg, cache).key  # other features


@pytest.mark.parametrize("unroll", ["naive", "gram"])
def test_the_meta_gradient_in_the_pixels_matches_a_finite_difference(unroll):
    """One matching iteration through a tiny smooth tower, in float64: the gradient tm_iteration
    leaves on the pixels against central differences of the matching loss it returns."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tower = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    tower = tower.double().requires_grad_(False)
    student = build_student(StudentConfig(embed_dim=4), 6, 5, seed=0).double()
    spec = [(n, tuple(t.shape)) for n, t in trainable(student)]
    start = flatten(trainable(student)).detach()
    target = start + 0.3 * torch.randn(start.shape, generator=g, dtype=torch.float64)
    pix0 = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    txt = torch.randn(4, 5, generator=g, dtype=torch.float64)

    def loss_at(pix, grad=False):
        x = pix.clone().requires_grad_(grad)
        lr = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        loss = tm_iteration(student, {}, spec, start, target, x, txt.clone(), lr, [], syn_steps=3, batch=4,
                            temperature=0.5, min_lr=1e-4, gen=torch.Generator().manual_seed(1), unroll=unroll,
                            image_fn=tower)
        return float(loss), x.grad

    _, grad = loss_at(pix0, grad=True)
    assert grad is not None and grad.abs().sum() > 0
    for k in range(3):
        v = torch.randn(pix0.shape, generator=g, dtype=torch.float64)
        eps = 1e-5
        fd = (loss_at(pix0 + eps * v)[0] - loss_at(pix0 - eps * v)[0]) / (2 * eps)
        assert float((grad * v).sum()) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_every_heads_method_runs_under_the_cut_and_stores_pixels(tmp_path, cache, capsys):
    out = tmp_path / "runs"
    tiny = ["--set", "test_covmatch.grad_clip=1", "--set", "test_lors.iterations=3", "--set", "test_repblend.iterations=3", "--set", "test_mdm.iterations=3",
            "--set", "test_lors.n_experts=1", "--set", "test_repblend.n_experts=1", "--set", "test_mdm.n_experts=1"]
    methods = "random,herding,test_tm,test_lors,test_repblend,test_mdm,test_covmatch"
    assert main(["run", "--out", str(out), "--cache-dir", str(cache), *FROZEN, *TINY_TM, *tiny, "--methods", methods,
                 "--ipc", "5", "--seeds", "1", "--no-fairness", "--transfer", "none"]) == 0
    recs = _cells(out)
    assert {r["status"] for r in recs.values()} == {"ok"}, {k: r.get("error") for k, r in recs.items()}
    per_pair = 3 * 32 * 32 + 384  # float32 values of one pair: its pixels and its text feature
    assert recs["herding/5_s0"]["storage_bytes"] == 5 * per_pair * 4
    from methods.base import Artifact
    for name in ("test_tm", "test_lors", "test_repblend", "test_mdm", "test_covmatch"):
        rec = recs[f"{name}/5_s0"]
        assert rec["protocol"]["cut"] == "frozen-pixels"
        art = Artifact.load(Path(rec["artifact"]))[0]
        assert art.image.shape == (5, 3, 32, 32) and art.image.dtype == torch.float32
        assert rec["storage_bytes"] >= 5 * per_pair * 4
    assert recs["test_tm/5_s0"]["info"]["unroll"] == "gram"  # the heads cut's unroll on the tower's features
    assert recs["test_tm/5_s0"]["storage_bytes"] == (5 * per_pair + 1) * 4  # + the learned step size
    capsys.readouterr()
    rec = recs["test_tm/5_s0"]
    assert main(["evaluate", "--artifact", rec["artifact"], "--seeds", "1", "--cache-dir", str(cache)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["protocol_id"] == rec["protocol_id"]
    assert res["metrics_per_seed"][0]["mean"] == pytest.approx(rec["metrics_per_seed"][0]["mean"])


def test_tm_pixels_move_from_their_real_start(frozen_protocol, cache):
    from methods import METHODS, MethodContext
    from methods.base import method_config

    cls = METHODS.get("test_tm")
    art = cls(method_config(cls, {"iterations": "2", "n_experts": "1", "keep": "last"})).build(
        MethodContext(frozen_protocol, cache, log=lambda m: None), 5, 0)
    init = torch.as_tensor(art.info["init_caption_indices"])
    real = frozen_protocol.synthetic_images(frozen_protocol.train.caption_image[init])
    assert art.image.shape == real.shape and not torch.allclose(art.image, real)


def test_a_method_that_cannot_run_under_a_cut_says_so_in_one_line(tmp_path, cache, capsys):
    out = tmp_path / "runs"
    main(["run", "--out", str(out), "--cache-dir", str(cache), "--cut", "pixels", "--image-size", "32", "--limit", "40,20",
          "--set", "recipe.epochs=2", "--methods", "test_covmatch", "--ipc", "5", "--seeds", "1", "--no-fairness",
          "--transfer", "none"])
    rec = _cells(out)["test_covmatch/5_s0"]
    assert rec["status"] == "failed"
    assert rec["error"].count("\n") == 0 and "runs under the heads and frozen-pixels cuts only" in rec["error"]


def test_an_unmoved_set_looks_like_its_real_pairs(frozen_protocol, tiny_protocol):
    """Known answers: a set whose pairs are real pairs shows, under heads, the same real image on
    both sides and each pair's own caption (nearest neighbour of an unmoved feature is itself);
    under frozen-pixels its own pixels, which are the initial image's."""
    from bench.runner import sheet_tiles
    from methods.base import Artifact

    for p in (tiny_protocol, frozen_protocol):
        tr = p.feature_splits["train"]
        init = [tr.caption_image.tolist().index(i) for i in (3, 7, 11)]  # the first caption of images 3, 7, 11
        images = tr.caption_image[torch.as_tensor(init)]
        art = Artifact("synthetic", image=p.synthetic_images(images), text=tr.text[init].clone(), lr=0.1,
                       info={"init_caption_indices": init})
        tiles, label = sheet_tiles(p, art)
        assert len(tiles) == 3 and label == ("synthetic image" if p.pixel_sets else
                                             "nearest real image to the synthetic image feature")
        captions = p.dataset.split("train").captions
        for t, j, i in zip(tiles, init, images.tolist()):
            assert t.caption == captions[j]
            if p.pixel_sets:  # the denormalised pixels are the cached image's
                assert (t.right.astype(int) == p.train_pixels[i].permute(1, 2, 0).numpy()).all()
            else:
                assert (t.right == t.left).all()


def test_report_writes_a_contact_sheet_per_distilled_set(tmp_path, cache, capsys):
    from PIL import Image

    out = tmp_path / "runs"
    assert main(["run", "--out", str(out), "--cache-dir", str(cache), *FROZEN, *TINY_TM, "--methods", "herding,test_tm",
                 "--ipc", "5", "--seeds", "1", "--no-fairness", "--transfer", "none"]) == 0
    capsys.readouterr()
    assert main(["report", "--out", str(out), "--cache-dir", str(cache)]) == 0
    sheets = sorted((out / "report" / "sheets").rglob("*.png"))
    # synthetic sets only (herding selects real pairs); a config's variant stays in the name
    assert len(sheets) == 1 and sheets[0].name.startswith("test_tm") and sheets[0].name.endswith("_5_s0.png")
    with Image.open(sheets[0]) as im:
        assert im.size[0] > 400 and im.size[1] > 150
    assert str(sheets[0]) in capsys.readouterr().out
    capsys.readouterr()
    assert main(["report", "--out", str(out), "--no-sheets"]) == 0

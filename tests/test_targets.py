"""Learned similarity targets in the protocol: LoRS's weighted BCE against a hand-worked case, the
low-rank block against the dense matrix, storage of every learned float, the loss field's place in the
protocol id, and native + plain scoring of a set with targets through the runner and `evaluate`."""
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import plugins
from bench.cli import main
from bench.errors import BenchError
from bench.protocol import ProtocolConfig
from bench.protocol.student import StudentConfig, build_student, wbce_loss
from bench.protocol.training import PairSet, Recipe, SimilarityTargets, train_student
from methods.base import Artifact

TINY = ["--limit", "80,30", "--set", "recipe.epochs=2", "--set", "recipe.batch_size=16"]


def test_wbce_on_a_3x3_case_worked_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    s = torch.tensor([[1.0, 0.2, 0.0], [0.0, 0.9, 0.7], [0.1, 0.0, 0.4]])
    t = 0.5
    z = [[sum(a * b for a, b in zip(img[i].tolist(), txt[j].tolist())) / t for j in range(3)] for i in range(3)]
    pos, neg = [], []
    for i in range(3):
        for j in range(3):
            p = 1 / (1 + math.exp(-z[i][j]))
            sij = float(s[i, j])
            l = -sij * math.log(p + 1e-6) - (1 - sij) * math.log(1 - p + 1e-6)
            (pos if sij > 0.5 else neg).append(l)
    expected = 0.5 * (sum(pos) / len(pos) + sum(neg) / len(neg))  # 3 entries above 0.5, 6 at or below
    assert len(pos) == 3
    assert float(wbce_loss(img, txt, s, t)) == pytest.approx(expected, rel=1e-6)
    # every entry on one side of 0.5: that part alone
    ones = torch.ones(3, 3)
    assert float(wbce_loss(img, txt, ones, t)) == pytest.approx(
        float((-torch.log(torch.sigmoid(img @ txt.T / t) + 1e-6)).mean()), rel=1e-6)


def test_the_low_rank_block_equals_the_dense_matrix_block():
    g = torch.Generator().manual_seed(0)
    n, r, alpha = 9, 3, 2.5
    a, left, right = torch.rand(n, generator=g), torch.randn(n, r, generator=g), torch.randn(n, r, generator=g)
    dense = torch.diag(a) + (alpha / r) * left @ right.T
    s = SimilarityTargets(a, left, right, alpha)
    idx = torch.tensor([7, 2, 4, 0])
    assert torch.allclose(s.block(idx), dense[idx][:, idx], atol=1e-6)
    assert torch.allclose(SimilarityTargets(dense=dense).block(idx), dense[idx][:, idx])
    assert s.numel() == n + 2 * n * r
    with pytest.raises(ValueError, match="either low-rank"):
        SimilarityTargets(a, left, right, dense=dense)
    with pytest.raises(ValueError, match="disagree"):
        SimilarityTargets(a, left[:5], right)


def synthetic_set(protocol, n: int, targets: SimilarityTargets = None) -> Artifact:
    tr = protocol.train
    j = torch.arange(n) * 5  # the first caption of each of the first n images
    extras = {} if targets is None else targets.tensors()
    return Artifact("synthetic", image=tr.image[tr.caption_image[j]].clone(), text=tr.text[j].clone(), lr=0.3,
                    lr_text=0.2, extras=extras)


def test_storage_counts_every_learned_float(tiny_protocol):
    n, r = 10, 2
    s = SimilarityTargets(torch.ones(n), torch.zeros(n, r), torch.zeros(n, r), 1.0)
    art = synthetic_set(tiny_protocol, n, s)
    d = tiny_protocol.train.image.shape[1] + tiny_protocol.train.text.shape[1]
    # pairs, two step sizes, a + L + R (the scale alpha is a fixed setting, not learned)
    assert art.storage_bytes(tiny_protocol) == 4 * (n * d + 2 + n + 2 * n * r)
    assert synthetic_set(tiny_protocol, n).storage_bytes(tiny_protocol) == 4 * (n * d + 2)


def test_the_loss_field_leaves_existing_ids_alone(tiny_protocol, cache):
    from bench.protocol import build_protocol
    base = tiny_protocol.cfg
    same = build_protocol(ProtocolConfig(**{**base.__dict__, "recipe": Recipe(epochs=4, batch_size=16, loss="infonce")}),
                          cache_dir=cache, log=None)
    other = build_protocol(ProtocolConfig(**{**base.__dict__, "recipe": Recipe(epochs=4, batch_size=16, loss="wbce")}),
                           cache_dir=cache, log=None)
    assert same.id == tiny_protocol.id != other.id
    with pytest.raises(BenchError, match="unknown loss 'nope'"):
        Recipe(loss="nope")


def test_identity_targets_under_wbce_train_as_no_targets_and_plain_drops_them(tiny_protocol):
    n = 20
    ident = SimilarityTargets(torch.ones(n), torch.randn(n, 2), torch.zeros(n, 2), 1.0)  # S = I exactly
    wbce = Recipe(epochs=3, batch_size=8, loss="wbce")

    def trained(pairs, recipe):
        student = build_student(StudentConfig(), tiny_protocol.train.image.shape[1], tiny_protocol.train.text.shape[1], 0)
        train_student(student, pairs, recipe, seed=0)
        return torch.cat([p.detach().flatten() for p in student.parameters()])

    with_ident = synthetic_set(tiny_protocol, n, ident)
    without = synthetic_set(tiny_protocol, n)
    assert torch.equal(trained(with_ident.pairs(tiny_protocol), wbce), trained(without.pairs(tiny_protocol), wbce))
    soft = SimilarityTargets(torch.full((n,), 0.8), torch.randn(n, 2), torch.randn(n, 2), 1.0)
    with_soft = synthetic_set(tiny_protocol, n, soft)
    assert not torch.equal(trained(with_soft.pairs(tiny_protocol), wbce), trained(without.pairs(tiny_protocol), wbce))
    assert with_soft.pairs(tiny_protocol, plain=True).targets is None
    # one step size per tower: the text head moves with lr_text, the image head with lr
    p = with_soft.pairs(tiny_protocol, plain=True)
    assert (p.lr, p.lr_text) == (0.3, 0.2)


PLUGIN = '''
from dataclasses import dataclass
import torch
from methods import Artifact, register_method
from bench.protocol.training import SimilarityTargets


@register_method("test_soft_targets", "test")
class SoftTargets:
    """real pairs with random soft targets and two step sizes (a test of native + plain scoring)"""
    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config):
        self.config = config

    def build(self, ctx, budget, seed):
        tr, g = ctx.protocol.train, torch.Generator().manual_seed(seed)
        j = torch.stack([torch.nonzero(tr.caption_image == i)[0, 0] for i in torch.randperm(tr.n_images, generator=g)[:budget]])
        s = SimilarityTargets(torch.full((budget,), 0.9), torch.randn(budget, 2, generator=g),
                              torch.randn(budget, 2, generator=g) * 0.3, 1.0)
        return Artifact("synthetic", image=tr.image[tr.caption_image[j]].clone(), text=tr.text[j].clone(),
                        lr=0.2, lr_text=0.1, extras=s.tensors())
'''


def test_a_set_with_targets_is_scored_natively_and_plainly(tmp_path, cache, capsys):
    plugin = tmp_path / "soft.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "runs"
    try:
        assert main(["run", "--plugin", str(plugin), "--methods", "test_soft_targets", "--ipc", "12", "--seeds", "1",
                     "--eval-seeds", "2", "--out", str(out), "--cache-dir", str(cache), *TINY]) == 0
    finally:
        plugins.reset()
    rec = json.loads(next((out / "cells").rglob("test_soft_targets/*.json")).read_text())
    assert rec["native"] == {"loss": "wbce"}
    assert len(rec["metrics_per_seed"]) == len(rec["plain"]["metrics_per_seed"]) == 2
    assert rec["metrics_mean"] != rec["plain"]["metrics_mean"]
    assert [m["lr"] for m in rec["plain"]["metrics_per_seed"]] == [m["lr"] for m in rec["metrics_per_seed"]]
    d = 1280 + 384
    assert rec["storage_bytes"] == 4 * (12 * d + 2 + 12 + 2 * 12 * 2)
    assert rec["info"]["learned_lr_text"] == 0.1
    # the artifact keeps its targets and step sizes, and `evaluate` scores it both ways again
    art, _ = Artifact.load(Path(rec["artifact"]))
    assert art.lr_text == 0.1 and art.targets is not None and len(art.targets) == 12
    capsys.readouterr()
    assert main(["evaluate", "--artifact", rec["artifact"], "--seeds", "2", "--cache-dir", str(cache)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["native"] == {"loss": "wbce"}
    # eval seeds 0 and 1 here, as in the cell: the same numbers
    assert summary["metrics_mean"] == pytest.approx(rec["metrics_mean"])
    assert summary["plain"]["metrics_mean"] == pytest.approx(rec["plain"]["metrics_mean"])
    # the report shows the native row with the plain one beside it
    assert main(["report", "--out", str(out)]) == 0
    md = next(p for p in (out / "report").glob("*.md") if p.name != "README.md" and "_fairness" not in p.name).read_text()
    native_row = next(line for line in md.splitlines() if line.startswith("| test_soft_targets |"))
    plain_row = next(line for line in md.splitlines() if line.startswith("| test_soft_targets (plain) |"))
    assert native_row != plain_row.replace(" (plain)", "")
    methods = [row["method"] for row in csv.DictReader(io.StringIO((out / "report" / "runs.csv").read_text()))]
    assert methods.count("test_soft_targets (plain)") == 2 and methods.count("test_soft_targets") == 2


def test_targets_that_do_not_fit_the_set_are_refused(tmp_path, tiny_protocol):
    art = synthetic_set(tiny_protocol, 6, SimilarityTargets(torch.ones(5), torch.zeros(5, 1), torch.zeros(5, 1)))
    art.save(tmp_path / "a.pt", {"protocol_config": {}})
    with pytest.raises(BenchError, match="cover 5 pairs, the set has 6"):
        Artifact.load(tmp_path / "a.pt")
    art.extras.pop("sim_right")
    art.save(tmp_path / "b.pt", {"protocol_config": {}})
    with pytest.raises(BenchError, match="incomplete"):
        Artifact.load(tmp_path / "b.pt")

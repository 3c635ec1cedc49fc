"""The fairness views: gain over random under the same treatment (hand-made cells, hand computation),
the best-of-test diagnostic (a scripted curve: max - last), transfer scores (a real tiny run), budgets
by bytes (floor(bytes / bytes per pair) pairs), published rows kept out of every ratio, the score
curve changing no number, result folders per config, and done cells augmented from their artifacts."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.cli import main
from bench.protocol.training import PairSet
from bench.results import cell_path
from bench.runner import Cell, RunConfig, config_label, config_variant, treatment_of, view_cells
from methods import METHODS
from methods.base import method_config, pair_bytes
from reports.fairness import (bytes_table, gain_table, inflation_table, matched_pairs, published_beside,
                              transfer_table)
from reports.frame import RECALL_METRICS, runs_frame

PID = "aaaabbbbcccc"
PROTOCOL = {"dataset": "flickr8k", "test_split": "val", "cut": "heads", "recipe": {"lr_policy": "learned"}}
TINY = ["--limit", "80,30", "--set", "recipe.epochs=6", "--set", "recipe.batch_size=16"]


def run_metrics(seed: int, mean: float, curve: list[float] | None = None) -> dict:
    m = {k: mean for k in RECALL_METRICS} | {"seed": seed, "mean": mean}
    if curve is not None:
        m["curve"] = [{"epoch": 5 * (i + 1), **{k: v for k in RECALL_METRICS}, "mean": v} for i, v in enumerate(curve)]
    return m


def cell(method: str, budget: int, seed: int, means: list[float], group: str = "distill", **extra) -> dict:
    """A cell record as the runner writes it, eval seeds seed, seed + 3, ..."""
    return {"status": "ok", "key": f"{method}-{budget}-{seed}-{extra.get('view', '')}", "protocol_id": PID,
            "protocol": PROTOCOL, "dataset": "flickr8k", "method": method, "method_group": group, "budget": budget,
            "selection_seed": seed, "n_pairs": budget, "pair_bytes": 4 * 10, "storage_bytes": 4 * 10 * budget,
            "metrics_per_seed": [run_metrics(seed + 3 * j, m) for j, m in enumerate(means)], **extra}


def test_gain_over_random_equals_the_hand_computation():
    cells = [
        # tm learned a step size: compared with random under it (view "treated"), never with plain random
        cell("tm", 100, 0, [30.0, 32.0], learned_lr=0.5),
        cell("tm", 100, 1, [31.0, 29.0], learned_lr=0.6),
        cell("random", 100, 0, [20.0, 21.0], "coreset", view="treated", treatment={"of": "tm"}),
        cell("random", 100, 1, [22.0, 19.0], "coreset", view="treated", treatment={"of": "tm"}),
        cell("random", 100, 0, [10.0, 10.0], "coreset"),
        cell("random", 100, 1, [12.0, 14.0], "coreset"),
        # mdm has no treatment: plain random of the same seeds
        cell("mdm", 100, 0, [25.0, 26.0]),
        cell("mdm", 100, 1, [27.0, 24.0]),
        # a treated method whose treated random cells are missing: no number rather than a plain comparison
        cell("lors", 100, 0, [40.0], native={"loss": "wbce"}),
    ]
    g = gain_table(runs_frame(cells)).set_index(["method", "budget"])
    diffs = [30 - 20, 32 - 21, 31 - 22, 29 - 19]  # paired by (selection seed, eval seed)
    mu = sum(diffs) / 4
    sd = math.sqrt(sum((d - mu) ** 2 for d in diffs) / 3)
    tm = g.loc[("tm", 100)]
    assert tm["treatment"] == "own" and tm["n"] == 4
    assert tm["gain"] == pytest.approx(mu) and tm["gain_std"] == pytest.approx(sd)
    assert tm["random"] == pytest.approx((20 + 21 + 22 + 19) / 4)
    mdm = g.loc[("mdm", 100)]
    diffs = [25 - 10, 26 - 10, 27 - 12, 24 - 14]
    assert mdm["treatment"] == "plain" and mdm["gain"] == pytest.approx(sum(diffs) / 4)
    assert math.isnan(g.loc[("lors", 100)]["gain"]) and g.loc[("lors", 100)]["n"] == 0


def test_best_of_test_inflation_is_max_minus_last():
    cells = [cell("tm", 100, 0, [30.0], curve=None) | {"metrics_per_seed": [run_metrics(0, 30.0, [10.0, 34.0, 31.0, 30.0])]},
             cell("tm", 100, 1, [30.0]) | {"metrics_per_seed": [run_metrics(1, 28.0, [27.0, 26.0, 25.0, 28.0])]},
             cell("mdm", 100, 0, [20.0])]  # no curve: not in the view
    t = inflation_table(runs_frame(cells)).set_index(["method", "budget"])
    row = t.loc[("tm", 100)]
    assert row["inflation"] == pytest.approx(((34 - 30) + (28 - 28)) / 2)
    assert row["best"] == pytest.approx((34 + 28) / 2) and row["last"] == pytest.approx(29.0)
    assert ("mdm", 100) not in t.index


def test_bytes_matched_coresets_have_floor_bytes_over_pair_bytes_pairs(tiny_protocol):
    bpp = pair_bytes(tiny_protocol)
    assert bpp == 4 * (tiny_protocol.train.image.shape[1] + tiny_protocol.train.text.shape[1])
    assert matched_pairs(10 * bpp + bpp - 1, bpp) == 10 and matched_pairs(10 * bpp + bpp, bpp) == 11
    lors = METHODS.get("lors")
    cells = [Cell("lors", 10, s, [s], method_config(lors, {})) for s in (0, 1)]
    recs = [{"status": "ok", "method": "lors", "key": f"k{s}", "set_key": f"set{s}", "variant": "", "variant_label": "",
             "learned_lr": 0.5, "info": {"learned_lr_text": 0.4}, "native": {"loss": "wbce"},
             "storage_bytes": 10 * bpp + extra} for s, extra in ((0, 3 * bpp + 17), (1, 8))]
    planned = view_cells(cells, recs, tiny_protocol, RunConfig())
    bytes_cells = sorted((c.method, c.budget, c.selection_seed) for c in planned if c.view == "bytes")
    assert bytes_cells == [("herding", 10, 1), ("herding", 13, 0), ("random", 10, 1), ("random", 13, 0)]
    # one shard's sets: a coreset cell that another shard of the same plan runs is not planned again
    other_shard = [Cell("random", 10, 1, [1], method_config(METHODS.get("random"), {}))]
    again = view_cells(cells, recs, tiny_protocol, RunConfig(), planned=cells + other_shard)
    assert sorted((c.method, c.budget, c.selection_seed) for c in again if c.view == "bytes") == \
        [("herding", 10, 1), ("herding", 13, 0), ("random", 13, 0)]
    treated = [c for c in planned if c.view == "treated"]
    assert [(c.method, c.budget, c.selection_seed) for c in treated] == [("random", 10, 0), ("random", 10, 1)]
    # the source is named by its set key (unchanged when it gains eval seeds); a record from before set keys by its key
    assert treated[0].treatment | {} == {"of": "lors", "variant": "", "of_label": "", "source_key": "set0", "lr": 0.5,
                                         "lr_text": 0.4, "recipe": {"loss": "wbce"}}
    assert treatment_of({k: v for k, v in recs[0].items() if k != "set_key"}, "learned")["source_key"] == "k0"
    assert treated[0].variant == "@lors"
    # under a fixed step size only the loss is a treatment; without either there is none
    assert treatment_of(recs[0], "fixed")["lr"] is None
    assert treatment_of({"method": "mdm", "key": "k", "learned_lr": None, "info": {}}, "learned") is None
    # the bytes table reads the coresets back at that many pairs
    rows = [cell("lors", 10, 0, [40.0], storage_bytes=4 * 10 * 13 + 5, pair_bytes=40),
            cell("random", 13, 0, [11.0], "coreset", view="bytes"), cell("herding", 13, 0, [12.0], "coreset", view="bytes"),
            cell("random", 10, 0, [9.0], "coreset")]
    b = bytes_table(runs_frame(rows)).iloc[0]
    assert (b["method"], b["pairs"], b["random"], b["herding"]) == ("lors", 13, 11.0, 12.0)


def test_published_rows_are_beside_ours_only_and_never_in_a_ratio():
    ours = [cell("tm", 100, 0, [30.0], learned_lr=0.5),
            cell("random", 100, 0, [20.0], "coreset", view="treated", treatment={"of": "tm"}),
            cell("random", 100, 0, [10.0], "coreset")]
    flickr30k = [dict(c, dataset="flickr30k") for c in ours]
    runs8k, runs30k = runs_frame(ours), runs_frame(flickr30k)
    assert published_beside(runs8k).empty
    beside = published_beside(runs30k).set_index(["method", "budget"])
    assert beside.loc[("tm", 100), "published"] == 20.4 and beside.loc[("tm", 100), "ours"] == 30.0
    assert beside.loc[("random", 100), "ours"] == 10.0  # the grid's own random row, not the treated one
    # the other views are the same whether or not published numbers exist for the dataset
    for view in (gain_table, inflation_table, transfer_table, bytes_table):
        pd.testing.assert_frame_equal(view(runs8k), view(runs30k))


def test_the_score_curve_changes_no_number_and_ends_at_the_final_score(tiny_protocol):
    tr = tiny_protocol.train
    pairs = PairSet.aligned(tr.image[tr.caption_image[:20]], tr.text[:20])
    recipe = {"epochs": 11, "batch_size": 8}
    plain = tiny_protocol.evaluate(pairs, [0, 1], recipe=recipe)
    curved = tiny_protocol.evaluate(pairs, [0, 1], recipe=recipe, curve_every=5)
    for a, b in zip(plain, curved):
        assert {k: a[k] for k in RECALL_METRICS} == {k: b[k] for k in RECALL_METRICS}
        assert [p["epoch"] for p in b["curve"]] == [5, 10, 11]
        assert {k: b["curve"][-1][k] for k in RECALL_METRICS} == {k: b[k] for k in RECALL_METRICS}
    # an mlp student (dropout): scoring mid-training restores train mode, so dropout stays on
    mlp = dataclasses.replace(tiny_protocol.cfg.student, head="mlp")
    a = tiny_protocol.evaluate(pairs, [0], recipe=recipe, student=mlp)[0]
    b = tiny_protocol.evaluate(pairs, [0], recipe=recipe, student=mlp, curve_every=5)[0]
    assert {k: a[k] for k in RECALL_METRICS} == {k: b[k] for k in RECALL_METRICS}
    assert a["mean"] != plain[0]["mean"]  # the transfer student is another student


def test_configs_get_their_own_result_folders():
    tm = METHODS.get("tm")
    default, tuned = method_config(tm, {}), method_config(tm, {"iterations": "100"})
    assert config_variant(default) == "" and config_label(default) == ""
    assert config_variant(tuned).startswith("~") and config_label(tuned) == "iterations=100"
    paths = {cell_path(Path("runs"), PID, "tm", 100, 0, config_variant(c)) for c in (default, tuned)}
    assert Path(f"runs/cells/{PID}/tm/100_s0.json") in paths and len(paths) == 2


def test_a_tiny_grid_has_treated_random_transfer_scores_and_augments_done_cells(tmp_path, cache, capsys):
    out = tmp_path / "runs"
    args = ["run", "--methods", "test_lors", "--ipc", "6", "--seeds", "2", "--out", str(out), "--cache-dir",
            str(cache), "--set", "test_lors.iterations=4", *TINY]
    assert main(args + ["--transfer", "none"]) == 0
    cells = {p.relative_to(out / "cells").as_posix(): json.loads(p.read_text()) for p in (out / "cells").rglob("*.json")}
    pid = next(iter(cells)).split("/")[0]
    names = {k.split("/", 1)[1] for k in cells}
    tuned = [n for n in names if n.startswith("test_lors~")]
    assert len(tuned) == 2 and {"random/6_s0.json", "random@test_lors~" + tuned[0].split("~")[1].split("/")[0] + "/6_s0.json"} <= names
    lors = cells[f"{pid}/{sorted(tuned)[0]}"]
    treated = next(v for k, v in cells.items() if "/random@" in k and v["selection_seed"] == lors["selection_seed"])
    plain = cells[f"{pid}/random/6_s{lors['selection_seed']}.json"]
    assert treated["treatment"]["lr"] == lors["learned_lr"] and treated["treatment"]["recipe"] == {"loss": "wbce"}
    assert treated["view"] == "treated" and treated["metrics_mean"] != plain["metrics_mean"]
    assert "transfer" not in lors and [p["epoch"] for p in lors["metrics_per_seed"][0]["curve"]] == [5, 6]
    # a rerun asking for transfer scores adds them to the done cells from their artifacts; nothing else moves
    before = {k: v["metrics_per_seed"] for k, v in cells.items()}
    assert main(args) == 0
    again = {p.relative_to(out / "cells").as_posix(): json.loads(p.read_text()) for p in (out / "cells").rglob("*.json")}
    assert {k: v["metrics_per_seed"] for k, v in again.items()} == before
    lors2 = again[f"{pid}/{sorted(tuned)[0]}"]
    assert lors2["transfer"]["student"]["head"] == "mlp" and lors2["transfer"]["metrics_mean"] != lors2["metrics_mean"]
    assert main(["report", "--out", str(out)]) == 0
    fair = next((out / "report").glob("*_fairness.md")).read_text()
    assert "| test_lors [iterations=4] | 6 | own | 2 |" in fair
    md = next(p for p in (out / "report").glob("synthetic_*.md") if "_fairness" not in p.name).read_text()
    assert md.count("| Random |") == 1  # the treated random cells are not a row of the main table
    # a second eval seed: every stored set, the treated random ones too, is scored under it, none rebuilt
    capsys.readouterr()
    assert main(args + ["--eval-seeds", "2"]) == 0
    log = capsys.readouterr().out
    assert "run   " not in log and log.count("scoring the stored set of") == len(cells)
    third = {p.relative_to(out / "cells").as_posix(): json.loads(p.read_text()) for p in (out / "cells").rglob("*.json")}
    assert set(third) == set(cells)
    assert all(len(v["eval_seeds"]) == 2 * len(cells[k]["eval_seeds"]) for k, v in third.items())

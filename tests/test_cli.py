"""End to end through `main(argv)`: runs, resume, determinism, failures, bad input, reports."""
import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.progress import duration
from methods.base import Artifact, register_method, METHODS

TINY = ["--limit", "80,30", "--set", "recipe.epochs=4", "--set", "recipe.batch_size=16"]


def run(out, cache, *extra):
    return main(["run", "--out", str(out), "--cache-dir", str(cache), *TINY, *extra])


def cells(out):
    return sorted(Path(out, "cells").rglob("*.json"))


def test_run_writes_one_file_per_cell_and_resumes(tmp_path, cache, capsys):
    out = tmp_path / "runs"
    assert run(out, cache, "--methods", "random", "--ipc", "10,20", "--seeds", "2") == 0
    files = cells(out)
    assert len(files) == 2 + 2 * 2  # two full-data references + 2 budgets x 2 seeds
    rec = json.loads(next(f for f in files if f.name == "10_s1.json").read_text())
    assert rec["status"] == "ok" and rec["method"] == "random" and rec["budget"] == 10
    assert rec["selection_seed"] == 1 and rec["eval_seeds"] == [1]
    assert set(rec["metrics_per_seed"][0]) >= {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "mean"}
    assert rec["storage_bytes"] == 10 * (1280 + 384) * 4
    m = rec["manifest"]
    assert {"git_commit", "git_dirty", "packages", "device", "argv"} <= set(m) and "torch" in m["packages"]
    full = json.loads((files[0].parent.parent / "full" / "full_s0.json").read_text())
    assert full["eval_seeds"] == [0, 1] and full["n_pairs"] == 400  # 80 images x 5 captions
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    capsys.readouterr()
    assert run(out, cache, "--methods", "random", "--ipc", "10,20", "--seeds", "2") == 0
    assert "skip" in capsys.readouterr().out
    assert {f: f.stat().st_mtime_ns for f in cells(out)} == mtimes  # nothing redone
    assert run(out, cache, "--methods", "random", "--ipc", "10", "--seeds", "1", "--force") == 0
    assert next(f for f in cells(out) if f.name == "10_s0.json").stat().st_mtime_ns != mtimes[
        next(f for f in files if f.name == "10_s0.json")]


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path, cache):
    for d in ("a", "b"):
        assert run(tmp_path / d, cache, "--methods", "random", "--ipc", "20", "--seeds", "2") == 0
    get = lambda d, s: json.loads(next(f for f in cells(tmp_path / d) if f.name == f"20_s{s}.json").read_text())
    assert get("a", 0)["metrics_per_seed"][0]["mean"] == get("b", 0)["metrics_per_seed"][0]["mean"]
    a0 = Artifact.load(Path(get("a", 0)["artifact"]))[0].indices
    a1 = Artifact.load(Path(get("a", 1)["artifact"]))[0].indices
    assert set(a0) != set(a1)


def test_full_tuned_row_trains_the_full_data_with_its_own_recipe(tmp_path, cache, tiny_protocol):
    import dataclasses

    from bench.protocol.training import train_student

    out = tmp_path / "runs"
    assert run(out, cache, "--methods", "random", "--ipc", "10", "--seeds", "2", "--set", "full_tuned.epochs=2") == 0
    recs = {json.loads(f.read_text())["method"]: json.loads(f.read_text()) for f in cells(out)}
    tuned, full = recs["full_tuned"], recs["full"]
    assert tuned["budget"] is None and tuned["eval_seeds"] == full["eval_seeds"] == [0, 1]
    assert tuned["info"]["recipe"] == {"lr": 0.01, "epochs": 2, "lr_policy": "fixed"}
    # independent reference: train on all pairs by hand with the protocol's recipe, those fields replaced
    own = dataclasses.replace(tiny_protocol.cfg.recipe, epochs=2, lr=0.01, lr_policy="fixed")
    for seed, m in zip([0, 1], tuned["metrics_per_seed"]):
        student = tiny_protocol.fresh_student(seed)
        train_student(student, tiny_protocol.train.all_pairs(), own, seed)
        scores = tiny_protocol.score(student)
        assert scores == {k: m[k] for k in scores}
    assert tuned["metrics_mean"] != full["metrics_mean"]  # a different recipe, a different row


def test_failing_cell_is_recorded_and_grid_goes_on(tmp_path, cache, capsys):
    if "test_broken" not in METHODS:
        @register_method("test_broken", "test")
        class Broken:
            from dataclasses import dataclass

            @dataclass(frozen=True)
            class Config:
                pass

            def __init__(self, config):
                pass

            def build(self, ctx, budget, seed):
                raise RuntimeError("deliberate failure")
    out = tmp_path / "runs"
    assert run(out, cache, "--methods", "test_broken,random", "--ipc", "10", "--seeds", "1") == 1
    recs = {json.loads(f.read_text())["method"]: json.loads(f.read_text()) for f in cells(out)}
    assert recs["test_broken"]["status"] == "failed" and "deliberate failure" in recs["test_broken"]["error"]
    assert recs["random"]["status"] == "ok"
    capsys.readouterr()
    assert main(["status", "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "3 done, 0 missing, 1 failed of 4" in text and "deliberate failure" in text


@pytest.mark.parametrize("argv,match", [
    (["run", "--ipc", "100,abc"], "expected comma-separated integers"),
    (["run", "--methods", "nope"], "unknown method 'nope'; available:"),
    (["run", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["run", "--dataset", "flickr8k", "--data-root", "/no/such/dir"], "data root not found"),
    (["run", "--seeds", "0"], "positive integer"),
    (["run", "--set", "recipe.nope=1"], "recipe has no field 'nope'"),
    (["run", "--set", "random.k=1"], "method 'random' has no option 'k'"),
    (["list", "things"], "invalid choice"),
    (["evaluate", "--artifact", "/no/such.pt"], "artifact not found"),
])
def test_bad_usage_is_one_line_and_exit_2(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv", [["run", "--methods", "nope"], ["run", "--set", "random.k=1"],
                                  ["run", "--ipc", "1"], ["run", "--shard", "3/3"], ["experts", "--methods", "nope"],
                                  ["experts", "--set", "tm.nope=1"]])
def test_bad_run_fails_before_touching_data(argv, tmp_path, capsys):
    """A typo costs nothing: no dataset is read and no feature computed before the error."""
    assert main(argv + ["--cache-dir", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_budget_larger_than_train_split(tmp_path, cache, capsys):
    assert run(tmp_path / "r", cache, "--methods", "random", "--ipc", "10,500") == 2
    assert "budget 500 is larger than the train split (80 images" in capsys.readouterr().err


def test_bad_input_leaves_written_results_intact(tmp_path, cache, capsys):
    out = tmp_path / "runs"
    assert run(out, cache, "--methods", "random", "--ipc", "10", "--seeds", "1") == 0
    before = {f: f.read_bytes() for f in cells(out)}
    root = tmp_path / "data"
    root.mkdir()
    (root / "dataset_flickr8k.json").write_text('{"images": [')  # truncated
    assert main(["run", "--out", str(out), "--dataset", "flickr8k", "--data-root", str(root)]) == 2
    assert "malformed JSON" in capsys.readouterr().err
    (root / "captions.jsonl").write_text('{"image": "x.jpg", "captions": ["a b"], "split": "train"}\n'
                                         '{"image": "y.jpg", "captions": ["c d"], "split": "train"}\n'
                                         '{"image": "z.jpg", "captions": ["e f"], "split": "test"}\n')
    for n in "xyz":
        (root / f"{n}.jpg").write_bytes(b"not an image")
    assert main(["run", "--out", str(out), "--cache-dir", str(tmp_path / "c2"), "--dataset", "folder",
                 "--data-root", str(root), "--ipc", "2"]) == 2
    assert "cannot decode image" in capsys.readouterr().err
    assert {f: f.read_bytes() for f in cells(out)} == before


def test_report_and_evaluate_artifact(tmp_path, cache, capsys):
    out = tmp_path / "runs"
    assert run(out, cache, "--methods", "random", "--ipc", "10,20", "--seeds", "2") == 0
    capsys.readouterr()
    assert main(["report", "--out", str(out)]) == 0
    rep = out / "report"
    assert {p.suffix for p in rep.iterdir()} >= {".md", ".tex", ".csv", ".png", ".pdf"}
    md = next(rep.glob("synthetic_*.md")).read_text()
    assert "random" in md.lower() and "full data" in md.lower()
    rec = json.loads(next(f for f in cells(out) if f.name == "20_s0.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", "--artifact", rec["artifact"], "--seeds", "1", "--cache-dir", str(cache)]) == 0
    res = json.loads(capsys.readouterr().out)
    # same set, same eval seed 0, same protocol -> the same numbers as the cell
    assert res["protocol_id"] == rec["protocol_id"]
    assert res["metrics_per_seed"][0]["mean"] == pytest.approx(rec["metrics_per_seed"][0]["mean"])


def test_an_artifact_from_before_the_batching_field_is_re_evaluated_on_ragged_batches(tmp_path, cache, capsys):
    """Artifacts written before ``recipe.batching`` existed were scored with ragged batches; re-evaluating
    one must reproduce its protocol (id and numbers), not silently switch to even batches."""
    out = tmp_path / "runs"
    # 20 pairs at batch 16: ragged 16 + 4, even 10 + 10
    assert run(out, cache, "--methods", "random", "--ipc", "20", "--seeds", "1", "--set", "recipe.batching=ragged") == 0
    rec = json.loads(next(f for f in cells(out) if f.name == "20_s0.json").read_text())
    side = Path(rec["artifact"]).with_suffix(".json")
    meta = json.loads(side.read_text())
    assert meta["protocol_config"]["recipe"].pop("batching") == "ragged"
    side.write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["evaluate", "--artifact", rec["artifact"], "--seeds", "1", "--cache-dir", str(cache)]) == 0
    out_ = capsys.readouterr()
    res = json.loads(out_.out)
    assert res["protocol_id"] == rec["protocol_id"] and "differs" not in out_.err
    assert res["metrics_per_seed"][0]["mean"] == pytest.approx(rec["metrics_per_seed"][0]["mean"])
    even = run(tmp_path / "even", cache, "--methods", "random", "--ipc", "20", "--seeds", "1")
    rec_even = json.loads(next(f for f in cells(tmp_path / "even") if f.name == "20_s0.json").read_text())
    assert even == 0 and rec_even["protocol_id"] != rec["protocol_id"]
    assert rec_even["metrics_per_seed"][0]["mean"] != rec["metrics_per_seed"][0]["mean"]


def test_list_commands(capsys):
    assert main(["list", "methods"]) == 0
    assert "random" in capsys.readouterr().out
    assert main(["list", "datasets"]) == 0
    assert "synthetic" in capsys.readouterr().out
    assert main(["list", "encoders"]) == 0
    assert "effnet_lite0" in capsys.readouterr().out


def test_more_eval_seeds_extend_a_stored_cell_and_fewer_never_replace_it(tmp_path, cache, capsys):
    """A cell asked for under more eval seeds than it holds scores its stored set under the missing
    ones (the set is not rebuilt); one asked for under fewer is skipped. Reference: a fresh folder
    run under all the seeds at once gives the same numbers."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(a, cache, "--methods", "random", "--ipc", "10", "--seeds", "1") == 0
    art = next((a / "artifacts").rglob("random/10_s0.pt"))
    art_mtime = art.stat().st_mtime_ns
    eval_s = {r["method"]: r["timings"]["eval_s"] for r in map(lambda f: json.loads(f.read_text()), cells(a))}
    capsys.readouterr()
    # the plan counts them as cells to extend, at their stored evaluation time per eval seed
    assert run(a, cache, "--methods", "random", "--ipc", "10", "--seeds", "1", "--eval-seeds", "3", "--dry-run") == 0
    plan = capsys.readouterr().out.splitlines()
    assert [line.split()[2:5] for line in plan if line.startswith("random ")] == [["0", "1", "0"]]
    est = duration(sum(2 * s for s in eval_s.values()))
    assert plan[-1].startswith(f"total: 0 cells to run and 3 to score under more eval seeds, estimated {est} ")
    assert run(a, cache, "--methods", "random", "--ipc", "10", "--seeds", "1", "--eval-seeds", "3") == 0
    log = capsys.readouterr().out
    assert "scoring the stored set of random @ 10 (seed 0) under eval seed(s) 1, 2 too" in log
    assert "run   random" not in log and art.stat().st_mtime_ns == art_mtime  # the set was not rebuilt
    assert run(b, cache, "--methods", "random", "--ipc", "10", "--seeds", "1", "--eval-seeds", "3") == 0

    def recs(out):
        return {(r["method"], r["budget"]): r for r in map(lambda f: json.loads(f.read_text()), cells(out))}

    got, ref = recs(a), recs(b)
    assert set(got) == set(ref) == {("random", 10), ("full", None), ("full_tuned", None)}
    drop = lambda ms: [{k: v for k, v in m.items() if k != "train_s"} for m in ms]  # noqa: E731
    for k, r in ref.items():
        g = got[k]
        assert g["eval_seeds"] == r["eval_seeds"] == [0, 1, 2] and g["key"] == r["key"]
        assert drop(g["metrics_per_seed"]) == drop(r["metrics_per_seed"]) and g["metrics_mean"] == r["metrics_mean"]
    assert drop(got["random", 10]["transfer"]["metrics_per_seed"]) == drop(ref["random", 10]["transfer"]["metrics_per_seed"])
    for k, g in got.items():  # the evaluation time counts the seeds scored later
        t = g["timings"]
        assert t["eval_s"] == pytest.approx(eval_s[k[0]] + t["extend_s"], abs=0.011) and t["extend_s"] > 0
    # fewer eval seeds: every cell is skipped and nothing is rewritten
    mtimes = {f: f.stat().st_mtime_ns for f in cells(a)}
    capsys.readouterr()
    assert run(a, cache, "--methods", "random", "--ipc", "10", "--seeds", "1") == 0
    assert capsys.readouterr().out.count("skip") == 3 and {f: f.stat().st_mtime_ns for f in cells(a)} == mtimes
    assert recs(a)["full", None]["eval_seeds"] == [0, 1, 2]
    assert main(["status", "--out", str(a)]) == 0
    assert "3 done, 0 missing, 0 failed of 3" in capsys.readouterr().out


def test_covers_needs_an_ok_record_of_the_same_set_with_every_eval_seed_asked_for():
    from bench.results import covers

    rec = {"status": "ok", "key": "k012", "set_key": "s", "eval_seeds": [0, 1, 2]}
    assert covers(rec, "k012") and covers(rec, "k0", "s", [0]) and covers(rec, "k20", "s", [2, 0])
    assert not covers(rec, "k03", "s", [0, 3])  # a seed it lacks
    assert not covers(rec, "k0", "other set", [0])
    assert not covers(dict(rec, status="failed"), "k012", "s", [0, 1, 2])
    old = {"status": "ok", "key": "k012", "eval_seeds": [0, 1, 2]}  # a record from before set keys
    assert covers(old, "k012") and not covers(old, "k0", None, [0]) and not covers(old, "k0", "s", [0])
    assert not covers(None, "k012")

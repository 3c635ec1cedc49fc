"""Executors and shards: a Ray run equals a local run, a dead worker loses only its cell, shards
partition the grid, and shared caches are prepared once by the driver.

Ray tests need the optional extra (requirements-ray.txt; CI installs it through
requirements-dev.txt) and skip without it; they share one local Ray instance (2 CPUs) per module.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.cli import main
from bench.errors import BenchError
from methods.base import Artifact

TINY = ["--limit", "80,30", "--set", "recipe.epochs=3", "--set", "recipe.batch_size=16"]
GRID = ["--methods", "random,herding,test_tm", "--ipc", "5,10", "--seeds", "2"]
# two full-data references + 3 methods x 2 budgets x 2 seeds + random under test_tm's step size (fairness views)
N_GRID = 2 + 3 * 2 * 2 + 2 * 2
# the keys of a cell file, in order, as the local runner writes them
BASE_KEYS = ["schema_version", "key", "set_key", "protocol_id", "protocol", "dataset", "method", "method_group", "method_config",
             "budget", "selection_seed", "eval_seeds", "variant", "variant_label", "pair_bytes", "manifest"]
OK_KEYS = BASE_KEYS + ["status", "n_pairs", "storage_bytes", "learned_lr", "metrics_per_seed", "metrics_mean",
                       "artifact", "info", "timings", "transfer", "curve_every"]
FAILED_KEYS = BASE_KEYS + ["status", "error", "traceback", "timings"]


def ok_keys(rec) -> list[str]:
    """OK_KEYS as a cell of this kind has them: a treated cell names its treatment, a reference row
    (not a set) has no transfer score."""
    keys = OK_KEYS if "treatment" not in rec else BASE_KEYS + ["treatment", "view"] + OK_KEYS[len(BASE_KEYS):]
    return [k for k in keys if not (k == "transfer" and rec["budget"] is None)]


def run(out, cache, *extra):
    return main(["run", "--out", str(out), "--cache-dir", str(cache), *TINY, *extra])


def records(out) -> dict:
    """``{(method, budget, seed): record}`` of every cell file under ``out`` (``random@<method>`` for
    random pairs under another set's treatment)."""
    recs = {}
    for f in Path(out, "cells").rglob("*.json"):
        r = json.loads(f.read_text())
        treated = f"@{r['treatment']['of']}" if r.get("treatment") else ""
        recs[(r["method"] + treated, r["budget"], r["selection_seed"])] = r
    return recs


def mtimes(out) -> dict:
    return {f: f.stat().st_mtime_ns for f in Path(out, "cells").rglob("*.json")}


def scores(rec) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "train_s"} for m in rec["metrics_per_seed"]]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


# -------------------------------------------------------------------------------------------- Ray
def test_ray_results_equal_local_results(tmp_path, cache, ray_cluster):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray tasks' thread count (1 CPU each): same float summation order
    try:
        assert run(tmp_path / "local", cache, *GRID) == 0
    finally:
        torch.set_num_threads(threads)
    assert run(tmp_path / "ray", cache, *GRID, "--executor", "ray") == 0
    local, remote = records(tmp_path / "local"), records(tmp_path / "ray")
    assert len(local) == N_GRID and set(remote) == set(local)
    for cell, a in local.items():
        b = remote[cell]
        assert list(a) == ok_keys(a) and list(b) == ok_keys(b), cell
        assert b["status"] == "ok" and b["key"] == a["key"], cell
        assert scores(b) == scores(a), cell  # every metric of every eval seed, exactly
        assert b["metrics_mean"] == a["metrics_mean"] and b["storage_bytes"] == a["storage_bytes"]
        if a["artifact"] is None:
            assert cell[0] in ("full", "full_tuned") and b["artifact"] is None
        else:
            assert b["artifact"] == a["artifact"].replace(str(tmp_path / "local"), str(tmp_path / "ray"))
            xa, xb = Artifact.load(Path(a["artifact"]))[0], Artifact.load(Path(b["artifact"]))[0]
            if xa.kind == "selected":
                assert np.array_equal(xa.indices, xb.indices), cell
            else:
                assert torch.equal(xa.image, xb.image) and torch.equal(xa.text, xb.text) and xa.lr == xb.lr, cell
    # the grid file is the same whichever executor ran it
    grid = lambda d: json.loads(next(Path(d, "grids").glob("*.json")).read_text())["cells"]
    assert grid(tmp_path / "ray") == grid(tmp_path / "local")


def test_dead_worker_loses_only_its_cell_and_a_rerun_redoes_it(tmp_path, cache, ray_cluster, capsys):
    out, marker = tmp_path / "runs", tmp_path / "crash"
    marker.write_text("10 1")  # test_crash @ 10, seed 1 ends its worker process mid-cell
    argv = ["--methods", "random,test_crash", "--ipc", "5,10", "--seeds", "2", "--set", f"test_crash.marker={marker}",
            "--executor", "ray"]
    assert run(out, cache, *argv) == 1
    recs = records(out)
    assert len(recs) == 2 + 2 * 2 * 2
    dead = recs.pop(("test_crash", 10, 1))
    assert dead["status"] == "failed" and "WorkerCrashedError" in dead["error"], dead["error"]
    assert list(dead) == FAILED_KEYS
    assert all(r["status"] == "ok" for r in recs.values())
    capsys.readouterr()
    assert main(["status", "--out", str(out)]) == 1
    assert "9 done, 0 missing, 1 failed of 10" in capsys.readouterr().out
    before = mtimes(out)
    marker.unlink()
    assert run(out, cache, *argv) == 0
    after = mtimes(out)
    redone = {f for f in after if after[f] != before[f]}
    # test_crash runs with an option set (its marker): its cells have their own folder, test_crash~<config hash>
    assert [f.relative_to(out / "cells").as_posix().split("/", 1)[1].split("~")[0] for f in redone] == ["test_crash"]
    assert [f.name for f in redone] == ["10_s1.json"]
    again = records(out)[("test_crash", 10, 1)]
    assert again["status"] == "ok" and again["key"] == dead["key"]
    capsys.readouterr()
    assert main(["status", "--out", str(out)]) == 0
    assert "10 done, 0 missing, 0 failed of 10" in capsys.readouterr().out


def test_a_shard_under_ray_runs_only_its_cells(tmp_path, cache, ray_cluster):
    out = tmp_path / "runs"
    assert run(out, cache, "--methods", "random", "--ipc", "5,10", "--seeds", "2", "--shard", "1/3", "--executor", "ray") == 0
    # plan order: full, full_tuned, random@5 s0, s1, random@10 s0, s1 -> positions 1 and 4
    assert set(records(out)) == {("full_tuned", None, 0), ("random", 10, 0)}


# ----------------------------------------------------------------------------------------- shards
def test_shards_cover_every_cell_exactly_once(tmp_path, cache, capsys):
    grid = ["--methods", "random,herding", "--ipc", "5,10", "--seeds", "2"]
    ran = []
    for i in range(3):
        capsys.readouterr()
        assert run(tmp_path / "sharded", cache, *grid, "--shard", f"{i}/3") == 0
        ran.append([line[6:] for line in capsys.readouterr().out.splitlines() if line.startswith("run   ")])
        if i == 0:  # every shard records the whole grid: status counts the other shards' cells as missing
            assert main(["status", "--out", str(tmp_path / "sharded")]) == 0
            assert "4 done, 6 missing, 0 failed of 10" in capsys.readouterr().out
    flat = [c for shard in ran for c in shard]
    assert len(flat) == len(set(flat)) == 10  # no cell in two shards
    capsys.readouterr()
    assert run(tmp_path / "whole", cache, *grid) == 0
    whole = [line[6:] for line in capsys.readouterr().out.splitlines() if line.startswith("run   ")]
    assert sorted(flat) == sorted(whole)
    a, b = records(tmp_path / "sharded"), records(tmp_path / "whole")
    assert set(a) == set(b) and all(scores(a[c]) == scores(b[c]) for c in a)
    assert main(["status", "--out", str(tmp_path / "sharded")]) == 0


def test_shard_cells_partitions_any_plan():
    from bench.runner import shard_cells

    cells = list(range(17))
    for n in (1, 2, 3, 5, 17, 20):
        parts = [shard_cells(cells, (i, n)) for i in range(n)]
        assert sorted(c for p in parts for c in p) == cells
        assert all(abs(len(p) - len(cells) / n) < 1 for p in parts)  # round robin: balanced
    with pytest.raises(BenchError):
        shard_cells(cells, (3, 3))


@pytest.mark.parametrize("bad", ["3/3", "-1/2", "1/0", "a/b", "1", "1/2/3", ""])
def test_bad_shard_is_one_line_exit_2(bad, tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path), f"--shard={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "I/N" in err and not any(tmp_path.iterdir())


def test_ray_options_without_ray_executor_and_missing_ray_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["run", "--out", str(tmp_path), "--ray-address", "auto"]) == 2
    assert "need --executor ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["run", "--out", str(tmp_path), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "requirements-ray.txt" in err and not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------- prepare
def test_prepare_builds_shared_caches_once_before_cells(tmp_path, cache, tiny_protocol):
    from bench.protocol import build_protocol
    from bench.runner import RunConfig, plan, prepare_methods
    from methods.tm.experts import ExpertBuffer
    from methods import METHODS

    fresh = tmp_path / "cache"
    shutil.copytree(cache / "features", fresh / "features")  # features only: no experts, no statistics
    protocol = build_protocol(tiny_protocol.cfg, fresh, log=None)
    run = RunConfig(protocol=tiny_protocol.cfg, methods="test_tm,forgetting,random", budgets=(5, 10), seeds=2,
                    cache_dir=fresh, method_options={"forgetting": {"epochs": "3"}})
    cells = plan(run, protocol.train.n_images)
    tm = METHODS.get("test_tm")(METHODS.get("test_tm").Config())
    buf = ExpertBuffer(protocol, tm.config.experts(), fresh)
    assert len(buf.missing()) == tm.config.n_experts
    logs = []
    assert prepare_methods(cells, protocol, run, logs.append) == {}
    assert buf.missing() == []
    assert sum(line.startswith("expert ") for line in logs) == tm.config.n_experts  # each expert trained once
    assert len(list((fresh / "forgetting").glob("*.npz"))) == 1
    # a hook that fails marks its method's cells, with the message the cell itself would give
    bad = RunConfig(protocol=tiny_protocol.cfg, methods="forgetting", budgets=(5,), seeds=1, cache_dir=fresh,
                    method_options={"forgetting": {"epochs": "1"}})
    failures = prepare_methods(plan(bad, protocol.train.n_images), protocol, bad, logs.append)
    assert [e for e, _ in failures.values()] == ["ValueError: forgetting needs at least 2 epochs to see an event, got 1"]


def test_worker_refuses_caches_it_cannot_see_and_a_different_protocol(tmp_path, cache, tiny_protocol):
    import os

    from bench.runner import cell_spec, cell_task
    from bench.runner import RunConfig, plan

    run = RunConfig(protocol=tiny_protocol.cfg, methods="random", budgets=(5,), seeds=1, out=tmp_path, cache_dir=cache)
    spec = cell_spec(plan(run, tiny_protocol.train.n_images)[2])
    with pytest.raises(RuntimeError, match="cache dir .* does not exist on node"):
        cell_task(spec, RunConfig(**{**run.__dict__, "cache_dir": tmp_path / "absent"}), tiny_protocol.id, os.getcwd(), 1)
    with pytest.raises(RuntimeError, match="differs from the driver's"):
        cell_task(spec, run, "0" * 12, os.getcwd(), 1)
    threads = torch.get_num_threads()
    try:
        result = cell_task(spec, run, tiny_protocol.id, os.getcwd(), 1)
    finally:
        torch.set_num_threads(threads)
    assert result.record["status"] == "ok" and result.artifact is not None
    assert not any(tmp_path.iterdir())  # a worker writes nothing; the driver stores the result

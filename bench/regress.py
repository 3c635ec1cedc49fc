"""``bench regress``: the benchmark guards itself on a small, fixed subset.

A regression configuration is a whole ``--methods all`` grid at two small budgets on a fixed subset:
Flickr8k (a few hundred train images, val as test) when ``../shared/data/flickr8k`` is there, the
embedded ``synthetic`` dataset otherwise. The distillation methods run with fewer iterations and
unrolled steps than their defaults (``options`` below, recorded in every cell) so that the grid takes
a few minutes on 2 CPU cores; everything else (protocol, recipe, seeds) is the real thing.

The check runs the grid from scratch (``force``: a code change that leaves cell keys unchanged must
still be re-measured) and compares it with the committed baseline ``bench/baselines/<name>.json``:

- a method's mean (over its runs: selection seeds, or eval seeds for the full-data row) at a budget
  must not fall below the baseline's by more than the method's tolerance: ``max(MIN_TOL, TOL_SDS x pooled seed-to-seed std)``, the std measured
  when the baseline was written (pooled over the method's budgets) and stored in it;
- orderings that must hold (the paper's): every distillation method above ``random`` at the largest
  budget of the grid (at the smallest, 10 pairs, ``random``'s own seeds differ by more than the gaps:
  2.9 vs 5.5 on flickr8k-small); ``tm`` above ``tm_image`` and ``tm_text`` at every budget;
- every cell of the grid ran (a failed or missing cell fails the check), under the baseline's protocol.

``python -m bench regress --update`` writes a new baseline for review (``git diff`` shows it).
The same seeds give the same numbers on one machine, so a clean tree reproduces its baseline exactly;
the tolerance absorbs numerical differences across machines and library versions.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from bench.errors import BenchError
from bench.results import atomic_write_json, cell_path, read_cell, read_grid

REPO = Path(__file__).resolve().parents[1]
BASELINES = Path(__file__).resolve().parent / "baselines"
SHARED_FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"
MIN_TOL = 0.5  # points of mean recall: the floor of every tolerance
TOL_SDS = 2.0  # tolerance = TOL_SDS x the pooled seed-to-seed std (when larger than MIN_TOL)
BASELINE_VERSION = 1

# Distillation at regression size: fewer iterations and unrolled steps (everything else as default).
_TM_SMALL = {"iterations": "120", "syn_steps": "10", "n_experts": "3"}
_LORS_SMALL = {"iterations": "240", "n_experts": "3"}  # its own 8 unrolled steps of 20 pairs: cheaper per iteration
_MDM_SMALL = {"iterations": "600", "n_experts": "3"}  # no unroll: a teacher forward per iteration
_COVMATCH_SMALL = {"iterations": "2000"}


@dataclass(frozen=True)
class RegressConfig:
    name: str
    dataset: str
    limit: tuple[int, int]  # (train images, eval images)
    budgets: tuple[int, ...] = (10, 50)
    seeds: int = 2
    test_split: str = "val"
    data_root: Optional[str] = None
    methods: str = "all"
    options: dict = field(default_factory=lambda: {**{m: dict(_TM_SMALL) for m in ("tm", "tm_image", "tm_text", "tm_lora")},
                                                   **{m: dict(_LORS_SMALL) for m in ("lors", "repblend")},
                                                   "mdm": dict(_MDM_SMALL), "covmatch": dict(_COVMATCH_SMALL)})

    def describe(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("data_root")  # where the data lives on this machine is not part of the configuration
        d["limit"], d["budgets"] = list(self.limit), list(self.budgets)
        return d


CONFIGS = {
    "flickr8k-small": RegressConfig("flickr8k-small", "flickr8k", limit=(500, 500), data_root=str(SHARED_FLICKR8K)),
    "synthetic-small": RegressConfig("synthetic-small", "synthetic", limit=(500, 500)),
}


def default_config_name() -> str:
    """Flickr8k when the shared data is beside the repository, the embedded dataset otherwise."""
    return "flickr8k-small" if (SHARED_FLICKR8K / "dataset_flickr8k.json").exists() else "synthetic-small"


def get_config(name: str) -> RegressConfig:
    if name == "auto":
        name = default_config_name()
    if name not in CONFIGS:
        raise BenchError(f"unknown regression configuration {name!r}; available: auto, {', '.join(CONFIGS)}")
    return CONFIGS[name]


def baseline_path(name: str) -> Path:
    return BASELINES / f"{name}.json"


# ---------------------------------------------------------------------------------------------- run
def run_grid(cfg: RegressConfig, out: Path, cache_dir: Optional[Path] = None, log: Callable = print) -> dict:
    """Run the configuration's grid from scratch; return ``{protocol_id, cells}`` summarised."""
    from bench.protocol import ProtocolConfig
    from bench.runner import RunConfig, execute

    pcfg = ProtocolConfig(dataset=cfg.dataset, data_root=cfg.data_root, test_split=cfg.test_split, limit=cfg.limit)
    run = RunConfig(protocol=pcfg, methods=cfg.methods, budgets=cfg.budgets, seeds=cfg.seeds, out=Path(out),
                    force=True, cache_dir=cache_dir, method_options=cfg.options, argv=["bench", "regress", cfg.name],
                    fairness=False)  # transfer scores cost an evaluation per cell; the views' extra cells, more
    protocol, recs = execute(run, log)
    return summarise(protocol.id, recs)


def summarise(protocol_id: str, recs: list[dict]) -> dict:
    """Cell records -> ``{method: {budget: [mean recall of each run]}}`` plus failures; a run is one
    (cell, eval seed): one per selection seed for a budgeted method, one per eval seed for ``full``."""
    results: dict[str, dict[str, list[float]]] = {}
    failed = []
    for r in recs:
        b = "full" if r["budget"] is None else str(r["budget"])
        if r.get("status") != "ok":
            failed.append(f"{r['method']} @ {b} seed {r['selection_seed']}: {r.get('error', 'failed')}")
            continue
        runs = results.setdefault(r["method"], {}).setdefault(b, [])
        runs.extend(round(float(m["mean"]), 4) for m in r["metrics_per_seed"])  # one run per eval seed
    return {"protocol_id": protocol_id, "results": results, "failed": failed}


def load_cells(out: Path, protocol_id: str, cfg: RegressConfig) -> list[dict]:
    """The cells of a finished regression run, read back from its results folder."""
    grid = read_grid(Path(out) / "grids" / f"{protocol_id}.json")
    if not grid:
        raise BenchError(f"no regression grid under {out} for protocol {protocol_id}")
    return [read_cell(cell_path(out, protocol_id, c["method"], c["budget"], c["selection_seed"], c.get("variant", "")))
            or {"method": c["method"], "budget": c["budget"], "selection_seed": c["selection_seed"], "status": "missing",
                "error": "missing"} for c in grid["cells"]]


# ---------------------------------------------------------------------------------------- baseline
def pooled_std(per_budget: dict[str, list[float]]) -> float:
    """Seed-to-seed std pooled over budgets: sqrt of the df-weighted mean of per-budget variances."""
    num = den = 0
    for vals in per_budget.values():
        if len(vals) > 1:
            num += np.var(vals, ddof=1) * (len(vals) - 1)
            den += len(vals) - 1
    return float(math.sqrt(num / den)) if den else 0.0


def make_baseline(cfg: RegressConfig, summary: dict, manifest: dict) -> dict:
    if summary["failed"]:
        raise BenchError("cannot write a baseline from a run with failed cells: " + "; ".join(summary["failed"]))
    methods = {}
    for name, per_budget in sorted(summary["results"].items()):
        sd = pooled_std(per_budget)
        methods[name] = {"tolerance": round(max(MIN_TOL, TOL_SDS * sd), 3), "seed_std": round(sd, 3),
                         "budgets": {b: {"mean": round(float(np.mean(v)), 3), "runs": v} for b, v in per_budget.items()}}
    return {"baseline_version": BASELINE_VERSION, "config": cfg.describe(), "protocol_id": summary["protocol_id"],
            "tolerance_rule": f"max({MIN_TOL}, {TOL_SDS} x pooled seed std)", "methods": methods, "manifest": manifest}


def write_baseline(path: Path, baseline: dict) -> None:
    atomic_write_json(Path(path), baseline)


def read_baseline(path: Path) -> dict:
    if not Path(path).exists():
        raise BenchError(f"no baseline at {path}; write one with `python -m bench regress --update`")
    try:
        b = json.loads(Path(path).read_text())
        b["methods"], b["protocol_id"]  # noqa: B018  (required fields)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise BenchError(f"baseline {path} is not a valid baseline file ({e}); rewrite it with --update")
    return b


# ------------------------------------------------------------------------------------------- check
@dataclass
class Finding:
    ok: bool
    text: str


def _mean(summary: dict, method: str, budget: str) -> Optional[float]:
    v = summary["results"].get(method, {}).get(budget)
    return float(np.mean(v)) if v else None


def check(summary: dict, baseline: dict, distill: list[str]) -> tuple[list[str], list[Finding]]:
    """Compare a run with a baseline. Returns the diff table's lines and the findings (failures
    and notable improvements); the check passes when every finding is ok."""
    findings: list[Finding] = []
    if summary["protocol_id"] != baseline["protocol_id"]:
        findings.append(Finding(False, f"protocol changed: {summary['protocol_id']} now, {baseline['protocol_id']} in the "
                                       f"baseline (data, encoders, student or recipe changed): review and update the baseline"))
    for f in summary["failed"]:
        findings.append(Finding(False, f"cell failed: {f}"))
    rows = [f"{'method':14s} {'budget':>6s} {'baseline':>9s} {'now':>7s} {'delta':>7s} {'tol':>5s}  status"]
    for name, b in baseline["methods"].items():
        tol = b["tolerance"]
        for budget, ref in b["budgets"].items():
            now = _mean(summary, name, budget)
            if now is None:
                findings.append(Finding(False, f"{name} @ {budget}: missing from this run"))
                rows.append(f"{name:14s} {budget:>6s} {ref['mean']:9.2f} {'-':>7s} {'-':>7s} {tol:5.2f}  MISSING")
                continue
            delta = now - ref["mean"]
            state = "ok"
            if delta < -tol:
                state = "REGRESSION"
                findings.append(Finding(False, f"{name} @ {budget}: {now:.2f} is {-delta:.2f} below the baseline "
                                               f"{ref['mean']:.2f} (tolerance {tol:.2f})"))
            elif delta > tol:
                state = "improved"
                findings.append(Finding(True, f"{name} @ {budget}: {now:.2f} is {delta:.2f} above the baseline "
                                              f"{ref['mean']:.2f}; update the baseline if this is intended"))
            rows.append(f"{name:14s} {budget:>6s} {ref['mean']:9.2f} {now:7.2f} {delta:+7.2f} {tol:5.2f}  {state}")
    for name in summary["results"]:
        if name not in baseline["methods"]:
            findings.append(Finding(True, f"{name}: new method, not in the baseline (update it to guard this method)"))
    findings.extend(check_orderings(summary, distill))
    return rows, findings


def check_orderings(summary: dict, distill: list[str]) -> list[Finding]:
    """The orderings that must hold: each distillation method above random at the largest budget;
    tm above tm_image and tm_text at every budget."""
    out = []
    budgets = sorted({int(b) for per in summary["results"].values() for b in per if b != "full"})
    if not budgets:
        return [Finding(False, "no budgeted cell in this run")]
    largest = str(budgets[-1])
    rnd = _mean(summary, "random", largest)
    for name in distill:
        m = _mean(summary, name, largest)
        if m is None or rnd is None:
            continue
        ok = m > rnd
        out.append(Finding(ok, f"ordering {name} > random @ {largest}: {m:.2f} vs {rnd:.2f}" + ("" if ok else "  BROKEN")))
    for b in map(str, budgets):
        tm = _mean(summary, "tm", b)
        for other in ("tm_image", "tm_text"):
            o = _mean(summary, other, b)
            if tm is None or o is None:
                continue
            ok = tm > o
            out.append(Finding(ok, f"ordering tm > {other} @ {b}: {tm:.2f} vs {o:.2f}" + ("" if ok else "  BROKEN")))
    return out


def report(rows: list[str], findings: list[Finding]) -> tuple[str, bool]:
    passed = all(f.ok for f in findings)
    lines = rows + [""] + [("  " if f.ok else "X ") + f.text for f in findings]
    lines.append("regression check: " + ("PASSED" if passed else "FAILED"))
    return "\n".join(lines), passed

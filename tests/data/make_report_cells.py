"""Writes the stored cells under ``tests/data/report_cells/cells/`` (``python tests/data/make_report_cells.py``).

The cells are the input of the report equality tests (tests/test_reports_frame.py), whose reference
outputs in ``tests/data/reports_expected/`` hold for exactly these cells: change both together, and
review the change of the reference outputs line by line.
Coverage: two protocols with results and one with failures only; reference rows ``full`` and
``full_tuned``; coreset, distill and an unknown group; budgets 50-500; several selection and eval
seeds; a failed cell (multi-line error), a not-applicable cell, a run without ``mean``, an unreadable
file and a duplicate key.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "report_cells"
RECALLS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")
GROUPS = {"full": "reference", "full_tuned": "reference", "random": "coreset", "herding": "coreset",
          "kcenter": "coreset", "tm": "distill", "dream": "distill", "craig": "selection"}
PROTOCOLS = {
    "a1b2c3d4e5f6": {"dataset": "flickr30k", "test_split": "test", "cut": "heads",
                     "image_encoder": "effnet_lite0", "text_encoder": "minilm_l6"},
    "0f0e0d0c0b0a": {"dataset": "coco", "test_split": "val", "cut": "full",
                     "image_encoder": "effnet_lite0", "text_encoder": "minilm_l6"},
    "ffffeeeedddd": {"dataset": "flickr8k", "test_split": "val", "cut": "pixels"},
}


def run_metrics(rng: random.Random, seed: int, scale: float, with_mean: bool = True) -> dict:
    base = (1.0, 4.0, 7.0, 0.5, 3.0, 6.0)
    m = {k: round(b * scale * (1 + 0.15 * rng.gauss(0, 1)), 3) for k, b in zip(RECALLS, base)}
    if with_mean:
        m["mean"] = sum(m.values()) / 6
    return {"seed": seed, "lr": 0.01, **m, "train_s": 1.5}


def cell(pid: str, method: str, budget: int | None, sel: int, runs: list[dict] | None = None, *,
         error: str | None = None, key: str | None = None) -> dict:
    proto = PROTOCOLS[pid]
    rec = {"schema_version": 1, "key": key or f"{pid}-{method}-{budget}-{sel}", "protocol_id": pid,
           "protocol": proto, "dataset": proto["dataset"], "method": method, "method_group": GROUPS[method],
           "method_config": {}, "budget": budget, "selection_seed": sel,
           "eval_seeds": [r["seed"] for r in runs] if runs else [0], "manifest": {"git_commit": "abc"}}
    if runs is not None:
        rec.update(status="ok", storage_bytes=1000 * (budget or 8000), metrics_per_seed=runs,
                   timings={"build_s": round(0.1 * (budget or 1), 2), "eval_s": 2.25})
    else:
        rec.update(status="failed", error=error, timings={"failed_after_s": 0.75})
    return rec


def main() -> None:
    rng = random.Random(1234)
    cells: dict[str, dict] = {}

    def add(c: dict, name: str | None = None) -> None:
        b, s = c["budget"], c["selection_seed"]
        cells[name or f"{c['protocol_id']}/{c['method']}/{b}_s{s}.json"] = c

    a, b, f = PROTOCOLS
    add(cell(a, "full", None, 0, [run_metrics(rng, e, 10.0) for e in range(3)]))
    add(cell(a, "full_tuned", None, 0, [run_metrics(rng, e, 12.0) for e in range(3)]))
    scales = {"random": 0.3, "herding": 0.25, "kcenter": 0.35, "tm": 1.1, "dream": 0.9, "craig": 0.28}
    for method, budgets in (("random", (100, 200, 500)), ("herding", (100, 200, 500)), ("kcenter", (100, 500)),
                            ("tm", (100, 200, 500)), ("dream", (200,)), ("craig", (100, 200))):
        for budget in budgets:
            for sel in (0, 1):
                if method == "random" and budget == 200 and sel == 1:
                    add(cell(a, method, budget, sel, error="RuntimeError: CUDA out of memory. Tried to allocate "
                             + "x" * 200 + "\nTraceback (most recent call last): ..."))
                    continue
                if method == "herding" and budget == 200:
                    add(cell(a, method, budget, sel, error="not applicable: herding needs features"))
                    continue
                if method in ("dream", "craig") and sel == 1:
                    continue
                n_eval = 1 if method == "craig" else 2
                scale = scales[method] * (budget / 100) ** 0.4
                add(cell(a, method, budget, sel, [run_metrics(rng, sel + 2 * e, scale, with_mean=method != "kcenter")
                                                  for e in range(n_eval)]))
    # protocol b: coco (published rows at 100 only), single runs, a method that only failed
    add(cell(b, "full", None, 0, [run_metrics(rng, 0, 9.0)]))
    for method in ("random", "tm"):
        for budget in (50, 100):
            add(cell(b, method, budget, 0, [run_metrics(rng, 0, scales[method] * (budget / 100) ** 0.4)]))
    add(cell(b, "kcenter", 50, 0, error="ValueError: empty selection"))
    # protocol f: failures only (left out of the report)
    add(cell(f, "random", 100, 0, error="RuntimeError: boom"))
    # a retry of an ok cell that failed later (same key): the ok cell is kept, with a warning
    add(cell(a, "tm", 100, 0, error="RuntimeError: retry failed", key=f"{a}-tm-100-0"), f"{a}/tm/zz_retry.json")

    if ROOT.exists():
        shutil.rmtree(ROOT)
    for name, c in cells.items():
        path = ROOT / "cells" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(c, indent=1) + "\n", encoding="utf-8")
    (ROOT / "cells" / "broken.json").write_text("{not json\n", encoding="utf-8")


if __name__ == "__main__":
    main()

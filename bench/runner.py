"""The runner: expand the grid (methods x budgets x selection seeds) and execute its cells.

Each cell: build the method's set from the train split, save it as an artifact, score it under its
eval seeds with the protocol, and write the cell's JSON at once (atomically). A finished cell with a
matching key is skipped unless ``force``; a cell that raises is recorded as failed with its error and
the grid goes on; an interrupt loses at most the cell in progress.

Seeds: ``seeds = N`` gives selection seeds 0..N-1; the cell with selection seed s is scored under
eval seeds ``s + N*j`` for j < ``eval_seeds`` (default 1). So the std over a method's runs includes
selection variance as well as training variance. The full-data reference has no selection: one cell
scored under eval seeds 0..N-1.
"""
from __future__ import annotations

import dataclasses
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from bench import SCHEMA_VERSION
from bench.errors import BenchError, NotApplicable
from bench.manifest import manifest
from bench.protocol import Protocol, ProtocolConfig, build_protocol
from bench.results import artifact_path, atomic_write_json, cell_key, cell_path, is_done, read_json
from methods import METHODS, MethodContext
from methods.base import method_config


@dataclass
class RunConfig:
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    methods: str = "all"
    budgets: tuple[int, ...] = (100, 200, 500, 1000)
    seeds: int = 3
    eval_seeds: int = 1
    out: Path = Path("runs")
    force: bool = False
    device: str = "cpu"
    cache_dir: Optional[Path] = None
    method_options: dict[str, dict[str, str]] = field(default_factory=dict)
    argv: Optional[list[str]] = None


@dataclass
class Cell:
    method: str
    budget: Optional[int]
    selection_seed: int
    eval_seeds: list[int]
    config: object  # the method's Config instance

    @property
    def label(self) -> str:
        return f"{self.method} @ {'full' if self.budget is None else self.budget} (seed {self.selection_seed})"


def plan(run: RunConfig, n_train_images: int) -> list[Cell]:
    names = METHODS.select(run.methods)
    for name in run.method_options:
        if name not in METHODS:
            METHODS.entry(name)  # raises: unknown method, listing what exists
    for b in run.budgets:
        if b < 2:
            raise BenchError(f"budget {b} is too small: a contrastive student needs at least 2 pairs")
        if b > n_train_images:
            raise BenchError(f"budget {b} is larger than the train split ({n_train_images} images; each pair needs its own image)")
    n = run.seeds
    cells = [Cell("full", None, 0, list(range(n * run.eval_seeds)), _config("full", run))]
    for name in names:
        if name == "full":
            continue
        cfg = _config(name, run)
        for b in run.budgets:
            for s in range(n):
                cells.append(Cell(name, b, s, [s + n * j for j in range(run.eval_seeds)], cfg))
    return cells


def _config(name: str, run: RunConfig):
    return method_config(METHODS.get(name), run.method_options.get(name, {}))


def run_cell(cell: Cell, protocol: Protocol, run: RunConfig, log: Callable = print) -> dict:
    cls = METHODS.get(cell.method)
    cfg_dict = dataclasses.asdict(cell.config)
    key = cell_key(protocol.id, cell.method, cfg_dict, cell.budget, cell.selection_seed, cell.eval_seeds)
    path = cell_path(run.out, protocol.id, cell.method, cell.budget, cell.selection_seed)
    if not run.force and is_done(path, key):
        log(f"skip  {cell.label}: done")
        return read_json(path)
    log(f"run   {cell.label}")
    rec = {"schema_version": SCHEMA_VERSION, "key": key, "protocol_id": protocol.id, "protocol": protocol.describe(),
           "dataset": protocol.cfg.dataset, "method": cell.method, "method_group": cls.group, "method_config": cfg_dict,
           "budget": cell.budget, "selection_seed": cell.selection_seed, "eval_seeds": cell.eval_seeds,
           "manifest": manifest(run.device, run.argv)}
    t0 = time.time()
    try:
        ctx = MethodContext(protocol, run.cache_dir, run.device, log)
        art = cls(cell.config).build(ctx, cell.budget, cell.selection_seed)
        art.validate(protocol, cell.budget)
        t1 = time.time()
        apath = artifact_path(run.out, protocol.id, cell.method, cell.budget, cell.selection_seed)
        if art.kind != "full":
            art.save(apath, {k: rec[k] for k in ("protocol_id", "dataset", "method", "method_config", "budget", "selection_seed")}
                     | {"protocol_config": dataclasses.asdict(protocol.cfg), "storage_bytes": art.storage_bytes(protocol)})
        per_seed = protocol.evaluate(art.pairs(protocol), cell.eval_seeds, log)
        metrics = {k: [m[k] for m in per_seed] for k in per_seed[0] if k not in ("seed", "lr", "train_s")}
        rec.update(status="ok", n_pairs=len(art) if art.kind != "full" else len(protocol.train.text),
                   storage_bytes=art.storage_bytes(protocol), learned_lr=art.lr, metrics_per_seed=per_seed,
                   metrics_mean={k: float(np.mean(v)) for k, v in metrics.items()},
                   artifact=str(apath) if art.kind != "full" else None, info=art.info,
                   timings={"build_s": round(t1 - t0, 2), "eval_s": round(time.time() - t1, 2)})
        m = rec["metrics_mean"]
        log(f"done  {cell.label}: TR@1 {m['tr_r1']:.1f} IR@1 {m['ir_r1']:.1f} mean {m['mean']:.1f} ({time.time() - t0:.1f} s)")
    except KeyboardInterrupt:
        raise
    except Exception as e:  # the cell fails, the grid goes on
        msg = f"not applicable: {e}" if isinstance(e, NotApplicable) else f"{type(e).__name__}: {e}"
        rec.update(status="failed", error=msg, traceback=traceback.format_exc(), timings={"failed_after_s": round(time.time() - t0, 2)})
        log(f"FAIL  {cell.label}: {msg}")
    atomic_write_json(path, rec)
    return rec


def execute(run: RunConfig, log: Callable = print) -> tuple[Protocol, list[dict]]:
    protocol = build_protocol(run.protocol, run.cache_dir, run.device, log)
    cells = plan(run, protocol.train.n_images)
    atomic_write_json(Path(run.out) / "grids" / f"{protocol.id}.json",
                      {"protocol_id": protocol.id, "protocol": protocol.describe(),
                       "cells": [{"method": c.method, "budget": c.budget, "selection_seed": c.selection_seed,
                                  "key": cell_key(protocol.id, c.method, dataclasses.asdict(c.config), c.budget,
                                                  c.selection_seed, c.eval_seeds)} for c in cells]})
    log(f"protocol {protocol.id}: {protocol.cfg.dataset} (test split: {protocol.dataset.test_split}), {len(cells)} cells -> {run.out}")
    return protocol, [run_cell(c, protocol, run, log) for c in cells]

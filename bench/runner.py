"""The runner: expand the grid (methods x budgets x selection seeds) and execute its cells.

Each cell: build the method's set from the train split, save it as an artifact, score it under its
eval seeds with the protocol, and write the cell's JSON at once (atomically). A finished cell with a
matching key, or holding the same set under every eval seed asked for, is skipped unless ``force``
(``lookup``); one holding the set under fewer eval seeds gains the rest (``extend_cell``). A cell
that raises is recorded as failed with its error and the grid goes on; an interrupt loses at most
the cell in progress.

A cell is computed (``compute_cell``: record + artifact, nothing written) and then stored
(``store_cell``: the artifact and the cell JSON, atomically) by the driver, whichever executor
computed it (``bench/executors.py``, which the runner hands a ``Work``: ``local``, one after another in this process, or ``ray``). Before
any cell runs, each selected method's optional ``prepare(ctx)`` hook builds its shared intermediates
(expert buffers, forgetting statistics) once, so cells only read them. ``shard=(i, n)`` runs the
cells at plan positions k with k % n == i (every shard still records the whole grid for `status`).

Seeds: ``seeds = N`` gives selection seeds 0..N-1; the cell with selection seed s is scored under
eval seeds ``s + N*j`` for j < ``eval_seeds`` (default 1). So the std over a method's runs includes
selection variance as well as training variance. The full-data references (``full`` under the
protocol's recipe, ``full_tuned`` under its own, ``methods/full.py``) have no selection: one cell each,
scored under eval seeds 0..N-1.

Every evaluation also records the test score every ``CURVE_EVERY`` epochs (the best-of-test
diagnostic; nothing selects by it), and every set is scored a second time with a transfer student
(``RunConfig.transfer``; by default the other head: ``mlp`` for the protocol's ``linear``). With
``fairness`` (default) the grid gets the cells the fairness views compare against (docs/fairness.md):
``random`` at every budget of a distillation method; once a set with a treatment of its own (learned
step sizes, a loss) is done, ``random`` pairs of the same seed under that treatment (identity
targets); and, for a set with learned extras, ``random`` and ``herding`` with as many pairs as its
bytes buy. A finished cell that lacks the curve or the transfer score asked for gets them from its
stored artifact, without rebuilding the set.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from bench import SCHEMA_VERSION
from bench.errors import BenchError, NotApplicable
from bench.executors import ExecutorConfig, Work, make_executor
from bench.manifest import manifest
from bench.progress import GridClock, cut_factor, duration
from bench.plugins import load_plugins, origin
from bench.protocol import Protocol, ProtocolConfig, build_protocol
from bench.protocol.student import StudentConfig
from bench.results import artifact_path, atomic_write_json, cell_key, cell_path, covers, read_cell, writable_dir
from datasets.base import identity_hash
from methods import METHODS, MethodContext
from methods.base import Artifact, config_key, method_config, pair_bytes, prepare

REFERENCES = ("full", "full_tuned")  # reference rows every grid has (methods/full.py)
CURVE_EVERY = 5  # epochs between the test scores recorded for the best-of-test diagnostic
VIEW_GROUPS = ("distill", "test")  # methods whose sets the fairness views compare (test: their tiny CI variants)


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
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    shard: Optional[tuple[int, int]] = None  # (i, n): only the cells at plan positions k with k % n == i
    plugins: tuple[str, ...] = ()  # plugin files (absolute) and modules, loaded again by every worker
    # student fields of the transfer score: "auto" (the other head), a dict, or None (no transfer score)
    transfer: object = "auto"
    fairness: bool = True  # plan the cells the fairness views compare against (random, treated random, bytes)


@dataclass
class Cell:
    method: str
    budget: Optional[int]
    selection_seed: int
    eval_seeds: list[int]
    config: object  # the method's Config instance
    # random pairs under another set's treatment: {"of", "variant", "source_key", "lr", "lr_text", "recipe"}
    treatment: Optional[dict] = None
    view: Optional[str] = None  # "treated" or "bytes": planned for a fairness view, not a row of the main tables

    @property
    def variant(self) -> str:
        if self.treatment:
            return f"@{self.treatment['of']}{self.treatment['variant']}"
        return config_variant(self.config)

    @property
    def label(self) -> str:
        return (f"{self.method}{self.variant} @ {'full' if self.budget is None else self.budget} "
                f"(seed {self.selection_seed})")


def _default_config(cfg) -> Optional[dict]:
    try:
        return config_key(type(cfg)())
    except TypeError:  # a config without defaults: every value is a choice
        return None


def config_variant(cfg) -> str:
    """``""`` for a method's default config, else ``~`` and a short hash of it (its results folder)."""
    key = config_key(cfg)
    return "" if key == _default_config(cfg) else "~" + identity_hash(key)[:8]


def config_label(cfg) -> str:
    """The fields that differ from the method's defaults, ``name=value`` (tables label rows with it)."""
    key, default = config_key(cfg), _default_config(cfg) or {}
    return ",".join(f"{k}={v}" for k, v in key.items() if k not in default or default[k] != v)


def check_run(run: RunConfig) -> list[str]:
    """Everything about a run that can be checked without data (method names, their options,
    budgets): called before any feature is computed, so a typo costs nothing. Returns the methods."""
    names = METHODS.select(run.methods)
    for name in run.method_options:
        if name not in METHODS:
            METHODS.entry(name)  # raises: unknown method, listing what exists
        _config(name, run)  # raises: unknown option or bad value, listing what exists
    for b in run.budgets:
        if b < 2:
            raise BenchError(f"budget {b} is too small: a contrastive student needs at least 2 pairs")
    return names


def plan(run: RunConfig, n_train_images: int) -> list[Cell]:
    names = check_run(run)
    for b in run.budgets:
        if b > n_train_images:
            raise BenchError(f"budget {b} is larger than the train split ({n_train_images} images; each pair needs its own image)")
    n = run.seeds
    cells = [Cell(ref, None, 0, list(range(n * run.eval_seeds)), _config(ref, run)) for ref in REFERENCES]
    if run.fairness and "random" not in names and any(METHODS.get(m).group in VIEW_GROUPS for m in names):
        names = names + ["random"]  # the gain-over-random view compares every distilled set with random pairs
    for name in names:
        if name in REFERENCES:
            continue
        cfg = _config(name, run)
        for b in run.budgets:
            for s in range(n):
                cells.append(Cell(name, b, s, [s + n * j for j in range(run.eval_seeds)], cfg))
    return cells


def _config(name: str, run: RunConfig):
    return method_config(METHODS.get(name), run.method_options.get(name, {}))


@dataclass
class CellResult:
    """A computed cell, not yet stored: its JSON record and the artifact to save with it (if any)."""
    record: dict
    artifact: Optional[Artifact] = None
    artifact_meta: Optional[dict] = None


def key_of(cell: Cell, protocol_id: str) -> str:
    """The cell's key; a plugin method's also holds its file's sha256 (an edited plugin redoes its cells)."""
    plugin = origin("method", cell.method)
    return cell_key(protocol_id, cell.method, config_key(cell.config), cell.budget, cell.selection_seed,
                    cell.eval_seeds, plugin=None if plugin is None else plugin["sha256"] or plugin["module"],
                    treatment=cell.treatment)


def set_key_of(cell: Cell, protocol_id: str) -> str:
    """The key of the cell's set: its key without the eval seeds (the same set scored under other
    eval seeds has the same set key)."""
    return key_of(dataclasses.replace(cell, eval_seeds=None), protocol_id)


def lookup(cell: Cell, protocol_id: str, run: RunConfig) -> tuple[str, Optional[dict]]:
    """What the results folder holds for a planned cell: ``("done", rec)`` when a stored record
    covers it (``covers``), ``("extend", rec)`` when it holds the same set under other eval seeds
    only, else ``("run", None)`` (``--force`` always runs)."""
    if run.force:
        return "run", None
    rec = read_cell(cell_path(run.out, protocol_id, cell.method, cell.budget, cell.selection_seed, cell.variant))
    skey = set_key_of(cell, protocol_id)
    if covers(rec, key_of(cell, protocol_id), skey, cell.eval_seeds):
        return "done", rec
    if rec is not None and rec.get("status") == "ok" and rec.get("set_key") == skey:
        return "extend", rec
    return "run", None


def widened(cell: Cell, rec: dict) -> Cell:
    """The cell under the stored record's eval seeds followed by the ones it lacks."""
    held = list(rec.get("eval_seeds") or [])
    return dataclasses.replace(cell, eval_seeds=held + [s for s in cell.eval_seeds if s not in held])


def stored(cell: Cell, protocol: Protocol, run: RunConfig, log: Callable) -> tuple[Cell, Optional[dict]]:
    """The cell as it will be (widened when its stored set gains eval seeds) and its stored record
    when nothing is left to compute; None when it must be computed (``lookup``, ``extend_cell``)."""
    state, rec = lookup(cell, protocol.id, run)
    if state == "extend":  # or, without its artifact, redone under all the seeds
        cell = widened(cell, rec)
        rec = extend_cell(rec, cell, protocol, run, log)
    return cell, rec


def error_message(e: BaseException) -> str:
    return f"not applicable: {e}" if isinstance(e, NotApplicable) else f"{type(e).__name__}: {e}"


def _record(cell: Cell, protocol: Protocol, run: RunConfig) -> dict:
    return {"schema_version": SCHEMA_VERSION, "key": key_of(cell, protocol.id), "set_key": set_key_of(cell, protocol.id),
            "protocol_id": protocol.id, "protocol": protocol.describe(), "dataset": protocol.cfg.dataset, "method": cell.method,
            "method_group": METHODS.get(cell.method).group, "method_config": dataclasses.asdict(cell.config),
            "budget": cell.budget, "selection_seed": cell.selection_seed, "eval_seeds": cell.eval_seeds,
            "variant": cell.variant, "variant_label": config_label(cell.config), "pair_bytes": pair_bytes(protocol),
            "manifest": manifest(run.device, run.argv)} | (
                {"plugin": origin("method", cell.method)} if origin("method", cell.method) else {}) | (
                {"treatment": cell.treatment} if cell.treatment else {}) | ({"view": cell.view} if cell.view else {})


def failed_result(cell: Cell, protocol: Protocol, run: RunConfig, error: str, tb: str, seconds: float) -> CellResult:
    """The record of a cell that failed (an exception, a failed ``prepare``, a worker that died)."""
    rec = _record(cell, protocol, run)
    rec.update(status="failed", error=error, traceback=tb, timings={"failed_after_s": round(seconds, 2)})
    return CellResult(rec)


def compute_cell(cell: Cell, protocol: Protocol, run: RunConfig, log: Callable = print) -> CellResult:
    """Build the method's set and score it; write nothing (``store_cell`` does). A cell that raises
    gives a failed record (and the artifact, when it was built before the failure)."""
    cls = METHODS.get(cell.method)
    rec = _record(cell, protocol, run)
    log(f"run   {cell.label}")
    t0 = time.time()
    art = meta = None
    try:
        ctx = MethodContext(protocol, run.cache_dir, run.device, log)
        built = cls(cell.config).build(ctx, cell.budget, cell.selection_seed)
        built.validate(protocol, cell.budget)
        recipe = _treat(built, cell)
        t1 = time.time()
        apath = artifact_path(run.out, protocol.id, cell.method, cell.budget, cell.selection_seed, cell.variant)
        if built.kind != "full":
            art = built
            meta = ({k: rec[k] for k in ("protocol_id", "dataset", "method", "method_config", "budget", "selection_seed")}
                    | {"protocol_config": dataclasses.asdict(protocol.cfg), "storage_bytes": built.storage_bytes(protocol)})
        native = built.native_recipe()
        per_seed = protocol.evaluate(built.pairs(protocol), cell.eval_seeds, log, recipe=recipe, curve_every=CURVE_EVERY)
        metrics = _metrics(per_seed)
        rec.update(status="ok", n_pairs=len(built) if built.kind != "full" else len(protocol.train.text),
                   storage_bytes=built.storage_bytes(protocol), learned_lr=built.lr, metrics_per_seed=per_seed,
                   metrics_mean={k: float(np.mean(v)) for k, v in metrics.items()},
                   artifact=str(apath) if built.kind != "full" else None,
                   info=built.info | ({"recipe": built.recipe} if built.recipe else {})
                   | ({"learned_lr_text": built.lr_text} if built.lr_text is not None else {}),
                   timings={"build_s": round(t1 - t0, 2), "eval_s": round(time.time() - t1, 2)})
        if native is not None:  # a set with its own treatment is also scored as every other set is
            log(f"  plain scoring of {cell.label} (InfoNCE, identity targets)")
            plain = protocol.evaluate(built.pairs(protocol, plain=True), cell.eval_seeds, log, curve_every=CURVE_EVERY)
            rec.update(native=native, plain=_scores(plain))
        if built.kind != "full":
            rec.update(_transfer_scores(built, protocol, run, cell.eval_seeds, recipe, log))
        rec["curve_every"] = CURVE_EVERY
        rec["timings"]["eval_s"] = round(time.time() - t1, 2)
        m = rec["metrics_mean"]
        log(f"done  {cell.label}: TR@1 {m['tr_r1']:.1f} IR@1 {m['ir_r1']:.1f} mean {m['mean']:.1f} ({time.time() - t0:.1f} s)")
    except KeyboardInterrupt:
        raise
    except Exception as e:  # the cell fails, the grid goes on
        msg = error_message(e)
        rec.update(status="failed", error=msg, traceback=traceback.format_exc(), timings={"failed_after_s": round(time.time() - t0, 2)})
        log(f"FAIL  {cell.label}: {msg}")
    return CellResult(rec, art, meta)


def _treat(built: Artifact, cell: Cell) -> Optional[dict]:
    """The recipe fields a cell's set trains with: a reference row's own recipe, a set's native
    treatment (its loss), or, for random pairs under another set's treatment, that set's loss, with
    its step sizes put on the pairs here (identity targets)."""
    if cell.treatment:
        built.lr, built.lr_text = cell.treatment["lr"], cell.treatment["lr_text"]
    return built.recipe or built.native_recipe() or (cell.treatment or {}).get("recipe")


def _metrics(per_seed: list[dict]) -> dict[str, list[float]]:
    return {k: [m[k] for m in per_seed] for k in per_seed[0] if k not in ("seed", "lr", "train_s", "curve")}


def _scores(per_seed: list[dict]) -> dict:
    return {"metrics_per_seed": per_seed, "metrics_mean": {k: float(np.mean(v)) for k, v in _metrics(per_seed).items()}}


def transfer_student(protocol: Protocol, transfer) -> Optional[StudentConfig]:
    """The student config of the transfer score: ``"auto"`` (the protocol's student with the other
    head), a dict of student fields, or None (no transfer score)."""
    if transfer is None:
        return None
    own = protocol.cfg.student
    fields = ({"head": "mlp" if own.head == "linear" else "linear"} if transfer == "auto" else dict(transfer))
    return dataclasses.replace(own, **fields)


def _transfer_scores(built: Artifact, protocol: Protocol, run: RunConfig, seeds: list[int], recipe: Optional[dict],
                     log: Callable) -> dict:
    """``{"transfer": ...}``: the set scored, under the same treatment, by a student it was not built for."""
    st = transfer_student(protocol, run.transfer)
    if st is None:
        return {}
    log(f"  transfer scoring (student {st.head} heads)")
    per_seed = protocol.evaluate(built.pairs(protocol), seeds, log, recipe=recipe, student=st)
    return {"transfer": {"student": st.identity(), **_scores(per_seed)}}


def store_cell(result: CellResult, out: Path, log: Callable = print) -> dict:
    """Write a computed cell: its artifact (if any), then its JSON, each atomically. A cell whose
    files cannot be written (a folder made read-only, a full disk) is returned as failed, with the
    reason, and the grid goes on; nothing it leaves behind counts as done."""
    r = result.record
    where = (r["protocol_id"], r["method"], r["budget"], r["selection_seed"], r.get("variant", ""))
    try:
        if result.artifact is not None:
            result.artifact.save(artifact_path(out, *where), result.artifact_meta)
        atomic_write_json(cell_path(out, *where), r)
    except OSError as e:
        msg = f"cannot write the cell's result under {out}: {type(e).__name__}: {e.strerror or e}"
        log(f"FAIL  {r['method']} @ {'full' if r['budget'] is None else r['budget']} (seed {r['selection_seed']}): {msg}")
        return {**r, "status": "failed", "error": msg}
    return r


def run_cell(cell: Cell, protocol: Protocol, run: RunConfig, log: Callable = print) -> dict:
    """One cell in this process: skip it when done (unless ``force``), else compute and store it."""
    cell, rec = stored(cell, protocol, run, log)
    if rec is not None:
        log(f"skip  {cell.label}: done")
        return augment_cell(rec, cell, protocol, run, log)
    return store_cell(compute_cell(cell, protocol, run, log), run.out, log)


def shard_cells(cells: list[Cell], shard: Optional[tuple[int, int]]) -> list[Cell]:
    """The cells of shard ``(i, n)``: plan positions k with k % n == i (round robin, so each shard
    gets a share of every method); the n shards together hold every cell exactly once."""
    if shard is None:
        return list(cells)
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise BenchError(f"shard {i}/{n} is not valid: expected I/N with 0 <= I < N (e.g. 0/4)")
    return [c for k, c in enumerate(cells) if k % n == i]


def _prepare_group(cell: Cell) -> tuple[str, str]:
    return cell.method, json.dumps(dataclasses.asdict(cell.config), sort_keys=True, default=str)


def prepare_methods(cells: list[Cell], protocol: Protocol, run: RunConfig, log: Callable = print) -> dict:
    """Call each method's optional ``prepare(ctx)`` once per (method, config) among ``cells``, here in
    the driver and before any cell runs, so shared intermediates (expert buffers, forgetting
    statistics) are built once and never by two workers at a time. Returns ``{(method, config):
    (error, traceback)}`` for hooks that failed; their cells are recorded as failed."""
    failures, seen = {}, set()
    for c in cells:
        k = _prepare_group(c)
        if k in seen:
            continue
        seen.add(k)
        try:
            prepare(METHODS.get(c.method)(c.config), MethodContext(protocol, run.cache_dir, run.device, log))
        except KeyboardInterrupt:
            raise
        except Exception as e:
            failures[k] = (error_message(e), traceback.format_exc())
            log(f"FAIL  prepare {c.method}: {failures[k][0]}")
    return failures


def execute(run: RunConfig, log: Callable = print) -> tuple[Protocol, list[dict]]:
    """Plan the grid, record it, and run this shard's cells that are not done with the configured
    executor; the driver (this process) stores every result as it arrives. Then, with ``fairness``,
    the cells that depend on finished ones (``view_cells``) the same way. Returns the protocol and
    the records of this shard's cells, in plan order (the views' cells last)."""
    check_run(run)  # before any data is touched
    if run.shard is not None:
        shard_cells([], run.shard)  # validates I/N
    from datasets.features import default_cache_dir

    writable_dir(run.out, "--out")
    writable_dir(run.cache_dir or default_cache_dir(), "--cache-dir")
    with make_executor(run.executor, log) as executor:  # fails early (one line) when Ray is missing or unreachable
        protocol = build_protocol(run.protocol, run.cache_dir, run.device, log)
        cells = plan(run, protocol.train.n_images)
        transfer_student(protocol, run.transfer)  # a bad transfer field fails here, before any cell
        mine = shard_cells(cells, run.shard)
        _write_grid(run, protocol, cells)
        part = f" (shard {run.shard[0]}/{run.shard[1]}: {len(mine)} of them)" if run.shard else ""
        log(f"protocol {protocol.id}: {protocol.cfg.dataset} (test split: {protocol.dataset.test_split}), "
            f"{len(cells)} cells{part} -> {run.out}")
        clock = GridClock(_history(run.out, protocol.id), _clock_factor(run))
        recs = _run_cells(mine, protocol, run, executor, log, clock)
        if run.fairness:
            extra = view_cells(mine, recs, protocol, run, planned=cells)
            if extra:
                log(f"fairness views: {len(extra)} more cells (random under the sets' own treatment, "
                    f"random and herding at the sets' bytes)")
                _write_grid(run, protocol, cells + extra)
                recs += _run_cells(extra, protocol, run, executor, log, clock)
    return protocol, recs


def _write_grid(run: RunConfig, protocol: Protocol, cells: list[Cell]) -> None:
    try:
        atomic_write_json(Path(run.out) / "grids" / f"{protocol.id}.json",
                          {"protocol_id": protocol.id, "protocol": protocol.describe(),
                           "cells": [{"method": c.method, "budget": c.budget, "selection_seed": c.selection_seed,
                                      "variant": c.variant, "key": key_of(c, protocol.id),
                                      "set_key": set_key_of(c, protocol.id), "eval_seeds": c.eval_seeds}
                                     for c in cells]})
    except OSError as e:
        raise BenchError(f"cannot write the grid file under {run.out}/grids: {e.strerror or e}") from None


def _history(out: Path, protocol_id: str) -> list[tuple]:
    """(method + variant, budget, seconds) of the finished cells of a protocol in a results folder."""
    rows = []
    for path in (Path(out) / "cells" / protocol_id).glob("*/*.json"):
        rec = read_cell(path)
        t = (rec or {}).get("timings") or {}
        if rec and rec.get("status") == "ok" and not rec.get("view") and isinstance(t.get("build_s"), (int, float)):
            rows.append((rec["method"] + rec.get("variant", ""), rec.get("budget"), t["build_s"] + (t.get("eval_s") or 0)))
    return rows


def _clock_factor(run: RunConfig) -> float:
    st = run.protocol.student
    return cut_factor(st.cut, st.image_size)


def _clock_key(c: Cell) -> tuple:
    """How the clock knows a cell: its method and config (a view's cell costs what a random one does)."""
    return ("random" if c.view else c.method + c.variant), METHODS.get(c.method).group, c.budget


def _run_cells(mine: list[Cell], protocol: Protocol, run: RunConfig, executor, log: Callable,
               clock: Optional[GridClock] = None) -> list[dict]:
    """Skip (and augment) the done cells, prepare the methods of the others, and run them, with a
    progress line (cells done / total, ETA) after each."""
    clock = clock or GridClock()
    recs: dict[int, dict] = {}
    todo = []
    for k, c in enumerate(mine):
        c, rec = stored(c, protocol, run, log)
        if rec is not None:
            log(f"skip  {c.label}: done")
            recs[k] = augment_cell(rec, c, protocol, run, log)
        else:
            todo.append((k, c))
    failures = prepare_methods([c for _, c in todo], protocol, run, log)
    index = {id(c): k for k, c in todo}
    runnable = []
    for k, c in todo:
        if _prepare_group(c) in failures:
            recs[k] = store_cell(failed_result(c, protocol, run, *failures[_prepare_group(c)], 0.0), run.out, log)
        else:
            runnable.append(c)

    # cheapest first (by the clock's estimate; stable): the first numbers come soon, and a run that
    # is stopped early has done the most cells
    runnable.sort(key=lambda c: clock.estimate(*_clock_key(c)))
    left = {id(c): c for c in runnable}
    if runnable:
        log(f"{len(runnable)} of {len(mine)} cells to run, estimated {duration(clock.eta(map(_clock_key, runnable)))}"
            f" (from measured cell times)")

    def store(cell: Cell, result: CellResult) -> None:
        art = result.artifact
        if art is not None and art.indices is not None:  # Ray hands numpy arrays back read-only
            art.indices = np.array(art.indices)
        recs[index[id(cell)]] = rec = store_cell(result, run.out, log)
        t = rec.get("timings") or {}
        if rec.get("status") == "ok":
            clock.add(_clock_key(cell)[0], cell.budget, (t.get("build_s") or 0) + (t.get("eval_s") or 0))
        left.pop(id(cell), None)
        log(f"progress: {len(runnable) - len(left)}/{len(runnable)} cells run"
            + (f", ETA {duration(clock.eta(map(_clock_key, left.values())))}" if left else ""))

    executor.run(runnable, grid_work(protocol, run, store, log))
    return [recs[k] for k in range(len(mine))]


def dry_run(run: RunConfig, log: Callable = print) -> list[Cell]:
    """Print the plan (cells per method and budget: done, to score under more eval seeds, to run; the
    estimated time) without computing anything: the dataset is read and the encoders named, but no
    feature, expert or cell is computed."""
    from bench.protocol.core import planned_protocol

    check_run(run)
    pid, ds = planned_protocol(run.protocol, run.cache_dir)
    cells = shard_cells(plan(run, ds.split("train").n_images), run.shard)
    key_id = pid
    clock = GridClock(_history(run.out, pid), _clock_factor(run))
    log(f"protocol {pid}: {run.protocol.dataset} (test split: {ds.test_split}), {len(cells)} cells -> {run.out}")
    rows: dict = {}
    for c in cells:
        state, rec = lookup(c, key_id, run)
        r = rows.setdefault((c.method + c.variant, c.budget), [0, 0, 0, 0.0])
        r[("done", "extend", "run").index(state)] += 1
        r[3] += _extend_estimate(rec, c) if state == "extend" else clock.estimate(*_clock_key(c)) if state == "run" else 0.0
    log(f"{'method':24s} {'budget':>6s} {'done':>5s} {'extend':>6s} {'to run':>6s} {'estimate':>9s}")
    for (m, b), (done, extend, todo, secs) in rows.items():
        log(f"{m:24s} {'full' if b is None else b:>6} {done:5d} {extend:6d} {todo:6d} {duration(secs):>9s}")
    total = sum(r[3] for r in rows.values())
    log(f"total: {sum(r[2] for r in rows.values())} cells to run and {sum(r[1] for r in rows.values())} to score "
        f"under more eval seeds, estimated {duration(total)} on this machine's measured cell times (2-core priors "
        f"where none were measured)" + ("; then the fairness views' cells (evaluation only)" if run.fairness else ""))
    return cells


def _extend_estimate(rec: dict, cell: Cell) -> float:
    """Seconds to score a stored set under the eval seeds it lacks: its stored evaluation time per
    eval seed (every score it holds: native, plain, transfer) times the seeds it gains."""
    held = list(rec.get("eval_seeds") or [])
    new = [s for s in cell.eval_seeds if s not in held]
    eval_s = ((rec.get("timings") or {}).get("eval_s") or 0.0)
    return eval_s / max(len(held), 1) * len(new)


def treatment_of(rec: dict, lr_policy: str) -> Optional[dict]:
    """What a finished set is trained with beyond the protocol's defaults, as a treated random cell
    takes it: learned step sizes (when the recipe uses them) and its native recipe fields (its loss);
    None for a set that has neither (it is compared with plain random pairs). The source is named by
    its set key, so a treated cell stays the same set when its source gains eval seeds."""
    learned = lr_policy == "learned"
    lr = rec.get("learned_lr") if learned else None
    lr_text = (rec.get("info") or {}).get("learned_lr_text") if learned else None
    recipe = rec.get("native") or None
    if lr is None and lr_text is None and recipe is None:
        return None
    return {"of": rec["method"], "variant": rec.get("variant", ""), "of_label": rec.get("variant_label", ""),
            "source_key": rec.get("set_key") or rec["key"], "lr": lr,
            "lr_text": lr_text, "recipe": recipe}


def view_cells(cells: list[Cell], recs: list[dict], protocol: Protocol, run: RunConfig,
               planned: Optional[list[Cell]] = None) -> list[Cell]:
    """The cells the fairness views need once ``cells`` are done (``recs``, in the same order): for
    each finished distilled set with a treatment, random pairs of its budget and seed under that
    treatment; for each set whose learned extras take bytes beyond its pairs, random and herding
    with ``floor(storage_bytes / pair_bytes)`` pairs (same seed), unless the grid (``planned``, the
    whole plan when ``cells`` are one shard's) has them."""
    rnd, herd = METHODS.get("random"), METHODS.get("herding")
    have = {(c.method, c.variant, c.budget, c.selection_seed) for c in (planned or cells)}
    out: list[Cell] = []
    bpp, n_train = pair_bytes(protocol), protocol.train.n_images
    for c, rec in zip(cells, recs):
        if rec.get("status") != "ok" or c.budget is None or METHODS.get(c.method).group not in VIEW_GROUPS:
            continue
        t = treatment_of(rec, protocol.cfg.recipe.lr_policy)
        if t is not None:
            out.append(Cell("random", c.budget, c.selection_seed, c.eval_seeds, method_config(rnd, {}), t, "treated"))
        nbytes = int(rec.get("storage_bytes") or 0)
        matched = nbytes // bpp
        if nbytes > c.budget * bpp and c.budget <= matched <= n_train:  # a set with learned extras
            for m, cls in (("random", rnd), ("herding", herd)):
                k = (m, "", matched, c.selection_seed)
                if k not in have:
                    have.add(k)
                    out.append(Cell(m, matched, c.selection_seed, c.eval_seeds, method_config(cls, {}), view="bytes"))
    return out


def augment_cell(rec: dict, cell: Cell, protocol: Protocol, run: RunConfig, log: Callable = print) -> dict:
    """A done cell with what this run asks for and it lacks (the score curve, the transfer score),
    computed from its stored artifact without rebuilding the set. The stored numbers are kept: a
    curve is added only when re-scoring reproduces them. Anything that goes wrong leaves the cell as
    it was (one warning line)."""
    per_seed = rec.get("metrics_per_seed") or []
    want_curve = bool(per_seed) and "curve" not in per_seed[0]
    st = transfer_student(protocol, run.transfer)
    want_transfer = st is not None and (rec.get("transfer") or {}).get("student") != st.identity() \
        and cell.budget is not None
    if not (want_curve or want_transfer):
        return rec
    try:
        built = _stored_set(rec, cell, protocol, run, log)
        if built is None:
            return rec
        recipe, native = _treat(built, cell), built.native_recipe()
        new = dict(rec)
        if want_curve:
            log(f"  adding the score curve to {cell.label} (re-scoring its stored set)")
            again = protocol.evaluate(built.pairs(protocol), cell.eval_seeds, None, recipe=recipe, curve_every=CURVE_EVERY)
            plain = (protocol.evaluate(built.pairs(protocol, plain=True), cell.eval_seeds, None, curve_every=CURVE_EVERY)
                     if native is not None and rec.get("plain") else None)
            same = _same_scores(again, per_seed) and (plain is None or _same_scores(plain, rec["plain"]["metrics_per_seed"]))
            if same:
                new["metrics_per_seed"] = [m | {"curve": a["curve"]} for m, a in zip(per_seed, again)]
                if plain is not None:
                    new["plain"] = dict(rec["plain"], metrics_per_seed=[
                        m | {"curve": a["curve"]} for m, a in zip(rec["plain"]["metrics_per_seed"], plain)])
                new["curve_every"] = CURVE_EVERY
            else:
                log(f"warning: re-scoring {cell.label} does not reproduce its stored scores (another machine or "
                    f"library version?); its curve is left out (--force redoes the cell)")
        if want_transfer:
            new.update(_transfer_scores(built, protocol, run, cell.eval_seeds, recipe, log))
        if new != rec:
            atomic_write_json(cell_path(run.out, protocol.id, cell.method, cell.budget, cell.selection_seed,
                                        cell.variant), new)
        return new
    except KeyboardInterrupt:
        raise
    except Exception as e:
        log(f"warning: could not add the curve or transfer score to {cell.label}: {error_message(e)}; the cell is kept as it was")
        return rec


def _stored_set(rec: dict, cell: Cell, protocol: Protocol, run: RunConfig, log: Callable) -> Optional[Artifact]:
    """A done cell's set without rebuilding it: its stored artifact (the results folder's own copy
    first, as the folder may have moved), a reference row rebuilt (deterministic and cheap), or
    None for a cell that stored no set. A missing or corrupt artifact file raises."""
    if rec.get("artifact"):
        here = artifact_path(run.out, protocol.id, cell.method, cell.budget, cell.selection_seed, cell.variant)
        return Artifact.load(here if here.is_file() else Path(rec["artifact"]))[0]
    if cell.method in REFERENCES:
        return METHODS.get(cell.method)(cell.config).build(MethodContext(protocol, run.cache_dir, run.device, log),
                                                            cell.budget, cell.selection_seed)
    return None


def extend_cell(rec: dict, cell: Cell, protocol: Protocol, run: RunConfig, log: Callable = print) -> Optional[dict]:
    """A stored cell scored under the eval seeds ``cell`` (see ``widened``) adds to its record's: its
    set is loaded (not rebuilt) and every score it holds gains the new seeds (native, plain,
    transfer), under the key of all its seeds now. None when its set cannot be had (no artifact,
    an unreadable one): the caller then redoes the cell under all the seeds."""
    held = list(rec.get("eval_seeds") or [])
    new_seeds = [s for s in cell.eval_seeds if s not in held]
    try:
        built = _stored_set(rec, cell, protocol, run, log)
        if built is None:
            raise BenchError("it stored no set")
        log(f"  scoring the stored set of {cell.label} under eval seed(s) {', '.join(map(str, new_seeds))} too "
            f"(it holds {', '.join(map(str, held))})")
        t0 = time.time()
        recipe = _treat(built, cell)
        curve = CURVE_EVERY if rec.get("curve_every") else None
        new = dict(rec, key=key_of(cell, protocol.id), eval_seeds=list(cell.eval_seeds))
        new.update(_scores(rec["metrics_per_seed"] + protocol.evaluate(built.pairs(protocol), new_seeds, log,
                                                                       recipe=recipe, curve_every=curve)))
        if rec.get("plain"):
            more = protocol.evaluate(built.pairs(protocol, plain=True), new_seeds, log, curve_every=curve)
            new["plain"] = dict(rec["plain"], **_scores(rec["plain"]["metrics_per_seed"] + more))
        st = transfer_student(protocol, run.transfer)
        if rec.get("transfer") and st is not None and rec["transfer"].get("student") == st.identity():
            more = protocol.evaluate(built.pairs(protocol), new_seeds, log, recipe=recipe, student=st)
            new["transfer"] = dict(rec["transfer"], **_scores(rec["transfer"]["metrics_per_seed"] + more))
        else:  # another transfer student (or none): augment_cell scores the one this run asks for
            new.pop("transfer", None)
        held_t = rec.get("timings") or {}
        extend_s = round(time.time() - t0, 2)
        new["timings"] = dict(held_t, extend_s=extend_s, eval_s=round((held_t.get("eval_s") or 0.0) + extend_s, 2))
        atomic_write_json(cell_path(run.out, protocol.id, cell.method, cell.budget, cell.selection_seed, cell.variant), new)
        return new
    except KeyboardInterrupt:
        raise
    except Exception as e:
        log(f"warning: cannot score the stored set of {cell.label} under more eval seeds ({error_message(e)}); "
            f"the cell is redone under eval seeds {', '.join(map(str, cell.eval_seeds))}")
        return None


def _same_scores(a: list[dict], b: list[dict]) -> bool:
    from bench.protocol.retrieval import METRICS
    return len(a) == len(b) and all(abs(x[k] - y[k]) < 1e-9 for x, y in zip(a, b) for k in METRICS)


def grid_work(protocol: Protocol, run: RunConfig, store: Callable, log: Callable = print) -> Work:
    """The executor's view of this grid: compute here, or as ``cell_task`` on a worker."""
    from datasets.features import default_cache_dir

    # Workers resolve nothing on their own: the cache dir is fixed here, absolute.
    wrun = dataclasses.replace(run, cache_dir=Path(run.cache_dir or default_cache_dir()).absolute())
    cwd, cpus = os.getcwd(), run.executor.cpus_per_task
    return Work(compute=lambda c: compute_cell(c, protocol, run, log),
                task=cell_task, task_args=lambda c: (cell_spec(c), protocol.id, cwd, cpus),
                lost=lambda c, err, tb, secs: failed_result(c, protocol, run, err, tb, secs),
                store=store, worker_run=wrun, gpu=run.device.startswith("cuda"))


# ------------------------------------------------------------------------------------- worker side
def cell_spec(cell: Cell) -> dict:
    """What a worker needs to rebuild a cell: plain values (a method's config class may be made at
    import time, so it travels as a dict and is rebuilt from the worker's registry)."""
    return {"method": cell.method, "budget": cell.budget, "selection_seed": cell.selection_seed,
            "eval_seeds": list(cell.eval_seeds), "config": dataclasses.asdict(cell.config),
            "plugin": origin("method", cell.method), "treatment": cell.treatment, "view": cell.view}


_PROTOCOLS: dict = {}  # per worker process: (protocol config, cache dir, device) -> Protocol


def _protocol(run: RunConfig):
    key = (run.protocol, str(run.cache_dir), run.device)
    if key not in _PROTOCOLS:
        _PROTOCOLS[key] = build_protocol(run.protocol, run.cache_dir, run.device, log=print)
    return _PROTOCOLS[key]


def cell_task(spec: dict, run: RunConfig, protocol_id: str, cwd: str, cpus: int) -> CellResult:
    """A Ray task: compute one cell (no file written) and return it to the driver."""
    import torch

    host = socket.gethostname()
    if not os.path.isdir(cwd):
        raise RuntimeError(f"the driver's working directory {cwd} does not exist on node {host}; the project, "
                           f"data root and cache dir must be at the same paths on every node (README: Many machines)")
    os.chdir(cwd)
    if not Path(run.cache_dir).is_dir():
        raise RuntimeError(f"cache dir {run.cache_dir} does not exist on node {host}; it must be a shared path "
                           f"(README: Many machines)")
    torch.set_num_threads(cpus)
    load_plugins(run.plugins)
    if (spec.get("plugin") or {}).get("sha256") != ((origin("method", spec["method"]) or {}).get("sha256")):
        raise RuntimeError(f"plugin of method {spec['method']!r} on node {host} differs from the driver's "
                           f"(another file at {(spec.get('plugin') or {}).get('file')}?)")
    protocol = _protocol(run)
    if protocol.id != protocol_id:
        raise RuntimeError(f"protocol id {protocol.id} on node {host} differs from the driver's {protocol_id} "
                           f"(different data or encoder weights at the same path?)")
    cell = Cell(spec["method"], spec["budget"], spec["selection_seed"], spec["eval_seeds"],
                METHODS.get(spec["method"]).Config(**spec["config"]), spec.get("treatment"), spec.get("view"))
    return compute_cell(cell, protocol, run, log=print)


def protocol_of_artifact(meta: dict, path, cache_dir=None, data_root=None, device: str = "cpu",
                         log: Callable = print) -> Protocol:
    """The protocol an artifact was made under, rebuilt from its sidecar's ``protocol_config``."""
    from bench.protocol.training import Recipe

    pc = dict(meta["protocol_config"])
    try:
        recipe = {"batching": "ragged", **pc["recipe"]}  # artifacts from before the field were trained on ragged batches
        pc["student"], pc["recipe"] = StudentConfig(**pc["student"]), Recipe(**recipe)
        pc["limit"] = tuple(pc["limit"]) if pc.get("limit") else None
        pcfg = ProtocolConfig(**pc)
    except (KeyError, TypeError, ValueError) as e:
        raise BenchError(f"the sidecar of {path} has a malformed protocol_config ({type(e).__name__}: {e})") from None
    if data_root:
        pcfg = dataclasses.replace(pcfg, data_root=str(data_root))
    return build_protocol(pcfg, cache_dir, device, log=log)


SHEET_PAIRS = 16  # tiles per contact sheet: the set's first pairs


def _nearest(queries, bank) -> np.ndarray:
    """Index of the row of ``bank`` with the highest cosine similarity to each query row."""
    import torch
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    b = torch.nn.functional.normalize(bank.float(), dim=-1)
    return (q @ b.T).argmax(1).numpy()


def sheet_tiles(protocol: Protocol, art: Artifact, n: int = SHEET_PAIRS) -> tuple[list, str]:
    """The contact sheet of a synthetic set: per pair, its initial real image, its own image (pixel
    cuts: denormalised) or the real train image nearest its image feature (heads), and the real
    train caption nearest its text feature. Returns the tiles and what the right image is."""
    from reports.sheets import Tile

    split, tr = protocol.dataset.split("train"), protocol.feature_splits["train"]
    n = min(n, len(art))
    init = art.info.get("init_caption_indices") or []
    captions = _nearest(art.text[:n], tr.text)
    tower = protocol.frozen_tower if protocol.frozen_tower is not None else protocol.tower

    def real(i: int) -> np.ndarray:
        return np.asarray(protocol.dataset.load_image(split.images[int(i)]).convert("RGB"))

    if tower is not None:
        pix = (art.image[:n].float() * tower.std.cpu() + tower.mean.cpu()).clamp(0, 255).round()
        right, label = [p.byte().permute(1, 2, 0).numpy() for p in pix], "synthetic image"
    else:
        right = [real(i) for i in _nearest(art.image[:n], tr.image)]
        label = "nearest real image to the synthetic image feature"
    blank = np.full((8, 8, 3), 200, dtype=np.uint8)
    tiles = [Tile(real(tr.caption_image[init[k]]) if k < len(init) else blank, right[k],
                  split.captions[int(captions[k])], f"pair {k}") for k in range(n)]
    return tiles, label


def contact_sheets(out: Path, report_dir: Optional[Path] = None, cache_dir=None, log: Callable = print) -> list[Path]:
    """A contact sheet (PNG) per stored synthetic set of ``out`` (the grid's own cells, not the
    fairness views'), under ``<report_dir>/sheets/<dataset>_<protocol>/``. A protocol whose data
    cannot be read here is skipped with one line."""
    from reports import _safe
    from reports.frame import load_cells
    from reports.sheets import draw_sheet

    report_dir = Path(report_dir) if report_dir is not None else Path(out) / "report"
    by_protocol: dict[str, list[dict]] = {}
    for rec in load_cells(out):
        if rec.get("status") == "ok" and not rec.get("view") and rec.get("artifact"):
            by_protocol.setdefault(rec.get("protocol_id", ""), []).append(rec)
    written = []
    for pid, recs in sorted(by_protocol.items()):
        protocol = None
        for rec in sorted(recs, key=lambda r: (r.get("method", ""), str(r.get("budget")), r.get("selection_seed", 0))):
            path = Path(rec["artifact"])
            try:
                art, meta = Artifact.load(path)
            except (BenchError, OSError) as e:
                log(f"contact sheet skipped for {path}: {str(e).splitlines()[0]}")
                continue
            if art.kind != "synthetic":
                continue
            if protocol is None:
                try:
                    protocol = protocol_of_artifact(meta, path, cache_dir, log=lambda m: None)
                except (BenchError, OSError) as e:
                    log(f"contact sheets of protocol {pid} skipped: {str(e).splitlines()[0]}")
                    break
            tiles, label = sheet_tiles(protocol, art)
            name = f"{rec['method']}{rec.get('variant') or ''}_{rec['budget']}_s{rec.get('selection_seed', 0)}"
            label_ = rec.get("variant_label") or ""
            title = (f"{rec['method']}{f' [{label_}]' if label_ else ''} · {rec['budget']} pairs · seed "
                     f"{rec.get('selection_seed', 0)} · {protocol.cfg.dataset} · cut {protocol.cfg.student.cut} · protocol {pid}")
            written.append(draw_sheet(tiles, report_dir / "sheets" / f"{_safe(protocol.cfg.dataset)}_{_safe(pid)}"
                                      / f"{_safe(name)}.png", title, label))
    return written

"""The results store: one JSON file per cell, written atomically the moment the cell finishes.

Layout under ``--out`` (default ``runs/``)::

    cells/<protocol_id>/<method>/<budget>_s<seed>.json   one cell (ok or failed)
    artifacts/<protocol_id>/<method>/<budget>_s<seed>.pt the method's set (+ .json sidecar)
    grids/<protocol_id>.json                             the last planned grid, for `status`

A cell file records its ``key`` (a hash of everything that decides it: protocol id, method and its
config, budget, selection seed, eval seeds, schema version). A rerun skips a cell whose file has
status ok and a matching key, and redoes (overwrites) anything else. ``status_lines`` (``bench
status``) sets the last planned grid of each protocol against the cells on disk.
"""
from __future__ import annotations

import json
import os
import socket
from collections import Counter
from pathlib import Path
from typing import Optional

from bench import SCHEMA_VERSION
from bench.errors import BenchError
from datasets.base import identity_hash


def cell_key(protocol_id: str, method: str, method_config: dict, budget: Optional[int], selection_seed: int,
             eval_seeds: list[int], plugin: Optional[str] = None) -> str:
    extra = () if plugin is None else (plugin,)  # built-in methods' keys stay as they are
    return identity_hash(SCHEMA_VERSION, protocol_id, method, method_config, budget, selection_seed, eval_seeds, *extra)


def _stem(budget: Optional[int], seed: int) -> str:
    return f"{'full' if budget is None else budget}_s{seed}"


def cell_path(out: Path, protocol_id: str, method: str, budget: Optional[int], seed: int) -> Path:
    return Path(out) / "cells" / protocol_id / method / f"{_stem(budget, seed)}.json"


def artifact_path(out: Path, protocol_id: str, method: str, budget: Optional[int], seed: int) -> Path:
    return Path(out) / "artifacts" / protocol_id / method / f"{_stem(budget, seed)}.pt"


def atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # host and pid in the temporary name: shards on several machines may write one file (the grid) at once
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[dict]:
    """A stored JSON, or None when missing or unreadable (a half-written file cannot exist)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def is_done(path: Path, key: str) -> bool:
    rec = read_json(path)
    return bool(rec) and rec.get("status") == "ok" and rec.get("key") == key


def status_lines(out: Path) -> tuple[list[str], int]:
    grids = sorted((Path(out) / "grids").glob("*.json"))
    if not grids:
        raise BenchError(f"no runs under {out}; start one with `python -m bench run --out {out}`")
    lines, any_failed = [], False
    for g in grids:
        grid = read_json(g)
        if not grid:
            lines.append(f"{g}: unreadable grid file")
            continue
        pid = grid["protocol_id"]
        p = grid.get("protocol", {})
        counts: Counter = Counter()
        detail = []
        for c in grid["cells"]:
            rec = read_json(cell_path(out, pid, c["method"], c["budget"], c["selection_seed"]))
            if rec is None:
                state = "missing"
            elif rec.get("key") != c["key"]:
                state = "stale"
            else:
                state = "done" if rec.get("status") == "ok" else "failed"
            counts[state] += 1
            if state != "done":
                b = "full" if c["budget"] is None else c["budget"]
                err = f": {rec.get('error', '')}" if state == "failed" else ""
                detail.append(f"  {state:7s} {c['method']} @ {b} seed {c['selection_seed']}{err}")
        any_failed |= counts["failed"] > 0
        lines.append(f"protocol {pid} ({p.get('dataset')}, test split {p.get('test_split')}): "
                     f"{counts['done']} done, {counts['missing'] + counts['stale']} missing, {counts['failed']} failed "
                     f"of {len(grid['cells'])}")
        lines.extend(detail)
    return lines, 1 if any_failed else 0

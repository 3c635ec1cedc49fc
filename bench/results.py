"""The results store: one JSON file per cell, written atomically the moment the cell finishes.

Layout under ``--out`` (default ``runs/``)::

    cells/<protocol_id>/<method><variant>/<budget>_s<seed>.json   one cell (ok or failed)
    artifacts/<protocol_id>/<method><variant>/<budget>_s<seed>.pt the method's set (+ .json sidecar)
    grids/<protocol_id>.json                                      the last planned grid, for `status`

``<variant>`` keeps cells that differ in more than (method, budget, seed) apart: empty for a method
at its default config, ``~<hash>`` of the config otherwise (``--set tm.lr_data=1000`` beside the
default), ``@<method><its variant>`` for random pairs scored under another set's treatment.

A cell file records its ``key`` (a hash of everything that decides it: protocol id, method and its
config, budget, selection seed, eval seeds, schema version) and its ``set_key`` (the same without the
eval seeds: which set it scores). A rerun skips a cell whose file has status ok and either the same
key or the same set scored under every eval seed asked for (``covers``); a stored set asked for
under more eval seeds gains the missing ones (the runner scores its stored artifact); anything else
is redone (overwritten). ``status_lines`` (``bench status``) sets the last planned grid of each
protocol against the cells on disk.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from bench import SCHEMA_VERSION
from bench.errors import BenchError
from datasets.base import identity_hash


def cell_key(protocol_id: str, method: str, method_config: dict, budget: Optional[int], selection_seed: int,
             eval_seeds: list[int], plugin: Optional[str] = None, treatment: Optional[dict] = None) -> str:
    # built-in methods' keys, and keys of cells without a treatment, stay as they are
    extra = (() if plugin is None else (plugin,)) + (() if treatment is None else ({"treatment": treatment},))
    return identity_hash(SCHEMA_VERSION, protocol_id, method, method_config, budget, selection_seed, eval_seeds, *extra)


def _stem(budget: Optional[int], seed: int) -> str:
    return f"{'full' if budget is None else budget}_s{seed}"


def cell_path(out: Path, protocol_id: str, method: str, budget: Optional[int], seed: int, variant: str = "") -> Path:
    return Path(out) / "cells" / protocol_id / f"{method}{variant}" / f"{_stem(budget, seed)}.json"


def artifact_path(out: Path, protocol_id: str, method: str, budget: Optional[int], seed: int, variant: str = "") -> Path:
    return Path(out) / "artifacts" / protocol_id / f"{method}{variant}" / f"{_stem(budget, seed)}.pt"


def writable_dir(path: Path, what: str) -> Path:
    """Check, before any work, that ``path`` is (or can be made) a folder this process can write
    into; one clear error otherwise (an existing file, no permission, a read-only disk)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise BenchError(f"{what} {path} is a file, not a folder; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe.{socket.gethostname()}.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BenchError(f"{what} {path} is not writable: {e.strerror or type(e).__name__}") from None
    return path


def atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # host and pid in the temporary name: shards on several machines may write one file (the grid) at once
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_WARNED: set[str] = set()


def _warn_once(path: Path, why: str) -> None:
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        print(f"warning: ignoring {path}: {why} (it counts as missing; a rerun rewrites it)", file=sys.stderr)


def read_json(path: Path) -> Optional[dict]:
    """A stored JSON object, or None when missing, unreadable or not an object (binary bytes, a
    truncated or foreign file, a list): such a file counts as missing, with one warning per path,
    so ``status``, ``report`` and a rerun always work. A half-written file cannot exist."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        _warn_once(path, f"unreadable ({type(e).__name__})")
        return None
    if not isinstance(obj, dict):
        _warn_once(path, f"a JSON {type(obj).__name__}, not an object")
        return None
    return obj


def read_cell(path: Path) -> Optional[dict]:
    """A stored cell record, or None when it is missing or not a cell (see ``read_json``)."""
    rec = read_json(path)
    if rec is not None and not (isinstance(rec.get("key"), str) and isinstance(rec.get("status"), str)):
        _warn_once(path, "not a cell record (no key or status)")
        return None
    return rec


def read_grid(path: Path) -> Optional[dict]:
    """A stored grid (``grids/<protocol_id>.json``), or None when missing or malformed."""
    grid = read_json(path)
    if grid is None:
        return None
    cells = grid.get("cells")
    ok = isinstance(grid.get("protocol_id"), str) and isinstance(cells, list) and all(
        isinstance(c, dict) and {"method", "budget", "selection_seed", "key"} <= set(c) for c in cells)
    if not ok:
        _warn_once(path, "not a grid record")
        return None
    return grid


def covers(rec: Optional[dict], key: str, set_key: Optional[str] = None, eval_seeds=()) -> bool:
    """Whether a stored cell record answers a planned cell: status ok and the same key, or the same
    set (``set_key``) scored under every one of ``eval_seeds`` (and maybe more): a run with fewer eval
    seeds never replaces one with more."""
    if rec is None or rec.get("status") != "ok":
        return False
    return rec.get("key") == key or (bool(set_key) and rec.get("set_key") == set_key
                                     and set(eval_seeds) <= set(rec.get("eval_seeds") or ()))


def status_lines(out: Path) -> tuple[list[str], int]:
    grids = sorted((Path(out) / "grids").glob("*.json"))
    if not grids:
        raise BenchError(f"no runs under {out}; start one with `python -m bench run --out {out}`")
    lines, any_failed = [], False
    for g in grids:
        grid = read_grid(g)
        if not grid:
            lines.append(f"{g}: unreadable grid file (the next run of its protocol rewrites it)")
            continue
        pid = grid["protocol_id"]
        p = grid.get("protocol", {})
        counts: Counter = Counter()
        detail = []
        for c in grid["cells"]:
            rec = read_cell(cell_path(out, pid, c["method"], c["budget"], c["selection_seed"], c.get("variant", "")))
            if rec is None:
                state = "missing"
            elif covers(rec, c["key"], c.get("set_key"), c.get("eval_seeds") or ()):
                state = "done"
            elif rec.get("key") == c["key"]:
                state = "failed"
            else:
                state = "stale"
            counts[state] += 1
            if state != "done":
                b = "full" if c["budget"] is None else c["budget"]
                err = f": {rec.get('error', '')}" if state == "failed" else ""
                detail.append(f"  {state:7s} {c['method']}{c.get('variant', '')} @ {b} seed {c['selection_seed']}{err}")
        any_failed |= counts["failed"] > 0
        lines.append(f"protocol {pid} ({p.get('dataset')}, test split {p.get('test_split')}): "
                     f"{counts['done']} done, {counts['missing'] + counts['stale']} missing, {counts['failed']} failed "
                     f"of {len(grid['cells'])}")
        lines.extend(detail)
    return lines, 1 if any_failed else 0

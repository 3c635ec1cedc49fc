"""Load per-cell result files and pool them into one row per (protocol, method, budget).

A *cell* is one finished (dataset, method, budget, selection seed) run, stored as its own JSON file
under ``<out>/cells/**.json``. A *run* is one evaluation seed of one cell, so a row pools
``selection seeds x eval seeds`` runs; its std is the sample std (ddof=1) over those runs.

This module deliberately does not import ``bench.retrieval`` (which pulls in torch): reports must
be cheap to build.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

KS = (1, 5, 10)
RECALL_METRICS: tuple[str, ...] = tuple(f"{d}_r{k}" for d in ("tr", "ir") for k in KS)
METRICS: tuple[str, ...] = RECALL_METRICS + ("mean",)

GROUP_ORDER: tuple[str, ...] = ("reference", "coreset", "distill")
"""Display order of method groups; unknown groups follow, alphabetically."""

METHOD_ORDER: tuple[str, ...] = ("full", "full_tuned", "random", "herding", "kcenter", "forgetting", "tm")
"""Preferred display order of known methods within a group; others follow, alphabetically."""

NOT_APPLICABLE_PREFIX = "not applicable"


@dataclass
class Row:
    """All results of one method at one budget under one protocol.

    ``n`` counts runs (per-eval-seed metric records of ``ok`` cells, pooled across selection
    seeds); ``mean``/``std``/``values`` are keyed by metric (``tr_r1`` ... ``ir_r10``, ``mean``).
    A row whose cells all failed has ``n == 0`` and NaN statistics.
    """

    protocol_id: str
    dataset: str
    method: str
    group: str
    budget: int | None
    n: int
    mean: dict[str, float]
    std: dict[str, float]
    values: dict[str, list[float]]
    n_cells: int = 0
    """Number of ``ok`` cells pooled."""
    n_failed: int = 0
    """Number of failed cells (excluded from the statistics)."""
    not_applicable: bool = False
    """True when there is no ok cell and every failure says the method is not applicable."""
    errors: list[str] = field(default_factory=list)
    selection_seeds: list[int] = field(default_factory=list)
    protocol: dict[str, Any] = field(default_factory=dict)

    @property
    def is_reference(self) -> bool:
        return self.group == "reference" or self.budget is None

    @property
    def has_results(self) -> bool:
        return self.n > 0


# --------------------------------------------------------------------------------------------
# loading


def load_cells(out_dir: str | Path) -> list[dict]:
    """Read every ``cells/**/*.json`` under ``out_dir`` (sorted by path).

    Unreadable or malformed files are skipped with a ``warnings.warn``; this never raises for a
    bad file. If two files carry the same ``key``, an ``ok`` one wins over a failed one (else the
    later path wins) and a warning names both.
    """
    root = Path(out_dir) / "cells"
    if not root.is_dir():
        return []
    by_key: dict[str, tuple[Path, dict]] = {}
    unkeyed: list[dict] = []
    for path in sorted(root.rglob("*.json")):
        cell = _read_cell(path)
        if cell is None:
            continue
        key = cell.get("key")
        if not key:
            unkeyed.append(cell)
            continue
        if key in by_key:
            old_path, old = by_key[key]
            keep_old = old.get("status") == "ok" and cell.get("status") != "ok"
            warnings.warn(f"cells {old_path} and {path} share key {key}; "
                          f"using {old_path if keep_old else path}", stacklevel=2)
            if keep_old:
                continue
        by_key[key] = (path, cell)
    return [c for _, c in by_key.values()] + unkeyed


def _read_cell(path: Path) -> dict | None:
    """One cell file, or None (with a warning) if it cannot be used."""
    try:
        cell = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(f"skipping unreadable cell file {path}: {e}", stacklevel=3)
        return None
    problem = _cell_problem(cell)
    if problem:
        warnings.warn(f"skipping cell file {path}: {problem}", stacklevel=3)
        return None
    cell.setdefault("_path", str(path))
    return cell


def _cell_problem(cell: Any) -> str | None:
    """Why a parsed cell cannot be aggregated (None if it can)."""
    if not isinstance(cell, dict):
        return "not a JSON object"
    for k in ("status", "protocol_id", "method"):
        if not isinstance(cell.get(k), str):
            return f"missing or invalid {k!r}"
    if cell["status"] == "ok":
        runs = cell.get("metrics_per_seed")
        if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
            return "status ok but no metrics_per_seed"
        for r in runs:
            for m in RECALL_METRICS:
                if not _is_number(r.get(m)):
                    return f"metric {m!r} missing or not a number"
    budget = cell.get("budget")
    if budget is not None and not (isinstance(budget, int) and not isinstance(budget, bool)):
        return f"invalid budget {budget!r}"
    return None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------------------------
# aggregation


def aggregate(cells: Iterable[dict]) -> list[Row]:
    """Group cells by (protocol_id, method, budget) and pool the runs of their ``ok`` cells.

    Rows come sorted by protocol id, group (:data:`GROUP_ORDER`), method (:data:`METHOD_ORDER`)
    and budget. Failed cells are counted in ``n_failed`` and excluded from the statistics.
    """
    groups: dict[tuple[str, str, int | None], list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["protocol_id"], cell["method"], cell.get("budget")), []).append(cell)
    rows = [_make_row(key, members) for key, members in groups.items()]
    rows.sort(key=row_sort_key)
    return rows


def _make_row(key: tuple[str, str, int | None], cells: list[dict]) -> Row:
    protocol_id, method, budget = key
    ok = [c for c in cells if c.get("status") == "ok"]
    failed = [c for c in cells if c.get("status") != "ok"]
    configs = {json.dumps(c.get("method_config") or {}, sort_keys=True) for c in ok}
    if len(configs) > 1:
        warnings.warn(f"protocol {protocol_id}: pooling {method} at budget {budget} over "
                      f"{len(configs)} different method_config values", stacklevel=3)
    runs = [r for c in ok for r in c["metrics_per_seed"]]
    values = {m: [float(_run_metric(r, m)) for r in runs] for m in METRICS}
    errors = [str(c.get("error") or "") for c in failed]
    first = (ok or cells)[0]
    protocol = first.get("protocol") or {}
    return Row(
        protocol_id=protocol_id,
        dataset=str(first.get("dataset") or protocol.get("dataset") or "unknown"),
        method=method,
        group=str(first.get("method_group") or ("reference" if budget is None else "other")),
        budget=budget,
        n=len(runs),
        mean={m: _mean(v) for m, v in values.items()},
        std={m: sample_std(v) for m, v in values.items()},
        values=values,
        n_cells=len(ok),
        n_failed=len(failed),
        not_applicable=not ok and bool(failed) and all(is_not_applicable(c) for c in failed),
        errors=errors,
        selection_seeds=sorted({c.get("selection_seed") for c in ok if c.get("selection_seed") is not None}),
        protocol=protocol,
    )


def _run_metric(run: dict, metric: str) -> float:
    """A run's metric; ``mean`` is recomputed from the six recalls when absent."""
    if metric == "mean" and not _is_number(run.get("mean")):
        return sum(run[m] for m in RECALL_METRICS) / len(RECALL_METRICS)
    return run[metric]


def is_not_applicable(cell: dict) -> bool:
    """A failed cell whose error says the method does not apply (e.g. an unsupported cut)."""
    error = str(cell.get("error") or "").strip().lower()
    return error.startswith(NOT_APPLICABLE_PREFIX) or cell.get("error_type") == "NotApplicable"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def sample_std(values: list[float]) -> float:
    """Sample standard deviation (ddof=1); 0.0 for a single value, NaN for none."""
    n = len(values)
    if n == 0:
        return math.nan
    if n == 1:
        return 0.0
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1))


# --------------------------------------------------------------------------------------------
# ordering helpers shared by tables and plots


def group_rank(group: str) -> tuple[int, str]:
    return (GROUP_ORDER.index(group), "") if group in GROUP_ORDER else (len(GROUP_ORDER), group)


def method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def row_sort_key(row: Row) -> tuple:
    return (row.protocol_id, group_rank(row.group), method_rank(row.method),
            -1 if row.budget is None else row.budget)


def by_protocol(rows: Iterable[Row]) -> dict[str, list[Row]]:
    """Rows split by protocol id (sorted ids; row order kept)."""
    out: dict[str, list[Row]] = {}
    for row in rows:
        out.setdefault(row.protocol_id, []).append(row)
    return dict(sorted(out.items()))

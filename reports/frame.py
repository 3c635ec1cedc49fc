"""The tidy results frame that every table and figure is drawn from.

:func:`load_runs` reads ``<out>/cells/**.json`` into one row per eval-seed run of each ``ok`` cell and
one row per failed cell (status ``failed`` or ``not_applicable``, NaN metrics, its error). A cell is
one (dataset, method, budget, selection seed) run of the grid; :func:`summarize` pools a table row's
runs (``selection seeds x eval seeds``) into mean and sample std (ddof=1). Unreadable or malformed
cell files are skipped with a warning, never raised. No torch here: reports must be cheap to build.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

KS = (1, 5, 10)
RECALL_METRICS: tuple[str, ...] = tuple(f"{d}_r{k}" for d in ("tr", "ir") for k in KS)
METRICS: tuple[str, ...] = RECALL_METRICS + ("mean",)
GROUP_ORDER: tuple[str, ...] = ("reference", "coreset", "distill")
"""Display order of method groups; unknown groups follow, alphabetically."""
METHOD_ORDER: tuple[str, ...] = ("full", "full_tuned", "random", "herding", "kcenter", "forgetting", "tm")
"""Preferred display order of known methods within a group; others follow, alphabetically."""
NOT_APPLICABLE_PREFIX = "not applicable"
ROW_KEYS = ["protocol_id", "method", "budget"]
"""One table row: a method at one budget (NA for the full-data references) under one protocol."""
RUN_COLUMNS = ["protocol_id", "dataset", "method", "group", "budget", "selection_seed", "eval_seed",
               *METRICS, "storage_bytes", "seconds", "status", "error", "cell", "protocol",
               "view", "treated_as", "treated", "best_mean", "transfer_mean", "transfer_head", "n_pairs", "pair_bytes"]
_INTS = ("budget", "selection_seed", "eval_seed", "storage_bytes", "n_pairs", "pair_bytes")


# --------------------------------------------------------------------------------------------
# reading cell files


def load_cells(out_dir: str | Path) -> list[dict]:
    """Every usable ``cells/**/*.json`` under ``out_dir`` (sorted by path).

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
    """Why a parsed cell cannot be used (None if it can)."""
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


def is_not_applicable(cell: dict) -> bool:
    """A failed cell whose error says the method does not apply (e.g. an unsupported cut)."""
    error = str(cell.get("error") or "").strip().lower()
    return error.startswith(NOT_APPLICABLE_PREFIX) or cell.get("error_type") == "NotApplicable"


# --------------------------------------------------------------------------------------------
# the runs frame


def load_runs(out_dir: str | Path) -> pd.DataFrame:
    """The runs frame of every usable cell file under ``out_dir`` (see :func:`runs_frame`)."""
    return runs_frame(load_cells(out_dir))


def method_label(method: str, variant_label: str = "") -> str:
    """A table row's method name: the method, and the settings that differ from its defaults."""
    return f"{method} [{variant_label}]" if variant_label else method


def runs_frame(cells: list[dict]) -> pd.DataFrame:
    """One row per eval-seed run of each ``ok`` cell, one per failed cell, in cell order.

    Columns (:data:`RUN_COLUMNS`): protocol id, dataset, method (with its non-default settings in
    brackets; a set scored plainly besides natively also gives rows ``<method> (plain)``), group,
    budget (NA for full data), selection and eval seed, the six recalls and their ``mean``
    (recomputed when a run lacks it), ``storage_bytes`` and ``seconds`` (build + eval; time to
    failure for a failed cell) of the whole cell, ``status`` (``ok``, ``failed``,
    ``not_applicable``), ``error``, ``cell`` (its key), ``protocol`` (JSON); for the fairness views:
    ``view`` (``""``, or ``treated``/``bytes`` for cells planned only for them, which the main tables
    leave out), ``treated_as`` (a treated random cell: the method whose treatment it took),
    ``treated`` (the set trains with learned step sizes or a loss of its own), ``best_mean`` (the
    best recorded score of the run's curve), ``transfer_mean`` and ``transfer_head`` (the transfer
    student's score), ``n_pairs`` and ``pair_bytes``. Warns when one row pools cells with different
    method configs.
    """
    records, configs = [], {}
    for cell in cells:
        protocol = cell.get("protocol") if isinstance(cell.get("protocol"), dict) else {}
        budget = cell.get("budget")
        label = method_label(cell["method"], str(cell.get("variant_label") or ""))
        t = cell.get("treatment") if isinstance(cell.get("treatment"), dict) else {}
        learned = (protocol.get("recipe") or {}).get("lr_policy", "learned") == "learned"
        info = cell.get("info") if isinstance(cell.get("info"), dict) else {}
        treated = bool(cell.get("native")) or (learned and (cell.get("learned_lr") is not None
                                                             or info.get("learned_lr_text") is not None))
        base = {"protocol_id": cell["protocol_id"], "method": label, "budget": budget,
                "dataset": str(cell.get("dataset") or protocol.get("dataset") or "unknown"),
                "group": str(cell.get("method_group") or ("reference" if budget is None else "other")),
                "selection_seed": _whole(cell.get("selection_seed")),
                "storage_bytes": _whole(cell.get("storage_bytes")), "seconds": _seconds(cell),
                "cell": str(cell.get("key") or cell.get("_path")), "protocol": json.dumps(protocol),
                "view": str(cell.get("view") or ""),
                "treated_as": method_label(str(t["of"]), str(t.get("of_label") or "")) if t.get("of") else "",
                "treated": treated and not t, "n_pairs": _whole(cell.get("n_pairs")),
                "pair_bytes": _whole(cell.get("pair_bytes"))}
        if cell["status"] != "ok":
            status = "not_applicable" if is_not_applicable(cell) else "failed"
            records.append(base | {"status": status, "error": str(cell.get("error") or "")})
            continue
        key = (cell["protocol_id"], label, budget, base["view"], base["treated_as"])
        configs.setdefault(key, set()).add(json.dumps(cell.get("method_config") or {}, sort_keys=True))
        # a set with its own treatment (learned targets) is also scored plainly: a row "<method> (plain)"
        plain = (cell.get("plain") or {}).get("metrics_per_seed") if isinstance(cell.get("plain"), dict) else None
        transfer = _transfer(cell)
        for row_label, per_seed, row_treated in ((label, cell["metrics_per_seed"], base["treated"]),
                                                 (f"{label} (plain)", plain, False)):
            for run in per_seed or []:
                mean = _run_mean(run)
                seed = _whole(run.get("seed"))
                tr = transfer[1].get(seed) if row_label == label else None
                records.append(base | {m: float(run[m]) for m in RECALL_METRICS}
                               | {"method": row_label, "mean": mean, "eval_seed": seed, "status": "ok",
                                  "treated": row_treated, "best_mean": _best(run, mean),
                                  "transfer_mean": math.nan if tr is None else tr,
                                  "transfer_head": transfer[0] if tr is not None else ""})
    for (pid, method, budget, _, _), found in configs.items():
        if len(found) > 1:
            warnings.warn(f"protocol {pid}: pooling {method} at budget {budget} over "
                          f"{len(found)} different method_config values", stacklevel=3)
    runs = pd.DataFrame.from_records(records, columns=RUN_COLUMNS)
    runs = runs.astype({c: "Int64" for c in _INTS} | {m: "float64" for m in (*METRICS, "seconds", "best_mean",
                                                                             "transfer_mean")})
    return runs.fillna({"view": "", "treated_as": "", "transfer_head": ""}).astype({"treated": "boolean"})


def _run_mean(run: dict) -> float:
    mean = run.get("mean")
    return float(mean) if _is_number(mean) else sum(float(run[m]) for m in RECALL_METRICS) / len(RECALL_METRICS)


def _best(run: dict, last: float) -> float:
    """The best mean recall among the run's recorded curve points (NaN without a curve)."""
    curve = run.get("curve")
    if not isinstance(curve, list) or not curve:
        return math.nan
    points = [_run_mean(p) for p in curve if isinstance(p, dict) and all(_is_number(p.get(m)) for m in RECALL_METRICS)]
    return max(points + [last]) if points else math.nan


def _transfer(cell: dict) -> tuple[str, dict]:
    """(the transfer student's head, {eval seed: its mean recall}) of a cell; empty without one."""
    t = cell.get("transfer") if isinstance(cell.get("transfer"), dict) else {}
    per_seed = t.get("metrics_per_seed") if isinstance(t.get("metrics_per_seed"), list) else []
    out = {_whole(r.get("seed")): _run_mean(r) for r in per_seed
           if isinstance(r, dict) and all(_is_number(r.get(m)) for m in RECALL_METRICS)}
    return str((t.get("student") or {}).get("head", "")), out


def _whole(x: Any) -> int | None:
    return int(x) if _is_number(x) and float(x).is_integer() else None


def _seconds(cell: dict) -> float:
    t = cell.get("timings") if isinstance(cell.get("timings"), dict) else {}
    parts = [t[k] for k in ("build_s", "eval_s") if _is_number(t.get(k))]
    if parts:
        return float(sum(parts))
    return float(t["failed_after_s"]) if _is_number(t.get("failed_after_s")) else math.nan


# --------------------------------------------------------------------------------------------
# pooling runs into table rows


def mean(values: Iterable[float]) -> float:
    """Mean of the non-NaN values summed left to right (as Python's ``sum``), NaN for none.

    Used instead of pandas' compensated group sums so that a mean on a rounding boundary of the
    tables (one decimal, six in the CSV) always rounds the same way for the same stored runs.
    """
    v = [float(x) for x in values if not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


def sample_std(values: Iterable[float]) -> float:
    """Sample std (ddof=1, two-pass) of the non-NaN values; 0.0 for a single value, NaN for none."""
    v = [float(x) for x in values if not math.isnan(x)]
    if len(v) < 2:
        return 0.0 if v else math.nan
    mu = mean(v)
    return math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1))


def metric_stats(runs: pd.DataFrame) -> pd.DataFrame:
    """Long format: one row per (protocol_id, method, budget, metric) that has ok runs, in order of
    first appearance: ``dataset`` and ``group`` (of the first ok cell), ``n`` runs, ``mean``, ``std``
    (:func:`sample_std`) and ``values`` (the per-run values, in run order).
    """
    ok = runs[runs["status"].eq("ok")]
    long = ok.melt(id_vars=[*ROW_KEYS, "dataset", "group"], value_vars=list(METRICS), var_name="metric")
    return (long.groupby(ROW_KEYS + ["metric"], dropna=False, sort=False)
            .agg(dataset=("dataset", "first"), group=("group", "first"), n=("value", "count"),
                 mean=("value", mean), std=("value", sample_std), values=("value", list))
            .reset_index())


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (protocol_id, method, budget), in display order (:func:`ordered`).

    ``dataset``, ``group`` and ``protocol`` come from the row's first ok cell (else its first cell);
    ``n`` counts ok runs, ``n_cells`` ok cells, ``n_failed`` failed cells (excluded from the
    statistics); ``not_applicable`` is true when no cell is ok and every failure says the method does
    not apply; ``error`` is the first non-empty error. Then per metric: ``<metric>`` (mean) and
    ``<metric>_std``. A row whose cells all failed has ``n == 0`` and NaN statistics.
    """
    failed = runs["status"].ne("ok")
    out = (runs.assign(failed=failed, na=runs["status"].eq("not_applicable"),
                       ok_cell=runs["cell"].where(~failed), error=runs["error"].where(runs["error"].ne("")))
           .sort_values("failed", kind="stable")  # ok cells first: "first" below is the first ok cell
           .groupby(ROW_KEYS, dropna=False, sort=False)
           .agg(dataset=("dataset", "first"), group=("group", "first"), protocol=("protocol", "first"),
                n=("tr_r1", "count"), n_cells=("ok_cell", "nunique"), n_failed=("failed", "sum"),
                n_na=("na", "sum"), error=("error", "first"),
                **{m: (m, mean) for m in METRICS}, **{f"{m}_std": (m, sample_std) for m in METRICS})
           .reset_index())
    out["not_applicable"] = out["n_cells"].eq(0) & out["n_failed"].gt(0) & out["n_na"].eq(out["n_failed"])
    return ordered(out.drop(columns="n_na"))


def is_reference(rows: pd.DataFrame) -> pd.Series:
    """Rows of the full-data references (group ``reference``, or no budget)."""
    return rows["group"].eq("reference") | rows["budget"].isna()


# --------------------------------------------------------------------------------------------
# display order shared by tables and plots


def _rank(order: tuple[str, ...], name: str) -> str:
    """Sortable text: names in ``order`` first (in that order), then the others alphabetically."""
    return f"{order.index(name):03d}" if name in order else f"{len(order):03d}{name}"


_SORT_KEYS = {"group": lambda c: c.map(lambda g: _rank(GROUP_ORDER, g)),
              "method": lambda c: c.map(lambda m: _rank(METHOD_ORDER, m)),
              "budget": lambda c: c.fillna(-1), "metric": lambda c: c.map(METRICS.index)}


def ordered(df: pd.DataFrame, by: tuple[str, ...] = ("protocol_id", "group", "method", "budget")) -> pd.DataFrame:
    """``df`` sorted (stably) for display: by protocol id, then :data:`GROUP_ORDER`, then
    :data:`METHOD_ORDER`, then budget (full data first); only the columns of ``by`` present count."""
    by = [c for c in by if c in df.columns]
    key = lambda col: _SORT_KEYS.get(col.name, lambda c: c)(col)  # noqa: E731
    return df.sort_values(by, key=key, kind="stable").reset_index(drop=True)

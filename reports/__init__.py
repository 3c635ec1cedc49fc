"""Reports: tables and figures from the stored per-cell result files of a vlbench output directory.

Entry point: :func:`write_report`. Building blocks: :mod:`reports.frame` (cell files -> one pandas
row per eval-seed run, pooled per table row), :mod:`reports.tables` (markdown / LaTeX / CSV),
:mod:`reports.plots` (recall vs budget, recall vs bytes), :mod:`reports.fairness` (gain over random
under the same treatment, best-of-test inflation, transfer, budgets by bytes, published means beside
ours), :mod:`reports.published` (published numbers, never in a ratio). The package reads stored results only and never runs or imports a method: from the
project it may import :mod:`bench.errors` and nothing else.
"""
from __future__ import annotations

import re
from pathlib import Path

__all__ = ["write_report"]


def write_report(out_dir: str | Path, report_dir: str | Path | None = None,
                 include_published: bool = False) -> list[Path]:
    """Write one table set and figure per protocol id, the runs frame, and a ``README.md`` index.

    For each protocol: ``<report_dir>/<dataset>_<protocol_id>.{md,tex,csv,png,pdf}``, its fairness
    views ``..._fairness.{md,tex,csv}`` (:mod:`reports.fairness`) and ``..._bytes.png``; for all of
    them ``runs.csv`` (one row per eval-seed run, see :func:`reports.frame.runs_frame`) and
    ``runs.parquet`` when pyarrow is installed. ``report_dir`` defaults to ``<out_dir>/report``.
    Published numbers (Flickr30K, COCO) are added as labelled rows only with ``include_published``.
    Returns the written paths, index last. Raises :class:`bench.errors.BenchError` when ``out_dir``
    holds no successful cell.
    """
    from bench.errors import BenchError
    from reports.frame import load_runs
    from reports.fairness import fairness_csv, fairness_latex, fairness_markdown
    from reports.plots import save_bytes_figure, save_figure
    from reports.tables import describe, protocol_summary, to_csv, to_latex, to_markdown

    out_dir = Path(out_dir)
    report_dir = Path(report_dir) if report_dir is not None else out_dir / "report"
    runs = load_runs(out_dir)
    if not runs["status"].eq("ok").any():
        raise BenchError(f"no results under {out_dir}; run `python -m bench run` first")

    report_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    index: list[tuple[str, dict, list[Path]]] = []
    for pid, pruns in runs.groupby("protocol_id", sort=True):
        main = pruns[pruns["view"].eq("")]  # cells planned only for the fairness views are not table rows
        if not main["status"].eq("ok").any():
            continue  # only failures under this protocol: nothing to tabulate
        info = describe(protocol_summary(main))
        stem = report_dir / f"{_safe(info['dataset'])}_{_safe(pid)}"
        files = []
        title = f"{info['dataset']} · test split: {info['test_split']} · protocol {pid}"
        for suffix, text in ((".md", to_markdown(main, include_published)),
                             (".tex", to_latex(main, include_published)),
                             (".csv", to_csv(main, include_published)),
                             ("_fairness.md", fairness_markdown(pruns, title)),
                             ("_fairness.tex", fairness_latex(pruns, title)),
                             ("_fairness.csv", fairness_csv(pruns))):
            path = stem.parent / f"{stem.name}{suffix}"
            path.write_text(text, encoding="utf-8")
            files.append(path)
        files += save_figure(main, stem) + save_bytes_figure(pruns, stem)
        written += files
        index.append((pid, info, files))

    frames = [report_dir / "runs.csv"]
    runs.to_csv(frames[0], index=False, lineterminator="\n")
    try:
        import pyarrow  # noqa: F401  (optional: parquet only where it is installed)
    except ImportError:
        pass
    else:
        frames.append(report_dir / "runs.parquet")
        runs.to_parquet(frames[1], index=False)
    written += frames

    readme = report_dir / "README.md"
    readme.write_text(_index_markdown(out_dir, index, frames), encoding="utf-8")
    written.append(readme)
    return written


def _safe(name: str) -> str:
    """A file-name-safe version of a dataset name or protocol id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.") or "unnamed"


def _index_markdown(out_dir: Path, index: list, frames: list[Path]) -> str:
    from reports.tables import ALL_PAIRS

    lines = ["# vlbench report", "", f"Results from `{out_dir}`, one table set per protocol "
             "(tables only ever compare cells of one protocol).", "",
             "| Dataset | Test split | Protocol | Methods | Budgets | Runs per cell | Failed cells | Files |",
             "|---|---|---|---|---|---|---:|---|"]
    for pid, info, files in index:
        budgets = ", ".join(b for b in info["blocks"] if b != ALL_PAIRS) or "–"
        links = " · ".join(f"[{p.suffix[1:] if p.stem.endswith(_safe(pid)) else p.name.rsplit('_', 1)[-1]}]"
                           f"({p.name})" for p in files)
        lines.append(f"| {info['dataset']} | {info['test_split']} | `{pid}` | {', '.join(info['methods'])} "
                     f"| {budgets} | {info['runs_text']} | {info['failed']} | {links} |")
    lines += ["", "All runs of all protocols, one row per eval-seed run (a failed cell is one row with its "
              "error): " + " · ".join(f"[{p.suffix[1:]}]({p.name})" for p in frames), ""]
    for pid, info, files in index:
        png = next((p for p in files if p.suffix == ".png"), None)
        lines += [f"## {info['dataset']} · protocol `{pid}`", ""]
        proto = ", ".join(f"{k}={v}" for k, v in info["protocol"].items())
        if proto:
            lines += [f"Protocol: {proto}", ""]
        if png is not None:
            lines += [f"![{info['dataset']} {pid}]({png.name})", ""]
    return "\n".join(lines) + "\n"

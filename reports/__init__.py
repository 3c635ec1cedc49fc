"""Reports: tables and figures from the per-cell result files of a vlbench output directory.

Entry point: :func:`write_report`. Building blocks: :mod:`reports.aggregate` (load + pool cells),
:mod:`reports.tables` (markdown / LaTeX / CSV), :mod:`reports.plots` (recall vs budget),
:mod:`reports.published` (the paper's numbers, shown only on request).
"""
from __future__ import annotations

import re
from pathlib import Path

__all__ = ["write_report"]


def write_report(out_dir: str | Path, report_dir: str | Path | None = None,
                 include_published: bool = False) -> list[Path]:
    """Write one table set and figure per protocol id, plus a ``README.md`` index.

    For each protocol: ``<report_dir>/<dataset>_<protocol_id>.{md,tex,csv,png,pdf}``;
    ``report_dir`` defaults to ``<out_dir>/report``. Published numbers (Flickr30K, COCO) are added
    as labelled rows only with ``include_published``. Returns the written paths, index last.
    Raises :class:`bench.errors.BenchError` when ``out_dir`` holds no successful cell.
    """
    from bench.errors import BenchError
    from reports.aggregate import aggregate, by_protocol, load_cells
    from reports.plots import save_figure
    from reports.tables import build_table, to_csv, to_latex, to_markdown

    out_dir = Path(out_dir)
    report_dir = Path(report_dir) if report_dir is not None else out_dir / "report"
    rows = aggregate(load_cells(out_dir))
    if not any(r.has_results for r in rows):
        raise BenchError(f"no results under {out_dir}; run `python -m bench run` first")

    report_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    index: list[tuple[str, object, list[Path]]] = []
    for pid, prows in by_protocol(rows).items():
        if not any(r.has_results for r in prows):
            continue  # only failures under this protocol: nothing to tabulate
        table = build_table(prows, include_published=include_published)
        stem = report_dir / f"{_safe(table.dataset)}_{_safe(pid)}"
        files = []
        for suffix, text in ((".md", to_markdown(table)), (".tex", to_latex(table)),
                             (".csv", to_csv(prows, include_published=include_published))):
            path = stem.parent / f"{stem.name}{suffix}"
            path.write_text(text, encoding="utf-8")
            files.append(path)
        files += save_figure(prows, stem)
        written += files
        index.append((pid, table, files))

    readme = report_dir / "README.md"
    readme.write_text(_index_markdown(out_dir, index), encoding="utf-8")
    written.append(readme)
    return written


def _safe(name: str) -> str:
    """A file-name-safe version of a dataset name or protocol id."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.") or "unnamed"


def _index_markdown(out_dir: Path, index: list) -> str:
    lines = ["# vlbench report", "", f"Results from `{out_dir}`, one table set per protocol "
             "(tables only ever compare cells of one protocol).", "",
             "| Dataset | Test split | Protocol | Methods | Budgets | Runs per cell | Failed cells | Files |",
             "|---|---|---|---|---|---|---:|---|"]
    for pid, table, files in index:
        methods = [ln.label for s in table.sections if s.group != "published" for ln in s.lines]
        budgets = ", ".join(str(b) for b in table.blocks if b is not None) or "–"
        failed = sum(r.n_failed for r in table.failures)
        links = " · ".join(f"[{p.suffix[1:]}]({p.name})" for p in files)
        lines.append(f"| {table.dataset} | {table.test_split} | `{pid}` | {', '.join(methods)} | {budgets} "
                     f"| {table.runs_text()} | {failed} | {links} |")
    lines.append("")
    for pid, table, files in index:
        png = next((p for p in files if p.suffix == ".png"), None)
        lines += [f"## {table.dataset} · protocol `{pid}`", ""]
        proto = ", ".join(f"{k}={v}" for k, v in table.protocol.items())
        if proto:
            lines += [f"Protocol: {proto}", ""]
        if png is not None:
            lines += [f"![{table.dataset} {pid}]({png.name})", ""]
    return "\n".join(lines) + "\n"

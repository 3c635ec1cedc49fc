"""Recall-vs-budget figures, one per protocol id.

Three panels (TR R@1, IR R@1, mean of the six recalls) against the budget on a log x axis whose
ticks are the budgets actually run; one line per method with std error bars, and the full-data
value as a dashed horizontal line. Drawn from the runs frame of :mod:`reports.frame` with the Agg
canvas directly (no pyplot, so importing this module never changes the caller's matplotlib backend).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

from reports.frame import is_reference, ordered
from reports.tables import display_name, protocol_summary

PANELS: tuple[tuple[str, str], ...] = (
    ("tr_r1", "TR R@1 (image→text)"),
    ("ir_r1", "IR R@1 (text→image)"),
    ("mean", "Mean of six recalls"),
)
GROUP_STYLE = {"coreset": dict(linestyle="-", linewidth=1.5), "distill": dict(linestyle="-", linewidth=2.4)}
DEFAULT_STYLE = dict(linestyle="--", linewidth=1.5)
MARKERS = {"coreset": "oDv^<>ph", "distill": "s*PX"}
DPI = 150
LOG_Y_RATIO = 8.0
"""Use a log y axis when the largest plotted value (incl. full data) exceeds the smallest positive
mean by this factor, so that subset methods far below the full-data line stay readable."""


def _series(summary: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Non-reference rows with results, by method (display order), each sorted by budget."""
    rows = summary[~is_reference(summary) & summary["n"].gt(0)]
    return {method: rs.astype({"budget": float}) for method, rs in rows.groupby("method", sort=False)}


def make_figure(runs: pd.DataFrame) -> Figure:
    """The 3-panel recall-vs-budget figure for the runs of one protocol."""
    summary = protocol_summary(runs)
    series = _series(summary)
    has = summary["n"].gt(0)
    references = ordered(summary[is_reference(summary) & has], by=("method",))
    budgets = sorted({int(b) for rs in series.values() for b in rs["budget"]})
    first = summary[has].iloc[0] if has.any() else summary.iloc[0]

    fig = Figure(figsize=(13, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PANELS))
    colors = _colors(list(series))
    markers = _markers(series)
    log_y = _use_log_y(series, references)
    # small multiplicative x offsets so error bars of different methods do not sit on each other
    offsets = {m: 10 ** (0.012 * (i - (len(series) - 1) / 2)) for i, m in enumerate(series)}
    for ax, (metric, title) in zip(axes, PANELS):
        for method, rs in series.items():
            style = GROUP_STYLE.get(rs["group"].iloc[0], DEFAULT_STYLE)
            ax.errorbar((rs["budget"] * offsets[method]).tolist(), rs[metric].tolist(),
                        yerr=rs[f"{metric}_std"].tolist(), label=display_name(method), color=colors[method],
                        marker=markers[method], capsize=3, markersize=5, elinewidth=1, **style)
        for (_, ref), dash in zip(references.iterrows(), ((0, (5, 3)), (0, (1, 2)))):
            value = ref[metric]
            ax.axhline(value, color="0.25", linestyle=dash, linewidth=1.2,
                       label=f"{display_name(ref['method'])} (no budget; n={ref['n']})")
            # labelled at the left, where the smallest budgets (lowest values) usually are
            ax.annotate(f"{display_name(ref['method']).lower()} {value:.1f}", xy=(0.01, value),
                        xycoords=("axes fraction", "data"), xytext=(0, 3), textcoords="offset points",
                        ha="left", va="bottom", fontsize=8, color="0.2",
                        bbox=dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none", alpha=0.7))
        ax.set_title(title)
        ax.set_xlabel("budget (image–text pairs)")
        _budget_axis(ax, budgets)
        _value_axis(ax, log_y)
        ax.grid(True, which="major", alpha=0.3)
    ns = sorted({n for rs in series.values() for n in rs["n"]})
    n_text = (f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]}") if ns else "0"
    test_split = json.loads(first["protocol"]).get("test_split", "test")
    fig.suptitle(f"{first['dataset']} (test split: {test_split}) · protocol {first['protocol_id']} · "
                 f"mean ± sample std over n = {n_text} runs (selection × eval seeds)", fontsize=11)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 7), frameon=False)
    return fig


def _budget_axis(ax, budgets: list[int]) -> None:
    """Log x axis with exactly the budgets as labelled ticks (a little margin either side)."""
    ax.set_xscale("log")
    if not budgets:
        return
    lo, hi = min(budgets), max(budgets)
    pad = 10 ** (0.08 * max(math.log10(hi / lo), 0.5))
    ax.set_xlim(lo / pad, hi * pad)
    ax.xaxis.set_major_locator(FixedLocator(budgets))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(b) for b in budgets])


def _use_log_y(series: dict[str, pd.DataFrame], references: pd.DataFrame) -> bool:
    """Whether the values span so much that a linear axis would squash the small ones."""
    metrics = [m for m, _ in PANELS]
    means = [v for rs in [*series.values(), references] for v in rs[metrics].to_numpy().ravel().tolist()]
    if not means or min(means) <= 0:
        return False  # a zero recall cannot be shown on a log axis
    return max(means) / min(means) > LOG_Y_RATIO


def _value_axis(ax, log_y: bool) -> None:
    """Recall axis: linear from 0, or log with plain-number tick labels."""
    if not log_y:
        ax.set_ylabel("recall (%)")
        _, top = ax.get_ylim()
        ax.set_ylim(-0.02 * top, 1.05 * top)  # a zero recall stays visible; headroom for the label
        return
    ax.set_yscale("log", nonpositive="clip")
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, top * 1.35)
    ax.set_ylabel("recall (%, log scale)")
    decades = math.log10(top * 1.35 / bottom)
    subs = (1.0, 2.0, 5.0) if decades > 1.3 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _markers(series: dict[str, pd.DataFrame]) -> dict[str, str]:
    """Distinct markers per method (circles-ish for coresets, squares-ish for distillation)."""
    used: dict[str, int] = {}
    out = {}
    for method, rs in series.items():
        group = rs["group"].iloc[0]
        pool = MARKERS.get(group, "^v<>")
        i = used.get(group, 0)
        used[group] = i + 1
        out[method] = pool[i % len(pool)]
    return out


def _colors(methods: list[str]) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def save_figure(runs: pd.DataFrame, stem: str | Path) -> list[Path]:
    """Write ``<stem>.png`` (dpi 150) and ``<stem>.pdf`` of one protocol's runs; returns both paths."""
    fig = make_figure(runs)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=DPI)
    return paths


def make_bytes_figure(runs: pd.DataFrame) -> Figure:
    """Mean recall against storage bytes (log x) for every method and budget of one protocol."""
    from reports.fairness import bytes_points

    points = bytes_points(runs)
    fig = Figure(figsize=(6.5, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    series = {m: p.sort_values("storage_bytes") for m, p in points.groupby("method", sort=False)}
    colors = _colors(list(series))
    for method, p in series.items():
        group = p["group"].iloc[0]
        ax.plot(p["storage_bytes"], p["mean"], marker="o" if group == "coreset" else "s", color=colors[method],
                label=display_name(method), **GROUP_STYLE.get(group, DEFAULT_STYLE))
    ax.set_xscale("log")
    ax.set_xlabel("storage (bytes, log scale)")
    ax.set_ylabel("mean of six recalls (%)")
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=7, ncol=2)
    return fig


def save_bytes_figure(runs: pd.DataFrame, stem: str | Path) -> list[Path]:
    """Write ``<stem>_bytes.png`` (dpi 150) of one protocol's runs."""
    stem = Path(stem)
    path = stem.parent / f"{stem.name}_bytes.png"
    make_bytes_figure(runs).savefig(path, dpi=DPI)
    return [path]

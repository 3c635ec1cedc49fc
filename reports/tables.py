"""Paper-style result tables of one protocol: markdown, LaTeX booktabs and long-format CSV.

Layout: the full-data references, then coreset methods, then distillation methods, each group under
its own header; columns are budget x {TR, IR} x R@1/R@5/R@10, each cell ``mean ± std`` (one
decimal). The full-data rows have no budget, so their values are repeated under every budget (the
notes say so). All of it is drawn from the runs frame of :mod:`reports.frame`; a markdown or LaTeX
table takes the runs of exactly one protocol id.
"""
from __future__ import annotations

import json
import re

import pandas as pd

from reports import published as pub
from reports.frame import KS, RECALL_METRICS, is_reference, metric_stats, ordered, summarize

DASH = "–"
NA = "n/a"
ALL_PAIRS = "all pairs"
"""The one column block of a table that has only full-data rows."""
DISPLAY_NAMES = {"full": "Full data", "full_tuned": "Full data (own recipe)", "random": "Random",
                 "herding": "Herding", "kcenter": "K-Center", "forgetting": "Forgetting", "tm": "TM (distilled)"}
GROUP_TITLES = {"reference": "Reference", "coreset": "Coreset selection", "distill": "Dataset distillation",
                "published": f"Published ({pub.SOURCE}; other protocol, not comparable)"}
PUBLISHED_NAMES = {"tm": "TM"}  # avoid "TM (distilled) (published, ...)"
DIRECTIONS = (("tr", "TR"), ("ir", "IR"))
LINE = ["group", "method", "label", "kind"]
"""Index of a table grid: one table line per (group, method); kind is reference, method or published."""
CSV_COLUMNS = ["protocol_id", "dataset", "method", "group", "budget", "metric", "n", "mean", "std", "values"]


def display_name(method: str) -> str:
    return DISPLAY_NAMES.get(method, method)


# --------------------------------------------------------------------------------------------
# one protocol's table as frames


def protocol_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """:func:`~reports.frame.summarize` of runs that must hold exactly one protocol id."""
    pids = sorted(runs["protocol_id"].unique())
    if len(pids) != 1:
        raise ValueError(f"a table needs the runs of exactly one protocol, got {pids}")
    return summarize(runs)


def describe(summary: pd.DataFrame) -> dict:
    """What titles, captions and the report index say about one protocol's summary."""
    has = summary["n"].gt(0)
    first = summary[has].iloc[0] if has.any() else summary.iloc[0]
    protocol = json.loads(first["protocol"])
    ref = is_reference(summary)
    method_ns, reference_ns = summary.loc[has & ~ref, "n"].tolist(), summary.loc[has & ref, "n"].tolist()
    ns = method_ns or reference_ns
    n_text = f"n = {_range_text(ns)} run{'' if set(ns) == {1} else 's'} per cell"
    runs_text = _range_text(ns)
    if method_ns and reference_ns and set(reference_ns) != set(method_ns):
        n_text += f"; full data: n = {_range_text(reference_ns)}"
        runs_text += f" (full data: {_range_text(reference_ns)})"
    blocks = [str(b) for b in sorted(int(b) for b in summary["budget"].dropna().unique())] or [ALL_PAIRS]
    return {"protocol_id": first["protocol_id"], "dataset": first["dataset"], "protocol": protocol,
            "test_split": str(protocol.get("test_split", "test")), "blocks": blocks,
            "methods": summary.drop_duplicates(["group", "method"])["method"].map(display_name).tolist(),
            "n_text": n_text, "runs_text": runs_text, "failed": int(summary["n_failed"].sum())}


def _range_text(ns: list[int]) -> str:
    lo, hi = (min(ns), max(ns)) if ns else (0, 0)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def table_grid(summary: pd.DataFrame, blocks: list[str], include_published: bool = False) -> pd.DataFrame:
    """The table body: one row per line (index :data:`LINE`, display order), columns (field, block,
    metric) with field ``mean``, ``std`` (NaN for published numbers) and ``status`` (``ok``, ``na``
    for not applicable, ``missing``). Reference and published full-data rows fill every block."""
    lines = summary.assign(label=summary["method"].map(display_name),
                           kind=is_reference(summary).map({True: "reference", False: "method"}),
                           status=summary["n"].gt(0).map({True: "ok", False: "missing"}))
    lines["status"] = lines["status"].mask(summary["not_applicable"], "na")
    lines["kind"] = lines.groupby(["group", "method"], sort=False)["kind"].transform("first")
    if include_published:
        published = pub.published_rows(describe(summary)["dataset"])
        published = published.assign(group="published", kind="published", status="ok", label=[
            f"{PUBLISHED_NAMES.get(m, display_name(m))} {pub.LABEL}" for m in published["method"]])
        lines = pd.concat([lines, published], ignore_index=True)
    lines["order"] = range(len(lines))
    spread = is_reference(lines)
    placed = pd.concat([lines[spread].merge(pd.DataFrame({"block": blocks}), how="cross"),
                        lines[~spread].assign(block=lines["budget"].astype(str))])
    placed = (placed[placed["block"].isin(blocks)].sort_values("order", kind="stable")
              .drop_duplicates(["group", "method", "block"], keep="last").reset_index(drop=True))
    index = pd.MultiIndex.from_frame(placed[LINE].drop_duplicates())
    columns = pd.MultiIndex.from_product([blocks, RECALL_METRICS], names=["block", "metric"])

    def wide(values: pd.DataFrame) -> pd.DataFrame:
        frame = pd.concat([placed[LINE + ["block"]], values], axis=1)
        return (frame.pivot(index=LINE, columns="block", values=list(RECALL_METRICS))
                .swaplevel(axis=1).reindex(index=index, columns=columns))

    std = placed.reindex(columns=[f"{m}_std" for m in RECALL_METRICS]).set_axis(RECALL_METRICS, axis=1)
    status = pd.DataFrame({m: placed["status"] for m in RECALL_METRICS})
    return pd.concat({"mean": wide(placed[list(RECALL_METRICS)]), "std": wide(std),
                      "status": wide(status).fillna("missing")}, axis=1)


def _cell_text(grid: pd.DataFrame, mean_text: pd.DataFrame, pm: str, dash: str) -> pd.DataFrame:
    """``mean<pm>std`` (just the mean where there is no std), ``n/a`` or ``dash`` per table cell."""
    text = mean_text.where(grid["std"].isna(), mean_text + pm + grid["std"].map(_fmt))
    return text.mask(grid["status"].eq("na"), NA).mask(grid["status"].eq("missing"), dash)


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def _notes(groups: pd.Index) -> list[str]:
    """Plain-text notes shared by the markdown and LaTeX outputs."""
    notes = [
        "Recall in percent, mean ± std, where std is the sample std (ddof=1) over runs "
        "= selection seeds × eval seeds.",
        "TR = text retrieval (image→text), IR = image retrieval (text→image); "
        "budget = number of image–text pairs kept.",
    ]
    if "reference" in groups:
        notes.append("Full data trains on the whole training split and has no budget; "
                     "its values are repeated under every budget.")
    notes.append(f"{DASH} = no result; {NA} = method not applicable under this protocol.")
    if "published" in groups:
        notes.append(f"Rows marked {pub.LABEL} are the numbers published in {pub.SOURCE}, obtained "
                     "with different encoders and training; they are not comparable with this "
                     "protocol and are shown for orientation only.")
    return notes


def _failure_notes(summary: pd.DataFrame) -> list[str]:
    out = []
    for (_, r), ref in zip(summary.iterrows(), is_reference(summary)):
        if not r["n_failed"]:
            continue
        where = "full data" if ref else f"{display_name(r['method'])} @ {r['budget']}"
        what = "not applicable" if r["not_applicable"] else "failed"
        first = r["error"] if isinstance(r["error"], str) else ""
        detail = f" (first error: {first.splitlines()[0][:160]})" if first and not r["not_applicable"] else ""
        out.append(f"{where}: {r['n_failed']} cell(s) {what}, excluded{detail}")
    return out


def _protocol_text(protocol: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in protocol.items() if k not in {"dataset", "test_split"})


# --------------------------------------------------------------------------------------------
# markdown


def to_markdown(runs: pd.DataFrame, include_published: bool = False) -> str:
    """One protocol's table as GitHub markdown, with a title line, protocol line and notes."""
    summary = protocol_summary(runs)
    info = describe(summary)
    grid = table_grid(summary, info["blocks"], include_published)
    text = _cell_text(grid, grid["mean"].map(_fmt), " ± ", DASH)
    header = ["Method"] + [f"{b} · {d} R@{k}" for b in info["blocks"] for _, d in DIRECTIONS for k in KS]
    lines = [f"# {info['dataset']} · test split: {info['test_split']} · protocol {info['protocol_id']} "
             f"· {info['n_text']}", ""]
    if _protocol_text(info["protocol"]):
        lines += [f"Protocol: {_protocol_text(info['protocol'])}", ""]
    lines += [_md_row(header), "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for group, part in text.groupby(level="group", sort=False):
        if group != "reference":
            lines.append(_md_row([f"**{GROUP_TITLES.get(group, group)}**"] + [""] * (len(header) - 1)))
        lines += [_md_row([line[2], *cells]) for line, cells in part.iterrows()]
    lines.append("")
    lines += [f"- {note}" for note in _notes(grid.index.get_level_values("group"))]
    failures = _failure_notes(summary)
    if failures:
        lines += ["", "Failed cells:", ""] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


def _md_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


# --------------------------------------------------------------------------------------------
# LaTeX

_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(c, c) for c in str(text))


def _label_safe(text: str) -> str:
    """Characters safe in a ``\\label`` key."""
    return re.sub(r"[^A-Za-z0-9:.-]+", "-", str(text))


def bold_mask(grid: pd.DataFrame) -> pd.DataFrame:
    """Cells holding the best displayed (one-decimal) mean of their column among measured methods
    (never references or published rows); ties all bold; no bold in a column with one candidate."""
    rounded = grid["mean"].map(lambda x: round(float(x), 1))
    kind = grid.index.get_level_values("kind") == "method"
    eligible = grid["status"].eq("ok") & kind[:, None]
    pool = rounded.where(eligible)
    return eligible & rounded.eq(pool.max().where(pool.count() >= 2))


def to_latex(runs: pd.DataFrame, include_published: bool = False) -> str:
    """One protocol's table as a booktabs ``table*`` (needs ``\\usepackage{booktabs,graphicx}``)."""
    summary = protocol_summary(runs)
    info = describe(summary)
    blocks = info["blocks"]
    grid = table_grid(summary, blocks, include_published)
    mean_text = grid["mean"].map(_fmt)
    text = _cell_text(grid, mean_text.mask(bold_mask(grid), r"\textbf{" + mean_text + "}"), r" $\pm$ ", "--")
    nb, groups = len(blocks), grid.index.get_level_values("group")
    out = [r"% Requires \usepackage{booktabs,graphicx}", r"\begin{table*}[t]", r"\centering",
           rf"\caption{{{_tex_caption(info, groups)}}}",
           rf"\label{{tab:{_label_safe(info['dataset'])}-{_label_safe(info['protocol_id'])}}}",
           r"\resizebox{\textwidth}{!}{%",
           r"\begin{tabular}{l" + "c" * (6 * nb) + "}", r"\toprule",
           " & " + " & ".join(rf"\multicolumn{{6}}{{c}}{{{'All pairs' if b == ALL_PAIRS else f'{b} pairs'}}}"
                              for b in blocks) + r" \\",
           " ".join(rf"\cmidrule(lr){{{2 + 6 * i}-{7 + 6 * i}}}" for i in range(nb)),
           " & " + " & ".join(rf"\multicolumn{{3}}{{c}}{{{d}}}" for _ in blocks for _, d in DIRECTIONS) + r" \\",
           " ".join(rf"\cmidrule(lr){{{2 + 3 * i}-{4 + 3 * i}}}" for i in range(2 * nb)),
           "Method & " + " & ".join(f"R@{k}" for _ in range(2 * nb) for k in KS) + r" \\"]
    for group, part in text.groupby(level="group", sort=False):
        out.append(r"\midrule")
        if group != "reference":
            title = tex_escape(GROUP_TITLES.get(group, group))
            out.append(rf"\multicolumn{{{1 + 6 * nb}}}{{l}}{{\textit{{{title}}}}} \\")
        out += [tex_escape(line[2]) + " & " + " & ".join(cells) + r" \\" for line, cells in part.iterrows()]
    out += [r"\bottomrule", r"\end{tabular}}", r"\end{table*}"]
    return "\n".join(out) + "\n"


def _tex_caption(info: dict, groups: pd.Index) -> str:
    n = info["n_text"].replace("–", "--")
    parts = [
        rf"Image--text retrieval recall (\%) on {tex_escape(info['dataset'])} "
        rf"(test split: {tex_escape(info['test_split'])}), protocol \texttt{{{tex_escape(info['protocol_id'])}}}.",
        rf"Mean $\pm$ sample std over runs (selection seeds $\times$ eval seeds); {tex_escape(n)}.",
        r"TR: image$\to$text, IR: text$\to$image.",
        r"Best mean per column among the subset methods in bold.",
    ]
    if "reference" in groups:
        parts.append("Full data has no budget; its values are repeated in every block.")
    parts.append(r"--: no result; n/a: not applicable.")
    if "published" in groups:
        parts.append(rf"Published rows ({tex_escape(pub.SOURCE)}) use another protocol and are not comparable.")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# CSV (long format)


def to_csv(runs: pd.DataFrame, include_published: bool = False) -> str:
    """Long-format CSV (:data:`CSV_COLUMNS`): one line per (table row with ok runs, metric incl. ``mean``).

    ``values`` holds the per-run values joined by ``;``. With ``include_published``, published
    numbers for the datasets present are appended with group ``published`` and empty n/std/values.
    """
    parts = [ordered(metric_stats(runs), by=("protocol_id", "group", "method", "budget", "metric"))
             .assign(values=lambda f: f["values"].map(lambda v: ";".join(map(_num, v))))]
    if include_published:
        for pid, dataset in summarize(runs)[["protocol_id", "dataset"]].drop_duplicates().sort_values(
                ["protocol_id", "dataset"]).itertuples(index=False):
            long = pub.published_rows(dataset).melt(["method", "budget"], var_name="metric", value_name="mean")
            parts.append(ordered(long, by=("method", "budget", "metric"))
                         .assign(protocol_id=pid, dataset=dataset, group="published"))
    out = pd.concat(parts, ignore_index=True).reindex(columns=CSV_COLUMNS)
    out = out.assign(n=out["n"].astype("Int64"), mean=out["mean"].map(_num), std=out["std"].map(_num))
    return out.to_csv(index=False, lineterminator="\n")


def _num(x: float) -> str:
    return "" if pd.isna(x) else repr(round(float(x), 6))

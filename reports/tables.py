"""Paper-style result tables (markdown, LaTeX, CSV), one per protocol id.

Layout: rows are the full-data reference, then coreset methods, then distillation methods (each
group under its own header); columns are budget x {TR, IR} x R@1/R@5/R@10 and each cell reads
``mean ± std`` (one decimal). The full-data row has no budget, so its values are repeated under
every budget (the notes say so) which keeps it directly comparable within each block.

Tables never mix protocols: :func:`build_table` takes the rows of exactly one protocol id.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from typing import Iterable

from reports import published as pub
from reports.aggregate import (KS, METRICS, RECALL_METRICS, Row, group_rank, method_rank)

DASH = "–"
NA = "n/a"

DISPLAY_NAMES = {
    "full": "Full data",
    "full_tuned": "Full data (own recipe)",
    "random": "Random",
    "herding": "Herding",
    "kcenter": "K-Center",
    "forgetting": "Forgetting",
    "tm": "TM (distilled)",
}
GROUP_TITLES = {
    "reference": "Reference",
    "coreset": "Coreset selection",
    "distill": "Dataset distillation",
    "published": f"Published ({pub.SOURCE}; other protocol, not comparable)",
}
PUBLISHED_NAMES = {"tm": "TM"}  # avoid "TM (distilled) (published, ...)"
DIRECTIONS = (("tr", "TR"), ("ir", "IR"))


def display_name(method: str) -> str:
    return DISPLAY_NAMES.get(method, method)


# --------------------------------------------------------------------------------------------
# the table model, independent of the output format


@dataclass(frozen=True)
class Entry:
    """One table cell: ``status`` is ``ok`` (has a mean; std None for published), ``missing``
    (no result: not run, or failed) or ``na`` (not applicable under this protocol)."""

    mean: float | None = None
    std: float | None = None
    status: str = "missing"


MISSING = Entry()


@dataclass
class Line:
    """One table row. ``kind`` is ``reference``, ``method`` or ``published``."""

    label: str
    method: str
    kind: str
    entries: dict[tuple[int | None, str], Entry] = field(default_factory=dict)

    def entry(self, budget: int | None, metric: str) -> Entry:
        return self.entries.get((budget, metric), MISSING)


@dataclass
class Section:
    group: str
    title: str
    lines: list[Line]


@dataclass
class Table:
    protocol_id: str
    dataset: str
    test_split: str
    protocol: dict
    blocks: list[int | None]
    """Budgets (column blocks); ``[None]`` when only the full-data reference exists."""
    sections: list[Section]
    method_ns: list[int]
    """Run counts of the measured non-reference cells (for the "n runs per cell" note)."""
    reference_ns: list[int]
    failures: list[Row]
    """Rows with failed cells (failed cells are excluded from the statistics)."""

    @property
    def columns(self) -> list[tuple[int | None, str]]:
        return [(b, m) for b in self.blocks for m in RECALL_METRICS]

    def n_text(self) -> str:
        """E.g. ``n = 6 runs per cell`` or ``n = 2–6 runs per cell; full data: n = 3``."""
        ns = self.method_ns or self.reference_ns
        text = f"n = {_range_text(ns)} run{'' if set(ns) == {1} else 's'} per cell"
        if self._reference_differs():
            text += f"; full data: n = {_range_text(self.reference_ns)}"
        return text

    def runs_text(self) -> str:
        """Compact run counts, e.g. ``6`` or ``2–6 (full data: 3)``."""
        text = _range_text(self.method_ns or self.reference_ns)
        if self._reference_differs():
            text += f" (full data: {_range_text(self.reference_ns)})"
        return text

    def _reference_differs(self) -> bool:
        return bool(self.method_ns and self.reference_ns and set(self.reference_ns) != set(self.method_ns))


def _range_text(ns: list[int]) -> str:
    if not ns:
        return "0"
    lo, hi = min(ns), max(ns)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _row_entry(row: Row, metric: str) -> Entry:
    if row.has_results:
        return Entry(row.mean[metric], row.std[metric], "ok")
    return Entry(status="na" if row.not_applicable else "missing")


def build_table(rows: Iterable[Row], include_published: bool = False) -> Table:
    """The table of one protocol's rows (raises ValueError if they span several protocols)."""
    rows = list(rows)
    pids = {r.protocol_id for r in rows}
    if len(pids) != 1:
        raise ValueError(f"build_table needs the rows of exactly one protocol, got {sorted(pids)}")
    first = next((r for r in rows if r.has_results), rows[0])
    budgets = sorted({r.budget for r in rows if r.budget is not None})
    blocks: list[int | None] = list(budgets) or [None]

    by_group: dict[str, dict[str, Line]] = {}
    for row in sorted(rows, key=lambda r: (group_rank(r.group), method_rank(r.method))):
        kind = "reference" if row.is_reference else "method"
        line = by_group.setdefault(row.group, {}).setdefault(
            row.method, Line(display_name(row.method), row.method, kind))
        for metric in RECALL_METRICS:
            for block in (blocks if row.is_reference else [row.budget]):
                line.entries[(block, metric)] = _row_entry(row, metric)
    sections = [Section(g, GROUP_TITLES.get(g, g), list(lines.values())) for g, lines in by_group.items()]

    if include_published:
        section = published_section(first.dataset, blocks)
        if section is not None:
            sections.append(section)

    return Table(
        protocol_id=first.protocol_id,
        dataset=first.dataset,
        test_split=str(first.protocol.get("test_split", "test")),
        protocol=first.protocol,
        blocks=blocks,
        sections=sections,
        method_ns=[r.n for r in rows if r.has_results and not r.is_reference],
        reference_ns=[r.n for r in rows if r.has_results and r.is_reference],
        failures=[r for r in rows if r.n_failed],
    )


def published_section(dataset: str, blocks: list[int | None]) -> Section | None:
    """Published rows for ``dataset`` restricted to the table's budgets (None if there are none)."""
    lines = []
    for method, by_budget in sorted(pub.published(dataset).items(), key=lambda kv: method_rank(kv[0])):
        line = Line(f"{PUBLISHED_NAMES.get(method, display_name(method))} {pub.LABEL}", method, "published")
        for block in blocks:
            values = by_budget.get(None if method == "full" else block)
            for metric in RECALL_METRICS:
                if values is not None:
                    line.entries[(block, metric)] = Entry(values[metric], None, "ok")
        if line.entries:
            lines.append(line)
    return Section("published", GROUP_TITLES["published"], lines) if lines else None


def best_means(table: Table) -> dict[tuple[int | None, str], float]:
    """Per column, the best displayed (one-decimal) mean among measured non-reference methods.

    Columns with fewer than two candidates get no best (bolding a lone value says nothing).
    """
    best: dict[tuple[int | None, str], float] = {}
    for col in table.columns:
        vals = [round(e.mean, 1) for s in table.sections for ln in s.lines if ln.kind == "method"
                for e in [ln.entry(*col)] if e.status == "ok" and e.mean is not None]
        if len(vals) >= 2:
            best[col] = max(vals)
    return best


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def _notes(table: Table) -> list[str]:
    """Plain-text notes shared by the markdown and LaTeX outputs."""
    notes = [
        "Recall in percent, mean ± std, where std is the sample std (ddof=1) over runs "
        "= selection seeds × eval seeds.",
        "TR = text retrieval (image→text), IR = image retrieval (text→image); "
        "budget = number of image–text pairs kept.",
    ]
    if any(s.group == "reference" for s in table.sections):
        notes.append("Full data trains on the whole training split and has no budget; "
                     "its values are repeated under every budget.")
    notes.append(f"{DASH} = no result; {NA} = method not applicable under this protocol.")
    if any(s.group == "published" for s in table.sections):
        notes.append(f"Rows marked {pub.LABEL} are the numbers published in {pub.SOURCE}, obtained "
                     "with different encoders and training; they are not comparable with this "
                     "protocol and are shown for orientation only.")
    return notes


def _failure_notes(table: Table) -> list[str]:
    out = []
    for r in table.failures:
        where = "full data" if r.is_reference else f"{display_name(r.method)} @ {r.budget}"
        what = "not applicable" if r.not_applicable else "failed"
        first = next((e for e in r.errors if e), "")
        detail = f" (first error: {first.splitlines()[0][:160]})" if first and not r.not_applicable else ""
        out.append(f"{where}: {r.n_failed} cell(s) {what}, excluded{detail}")
    return out


def _protocol_text(protocol: dict) -> str:
    skip = {"dataset", "test_split"}
    return ", ".join(f"{k}={v}" for k, v in protocol.items() if k not in skip)


# --------------------------------------------------------------------------------------------
# markdown


def _md_cell(entry: Entry) -> str:
    if entry.status == "na":
        return NA
    if entry.status != "ok" or entry.mean is None:
        return DASH
    if entry.std is None or math.isnan(entry.std):
        return _fmt(entry.mean)
    return f"{_fmt(entry.mean)} ± {_fmt(entry.std)}"


def _block_label(block: int | None) -> str:
    return "all pairs" if block is None else str(block)


def to_markdown(table: Table) -> str:
    """The table as GitHub markdown, with a title line, protocol line and notes."""
    title = (f"# {table.dataset} · test split: {table.test_split} · protocol {table.protocol_id} "
             f"· {table.n_text()}")
    header = ["Method"] + [f"{_block_label(b)} · {d} R@{k}" for b in table.blocks
                           for _, d in DIRECTIONS for k in KS]
    ncols = len(header)
    lines = [title, ""]
    if _protocol_text(table.protocol):
        lines += [f"Protocol: {_protocol_text(table.protocol)}", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (ncols - 1)) + "|"]
    for section in table.sections:
        if section.group != "reference":
            lines.append("| " + " | ".join([f"**{section.title}**"] + [""] * (ncols - 1)) + " |")
        for ln in section.lines:
            cells = [_md_cell(ln.entry(*col)) for col in table.columns]
            lines.append("| " + " | ".join([ln.label] + cells) + " |")
    lines.append("")
    lines += [f"- {note}" for note in _notes(table)]
    failures = _failure_notes(table)
    if failures:
        lines += ["", "Failed cells:", ""] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# LaTeX

_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(c, c) for c in str(text))


def _label_safe(text: str) -> str:
    """Characters safe in a ``\\label`` key."""
    return re.sub(r"[^A-Za-z0-9:.-]+", "-", str(text))


def _tex_cell(entry: Entry, bold: bool) -> str:
    if entry.status == "na":
        return NA
    if entry.status != "ok" or entry.mean is None:
        return "--"
    mean = rf"\textbf{{{_fmt(entry.mean)}}}" if bold else _fmt(entry.mean)
    if entry.std is None or math.isnan(entry.std):
        return mean
    return rf"{mean} $\pm$ {_fmt(entry.std)}"


def to_latex(table: Table) -> str:
    """A booktabs ``table*`` (needs ``\\usepackage{booktabs,graphicx}``)."""
    nb = len(table.blocks)
    ncols = 1 + 6 * nb
    best = best_means(table)
    out = [r"% Requires \usepackage{booktabs,graphicx}", r"\begin{table*}[t]", r"\centering",
           rf"\caption{{{_tex_caption(table)}}}",
           rf"\label{{tab:{_label_safe(table.dataset)}-{_label_safe(table.protocol_id)}}}",
           r"\resizebox{\textwidth}{!}{%",
           r"\begin{tabular}{l" + "c" * (6 * nb) + "}", r"\toprule"]
    out.append(" & " + " & ".join(
        rf"\multicolumn{{6}}{{c}}{{{'All pairs' if b is None else f'{b} pairs'}}}" for b in table.blocks) + r" \\")
    out.append(" ".join(rf"\cmidrule(lr){{{2 + 6 * i}-{7 + 6 * i}}}" for i in range(nb)))
    out.append(" & " + " & ".join(rf"\multicolumn{{3}}{{c}}{{{d}}}" for _ in table.blocks
                                  for _, d in DIRECTIONS) + r" \\")
    out.append(" ".join(rf"\cmidrule(lr){{{2 + 3 * i}-{4 + 3 * i}}}" for i in range(2 * nb)))
    out.append("Method & " + " & ".join(f"R@{k}" for _ in range(2 * nb) for k in KS) + r" \\")
    for section in table.sections:
        out.append(r"\midrule")
        if section.group != "reference":
            out.append(rf"\multicolumn{{{ncols}}}{{l}}{{\textit{{{tex_escape(section.title)}}}}} \\")
        for ln in section.lines:
            cells = []
            for col in table.columns:
                e = ln.entry(*col)
                bold = (ln.kind == "method" and col in best and e.status == "ok"
                        and round(e.mean, 1) == best[col])
                cells.append(_tex_cell(e, bold))
            out.append(tex_escape(ln.label) + " & " + " & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}}", r"\end{table*}"]
    return "\n".join(out) + "\n"


def _tex_caption(table: Table) -> str:
    n = table.n_text().replace("–", "--")
    parts = [
        rf"Image--text retrieval recall (\%) on {tex_escape(table.dataset)} "
        rf"(test split: {tex_escape(table.test_split)}), protocol \texttt{{{tex_escape(table.protocol_id)}}}.",
        rf"Mean $\pm$ sample std over runs (selection seeds $\times$ eval seeds); {tex_escape(n)}.",
        r"TR: image$\to$text, IR: text$\to$image.",
        r"Best mean per column among the subset methods in bold.",
    ]
    if any(s.group == "reference" for s in table.sections):
        parts.append("Full data has no budget; its values are repeated in every block.")
    parts.append(r"--: no result; n/a: not applicable.")
    if any(s.group == "published" for s in table.sections):
        parts.append(rf"Published rows ({tex_escape(pub.SOURCE)}) use another protocol and are not comparable.")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# CSV (long format)

CSV_COLUMNS = ("protocol_id", "dataset", "method", "group", "budget", "metric", "n", "mean", "std", "values")


def to_csv(rows: Iterable[Row], include_published: bool = False) -> str:
    """Long-format CSV: one line per (row with results, metric), metrics incl. ``mean``.

    ``values`` holds the per-run values joined by ``;``. Rows without any ok cell are left out.
    With ``include_published``, published numbers for the datasets present are appended with
    group ``published`` and empty n/std/values.
    """
    rows = list(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        if not r.has_results:
            continue
        for m in METRICS:
            w.writerow([r.protocol_id, r.dataset, r.method, r.group, "" if r.budget is None else r.budget,
                        m, r.n, _num(r.mean[m]), _num(r.std[m]), ";".join(_num(v) for v in r.values[m])])
    if include_published:
        for pid, dataset in sorted({(r.protocol_id, r.dataset) for r in rows}):
            for method, by_budget in sorted(pub.published(dataset).items(), key=lambda kv: method_rank(kv[0])):
                for budget, vals in sorted(by_budget.items(), key=lambda kv: kv[0] or -1):
                    for m in RECALL_METRICS:
                        w.writerow([pid, dataset, method, "published", "" if budget is None else budget,
                                    m, "", _num(vals[m]), "", ""])
    return buf.getvalue()


def _num(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(round(float(x), 6))

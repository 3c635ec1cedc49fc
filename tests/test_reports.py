"""Tests for reports/: pooling runs, tables (markdown, LaTeX, CSV), plots and write_report."""
from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path

import pandas as pd
import pytest

from bench.errors import BenchError
from reports import write_report
from reports.frame import METRICS, RECALL_METRICS, load_cells, load_runs, metric_stats, sample_std, summarize
from reports.plots import save_figure
from reports.tables import to_csv, to_latex, to_markdown

PID = "9f8e7d6c5b4a"
PROTOCOL = {"dataset": "flickr8k", "test_split": "val", "cut": "heads",
            "image_encoder": "effnet_lite0", "text_encoder": "minilm_l6"}
GROUPS = {"full": "reference", "full_tuned": "reference", "random": "coreset", "herding": "coreset", "kcenter": "coreset",
          "forgetting": "coreset", "tm": "distill"}


def metrics(seed: int = 0, scale: float = 1.0, **fixed: float) -> dict:
    """One run's metrics: tr = scale*(1, 4, 7), ir = scale*(0.5, 3, 6), overridable per key."""
    base = dict(zip(RECALL_METRICS, (1.0, 4.0, 7.0, 0.5, 3.0, 6.0)))
    m = {k: fixed.get(k, v * scale) for k, v in base.items()}
    m["mean"] = sum(m.values()) / 6
    return {"seed": seed, **m}


def write_cell(out: Path, method: str, budget: int | None, sel_seed: int = 0, runs: list[dict] | None = None,
               *, status: str = "ok", error: str | None = None, protocol_id: str = PID,
               protocol: dict | None = None, key: str | None = None) -> Path:
    """Write one cell JSON under ``out/cells/`` like the runner does."""
    protocol = dict(protocol or PROTOCOL)
    cell = {"schema_version": 1, "status": status,
            "key": key or f"{protocol_id}-{method}-{budget}-{sel_seed}",
            "protocol_id": protocol_id, "protocol": protocol, "dataset": protocol["dataset"],
            "method": method, "method_group": GROUPS[method], "method_config": {}, "budget": budget,
            "selection_seed": sel_seed, "eval_seeds": [0], "storage_bytes": 1000,
            "timings": {"build_s": 0.1, "eval_s": 1.0}, "manifest": {"git_commit": "abc"}}
    if status == "ok":
        cell["metrics_per_seed"] = runs if runs is not None else [metrics()]
    else:
        cell["error"] = error or "RuntimeError: boom"
    path = out / "cells" / protocol_id / method / f"{budget}_{sel_seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cell))
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """A small finished run: full data, random/herding (coreset) and tm (distill) at 100 and 200."""
    o = tmp_path / "out"
    write_cell(o, "full", None, 0, [metrics(0, 10.0), metrics(1, 10.0)])
    # random @100: two selection seeds with tr_r1 1.0 and 3.0 -> mean 2.0, std sqrt(2)
    write_cell(o, "random", 100, 0, [metrics(0, tr_r1=1.0)])
    write_cell(o, "random", 100, 1, [metrics(0, tr_r1=3.0)])
    write_cell(o, "random", 200, 0, [metrics(0, 2.0)])
    write_cell(o, "random", 200, 1, status="failed", error="RuntimeError: CUDA out of memory")
    write_cell(o, "herding", 100, 0, [metrics(0, tr_r1=2.5)])
    write_cell(o, "herding", 200, 0, status="failed", error="not applicable: herding needs features")
    write_cell(o, "tm", 100, 0, [metrics(0, 3.0)])
    write_cell(o, "tm", 200, 0, [metrics(0, 4.0)])
    return o


def _budget(b) -> int | None:
    return None if pd.isna(b) else int(b)


def rows_of(out: Path) -> dict:
    """The summary rows of ``out`` (one pandas Series each), by (method, budget)."""
    return {(r["method"], _budget(r["budget"])): r for _, r in summarize(load_runs(out)).iterrows()}


def values_of(out: Path, method: str, budget: int | None, metric: str) -> list[float]:
    """The per-run values pooled into one table row (as the CSV lists them)."""
    stats = metric_stats(load_runs(out))
    return next(r["values"] for _, r in stats.iterrows()
                if (r["method"], _budget(r["budget"]), r["metric"]) == (method, budget, metric))


# ---------------------------------------------------------------------------- pooling runs


def test_aggregate_pools_selection_seeds(out):
    r = rows_of(out)[("random", 100)]
    assert r["n"] == 2 and r["n_cells"] == 2 and r["n_failed"] == 0
    assert values_of(out, "random", 100, "tr_r1") == [1.0, 3.0]
    assert r["tr_r1"] == 2.0
    assert r["tr_r1_std"] == pytest.approx(math.sqrt(2.0), abs=1e-12)  # 1.414..., ddof=1
    assert r["tr_r5_std"] == 0.0 and r["tr_r5"] == 4.0
    assert r["group"] == "coreset" and json.loads(r["protocol"]) == PROTOCOL and r["dataset"] == "flickr8k"
    runs = load_runs(out)
    assert sorted(runs.loc[runs["method"].eq("random") & runs["budget"].eq(100), "selection_seed"].unique()) == [0, 1]
    assert set(METRICS) | {f"{m}_std" for m in METRICS} <= set(r.index)


def test_single_run_has_zero_std(out):
    r = rows_of(out)[("tm", 100)]
    assert r["n"] == 1 and all(r[f"{m}_std"] == 0.0 for m in METRICS)


def test_eval_seeds_are_pooled_with_selection_seeds(tmp_path):
    write_cell(tmp_path, "random", 100, 0, [metrics(0, tr_r1=1.0), metrics(1, tr_r1=2.0)])
    write_cell(tmp_path, "random", 100, 1, [metrics(0, tr_r1=3.0), metrics(1, tr_r1=6.0)])
    r = summarize(load_runs(tmp_path)).iloc[0]
    assert r["n"] == 4 and r["tr_r1"] == 3.0
    assert r["tr_r1_std"] == pytest.approx(sample_std([1.0, 2.0, 3.0, 6.0]))
    assert r["tr_r1_std"] == pytest.approx(math.sqrt(14 / 3))


def test_failed_cells_counted_and_excluded(out):
    rows = rows_of(out)
    r = rows[("random", 200)]
    assert r["n_failed"] == 1 and r["n"] == 1 and r["n_cells"] == 1
    assert r["tr_r1"] == 2.0 and not r["not_applicable"]
    h = rows[("herding", 200)]
    assert h["n"] == 0 and h["n_failed"] == 1 and h["not_applicable"] and math.isnan(h["tr_r1"])


def test_rows_are_ordered_reference_coreset_distill(out):
    order = list(rows_of(out))
    assert order == [("full", None), ("random", 100), ("random", 200), ("herding", 100), ("herding", 200),
                     ("tm", 100), ("tm", 200)]


def test_load_cells_skips_bad_files_with_warning(out):
    (out / "cells" / "broken.json").write_text("{not json")
    (out / "cells" / "list.json").write_text("[1, 2]")
    (out / "cells" / "nometrics.json").write_text(json.dumps(
        {"status": "ok", "protocol_id": PID, "method": "random", "budget": 100}))
    with pytest.warns(UserWarning) as record:
        cells = load_cells(out)
    assert len(cells) == 9
    text = " ".join(str(w.message) for w in record)
    assert "broken.json" in text and "list.json" in text and "nometrics.json" in text


def test_load_cells_missing_dir_is_empty(tmp_path):
    assert load_cells(tmp_path / "nothing") == []


def test_duplicate_key_prefers_ok_cell(tmp_path):
    write_cell(tmp_path, "random", 100, 0, [metrics(0, tr_r1=1.0)], key="same")
    dup = write_cell(tmp_path, "random", 100, 0, status="failed", key="same")
    dup.rename(dup.with_name("zz_retry.json"))
    write_cell(tmp_path, "random", 100, 0, [metrics(0, tr_r1=1.0)], key="same")
    with pytest.warns(UserWarning, match="share key"):
        rows = summarize(load_runs(tmp_path))
    assert rows.iloc[0]["n"] == 1 and rows.iloc[0]["n_failed"] == 0


# ---------------------------------------------------------------------------- tables


def test_markdown_cells_and_grouping(out):
    md = to_markdown(load_runs(out))
    lines = md.splitlines()
    title = lines[0]
    assert title.startswith("# flickr8k") and "val" in title and PID in title
    assert "n = 1–2 runs per cell; full data: n = 2" in title
    assert "sample std" in md and "selection seeds × eval seeds" in md

    def row(label):
        return next(ln for ln in lines if ln.startswith(f"| {label} |"))

    def cells(label):
        return [c.strip() for c in row(label).strip("|").split("|")][1:]

    header = [c.strip() for c in lines[next(i for i, ln in enumerate(lines) if ln.startswith("| Method"))]
              .strip("|").split("|")]
    assert header[1] == "100 · TR R@1" and header[7] == "200 · TR R@1" and len(header) == 13
    assert cells("Random")[0] == "2.0 ± 1.4"          # random @100 TR R@1
    assert cells("Random")[1] == "4.0 ± 0.0"
    assert cells("Random")[6] == "2.0 ± 0.0"          # random @200 TR R@1 (failed seed excluded)
    assert cells("Herding")[6:] == ["n/a"] * 6        # not applicable @200
    assert cells("TM (distilled)")[0] == "3.0 ± 0.0"
    full = cells("Full data")
    assert full[0] == "10.0 ± 0.0" and full[:6] == full[6:]  # repeated under every budget
    # grouping order: full data, coreset header, coreset methods, distill header, distill methods
    idx = [md.index(s) for s in ("| Full data |", "**Coreset selection**", "| Random |", "| Herding |",
                                 "**Dataset distillation**", "| TM (distilled) |")]
    assert idx == sorted(idx)
    assert "Random @ 200: 1 cell(s) failed" in md and "CUDA out of memory" in md
    assert "published" not in md


def test_both_full_data_rows_are_reference_lines_repeated_under_every_budget(out):
    from reports.plots import make_figure

    write_cell(out, "full_tuned", None, 0, [metrics(0, 12.0), metrics(1, 12.0)])
    md = to_markdown(load_runs(out))
    lines = md.splitlines()
    tuned = next(ln for ln in lines if ln.startswith("| Full data (own recipe) |"))
    cells = [c.strip() for c in tuned.strip("|").split("|")][1:]
    assert cells[0] == "12.0 ± 0.0" and cells[:6] == cells[6:]
    # both above the coreset header, the protocol's row first; neither is a method (never bold)
    assert md.index("| Full data |") < md.index("| Full data (own recipe) |") < md.index("**Coreset selection**")
    ax = make_figure(load_runs(out)).axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["full data 10.0", "full data (own recipe) 12.0"]  # one labelled line each


def test_missing_cell_shows_dash(tmp_path):
    write_cell(tmp_path, "random", 100, 0)
    write_cell(tmp_path, "tm", 100, 0)
    write_cell(tmp_path, "tm", 200, 0)
    write_cell(tmp_path, "random", 200, 0, status="failed")
    md = to_markdown(load_runs(tmp_path))
    random_row = next(ln for ln in md.splitlines() if ln.startswith("| Random |"))
    assert random_row.count("–") == 6 and "n/a" not in random_row


def test_latex_booktabs_and_bold_best(out):
    tex = to_latex(load_runs(out))
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"\caption{"):
        assert rule in tex
    assert PID in tex and "n = 1--2 runs per cell" in tex
    lines = tex.splitlines()
    random_line = next(ln for ln in lines if ln.startswith("Random &"))
    herding_line = next(ln for ln in lines if ln.startswith("Herding &"))
    tm_line = next(ln for ln in lines if ln.startswith("TM (distilled) &"))
    full_line = next(ln for ln in lines if ln.startswith("Full data &"))
    # @100 TR R@1: random 2.0, herding 2.5, tm 3.0 -> tm is best; full data (10.0) never bold
    assert tm_line.split(" & ")[1] == r"\textbf{3.0} $\pm$ 0.0"
    assert random_line.split(" & ")[1] == r"2.0 $\pm$ 1.4"
    assert herding_line.split(" & ")[1] == r"2.5 $\pm$ 0.0"
    assert r"\textbf" not in full_line
    # @100 IR R@1 (col 4): random 0.5, herding 0.5, tm 1.5 -> only tm bold
    assert tm_line.split(" & ")[4].startswith(r"\textbf{1.5}")
    assert r"\textbf" not in random_line and r"\textbf" not in herding_line
    assert lines.count(r"\midrule") == 3  # after header, before coreset, before distill


def test_latex_bold_ties_and_escaping(tmp_path):
    proto = dict(PROTOCOL, dataset="my_set")
    write_cell(tmp_path, "random", 100, 0, [metrics(0, tr_r1=5.04)], protocol=proto)
    write_cell(tmp_path, "tm", 100, 0, [metrics(0, tr_r1=4.96)], protocol=proto)
    tex = to_latex(load_runs(tmp_path))
    assert r"on my\_set (test split" in tex and r"\label{tab:my-set-" in tex
    # both display 5.0 -> both bold (ties are judged at the displayed precision)
    assert tex.count(r"\textbf{5.0}") == 2


def test_csv_long_format(out):
    rows = summarize(load_runs(out))
    text = to_csv(load_runs(out))
    records = list(csv.DictReader(io.StringIO(text)))
    with_results = rows[rows["n"] > 0]
    assert len(with_results) == 6 and len(records) == 6 * len(METRICS)
    assert list(records[0]) == ["protocol_id", "dataset", "method", "group", "budget", "metric",
                                "n", "mean", "std", "values"]
    rec = next(r for r in records if r["method"] == "random" and r["budget"] == "100" and r["metric"] == "tr_r1")
    assert rec["n"] == "2" and float(rec["mean"]) == 2.0 and float(rec["std"]) == pytest.approx(math.sqrt(2), abs=1e-6)
    assert rec["values"] == "1.0;3.0" and rec["group"] == "coreset" and rec["protocol_id"] == PID
    full = next(r for r in records if r["method"] == "full")
    assert full["budget"] == "" and full["group"] == "reference"


def test_published_rows_only_on_request_and_for_known_datasets(tmp_path):
    proto = dict(PROTOCOL, dataset="flickr30k", test_split="test")
    for m, b in (("random", 100), ("random", 200), ("tm", 100)):
        write_cell(tmp_path, m, b, 0, protocol=proto)
    write_cell(tmp_path, "full", None, 0, protocol=proto)
    assert "published" not in to_markdown(load_runs(tmp_path))
    md = to_markdown(load_runs(tmp_path), include_published=True)
    assert "n = 1 run per cell" in md.splitlines()[0]
    line = next(ln for ln in md.splitlines() if ln.startswith("| Random (published, other protocol) |"))
    assert [c.strip() for c in line.strip("|").split("|")][1:] == \
        ["1.3", "5.9", "10.1", "1.0", "4.0", "6.5", "2.1", "8.7", "13.2", "1.1", "4.8", "9.2"]
    assert "| Full data (published, other protocol) | 33.9 |" in md
    assert md.index("| TM (distilled) |") < md.index("Published (Wu et al., TMLR 2024")
    tex = to_latex(load_runs(tmp_path), include_published=True)
    pub_line = next(ln for ln in tex.splitlines() if ln.startswith("TM (published, other protocol) &"))
    assert r"\textbf" not in pub_line  # published numbers never compete for bold
    # flickr8k has no published numbers: nothing is added
    assert "published" not in to_markdown(load_runs(_flickr8k(tmp_path / "f8")), include_published=True)


def _flickr8k(o: Path) -> Path:
    write_cell(o, "random", 100, 0)
    return o


def test_tables_reject_mixed_protocols(tmp_path):
    write_cell(tmp_path, "random", 100, 0, protocol_id="aaa")
    write_cell(tmp_path, "random", 100, 0, protocol_id="bbb")
    for render in (to_markdown, to_latex):
        with pytest.raises(ValueError):
            render(load_runs(tmp_path))


# ---------------------------------------------------------------------------- plots and write_report


def test_save_figure_writes_png_and_pdf(out, tmp_path):
    paths = save_figure(load_runs(out), tmp_path / "fig" / "x")
    assert [p.name for p in paths] == ["x.png", "x.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"


def test_write_report_two_protocols(out, tmp_path):
    proto2 = dict(PROTOCOL, cut="full")
    write_cell(out, "random", 100, 0, protocol_id="111111111111", protocol=proto2)
    write_cell(out, "tm", 100, 0, protocol_id="111111111111", protocol=proto2)
    paths = write_report(out)
    report = out / "report"
    names = sorted(p.name for p in paths)
    for pid in (PID, "111111111111"):
        for ext in ("md", "tex", "csv", "png", "pdf", "_fairness.md", "_fairness.tex", "_fairness.csv", "_bytes.png"):
            assert f"flickr8k_{pid}{'' if ext.startswith('_') else '.'}{ext}" in names
    assert "README.md" in names and "runs.csv" in names and len(paths) == 20
    assert all(p.parent == report and p.stat().st_size > 0 for p in paths)
    readme = (report / "README.md").read_text()
    assert f"(flickr8k_{PID}.md)" in readme and "(flickr8k_111111111111.png)" in readme
    md2 = (report / "flickr8k_111111111111.md").read_text()
    assert "111111111111" in md2 and PID not in md2 and "Herding" not in md2


def test_write_report_custom_dir_and_published(out, tmp_path):
    paths = write_report(out, report_dir=tmp_path / "elsewhere", include_published=True)
    assert all(p.parent == tmp_path / "elsewhere" for p in paths)


def test_write_report_without_results_raises(tmp_path):
    with pytest.raises(BenchError, match="no results under .*python -m bench run"):
        write_report(tmp_path)
    write_cell(tmp_path, "random", 100, 0, status="failed")
    with pytest.raises(BenchError):
        write_report(tmp_path)


def test_realistic_report_renders(tmp_path):
    """4 methods x 4 budgets x 2 selection seeds x 3 eval seeds, plus full data, no warnings."""
    import random as _random
    rng = _random.Random(0)
    write_cell(tmp_path, "full", None, 0, [metrics(e, 8.0 + rng.random()) for e in range(3)])
    for method, scale in (("random", 0.2), ("herding", 0.15), ("kcenter", 0.22), ("tm", 1.0)):
        for budget in (100, 200, 500, 1000):
            for s in (0, 1):
                f = scale * (budget / 100) ** 0.4
                write_cell(tmp_path, method, budget, s, [metrics(e, f * (1 + 0.1 * rng.gauss(0, 1)))
                                                         for e in range(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_report(tmp_path)
    md = next(p for p in paths if p.suffix == ".md" and p.name != "README.md").read_text()
    assert "n = 6 runs per cell; full data: n = 3" in md
    assert all(p.stat().st_size > 0 for p in paths)

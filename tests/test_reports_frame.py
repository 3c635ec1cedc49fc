"""Tests for reports.frame (the runs frame and its pooling) and for the report files drawn from it.

The equality tests render the stored cells of ``tests/data/report_cells/`` and compare the result
byte for byte with the reference outputs in ``tests/data/reports_expected/`` (markdown, LaTeX, CSV,
the README index, which also lists the runs frame) and the figures' content with ``figures.json``.
A difference there is a change of the report format: make it deliberately, never by regenerating
the reference files to match. ``tests/data/make_report_cells.py`` says what the cells cover.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports import write_report
from reports.frame import METRICS, RECALL_METRICS, RUN_COLUMNS, load_runs, summarize
from reports.plots import make_figure
from reports.tables import to_csv, to_markdown

DATA = Path(__file__).resolve().parent / "data"
EXPECTED = DATA / "reports_expected"
PROTOCOL = {"dataset": "flickr8k", "test_split": "val", "cut": "heads"}
RUNS_LINE = ("All runs of all protocols, one row per eval-seed run (a failed cell is one row with its "
             "error): [csv](runs.csv)")


def run(seed: int, **values: float) -> dict:
    m = dict(zip(RECALL_METRICS, (1.0, 4.0, 7.0, 0.5, 3.0, 6.0))) | values
    return {"seed": seed, **m, "mean": sum(m.values()) / 6, "lr": 0.01, "train_s": 1.0}


def cell(out: Path, method: str, budget: int | None, sel: int = 0, runs: list[dict] | None = None, *,
         group: str = "coreset", error: str | None = None, pid: str = "p1") -> None:
    rec = {"key": f"{pid}-{method}-{budget}-{sel}", "protocol_id": pid, "protocol": PROTOCOL,
           "dataset": PROTOCOL["dataset"], "method": method, "method_group": group, "budget": budget,
           "selection_seed": sel}
    if error is None:
        rec.update(status="ok", metrics_per_seed=runs or [run(0)], storage_bytes=4096,
                   timings={"build_s": 0.5, "eval_s": 2.0})
    else:
        rec.update(status="failed", error=error, timings={"failed_after_s": 0.25})
    path = out / "cells" / pid / method / f"{budget}_{sel}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


# ---------------------------------------------------------------------------- the frame


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """random @100: 2 selection seeds x 2 eval seeds; full data: 3 eval seeds; one failed, one n/a cell."""
    o = tmp_path / "out"
    cell(o, "full", None, 0, [run(e, tr_r1=10.0 + e) for e in range(3)], group="reference")
    cell(o, "random", 100, 0, [run(0, tr_r1=1.0, ir_r1=0.5), run(2, tr_r1=2.0, ir_r1=0.5)])
    cell(o, "random", 100, 1, [run(1, tr_r1=3.0, ir_r1=1.5), run(3, tr_r1=6.0, ir_r1=1.5)])
    cell(o, "random", 200, 0, error="RuntimeError: CUDA out of memory\nTraceback ...")
    cell(o, "tm", 200, 0, group="distill", error="not applicable: tm needs a tower")
    return o


def test_load_runs_has_one_row_per_eval_seed_run(out):
    runs = load_runs(out)
    assert list(runs.columns) == RUN_COLUMNS
    ok = runs[runs["status"].eq("ok")]
    assert len(ok) == 3 + 2 * 2 and len(runs) == len(ok) + 2
    random = ok[ok["method"].eq("random")]
    assert random["selection_seed"].tolist() == [0, 0, 1, 1] and random["eval_seed"].tolist() == [0, 2, 1, 3]
    assert random["tr_r1"].tolist() == [1.0, 2.0, 3.0, 6.0] and set(random["group"]) == {"coreset"}
    full = ok[ok["method"].eq("full")]
    assert full["budget"].isna().all() and full["group"].eq("reference").all() and len(full) == 3
    assert ok["seconds"].eq(2.5).all() and ok["storage_bytes"].eq(4096).all()
    assert ok["mean"].tolist() == pytest.approx([sum(r[m] for m in RECALL_METRICS) / 6 for _, r in ok.iterrows()])
    assert json.loads(ok["protocol"].iloc[0]) == PROTOCOL
    bad = runs[runs["status"].ne("ok")].set_index("method")
    assert bad.loc["random", "status"] == "failed" and bad.loc["random", "error"].startswith("RuntimeError: CUDA")
    assert bad.loc["tm", "status"] == "not_applicable" and bad.loc["tm", "seconds"] == 0.25
    assert bad[list(METRICS)].isna().all().all() and bad["eval_seed"].isna().all()


def test_load_runs_recomputes_a_missing_mean_and_skips_bad_files(tmp_path):
    r = run(0)
    del r["mean"]
    cell(tmp_path, "random", 100, 0, [r])
    (tmp_path / "cells" / "broken.json").write_text("{not json")
    with pytest.warns(UserWarning, match="broken.json"):
        runs = load_runs(tmp_path)
    assert len(runs) == 1 and runs["mean"].iloc[0] == pytest.approx((1 + 4 + 7 + 0.5 + 3 + 6) / 6)
    assert load_runs(tmp_path / "nothing").empty and list(load_runs(tmp_path / "nothing").columns) == RUN_COLUMNS


def test_summary_mean_and_std_match_a_hand_computation(out):
    s = summarize(load_runs(out)).set_index("method")
    r = s.loc["random"].iloc[0]  # random @100, then random @200 (failed only)
    # tr_r1 runs 1, 2, 3, 6: mean 12/4 = 3; squared deviations 4 + 1 + 0 + 9 = 14 over n - 1 = 3
    assert r["n"] == 4 and r["n_cells"] == 2 and r["tr_r1"] == 3.0
    assert r["tr_r1_std"] == pytest.approx(math.sqrt(14 / 3), abs=1e-12)  # 2.1602...
    # ir_r1 runs 0.5, 0.5, 1.5, 1.5: mean 1; squared deviations 4 x 0.25 = 1 over 3
    assert r["ir_r1"] == 1.0 and r["ir_r1_std"] == pytest.approx(math.sqrt(1 / 3), abs=1e-12)
    assert r["tr_r5"] == 4.0 and r["tr_r5_std"] == 0.0
    full = s.loc["full"]
    assert full["n"] == 3 and full["tr_r1"] == 11.0 and full["tr_r1_std"] == 1.0  # 10, 11, 12
    failed, na = s.loc["random"].iloc[1], s.loc["tm"]
    assert failed["n"] == 0 and failed["n_failed"] == 1 and not failed["not_applicable"]
    assert failed["error"].startswith("RuntimeError") and math.isnan(failed["tr_r1"])
    assert na["n"] == 0 and na["not_applicable"]
    md = to_markdown(load_runs(out))
    random_line = next(ln for ln in md.splitlines() if ln.startswith("| Random |"))
    cells = [c.strip() for c in random_line.strip("|").split("|")][1:]
    assert cells[0] == "3.0 ± 2.2" and cells[3] == "1.0 ± 0.6" and cells[6:] == ["–"] * 6
    assert "| TM (distilled) | – | – | – | – | – | – | n/a |" in md
    assert "Random @ 200: 1 cell(s) failed, excluded (first error: RuntimeError: CUDA out of memory)" in md
    assert "TM (distilled) @ 200: 1 cell(s) not applicable, excluded" in md
    assert "p1,flickr8k,random,coreset,100,tr_r1,4,3.0,2.160247,1.0;2.0;3.0;6.0" in to_csv(load_runs(out))


def test_means_are_summed_left_to_right(tmp_path):
    """1.18 + 2.61 + 2.62 + 4.19 = 10.6, mean 2.65: summed left to right it is just below (2.6), a
    compensated sum lands just above (2.7). The tables keep the former, whatever pandas does."""
    values = [4.19, 2.62, 2.61, 1.18]
    for sel in (0, 1):
        cell(tmp_path, "random", 100, sel, [run(2 * e + sel, tr_r1=values[2 * sel + e]) for e in range(2)])
    r = summarize(load_runs(tmp_path)).iloc[0]
    assert r["tr_r1"] == sum(values) / 4
    assert "\n| Random | 2.6 ± " in to_markdown(load_runs(tmp_path))


def test_write_report_writes_the_runs_frame(out, tmp_path):
    paths = write_report(out, tmp_path / "rep")
    csv_path = tmp_path / "rep" / "runs.csv"
    assert csv_path in paths and paths[-1].name == "README.md"
    back = pd.read_csv(csv_path)
    assert list(back.columns) == RUN_COLUMNS and len(back) == len(load_runs(out)) == 9
    assert back.loc[back["method"].eq("random") & back["status"].eq("ok"), "tr_r1"].tolist() == [1.0, 2.0, 3.0, 6.0]
    assert "[csv](runs.csv)" in (tmp_path / "rep" / "README.md").read_text()
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        assert not (tmp_path / "rep" / "runs.parquet").exists()
    else:
        assert pd.read_parquet(tmp_path / "rep" / "runs.parquet").shape == back.shape


# ---------------------------------------------------------------------------- equality with the stored outputs


def figure_summary(fig) -> dict:
    """What a figure shows (titles, axes, plotted data, labels), numbers at 9 significant digits."""
    def nums(xs):
        return [float(f"{float(v):.9g}") for v in np.ravel(np.ma.filled(np.asarray(xs, dtype=float), np.nan))]

    axes = []
    for ax in fig.axes:
        axes.append({
            "title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
            "xscale": ax.get_xscale(), "yscale": ax.get_yscale(), "xlim": nums(ax.get_xlim()),
            "xticks": nums(ax.get_xticks()), "xticklabels": [t.get_text() for t in ax.get_xticklabels()],
            "lines": [{"label": ln.get_label(), "x": nums(ln.get_xdata()), "y": nums(ln.get_ydata()),
                       "color": str(ln.get_color()), "linestyle": str(ln.get_linestyle()),
                       "linewidth": ln.get_linewidth(), "marker": str(ln.get_marker())} for ln in ax.lines],
            "segments": [nums(np.concatenate([np.ravel(s) for s in c.get_segments()]) if c.get_segments() else [])
                         for c in ax.collections],
            "texts": [t.get_text() for t in ax.texts],
        })
    return {"suptitle": fig.get_suptitle(), "axes": axes,
            "legend": [t.get_text() for lg in fig.legends for t in lg.get_texts()]}


def with_runs_line(readme: str) -> str:
    """The stored index plus the line that lists the runs frame, after the protocol table."""
    head, rest = readme.split("|\n\n", 1)
    return f"{head}|\n\n{RUNS_LINE}\n\n{rest}"


@pytest.fixture
def stored_cells(monkeypatch) -> Path:
    monkeypatch.chdir(DATA)  # the index names the output directory as given: a relative one here
    return Path("report_cells")


@pytest.mark.parametrize("variant", ["measured", "published"])
def test_report_matches_the_stored_outputs(stored_cells, tmp_path, variant):
    with pytest.warns(UserWarning) as record:
        paths = write_report(stored_cells, tmp_path, include_published=variant == "published")
    text = " ".join(str(w.message) for w in record)
    assert "broken.json" in text and "share key" in text
    expected = sorted(p for p in (EXPECTED / variant).iterdir())
    tables = [p for p in paths if p.suffix in (".md", ".tex", ".csv") and not p.name.startswith(("README", "runs"))
              and "_fairness" not in p.name]  # the fairness views have tests of their own
    assert sorted(p.name for p in tables) == sorted(p.name for p in expected if p.name != "README.md")
    for want in expected:
        got = (tmp_path / want.name).read_bytes()
        if want.name == "README.md":
            assert got == with_runs_line(want.read_text(encoding="utf-8")).encode("utf-8")
        else:
            assert got == want.read_bytes(), want.name
    assert sorted(p.name for p in paths if p.suffix in (".png", ".pdf") and "_bytes" not in p.name) == sorted(
        f"{p.stem}{ext}" for p in expected if p.suffix == ".md" and p.name != "README.md" for ext in (".png", ".pdf"))


def test_figures_match_the_stored_content(stored_cells):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = load_runs(stored_cells)
    figures = {pid: json.loads(json.dumps(figure_summary(make_figure(p))))
               for pid, p in runs.groupby("protocol_id") if p["status"].eq("ok").any()}
    assert figures == json.loads((EXPECTED / "figures.json").read_text())


def test_stored_cells_cover_what_the_equality_test_needs(stored_cells):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = load_runs(stored_cells)
    ok = runs[runs["status"].eq("ok")]
    assert {"coreset", "distill", "reference"} <= set(ok["group"]) and {"full", "full_tuned"} <= set(ok["method"])
    assert ok.groupby("protocol_id")["budget"].nunique().ge(2).sum() == 2  # two protocols, several budgets each
    assert ok["selection_seed"].nunique() >= 2 and ok["eval_seed"].nunique() >= 2
    assert {"failed", "not_applicable"} <= set(runs["status"])
    assert runs.groupby("protocol_id")["status"].agg(lambda s: s.eq("ok").any()).tolist().count(False) == 1

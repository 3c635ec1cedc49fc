"""The fairness views of one protocol: how much of a score is the method and how much its evaluation.

Each view is a pandas frame drawn from the runs frame (:mod:`reports.frame`), and is written as
markdown, LaTeX and CSV by :func:`fairness_markdown`, :func:`fairness_latex`, :func:`fairness_csv`
(docs/fairness.md says how to read them):

- :func:`gain_table`: a method's score minus that of random pairs of the same size under the same
  treatment (its learned step sizes and loss, identity targets; plain random for a set without a
  treatment), paired by (selection seed, eval seed), with the std of the differences;
- :func:`inflation_table`: the mean of (best recorded test score over the run's curve - last epoch),
  what a best-of-test protocol would have added (a diagnostic of other papers' protocols: vlbench
  scores the last epoch and never selects by the curve);
- :func:`transfer_table`: each set's score with its own student and with the transfer student;
- :func:`bytes_table`: each set with learned extras beside random and herding with as many pairs as
  its bytes buy (``floor(storage_bytes / pair_bytes)``);
- :func:`published_beside`: published means (other protocols) beside ours, only for datasets they
  were published on; they never enter any other view.
"""
from __future__ import annotations

import math

import pandas as pd

from reports import published as pub
from reports.frame import mean, ordered
from reports.frame import sample_std as _sample_std

PAIR = ["selection_seed", "eval_seed"]
PLAIN = " (plain)"


def sample_std(values) -> float:
    """Sample std (ddof=1) of the non-NaN values; NaN for fewer than two (one run has no spread)."""
    v = [float(x) for x in values if not pd.isna(x)]
    return _sample_std(v) if len(v) > 1 else math.nan


def _main(runs: pd.DataFrame) -> pd.DataFrame:
    """The ok runs of the grid's own rows (not the cells planned only for a view)."""
    return runs[runs["status"].eq("ok") & runs["view"].eq("")]


def _stats(values) -> tuple[int, float, float]:
    v = [float(x) for x in values if not pd.isna(x)]
    return len(v), mean(v), sample_std(v)  # std NaN for a single run


def gain_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per distillation method (its native and its plain rows) and budget: ``score``, ``random``
    (the comparator's mean over the paired runs), ``gain`` (mean of the paired differences),
    ``gain_std`` (their sample std), ``n`` pairs, ``treatment`` (``own`` or ``plain``). A treated set
    whose treated random cells are missing gets NaN, never a plain comparison."""
    ok = runs[runs["status"].eq("ok")]
    main = _main(runs)
    distill = main[main["group"].isin(("distill", "test"))]
    plain_random = main[main["method"].eq("random")]
    treated_random = ok[ok["view"].eq("treated")]
    rows = []
    for (method, budget), part in distill.groupby(["method", "budget"], sort=False):
        own = bool(part["treated"].fillna(False).any())
        if own:
            comp = treated_random[treated_random["treated_as"].eq(method) & treated_random["budget"].eq(budget)]
        else:
            comp = plain_random[plain_random["budget"].eq(budget)]
        merged = part[PAIR + ["mean"]].merge(comp[PAIR + ["mean"]], on=PAIR, suffixes=("", "_random"))
        n, gain, std = _stats(merged["mean"] - merged["mean_random"])
        rows.append({"method": method, "budget": int(budget), "treatment": "own" if own else "plain",
                     "n": n, "score": mean(merged["mean"]) if n else mean(part["mean"]),
                     "random": mean(merged["mean_random"]) if n else math.nan, "gain": gain, "gain_std": std})
    cols = ["method", "budget", "treatment", "n", "score", "random", "gain", "gain_std"]
    return ordered(pd.DataFrame(rows, columns=cols), by=("method", "budget"))


def inflation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (group, method, budget) with recorded curves: ``last`` (mean of the last-epoch scores),
    ``best`` (mean of the best recorded ones) and ``inflation`` = mean(best - last), its std, ``n``."""
    main = _main(runs)
    main = main[main["best_mean"].notna()]
    rows = []
    for (group, method, budget), part in main.groupby(["group", "method", "budget"], sort=False, dropna=False):
        n, infl, std = _stats(part["best_mean"] - part["mean"])
        rows.append({"group": group, "method": method, "budget": None if pd.isna(budget) else int(budget), "n": n,
                     "last": mean(part["mean"]), "best": mean(part["best_mean"]), "inflation": infl,
                     "inflation_std": std})
    cols = ["group", "method", "budget", "n", "last", "best", "inflation", "inflation_std"]
    return ordered(pd.DataFrame(rows, columns=cols).astype({"budget": "Int64"}))


def transfer_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (group, method, budget) with transfer scores: ``own`` and ``transfer`` means over the
    same runs, the transfer student's head, and ``ratio`` = transfer / own."""
    main = _main(runs)
    main = main[main["transfer_mean"].notna()]
    rows = []
    for (group, method, budget), part in main.groupby(["group", "method", "budget"], sort=False):
        own, tr = mean(part["mean"]), mean(part["transfer_mean"])
        rows.append({"group": group, "method": method, "budget": int(budget), "n": len(part),
                     "student": "/".join(sorted(set(part["transfer_head"]))), "own": own,
                     "own_std": sample_std(part["mean"]), "transfer": tr,
                     "transfer_std": sample_std(part["transfer_mean"]), "ratio": tr / own if own else math.nan})
    cols = ["group", "method", "budget", "n", "student", "own", "own_std", "transfer", "transfer_std", "ratio"]
    return ordered(pd.DataFrame(rows, columns=cols))


def matched_pairs(storage_bytes: int, pair_bytes: int) -> int:
    """Pairs of a coreset that fit in ``storage_bytes``: ``floor(storage_bytes / pair_bytes)``."""
    return int(storage_bytes) // int(pair_bytes)


def bytes_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per set with learned extras (method, budget): its mean ``storage_bytes``, the ``pairs`` those
    bytes buy as a coreset, its score, and random's and herding's score at that many pairs (any of
    their cells at that budget; NaN when none ran)."""
    ok = runs[runs["status"].eq("ok")]
    main = _main(runs)
    # one protocol, one pair size: cells stored before pair_bytes was recorded take their protocol's
    known = ok.groupby("protocol_id")["pair_bytes"].max()
    main = main.assign(pair_bytes=main["pair_bytes"].fillna(main["protocol_id"].map(known)))
    main = main[~main["method"].str.endswith(PLAIN) & main["budget"].notna() & main["pair_bytes"].notna()
                & main["n_pairs"].notna()]
    extras = main[main["storage_bytes"] > main["n_pairs"] * main["pair_bytes"]]
    rows = []
    for (method, budget), part in extras.groupby(["method", "budget"], sort=False):
        nbytes = int(part["storage_bytes"].max())
        pairs = matched_pairs(nbytes, int(part["pair_bytes"].iloc[0]))
        row = {"method": method, "budget": int(budget), "storage_bytes": nbytes, "pairs": pairs,
               "score": mean(part["mean"]), "score_std": sample_std(part["mean"])}
        for other in ("random", "herding"):
            o = ok[ok["method"].eq(other) & ok["budget"].eq(pairs) & ok["treated_as"].eq("")]
            row[other], row[f"{other}_std"] = mean(o["mean"]), sample_std(o["mean"])
        rows.append(row)
    cols = ["method", "budget", "storage_bytes", "pairs", "score", "score_std", "random", "random_std", "herding",
            "herding_std"]
    return ordered(pd.DataFrame(rows, columns=cols), by=("method", "budget"))


def bytes_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (group, method, budget) of the main rows: mean ``storage_bytes`` and mean recall (the bytes plot)."""
    main = _main(runs)
    main = main[main["budget"].notna() & main["storage_bytes"].notna() & ~main["method"].str.endswith(PLAIN)]
    out = (main.groupby(["group", "method", "budget"], sort=False)
           .agg(storage_bytes=("storage_bytes", "mean"), mean=("mean", mean)).reset_index())
    return ordered(out)


def published_beside(runs: pd.DataFrame) -> pd.DataFrame:
    """Published means (mean of six, other protocols) beside ours, for the budgets of this grid on a
    dataset they were published on (Flickr30K, COCO); empty otherwise."""
    dataset = str(runs["dataset"].iloc[0]) if len(runs) else ""
    pubs = pub.published_means(dataset)
    if pubs.empty:
        return pubs.assign(ours=[], ours_n=[])
    main = _main(runs)
    ours = main.groupby(["method", "budget"]).agg(ours=("mean", mean), ours_n=("mean", "count")).reset_index()
    out = pubs.merge(ours, on=["method", "budget"], how="inner")
    return ordered(out, by=("method", "budget"))


# --------------------------------------------------------------------------------------------
# writing

def _f(x, digits: int = 1) -> str:
    return "–" if x is None or pd.isna(x) else f"{float(x):.{digits}f}"


def _pm(m, s) -> str:
    return _f(m) if pd.isna(s) or pd.isna(m) else f"{_f(m)} ± {_f(s)}"


def _budget(b) -> str:
    return "all" if b is None or pd.isna(b) else str(int(b))


def views(runs: pd.DataFrame) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """The views as (title, note, header, text rows), shared by markdown and LaTeX."""
    out = []
    g = gain_table(runs)
    out.append(("Gain over random under the same treatment",
                "score − random pairs of the same size and seed trained as the set is (own: its learned step sizes "
                "and loss, identity targets; plain: the protocol); ± is the sample std of the paired differences.",
                ["method", "pairs", "treatment", "n", "score", "random", "gain"],
                [[r.method, _budget(r.budget), r.treatment, str(r.n), _f(r.score), _f(r.random),
                  _pm(r.gain, r.gain_std)] for r in g.itertuples()]))
    i = inflation_table(runs)
    out.append(("What best-of-test would have added",
                "mean over runs of (best test score among epochs 5, 10, … and the last − the last epoch's): what a "
                "protocol that reports its best test evaluation adds. A diagnostic of other papers' protocol; "
                "vlbench reports the last epoch and never selects by these scores.",
                ["method", "pairs", "n", "last", "best", "inflation"],
                [[r.method, _budget(r.budget), str(r.n), _f(r.last), _f(r.best), _pm(r.inflation, r.inflation_std)]
                 for r in i.itertuples()]))
    t = transfer_table(runs)
    out.append(("Transfer to another student",
                "the same set (same treatment) trained by a student it was not built for; ratio = transfer / own.",
                ["method", "pairs", "n", "student", "own", "transfer", "ratio"],
                [[r.method, _budget(r.budget), str(r.n), r.student, _pm(r.own, r.own_std),
                  _pm(r.transfer, r.transfer_std), _f(r.ratio, 2)] for r in t.itertuples()]))
    b = bytes_table(runs)
    out.append(("Budgets by bytes",
                "sets with learned extras beside random and herding coresets with floor(bytes / bytes per pair) pairs.",
                ["method", "pairs", "bytes", "coreset pairs", "score", "random", "herding"],
                [[r.method, _budget(r.budget), str(r.storage_bytes), str(r.pairs), _pm(r.score, r.score_std),
                  _pm(r.random, r.random_std), _pm(r.herding, r.herding_std)] for r in b.itertuples()]))
    p = published_beside(runs)
    if not p.empty:
        out.append(("Published rows beside ours (other protocols, not comparable)",
                    "published mean of six recalls as each paper reports it, with its protocol; shown for "
                    "orientation only and never used in any gain, ratio or ordering.",
                    ["method", "pairs", "ours", "published", "source", "published protocol"],
                    [[r.method, _budget(r.budget), _f(r.ours), _f(r.published), r.source, r.protocol]
                     for r in p.itertuples()]))
    return out


def fairness_markdown(runs: pd.DataFrame, title: str) -> str:
    lines = [f"# Fairness views · {title}", ""]
    for name, note, header, rows in views(runs):
        lines += [f"## {name}", "", note, ""]
        if not rows:
            lines += ["(no cells for this view)", ""]
            continue
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    return "\n".join(lines)


def fairness_latex(runs: pd.DataFrame, title: str) -> str:
    from reports.tables import tex_escape

    out = ["% Requires \\usepackage{booktabs}", f"% Fairness views: {tex_escape(title)}"]
    for name, note, header, rows in views(runs):
        if not rows:
            continue
        out += [r"\begin{table}[t]", r"\centering", rf"\caption{{{tex_escape(name)}: {tex_escape(note)}}}",
                r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
                " & ".join(tex_escape(h) for h in header) + r" \\", r"\midrule"]
        out += [" & ".join(tex_escape(c).replace("±", r"$\pm$") for c in r) + r" \\" for r in rows]
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out) + "\n"


def fairness_csv(runs: pd.DataFrame) -> str:
    """Every view's frame in one long CSV: a ``view`` column, then the view's own columns."""
    parts = [("gain", gain_table(runs)), ("inflation", inflation_table(runs)), ("transfer", transfer_table(runs)),
             ("bytes", bytes_table(runs)), ("published", published_beside(runs))]
    frames = [f.assign(view=name) for name, f in parts if not f.empty]
    if not frames:
        return "view\n"
    out = pd.concat(frames, ignore_index=True)
    cols = ["view"] + [c for c in out.columns if c != "view"]
    return out[cols].to_csv(index=False, lineterminator="\n", float_format="%.6g")

"""Published numbers: Wu et al. (TMLR 2024), "Vision-Language Dataset Distillation", recall by recall;
and the mean of six recalls of the methods compared since (LoRS, MDM, CovMatch, RepBlend), as each
paper reports it, with its protocol (``published_means``; ../shared/REFERENCE.md).

These were obtained under the paper's own protocol (its encoders, training and evaluation), not
vlbench's, so they are only ever shown as separate, labelled rows for orientation and never
compared (bolded, plotted) against measured results.

Values are recall in percent: TR R@1/5/10 (image->text) and IR R@1/5/10 (text->image); there is
no std. Budget ``None`` is the full training set (given for Flickr30K only).
"""
from __future__ import annotations

import pandas as pd

from reports.frame import RECALL_METRICS, ordered

SOURCE = "Wu et al., TMLR 2024"
LABEL = "(published, other protocol)"

# dataset -> method -> budget -> (tr_r1, tr_r5, tr_r10, ir_r1, ir_r5, ir_r10)
_TABLE: dict[str, dict[str, dict[int | None, tuple[float, ...]]]] = {
    "flickr30k": {
        "full": {None: (33.9, 65.1, 75.2, 27.3, 57.2, 69.7)},
        "random": {
            100: (1.3, 5.9, 10.1, 1.0, 4.0, 6.5),
            200: (2.1, 8.7, 13.2, 1.1, 4.8, 9.2),
            500: (5.2, 18.3, 25.7, 2.4, 10.5, 17.4),
            1000: (5.2, 15.6, 21.4, 3.8, 11.8, 19.9),
        },
        "herding": {
            100: (1.1, 4.7, 7.9, 0.7, 2.8, 5.3),
            200: (2.3, 8.4, 14.4, 1.5, 5.5, 9.3),
            500: (5.1, 16.4, 24.3, 3.0, 10.0, 17.0),
            1000: (5.0, 14.6, 20.4, 4.1, 12.1, 20.0),
        },
        "kcenter": {
            100: (0.6, 5.0, 7.6, 0.7, 3.1, 6.1),
            200: (2.2, 8.2, 13.5, 1.5, 5.4, 9.9),
            500: (4.9, 16.4, 23.3, 3.5, 10.4, 17.3),
            1000: (5.6, 16.1, 20.8, 4.4, 12.8, 20.4),
        },
        "forgetting": {
            100: (1.2, 4.2, 9.7, 0.7, 2.4, 5.6),
            200: (1.5, 8.4, 10.2, 1.2, 3.1, 8.4),
            500: (3.6, 12.3, 19.3, 1.8, 9.0, 15.9),
            1000: (3.1, 14.9, 18.9, 3.2, 9.5, 18.7),
        },
        "tm": {
            100: (9.9, 28.3, 39.1, 4.7, 15.7, 24.6),
            200: (10.2, 28.7, 41.9, 4.6, 16.0, 25.5),
            500: (13.3, 32.8, 46.8, 6.6, 20.2, 30.0),
            1000: (13.3, 31.5, 43.7, 7.9, 21.2, 34.4),
        },
    },
    "coco": {
        "random": {
            100: (0.8, 3.0, 5.0, 0.3, 1.3, 2.7),
            200: (1.0, 4.0, 7.2, 0.6, 2.3, 4.4),
            500: (1.9, 7.5, 12.5, 1.1, 5.0, 8.7),
            1000: (1.9, 7.6, 12.7, 1.5, 5.6, 9.6),
        },
        "herding": {
            100: (0.8, 2.1, 4.9, 0.5, 1.4, 3.5),
            200: (1.0, 3.6, 7.7, 0.9, 2.4, 4.1),
            500: (1.9, 7.8, 13.7, 1.7, 5.3, 9.9),
            1000: (2.4, 9.0, 14.0, 1.3, 5.7, 10.1),
        },
        "kcenter": {
            100: (1.4, 3.7, 5.5, 0.4, 1.4, 2.5),
            200: (1.2, 3.8, 7.5, 0.7, 2.1, 5.8),
            500: (2.5, 8.7, 14.3, 1.1, 6.3, 10.5),
            1000: (2.4, 9.0, 14.1, 1.5, 7.1, 10.9),
        },
        "forgetting": {
            100: (0.7, 2.6, 4.8, 0.3, 1.5, 2.5),
            200: (1.1, 3.5, 7.0, 0.6, 2.8, 4.9),
            500: (2.1, 8.2, 13.0, 0.8, 5.8, 8.2),
            1000: (1.9, 7.7, 13.0, 0.7, 4.6, 8.0),
        },
        "tm": {
            100: (2.5, 10.0, 15.7, 1.3, 5.4, 9.5),
            200: (3.3, 11.9, 19.4, 1.7, 6.5, 12.3),
            500: (5.0, 17.2, 26.0, 2.5, 8.9, 15.8),
            1000: (6.8, 21.9, 31.0, 3.3, 11.9, 22.1),
        },
    },
}


_LAST = "last epoch"
_BEST = "best of several test evaluations"
# dataset -> method -> (source, protocol, {budget: mean of the six recalls})
_MEANS: dict[str, dict[str, tuple[str, str, dict[int, float]]]] = {
    "flickr30k": {
        "random": (SOURCE, _LAST, {100: 4.8, 200: 6.5, 500: 13.2}),
        "tm": (SOURCE, _LAST, {100: 20.4, 200: 21.2, 500: 24.9}),
        "lors": ("LoRS, ICML 2024", f"{_BEST} (11)", {100: 27.4, 200: 29.5, 500: 31.6}),
        "mdm": ("MDM, CVPR 2026", _BEST, {100: 26.4, 200: 28.2, 500: 30.6}),
        "covmatch": ("CovMatch, NeurIPS 2025 (via RAHA, table 4)", f"{_BEST}; trainable encoders",
                     {100: 30.5, 200: 34.4, 500: 38.4}),
        "repblend": ("RepBlend, NeurIPS 2025", f"{_BEST} (6)", {100: 33.6, 200: 36.6, 500: 43.0}),
    },
    "coco": {
        "random": (SOURCE, _LAST, {100: 2.2, 200: 3.3, 500: 6.1}),
        "tm": (SOURCE, _LAST, {100: 7.4, 200: 9.2, 500: 12.6}),
        "lors": ("LoRS, ICML 2024", f"{_BEST} (11)", {100: 9.4, 200: 11.4, 500: 13.5}),
        "mdm": ("MDM, CVPR 2026", _BEST, {100: 10.3, 200: 13.1, 500: 15.3}),
        "covmatch": ("CovMatch, NeurIPS 2025 (via RAHA, table 4)", f"{_BEST}; trainable encoders",
                     {100: 11.5, 200: 14.8, 500: 19.6}),
        "repblend": ("RepBlend, NeurIPS 2025", f"{_BEST} (6)", {100: 15.2, 200: 19.4, 500: 19.8}),
    },
}


def published_means(dataset: str) -> pd.DataFrame:
    """One row per published (method, budget) mean of six recalls on ``dataset``: ``method``,
    ``budget``, ``published``, ``source``, ``protocol``; empty for a dataset nothing was published on."""
    rows = [{"method": m, "budget": b, "published": v, "source": src, "protocol": proto}
            for m, (src, proto, by_budget) in _MEANS.get(dataset.lower(), {}).items() for b, v in by_budget.items()]
    return pd.DataFrame.from_records(rows, columns=["method", "budget", "published", "source", "protocol"])


def published_rows(dataset: str) -> pd.DataFrame:
    """One row per published (method, budget) of ``dataset``: ``method``, ``budget`` (NA for the full
    training set) and the six recalls, in display order; empty if nothing was published."""
    rows = [{"method": method, "budget": budget, **dict(zip(RECALL_METRICS, vals))}
            for method, by_budget in _TABLE.get(dataset.lower(), {}).items() for budget, vals in by_budget.items()]
    frame = pd.DataFrame.from_records(rows, columns=["method", "budget", *RECALL_METRICS])
    return ordered(frame.astype({"budget": "Int64"}), by=("method", "budget"))


def datasets() -> list[str]:
    """Datasets with published numbers."""
    return sorted(_TABLE)


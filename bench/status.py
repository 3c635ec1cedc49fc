"""``bench status``: the last planned grid of each protocol against the cells on disk."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from bench.errors import BenchError
from bench.results import cell_path, read_json


def status_lines(out: Path) -> tuple[list[str], int]:
    grids = sorted((Path(out) / "grids").glob("*.json"))
    if not grids:
        raise BenchError(f"no runs under {out}; start one with `python -m bench run --out {out}`")
    lines, any_failed = [], False
    for g in grids:
        grid = read_json(g)
        if not grid:
            lines.append(f"{g}: unreadable grid file")
            continue
        pid = grid["protocol_id"]
        p = grid.get("protocol", {})
        counts: Counter = Counter()
        detail = []
        for c in grid["cells"]:
            rec = read_json(cell_path(out, pid, c["method"], c["budget"], c["selection_seed"]))
            if rec is None:
                state = "missing"
            elif rec.get("key") != c["key"]:
                state = "stale"
            else:
                state = "done" if rec.get("status") == "ok" else "failed"
            counts[state] += 1
            if state != "done":
                b = "full" if c["budget"] is None else c["budget"]
                err = f": {rec.get('error', '')}" if state == "failed" else ""
                detail.append(f"  {state:7s} {c['method']} @ {b} seed {c['selection_seed']}{err}")
        any_failed |= counts["failed"] > 0
        lines.append(f"protocol {pid} ({p.get('dataset')}, test split {p.get('test_split')}): "
                     f"{counts['done']} done, {counts['missing'] + counts['stale']} missing, {counts['failed']} failed "
                     f"of {len(grid['cells'])}")
        lines.extend(detail)
    return lines, 1 if any_failed else 0

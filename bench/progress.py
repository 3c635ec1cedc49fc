"""Progress bars: tqdm on a terminal, silent otherwise (logs and CI stay clean)."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(total=None, desc: str = "", unit: str = "it", **kw):
    disable = os.environ.get("VLBENCH_PROGRESS", "") == "0" or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True, **kw)

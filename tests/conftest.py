import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLBENCH_PROGRESS", "0")
torch.set_num_threads(min(2, torch.get_num_threads()))

FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"


@pytest.fixture
def flickr8k_root():
    if not (FLICKR8K / "dataset_flickr8k.json").exists():
        pytest.skip("../shared/data/flickr8k is not present (a user's clone)")
    return FLICKR8K

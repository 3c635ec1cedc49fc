import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLBENCH_PROGRESS", "0")
# Tests never touch the user's cache: a test that forgets --cache-dir computes into this empty one
# (and is slow enough to notice) instead of silently reading a warm ~/.cache/vlbench.
_TEST_CACHE = tempfile.mkdtemp(prefix="vlbench-test-cache-")
os.environ["VLBENCH_CACHE"] = _TEST_CACHE
atexit.register(shutil.rmtree, _TEST_CACHE, ignore_errors=True)
torch.set_num_threads(min(2, torch.get_num_threads()))

FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"


@pytest.fixture
def flickr8k_root():
    if not (FLICKR8K / "dataset_flickr8k.json").exists():
        pytest.skip("../shared/data/flickr8k is not present (a user's clone)")
    return FLICKR8K


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One feature/expert cache for the whole session (real encoders on 110 generated images)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_protocol(cache):
    from bench.protocol import ProtocolConfig, build_protocol
    from bench.protocol.training import Recipe

    cfg = ProtocolConfig(limit=(80, 30), recipe=Recipe(epochs=4, batch_size=16))
    return build_protocol(cfg, cache_dir=cache, log=None)

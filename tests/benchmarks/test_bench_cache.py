"""Speed of a feature-cache hit (``datasets.features.features`` finding its float16 ``.npy`` entry):
30,000 x 1280 float16 (a train split's worth of image features, 73 MiB), written once to a
temporary cache, then loaded from the page cache (warm: the common case within a grid run).
"""
from types import SimpleNamespace

import numpy as np
import pytest

from datasets.features import atomic_save_npy, cache_path, features

N, DIM = 30_000, 1280


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache")
    ds = SimpleNamespace(name="bench", identity={"bench": 1}, test_split="test")
    enc = SimpleNamespace(name="effnet_lite0", key={"encoder": "bench"}, modality="image")
    arr = np.random.default_rng(0).standard_normal((N, DIM), dtype=np.float32).astype(np.float16)
    atomic_save_npy(cache_path(cache_dir, ds, "train", enc), arr)
    return ds, enc, cache_dir, arr


@pytest.mark.benchmark(group="cache")
def test_bench_cache_load_30k_x_1280_float16(benchmark, cached):
    ds, enc, cache_dir, arr = cached
    out = benchmark(features, ds, "train", enc, cache_dir=cache_dir, log=None)
    assert out.shape == (N, DIM) and out.dtype == np.float16
    assert np.array_equal(out, arr)  # a hit: the stored entry, not a recomputation

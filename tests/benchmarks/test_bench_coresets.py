"""Speed of the feature-based coresets at scale: 30,000 random pairs (image 1280 + text 384 dims,
i.e. 30,000 x 1664 candidate features), budget 1000. Selected by ``-m benchmark`` only:

    .venv/bin/python -m pytest tests/benchmarks/test_bench_coresets.py -m benchmark --benchmark-only -q
"""
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.protocol import CutSplit  # noqa: E402
from methods import METHODS, MethodContext  # noqa: E402

N, D_IMG, D_TXT, BUDGET = 30_000, 1280, 384, 1000


@pytest.fixture(scope="module")
def protocol():
    g = torch.Generator().manual_seed(0)
    split = CutSplit(torch.randn(N, D_IMG, generator=g), torch.randn(N, D_TXT, generator=g), torch.arange(N))
    return SimpleNamespace(train=split, features_train=split)  # heads cut: the inputs are the features


@pytest.mark.benchmark(group="coresets")
@pytest.mark.parametrize("name", ["herding", "kcenter"])
def test_bench_coreset_30k_budget_1000(benchmark, protocol, name):
    cls = METHODS.get(name)
    ctx = MethodContext(protocol, None, log=lambda m: None)
    art = benchmark.pedantic(lambda: cls(cls.Config()).build(ctx, BUDGET, 0), rounds=2, iterations=1)
    art.validate(protocol, BUDGET)
    assert len(np.unique(art.indices)) == BUDGET

"""Speed of the protocol's retrieval scoring (``bench.protocol.retrieval.retrieval_metrics``: exact FAISS
inner-product search in both directions plus the tie-safe ranks) at Flickr30k/COCO test scale:
5,000 images x 25,000 captions (5 per image, shuffled), 512-d embeddings (the student's space).
Captions are noisy copies of their image's embedding, so recalls are neither 0 nor 100.
"""
import numpy as np
import pytest
import torch

from bench.protocol.retrieval import METRICS, retrieval_metrics

N_IMAGES, CAPTIONS_PER_IMAGE, DIM, NOISE = 5_000, 5, 512, 6.0


@pytest.fixture(scope="module")
def embeddings():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(N_IMAGES, DIM, generator=g)
    caption_image = torch.arange(N_IMAGES).repeat_interleave(CAPTIONS_PER_IMAGE)
    caption_image = caption_image[torch.randperm(len(caption_image), generator=g)]
    text = image[caption_image] + NOISE * torch.randn(len(caption_image), DIM, generator=g)
    return image.numpy(), text.numpy(), caption_image.numpy()


@pytest.mark.benchmark(group="retrieval")
def test_bench_retrieval_5k_images_25k_captions(benchmark, embeddings):
    out = benchmark.pedantic(retrieval_metrics, args=embeddings, rounds=3, iterations=1, warmup_rounds=1)
    assert set(METRICS) <= set(out)
    assert all(0.0 <= out[m] <= 100.0 for m in METRICS)
    for d in ("tr", "ir"):
        assert out[f"{d}_r1"] <= out[f"{d}_r5"] <= out[f"{d}_r10"]
    assert 0.0 < out["tr_r1"] < 100.0 and 0.0 < out["ir_r1"] < 100.0  # a real search, not a trivial one
    assert out["mean"] == pytest.approx(np.mean([out[m] for m in METRICS]))

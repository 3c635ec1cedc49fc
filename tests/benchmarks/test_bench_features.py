"""Speed of feature extraction with the offline default encoders (images/s, captions/s) on each
backend: eager torch and ONNX Runtime (``datasets.encoders``), one thread, procedural images at
224 px and their captions. The first call of each encoder builds its network (and the ONNX export)
outside the timed rounds."""
import pytest

from datasets.encoders import get_encoder
from datasets.registry import load_dataset

N_IMAGES, N_CAPTIONS = 32, 160  # the first 32 procedural images and their 5 captions each


@pytest.fixture(scope="module")
def items():
    ds = load_dataset("synthetic", limit=(N_IMAGES, 2))
    sp = ds.split("train")
    return [ds.load_image(r) for r in sp.images[:N_IMAGES]], sp.captions[:N_CAPTIONS]


def _encoder(monkeypatch, name, modality, backend, sample):
    monkeypatch.setenv("VLBENCH_ENCODER_BACKEND", backend)
    enc = get_encoder(name, modality)
    enc.encode(sample[:2])  # build the network (and, on onnx, the exported session's first run)
    return enc


@pytest.mark.benchmark(group="features")
@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("name,modality,n,dim,rate", [("effnet_lite0", "image", N_IMAGES, 1280, "images_per_s"),
                                                      ("minilm_l6", "text", N_CAPTIONS, 384, "captions_per_s")],
                         ids=["images_32_at_224px", "captions_160"])
def test_bench_features(benchmark, items, monkeypatch, backend, name, modality, n, dim, rate):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    batch = items[0] if modality == "image" else items[1]
    enc = _encoder(monkeypatch, name, modality, backend, batch)
    out = benchmark.pedantic(enc.encode, (batch,), rounds=3, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info[rate] = round(n / benchmark.stats.stats.min, 1)
    assert out.shape == (n, dim) and enc.backend == backend

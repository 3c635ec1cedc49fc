"""Speed of feature extraction with the offline default encoders (images/s, captions/s) on each
backend: eager torch and ONNX Runtime (``datasets.encoders``), one thread, procedural images at
224 px and their captions. The first call of each encoder builds its network (and the ONNX export)
outside the timed rounds."""
import pytest

from datasets.encoders import get_encoder
from datasets.registry import load_dataset

N_IMAGES, N_CAPTIONS = 32, 320


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
def test_bench_features_images_32_at_224px(benchmark, items, monkeypatch, backend):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    ims = items[0]
    enc = _encoder(monkeypatch, "effnet_lite0", "image", backend, ims)
    out = benchmark.pedantic(enc.encode, (ims,), rounds=3, iterations=1)
    benchmark.extra_info["images_per_s"] = round(N_IMAGES / benchmark.stats.stats.min, 1)
    assert out.shape == (N_IMAGES, 1280) and enc.backend == backend


@pytest.mark.benchmark(group="features")
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_bench_features_captions_320(benchmark, items, monkeypatch, backend):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    caps = items[1]
    enc = _encoder(monkeypatch, "minilm_l6", "text", backend, caps)
    out = benchmark.pedantic(enc.encode, (caps,), rounds=3, iterations=1)
    benchmark.extra_info["captions_per_s"] = round(N_CAPTIONS / benchmark.stats.stats.min, 1)
    assert out.shape == (N_CAPTIONS, 384) and enc.backend == backend

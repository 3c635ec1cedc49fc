"""Recall@K against hand-computed answers and the brute-force torch reference."""
import numpy as np
import pytest

from bench.protocol.retrieval import retrieval_metrics, retrieval_metrics_reference

BOTH = [retrieval_metrics, retrieval_metrics_reference]


@pytest.mark.parametrize("fn", BOTH)
def test_multi_caption_hit_counts_any_caption(fn):
    # image 0 = e0, image 1 = e1; image 0's captions: one far (e2), one exact (e0)
    img = np.eye(3)[:2]
    txt = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=np.float32)
    cap = [0, 0, 1]
    m = fn(img, txt, cap, ks=(1, 2))
    assert m["tr_r1"] == 100.0  # both images find one of their captions first
    # t2i: caption 0 (e2) scores 0 with both images: a tie, broken against it -> rank 1, miss at 1
    assert m["ir_r1"] == pytest.approx(200 / 3)
    assert m["ir_r2"] == 100.0


@pytest.mark.parametrize("fn", BOTH)
def test_ties_are_broken_against_the_query(fn):
    img = np.array([[1.0, 0.0]])
    txt = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # caption 0 is image 0's; caption 1 ties it
    img2 = np.vstack([img, [[0.0, 1.0]]])
    m = fn(img2, txt, [0, 1, 1], ks=(1, 2))
    # image 0: its caption 0 ties with caption 1 (non-matching) -> rank 1: miss at 1, hit at 2
    # image 1: captions 1 and 2; caption 2 scores 1.0, caption 0 scores 0 -> rank 0
    assert m["tr_r1"] == 50.0 and m["tr_r2"] == 100.0


@pytest.mark.parametrize("fn", BOTH)
def test_k_larger_than_gallery(fn):
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(3, 4)), rng.normal(size=(6, 4))
    m = fn(img, txt, [0, 0, 1, 1, 2, 2], ks=(1, 5, 10))
    assert m["tr_r5"] == m["tr_r10"] == 100.0  # 3 images x 2 captions: any rank < 5
    assert m["ir_r5"] == m["ir_r10"] == 100.0  # 3 images in the gallery


@pytest.mark.parametrize("fn", BOTH)
def test_perfect_and_reversed(fn):
    e = np.eye(4)
    m = fn(e, e, [0, 1, 2, 3])
    assert all(v == 100.0 for v in m.values())
    m = fn(e, -e + 0.01 * np.eye(4)[::-1], [0, 1, 2, 3], ks=(1,))
    assert m["tr_r1"] == 0.0


def test_scale_invariance_and_mean():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(20, 8)), rng.normal(size=(100, 8))
    cap = np.repeat(np.arange(20), 5)
    a = retrieval_metrics(img, txt, cap)
    b = retrieval_metrics(img * 7.0, txt * 0.1, cap)
    assert a == b
    assert a["mean"] == pytest.approx(np.mean([a[k] for k in a if k != "mean"]))


@pytest.mark.parametrize("seed", range(5))
def test_faiss_matches_reference_on_random_embeddings(seed):
    rng = np.random.default_rng(seed)
    n_img, per = 200, 5
    img = rng.normal(size=(n_img, 16)).astype(np.float32)
    cap = np.repeat(np.arange(n_img), per)
    txt = img[cap] + rng.normal(scale=1.5, size=(n_img * per, 16)).astype(np.float32)
    fast, ref = retrieval_metrics(img, txt, cap), retrieval_metrics_reference(img, txt, cap)
    assert fast == pytest.approx(ref, abs=1e-9)
    assert 0 < fast["tr_r1"] < 100 and 0 < fast["ir_r10"] < 100  # a non-degenerate case


def test_uneven_caption_counts_match_reference():
    rng = np.random.default_rng(3)
    cap = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 3, 3, 4])
    img, txt = rng.normal(size=(5, 3)), rng.normal(size=(len(cap), 3))
    assert retrieval_metrics(img, txt, cap) == pytest.approx(retrieval_metrics_reference(img, txt, cap))


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        retrieval_metrics(np.ones((2, 3)), np.ones((2, 4)), [0, 1])
    with pytest.raises(ValueError):
        retrieval_metrics(np.ones((2, 3)), np.ones((2, 3)), [0, 2])

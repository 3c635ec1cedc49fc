"""Image-text retrieval recall with exact inner-product search (FAISS), plus a plain torch reference.

Definitions (both directions use L2-normalised float32 embeddings and inner product):

* **i2t / text retrieval (TR)**: for each image, a hit at K if any of its captions is in the top K
  captions.
* **t2i / image retrieval (IR)**: for each caption, a hit at K if its image is in the top K images.

Ties are broken *against* the query: the rank of a query's best positive is the number of
non-positive gallery items whose score is greater than **or equal to** the best positive's score,
and a hit at K means rank < K. This makes the result independent of how a search library orders
equal scores (FAISS on CPU and GPU order ties differently). K larger than the gallery is allowed
(every query with a positive is then a hit).

The FAISS path searches the top ``max(K) + max_positives`` items, which provably contains every
item that can decide a hit at ``max(K)`` (see ``_ranks_from_topk``).
"""
from __future__ import annotations

import numpy as np
import torch

KS = (1, 5, 10)
METRICS = tuple(f"{d}_r{k}" for d in ("tr", "ir") for k in KS)  # tr_r1 ... ir_r10


def _normalise(x) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _positives_i2t(caption_image: np.ndarray, n_images: int) -> list[np.ndarray]:
    order = np.argsort(caption_image, kind="stable")
    bounds = np.searchsorted(caption_image[order], np.arange(n_images + 1))
    return [order[bounds[i]:bounds[i + 1]] for i in range(n_images)]


def _ranks_from_topk(scores: np.ndarray, labels: np.ndarray, positives: list[np.ndarray]) -> np.ndarray:
    """Rank of the best positive from a top-k list (``inf`` where no positive is listed).

    With k = Kmax + P (P = most positives of any query): if the list's last score is >= the best
    positive's score s*, then at least k - P >= Kmax non-positives score >= s*, so the query misses
    at every K <= Kmax whatever lies beyond the list. Otherwise every item scoring >= s* is listed.
    """
    ranks = np.full(len(positives), np.inf)
    for q, pos in enumerate(positives):
        lab = labels[q]
        valid = lab >= 0
        lab, sc = lab[valid], scores[q][valid]
        is_pos = np.isin(lab, pos)
        if not is_pos.any():
            continue
        best = sc[is_pos].max()
        ranks[q] = int(np.count_nonzero((sc >= best) & ~is_pos))
    return ranks


def _faiss_search(gallery: np.ndarray, queries: np.ndarray, k: int):
    import faiss

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    return index.search(queries, min(k, gallery.shape[0]))


def _recalls(ranks: np.ndarray, ks=KS) -> dict[int, float]:
    return {k: float(100.0 * np.mean(ranks < k)) for k in ks}


def retrieval_metrics(image_emb, text_emb, caption_image, ks=KS) -> dict[str, float]:
    """TR/IR recall@K in percent, plus ``mean`` (the mean of the six recalls), via FAISS."""
    img, txt = _normalise(image_emb), _normalise(text_emb)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    _check(img, txt, caption_image)
    kmax = max(ks)
    pos_i2t = _positives_i2t(caption_image, len(img))
    p = max(len(p) for p in pos_i2t)
    s, lab = _faiss_search(txt, img, kmax + p)
    tr = _recalls(_ranks_from_topk(s, lab, pos_i2t), ks)
    s, lab = _faiss_search(img, txt, kmax + 1)
    ir = _recalls(_ranks_from_topk(s, lab, [np.array([c]) for c in caption_image]), ks)
    return _pack(tr, ir, ks)


def retrieval_metrics_reference(image_emb, text_emb, caption_image, ks=KS) -> dict[str, float]:
    """The same metric from the full similarity matrix in plain torch (for tests; O(N*M) memory)."""
    img = torch.nn.functional.normalize(torch.as_tensor(np.asarray(image_emb, dtype=np.float32)), dim=1)
    txt = torch.nn.functional.normalize(torch.as_tensor(np.asarray(text_emb, dtype=np.float32)), dim=1)
    cap = torch.as_tensor(np.asarray(caption_image, dtype=np.int64))
    sim = img @ txt.T  # images x captions
    pos = cap[None, :] == torch.arange(len(img))[:, None]
    best_i2t = torch.where(pos, sim, torch.tensor(-torch.inf)).max(dim=1).values
    rank_i2t = ((sim >= best_i2t[:, None]) & ~pos).sum(dim=1).double()
    rank_i2t[~pos.any(dim=1)] = torch.inf
    simT, posT = sim.T, pos.T
    best_t2i = simT[torch.arange(len(cap)), cap]
    rank_t2i = ((simT >= best_t2i[:, None]) & ~posT).sum(dim=1)
    tr = {k: float(100.0 * (rank_i2t < k).double().mean()) for k in ks}
    ir = {k: float(100.0 * (rank_t2i < k).double().mean()) for k in ks}
    return _pack(tr, ir, ks)


def _check(img, txt, cap):
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"embeddings must be 2-D with equal width, got {img.shape} and {txt.shape}")
    if len(cap) != len(txt):
        raise ValueError(f"caption_image has {len(cap)} entries for {len(txt)} captions")
    if len(cap) and (cap.min() < 0 or cap.max() >= len(img)):
        raise ValueError("caption_image refers to an image index out of range")


def _pack(tr, ir, ks) -> dict[str, float]:
    out = {f"tr_r{k}": tr[k] for k in ks} | {f"ir_r{k}": ir[k] for k in ks}
    out["mean"] = float(np.mean(list(out.values())))
    return out

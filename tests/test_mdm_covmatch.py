"""``mdm`` and ``covmatch`` against independent references: the geodesic kernel and the unbiased
MMD² by brute-force numpy loops, the interpolated teacher by its formula per tensor, the k-means
initialisation (distinct real pairs, each its cluster's member nearest the centroid), the
cross-covariance against ``numpy.cov``, CovMatch's closed form (the linear loss's minimiser), the
per-budget defaults, and tiny variants end to end (same seed, same set)."""
import json
import math

import numpy as np
import pytest
import torch

from bench.cli import main
from bench.errors import BenchError
from methods import METHODS
from methods.covmatch import COVMATCH_TABLE, CovMatchConfig, covmatch_loss, cross_covariance
from methods.mdm import MDMConfig, geodesic_kernel, interpolated_teacher, kmeans_init, mdm_loss, mmd2

TINY = ["--limit", "80,30", "--set", "recipe.epochs=2", "--set", "recipe.batch_size=16"]


def unit_rows(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_mmd2(x, y, sigma):
    k = lambda a, b: math.exp(-math.acos(max(-1.0, min(1.0, float(a @ b)))) ** 2 / (2 * sigma ** 2))  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_geodesic_kernel_and_mmd_equal_brute_force_loops():
    x, y = unit_rows(7, 5, 0), unit_rows(11, 5, 1)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    k = geodesic_kernel(tx, ty, 0.5).numpy()
    for i in range(7):
        for j in range(11):
            assert k[i, j] == pytest.approx(math.exp(-math.acos(float(x[i] @ y[j])) ** 2 / 0.5), rel=1e-9)
    assert float(mmd2(tx, ty, 0.5)) == pytest.approx(brute_mmd2(x, y, 0.5), rel=1e-9, abs=1e-12)
    # two samples of one distribution: the unbiased estimate is near 0; a shifted one is clearly positive
    a, b = torch.from_numpy(unit_rows(300, 5, 2)), torch.from_numpy(unit_rows(300, 5, 3))
    far = torch.nn.functional.normalize(b + 2 * torch.eye(5, dtype=b.dtype)[0], dim=1)
    assert abs(float(mmd2(a, b, 0.5))) < 0.01 < 0.05 < float(mmd2(a, far, 0.5))


def test_mdm_loss_is_infonce_plus_the_rooted_mmds_of_sum_and_difference():
    g = torch.Generator().manual_seed(0)
    z = [torch.nn.functional.normalize(torch.randn(n, 6, generator=g, dtype=torch.double), dim=1) for n in (5, 5, 9, 9)]
    got = float(mdm_loss(*z, temperature=0.1, sigma=0.5, mmd_weight=0.8))
    zi, zt, ri, rt = (t.numpy() for t in z)
    logits = zi @ zt.T / 0.1
    ce = lambda lg: float(np.mean([-lg[i, i] + np.log(np.exp(lg[i]).sum()) for i in range(len(lg))]))  # noqa: E731
    want = 0.5 * (ce(logits) + ce(logits.T))
    for s in (1, -1):
        u = zi + s * zt
        v = ri + s * rt
        want += 0.8 * math.sqrt(max(brute_mmd2(u / np.linalg.norm(u, axis=1, keepdims=True),
                                               v / np.linalg.norm(v, axis=1, keepdims=True), 0.5), 1e-12))
    assert got == pytest.approx(want, rel=1e-9)


def test_the_interpolated_teacher_follows_the_formula_per_tensor():
    spec = [("a", torch.Size([2, 3])), ("b", torch.Size([4]))]
    g = torch.Generator().manual_seed(3)
    w0, w1, w2 = (torch.randn(10, generator=g, dtype=torch.double) for _ in range(3))
    got = interpolated_teacher(w0, w1, w2, spec)
    for sl in (slice(0, 6), slice(6, 10)):
        d1, d2 = (w1[sl] - w0[sl]).numpy(), (w2[sl] - w0[sl]).numpy()
        c = d1 @ d2 / np.linalg.norm(d1) / np.linalg.norm(d2)
        want = w0[sl].numpy() + 0.5 * (2 * c / (1 + c)) * ((w1[sl] + w2[sl]).numpy() / 2 - w0[sl].numpy())
        assert np.allclose(got[sl].numpy(), want, rtol=1e-12)
    # two identical checkpoints: c = 1, r = 1, the teacher is half way from w0 to the checkpoint
    assert torch.allclose(interpolated_teacher(w0, w1, w1, spec), w0 + 0.5 * (w1 - w0))


def test_kmeans_init_returns_distinct_real_rows_nearest_their_centroids():
    from sklearn.cluster import KMeans
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 8)) * 5
    x = np.concatenate([c + rng.normal(size=(20, 8)) for c in centres])
    rows = kmeans_init(x, 6, seed=0)
    assert len(set(rows.tolist())) == 6 and rows.min() >= 0 and rows.max() < len(x)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    km = KMeans(n_clusters=6, n_init=1, max_iter=100, random_state=0).fit(xn)  # the same clustering, independently
    for c in range(6):
        members = np.flatnonzero(km.labels_ == c)
        nearest = members[np.argmin(np.linalg.norm(xn[members] - km.cluster_centers_[c], axis=1))]
        assert rows[c] == nearest
    # one pair per cluster of the six well-separated groups
    assert sorted(r // 20 for r in rows) == list(range(6))
    with pytest.raises(ValueError, match="larger than the train split"):
        kmeans_init(x, len(x) + 1, seed=0)


def test_cross_covariance_equals_numpy_cov_and_the_loss_its_definition():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 4, generator=g, dtype=torch.double), torch.randn(12, 3, generator=g, dtype=torch.double)
    full = np.cov(np.concatenate([a.numpy(), b.numpy()], axis=1), rowvar=False)
    assert np.allclose(cross_covariance(a, b).numpy(), full[:4, 4:], rtol=1e-12)
    ra, rb = torch.randn(20, 4, generator=g, dtype=torch.double), torch.randn(20, 3, generator=g, dtype=torch.double)
    gi, gt = torch.nn.Linear(4, 2).double(), torch.nn.Linear(3, 2).double()
    got = float(covmatch_loss(a, b, ra, rb, gi, gt, rho=2.0, lam=0.3).detach())
    want = ((2 * np.cov(np.c_[ra.numpy(), rb.numpy()], rowvar=False)[:4, 4:] - full[:4, 4:]) ** 2).sum()
    with torch.no_grad():
        want += 0.3 * float(((gi(ra).mean(0) - gi(a).mean(0)) ** 2).sum() + ((gt(rb).mean(0) - gt(b).mean(0)) ** 2).sum())
    assert got == pytest.approx(want, rel=1e-10)


def test_the_linear_contrastive_loss_is_minimised_at_the_cross_covariance_over_rho():
    """CovMatch's premise: ``−Tr(Wᵀ C) + (ρ/2)||W||²`` over ``W = G_vᵀ G_l`` is minimised at ``C/ρ``
    (found here by gradient descent from zero), so matching ``C`` matches the trained projections."""
    g = torch.Generator().manual_seed(0)
    c = cross_covariance(torch.randn(30, 4, generator=g, dtype=torch.double), torch.randn(30, 3, generator=g, dtype=torch.double))
    w = torch.zeros(4, 3, dtype=torch.double, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.2)
    for _ in range(300):
        opt.zero_grad()
        (-(w * c).sum() + 1.0 * (w ** 2).sum()).backward()  # ρ = 2
        opt.step()
    assert torch.allclose(w.detach(), c / 2, atol=1e-10)


def test_defaults_and_bad_settings():
    assert CovMatchConfig().resolved(100).rho == 2.0 and CovMatchConfig().resolved(1000) == CovMatchConfig().resolved(500)
    r = CovMatchConfig(lam=0.7).resolved(500)
    assert (r.lam, r.rho, r.iterations, r.batch_syn) == (0.7, 1.0, 20_000, 256) and COVMATCH_TABLE[200]["lam"] == 0.1
    m = MDMConfig()
    assert (m.iterations, m.batch_syn, m.batch_real, m.lr_image, m.momentum, m.grad_clip, m.mmd_weight, m.sigma) == \
        (3000, 64, 256, 1000.0, 0.5, 1.0, 0.8, 0.5)
    from methods.trajectory_matching import TMConfig
    assert m.experts() == TMConfig().experts()  # tm's expert buffers
    assert {"mdm", "covmatch"} <= set(METHODS.select("distill"))
    for bad in (dict(init="spherical"), dict(keep="best"), dict(batch_syn=1), dict(sigma=0)):
        with pytest.raises(BenchError):
            MDMConfig(**bad)
    with pytest.raises(BenchError):
        CovMatchConfig(keep="best")


def test_tiny_variants_run_deterministically(tmp_path, cache):
    out = tmp_path / "runs"
    args = ["run", "--methods", "test_mdm,test_covmatch", "--ipc", "10", "--seeds", "1", "--out", str(out),
            "--cache-dir", str(cache), *TINY]
    assert main(args) == 0
    recs = {r["method"]: r for r in (json.loads(f.read_text()) for f in (out / "cells").rglob("test_*/*.json"))}
    assert set(recs) == {"test_mdm", "test_covmatch"}
    for rec in recs.values():
        assert rec["storage_bytes"] == 4 * 10 * (1280 + 384)  # pairs only: no learned extras
        assert "plain" not in rec and rec["info"]["holdout_curve"][0][0] == 0
    first = {m: torch.load(r["artifact"], weights_only=True) for m, r in recs.items()}
    assert main(args + ["--force"]) == 0
    for m, r in recs.items():
        again = torch.load(r["artifact"], weights_only=True)
        assert torch.equal(again["image"], first[m]["image"]) and torch.equal(again["text"], first[m]["text"])
    assert not torch.equal(first["test_mdm"]["image"], first["test_covmatch"]["image"])

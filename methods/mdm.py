"""``mdm`` (CVPR 2026): distribution matching of image-text pairs on the hypersphere, without an unroll.

Every iteration builds a teacher by weight interpolation: two random expert checkpoints ``w1, w2``
(expert and epoch drawn independently, epoch ≤ ``max_start_epoch``) and a fresh student ``w0``;
per parameter tensor ``c = cos(w1 − w0, w2 − w0)``, ``r = 2c / (1 + c)`` and
``w = w0 + ½·r·((w1 + w2)/2 − w0)``. With the teacher's embeddings ``z = normalize(head(x))``, each
pair is mapped to ``u = normalize(z_v + z_t)`` and ``g = normalize(z_v − z_t)``; the loss on a
minibatch of ``batch_syn`` synthetic pairs against ``batch_real`` real pairs is
``InfoNCE(T) + mmd_weight·(√MMD²_u + √MMD²_g)``, MMD² with the geodesic Gaussian kernel
``k(a, b) = exp(−arccos(⟨a, b⟩)² / (2σ²))``, diagonals excluded. The synthetic data moves by SGD
(momentum 0.5, lr 1000) with its gradient norm clipped at ``grad_clip``; the teacher never trains.

Initialisation: cosine k-means with K = budget over the candidate pairs (each train image with its
representative caption, ``methods/coreset_features.py``; MDM clusters every pair) on the normalised
concatenation of their frozen features, and the candidate nearest each centroid (``kmeans_init``).

MDM's release lacks its evaluation and saving code; the choices made here where it is silent are
listed in ``docs/methods.md``. ``keep`` as for ``tm``: ``holdout`` (default) returns the checked set
that trains the best student on held-out train images, ``last`` the final set.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from bench.errors import BenchError
from bench.progress import progress
from bench.protocol.student import contrastive_loss
from bench.protocol.training import PairSet
from datasets.features import default_cache_dir
from methods.base import OMIT_DEFAULT, Artifact, MethodContext, register_method
from methods.coreset_features import candidate_features, check_budget
from methods.tm.experts import ExpertBuffer, ExpertConfig, expert_student, trainable, unflatten
from methods.holdout import HeldOut

ARCCOS_EPS = 1e-6  # inner products are clamped to [-1 + eps, 1 - eps]: arccos has an infinite slope at ±1


def geodesic_kernel(a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    """``exp(−arccos(⟨a_i, b_j⟩)² / (2σ²))`` for unit rows ``a [m, d]`` and ``b [n, d]``."""
    theta = torch.arccos((a @ b.T).clamp(-1 + ARCCOS_EPS, 1 - ARCCOS_EPS))
    return torch.exp(-theta ** 2 / (2 * sigma ** 2))


def mmd2(x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """Unbiased MMD² between unit rows ``x [m, d]`` and ``y [n, d]`` (m, n ≥ 2): within-set kernel
    means over ``i ≠ j``, minus twice the cross mean."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = geodesic_kernel(x, x, sigma), geodesic_kernel(y, y, sigma), geodesic_kernel(x, y, sigma)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * kxy.mean()


def interpolated_teacher(w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, spec: list) -> torch.Tensor:
    """MDM's teacher: per tensor of ``spec``, ``w0 + ½·r·((w1 + w2)/2 − w0)`` with ``r = 2c/(1 + c)``
    and ``c`` the cosine between ``w1 − w0`` and ``w2 − w0`` (flat vectors in, flat vector out)."""
    parts = []
    sizes = [int(torch.Size(s).numel()) for _, s in spec]
    for a, b, o in zip(torch.split(w1, sizes), torch.split(w2, sizes), torch.split(w0, sizes)):
        c = F.cosine_similarity((a - o)[None], (b - o)[None], eps=1e-12)[0]
        r = 2 * c / (1 + c)
        parts.append(o + 0.5 * r * ((a + b) / 2 - o))
    return torch.cat(parts)


def mdm_loss(z_img: torch.Tensor, z_txt: torch.Tensor, r_img: torch.Tensor, r_txt: torch.Tensor, *,
             temperature: float, sigma: float, mmd_weight: float) -> torch.Tensor:
    """InfoNCE over the synthetic pairs plus the square-rooted MMDs of ``normalize(z_v ± z_t)``
    between the synthetic embeddings ``z_*`` and the real ones ``r_*`` (all unit rows)."""
    loss = contrastive_loss(z_img, z_txt, temperature)
    for sign in (1.0, -1.0):
        u, v = F.normalize(z_img + sign * z_txt, dim=-1), F.normalize(r_img + sign * r_txt, dim=-1)
        loss = loss + mmd_weight * torch.sqrt(mmd2(u, v, sigma).clamp_min(1e-12))
    return loss


def kmeans_init(x: np.ndarray, k: int, seed: int, max_iter: int = 100) -> np.ndarray:
    """Rows of ``x`` ``[N, d]``, one per cluster of cosine k-means with ``k`` clusters (scikit-learn's
    KMeans on the L2-normalised rows, ``random_state=seed``): the row nearest its centroid among the
    cluster's members. A cluster left empty takes the nearest row not yet taken. Distinct rows."""
    from sklearn.cluster import KMeans

    check_budget(k, len(x), "mdm")
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    km = KMeans(n_clusters=k, n_init=1, max_iter=max_iter, random_state=seed).fit(xn)
    out, taken = np.full(k, -1, dtype=np.int64), np.zeros(len(x), dtype=bool)
    order = np.argsort(km.labels_, kind="stable")
    bounds = np.searchsorted(km.labels_[order], np.arange(k + 1))
    for c in range(k):
        members = order[bounds[c]:bounds[c + 1]]
        if len(members):
            out[c] = members[int(np.argmin(((xn[members] - km.cluster_centers_[c]) ** 2).sum(1)))]
            taken[out[c]] = True
    for c in np.flatnonzero(out < 0):
        dist = ((xn - km.cluster_centers_[c]) ** 2).sum(1)
        dist[taken] = np.inf
        out[c] = int(np.argmin(dist))
        taken[out[c]] = True
    return out


@dataclass(frozen=True)
class MDMConfig:
    iterations: int = 3000
    batch_syn: int = 64
    batch_real: int = 256
    lr_image: float = 1000.0
    lr_text: float = 1000.0
    momentum: float = 0.5
    grad_clip: float = 1.0  # the total gradient norm of the synthetic data per iteration (0 = off)
    mmd_weight: float = 0.8
    sigma: float = 0.5
    max_start_epoch: int = 2  # teacher checkpoints are drawn from epochs 0..max_start_epoch
    init: str = "kmeans"  # kmeans | random
    kmeans_iter: int = 100
    keep: str = "holdout"  # holdout | last
    check_every: int = 100
    holdout_images: int = 1000
    # keep=holdout: stop once this many checks in a row score no better than the best (0 = never; see
    # methods/holdout.py): the kept set is the whole run's unless a later check would have beaten it
    patience: int = field(default=0, metadata=OMIT_DEFAULT)
    # the expert buffer: tm's (same fields, same key), so the two share it
    n_experts: int = 5
    expert_train_epochs: int = 10
    expert_lr: float = 0.1
    expert_batch: int = 128

    def __post_init__(self):
        if self.init not in ("kmeans", "random"):
            raise BenchError(f"mdm init must be kmeans or random, not {self.init!r}")
        if self.keep not in ("holdout", "last"):
            raise BenchError(f"mdm keep must be holdout or last, not {self.keep!r}")
        if self.batch_syn < 2 or self.batch_real < 2:
            raise BenchError(f"mdm batch_syn and batch_real must be >= 2, not {self.batch_syn}, {self.batch_real}")
        if not self.sigma > 0 or self.grad_clip < 0 or self.mmd_weight < 0:
            raise BenchError("mdm sigma must be > 0, grad_clip and mmd_weight >= 0")
        if not 0 <= self.max_start_epoch <= self.expert_train_epochs:
            raise BenchError(f"mdm max_start_epoch must be in [0, expert_train_epochs], not {self.max_start_epoch}")
        if self.iterations < 1 or self.check_every < 1 or self.kmeans_iter < 1 or self.patience < 0:
            raise BenchError("mdm iterations, check_every and kmeans_iter must be >= 1 and patience >= 0")

    def experts(self) -> ExpertConfig:
        return ExpertConfig(n_experts=self.n_experts, epochs=self.expert_train_epochs, lr=self.expert_lr,
                            batch_size=self.expert_batch)


@register_method("mdm", "distill", help="distribution matching on the hypersphere, interpolated teachers (MDM, CVPR 2026)")
class MDM:
    Config = MDMConfig

    def __init__(self, config: MDMConfig):
        self.config = config

    def prepare(self, ctx: MethodContext) -> None:
        ExpertBuffer(ctx.protocol, self.config.experts(), ctx.cache_dir or default_cache_dir()).build(ctx.log)

    def build(self, ctx: MethodContext, budget: int, seed: int) -> Artifact:
        c, p = self.config, ctx.protocol
        dev = torch.device(p.device)
        buffer = ExpertBuffer(p, c.experts(), ctx.cache_dir or default_cache_dir()).build(ctx.log)
        trajectories, spec = buffer.load(), buffer.spec()
        model = expert_student(p, c.experts(), seed=0)  # the structure; its trainable values are replaced
        frozen = {n: t.detach() for n, t in model.named_parameters() if not t.requires_grad}
        frozen.update(dict(model.named_buffers()))
        rng = np.random.default_rng(seed)
        t0 = time.time()

        tr = p.train
        cap = tr.caption_image.numpy()
        ho = HeldOut(p, budget, c.holdout_images, seed, c.iterations, c.check_every, c.patience) if c.keep == "holdout" else None
        rest = ho.rest if ho is not None else np.arange(tr.n_images)
        x, caps = candidate_features(p.features_train)
        check_budget(budget, len(rest), "mdm")
        if c.init == "kmeans":
            init = caps[rest[kmeans_init(x[rest], budget, seed, c.kmeans_iter)]]
        else:
            init = caps[rng.choice(rest, size=budget, replace=False)]
        init_s = round(time.time() - t0, 1)
        real = np.flatnonzero(np.isin(cap, rest))  # the real pairs matched against: captions of the rest
        j = torch.as_tensor(init)
        syn_img = p.synthetic_images(tr.caption_image[j]).to(dev).requires_grad_(True)  # frozen-pixels: pixels
        syn_txt = tr.text[j].clone().to(dev).requires_grad_(True)
        opt = torch.optim.SGD([{"params": [syn_img], "lr": c.lr_image}, {"params": [syn_txt], "lr": c.lr_text}],
                              momentum=c.momentum)
        temp = p.cfg.student.temperature
        losses = []

        def check(it: int) -> None:
            state = (syn_img.detach().clone(), syn_txt.detach().clone())
            ho.check(it, state, PairSet.aligned(*state))

        def teacher() -> dict:
            """This iteration's interpolated teacher, as parameters for ``functional_call``."""
            picks = []
            for _ in range(2):
                traj = trajectories[int(rng.integers(len(trajectories)))]
                picks.append(traj[int(rng.integers(c.max_start_epoch + 1))].float())
            fresh = expert_student(p, c.experts(), seed=int(rng.integers(2**31)))
            w0 = torch.cat([t.detach().reshape(-1) for _, t in trainable(fresh)]).float()
            w = interpolated_teacher(w0, picks[0], picks[1], spec).to(dev)
            return unflatten(w, spec) | frozen

        done = c.iterations  # iterations run (fewer when ``patience`` stops the run)
        with torch.random.fork_rng(devices=[]), progress(total=c.iterations, desc=f"{self.name} {budget}", unit="it") as bar:
            torch.manual_seed(seed)
            if ho is not None:
                check(0)
            for it in range(c.iterations):
                params = teacher()
                b = torch.as_tensor(rng.permutation(budget)[:c.batch_syn]).to(dev)
                r = torch.as_tensor(rng.choice(real, size=min(c.batch_real, len(real)), replace=False))
                with torch.no_grad():
                    r_img, r_txt = functional_call(model, params, (p.image_inputs(tr.image[tr.caption_image[r]]).to(dev),
                                                                   tr.text[r].to(dev)))
                z_img, z_txt = functional_call(model, params, (p.image_features(syn_img[b]), syn_txt[b]))
                loss = mdm_loss(z_img, z_txt, r_img, r_txt, temperature=temp, sigma=c.sigma, mmd_weight=c.mmd_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if c.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([syn_img, syn_txt], c.grad_clip)
                opt.step()
                if not torch.isfinite(loss):
                    raise RuntimeError(f"mdm diverged at iteration {it}")
                losses.append(loss.item())
                if ho is not None and ho.due(it + 1):
                    check(it + 1)
                    if ho.stale():
                        bar.update(1)
                        done = it + 1
                        break
                bar.update(1)
                if it % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", **({"held_out": ho.curve[-1][1]} if ho and ho.curve else {}))
        kept_it, final = done, (syn_img.detach(), syn_txt.detach())
        if ho is not None:
            kept_it, final = ho.result(kept_it, final)
        k = max(1, min(50, len(losses) // 4))
        info = {"loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
                "kept_iteration": kept_it, "seconds": round(time.time() - t0, 1), "init_seconds": init_s,
                "experts_key": buffer.key, "init_caption_indices": init.tolist(),
                "seconds_per_iteration": round((time.time() - t0) / done, 4)}
        if ho is not None:
            info.update(ho.info())
        ctx.log(f"  {self.name}: loss {info['loss_first']:.3f} -> {info['loss_last']:.3f}, "
                f"kept iteration {kept_it}, {info['seconds']} s")
        return Artifact("synthetic", image=final[0].cpu(), text=final[1].cpu(), info=info)


_TINY = dict(iterations=6, n_experts=2, expert_train_epochs=3, max_start_epoch=2, kmeans_iter=10, check_every=3)


@register_method("test_mdm", "test", help="tiny mdm for CI")
class TinyMDM(MDM):
    Config = dataclass(frozen=True)(type("test_mdm_config", (MDMConfig,), {
        "__annotations__": {k: type(v) for k, v in _TINY.items()}, **_TINY}))

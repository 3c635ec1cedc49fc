"""Trajectory-matching distillation of image-text pairs (Wu et al., TMLR 2024, after Cazenavette
et al. 2022), under the ``heads`` cut: synthetic pairs live at the cut (an image feature and a text
feature per pair).

One iteration: pick an expert and a start epoch t < ``max_start_epoch``; start the student at the
expert's parameters θ*_t; unroll ``syn_steps`` differentiable SGD steps on minibatches of the
synthetic set with the learnable step size α (symmetric InfoNCE, the protocol's temperature);
minimise ``||θ_N − θ*_{t+M}||² / ||θ*_t − θ*_{t+M}||²`` (M = ``expert_epochs``) with respect to the
synthetic images, the synthetic texts and α. α is a plain positive scalar (projected to stay above
``min_lr``); it is part of the artifact and of its storage.

Variants share this code through ``modality``: ``tm`` (joint), ``tm_image`` (texts fixed to the real
captions of the initial pairs), ``tm_text`` (images fixed). ``tm_lora`` matches LoRA-adapter
trajectories: experts and the unrolled student train only rank-r adapters (peft) on top of frozen
base heads. Under the ``heads`` cut nothing is pretrained in the student, so the base heads are a
fixed random initialisation from ``base_seed`` (recorded; 4 bytes to regenerate): the adapters then
span a rank-r subspace of head updates around it. The protocol's evaluation is unchanged for every
method (a fresh, fully trainable student), so ``tm_lora`` differs from ``tm`` only in what is matched.

Synthetic sets start from random real pairs (distinct images, drawn from the selection seed).
With ``keep="best"`` (default) the set returned is the one at the lowest 25-iteration mean of the
matching loss (the method's own objective; no score is looked at): on the synthetic dataset the
unroll can destabilise late (step size collapsing, loss rising) after reaching a good set.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call

from bench.errors import NotApplicable
from bench.progress import progress
from bench.student import contrastive_loss
from bench.trajectories import ExpertBuffer, ExpertConfig, expert_student, unflatten
from datasets.features import default_cache_dir
from methods.base import Artifact, MethodContext, register_method
from methods.random_subset import random_pairs


@dataclass(frozen=True)
class TMConfig:
    modality: str = "joint"  # joint | image | text
    iterations: int = 800
    syn_steps: int = 20
    expert_epochs: int = 2
    max_start_epoch: int = 4
    batch_syn: int = 128  # synthetic pairs per unrolled step (all of them when the budget is smaller)
    lr_image: float = 1000.0
    lr_text: float = 1000.0
    momentum: float = 0.5
    keep: str = "best"  # "best": the set at the lowest 25-iteration mean matching loss; "last": the final set
    lr_init: float = 0.1  # the paper's; 0.5 was faster on Flickr8k val but unstable on the synthetic set
    lr_lr: float = 0.01
    min_lr: float = 1e-4
    n_experts: int = 5
    expert_train_epochs: int = 10
    expert_lr: float = 0.1
    expert_batch: int = 128
    lora_rank: int = 0
    base_seed: int = 12_345

    def experts(self) -> ExpertConfig:
        return ExpertConfig(n_experts=self.n_experts, epochs=self.expert_train_epochs, lr=self.expert_lr,
                            batch_size=self.expert_batch, lora_rank=self.lora_rank, base_seed=self.base_seed)


def _rss_mb() -> float:
    """Resident memory of this process (MiB): recorded early and at the end of a distillation, to
    show that memory does not grow with the number of iterations."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError):
        return float("nan")


def matching_loss(theta: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||θ_N − θ*_{t+M}||² / ||θ*_t − θ*_{t+M}||²``: 1 when the student did not move, 0 when it
    lands on the expert; invariant to a common rescaling of the parameters."""
    return ((theta - target) ** 2).sum() / ((start - target) ** 2).sum()


class TrajectoryMatching:
    Config = TMConfig

    def __init__(self, config: TMConfig):
        self.config = config

    def build(self, ctx: MethodContext, budget: int, seed: int) -> Artifact:
        c, p = self.config, ctx.protocol
        if p.cfg.student.cut != "heads":
            raise NotApplicable(f"{self.name} is implemented for the heads cut only")
        if c.modality not in ("joint", "image", "text"):
            raise ValueError(f"modality must be joint, image or text, not {c.modality!r}")
        if c.max_start_epoch + c.expert_epochs > c.expert_train_epochs:
            raise ValueError("max_start_epoch + expert_epochs exceeds the experts' epochs")
        buffer = ExpertBuffer(p, c.experts(), ctx.cache_dir or default_cache_dir()).build(ctx.log)
        trajectories = buffer.load()
        model = expert_student(p, c.experts(), seed=0)  # the structure to unroll; its trainable values are replaced
        spec = buffer.spec()
        frozen = {n: t.detach() for n, t in model.named_parameters() if not t.requires_grad}
        frozen.update({n: b for n, b in model.named_buffers()})

        rng = np.random.default_rng(seed)
        init = random_pairs(p.train.caption_image.numpy(), budget, rng)
        j = torch.as_tensor(init)
        syn_img = p.train.image[p.train.caption_image[j]].clone()
        syn_txt = p.train.text[j].clone()
        learn_img, learn_txt = c.modality in ("joint", "image"), c.modality in ("joint", "text")
        syn_img.requires_grad_(learn_img)
        syn_txt.requires_grad_(learn_txt)
        syn_lr = torch.tensor(c.lr_init, requires_grad=True)
        opts = [torch.optim.SGD([syn_lr], lr=c.lr_lr, momentum=c.momentum)]
        if learn_img:
            opts.append(torch.optim.SGD([syn_img], lr=c.lr_image, momentum=c.momentum))
        if learn_txt:
            opts.append(torch.optim.SGD([syn_txt], lr=c.lr_text, momentum=c.momentum))

        gen = torch.Generator().manual_seed(seed)
        temp = p.cfg.student.temperature
        bs = min(c.batch_syn, budget)
        losses, t0, rss_early = [], time.time(), _rss_mb()
        best = (float("inf"), c.iterations, None, None, None)
        with torch.random.fork_rng(devices=[]), progress(total=c.iterations, desc=f"{self.name} {budget}", unit="it") as bar:
            torch.manual_seed(seed)
            for it in range(c.iterations):
                traj = trajectories[int(rng.integers(len(trajectories)))]
                t = int(rng.integers(c.max_start_epoch))
                start, target = traj[t].float(), traj[t + c.expert_epochs].float()
                theta = start.clone().requires_grad_(True)
                for _ in range(c.syn_steps):
                    b = torch.randperm(budget, generator=gen)[:bs]
                    params = unflatten(theta, spec) | frozen
                    img, txt = functional_call(model, params, (syn_img[b], syn_txt[b]))
                    g = torch.autograd.grad(contrastive_loss(img, txt, temp), theta, create_graph=True)[0]
                    theta = theta - syn_lr * g
                loss = matching_loss(theta, start, target)
                for o in opts:
                    o.zero_grad(set_to_none=True)
                loss.backward()
                for o in opts:
                    o.step()
                with torch.no_grad():
                    syn_lr.clamp_(min=c.min_lr)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"distillation diverged at iteration {it} (step size {syn_lr.item():g})")
                losses.append(loss.item())
                if c.keep == "best" and len(losses) >= 25 and (it + 1) % 5 == 0:
                    window = float(np.mean(losses[-25:]))
                    if window < best[0]:  # the method's own objective, never a test score
                        best = (window, it + 1, syn_img.detach().clone(), syn_txt.detach().clone(), float(syn_lr.item()))
                if it == max(1, c.iterations // 10):
                    rss_early = _rss_mb()
                bar.update(1)
                if it % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{syn_lr.item():.3g}")
        if c.keep not in ("best", "last"):
            raise ValueError(f"keep must be 'best' or 'last', not {c.keep!r}")
        kept_it = c.iterations
        if c.keep == "best" and best[2] is not None:
            _, kept_it, img_b, txt_b, lr_b = best
            syn_img, syn_txt = img_b, txt_b
            syn_lr = torch.tensor(lr_b)
        k = max(1, min(50, len(losses) // 4))
        info = {"match_loss_first": float(np.mean(losses[:k])), "match_loss_last": float(np.mean(losses[-k:])),
                "learned_lr": float(syn_lr.item()), "kept_iteration": kept_it, "seconds": round(time.time() - t0, 1), "experts_key": buffer.key,
                "experts_disk_bytes": buffer.disk_bytes(), "rss_mb_early": rss_early, "rss_mb_end": _rss_mb(),
                "init_caption_indices": init.tolist()}
        ctx.log(f"  {self.name}: match loss {info['match_loss_first']:.3f} -> {info['match_loss_last']:.3f}, "
                f"step size {info['learned_lr']:.4g}, kept iteration {kept_it}, {info['seconds']} s")
        extras = {"lora_base_seed": torch.tensor([c.base_seed])} if c.lora_rank > 0 else {}
        return Artifact("synthetic", image=syn_img.detach(), text=syn_txt.detach(), lr=float(syn_lr.item()),
                        extras=extras, info=info)


def _variant(name: str, help: str, group: str = "distill", **overrides):
    cfg_cls = dataclass(frozen=True)(type(f"{name}_config", (TMConfig,), {
        "__annotations__": {k: type(v) for k, v in overrides.items()}, **overrides}))
    cls = type(name, (TrajectoryMatching,), {"Config": cfg_cls, "__doc__": help})
    register_method(name, group, help)(cls)
    return cls


_variant("tm", "trajectory matching, joint image+text (Wu et al. 2024)")
_variant("tm_image", "trajectory matching, images only (texts fixed)", modality="image")
_variant("tm_text", "trajectory matching, texts only (images fixed)", modality="text")
_variant("tm_lora", "trajectory matching of LoRA-adapter trajectories", lora_rank=16)
# tiny CI variants (timm-style test_* entries; never part of `all`)
_TINY = dict(iterations=6, syn_steps=3, n_experts=2, expert_train_epochs=3, expert_epochs=1, max_start_epoch=2)
_variant("test_tm", "tiny tm for CI", group="test", **_TINY)
_variant("test_tm_lora", "tiny tm_lora for CI", group="test", lora_rank=4, **_TINY)

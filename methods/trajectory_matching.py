"""Trajectory-matching distillation of image-text pairs (Wu et al., TMLR 2024, after Cazenavette
et al. 2022): synthetic pairs live at the cut. Under ``heads``: an image feature and a text feature
per pair. Under ``pixels``: an image (float pixels in the tower's normalised space, starting from
real images) and a text feature; the unrolled student holds the pretrained tower, whose parameters
are part of the matched trajectory (at ``student.tower_lr_scale`` times the step size).

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

Under ``pixels``, ``tm_lora`` puts the adapters on the pretrained tower (every ungrouped
convolution and linear; depthwise convolutions stay frozen, peft cannot wrap them) and the heads,
new layers, train fully; the matched vector is adapters + heads.

**Meta-gradient** (``unroll``, ``methods/tm/unroll.py``): ``naive`` keeps the whole unrolled graph
(memory grows with ``syn_steps``); ``exact`` recomputes one step at a time backwards from stored
parameter vectors (memory flat in ``syn_steps``; the pixels cut's default); ``fd`` does the same
without double backward, by central finite differences (radius ``fd_radius``); ``gram``
(``methods/tm/gram.py``, linear heads) is naive's mathematics in the space of the synthetic pairs;
``lora`` (``methods/tm/lora.py``, LoRA on linear heads) computes the frozen base layer once per
unroll. ``auto`` picks exact under pixels (naive for the LoRS family); under heads gram where it is
cheaper (below (image + text input dims) / 2 pairs, 832 with the default encoders, and at most 1.5 x
the syn_steps x batch rows an unroll draws), lora for LoRA heads below syn_steps x batch rows, naive
otherwise.

**Data update.** SGD on the synthetic data (the paper's: lr 1000, momentum 0.5; ``data_optimizer``,
``lr_image``, ``lr_text``), or ``data_optimizer="adam"`` (betas (``momentum``, 0.999)).

**Which set is returned** (``keep``). ``holdout`` (default): a fixed part of the train split
(``holdout_images``, at most a fifth of its images, from a fixed seed) is held out and never used to
initialise; every ``check_every`` iterations (and at 0 and at the end) a fresh student (seed 1000 +
the selection seed, ``CHECK_SEED``) is trained on the current set with the protocol's recipe and
scored on the held-out images; the best-scoring set is returned (``info.holdout_curve``,
``info.kept_iteration``). Early stopping on train data: val and test are never looked at. ``best``
returns the set at the lowest 25-iteration mean matching loss, ``last`` the final set.

**Back-off on a collapse** (``keep="holdout"`` only). When a check scores below ``backoff_below``
times the best check, the best set and its step size are restored, the optimisers' momentum is
dropped and the lrs of the data and of the LoRS targets' factors are multiplied by ``backoff``
(``info.backoffs``). A matching loss that is not finite is a collapse too (``info.diverged``;
without a checked set to go back to, the cell fails). A run without a collapse is exactly the run
without the rule.

**Clipping** (``grad_clip``). Each data tensor's (and each LoRS target factor's) gradient norm is
capped at ``grad_clip`` times the median of its last ``CLIP_HISTORY`` raw norms (once
``CLIP_WARMUP`` are known), so one outsized meta-gradient cannot throw the set away at lr 1000
(``info.clipped``).

Why each default is what it is, with the measurements: ``docs/findings.md``.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from bench.errors import BenchError
from bench.progress import progress
from bench.protocol.student import contrastive_loss, wbce_loss
from bench.protocol.training import PairSet, SimilarityTargets
from methods.tm.experts import ExpertBuffer, ExpertConfig, expert_student, tower_lr_scale, trainable, unflatten
from methods.tm.gram import InfoNCEHeads, cheaper as gram_is_cheaper, gram_meta_backward, supports as gram_supports
from methods.tm.lora import cheaper as lora_is_cheaper, lora_meta_backward, lora_scaling, supports as lora_supports
from methods.tm.unroll import MODES, meta_backward
from datasets.features import default_cache_dir
from methods.base import OMIT_DEFAULT, Artifact, MethodContext, register_method
from methods.holdout import HeldOut
from methods.random_subset import random_pairs


KEEP = ("holdout", "best", "last")
AUTO = -1  # a LoRS-family setting at this value takes the paper's default for the budget (``resolved``)
CLIP_HISTORY, CLIP_WARMUP = 50, 10  # grad_clip: the median of the last 50 norms, once 10 are known


@dataclass(frozen=True)
class TMConfig:
    modality: str = "joint"  # joint | image | text
    iterations: int = 1500
    syn_steps: int = 20
    expert_epochs: int = 2
    max_start_epoch: int = 4
    batch_syn: int = 128  # synthetic pairs per unrolled step, for budgets of at least ``whole_below``
    # budgets below this unroll the whole set at every step (MTT's and the paper's code's default at every
    # budget); from it on, minibatches of batch_syn bound the cost (docs/findings.md)
    whole_below: int = 256
    # how the synthetic data is updated: "sgd" (the paper's: lr 1000, momentum 0.5; default) or "adam"
    # (per-coordinate steps of about lr_image/lr_text, betas (momentum, 0.999))
    data_optimizer: str = "sgd"
    lr_image: float = 1000.0
    lr_text: float = 1000.0
    momentum: float = 0.5
    # data lr over the iterations: "constant" (the paper's) or "cosine" (annealed to 0 at the last iteration)
    lr_schedule: str = field(default="constant", metadata=OMIT_DEFAULT)
    # which set to return: "holdout" (the checked set, every ``check_every`` iterations and at 0 and the
    # end, that trains the best student on a held-out part of train), "best" (lowest 25-iteration mean
    # matching loss) or "last" (the final set)
    keep: str = "holdout"
    check_every: int = 50
    holdout_images: int = 1000  # at most a fifth of the train images; never used to initialise the set
    # keep=holdout: stop once this many checks in a row score no better than the best (0 = never; see
    # methods/holdout.py): the kept set is the whole run's unless a later check would have beaten it
    patience: int = field(default=0, metadata=OMIT_DEFAULT)
    # keep="holdout": when a check scores below ``backoff_below`` times the best one (a collapse), the
    # best set is restored and the data lr multiplied by ``backoff`` (1 = restore only; backoff_below
    # 0 = never): the paper's lr 1000 can throw a good set away late in the run
    backoff: float = 0.25
    backoff_below: float = 0.5
    # clip each learnable data tensor's (and target factor's) meta-gradient norm to this multiple of the
    # median of its last CLIP_HISTORY norms (0 = off): one exploding unroll cannot throw the set away
    grad_clip: float = 3.0
    lr_init: float = 0.1  # the paper's
    lr_lr: float = 0.01
    min_lr: float = 1e-4
    n_experts: int = 5
    expert_train_epochs: int = 10
    expert_lr: float = 0.1
    expert_batch: int = 128
    lora_rank: int = 0
    base_seed: int = 12_345
    # meta-gradient: auto | naive | exact | fd | gram | lora (see the module docstring); left out of cell keys at default
    unroll: str = field(default="auto", metadata=OMIT_DEFAULT)
    fd_radius: float = field(default=1e-3, metadata=OMIT_DEFAULT)  # fd: ||ε·μ||, the perturbation length (1e-2..1e-4 fine in fp32)
    # learned similarity targets S = diag(a) + (targets_alpha / r)·L·Rᵀ of rank r = targets_rank (LoRS; 0 = none),
    # moved by SGD at lr_targets; the unrolled steps and the set's native scoring then use WBCE against S
    targets_rank: int = field(default=0, metadata=OMIT_DEFAULT)
    targets_alpha: float = field(default=1.0, metadata=OMIT_DEFAULT)
    lr_targets: float = field(default=10.0, metadata=OMIT_DEFAULT)
    tower_lrs: bool = field(default=False, metadata=OMIT_DEFAULT)  # one learned step size per tower (LoRS)
    blend: bool = field(default=False, metadata=OMIT_DEFAULT)  # RepBlend: mix pairs in every unrolled step
    # "joint": one normalised distance over all matched parameters; "per_head": each head's own, summed
    match: str = field(default="joint", metadata=OMIT_DEFAULT)

    def resolved(self, budget: int) -> "TMConfig":
        """The settings used at ``budget`` (a variant with per-budget defaults fills them in here)."""
        return self

    def __post_init__(self):
        if self.unroll not in ("auto", "gram", "lora", *MODES):
            raise BenchError(f"tm unroll must be auto, gram, lora, {', '.join(MODES)}; not {self.unroll!r}")
        if not self.fd_radius > 0:
            raise BenchError(f"tm fd_radius must be positive, not {self.fd_radius}")
        if self.data_optimizer not in ("sgd", "adam"):
            raise BenchError(f"tm data_optimizer must be sgd or adam, not {self.data_optimizer!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise BenchError(f"tm lr_schedule must be constant or cosine, not {self.lr_schedule!r}")
        if self.keep not in KEEP:
            raise BenchError(f"tm keep must be one of {', '.join(KEEP)}, not {self.keep!r}")
        if not 0 < self.backoff <= 1 or not 0 <= self.backoff_below < 1:
            raise BenchError(f"tm backoff must be in (0, 1] and backoff_below in [0, 1), not {self.backoff}, {self.backoff_below}")
        if self.grad_clip < 0:
            raise BenchError(f"tm grad_clip must be >= 0 (0 = off), not {self.grad_clip}")
        if (self.batch_syn < 1 and self.batch_syn != AUTO) or self.whole_below < 0:
            raise BenchError(f"tm batch_syn must be >= 1 and whole_below >= 0, not {self.batch_syn}, {self.whole_below}")
        if self.check_every < 1 or self.holdout_images < 1 or self.patience < 0:
            raise BenchError(f"tm check_every and holdout_images must be >= 1 and patience >= 0, not {self.check_every}, "
                             f"{self.holdout_images}, {self.patience}")
        if self.match not in ("joint", "per_head"):
            raise BenchError(f"tm match must be joint or per_head, not {self.match!r}")
        if self.targets_rank < 0 and self.targets_rank != AUTO:
            raise BenchError(f"tm targets_rank must be >= 0, not {self.targets_rank}")
        if self.extended and self.unroll not in ("auto", "naive", "gram"):
            raise BenchError("learned targets, per-tower step sizes and blending unroll in naive or gram mode only "
                             f"(unroll=auto, naive or gram, not {self.unroll!r})")

    @property
    def extended(self) -> bool:
        """Whether the unrolled steps go beyond the paper's TM (LoRS's targets and step sizes, blending)."""
        return self.targets_rank != 0 or self.tower_lrs or self.blend or self.match != "joint"

    def unroll_mode(self, cut: str, spec: list, budget: int) -> str:
        """``auto``: exact under pixels (naive for the LoRS family); under heads gram (linear heads,
        when it costs less than naive, ``methods/tm/gram.py``), lora (LoRA on linear heads, when the
        budget is below the rows an unroll draws) or naive."""
        if self.unroll == "gram" and (cut != "heads" or not gram_supports(spec)):
            raise BenchError("tm unroll=gram needs the heads cut with linear heads and no LoRA")
        if self.unroll == "lora" and (cut != "heads" or not lora_supports(spec)):
            raise BenchError("tm unroll=lora needs the heads cut with LoRA on linear heads (tm_lora)")
        if self.unroll != "auto":
            return self.unroll
        rows = self.syn_steps * self.unroll_batch(budget)
        if cut != "heads":
            return "naive" if self.extended else "exact"  # the LoRS family unrolls in naive or gram only
        if gram_supports(spec) and gram_is_cheaper(spec, budget, rows):
            return "gram"
        if self.extended:
            return "naive"
        if lora_supports(spec) and lora_is_cheaper(budget, rows):
            return "lora"
        return "naive"

    def unroll_batch(self, budget: int) -> int:
        """Synthetic pairs per unrolled step: the whole set below ``whole_below`` pairs, else ``batch_syn``."""
        return budget if budget < self.whole_below else min(self.batch_syn, budget)

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


def matching_loss(theta: torch.Tensor, start: torch.Tensor, target: torch.Tensor,
                  groups: "list[torch.Tensor] | None" = None) -> torch.Tensor:
    """``||θ_N − θ*_{t+M}||² / ||θ*_t − θ*_{t+M}||²``: 1 when the student did not move, 0 when it
    lands on the expert; invariant to a common rescaling of the parameters. With ``groups`` (slices or
    boolean masks of θ, e.g. one per head: RepBlend) the sum of each group's own normalised distance."""
    if groups is None:
        return ((theta - target) ** 2).sum() / ((start - target) ** 2).sum()
    return sum(((theta[m] - target[m]) ** 2).sum() / ((start[m] - target[m]) ** 2).sum() for m in groups)


def head_groups(is_text: torch.Tensor) -> list:
    """The image and text sides of the flat parameter vector, as slices when each side is one run
    (the student's layout: tower and image head, then text head; indexing by slice is cheaper to
    differentiate than by mask), else as masks."""
    k = int((~is_text).sum())
    if bool((~is_text[:k]).all()) and bool(is_text[k:].all()):
        return [slice(0, k), slice(k, None)]
    return [~is_text, is_text]


def blend_draw(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's blend: ``λ ~ Beta(1, 1)`` and a permutation of ``n`` (torch's generator, seeded per cell)."""
    lam = torch.distributions.Beta(1.0, 1.0).sample().to(device)
    return lam, torch.randperm(n).to(device)


def blend_pairs(img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RepBlend's representation blending: ``λx + (1 − λ)x[π]`` with one ``λ`` and one permutation
    ``π`` for both sides (``blend_draw``)."""
    lam, perm = blend_draw(len(img), img.device)
    lam = lam.to(img.dtype)  # 1 − λ in the data's precision
    return lam * img + (1 - lam) * img[perm], lam * txt + (1 - lam) * txt[perm]


def similarity_block(a: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float) -> torch.Tensor:
    """A minibatch's block of ``diag(a) + (α/r)·L·Rᵀ`` from the batch's rows (differentiable)."""
    return torch.diag(a) + (alpha / left.shape[1]) * left @ right.T


def tm_iteration(model: torch.nn.Module, frozen: dict, spec: list, start: torch.Tensor, target: torch.Tensor,
                 syn_img: torch.Tensor, syn_txt: torch.Tensor, syn_lr: torch.Tensor, opts: list, *, syn_steps: int,
                 batch: int, temperature: float, min_lr: float, gen: torch.Generator, unroll: str = "naive",
                 fd_radius: float = 1e-3, lr_scale: "torch.Tensor | None" = None,
                 autocast: "torch.dtype | None" = None, before_step: "Callable[[], None] | None" = None,
                 targets: "tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None" = None,
                 lr_text: "torch.Tensor | None" = None, text_mask: "torch.Tensor | None" = None,
                 blend: bool = False, groups: "list[torch.Tensor] | None" = None,
                 image_fn: "Callable[[torch.Tensor], torch.Tensor] | None" = None) -> torch.Tensor:
    """One matching iteration: start the student (``model`` run with flat trainable parameters laid
    out by ``spec``, plus ``frozen``) at ``start``; unroll ``syn_steps`` differentiable SGD steps of
    step size ``syn_lr`` (times ``lr_scale`` per parameter, if given) on minibatches of ``batch``
    synthetic pairs drawn with ``gen``; backpropagate the matching loss to ``target`` into the
    synthetic set and ``syn_lr`` (``unroll``: naive, exact or fd, see ``methods/tm/unroll.py``; gram for
    linear heads, ``methods/tm/gram.py``, or lora for LoRA heads, ``methods/tm/lora.py``: these
    recompute the loss from the heads' pre-activations); step
    ``opts``; keep ``syn_lr >= min_lr``. ``autocast``: a dtype to run each step's forward in (under
    ``torch.autocast``), or None for float32 (what the methods use: in bfloat16 the pretrained tower
    cannot see its own inner steps, see docs/pixels.md). ``before_step()`` runs between the
    meta-backward and the optimiser steps (gradient clipping). Returns the (detached) matching loss.

    The LoRS family (naive or gram unroll): ``targets = (a, L, R, α)``, learned similarity factors that the
    steps' WBCE loss uses (the batch's rows) and that receive gradients like the data; ``lr_text``, the
    text tower's step size for the parameters in ``text_mask`` (``syn_lr`` then the image tower's);
    ``blend``, RepBlend's mixing of each minibatch; ``groups``, masks matched each on its own.

    ``image_fn`` (the frozen-pixels cut): ``syn_img`` holds pixels and the heads see
    ``image_fn(syn_img)``: the tower runs forward once, the unroll runs on its features exactly as
    under heads, and their gradient goes back through the tower once, into the pixels."""
    pixels = None
    if image_fn is not None:
        pixels, feats = syn_img, image_fn(syn_img)
        syn_img = feats.detach().requires_grad_(pixels.requires_grad)
    batches = [torch.randperm(len(syn_txt), generator=gen)[:batch].to(start.device) for _ in range(syn_steps)]

    def step_loss(theta, img, txt, *sim):
        if blend:  # the targets' block is not blended
            img, txt = blend_pairs(img, txt)
        with torch.autocast(start.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            img_e, txt_e = functional_call(model, unflatten(theta, spec) | frozen, (img, txt))
        if autocast is not None:  # the loss in float32 (a float32 or float64 model keeps its own precision)
            img_e, txt_e = img_e.float(), txt_e.float()
        if sim:
            return wbce_loss(img_e, txt_e, similarity_block(*sim, targets[3]), temperature)
        return contrastive_loss(img_e, txt_e, temperature)

    head_loss = InfoNCEHeads(temperature)  # gram and lora: the same loss from the heads' pre-activations
    if targets is not None:
        def head_loss(z_img, z_txt, *sim):  # noqa: F811 (LoRS's WBCE against the batch's block of targets)
            return wbce_loss(F.normalize(z_img, dim=-1), F.normalize(z_txt, dim=-1), similarity_block(*sim, targets[3]),
                             temperature)

    for o in opts:
        o.zero_grad(set_to_none=True)
    outer = lambda theta: matching_loss(theta, start, target, groups)  # noqa: E731
    extended = targets is not None or lr_text is not None or blend or groups is not None
    if unroll == "gram":
        loss = gram_meta_backward(head_loss, start, spec, [syn_img, syn_txt], batches, syn_lr, outer,
                                  extra=[] if targets is None else targets[:3], lr_text=lr_text,
                                  mix=(lambda n: blend_draw(n, start.device)) if blend else None)
    elif extended:
        if unroll != "naive":
            raise ValueError("learned targets, per-tower step sizes, blending and per-head matching unroll naively or by gram")
        lr = syn_lr if lr_text is None else torch.where(text_mask, lr_text, syn_lr)
        data = [syn_img, syn_txt, *([] if targets is None else targets[:3])]
        loss = meta_backward(step_loss, start, data, batches, lr, outer, mode="naive", lr_scale=lr_scale)
    elif unroll == "lora":
        loss = lora_meta_backward(head_loss, start, spec, frozen, lora_scaling(model), [syn_img, syn_txt],
                                  batches, syn_lr, outer)
    else:
        loss = meta_backward(step_loss, start, [syn_img, syn_txt], batches, syn_lr, outer, mode=unroll,
                             fd_radius=fd_radius, lr_scale=lr_scale)
    if pixels is not None and syn_img.grad is not None:
        feats.backward(syn_img.grad)
    if before_step is not None:
        before_step()
    for o in opts:
        o.step()
    with torch.no_grad():
        syn_lr.clamp_(min=min_lr)
        if lr_text is not None:
            lr_text.clamp_(min=min_lr)
    return loss.detach()


class TrajectoryMatching:
    Config = TMConfig

    def __init__(self, config: TMConfig):
        self.config = config

    def prepare(self, ctx: MethodContext) -> None:
        """Build (or resume) the expert buffer once, before any cell: cells, on however many workers,
        then only read it."""
        ExpertBuffer(ctx.protocol, self.config.experts(), ctx.cache_dir or default_cache_dir()).build(ctx.log)

    def build(self, ctx: MethodContext, budget: int, seed: int) -> Artifact:
        c, p = self.config.resolved(budget), ctx.protocol
        dev = torch.device(p.device)
        if c.modality not in ("joint", "image", "text"):
            raise ValueError(f"modality must be joint, image or text, not {c.modality!r}")
        if c.max_start_epoch + c.expert_epochs > c.expert_train_epochs:
            raise ValueError("max_start_epoch + expert_epochs exceeds the experts' epochs")
        buffer = ExpertBuffer(p, c.experts(), ctx.cache_dir or default_cache_dir()).build(ctx.log)
        trajectories = buffer.load()
        model = expert_student(p, c.experts(), seed=0)  # the structure to unroll; its trainable values are replaced
        spec = buffer.spec()
        mode = c.unroll_mode(p.cfg.student.trained().cut, spec, budget)  # frozen-pixels unrolls as heads
        frozen = {n: t.detach() for n, t in model.named_parameters() if not t.requires_grad}
        frozen.update({n: b for n, b in model.named_buffers()})
        lr_scale = tower_lr_scale(trainable(model), p.cfg.student.tower_lr_scale) if p.tower is not None else None
        lr_scale = None if lr_scale is None else lr_scale.to(dev)

        rng = np.random.default_rng(seed)
        cap = p.train.caption_image.numpy()
        ho = HeldOut(p, budget, c.holdout_images, seed, c.iterations, c.check_every, c.patience) if c.keep == "holdout" else None
        if ho is not None:  # the set starts from images outside the held-out part
            init = random_pairs(cap, budget, rng, images=rng.choice(ho.rest, size=budget, replace=False))
        else:
            init = random_pairs(cap, budget, rng)
        j = torch.as_tensor(init)
        syn_img = p.synthetic_images(p.train.caption_image[j]).to(dev)  # pixels cuts: normalised floats
        syn_txt = p.train.text[j].clone().to(dev)
        learn_img, learn_txt = c.modality in ("joint", "image"), c.modality in ("joint", "text")
        syn_img.requires_grad_(learn_img)
        syn_txt.requires_grad_(learn_txt)
        syn_lr = torch.tensor(c.lr_init, requires_grad=True, device=dev)
        # LoRS family: the text tower's own step size, learned similarity factors, per-head matching
        lr_txt = torch.tensor(c.lr_init, requires_grad=True, device=dev) if c.tower_lrs else None
        is_text = torch.cat([torch.full((int(torch.Size(shape).numel()),), n.startswith("text_head."), dtype=torch.bool)
                             for n, shape in spec]).to(dev)
        groups = head_groups(is_text) if c.match == "per_head" else None
        sim = None
        if c.targets_rank > 0:  # S = I at the start: a = 1, L ~ N(0, 1), R = 0 (LoRS's initialisation)
            g = torch.Generator().manual_seed(seed)
            sim = [torch.ones(budget), torch.randn(budget, c.targets_rank, generator=g),
                   torch.zeros(budget, c.targets_rank)]
            sim = [t.to(dev).requires_grad_(True) for t in sim]
        opts = [torch.optim.SGD([syn_lr] + ([lr_txt] if lr_txt is not None else []), lr=c.lr_lr, momentum=c.momentum)]
        slowed = []  # what a back-off slows: the data and the targets' factors, not the step sizes
        if sim is not None:
            slowed.append(torch.optim.SGD(sim, lr=c.lr_targets, momentum=c.momentum))
        data_groups = [{"params": [x], "lr": lr} for x, lr, on in ((syn_img, c.lr_image, learn_img),
                                                                   (syn_txt, c.lr_text, learn_txt)) if on]
        if c.data_optimizer == "adam":
            data_opt = torch.optim.Adam(data_groups, betas=(c.momentum, 0.999))
        else:
            data_opt = torch.optim.SGD(data_groups, momentum=c.momentum)  # each group carries its lr
        slowed.append(data_opt)
        opts += slowed
        if c.lr_schedule == "cosine":  # the data lr falls to 0 at the last iteration (the step size's lr stays)
            sched = torch.optim.lr_scheduler.LambdaLR(
                data_opt, lambda i: 0.5 * (1 + np.cos(np.pi * min(i, c.iterations) / c.iterations)))

        gen = torch.Generator().manual_seed(seed)
        temp = p.cfg.student.temperature
        bs = c.unroll_batch(budget)
        losses, t0, rss_early = [], time.time(), _rss_mb()
        done = c.iterations  # iterations run (fewer when ``patience`` stops the run)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        # keep="best": (25-iteration mean matching loss; iteration; its state, see snapshot); holdout: ho.kept
        kept = (float("inf"), c.iterations, None)
        backoffs = []  # iterations at which the best set was restored and the data lr cut
        diverged = []  # of those, the iterations whose matching loss was not finite

        learned = {"img": syn_img, "txt": syn_txt, "lr": syn_lr, "lr_txt": lr_txt,
                   **({} if sim is None else {"a": sim[0], "left": sim[1], "right": sim[2]})}
        learned = {k: v for k, v in learned.items() if v is not None}

        def snapshot() -> dict:
            return {k: v.detach().clone() for k, v in learned.items()}

        def as_set(state: dict) -> tuple[PairSet, "dict | None"]:
            """The set a state describes, and its native recipe (WBCE when it has targets)."""
            targets = None if sim is None else SimilarityTargets(state["a"].cpu(), state["left"].cpu(),
                                                                 state["right"].cpu(), c.targets_alpha)
            lr_t = float(state["lr_txt"]) if "lr_txt" in state else None
            return (PairSet.aligned(state["img"], state["txt"], float(state["lr"]), lr_t, targets),
                    None if targets is None else {"loss": "wbce"})

        def check(it: int) -> float:
            state = snapshot()
            return ho.check(it, state, *as_set(state))  # scored natively: the set's own loss and targets

        clipped_tensors = [("image", syn_img), ("text", syn_txt)]
        if sim is not None:  # the targets' factors are part of the set: one outsized step can ruin them too
            clipped_tensors += list(zip(("targets_a", "targets_left", "targets_right"), sim))
        norms = {id(x): deque(maxlen=CLIP_HISTORY) for _, x in clipped_tensors}
        clipped = []  # (iteration, tensor, norm / cap) of every clipped gradient

        def clip() -> None:
            """Cap each data (and target factor) gradient's norm at grad_clip x the median of its recent
            norms (raw norms are remembered, so the cap follows the run's own scale)."""
            for name, x in clipped_tensors:
                if x.grad is None:
                    continue
                n, h = float(x.grad.norm()), norms[id(x)]
                if not np.isfinite(n):  # a diverged step: backed off after it, and kept out of the history
                    continue
                if len(h) >= CLIP_WARMUP:
                    cap = c.grad_clip * float(np.median(h))
                    if n > cap:
                        x.grad.mul_(cap / n)
                        clipped.append((len(losses), name, round(n / cap, 2)))
                h.append(n)

        def backoff(kept: tuple) -> None:
            """Back to the best checked set and its step size, at a lower data lr, momentum forgotten."""
            with torch.no_grad():
                for k, v in learned.items():
                    v.copy_(kept[2][k])
            for o in opts:
                o.state.clear()
            for o in slowed:
                for g in o.param_groups:
                    g["lr"] *= c.backoff
            if c.lr_schedule == "cosine":
                sched.base_lrs = [b * c.backoff for b in sched.base_lrs]

        with torch.random.fork_rng(devices=[]), progress(total=c.iterations, desc=f"{self.name} {budget}", unit="it") as bar:
            torch.manual_seed(seed)
            if ho is not None:
                check(0)
            for it in range(c.iterations):
                traj = trajectories[int(rng.integers(len(trajectories)))]
                t = int(rng.integers(c.max_start_epoch))
                start, target = traj[t].float().to(dev), traj[t + c.expert_epochs].float().to(dev)
                loss = tm_iteration(model, frozen, spec, start, target, syn_img, syn_txt, syn_lr, opts,
                                    syn_steps=c.syn_steps, batch=bs, temperature=temp, min_lr=c.min_lr, gen=gen,
                                    unroll=mode, fd_radius=c.fd_radius, lr_scale=lr_scale,
                                    before_step=clip if c.grad_clip > 0 else None,
                                    targets=None if sim is None else (*sim, c.targets_alpha), lr_text=lr_txt,
                                    text_mask=is_text if lr_txt is not None else None, blend=c.blend, groups=groups,
                                    image_fn=p.image_features if p.frozen_tower is not None else None)
                if not torch.isfinite(loss):  # the step just taken was with non-finite gradients
                    if ho is None or ho.kept[2] is None:
                        raise RuntimeError(f"distillation diverged at iteration {it} (step size {syn_lr.item():g})")
                    backoff(ho.kept)  # as on a collapse: the best checked set, a lower data lr
                    backoffs.append(it + 1)
                    diverged.append(it + 1)
                    if c.lr_schedule == "cosine":
                        sched.step()
                    bar.update(1)
                    continue
                losses.append(loss.item())
                if c.lr_schedule == "cosine":
                    sched.step()
                if c.keep == "best" and len(losses) >= 25 and (it + 1) % 5 == 0:
                    window = float(np.mean(losses[-25:]))
                    if window < kept[0]:  # the method's own objective
                        kept = (window, it + 1, snapshot())
                if ho is not None and ho.due(it + 1):
                    score = check(it + 1)  # scored on held-out train images, never on val or test
                    if round(score, 2) < c.backoff_below * -ho.kept[0] and it + 1 < c.iterations:  # a collapse: back to the best set, slower
                        backoff(ho.kept)
                        backoffs.append(it + 1)
                    elif ho.stale():
                        bar.update(1)
                        done = it + 1
                        break
                if it == max(1, c.iterations // 10):
                    rss_early = _rss_mb()
                bar.update(1)
                if it % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{syn_lr.item():.3g}",
                                    **({"held_out": ho.curve[-1][1]} if ho and ho.curve else {}))
        kept_it, final = done, snapshot()
        if ho is not None:
            kept_it, final = ho.result(kept_it, final)
        elif c.keep == "best" and kept[2] is not None:
            _, kept_it, final = kept
        final_set, _ = as_set(final)
        k = max(1, min(50, len(losses) // 4))
        info = {"match_loss_first": float(np.mean(losses[:k])), "match_loss_last": float(np.mean(losses[-k:])),
                "learned_lr": final_set.lr, "kept_iteration": kept_it, "seconds": round(time.time() - t0, 1), "experts_key": buffer.key,
                "experts_disk_bytes": buffer.disk_bytes(), "rss_mb_early": rss_early, "rss_mb_end": _rss_mb(),
                "init_caption_indices": init.tolist(), "unroll": mode, "unroll_batch": bs,
                "seconds_per_iteration": round((time.time() - t0) / max(1, done), 3)}
        if c.grad_clip > 0:
            info["clipped"] = clipped
        if ho is not None:
            info.update(ho.info(), backoffs=backoffs, diverged=diverged)
        if dev.type == "cuda":
            info["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        if c is not self.config:  # per-budget defaults: what was used
            info["resolved"] = {f: getattr(c, f) for f in c.AUTO_FIELDS}
        ctx.log(f"  {self.name}: match loss {info['match_loss_first']:.3f} -> {info['match_loss_last']:.3f}, "
                f"step size {info['learned_lr']:.4g}, kept iteration {kept_it}, {info['seconds']} s")
        # heads: the frozen base heads are regenerated from base_seed (stored); pixels: the base is the pretrained tower
        extras = {"lora_base_seed": torch.tensor([c.base_seed])} if c.lora_rank > 0 and p.tower is None else {}
        if final_set.targets is not None:
            extras.update(final_set.targets.tensors())
        return Artifact("synthetic", image=final_set.image.cpu(), text=final_set.text.cpu(), lr=final_set.lr,
                        lr_text=final_set.lr_text, extras=extras, info=info)


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

"""Training a student on a set of pairs: the one recipe every method is scored with.

Plain minibatch SGD with momentum and weight decay for a fixed number of epochs (as in the paper's
evaluation: SGD, momentum 0.9, weight decay 5e-4, batch 64). The step size follows ``lr_policy``:

* ``fixed``: always ``lr``;
* ``learned`` (default): a set that learned a step size α (distillation unrolls plain SGD, no
  momentum) is trained with ``lr = α·(1 − momentum)``, the heavy-ball step whose effective step
  ``lr / (1 − momentum)`` equals α; a set without one uses ``lr``. (Using α itself with momentum 0.9,
  as the paper's code does, takes steps ten times larger than the ones the set was distilled for.)

Batches are drawn from a generator seeded by the eval seed only, so the same seed gives the same
numbers. ``batching`` says how an epoch of n pairs is cut:

* ``even`` (default): into ``ceil(n / batch_size)`` batches whose sizes differ by at most one
  (200 pairs: 4 x 50; 500: 8 x 62-63). A contrastive loss's batch *is* its set of negatives, so a
  ragged last batch is a different, much smaller loss taken at the full step size, once per epoch;
* ``ragged`` (the paper's code, a plain DataLoader): batches of ``batch_size`` and the remainder
  (200 pairs: 64, 64, 64 and 8). On Flickr8k val and the synthetic set, ``tm``'s 200-pair sets lost
  several points to their 8-pair batch (docs/findings.md, "Even batching").

A batch of a single pair has no negatives and is skipped.

``loss``: ``infonce`` (default; symmetric InfoNCE, the positives on the diagonal) or ``wbce``
(LoRS's weighted BCE against the set's learned similarity targets, the batch's block of them;
identity targets for a set without any). A set with learned targets is scored both ways by the
runner: natively (``wbce``, its targets, its step sizes) and plainly (the protocol as for every set).
The field is left out of the protocol id at its default, so ids from before it stay valid.

Under the ``pixels`` cut the student's tower trains too, at ``lr * student.tower_lr_scale``
(``Student.param_groups``). Batches move to the device the student is on.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from bench.errors import BenchError
from bench.protocol.student import Student, contrastive_loss, wbce_loss

BATCHING = ("even", "ragged")
LOSSES = ("infonce", "wbce")


@dataclass(frozen=True)
class Recipe:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_policy: str = "learned"
    batching: str = "even"
    loss: str = "infonce"

    def identity(self) -> dict:
        """The fields as hashed into protocol ids: ``loss`` only when it is not the default."""
        d = dataclasses.asdict(self)
        if d["loss"] == "infonce":
            d.pop("loss")
        return d

    def __post_init__(self):
        if self.lr_policy not in ("fixed", "learned"):
            raise BenchError(f"unknown lr_policy {self.lr_policy!r}; available: fixed, learned")
        if self.batching not in BATCHING:
            raise BenchError(f"unknown batching {self.batching!r}; available: {', '.join(BATCHING)}")
        if self.loss not in LOSSES:
            raise BenchError(f"unknown loss {self.loss!r}; available: {', '.join(LOSSES)}")
        if self.batch_size < 1 or self.epochs < 1:
            raise BenchError(f"recipe batch_size and epochs must be >= 1, not {self.batch_size}, {self.epochs}")
        if not self.lr > 0:
            raise BenchError(f"recipe lr must be > 0, not {self.lr}")
        if not 0 <= self.momentum < 1:
            raise BenchError(f"recipe momentum must be in [0, 1), not {self.momentum}")
        if not self.weight_decay >= 0:
            raise BenchError(f"recipe weight_decay must be >= 0, not {self.weight_decay}")

    def batches(self, order: torch.Tensor) -> list[torch.Tensor]:
        """One epoch's batches: ``order`` (a permutation) cut as ``batching`` says."""
        n = len(order)
        if n == 0:
            return []
        bs = min(self.batch_size, n)
        if self.batching == "ragged":
            return [order[s:s + bs] for s in range(0, n, bs)]
        return list(torch.tensor_split(order, -(-n // bs)))

    def step_size(self, learned: Optional[float]) -> float:
        if self.lr_policy == "learned" and learned is not None:
            return float(learned) * (1.0 - self.momentum)
        return self.lr


@dataclass
class SimilarityTargets:
    """Learned soft targets over a set's n pairs (LoRS): ``S = diag(a) + (α/r)·L·Rᵀ``, with
    ``a`` [n], ``L`` and ``R`` [n, r]; or a ``dense`` [n, n] matrix. ``S[i, j]`` is how much image i
    and text j should match. Only a batch's block is ever formed, ``S[b][:, b]``."""

    a: Optional[torch.Tensor] = None
    left: Optional[torch.Tensor] = None
    right: Optional[torch.Tensor] = None
    alpha: float = 1.0
    dense: Optional[torch.Tensor] = None

    def __post_init__(self):
        low_rank = self.a is not None and self.left is not None and self.right is not None
        if low_rank == (self.dense is not None):
            raise ValueError("similarity targets are either low-rank (a, left, right) or dense, not both or neither")
        if low_rank and not (self.left.shape == self.right.shape and self.left.shape[0] == len(self.a)):
            raise ValueError(f"similarity factors disagree: a {tuple(self.a.shape)}, L {tuple(self.left.shape)}, "
                             f"R {tuple(self.right.shape)}")

    def __len__(self) -> int:
        return len(self.a) if self.dense is None else len(self.dense)

    def block(self, idx: torch.Tensor) -> torch.Tensor:
        """``S[idx][:, idx]``, formed from the factors' rows (never the whole matrix)."""
        if self.dense is not None:
            return self.dense[idx][:, idx]
        r = self.left.shape[1]
        out = (self.alpha / r) * self.left[idx] @ self.right[idx].T if r else 0 * torch.eye(len(idx))
        return out + torch.diag(self.a[idx])

    def numel(self) -> int:
        """Learned floats (the scale α is a fixed setting, recorded in the method's config)."""
        if self.dense is not None:
            return self.dense.numel()
        return self.a.numel() + self.left.numel() + self.right.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored form (an artifact's extras)."""
        if self.dense is not None:
            return {"sim_dense": self.dense}
        return {"sim_a": self.a, "sim_left": self.left, "sim_right": self.right,
                "sim_alpha": torch.tensor([float(self.alpha)])}

    @staticmethod
    def from_tensors(extras: dict) -> Optional["SimilarityTargets"]:
        if "sim_dense" in extras:
            return SimilarityTargets(dense=extras["sim_dense"].float())
        if "sim_a" in extras:
            return SimilarityTargets(extras["sim_a"].float(), extras["sim_left"].float(), extras["sim_right"].float(),
                                     float(extras["sim_alpha"].reshape(-1)[0]))
        return None


@dataclass
class PairSet:
    """Pairs at the cut: ``text[j]`` goes with ``image[pair_image[j]]``; optional learned step size
    (``lr``; with ``lr_text``, one per tower: ``lr`` the image side's) and learned targets."""

    image: torch.Tensor
    text: torch.Tensor
    pair_image: torch.Tensor
    lr: Optional[float] = None
    lr_text: Optional[float] = None
    targets: Optional[SimilarityTargets] = None

    def __len__(self) -> int:
        return len(self.text)

    @staticmethod
    def aligned(image: torch.Tensor, text: torch.Tensor, lr: Optional[float] = None, lr_text: Optional[float] = None,
                targets: Optional[SimilarityTargets] = None) -> "PairSet":
        return PairSet(image, text, torch.arange(len(text)), lr, lr_text, targets)


class TrainingDiverged(RuntimeError):
    """A student's loss became non-finite: the set (or its learned step size or targets) cannot train it."""


def train_student(student: Student, pairs: PairSet, recipe: Recipe, seed: int,
                  on_epoch: Optional[Callable[[int, Student], None]] = None) -> float:
    """Train in place; returns the step size used. ``on_epoch(e, student)`` runs after each epoch
    (e = 1..epochs) and once before training (e = 0)."""
    with torch.random.fork_rng(devices=[]):  # dropout draws from the eval seed, not the process state
        torch.manual_seed(seed)
        return _train(student, pairs, recipe, seed, on_epoch)


def _train(student, pairs, recipe, seed, on_epoch) -> float:
    lr = recipe.step_size(pairs.lr)
    lr_text = recipe.step_size(pairs.lr_text) if pairs.lr_text is not None and recipe.lr_policy == "learned" else None
    if hasattr(student, "param_groups"):
        groups = student.param_groups(lr) if lr_text is None else student.param_groups(lr, lr_text)
    else:
        groups = student.parameters()
    wbce = recipe.loss == "wbce"
    opt = torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    dev = next(student.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    n = len(pairs)
    temp = student.cfg.temperature
    student.train()
    if on_epoch:
        on_epoch(0, student)
    for epoch in range(1, recipe.epochs + 1):
        order = torch.randperm(n, generator=gen)
        for j in recipe.batches(order):
            if len(j) < 2:  # a last batch of one pair has no negatives
                continue
            img, txt = student(pairs.image[pairs.pair_image[j]].to(dev), pairs.text[j].to(dev))
            if wbce:
                target = pairs.targets.block(j).to(dev) if pairs.targets is not None else torch.eye(len(j), device=dev)
                loss = wbce_loss(img, txt, target, temp)
            else:
                loss = contrastive_loss(img, txt, temp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"training diverged (loss {loss.item()}) at epoch {epoch} with step size {lr:g}")
        if on_epoch:
            on_epoch(epoch, student)
    student.eval()
    return lr


@torch.no_grad()
def embed(student: Student, image: torch.Tensor, text: torch.Tensor, batch: int = 4096):
    """L2-normalised embeddings (on the CPU) of images and texts at the cut, in batches (images
    through a tower in batches of ``student.image_batch``)."""
    student.eval()
    dev = next(student.parameters()).device
    ib = min(batch, getattr(student, "image_batch", batch))
    ie = torch.cat([student.embed_image(image[s:s + ib].to(dev)).cpu() for s in range(0, len(image), ib)])
    te = torch.cat([student.embed_text(text[s:s + batch].to(dev)).cpu() for s in range(0, len(text), batch)])
    return ie, te

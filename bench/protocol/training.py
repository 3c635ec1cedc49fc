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

Under the ``pixels`` cut the student's tower trains too, at ``lr * student.tower_lr_scale``
(``Student.param_groups``). Batches move to the device the student is on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from bench.errors import BenchError
from bench.protocol.student import Student, contrastive_loss

BATCHING = ("even", "ragged")


@dataclass(frozen=True)
class Recipe:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_policy: str = "learned"
    batching: str = "even"

    def __post_init__(self):
        if self.lr_policy not in ("fixed", "learned"):
            raise BenchError(f"unknown lr_policy {self.lr_policy!r}; available: fixed, learned")
        if self.batching not in BATCHING:
            raise BenchError(f"unknown batching {self.batching!r}; available: {', '.join(BATCHING)}")
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
class PairSet:
    """Pairs at the cut: ``text[j]`` goes with ``image[pair_image[j]]``; optional learned step size."""

    image: torch.Tensor
    text: torch.Tensor
    pair_image: torch.Tensor
    lr: Optional[float] = None

    def __len__(self) -> int:
        return len(self.text)

    @staticmethod
    def aligned(image: torch.Tensor, text: torch.Tensor, lr: Optional[float] = None) -> "PairSet":
        return PairSet(image, text, torch.arange(len(text)), lr)


def train_student(student: Student, pairs: PairSet, recipe: Recipe, seed: int,
                  on_epoch: Optional[Callable[[int, Student], None]] = None) -> float:
    """Train in place; returns the step size used. ``on_epoch(e, student)`` runs after each epoch
    (e = 1..epochs) and once before training (e = 0)."""
    with torch.random.fork_rng(devices=[]):  # dropout draws from the eval seed, not the process state
        torch.manual_seed(seed)
        return _train(student, pairs, recipe, seed, on_epoch)


def _train(student, pairs, recipe, seed, on_epoch) -> float:
    lr = recipe.step_size(pairs.lr)
    groups = student.param_groups(lr) if hasattr(student, "param_groups") else student.parameters()
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
            loss = contrastive_loss(img, txt, temp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged (loss {loss.item()}) at epoch {epoch} with step size {lr:g}")
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

"""The student: what the protocol trains from scratch on a set of pairs.

Under the ``heads`` cut both encoders are frozen and the inputs at the cut are their pooled
features; the student is one trainable projection head per tower into a shared space, trained with
a symmetric InfoNCE loss at a fixed temperature (0.07, as in the paper).

Heads: ``linear`` (one Linear per tower) or ``mlp`` (the paper's text head, used on both towers:
Linear, GELU, Linear, dropout, residual to the first projection, LayerNorm).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError


@dataclass(frozen=True)
class StudentConfig:
    cut: str = "heads"
    head: str = "linear"
    embed_dim: int = 512
    dropout: float = 0.1  # mlp head only
    temperature: float = 0.07


class ProjectionHead(nn.Module):
    """The paper's head: Linear, GELU, Linear, dropout, residual, LayerNorm."""

    def __init__(self, d_in: int, d_out: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.fc = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x):
        p = self.proj(x)
        return self.norm(self.dropout(self.fc(F.gelu(p))) + p)


def make_head(kind: str, d_in: int, d_out: int, dropout: float) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "mlp":
        return ProjectionHead(d_in, d_out, dropout)
    raise BenchError(f"unknown student head {kind!r}; available: linear, mlp")


class Student(nn.Module):
    def __init__(self, cfg: StudentConfig, d_image: int, d_text: int):
        super().__init__()
        if cfg.cut != "heads":
            raise BenchError(f"cut {cfg.cut!r} is not implemented yet; available: heads")
        self.cfg = cfg
        self.image_head = make_head(cfg.head, d_image, cfg.embed_dim, cfg.dropout)
        self.text_head = make_head(cfg.head, d_text, cfg.embed_dim, cfg.dropout)

    def forward(self, image_x: torch.Tensor, text_x: torch.Tensor):
        return self.embed_image(image_x), self.embed_text(text_x)

    def embed_image(self, x):
        return F.normalize(self.image_head(x), dim=-1)

    def embed_text(self, x):
        return F.normalize(self.text_head(x), dim=-1)


def contrastive_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of aligned pairs (row i of each side is a positive pair)."""
    logits = img_emb @ txt_emb.T / temperature
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def build_student(cfg: StudentConfig, d_image: int, d_text: int, seed: int) -> Student:
    """A fresh student whose initial weights depend only on ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Student(cfg, d_image, d_text)

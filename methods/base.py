"""The method contract and the method registry.

A method turns the train split (at the cut) and a budget into an ``Artifact``: either a *selected*
set (caption indices into the train split; each pair is a caption and its image, every image
distinct) or a *synthetic* set (tensors at the cut, plus learned extras such as a step size).

Register a method with ``@register_method(name, group)`` on a class that has a ``Config`` dataclass
and ``build(ctx, budget, seed) -> Artifact``. Groups: ``coreset``, ``distill``; ``reference`` (the
full-data row, never in ``all``); ``test`` (tiny CI variants, never in ``all``).

Optional hook: ``prepare(ctx)`` builds what the method's cells share and cache on disk (expert
buffers, full-data training statistics). The runner calls it once per (method, config), in the
driver, before any cell runs, so cells (possibly on many workers at once) only read those caches.
Without it there is nothing to prepare.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from bench.errors import BenchError
from bench.registry import Registry
from bench.protocol.training import PairSet, SimilarityTargets

METHODS: Registry = Registry("method")
BYTES_PER_VALUE = 4  # storage is counted as float32 values at the cut


def register_method(name: str, group: str, help: str = ""):
    def deco(cls):
        cls.name, cls.group = name, group
        METHODS.register(name, cls, groups=(group,), help=help)
        return cls
    return deco


def pair_bytes(protocol) -> int:
    """Bytes of one pair at the cut: its image's and its caption's inputs as float32 (pixels cuts:
    3 x S x S values per image)."""
    pixels = getattr(protocol, "train_pixels", None)  # frozen-pixels: the split holds features, a set pixels
    image = protocol.train.image[0] if pixels is None else pixels[0]
    return int(image.numel() + protocol.train.text.shape[1]) * BYTES_PER_VALUE


@dataclass
class MethodContext:
    protocol: Any  # bench.protocol.Protocol
    cache_dir: Optional[Path] = None
    device: str = "cpu"
    log: Callable[[str], None] = print


@dataclass
class Artifact:
    kind: str  # "selected", "synthetic" or "full"
    indices: Optional[np.ndarray] = None  # selected: caption indices into the train split
    image: Optional[torch.Tensor] = None  # synthetic: image side at the cut [n, d_image] (pixels: [n, 3, S, S] normalised)
    text: Optional[torch.Tensor] = None  # synthetic: text side at the cut [n, d_text]
    lr: Optional[float] = None  # learned step size, if any (counts in storage)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # other learned tensors (count in storage)
    info: dict = field(default_factory=dict)  # method-specific facts worth keeping (losses, timings)
    # reference rows only: Recipe fields this set is trained with instead of the protocol's (``full_tuned``)
    recipe: Optional[dict] = None
    lr_text: Optional[float] = None  # a second learned step size, the text tower's (``lr`` is then the image's)

    @property
    def targets(self) -> Optional[SimilarityTargets]:
        """Learned similarity targets over the pairs (extras ``sim_*``), if the set has them."""
        return SimilarityTargets.from_tensors(self.extras)

    def native_recipe(self) -> Optional[dict]:
        """Recipe fields of the set's own treatment where it differs from the protocol's: a set with
        learned targets trains natively with their loss (``wbce``) and is also scored plainly."""
        return {"loss": "wbce"} if self.targets is not None else None

    def __len__(self) -> int:
        if self.kind == "selected":
            return len(self.indices)
        return len(self.text) if self.text is not None else 0

    def pairs(self, protocol, plain: bool = False) -> PairSet:
        """The set as the protocol trains it; ``plain``: without its learned targets."""
        tr = protocol.train
        if self.kind == "full":
            return tr.all_pairs()
        if self.kind == "selected":
            j = torch.as_tensor(self.indices, dtype=torch.long)
            return PairSet.aligned(tr.image[tr.caption_image[j]], tr.text[j], self.lr, self.lr_text)
        return PairSet.aligned(self.image.float(), self.text.float(), self.lr, self.lr_text,
                               None if plain else self.targets)

    def storage_bytes(self, protocol) -> int:
        """Bytes to store the set at the cut: every pair's inputs as float32, plus every learned
        extra (step size, adapters, ...), so that budgets can be compared by storage."""
        d = pair_bytes(protocol) // BYTES_PER_VALUE
        n = len(protocol.train.text) if self.kind == "full" else len(self)
        extra = (1 if self.lr is not None else 0) + (1 if self.lr_text is not None else 0)
        targets = self.targets
        extra += sum(t.numel() for k, t in self.extras.items() if not k.startswith("sim_"))
        extra += targets.numel() if targets is not None else 0
        return int((n * d + extra) * BYTES_PER_VALUE)

    def validate(self, protocol, budget: Optional[int]) -> None:
        if self.kind == "selected":
            idx = np.asarray(self.indices)
            n_cap = len(protocol.train.text)
            if idx.ndim != 1 or len(idx) != budget:
                raise RuntimeError(f"method returned {idx.size} pairs for a budget of {budget}")
            if idx.min() < 0 or idx.max() >= n_cap:
                raise RuntimeError("method returned caption indices out of range")
            images = protocol.train.caption_image[torch.as_tensor(idx)].numpy()
            if len(np.unique(images)) != len(idx):
                raise RuntimeError("method returned pairs that share an image (each pair must have its own image)")
        elif self.kind == "synthetic":
            if len(self.image) != budget or len(self.text) != budget:
                raise RuntimeError(f"method returned {len(self.image)} images / {len(self.text)} texts for a budget of {budget}")

    # -- persistence: a .pt file with the tensors and a JSON sidecar with everything else
    def save(self, path: Path, meta: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"kind": self.kind, "indices": None if self.indices is None else torch.as_tensor(self.indices),
                "image": self.image, "text": self.text, "lr": self.lr, "extras": self.extras}
        if self.lr_text is not None:
            blob["lr_text"] = self.lr_text
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(blob, tmp)
        os.replace(tmp, path)
        side = path.with_suffix(".json")
        tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**meta, "kind": self.kind, "info": self.info, "lr": self.lr}, indent=1, default=str))
        os.replace(tmp, side)

    @staticmethod
    def load(path: Path) -> tuple["Artifact", dict]:
        path = Path(path)
        if path.suffix == ".json":
            path = path.with_suffix(".pt")
        side = path.with_suffix(".json")
        if not path.is_file():
            raise BenchError(f"artifact not found: {path}")
        if not side.is_file():
            raise BenchError(f"artifact {path} has no sidecar {side.name} (its protocol and method); "
                             f"both files are written together by `bench run`")
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BenchError(f"cannot read the sidecar {side}: {type(e).__name__}: {e}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("protocol_config"), dict):
            raise BenchError(f"sidecar {side} is not an artifact sidecar: it has no 'protocol_config' object")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise BenchError(f"cannot read artifact {path}: {type(e).__name__}: {first}"[:300]) from None
        return Artifact._from_blob(blob, path, meta.get("info", {})), meta

    @staticmethod
    def _from_blob(blob, path: Path, info: dict) -> "Artifact":
        """An artifact from a loaded ``.pt``, every field checked (a foreign or damaged file is one
        clear error, never a traceback or a silently different set)."""
        def bad(why: str):
            return BenchError(f"artifact {path} is not a vlbench artifact: {why}")

        if not isinstance(blob, dict):
            raise bad(f"it holds a {type(blob).__name__}, not the dict of a saved set")
        kind = blob.get("kind")
        if kind not in ("selected", "synthetic"):
            raise bad(f"kind {kind!r} (expected 'selected' or 'synthetic')")
        idx, image, text, lr = blob.get("indices"), blob.get("image"), blob.get("text"), blob.get("lr")
        lr_text = blob.get("lr_text")
        extras = blob.get("extras") or {}
        if kind == "selected" and not (isinstance(idx, torch.Tensor) and idx.ndim == 1 and not idx.is_floating_point()):
            raise bad("a selected set needs 'indices', a 1-d integer tensor")
        if kind == "synthetic":
            if not (isinstance(image, torch.Tensor) and isinstance(text, torch.Tensor)):
                raise bad("a synthetic set needs 'image' and 'text' tensors")
            if not (torch.isfinite(image.float()).all() and torch.isfinite(text.float()).all()):
                raise bad("its synthetic tensors hold NaN or infinite values")
        for x in (lr, lr_text):
            if x is not None and not (isinstance(x, (int, float)) and x > 0):
                raise bad(f"learned step size {x!r} is not a positive number")
        if not isinstance(extras, dict) or not all(isinstance(v, torch.Tensor) for v in extras.values()):
            raise bad("'extras' must map names to tensors")
        art = Artifact(kind, None if idx is None else idx.numpy(), image, text, lr, extras, info, lr_text=lr_text)
        try:
            targets = art.targets
        except (KeyError, ValueError) as e:
            raise bad(f"its similarity targets are incomplete or inconsistent ({e})") from None
        if targets is not None and len(targets) != len(art):
            raise bad(f"its similarity targets cover {len(targets)} pairs, the set has {len(art)}")
        return art


def prepare(method, ctx: MethodContext) -> None:
    """Run a method instance's optional ``prepare(ctx)`` hook; without one, nothing to prepare."""
    hook = getattr(method, "prepare", None)
    if hook is not None:
        hook(ctx)


OMIT_DEFAULT = {"key": "omit-default"}  # dataclass field metadata, see config_key


def config_key(cfg) -> dict:
    """A method config as hashed into cell keys: ``asdict``, less the fields declared with
    ``metadata=OMIT_DEFAULT`` while they hold their default. Adding such a field to a method keeps
    the keys (and so the finished cells) of every run that did not set it."""
    d = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        if f.metadata.get("key") == "omit-default" and d[f.name] == f.default:
            d.pop(f.name)
    return d


def method_config(cls, options: dict[str, str]):
    """Build ``cls.Config`` from string options (``--set NAME.FIELD=VALUE``), with clear errors."""
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    kw = {}
    for k, v in options.items():
        if k not in fields:
            raise BenchError(f"method {cls.name!r} has no option {k!r}; available: {', '.join(fields) or '(none)'}")
        kw[k] = parse_value(v, fields[k].type, f"{cls.name}.{k}")
    return cls.Config(**kw)


def parse_value(text: str, typ, where: str):
    t = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if "bool" in t:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if "int" in t and "float" not in t:
            return int(text)
        if "float" in t:
            return float(text)
    except ValueError:
        raise BenchError(f"{where}: cannot read {text!r} as {t}") from None
    return text

"""Expert trajectories for trajectory matching (Cazenavette et al. 2022; Wu et al. 2024).

An expert is the protocol's student trained on the full train split; its *trainable* parameters are
saved after every epoch (and at initialisation) as one float16 matrix ``[epochs + 1, n_params]``.
Under the ``pixels`` cut that is not precise enough: the pretrained tower moves at 0.01x the heads'
step size, by less than float16's resolution for many of its weights in an epoch, so the tower part of
the matched distance would be rounding noise. There the start ``θ_0`` is kept in float32 and the
epochs as float16 *deltas* ``θ_e − θ_0`` (``storage = "delta16"``): the deltas' relative precision is
float16's, whatever their size next to the weights.
Under LoRA matching only the adapters train (the base weights stay at a fixed, seeded
initialisation), and only the adapters are saved. Under the ``pixels`` cut an expert trains the
pretrained tower and the heads (the tower at ``student.tower_lr_scale`` times the expert step size);
with LoRA the adapters sit on the tower (pretrained base) and the heads, new layers, train fully.
Experts train on the protocol's device; buffers are stored on the CPU.

Buffers are cached under ``<cache>/experts/<key>/``, where the key covers the dataset identity, the
encoders, the cut and student, and the expert recipe (not the eval recipe, which experts never use).
Each expert is written atomically as it finishes, so an interrupted build resumes where it stopped:
``expert_<i>.pt`` and then its sidecar ``expert_<i>.json`` with the file's checksum
(``datasets.features.save_entry``). ``build`` and ``load`` verify every expert (size, checksum, shape,
finite values); one that fails (changed bytes, truncated, no or a garbled sidecar, an older expert
without a checksum) is retrained after one log line, never used.
"""
from __future__ import annotations

import dataclasses
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench.progress import progress
from bench.protocol.student import Student, contrastive_loss
from datasets.base import identity_hash
from datasets.features import all_finite, read_verified, save_entry

EXPERT_VERSION = 1
STORAGE = {"heads": "float16", "pixels": "delta16", "frozen-pixels": "float16"}  # how each cut stores its epochs (see above)
EXPERT_SEED_OFFSET = 10_000  # expert i starts from seed 10000+i: never an eval seed's initialisation


@dataclass(frozen=True)
class ExpertConfig:
    n_experts: int = 5
    epochs: int = 10
    lr: float = 0.1  # plain SGD, as the paper's experts
    batch_size: int = 128
    momentum: float = 0.0
    weight_decay: float = 0.0
    lora_rank: int = 0  # > 0: only LoRA adapters of this rank train (base weights frozen)
    lora_alpha: float = 0.0  # 0 means alpha = rank (scaling 1)
    base_seed: int = 12_345  # LoRA only: seed of the frozen base weights


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flatten(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in params])


def unflatten(flat: torch.Tensor, spec: list[tuple[str, torch.Size]]) -> dict[str, torch.Tensor]:
    """Views of ``flat`` shaped by ``spec``. One ``split`` (not one slice per tensor): its backward
    is a single concatenation, where per-tensor slices each materialise a zero vector of the full
    length (quadratic: 73% of a pixel-tower step's CPU time with its 100 parameter tensors)."""
    sizes = [int(torch.Size(shape).numel()) for _, shape in spec]
    return {name: part.view(shape) for (name, shape), part in zip(spec, torch.split(flat, sizes))}


def lora_targets(module: torch.nn.Module, prefix: str = "") -> list[str]:
    """Names of the submodules peft LoRA can wrap: linears, ungrouped convolutions (peft needs the
    rank divisible by the groups, so depthwise convolutions stay as they are) and attention modules
    (targeted whole: a LoRA on ``out_proj`` alone is ignored or fails, see REFERENCE.md)."""
    mods = dict(module.named_modules(prefix=prefix))
    attn = [n for n, m in mods.items() if isinstance(m, torch.nn.MultiheadAttention)]
    out = []
    for n, m in mods.items():
        if any(n.startswith(a + ".") for a in attn):
            continue
        if type(m) is torch.nn.Conv2d and m.groups == 1 or isinstance(m, (torch.nn.Linear, torch.nn.MultiheadAttention)):
            out.append(n)
    return out


def make_lora_student(student: Student, cfg: ExpertConfig) -> torch.nn.Module:
    """Wrap the student with peft LoRA adapters. Heads cut: adapters on the heads, only they train
    (base weights fixed by ``cfg.base_seed`` when built by ``expert_student``). Pixels cut: adapters
    on the pretrained tower (``lora_targets``); the heads, new and randomly initialised, train fully."""
    from peft import LoraConfig, get_peft_model

    if getattr(student, "tower", None) is None:
        targets = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)]
    else:
        targets = lora_targets(student.tower, "tower")
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, target_modules=targets,
                      lora_dropout=0.0, bias="none")
    model = get_peft_model(student, lcfg)
    if getattr(student, "tower", None) is not None:
        for head in (student.image_head, student.text_head):
            head.requires_grad_(True)
    return model


def expert_student(protocol, cfg: ExpertConfig, seed: int) -> torch.nn.Module:
    """The model an expert (or the unrolled student) trains: the protocol's student, or, under LoRA,
    the student with base weights from ``base_seed`` and fresh adapters from ``seed`` (pixels cut:
    the pretrained tower as base, heads and adapters from ``seed``)."""
    if cfg.lora_rank <= 0:
        return protocol.fresh_student(seed)
    pixels = protocol.cfg.student.cut == "pixels"
    base = protocol.fresh_student(seed if pixels else cfg.base_seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_lora_student(base, cfg)


def in_tower(name: str) -> bool:
    """Whether a parameter name (plain or peft-wrapped) belongs to the pixels cut's image tower."""
    return ".tower." in f".{name}"


def tower_lr_scale(params, scale: float) -> "torch.Tensor | None":
    """Per-parameter step scale over the flat vector of ``params`` (``trainable(model)``): ``scale``
    for tower parameters, 1 elsewhere; ``None`` when ``scale`` is 1."""
    if scale == 1.0:
        return None
    return torch.cat([torch.full((p.numel(),), scale if in_tower(n) else 1.0) for n, p in params])


class Trajectory:
    """One stored expert: ``traj[e]`` is its trainable parameters after epoch ``e`` as float32 (``e = 0``:
    initialisation), rebuilt on access from ``params`` (float16: the values, or deltas from ``base``)."""

    def __init__(self, params: torch.Tensor, base: "torch.Tensor | None" = None):
        self.params, self.base = params, base

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, e: int) -> torch.Tensor:
        x = self.params[e].float()
        return x if self.base is None else self.base + x


def pack(snaps: list[torch.Tensor], storage: str) -> dict:
    """Per-epoch float32 parameter vectors -> what an expert file stores (``storage``: float16 | delta16)."""
    if storage == "float16":
        return {"params": torch.stack([s.half() for s in snaps])}
    if storage == "delta16":
        base = snaps[0].float()
        return {"params": torch.stack([(s.float() - base).half() for s in snaps]), "base": base}
    raise ValueError(f"unknown expert storage {storage!r}; available: float16, delta16")


class ExpertBuffer:
    """The cached trajectories of one (protocol, expert config)."""

    def __init__(self, protocol, cfg: ExpertConfig, cache_dir: Path):
        self.protocol, self.cfg = protocol, cfg
        desc = protocol.describe()  # frozen-pixels: the heads student's keys (the same trajectories)
        self.storage = STORAGE[protocol.cfg.student.cut]
        # the storage is in the key only where it is not the original float16 (heads keys unchanged)
        fmt = [] if self.storage == "float16" else [self.storage]
        self.key = identity_hash(EXPERT_VERSION, desc["dataset_identity"], desc["image_encoder"], desc["text_encoder"],
                                 desc.get("trained_inputs", desc["inputs"]), desc.get("trained_student", desc["student"]),
                                 dataclasses.asdict(cfg), *fmt)[:16]
        self.dir = Path(cache_dir) / "experts" / f"{protocol.cfg.dataset}-{self.key}"
        self._files: dict[int, dict] = {}  # experts verified (or trained) by this buffer
        self._log: Callable = print

    def path(self, i: int) -> Path:
        return self.dir / f"expert_{i:03d}.pt"

    def _read(self, i: int) -> tuple["dict | None", "str | None"]:
        """``(expert i's stored dict, None)`` when its file and sidecar exist and agree and it holds
        ``[epochs + 1, n]`` finite parameters; else ``(None, why)``, ``why`` None when never built."""
        blob, _, why = read_verified(self.path(i))
        if blob is None:
            return None, why
        try:
            f = torch.load(io.BytesIO(blob), weights_only=True)
        except Exception as e:  # checksummed yet unreadable: written by something else
            return None, f"cannot be read ({type(e).__name__}: {e})"
        params, base = (f.get("params"), f.get("base")) if isinstance(f, dict) else (None, None)
        if not (isinstance(params, torch.Tensor) and params.ndim == 2 and len(params) == self.cfg.epochs + 1
                and "spec" in f):
            return None, f"does not hold {self.cfg.epochs + 1} epochs of parameters"
        if (base is None) != (self.storage == "float16"):
            return None, f"is not stored as {self.storage}"
        if not all(all_finite(t.numpy()) for t in (params, base) if t is not None):
            return None, "holds non-finite values"
        return f, None

    def missing(self) -> list[int]:
        """The experts without a verified entry (never built, or failing the check of ``_read``)."""
        return [i for i in range(self.cfg.n_experts) if self._read(i)[0] is None]

    def _train(self, i: int, log: Callable) -> dict:
        t0 = time.time()
        traj = train_expert(self.protocol, self.cfg, EXPERT_SEED_OFFSET + i, self.storage)
        if not all(all_finite(traj[k].numpy()) for k in ("params", "base") if k in traj):
            raise RuntimeError(f"expert {i} (seed {EXPERT_SEED_OFFSET + i}) diverged: non-finite parameters, not cached")
        save_entry(self.path(i), lambda tmp: torch.save(traj, tmp),
                   {"expert": i, "seed": traj["seed"], "storage": self.storage, "shape": list(traj["params"].shape)})
        log(f"expert {i + 1}/{self.cfg.n_experts}: {self.cfg.epochs} epochs in {time.time() - t0:.1f} s "
            f"({traj['params'].shape[1]:,} trainable params) -> {self.path(i)}")
        return traj

    def _warn(self, i: int, why: str, log: Callable) -> None:
        log(f"expert {i + 1}/{self.cfg.n_experts}: cached {self.path(i)} {why}; retraining")

    def build(self, log: Callable = print) -> "ExpertBuffer":
        """Verify every stored expert; train (again) those missing or failing. The verified experts
        stay in memory for ``load`` and ``spec``."""
        self._log, self._files = log, {}
        todo = []
        for i in range(self.cfg.n_experts):
            f, why = self._read(i)
            if f is None:
                if why:
                    self._warn(i, why, log)
                todo.append(i)
            else:
                self._files[i] = f
        if not todo:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.json").write_text(json.dumps({"key": self.key, "expert": dataclasses.asdict(self.cfg),
                                                          "protocol": self.protocol.describe()}, indent=1, default=str))
        for i in todo:
            self._files[i] = self._train(i, log)
        return self

    def _file(self, i: int, log: "Callable | None" = None) -> dict:
        """Expert i as verified by ``build``, else read and verified now (retrained if it fails)."""
        if i not in self._files:
            log = log or self._log
            f, why = self._read(i)
            if f is None:
                if why is None:
                    raise RuntimeError(f"expert buffer {self.dir} is incomplete; run `python -m bench experts` or build()")
                self._warn(i, why, log)
                f = self._train(i, log)
            self._files[i] = f
        return self._files[i]

    def load(self, log: "Callable | None" = None) -> list[Trajectory]:
        """The trajectories, each verified (by ``build`` on this buffer, or here); one that fails its
        check is retrained after one line to ``log`` (default: the log given to ``build``, or print)."""
        if any(i not in self._files and not self.path(i).exists() for i in range(self.cfg.n_experts)):
            raise RuntimeError(f"expert buffer {self.dir} is incomplete; run `python -m bench experts` or build()")
        files = [self._file(i, log) for i in range(self.cfg.n_experts)]
        return [Trajectory(f["params"], f.get("base")) for f in files]

    def spec(self) -> list[tuple[str, torch.Size]]:
        return self._file(0)["spec"]

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("expert_*.pt"))


def train_expert(protocol, cfg: ExpertConfig, seed: int, storage: str = "float16") -> dict:
    """Train one expert on all train pairs; return its per-epoch trainable parameters, packed as
    ``storage`` says (``pack``)."""
    model = expert_student(protocol, cfg, seed)
    params = trainable(model)
    scale = protocol.cfg.student.tower_lr_scale if protocol.cfg.student.cut == "pixels" else 1.0
    if scale == 1.0:
        groups = [{"params": [p for _, p in params]}]
    else:
        groups = [{"params": [p for n, p in params if in_tower(n)], "lr": cfg.lr * scale},
                  {"params": [p for n, p in params if not in_tower(n)]}]
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    dev = next(model.parameters()).device
    pairs = protocol.train.all_pairs()
    gen = torch.Generator().manual_seed(seed)
    n, bs = len(pairs), min(cfg.batch_size, len(pairs))
    temp = protocol.cfg.student.temperature
    snaps = [flatten(params).cpu()]
    model.train()
    with torch.random.fork_rng(devices=[]), progress(total=cfg.epochs, desc=f"expert seed {seed}", unit="ep") as bar:
        torch.manual_seed(seed)
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(0, n - bs + 1, bs):
                j = order[s:s + bs]
                img, txt = model(pairs.image[pairs.pair_image[j]].to(dev), pairs.text[j].to(dev))
                loss = contrastive_loss(img, txt, temp)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            snaps.append(flatten(params).cpu())
            bar.update(1)
    return {**pack(snaps, storage), "spec": [(n_, tuple(p.shape)) for n_, p in params], "seed": seed}

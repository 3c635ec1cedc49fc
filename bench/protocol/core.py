"""The protocol: everything that decides a score apart from the method.

Data and splits, encoders, the cut, the student and the training recipe, and the metric. It has an
id (a hash of all of these); tables only compare cells of one protocol.

Scoring a set (``Protocol.evaluate``): for each eval seed, build a *fresh* student from that seed,
train it on the set with the protocol's recipe, and score it once, at the final epoch, on the test
split (which may be mapped to val while developing). Nothing here ever looks at test scores to
choose anything.

Inputs at the cut are the cached frozen features, standardised per dimension with the mean and std
of the train split (fixed by the dataset and encoders, so part of the protocol).

Under the ``pixels`` cut the image side of every split holds the images themselves (``uint8
[N, 3, S, S]`` from the pixel cache; the student's tower normalises them, and standardises its
output features with the pretrained tower's train-split mean and std, the analogue of the heads
cut's standardised inputs), the text side the standardised frozen text features as under ``heads``. The frozen image features stay available in
``feature_splits`` (what the coresets select on). Under ``heads`` ``feature_splits`` is ``splits``.
Under the ``frozen-pixels`` cut every split is at the heads cut (the image features computed at
``student.image_size``), and the protocol also holds the train images as pixels (to initialise
distilled images from) and the frozen tower (``image_features``: normalised pixels -> the
standardised features the splits hold, differentiable in the pixels). A set whose images are pixels
is scored through that tower; at 224 px the features and expert buffers are those of ``heads``.
Training and scoring run on ``device`` (``build_protocol(..., device=)``); inputs stay on the CPU
and move batch by batch.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from bench.errors import BenchError
from bench.protocol.retrieval import retrieval_metrics
from bench.protocol.student import StudentConfig, build_student
from bench.protocol.training import PairSet, Recipe, embed, train_student
from datasets.base import CaptionDataset, identity_hash

METRIC_VERSION = "recall-v1-ties-against"  # see bench/protocol/retrieval.py
INPUT_VERSION = "standardise-train-v1"
PIXEL_INPUT_VERSION = "pixels-v1"  # pixels cut: images from datasets/pixels.py, normalised by the tower
FROZEN_INPUT_VERSION = "frozen-pixels-v2"  # frozen-pixels cut: distilled pixels seen through the frozen tower


@dataclass(frozen=True)
class ProtocolConfig:
    dataset: str = "synthetic"
    data_root: Optional[str] = None  # where the data lives; not part of the id (the identity is)
    test_split: str = "test"
    limit: Optional[tuple[int, int]] = None  # (n_train, n_eval) images: small fixed subsets
    image_encoder: str = "effnet_lite0"
    text_encoder: str = "minilm_l6"
    student: StudentConfig = field(default_factory=StudentConfig)
    recipe: Recipe = field(default_factory=Recipe)


@dataclass
class CutSplit:
    """One split at the cut: ``text[j]`` describes ``image[caption_image[j]]``."""

    image: torch.Tensor
    text: torch.Tensor
    caption_image: torch.Tensor

    @property
    def n_images(self) -> int:
        return len(self.image)

    def all_pairs(self) -> PairSet:
        return PairSet(self.image, self.text, self.caption_image)

    def images_subset(self, images) -> "CutSplit":
        """The split restricted to ``images`` (indices, in the given order) and all their captions."""
        images = torch.as_tensor(images, dtype=torch.long)
        remap = torch.full((self.n_images,), -1, dtype=torch.long)
        remap[images] = torch.arange(len(images))
        keep = torch.nonzero(remap[self.caption_image] >= 0).flatten()
        return CutSplit(self.image[images], self.text[keep], remap[self.caption_image[keep]])


class Protocol:
    def __init__(self, cfg: ProtocolConfig, dataset: CaptionDataset, feats: dict[str, tuple[np.ndarray, np.ndarray]],
                 encoder_keys: dict[str, str], pixels: Optional[dict[str, np.ndarray]] = None, tower=None,
                 device: str = "cpu"):
        self.cfg, self.dataset, self.encoder_keys, self.device = cfg, dataset, encoder_keys, device
        tr_img, tr_txt = (torch.from_numpy(a.astype(np.float32)) for a in feats["train"])
        self._stats = {m: (x.mean(0), x.std(0).clamp(min=1e-6)) for m, x in (("image", tr_img), ("text", tr_txt))}
        self.feature_splits = {s: self._cut(s, *feats[s]) for s in feats}
        self.splits, self.tower, self.frozen_tower, self.train_pixels = self.feature_splits, None, None, None
        if cfg.student.cut == "frozen-pixels":
            if tower is None or pixels is None:
                raise BenchError("the frozen-pixels cut needs the train pixels and the image tower (use build_protocol)")
            # the tower's outputs standardised like the features: unmoved images give the splits' inputs.
            # A dimension constant on the train images (std at the 1e-6 floor: a dead unit, common at
            # small sizes, most units at 32 px) is 0 for every real image whatever it is divided by;
            # it is divided by the live units' median std, so that pixels waking it up do not blow
            # up by a factor of a million
            mu, sd = self._stats["image"]
            live = sd[sd > 1e-5]
            sd = torch.where(sd <= 1e-5, live.median() if len(live) else torch.tensor(1.0), sd)
            self.frozen_tower = tower.standardise_outputs(mu, sd).requires_grad_(False)
            self.train_pixels = torch.from_numpy(np.ascontiguousarray(pixels["train"]))
        elif cfg.student.cut == "pixels":
            if tower is None or pixels is None:
                raise BenchError("the pixels cut needs the pixel splits and the image tower (use build_protocol)")
            self.tower = tower
            self.splits = {s: CutSplit(torch.from_numpy(np.ascontiguousarray(pixels[s])), f.text, f.caption_image)
                           for s, f in self.feature_splits.items()}
        self.id = protocol_id(cfg, dataset, encoder_keys, None if tower is None else tower.key)

    @property
    def pixel_sets(self) -> bool:
        """Whether a distilled set's images are pixels (the pixels and frozen-pixels cuts)."""
        return self.cfg.student.cut != "heads"

    def synthetic_images(self, images) -> torch.Tensor:
        """Float32 copies of train images (indices) as a distilled set's images start: features
        (heads), or pixels normalised by the tower (pixels, frozen-pixels)."""
        images = torch.as_tensor(images, dtype=torch.long)
        if self.frozen_tower is not None:
            return self.frozen_tower.normalise(self.train_pixels[images]).clone()
        return self.image_inputs(self.train.image[images])

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images of a set -> the student's image inputs: under frozen-pixels normalised pixels
        through the frozen tower (differentiable in ``x``), features unchanged."""
        if self.frozen_tower is None or x.dim() == 2:
            return x
        dev = self.frozen_tower.mean.device
        return torch.cat([self.frozen_tower(x[i:i + 256].to(dev)) for i in range(0, len(x), 256)]).to(x.device)

    def at_cut(self, pairs: PairSet) -> PairSet:
        """A set as its student trains on it: pixel images mapped to features (frozen-pixels)."""
        if self.frozen_tower is None or pairs.image.dim() == 2:
            return pairs
        with torch.no_grad():
            image = self.image_features(pairs.image.float())
        return dataclasses.replace(pairs, image=image)

    def _cut(self, split, img, txt) -> CutSplit:
        def std(m, a):
            mu, sd = self._stats[m]
            return (torch.from_numpy(a.astype(np.float32)) - mu) / sd
        return CutSplit(std("image", img), std("text", txt), torch.as_tensor(self.dataset.split(split).caption_image))

    @property
    def train(self) -> CutSplit:
        return self.splits["train"]

    @property
    def test(self) -> CutSplit:
        return self.splits["test"]

    @property
    def features_train(self) -> CutSplit:
        """The train split as frozen features (both cuts): what feature-based coresets select on."""
        return self.feature_splits["train"]

    def image_inputs(self, image: torch.Tensor) -> torch.Tensor:
        """A float32 copy of images at the cut: features, or pixels normalised by the tower."""
        if self.tower is not None:
            return self.tower.normalise(image).clone()
        return image.clone()

    def describe(self) -> dict:
        c = self.cfg
        inputs = INPUT_VERSION if self.tower is None else f"{INPUT_VERSION}+{PIXEL_INPUT_VERSION}:{self.tower.key}"
        extra = {}
        if self.frozen_tower is not None:  # experts train the heads student on the features: heads' keys
            extra = {"trained_inputs": inputs, "trained_student": c.student.trained().identity()}
            inputs = f"{INPUT_VERSION}+{FROZEN_INPUT_VERSION}:{self.frozen_tower.key}"
        return {**extra, "id": self.id, "dataset": c.dataset, "dataset_identity": self.dataset.identity,
                "test_split": self.dataset.test_split, "limit": list(c.limit) if c.limit else None,
                "image_encoder": self.encoder_keys["image"], "text_encoder": self.encoder_keys["text"],
                "cut": c.student.cut, "student": c.student.identity(), "recipe": c.recipe.identity(),
                "metric": METRIC_VERSION, "inputs": inputs, "splits": self.dataset.summary()}

    def fresh_student(self, seed: int, student: Optional[StudentConfig] = None):
        """A fresh student (heads from ``seed``; under pixels a copy of the pretrained tower), on
        ``self.device``; ``student``: another student config (a transfer score), else the protocol's."""
        s = build_student(student or self.cfg.student, self.feature_splits["train"].image.shape[1],
                          self.train.text.shape[1], seed, self.tower)
        return s.to(self.device) if self.device != "cpu" else s

    def score(self, student, split: Optional[CutSplit] = None) -> dict[str, float]:
        """Retrieval metrics of ``student`` on ``split`` (default: the test split)."""
        s = self.test if split is None else split
        ie, te = embed(student, s.image, s.text)
        return retrieval_metrics(ie.numpy(), te.numpy(), s.caption_image.numpy())

    def evaluate(self, pairs: PairSet, seeds: list[int], log=None, recipe: Optional[dict] = None,
                 split: Optional[CutSplit] = None, curve_every: int = 0,
                 student: Optional[StudentConfig] = None) -> list[dict]:
        """Train a fresh student per eval seed and score it once at the final epoch; ``recipe``:
        fields replacing the protocol's (a set's own treatment, ``full_tuned``'s recipe); ``split``:
        where to score (default: the test split; a method's held-out part of train for its own
        stopping); ``student``: another student config (transfer). ``curve_every`` > 0 also records
        the score every that many epochs and at the last (``curve``: a diagnostic of best-of-test
        protocols; nothing selects by it, and recording it changes no number: scoring draws no
        random numbers and restores the student's train mode)."""
        rec = dataclasses.replace(self.cfg.recipe, **recipe) if recipe else self.cfg.recipe
        pairs = self.at_cut(pairs)
        if len(pairs) < 2:
            raise BenchError(f"a set of {len(pairs)} pair(s) cannot train a contrastive student")
        if student is not None and student.cut != self.cfg.student.cut:
            raise BenchError(f"a transfer student must have the protocol's cut ({self.cfg.student.cut}), not {student.cut}")
        out = []
        for seed in seeds:
            t0 = time.time()
            st = self.fresh_student(seed, student)  # on self.device; batches move there in train_student
            curve: list[dict] = []

            def on_epoch(e, s):
                if 0 < e < rec.epochs and e % curve_every == 0:
                    was = s.training
                    curve.append({"epoch": e, **self.score(s, split)})
                    s.train(was)

            lr = train_student(st, pairs, rec, seed, on_epoch if curve_every > 0 else None)
            m = self.score(st, split)
            row = {"seed": seed, "lr": lr, **m, "train_s": round(time.time() - t0, 2)}
            if curve_every > 0:
                row["curve"] = curve + [{"epoch": rec.epochs, **m}]
            out.append(row)
            if log:
                log(f"  eval seed {seed}: TR@1 {m['tr_r1']:.1f} IR@1 {m['ir_r1']:.1f} mean {m['mean']:.1f}")
        return out


def protocol_id(cfg: ProtocolConfig, dataset: CaptionDataset, encoder_keys: dict[str, str],
                tower_key: Optional[str] = None) -> str:
    """The protocol's id: a hash of the data, the test split, the encoders, the student, the recipe,
    the metric and the inputs (and, under the pixels cut, the tower)."""
    pixel_parts = {"heads": (), "pixels": (PIXEL_INPUT_VERSION, tower_key),
                   "frozen-pixels": (FROZEN_INPUT_VERSION, tower_key)}[cfg.student.cut]
    return identity_hash(dataset.identity, dataset.test_split, encoder_keys, cfg.student.identity(),
                         cfg.recipe.identity(), METRIC_VERSION, INPUT_VERSION, *pixel_parts)[:12]


def _feature_size(cfg: ProtocolConfig) -> dict:
    """Under frozen-pixels the image features are the frozen encoder's at the cut's image size."""
    return {"image_size": cfg.student.image_size} if cfg.student.cut == "frozen-pixels" else {}


def planned_protocol(cfg: ProtocolConfig, cache_dir=None) -> tuple[str, CaptionDataset]:
    """The id and dataset a protocol will have, without computing any feature (``run --dry-run``)."""
    from datasets.encoders import get_encoder
    from datasets.registry import load_dataset

    ds = load_dataset(cfg.dataset, cfg.data_root, cfg.test_split, cfg.limit, cache_dir)
    ds.split("train"), ds.split("test")
    tower_key = None
    if cfg.student.cut != "heads":
        from bench.protocol.towers import load_tower
        tower_key = load_tower(cfg.image_encoder, cfg.student.image_size).key
    keys = {"image": get_encoder(cfg.image_encoder, "image", **_feature_size(cfg)).key,
            "text": get_encoder(cfg.text_encoder, "text").key}
    return protocol_id(cfg, ds, keys, tower_key), ds


def build_protocol(cfg: ProtocolConfig, cache_dir=None, device: str = "cpu", log=print) -> Protocol:
    """Load the dataset, make sure features are cached, and return the protocol."""
    from datasets.encoders import get_encoder
    from datasets.features import features
    from datasets.registry import load_dataset

    if device.startswith("cuda"):  # same seed, same numbers: cuDNN's fastest kernels are not all deterministic
        # (two H200 runs of one full-data cell gave 32.0 and 32.9 without this; not yet re-checked with it)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    ds = load_dataset(cfg.dataset, cfg.data_root, cfg.test_split, cfg.limit, cache_dir)
    ds.split("train"), ds.split("test")
    tower = None
    if cfg.student.cut != "heads":  # fail early (no weights, unknown name) before any feature is computed
        from bench.protocol.towers import load_tower
        tower = load_tower(cfg.image_encoder, cfg.student.image_size)
    encs = {"image": get_encoder(cfg.image_encoder, "image", **_feature_size(cfg)),
            "text": get_encoder(cfg.text_encoder, "text")}
    feats = {}
    for split in ("train", "test"):  # the val split is scored only as --test-split val
        feats[split] = tuple(features(ds, split, encs[m], cache_dir, device, log) for m in ("image", "text"))
    pix = None
    if cfg.student.cut == "frozen-pixels":
        from datasets.pixels import pixels
        pix = {"train": pixels(ds, "train", cfg.student.image_size, cache_dir, log)}
        tower = tower.to(device)
    elif tower is not None:
        from datasets.pixels import pixels, tower_stats
        pix = {s: pixels(ds, s, cfg.student.image_size, cache_dir, log) for s in feats}
        tower = tower.to(device)
        tower.standardise_outputs(*tower_stats(ds, tower, pix["train"], cache_dir, log))
    return Protocol(cfg, ds, feats, {m: e.key for m, e in encs.items()}, pix, tower, device)

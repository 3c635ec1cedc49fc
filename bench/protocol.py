"""The protocol: everything that decides a score apart from the method.

Data and splits, encoders, the cut, the student and the training recipe, and the metric. It has an
id (a hash of all of these); tables only compare cells of one protocol.

Scoring a set (``Protocol.evaluate``): for each eval seed, build a *fresh* student from that seed,
train it on the set with the protocol's recipe, and score it once, at the final epoch, on the test
split (which may be mapped to val while developing). Nothing here ever looks at test scores to
choose anything.

Inputs at the cut are the cached frozen features, standardised per dimension with the mean and std
of the train split (fixed by the dataset and encoders, so part of the protocol).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from bench.errors import BenchError
from bench.retrieval import retrieval_metrics
from bench.student import StudentConfig, build_student
from bench.training import PairSet, Recipe, embed, train_student
from datasets.base import CaptionDataset, identity_hash

METRIC_VERSION = "recall-v1-ties-against"  # see bench/retrieval.py
INPUT_VERSION = "standardise-train-v1"


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


class Protocol:
    def __init__(self, cfg: ProtocolConfig, dataset: CaptionDataset, feats: dict[str, tuple[np.ndarray, np.ndarray]],
                 encoder_keys: dict[str, str]):
        self.cfg, self.dataset, self.encoder_keys = cfg, dataset, encoder_keys
        tr_img, tr_txt = (torch.from_numpy(a.astype(np.float32)) for a in feats["train"])
        self._stats = {m: (x.mean(0), x.std(0).clamp(min=1e-6)) for m, x in (("image", tr_img), ("text", tr_txt))}
        self.splits = {s: self._cut(s, *feats[s]) for s in feats}
        self.id = identity_hash(dataset.identity, dataset.test_split, encoder_keys, dataclasses.asdict(cfg.student),
                                dataclasses.asdict(cfg.recipe), METRIC_VERSION, INPUT_VERSION)[:12]

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

    def describe(self) -> dict:
        c = self.cfg
        return {"id": self.id, "dataset": c.dataset, "dataset_identity": self.dataset.identity,
                "test_split": self.dataset.test_split, "limit": list(c.limit) if c.limit else None,
                "image_encoder": self.encoder_keys["image"], "text_encoder": self.encoder_keys["text"],
                "cut": c.student.cut, "student": dataclasses.asdict(c.student), "recipe": dataclasses.asdict(c.recipe),
                "metric": METRIC_VERSION, "inputs": INPUT_VERSION, "splits": self.dataset.summary()}

    def fresh_student(self, seed: int):
        return build_student(self.cfg.student, self.train.image.shape[1], self.train.text.shape[1], seed)

    def score(self, student) -> dict[str, float]:
        ie, te = embed(student, self.test.image, self.test.text)
        return retrieval_metrics(ie.numpy(), te.numpy(), self.test.caption_image.numpy())

    def evaluate(self, pairs: PairSet, seeds: list[int], log=None) -> list[dict]:
        """Train a fresh student per eval seed and score it once at the final epoch."""
        if len(pairs) < 2:
            raise BenchError(f"a set of {len(pairs)} pair(s) cannot train a contrastive student")
        out = []
        for seed in seeds:
            t0 = time.time()
            student = self.fresh_student(seed)
            lr = train_student(student, pairs, self.cfg.recipe, seed)
            m = self.score(student)
            out.append({"seed": seed, "lr": lr, **m, "train_s": round(time.time() - t0, 2)})
            if log:
                log(f"  eval seed {seed}: TR@1 {m['tr_r1']:.1f} IR@1 {m['ir_r1']:.1f} mean {m['mean']:.1f}")
        return out


def build_protocol(cfg: ProtocolConfig, cache_dir=None, device: str = "cpu", log=print) -> Protocol:
    """Load the dataset, make sure features are cached, and return the protocol."""
    from datasets.encoders import get_encoder
    from datasets.features import features
    from datasets.registry import load_dataset

    ds = load_dataset(cfg.dataset, cfg.data_root, cfg.test_split, cfg.limit)
    ds.split("train"), ds.split("test")
    encs = {"image": get_encoder(cfg.image_encoder, "image"), "text": get_encoder(cfg.text_encoder, "text")}
    feats = {}
    for split in ("train", "test") + (("val",) if ds.test_split != "val" and "val" in ds.splits and ds.splits["val"].n_images else ()):
        feats[split] = tuple(features(ds, split, encs[m], cache_dir, device, log) for m in ("image", "text"))
    return Protocol(cfg, ds, feats, {m: e.key for m, e in encs.items()})

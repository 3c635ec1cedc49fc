"""The in-memory form every dataset reader produces.

A split holds image references, captions and ``caption_image[j]`` = index (within the split) of the
image caption j describes. An image reference is a file path, or for generated data any string the
dataset's ``load_image`` understands. Every dataset has an ``identity``: a hash of its split file(s)
and image list, which goes into cache keys and results.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from PIL import Image

from bench.errors import BenchError

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    images: list[str]
    captions: list[str]
    caption_image: np.ndarray

    def __post_init__(self):
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if len(self.caption_image) != len(self.captions):
            raise ValueError("caption_image must have one entry per caption")

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_captions(self) -> int:
        return len(self.captions)


@dataclass
class CaptionDataset:
    name: str
    splits: dict[str, Split]
    identity: str
    load_image: Callable[[str], Image.Image] = field(repr=False)
    test_split: str = "test"  # which stored split is scored as "test"

    def split(self, name: str) -> Split:
        """``test`` resolves to ``test_split`` (e.g. val while developing)."""
        key = self.test_split if name == "test" else name
        if key not in self.splits or self.splits[key].n_images == 0:
            have = ", ".join(s for s, v in self.splits.items() if v.n_images) or "none"
            raise BenchError(f"dataset {self.name!r} has no {key!r} split (splits with data: {have})")
        return self.splits[key]

    def with_test_split(self, test_split: str) -> "CaptionDataset":
        if test_split not in ("test", "val"):
            raise BenchError(f"--test-split must be 'test' or 'val', not {test_split!r}")
        ds = replace(self, test_split=test_split)
        ds.split("test")  # fail early, with a clear message
        return ds

    def subset(self, n_train: int, n_eval: int) -> "CaptionDataset":
        """The first ``n_train`` train images and first ``n_eval`` images of val and test (with all
        their captions): small, fixed subsets for quick runs and CI. Its identity differs."""
        def head(s: Split, n: int) -> Split:
            keep = s.caption_image < n
            return Split(s.images[:n], [c for c, k in zip(s.captions, keep) if k], s.caption_image[keep])

        splits = {k: head(v, n_train if k == "train" else n_eval) for k, v in self.splits.items()}
        return replace(self, splits=splits, identity=identity_hash(self.identity, "subset", n_train, n_eval))

    def summary(self) -> dict:
        return {s: {"images": v.n_images, "captions": v.n_captions} for s, v in self.splits.items()}


def identity_hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, (bytes, bytearray)):
            h.update(p)
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def file_hash(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_image_file(path: str) -> Image.Image:
    """Open an image as RGB; one clear error if it is missing or will not decode."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise BenchError(f"image file not found: {path}") from None
    except Exception as e:  # PIL raises several types for corrupt files
        raise BenchError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None


def make_split(records: list[tuple[str, list[str]]]) -> Split:
    """Build a split from (image reference, [captions]) records, keeping order."""
    images, captions, owner = [], [], []
    for i, (ref, caps) in enumerate(records):
        images.append(ref)
        for c in caps:
            captions.append(c)
            owner.append(i)
    return Split(images, captions, np.asarray(owner, dtype=np.int64))

"""The in-memory form every dataset reader produces.

A split holds image references, captions and ``caption_image[j]`` = index (within the split) of the
image caption j describes. An image reference is a file path, or for generated data any string the
dataset's ``load_image`` understands. Every dataset has an ``identity``: a hash of its split file(s)
and image list and, for datasets read from disk, of every image file's content (``image_digest``),
which goes into cache keys and results: changed images never reuse old features.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from bench.errors import BenchError
from bench.progress import progress

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


IMAGE_DIGEST_VERSION = "sha256-v1"


def image_digest(paths: list[str], root, cache_dir=None) -> str:
    """One hash of every image file's content (sha256), for the dataset identity.

    Hashing is memoised per file by (size, mtime) in ``<cache_dir>/image-hashes/``, as git's index
    does, so a warm run only stats the files; a rewritten file is hashed again, and the identity
    follows its content, not its timestamps (a copy of the data on another machine has the same
    identity). A missing file is one clear error here, before any work, cache or no cache."""
    root = Path(os.path.abspath(root))  # not resolved: through a symlinked root the names stay root-relative
    memo_path = None if cache_dir is None else (
        Path(cache_dir) / "image-hashes" / f"{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.json")
    memo = {}
    if memo_path is not None:
        try:
            loaded = json.loads(memo_path.read_text())
            memo = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            memo = {}
    stats, missing = [], []
    for p in map(os.path.abspath, paths):
        try:
            st = os.stat(p)
            stats.append((p, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            missing.append(p)
        except OSError as e:
            raise BenchError(f"cannot read image file {p}: {e.strerror}") from None
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BenchError(f"image file not found: {missing[0]}{more} (under {root})")
    def fresh(p, size, mtime) -> bool:  # a memo entry for this file as it is now: [size, mtime, sha256]
        entry = memo.get(p)
        return isinstance(entry, list) and len(entry) == 3 and entry[:2] == [size, mtime]

    todo = [s for s in stats if not fresh(*s)]
    with progress(total=len(todo), desc="hashing images", unit="img") as bar:
        for p, size, mtime in todo:
            try:
                memo[p] = [size, mtime, file_hash(p)]
            except OSError as e:
                raise BenchError(f"cannot read image file {p}: {e.strerror}") from None
            bar.update(1)
    digests = [(os.path.relpath(p, root), memo[p][2]) for p, _, _ in stats]
    if todo and memo_path is not None:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_name(f".{memo_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
        except OSError:
            pass  # the memo only saves time; the identity is computed either way
    return identity_hash(IMAGE_DIGEST_VERSION, sorted(digests))


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

"""The on-disk feature cache: frozen encoder outputs, computed once.

A cache entry is keyed by the dataset identity, the *stored* split it came from (``test`` mapped to
``val`` shares val's entry), the encoder key (name, weights digest, preprocessing) and the cache
format version; any change of input gives a new key, so a stale entry cannot be read. Entries are
float16 ``.npy`` files written atomically (temp file + rename) with a small JSON sidecar.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from datasets.base import CaptionDataset, identity_hash
from datasets.encoders import Encoder, ImageLoader

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLBENCH_CACHE", Path.home() / ".cache" / "vlbench"))


def cache_path(cache_dir: Path, ds: CaptionDataset, split: str, enc: Encoder) -> Path:
    stored = ds.test_split if split == "test" else split
    key = identity_hash(CACHE_VERSION, ds.identity, stored, enc.key)
    safe = enc.name.replace(":", "_").replace("/", "_")
    return Path(cache_dir) / "features" / f"{ds.name}-{stored}-{safe}-{key}.npy"


def atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def features(ds: CaptionDataset, split: str, enc: Encoder, cache_dir=None, device: str = "cpu",
             log=print) -> np.ndarray:
    """Features of a split's images (image encoder) or captions (text encoder), float16 [n, dim]."""
    path = cache_path(Path(cache_dir or default_cache_dir()), ds, split, enc)
    if path.exists():
        return np.load(path)
    sp = ds.split(split)
    t0 = time.time()
    if enc.modality == "image":
        loader = ImageLoader(ds.load_image)
        refs = sp.images
        # decode lazily, batch by batch, to keep memory flat
        class _Lazy:
            def __len__(self):
                return len(refs)

            def __getitem__(self, sl):
                return loader(refs[sl])
        arr = enc.encode(_Lazy(), desc=f"{ds.name}/{split} images", device=device)
    else:
        arr = enc.encode(sp.captions, desc=f"{ds.name}/{split} captions", device=device)
    arr = arr.astype(np.float16)
    atomic_save_npy(path, arr)
    meta = {"dataset": ds.name, "identity": ds.identity, "split": split, "stored_split": ds.test_split if split == "test" else split,
            "encoder": enc.key, "shape": list(arr.shape), "seconds": round(time.time() - t0, 2)}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    if log:
        log(f"cached {enc.modality} features {ds.name}/{split} {arr.shape} in {meta['seconds']} s -> {path}")
    return arr

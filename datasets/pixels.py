"""The on-disk pixel cache for the ``pixels`` cut: every image of a split resized once (and the
pretrained tower's feature statistics on the train split, ``tower_stats``).

An entry is ``uint8 [n_images, 3, S, S]``: RGB, resized to S x S with bilinear filtering (the
aspect ratio is not kept, as for the frozen encoders' features), stored as a checksummed ``.npy``
cache entry (``datasets.features.save_entry``: verified on every load, recomputed when it fails),
keyed like the feature cache by the dataset identity, the *stored* split (``test`` mapped to
``val`` shares val's entry), the size and the cache version. Normalisation is the tower's, applied
at use (``bench.protocol.towers.PixelTower``). Memory: a 224 px Flickr8k train split is 0.9 GB (4x
less than float32).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.progress import progress
from datasets.base import CaptionDataset, identity_hash
from datasets.encoders import ImageLoader
from datasets.features import all_finite, atomic_save_npy, default_cache_dir, load_npy, warn

PIXEL_CACHE_VERSION = 1
RESIZE = "rgb-bilinear-squash"


def pixel_cache_path(cache_dir: Path, ds: CaptionDataset, split: str, size: int) -> Path:
    stored = ds.test_split if split == "test" else split
    key = identity_hash(PIXEL_CACHE_VERSION, ds.identity, stored, size, RESIZE)
    return Path(cache_dir) / "pixels" / f"{ds.name}-{stored}-{size}px-{key}.npy"


def pixels(ds: CaptionDataset, split: str, size: int, cache_dir=None, log=print, batch: int = 64) -> np.ndarray:
    """The split's images as ``uint8 [n, 3, size, size]`` (cached)."""
    path = pixel_cache_path(Path(cache_dir or default_cache_dir()), ds, split, size)
    cached, why = load_npy(path, finite=False)  # uint8: always finite
    if cached is not None:
        return cached
    if why:
        warn(log, f"pixel cache entry {path} {why}; recomputing")
    refs = ds.split(split).images
    out = np.empty((len(refs), 3, size, size), dtype=np.uint8)
    loader = ImageLoader(ds.load_image)
    t0 = time.time()
    with progress(total=len(refs), desc=f"{ds.name}/{split} pixels", unit="img") as bar:
        for s in range(0, len(refs), batch):
            ims = loader(refs[s:s + batch])
            out[s:s + len(ims)] = np.stack([np.asarray(im.resize((size, size), resample=2), dtype=np.uint8)
                                            for im in ims]).transpose(0, 3, 1, 2)
            bar.update(len(ims))
    meta = {"dataset": ds.name, "identity": ds.identity, "split": split, "size": size, "resize": RESIZE,
            "seconds": round(time.time() - t0, 2)}
    atomic_save_npy(path, out, meta)
    if log:
        log(f"cached pixels {ds.name}/{split} {out.shape} in {meta['seconds']} s -> {path}")
    return out


def tower_stats(ds: CaptionDataset, tower, train_pixels: np.ndarray, cache_dir=None, log=print):
    """Per-dimension mean and std of the pretrained tower's features of the train images (cached,
    keyed by the dataset identity, the image size and the tower key): the protocol standardises the
    tower's outputs with them."""
    import torch

    size = int(train_pixels.shape[-1])
    key = identity_hash(PIXEL_CACHE_VERSION, ds.identity, "train", size, RESIZE, tower.key, "stats")
    path = Path(cache_dir or default_cache_dir()) / "pixels" / f"{ds.name}-train-{size}px-stats-{key}.npy"
    arr, why = load_npy(path)
    if arr is None:
        if why:
            warn(log, f"tower statistics cache entry {path} {why}; recomputing")
        t0 = time.time()
        mean, std = tower.feature_stats(torch.from_numpy(np.ascontiguousarray(train_pixels)))
        arr = np.stack([mean.numpy(), std.numpy()])
        if not all_finite(arr):
            raise RuntimeError(f"tower {tower.key} gave non-finite feature statistics on {ds.name}/train; not cached")
        atomic_save_npy(path, arr, {"dataset": ds.name, "identity": ds.identity, "size": size, "tower": tower.key,
                                    "images": len(train_pixels)})
        if log:
            log(f"cached tower feature statistics {ds.name}/train ({len(train_pixels)} images) in {time.time() - t0:.1f} s -> {path}")
    return torch.from_numpy(arr[0].copy()), torch.from_numpy(arr[1].copy())

"""The on-disk feature cache: frozen encoder outputs, computed once (and the checksummed cache entry
every cache of the project is written as).

A cache entry is keyed by the dataset identity, the *stored* split it came from (``test`` mapped to
``val`` shares val's entry), the encoder key (name, weights digest, preprocessing) and the cache
format version; any change of input gives a new key, so a stale entry cannot be read. Entries are
float16 ``.npy`` files with a small JSON sidecar.

Integrity. Every cache entry (these features, the pixel cache and tower statistics, expert
buffers, forgetting statistics) is a data file plus a JSON sidecar (``path.with_suffix(".json")``)
holding the metadata and a ``checksum`` of the data file's bytes (algorithm, digest, size). Both are
written atomically, the data first, then the sidecar (``save_entry``); an entry counts as present
only when both exist and agree. Every load checks the size, the hash of the whole file and, where
the data must be finite, that it is; a mismatch, an unreadable or truncated file, a missing or
malformed sidecar, or an entry from before checksums is recomputed after one warning line, never
used (freshly computed non-finite data is refused, not cached). The hash is sha256 over every byte,
not a strided sample (which would miss a changed byte outside it); its cost is small next to any
training run (``docs/findings.md``, "Checksummed cache entries"). ``.npy`` entries are read and
hashed in one pass.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from datasets.base import CaptionDataset, identity_hash
from datasets.encoders import Encoder, ImageLoader

CACHE_VERSION = 1
CHECKSUM = "sha256"
READ_CHUNK = 1 << 22  # bytes per read of a verified .npy load
# exponent bits of each float type: all set means inf or nan
_EXPONENT = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000),
             np.dtype(np.float64): (np.uint64, 0x7FF0000000000000)}


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLBENCH_CACHE", Path.home() / ".cache" / "vlbench"))


def cache_path(cache_dir: Path, ds: CaptionDataset, split: str, enc: Encoder) -> Path:
    stored = ds.test_split if split == "test" else split
    key = identity_hash(CACHE_VERSION, ds.identity, stored, enc.key)
    safe = enc.name.replace(":", "_").replace("/", "_")
    return Path(cache_dir) / "features" / f"{ds.name}-{stored}-{safe}-{key}.npy"


# -- checksummed entries --------------------------------------------------------------------------

def sidecar(path: Path) -> Path:
    """The JSON metadata of the cache entry whose data file is ``path``."""
    return Path(path).with_suffix(".json")


def all_finite(a) -> bool:
    """Whether every value of a numeric array is finite (always true for integers and bools).
    Floats are checked on their exponent bits, chunk by chunk: ~10x faster than ``np.isfinite``
    on float16."""
    a = np.asarray(a)
    if a.dtype.kind in "biu":
        return True
    if a.dtype not in _EXPONENT:  # complex, longdouble, objects
        return bool(np.isfinite(a).all())
    uint, mask = _EXPONENT[a.dtype]
    bits = np.ascontiguousarray(a).reshape(-1).view(uint)
    chunk = 1 << 20
    tmp = np.empty(min(chunk, bits.size), dtype=uint)
    for s in range(0, bits.size, chunk):
        part = tmp[:len(bits[s:s + chunk])]
        np.bitwise_and(bits[s:s + chunk], mask, out=part)
        if part.size and part.max() == mask:
            return False
    return True


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` onto ``path`` (a reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_checksum(path: Path) -> dict:
    """``{"algo", "digest", "bytes"}`` of a file's bytes (hashed through a memory map)."""
    h = hashlib.new(CHECKSUM)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                h.update(m)
    return {"algo": CHECKSUM, "digest": h.hexdigest(), "bytes": size}


def save_entry(path: Path, write: Callable[[Path], None], meta: Optional[dict] = None) -> dict:
    """Write a cache entry: the data file (``write(tmp)``, renamed onto ``path``), then its sidecar
    with ``meta`` and the data file's checksum (also via a renamed temp file). Returns the sidecar."""
    path = Path(path)
    _atomic_write(path, write)
    side = {**(meta or {}), "checksum": file_checksum(path)}
    text = json.dumps(side, indent=1, default=str)
    _atomic_write(sidecar(path), lambda tmp: tmp.write_text(text))
    return side


def atomic_save_npy(path: Path, arr: np.ndarray, meta: Optional[dict] = None) -> dict:
    """Save ``arr`` as a checksummed ``.npy`` cache entry (``save_entry``; the sidecar also records
    the shape and dtype)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr)
    return save_entry(path, write, {**(meta or {}), "shape": list(arr.shape), "dtype": str(arr.dtype)})


def _sidecar_checksum(path: Path) -> tuple[Optional[dict], Optional[str]]:
    """``(sidecar, None)`` when ``path`` exists, has a well-formed sidecar with a checksum, and its
    size agrees; else ``(None, why)``, ``why`` None when there is no data file at all."""
    if not path.exists():
        return None, None
    side = sidecar(path)
    if not side.exists():
        return None, f"has no sidecar {side.name} (no checksum: an older cache format, or an interrupted write)"
    try:
        meta = json.loads(side.read_text())
        ck = meta["checksum"] if isinstance(meta, dict) else None
    except KeyError:
        return None, "has no checksum in its sidecar (an older cache format)"
    except (OSError, ValueError) as e:
        return None, f"has an unreadable sidecar ({type(e).__name__}: {e})"
    if not (isinstance(ck, dict) and isinstance(ck.get("digest"), str) and isinstance(ck.get("bytes"), int)
            and ck.get("algo") in hashlib.algorithms_available):
        return None, "has a malformed checksum in its sidecar"
    size = path.stat().st_size
    if size != ck["bytes"]:
        return None, f"is {size:,} bytes where its checksum says {ck['bytes']:,} (truncated or rewritten)"
    return meta, None


_MISMATCH = "does not match its checksum (its bytes changed)"


def read_verified(path: Path) -> tuple[Optional[bytes], Optional[dict], Optional[str]]:
    """A small cache entry's data file read whole and checked against its sidecar:
    ``(bytes, sidecar, None)``, or ``(None, None, why)`` (``why`` None when the entry is absent).
    Parse the returned bytes, never the file again: what is used is what was checked."""
    path = Path(path)
    meta, why = _sidecar_checksum(path)
    if meta is None:
        return None, None, why
    try:
        blob = path.read_bytes()
    except OSError as e:
        return None, None, f"cannot be read ({type(e).__name__}: {e})"
    ck = meta["checksum"]
    if len(blob) != ck["bytes"] or hashlib.new(ck["algo"], blob).hexdigest() != ck["digest"]:
        return None, None, _MISMATCH
    return blob, meta, None


def load_npy(path: Path, finite: bool = True) -> tuple[Optional[np.ndarray], Optional[str]]:
    """A ``.npy`` cache entry, read and hashed in one pass and checked against its sidecar (size,
    checksum, shape and dtype recorded there, and finiteness when ``finite``): ``(array, None)``, or
    ``(None, why)`` (``why`` None when the entry is absent)."""
    path = Path(path)
    meta, why = _sidecar_checksum(path)
    if meta is None:
        return None, why
    ck = meta["checksum"]
    h = hashlib.new(ck["algo"])
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                return None, f"has a .npy format version {version} this cache never writes"
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
            if dtype.hasobject:
                return None, "holds Python objects, not numbers"
            arr = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
            if offset + arr.nbytes != ck["bytes"]:
                return None, "has a header that does not fit its size"
            f.seek(0)
            h.update(f.read(offset))
            raw = (arr.T if fortran else arr).reshape(-1).view(np.uint8).data if arr.size else memoryview(b"")
            done = 0
            while done < len(raw):
                n = f.readinto(raw[done:done + READ_CHUNK])
                if not n:
                    return None, "is truncated"
                h.update(raw[done:done + n])
                done += n
    except Exception as e:  # a garbled header
        return None, f"cannot be read ({type(e).__name__}: {e})"
    if h.hexdigest() != ck["digest"]:
        return None, _MISMATCH
    if "shape" in meta and list(meta["shape"]) != list(arr.shape) or "dtype" in meta and meta["dtype"] != str(arr.dtype):
        return None, f"holds {arr.dtype} {list(arr.shape)} where its sidecar says {meta.get('dtype')} {meta.get('shape')}"
    if finite and not all_finite(arr):
        return None, "holds non-finite values"
    return arr, None


def warn(log: Optional[Callable], message: str) -> None:
    """One warning line: to ``log`` when given, else to stderr (a bad cache entry is never silent)."""
    if log:
        log(message)
    else:
        print(message, file=sys.stderr)


# -- features -------------------------------------------------------------------------------------

def features(ds: CaptionDataset, split: str, enc: Encoder, cache_dir=None, device: str = "cpu",
             log=print) -> np.ndarray:
    """Features of a split's images (image encoder) or captions (text encoder), float16 [n, dim]."""
    path = cache_path(Path(cache_dir or default_cache_dir()), ds, split, enc)
    arr, why = load_npy(path)
    if arr is not None:
        return arr
    if why:
        warn(log, f"feature cache entry {path} {why}; recomputing")
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
        arr = enc.encode(_Lazy(), desc=f"{ds.name}/{split} images", device=device, log=log)
    else:
        arr = enc.encode(sp.captions, desc=f"{ds.name}/{split} captions", device=device, log=log)
    arr = arr.astype(np.float16)
    if not all_finite(arr):
        raise RuntimeError(f"encoder {enc.name} gave non-finite {enc.modality} features for {ds.name}/{split}; not cached")
    meta = {"dataset": ds.name, "identity": ds.identity, "split": split, "stored_split": ds.test_split if split == "test" else split,
            "encoder": enc.key, "backend": getattr(enc, "backend", "torch"), "seconds": round(time.time() - t0, 2)}
    atomic_save_npy(path, arr, meta)
    if log:
        log(f"cached {enc.modality} features {ds.name}/{split} {arr.shape} in {meta['seconds']} s ({meta['backend']}) -> {path}")
    return arr

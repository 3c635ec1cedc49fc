"""Readers for captioned image collections on disk.

* Karpathy split JSON (``dataset_flickr8k.json``, ``dataset_flickr30k.json``, ``dataset_coco.json``):
  ``images[].{filename, filepath?, split, sentences[].raw}``; ``restval`` counts as train.
* COCO captions JSON (``captions_<split><year>.json``: ``images[].{id, file_name}``,
  ``annotations[].{image_id, caption}``) plus the image folders.
* A folder with ``captions.jsonl``: one ``{"image": ..., "captions": [...], "split": ...}`` per line.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from bench.errors import BenchError
from datasets.base import CaptionDataset, Split, file_hash, identity_hash, image_digest, load_image_file, make_split

KARPATHY_FILES = {"flickr8k": "dataset_flickr8k.json", "flickr30k": "dataset_flickr30k.json",
                  "coco": "dataset_coco.json"}
_SPLIT_ALIAS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _root(data_root) -> Path:
    if data_root is None:
        raise BenchError("this dataset needs --data-root PATH (the folder with its images and caption file)")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise BenchError(f"data root not found or not a folder: {root}")
    return root


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BenchError(f"caption file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchError(f"malformed JSON in {path}: {e}") from None


def _field(obj, key, where):
    try:
        return obj[key]
    except (KeyError, TypeError):
        raise BenchError(f"{where}: missing field {key!r}") from None


def _captions(caps, where: str) -> list[str]:
    """An entry's captions, stripped: a non-empty list of non-empty strings, or one clear error (a
    caption-less image could never be retrieved, and would lower text retrieval silently)."""
    if isinstance(caps, str) or not isinstance(caps, list) or not caps:
        raise BenchError(f"{where}: no captions (every image needs at least one)")
    out = []
    for k, c in enumerate(caps):
        if not isinstance(c, str) or not c.strip():
            raise BenchError(f"{where}: caption {k} is empty or not a string")
        out.append(c.strip())
    return out


def read_karpathy(name: str, data_root, cache_dir=None) -> CaptionDataset:
    root = _root(data_root)
    json_path = root / KARPATHY_FILES[name]
    if not json_path.exists():  # accept the JSON anywhere directly under the root
        found = sorted(root.glob("dataset_*.json"))
        if not found:
            raise BenchError(f"no {KARPATHY_FILES[name]} (Karpathy split JSON) under {root}")
        json_path = found[0]
    data = _read_json(json_path)
    images = _field(data, "images", str(json_path))
    if not isinstance(images, list):
        raise BenchError(f"{json_path}: 'images' must be a list")
    img_dir = root / "images" if (root / "images").is_dir() else root
    records: dict[str, list] = {"train": [], "val": [], "test": []}
    for k, im in enumerate(images):
        where = f"{json_path.name}: images[{k}]"
        split = _SPLIT_ALIAS.get(_field(im, "split", where))
        if split is None:
            continue
        fname = _field(im, "filename", where)
        path = img_dir / im["filepath"] / fname if im.get("filepath") else img_dir / fname
        sentences = _field(im, "sentences", where)
        if not isinstance(sentences, list):
            raise BenchError(f"{where} ({fname}): 'sentences' must be a list")
        caps = _captions([_field(s, "raw", where) for s in sentences], f"{where} ({fname})")
        records[split].append((str(path), caps))
    if not records["train"]:
        raise BenchError(f"{json_path}: no train images")
    splits = {s: make_split(r) for s, r in records.items()}
    paths = [p for s in splits.values() for p in s.images]
    ident = identity_hash(name, file_hash(json_path), sorted(Path(p).name for p in paths), image_digest(paths, root, cache_dir))
    return CaptionDataset(name, splits, ident, load_image_file)


def read_coco_captions(data_root, cache_dir=None) -> CaptionDataset:
    """``captions_{train,val,test}<year>.json`` under the root or ``annotations/``; images in
    ``<split><year>/`` (or ``images/``, or the root)."""
    root = _root(data_root)
    files = sorted(list(root.glob("captions_*.json")) + list(root.glob("annotations/captions_*.json")))
    if not files:
        raise BenchError(f"no captions_*.json (COCO captions) under {root} or {root / 'annotations'}")
    splits: dict[str, Split] = {}
    hashes = []
    for path in files:
        m = re.match(r"captions_(train|val|test)(\d*)\.json$", path.name)
        if not m:
            continue
        split, year = m.group(1), m.group(2)
        data = _read_json(path)
        img_dir = next((d for d in (root / f"{split}{year}", root / "images") if d.is_dir()), root)
        by_id: dict = {}
        for k, im in enumerate(_field(data, "images", path.name)):
            by_id[_field(im, "id", f"{path.name}: images[{k}]")] = (str(img_dir / _field(im, "file_name", path.name)), [])
        for k, a in enumerate(_field(data, "annotations", path.name)):
            where = f"{path.name}: annotations[{k}]"
            img_id = _field(a, "image_id", where)
            if img_id not in by_id:
                raise BenchError(f"{where}: image_id {img_id} is not in 'images'")
            by_id[img_id][1].append(_field(a, "caption", where))
        for img_id, (ref, caps) in by_id.items():
            by_id[img_id] = (ref, _captions(caps, f"{path.name}: image {img_id} ({Path(ref).name})"))
        splits[split] = make_split([r for _, r in sorted(by_id.items())])
        hashes.append((path.name, file_hash(path)))
    if "train" not in splits:
        raise BenchError(f"no captions_train*.json under {root}")
    for s in ("val", "test"):
        splits.setdefault(s, make_split([]))
    paths = [p for s in splits.values() for p in s.images]
    ident = identity_hash("coco-captions", hashes, image_digest(paths, root, cache_dir))
    return CaptionDataset("coco-captions", splits, ident, load_image_file)


def read_folder(data_root, cache_dir=None) -> CaptionDataset:
    root = _root(data_root)
    path = root / "captions.jsonl"
    if not path.exists():
        raise BenchError(f"no captions.jsonl under {root}")
    records: dict[str, list] = {"train": [], "val": [], "test": []}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchError(f"malformed JSON in {path} line {n}: {e}") from None
            where = f"{path.name} line {n}"
            split = _SPLIT_ALIAS.get(rec.get("split", "train"))
            if split is None:
                raise BenchError(f"{where}: unknown split {rec.get('split')!r} (use train, val or test)")
            caps = _captions(_field(rec, "captions", where), where)
            records[split].append((str(root / _field(rec, "image", where)), caps))
    if not records["train"]:
        raise BenchError(f"{path}: no train records")
    splits = {s: make_split(r) for s, r in records.items()}
    paths = [p for s in splits.values() for p in s.images]
    ident = identity_hash("folder", file_hash(path), image_digest(paths, root, cache_dir))
    return CaptionDataset("folder", splits, ident, load_image_file)

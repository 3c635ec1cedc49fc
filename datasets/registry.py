"""The dataset registry: ``python -m bench list datasets``."""
from __future__ import annotations

from bench.registry import Registry
from datasets import readers

DATASETS: Registry = Registry("dataset")


@DATASETS.register("synthetic", help="embedded procedural captioned scenes (default; no download)")
def _synthetic(data_root=None, limit=None):
    from datasets import procedural

    if limit:  # generate only what is used (the val/test images do not depend on n_train)
        return procedural.build(0, n_train=limit[0], n_val=limit[1], n_test=limit[1])
    return procedural.build()


for _name in ("flickr8k", "flickr30k", "coco"):
    DATASETS.register(_name, (lambda n: lambda data_root=None: readers.read_karpathy(n, data_root))(_name),
                      help=f"Karpathy split JSON {readers.KARPATHY_FILES[_name]} + images under --data-root")
DATASETS.register("coco-captions", lambda data_root=None: readers.read_coco_captions(data_root),
                  help="COCO captions_*.json + image folders under --data-root")
DATASETS.register("folder", lambda data_root=None: readers.read_folder(data_root),
                  help="a folder of images with captions.jsonl under --data-root")


def load_dataset(name: str, data_root=None, test_split: str = "test", limit: tuple[int, int] | None = None):
    """Read a registered dataset; ``limit=(n_train, n_eval)`` keeps the first images of each split."""
    if name == "synthetic":
        return DATASETS.get(name)(data_root=data_root, limit=limit).with_test_split(test_split)
    ds = DATASETS.get(name)(data_root=data_root).with_test_split(test_split)
    return ds.subset(*limit) if limit else ds

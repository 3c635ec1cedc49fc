"""The dataset registry: ``python -m bench list datasets``."""
from __future__ import annotations

import inspect

from bench.errors import BenchError
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
    DATASETS.register(_name, (lambda n: lambda data_root=None, cache_dir=None: readers.read_karpathy(n, data_root, cache_dir))(_name),
                      help=f"Karpathy split JSON {readers.KARPATHY_FILES[_name]} + images under --data-root")
DATASETS.register("coco-captions", lambda data_root=None, cache_dir=None: readers.read_coco_captions(data_root, cache_dir),
                  help="COCO captions_*.json + image folders under --data-root")
DATASETS.register("folder", lambda data_root=None, cache_dir=None: readers.read_folder(data_root, cache_dir),
                  help="a folder of images with captions.jsonl under --data-root")


def load_dataset(name: str, data_root=None, test_split: str = "test", limit: tuple[int, int] | None = None,
                 cache_dir=None):
    """Read a registered dataset; ``limit=(n_train, n_eval)`` keeps the first images of each split.
    ``cache_dir`` holds the readers' memo of image hashes (default: the feature cache's folder); a
    plugin dataset's factory gets it when it accepts a ``cache_dir`` argument."""
    if name == "synthetic":
        if data_root is not None:
            raise BenchError(f"the synthetic dataset is generated, not read: --data-root {data_root} would be "
                             f"ignored; drop it, or name the dataset that lives there (python -m bench list datasets)")
        return DATASETS.get(name)(data_root=data_root, limit=limit).with_test_split(test_split)
    factory = DATASETS.get(name)
    kw = {}
    if "cache_dir" in inspect.signature(factory).parameters:
        from datasets.features import default_cache_dir
        kw["cache_dir"] = cache_dir or default_cache_dir()
    ds = factory(data_root=data_root, **kw).with_test_split(test_split)
    return ds.subset(*limit) if limit else ds

"""Dataset readers on small hand-made folders, and on Flickr8k when ../shared is present."""
import json

import numpy as np
import pytest
from PIL import Image

from bench.errors import BenchError
from datasets.base import load_image_file
from datasets.registry import DATASETS, load_dataset


def _img(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def karpathy_root(tmp_path, name="dataset_flickr8k.json"):
    images = []
    for i, split in enumerate(["train", "train", "restval", "val", "test"]):
        _img(tmp_path / "images" / f"{i}.jpg", (i * 40, 0, 0))
        images.append({"filename": f"{i}.jpg", "split": split,
                       "sentences": [{"raw": f"image {i} caption {k} "} for k in range(2 + (i == 0))]})
    (tmp_path / name).write_text(json.dumps({"images": images, "dataset": "x"}))
    return tmp_path


def test_karpathy_splits_restval_and_caption_index(tmp_path):
    ds = load_dataset("flickr8k", karpathy_root(tmp_path))
    tr = ds.split("train")
    assert tr.n_images == 3 and tr.n_captions == 7  # restval counts as train
    assert tr.caption_image.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert tr.captions[0] == "image 0 caption 0"
    assert ds.split("test").images[0].endswith("4.jpg")
    assert np.asarray(ds.load_image(tr.images[1])).shape == (8, 8, 3)


def test_test_split_can_be_mapped_to_val_and_changes_nothing_else(tmp_path):
    root = karpathy_root(tmp_path)
    a, b = load_dataset("flickr8k", root), load_dataset("flickr8k", root, test_split="val")
    assert b.split("test").images == a.split("val").images
    assert a.identity == b.identity


def test_identity_changes_with_the_split_file(tmp_path):
    root = karpathy_root(tmp_path)
    before = load_dataset("flickr8k", root).identity
    data = json.loads((root / "dataset_flickr8k.json").read_text())
    data["images"][0]["sentences"][0]["raw"] = "changed"
    (root / "dataset_flickr8k.json").write_text(json.dumps(data))
    assert load_dataset("flickr8k", root).identity != before


def test_subset_keeps_first_images_and_their_captions(tmp_path):
    ds = load_dataset("flickr8k", karpathy_root(tmp_path)).subset(2, 1)
    assert ds.split("train").n_images == 2 and ds.split("train").n_captions == 5
    assert ds.identity != load_dataset("flickr8k", tmp_path).identity


def test_coco_captions_reader(tmp_path):
    for split, ids in (("train", [7, 3]), ("val", [9])):
        imgs = [{"id": i, "file_name": f"COCO_{split}_{i}.jpg"} for i in ids]
        anns = [{"image_id": i, "caption": f"c{i}-{k}"} for i in ids for k in range(5)]
        (tmp_path / "annotations").mkdir(exist_ok=True)
        (tmp_path / "annotations" / f"captions_{split}2014.json").write_text(json.dumps({"images": imgs, "annotations": anns}))
        for im in imgs:
            _img(tmp_path / f"{split}2014" / im["file_name"], (0, 90, 0))
    ds = load_dataset("coco-captions", tmp_path, test_split="val")
    tr = ds.split("train")
    assert tr.n_images == 2 and tr.captions[:2] == ["c3-0", "c3-1"]  # sorted by image id
    assert ds.split("test").n_captions == 5
    load_image_file(tr.images[0])


def test_folder_reader(tmp_path):
    lines = []
    for i, split in enumerate(["train", "train", "val"]):
        _img(tmp_path / f"p{i}.png", (0, 0, 200))
        lines.append(json.dumps({"image": f"p{i}.png", "captions": [f"a{i}", f"b{i}"], "split": split}))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_dataset("folder", tmp_path, test_split="val")
    assert ds.split("train").n_captions == 4 and ds.split("test").captions == ["a2", "b2"]


@pytest.mark.parametrize("content,match", [
    ("{not json", "malformed JSON"),
    ('{"images": [{"filename": "a.jpg", "split": "tr', "malformed JSON"),  # truncated
    ('{"imgs": []}', "missing field 'images'"),
    ('{"images": [{"split": "train", "sentences": []}]}', "missing field 'filename'"),
])
def test_bad_karpathy_json_is_one_clear_error(tmp_path, content, match):
    (tmp_path / "dataset_flickr8k.json").write_text(content)
    with pytest.raises(BenchError, match=match):
        load_dataset("flickr8k", tmp_path)


def test_missing_root_and_missing_file(tmp_path):
    with pytest.raises(BenchError, match="data root not found"):
        load_dataset("flickr8k", tmp_path / "nope")
    with pytest.raises(BenchError, match="needs --data-root"):
        load_dataset("flickr30k", None)
    with pytest.raises(BenchError, match="no dataset_flickr30k.json"):
        load_dataset("flickr30k", tmp_path)


def test_corrupt_and_missing_images_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(BenchError, match="cannot decode image .*bad.jpg"):
        load_image_file(str(bad))
    with pytest.raises(BenchError, match="image file not found"):
        load_image_file(str(tmp_path / "missing.jpg"))


def test_unknown_dataset_lists_available():
    with pytest.raises(BenchError, match="unknown dataset 'imagenet'; available: coco, coco-captions, flickr30k"):
        DATASETS.get("imagenet")


def test_flickr8k(flickr8k_root):
    ds = load_dataset("flickr8k", flickr8k_root, test_split="val")
    assert ds.split("train").n_images == 6000 and ds.split("train").n_captions == 30000
    assert ds.split("test").n_images == 1000 and ds.split("test").n_captions == 5000
    assert np.bincount(ds.split("train").caption_image).tolist() == [5] * 6000
    with pytest.raises(BenchError, match="no 'test' split"):
        load_dataset("flickr8k", flickr8k_root)  # withheld on purpose
    im = ds.load_image(ds.split("train").images[0])
    assert im.size == (224, 224) and im.mode == "RGB"

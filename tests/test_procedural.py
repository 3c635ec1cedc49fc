"""The embedded procedural dataset: determinism, caption truthfulness and variety, splits."""
import json
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from bench.errors import BenchError
from datasets import procedural as P
from datasets.base import identity_hash

N_SCENES = 300  # captions and scenes are cheap (well under 1 ms each)


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im)


def _contains(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text) is not None


def _strip(text: str, phrases) -> str:
    """Remove whole-word occurrences of ``phrases`` (longest first)."""
    for ph in sorted(phrases, key=len, reverse=True):
        text = re.sub(rf"(?<![\w-]){re.escape(ph)}(?![\w-])", " # ", text)
    return text


def _shape_phrases(shape: str) -> list[str]:
    return [w for pair in P._SHAPE_WORDS[shape] for w in pair]


# --------------------------------------------------------------------------------------------

def test_vocabulary_is_rich_enough():
    assert len(P._SHAPES) >= 8 and len(P._COLOURS) >= 8 and len(P._BACKGROUNDS) >= 6
    assert set(P._REGIONS) == {"left", "right", "top", "bottom", "centre"}
    # every background leaves enough contrasting object colours to choose from
    assert min(len(c) for c in P._CONTRASTING.values()) >= 5


def test_render_is_deterministic_and_depends_on_seed_and_index():
    a = _pixels(P.render(3, 17))
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    assert np.array_equal(a, _pixels(P.render(3, 17)))
    assert not np.array_equal(a, _pixels(P.render(4, 17)))
    assert not np.array_equal(a, _pixels(P.render(3, 18)))


def test_render_mode_and_size():
    im = P.render(0, 5)
    assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (224, 224)
    small = P.render(0, 5, size=64)
    assert small.mode == "RGB" and small.size == (64, 64)
    # not a blank canvas: objects, background and noise give many distinct colours
    assert len(np.unique(_pixels(im).reshape(-1, 3), axis=0)) > 500
    with pytest.raises(ValueError):
        P.render(0, 5, size=0)
    with pytest.raises(ValueError):
        P.render(-1, 5)


def test_render_shows_the_object_colours_where_the_scene_puts_them():
    # At each object's centre the pixel is close to that object's colour (rings are hollow,
    # so they are sampled on the band instead).
    for idx in range(20):
        scene = P.sample_scene(0, idx)
        arr = _pixels(P.render(0, idx)).astype(float)
        ph = scene["photometric"]
        for g in scene["groups"]:
            for o in g["objects"]:
                x, y = o["x"], o["y"]
                if g["shape"] == "ring":
                    x += o["r"] * (P._RING_RADIUS - P._RING_THICKNESS / 2)
                px = arr[int(y * 224), int(x * 224)]
                expect = np.clip(np.asarray(o["rgb"]) * ph["gain"] + ph["bias"], 0, 255)
                assert np.abs(px - expect).max() < 45, (idx, g["shape"], px, expect)


def test_captions_are_deterministic_and_depend_on_seed():
    assert P.captions(2, 40) == P.captions(2, 40)
    assert P.captions(2, 40) != P.captions(3, 40)
    assert P.sample_scene(2, 40) == P.sample_scene(2, 40)


def test_scene_structure():
    for idx in range(N_SCENES):
        s = P.sample_scene(1, idx)
        json.dumps(s)  # plain values only
        groups = s["groups"]
        assert 1 <= len(groups) <= 3
        assert len({g["region"] for g in groups}) == len(groups)
        assert len({(g["shape"], g["colour"]) for g in groups}) == len(groups)
        assert s["background"]["texture"] in P._TEXTURES
        for g in groups:
            assert g["shape"] in P._SHAPES and g["colour"] in P._COLOURS
            assert g["colour"] in P._CONTRASTING[s["background"]["colour"]]
            assert g["size"] in ("small", "large") and len(g["objects"]) == g["count"] in (1, 2, 3)
            x0, y0, x1, y1 = P._REGION_BOX[g["region"]]
            for o in g["objects"]:
                assert x0 <= o["x"] <= x1 and y0 <= o["y"] <= y1
                ext = o["r"] * P._SHAPE_EXTENT[g["shape"]]
                assert ext <= o["x"] <= 1 - ext and ext <= o["y"] <= 1 - ext
                assert abs(o["angle"]) <= P._MAX_ROTATION[g["shape"]]
    gaps = np.array([P.sample_scene(1, i)["min_gap"] for i in range(N_SCENES)])
    assert (gaps >= 0).mean() > 0.98  # objects essentially never overlap


def test_five_captions_each_naming_a_group_by_colour_and_shape():
    for idx in range(N_SCENES):
        caps = P.captions(0, idx)
        groups = P.sample_scene(0, idx)["groups"]
        assert len(caps) == 5 and all(isinstance(c, str) and c for c in caps)
        for c in caps:
            low = c.lower()
            assert any(any(_contains(low, w) for w in P._COLOUR_WORDS[g["colour"]])
                       and any(_contains(low, w) for w in _shape_phrases(g["shape"])) for g in groups), c


def test_captions_are_true_of_the_scene():
    """No caption names a shape, colour, size or position that the image does not have."""
    all_colours = {w for ws in P._COLOUR_WORDS.values() for w in ws}
    all_shapes = {w for s in P._SHAPES for w in _shape_phrases(s)}
    for idx in range(N_SCENES):
        s = P.sample_scene(0, idx)
        groups = s["groups"]
        present_colours = {w for g in groups for w in P._COLOUR_WORDS[g["colour"]]}
        present_shapes = {w for g in groups for w in _shape_phrases(g["shape"])}
        bg_words = P._BACKGROUND_WORDS[s["background"]["colour"]]
        sizes = {g["size"] for g in groups}
        regions = {g["region"] for g in groups}
        for c in P.captions(0, idx):
            low = c.lower()
            rest = _strip(_strip(low, bg_words), present_colours)
            assert not any(_contains(rest, w) for w in all_colours), (c, groups)
            rest = _strip(low, present_shapes)
            assert not any(_contains(rest, w) for w in all_shapes), (c, groups)
            if any(_contains(low, w) for w in P._SIZE_WORDS["small"]):
                assert "small" in sizes, c
            if any(_contains(low, w) for w in P._SIZE_WORDS["large"]):
                assert "large" in sizes, c
            for region, words in (("left", ["left"]), ("right", ["right"]), ("top", ["top", "upper"]),
                                  ("bottom", ["bottom", "lower"]), ("centre", ["centre", "center", "middle"])):
                if any(_contains(low, w) for w in words):
                    assert region in regions, c


def test_counts_and_plurals():
    numbers = {1: ("one",), 2: ("two", "2", "pair"), 3: ("three", "3")}
    saw_digit = saw_word = False
    for idx in range(N_SCENES):
        s = P.sample_scene(0, idx)
        caps = P.captions(0, idx)
        saw_digit |= any(re.search(r"\b[23]\b", c) is not None for c in caps)
        saw_word |= any(_contains(c.lower(), w) for c in caps for w in ("two", "three"))
        if len(s["groups"]) != 1:
            continue
        g = s["groups"][0]
        plurals = [p for _, p in P._SHAPE_WORDS[g["shape"]]]
        other_numbers = [w for n, ws in numbers.items() if n != g["count"] for w in ws if n != 1]
        for c in caps:
            low = c.lower()
            has_plural = any(_contains(low, p) for p in plurals)
            assert has_plural == (g["count"] > 1), (c, g)
            # a one-group image never states a wrong count for its objects
            assert not any(_contains(low, w) for w in other_numbers), (c, g)
    assert saw_digit and saw_word


def test_captions_differ_in_wording():
    openings = set()
    for idx in range(100):
        caps = P.captions(0, idx)
        assert len(set(caps)) == 5
        bags = [tuple(sorted(re.findall(r"[\w-]+", c.lower()))) for c in caps]
        assert len(set(bags)) == 5, caps  # not just a reordering of the same words
        openings.update(" ".join(c.split()[:2]).lower() for c in caps)
    assert len(openings) > 40  # many different templates and phrasings start the captions


def test_captions_sometimes_omit_details():
    has_bg = has_pos = has_size = 0
    total = 0
    for idx in range(100):
        for c in P.captions(0, idx):
            low = c.lower()
            total += 1
            has_bg += ("background" in low or "backdrop" in low)
            has_pos += any(_contains(low, w) for w in ("left", "right", "top", "bottom", "centre",
                                                       "center", "middle", "upper", "lower"))
            has_size += any(_contains(low, w) for ws in P._SIZE_WORDS.values() for w in ws)
    for n in (has_bg, has_pos, has_size):
        assert 0.1 * total < n < 0.95 * total


def test_build_small_dataset():
    ds = P.build(0, n_train=50, n_val=10, n_test=10)
    assert ds.name == "synthetic"
    assert ds.summary() == {"train": {"images": 50, "captions": 250}, "val": {"images": 10, "captions": 50},
                            "test": {"images": 10, "captions": 50}}
    assert ds.identity == identity_hash("procedural", P.GENERATOR_VERSION, 0, 50, 10, 10)
    refs = {name: split.images for name, split in ds.splits.items()}
    assert all(re.fullmatch(r"proc:0:\d+", r) for rs in refs.values() for r in rs)
    assert not set(refs["train"]) & set(refs["val"]) and not set(refs["train"]) & set(refs["test"])
    assert not set(refs["val"]) & set(refs["test"])
    for split in ds.splits.values():
        assert len(set(split.images)) == split.n_images
        assert np.array_equal(split.caption_image, np.repeat(np.arange(split.n_images), 5))
        idx = int(split.images[3].split(":")[2])
        assert split.captions[15:20] == P.captions(0, idx)
    ref = ds.split("test").images[0]
    assert np.array_equal(_pixels(ds.load_image(ref)), _pixels(P.render(0, int(ref.split(":")[2]))))
    pickle.loads(pickle.dumps(ds.load_image))  # usable from worker processes
    with pytest.raises(BenchError):
        ds.load_image("proc:0:x")
    with pytest.raises(BenchError):
        ds.load_image("images/0.jpg")


def test_build_identity_and_stable_eval_splits():
    a = P.build(0, n_train=20, n_val=5, n_test=5)
    b = P.build(0, n_train=30, n_val=5, n_test=5)
    c = P.build(1, n_train=20, n_val=5, n_test=5)
    assert len({a.identity, b.identity, c.identity}) == 3
    # growing the training split does not change the evaluation images
    assert a.splits["test"].images == b.splits["test"].images
    assert a.splits["val"].captions == b.splits["val"].captions
    assert a.splits["train"].images == b.splits["train"].images[:20]
    assert a.splits["train"].captions != c.splits["train"].captions


def test_build_rejects_bad_arguments():
    with pytest.raises(BenchError):
        P.build(0, n_train=-1)
    with pytest.raises(BenchError):
        P.build(0, n_val=P._SPLIT_CAPACITY + 1)
    with pytest.raises(ValueError):
        P.build(-3)

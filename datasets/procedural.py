"""The embedded default dataset: procedurally generated captioned images.

``python -m bench run`` must work with no download, so the project generates its own
image-caption data. Each image is a small compositional scene and comes with five differently
worded captions that are all true of it.

Scenes
------
An image holds 1 to 3 *object groups* on a background. A group is ``count`` (1-3) copies of one
object, described by a shape (10 kinds), a colour (10 named colours) and a size (small/large),
placed with jitter inside one of five position regions (left, right, top, bottom, centre); groups
in an image use different regions and never share both shape and colour, so every caption phrase
refers to exactly one group. The background has a named colour (7) and a texture (plain, stripes,
dots, gradient, checkered). Object colours are chosen to contrast with the background.

Nuisance that the captions do not mention keeps retrieval non-trivial: shapes are rotated (within
limits that keep e.g. a square from turning into a diamond), colours are jittered per group and per
copy, some groups get a darker outline, small unmentioned clutter (specks and short strokes)
appears in some images, and the final pixels get a random exposure change plus mild Gaussian noise.
Objects are placed by best-candidate sampling inside their region and never overlap in practice.

Rendering draws with Pillow at twice the output size and box-downsamples (anti-aliasing), in
about 2-3 ms per 224 px image on one core.

Captions
--------
Five of nine caption templates are used per image (so the five captions differ in structure), with
synonyms for colours, shapes, sizes, positions and backgrounds, numbers as words or digits, a
shuffled order of groups per caption, and random omission of details (size, position, background,
exact count). Omission only ever makes a caption less specific, never false. The colour and shape
of each mentioned group are always stated.

Determinism
-----------
Everything about image ``idx`` is a pure function of ``(seed, idx)``: each aspect draws from its own
generator ``np.random.default_rng([seed, idx, stream])`` (streams: semantics, layout, caption
wording, pixel noise). Any image can therefore be regenerated on its own, nothing is stored, and
building the caption lists never touches layout or pixels. ``GENERATOR_VERSION`` goes into the
dataset identity; bump it whenever the output for a given ``(seed, idx)`` changes. (The output also
depends on the numpy ``Generator`` streams and on Pillow's rasteriser; those are pinned by the
environment, not by this version number.)

Image references are ``"proc:<seed>:<idx>"``. The splits use disjoint index ranges that start at
fixed offsets (train 0, val 10,000,000, test 20,000,000), so growing ``n_train`` never changes the
val or test images.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from bench.errors import BenchError
from datasets.base import CaptionDataset, identity_hash, make_split

GENERATOR_VERSION = 1

_N_CAPTIONS = 5
_SPLIT_OFFSETS = {"train": 0, "val": 10_000_000, "test": 20_000_000}
_SPLIT_CAPACITY = 10_000_000
_SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap anti-aliasing

# Independent random streams per image, so e.g. caption wording never shifts the layout.
_STREAM_SEMANTICS, _STREAM_LAYOUT, _STREAM_CAPTIONS, _STREAM_NOISE = 0, 1, 2, 3

_RGB = tuple[int, int, int]

# --------------------------------------------------------------------------------------------
# Vocabulary. The first word of each synonym list is the canonical name and is used more often.
# --------------------------------------------------------------------------------------------

_COLOURS: dict[str, _RGB] = {
    "red": (210, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 210, 30),
    "green": (40, 160, 60),
    "blue": (35, 85, 215),
    "purple": (130, 50, 170),
    "pink": (245, 130, 185),
    "brown": (120, 70, 30),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
_COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "bright orange", "tangerine"),
    "yellow": ("yellow", "golden", "lemon-yellow"),
    "green": ("green", "emerald", "grass-green"),
    "blue": ("blue", "cobalt", "royal blue"),
    "purple": ("purple", "violet"),
    "pink": ("pink", "rose-pink"),
    "brown": ("brown", "chocolate", "dark brown"),
    "white": ("white", "snow-white"),
    "black": ("black", "jet-black"),
}

# (singular, plural) pairs.
_SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs"), ("round shape", "round shapes")),
    "square": (("square", "squares"), ("square shape", "square shapes")),
    "triangle": (("triangle", "triangles"), ("triangular shape", "triangular shapes")),
    "star": (("star", "stars"), ("five-pointed star", "five-pointed stars")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs"), ("plus shape", "plus shapes")),
    "ring": (("ring", "rings"), ("hollow circle", "hollow circles"), ("circle outline", "circle outlines")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "hexagon": (("hexagon", "hexagons"), ("hexagonal shape", "hexagonal shapes")),
    "pentagon": (("pentagon", "pentagons"), ("pentagonal shape", "pentagonal shapes")),
    "heart": (("heart", "hearts"), ("heart shape", "heart shapes")),
}
_SHAPES: tuple[str, ...] = tuple(_SHAPE_WORDS)

_SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big"),
}
# Object "radius" (fraction of the image side) per size; see _SHAPE_EXTENT for the true extent.
_SIZE_RADIUS: dict[str, tuple[float, float]] = {"small": (0.043, 0.05), "large": (0.074, 0.084)}

_REGIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
# Box (x0, y0, x1, y1), as fractions of the image side, for the *centres* of a group's objects:
# "left" means the centre is in the left third, "top" in the top third of the middle half, and so
# on; the boxes do not overlap. Objects must also lie wholly inside the image (margin below).
_REGION_BOX: dict[str, tuple[float, float, float, float]] = {
    "left": (0.0, 0.2, 0.33, 0.8),
    "right": (0.67, 0.2, 1.0, 0.8),
    "top": (0.25, 0.0, 0.75, 0.33),
    "bottom": (0.25, 0.67, 0.75, 1.0),
    "centre": (0.36, 0.36, 0.64, 0.64),
}
_IMAGE_MARGIN = 0.02
_REGION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side", "at the left", "in the left part of the image"),
    "right": ("on the right", "on the right side", "at the right", "in the right part of the image"),
    "top": ("at the top", "near the top", "in the upper part of the image", "along the top"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part of the image", "along the bottom"),
    "centre": ("in the centre", "in the center", "in the middle", "in the middle of the image"),
}

_BACKGROUNDS: dict[str, _RGB] = {
    "light grey": (200, 200, 200),
    "beige": (228, 214, 180),
    "pale blue": (178, 208, 235),
    "dark grey": (68, 68, 74),
    "pale green": (188, 225, 188),
    "navy": (25, 35, 82),
    "lavender": (212, 196, 236),
}
_BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "light grey": ("light grey", "light gray", "pale grey"),
    "beige": ("beige", "cream"),
    "pale blue": ("pale blue", "light blue", "sky-blue"),
    "dark grey": ("dark grey", "dark gray", "charcoal"),
    "pale green": ("pale green", "light green", "mint green"),
    "navy": ("navy", "navy blue", "dark blue"),
    "lavender": ("lavender", "pale purple"),
}
_TEXTURES: tuple[str, ...] = ("plain", "stripes", "dots", "gradient", "checkered")
_TEXTURE_PROBS = (0.4, 0.15, 0.15, 0.15, 0.15)

_MIN_CONTRAST = 145.0  # minimum RGB distance between an object colour and its background colour

# Allowed rotation (degrees, +-) per shape: enough to vary appearance, never enough to change what
# the shape would be called (a square at 45 degrees reads as a diamond, a cross as an "x").
_MAX_ROTATION: dict[str, float] = {
    "circle": 0.0, "ring": 0.0, "square": 22.0, "diamond": 18.0, "cross": 22.0, "heart": 30.0,
    "triangle": 180.0, "star": 180.0, "hexagon": 180.0, "pentagon": 180.0,
}

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                 8: "eight", 9: "nine"}


def _regular_polygon(n: int, radius: float, phase_deg: float = -90.0) -> np.ndarray:
    a = np.deg2rad(phase_deg) + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    a = np.deg2rad(-90.0) + np.pi * np.arange(2 * points) / points
    rad = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([rad * np.cos(a), rad * np.sin(a)], axis=1)


def _cross(arm: float, half_width: float) -> np.ndarray:
    a, w = arm, half_width
    return np.array([(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a),
                     (-w, w), (-a, w), (-a, -w), (-w, -w)], dtype=float)


def _heart(scale: float) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(0) + pts.min(0)) / 2  # centre the bounding box
    return pts * (scale / np.abs(pts).max())


# Unit outlines (object radius 1, image coordinates with y down), roughly area-matched so that
# "small" and "large" look alike across shapes. Circles and rings are drawn as ellipses.
_OUTLINES: dict[str, np.ndarray] = {
    "square": np.array([(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]),
    "triangle": _regular_polygon(3, 1.18, -90.0),
    "star": _star(5, 1.2, 0.5),
    "cross": _cross(1.08, 0.38),
    "diamond": np.array([(0.0, -1.15), (0.72, 0.0), (0.0, 1.15), (-0.72, 0.0)]),
    "hexagon": _regular_polygon(6, 1.0, 0.0),
    "pentagon": _regular_polygon(5, 1.05, -90.0),
    "heart": _heart(1.08),
}
_CIRCLE_RADIUS = 0.92
_RING_RADIUS, _RING_THICKNESS = 0.98, 0.3
# Radius of the disc that contains the shape (for spacing and keeping objects inside regions).
_SHAPE_EXTENT: dict[str, float] = {
    **{k: float(np.linalg.norm(v, axis=1).max()) for k, v in _OUTLINES.items()},
    "circle": _CIRCLE_RADIUS, "ring": _RING_RADIUS,
}


# --------------------------------------------------------------------------------------------
# Scene sampling
# --------------------------------------------------------------------------------------------

def _check_seed_idx(seed: int, idx: int) -> tuple[int, int]:
    for name, v in (("seed", seed), ("idx", idx)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, not {v!r}")
    return int(seed), int(idx)


def _rng(seed: int, idx: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, idx, stream])


def _colour_distance(a: Sequence[int], b: Sequence[int]) -> float:
    return float(math.dist(a, b))


_CONTRASTING: dict[str, tuple[str, ...]] = {
    bg: tuple(c for c, rgb in _COLOURS.items() if _colour_distance(rgb, bg_rgb) >= _MIN_CONTRAST)
    for bg, bg_rgb in _BACKGROUNDS.items()
}


def _pick(rng: np.random.Generator, options: Sequence, p: Sequence[float] | None = None):
    """One of ``options`` (uniform, or with probabilities ``p``); cheaper than ``rng.choice``."""
    if p is None:
        return options[int(rng.random() * len(options))]
    u, acc = rng.random(), 0.0
    for option, q in zip(options, p):
        acc += q
        if u < acc:
            return option
    return options[-1]


def _semantics(seed: int, idx: int) -> dict:
    """What the captions talk about: background and groups (shape, colour, size, count, region)."""
    rng = _rng(seed, idx, _STREAM_SEMANTICS)
    bg_colour = _pick(rng, tuple(_BACKGROUNDS))
    texture = _pick(rng, _TEXTURES, _TEXTURE_PROBS)
    n_groups = _pick(rng, (1, 2, 3), (0.25, 0.4, 0.35))
    regions = rng.permutation(len(_REGIONS))[:n_groups]
    colours = _CONTRASTING[bg_colour]
    groups, used = [], set()
    for r in regions:
        while True:  # distinct (shape, colour) per group; ~100 combinations, so this ends at once
            shape, colour = _pick(rng, _SHAPES), _pick(rng, colours)
            if (shape, colour) not in used:
                used.add((shape, colour))
                break
        groups.append({
            "shape": shape,
            "colour": colour,
            "size": _pick(rng, ("small", "large")),
            "count": _pick(rng, (1, 2, 3)),
            "region": _REGIONS[int(r)],
        })
    return {"background": {"colour": bg_colour, "texture": texture}, "groups": groups}


def _jitter_rgb(rng: np.random.Generator, rgb: Sequence[int], amount: int) -> list[int]:
    d = rng.integers(-amount, amount + 1, size=3)
    return [int(v) for v in np.clip(np.asarray(rgb) + d, 0, 255)]


def _shade(rgb: Sequence[int], delta: int) -> list[int]:
    return [int(min(255, max(0, v + delta))) for v in rgb]


def _background_params(rng: np.random.Generator, texture: str, rgb: Sequence[int]) -> dict:
    """Geometry of the background texture. Pattern contrast is low so it never looks like objects."""
    dark = sum(rgb) < 300
    delta = int(rng.integers(14, 26)) * (1 if dark else -1)
    if texture == "plain":
        return {}
    if texture == "gradient":
        return {"angle": float(rng.uniform(0, 360)), "delta": int(rng.integers(18, 32))}
    if texture == "stripes":
        return {"angle": float(_pick(rng, (0.0, 45.0, 90.0, 135.0)) + rng.uniform(-10, 10)),
                "period": float(rng.uniform(0.06, 0.12)), "duty": float(rng.uniform(0.35, 0.6)),
                "phase": float(rng.uniform(0, 1)), "rgb": _shade(rgb, delta)}
    if texture == "dots":
        return {"spacing": float(rng.uniform(0.07, 0.11)), "radius": float(rng.uniform(0.01, 0.018)),
                "offset": [float(rng.uniform(0, 1)), float(rng.uniform(0, 1))],
                "staggered": bool(rng.random() < 0.5), "rgb": _shade(rgb, delta)}
    if texture == "checkered":
        return {"cell": float(rng.uniform(0.09, 0.16)),
                "offset": [float(rng.uniform(0, 1)), float(rng.uniform(0, 1))], "rgb": _shade(rgb, delta)}
    raise AssertionError(texture)


_MIN_GAP = 0.005  # objects whose bounding discs are closer than this count as crowded
_COMFORT_GAP = 0.03  # clearance a placement aims for when there is room
_LAYOUT_ATTEMPTS = 10


def _place(rng: np.random.Generator, box: tuple[float, float, float, float], extent: float,
           placed: list[tuple[float, float, float]], n_candidates: int = 32) -> tuple[float, float, float]:
    """Position for a disc of radius ``extent`` with its centre in ``box`` and wholly in the image.

    Best-candidate sampling: ``n_candidates`` uniform candidates are scored by their clearance from
    the ``placed`` discs (x, y, radius), and the first whose clearance reaches
    ``min(_COMFORT_GAP, best clearance)`` wins. Unlike plain rejection sampling this packs crowded
    regions (three large objects) reliably, while in roomy regions the choice stays uniform.
    Returns (x, y, clearance); the clearance is negative if the discs overlap.
    """
    lo, hi = extent + _IMAGE_MARGIN, 1.0 - extent - _IMAGE_MARGIN
    x0, x1 = max(box[0], lo), min(box[2], hi)
    y0, y1 = max(box[1], lo), min(box[3], hi)
    cand = rng.random((n_candidates, 2)) * (x1 - x0, y1 - y0) + (x0, y0)
    if not placed:
        return float(cand[0, 0]), float(cand[0, 1]), math.inf
    p = np.asarray(placed)
    gap = (np.hypot(cand[:, None, 0] - p[None, :, 0], cand[:, None, 1] - p[None, :, 1])
           - p[None, :, 2] - extent).min(axis=1)
    i = int(np.argmax(gap >= min(_COMFORT_GAP, float(gap.max()))))
    return float(cand[i, 0]), float(cand[i, 1]), float(gap[i])


def _layout(rng: np.random.Generator, groups: list[dict]) -> tuple[list[dict], float]:
    """One attempt at placing every object; returns the groups with objects and the smallest gap."""
    # Most constrained first: the centre region (smallest box), then the groups taking most room.
    order = sorted(range(len(groups)), key=lambda i: (
        groups[i]["region"] != "centre", -groups[i]["count"] * _SIZE_RADIUS[groups[i]["size"]][0]))
    placed: list[tuple[float, float, float]] = []
    out = [dict(g) for g in groups]
    min_gap = math.inf
    for gi in order:
        g = out[gi]
        base_rgb = _jitter_rgb(rng, _COLOURS[g["colour"]], 14)
        r_group = float(rng.uniform(*_SIZE_RADIUS[g["size"]]))
        max_rot = _MAX_ROTATION[g["shape"]]
        g["outline"] = bool(rng.random() < 0.25) and g["shape"] != "ring"
        objects = []
        for _ in range(g["count"]):
            r = r_group * float(rng.uniform(0.94, 1.06))
            extent = r * _SHAPE_EXTENT[g["shape"]]
            x, y, gap = _place(rng, _REGION_BOX[g["region"]], extent, placed)
            min_gap = min(min_gap, gap)
            placed.append((x, y, extent))
            angle = float(rng.uniform(-max_rot, max_rot)) if max_rot else 0.0
            objects.append({"x": x, "y": y, "r": r, "angle": angle, "rgb": _jitter_rgb(rng, base_rgb, 6)})
        g["objects"] = objects
    return out, min_gap


def sample_scene(seed: int, idx: int) -> dict:
    """The full description of image ``idx``: semantics plus layout, clutter and photometrics.

    Coordinates and radii are fractions of the image side (so the scene renders at any size);
    the dict holds only plain Python values (JSON-serialisable). ``min_gap`` is the smallest
    clearance between the bounding discs of two objects (negative: they may touch or overlap;
    rare, since the layout is retried up to ``_LAYOUT_ATTEMPTS`` times).
    """
    seed, idx = _check_seed_idx(seed, idx)
    sem = _semantics(seed, idx)
    rng = _rng(seed, idx, _STREAM_LAYOUT)

    bg = sem["background"]
    bg_rgb = _jitter_rgb(rng, _BACKGROUNDS[bg["colour"]], 8)
    background = {**bg, "rgb": bg_rgb, "params": _background_params(rng, bg["texture"], bg_rgb)}

    groups, min_gap = _layout(rng, sem["groups"])
    for _ in range(_LAYOUT_ATTEMPTS - 1):
        if min_gap >= _MIN_GAP:
            break
        again, gap = _layout(rng, sem["groups"])
        if gap > min_gap:
            groups, min_gap = again, gap
    placed = [(o["x"], o["y"], o["r"] * _SHAPE_EXTENT[g["shape"]]) for g in groups for o in g["objects"]]

    clutter = []
    if rng.random() < 0.4:
        for _ in range(int(rng.integers(1, 4))):
            kind = _pick(rng, ("speck", "stroke"))
            size = float(rng.uniform(0.008, 0.014)) if kind == "speck" else float(rng.uniform(0.02, 0.035))
            x, y, gap = _place(rng, (0.0, 0.0, 1.0, 1.0), size, placed, n_candidates=16)
            if gap < 0.02:
                continue  # clutter is optional: never let it touch an object
            placed.append((x, y, size))
            grey = int(rng.integers(70, 190))
            clutter.append({"kind": kind, "x": x, "y": y, "size": size,
                            "angle": float(rng.uniform(0, 180)),
                            "width": float(rng.uniform(0.004, 0.008)),
                            "rgb": _jitter_rgb(rng, (grey, grey, grey), 18)})

    photometric = {"gain": float(rng.uniform(0.9, 1.1)), "bias": float(rng.uniform(-10, 10)),
                   "noise_sigma": float(rng.uniform(2.0, 6.0))}
    return {"seed": seed, "idx": idx, "version": GENERATOR_VERSION, "background": background,
            "groups": groups, "clutter": clutter, "photometric": photometric,
            "min_gap": min_gap if math.isfinite(min_gap) else 1.0}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_NOISE_BANK_MIN = 512


@lru_cache(maxsize=4)
def _noise_bank(side: int) -> np.ndarray:
    """Fixed standard-normal samples (side x side x 3). ``side`` depends only on the output size,
    so an image's noise never depends on which other sizes were rendered earlier."""
    rng = np.random.default_rng([0x5EED, side])
    bank = rng.standard_normal((side, side, 3), dtype=np.float32)
    bank.flags.writeable = False
    return bank


def _draw_background(bg: dict, s: int) -> Image.Image:
    rgb, p, texture = tuple(bg["rgb"]), bg["params"], bg["texture"]
    if texture == "gradient":
        # Linear ramp from lighter to darker along a random direction, computed on a coarse grid
        # (a ramp is exactly representable by bilinear upsampling) and resized.
        n = 16
        u = (np.arange(n) + 0.5) / n - 0.5
        a = np.deg2rad(p["angle"])
        t = (np.cos(a) * u[None, :] + np.sin(a) * u[:, None]) / (abs(np.cos(a)) + abs(np.sin(a))) * 2
        ramp = np.asarray(rgb, float)[None, None, :] + p["delta"] * t[..., None]
        small = Image.fromarray(np.clip(ramp, 0, 255).astype(np.uint8), "RGB")
        # Interpolate to the output resolution, then replicate to the drawing resolution: the
        # ramp is smooth, and upsampling straight to 2x costs five times as much.
        out = s // _SUPERSAMPLE
        return small.resize((out, out), Image.BILINEAR).resize((s, s), Image.NEAREST)
    img = Image.new("RGB", (s, s), rgb)
    if texture == "plain":
        return img
    draw = ImageDraw.Draw(img)
    pat = tuple(p["rgb"])
    if texture == "stripes":
        period = p["period"] * s
        a = math.radians(p["angle"])
        nx, ny = math.cos(a), math.sin(a)  # stripe normal
        dx, dy = -ny * 2 * s, nx * 2 * s  # along the stripe, long enough to cross the image
        c = s / 2
        k0 = int(-s / period) - 1
        for k in range(k0, -k0 + 1):
            off = (k + p["phase"]) * period
            cx, cy = c + nx * off, c + ny * off
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=pat,
                      width=max(1, round(period * p["duty"])))
    elif texture == "dots":
        sp, rad = p["spacing"] * s, p["radius"] * s
        ox, oy = p["offset"][0] * sp, p["offset"][1] * sp
        for row in range(-1, int(s / sp) + 2):
            shift = sp / 2 if (p["staggered"] and row % 2) else 0.0
            y = oy + row * sp
            for col in range(-1, int(s / sp) + 2):
                x = ox + shift + col * sp
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=pat)
    elif texture == "checkered":
        cell = p["cell"] * s
        ox, oy = p["offset"][0] * cell, p["offset"][1] * cell
        for row in range(-1, int(s / cell) + 2):
            for col in range(-1, int(s / cell) + 2):
                if (row + col) % 2 == 0:
                    x, y = ox + col * cell, oy + row * cell
                    draw.rectangle([x, y, x + cell, y + cell], fill=pat)
    return img


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, obj: dict, outline: bool, s: int) -> None:
    cx, cy, r = obj["x"] * s, obj["y"] * s, obj["r"] * s
    fill = tuple(obj["rgb"])
    line = tuple(int(v * 0.55) for v in fill) if outline else None
    lw = max(1, round(0.1 * r)) if outline else 0
    if shape == "circle":
        rr = _CIRCLE_RADIUS * r
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=fill, outline=line, width=lw)
    elif shape == "ring":
        rr = _RING_RADIUS * r
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], outline=fill,
                     width=max(1, round(_RING_THICKNESS * r)))
    else:
        a = math.radians(obj["angle"])
        ca, sa = math.cos(a), math.sin(a)
        pts = [(cx + r * (ca * x - sa * y), cy + r * (sa * x + ca * y)) for x, y in _OUTLINES[shape].tolist()]
        draw.polygon(pts, fill=fill, outline=line, width=lw)


def _draw_clutter(draw: ImageDraw.ImageDraw, item: dict, s: int) -> None:
    cx, cy, size, fill = item["x"] * s, item["y"] * s, item["size"] * s, tuple(item["rgb"])
    if item["kind"] == "speck":
        draw.ellipse([cx - size, cy - size, cx + size, cy + size], fill=fill)
    else:
        a = math.radians(item["angle"])
        dx, dy = math.cos(a) * size, math.sin(a) * size
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fill,
                  width=max(1, round(item["width"] * s)))


def _render_scene(scene: dict, size: int) -> Image.Image:
    s = size * _SUPERSAMPLE
    img = _draw_background(scene["background"], s)
    draw = ImageDraw.Draw(img)
    for item in scene["clutter"]:
        _draw_clutter(draw, item, s)
    for g in scene["groups"]:
        for obj in g["objects"]:
            _draw_object(draw, g["shape"], obj, g["outline"], s)
    img = img.reduce(_SUPERSAMPLE)

    # Photometric nuisance: exposure as a lookup table, then Gaussian pixel noise. The noise is a
    # window (random offset and flips, from the image's own noise stream) of a fixed bank of
    # Gaussian samples: drawing 150k fresh normals per image would cost more than all the drawing.
    ph = scene["photometric"]
    gain, bias = ph["gain"], ph["bias"]
    img = img.point([min(255, max(0, round(v * gain + bias))) for v in range(256)] * 3)
    bank = _noise_bank(max(_NOISE_BANK_MIN, size + 128))
    rng = _rng(scene["seed"], scene["idx"], _STREAM_NOISE)
    oy, ox = (int(v) for v in rng.integers(0, bank.shape[0] - size + 1, size=2))
    flip_y, flip_x = (-1 if f else 1 for f in rng.random(2) < 0.5)
    noise = bank[oy:oy + size, ox:ox + size][::flip_y, ::flip_x]
    arr = np.asarray(img, dtype=np.float32)
    arr += noise * np.float32(ph["noise_sigma"])
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def render(seed: int, idx: int, size: int = 224) -> Image.Image:
    """Image ``idx`` of the dataset with this seed, as an RGB ``size`` x ``size`` image."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an integer >= 8, not {size!r}")
    return _render_scene(sample_scene(seed, idx), int(size))


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

def _article(word: str) -> str:
    """'a' or 'an' for the phrase starting with ``word`` (by sound for the words used here)."""
    w = word.lower()
    if w.startswith(("uni", "use", "one")):  # "a uniform ...", "a one-..."
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


def _join(items: Sequence[str], rng: np.random.Generator) -> str:
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    comma = "," if rng.random() < 0.3 else ""  # Oxford comma, sometimes
    return ", ".join(items[:-1]) + f"{comma} and {items[-1]}"


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass
class _Mention:
    """A noun phrase for one group, whether it takes a plural verb, and its position phrase."""
    text: str
    plural: bool
    position: str | None

    def with_position(self) -> str:
        return f"{self.text} {self.position}" if self.position else self.text


class _CaptionWriter:
    """Words one image's semantics in varied ways; every choice is drawn from ``rng``."""

    def __init__(self, sem: dict, rng: np.random.Generator):
        self.sem, self.rng = sem, rng

    # -- words --------------------------------------------------------------------------------
    def _syn(self, options: Sequence, p_first: float = 0.5):
        """A synonym; the canonical (first) one with probability ``p_first``."""
        if len(options) == 1 or self.rng.random() < p_first:
            return options[0]
        return options[1 + int(self.rng.random() * (len(options) - 1))]

    def _number(self, n: int) -> str:
        return str(n) if self.rng.random() < 0.25 else _NUMBER_WORDS[n]

    def mention(self, g: dict, *, size: float = 0.65, position: float = 0.75, exact_count: float = 0.85,
                definite: bool = False) -> _Mention:
        """Noun phrase for group ``g``; ``size``/``position``/``exact_count`` are the probabilities
        of stating those details (the colour and shape are always stated)."""
        words = []
        if self.rng.random() < size:
            words.append(self._syn(_SIZE_WORDS[g["size"]]))
        words.append(self._syn(_COLOUR_WORDS[g["colour"]]))
        singular, plural = self._syn(_SHAPE_WORDS[g["shape"]])
        n = g["count"]
        words.append(plural if n > 1 else singular)
        body = " ".join(words)
        if definite:
            det = "the" if n == 1 or self.rng.random() > exact_count else f"the {self._number(n)}"
        elif n == 1:
            det = self._syn((_article(body), "one", "a single"), p_first=0.75)
        elif self.rng.random() > exact_count:
            det = ""  # bare plural ("red stars"): true, just less specific
        elif n == 2 and self.rng.random() < 0.15:
            det = "a pair of"
        else:
            det = self._number(n)
        pos = self._syn(_REGION_WORDS[g["region"]], p_first=0.4) if self.rng.random() < position else None
        # "a pair of" takes a singular verb ("there is a pair of ..."); the noun stays plural.
        return _Mention(f"{det} {body}".strip(), n > 1 and det != "a pair of", pos)

    def mentions(self, **kw) -> list[_Mention]:
        groups = self.sem["groups"]
        return [self.mention(groups[int(i)], **kw) for i in self.rng.permutation(len(groups))]

    def background_np(self, p_texture: float = 0.8) -> str:
        """E.g. 'a plain beige background', 'a cream backdrop with stripes'."""
        bg = self.sem["background"]
        colour = self._syn(_BACKGROUND_WORDS[bg["colour"]])
        noun = self._syn(("background", "backdrop"), p_first=0.75)
        texture = bg["texture"] if self.rng.random() < p_texture else None
        before, mid, after = "", "", ""  # before the colour, between colour and noun, after the noun
        if texture == "plain":
            before = self._syn(("plain", "solid", "uniform"))
        elif texture == "stripes":
            if self.rng.random() < 0.5:
                before = "striped"
            else:
                after = "with stripes"
        elif texture == "dots":
            if self.rng.random() < 0.5:
                before = self._syn(("dotted", "polka-dot"))
            else:
                after = "with dots"
        elif texture == "gradient":
            if self.rng.random() < 0.5:
                mid = "gradient"
            else:
                before = "softly shaded"
        elif texture == "checkered":
            before = self._syn(("checkered", "chequered"))
        words = " ".join(w for w in (before, colour, mid, noun, after) if w)
        return f"{_article(words)} {words}"

    def background_sentence(self) -> str:
        bg = self.sem["background"]
        colour = self._syn(_BACKGROUND_WORDS[bg["colour"]])
        noun = self._syn(("background", "backdrop"), p_first=0.75)
        texture = bg["texture"]
        if texture == "stripes":
            desc = f"{colour} with stripes"
        elif texture == "dots":
            desc = f"{colour} with dots"
        elif texture == "gradient":
            desc = f"a {colour} gradient" if self.rng.random() < 0.5 else f"{colour}, lighter on one side"
        elif texture == "checkered":
            desc = f"a {colour} checkerboard"
        else:
            desc = colour
        return f"The {noun} is {desc}."

    # -- templates ----------------------------------------------------------------------------
    def t_list_on_background(self) -> str:
        ms = self.mentions()
        return _capitalise(f"{_join([m.with_position() for m in ms], self.rng)}, "
                           f"{self._syn(('on', 'against', 'set against'))} {self.background_np()}.")

    def t_there_is(self) -> str:
        ms = self.mentions()
        verb = "are" if ms[0].plural else "is"
        text = f"There {verb} {_join([m.with_position() for m in ms], self.rng)}."
        if self.rng.random() < 0.5:
            text += " " + self.background_sentence()
        return text

    def t_image_of(self) -> str:
        head = self._syn(("an image of", "a picture of", "a drawing of", "an illustration showing",
                          "a rendering of"), p_first=0.3)
        text = f"{head} {_join([m.with_position() for m in self.mentions()], self.rng)}"
        if self.rng.random() < 0.4:
            text += f" on {self.background_np()}"
        return _capitalise(text + ".")

    def t_position_first(self) -> str:
        parts = []
        for m in self.mentions(position=1.0):
            if self.rng.random() < 0.5:
                parts.append(f"{m.position} there {'are' if m.plural else 'is'} {m.text}")
            else:
                parts.append(f"{m.position} {'are' if m.plural else 'is'} {m.text}")
        sep = self._syn(("; ", ". "))
        return sep.join(_capitalise(p) if sep == ". " or i == 0 else p for i, p in enumerate(parts)) + "."

    def t_background_first(self) -> str:
        ms = self.mentions()
        return _capitalise(f"{self.background_np(p_texture=0.9)} with "
                           f"{_join([m.with_position() for m in ms], self.rng)}.")

    def t_total(self) -> str:
        ms = self.mentions(exact_count=1.0)
        total = sum(g["count"] for g in self.sem["groups"])
        # "shapes", not "objects": the unmentioned clutter specks are objects too.
        if total == 1:
            head = self._syn(("just one shape", "a single shape"))
        else:
            head = f"{self._number(total)} shapes {self._syn(('in total', 'altogether'))}"
        return _capitalise(f"{head}: {_join([m.with_position() for m in ms], self.rng)}.")

    def t_where(self) -> str:
        ms = self.mentions(position=1.0, definite=True)
        parts = [f"{m.text} {'are' if m.plural else 'is'} {m.position}" for m in ms]
        text = _capitalise(_join(parts, self.rng) if len(parts) < 3 else "; ".join(parts))
        if self.rng.random() < 0.3:
            text += f", all on {self.background_np()}"
        return text + "."

    def t_short(self) -> str:
        ms = self.mentions(size=0.35, position=0.0, exact_count=0.5)
        text = _join([m.text for m in ms], self.rng)
        if self.rng.random() < 0.5:
            text += f" on {self._syn(_BACKGROUND_WORDS[self.sem['background']['colour']])}"
        return _capitalise(text + ".")

    def t_focus(self) -> str:
        """One group in detail, the rest summarised (only used when there are several groups)."""
        groups = self.sem["groups"]
        g = _pick(self.rng, groups)
        m = self.mention(g, size=0.9, position=0.9)
        others = sum(h["count"] for h in groups) - g["count"]
        if others == 1:
            rest = self._syn(("and one other shape", "next to another shape"))
        else:
            rest = self._syn(("among other shapes", "along with some other shapes",
                              f"and {self._number(others)} other shapes"))
        return _capitalise(f"{m.with_position()}, {rest}.")

    def write(self) -> list[str]:
        templates = [self.t_list_on_background, self.t_there_is, self.t_image_of, self.t_position_first,
                     self.t_background_first, self.t_total, self.t_where, self.t_short]
        if len(self.sem["groups"]) > 1:
            templates.append(self.t_focus)
        out: list[str] = []
        for i in self.rng.permutation(len(templates)):
            text = re.sub(r"\s+", " ", templates[int(i)]()).strip()
            if text not in out:
                out.append(text)
            if len(out) == _N_CAPTIONS:
                return out
        raise AssertionError("caption templates produced duplicates")  # templates differ in wording


def captions(seed: int, idx: int) -> list[str]:
    """Exactly five differently worded captions, all true of ``render(seed, idx)``."""
    seed, idx = _check_seed_idx(seed, idx)
    return _CaptionWriter(_semantics(seed, idx), _rng(seed, idx, _STREAM_CAPTIONS)).write()


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------

_REF = re.compile(r"^proc:(\d+):(\d+)$")


def _ref(seed: int, idx: int) -> str:
    return f"proc:{seed}:{idx}"


def _load_image(ref: str) -> Image.Image:
    """Render the image that a ``"proc:<seed>:<idx>"`` reference names (224 x 224 RGB).

    A module-level function (not a closure) so that datasets pickle into worker processes.
    """
    m = _REF.match(ref) if isinstance(ref, str) else None
    if m is None:
        raise BenchError(f"not a procedural image reference (expected 'proc:<seed>:<idx>'): {ref!r}")
    return render(int(m.group(1)), int(m.group(2)))


def build(seed: int = 0, n_train: int = 8000, n_val: int = 1000, n_test: int = 1000) -> CaptionDataset:
    """The procedural dataset: captions are generated now, pixels only when ``load_image`` is called."""
    seed, _ = _check_seed_idx(seed, 0)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= _SPLIT_CAPACITY:
            raise BenchError(f"procedural n_{split} must be an integer in [0, {_SPLIT_CAPACITY}], not {n!r}")
    splits = {}
    for split, n in sizes.items():
        start = _SPLIT_OFFSETS[split]
        splits[split] = make_split([(_ref(seed, i), captions(seed, i)) for i in range(start, start + int(n))])
    return CaptionDataset(
        name="synthetic",
        splits=splits,
        identity=identity_hash("procedural", GENERATOR_VERSION, seed, int(n_train), int(n_val), int(n_test)),
        load_image=_load_image,
    )

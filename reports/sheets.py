"""Contact sheets: a picture of a distilled set, one tile per pair.

Each tile shows two images side by side (left: the real image the pair started from; right: the
set's own image when it is pixels, else the real train image nearest its image feature) and,
underneath, the real train caption nearest its text feature. The harness gathers the tiles
(``bench.runner.contact_sheets``); this module only draws them, with PIL.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

THUMB = 112  # pixels per image in a tile
COLUMNS = 4
TEXT_LINES = 4


@dataclass
class Tile:
    left: np.ndarray  # uint8 [H, W, 3]: the initial real image
    right: np.ndarray  # uint8 [H, W, 3]: the synthetic image, or the nearest real one
    caption: str  # the nearest real caption to the synthetic text feature
    label: str = ""  # e.g. "pair 3"


def _thumb(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(a, dtype=np.uint8)).convert("RGB").resize((THUMB, THUMB), Image.BILINEAR)


def draw_sheet(tiles: list[Tile], path: Path, title: str, right_label: str) -> Path:
    """Write ``tiles`` as a PNG grid at ``path``; ``right_label`` names what the right image is."""
    font = ImageFont.load_default()
    line_h, pad = 12, 6
    tile_w, tile_h = 2 * THUMB + 3 * pad, THUMB + (TEXT_LINES + 1) * line_h + 2 * pad
    rows = max(1, -(-len(tiles) // COLUMNS))
    head = 2 * line_h + 2 * pad
    sheet = Image.new("RGB", (COLUMNS * tile_w, head + rows * tile_h), "white")
    d = ImageDraw.Draw(sheet)
    d.text((pad, pad), title, fill="black", font=font)
    d.text((pad, pad + line_h), f"each tile: initial real image | {right_label}; below: nearest real caption to the "
           "synthetic text", fill="dimgray", font=font)
    width = max(8, (tile_w - 2 * pad) // 6)  # characters per caption line at the default font
    for k, t in enumerate(tiles):
        x, y = (k % COLUMNS) * tile_w, head + (k // COLUMNS) * tile_h
        sheet.paste(_thumb(t.left), (x + pad, y + pad))
        sheet.paste(_thumb(t.right), (x + 2 * pad + THUMB, y + pad))
        lines = ([t.label] if t.label else []) + textwrap.wrap(t.caption, width)
        for i, line in enumerate(lines[:TEXT_LINES + 1]):
            d.text((x + pad, y + pad + THUMB + 2 + i * line_h), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path

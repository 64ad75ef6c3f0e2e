"""Before/after figures of patch-norm and CLS-attention maps, drawn with PIL alone."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

# Anchor colours of a perceptually ordered dark-blue -> teal -> yellow colour map.
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def colorize(values: torch.Tensor, low: float, high: float, size: int) -> Image.Image:
    """A [rows, cols] map as a ``size`` x ``size`` RGB tile, ``low``..``high`` spanning the colour map."""
    scaled = ((values.float().numpy() - low) / max(high - low, 1e-12)).clip(0, 1) * (len(_ANCHORS) - 1)
    lower = np.floor(scaled).astype(int).clip(0, len(_ANCHORS) - 2)
    weight = (scaled - lower)[..., None]
    rgb = (_ANCHORS[lower] * (1 - weight) + _ANCHORS[lower + 1] * weight).astype(np.uint8)
    return Image.fromarray(rgb).resize((size, size), Image.NEAREST)


def save_comparison(path: str | os.PathLike, images: list[Image.Image], columns: dict[str, torch.Tensor],
                    tile: int = 160) -> Path:
    """Save a grid: one row per image, the image then one colour map per named column.

    Args:
        images: the input images (RGB), one per row.
        columns: ``{title: maps [N, rows, cols]}``. Columns whose titles share the part
            before " (" share one colour scale, so "norms (before)" and "norms (after)"
            are directly comparable.
    """
    rows = min(len(images), *(len(maps) for maps in columns.values()))
    scales: dict[str, tuple[float, float]] = {}
    for title, maps in columns.items():
        key = title.split(" (")[0]
        low, high = scales.get(key, (float("inf"), float("-inf")))
        scales[key] = (min(low, float(maps[:rows].min())), max(high, float(maps[:rows].max())))
    header = 18
    canvas = Image.new("RGB", ((1 + len(columns)) * tile, header + rows * tile), "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(["image", *columns]):
        draw.text((column * tile + 4, 3), title, fill="black")
    for row in range(rows):
        top = header + row * tile
        canvas.paste(ImageOps.fit(images[row].convert("RGB"), (tile, tile)), (0, top))
        for column, (title, maps) in enumerate(columns.items(), start=1):
            canvas.paste(colorize(maps[row], *scales[title.split(" (")[0]], size=tile), (column * tile, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path

"""Before/after figures of patch-norm and CLS-attention maps, drawn with PIL alone."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..errors import InvalidArgumentError

# Anchor colours of a perceptually ordered dark-blue -> teal -> yellow colour map.
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)

MARGIN = 12        # around the figure
GAP = 8            # between tiles
FONT_SIZE = 14
BAR_HEIGHT = 12    # colour bars


Box = tuple[int, int, int, int]   # left, top, right, bottom


@dataclass
class FigureLayout:
    """Where everything went: boxes in pixels, for checking a figure without reading its pixels."""

    size: tuple[int, int]
    tiles: dict[tuple[int, int], Box] = field(default_factory=dict)   # (row, column) -> box; column 0 is the image
    titles: dict[int, list[str]] = field(default_factory=dict)         # column -> title lines
    colour_bars: dict[str, Box] = field(default_factory=dict)          # scale name -> bar box
    scales: dict[str, tuple[float, float]] = field(default_factory=dict)


def colorize(values: torch.Tensor, low: float, high: float, size: int) -> Image.Image:
    """A [rows, cols] map as a ``size`` x ``size`` RGB tile, ``low``..``high`` spanning the colour map."""
    return _colour_image(values.float().numpy(), low, high).resize((size, size), Image.NEAREST)


def _colour_image(values: np.ndarray, low: float, high: float) -> Image.Image:
    scaled = ((values - low) / max(high - low, 1e-12)).clip(0, 1) * (len(_ANCHORS) - 1)
    lower = np.floor(scaled).astype(int).clip(0, len(_ANCHORS) - 2)
    weight = (scaled - lower)[..., None]
    return Image.fromarray((_ANCHORS[lower] * (1 - weight) + _ANCHORS[lower + 1] * weight).astype(np.uint8))


def _scale_name(title: str) -> str:
    """Columns titled ``"NAME (WHEN)"`` share the colour scale ``NAME``."""
    return title.split(" (")[0]


def _title_lines(title: str) -> list[str]:
    name, _, when = title.partition(" (")
    return [name, when.rstrip(")")] if when else [name]


def _number(value: float, span: float) -> str:
    """A colour-bar label; values tiny against the bar's span read as 0."""
    if abs(value) < 1e-4 * span:
        return "0"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def save_comparison(path: str | os.PathLike, images: list[Image.Image], columns: dict[str, torch.Tensor],
                    tile: int = 160) -> FigureLayout:
    """Save a grid: one row per image, the image then one colour map per named column.

    Args:
        images: the input images (RGB), one per row.
        columns: ``{title: maps [N, rows, cols]}``. Columns titled ``"NAME (WHEN)"`` (e.g.
            ``"patch norm, layer 11 (before)"``) share the colour scale ``NAME``, shown by one
            colour bar with its values under those columns, so before and after compare directly.
        tile: the side of each square tile in pixels.

    Returns:
        The :class:`FigureLayout` of the saved PNG.
    """
    rows = min(len(images), *(len(maps) for maps in columns.values()))
    if rows == 0:
        raise InvalidArgumentError("save_comparison needs at least one image and one map per column")
    font = ImageFont.load_default(size=FONT_SIZE)
    line = FONT_SIZE + 4
    scales: dict[str, tuple[float, float]] = {}
    members: dict[str, list[int]] = {}
    for column, (title, maps) in enumerate(columns.items(), start=1):
        name = _scale_name(title)
        low, high = scales.get(name, (float("inf"), float("-inf")))
        scales[name] = (min(low, float(maps[:rows].min())), max(high, float(maps[:rows].max())))
        members.setdefault(name, []).append(column)

    titles = {0: ["image"], **{column: _title_lines(title) for column, title in enumerate(columns, start=1)}}
    header = max(len(lines) for lines in titles.values()) * line + GAP
    grid_top = MARGIN + header
    grid_bottom = grid_top + rows * tile + (rows - 1) * GAP
    bars_top = grid_bottom + 2 * GAP
    width = 2 * MARGIN + (1 + len(columns)) * tile + len(columns) * GAP
    height = bars_top + BAR_HEIGHT + 4 + line + MARGIN
    layout = FigureLayout(size=(width, height), titles=titles, scales=scales)
    left_of = lambda column: MARGIN + column * (tile + GAP)  # noqa: E731

    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for column, lines in titles.items():
        for index, text in enumerate(lines):
            draw.text((left_of(column) + tile // 2, MARGIN + index * line), text, fill="black", font=font, anchor="ma")
    for row in range(rows):
        top = grid_top + row * (tile + GAP)
        panels = [ImageOps.fit(images[row].convert("RGB"), (tile, tile))]
        panels += [colorize(maps[row], *scales[_scale_name(title)], size=tile) for title, maps in columns.items()]
        for column, panel in enumerate(panels):
            canvas.paste(panel, (left_of(column), top))
            layout.tiles[(row, column)] = (left_of(column), top, left_of(column) + tile, top + tile)

    for name, group in members.items():
        left, right = left_of(min(group)), left_of(max(group)) + tile
        gradient = np.linspace(0.0, 1.0, right - left)[None, :].repeat(BAR_HEIGHT, axis=0)
        canvas.paste(_colour_image(gradient, 0.0, 1.0), (left, bars_top))
        draw.rectangle((left, bars_top, right - 1, bars_top + BAR_HEIGHT - 1), outline="black")
        low, high = scales[name]
        labels_top = bars_top + BAR_HEIGHT + 4
        span = high - low
        draw.text((left, labels_top), _number(low, span), fill="black", font=font, anchor="la")
        draw.text(((left + right) // 2, labels_top), _number((low + high) / 2, span), fill="black", font=font,
                  anchor="ma")
        draw.text((right, labels_top), _number(high, span), fill="black", font=font, anchor="ra")
        layout.colour_bars[name] = (left, bars_top, right, bars_top + BAR_HEIGHT)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return layout

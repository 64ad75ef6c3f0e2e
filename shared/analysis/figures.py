"""The figure system: every figure is a matplotlib ``Figure`` on its own Agg canvas, never pyplot's.

:func:`new_figure` makes the canvas every figure of the library is drawn on (the pages of
:mod:`~test_time_registers.analysis.visualize`, evaluation's object-discovery figure, and the
before/after grid of ``find-register-neurons --figure``, :func:`save_comparison`). Nothing
global is touched, so there is nothing to close and nothing leaks between figures. Maps use one
colour map, :data:`COLOUR_MAP`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import InvalidArgumentError, MissingDependencyError
from ..files import write_atomically

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLOUR_MAP = "viridis"
INSTALL_HINT = 'pip install "test-time-registers[viz]"'



def require_matplotlib() -> None:
    """Raise :class:`MissingDependencyError`, saying how to install it, unless matplotlib can be imported."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError as error:
        raise MissingDependencyError(f"figures need matplotlib, which is not installed ({error}); "
                                     f"install it with: {INSTALL_HINT}") from None


def new_figure(width: float, height: float, *, dpi: float = 100, layout: str | None = "constrained") -> "Figure":
    """A figure of ``width`` x ``height`` inches on its own Agg canvas, outside pyplot."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(figure)
    return figure


# ---- the before/after grid of find-register-neurons --figure ------------------------------------
MARGIN = 12        # pixels around the figure
GAP = 8            # pixels between tiles
FONT_SIZE = 14     # pixels
BAR_HEIGHT = 12    # pixels, the colour bars
DPI = 100

Box = tuple[int, int, int, int]   # left, top, right, bottom, in pixels from the top left


@dataclass
class FigureLayout:
    """Where everything went, measured on the drawn figure: boxes in pixels from its top left corner.

    ``tiles`` maps (row, column) to a panel's box (column 0 is the image); ``titles`` the column
    titles' lines; ``colour_bars`` each colour scale's bar; ``scales`` each scale's (low, high).
    ``figure`` is the matplotlib figure itself.
    """

    size: tuple[int, int]
    tiles: dict[tuple[int, int], Box] = field(default_factory=dict)
    titles: dict[int, list[str]] = field(default_factory=dict)
    colour_bars: dict[str, Box] = field(default_factory=dict)
    scales: dict[str, tuple[float, float]] = field(default_factory=dict)
    figure: "Figure | None" = field(default=None, repr=False)


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
        tile: the side of each square panel in pixels.

    Returns:
        The :class:`FigureLayout` of the saved PNG, measured on the drawn figure.
    """
    rows = min(len(images), *(len(maps) for maps in columns.values()))
    if rows == 0:
        raise InvalidArgumentError("save_comparison needs at least one image and one map per column")
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

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
    points = FONT_SIZE * 72 / DPI   # the font size in points that is FONT_SIZE pixels

    figure = new_figure(width / DPI, height / DPI, dpi=DPI, layout=None)
    figure.patch.set_facecolor("white")

    def axes_at(left: float, top: float, box_width: float, box_height: float, label: str):
        """Axes whose box is given in pixels from the top left corner."""
        return figure.add_axes((left / width, 1 - (top + box_height) / height, box_width / width,
                                box_height / height), label=label)

    left_of = lambda column: MARGIN + column * (tile + GAP)  # noqa: E731
    title_artists = {column: figure.text((left_of(column) + tile / 2) / width, 1 - MARGIN / height,
                                         "\n".join(lines), ha="center", va="top", fontsize=points, linespacing=1.15)
                     for column, lines in titles.items()}
    panels = {}
    for row in range(rows):
        top = grid_top + row * (tile + GAP)
        ax = axes_at(left_of(0), top, tile, tile, f"image row={row}")
        ax.imshow(np.asarray(ImageOps.fit(images[row].convert("RGB"), (tile, tile))), aspect="auto",
                  interpolation="nearest")
        panels[(row, 0)] = ax
        for column, (title, maps) in enumerate(columns.items(), start=1):
            low, high = scales[_scale_name(title)]
            ax = axes_at(left_of(column), top, tile, tile, f"map row={row} column={column}")
            ax.imshow(maps[row].float().numpy(), cmap=COLOUR_MAP, vmin=low, vmax=high, aspect="auto",
                      interpolation="nearest")
            panels[(row, column)] = ax
    for ax in panels.values():
        ax.set_axis_off()

    bars = {}
    for name, group in members.items():
        left, right = left_of(min(group)), left_of(max(group)) + tile
        low, high = scales[name]
        cax = axes_at(left, bars_top, right - left, BAR_HEIGHT, f"colour bar {name}")
        bar = figure.colorbar(ScalarMappable(Normalize(low, high), COLOUR_MAP), cax=cax, orientation="horizontal")
        span = high - low
        ticks = [low, (low + high) / 2, high]
        bar.set_ticks(ticks, labels=[_number(value, span) for value in ticks])
        bar.ax.tick_params(labelsize=points, length=0, pad=4)
        for label, align in zip(bar.ax.get_xticklabels(), ("left", "center", "right")):
            label.set_horizontalalignment(align)
        bar.outline.set_edgecolor("black")
        bars[name] = cax

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=DPI, format="png"))

    def box(ax) -> Box:
        extent = ax.get_window_extent()
        return round(extent.x0), round(height - extent.y1), round(extent.x1), round(height - extent.y0)

    return FigureLayout(size=tuple(int(value) for value in figure.canvas.get_width_height()),
                        tiles={key: box(ax) for key, ax in panels.items()},
                        titles={column: text.get_text().split("\n") for column, text in title_artists.items()},
                        colour_bars={name: box(ax) for name, ax in bars.items()}, scales=scales, figure=figure)

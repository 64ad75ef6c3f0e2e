"""The before/after figure of find-register-neurons --figure: a matplotlib figure whose panels, gaps, titles,
colour scales and colour bars are measured on the drawn figure (not its pixels)."""

import itertools

import torch
from PIL import Image

from test_time_registers.analysis.figures import GAP, save_comparison


def test_the_figure_has_separated_tiles_titled_maps_and_a_colour_bar_per_kind_of_map(tmp_path):
    rows, tile = 3, 96
    maps = lambda scale: scale * torch.rand(rows, 4, 4, generator=torch.Generator().manual_seed(int(scale)))  # noqa: E731
    columns = {"patch norm, layer 11 (before)": maps(300), "patch norm, layer 11 (after)": maps(20),
               "CLS attention, layer 11 (before)": maps(1), "CLS attention, layer 11 (after)": maps(1)}
    images = [Image.new("RGB", (50, 40), "gray")] * rows
    layout = save_comparison(tmp_path / "figure.png", images, columns, tile=tile)

    assert Image.open(tmp_path / "figure.png").size == layout.size
    assert sorted(layout.tiles) == [(row, column) for row in range(rows) for column in range(5)]
    for left, top, right, bottom in layout.tiles.values():
        assert (right - left, bottom - top) == (tile, tile)
    for (a, box_a), (b, box_b) in itertools.combinations(layout.tiles.items(), 2):
        apart_x = max(box_a[0], box_b[0]) - min(box_a[2], box_b[2])
        apart_y = max(box_a[1], box_b[1]) - min(box_a[3], box_b[3])
        assert max(apart_x, apart_y) >= GAP, (a, b)            # a gap between every two tiles
    assert layout.titles[1] == ["patch norm, layer 11", "before"]
    assert layout.titles[4] == ["CLS attention, layer 11", "after"]
    assert set(layout.colour_bars) == {"patch norm, layer 11", "CLS attention, layer 11"}
    norm_bar, attention_bar = layout.colour_bars["patch norm, layer 11"], layout.colour_bars["CLS attention, layer 11"]
    assert (norm_bar[0], norm_bar[2]) == (layout.tiles[(0, 1)][0], layout.tiles[(0, 2)][2])   # under its columns
    assert (attention_bar[0], attention_bar[2]) == (layout.tiles[(0, 3)][0], layout.tiles[(0, 4)][2])
    assert norm_bar[1] > layout.tiles[(rows - 1, 1)][3]
    low, high = layout.scales["patch norm, layer 11"]                # before and after share one scale
    assert low == min(float(columns[c].min()) for c in list(columns)[:2])
    assert high == float(columns["patch norm, layer 11 (before)"].max())

    # the maps are drawn on their column's shared scale, in one colour map, and the bars show those scales
    figure = layout.figure
    maps_drawn = [ax for ax in figure.axes if ax.get_label().startswith("map ")]
    assert len(maps_drawn) == rows * len(columns)
    for ax in maps_drawn:
        column = int(ax.get_label().split("column=")[1])
        (image,) = ax.get_images()
        assert image.get_clim() == layout.scales[list(columns)[column - 1].split(" (")[0]]
        assert image.get_cmap().name == "viridis" and image.get_array().shape == (4, 4)
    bars = {ax.get_label().removeprefix("colour bar "): ax for ax in figure.axes if ax.get_label().startswith("colour")}
    assert set(bars) == set(layout.colour_bars)
    for name, ax in bars.items():
        low, high = layout.scales[name]
        assert ax.get_xlim() == (low, high)
        labels = [label.get_text() for label in ax.get_xticklabels()]
        assert len(labels) == 3 and labels[0] in ("0", f"{low:.3g}") and labels[-1] == f"{high:.3g}"

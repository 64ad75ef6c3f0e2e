"""Figures of what a test-time register changes: patch norms, CLS and register attention, neuron scores.

Computing and drawing are separate. :func:`collect_views` runs the model with and without
test-time registers over a few images, batched and on the model's device, and returns a
:class:`Views` of small CPU tensors. The ``draw_*`` functions turn those into matplotlib figures,
one :class:`Page` each:

* :func:`draw_norm_maps`: patch-norm maps, rows = layers, a before and an after column per image;
* :func:`draw_norm_histogram`: patch norms at the detection layer, before and after, log-log;
* :func:`draw_cls_attention`: one image's CLS attention per head in the last layers, before and after;
* :func:`draw_token_attention`: one token (CLS, a trained or a test-time register) of one image,
  the image beside the token's attention over the patches;
* :func:`draw_neuron_scores`: every candidate neuron's discovery score, layers x neurons, top-k marked.

:func:`draw_pages` makes all of them, and :func:`save_pages` writes one PNG per page and one PDF
with every page, atomically. matplotlib is imported when a figure is drawn, never at import time,
and figures are drawn on their own Agg canvases (:func:`~test_time_registers.analysis.figures.new_figure`),
so pyplot's global state is never touched.

Every panel's axes carry a label (``Axes.get_label()``) saying what it shows, e.g.
``"norms layer=3 image=0 when=after"``, so that tests and users can find panels without reading pixels.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import measures
from ..data.batching import batches
from ..data.sources import named_images, no_images_message
from ..edits import Edit
from ..errors import ImageSourceError, InvalidArgumentError, check_int
from ..hooks import HookManager
from ..intervention import ModifiedModel
from ..layout import TokenLayout
from ..neurons import RegisterNeurons
from .figures import COLOUR_MAP, new_figure, require_matplotlib

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

BEFORE, AFTER = "before", "after"
WHEN = (BEFORE, AFTER)
#: The CLS-attention figure shows this many last layers unless told otherwise.
CLS_LAYERS = 2
#: The neuron-score heatmap shows at most this many columns; wider layers are max-pooled.
MAX_SCORE_COLUMNS = 1024
PANEL = 1.5           # inches per map panel
BEFORE_COLOUR, AFTER_COLOUR, REGISTER_COLOUR, MARK_COLOUR = "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e"
HISTOGRAM_BOTTOM = 0.7   # the bottom of the histogram's log count axis


# ---- the data -------------------------------------------------------------------------------
@dataclass
class TokenAttention:
    """Where one token looks, in the run with test-time registers (head mean at ``Views.token_layer``).

    ``maps`` is [N, rows, cols], the token's attention to each patch. ``shares`` is [N, T + 1]: its
    attention to each of the T non-patch tokens (in the order of ``Views.tokens``), then to all
    patches together; each row sums to 1.
    """

    name: str            # "CLS", "trained register 2", "test-time register 0"
    kind: str            # "cls", "trained_register", "test_time_register"
    index: int           # within its kind
    maps: torch.Tensor
    shares: torch.Tensor

    @property
    def on_patches(self) -> torch.Tensor:
        """[N]: the share of its attention that goes to the patches at all."""
        return self.shares[:, -1]

    @property
    def slug(self) -> str:
        """A file-name part: ``cls``, ``trained_register2``, ``test_time_register0``."""
        return "cls" if self.kind == "cls" else f"{self.kind}{self.index}"


@dataclass
class Views:
    """What the figures show, for N images, before and after test-time registers; CPU tensors.

    ``rows, cols = grid`` is the patch grid and P = rows * cols. Keys ``"before"`` and ``"after"``
    are the unmodified model and the model with test-time registers.
    """

    model: str
    names: list[str]                          # [N] image names
    pixels: torch.Tensor                      # [N, H, W, 3] the images as the model saw them, RGB in 0..1
    grid: tuple[int, int]
    layout: TokenLayout                       # with the test-time registers
    neurons: RegisterNeurons
    layers: list[int]                         # the layers of the norm maps
    norms: dict[str, torch.Tensor]            # [len(layers), N, rows, cols] patch norms (block outputs)
    register_layer_norms: torch.Tensor        # [len(layers), N, R] test-time register norms (after)
    detect_layer: int
    threshold: float | None                   # the neuron file's outlier threshold at detect_layer
    detect_norms: dict[str, torch.Tensor]     # [N, P] patch norms at detect_layer
    register_norms: torch.Tensor              # [N, R] test-time register norms at detect_layer (after)
    cls_layers: list[int]                     # the layers of the CLS-attention figure; [] without CLS
    cls_attention: dict[str, torch.Tensor]    # [len(cls_layers), N, heads, rows, cols] CLS -> patches
    cls_on_patches: dict[str, torch.Tensor]   # [len(cls_layers), N, heads] CLS attention on all patches
    token_layer: int
    tokens: list[TokenAttention] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len(self.names)

    @property
    def num_registers(self) -> int:
        return self.layout.num_test_time_registers

    def image_title(self, index: int) -> str:
        """``"image 3"``, or ``"image 3: cat.jpg"`` when the image has a file name."""
        name = self.names[index]
        if name == f"image_{index}":
            return f"image {index}"
        return f"image {index}: {name if len(name) <= 40 else '...' + name[-37:]}"


def display_pixels(pixel_values: torch.Tensor, preprocess: Callable | None = None) -> torch.Tensor:
    """Preprocessed images [B, 3, H, W] back as RGB [B, H, W, 3] in 0..1, to show what the model saw.

    The normalisation is undone when ``preprocess`` declares it (a torchvision ``Normalize`` in a
    ``Compose``, or a transformers image processor's ``image_mean``/``image_std``); otherwise each
    image is stretched to 0..1.
    """
    pixels = pixel_values.float()
    mean, std = _normalisation(preprocess)
    if mean is not None:
        shape = (1, -1, 1, 1)
        pixels = pixels * torch.tensor(std, device=pixels.device).view(shape) + torch.tensor(
            mean, device=pixels.device).view(shape)
    else:
        low = pixels.amin(dim=(1, 2, 3), keepdim=True)
        high = pixels.amax(dim=(1, 2, 3), keepdim=True)
        pixels = (pixels - low) / (high - low).clamp_min(1e-8)
    return pixels.clamp(0, 1).permute(0, 2, 3, 1)


def _normalisation(preprocess) -> tuple[list[float] | None, list[float] | None]:
    steps = list(getattr(preprocess, "transforms", ()) or ())
    for step in reversed(steps):
        mean, std = getattr(step, "mean", None), getattr(step, "std", None)
        if mean is not None and std is not None and len(mean) == 3 and len(std) == 3:
            return [float(v) for v in mean], [float(v) for v in std]
    processor = getattr(preprocess, "processor", None)
    if processor is not None and getattr(processor, "do_normalize", True):
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        if mean is not None and std is not None and len(mean) == 3 and len(std) == 3:
            return [float(v) for v in mean], [float(v) for v in std]
    return None, None


def collect_views(hook_manager: HookManager, images, preprocess: Callable | None, neurons, *,
                  num_images: int = 4, num_registers: int = 1, layers: Sequence[int] | None = None,
                  cls_layers: Sequence[int] | None = None, attention_layer: int | None = None,
                  batch_size: int = 8, edit: Edit | None = None, seed: int = 0) -> Views:
    """Run the first ``num_images`` readable images with and without test-time registers.

    Each batch runs the unmodified model once and the :class:`ModifiedModel` once, capturing the
    block outputs of ``layers`` and of the detection layer, and the attention of ``cls_layers``
    and ``attention_layer``. Norms and attention rows are reduced on the device; the results
    move to the CPU once, at the end.

    Args:
        hook_manager: the model's hook manager.
        images: a folder path, an :class:`~test_time_registers.ImageFolder`, PIL images, or
            preprocessed images [N, 3, H, W].
        preprocess: PIL image -> tensor [3, H, W] (not needed for a tensor; it is still used,
            when given, to undo the normalisation for display).
        neurons: :class:`RegisterNeurons` (or pairs); their ``detect_layer`` and ``threshold``
            are used when set.
        num_registers: test-time registers appended (0 moves nothing anywhere: it zeroes the neurons).
        layers: layers of the norm maps (default: all).
        cls_layers: layers of the CLS-attention figure (default: the last two; none without CLS).
        attention_layer: layer of the per-token attention pages (default: the last).
        edit: the intervention's edit (default: the paper's).
        seed: chooses each neuron's register when there are several.

    Raises:
        InvalidArgumentError: a layer out of range, or a bad count.
        ImageSourceError: no readable image.
    """
    check_int("num_images", num_images)
    check_int("batch_size", batch_size)
    neurons = RegisterNeurons.coerce(neurons)
    last = hook_manager.num_layers - 1
    layers = list(range(hook_manager.num_layers)) if layers is None else sorted(set(layers))
    if not layers:
        raise InvalidArgumentError("layers must name at least one layer")
    for layer in layers:
        hook_manager.check_layer(layer, "each of layers")
    detect_layer = hook_manager.default_detect_layer if neurons.detect_layer is None else neurons.detect_layer
    hook_manager.check_layer(detect_layer, "the neurons' detect_layer")
    attention_layer = last if attention_layer is None else hook_manager.check_layer(attention_layer, "attention_layer")
    has_cls = hook_manager.layout.num_cls > 0
    if cls_layers is None:
        cls_layers = list(range(max(0, last - CLS_LAYERS + 1), last + 1))
    for layer in cls_layers:
        hook_manager.check_layer(layer, "each of cls_layers")
    cls_layers = sorted(set(cls_layers)) if has_cls else []

    modified = ModifiedModel(hook_manager.model, hook_manager, neurons, num_registers=num_registers, edit=edit,
                             seed=seed).hook_manager   # a view: its layout and forward have the registers
    names, chosen = _first_images(images, num_images)
    residual_layers = sorted({*layers, detect_layer})
    attention_layers = sorted({*cls_layers, attention_layer})
    parts: dict[str, list] = {}   # per batch, image axis first
    grid = None
    with torch.no_grad():
        for batch in batches(chosen, preprocess, batch_size, hook_manager.device, hook_manager.input_dtype):
            grid = hook_manager.grid_shape(batch.pixel_values)
            runs = {}
            for when, run in ((BEFORE, hook_manager), (AFTER, modified)):
                with run.capture(residual=residual_layers, attention=attention_layers) as captured:
                    run.forward_images(batch.pixel_values)
                runs[when] = captured
            parts.setdefault("pixels", []).append(display_pixels(batch.pixel_values, preprocess))
            for key, value in _reduce_batch(runs, grid, layers, detect_layer, cls_layers, attention_layer).items():
                parts.setdefault(key, []).append(value)
    joined = {key: _join(values) for key, values in parts.items()}
    count = len(names)
    if not cls_layers:
        joined["cls"] = {when: torch.empty(count, 0, 0, *grid) for when in WHEN}
        joined["cls_share"] = {when: torch.empty(count, 0, 0) for when in WHEN}
    tokens = [TokenAttention(name, kind, index, joined["tokens"][:, position], joined["token_share"][:, position])
              for position, (name, kind, index) in enumerate(_token_names(modified.layout))]
    return Views(
        model=hook_manager.name, names=names, pixels=joined["pixels"], grid=grid, layout=modified.layout,
        neurons=neurons, layers=layers, norms=_layers_first(joined["norms"]),
        register_layer_norms=_layers_first(joined["layer_registers"]), detect_layer=detect_layer,
        threshold=neurons.threshold, detect_norms=joined["detect"], register_norms=joined["registers"],
        cls_layers=cls_layers, cls_attention=_layers_first(joined["cls"]),
        cls_on_patches=_layers_first(joined["cls_share"]), token_layer=attention_layer, tokens=tokens)


def _join(values: list):
    """Per-batch tensors [B, ...], or ``{when: [B, ...]}``, joined on the CPU: [N, ...] or ``{when: [N, ...]}``."""
    if isinstance(values[0], dict):
        return {when: torch.cat([value[when] for value in values]).cpu() for when in values[0]}
    return torch.cat(values).cpu()


def _layers_first(value):
    """[N, layers, ...] -> [layers, N, ...], also for each tensor of a ``{when: tensor}``."""
    if isinstance(value, dict):
        return {when: _layers_first(tensor) for when, tensor in value.items()}
    return value.transpose(0, 1).contiguous()


def _first_images(images, count: int) -> tuple[list[str], list | torch.Tensor]:
    """The names and the first ``count`` readable images of a source: PIL images, or the rows of a
    preprocessed tensor [N, 3, H, W]."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or not len(images):
            raise ImageSourceError(f"expected preprocessed images [N, 3, H, W], got shape {list(images.shape)}")
        chosen = images[:count]
        return [f"image_{index}" for index in range(len(chosen))], chosen
    named = list(itertools.islice(named_images(images), count))
    if not named:
        raise ImageSourceError(no_images_message(images))
    return [name for name, _ in named], [image for _, image in named]


def _token_names(layout: TokenLayout) -> list[tuple[str, str, int]]:
    """(title, kind, index) of CLS, the trained registers and the test-time registers, in that order."""
    return ([("CLS" if layout.num_cls == 1 else f"CLS {i}", "cls", i) for i in range(layout.num_cls)]
            + [(f"trained register {i}", "trained_register", i) for i in range(layout.num_trained_registers)]
            + [(f"test-time register {i}", "test_time_register", i) for i in range(layout.num_test_time_registers)])


def _token_positions(layout: TokenLayout, seq_len: int) -> torch.Tensor:
    """Long [T]: the sequence positions of the tokens named by :func:`_token_names`, in that order."""
    return torch.cat([torch.arange(part.start, part.stop) for part in (
        layout.cls(), layout.trained_registers(), layout.test_time_registers(seq_len))])


def _reduce_batch(runs: dict, grid: tuple[int, int], layers: list[int], detect_layer: int, cls_layers: list[int],
                  token_layer: int) -> dict:
    """Reduce one batch's captures (``runs[when]``) to the small tensors the figures need, on the device.

    Returns, image axis first: ``norms`` {when: [B, layers, rows, cols]}, ``detect`` {when: [B, P]},
    ``cls`` {when: [B, cls layers, H, rows, cols]} and ``cls_share`` {when: [B, cls layers, H]} (with
    CLS layers), and from the run with registers ``registers`` [B, R], ``layer_registers``
    [B, layers, R], ``tokens`` [B, T, rows, cols] and ``token_share`` [B, T, T + 1].
    """
    reduced: dict = {key: {} for key in ("norms", "detect", "cls", "cls_share")}
    for when, captured in runs.items():
        layout = captured.layout
        reduced["norms"][when] = torch.stack([measures.patch_norms(captured.residual[layer], layout).unflatten(1, grid)
                                              for layer in layers], dim=1)
        reduced["detect"][when] = measures.patch_norms(captured.residual[detect_layer], layout)
        if cls_layers:
            cls_row = torch.stack([measures.cls_patch_attention(captured.attention[layer], layout).float()
                                   for layer in cls_layers], dim=1)                          # [B, layers, H, P]
            reduced["cls"][when] = cls_row.unflatten(-1, grid)
            reduced["cls_share"][when] = cls_row.sum(dim=-1)
    if not cls_layers:
        del reduced["cls"], reduced["cls_share"]
    after = runs[AFTER]
    reduced["registers"] = measures.register_norms(after.residual[detect_layer], after.layout)
    reduced["layer_registers"] = torch.stack([measures.register_norms(after.residual[layer], after.layout)
                                              for layer in layers], dim=1)
    attention = after.attention[token_layer]                                                  # [B, H, L, L]
    seq_len = attention.shape[-1]
    positions = _token_positions(after.layout, seq_len).to(attention.device)
    rows = attention[:, :, positions].float().mean(dim=1)                                    # [B, T, L]
    to_patches = rows[:, :, after.layout.patches(seq_len)]                                   # [B, T, P]
    reduced["tokens"] = to_patches.unflatten(-1, grid)
    reduced["token_share"] = torch.cat([rows[:, :, positions], to_patches.sum(dim=-1, keepdim=True)], dim=-1)
    return reduced


@dataclass
class Histogram:
    """Counts of norms in log-spaced bins: ``edges`` [bins + 1]; ``counts`` ``{series: [bins]}``."""

    edges: torch.Tensor
    counts: dict[str, torch.Tensor]


def norm_histogram(views: Views, bins: int = 40) -> Histogram:
    """Patch norms at the detection layer, before and after, and the test-time registers' norms
    (series ``"before"``, ``"after"`` and ``"registers"``), counted in ``bins`` log-spaced bins
    shared by all series."""
    check_int("bins", bins)
    series = {BEFORE: views.detect_norms[BEFORE].flatten(), AFTER: views.detect_norms[AFTER].flatten(),
              "registers": views.register_norms.flatten()}
    values = torch.cat(list(series.values()))
    positive = values[values > 0]
    low = float(positive.min()) if len(positive) else 1e-3
    high = max(float(values.max()), low * 1.01)
    edges = torch.logspace(math.log10(low * 0.98), math.log10(high * 1.02), bins + 1, dtype=torch.float64)
    counts = {}
    for name, norms in series.items():
        index = torch.bucketize(norms.double().clamp(edges[0], edges[-1]), edges, right=True) - 1
        counts[name] = torch.bincount(index.clamp(0, bins - 1), minlength=bins)
    return Histogram(edges, counts)


def score_matrix(scores: torch.Tensor, max_columns: int = MAX_SCORE_COLUMNS) -> tuple[torch.Tensor, int]:
    """Candidate scores [layers, neurons] for a heatmap of at most ``max_columns`` columns.

    Returns ``(matrix [layers, ceil(neurons / factor)], factor)``: each column is the largest
    score of ``factor`` neighbouring neurons (NaN padding ignored), so no standing-out neuron
    disappears when a wide layer is drawn.
    """
    check_int("max_columns", max_columns)
    width = scores.shape[1]
    factor = max(1, math.ceil(width / max_columns))
    if factor == 1:
        return scores.float(), 1
    padded = torch.full((scores.shape[0], math.ceil(width / factor) * factor), float("nan"))
    padded[:, :width] = scores.float()
    groups = padded.unflatten(1, (-1, factor))
    pooled = groups.nan_to_num(float("-inf")).amax(dim=-1)
    return pooled.masked_fill(groups.isnan().all(dim=-1), float("nan")), factor


# ---- the drawing ----------------------------------------------------------------------------
@dataclass
class Page:
    """One figure: ``name`` is its file name without extension, ``kind`` which figure it is."""

    name: str
    kind: str            # "norm_maps", "norm_histogram", "cls_attention", "token_attention", "neuron_scores"
    figure: "Figure"


def _image_panel(ax, views: Views, index: int, title: str | None = None) -> None:
    ax.imshow(views.pixels[index].numpy(), interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else views.image_title(index), fontsize=9)
    ax.set_label(f"image image={index}")


def _map_panel(ax, values: torch.Tensor, low: float, high: float, label: str):
    """A [rows, cols] map on a fixed colour scale; returns the image artist for a colour bar."""
    artist = ax.imshow(values.numpy(), cmap=COLOUR_MAP, vmin=low, vmax=high, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_label(label)
    return artist


def _suptitle(figure: "Figure", text: str, fontsize: float = 10) -> None:
    """A figure title, each line wrapped to the figure's width so that none is cut off."""
    columns = max(30, int(figure.get_figwidth() * 130 / fontsize))   # characters of about 0.55 em
    figure.suptitle("\n".join(textwrap.fill(line, columns) for line in text.split("\n")), fontsize=fontsize)


def _registers_phrase(count: int) -> str:
    return f"{count} test-time register" + ("" if count == 1 else "s")


def draw_norm_maps(views: Views) -> Page:
    """Patch-norm maps: the images in the top row, then one row per layer with a before and an
    after column per image. Each layer row has one colour scale, shared by before and after and
    by every image, shown by the colour bar at its right."""
    count, rows = views.num_images, len(views.layers)
    figure = new_figure(2 * count * PANEL + 1.2, (rows + 1) * PANEL + 0.8)
    grid = figure.add_gridspec(rows + 1, 2 * count + 1, width_ratios=[1] * (2 * count) + [0.08])
    for image in range(count):
        _image_panel(figure.add_subplot(grid[0, 2 * image:2 * image + 2]), views, image)
    for row, layer in enumerate(views.layers):
        values = {when: views.norms[when][row] for when in WHEN}                  # [N, rows, cols]
        low, high = 0.0, max(float(v.max()) for v in values.values())   # from 0, so equal norms look equal
        for image, when in itertools.product(range(count), WHEN):
            ax = figure.add_subplot(grid[row + 1, 2 * image + WHEN.index(when)])
            artist = _map_panel(ax, values[when][image], low, high, f"norms layer={layer} image={image} when={when}")
            if row == 0:
                ax.set_title(when, fontsize=9)
            ax.set_xlabel(_norm_caption(views, row, image, when), fontsize=7, labelpad=2)
            if image == 0 and when == BEFORE:
                ax.set_ylabel(f"layer {layer}", fontsize=9)
        bar = figure.colorbar(artist, cax=figure.add_subplot(grid[row + 1, -1]))
        bar.ax.tick_params(labelsize=7)
        bar.ax.set_label(f"colour bar layer={layer}")
    bar.set_label("patch norm", fontsize=8)
    registers = _registers_phrase(views.num_registers)
    _suptitle(figure, f"Patch norms (block outputs) per layer, before and after {registers}\n"
                      f"{views.model}; one colour scale per layer row, from 0", fontsize=11)
    return Page("norm_maps", "norm_maps", figure)


def _norm_caption(views: Views, row: int, image: int, when: str) -> str:
    """Under a norm map: its largest patch norm, and after, where the outliers' norm went."""
    text = f"largest {float(views.norms[when][row, image].max()):.3g}"
    registers = views.register_layer_norms[row, image]
    if when == AFTER and len(registers):
        text += f"\nregister{'s up to' if len(registers) > 1 else ''} {float(registers.max()):.3g}"
    return text


def draw_norm_histogram(views: Views, bins: int = 40) -> Page:
    """Patch norms at the detection layer, before and after, as filled step histograms on log-log axes,
    with the test-time registers' norms and the neuron file's threshold marked."""
    histogram = norm_histogram(views, bins)
    edges = histogram.edges.numpy()
    figure = new_figure(7.5, 4.5)
    ax = figure.add_subplot()
    ax.set_label("histogram")
    patches = views.detect_norms[BEFORE].shape[1]
    styles = {BEFORE: dict(color=BEFORE_COLOUR, label=f"patches, before ({views.num_images} x {patches})"),
              AFTER: dict(color=AFTER_COLOUR, label="patches, after"),
              "registers": dict(color=REGISTER_COLOUR, linestyle="--",
                                label=f"{_registers_phrase(views.num_registers)}, after")}
    for name, style in styles.items():
        if name == "registers" and not views.num_registers:
            continue
        counts = histogram.counts[name].double()
        # empty bins sit on the bottom edge of the axes (BOTTOM, below the lowest count of 1), hidden by its spine
        heights = counts.clamp_min(HISTOGRAM_BOTTOM).numpy()
        ax.stairs(heights, edges, baseline=HISTOGRAM_BOTTOM, fill=True, alpha=0.18, color=style["color"])
        ax.stairs(heights, edges, baseline=HISTOGRAM_BOTTOM, linewidth=1.6, **style)
    _plain_log_x(ax, float(edges[0]), float(edges[-1]))
    ax.set_yscale("log")
    ax.set_ylim(HISTOGRAM_BOTTOM, None)
    if views.threshold is not None:
        ax.axvline(views.threshold, color="black", linestyle=":", linewidth=1.4,
                   label=f"outlier threshold {views.threshold:.4g} (neuron file)")
    ax.set_xlabel(f"norm of the block output at layer {views.detect_layer} (log scale)")
    ax.set_ylabel("tokens per bin (log scale)")
    ax.legend(fontsize=8, loc="upper right")
    note = "" if views.threshold is not None else "; the neurons record no threshold"
    ax.set_title(f"Patch norms at the detection layer {views.detect_layer}, before and after "
                 f"{_registers_phrase(views.num_registers)}\n{views.model}; {views.num_images} images, "
                 f"log-spaced bins{note}", fontsize=10)
    return Page("norm_histogram", "norm_histogram", figure)


def _plain_log_x(ax, low: float, high: float) -> None:
    """A log-scaled x axis from ``low`` to ``high``, labelled with plain numbers (20, 50, 100) rather
    than powers of ten; a range too narrow for those gets evenly spaced ones."""
    from matplotlib.ticker import FixedLocator, LogLocator, MaxNLocator, NullFormatter, StrMethodFormatter

    ax.set_xscale("log")
    low, high = low / 1.1, high * 1.1   # a margin, so the outermost bins do not touch the frame
    ax.set_xlim(low, high)
    ticks = [t for t in LogLocator(subs=(1.0, 2.0, 5.0)).tick_values(low, high) if low <= t <= high]
    if len(ticks) < 3:
        ticks = [t for t in MaxNLocator(nbins=5).tick_values(low, high) if low <= t <= high]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def draw_cls_attention(views: Views, image: int) -> Page:
    """One image's CLS attention to the patches, per head: rows are (layer, before/after), columns
    the heads, after the image. Each row has its own colour scale and colour bar; under each map,
    the share of CLS attention that goes to the patches at all."""
    if not views.cls_layers:
        raise InvalidArgumentError("this model has no CLS token, so there is no CLS attention to draw")
    _check_image(views, image)
    heads = views.cls_attention[BEFORE].shape[2]
    rows = [(layer_index, layer, when) for layer_index, layer in enumerate(views.cls_layers) for when in WHEN]
    figure = new_figure((heads + 1) * PANEL + 1.0, len(rows) * (PANEL + 0.25) + 0.9)
    grid = figure.add_gridspec(len(rows), heads + 2, width_ratios=[1] * (heads + 1) + [0.08])
    _image_panel(figure.add_subplot(grid[0, 0]), views, image, "image")
    for row, (layer_index, layer, when) in enumerate(rows):
        maps = views.cls_attention[when][layer_index, image]                      # [H, rows, cols]
        shares = views.cls_on_patches[when][layer_index, image]                   # [H]
        low, high = 0.0, _attention_top(maps, views)
        for head in range(heads):
            ax = figure.add_subplot(grid[row, head + 1])
            artist = _map_panel(ax, maps[head], low, high, f"cls layer={layer} when={when} head={head} image={image}")
            ax.set_xlabel(f"on patches: {float(shares[head]):.0%}", fontsize=7)
            if row == 0:
                ax.set_title(f"head {head}", fontsize=9)
            if head == 0:
                ax.set_ylabel(f"layer {layer}\n{when}", fontsize=9)
        bar = figure.colorbar(artist, cax=figure.add_subplot(grid[row, -1]))
        bar.ax.tick_params(labelsize=7)
        bar.ax.set_label(f"colour bar layer={layer} when={when}")
    for row in range(1, len(rows)):
        figure.add_subplot(grid[row, 0]).set_axis_off()
    _suptitle(figure, f"CLS attention to the patches per head, before and after "
                      f"{_registers_phrase(views.num_registers)}: {views.image_title(image)}\n"
                      f"{views.model}; one colour scale per row, from 0 to its largest value (at least "
                      f"1/{views.grid[0] * views.grid[1]}, attention spread evenly over the patches)", fontsize=10)
    return Page(f"cls_attention_image{image}", "cls_attention", figure)


def draw_token_attention(views: Views, image: int, token: int) -> Page:
    """One page for one token of one image, in the run with test-time registers: the image beside the
    token's attention to each patch (head mean), and below, how its attention splits between CLS,
    the registers and the patches. The title names the token, the layer and the image."""
    _check_image(views, image)
    if not 0 <= token < len(views.tokens):
        raise InvalidArgumentError(f"token must be in 0..{len(views.tokens) - 1}, got {token!r}")
    item = views.tokens[token]
    figure = new_figure(9.6, 5.4)
    grid = figure.add_gridspec(2, 5, width_ratios=[1, 1, 0.06, 1, 0.06], height_ratios=[1, 0.32])
    _image_panel(figure.add_subplot(grid[0, 0]), views, image, "image")
    values = item.maps[image]
    # Left: the attention itself; right: renormalised over the patches, the map people compare with
    # models without registers (where it does not fall on patches, the left map is near zero).
    total = values.double().sum()   # in float64: the few percent left for the patches may be subnormal floats
    spread = (values.double() / total).float() if total > 0 else torch.zeros_like(values)
    for column, shown, title, label, suffix in (
            (1, values, "its attention to each patch", "attention (mean over heads)", ""),
            (3, spread, f"the same, renormalised over the patches\n({float(item.on_patches[image]):.1%} of it "
                        "falls on patches)", "share of its patch attention", " renormalised")):
        ax = figure.add_subplot(grid[0, column])
        artist = _map_panel(ax, shown, 0.0, _attention_top(shown, views),
                            f"token {item.slug} layer={views.token_layer} image={image}{suffix}")
        ax.set_title(title, fontsize=9)
        bar = figure.colorbar(artist, cax=figure.add_subplot(grid[0, column + 1]))
        bar.ax.tick_params(labelsize=7)
        bar.set_label(label, fontsize=8)
    _draw_shares(figure.add_subplot(grid[1, :]), views, item, image)
    _suptitle(figure, f"{item.name}, layer {views.token_layer}, {views.image_title(image)}\n"
                      f"{views.model} with {_registers_phrase(views.num_registers)}", fontsize=11)
    return Page(f"token_attention_image{image}_{item.slug}", "token_attention", figure)


def _attention_top(values: torch.Tensor, views: Views) -> float:
    """The top of an attention map's colour scale: its largest value, but at least the share each
    patch would get from attention spread evenly over the patches, so a map of near-zeros reads as such."""
    return max(float(values.max()), 1.0 / (views.grid[0] * views.grid[1]))


def _draw_shares(ax, views: Views, item: TokenAttention, image: int) -> None:
    """Horizontal bars: the token's attention to each non-patch token and to all patches together."""
    labels = [token.name for token in views.tokens] + ["all patches"]
    shares = item.shares[image].numpy()
    colours = [REGISTER_COLOUR if token.kind == "test_time_register" else "#7f7f7f" for token in views.tokens]
    ax.barh(range(len(labels)), shares, color=colours + [AFTER_COLOUR])
    for position, share in enumerate(shares):
        ax.text(min(share, 1.0) + 0.01, position, f"{share:.0%}", va="center", fontsize=7)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel(f"share of the attention of {item.name} (mean over heads)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_label(f"shares {item.slug} image={image}")


def draw_neuron_scores(neurons: RegisterNeurons, max_columns: int = MAX_SCORE_COLUMNS) -> Page:
    """Every candidate neuron's discovery score, layers x neurons, with the selected neurons circled
    and the layers above the highest candidate layer shaded; below, the best-scoring candidates
    in order, the selected ones coloured, so the cut-off is visible.

    Raises:
        InvalidArgumentError: the neurons carry no ``candidate_scores`` (presets and hand-made lists).
    """
    scores = neurons.candidate_scores
    if scores is None:
        raise InvalidArgumentError("these register neurons carry no candidate scores (presets and hand-made lists "
                                   "have none); rerun discovery to get them")
    scores = scores.float().cpu()
    matrix, factor = score_matrix(scores, max_columns)
    layers, width = scores.shape
    figure = new_figure(10.0, 3.2 + 0.28 * layers)
    grid = figure.add_gridspec(2, 2, height_ratios=[max(layers, 3), 3.5], width_ratios=[1, 0.02])
    ax = figure.add_subplot(grid[0, 0])
    ax.set_label("heatmap")
    finite = scores[scores.isfinite()]
    low, high = (min(float(finite.min()), 0.0), float(finite.max())) if len(finite) else (0.0, 1.0)
    import matplotlib

    colours = matplotlib.colormaps[COLOUR_MAP].with_extremes(bad="#dddddd")
    artist = ax.imshow(matrix.numpy(), aspect="auto", cmap=colours, vmin=low, vmax=high, interpolation="nearest",
                       extent=(-0.5, matrix.shape[1] * factor - 0.5, layers - 0.5, -0.5))
    pairs = [pair for pair in neurons.pairs() if pair[0] < layers]
    if pairs:
        ax.scatter([n for _, n in pairs], [layer for layer, _ in pairs], s=80, facecolors="none",
                   edgecolors=MARK_COLOUR, linewidths=1.5, label=f"selected (top {len(neurons)})")
    highest = neurons.highest_layer
    if highest is not None and highest < layers - 1:
        ax.axhspan(highest + 0.5, layers - 0.5, color="white", alpha=0.55, linewidth=0)
        ax.axhline(highest + 0.5, color="black", linestyle="--", linewidth=1.2,
                   label=f"highest candidate layer {highest}")
        above = f"layer {highest + 1}" if highest + 1 == layers - 1 else f"layers {highest + 1}-{layers - 1}"
        ax.text(width / 2, (highest + layers) / 2, f"{above}: above the highest candidate layer, not candidates",
                ha="center", va="center", fontsize=9)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(layers - 0.5, -0.5)
    ax.set_yticks(range(layers))
    ax.set_ylabel("layer")
    pooled = f" (each column: the largest of {factor} neighbouring neurons)" if factor > 1 else ""
    ax.set_xlabel(f"neuron{pooled}", fontsize=9)
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    bar = figure.colorbar(artist, cax=figure.add_subplot(grid[0, 1]))
    bar.set_label(f"score ({neurons.score or 'raw'})", fontsize=8)
    bar.ax.tick_params(labelsize=7)

    _draw_ranking(figure.add_subplot(grid[1, :]), scores, neurons)
    described = f", {neurons.images_with_outliers} images with outliers" if neurons.images_with_outliers else ""
    _suptitle(figure, f"Register-neuron discovery scores of every candidate neuron\n{neurons.model}; "
                      f"mean activation on the outliers{described}, detect layer {neurons.detect_layer}", fontsize=10)
    return Page("neuron_scores", "neuron_scores", figure)


def _draw_ranking(ax, scores: torch.Tensor, neurons: RegisterNeurons) -> None:
    """The best ``max(2k, 20)`` candidates of layers up to the highest layer as bars, best first."""
    highest = neurons.highest_layer if neurons.highest_layer is not None else scores.shape[0] - 1
    candidates = scores[:highest + 1].nan_to_num(float("-inf"))
    shown = min(max(2 * len(neurons), 20), int(scores[:highest + 1].isfinite().sum()))
    best = candidates.flatten().topk(shown)
    layer_ids = (best.indices // scores.shape[1]).tolist()
    neuron_ids = (best.indices % scores.shape[1]).tolist()
    selected = set(neurons.pairs())
    colours = [MARK_COLOUR if pair in selected else "#999999" for pair in zip(layer_ids, neuron_ids)]
    ax.bar(range(shown), best.values.numpy(), color=colours)
    ax.set_label("ranking")
    ax.set_xticks(range(shown))
    ax.set_xticklabels([f"{layer}:{neuron}" for layer, neuron in zip(layer_ids, neuron_ids)], rotation=90,
                       fontsize=6 if shown > 40 else 7)
    ax.set_xlim(-0.6, shown - 0.4)
    ax.set_xlabel("best candidates (layer:neuron); orange = selected", fontsize=8)
    ax.set_ylabel("score", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)


def _check_image(views: Views, image: int) -> None:
    if not 0 <= image < views.num_images:
        raise InvalidArgumentError(f"image must be in 0..{views.num_images - 1}, got {image!r}")


def draw_pages(views: Views, neurons: RegisterNeurons | None = None) -> tuple[list[Page], list[str]]:
    """Every figure of ``views``, in order: norm maps, the histogram, the neuron scores, the CLS
    attention of each image, then each image's per-token pages.

    Returns ``(pages, notes)``: ``notes`` says why a figure was left out (no CLS token, no
    candidate scores); each note is also logged.
    """
    neurons = views.neurons if neurons is None else neurons
    pages = [draw_norm_maps(views), draw_norm_histogram(views)]
    notes = []
    if neurons.candidate_scores is not None:
        pages.append(draw_neuron_scores(neurons))
    else:
        notes.append("no neuron-score heatmap: these neurons carry no candidate scores (presets and hand-made "
                     "lists have none); rerun discovery to get them")
    if views.cls_layers:
        pages += [draw_cls_attention(views, image) for image in range(views.num_images)]
    else:
        notes.append("no CLS-attention figure: this model has no CLS token")
    if not views.tokens:
        notes.append("no per-token attention pages: this model has no CLS token and no registers")
    pages += [draw_token_attention(views, image, token)
              for image in range(views.num_images) for token in range(len(views.tokens))]
    for note in notes:
        log.info("%s", note)
    return pages, notes


def save_pages(pages: Iterable[Page], folder: str | os.PathLike, *, pdf_name: str = "all_figures.pdf",
               dpi: int = 110) -> list[Path]:
    """Write each page as ``NAME.png`` and all of them, in order, as one PDF, into ``folder``.

    The files are written into a temporary folder first and moved into place only when all of
    them are done, so a failure leaves no half-written file. Returns the paths, the PDF last.
    """
    require_matplotlib()
    from matplotlib.backends.backend_pdf import PdfPages

    pages = list(pages)
    names = [page.name for page in pages]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"two pages have one name: {sorted(n for n in names if names.count(n) > 1)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".figures-"))
    try:
        written = []
        for page in pages:
            page.figure.savefig(staging / f"{page.name}.png", dpi=dpi)
            written.append(f"{page.name}.png")
        with PdfPages(staging / pdf_name) as pdf:
            for page in pages:
                pdf.savefig(page.figure)
        written.append(pdf_name)
        for name in written:
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [folder / name for name in written]

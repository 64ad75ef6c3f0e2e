"""Where a vision-language model's answer looks: the language model's attention from the answer token(s) to
the image tokens, before and after test-time registers (the overlay of the paper's Fig. 6 and §5.4).

:func:`answer_attention` runs a VLM (or a :class:`~test_time_registers.ModifiedModel` around one) through
``generate`` and keeps, per layer, only the rows it needs: the query row that predicts each answer token,
at the image tokens' columns, averaged over the heads. Only the language model switches to eager
attention while it runs (sdpa returns no probabilities), and everything is restored afterwards.
:func:`read_layer_norms` gives the tower's patch norms at the block the language model reads,
:func:`compare_answer_attention` does both for a few images and a prompt, with the model's own
processor, and :func:`draw_answer_attention` draws them.

The map goes back onto the image through :func:`image_packing`, read from each model's own code:

- one token per patch (LLaVA-1.5 and its kin, ``"default"`` and ``"full"``, CLS dropped; PaliGemma): the
  patch grid;
- a coarser square token grid: Gemma 3's average pooling (each token a k x k block, 16x16 tokens of 4x4
  patches at 896 px) and the pixel shuffle of InternVL (``downsample_ratio``), Idefics3/SmolVLM
  (``scale_factor``) and Aya Vision (``downsample_factor``), each token an s x s block. The map is the
  token grid; which patches each token takes is read by passing one-hot features through the model's
  own pooling or shuffle. Idefics3/SmolVLM tiles: the map shows the last, the whole image resized to one
  tile; every tile's tokens count in the share on the image;
- anyres crops (LLaVA-NeXT, LLaVA-OneVision): the model's own ``pack_image_features`` on index-valued
  features gives each language-model position its (crop, row, col) or marks it a newline; the map shows
  the base view, crop 0.

Refused with :class:`InvalidArgumentError` and the reason: several images per prompt (InternVL's
dynamic tiles and Gemma 3's pan-and-scan crops come as more images: turn them off in the processor),
OneVision's ``anyres_max_N`` when it interpolates an image above N crops' worth of patches (its tokens
are no longer patches), and image-token counts that fit none of the packings above.
The patch norms beside the maps are those of the shown view, on its patch grid.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import measures
from ..data.sources import named_images, no_images_message
from ..edits import Edit
from ..errors import (ImageSourceError, InvalidArgumentError, ModelLoadError, UnsupportedModelError, check_int,
                      first_line)
from ..hf import ProcessorTransform, is_local_folder, vision_tower_path
from ..hooks import HookManager
from ..hub import load_pretrained
from ..intervention import ModifiedModel
from .figures import COLOUR_MAP, new_figure
from .visualize import AFTER, BEFORE, WHEN, _suptitle, display_pixels

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..loading import LoadedModel

log = logging.getLogger(__name__)

#: Config attributes that hold the id of the image placeholder token, newest name first.
IMAGE_TOKEN_ATTRIBUTES = ("image_token_id", "image_token_index")
PANEL = 1.6           # inches per panel of the figure


# ---- computing ------------------------------------------------------------------------------
@dataclass
class AnswerAttention:
    """The language model's attention from the answer token(s) to the image tokens, for B prompts.

    T is the number of image tokens per row (the same in every row). ``packing`` says where each of
    them lies on the image and which of them the map shows, on which grid. Each answer token's query
    row is the one that predicts it: the last prompt row for the first answer token, then each
    generated token's row. CPU tensors.
    """

    per_layer: torch.Tensor            # [layers, B, T] mean over heads and answer tokens
    positions: torch.Tensor            # [B, T] long: where the image tokens are in each row of input_ids
    packing: "ImagePacking"
    answer_ids: list[list[int]]        # per row, the generated token ids up to and including the first EOS

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the map: the shown view's token grid."""
        return self.packing.grid

    @property
    def leading(self) -> int:
        """How many image tokens come before the first patch (CLS under the ``"full"`` strategy)."""
        return self.packing.leading

    @property
    def image_tokens(self) -> torch.Tensor:
        """[B, T]: the attention to each image token, averaged over layers, heads and answer tokens."""
        return self.per_layer.mean(dim=0)

    @property
    def on_image(self) -> torch.Tensor:
        """[B]: the share of the answer's attention that goes to the image tokens (all of them: CLS, every
        crop or tile, newlines), 0..1."""
        return self.image_tokens.sum(dim=-1)

    @property
    def maps(self) -> torch.Tensor:
        """[B, rows, cols]: the attention to each token of the shown view, on its grid (``packing.cells``)."""
        return self.image_tokens.gather(-1, self.packing.cells).unflatten(-1, self.grid)

    @property
    def layer_maps(self) -> torch.Tensor:
        """[layers, B, rows, cols]: :attr:`maps` per layer."""
        cells = self.packing.cells.expand(len(self.per_layer), -1, -1)
        return self.per_layer.gather(-1, cells).unflatten(-1, self.grid)

    @property
    def patch_shares(self) -> torch.Tensor:
        """[B, rows, cols]: :attr:`maps` renormalised over its cells (each map sums to 1), the map that
        compares across runs whose answers put different shares of their attention on the image."""
        maps = self.maps.double()
        return (maps / maps.sum(dim=(1, 2), keepdim=True).clamp_min(1e-30)).float()

    @property
    def num_images(self) -> int:
        return self.per_layer.shape[1]

    @staticmethod
    def cat(parts: Sequence["AnswerAttention"]) -> "AnswerAttention":
        """Batches joined along the image axis; they must share the packing's map (grid, view, block)."""
        return AnswerAttention(torch.cat([part.per_layer for part in parts], dim=1),
                               torch.cat([part.positions for part in parts]),
                               ImagePacking.cat([part.packing for part in parts]),
                               [ids for part in parts for ids in part.answer_ids])


def config_image_token(config) -> int:
    """The id of the image placeholder token in a VLM's ``config`` (``image_token_id`` or ``image_token_index``).

    Raises:
        UnsupportedModelError: the config names none.
    """
    for name in IMAGE_TOKEN_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise UnsupportedModelError(f"{type(config).__name__} names no image token ({' or '.join(IMAGE_TOKEN_ATTRIBUTES)});"
                                " pass image_token_id")


def image_positions(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """[B, S] ids -> [B, T] long: the positions of the image tokens in each row, in order (left padding
    and text before the image shift them per row).

    Raises:
        InvalidArgumentError: no image token, or rows with different numbers of them.
    """
    if input_ids.ndim != 2:
        raise InvalidArgumentError(f"input_ids must be [B, S], got shape {list(input_ids.shape)}")
    is_image = input_ids == token_id
    counts = is_image.sum(dim=1)
    if int(counts.max()) == 0:
        raise InvalidArgumentError(f"input_ids hold no image token (id {token_id}): build them with the model's "
                                   "processor, which expands the image placeholder into one token per image feature")
    if int(counts.min()) != int(counts.max()):
        raise InvalidArgumentError(f"every row must hold the same number of image tokens (id {token_id}); got "
                                   f"{counts.tolist()}: one image of one size per prompt")
    return is_image.nonzero()[:, 1].view(len(input_ids), -1)


# ---- where each image token lies on the image -----------------------------------------------------
NOWHERE = -1          # the place of an image token that is no patch: CLS under "full", an anyres newline
_ONE_HOT_CHUNK = 256  # patches per pass when a model's rearrangement is read from one-hot features


@dataclass
class ImagePacking:
    """Where the T image tokens of B prompts lie on the image, and which of them the map shows.

    ``places[b, t]`` is ``(view, row, col)`` for image token t of prompt b: ``view`` is the tower batch
    element it comes from (a crop or a tile of the image; 0 when there is one), ``(row, col)`` its cell on
    that view's token grid, each cell ``block`` tower patches (1x1 when the tokens are the patches one to
    one, 4x4 for Gemma 3's pooling, s x s for a pixel shuffle). A token that is no patch (CLS under the
    ``"full"`` strategy, an anyres newline) has the place ``(-1, -1, -1)``.

    The map shows view ``view`` on its ``grid``: ``cells[b]`` [rows * cols] is, row-major, the image token
    (0..T-1) at each cell. The tower's patch grid of that view is :attr:`patch_grid`.
    """

    kind: str                          # e.g. "patch grid", "token grid of a 2x2 pixel shuffle"
    view: int                          # the tower batch element of each image the map shows
    grid: tuple[int, int]              # (rows, cols) of the map: the shown view's token grid
    block: tuple[int, int]             # tower patches per token, (rows, cols)
    leading: int                       # image tokens before the first patch (CLS under "full")
    places: torch.Tensor               # [B, T, 3] long: (view, row, col) of each image token, -1 for none
    cells: torch.Tensor                # [B, rows * cols] long: the image token shown at each cell

    @property
    def patch_grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the shown view's tower patches: the grid of its patch norms."""
        return self.grid[0] * self.block[0], self.grid[1] * self.block[1]

    @property
    def num_views(self) -> int:
        """Tower batch elements per image (1 + tiles for anyres; tiles + the global image for Idefics3)."""
        return int(self.places[..., 0].max()) + 1

    def describe(self) -> str:
        """What the map shows, for a figure: e.g. ``"the 16x16 token grid of a 4x4 average pooling"``."""
        return f"the {self.grid[0]}x{self.grid[1]} {self.kind}"

    @staticmethod
    def cat(parts: Sequence["ImagePacking"]) -> "ImagePacking":
        """Packings of batches joined along the prompt axis; they must show the same view on the same grid."""
        first = parts[0]
        key = lambda part: (part.kind, part.view, part.grid, part.block, part.leading,  # noqa: E731
                            part.places.shape[1])
        if any(key(part) != key(first) for part in parts):
            raise InvalidArgumentError("answer attentions of different image packings (grid, view, image tokens) "
                                       f"cannot be joined: {sorted({key(part) for part in parts}, key=str)}")
        return ImagePacking(first.kind, first.view, first.grid, first.block, first.leading,
                            torch.cat([part.places for part in parts]), torch.cat([part.cells for part in parts]))


def _family(config) -> str:
    return type(config).__name__.removesuffix("Config")


def _multimodal_model(vlm: nn.Module) -> nn.Module:
    """The module that turns pixels into image features: ``vlm.model`` of a ...ForConditionalGeneration, else
    the VLM itself."""
    inner = getattr(vlm, "model", None)
    return inner if isinstance(inner, nn.Module) and callable(getattr(inner, "get_image_features", None)) else vlm


def _patch_side(config) -> int:
    patch = getattr(getattr(config, "vision_config", None), "patch_size", None)
    if patch is None:
        raise UnsupportedModelError(f"{_family(config)}: its vision_config names no patch_size")
    return patch if isinstance(patch, int) else patch[0]


def _cells(places: torch.Tensor, view: int, grid: tuple[int, int], name: str) -> torch.Tensor:
    """[B, T, 3] places -> [B, rows * cols]: the image token at each cell of ``view``, which must cover the grid
    once."""
    rows, cols = grid
    cells = torch.empty(places.shape[0], rows * cols, dtype=torch.long)
    for row, row_places in enumerate(places):
        tokens = (row_places[:, 0] == view).nonzero()[:, 0]
        index = row_places[tokens, 1] * cols + row_places[tokens, 2]
        if len(index) != rows * cols or torch.unique(index).numel() != rows * cols or not (
                (row_places[tokens, 1:] >= 0).all() and (row_places[tokens, 1] < rows).all()
                and (row_places[tokens, 2] < cols).all()):
            raise UnsupportedModelError(f"{name}: the image tokens of view {view} do not cover its {rows}x{cols} "
                                        "grid once each, so no map can be drawn from them")
        cells[row, index] = tokens
    return cells


def _input_of(module: nn.Module, stop: nn.Module, *args) -> torch.Tensor:
    """Runs ``module(*args)`` up to ``stop`` and returns what ``stop`` gets (its first input); nothing after it runs."""

    class Stop(Exception):
        pass

    seen = []

    def grab(_, inputs):
        seen.append(inputs[0])
        raise Stop

    handle = stop.register_forward_pre_hook(grab)
    try:
        module(*args)
    except Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise UnsupportedModelError(f"{type(module).__name__} never called {type(stop).__name__}")
    return seen[0]


def token_rearrangement(vlm: nn.Module):
    """``(kind, rearrange)``: the model's own code that turns the tower's patch features [1, N, C] (row-major)
    into the language model's image tokens [1, M, C'] when that is not one token per patch, or None.

    Gemma 3: its projector up to its norm (reshape to the patch grid, ``AvgPool2d``, flatten); Aya Vision:
    its projector's ``pixel_shuffle``; Idefics3 and SmolVLM: their connector's ``pixel_shuffle``; InternVL:
    its ``pixel_shuffle`` of the square grid, as ``get_image_features`` reshapes it. No weight is used: the
    functions only move or average features, so one-hot features read which patches each token takes.
    """
    base = _multimodal_model(vlm)
    projector = getattr(base, "multi_modal_projector", None)
    if isinstance(getattr(projector, "avg_pool", None), nn.Module) and isinstance(
            getattr(projector, "mm_soft_emb_norm", None), nn.Module):                       # Gemma 3
        return "average pooling", lambda features: _input_of(projector, projector.mm_soft_emb_norm, features)
    if projector is not None and callable(getattr(projector, "pixel_shuffle", None)):      # Aya Vision
        return "pixel shuffle", lambda features: projector.pixel_shuffle(features).flatten(1, -2)
    connector = getattr(base, "connector", None)
    if connector is not None and callable(getattr(connector, "pixel_shuffle", None)):      # Idefics3, SmolVLM
        return "pixel shuffle", lambda features: connector.pixel_shuffle(features, connector.scale_factor)
    ratio = getattr(vlm.config, "downsample_ratio", None)
    if ratio is not None and callable(getattr(base, "pixel_shuffle", None)):                # InternVL

        def internvl(features: torch.Tensor) -> torch.Tensor:
            side = math.isqrt(features.shape[1])
            shuffled = base.pixel_shuffle(features.reshape(len(features), side, side, -1), scale_factor=ratio)
            return shuffled.reshape(len(features), -1, shuffled.shape[-1])

        return "pixel shuffle", internvl
    return None


def token_blocks(rearrange, grid: tuple[int, int], what: str = "the packing"
                 ) -> tuple[tuple[int, int], tuple[int, int], torch.Tensor]:
    """Which patches each image token takes, read from ``rearrange`` itself: one-hot patch features
    [1, N, C] (patch p lights channel p) go through it, and token t takes patch p where the output is not
    zero. Each token must take one rectangular block of patches, all blocks the same size, aligned, and
    every patch exactly one token.

    Returns:
        ``(token grid (rows, cols), block (rows, cols), places [M, 2] long: each token's (row, col) there)``.

    Raises:
        InvalidArgumentError: ``rearrange`` refuses the grid, or its tokens are not aligned blocks.
    """
    rows, cols = grid
    patches = rows * cols
    parts = []
    for start in range(0, patches, _ONE_HOT_CHUNK):
        width = min(_ONE_HOT_CHUNK, patches - start)
        one_hot = torch.zeros(1, patches, width)
        one_hot[0, torch.arange(start, start + width), torch.arange(width)] = 1
        try:
            with torch.no_grad():
                tokens = rearrange(one_hot)[0].detach().float().cpu()           # [M, C'], C' a multiple of width
        except Exception as error:  # noqa: BLE001 - reshape errors of each family's own code
            raise InvalidArgumentError(f"{what} does not take a {rows}x{cols} patch grid: "
                                       f"{first_line(error)}") from error
        parts.append(tokens.abs().reshape(len(tokens), -1, width).sum(dim=1) > 0)   # output channel j: patch j % width
    takes = torch.cat(parts, dim=1)                                             # [M, N] bool
    row, col = torch.arange(patches) // cols, torch.arange(patches) % cols
    top, bottom = torch.where(takes, row, patches).amin(1), torch.where(takes, row, -1).amax(1)
    left, right = torch.where(takes, col, patches).amin(1), torch.where(takes, col, -1).amax(1)
    height, width = bottom - top + 1, right - left + 1
    block = (int(height[0]), int(width[0]))
    if (not (takes.sum(dim=0) == 1).all() or not (height == block[0]).all() or not (width == block[1]).all()
            or not (takes.sum(dim=1) == block[0] * block[1]).all() or rows % block[0] or cols % block[1]
            or (top % block[0]).any() or (left % block[1]).any()):
        raise InvalidArgumentError(f"{what} does not give each image token one aligned block of the {rows}x{cols} "
                                   "patches, so its tokens cannot be placed on a grid")
    return (rows // block[0], cols // block[1]), block, torch.stack([top // block[0], left // block[1]], dim=1)


def image_packing(vlm: nn.Module, pixel_values: torch.Tensor, tokens: int, **model_kwargs) -> ImagePacking:
    """Where the ``tokens`` image tokens of each prompt lie on the image, read from the model's own code.

    - One token per patch (LLaVA-1.5 and its kin, PaliGemma): the patch grid, CLS first under ``"full"``.
    - A coarser square grid (Gemma 3's average pooling; the pixel shuffle of InternVL, Idefics3, SmolVLM
      and Aya Vision): :func:`token_blocks` of :func:`token_rearrangement`; the map is the token grid.
      Idefics3/SmolVLM tiles ([B, tiles, 3, H, W]; each image's tiles, then the whole image resized to one
      tile): every tile's tokens in turn, and the map shows the last, the whole image.
    - Anyres crops (LLaVA-NeXT, LLaVA-OneVision; [B, crops, 3, H, W] and ``image_sizes``): the model's own
      ``pack_image_features`` on index-valued features (base view, tiles unpadded, newlines); the map shows
      the base view, crop 0.

    Raises:
        InvalidArgumentError: the tokens do not fit the packing (counts, several images per prompt), or the
            packing interpolates (OneVision's ``anyres_max_N`` above N crops' worth of patches).
    """
    config = vlm.config
    name = _family(config)
    batch = len(pixel_values)
    base = _multimodal_model(vlm)
    if callable(getattr(base, "pack_image_features", None)):
        return _anyres_packing(vlm, base, pixel_values, tokens, model_kwargs)
    if pixel_values.ndim not in (4, 5):
        raise InvalidArgumentError(f"{name}: pixel values of shape {list(pixel_values.shape)}; expected [B, 3, H, W] "
                                   "or, for tiles, [B, tiles, 3, H, W]")
    views = pixel_values.shape[1] if pixel_values.ndim == 5 else 1
    patch = _patch_side(config)
    grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
    found = token_rearrangement(vlm)
    if found is None:
        strategy = getattr(config, "vision_feature_select_strategy", None)
        leading = tokens - views * grid[0] * grid[1]
        if views != 1 or leading not in ((0, 1) if strategy == "full" else (0,)):
            raise InvalidArgumentError(
                f"{name}: {tokens} image tokens per prompt are not the tower's {grid[0]}x{grid[1]} = "
                f"{grid[0] * grid[1]} patches one to one" + (" (with CLS under 'full')" if strategy == "full" else "")
                + (f" of {views} tiles" if views != 1 else "") + "; other packings between the tower and the language "
                "model are not supported")
        patches = torch.arange(grid[0] * grid[1])
        places = torch.cat([torch.full((leading, 3), NOWHERE),
                            torch.stack([torch.zeros_like(patches), patches // grid[1], patches % grid[1]], dim=1)])
        places = places.expand(batch, -1, -1).clone()
        return ImagePacking("patch grid", 0, grid, (1, 1), leading, places, _cells(places, 0, grid, name))

    kind, rearrange = found
    token_grid, block, token_places = token_blocks(rearrange, grid, f"{name}'s {kind}")
    operation = f"{block[0]}x{block[1]} {kind}"
    kind = f"token grid of a {operation}"
    per_view = len(token_places)
    if tokens != views * per_view:
        what = f"{views} tiles of {per_view} tokens each" if views > 1 else f"{per_view} tokens"
        raise InvalidArgumentError(
            f"{name}: {tokens} image tokens per prompt, but its {operation} of the {grid[0]}x{grid[1]} patches gives "
            f"{what}: one image per prompt is supported"
            + (" (tiles and pan-and-scan crops count as images: turn them off in the processor)" if views == 1 else ""))
    view_of = torch.arange(views).repeat_interleave(per_view)[:, None]
    places = torch.cat([view_of, token_places.repeat(views, 1)], dim=1).expand(batch, -1, -1).clone()
    if views > 1:
        kind += f", the last of {views} tiles (the whole image; the other tiles not drawn)"
    return ImagePacking(kind, views - 1, token_grid, block, 0, places, _cells(places, views - 1, token_grid, name))


def _anyres_packing(vlm: nn.Module, base: nn.Module, pixel_values: torch.Tensor, tokens: int,
                    model_kwargs: dict) -> ImagePacking:
    """LLaVA-NeXT / OneVision: the model's ``pack_image_features`` on features that carry their own index.

    Each crop's feature i (CLS first under ``"full"`` when the tower has one) is ``(q, q**2)`` with q = 1 +
    crop * length + i, unique over the image; the newline is ``(-1, -1)``. What comes out is read back
    into ``(crop, row, col)``. A token whose q is not a whole number, or whose second channel is not q**2,
    mixes features (an interpolation): refused.
    """
    config = vlm.config
    name = _family(config)
    sizes = model_kwargs.get("image_sizes")
    if pixel_values.ndim != 5 or sizes is None:
        raise InvalidArgumentError(f"{name}: anyres tiles need pixel values [B, crops, 3, H, W] and image_sizes [B, 2] "
                                   f"(both from the model's processor); got pixel values {list(pixel_values.shape)}"
                                   + ("" if sizes is not None else " and no image_sizes"))
    counts = model_kwargs.get("batch_num_images")
    if counts is not None and any(int(count) != 1 for count in counts):
        raise InvalidArgumentError(f"{name}: {[int(count) for count in counts]} images per prompt; the map takes one")
    sizes = torch.as_tensor(sizes)
    if len(sizes) != len(pixel_values):
        raise InvalidArgumentError(f"{name}: {len(sizes)} image sizes for {len(pixel_values)} images")
    vision = config.vision_config
    side = vision.image_size // _patch_side(config)
    count_crops = getattr(sys.modules[type(base).__module__], "image_size_to_num_patches", None)
    if count_crops is None:
        raise UnsupportedModelError(f"{name}: its module has no image_size_to_num_patches to count the crops")
    crops = [int(count_crops(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                             patch_size=vision.image_size)) for size in sizes]
    parameters = inspect.signature(base.pack_image_features).parameters
    strategy = model_kwargs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
    ratio = model_kwargs.get("vision_aspect_ratio") or getattr(config, "vision_aspect_ratio", None)
    options = {}
    if "vision_feature_select_strategy" in parameters:
        options["vision_feature_select_strategy"] = strategy
    if "vision_aspect_ratio" in parameters and ratio is not None:
        options["vision_aspect_ratio"] = ratio
    newline = torch.full((2,), float(NOWHERE), dtype=torch.float64)
    lengths: list[int] = []
    for leading in ((0, 1) if strategy == "full" else (0,)):   # CLS kept under "full" if the tower has one
        length = leading + side * side
        features = []
        for count in crops:
            q = torch.arange(1, count * length + 1, dtype=torch.float64).view(count, length, 1)
            features.append(torch.cat([q, q * q], dim=-1))
        try:
            with torch.no_grad():
                packed, packed_lengths = base.pack_image_features(image_features=features, image_sizes=sizes,
                                                                  image_newline=newline, **options)
        except (RuntimeError, ValueError):   # e.g. a CLS the tiles cannot be viewed with
            continue
        lengths = [int(value) for value in packed_lengths]
        if all(value == tokens for value in lengths):
            break
    else:
        raise InvalidArgumentError(f"{name}: {tokens} image tokens per prompt, but its own packing of {crops} crops "
                                   f"(image sizes {sizes.tolist()}) gives {lengths or 'none'}: one image per prompt, "
                                   "as the processor expands it, is supported")
    places = torch.full((len(packed), tokens, 3), NOWHERE, dtype=torch.long)
    for image, values in enumerate(packed):
        q, square = values[:, 0], values[:, 1]
        is_newline = (q == NOWHERE) & (square == NOWHERE)
        exact = (q == q.round()) & (q >= 1) & (square == q * q) & (q <= crops[image] * length)
        index = (q[exact].long() - 1)
        if not (exact | is_newline).all() or torch.unique(index).numel() != len(index):
            because = (f"vision_aspect_ratio {ratio!r} interpolates an image above that many crops' worth of patches"
                       if ratio else "an interpolation")
            raise InvalidArgumentError(
                f"{name}: its packing mixes the patches of image {image} (size {sizes[image].tolist()}; {because}), so "
                "its tokens are no longer patches and the map is not supported: use smaller images or fewer "
                "image_grid_pinpoints")
        crop, within = index // length, index % length
        patch = within - leading
        is_patch = patch >= 0
        rows_of = torch.stack([crop, patch // side, patch % side], dim=1)
        token = exact.nonzero()[:, 0]
        places[image, token[is_patch]] = rows_of[is_patch]
    kind = "base view of the anyres crops" + (" (tiles and newlines not drawn)" if max(crops) > 1 else "")
    return ImagePacking(kind, 0, (side, side), (1, 1), leading, places, _cells(places, 0, (side, side), name))


def shown_view(pixel_values: torch.Tensor, packing: ImagePacking) -> torch.Tensor:
    """[B, 3, H, W]: the view of each image the map shows (the base crop of anyres tiles, the whole image of
    Idefics3 tiles); ``pixel_values`` as they are when there is one view."""
    return pixel_values[:, packing.view] if pixel_values.ndim == 5 else pixel_values


def _language_model(vlm: nn.Module) -> nn.Module:
    """The outermost submodule whose config is the VLM's ``text_config``: the decoder the answer comes from."""
    text_config = getattr(vlm.config, "text_config", None)
    for path, module in vlm.named_modules():
        if path and text_config is not None and getattr(module, "config", None) is text_config:
            return module
    raise UnsupportedModelError(f"{type(vlm).__name__} has no submodule whose config is its text_config")


def _attention_modules(language_model: nn.Module) -> list[tuple[nn.Module, int]]:
    """``(module, index)`` of each attention layer of a transformers decoder, in order: the modules its
    ``_can_record_outputs["attentions"]`` names, and where in their output tuple the probabilities are."""
    from transformers.utils.output_capturing import OutputRecorder

    declared = (getattr(language_model, "_can_record_outputs", None) or {}).get("attentions")
    declared = declared if isinstance(declared, (list, tuple)) else [declared] if declared is not None else []
    found = []
    for path, module in language_model.named_modules():
        for spec in declared:
            recorder = spec if isinstance(spec, OutputRecorder) else OutputRecorder(
                target_class=None if isinstance(spec, str) else spec, index=1,
                class_name=spec if isinstance(spec, str) else None)
            matches = ((recorder.target_class is not None and isinstance(module, recorder.target_class))
                       or (recorder.class_name is not None and path.endswith(recorder.class_name)))
            if matches and (recorder.layer_name is None or f".{recorder.layer_name.strip('.')}." in f".{path}."):
                found.append((module, recorder.index))
                break
    if not found:
        raise UnsupportedModelError(f"{type(language_model).__name__} declares no attention layers "
                                    "(_can_record_outputs['attentions']), so its answer attention cannot be read")
    return found


@contextlib.contextmanager
def eager_language_model(vlm: nn.Module):
    """Inside: the VLM's language model (only) uses eager attention, which returns its probabilities; on exit,
    also on an exception, its previous implementation comes back. The tower keeps its own."""
    text_config = vlm.config.text_config
    previous = text_config._attn_implementation
    if previous == "eager":
        yield
        return
    vlm.set_attn_implementation({"text_config": "eager"})
    try:
        yield
    finally:
        vlm.set_attn_implementation({"text_config": previous})


def _eos_ids(vlm: nn.Module) -> set[int]:
    eos = getattr(getattr(vlm, "generation_config", None), "eos_token_id", None)
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def answer_attention(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor, *,
                     attention_mask: torch.Tensor | None = None, image_token_id: int | None = None,
                     max_new_tokens: int = 1, **model_kwargs) -> AnswerAttention:
    """The language model's attention from the answer token(s) to the image tokens, per prompt.

    Runs ``model.generate`` greedily for ``max_new_tokens``. In every decoder layer a forward hook keeps
    the query row that predicts the next token (row -1: at prefill the last prompt row, which predicts
    the first answer token, then each generated token's row), at the image tokens' columns, averaged over
    the heads; nothing larger than [B, heads, T] is kept. Rows are then averaged over the answer tokens,
    each prompt's up to its first end-of-sequence token.

    Args:
        model: a vision-language model with ``generate`` (LLaVA and its kin, PaliGemma, Gemma 3, Aya Vision,
            InternVL, Idefics3, SmolVLM, LLaVA-NeXT, LLaVA-OneVision), or a :class:`ModifiedModel` around
            one, which runs it with test-time registers.
        input_ids: [B, S] from the model's processor, the image placeholder expanded into one token per
            image feature; left padding is fine.
        pixel_values: one image per prompt: [B, 3, H, W], or [B, crops, 3, H, W] for anyres crops
            (LLaVA-NeXT, OneVision; with ``image_sizes``) and Idefics3/SmolVLM tiles.
        attention_mask: [B, S], 0 at padding.
        image_token_id: the image token (default: the config's ``image_token_id`` / ``image_token_index``).
        max_new_tokens: answer tokens to generate and average over.
        model_kwargs: passed on to ``generate`` (e.g. ``image_sizes``).

    Returns:
        :class:`AnswerAttention`: ``per_layer`` [layers, B, T], ``maps`` [B, rows, cols] on the shown view's
        token grid (:func:`image_packing`).

    Raises:
        InvalidArgumentError: no image tokens, unequal counts per row, a packing that is not supported
            (see :func:`image_packing`), beam search.
        UnsupportedModelError: no ``generate``, or a language model that returns no attention probabilities.
    """
    check_int("max_new_tokens", max_new_tokens)
    vlm = model.model if isinstance(model, ModifiedModel) else model
    if not callable(getattr(model, "generate", None)):
        raise UnsupportedModelError(f"{type(vlm).__name__} has no generate(); pass the ...ForConditionalGeneration "
                                    "model, whose language-model head predicts the answer")
    config = vlm.config
    token = config_image_token(config) if image_token_id is None else image_token_id
    if len(pixel_values) != len(input_ids):
        raise InvalidArgumentError(f"{len(pixel_values)} images for {len(input_ids)} prompts: the map takes one "
                                   "image per prompt (InternVL's tiles and Gemma 3's pan-and-scan crops come as more "
                                   "images: turn them off in the processor, e.g. crop_to_patches=False, "
                                   "do_pan_and_scan=False)")
    positions = image_positions(input_ids, token)
    packing = image_packing(vlm, pixel_values, positions.shape[1], **model_kwargs)
    layers = _attention_modules(_language_model(vlm))

    device = vlm.get_input_embeddings().weight.device
    tower_weight = next(vlm.get_submodule(vision_tower_path(vlm)).parameters())
    inputs = {"input_ids": input_ids.to(device), "pixel_values": pixel_values.to(tower_weight.device,
                                                                                  dtype=tower_weight.dtype)}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask.to(device)
    rows: list[list[torch.Tensor]] = [[] for _ in layers]   # per layer, per forward call: [B, T]
    batch = len(input_ids)

    def keep_answer_rows(layer: int, index: int):
        def hook(module, args, output):
            weights = output[index] if isinstance(output, (tuple, list)) and len(output) > index else None
            if not isinstance(weights, torch.Tensor) or weights.ndim != 4:
                raise UnsupportedModelError(f"{type(module).__name__} returned no attention probabilities under "
                                            "eager attention, so the answer attention cannot be read")
            if weights.shape[0] != batch:
                raise InvalidArgumentError(f"the attention has {weights.shape[0]} rows for {batch} prompts; beam "
                                           "search and several sequences per prompt are not supported")
            last = weights[:, :, -1, :]                                            # [B, heads, keys]
            columns = positions.to(last.device)[:, None, :].expand(-1, last.shape[1], -1)
            rows[layer].append(last.gather(-1, columns).float().mean(dim=1).to(device))   # [B, T]

        return hook

    with contextlib.ExitStack() as stack:
        stack.enter_context(eager_language_model(vlm))
        for layer, (module, index) in enumerate(layers):
            stack.callback(module.register_forward_hook(keep_answer_rows(layer, index)).remove)
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens,
                                       **{"do_sample": False, **model_kwargs})
    steps = {len(layer_rows) for layer_rows in rows}
    if len(steps) != 1 or not steps.pop():
        raise UnsupportedModelError(f"the decoder layers of {type(vlm).__name__} ran unequal or zero times "
                                    f"({[len(layer_rows) for layer_rows in rows]}) during generate")
    attention = torch.stack([torch.stack(layer_rows) for layer_rows in rows], dim=1)   # [steps, layers, B, T]
    answers, valid = _answers(generated[:, input_ids.shape[1]:].cpu(), attention.shape[0], _eos_ids(vlm))
    valid = valid.to(attention.device)[:, None, :, None]                               # [steps, 1, B, 1]
    per_layer = (attention * valid).sum(dim=0) / valid.sum(dim=0)
    log.debug("answer attention: %d layers, %d answer step(s), %d image tokens, the map %s",
              len(layers), attention.shape[0], positions.shape[1], packing.describe())
    return AnswerAttention(per_layer.cpu(), positions.cpu(), packing, answers)


def _answers(new_ids: torch.Tensor, steps: int, eos: set[int]) -> tuple[list[list[int]], torch.Tensor]:
    """Each row's answer ids up to and including its first EOS, and which steps count: [steps, B] float, 1
    for the step that predicted an answer token of that row (steps after its EOS only pad)."""
    answers, valid = [], torch.zeros(steps, len(new_ids))
    for row, ids in enumerate(new_ids.tolist()):
        end = next((position + 1 for position, token in enumerate(ids) if token in eos), len(ids))
        answers.append(ids[:end])
        valid[:max(1, min(end, steps)), row] = 1
    return answers, valid


def read_layer_norms(hook_manager: HookManager, pixel_values: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """The tower's patch norms at block ``layer`` (default: the deepest block its language model reads,
    ``hook_manager.default_detect_layer``): [B, 3, H, W] -> [B, rows, cols], on the CPU. Pass a
    :class:`ModifiedModel`'s ``hook_manager`` for the norms with test-time registers."""
    layer = hook_manager.default_detect_layer if layer is None else hook_manager.check_layer(layer)
    with torch.no_grad(), hook_manager.capture(residual=[layer]) as captured:
        hook_manager.forward_images(pixel_values)
    norms = measures.patch_norms(captured.residual[layer], captured.layout)
    return norms.unflatten(1, hook_manager.grid_shape(pixel_values)).float().cpu()


# ---- numbers beside the maps ----------------------------------------------------------------
def default_top_k(patches: int) -> int:
    """How many highest-norm patches the attention mass is measured on: 1% of them, at least one (6 of 576)."""
    return max(1, round(patches / 100))


def top_norm_mass(shares: torch.Tensor, norms: torch.Tensor, k: int) -> torch.Tensor:
    """[B]: the share of each map that falls on the ``k`` patches with the largest ``norms``.

    ``shares`` and ``norms`` are [B, rows, cols] (or both [B, P]); ``shares`` sums to 1 per image. Pass the
    norms *before* test-time registers for both runs: they mark where the outliers were. When the map is
    a coarser token grid than the norms' patch grid (each token a block of patches, as after pooling or a
    pixel shuffle), it is the share on the tokens that hold those patches, each token counted once.
    """
    flat_norms = norms.flatten(1)
    top = torch.zeros_like(flat_norms, dtype=torch.bool).scatter_(
        1, flat_norms.topk(min(k, flat_norms.shape[1]), dim=1).indices, True)
    if shares.ndim == 3 and tuple(shares.shape[1:]) != tuple(norms.shape[1:]):
        (rows, cols), (patch_rows, patch_cols) = shares.shape[1:], norms.shape[1:]
        if patch_rows % rows or patch_cols % cols:
            raise InvalidArgumentError(f"a {rows}x{cols} map does not divide the {patch_rows}x{patch_cols} patch grid "
                                       "into blocks")
        top = top.view(len(top), rows, patch_rows // rows, cols, patch_cols // cols).any(dim=4).any(dim=2).flatten(1)
    return (shares.flatten(1) * top).sum(dim=1)


def normalised_entropy(shares: torch.Tensor) -> torch.Tensor:
    """[B]: the entropy of each map [B, rows, cols] (summing to 1) over that of a uniform map: 1 for
    attention spread evenly over the patches, near 0 for attention on one patch."""
    flat = shares.flatten(1).double().clamp_min(0)
    entropy = -(flat * flat.clamp_min(1e-30).log()).sum(dim=1)
    return (entropy / math.log(flat.shape[1])).float() if flat.shape[1] > 1 else torch.zeros(len(flat))


@dataclass
class ImageNumbers:
    """One image's numbers, before and after: see :func:`image_numbers`."""

    top_k: int
    top_norm_mass: dict[str, float]      # share of the image attention on the top-k-norm patches (before's norms)
    on_image: dict[str, float]           # share of the answer's attention on the image tokens
    entropy: dict[str, float]            # normalised entropy of the image-attention map
    max_over_median: dict[str, float]    # largest patch norm over the median one, at the read layer


def image_numbers(before: AnswerAttention, after: AnswerAttention, norms_before: torch.Tensor,
                  norms_after: torch.Tensor, top_k: int | None = None) -> list[ImageNumbers]:
    """Per image, the numbers printed beside the maps. ``norms_*`` are [N, rows, cols] on the shown view's
    patch grid; the top-k patches are those with the largest norms before, where the outliers were."""
    patches = norms_before.shape[1] * norms_before.shape[2]
    k = default_top_k(patches) if top_k is None else min(check_int("top_k", top_k), patches)
    attention = {BEFORE: before, AFTER: after}
    norms = {BEFORE: norms_before.float(), AFTER: norms_after.float()}
    mass = {when: top_norm_mass(attention[when].patch_shares, norms_before, k) for when in WHEN}
    entropy = {when: normalised_entropy(attention[when].patch_shares) for when in WHEN}
    ratio = {when: measures.max_over_median(norms[when].flatten(1)) for when in WHEN}
    return [ImageNumbers(k, {when: float(mass[when][i]) for when in WHEN},
                         {when: float(attention[when].on_image[i]) for when in WHEN},
                         {when: float(entropy[when][i]) for when in WHEN},
                         {when: float(ratio[when][i]) for when in WHEN}) for i in range(before.num_images)]


# ---- the whole thing, for a command line ------------------------------------------------------
@dataclass
class AnswerAttentionViews:
    """What :func:`draw_views` draws, for N images and one prompt; CPU tensors. ``"before"`` is the unmodified
    model, ``"after"`` the :class:`ModifiedModel`."""

    model: str
    prompt: str                              # the text given to the processor, image placeholder included
    names: list[str]                         # [N]
    pixels: torch.Tensor                     # [N, H, W, 3] the view the maps show, as the tower saw it, RGB in 0..1
    read_layer: int
    norms: dict[str, torch.Tensor]           # {when: [N, rows, cols]} that view's patch norms at read_layer
    attention: dict[str, AnswerAttention]    # {when: ...}
    answers: dict[str, list[str]] = field(default_factory=dict)   # {when: [N] decoded answers}
    num_registers: int = 1

    @property
    def num_images(self) -> int:
        return len(self.names)

    def numbers(self, top_k: int | None = None) -> list[ImageNumbers]:
        return image_numbers(self.attention[BEFORE], self.attention[AFTER], self.norms[BEFORE], self.norms[AFTER],
                             top_k)


def load_processor(source: str):
    """The processor saved with a vision-language model (a hub id, from the cache when offline, or a folder).

    Raises:
        ModelLoadError: none can be loaded, or it has no tokenizer and image processor.
    """
    from transformers import AutoProcessor

    def load():
        return AutoProcessor.from_pretrained(source)

    try:
        processor = load() if is_local_folder(source) else load_pretrained(
            load, f"the processor of {source}", f"Download it with the model (hf download {source} --local-dir DIR), "
                                                "then pass hf:DIR.")
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - missing files, unknown types: each library raises its own
        raise ModelLoadError(f"could not load the processor of {source} (the tokenizer and image processor saved "
                             f"with the model, processor.save_pretrained(DIR)): {first_line(error)}") from error
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(f"the processor of {source} ({type(processor).__name__}) is not a vision-language "
                             "processor with a tokenizer and an image processor")
    return processor


def prompt_text(processor, prompt: str) -> str:
    """The text for the processor: ``prompt`` as it is when it holds the image placeholder; else the
    processor's chat template around one user turn (the image, then ``prompt``) when it has one; else
    the placeholder, a newline and ``prompt``."""
    placeholder = getattr(processor, "image_token", None) or "<image>"
    if placeholder in prompt:
        return prompt
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{placeholder}\n{prompt}"


def check_answer_attention(vlm: nn.Module, processor, prompt: str) -> tuple[int, int]:
    """Before any work: the processor's inputs for ``prompt`` and one blank image fit what
    :func:`answer_attention` supports for ``vlm``. Returns the map's grid ``(rows, cols)``: the patch grid
    when the tokens are the patches, else the shown view's token grid (:func:`image_packing`).

    Raises:
        InvalidArgumentError: an empty prompt, no image tokens, or a packing not supported yet.
        UnsupportedModelError: the model names no image token or patch size.
    """
    from PIL import Image

    if not prompt.strip():
        raise InvalidArgumentError("the prompt is empty")
    side = getattr(getattr(vlm.config, "vision_config", None), "image_size", 224)
    side = side if isinstance(side, int) else side[0]
    inputs = processor(images=[Image.new("RGB", (side, side))], text=[prompt_text(processor, prompt)],
                       return_tensors="pt")
    input_ids, pixel_values = inputs.pop("input_ids"), inputs.pop("pixel_values")
    positions = image_positions(input_ids, config_image_token(vlm.config))
    return image_packing(vlm, pixel_values, positions.shape[1], **inputs).grid


def compare_answer_attention(loaded: "LoadedModel", neurons, images, prompt: str, processor, *, num_images: int = 4,
                             num_registers: int = 1, max_new_tokens: int = 1, batch_size: int = 4,
                             edit: Edit | None = None, seed: int = 0, progress: bool = True) -> AnswerAttentionViews:
    """The answer attention and the read layer's patch norms of the first ``num_images`` images, before and
    after test-time registers, for one prompt.

    Args:
        loaded: a vision-language model from ``load_model("hf:DIR")`` (``.model``, ``.hook_manager``).
        neurons: register neurons of its tower.
        images: a folder, an :class:`~test_time_registers.ImageFolder` or PIL images.
        prompt: the question; see :func:`prompt_text` for where the image goes.
        processor: the model's processor (:func:`load_processor`), which resizes the images and expands
            the image placeholder into the image tokens.
        max_new_tokens: answer tokens averaged over.

    Raises:
        InvalidArgumentError: the model is not a vision-language model, or one whose packing is not supported.
        ImageSourceError: no readable image.
    """
    check_int("num_images", num_images)
    check_int("batch_size", batch_size)
    hook_manager = loaded.hook_manager
    if hook_manager.read_layers is None:
        raise InvalidArgumentError(f"{hook_manager.name} is not a vision-language model: no language model reads "
                                   "its tower")
    if not prompt.strip():
        raise InvalidArgumentError("the prompt is empty")
    named = list(itertools.islice(named_images(images), num_images))
    if not named:
        raise ImageSourceError(no_images_message(images))
    modified = ModifiedModel(loaded.model, hook_manager, neurons, num_registers=num_registers, edit=edit, seed=seed)
    runs = {BEFORE: (loaded.model, hook_manager), AFTER: (modified, modified.hook_manager)}
    text = prompt_text(processor, prompt)
    read_layer = hook_manager.default_detect_layer
    parts: dict[str, dict[str, list]] = {key: {when: [] for when in WHEN} for key in ("attention", "norms", "answers")}
    pixels = []
    for start in tqdm(range(0, len(named), batch_size), desc="answer attention", unit="batch", disable=not progress):
        chosen = [image for _, image in named[start:start + batch_size]]
        inputs = processor(images=chosen, text=[text] * len(chosen), return_tensors="pt", padding=True,
                           padding_side="left")
        pixel_values, input_ids = inputs.pop("pixel_values"), inputs.pop("input_ids")
        shown = None
        for when, (model, run_hook_manager) in runs.items():   # the rest of inputs: attention_mask, image_sizes, ...
            attention = answer_attention(model, input_ids, pixel_values, max_new_tokens=max_new_tokens, **inputs)
            shown = shown_view(pixel_values, attention.packing)   # the view the map shows: its pixels and norms
            parts["attention"][when].append(attention)
            parts["norms"][when].append(read_layer_norms(run_hook_manager, shown, read_layer))
            parts["answers"][when] += processor.batch_decode(attention.answer_ids, skip_special_tokens=True)
        pixels.append(display_pixels(shown, ProcessorTransform(processor.image_processor)).cpu())
    return AnswerAttentionViews(
        model=hook_manager.name, prompt=text, names=[name for name, _ in named], pixels=torch.cat(pixels),
        read_layer=read_layer, norms={when: torch.cat(parts["norms"][when]) for when in WHEN},
        attention={when: AnswerAttention.cat(parts["attention"][when]) for when in WHEN},
        answers={when: [answer.strip() for answer in parts["answers"][when]] for when in WHEN},
        num_registers=num_registers)


# ---- drawing --------------------------------------------------------------------------------
def draw_answer_attention(before: AnswerAttention, after: AnswerAttention, images: torch.Tensor,
                          norms_before: torch.Tensor, norms_after: torch.Tensor, *, read_layer: int | None = None,
                          names: Sequence[str] | None = None, answers: dict[str, Sequence[str]] | None = None,
                          prompt: str | None = None, model: str = "", top_k: int | None = None,
                          num_registers: int = 1) -> "Figure":
    """One row per image: the input, the tower's patch norms at the read layer before and after, the
    answer's attention over the image tokens' grid before and after, and the same upsampled over the input.

    The map is drawn on the grid of the language model's image tokens (:class:`ImagePacking`): the patch
    grid when the tokens are the patches, a coarser token grid after pooling or a pixel shuffle (Gemma 3:
    16x16 tokens of 4x4 patches), the base view of anyres crops, the whole image of Idefics3 tiles; the
    norms stay on that view's patch grid. ``images`` are that view. The attention maps are renormalised
    over their cells (each sums to 1), so that before and after compare even when the answers put
    different shares of their attention on the image; that share (all image tokens) is printed under them,
    with the share on the top-k-norm patches (k highest norms before, where the outliers were; on a token
    grid, the tokens that hold them) and the map's entropy over a uniform map's. Norms share one colour scale per row,
    from 0, and so do the attention maps and overlays. Every axes is labelled, e.g.
    ``"attention variant=after image=0"``; the kinds are ``input``, ``norms``, ``attention`` and ``overlay``.

    Args:
        before, after: the answer attention of the unmodified model and of the :class:`ModifiedModel`.
        images: [N, H, W, 3] RGB in 0..1, the shown view as the tower saw it (:func:`shown_view`,
            :func:`~.visualize.display_pixels`).
        norms_before, norms_after: [N, rows, cols] that view's patch norms at the read layer
            (:func:`read_layer_norms`): ``before.packing.patch_grid``.
        answers: ``{"before": [N], "after": [N]}`` decoded answers, shown under the inputs.
    """
    count = before.num_images
    if after.num_images != count or len(images) < count or len(norms_before) < count or len(norms_after) < count:
        raise InvalidArgumentError(f"before has {count} images, after {after.num_images}, images {len(images)}, "
                                   f"norms {len(norms_before)} and {len(norms_after)}: give one of each per image")
    patch_grid = before.packing.patch_grid
    if (before.grid, before.packing.block) != (after.grid, after.packing.block) or \
            tuple(norms_before.shape[1:]) != patch_grid or tuple(norms_after.shape[1:]) != patch_grid:
        raise InvalidArgumentError(f"the maps must share one grid: attention {before.grid} and {after.grid} (patch "
                                   f"grid {patch_grid}), norms {tuple(norms_before.shape[1:])} and "
                                   f"{tuple(norms_after.shape[1:])}")
    numbers = image_numbers(before, after, norms_before, norms_after, top_k)
    shares = {BEFORE: before.patch_shares, AFTER: after.patch_shares}
    norms = {BEFORE: norms_before.float().cpu(), AFTER: norms_after.float().cpu()}
    height, width = images.shape[1:3]
    figure = new_figure(7 * PANEL + 1.2, count * (PANEL + 0.75) + 1.0)
    grid = figure.add_gridspec(count, 9, width_ratios=[1, 1, 1, 0.07, 1, 1, 0.07, 1, 1])
    layer_text = f"block {read_layer}" if read_layer is not None else "the read layer"
    for image in range(count):
        picture = images[image].float().cpu().numpy()
        ax = figure.add_subplot(grid[image, 0])
        ax.imshow(picture, interpolation="bilinear")
        _plain(ax, f"input image={image}")
        name = names[image] if names is not None else f"image {image}"
        ax.set_title(name if len(name) <= 28 else "..." + name[-25:], fontsize=8)
        if answers:
            ax.set_xlabel("\n".join(f"{when}: {_quoted(answers[when][image])}" for when in WHEN), fontsize=7)

        high = max(float(norms[when][image].max()) for when in WHEN)
        for column, when in enumerate(WHEN, start=1):
            ax = figure.add_subplot(grid[image, column])
            artist = ax.imshow(norms[when][image].numpy(), cmap=COLOUR_MAP, vmin=0.0, vmax=high,
                               interpolation="nearest")
            _plain(ax, f"norms variant={when} image={image}")
            ax.set_title(f"norms, {layer_text}\n{when}", fontsize=8)
            ax.set_xlabel(f"largest/median {numbers[image].max_over_median[when]:.3g}", fontsize=7)
        _colour_bar(figure, artist, grid[image, 3], f"colour bar norms image={image}", "patch norm")

        top = max(max(float(shares[when][image].max()) for when in WHEN), 1.0 / (before.grid[0] * before.grid[1]))
        for column, when in enumerate(WHEN, start=4):
            ax = figure.add_subplot(grid[image, column])
            artist = ax.imshow(shares[when][image].numpy(), cmap=COLOUR_MAP, vmin=0.0, vmax=top,
                               interpolation="nearest")
            _plain(ax, f"attention variant={when} image={image}")
            ax.set_title(f"answer attention\n{when}", fontsize=8)
            item = numbers[image]
            ax.set_xlabel(f"top-{item.top_k} norm patches {item.top_norm_mass[when]:.0%}\n"
                          f"on image tokens {item.on_image[when]:.0%}\nentropy {item.entropy[when]:.2f} of max",
                          fontsize=7)
        _colour_bar(figure, artist, grid[image, 6], f"colour bar attention image={image}", "share of image attention")

        for column, when in enumerate(WHEN, start=7):
            ax = figure.add_subplot(grid[image, column])
            upsampled = torch.nn.functional.interpolate(shares[when][image][None, None], size=(height, width),
                                                        mode="bilinear", align_corners=False)[0, 0]
            ax.imshow(picture, interpolation="bilinear")
            ax.imshow(upsampled.numpy(), cmap=COLOUR_MAP, vmin=0.0, vmax=top, alpha=0.6, interpolation="bilinear")
            _plain(ax, f"overlay variant={when} image={image}")
            ax.set_title(f"over the input\n{when}", fontsize=8)
    registers = f"{num_registers} test-time register" + ("" if num_registers == 1 else "s")
    shown_prompt = "" if prompt is None else f"; prompt {_quoted(prompt, 60)}"
    top_k_text = "" if before.packing.block == (1, 1) else "; top-k norm patches: the tokens that hold them"
    _suptitle(figure, f"Answer-token attention to the image, before and after {registers}\n"
                      f"{model + '; ' if model else ''}attention: mean over {before.per_layer.shape[0]} layers and "
                      f"all heads, renormalised over {before.packing.describe()}{top_k_text}{shown_prompt}", fontsize=9)
    return figure


def draw_views(views: AnswerAttentionViews, top_k: int | None = None) -> "Figure":
    """:func:`draw_answer_attention` of everything :func:`compare_answer_attention` gathered."""
    return draw_answer_attention(views.attention[BEFORE], views.attention[AFTER], views.pixels, views.norms[BEFORE],
                                 views.norms[AFTER], read_layer=views.read_layer, names=views.names,
                                 answers=views.answers, prompt=views.prompt, model=views.model, top_k=top_k,
                                 num_registers=views.num_registers)


def _plain(ax, label: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_label(label)


def _colour_bar(figure: "Figure", artist, cell, label: str, title: str) -> None:
    bar = figure.colorbar(artist, cax=figure.add_subplot(cell))
    bar.ax.tick_params(labelsize=6)
    bar.ax.set_label(label)
    bar.set_label(title, fontsize=7)


def _quoted(text: str, limit: int = 24) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit - 3] + "...")

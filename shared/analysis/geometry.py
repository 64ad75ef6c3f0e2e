"""Where an image's pixels land in the model's input, through the real preprocessing.

Evaluation transforms resize, centre-crop and pad: DINOv2's resizes the shorter side to 256 and
crops 224, timm's resizes to ``size / crop_pct`` and crops, open_clip's resizes the shorter side
and crops, transformers' image processors do the same from their config. A box drawn on the
image must go through the same steps before it is compared with anything the model produced.

:func:`preprocess_geometry` follows a preprocessing step by step (a torchvision ``Compose``, a
transformers image processor behind :class:`~test_time_registers.hf.ProcessorTransform`, or any
other callable as one step). Each step is measured, not assumed, on two probe images:

* a *coordinate image*, whose pixels spell their own column (or row) in two bytes: a step that
  only crops or pads returns those pixels shifted, which gives its offset exactly;
* a *ramp*, smooth in x and y: a step that resizes returns it resampled, and the ramp confirms that
  the whole image was mapped onto the whole output (a resize), not part of it.

A step that keeps the size and changes values (``ToTensor``, ``Normalize``) moves nothing. A step
that is none of these (a flip, a rotation, a resize that also crops) raises
:class:`~test_time_registers.InvalidArgumentError`, naming the step. The result is one
axis-aligned map, ``input = scale * image + offset`` per axis, in continuous pixel coordinates
(0 at the image's left/top edge), and the input's size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidArgumentError

#: A resize step's ramp may differ from the predicted one by this many 8-bit levels (rounding, filters).
RAMP_TOLERANCE = 3.0


@dataclass(frozen=True)
class Geometry:
    """``input = scale * image + offset`` per axis, and the input's size.

    Attributes:
        scale: (x, y) input pixels per image pixel.
        offset: (x, y) in input pixels.
        size: the input's (height, width).
        image_size: the image's (width, height), as PIL gives it.
    """

    scale: tuple[float, float]
    offset: tuple[float, float]
    size: tuple[int, int]
    image_size: tuple[int, int]

    def boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes [N, 4] (left, top, right, bottom, image pixels) in input pixels, clipped to the input.

        Returns ``(boxes [K, 4], kept [N] bool)``: the boxes with any area left in the input, and
        which of the given ones they are (a box the crop removed entirely is dropped).
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        (sx, sy), (ox, oy), (height, width) = self.scale, self.offset, self.size
        mapped = boxes * np.array([sx, sy, sx, sy]) + np.array([ox, oy, ox, oy])
        mapped = np.clip(mapped, 0, np.array([width, height, width, height], dtype=np.float64))
        kept = (mapped[:, 2] > mapped[:, 0]) & (mapped[:, 3] > mapped[:, 1])
        return mapped[kept], kept

    def source_coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """The image coordinates (x [width], y [height]) of every input pixel's centre."""
        (sx, sy), (ox, oy), (height, width) = self.scale, self.offset, self.size
        return (np.arange(width) + 0.5 - ox) / sx, (np.arange(height) + 0.5 - oy) / sy

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """A mask [H, W] of the image (any dtype: bool, class indices, depth) as the input sees it,
        [height, width], by nearest sampling at each input pixel's centre; ``0`` (``False``) where
        the input shows no image (padding)."""
        mask = np.asarray(mask)
        if mask.shape[:2] != (self.image_size[1], self.image_size[0]):
            raise InvalidArgumentError(f"a mask of {mask.shape[1]}x{mask.shape[0]} pixels for an image of "
                                       f"{self.image_size[0]}x{self.image_size[1]}")
        xs, ys = self.source_coordinates()
        columns, rows = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
        inside = (columns[None, :] >= 0) & (columns[None, :] < mask.shape[1]) \
            & (rows[:, None] >= 0) & (rows[:, None] < mask.shape[0])
        sampled = mask[np.clip(rows, 0, mask.shape[0] - 1)[:, None], np.clip(columns, 0, mask.shape[1] - 1)[None, :]]
        return np.where(inside.reshape(inside.shape + (1,) * (sampled.ndim - 2)), sampled, np.zeros((), mask.dtype))

    def view(self, image: Image.Image) -> Image.Image:
        """The image as the model sees it (before normalisation): resampled onto the input's pixels."""
        (sx, sy), (ox, oy), (height, width) = self.scale, self.offset, self.size
        box = (-ox / sx, -oy / sy, (width - ox) / sx, (height - oy) / sy)   # the input's extent, in image pixels
        return image.convert("RGB").resize((width, height), Image.BICUBIC, box=box)


class Geometries:
    """:func:`preprocess_geometry` of one preprocessing, measured once per image size."""

    def __init__(self, preprocess: Callable):
        self.preprocess = preprocess
        self._by_size: dict[tuple[int, int], Geometry] = {}

    def __call__(self, image_size: tuple[int, int]) -> Geometry:
        if image_size not in self._by_size:
            self._by_size[image_size] = preprocess_geometry(self.preprocess, image_size)
        return self._by_size[image_size]


def transform_boxes(boxes: np.ndarray, image_size: tuple[int, int], preprocess: Callable) -> np.ndarray:
    """Boxes [N, 4] drawn on an image of ``image_size`` (width, height) in the model's input pixels.

    Returns [K, 4] (left, top, right, bottom), clipped to the input; boxes that the preprocessing
    crops away entirely are dropped (compare K with N to know).
    """
    return preprocess_geometry(preprocess, image_size).boxes(boxes)[0]


def transform_mask(mask: np.ndarray, preprocess: Callable) -> np.ndarray:
    """A mask [H, W] of an image (bool, class indices or any per-pixel value) in the model's input pixels."""
    mask = np.asarray(mask)
    return preprocess_geometry(preprocess, (mask.shape[1], mask.shape[0])).mask(mask)


# ---------------------------------------------------------------------------- following the steps

def preprocess_geometry(preprocess: Callable, image_size: tuple[int, int]) -> Geometry:
    """How ``preprocess`` maps an image of ``image_size`` (width, height) onto the model's input.

    Raises:
        InvalidArgumentError: a step moves pixels in a way that is not a resize, crop or pad
            (it is named), or the image size is not positive.
    """
    width, height = (int(side) for side in image_size)
    if width < 1 or height < 1:
        raise InvalidArgumentError(f"image size must be positive, got {image_size}")
    scale, offset = np.ones(2), np.zeros(2)
    current: Callable[[np.ndarray], object] = Image.fromarray   # makes a probe in the format the next step takes
    for step in _steps(preprocess):
        coded = [step(current(_coordinates(width, height, axis))) for axis in (0, 1)]
        (out_height, out_width), _ = _read(coded[0])
        shifts = [_shift(_read(output)[1], axis, (width, height)[axis]) for axis, output in enumerate(coded)]
        if (out_height, out_width) == (height, width):                # values change (Normalize), pixels stay
            if any(shift not in (0, _UNREADABLE) for shift in shifts):
                raise InvalidArgumentError(f"cannot follow boxes through {_name(step)}: it moves pixels without "
                                           "changing the image's size (a flip or a roll?)")
        else:
            if all(isinstance(shift, int) for shift in shifts):       # a crop or a pad: pixels shifted, not resampled
                offset -= np.array(shifts, dtype=np.float64)
            else:                                                     # a resize of the whole image, verified
                _check_resize(step, current, (width, height), (out_width, out_height))
                factor = np.array([out_width / width, out_height / height])
                scale, offset = scale * factor, offset * factor
        width, height = out_width, out_height
        current = _format_of(coded[0])
    return Geometry(tuple(scale.tolist()), tuple(offset.tolist()), (height, width), tuple(int(s) for s in image_size))


def _steps(preprocess: Callable) -> list[Callable]:
    """The steps of a preprocessing: a ``Compose``'s transforms, an image processor's resize, crop and pad."""
    if isinstance(getattr(preprocess, "transforms", None), Sequence) and not isinstance(preprocess.transforms, str):
        return [step for inner in preprocess.transforms for step in _steps(inner)]
    processor = getattr(preprocess, "processor", None)
    if processor is not None and hasattr(processor, "do_resize"):
        return _processor_steps(processor)
    return [preprocess]


class _ProcessorStep:
    """One geometric step of a transformers image processor (the others switched off), PIL -> [3, H, W] in [0, 1]."""

    SWITCHES = ("do_resize", "do_center_crop", "do_pad")

    def __init__(self, processor, switch: str):
        self.processor, self.switch = processor, switch

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            image = Image.fromarray((image.permute(1, 2, 0) * 255).round().clamp(0, 255).byte().numpy())
        settings = {name: name == self.switch for name in self.SWITCHES if hasattr(self.processor, name)}
        pixels = self.processor(images=image, do_rescale=False, do_normalize=False, return_tensors="pt",
                                **settings)["pixel_values"][0]
        return pixels.float() / 255

    def __repr__(self) -> str:
        return f"{type(self.processor).__name__}({self.switch})"


def _processor_steps(processor) -> list[Callable]:
    return [_ProcessorStep(processor, switch) for switch in _ProcessorStep.SWITCHES if getattr(processor, switch, False)]


def _name(step: Callable) -> str:
    return getattr(step, "__name__", None) or repr(step)


def _coordinates(width: int, height: int, axis: int) -> np.ndarray:
    """[H, W, 3] uint8: each pixel's column (axis 0) or row (axis 1) plus one in R (high byte) and G (low
    byte); B is 255 on the image, so that padding (of any other fill) is told apart."""
    index = np.arange(1, (width if axis == 0 else height) + 1)
    index = np.broadcast_to(index[None, :] if axis == 0 else index[:, None], (height, width))
    return np.stack([index >> 8, index & 255, np.full_like(index, 255)], axis=-1).astype(np.uint8)


def _ramp(width: int, height: int) -> np.ndarray:
    """[H, W, 3] uint8: x in R and y in G, each 0..255 over the image (at pixel centres); B is 255."""
    xs = np.broadcast_to(255 * (np.arange(width) + 0.5)[None, :] / width, (height, width))
    ys = np.broadcast_to(255 * (np.arange(height) + 0.5)[:, None] / height, (height, width))
    return np.stack([xs, ys, np.full((height, width), 255.0)], axis=-1).round().astype(np.uint8)


def _read(output) -> tuple[tuple[int, int], np.ndarray | None]:
    """A step's output as ((height, width), [H, W, 3] float 0..255 or None when its values say nothing)."""
    if isinstance(output, Image.Image):
        return (output.height, output.width), np.asarray(output.convert("RGB"), dtype=np.float64)
    if isinstance(output, np.ndarray):
        output = torch.from_numpy(output).permute(2, 0, 1) if output.ndim == 3 and output.shape[-1] == 3 else \
            torch.from_numpy(output)
    if isinstance(output, torch.Tensor) and output.ndim == 3:
        size = tuple(output.shape[-2:])
        values = output.detach().float()
        if output.dtype.is_floating_point:
            values = values * 255
        if output.shape[0] != 3:
            return size, None
        return size, values.permute(1, 2, 0).cpu().numpy().astype(np.float64)
    raise InvalidArgumentError(f"a preprocessing step returned {type(output).__name__}, not an image or a tensor "
                               "[3, H, W]")


_UNREADABLE = "unreadable"


def _shift(values: np.ndarray | None, axis: int, length: int) -> int | None | str:
    """How many pixels a coordinate image was shifted by (source index - output index); None when its
    pixels were moved otherwise (resampled, flipped), ``_UNREADABLE`` when its values no longer spell
    coordinates 0..``length`` - 1 (a step that changed values, as ``Normalize``)."""
    if values is None or values.min() < -0.5 or values.max() > 255.5:
        return _UNREADABLE
    image = np.abs(values[..., 2] - 255) < 0.5
    index = np.round(values[..., 0]) * 256 + np.round(values[..., 1]) - 1
    if not image.any() or index[image].min() < 0 or index[image].max() >= length:
        return _UNREADABLE
    exact = (np.abs(values[..., :2] - np.round(values[..., :2])) < 1e-3).all(axis=-1)
    positions = np.indices(index.shape)[1 - axis]          # columns for axis 0, rows for axis 1
    shifts = (index - positions)[image]
    if not exact[image].all() or shifts.min() != shifts.max():
        return None
    return int(shifts[0])


def _format_of(output) -> Callable[[np.ndarray], object]:
    """A function making probes [H, W, 3] uint8 in the format of ``output`` (what the next step takes)."""
    if isinstance(output, Image.Image):
        return Image.fromarray
    if isinstance(output, torch.Tensor):
        if output.dtype.is_floating_point:
            return lambda array: torch.from_numpy(array).permute(2, 0, 1).to(output.dtype) / 255
        return lambda array: torch.from_numpy(array).permute(2, 0, 1).to(output.dtype)
    return lambda array: array


def _check_resize(step: Callable, current: Callable, before: tuple[int, int], after: tuple[int, int]) -> None:
    """Raise unless ``step`` maps the whole image onto the whole output: its ramp must come out resampled."""
    (width, height), (out_width, out_height) = before, after
    _, values = _read(step(current(_ramp(width, height))))
    if values is None:
        raise InvalidArgumentError(f"cannot follow boxes through {_name(step)}: its output says nothing about "
                                   "where the pixels went")
    xs = 255 * ((np.arange(out_width) + 0.5) * width / out_width) / width     # the ramp at each output pixel's source
    ys = 255 * ((np.arange(out_height) + 0.5) * height / out_height) / height
    margin_x, margin_y = max(2, out_width // 16), max(2, out_height // 16)     # filters bend the ramp at the edges
    inner_x, inner_y = slice(margin_x, out_width - margin_x), slice(margin_y, out_height - margin_y)
    error_x = np.abs(values[inner_y, inner_x, 0] - xs[None, inner_x]).max(initial=0)
    error_y = np.abs(values[inner_y, inner_x, 1] - ys[inner_y, None]).max(initial=0)
    if max(error_x, error_y) > RAMP_TOLERANCE:
        raise InvalidArgumentError(f"cannot follow boxes through {_name(step)}: it changes the size from "
                                   f"{width}x{height} to {out_width}x{out_height} but is neither a resize of the "
                                   "whole image nor a crop or pad")

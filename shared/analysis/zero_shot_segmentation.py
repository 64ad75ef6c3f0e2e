"""Zero-shot segmentation from the CLS token's attention (Jiang et al., Table 4, on ImageNet-S).

Per image, the last block's CLS attention over the patches (mean over heads, renormalised over
the patches) is upsampled bilinearly to the model's input pixels, scaled to [0, 1] and
thresholded at its mean: above is foreground. Against the dataset's masks, in the same input
pixels (the masks follow the preprocessing's resize and crop, :mod:`~.geometry`), it is scored
with

* pixel accuracy: correct pixels / labelled pixels, over the dataset;
* mIoU: the mean of the foreground's and the background's IoU, each over the dataset;
* mAP: the mean over images of the average precision of the continuous map (before the
  threshold) at telling foreground pixels from background ones.

Each comes with a 95% bootstrap interval over images. A register that takes the attention that
outliers held back gives a map that falls on the object.

Data: ImageNet-S (Gao et al., TPAMI 2022), as distributed::

    ROOT/validation/<class>/<name>.JPEG
    ROOT/validation-segmentation/<class>/<name>.png

Each mask is an RGB PNG whose class is ``G * 256 + R``: 0 is background, 1000 is ignored, any
other value is an object's class (foreground here). Single-channel masks are read as the class
directly. Other splits (``train-semi``) follow the same pattern.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import measures
from ..data.sources import UnreadableImage, printable, read_image, read_label_map, read_or_skip
from ..errors import ImageSourceError, InvalidArgumentError
from ..hooks import HookManager
from .evaluation import Comparison, Row
from .figures import new_figure
from .geometry import Geometries
from .intervals import bootstrap_interval

log = logging.getLogger(__name__)

#: ImageNet-S marks pixels to ignore with this class.
IMAGENET_S_IGNORE = 1000
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
FOREGROUND, BACKGROUND, IGNORED = 1, 0, -1


# ---------------------------------------------------------------------------- data

@dataclass(frozen=True)
class SegmentedImage:
    """An image file and its mask file."""

    name: str
    image: Path
    mask: Path

    def read(self) -> tuple[Image.Image, np.ndarray]:
        """The image (RGB) and its foreground [H, W] int8 (1 foreground, 0 background, -1 ignored).

        Raises:
            UnreadableImage: either file cannot be read, or the mask's size is not the image's.
        """
        image = read_image(self.image)
        foreground = read_foreground(self.mask)
        if foreground.shape != (image.height, image.width):
            raise UnreadableImage(f"its mask is {foreground.shape[1]}x{foreground.shape[0]} pixels, the image "
                                  f"{image.width}x{image.height}")
        return image, foreground


@dataclass
class SegmentationSet:
    """Images with foreground masks; ``skipped`` names the files that could not be used."""

    items: list[SegmentedImage]
    description: str
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


def read_foreground(path: Path) -> np.ndarray:
    """An ImageNet-S mask as foreground [H, W] int8: 1 for an object's class, 0 for background, -1 ignored."""
    values = read_label_map(path)
    if values.ndim == 3:
        if values.shape[2] < 2:
            raise UnreadableImage(f"a mask with {values.shape[2]} channel(s)")
        classes = values[..., 1].astype(np.int64) * 256 + values[..., 0].astype(np.int64)
    else:
        classes = values.astype(np.int64)
    foreground = np.where(classes > 0, FOREGROUND, BACKGROUND).astype(np.int8)
    foreground[classes == IMAGENET_S_IGNORE] = IGNORED
    return foreground


def imagenet_s_folder(root: str | Path, *, split: str = "validation", limit: int | None = None) -> SegmentationSet:
    """ImageNet-S's ``split`` (``ROOT/split/<class>/<image>`` with ``ROOT/split-segmentation/<class>/<image>.png``).

    Images without a mask are skipped and named. ``limit`` keeps the first images in sorted order.

    Raises:
        ImageSourceError: the folders are missing, or no image has a mask.
    """
    root = Path(root)
    images, masks = root / split, root / f"{split}-segmentation"
    if not images.is_dir() or not masks.is_dir():
        raise ImageSourceError(f"{printable(root)} is not an ImageNet-S folder: it needs {split}/ (images) and "
                               f"{split}-segmentation/ (PNG masks)")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise InvalidArgumentError(f"limit must be a positive int, got {limit!r}")
    items, skipped = [], []
    for path in sorted(images.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        relative = path.relative_to(images)
        mask = masks / relative.with_suffix(".png")
        if not mask.is_file():
            skipped.append(printable(relative))
            continue
        items.append(SegmentedImage(printable(relative), path, mask))
        if limit is not None and len(items) == limit:
            break
    if not items:
        raise ImageSourceError(f"no image with a mask in {printable(images)} (masks are looked for in "
                               f"{printable(masks)}, same relative path, .png)")
    if skipped:
        log.warning("%d image(s) have no mask and are skipped, e.g. %s", len(skipped), skipped[0])
    return SegmentationSet(items, f"{len(items)} ImageNet-S {split} images of {printable(root)}", skipped)


# ---------------------------------------------------------------------------- scoring

#: Per-image counts kept for the dataset-wide ratios: correct, labelled, and per class (foreground,
#: background) intersection and union.
COUNTS = ("correct", "labelled", "foreground intersection", "foreground union", "background intersection",
          "background union")


def upsampled(attention: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Maps [B, rows, cols] upsampled bilinearly to the pixels the patches cover: [B, rows * ph, cols * pw]."""
    rows, cols = attention.shape[-2:]
    return torch.nn.functional.interpolate(attention[:, None].float(), size=(rows * patch[0], cols * patch[1]),
                                           mode="bilinear", align_corners=False)[:, 0]


def foreground_prediction(heatmap: torch.Tensor) -> torch.Tensor:
    """A map [H, W] scaled to [0, 1] and thresholded at its mean: bool [H, W]."""
    low, high = heatmap.min(), heatmap.max()
    scaled = (heatmap - low) / (high - low) if high > low else torch.zeros_like(heatmap)
    return scaled > scaled.mean()


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Average precision of ``scores`` [N] at ranking ``positives`` (bool [N]) first; NaN without both kinds."""
    count = int(positives.sum())
    if count == 0 or count == len(positives):
        return float("nan")
    order = scores.double().argsort(descending=True, stable=True)
    hits = positives[order].double()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    return float((precision * hits).sum() / count)


def image_scores(heatmap: torch.Tensor, truth: torch.Tensor) -> tuple[np.ndarray, float]:
    """Counts (:data:`COUNTS`) and average precision of one map [H, W] against its truth [H, W] int8."""
    valid = truth != IGNORED
    predicted, actual = foreground_prediction(heatmap)[valid], (truth == FOREGROUND)[valid]
    counts = [
        (predicted == actual).sum(), valid.sum(),
        (predicted & actual).sum(), (predicted | actual).sum(),
        (~predicted & ~actual).sum(), (~predicted | ~actual).sum(),
    ]
    return np.array([float(count) for count in counts]), average_precision(heatmap[valid], actual)


def pixel_accuracy(counts: np.ndarray) -> np.ndarray:
    """Correct / labelled pixels over images: counts [..., N, 6] -> [...]."""
    return counts[..., 0].sum(-1) / np.maximum(counts[..., 1].sum(-1), 1)


def mean_iou(counts: np.ndarray) -> np.ndarray:
    """The mean of foreground and background IoU, each a ratio of sums over images: [..., N, 6] -> [...]."""
    foreground = counts[..., 2].sum(-1) / np.maximum(counts[..., 3].sum(-1), 1)
    background = counts[..., 4].sum(-1) / np.maximum(counts[..., 5].sum(-1), 1)
    return (foreground + background) / 2


def _mean(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=-1)


# ---------------------------------------------------------------------------- the pass

@dataclass
class SegmentationResult:
    """What one variant gave: per-image counts [N, 6] (:data:`COUNTS`), average precisions [N] (NaN where an
    image has no foreground or no background), and the first K images' maps for the figure."""

    name: str
    counts: np.ndarray
    precisions: np.ndarray
    maps: list[torch.Tensor] = field(default_factory=list)       # [rows * ph, cols * pw] upsampled CLS attention
    shown: list[tuple[Image.Image, np.ndarray]] = field(default_factory=list)   # the image as seen, its truth


def segment_variant(name: str, hook_manager: HookManager, dataset: SegmentationSet, preprocess: Callable, *,
                    batch_size: int = 32, progress: bool = False, keep_maps: int = 0) -> SegmentationResult:
    """One pass of ``hook_manager``'s model over ``dataset``: the CLS attention map of every image, scored.

    Raises:
        InvalidArgumentError: the model has no CLS token.
        ImageSourceError: no image and mask could be read.
    """
    layout = hook_manager.layout
    if layout.num_cls == 0:
        raise InvalidArgumentError(f"zero-shot segmentation reads CLS attention, and {hook_manager.name} has no CLS token")
    last = hook_manager.num_layers - 1
    geometries = Geometries(preprocess)
    counts, precisions, maps, shown = [], [], [], []
    bar = tqdm(total=len(dataset), unit="img", desc=f"segmenting: {name}", disable=not progress)
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            pixels, truths, views = [], [], []
            for item in dataset.items[start:start + batch_size]:
                read = read_or_skip(item.name, item.read, dataset.skipped)
                if read is None:
                    continue
                image, foreground = read
                geometry = geometries(image.size)
                pixels.append(preprocess(image))
                # 0 where the input shows no image (padding): ignored like ImageNet-S's own ignore label
                truths.append(torch.from_numpy(geometry.mask(foreground.astype(np.int16) + 2).astype(np.int16) - 2))
                if len(shown) + len(views) < keep_maps:
                    views.append(geometry.view(image))
            bar.update(len(dataset.items[start:start + batch_size]))
            if not pixels:
                continue
            batch = torch.stack(pixels)
            with hook_manager.capture(attention=[last]) as captured:
                hook_manager.forward_images(batch)
            grid = hook_manager.grid_shape(batch)
            attention = measures.cls_patch_attention(captured.attention[last], layout).double().mean(dim=1)
            attention = (attention / attention.sum(dim=1, keepdim=True)).reshape(-1, *grid).cpu()
            heatmaps = upsampled(attention, hook_manager.patch_size)                       # [B, H', W']
            for index, (heatmap, truth) in enumerate(zip(heatmaps, truths)):
                covered = truth[:heatmap.shape[0], :heatmap.shape[1]].clone()
                covered[covered == -2] = IGNORED
                image_counts, precision = image_scores(heatmap, covered)
                counts.append(image_counts)
                precisions.append(precision)
                if index < len(views):
                    maps.append(heatmap)
                    shown.append((views[index], covered.numpy()))
    bar.close()
    if not counts:
        raise ImageSourceError(f"no readable image and mask in {dataset.description}")
    return SegmentationResult(name, np.stack(counts), np.array(precisions), maps, shown)


def zero_shot_segmentation(variants: dict[str, tuple[HookManager, Callable]], dataset: SegmentationSet, *,
                           batch_size: int = 32, progress: bool = False, keep_maps: int = 0
                           ) -> tuple[Comparison, list[SegmentationResult]]:
    """Score each variant ``{column: (hook manager, preprocess)}``'s CLS attention as a foreground mask.

    Returns the table (pixel accuracy, mIoU, mAP with 95% bootstrap intervals over images) and
    each variant's result (its first ``keep_maps`` maps, for :func:`draw_zero_shot_masks`).
    """
    results = [segment_variant(name, hook_manager, dataset, preprocess, batch_size=batch_size, progress=progress,
                               keep_maps=keep_maps)
               for name, (hook_manager, preprocess) in variants.items()]
    rows = [
        Row("pixel accuracy (CLS attention > its mean as foreground)", [float(pixel_accuracy(r.counts)) for r in results],
            "%", [bootstrap_interval(r.counts, pixel_accuracy) for r in results]),
        Row("mIoU (foreground and background)", [float(mean_iou(r.counts)) for r in results], "%",
            [bootstrap_interval(r.counts, mean_iou) for r in results]),
    ]
    scored = [r.precisions[np.isfinite(r.precisions)] for r in results]
    rows.append(Row("mAP (the attention map ranking foreground pixels)",
                    [float(p.mean()) if len(p) else None for p in scored], "%",
                    [bootstrap_interval(p, _mean) if len(p) else None for p in scored]))
    notes = []
    unscored = len(results[0].precisions) - len(scored[0])
    if unscored:
        notes.append(f"{unscored} image(s) are all foreground or all background: left out of mAP")
    if dataset.skipped:
        notes.append(f"skipped {len(dataset.skipped)} image(s) without a readable mask or image: "
                     + ", ".join(dataset.skipped[:5]))
    return Comparison(list(variants), rows, len(results[0].counts), notes), results


def draw_zero_shot_masks(results: Sequence[SegmentationResult]):
    """A figure: per kept image, the image with its true foreground outlined, then per variant the CLS
    attention map and, outlined, the mask it gives. Returns the matplotlib ``Figure``."""
    shown = [r for r in results if r.maps]
    if not shown:
        raise InvalidArgumentError("no maps were kept: segment with keep_maps > 0")
    images = len(shown[0].maps)
    figure = new_figure(2.3 * (1 + len(shown)), 2.3 * images + 0.8)
    axes = figure.subplots(images, 1 + len(shown), squeeze=False)
    figure.suptitle("Zero-shot segmentation: CLS attention over the patches (last block, head mean), upsampled;\n"
                    "white: the true foreground; red: the attention above its mean (the predicted foreground)",
                    fontsize=9)
    for row in range(images):
        image, truth = shown[0].shown[row]
        ax = axes[row, 0]
        ax.imshow(np.asarray(image))
        ax.contour(truth == FOREGROUND, levels=[0.5], colors="white", linewidths=1.0)
        ax.set_title(f"image {row}", fontsize=8)
        for column, result in enumerate(shown, start=1):
            heatmap = result.maps[row]
            ax = axes[row, column]
            ax.imshow(heatmap.numpy(), cmap="viridis", vmin=0, interpolation="nearest")
            ax.contour(foreground_prediction(heatmap).numpy(), levels=[0.5], colors="#d62728", linewidths=1.0)
            ax.contour(truth == FOREGROUND, levels=[0.5], colors="white", linewidths=0.8)
            ax.set_title(f"{result.name}; IoU {100 * float(mean_iou(result.counts[row][None])):.0f}%", fontsize=8)
            ax.set_label(f"segmentation variant={result.name} image={row}")
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    return figure

"""Dense linear probes (Jiang et al., Table 2): a linear head on a ViT's frozen patch features.

Two tasks, on the datasets of :mod:`~test_time_registers.data.dense`:

* semantic segmentation (ADE20K, Pascal VOC), scored by mIoU and pixel accuracy;
* monocular depth (NYU-style), scored by RMSE in metres and AbsRel.

The protocol, per model variant (the original model, the model with test-time registers, one
with trained registers):

1. One pass over the dataset (batched, on the model's device): each image goes through the
   variant's own preprocessing, and its label map through the same resizes, crops and pads
   (:func:`~test_time_registers.analysis.geometry.preprocess_geometry`). The features are the
   patch tokens of the last block's output (or ``layer``'s), float32 [P, D] per image; CLS,
   trained and test-time registers are left out (the layout's patch slice).
2. Per-patch targets, from the label map in the model's input pixels: the majority class of a
   patch's labelled pixels (ties go to the lower class), or the mean of its valid depths. Patches
   with no labelled pixel are left out of training.
3. For each seed of ``seed, seed + 1, ..., seed + seeds - 1``: a random split of the images
   (``test_fraction`` of them held out, at least one on each side). The head is fitted on the
   training images' patches, on features standardised with their statistics: multinomial
   logistic regression (L-BFGS, L2 penalty ``weight_decay``) for classes, ridge regression
   (closed form, penalty ``ridge`` per training patch) for depth.
4. Scoring at pixel level on the held-out images: the head's per-patch outputs (class logits or
   depth) [rows, cols] are upsampled bilinearly to the input pixels the patches cover
   (rows * ph x cols * pw) and compared with the label map there. Segmentation: one confusion
   matrix over all test images; mIoU is the mean IoU over the classes with a non-empty union,
   pixel accuracy the share of labelled pixels classified right. Depth: RMSE over all valid test
   pixels, and AbsRel, the mean of |predicted - true| / true over them.

The table reports the mean over seeds of each score and its Student-t 95% interval
(:func:`~test_time_registers.analysis.intervals.seed_interval`).

Memory: features are computed once per variant and kept on the CPU, [N, P, D] float32 (about
0.6 MB per image for a ViT-B at 224 px), with the label maps in input pixels (int16 classes or
float32 depths, 0.1-0.2 MB per image); a split copies its training patches once more. That is
fine for a few thousand images at 224 px; larger sets need a sample (``limit`` of the readers).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.dense import IGNORED, MAX_CLASSES, TASKS, DenseDataset
from ..data.sources import read_or_skip
from ..errors import ImageSourceError, InvalidArgumentError, check_int
from ..hooks import HookManager
from .evaluation import Comparison, Row, fit_multinomial
from .geometry import Geometries, Geometry
from .intervals import seed_interval

log = logging.getLogger(__name__)

DENSE_SEEDS = 5
DENSE_TEST_FRACTION = 0.3
#: The L2 penalty of the logistic regression (on standardised features), as the image-level probes use.
WEIGHT_DECAY = 1e-3
#: The ridge penalty of the depth head, per training patch (on standardised features).
RIDGE = 1e-3
LBFGS_STEPS = 100
#: Upsampled outputs are scored in chunks of images of at most this many values [images, K, H, W].
_CHUNK_VALUES = 2 ** 25


# ---------------------------------------------------------------------------- targets

def input_targets(target: np.ndarray, geometry: Geometry, task: str) -> torch.Tensor:
    """A label map [H, W] of an image in the model's input pixels [height, width], through ``geometry``.

    Segmentation: int64 classes with ``IGNORED`` (-1) in, int16 out, -1 also where the input shows no
    image (padding). Depth: metres with 0 invalid in, float32 out, 0 also on padding.
    """
    if task == "segmentation":
        # shifted by one so that the geometry's 0 (padding) lands on "ignored"
        return torch.from_numpy(geometry.mask((target + 1).astype(np.int16)).astype(np.int16) - 1)
    return torch.from_numpy(geometry.mask(target.astype(np.float32)).astype(np.float32))


def _blocks(maps: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Maps [N, H, W] cut into patches: [N, rows * cols, ph * pw] (the pixels beyond whole patches dropped)."""
    count, height, width = maps.shape
    (patch_h, patch_w) = patch
    rows, cols = height // patch_h, width // patch_w
    cut = maps[:, :rows * patch_h, :cols * patch_w].reshape(count, rows, patch_h, cols, patch_w)
    return cut.permute(0, 1, 3, 2, 4).reshape(count, rows * cols, patch_h * patch_w)


def patch_classes(maps: torch.Tensor, patch: tuple[int, int], num_classes: int) -> torch.Tensor:
    """The majority class of each patch of ``maps`` [N, H, W] (classes 0..C-1, -1 ignored): int64 [N, rows * cols],
    -1 for a patch with no labelled pixel. Ties go to the lower class."""
    blocks = _blocks(maps, patch)
    count, patches, pixels = blocks.shape
    bins = num_classes + 1                                            # bin 0: ignored
    chunk = max(1, _CHUNK_VALUES // max(1, patches * bins))
    majority = []
    for start in range(0, count, chunk):
        part = blocks[start:start + chunk].long().reshape(-1, pixels) + 1       # [n * P, ph * pw], 0 ignored
        offsets = torch.arange(len(part))[:, None] * bins
        counts = torch.bincount((part + offsets).reshape(-1), minlength=len(part) * bins).reshape(-1, bins)[:, 1:]
        classes = counts.argmax(dim=1)
        classes[counts.sum(dim=1) == 0] = IGNORED
        majority.append(classes.reshape(-1, patches))
    return torch.cat(majority)


def patch_depths(maps: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """The mean valid depth of each patch of ``maps`` [N, H, W] (metres, 0 invalid): float32 [N, rows * cols],
    0 for a patch with no valid pixel."""
    blocks = _blocks(maps, patch).double()
    valid = blocks > 0
    sums, counts = (blocks * valid).sum(dim=2), valid.sum(dim=2)
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums)).float()


# ---------------------------------------------------------------------------- splits

def dense_splits(count: int, *, seed: int = 0, seeds: int = DENSE_SEEDS, test_fraction: float = DENSE_TEST_FRACTION
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``seeds`` random splits of ``count`` images, the k-th drawn with seed ``seed + k``: a list of
    ``(train positions, test positions)``, each int64 sorted, disjoint, together every image.

    ``round(test_fraction * count)`` images are held out, at least one, and at least one is kept for training.

    Raises:
        InvalidArgumentError: ``test_fraction`` is not in (0, 1), or ``count`` cannot give both sides an image.
    """
    _check_fraction(test_fraction)
    check_int("seeds", seeds)
    check_int("seed", seed, minimum=0)
    held = max(1, round(test_fraction * count))
    if held >= count:
        raise InvalidArgumentError(f"a test fraction of {test_fraction:g} of {count} readable image(s) leaves no "
                                   "image to train on: the dense probes need at least 2 images, one on each side")
    splits = []
    for offset in range(seeds):
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + offset))
        splits.append((order[held:].sort().values, order[:held].sort().values))
    return splits


def _check_fraction(test_fraction: float) -> None:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0 < test_fraction < 1:
        raise InvalidArgumentError(f"test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}")


# ---------------------------------------------------------------------------- heads

@dataclass
class LinearHead:
    """A linear map on standardised features: ``((x - mean) / std) @ weight + bias``.

    ``mean``, ``std`` [D] are the training patches' statistics; ``weight`` [D, K], ``bias`` [K]
    (K classes, or 1 for depth).
    """

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Outputs [..., K] of features [..., D]."""
        return ((features - self.mean) / self.std) @ self.weight + self.bias


def _standardised(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    features = features.float()
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False).clamp_min(1e-6) if len(features) > 1 else torch.ones_like(mean)
    return (features - mean) / std, mean, std


def fit_segmentation_head(features: torch.Tensor, classes: torch.Tensor, num_classes: int, *,
                          weight_decay: float = WEIGHT_DECAY, steps: int = LBFGS_STEPS) -> LinearHead:
    """Multinomial logistic regression of ``classes`` (int64 [M], 0..C-1) on ``features`` [M, D].

    Features are standardised with their own statistics; the weights start at zero and are fitted
    by L-BFGS (strong Wolfe line search, ``steps`` iterations at most) on the mean cross-entropy
    plus ``weight_decay`` times the squared weights: deterministic for the same inputs and device.
    """
    if classes.dtype != torch.int64:
        raise InvalidArgumentError(f"classes must be int64 class indices, got {classes.dtype}")
    if len(features) == 0:
        raise InvalidArgumentError("a segmentation head needs at least one labelled training patch")
    standard, mean, std = _standardised(features)
    weight, bias = fit_multinomial(standard, classes.to(standard.device), num_classes, weight_decay=weight_decay,
                                   steps=steps)
    return LinearHead(mean, std, weight, bias)


def fit_depth_head(features: torch.Tensor, depths: torch.Tensor, *, ridge: float = RIDGE) -> LinearHead:
    """Ridge regression of ``depths`` [M] on ``features`` [M, D], in closed form (float64).

    On standardised features X: ``weight = (X^T X + ridge * M * I)^-1 X^T (y - mean y)``, ``bias = mean y``.
    """
    if len(features) == 0:
        raise InvalidArgumentError("a depth head needs at least one training patch with a valid depth")
    standard, mean, std = _standardised(features)
    x, y = standard.double(), depths.to(standard.device).double()
    target = y.mean()
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    weight = torch.linalg.solve(gram, x.T @ (y - target))
    return LinearHead(mean, std, weight.float()[:, None], target.float().reshape(1))


# ---------------------------------------------------------------------------- scoring

def upsample_patches(values: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Per-patch outputs [N, rows, cols, K] upsampled bilinearly to the pixels they cover: [N, K, rows * ph, cols * pw]."""
    rows, cols = values.shape[1:3]
    return torch.nn.functional.interpolate(values.permute(0, 3, 1, 2).float(), size=(rows * patch[0], cols * patch[1]),
                                           mode="bilinear", align_corners=False)


def _chunks(count: int, per_image: int):
    step = max(1, _CHUNK_VALUES // max(1, per_image))
    return (slice(start, start + step) for start in range(0, count, step))


def segmentation_confusion(head: LinearHead, features: torch.Tensor, truth: torch.Tensor, grid: tuple[int, int],
                           patch: tuple[int, int], num_classes: int) -> torch.Tensor:
    """The confusion matrix [C, C] (rows: true class, columns: predicted) over the labelled pixels of
    ``truth`` [N, rows * ph, cols * pw] (-1 ignored), for the head's logits on ``features`` [N, P, D]
    upsampled to those pixels."""
    device = head.weight.device
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    for part in _chunks(len(features), num_classes * truth.shape[1] * truth.shape[2]):
        logits = head(features[part].to(device)).reshape(-1, *grid, num_classes)
        predicted = upsample_patches(logits, patch).argmax(dim=1)                      # [n, H, W]
        actual = truth[part].to(device).long()
        labelled = actual >= 0
        confusion += torch.bincount(actual[labelled] * num_classes + predicted[labelled],
                                    minlength=num_classes * num_classes)
    return confusion.reshape(num_classes, num_classes).cpu()


def segmentation_scores(confusion: torch.Tensor) -> dict[str, float]:
    """``{"mIoU", "pixel accuracy"}`` of a confusion matrix [C, C]: the mean IoU over the classes whose
    union (true or predicted pixels) is not empty, and the share of labelled pixels classified right."""
    confusion = confusion.double()
    hits = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - hits
    present = union > 0
    total = float(confusion.sum())
    if total == 0:
        raise InvalidArgumentError("no labelled pixel to score")
    return {"mIoU": float((hits[present] / union[present]).mean()), "pixel accuracy": float(hits.sum()) / total}


def depth_scores(head: LinearHead, features: torch.Tensor, truth: torch.Tensor, grid: tuple[int, int],
                 patch: tuple[int, int]) -> dict[str, float]:
    """``{"RMSE", "AbsRel"}`` over the valid pixels of ``truth`` [N, rows * ph, cols * pw] (metres, 0 invalid), of
    the head's depths on ``features`` [N, P, D] upsampled to those pixels."""
    device = head.weight.device
    squared = relative = 0.0
    pixels = 0
    for part in _chunks(len(features), truth.shape[1] * truth.shape[2]):
        predicted = upsample_patches(head(features[part].to(device)).reshape(-1, *grid, 1), patch)[:, 0].double()
        actual = truth[part].to(device).double()
        valid = actual > 0
        error = predicted[valid] - actual[valid]
        squared += float(error.square().sum())
        relative += float((error.abs() / actual[valid]).sum())
        pixels += int(valid.sum())
    if pixels == 0:
        raise InvalidArgumentError("no valid depth pixel to score")
    return {"RMSE": math.sqrt(squared / pixels), "AbsRel": relative / pixels}


# ---------------------------------------------------------------------------- the pass

@dataclass
class DenseFeatures:
    """What one variant's pass kept, on the CPU.

    ``features`` [N, P, D] float32: the patch tokens of block ``layer``'s output, P = rows * cols;
    ``targets`` [N, rows * ph, cols * pw]: the label maps in the model's input pixels the patches
    cover, int16 classes (-1 ignored) or float32 metres (0 invalid); ``names`` the N images;
    ``max_class`` the largest class in the label maps as read (before the preprocessing), -1 for
    depth or none; ``device`` where heads are fitted.
    """

    name: str
    features: torch.Tensor
    targets: torch.Tensor
    grid: tuple[int, int]
    patch: tuple[int, int]
    layer: int
    names: list[str] = field(default_factory=list)
    max_class: int = -1
    device: torch.device | str = "cpu"

    def __post_init__(self):
        (rows, cols), (patch_h, patch_w) = self.grid, self.patch
        if self.features.ndim != 3 or self.features.shape[1] != rows * cols:
            raise InvalidArgumentError(f"features must be [N, {rows * cols}, D] for a {rows}x{cols} grid, got "
                                       f"{tuple(self.features.shape)}")
        if tuple(self.targets.shape) != (len(self.features), rows * patch_h, cols * patch_w):
            raise InvalidArgumentError(f"targets must be [{len(self.features)}, {rows * patch_h}, {cols * patch_w}], "
                                       f"got {tuple(self.targets.shape)}")


def dense_features(name: str, hook_manager: HookManager, dataset: DenseDataset, preprocess: Callable, *,
                   layer: int | None = None, batch_size: int = 32, progress: bool = True) -> DenseFeatures:
    """One pass of ``hook_manager``'s model over ``dataset``: each readable image's patch features at
    ``layer`` (default: the last block) and its label map in the model's input pixels.

    Unreadable images or label maps are skipped, logged and added to ``dataset.skipped``.

    Raises:
        ImageSourceError: nothing could be read, or a label map is wrong (see :meth:`DenseDataset.read`).
        InvalidArgumentError: ``layer`` is not the model's, or the preprocessing makes inputs of varying size.
    """
    layer = hook_manager.num_layers - 1 if layer is None else hook_manager.check_layer(layer)
    check_int("batch_size", batch_size)
    layout = hook_manager.layout
    patch = hook_manager.patch_size
    geometries = Geometries(preprocess)
    features = targets = None
    input_shape, grid, count, names, max_class = None, None, 0, [], -1
    bar = tqdm(total=len(dataset), unit="img", desc=f"dense features: {name}", disable=not progress)
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            chunk = dataset.items[start:start + batch_size]
            pixels, maps = [], []
            for item in chunk:
                read = read_or_skip(item.name, lambda item=item: dataset.read(item), dataset.skipped)
                if read is None:
                    continue
                image, target = read
                pixels.append(preprocess(image))
                maps.append(input_targets(target, geometries(image.size), dataset.task))
                if dataset.task == "segmentation":
                    max_class = max(max_class, int(target.max()))
                names.append(item.name)
            bar.update(len(chunk))
            if not pixels:
                continue
            shapes = {tuple(tensor.shape) for tensor in pixels} | ({input_shape} if input_shape else set())
            if len(shapes) > 1:
                raise InvalidArgumentError(f"the preprocessing makes inputs of different sizes "
                                           f"({', '.join(map(str, sorted(shapes)))}): dense probes need one that ends "
                                           "in a fixed size (a resize and a centre crop)")
            batch = torch.stack(pixels)
            input_shape, grid = tuple(batch.shape[1:]), hook_manager.grid_shape(batch)
            with hook_manager.capture(residual=[layer]) as captured:
                hook_manager.forward_images(batch)
            tokens = captured.residual[layer]
            patches = tokens[:, layout.patches(tokens.shape[1])].float().cpu()                  # [B, P, D]
            if patches.shape[1] != grid[0] * grid[1]:
                raise InvalidArgumentError(f"{hook_manager.name} gives {patches.shape[1]} patch tokens for a "
                                           f"{grid[0]}x{grid[1]} grid of {patch[0]}x{patch[1]} px patches")
            covered = torch.stack(maps)[:, :grid[0] * patch[0], :grid[1] * patch[1]]
            if features is None:      # every image has this size: room for all of them, filled in place
                features = torch.empty(len(dataset), *patches.shape[1:])
                targets = torch.empty(len(dataset), *covered.shape[1:], dtype=covered.dtype)
            features[count:count + len(batch)] = patches
            targets[count:count + len(batch)] = covered
            count += len(batch)
    bar.close()
    if count == 0:
        raise ImageSourceError(f"no readable image and label map in {dataset.description}")
    return DenseFeatures(name, features[:count], targets[:count], grid, patch, layer, names, max_class,
                         hook_manager.device)


# ---------------------------------------------------------------------------- splits and scores

@dataclass
class SplitScores:
    """The scores of one seeded split: the images (positions in the pass) on each side, the scores
    (``mIoU`` and ``pixel accuracy``, or ``RMSE`` and ``AbsRel``), how many patches the head was fitted
    on, and for segmentation the classes with no training patch."""

    seed: int
    train: list[int]
    test: list[int]
    scores: dict[str, float]
    training_patches: int
    unseen_classes: list[int] = field(default_factory=list)


def probe_splits(extracted: DenseFeatures, task: str, *, num_classes: int | None = None, seed: int = 0,
                 seeds: int = DENSE_SEEDS, test_fraction: float = DENSE_TEST_FRACTION,
                 weight_decay: float = WEIGHT_DECAY, ridge: float = RIDGE, steps: int = LBFGS_STEPS
                 ) -> list[SplitScores]:
    """Fit and score a head on each of :func:`dense_splits`'s splits of ``extracted``'s images.

    ``num_classes`` is needed for segmentation. The heads are fitted on ``extracted.device``.
    """
    if task not in TASKS:
        raise InvalidArgumentError(f"task must be one of {TASKS}, got {task!r}")
    splits = dense_splits(len(extracted.features), seed=seed, seeds=seeds, test_fraction=test_fraction)
    features, device = extracted.features, extracted.device
    if task == "segmentation":
        if num_classes is None:
            raise InvalidArgumentError("segmentation probes need num_classes")
        check_int("num_classes", num_classes)
        if int(extracted.targets.max()) >= num_classes:
            raise InvalidArgumentError(f"the label maps hold class {int(extracted.targets.max())}, beyond "
                                       f"num_classes = {num_classes}")
        targets = patch_classes(extracted.targets, extracted.patch, num_classes)             # [N, P]
    else:
        targets = patch_depths(extracted.targets, extracted.patch)                           # [N, P]
    results = []
    for offset, (train, test) in enumerate(splits):
        train_targets = targets[train].reshape(-1)
        kept = train_targets >= 0 if task == "segmentation" else train_targets > 0
        if not bool(kept.any()):
            raise ImageSourceError(f"the training images of split {seed + offset} have no labelled pixel")
        train_features = features[train].reshape(-1, features.shape[2])[kept].to(device)
        unseen = []
        if task == "segmentation":
            head = fit_segmentation_head(train_features, train_targets[kept], num_classes,
                                         weight_decay=weight_decay, steps=steps)
            seen = torch.bincount(train_targets[kept], minlength=num_classes) > 0
            unseen = (~seen).nonzero()[:, 0].tolist()
            scores = segmentation_scores(segmentation_confusion(head, features[test], extracted.targets[test],
                                                                extracted.grid, extracted.patch, num_classes))
        else:
            head = fit_depth_head(train_features, train_targets[kept], ridge=ridge)
            scores = depth_scores(head, features[test], extracted.targets[test], extracted.grid, extracted.patch)
        del train_features
        log.info("%s, split %d: %s", extracted.name, seed + offset,
                 ", ".join(f"{key} {value:.4f}" for key, value in scores.items()))
        results.append(SplitScores(seed + offset, train.tolist(), test.tolist(), scores, int(kept.sum()), unseen))
    return results


# ---------------------------------------------------------------------------- the table

#: Per task: (score, row label, unit, bounds of the interval).
_ROWS = {
    "segmentation": (("mIoU", "segmentation mIoU (linear head on patch features, {seeds} splits)", "%", (0.0, 1.0)),
                     ("pixel accuracy", "segmentation pixel accuracy ({seeds} splits)", "%", (0.0, 1.0))),
    "depth": (("RMSE", "depth RMSE (m; linear head on patch features, {seeds} splits)", "", (0.0, math.inf)),
              ("AbsRel", "depth AbsRel ({seeds} splits)", "", (0.0, math.inf))),
}


def _check_penalty(name: str, value: float, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        kind = "a positive" if positive else "a non-negative"
        raise InvalidArgumentError(f"{name} must be {kind} finite number, got {value!r}")


def dense_probe(variants: dict[str, tuple[HookManager, Callable]], dataset: DenseDataset, *, task: str,
                layer: int | None = None, seed: int = 0, seeds: int = DENSE_SEEDS,
                test_fraction: float = DENSE_TEST_FRACTION, batch_size: int = 32, progress: bool = True,
                weight_decay: float = WEIGHT_DECAY, ridge: float = RIDGE, steps: int = LBFGS_STEPS) -> Comparison:
    """Dense linear probes of each variant ``{column: (hook manager, preprocess)}`` on ``dataset``.

    A variant with test-time registers is given by its view, ``ModifiedModel(...).hook_manager``.
    ``task`` ("segmentation" or "depth") must be the dataset's. Returns the table: per task two
    rows (mIoU and pixel accuracy, or RMSE in metres and AbsRel), each value the mean over
    ``seeds`` splits with its 95% interval; ``results`` is empty. The notes name skipped files
    and classes the heads never saw in training.

    Raises:
        InvalidArgumentError: an argument is out of range (task, layer, test_fraction, seeds, ...).
        ImageSourceError: no image and label map could be read, or a label map is wrong.
    """
    if not variants:
        raise InvalidArgumentError("give at least one variant {column: (hook manager, preprocess)}")
    if task not in TASKS:
        raise InvalidArgumentError(f"task must be one of {TASKS}, got {task!r}")
    if task != dataset.task:
        raise InvalidArgumentError(f"task is {task!r}, but {dataset.description} holds {dataset.task} labels")
    _check_fraction(test_fraction)
    check_int("seeds", seeds)
    check_int("seed", seed, minimum=0)
    check_int("steps", steps)
    _check_penalty("weight_decay", weight_decay, positive=False)
    _check_penalty("ridge", ridge, positive=True)
    for hook_manager, _ in variants.values():
        if layer is not None:
            hook_manager.check_layer(layer)
    extracted = [dense_features(name, hook_manager, dataset, preprocess, layer=layer, batch_size=batch_size,
                                progress=progress)
                 for name, (hook_manager, preprocess) in variants.items()]
    num_classes = None
    if task == "segmentation":
        num_classes = dataset.num_classes or max(e.max_class for e in extracted) + 1
        if num_classes < 1:
            raise ImageSourceError(f"no labelled pixel in {dataset.description}: every pixel is ignored")
        if num_classes > MAX_CLASSES:
            raise InvalidArgumentError(f"the label maps hold class {num_classes - 1}; at most {MAX_CLASSES} classes "
                                       "are supported")
    splits = [probe_splits(e, task, num_classes=num_classes, seed=seed, seeds=seeds, test_fraction=test_fraction,
                           weight_decay=weight_decay, ridge=ridge, steps=steps) for e in extracted]
    rows = []
    for key, label, unit, bounds in _ROWS[task]:
        centres = [seed_interval([split.scores[key] for split in variant], bounds=bounds) for variant in splits]
        rows.append(Row(label.format(seeds=seeds), [centre for centre, _ in centres], unit,
                        [interval for _, interval in centres]))
    notes = _notes(dataset, extracted, splits, num_classes)
    return Comparison(list(variants), rows, len(extracted[0].features), notes, [])


def _class_name(dataset: DenseDataset, index: int) -> str:
    if dataset.class_names and index < len(dataset.class_names):
        return f"{index} ({dataset.class_names[index]})"
    return str(index)


def _notes(dataset: DenseDataset, extracted: Sequence[DenseFeatures], splits: Sequence[Sequence[SplitScores]],
           num_classes: int | None) -> list[str]:
    """What the reader of the table must know: the features, the files left out, the classes never trained on."""
    first = extracted[0]
    count, seeds = len(first.features), len(splits[0])
    held = len(splits[0][0].test)
    notes = [f"features: the patch tokens of block {first.layer}'s output, {first.grid[0]}x{first.grid[1]} patches "
             f"per image; {seeds} random splits of the {count} images, {held} held out each time"]
    counts = {e.name: len(e.features) for e in extracted}
    if len(set(counts.values())) > 1:
        notes.append("the variants could read different images: "
                     + ", ".join(f"{name} {value}" for name, value in counts.items()))
    if dataset.unlabelled:
        notes.append(f"{len(dataset.unlabelled)} image(s) without a label map (or label maps without an image) are "
                     f"left out: {', '.join(dataset.unlabelled[:5])}")
    if dataset.skipped:
        notes.append(f"skipped {len(dataset.skipped)} unreadable image(s) or label map(s): "
                     f"{', '.join(dataset.skipped[:5])}")
    if dataset.reduce_zero_label:
        notes.append("label 0 is ignored and the other classes shifted down by one (reduce_zero_label)")
    if num_classes is not None:
        present = torch.zeros(num_classes, dtype=torch.bool)
        for e in extracted:
            labelled = e.targets[e.targets >= 0].long()
            present |= torch.bincount(labelled, minlength=num_classes) > 0
        absent = (~present).nonzero()[:, 0].tolist()
        if absent:
            notes.append(f"{len(absent)} of the {num_classes} classes appear in no label map (as the model's input "
                         f"shows it): {', '.join(_class_name(dataset, index) for index in absent[:10])}; mIoU averages "
                         "the classes with true or predicted pixels in each split's test images")
        texts = {}
        for e, variant in zip(extracted, splits):
            missing: dict[int, int] = {}
            for split in variant:
                for index in split.unseen_classes:
                    missing[index] = missing.get(index, 0) + 1
            shown = [f"{_class_name(dataset, index)} in {times}" for index, times in sorted(missing.items())
                     if index not in absent]
            if shown:
                texts[e.name] = (f"classes with no training patch (their head is never trained to predict them), "
                                 f"out of {len(variant)} splits: {', '.join(shown[:10])}")
        if len(set(texts.values())) == 1 and len(texts) == len(extracted):
            notes.append(next(iter(texts.values())))
        else:
            notes += [f"{name}: {text}" for name, text in texts.items()]
    return notes

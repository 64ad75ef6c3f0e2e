"""Measure what test-time registers change: outliers, attention, LOST object discovery, linear probes, zero-shot.

One pass over :class:`~test_time_registers.data.labelled.LabelledImages` per model variant (the original model, the model with
test-time registers, a model with trained registers) gathers, per image:

* the largest / median patch norm at the detection layer (outlier statistics);
* the CLS attention over the patches at the last layer, head mean (its entropy, and the share
  that falls on the objects where boxes or masks are known);
* a LOST box (Siméoni et al., BMVC 2021; :mod:`~test_time_registers.analysis.lost`), by default
  from the last block's keys as the official code runs it, scored as CorLoc against the known boxes;
* CLS, mean-patch and register-token features of the last block, for linear probes;
* the image embedding, for zero-shot classification with CLIP's text tower.

Each image goes through the model's own preprocessing as it is, and its boxes and masks follow
the same resizes, crops and pads (:mod:`~test_time_registers.analysis.geometry`); boxes the
crop removes are dropped and counted. Every number comes with a 95% interval
(:mod:`~test_time_registers.analysis.intervals`). Labels are int64 end to end.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import measures
from ..data.labelled import LabelledImage, LabelledImages
from ..data.sources import read_or_skip
from ..errors import ImageSourceError, InvalidArgumentError
from ..hooks import HookManager
from .figures import new_figure
from .geometry import Geometries, Geometry
from .intervals import Interval, bootstrap_interval, median, quantile, seed_interval
from .lost import LOST_PRESETS, LostSettings, LostSweep, lost_boxes

log = logging.getLogger(__name__)

#: An image "has outliers" when its largest patch norm is at least this many times its median.
OUTLIER_RATIO = 4.0
#: CorLoc: a box is correct when its intersection over union with a true box is at least this.
CORLOC_IOU = 0.5
PROBE_TEST_FRACTION = 0.3
#: Linear probes are repeated over this many seeded splits, for their interval.
PROBE_SEEDS = 5


# ---------------------------------------------------------------------------- CorLoc

def box_iou(box: Sequence[float], boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one box with each of ``boxes`` [K, 4] (left, top, right, bottom)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    intersection = width * height
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return intersection / np.maximum(area + areas - intersection, 1e-12)


# ---------------------------------------------------------------------------- linear probe

def linear_probe(features: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
                 test_fraction: float = PROBE_TEST_FRACTION, weight_decay: float = 1e-3, steps: int = 100) -> float:
    """Held-out accuracy of a multinomial logistic regression on ``features`` [N, D] with int64 ``labels`` [N].

    Each class is split with ``seed``: ``test_fraction`` of its images (at least one when it has
    two or more) are held out. Features are standardised with the training split's statistics;
    the regression is fitted with L-BFGS and an L2 penalty of ``weight_decay``.
    """
    if labels.dtype != torch.int64:
        raise InvalidArgumentError(f"labels must be int64 class indices, got {labels.dtype}")
    generator = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        members = (labels == label).nonzero()[:, 0]
        members = members[torch.randperm(len(members), generator=generator)]
        held = math.ceil(test_fraction * len(members)) if len(members) > 1 else 0
        test[members[:held]] = True
    if not test.any() or test.all():
        raise InvalidArgumentError("a linear probe needs classes with at least two images each")
    features = features.float().cpu()
    mean, std = features[~test].mean(dim=0), features[~test].std(dim=0).clamp_min(1e-6)
    standard = (features - mean) / std
    weight, bias = fit_multinomial(standard[~test], labels[~test].cpu(), int(labels.max()) + 1,
                                   weight_decay=weight_decay, steps=steps)
    predictions = (standard[test] @ weight + bias).argmax(dim=1)
    return float((predictions == labels[test].cpu()).float().mean())


def fit_multinomial(features: torch.Tensor, labels: torch.Tensor, classes: int, *, weight_decay: float,
                    steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression of int64 ``labels`` [M] on (standardised) ``features`` [M, D]:
    ``(weight [D, classes], bias [classes])``, from zero, by L-BFGS (strong Wolfe line search, at most
    ``steps`` iterations) on the mean cross-entropy plus ``weight_decay`` times the squared weights."""
    weight = torch.zeros(features.shape[1], classes, device=features.device, requires_grad=True)
    bias = torch.zeros(classes, device=features.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(features @ weight + bias, labels) + weight_decay * weight.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return weight.detach(), bias.detach()


# ---------------------------------------------------------------------------- zero-shot

def _text_vocabulary(model) -> int | None:
    """How many token ids an open_clip text tower embeds, where it says."""
    for module in (model, getattr(model, "text", None)):
        embedding = getattr(module, "token_embedding", None)
        if isinstance(embedding, torch.nn.Embedding):
            return embedding.num_embeddings
    return None


def zero_shot_classifier(model, tokenizer, class_names: Sequence[str], templates: Sequence, device) -> torch.Tensor:
    """open_clip's own zero-shot classifier: [embed_dim, classes], one normalised text embedding per class.

    Raises:
        InvalidArgumentError: the tokenizer makes token ids the text tower has no embedding for.
    """
    from open_clip import build_zero_shot_classifier

    vocabulary = _text_vocabulary(model)
    if vocabulary is not None:
        first = templates[0]
        tokens = tokenizer([first(name) if callable(first) else first.format(name) for name in class_names])
        if int(tokens.max()) >= vocabulary:
            raise InvalidArgumentError(f"the tokenizer makes token ids up to {int(tokens.max())}, but the text tower "
                                       f"embeds only {vocabulary}: they do not belong together")

    with torch.no_grad():
        return build_zero_shot_classifier(model, tokenizer, list(class_names), list(templates),
                                          num_classes_per_batch=16, device=device, use_tqdm=False)


def zero_shot_correct(image_embeddings: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether each of ``image_embeddings`` [N, E] is classified right by ``classifier`` [E, C]: bool [N].
    ``labels`` int64 [N]."""
    if labels.dtype != torch.int64:
        raise InvalidArgumentError(f"labels must be int64 class indices, got {labels.dtype}")
    embeddings = torch.nn.functional.normalize(image_embeddings.float(), dim=-1)
    predictions = (embeddings @ classifier.float().to(embeddings.device)).argmax(dim=1)
    return (predictions == labels.to(predictions.device)).cpu()


def zero_shot_accuracy(image_embeddings: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``image_embeddings`` [N, E] against ``classifier`` [E, C]; ``labels`` int64 [N]."""
    return float(zero_shot_correct(image_embeddings, classifier, labels).float().mean())


# ---------------------------------------------------------------------------- the pass

@dataclass
class VariantResult:
    """What one model variant gave on an evaluation set; per-image tensors are on the CPU."""

    name: str
    ratios: torch.Tensor                        # [N] largest / median patch norm at the detection layer
    cls_entropy: torch.Tensor | None            # [N] entropy (nats) of CLS attention over the patches
    cls_on_objects: torch.Tensor | None         # [N] share of CLS attention on object patches
    lost_boxes: torch.Tensor | None             # [N, 4] in pixels of the model's input, the chosen layer and bias
    corloc_hits: torch.Tensor | None            # [M] bool, the images with a box left after preprocessing
    features: dict[str, torch.Tensor]           # "CLS", "mean patch", "registers" -> [N, D]
    embeddings: torch.Tensor | None             # [N, E] the model's image output, when it is one vector per image
    labels: torch.Tensor | None                 # [N] int64
    patches: int = 0                            # patches per image
    cls_maps: torch.Tensor | None = None        # [K, rows, cols] CLS attention over the patches, first K images
    shown: list[tuple[Image.Image, np.ndarray | None]] = field(default_factory=list)   # those K images as the
    #                                            model saw them, with their boxes in its pixels
    lost: LostSettings | None = None            # how LOST ran
    lost_choice: tuple[int, float] | None = None   # the (layer, bias) kept, when LOST swept
    lost_seed_only: int = 0                     # images where LOST's box is its seed alone
    boxes_dropped: int = 0                      # true boxes the preprocessing cropped away entirely
    images_without_boxes: int = 0               # images left with no box (not scored by CorLoc)


def input_size(preprocess: Callable) -> tuple[int, int]:
    """The (height, width) the preprocessing makes of an image."""
    return tuple(preprocess(Image.new("RGB", (64, 48))).shape[-2:])


def _object_pixels(item: LabelledImage, geometry: Geometry, boxes: np.ndarray | None) -> torch.Tensor | None:
    """[height, width] float: 1 on the objects in the model's input, from the item's mask (through the
    preprocessing) or else from ``boxes`` [K, 4] (already in input pixels); None when neither is known."""
    height, width = geometry.size
    if item.object_mask is not None:
        return torch.from_numpy(geometry.mask(item.object_mask.astype(bool))).float()
    if boxes is None:
        return None
    pixels = torch.zeros(height, width)
    for left, top, right, bottom in boxes:
        pixels[int(top):math.ceil(bottom), int(left):math.ceil(right)] = 1
    return pixels


def _patch_coverage(pixels: torch.Tensor, grid: tuple[int, int], patch: tuple[int, int]) -> torch.Tensor:
    """The fraction of each patch [rows * cols] that ``pixels`` [height, width] covers."""
    (rows, cols), (patch_h, patch_w) = grid, patch
    covered = pixels[:rows * patch_h, :cols * patch_w]
    return covered.reshape(rows, patch_h, cols, patch_w).mean(dim=(1, 3)).reshape(-1)


@dataclass
class _Batch:
    """The readable images of one batch: their items, pixels, geometry and true boxes in input pixels."""

    items: list[LabelledImage] = field(default_factory=list)
    pixels: list[torch.Tensor] = field(default_factory=list)
    geometries: list[Geometry] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    truths: list[np.ndarray | None] = field(default_factory=list)


def _read_batch(dataset: LabelledImages, items: Sequence[LabelledImage], preprocess: Callable,
                geometries: Geometries) -> tuple[_Batch, int]:
    """Read, preprocess and place the boxes of ``items``; returns the batch and how many boxes were cropped away."""
    batch, dropped = _Batch(), 0
    for item in items:
        image = read_or_skip(item.name, item.read, dataset.skipped)
        if image is None:
            continue
        geometry = geometries(image.size)
        truth = None
        if item.boxes is not None:
            truth, kept = geometry.boxes(item.boxes)
            dropped += int((~kept).sum())
        batch.items.append(item)
        batch.pixels.append(preprocess(image))
        batch.geometries.append(geometry)
        batch.images.append(image)
        batch.truths.append(truth)
    sizes = {tuple(pixels.shape) for pixels in batch.pixels}
    if len(sizes) > 1:
        raise InvalidArgumentError(f"the preprocessing makes images of different sizes ({', '.join(map(str, sizes))}): "
                                   "evaluation needs one that ends in a fixed size (a resize and a centre crop)")
    return batch, dropped


def _lost_sites(hook_manager: HookManager, settings: LostSettings) -> tuple[str, tuple[int, ...]] | None:
    """(capture site, layers) for LOST, or None (with a warning) when the architecture declares no projections."""
    layers = settings.resolved_layers(hook_manager.num_layers)
    if settings.features == "tokens":
        return "residual", layers
    if hook_manager.sites.projections is None:
        log.warning("%s declares no projections (queries, keys, values): no LOST row", type(hook_manager).__name__)
        return None
    return settings.features, layers


def evaluate_variant(name: str, hook_manager: HookManager, dataset: LabelledImages, preprocess: Callable, *,
                     detect_layer: int | None = None, batch_size: int = 32, progress: bool = False,
                     keep_maps: int = 0, lost: LostSettings | None = None) -> VariantResult:
    """One pass of ``hook_manager``'s model over ``dataset``; the first ``keep_maps`` images' CLS attention
    maps are kept for :func:`draw_object_discovery`.

    ``hook_manager`` describes the unmodified model, or is the view of a model with test-time
    registers (``ModifiedModel(...).hook_manager``) or trained ones, whose layout says where they are.
    Each image goes through ``preprocess`` as it is; its boxes and mask follow the same resizes,
    crops and pads (:func:`~test_time_registers.analysis.geometry.preprocess_geometry`). ``lost``
    says which features LOST reads (default: the official algorithm, last block's keys).
    """
    lost = LOST_PRESETS["lost"] if lost is None else lost
    layout = hook_manager.layout
    last = hook_manager.num_layers - 1
    detect_layer = hook_manager.default_detect_layer if detect_layer is None else hook_manager.check_layer(detect_layer)
    has_cls = layout.num_cls > 0
    registers = layout.num_test_time_registers or layout.num_trained_registers
    collected: dict[str, list] = {key: [] for key in ("ratios", "entropy", "objects", "cls", "mean",
                                                      "registers", "embeddings", "labels")}
    lost_sites = _lost_sites(hook_manager, lost) if dataset.has_boxes else None
    sweep = LostSweep([(layer, bias) for layer in lost_sites[1] for bias in lost.biases]) if lost_sites else None
    seed_only = [0] * len(sweep.combinations) if sweep else []
    geometries = Geometries(preprocess)
    cls_maps, shown, dropped, boxless = [], [], 0, 0
    bar = tqdm(total=len(dataset), unit="img", desc=f"evaluating: {name}", disable=not progress)
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch, batch_dropped = _read_batch(dataset, dataset.items[start:start + batch_size], preprocess, geometries)
            dropped += batch_dropped
            bar.update(min(batch_size, len(dataset) - start))
            if not batch.items:
                continue
            pixels = torch.stack(batch.pixels)
            grid = hook_manager.grid_shape(pixels)
            height, width = pixels.shape[-2:]
            sites = {"residual": {detect_layer, last}, "attention": [last] if has_cls else []}
            if lost_sites:
                sites[lost_sites[0]] = set(sites.get(lost_sites[0], ())) | set(lost_sites[1])
            with hook_manager.capture(**{site: sorted(layers) for site, layers in sites.items()}) as captured:
                output = hook_manager.forward_images(pixels)
            detect = captured.residual[detect_layer]
            seq_len = detect.shape[1]
            patch_norms = measures.patch_norms(detect, layout)                                 # [B, P]
            patches = patch_norms.shape[1]
            collected["ratios"].append(measures.max_over_median(patch_norms).cpu())
            final = captured.residual[last].float()
            collected["cls"].append(final[:, layout.cls()].mean(dim=1).cpu() if has_cls else None)
            collected["mean"].append(final[:, layout.patches(seq_len)].mean(dim=1).cpu())
            register_slice = (layout.test_time_registers(seq_len) if layout.num_test_time_registers
                              else layout.trained_registers())
            collected["registers"].append(final[:, register_slice].mean(dim=1).cpu() if registers else None)
            embedding = output if isinstance(output, torch.Tensor) and output.ndim == 2 else None
            collected["embeddings"].append(embedding.float().cpu() if embedding is not None else None)
            collected["labels"].append(torch.tensor([item.label if item.label is not None else -1
                                                     for item in batch.items], dtype=torch.int64))
            if has_cls:
                cls_row = measures.cls_patch_attention(captured.attention[last], layout).double()   # [B, H, P]
                attention = cls_row.mean(dim=1)       # [B, P], in float64: what is left for the patches may be subnormal
                attention = attention / attention.sum(dim=1, keepdim=True)
                if len(shown) < keep_maps:
                    kept = min(keep_maps - len(shown), len(batch.items))
                    cls_maps.append(attention[:kept].float().reshape(-1, *grid).cpu())
                    shown.extend((geometry.view(image), truth) for geometry, image, truth
                                 in zip(batch.geometries[:kept], batch.images[:kept], batch.truths[:kept]))
                collected["entropy"].append(-(attention * attention.clamp_min(1e-300).log()).sum(dim=1).float().cpu())
                objects = [_object_pixels(item, geometry, truth)
                           for item, geometry, truth in zip(batch.items, batch.geometries, batch.truths)]
                if all(pixels is not None for pixels in objects):
                    coverage = torch.stack([_patch_coverage(pixels, grid, hook_manager.patch_size) for pixels in objects])
                    collected["objects"].append((attention.cpu() * coverage.double()).sum(dim=1).float())
            if sweep:
                boxless += sum(1 for truth in batch.truths if truth is None or not len(truth))
                store = captured.residual if lost_sites[0] == "residual" else getattr(captured, lost_sites[0])
                patch_h, patch_w = height / grid[0], width / grid[1]
                for index, (layer, bias) in enumerate(sweep.combinations):
                    features = store[layer][:, layout.patches(store[layer].shape[1])]
                    answers = lost_boxes(features, grid, bias=bias, normalize=lost.normalize,
                                         potential_seeds=lost.potential_seeds)
                    for answer, truth in zip(answers, batch.truths):
                        left, top, right, bottom = answer.box
                        box = (left * patch_w, top * patch_h, min(right * patch_w, width), min(bottom * patch_h, height))
                        sweep.boxes[index].append(box)
                        seed_only[index] += answer.seed_only
                        if truth is not None and len(truth):
                            sweep.hits[index].append(bool(box_iou(box, truth).max() >= CORLOC_IOU))
    bar.close()
    if not collected["ratios"]:
        raise ImageSourceError(f"no readable image in {dataset.description or 'the evaluation set'}")

    def joined(key):
        parts = collected[key]
        return torch.cat(parts) if parts and all(part is not None for part in parts) else None

    labels = torch.cat(collected["labels"])
    features = {label: joined(key) for label, key in (("CLS", "cls"), ("mean patch", "mean"),
                                                       ("registers", "registers"))}
    chosen = sweep.best() if sweep else None
    return VariantResult(
        name=name, ratios=torch.cat(collected["ratios"]), cls_entropy=joined("entropy"),
        cls_on_objects=joined("objects") if len(collected["objects"]) == len(collected["ratios"]) else None,
        lost_boxes=torch.tensor(sweep.boxes[chosen]) if sweep else None,
        corloc_hits=torch.tensor(sweep.hits[chosen], dtype=torch.bool) if sweep and sweep.hits[chosen] else None,
        features={label: value for label, value in features.items() if value is not None},
        embeddings=joined("embeddings"), labels=labels if bool((labels >= 0).all()) else None, patches=patches,
        cls_maps=torch.cat(cls_maps) if cls_maps else None, shown=shown, lost=lost if sweep else None,
        lost_choice=sweep.combinations[chosen] if sweep and lost.sweeps else None,
        lost_seed_only=seed_only[chosen] if sweep else 0, boxes_dropped=dropped, images_without_boxes=boxless)


# ---------------------------------------------------------------------------- the table

@dataclass
class Row:
    """One row of the comparison: a label, one value per variant (``None``: does not apply) and each
    value's 95% interval (``None``: none could be had, e.g. from one image)."""

    label: str
    values: list[float | None]
    unit: str = ""
    intervals: list[Interval | None] = field(default_factory=list)

    def __post_init__(self):
        if not self.intervals:
            self.intervals = [None] * len(self.values)


def _per_image(label: str, series: Sequence[torch.Tensor | None], unit: str = "",
               statistic=None, estimate=None) -> Row:
    """A row from per-image values [N] per variant: ``estimate`` (the mean by default) and its bootstrap interval."""
    values, intervals = [], []
    for values_of in series:
        if values_of is None:
            values.append(None)
            intervals.append(None)
            continue
        array = values_of.double().numpy()
        values.append(float(estimate(array)) if estimate else float(array.mean()))
        intervals.append(bootstrap_interval(array, statistic) if statistic else bootstrap_interval(array))
    return Row(label, values, unit, intervals)


def outlier_rows(results: Sequence[VariantResult], detect_layer: int, outlier_ratio: float = OUTLIER_RATIO) -> list[Row]:
    ratios = [r.ratios for r in results]
    return [
        _per_image(f"images with outliers (largest/median >= {outlier_ratio:g}), layer {detect_layer}",
                   [(r >= outlier_ratio).double() for r in ratios], "%"),
        _per_image("largest / median patch norm, median over images", ratios, "x", median, median),
        _per_image("largest / median patch norm, p99 over images", ratios, "x", quantile(0.99), quantile(0.99)),
    ]


def attention_rows(results: Sequence[VariantResult]) -> list[Row]:
    rows = []
    if any(r.cls_entropy is not None for r in results):
        patches = next(r.patches for r in results if r.cls_entropy is not None)
        rows.append(_per_image(f"CLS attention entropy over patches (nats; uniform: {math.log(patches):.2f})",
                               [r.cls_entropy for r in results]))
    if any(r.cls_on_objects is not None for r in results):
        rows.append(_per_image("CLS attention on the objects", [r.cls_on_objects for r in results], "%"))
    if any(r.corloc_hits is not None for r in results):
        settings = next(r.lost for r in results if r.lost is not None)
        rows.append(_per_image(f"LOST CorLoc (IoU >= {CORLOC_IOU:g}; {settings.describe()})",
                               [None if r.corloc_hits is None else r.corloc_hits.double() for r in results], "%"))
    return rows


def probe_rows(results: Sequence[VariantResult], seed: int = 0, seeds: int = PROBE_SEEDS) -> list[Row]:
    """Linear-probe accuracy per feature kind: the mean over ``seeds`` splits (seed, seed + 1, ...) and its t interval."""
    rows = []
    for kind in ("CLS", "mean patch", "registers"):
        values, intervals = [], []
        for r in results:
            if kind in r.features and r.labels is not None:
                centre, interval = seed_interval([linear_probe(r.features[kind], r.labels, seed=seed + offset)
                                                  for offset in range(seeds)], bounds=(0.0, 1.0))
            else:
                centre, interval = None, None
            values.append(centre)
            intervals.append(interval)
        if any(value is not None for value in values):
            rows.append(Row(f"linear probe on {kind} features, held-out accuracy ({seeds} splits)", values, "%",
                            intervals))
    return rows


def zero_shot_row(results: Sequence[VariantResult], classifiers: Sequence[torch.Tensor | None]) -> Row | None:
    """Zero-shot top-1 accuracy per variant, from each one's image embeddings and its text classifier."""
    correct = [zero_shot_correct(r.embeddings, classifier, r.labels).double()
               if classifier is not None and r.embeddings is not None and r.labels is not None else None
               for r, classifier in zip(results, classifiers)]
    if all(value is None for value in correct):
        return None
    return _per_image("zero-shot accuracy (open_clip templates)", correct, "%")


@dataclass
class Comparison:
    """The comparison table: one column per variant, one :class:`Row` per measure; ``notes`` say what was left out."""

    columns: list[str]
    rows: list[Row]
    images: int
    notes: list[str] = field(default_factory=list)
    results: list[VariantResult] = field(default_factory=list, repr=False)

    def format(self) -> str:
        """The table as text, percentages as %, ratios with an x, each value followed by its 95% interval."""
        cells = [[_cell(value, row.unit, interval) for value, interval in zip(row.values, row.intervals)]
                 for row in self.rows]
        label_width = max(len(row.label) for row in self.rows)
        widths = [max([len(column), 8] + [len(line[index]) for line in cells]) for index, column in enumerate(self.columns)]
        lines = ["  ".join([" " * label_width] + [column.rjust(width) for column, width in zip(self.columns, widths)])]
        for row, line in zip(self.rows, cells):
            lines.append("  ".join([row.label.ljust(label_width)] + [cell.rjust(width) for cell, width in zip(line, widths)]))
        return "\n".join(lines + ["(in brackets: 95% intervals; bootstrap over images, or t over seeds for probes)"]
                         + [f"note: {note}" for note in self.notes])

    def to_dict(self) -> dict:
        return {"columns": self.columns, "images": self.images, "notes": self.notes, "confidence": 0.95,
                "rows": [{"label": row.label, "unit": row.unit, "values": row.values,
                          "intervals": [list(interval) if interval else None for interval in row.intervals]}
                         for row in self.rows]}


def _cell(value: float | None, unit: str, interval: Interval | None = None) -> str:
    if value is None:
        return "-"
    if unit == "%":
        text = f"{100 * value:.1f}%"
        return text + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")
    number = (lambda v: f"{v:.2f}") if unit else (lambda v: f"{v:.3f}")
    return number(value) + unit + (f" [{number(interval[0])}, {number(interval[1])}]" if interval else "")


def compare_variants(variants: dict[str, tuple[HookManager, Callable]], dataset: LabelledImages, *,
                     detect_layer: int | None = None, outlier_ratio: float = OUTLIER_RATIO,
                     zero_shot: dict[str, torch.Tensor] | None = None, batch_size: int = 32, seed: int = 0,
                     progress: bool = False, keep_maps: int = 0, lost: LostSettings | None = None) -> Comparison:
    """Evaluate each variant ``{column: (hook manager, preprocess)}`` on ``dataset`` and build the table.

    A variant with test-time registers is given by its view, ``ModifiedModel(...).hook_manager``.

    Rows that need what the dataset lacks (labels, boxes) or what a model lacks (CLS, a text
    tower: ``zero_shot`` maps columns to their text classifiers [E, C]) are left out, with a note.
    ``lost`` chooses LOST's features (:data:`~test_time_registers.analysis.lost.LOST_PRESETS`).
    """
    results = [evaluate_variant(name, hook_manager, dataset, preprocess, detect_layer=detect_layer,
                                batch_size=batch_size, progress=progress, keep_maps=keep_maps, lost=lost)
               for name, (hook_manager, preprocess) in variants.items()]
    hook_manager = next(iter(variants.values()))[0]
    layer = hook_manager.default_detect_layer if detect_layer is None else detect_layer
    rows = outlier_rows(results, layer, outlier_ratio) + attention_rows(results)
    notes = []
    if not dataset.has_boxes:
        notes.append("no boxes or masks: no LOST CorLoc and no attention on objects (give VOC-style XML boxes)")
    notes += _lost_notes(results)
    if dataset.has_labels:
        rows += probe_rows(results, seed)
        if zero_shot:
            row = zero_shot_row(results, [zero_shot.get(name) for name in variants])
            if row is not None:
                rows.append(row)
    else:
        notes.append("no class labels: no linear probe or zero-shot rows (give one sub-folder per class)")
    if dataset.skipped:
        notes.append(f"skipped {len(dataset.skipped)} unreadable image(s): {', '.join(dataset.skipped[:5])}")
    return Comparison(list(variants), rows, len(results[0].ratios), notes, results)


def _lost_notes(results: Sequence[VariantResult]) -> list[str]:
    """What the reader of the LOST and attention rows must know: boxes cropped away, the layer and bias kept."""
    notes = []
    for r in results:
        if r.boxes_dropped:
            notes.append(f"{r.name}: the preprocessing crops {r.boxes_dropped} true box(es) away entirely; "
                         "they are left out")
        if r.images_without_boxes and r.corloc_hits is not None:
            notes.append(f"{r.name}: {r.images_without_boxes} image(s) kept no box after preprocessing: "
                         "not scored by CorLoc")
        if r.lost_choice is not None:
            layer, bias = r.lost_choice
            notes.append(f"{r.name}: LOST kept layer {layer}, bias {bias:g} (the best CorLoc of the sweep)")
        if r.lost_seed_only:
            notes.append(f"{r.name}: on {r.lost_seed_only} image(s) nothing had positive affinity to LOST's seed; "
                         "its box is the seed's patch")
    return notes


def draw_object_discovery(results: Sequence[VariantResult]):
    """A figure of what the attention and LOST rows measure, for the images each result kept.

    One row per image: the image with its true boxes, then per variant the CLS attention over
    the patches (renormalised over them, head mean, last block) with LOST's box. Returns the
    matplotlib ``Figure``.
    """
    from matplotlib.patches import Rectangle

    shown = [r for r in results if r.cls_maps is not None]
    if not shown or not shown[0].shown:
        raise InvalidArgumentError("no CLS attention maps were kept: evaluate with keep_maps > 0 on a model with CLS")
    images = len(shown[0].shown)
    figure = new_figure(2.3 * (1 + len(shown)), 2.3 * images + 0.8)
    axes = figure.subplots(images, 1 + len(shown), squeeze=False)
    figure.suptitle("CLS attention over the patches: last block, head mean, renormalised over the patches,\n"
                    "each map on its own scale from 0. LOST's box in red, the true boxes in green.", fontsize=9)

    def boxes_on(ax, boxes, colour, scale=(1.0, 1.0)):
        for left, top, right, bottom in boxes:
            ax.add_patch(Rectangle((left * scale[0] - 0.5, top * scale[1] - 0.5), (right - left) * scale[0],
                                   (bottom - top) * scale[1], fill=False, edgecolor=colour, linewidth=1.5))

    for row in range(images):
        image, truth = shown[0].shown[row]
        ax = axes[row, 0]
        ax.imshow(np.asarray(image))
        if truth is not None:
            boxes_on(ax, truth, "#2ca02c")
        ax.set_title(f"image {row}", fontsize=8)
        for column, result in enumerate(shown, start=1):
            ax = axes[row, column]
            attention = result.cls_maps[row]
            rows, cols = attention.shape
            ax.imshow(attention.numpy(), cmap="viridis", vmin=0, interpolation="nearest")
            cell = (cols / image.width, rows / image.height)   # pixels -> patches
            if truth is not None:
                boxes_on(ax, truth, "#2ca02c", cell)
            if result.lost_boxes is not None:
                boxes_on(ax, [result.lost_boxes[row].tolist()], "#d62728", cell)
            on_objects = "" if result.cls_on_objects is None else f"; {100 * float(result.cls_on_objects[row]):.0f}% on objects"
            ax.set_title(f"{result.name}{on_objects}", fontsize=8)
            ax.set_label(f"attention variant={result.name} image={row}")
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    return figure

"""Measure what test-time registers change: outliers, attention, LOST object discovery, linear probes, zero-shot.

One pass over :class:`~test_time_registers.data.labelled.LabelledImages` per model variant (the original model, the model with
test-time registers, a model with trained registers) gathers, per image:

* the largest / median patch norm at the detection layer (outlier statistics);
* the CLS attention over the patches at the last layer, head mean (its entropy, and the share
  that falls on the objects where boxes or masks are known);
* a LOST box (Siméoni et al., BMVC 2021) from the last block's attention input, scored as
  CorLoc against the known boxes;
* CLS, mean-patch and register-token features of the last block, for linear probes;
* the image embedding, for zero-shot classification with CLIP's text tower.

Images are resized to the model's square input before preprocessing, so boxes map to patches
by scaling alone. Labels are int64 end to end.
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
from ..data import sources
from ..data.sources import UnreadableImage
from ..errors import ImageSourceError, InvalidArgumentError, UnsupportedModelError
from ..hooks import HookManager
from .figures import new_figure

log = logging.getLogger(__name__)

#: An image "has outliers" when its largest patch norm is at least this many times its median.
OUTLIER_RATIO = 4.0
#: LOST: the number of lowest-degree patches that may join the seed.
LOST_POTENTIAL_SEEDS = 100
#: CorLoc: a box is correct when its intersection over union with a true box is at least this.
CORLOC_IOU = 0.5
PROBE_TEST_FRACTION = 0.3


# ---------------------------------------------------------------------------- LOST and CorLoc

def lost_box(features: torch.Tensor, grid: tuple[int, int], potential_seeds: int = LOST_POTENTIAL_SEEDS
             ) -> tuple[int, int, int, int]:
    """LOST's box for one image, in patches: (left, top, right, bottom), right/bottom exclusive.

    Args:
        features: patch features [P, D] (row-major over ``grid``).

    The seed is the patch with the fewest positive similarities (dot products); the seeds are
    the ``potential_seeds`` lowest-degree patches that correlate positively with it; the mask is
    every patch whose summed similarity to the seeds is non-negative; the box bounds the
    4-connected part of the mask that holds the seed.
    """
    rows, cols = grid
    similarity = features.float() @ features.float().T                   # [P, P]
    degree = (similarity >= 0).sum(dim=1)
    seed = int(degree.argmin())
    lowest = degree.argsort()[:min(potential_seeds, len(degree))]
    seeds = lowest[similarity[lowest, seed] >= 0]
    mask = (similarity[:, seeds].sum(dim=1) >= 0).reshape(rows, cols).cpu().numpy()
    component = _component(mask, divmod(seed, cols))
    ys, xs = np.nonzero(component)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _component(mask: np.ndarray, start: tuple[int, int]) -> np.ndarray:
    """The 4-connected part of ``mask`` [rows, cols] that contains ``start`` (which is always in it)."""
    reached = np.zeros_like(mask, dtype=bool)
    reached[start] = True
    frontier = [start]
    while frontier:
        row, col = frontier.pop()
        for r, c in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
            if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and mask[r, c] and not reached[r, c]:
                reached[r, c] = True
                frontier.append((r, c))
    return reached


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
    classes = int(labels.max()) + 1
    weight = torch.zeros(standard.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")
    train_x, train_y = standard[~test], labels[~test].cpu()

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(train_x @ weight + bias, train_y) + weight_decay * weight.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    with torch.no_grad():
        predictions = (standard[test] @ weight + bias).argmax(dim=1)
    return float((predictions == labels[test].cpu()).float().mean())


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


def zero_shot_accuracy(image_embeddings: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``image_embeddings`` [N, E] against ``classifier`` [E, C]; ``labels`` int64 [N]."""
    if labels.dtype != torch.int64:
        raise InvalidArgumentError(f"labels must be int64 class indices, got {labels.dtype}")
    embeddings = torch.nn.functional.normalize(image_embeddings.float(), dim=-1)
    predictions = (embeddings @ classifier.float().to(embeddings.device)).argmax(dim=1)
    return float((predictions == labels.to(predictions.device)).float().mean())


# ---------------------------------------------------------------------------- the pass

@dataclass
class VariantResult:
    """What one model variant gave on an evaluation set; per-image tensors are on the CPU."""

    name: str
    ratios: torch.Tensor                        # [N] largest / median patch norm at the detection layer
    cls_entropy: torch.Tensor | None            # [N] entropy (nats) of CLS attention over the patches
    cls_on_objects: torch.Tensor | None         # [N] share of CLS attention on object patches
    lost_boxes: torch.Tensor | None             # [N, 4] in pixels of the model's input
    corloc_hits: torch.Tensor | None            # [N] bool
    features: dict[str, torch.Tensor]           # "CLS", "mean patch", "registers" -> [N, D]
    embeddings: torch.Tensor | None             # [N, E] the model's image output, when it is one vector per image
    labels: torch.Tensor | None                 # [N] int64
    patches: int = 0                            # patches per image
    cls_maps: torch.Tensor | None = None        # [K, rows, cols] CLS attention over the patches, first K images
    shown: list[tuple[Image.Image, np.ndarray | None]] = field(default_factory=list)   # those K images as the
    #                                            model saw them, with their boxes in its pixels


def input_size(preprocess: Callable) -> tuple[int, int]:
    """The (height, width) the preprocessing makes of an image."""
    return tuple(preprocess(Image.new("RGB", (64, 48))).shape[-2:])


def _patch_coverage(item: LabelledImage, boxes: np.ndarray | None, size: tuple[int, int],
                    grid: tuple[int, int]) -> torch.Tensor | None:
    """The fraction of each patch covered by objects [rows * cols], from the item's mask or else
    ``boxes`` [K, 4] (in the pixels of the model's input, ``size``)."""
    height, width = size
    if item.object_mask is not None:
        mask = Image.fromarray(item.object_mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
        pixels = torch.from_numpy(np.asarray(mask) > 127).float()
    elif boxes is not None and len(boxes):
        pixels = torch.zeros(height, width)
        for left, top, right, bottom in boxes:
            pixels[int(top):math.ceil(bottom), int(left):math.ceil(right)] = 1
    else:
        return None
    rows, cols = grid
    return torch.nn.functional.adaptive_avg_pool2d(pixels[None], (rows, cols))[0].reshape(-1)


def evaluate_variant(name: str, hook_manager: HookManager, dataset: LabelledImages, preprocess: Callable, *,
                     detect_layer: int | None = None, batch_size: int = 32, progress: bool = False,
                     keep_maps: int = 0) -> VariantResult:
    """One pass of ``hook_manager``'s model over ``dataset``; the first ``keep_maps`` images' CLS attention
    maps are kept for :func:`draw_object_discovery`.

    ``hook_manager`` describes the unmodified model, or is the view of a model with test-time
    registers (``ModifiedModel(...).hook_manager``) or trained ones, whose layout says where they are.
    """
    layout = hook_manager.layout
    last = hook_manager.num_layers - 1
    detect_layer = hook_manager.default_detect_layer if detect_layer is None else hook_manager.check_layer(detect_layer)
    height, width = input_size(preprocess)
    has_cls = layout.num_cls > 0
    registers = layout.num_test_time_registers or layout.num_trained_registers
    collected: dict[str, list] = {key: [] for key in ("ratios", "entropy", "objects", "boxes", "hits", "cls", "mean",
                                                      "registers", "embeddings", "labels")}
    lost_inputs = {}
    cls_maps, shown = [], []
    try:
        lost_site = hook_manager.attention_input_site(last)
    except UnsupportedModelError:   # an architecture that declares no attention input gets no LOST row
        log.warning("%s declares no attention_input: no LOST row", type(hook_manager).__name__)
        lost_site = None
    bar = tqdm(total=len(dataset), unit="img", desc=f"evaluating: {name}", disable=not progress)
    with torch.no_grad(), hook_manager.hooks() as hooks:
        if lost_site is not None and dataset.has_boxes:
            hooks.on(lost_site, lambda tokens: lost_inputs.__setitem__("tokens", tokens.detach()))
        for start in range(0, len(dataset), batch_size):
            items, resized, truths = [], [], []   # per readable image: its item, itself as the model sees it,
            for item in dataset.items[start:start + batch_size]:   # and its boxes in those pixels
                try:
                    image = item.read()
                except UnreadableImage as error:
                    dataset.skipped.append(item.name)
                    sources.log.warning("skipped %s: %s", item.name, error)   # where every skipped image is told
                    continue
                scale = np.array([width / image.width, height / image.height] * 2)
                truths.append(None if item.boxes is None else item.boxes * scale)
                resized.append(image.resize((width, height), Image.BICUBIC))
                items.append(item)
            bar.update(min(batch_size, len(dataset) - start))
            if not items:
                continue
            pixels = torch.stack([preprocess(image) for image in resized])
            grid = hook_manager.grid_shape(pixels)
            sites = {"residual": sorted({detect_layer, last}), "attention": [last] if has_cls else []}
            with hook_manager.capture(**sites) as captured:
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
            collected["labels"].append(torch.tensor([item.label if item.label is not None else -1 for item in items],
                                                    dtype=torch.int64))
            if has_cls:
                cls_row = measures.cls_patch_attention(captured.attention[last], layout).double()   # [B, H, P]
                attention = cls_row.mean(dim=1)       # [B, P], in float64: what is left for the patches may be subnormal
                attention = attention / attention.sum(dim=1, keepdim=True)
                if len(shown) < keep_maps:
                    kept = min(keep_maps - len(shown), len(items))
                    cls_maps.append(attention[:kept].float().reshape(-1, *grid).cpu())
                    shown.extend(zip(resized[:kept], truths[:kept]))
                collected["entropy"].append(-(attention * attention.clamp_min(1e-300).log()).sum(dim=1).float().cpu())
                coverage = [_patch_coverage(item, truth, (height, width), grid) for item, truth in zip(items, truths)]
                if all(c is not None for c in coverage):
                    collected["objects"].append((attention.cpu() * torch.stack(coverage)).sum(dim=1).float())
            if "tokens" in lost_inputs:
                tokens = lost_inputs.pop("tokens")[:, layout.patches(seq_len)]
                patch_h, patch_w = height / grid[0], width / grid[1]
                for truth, features in zip(truths, tokens):
                    left, top, right, bottom = lost_box(features, grid)
                    box = (left * patch_w, top * patch_h, right * patch_w, bottom * patch_h)
                    collected["boxes"].append(torch.tensor(box))
                    collected["hits"].append(bool(box_iou(box, truth).max() >= CORLOC_IOU))
    bar.close()
    if not collected["ratios"]:
        raise ImageSourceError(f"no readable image in {dataset.description or 'the evaluation set'}")

    def joined(key):
        parts = collected[key]
        return torch.cat(parts) if parts and all(part is not None for part in parts) else None

    labels = torch.cat(collected["labels"])
    features = {label: joined(key) for label, key in (("CLS", "cls"), ("mean patch", "mean"),
                                                       ("registers", "registers"))}
    return VariantResult(
        name=name, ratios=torch.cat(collected["ratios"]), cls_entropy=joined("entropy"),
        cls_on_objects=joined("objects") if len(collected["objects"]) == len(collected["ratios"]) else None,
        lost_boxes=torch.stack(collected["boxes"]) if collected["boxes"] else None,
        corloc_hits=torch.tensor(collected["hits"]) if collected["hits"] else None,
        features={label: value for label, value in features.items() if value is not None},
        embeddings=joined("embeddings"), labels=labels if bool((labels >= 0).all()) else None, patches=patches,
        cls_maps=torch.cat(cls_maps) if cls_maps else None, shown=shown)


# ---------------------------------------------------------------------------- the table

@dataclass
class Row:
    """One row of the comparison: a label and one value per variant (``None``: does not apply)."""

    label: str
    values: list[float | None]
    unit: str = ""


def outlier_rows(results: Sequence[VariantResult], detect_layer: int, outlier_ratio: float = OUTLIER_RATIO) -> list[Row]:
    return [
        Row(f"images with outliers (largest/median >= {outlier_ratio:g}), layer {detect_layer}",
            [float((r.ratios >= outlier_ratio).float().mean()) for r in results], "%"),
        Row("largest / median patch norm, median over images", [float(r.ratios.median()) for r in results], "x"),
        Row("largest / median patch norm, p99 over images",
            [float(torch.quantile(r.ratios, 0.99)) for r in results], "x"),
    ]


def attention_rows(results: Sequence[VariantResult]) -> list[Row]:
    rows = []
    if any(r.cls_entropy is not None for r in results):
        patches = next(r.patches for r in results if r.cls_entropy is not None)
        rows.append(Row(f"CLS attention entropy over patches (nats; uniform: {math.log(patches):.2f})",
                        [float(r.cls_entropy.mean()) if r.cls_entropy is not None else None for r in results]))
    if any(r.cls_on_objects is not None for r in results):
        rows.append(Row("CLS attention on the objects", [float(r.cls_on_objects.mean()) if r.cls_on_objects is not None
                                                         else None for r in results], "%"))
    if any(r.corloc_hits is not None for r in results):
        rows.append(Row(f"LOST CorLoc (IoU >= {CORLOC_IOU:g})", [float(r.corloc_hits.float().mean())
                                                                 if r.corloc_hits is not None else None
                                                                 for r in results], "%"))
    return rows


def probe_rows(results: Sequence[VariantResult], seed: int = 0) -> list[Row]:
    rows = []
    for kind in ("CLS", "mean patch", "registers"):
        values = [linear_probe(r.features[kind], r.labels, seed=seed) if kind in r.features and r.labels is not None
                  else None for r in results]
        if any(value is not None for value in values):
            rows.append(Row(f"linear probe on {kind} features, held-out accuracy", values, "%"))
    return rows


def zero_shot_row(results: Sequence[VariantResult], classifiers: Sequence[torch.Tensor | None]) -> Row | None:
    """Zero-shot top-1 accuracy per variant, from each one's image embeddings and its text classifier."""
    values = [zero_shot_accuracy(r.embeddings, classifier, r.labels)
              if classifier is not None and r.embeddings is not None and r.labels is not None else None
              for r, classifier in zip(results, classifiers)]
    return Row("zero-shot accuracy (open_clip templates)", values, "%") if any(v is not None for v in values) else None


@dataclass
class Comparison:
    """The comparison table: one column per variant, one :class:`Row` per measure; ``notes`` say what was left out."""

    columns: list[str]
    rows: list[Row]
    images: int
    notes: list[str] = field(default_factory=list)
    results: list[VariantResult] = field(default_factory=list, repr=False)

    def format(self) -> str:
        """The table as text, percentages as %, ratios with an x."""
        label_width = max(len(row.label) for row in self.rows)
        widths = [max(len(column), 8) for column in self.columns]
        lines = ["  ".join([" " * label_width] + [column.rjust(width) for column, width in zip(self.columns, widths)])]
        for row in self.rows:
            cells = [_cell(value, row.unit).rjust(width) for value, width in zip(row.values, widths)]
            lines.append("  ".join([row.label.ljust(label_width)] + cells))
        return "\n".join(lines + [f"note: {note}" for note in self.notes])

    def to_dict(self) -> dict:
        return {"columns": self.columns, "images": self.images, "notes": self.notes,
                "rows": [{"label": row.label, "unit": row.unit, "values": row.values} for row in self.rows]}


def _cell(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{100 * value:.1f}%"
    return f"{value:.2f}{unit}" if unit else f"{value:.3f}"


def compare_variants(variants: dict[str, tuple[HookManager, Callable]], dataset: LabelledImages, *,
                     detect_layer: int | None = None, outlier_ratio: float = OUTLIER_RATIO,
                     zero_shot: dict[str, torch.Tensor] | None = None, batch_size: int = 32, seed: int = 0,
                     progress: bool = False, keep_maps: int = 0) -> Comparison:
    """Evaluate each variant ``{column: (hook manager, preprocess)}`` on ``dataset`` and build the table.

    A variant with test-time registers is given by its view, ``ModifiedModel(...).hook_manager``.

    Rows that need what the dataset lacks (labels, boxes) or what a model lacks (CLS, a text
    tower: ``zero_shot`` maps columns to their text classifiers [E, C]) are left out, with a note.
    """
    results = [evaluate_variant(name, hook_manager, dataset, preprocess, detect_layer=detect_layer,
                                batch_size=batch_size, progress=progress, keep_maps=keep_maps)
               for name, (hook_manager, preprocess) in variants.items()]
    hook_manager = next(iter(variants.values()))[0]
    layer = hook_manager.default_detect_layer if detect_layer is None else detect_layer
    rows = outlier_rows(results, layer, outlier_ratio) + attention_rows(results)
    notes = []
    if not dataset.has_boxes:
        notes.append("no boxes or masks: no LOST CorLoc and no attention on objects (give VOC-style XML boxes)")
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

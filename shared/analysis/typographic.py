"""Typographic attacks (Jiang et al., NeurIPS 2025, Table 12): register neurons moved onto written text.

A typographic attack writes a wrong class name on a photo (RTA-100: an object with a label
naming another class), and CLIP often reads the text instead of looking at the object. The
paper moves the register neurons' activations onto the patches of the text
(:class:`~test_time_registers.edits.MoveToPatchesEdit`): the text's patches become outlier
tokens that the attention treats as registers, the model stops reading them, and the attack
succeeds less often. Moving as many random neurons of the same layers the same way is the
control: it should change little.

:func:`typographic_attack` measures, by zero-shot classification over the dataset's classes
(open_clip's text classifier), the **attack success rate** (the share of images classified as
the written class) and the **accuracy** (the share classified as the true class), for the
original model, the register neurons on the text, and random neurons on the text. Each image's
text box follows the model's real preprocessing (resize, centre crop:
:mod:`~test_time_registers.analysis.geometry`) before it becomes patches; an image whose text
the crop removes entirely is left out, and said so. Every rate has a 95% bootstrap interval over
images. :func:`draw_typographic_examples` shows what was measured on the first images.

Data format
-----------
A folder ``DIR`` holding the images and ``DIR/annotations.json``::

    {"classes": ["cat", "dog", ...],
     "images": [{"file": "img001.png", "label": "dog", "text": "cat",
                 "text_box": [left, top, right, bottom]}, ...]}

* ``classes``: two or more distinct, non-empty class names; the zero-shot classifier is built
  over exactly these.
* ``file``: a path relative to ``DIR`` (``/`` separated), that stays inside ``DIR``.
* ``label``: the true class; ``text``: the class written on the image; both names from
  ``classes``, and different.
* ``text_box``: where the text is, in pixels of the image as read (0 at the left/top edge,
  right/bottom exclusive): four finite numbers with ``0 <= left < right <= width`` and
  ``0 <= top < bottom <= height``.

No other key is accepted, at the top or in an image's entry (a misspelt key is an error, not
ignored). The file is read strictly (:mod:`~test_time_registers.files`: at most
:data:`MAX_ANNOTATION_BYTES`, no ``NaN``, no repeated key); anything wrong raises
:class:`~test_time_registers.ImageSourceError` naming the file and the field. Image files that
exist but cannot be decoded are skipped when read, logged, and named in the result's notes.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.sources import printable, read_image, read_or_skip
from ..edits import MoveToPatchesEdit, patch_mask
from ..errors import ImageSourceError, InvalidArgumentError, check_int
from ..files import MAX_JSON_BYTES, finite_number, parse_json, read_bounded
from ..hooks import HookManager
from ..intervention import ModifiedModel
from ..neurons import RegisterNeurons
from .evaluation import Comparison, Row, zero_shot_classifier, zero_shot_correct
from .figures import new_figure
from .geometry import Geometries, Geometry
from .intervals import bootstrap_interval

log = logging.getLogger(__name__)

ANNOTATION_FILE = "annotations.json"
#: The largest annotation file read (read at each call, so it can be lowered).
MAX_ANNOTATION_BYTES = MAX_JSON_BYTES
TOP_KEYS = ("classes", "images")
IMAGE_KEYS = ("file", "label", "text", "text_box")

ORIGINAL = "original"
REGISTERS_ON_TEXT = "register neurons on the text"
RANDOM_ON_TEXT = "random neurons on the text (control)"
COLUMNS = (ORIGINAL, REGISTERS_ON_TEXT, RANDOM_ON_TEXT)
ATTACK_ROW = "attack success rate (classified as the written text)"
ACCURACY_ROW = "accuracy (classified as the true class)"
#: Images kept as the model saw them, for :func:`draw_typographic_examples`.
EXAMPLES_KEPT = 8
#: Box coordinates in the model's input are rounded to this many decimals before they become patches,
#: so that rounding noise of the geometry (32.0000000001) does not touch a patch the text never reaches.
BOX_DECIMALS = 6

TRUE_COLOUR, TEXT_COLOUR, OTHER_COLOUR = "#2ca02c", "#d62728", "#555555"


# ---------------------------------------------------------------------------- the data

@dataclass(frozen=True)
class TypographicImage:
    """One attacked image: its file, its true class and written class (indices into the classes), and the text's box.

    ``text_box`` is (left, top, right, bottom) in pixels of the image as read, right/bottom
    exclusive; ``origin`` says where the entry is, for messages.
    """

    name: str
    path: Path
    label: int
    text: int
    text_box: tuple[float, float, float, float]
    origin: str

    def read(self) -> Image.Image:
        """The image as 8-bit RGB; :class:`~test_time_registers.data.sources.UnreadableImage` if PIL cannot."""
        return read_image(self.path)


@dataclass
class TypographicImages:
    """A typographic-attack set: its images, the class names, a description, and the images found unreadable."""

    items: list[TypographicImage]
    classes: list[str]
    description: str
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _fail(origin: str, where: str, expected: str, value: Any) -> NoReturn:
    raise ImageSourceError(f"{origin}: {where} must be {expected}, got {_show(value)}")


def _check_keys(origin: str, where: str, entry: Any, keys: tuple[str, ...]) -> None:
    if not isinstance(entry, dict):
        _fail(origin, where, f"an object with the keys {', '.join(keys)}", entry)
    missing = [key for key in keys if key not in entry]
    if missing:
        raise ImageSourceError(f"{origin}: {where} lacks the key(s) {', '.join(map(repr, missing))}")
    unknown = sorted(key for key in entry if key not in keys)
    if unknown:
        raise ImageSourceError(f"{origin}: {where} has unknown key(s) {', '.join(map(repr, unknown))}; "
                               f"the keys are {', '.join(keys)}")


def _classes(origin: str, value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) < 2 or \
            not all(isinstance(name, str) and name.strip() for name in value):
        _fail(origin, "'classes'", "a list of two or more non-empty class names", value)
    repeated = sorted({name for name in value if value.count(name) > 1})
    if repeated:
        raise ImageSourceError(f"{origin}: 'classes' names {', '.join(map(repr, repeated))} more than once")
    return list(value)


def _class_index(origin: str, where: str, value: Any, classes: list[str]) -> int:
    if not isinstance(value, str):
        _fail(origin, where, "a class name (a string)", value)
    if value not in classes:
        raise ImageSourceError(f"{origin}: {where} {value!r} is not one of the classes {_show(classes)}")
    return classes.index(value)


def _image_path(origin: str, where: str, value: Any, root: Path) -> Path:
    """The file an entry names, which must exist inside ``root`` (symbolic links followed)."""
    if not isinstance(value, str) or not value or "\x00" in value:
        _fail(origin, where, "a file name relative to the folder", value)
    relative = PurePosixPath(value)
    if relative.is_absolute() or Path(value).is_absolute() or ".." in relative.parts:
        raise ImageSourceError(f"{origin}: {where} {printable(value)!r} must be a path inside {printable(root)}, "
                               "relative to it and without '..'")
    path = root / relative
    try:
        inside = path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError) as problem:   # a loop of symbolic links, an unreadable folder
        raise ImageSourceError(f"{origin}: {where} {printable(value)!r} cannot be resolved ({problem})") from None
    if not inside:
        raise ImageSourceError(f"{origin}: {where} {printable(value)!r} leads outside {printable(root)}")
    if not path.is_file():
        raise ImageSourceError(f"{origin}: {where} {printable(value)!r} is not a file in {printable(root)}")
    return path


def _header_size(path: Path) -> tuple[int, int] | None:
    """The image's (width, height) from its header, or None when PIL does not recognise it (it is
    skipped, and said so, when it is read)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as opened:
                return opened.size
    except Exception:   # noqa: BLE001 - any refusal means "unreadable", handled at reading time
        return None


def _text_box(origin: str, where: str, value: Any, size: tuple[int, int] | None) -> tuple[float, float, float, float]:
    expected = "4 finite numbers [left, top, right, bottom] in pixels with 0 <= left < right and 0 <= top < bottom"
    if not isinstance(value, list) or len(value) != 4 or not all(finite_number(number) for number in value):
        _fail(origin, where, expected, value)
    left, top, right, bottom = (float(number) for number in value)
    if not (0 <= left < right and 0 <= top < bottom):
        _fail(origin, where, expected, value)
    if size is not None and (right > size[0] or bottom > size[1]):
        raise ImageSourceError(f"{origin}: {where} {_show(value)} reaches outside its image of "
                               f"{size[0]}x{size[1]} pixels")
    return left, top, right, bottom


def typographic_folder(root: str | os.PathLike, *, limit: int | None = None) -> TypographicImages:
    """Read a typographic-attack folder: ``root/annotations.json`` and the images it names (see the module's
    data format). ``limit`` keeps the first ``limit`` entries; every entry is checked all the same.

    Images are not decoded here (only their headers are read, to check the text boxes against their
    size); one that cannot be decoded is skipped when it is read.

    Raises:
        ImageSourceError: the folder or its annotation file is missing, or anything in the file is
            wrong; the message names the file, the field and what was expected.
        InvalidArgumentError: ``limit`` is not a positive int.
    """
    if limit is not None:
        check_int("limit", limit)
    root = Path(os.fsdecode(root))
    if not root.is_dir():
        raise ImageSourceError(f"typographic folder not found: {printable(root)}")
    annotation = root / ANNOTATION_FILE
    if not annotation.exists() and not annotation.is_symlink():
        raise ImageSourceError(f"{printable(root)} has no {ANNOTATION_FILE}; a typographic folder needs one "
                               "(see test_time_registers.analysis.typographic for its format)")
    origin = printable(annotation)
    data = parse_json(read_bounded(annotation, MAX_ANNOTATION_BYTES, ImageSourceError, "typographic annotation file"),
                      ImageSourceError, origin)
    _check_keys(origin, "the file", data, TOP_KEYS)
    classes = _classes(origin, data["classes"])
    entries = data["images"]
    if not isinstance(entries, list) or not entries:
        _fail(origin, "'images'", "a non-empty list of image entries", entries)
    items = []
    for index, entry in enumerate(entries):
        where = f"images[{index}]"
        _check_keys(origin, where, entry, IMAGE_KEYS)
        path = _image_path(origin, f"{where}.file", entry["file"], root)
        label = _class_index(origin, f"{where}.label", entry["label"], classes)
        text = _class_index(origin, f"{where}.text", entry["text"], classes)
        if label == text:
            raise ImageSourceError(f"{origin}: {where}.text is {entry['text']!r}, its true class: an attack writes "
                                   "another class's name")
        box = _text_box(origin, f"{where}.text_box", entry["text_box"], _header_size(path))
        items.append(TypographicImage(printable(entry["file"]), path, label, text, box, f"{origin}, {where}"))
    items = items[:limit] if limit else items
    return TypographicImages(items, classes, f"{len(items)} typographic image(s) from {printable(root)}")


# ---------------------------------------------------------------------------- text boxes to patches

def text_patch_mask(text_box: Sequence[float], geometry: Geometry, grid: tuple[int, int],
                    patch_size: tuple[int, int]) -> torch.Tensor | None:
    """The patches the text covers, at least partly, in the model's input: bool [rows, cols].

    Args:
        text_box: (left, top, right, bottom) in pixels of the image as read.
        geometry: how the preprocessing maps that image onto the input (:func:`preprocess_geometry`).
        grid: the input's patch grid (rows, cols); ``patch_size`` (height, width) in pixels.

    Returns:
        The mask, or None when no patch shows any of the text (the crop removed it, or it lies
        only in the input's last pixels that no whole patch covers).
    """
    (rows, cols), (patch_h, patch_w) = grid, patch_size
    mapped, kept = geometry.boxes(np.asarray(text_box, dtype=np.float64).reshape(1, 4))
    if not kept.any():
        return None
    left, top, right, bottom = np.round(mapped[0], BOX_DECIMALS)
    covered_h, covered_w = rows * patch_h, cols * patch_w      # the pixels the patches cover
    right, bottom = min(right, covered_w), min(bottom, covered_h)
    if not (left < right and top < bottom):
        return None
    return patch_mask(grid, boxes=[(left, top, right, bottom)], image_size=(covered_h, covered_w))


# ---------------------------------------------------------------------------- the variants

def random_control_neurons(neurons, hook_manager: HookManager, *, seed: int = 0) -> RegisterNeurons:
    """The control: in each layer of ``neurons``, as many neurons drawn uniformly without replacement
    among that layer's other neurons (never a register neuron), with a generator seeded by ``seed``.

    Raises:
        InvalidArgumentError: a layer has too few other neurons.
    """
    check_int("seed", seed, minimum=0)
    neurons = RegisterNeurons.coerce(neurons)
    neurons.check_fits(hook_manager, warn_other_model=False)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for layer, layer_neurons in neurons.by_layer().items():
        taken = set(layer_neurons)
        candidates = torch.tensor([neuron for neuron in range(hook_manager.num_neurons(layer)) if neuron not in taken],
                                  dtype=torch.int64)
        if len(candidates) < len(layer_neurons):
            raise InvalidArgumentError(f"layer {layer} has {len(candidates)} neuron(s) besides its "
                                       f"{len(layer_neurons)} register neuron(s): too few for a random control")
        drawn = candidates[torch.randperm(len(candidates), generator=generator)[:len(layer_neurons)]]
        chosen += [(layer, neuron) for neuron in sorted(drawn.tolist())]
    return replace(RegisterNeurons.coerce(chosen), source=f"random control, seed {seed}")


def text_edited_model(model, hook_manager: HookManager, neurons, text_patches: torch.Tensor, *,
                      scale: float = 1.0) -> ModifiedModel:
    """The model with ``neurons``' activations moved onto each image's text patches.

    Args:
        text_patches: bool [B, rows, cols], one mask per image of the batch it will run on.

    Returns:
        ``ModifiedModel(model, hook_manager, neurons, num_registers=0, edit=MoveToPatchesEdit(...))``:
        each neuron's maximum over CLS and the patches, times ``scale``, goes to every text patch;
        everywhere else it becomes zero.
    """
    return ModifiedModel(model, hook_manager, neurons, num_registers=0,
                         edit=MoveToPatchesEdit(patches=text_patches, scale=scale))


# ---------------------------------------------------------------------------- the protocol

@dataclass
class TypographicPerImage:
    """What each variant predicted on each evaluated image (tensors on the CPU).

    ``labels`` and ``texts`` are int64 [N], the true and written classes; ``embeddings`` maps each
    column to its image embeddings float [N, E] and ``predictions`` to its zero-shot classes int64
    [N]; ``text_patches`` is bool [N, rows, cols]; ``shown`` holds the first images as the model saw
    them with the text box in its pixels (left, top, right, bottom).
    """

    names: list[str]
    classes: list[str]
    labels: torch.Tensor
    texts: torch.Tensor
    embeddings: dict[str, torch.Tensor]
    predictions: dict[str, torch.Tensor]
    text_patches: torch.Tensor
    patch_size: tuple[int, int]
    neurons: RegisterNeurons
    random_neurons: RegisterNeurons
    shown: list[tuple[Image.Image, tuple[float, float, float, float]]] = field(default_factory=list)


@dataclass
class TypographicComparison(Comparison):
    """The typographic-attack table (a :class:`Comparison`) and, in ``per_image``, what it was computed from."""

    per_image: TypographicPerImage | None = field(default=None, repr=False)


def _describe(neurons: RegisterNeurons) -> str:
    return "; ".join(f"layer {layer}: {', '.join(map(str, sorted(indices)))}"
                     for layer, indices in neurons.by_layer().items())


def _embeddings(output, classifier: torch.Tensor) -> torch.Tensor:
    """The image embeddings [B, E] a forward pass returned, checked against the classifier [E, C]."""
    if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[1] != classifier.shape[0]:
        shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise InvalidArgumentError(f"the typographic attack needs a model whose image output is one embedding of "
                                   f"{classifier.shape[0]} values per image (CLIP's), got {shape}")
    return output.detach().float().cpu()


def _predictions(embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """The zero-shot class of each of ``embeddings`` [N, E] under ``classifier`` [E, C]: int64 [N]."""
    normalised = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    return (normalised @ classifier.float()).argmax(dim=1)


def _rate_row(label: str, hits: Sequence[torch.Tensor]) -> Row:
    """A row of shares from per-image bool values [N] per column, each with its bootstrap interval."""
    values = [hit.double().numpy() for hit in hits]
    return Row(label, [float(value.mean()) for value in values], "%", [bootstrap_interval(value) for value in values])


def typographic_attack(model, hook_manager: HookManager, preprocess: Callable, tokenizer: Callable,
                       dataset: TypographicImages, neurons, *, templates: Sequence, device=None, seed: int = 0,
                       batch_size: int = 32, progress: bool = False, scale: float = 1.0,
                       examples: int = EXAMPLES_KEPT) -> TypographicComparison:
    """Attack success rate and accuracy of zero-shot CLIP on ``dataset``, with and without neurons on the text.

    Three columns: the original model; ``neurons`` (the register neurons) moved onto each
    image's text patches (:func:`text_edited_model`); and the control, as many random neurons of
    the same layers (:func:`random_control_neurons` with ``seed``) moved the same way. Images are
    read once, in batches of ``batch_size``; each batch runs through the three variants. Each
    image's text box goes through ``preprocess``'s geometry and becomes the patches it covers.

    Args:
        model: an open_clip CLIP (with its text tower); ``hook_manager`` describes it.
        preprocess: the model's image preprocessing, PIL image -> [3, H, W], ending in a fixed size.
        tokenizer: the text tower's tokenizer (a callable: list of texts -> token ids).
        neurons: the register neurons (:class:`RegisterNeurons` or ``[(layer, neuron), ...]``).
        templates: open_clip's prompt templates (callables or format strings), e.g.
            ``open_clip.zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES``.
        device: where the text classifier is built (the model's device by default).
        scale: multiplies the maxima written onto the text.
        examples: how many images to keep, as the model saw them, for :func:`draw_typographic_examples`.

    Returns:
        A :class:`TypographicComparison`: rows :data:`ATTACK_ROW` and :data:`ACCURACY_ROW` in
        columns :data:`COLUMNS`, shares of the evaluated images with 95% bootstrap intervals; notes
        name the random neurons, the images left out (text cropped away) and those skipped
        (unreadable).

    Raises:
        InvalidArgumentError: no neurons, no templates, a model without one embedding per image.
        ImageSourceError: no image was left to evaluate.
    """
    check_int("batch_size", batch_size)
    check_int("seed", seed, minimum=0)
    check_int("examples", examples, minimum=0)
    if not templates:
        raise InvalidArgumentError("templates must hold at least one prompt template")
    if not finite_number(scale):
        raise InvalidArgumentError(f"scale must be a finite number, got {scale!r}")
    neurons = RegisterNeurons.coerce(neurons)
    if not len(neurons):
        raise InvalidArgumentError("the typographic attack needs register neurons to move onto the text")
    neurons.check_fits(hook_manager)
    random_neurons = random_control_neurons(neurons, hook_manager, seed=seed)
    device = hook_manager.device if device is None else device
    classifier = zero_shot_classifier(model, tokenizer, dataset.classes, templates, device).float().cpu()   # [E, C]

    predictions: dict[str, list[torch.Tensor]] = {column: [] for column in COLUMNS}
    embeddings: dict[str, list[torch.Tensor]] = {column: [] for column in COLUMNS}
    names, labels, texts, masks, shown = [], [], [], [], []
    left_out, skipped = [], []
    geometries = Geometries(preprocess)
    patch_size = hook_manager.patch_size
    bar = tqdm(total=len(dataset), unit="img", desc="typographic attack", disable=not progress)
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = dataset.items[start:start + batch_size]
            bar.update(len(batch))
            pixels, batch_masks, kept = [], [], []
            for item in batch:
                image = read_or_skip(item.name, item.read, dataset.skipped)
                if image is None:
                    skipped.append(item.name)
                    continue
                geometry = geometries(image.size)
                height, width = geometry.size
                grid = (height // patch_size[0], width // patch_size[1])
                mask = text_patch_mask(item.text_box, geometry, grid, patch_size)
                if mask is None:
                    left_out.append(item.name)
                    continue
                pixels.append(preprocess(image))
                batch_masks.append(mask)
                kept.append(item)
                if len(shown) < examples:
                    box = tuple(float(value) for value in geometry.boxes(np.asarray(item.text_box))[0][0])
                    shown.append((geometry.view(image), box))
            if not kept:
                continue
            sizes = {tuple(tensor.shape) for tensor in pixels}
            if len(sizes) > 1:
                raise InvalidArgumentError(f"the preprocessing makes images of different sizes "
                                           f"({', '.join(map(str, sizes))}): it must end in a fixed size")
            pixel_values = torch.stack(pixels)
            text_patches = torch.stack(batch_masks)                                  # [B, rows, cols]
            if tuple(text_patches.shape[1:]) != hook_manager.grid_shape(pixel_values):
                raise InvalidArgumentError(f"the text masks are {list(text_patches.shape[1:])} patches but the model "
                                           f"sees {list(hook_manager.grid_shape(pixel_values))}")
            runs = {ORIGINAL: hook_manager,
                    REGISTERS_ON_TEXT: text_edited_model(model, hook_manager, neurons, text_patches, scale=scale),
                    RANDOM_ON_TEXT: text_edited_model(model, hook_manager, random_neurons, text_patches, scale=scale)}
            for column, runner in runs.items():
                batch_embeddings = _embeddings(runner.forward_images(pixel_values), classifier)
                embeddings[column].append(batch_embeddings)
                predictions[column].append(_predictions(batch_embeddings, classifier))
            names += [item.name for item in kept]
            labels += [item.label for item in kept]
            texts += [item.text for item in kept]
            masks.append(text_patches)
    bar.close()
    if not names:
        raise ImageSourceError(f"no image left to evaluate in {dataset.description}: {len(skipped)} unreadable, "
                               f"{len(left_out)} with their text cropped away")

    label_tensor, text_tensor = torch.tensor(labels, dtype=torch.int64), torch.tensor(texts, dtype=torch.int64)
    joined = {column: torch.cat(parts) for column, parts in embeddings.items()}
    rows = [_rate_row(label, [zero_shot_correct(joined[column], classifier, target) for column in COLUMNS])
            for label, target in ((ATTACK_ROW, text_tensor), (ACCURACY_ROW, label_tensor))]
    notes = [f"zero-shot over the {len(dataset.classes)} classes of the set, {len(templates)} prompt template(s)",
             f"register neurons moved onto the text: {_describe(neurons)}",
             f"random neurons (control, seed {seed}; same layers, drawn among the other neurons): "
             f"{_describe(random_neurons)}"]
    if left_out:
        notes.append(f"left out {len(left_out)} image(s) whose text the preprocessing crops away entirely: "
                     f"{', '.join(left_out[:5])}{', ...' if len(left_out) > 5 else ''}")
    if skipped:
        notes.append(f"skipped {len(skipped)} unreadable image(s): "
                     f"{', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}")
    per_image = TypographicPerImage(names, list(dataset.classes), label_tensor, text_tensor, joined,
                                    {column: torch.cat(parts) for column, parts in predictions.items()},
                                    torch.cat(masks), tuple(patch_size), neurons, random_neurons, shown)
    log.info("typographic attack on %d image(s): attack success %s", len(names),
             ", ".join(f"{column} {100 * value:.1f}%" for column, value in zip(COLUMNS, rows[0].values)))
    return TypographicComparison(list(COLUMNS), rows, len(names), notes, [], per_image=per_image)


# ---------------------------------------------------------------------------- the figure

def draw_typographic_examples(comparison: TypographicComparison, count: int | None = None):
    """A figure of the first ``count`` images kept by :func:`typographic_attack` (all kept by default).

    One row per image, one column per variant: the image as the model sees it, the text's box
    outlined in yellow, and in the variants that move neurons the text's patches (where the maxima
    go) shaded. Each title is the variant's prediction: green for the true class, red for the
    written class, grey for another. Each axes is labelled ``"typographic variant=COLUMN image=I"``.
    Returns the matplotlib ``Figure``.
    """
    from matplotlib.patches import Rectangle

    per_image = getattr(comparison, "per_image", None)
    if per_image is None or not per_image.shown:
        raise InvalidArgumentError("no example images were kept: run typographic_attack with examples > 0")
    if count is not None:
        check_int("count", count)
    images = len(per_image.shown) if count is None else min(count, len(per_image.shown))
    columns = list(per_image.predictions)
    figure = new_figure(2.4 * len(columns), 2.5 * images + 0.7)
    axes = figure.subplots(images, len(columns), squeeze=False)
    figure.suptitle("Typographic attack: the images as the model sees them, the text's box in yellow, the patches "
                    "the neurons are moved to shaded.\nPrediction: green = the true class, red = the written class",
                    fontsize=8)
    patch_h, patch_w = per_image.patch_size
    for row in range(images):
        view, (left, top, right, bottom) = per_image.shown[row]
        label, text = int(per_image.labels[row]), int(per_image.texts[row])
        for column_index, column in enumerate(columns):
            ax = axes[row, column_index]
            ax.imshow(np.asarray(view))
            if column != ORIGINAL:
                mask = per_image.text_patches[row].float().numpy()
                rows, cols = mask.shape
                ax.imshow(mask, cmap="Blues", alpha=0.35 * mask, vmin=0, vmax=1, interpolation="nearest",
                          extent=(-0.5, cols * patch_w - 0.5, rows * patch_h - 0.5, -0.5))
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                                   edgecolor="#ffd400", linewidth=1.5))
            predicted = int(per_image.predictions[column][row])
            colour = TRUE_COLOUR if predicted == label else TEXT_COLOUR if predicted == text else OTHER_COLOUR
            ax.set_title(f"{column}:\n{per_image.classes[predicted]}", fontsize=7, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
            if column_index == 0:
                ax.set_ylabel(f"{per_image.names[row]}\ntrue: {per_image.classes[label]}, "
                              f"written: {per_image.classes[text]}", fontsize=7)
            ax.set_label(f"typographic variant={column} image={row}")
    return figure

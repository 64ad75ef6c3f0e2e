"""Images with dense labels: a class per pixel (semantic segmentation) or a depth per pixel.

Two readers, each returning a :class:`DenseDataset` whose items are file pairs, read lazily.

Segmentation, :func:`segmentation_folder`, in either layout:

* ADE20K's: ``ROOT/images/<path>.(jpg|jpeg|png)`` with ``ROOT/annotations/<path>.png`` (same
  relative path; ADE20K's own ``training/`` and ``validation/`` sub-folders are chosen with
  ``split``). Images without an annotation are skipped and named in ``unlabelled``.
* Pascal VOC's: ``ROOT/JPEGImages/<stem>.jpg`` with ``ROOT/SegmentationClass/<stem>.png``. The
  labelled images are those with a ``SegmentationClass`` PNG (``JPEGImages`` also holds VOC's
  detection-only images, which are not listed); with ``split``, those named in
  ``ROOT/ImageSets/Segmentation/<split>.txt``. A label map without its image is named in ``unlabelled``.

A label map is a single-channel PNG (8 or 16 bit) or a palette PNG of class indices: a palette
PNG's indices are read, never its colours. Class 255 is ignored. With ``reduce_zero_label``
(ADE20K's convention), 0 ("other") is ignored too and classes 1..150 become 0..149. Class names,
one per line, may be given in ``ROOT/classes.txt`` (after the reduction, when there is one);
the number of classes is then theirs, else it is given, else the largest class seen plus one.

Depth, :func:`depth_folder`, NYU-style: ``ROOT/images/<path>.(jpg|jpeg|png)`` with
``ROOT/depth/<path>.png`` (16-bit, millimetres, 0 invalid) or ``ROOT/depth/<path>.npy`` (float,
metres; 0, negative or non-finite values are invalid). Where both exist, the ``.npy`` is read.
Depths are returned in metres.

What :meth:`DenseDataset.read` returns: the RGB image and its label map [H, W] of the image's
size, int64 class indices with :data:`IGNORED` (-1) for ignored pixels, or float32 metres with 0
for invalid pixels. A file that cannot be decoded raises
:class:`~test_time_registers.data.sources.UnreadableImage` (the protocols skip it and name it);
a label map that is decoded but wrong (another size than its image's, colours instead of
indices, a class beyond the number of classes) raises
:class:`~test_time_registers.ImageSourceError` naming the file, since it means the dataset
itself is not what it claims to be.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ImageSourceError, InvalidArgumentError, check_int
from .sources import UnreadableImage, printable, read_image, read_label_map

log = logging.getLogger(__name__)

TASKS = ("segmentation", "depth")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: The class index that label files use for "ignore".
IGNORE_INDEX = 255
#: The class that :meth:`DenseDataset.read` returns for ignored pixels.
IGNORED = -1
#: The largest number of classes (label maps are kept as int16 in the model's input pixels).
MAX_CLASSES = 32767
MILLIMETRES_PER_METRE = 1000.0


@dataclass(frozen=True)
class DenseItem:
    """An image file and its label file (class indices, or depth)."""

    name: str
    image: Path
    label: Path


@dataclass
class DenseDataset:
    """Images with a label map each, for ``task`` (``"segmentation"`` or ``"depth"``).

    ``class_names`` and ``num_classes`` are known for segmentation when ``classes.txt`` or the
    caller gave them (``num_classes`` None: the largest class seen plus one). ``unlabelled``
    names the images found without a label file (or label files without an image);
    ``skipped`` the files found unreadable so far (the protocols add to it).
    """

    task: str
    items: list[DenseItem]
    description: str
    class_names: list[str] | None = None
    num_classes: int | None = None
    reduce_zero_label: bool = False
    unlabelled: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.task not in TASKS:
            raise InvalidArgumentError(f"task must be one of {TASKS}, got {self.task!r}")
        if not self.items:
            raise ImageSourceError(f"no labelled images in {self.description or 'the dense dataset'}")

    def __len__(self) -> int:
        return len(self.items)

    def read(self, item: DenseItem) -> tuple[Image.Image, np.ndarray]:
        """The image (RGB) and its label map [H, W]: int64 classes (:data:`IGNORED` for ignored pixels)
        or float32 depth in metres (0 invalid).

        Raises:
            UnreadableImage: either file cannot be decoded.
            ImageSourceError: the label map is decoded but wrong (its size, its format, its classes).
        """
        image = read_image(item.image)
        if self.task == "segmentation":
            target = read_classes(item.label, reduce_zero_label=self.reduce_zero_label)
            if self.num_classes is not None and target.size and int(target.max()) >= self.num_classes:
                raise ImageSourceError(f"{printable(item.label)} has class {int(target.max())}, but the dataset has "
                                       f"{self.num_classes} classes (0..{self.num_classes - 1}; {IGNORE_INDEX} is "
                                       "ignored)")
        else:
            target = read_depth(item.label)
        if target.shape != (image.height, image.width):
            raise ImageSourceError(f"{printable(item.label)} is {target.shape[1]}x{target.shape[0]} pixels, but its "
                                   f"image {printable(item.image)} is {image.width}x{image.height}: a label map must "
                                   "have its image's size")
        return image, target


# ---------------------------------------------------------------------------- label files

def read_classes(path: Path, *, reduce_zero_label: bool = False) -> np.ndarray:
    """A class-index PNG as int64 [H, W], :data:`IGNORED` where the file says 255 (and 0 with
    ``reduce_zero_label``, which shifts the other classes down by one).

    Raises:
        UnreadableImage: the file cannot be decoded.
        ImageSourceError: it holds colours (RGB) rather than class indices.
    """
    values = read_label_map(path)
    if values.ndim == 3:
        channels = values[..., :3]
        if values.shape[2] < 3 or not (channels == channels[..., :1]).all():
            raise ImageSourceError(f"{printable(path)} is a colour image ({values.shape[2]} channels): a label map "
                                   "must hold class indices (a single-channel or palette PNG)")
        values = values[..., 0]        # grey saved as RGB: every channel is the class
    classes = values.astype(np.int64)
    if classes.min(initial=0) < 0:
        raise ImageSourceError(f"{printable(path)} has negative class indices")
    ignored = classes == IGNORE_INDEX
    if reduce_zero_label:
        ignored |= classes == 0
        classes = classes - 1
    classes[ignored] = IGNORED
    return classes


def read_depth(path: Path) -> np.ndarray:
    """A depth file as float32 metres [H, W], 0 where invalid: a 16-bit PNG in millimetres (0 invalid) or a
    ``.npy`` in metres (0, negative or non-finite invalid).

    Raises:
        UnreadableImage: the file cannot be decoded.
        ImageSourceError: it is not one depth per pixel.
    """
    if path.suffix.lower() == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise UnreadableImage(f"not a readable .npy array ({error})") from None
        if values.ndim == 3 and values.shape[2] == 1:
            values = values[..., 0]
        if values.ndim != 2 or not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
            raise ImageSourceError(f"{printable(path)} holds a {values.dtype} array of shape {values.shape}: a depth "
                                   "map is [H, W] numbers in metres")
        depth = values.astype(np.float64)
    else:
        values = read_label_map(path)
        if values.ndim != 2:
            raise ImageSourceError(f"{printable(path)} has {values.shape[2]} channels: a depth PNG is single-channel "
                                   "16-bit millimetres")
        depth = values.astype(np.float64) / MILLIMETRES_PER_METRE
    depth[~np.isfinite(depth) | (depth < 0)] = 0.0
    return depth.astype(np.float32)


# ---------------------------------------------------------------------------- folders

def _check_limit(limit: int | None) -> None:
    if limit is not None:
        check_int("limit", limit)


def _images_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def _paired_by_path(images: Path, labels: Path, suffixes: Sequence[str], limit: int | None
                    ) -> tuple[list[DenseItem], list[str]]:
    """Each image under ``images`` with the label file of the same relative path under ``labels`` (the first of
    ``suffixes`` that exists); images without one are returned by name."""
    items, unlabelled = [], []
    for path in _images_under(images):
        relative = path.relative_to(images)
        label = next((labels / relative.with_suffix(suffix) for suffix in suffixes
                      if (labels / relative.with_suffix(suffix)).is_file()), None)
        if label is None:
            unlabelled.append(printable(relative))
            continue
        items.append(DenseItem(printable(relative), path, label))
        if limit is not None and len(items) == limit:
            break
    return items, unlabelled


def _voc_pairs(root: Path, split: str | None, limit: int | None) -> tuple[list[DenseItem], list[str]]:
    """VOC's segmentation pairs: every ``SegmentationClass`` PNG (or those of ``split``) with its JPEG."""
    images, labels = root / "JPEGImages", root / "SegmentationClass"
    if split is None:
        stems = sorted(path.stem for path in labels.glob("*.png") if not path.name.startswith("."))
    else:
        listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            raise ImageSourceError(f"no split {split!r} in {printable(root)}: {printable(listing)} is missing")
        stems = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    items, unlabelled = [], []
    for stem in stems:
        label = labels / f"{stem}.png"
        image = next((images / f"{stem}{suffix}" for suffix in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
                      if (images / f"{stem}{suffix}").is_file()), None)
        if image is None or not label.is_file():
            unlabelled.append(printable(stem))   # a label map without its image, or a listed name without either
            continue
        items.append(DenseItem(printable(image.name), image, label))
        if limit is not None and len(items) == limit:
            break
    return items, unlabelled


def _class_names(root: Path) -> list[str] | None:
    path = root / "classes.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ImageSourceError(f"{printable(path)} names no class (one class name per line)")
    return names


def segmentation_folder(root: str | Path, *, reduce_zero_label: bool = False, num_classes: int | None = None,
                        split: str | None = None, limit: int | None = None) -> DenseDataset:
    """A semantic-segmentation folder in ADE20K's layout (``images/`` + ``annotations/``) or VOC's
    (``JPEGImages/`` + ``SegmentationClass/``); see the module's docstring for the formats.

    ``split`` is a sub-folder of ``images/`` and ``annotations/`` (ADE20K's ``training``,
    ``validation``) or a VOC ``ImageSets/Segmentation/<split>.txt``; ``limit`` keeps the first
    images in sorted (or listed) order; ``num_classes`` is checked against ``classes.txt``.

    Raises:
        ImageSourceError: neither layout is there, or no image has a label map.
        InvalidArgumentError: ``limit`` or ``num_classes`` is not a positive int, or disagrees with ``classes.txt``.
    """
    root = Path(root)
    _check_limit(limit)
    if num_classes is not None:
        check_int("num_classes", num_classes)
        if num_classes > MAX_CLASSES:
            raise InvalidArgumentError(f"num_classes must be at most {MAX_CLASSES}, got {num_classes}")
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        images, labels = root / "images", root / "annotations"
        if split is not None:
            images, labels = images / split, labels / split
            if not images.is_dir() or not labels.is_dir():
                raise ImageSourceError(f"no split {split!r} in {printable(root)}: it needs images/{split}/ and "
                                       f"annotations/{split}/")
        items, unlabelled = _paired_by_path(images, labels, (".png",), limit)
        where = f"{printable(images)} (label maps: {printable(labels)}, same relative path, .png)"
    elif (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        items, unlabelled = _voc_pairs(root, split, limit)
        where = f"{printable(root / 'SegmentationClass')} (images: {printable(root / 'JPEGImages')})"
    else:
        raise ImageSourceError(f"{printable(root)} is not a segmentation folder: it needs images/ and annotations/ "
                               "(ADE20K) or JPEGImages/ and SegmentationClass/ (Pascal VOC)")
    if not items:
        raise ImageSourceError(f"no image with a label map in {where}")
    if unlabelled:
        log.warning("%d image(s) have no label map (or label maps no image) and are left out, e.g. %s",
                    len(unlabelled), unlabelled[0])
    names = _class_names(root)
    if names is not None:
        if num_classes is not None and num_classes != len(names):
            raise InvalidArgumentError(f"num_classes is {num_classes}, but {printable(root / 'classes.txt')} names "
                                       f"{len(names)} classes")
        num_classes = len(names)
    reduced = ", 0 ignored and the rest shifted down" if reduce_zero_label else ""
    return DenseDataset("segmentation", items, f"{len(items)} segmented images of {printable(root)}{reduced}",
                        names, num_classes, reduce_zero_label, unlabelled)


def depth_folder(root: str | Path, *, limit: int | None = None) -> DenseDataset:
    """A depth folder, NYU-style: ``images/`` with ``depth/`` (16-bit PNG in millimetres or ``.npy`` in metres,
    same relative path); see the module's docstring. ``limit`` keeps the first images in sorted order.

    Raises:
        ImageSourceError: the folders are missing, or no image has a depth map.
    """
    root = Path(root)
    _check_limit(limit)
    images, depths = root / "images", root / "depth"
    if not images.is_dir() or not depths.is_dir():
        raise ImageSourceError(f"{printable(root)} is not a depth folder: it needs images/ and depth/ (16-bit PNG "
                               "in millimetres, or .npy in metres)")
    items, unlabelled = _paired_by_path(images, depths, (".npy", ".png"), limit)
    if not items:
        raise ImageSourceError(f"no image with a depth map in {printable(images)} (depth maps: {printable(depths)}, "
                               "same relative path, .png or .npy)")
    if unlabelled:
        log.warning("%d image(s) have no depth map and are left out, e.g. %s", len(unlabelled), unlabelled[0])
    return DenseDataset("depth", items, f"{len(items)} images with depth of {printable(root)}", unlabelled=unlabelled)

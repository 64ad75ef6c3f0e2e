"""Labelled images: one reader of class folders, VOC boxes, generated scenes and CIFAR, for evaluation and training.

Every source becomes a :class:`LabelledImages`: a list of :class:`LabelledImage` (a name, a way
to read the image, and where known its class, its objects' boxes and an object mask) with the
class names. Evaluation walks its items and skips the images that cannot be read; training uses
it as a ``torch.utils.data.Dataset`` of ``(pixels [3, H, W], label)``, where an unreadable image
is an error. Images are read lazily, by picklable readers, so DataLoader workers can read them.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ImageSourceError, InvalidArgumentError, check_int, first_line
from .scenes import SHAPES, TEXTURES, demo_scenes
from .sources import ImageFolder, UnreadableImage, printable, read_image

log = logging.getLogger(__name__)

#: What a generated scene's label can be: its largest object's shape or texture.
SCENE_TASKS = ("shape", "texture")


@dataclass
class LabelledImage:
    """One image and what is known about it.

    ``read()`` returns the RGB image (it raises :class:`~test_time_registers.data.sources.UnreadableImage`
    for a file PIL cannot decode). ``label`` is a class index; ``boxes`` [K, 4] are the objects'
    boxes (left, top, right, bottom, in pixels of the image as read, right/bottom exclusive);
    ``object_mask`` [H, W] bool the pixels the objects cover; ``source`` where it was read from.
    """

    name: str
    read: Callable[[], Image.Image]
    label: int | None = None
    boxes: np.ndarray | None = None
    object_mask: np.ndarray | None = None
    source: str | None = None


class LabelledImages(Dataset):
    """Images with, where known, their class (``class_names[label]``), object boxes and object masks.

    As a ``Dataset``, item ``i`` is ``(preprocess(image i), label)`` with label -1 where none is
    known; :meth:`with_preprocess` sets the preprocessing. ``skipped`` names the images found
    unreadable so far.
    """

    def __init__(self, items: Sequence[LabelledImage], class_names: Sequence[str] | None = None,
                 description: str = "", *, skipped: Sequence[str] = (), preprocess: Callable | None = None):
        if not items:
            raise ImageSourceError(f"no images in {description or 'the labelled set'}")
        self.items = list(items)
        self.class_names = list(class_names) if class_names else None
        self.description = description
        self.skipped = list(skipped)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def image(self, index: int) -> Image.Image:
        """Image ``index`` as RGB; :class:`ImageSourceError` if it cannot be read."""
        item = self.items[index]
        try:
            return item.read()
        except UnreadableImage as error:
            raise ImageSourceError(f"cannot read {item.source or item.name}: {error}") from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.preprocess is None:
            raise InvalidArgumentError("set how images become tensors first: with_preprocess(preprocess)")
        label = self.items[index].label
        return self.preprocess(self.image(index)), -1 if label is None else label

    @property
    def labels(self) -> list[int]:
        """Each image's class index, -1 where none is known."""
        return [-1 if item.label is None else item.label for item in self.items]

    @property
    def has_labels(self) -> bool:
        return self.class_names is not None and all(item.label is not None for item in self.items)

    @property
    def has_boxes(self) -> bool:
        return all(item.boxes is not None and len(item.boxes) for item in self.items)

    @property
    def num_classes(self) -> int:
        """The number of classes: the class names', or 0 when the images have no labels."""
        return len(self.class_names) if self.has_labels else 0

    def with_preprocess(self, preprocess: Callable) -> "LabelledImages":
        """The same images, made tensors by ``preprocess`` (PIL image -> [3, H, W])."""
        return LabelledImages(self.items, self.class_names, self.description, skipped=self.skipped,
                              preprocess=preprocess)

    def subset(self, positions: Sequence[int], description: str | None = None) -> "LabelledImages":
        """The images at ``positions``, in that order."""
        return LabelledImages([self.items[position] for position in positions], self.class_names,
                              description or self.description, skipped=self.skipped, preprocess=self.preprocess)


# ---------------------------------------------------------------------------- readers (picklable)

class _File:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self) -> Image.Image:
        return read_image(self.path)


class _Given:
    def __init__(self, image: Image.Image):
        self.image = image

    def __call__(self) -> Image.Image:
        return self.image


class _DatasetImage:
    """Image ``index`` of a torchvision dataset that yields ``(PIL image, label)``."""

    def __init__(self, dataset, index: int):
        self.dataset, self.index = dataset, index

    def __call__(self) -> Image.Image:
        return self.dataset[self.index][0]


# ---------------------------------------------------------------------------- sources

def folder_images(root: str | Path, *, limit: int | None = None, seed: int = 0) -> LabelledImages:
    """The images under ``root``, read recursively; with one sub-folder per class (torchvision's
    ImageFolder layout), labelled by the sorted sub-folder names.

    Files directly under ``root`` have no class; a folder without sub-folders has no labels.
    Files whose header PIL does not recognise are skipped (and logged, and named in ``skipped``);
    with ``limit``, a seeded sample of that many of the others, in sorted order.
    """
    folder = ImageFolder(root)
    folder = ImageFolder(root, limit=limit or len(folder.files), seed=seed)
    files = sorted(folder.sample_files())
    if not files:
        raise ImageSourceError(folder.describe_empty())
    parts = [path.relative_to(folder.root).parts for path in files]
    classes = sorted({part[0] for part in parts if len(part) > 1})
    index = {name: position for position, name in enumerate(classes)}
    items = [LabelledImage(folder.shown_name(path), _File(path), index[part[0]] if len(part) > 1 else None,
                           source=printable(path)) for path, part in zip(files, parts)]
    return LabelledImages(items, [printable(name) for name in classes] or None,
                          f"{len(files)} images from {printable(folder.root)}",
                          skipped=[printable(name) for name in folder.skipped_names()])


def voc_boxes(annotation: str | Path, *, skip_difficult: bool = False) -> tuple[str, np.ndarray, list[str]]:
    """One Pascal VOC XML annotation: ``(file name, boxes [K, 4], class names)``.

    VOC boxes are 1-based and inclusive; they are returned 0-based with exclusive right/bottom.
    """
    try:
        root = ElementTree.parse(annotation).getroot()
        boxes, names = [], []
        for obj in root.iter("object"):
            if skip_difficult and obj.findtext("difficult", "0").strip() == "1":
                continue
            box = obj.find("bndbox")
            left, top, right, bottom = (float(box.findtext(key)) for key in ("xmin", "ymin", "xmax", "ymax"))
            if not all(map(math.isfinite, (left, top, right, bottom))):
                raise ValueError(f"a box of {obj.findtext('name', '?').strip()!r} is not finite")
            boxes.append([left - 1, top - 1, right, bottom])
            names.append(obj.findtext("name", "").strip())
        filename = root.findtext("filename", "").strip()
    except (ElementTree.ParseError, AttributeError, TypeError, ValueError, OSError) as error:
        raise ImageSourceError(f"{annotation} is not a readable VOC annotation ({error})") from None
    if not filename:
        raise ImageSourceError(f"{annotation} names no <filename>")
    return filename, np.array(boxes, dtype=np.float64).reshape(-1, 4), names


def voc_images(root: str | Path, *, skip_difficult: bool = False, limit: int | None = None) -> LabelledImages:
    """A Pascal-VOC-style folder: ``Annotations/*.xml`` with boxes, ``JPEGImages/`` with the images.

    Each image's label is the class of its largest box (class names sorted), so the same
    folder also serves a linear probe. ``limit`` reads the first annotations only.
    """
    root = Path(root)
    annotations, images = root / "Annotations", root / "JPEGImages"
    if not annotations.is_dir() or not images.is_dir():
        raise ImageSourceError(f"{root} is not a VOC-style folder: it needs Annotations/ (XML boxes) and JPEGImages/")
    files = sorted(annotations.glob("*.xml"))[:limit]
    if not files:
        raise ImageSourceError(f"no XML annotation in {annotations}")
    parsed = [voc_boxes(path, skip_difficult=skip_difficult) for path in files]
    classes = sorted({name for _, _, names in parsed for name in names})
    items, skipped = [], []
    for filename, boxes, names in parsed:
        path = images / filename
        if not path.is_file() or not len(boxes):
            skipped.append(filename)
            continue
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        items.append(LabelledImage(filename, _File(path), classes.index(names[int(areas.argmax())]), boxes,
                                   source=str(path)))
    if skipped:
        log.warning("skipped %d annotation(s) whose image is missing or that have no box: %s", len(skipped),
                    ", ".join(skipped[:5]))
    if not items:
        raise ImageSourceError(f"no image to read in {root}: every annotation's image is missing or has no box")
    return LabelledImages(items, classes, f"VOC boxes from {root}", skipped=skipped)


def scene_images(count: int, *, seed: int = 0, size: int = 224, task: str = "shape") -> LabelledImages:
    """Generated scenes (:mod:`test_time_registers.data.scenes`) with each object's box and the
    objects' mask, labelled by the shape (4 classes) or the texture (5 classes) of their largest object."""
    check_int("count", count)
    if task not in SCENE_TASKS:
        raise InvalidArgumentError(f"task must be one of {SCENE_TASKS}, got {task!r}")
    items = [LabelledImage(f"scene {index}", _Given(scene.image),
                           scene.label if task == "shape" else scene.texture_label, scene.boxes, scene.object_mask)
             for index, scene in enumerate(demo_scenes(count, seed, size))]
    return LabelledImages(items, list(SHAPES if task == "shape" else TEXTURES),
                          f"{count} generated scenes of {size} px, labelled by their largest object's {task}")


def cifar_images(root: str | Path, classes: int = 10, *, train: bool = True, limit: int | None = None
                 ) -> LabelledImages:
    """CIFAR-10 or CIFAR-100 from a local folder in torchvision's format (never downloaded)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    if classes not in (10, 100):
        raise InvalidArgumentError(f"CIFAR has 10 or 100 classes, not {classes}")
    dataset_class = CIFAR10 if classes == 10 else CIFAR100
    try:
        dataset = dataset_class(str(root), train=train, download=False)
    except (RuntimeError, OSError) as error:
        folder = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
        raise ImageSourceError(f"no CIFAR-{classes} in {root}: expected torchvision's {folder}/ folder there "
                               f"({first_line(error)})") from None
    count = min(limit or len(dataset), len(dataset))
    split = "training" if train else "test"
    items = [LabelledImage(f"CIFAR-{classes} {split} {index}", _DatasetImage(dataset, index), int(label))
             for index, label in enumerate(dataset.targets[:count])]
    return LabelledImages(items, dataset.classes, f"{count} CIFAR-{classes} {split} images from {root}")

"""Image sources: folders of files or in-memory PIL images, turned into batches on a device."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import re
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ImageSourceError, InvalidArgumentError

log = logging.getLogger(__name__)

Preprocess = Callable[[Image.Image], torch.Tensor]

#: The normalisation most ViTs were trained with (DINOv2, DeiT, the planted test images).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit and float greyscale are rescaled first)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        image = Image.fromarray(((values - low) * scale).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def printable(text: str | os.PathLike) -> str:
    """``text`` (a file name or path) as one line of valid text, for logs and messages.

    Bytes that are not UTF-8 in a name (which Python holds as lone surrogates) become ``\\xNN``,
    and control characters (a newline in a file name) their ``\\xNN`` / ``\\uNNNN`` escapes;
    everything else is kept. Use it wherever a name is shown, never where a file is opened.
    """
    shown = []
    for char in os.fspath(text):
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:            # a byte that was not UTF-8 (surrogateescape)
            shown.append(f"\\x{code - 0xDC00:02x}")
        elif unicodedata.category(char) in ("Cc", "Cs"):
            shown.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            shown.append(char)
    return "".join(shown)


def name_bytes(name: str | os.PathLike) -> bytes:
    """The exact bytes of a file name or path (its identity, for fingerprints), whatever its encoding."""
    return os.fsencode(name)


def _reason(error: BaseException, path: Path) -> str:
    """The first line of why PIL could not read ``path``, without the path itself, as printable text."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    for shown in (repr(str(path)), str(path)):   # PIL names the file as it is, or as its repr
        line = line.replace(f" {shown}", "").replace(shown, "")
    line = line.strip() or type(error).__name__
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        line = f"a possible decompression bomb: {line.rstrip('.')} (PIL's Image.MAX_IMAGE_PIXELS)"
    return printable(line)


@contextlib.contextmanager
def _pil_reading() -> Iterator[None]:
    """PIL's checks as errors: a decompression bomb warning stops the read; PIL's other notes about a
    file (odd EXIF, palette transparency) are logged at debug level instead of printed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield
    for warning in caught:
        log.debug("PIL: %s", printable(str(warning.message)))


class UnreadableImage(Exception):
    """A file that is not an image PIL can read (internal: such files are skipped and counted)."""


def read_image(path: Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, fully loaded and closed; :class:`UnreadableImage` otherwise.

    Every way PIL can refuse a file is an unreadable image: not an image, truncated, empty, a
    decoder's ``OSError``/``SyntaxError``/``ValueError``/``EOFError``/``struct.error``, and a
    decompression bomb (``DecompressionBombError``, which is none of those, and the
    ``DecompressionBombWarning`` PIL gives below twice its limit). Ctrl-C still interrupts.
    """
    try:
        with _pil_reading(), Image.open(path) as opened:
            opened.load()
            image = to_rgb(opened)
            if image is opened:
                image = opened.copy()
    except Exception as error:   # noqa: BLE001 - PIL's decoders raise many kinds; each means "cannot read it"
        raise UnreadableImage(_reason(error, path)) from None
    if min(image.size) == 0:
        raise UnreadableImage("the image is empty")
    return image


def read_or_skip(name: str, read: Callable[[], object], skipped: list[str]):
    """``read()``, or None when it raises :class:`UnreadableImage`: then ``name`` joins ``skipped`` (once,
    however many passes meet it) and is logged where every skipped image is told."""
    try:
        return read()
    except UnreadableImage as error:
        if name not in skipped:
            skipped.append(name)
        log.warning("skipped %s: %s", name, error)
        return None


def read_label_map(path: Path) -> np.ndarray:
    """A label file (class indices, depth) as its raw values, fully loaded and closed: [H, W] for a
    single-channel or palette PNG (palette indices, never colours), [H, W, C] for RGB(A);
    :class:`UnreadableImage` for anything PIL cannot read, as for images."""
    try:
        with _pil_reading(), Image.open(path) as opened:
            opened.load()
            values = np.array(opened)
    except Exception as error:   # noqa: BLE001 - as in read_image
        raise UnreadableImage(_reason(error, path)) from None
    if values.size == 0:
        raise UnreadableImage("the label map is empty")
    return values


def _readable_header(path: Path) -> str | None:
    """``None`` if PIL recognises the file's header (and its size is within PIL's limit), else why not.

    Cheap: nothing is decoded, so a file that passes may still be truncated.
    """
    try:
        with _pil_reading(), Image.open(path):
            return None
    except Exception as error:   # noqa: BLE001 - as in read_image
        return _reason(error, path)


class ImageFolder:
    """The images under a folder (recursively), read lazily and skipped when unreadable.

    With ``limit``, a seeded random sample of that many readable images is taken; files are
    otherwise visited in sorted order, or in a seeded random order with ``shuffle``. Either way
    the order depends on the set of files and the seed alone, never on how they are listed.
    Iterating yields ``(name, RGB image)``. ``skipped`` counts the distinct files found
    unreadable so far, over every pass; the first ``NAMED_SKIPS`` are logged by name as they are
    skipped.

    ``files`` restricts the folder to those files (see :meth:`hold_out`).
    """

    #: Skipped files named in the log per iteration; later ones are only counted.
    NAMED_SKIPS = 5

    def __init__(self, root: str | bytes | os.PathLike, limit: int | None = None, seed: int = 0, *,
                 files: list[Path] | None = None, shuffle: bool = False):
        self.root = Path(os.fsdecode(root))
        if not self.root.exists():
            raise ImageSourceError(f"image folder not found: {printable(self.root)}")
        if not self.root.is_dir():
            raise ImageSourceError(f"not a folder: {printable(self.root)}")
        if files is None:
            files = sorted(p for p in self.root.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.root).parts))
        self.files = sorted(files)
        if not self.files:
            raise ImageSourceError(f"image folder is empty: {printable(self.root)}")
        if limit is not None and limit < 1:
            raise InvalidArgumentError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.seed = seed
        self.shuffle = shuffle
        self.skipped_files: set[Path] = set()

    @property
    def skipped(self) -> int:
        """How many distinct files could not be read, over every pass so far."""
        return len(self.skipped_files)

    def skipped_names(self) -> list[str]:
        """The unreadable files found so far, relative to the root, sorted, exactly (for checkpoints;
        show them with :func:`printable`)."""
        return sorted(self.name_of(path) for path in self.skipped_files)

    def shuffled(self) -> "ImageFolder":
        """The same files (and sample), visited in an order drawn with the folder's seed."""
        copy = ImageFolder(self.root, self.limit, self.seed, files=self.files, shuffle=True)
        copy.skipped_files = self.skipped_files   # one count for both views
        return copy

    def __len__(self) -> int:
        """An upper bound: the number of files that will be tried."""
        return min(len(self.files), self.limit) if self.limit else len(self.files)

    def hold_out(self, count: int) -> tuple["ImageFolder", "ImageFolder | None"]:
        """Split off ``count`` readable images, chosen at random with this folder's seed, for evaluation.

        Returns ``(rest, held_out)``; ``rest`` keeps this folder's ``limit`` and every other file
        (its unreadable files are skipped and counted when it is read). The held-out images are
        decoded once here, so that an evaluation on them cannot find them unreadable after a run has
        written its files. At most half the readable images are held out, so that both parts have
        some; a folder with one readable image holds out none (``held_out`` is ``None``).

        Raises:
            ImageSourceError: no file of the folder is a readable image.
        """
        order = list(self.files)
        random.Random(self.seed).shuffle(order)
        decoded, readable = self._readable(order, decode=count, stop=2 * count)
        if not readable:
            raise ImageSourceError(f"no readable image among the {len(self.files)} file(s) in "
                                   f"{printable(self.root)}")
        held_out = decoded[:min(count, len(readable) // 2)]
        if not held_out:
            return self, None
        chosen = set(held_out)
        rest = [path for path in self.files if path not in chosen]
        return (ImageFolder(self.root, self.limit, self.seed, files=rest),
                ImageFolder(self.root, None, self.seed, files=sorted(held_out)))

    def readable_sample(self, count: int) -> "ImageFolder":
        """A seeded sample of up to ``count`` images that decode, in the order :meth:`hold_out` and a
        ``limit`` draw them, for what must not find a file unreadable halfway (figures, evaluations).
        The files found unreadable on the way are skipped and counted, in this folder and the sample.

        Raises:
            ImageSourceError: no file of the folder is a readable image.
        """
        order = list(self.files)
        random.Random(self.seed).shuffle(order)
        decoded, _ = self._readable(order, decode=count, stop=count, on_skip=self.record_skip)
        if not decoded:
            raise ImageSourceError(f"no readable image among the {len(self.files)} file(s) in "
                                   f"{printable(self.root)}")
        sample = ImageFolder(self.root, None, self.seed, files=sorted(decoded))
        sample.skipped_files = self.skipped_files   # one count for both
        return sample

    @staticmethod
    def _readable(order: list[Path], decode: int, stop: int, on_skip=None) -> tuple[list[Path], list[Path]]:
        """Walk ``order`` until ``stop`` files have a readable header; the first ``decode`` of those
        are decoded too. Returns (the decoded ones that decode, every file that passed); the others
        go to ``on_skip(path, reason)``."""
        decoded, readable = [], []
        for path in order:
            if len(readable) >= stop:
                break
            if len(decoded) < decode:
                try:
                    read_image(path)
                except UnreadableImage as error:
                    if on_skip is not None:
                        on_skip(path, str(error))
                    continue
                decoded.append(path)
                readable.append(path)
            elif (reason := _readable_header(path)) is None:
                readable.append(path)
            elif on_skip is not None:
                on_skip(path, reason)
        return decoded, readable

    def _visit_order(self) -> list[Path]:
        if not self.shuffle and (self.limit is None or self.limit >= len(self.files)):
            return self.files
        order = list(self.files)
        random.Random(self.seed).shuffle(order)
        return order

    def sample_files(self) -> list[Path]:
        """The files to read, in visit order: with ``limit``, the first ``limit`` whose header PIL
        recognises (files that fail are skipped and counted, as in a pass)."""
        order = self._visit_order()
        if self.limit is None:
            return order
        chosen = []
        for path in order:
            if len(chosen) == self.limit:
                break
            reason = _readable_header(path)
            if reason is None:
                chosen.append(path)
            else:
                self.record_skip(path, reason)
        return chosen

    def name_of(self, path: Path) -> str:
        """The file's name relative to the root, exactly (it may hold bytes that are not UTF-8:
        show it with :func:`printable`)."""
        return str(path.relative_to(self.root))

    def shown_name(self, path: Path) -> str:
        """The file's name relative to the root, as printable text (see :func:`printable`)."""
        return printable(self.name_of(path))

    def __iter__(self) -> Iterator[tuple[str, Image.Image]]:
        for path in self.sample_files():
            try:
                image = read_image(path)
            except UnreadableImage as error:
                self.record_skip(path, str(error))
                continue
            yield self.shown_name(path), image

    def record_skip(self, path: Path, reason: str) -> None:
        """Count an unreadable file once, and name the first ``NAMED_SKIPS`` in the log."""
        if path in self.skipped_files:   # already named in an earlier pass
            return
        self.skipped_files.add(path)
        if self.skipped <= self.NAMED_SKIPS:
            log.warning("skipped %s: %s", self.shown_name(path), printable(reason))
        elif self.skipped == self.NAMED_SKIPS + 1:
            log.warning("skipping more unreadable files in %s; they are counted at the end", printable(self.root))

    def describe_empty(self) -> str:
        """Why no image came out of this folder, for errors."""
        return f"no readable image among the {len(self)} file(s) tried in {printable(self.root)} ({self.skipped} skipped)"


def default_transform(size: int = 224):
    """The evaluation transform of most ImageNet-trained ViTs (DINOv2's among them): resize to 256/224
    of ``size``, centre crop, ImageNet normalisation. PIL image -> tensor [3, size, size]."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(round(size * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def image_source(images):
    """A folder path (``str``, ``bytes`` or path-like) becomes an :class:`ImageFolder`; every other
    source is returned as it is."""
    return ImageFolder(images) if isinstance(images, (str, bytes, os.PathLike)) else images


class Reordered:
    """A list or tensor of images visited in ``order`` (positions of the original), without a copy."""

    def __init__(self, items, order: Sequence[int]):
        self.items, self.order = items, list(order)

    def __len__(self) -> int:
        return len(self.order)


def calibration_first(images, count: int, seed: int = 0):
    """The same images, in an order whose first ``count`` are a seeded random sample.

    A folder is visited in an order drawn with its own seed from its sorted file list, so the
    sample does not depend on how the files are listed. A list, tuple or tensor has ``count`` of
    its positions drawn with ``seed`` and moved to the front (a :class:`Reordered`
    view, not a copy). Other iterables are left as they are: their first ``count`` images are the sample.
    """
    if isinstance(images, ImageFolder):
        return images.shuffled()
    if isinstance(images, torch.Tensor) or (isinstance(images, (list, tuple)) and images
                                            and not isinstance(images[0], torch.Tensor)):
        if len(images) <= count:
            return images
        sample = sorted(random.Random(seed).sample(range(len(images)), count))
        chosen = set(sample)
        return Reordered(images, sample + [index for index in range(len(images)) if index not in chosen])
    log.info("calibrating the automatic threshold on the first %d images of an iterable", count)
    return images


def no_images_message(images) -> str:
    """Why a source gave no image, for errors."""
    if isinstance(images, ImageFolder):
        return images.describe_empty()
    return "no images were given"


def named_images(images) -> Iterable[tuple[str, Image.Image]]:
    """``(name, image)`` pairs from a folder path, an :class:`ImageFolder` or PIL images."""
    images = image_source(images)
    if isinstance(images, ImageFolder):
        return images
    return ((f"image_{index}", to_rgb(image)) for index, image in enumerate(images))


def count_hint(images) -> int | None:
    """How many images a source will give, when that is known in advance (for progress bars)."""
    images = image_source(images)
    if isinstance(images, (torch.Tensor, ImageFolder, list, tuple)):
        return len(images)
    return None


def take(images, count: int) -> list[Image.Image]:
    """The first ``count`` readable RGB images of any source that :func:`named_images` takes."""
    return [image for _, image in itertools.islice(named_images(images), count)]

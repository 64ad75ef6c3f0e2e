"""The input pipeline: any image source, in preprocessed batches on the model's device.

Sources with a known order (a folder, a list of PIL images, a tensor ``[N, 3, H, W]``) are read
through a ``torch.utils.data.DataLoader``: decoding and preprocessing run in ``workers``
processes, batches are pinned on CUDA and copied without blocking, and the source can be split
into shards (one per distributed rank) and resumed from a position. Every batch says which
positions of the source it used up, so a checkpoint can record how far a run got.

Any other iterable streams as it comes: PIL images, or preprocessed batches (tensors
``[B, 3, H, W]``, ``(tensor, ...)`` tuples or ``{"pixel_values": tensor}`` dicts, as a user's own
DataLoader yields them). A stream is neither sharded nor reordered here; a user's DataLoader
under torchrun shards itself (``DistributedSampler``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import InvalidArgumentError, check_int
from .sources import ImageFolder, Reordered, UnreadableImage, image_source, name_bytes, read_image, to_rgb

log = logging.getLogger(__name__)

Preprocess = Callable[[Image.Image], torch.Tensor]


@dataclass
class Batch:
    """Preprocessed images on the device, and where in the source they came from.

    ``positions`` are the source positions of the images in ``pixel_values``; ``consumed`` counts
    every position the batch used up, unreadable ones included (streams count images).
    """

    names: list[str]
    pixel_values: torch.Tensor          # [B, 3, H, W]
    positions: list[int] = field(default_factory=list)
    consumed: int = 0


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world`` takes positions ``rank, rank + world, ...`` of the source."""

    rank: int = 0
    world: int = 1


class _Items(Dataset):
    """Position -> ``(position, tensor [3, H, W] or None, why unreadable or None)``."""

    def __init__(self, read: Callable[[int], object], preprocess: Preprocess | None, size: int):
        self.read, self.preprocess, self.size = read, preprocess, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, position: int):
        try:
            item = self.read(position)
        except UnreadableImage as error:
            return position, None, str(error)
        if isinstance(item, torch.Tensor):
            return position, item, None
        if self.preprocess is None:
            raise InvalidArgumentError("preprocess is required to turn PIL images into tensors")
        return position, self.preprocess(item), None


def _collate(samples):
    positions = [position for position, tensor, _ in samples if tensor is not None]
    tensors = [tensor for _, tensor, _ in samples if tensor is not None]
    skipped = [(position, reason) for position, tensor, reason in samples if tensor is None]
    pixels = torch.stack(tensors) if tensors else None
    return positions, pixels, skipped, len(samples)


class _ReadFiles:
    """Position -> RGB image of a file (picklable, for DataLoader workers started by spawn)."""

    def __init__(self, files: Sequence):
        self.files = list(files)

    def __call__(self, position: int):
        return read_image(self.files[position])


class _ReadItems:
    """Position -> a list's PIL image (as RGB) or a tensor's row, through an optional order."""

    def __init__(self, items, order: Sequence[int] | None = None):
        self.items, self.order = items, order

    def __call__(self, position: int):
        item = self.items[self.order[position] if self.order is not None else position]
        return item if isinstance(item, torch.Tensor) else to_rgb(item)


class OrderedSource:
    """A source whose items have positions: ``names[i]`` and ``read(i)`` for ``i`` in ``range(len)``.

    ``names`` are what batches call the items (printable text); ``keys`` identify them exactly
    (a folder's file names, which may hold bytes that are not UTF-8; by default the names).
    ``fingerprint`` hashes the keys' bytes and the folder's, so that a checkpoint is resumed only
    on the images it was made from.
    """

    def __init__(self, names: Sequence[str], read: Callable[[int], object], on_skip=None, origin=None,
                 on_device: bool = False, keys: Sequence[str] | None = None):
        self.names, self.read, self.on_skip, self.origin, self.on_device = names, read, on_skip, origin, on_device
        self.keys = names if keys is None else keys

    def __len__(self) -> int:
        return len(self.names)

    @property
    def fingerprint(self) -> str:
        root = getattr(self.origin, "root", "")
        return hashlib.sha256(b"\n".join([name_bytes(root), *map(name_bytes, self.keys)])).hexdigest()[:16]

    def batches(self, preprocess, batch_size: int, device, dtype, *, workers: int = 0, shard: Shard = Shard(),
                start: int = 0) -> Iterator[Batch]:
        """Batches of this shard's positions, from its ``start``-th position on."""
        positions = list(range(shard.rank, len(self), shard.world))[start:]
        device = torch.device(device)
        loader = DataLoader(_Items(self.read, preprocess, len(self)), batch_size=batch_size, sampler=positions,
                            num_workers=workers, collate_fn=_collate,
                            pin_memory=device.type == "cuda" and not self.on_device,
                            persistent_workers=False)
        for kept, pixels, skipped, consumed in loader:
            for position, reason in skipped:
                if self.on_skip is not None:
                    self.on_skip(position, reason)
            if pixels is None:
                yield Batch([], torch.empty(0, 3, 0, 0, device=device, dtype=dtype), [], consumed)
                continue
            pixels = pixels.to(device=device, dtype=dtype, non_blocking=device.type == "cuda")
            yield Batch([self.names[p] for p in kept], pixels, kept, consumed)


def ordered_source(images) -> OrderedSource | None:
    """The source as positions, or ``None`` for a stream (an iterable of unknown order)."""
    if isinstance(images, OrderedSource):
        return images
    images = image_source(images)
    if isinstance(images, ImageFolder):
        files = images.sample_files()
        return OrderedSource([images.shown_name(path) for path in files], _ReadFiles(files),
                             on_skip=lambda i, reason: images.record_skip(files[i], reason), origin=images,
                             keys=[images.name_of(path) for path in files])
    items, order = (images.items, images.order) if isinstance(images, Reordered) else (images, None)
    if isinstance(items, torch.Tensor) and items.ndim != 4:
        raise InvalidArgumentError(f"an image tensor must be [N, 3, H, W], got shape {tuple(items.shape)}")
    if isinstance(items, (list, tuple)) and items and _batch_tensor(items[0]) is not None:
        return None   # a list of preprocessed batches streams like a DataLoader
    if isinstance(items, (list, tuple, torch.Tensor)):
        indices = order if order is not None else range(len(items))
        return OrderedSource([f"image_{i}" for i in indices], _ReadItems(items, order),
                             on_device=isinstance(items, torch.Tensor) and items.device.type != "cpu")
    return None


def _stream_batches(images: Iterable, preprocess, batch_size: int, device, dtype, start: int) -> Iterator[Batch]:
    """An iterable of PIL images (batched here) or of preprocessed batches (used as they come)."""
    device = torch.device(device)
    iterator = iter(images)
    seen = 0
    names: list[str] = []
    tensors: list[torch.Tensor] = []

    def flush():
        pixels = torch.stack(tensors).to(device=device, dtype=dtype, non_blocking=device.type == "cuda")
        positions = list(range(seen - len(tensors), seen))
        return Batch(list(names), pixels, positions, len(tensors))

    for item in iterator:
        pixels = _batch_tensor(item)
        if pixels is not None:
            count = len(pixels)
            if seen + count <= start:       # resumed: this batch was done before
                seen += count
                continue
            if seen < start:                # resumed inside this batch: its first rows were done before
                pixels, seen = pixels[start - seen:], start
                count = len(pixels)
            positions = list(range(seen, seen + count))
            seen += count
            yield Batch([f"image_{p}" for p in positions], pixels.to(device=device, dtype=dtype,
                        non_blocking=device.type == "cuda"), positions, count)
            continue
        seen += 1
        if seen <= start:
            continue
        if preprocess is None:
            raise InvalidArgumentError("preprocess is required to turn PIL images into tensors")
        names.append(f"image_{seen - 1}")
        tensors.append(preprocess(to_rgb(item)))
        if len(tensors) == batch_size:
            yield flush()
            names.clear()
            tensors.clear()
    if tensors:
        yield flush()


def _batch_tensor(item) -> torch.Tensor | None:
    """The pixels of an already preprocessed batch, or ``None`` for a single image."""
    if isinstance(item, torch.Tensor) and item.ndim == 4:
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor) and item[0].ndim == 4:
        return item[0]
    if isinstance(item, dict) and isinstance(item.get("pixel_values"), torch.Tensor):
        return item["pixel_values"]
    if isinstance(item, torch.Tensor):
        raise InvalidArgumentError(f"an image tensor must be [N, 3, H, W], got shape {tuple(item.shape)}")
    return None


def batches(images, preprocess: Preprocess | None, batch_size: int, device: torch.device | str, dtype: torch.dtype,
            *, workers: int = 0, shard: Shard = Shard(), start: int = 0) -> Iterator[Batch]:
    """Yield preprocessed batches on ``device``.

    A batch whose images were all unreadable has no names and an empty ``pixel_values``, so that
    its ``consumed`` positions still count.

    Args:
        images: a folder path, an :class:`ImageFolder`, a list of PIL images, a tensor
            [N, 3, H, W], or any iterable of PIL images or of preprocessed batches.
        preprocess: PIL image -> tensor [3, H, W]; not needed for tensors.
        batch_size: images per batch (a stream of batches keeps its own).
        workers: DataLoader worker processes for decoding and preprocessing (ordered sources).
        shard: which positions this process reads (ordered sources).
        start: skip the shard's first ``start`` positions (a stream: its first ``start`` images).
    """
    check_int("batch_size", batch_size)
    check_int("workers", workers, minimum=0)
    source = ordered_source(images)
    if source is None:
        if shard.world > 1:
            log.info("a stream of images is not sharded here; shard it yourself (DistributedSampler)")
        yield from _stream_batches(image_source(images), preprocess, batch_size, device, dtype, start)
        return
    yield from source.batches(preprocess, batch_size, device, dtype, workers=workers, shard=shard, start=start)


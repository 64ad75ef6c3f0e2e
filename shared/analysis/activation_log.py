"""An HDF5 log of per-image patch-norm maps and register-neuron activations.

The file is written batch by batch in HDF5's SWMR mode (single writer, multiple readers) and
flushed after each batch, so the file on disk is consistent at every moment: a run that is
interrupted, even by SIGKILL, leaves a file holding the images of its last flushed batch
(attribute ``complete`` stays false). Such a file is still marked as open for SWMR writing, so
plain ``h5py.File(path, "r")`` refuses it; open it with ``h5py.File(path, "r", swmr=True)``, or
with :func:`open_activation_log`, which does so and checks what it reads.

Layout of the file::

    names               [N]                         image names (file paths or image_i)
    patch_norms         [N, layers, rows, cols]     block-output norm of every patch
    prefix_norms        [N, layers, num_prefix]     the same for CLS and trained registers
    neuron_activations  [N, K, L]                   the K register neurons at every token
    attrs: model, neurons (JSON [[layer, neuron], ...]), num_cls, num_trained_registers,
           grid, detect_layer, threshold, images_written, complete
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from .. import measures
from ..data.batching import batches
from ..data.sources import count_hint, image_source, no_images_message
from ..errors import ActivationLogError, ImageSourceError, InvalidArgumentError
from ..files import parse_json
from ..hooks import HookManager
from ..neurons import RegisterNeurons

log = logging.getLogger(__name__)


def log_activations(hook_manager: HookManager, images, neurons, path: str | os.PathLike,
                    preprocess: Callable | None = None, *, batch_size: int = 32, workers: int = 0,
                    progress: bool = True) -> Path:
    """Run the unmodified model over ``images`` and log norms and neuron activations to ``path``.

    Returns the path. If no image could be processed, no file is left behind and
    :class:`ImageSourceError` is raised.
    """
    neurons = RegisterNeurons.coerce(neurons)
    neurons.check_fits(hook_manager)
    images = image_source(images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = hook_manager.layout
    num_layers = hook_manager.num_layers
    by_layer = neurons.by_layer()
    order = {pair: rank for rank, pair in enumerate(neurons.pairs())}
    norms: dict[int, torch.Tensor] = {}
    picked: dict[int, torch.Tensor] = {}

    def keep_norms(layer):
        def keep(residual):
            norms[layer] = measures.token_norms(residual)   # [B, L]
        return keep

    def keep_neurons(layer):
        index = torch.tensor(by_layer[layer], device=hook_manager.device)

        def keep(acts):
            picked[layer] = acts[:, :, index].float()                           # [B, L, k]
        return keep

    written = 0
    handle = None     # made with the first batch: a run killed before it leaves no file
    try:
        bar = tqdm(total=count_hint(images), unit="img", desc="logging activations", disable=not progress)
        with hook_manager.hooks() as hooks, torch.no_grad():
            for layer in range(num_layers):
                hooks.on_block_output(layer, keep_norms(layer))
            for layer in by_layer:
                hooks.on_neurons(layer, keep_neurons(layer))
            for batch in batches(images, preprocess, batch_size, hook_manager.device, hook_manager.input_dtype,
                                 workers=workers):
                if not batch.names:   # every image of it was unreadable
                    continue
                hook_manager.forward_images(batch.pixel_values)
                seq_len = norms[0].shape[1]
                grid = hook_manager.grid_shape(batch.pixel_values)
                stacked = torch.stack([norms[layer] for layer in range(num_layers)], dim=1)  # [B, layers, L]
                patch_maps = stacked[:, :, layout.patches(seq_len)].reshape(len(stacked), num_layers, *grid)
                columns = [None] * len(neurons)
                for layer, layer_neurons in by_layer.items():
                    for position, neuron in enumerate(layer_neurons):
                        columns[order[(layer, neuron)]] = picked[layer][:, :, position]
                activations = torch.stack(columns, dim=1)                                  # [B, K, L]
                if handle is None:
                    handle = h5py.File(path, "w", libver="latest")
                    _describe(handle, hook_manager, neurons)
                    _create_datasets(handle, num_layers, grid, layout.num_prefix, len(neurons), seq_len)
                _append(handle, written, batch.names, patch_maps.cpu().numpy(),
                        stacked[:, :, layout.prefix()].cpu().numpy(),
                        activations.cpu().numpy())
                written += len(batch.names)
                handle.attrs["images_written"] = written
                handle.flush()
                bar.update(len(batch.names))
        bar.close()
        if handle is not None:
            handle.attrs["complete"] = True
    finally:
        if handle is not None:
            handle.close()
    if written == 0:
        raise ImageSourceError(f"{no_images_message(images)}; {path} was not written")
    log.info("logged %d images to %s", written, path)
    return path


def _describe(handle: h5py.File, hook_manager: HookManager, neurons: RegisterNeurons) -> None:
    handle.attrs.update({
        "model": hook_manager.name,
        "neurons": json.dumps(neurons.pairs()),
        "num_cls": hook_manager.layout.num_cls,
        "num_trained_registers": hook_manager.layout.num_trained_registers,
        "detect_layer": -1 if neurons.detect_layer is None else neurons.detect_layer,
        "threshold": float("nan") if neurons.threshold is None else neurons.threshold,
        "images_written": 0,
        "complete": False,
    })


def _create_datasets(handle: h5py.File, num_layers: int, grid: tuple[int, int], num_prefix: int,
                     num_neurons: int, seq_len: int) -> None:
    handle.attrs["grid"] = grid
    handle.create_dataset("names", (0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(256,))
    for name, shape in (("patch_norms", (num_layers, *grid)), ("prefix_norms", (num_layers, num_prefix)),
                        ("neuron_activations", (num_neurons, seq_len))):
        handle.create_dataset(name, (0, *shape), maxshape=(None, *shape), dtype="float32", chunks=(1, *shape))
    handle.swmr_mode = True  # readers see a consistent file while it grows


def _append(handle: h5py.File, start: int, names, patch_maps, prefix_norms, activations) -> None:
    stop = start + len(names)
    for name, values in (("names", names), ("patch_norms", patch_maps), ("prefix_norms", prefix_norms),
                         ("neuron_activations", activations)):
        dataset = handle[name]
        if values is not names and tuple(values.shape[1:]) != dataset.shape[1:]:
            raise InvalidArgumentError(f"all images must have the same size to be logged together; got {values.shape[1:]} "
                             f"after {dataset.shape[1:]}")
        dataset.resize(stop, axis=0)
        dataset[start:stop] = values



#: The datasets of a log, after the first image.
DATASETS = ("names", "patch_norms", "prefix_norms", "neuron_activations")
#: Bounds of what a log may declare (far above any real model).
MAX_LOG_LAYERS = 4096
MAX_LOG_NEURONS = 2**16


@dataclass
class ActivationLog:
    """An open, checked activation log (see :func:`open_activation_log`); its arrays are read on demand.

    Attributes:
        path: the file.
        model, neurons, num_cls, num_trained_registers, detect_layer, threshold: as logged
            (``detect_layer`` is None and ``threshold`` NaN where the neurons did not say).
        grid: ``(rows, cols)`` of the patch maps, or None for a log without images.
        images: the images fully written (at most ``images_written``, and no more than every dataset holds).
        complete: the run finished; False for an interrupted log.
    """

    path: Path
    handle: h5py.File
    model: str
    neurons: list[tuple[int, int]]
    num_cls: int
    num_trained_registers: int
    detect_layer: int | None
    threshold: float
    grid: tuple[int, int] | None
    images: int
    complete: bool

    def _rows(self, name: str, start: int, stop: int | None):
        stop = self.images if stop is None else min(stop, self.images)
        if self.grid is None:
            raise ActivationLogError(f"{self.path} holds no image")
        return self.handle[name][start:stop]

    def names(self, start: int = 0, stop: int | None = None) -> list[str]:
        """Image names of rows ``start:stop``."""
        return [name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else str(name)
                for name in self._rows("names", start, stop)]

    def patch_norms(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """[images, layers, rows, cols] block-output norm of every patch."""
        return torch.from_numpy(self._rows("patch_norms", start, stop))

    def prefix_norms(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """[images, layers, num_prefix] the same for CLS and trained registers."""
        return torch.from_numpy(self._rows("prefix_norms", start, stop))

    def neuron_activations(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """[images, K, tokens] the K register neurons (in ranked order) at every token."""
        return torch.from_numpy(self._rows("neuron_activations", start, stop))


def _whole(value, low: int, high: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and low <= value <= high


@contextlib.contextmanager
def open_activation_log(path: str | os.PathLike) -> Iterator[ActivationLog]:
    """Open an activation log, complete or interrupted, read-only (with ``swmr=True``), and check it.

    Raises:
        ActivationLogError: the file is missing, not HDF5, or an attribute or dataset is missing or
            of the wrong type, shape or range; the message names the file, the field and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise ActivationLogError(f"no activation log at {path} (expected an HDF5 file that --log writes)")
    try:
        handle = h5py.File(path, "r", swmr=True)
    except (OSError, ValueError) as error:
        raise ActivationLogError(f"{path} is not a readable HDF5 activation log ({str(error).splitlines()[0][:200]})") \
            from None
    try:
        yield _checked(path, handle)
    finally:
        handle.close()


def _checked(path: Path, handle: h5py.File) -> ActivationLog:
    def refuse(field: str, expected: str, got) -> None:
        shown = repr(got)
        raise ActivationLogError(f"{path}: {field} must be {expected}, got "
                                 f"{shown if len(shown) <= 60 else shown[:57] + '...'}")

    attrs = dict(handle.attrs)
    missing = [key for key in ("model", "neurons", "num_cls", "num_trained_registers", "detect_layer", "threshold",
                               "images_written", "complete") if key not in attrs]
    if missing:
        raise ActivationLogError(f"{path}: the attributes lack {', '.join(missing)}; not an activation log this "
                                 "version writes")
    model = attrs["model"]
    model = model.decode("utf-8", "replace") if isinstance(model, bytes) else model
    if not isinstance(model, str):
        refuse("attribute model", "a string", model)
    text = attrs["neurons"]
    if not isinstance(text, (str, bytes)):
        refuse("attribute neurons", "a JSON string", text)
    neurons = parse_json(text, ActivationLogError, f"the attribute neurons of {path}")
    if not (isinstance(neurons, list) and 1 <= len(neurons) <= MAX_LOG_NEURONS and all(
            isinstance(pair, list) and len(pair) == 2 and all(_whole(v, 0, 2**31) for v in pair) for pair in neurons)):
        refuse("attribute neurons", "a JSON list of [layer, neuron] pairs of non-negative ints", neurons)
    for name in ("num_cls", "num_trained_registers"):
        if not _whole(attrs[name], 0, MAX_LOG_LAYERS):
            refuse(f"attribute {name}", f"an int in 0..{MAX_LOG_LAYERS}", attrs[name])
    if not _whole(attrs["detect_layer"], -1, MAX_LOG_LAYERS):
        refuse("attribute detect_layer", f"an int in -1..{MAX_LOG_LAYERS}", attrs["detect_layer"])
    threshold = attrs["threshold"]
    if not isinstance(threshold, (float, int, np.floating, np.integer)) or isinstance(threshold, (bool, np.bool_)) or \
            not (math.isnan(threshold) or 0 < threshold < math.inf):
        refuse("attribute threshold", "a positive number, or NaN for none", threshold)
    if not _whole(attrs["images_written"], 0, 2**53):
        refuse("attribute images_written", "an int of at least 0", attrs["images_written"])
    if not isinstance(attrs["complete"], (bool, np.bool_)):
        refuse("attribute complete", "true or false", attrs["complete"])
    written = int(attrs["images_written"])
    num_prefix = int(attrs["num_cls"]) + int(attrs["num_trained_registers"])
    grid, images = None, 0
    present = [name for name in DATASETS if name in handle]
    if present:
        if len(present) != len(DATASETS):
            raise ActivationLogError(f"{path}: the datasets must be {', '.join(DATASETS)}; it has only "
                                     f"{', '.join(present)}")
        raw_grid = attrs.get("grid")
        grid = tuple(int(side) for side in raw_grid) if isinstance(raw_grid, np.ndarray) and raw_grid.shape == (2,) \
            and all(_whole(side, 1, 2**16) for side in raw_grid) else None
        if grid is None:
            refuse("attribute grid", "two positive ints (patch rows, cols)", raw_grid)
        datasets = {name: handle[name] for name in DATASETS}
        for name, dataset in datasets.items():
            if not isinstance(dataset, h5py.Dataset):
                refuse(f"dataset {name}", "a dataset", type(dataset).__name__)
        layers = datasets["patch_norms"].shape[1] if datasets["patch_norms"].ndim == 4 else None
        if layers is None or not 1 <= layers <= MAX_LOG_LAYERS:
            refuse("dataset patch_norms", "of shape [images, layers, rows, cols]", datasets["patch_norms"].shape)
        expected = {"patch_norms": (layers, *grid), "prefix_norms": (layers, num_prefix)}
        for name, shape in expected.items():
            dataset = datasets[name]
            if dataset.shape[1:] != shape or dataset.dtype != np.float32:
                refuse(f"dataset {name}", f"float32 of shape [images, {', '.join(map(str, shape))}]",
                       f"{dataset.dtype} {list(dataset.shape)}")
        activations = datasets["neuron_activations"]
        if activations.ndim != 3 or activations.shape[1] != len(neurons) or activations.dtype != np.float32 or \
                activations.shape[2] < num_prefix + grid[0] * grid[1]:
            refuse("dataset neuron_activations", f"float32 of shape [images, {len(neurons)}, tokens >= "
                   f"{num_prefix + grid[0] * grid[1]}]", f"{activations.dtype} {list(activations.shape)}")
        if datasets["names"].ndim != 1 or datasets["names"].dtype.kind not in "OSU":
            refuse("dataset names", "a 1-D dataset of strings", f"{datasets['names'].dtype} {datasets['names'].shape}")
        images = min(written, *(dataset.shape[0] for dataset in datasets.values()))
        if attrs["complete"] and images != written:
            refuse("attribute images_written", f"the rows every dataset holds ({images}) in a complete log", written)
    elif written:
        refuse("attribute images_written", "0 in a log without datasets", written)
    detect_layer = int(attrs["detect_layer"])
    return ActivationLog(path, handle, model, [tuple(pair) for pair in neurons], int(attrs["num_cls"]),
                         int(attrs["num_trained_registers"]), None if detect_layer < 0 else detect_layer,
                         float(threshold), grid, images, bool(attrs["complete"]))

"""An HDF5 log of per-image patch-norm maps and register-neuron activations.

The file is written batch by batch and flushed after each one, so an interrupted run leaves
a readable file holding the images done so far (attribute ``complete`` stays false).

Layout of the file::

    names               [N]                         image names (file paths or image_i)
    patch_norms         [N, layers, rows, cols]     block-output norm of every patch
    prefix_norms        [N, layers, num_prefix]     the same for CLS and trained registers
    neuron_activations  [N, K, L]                   the K register neurons at every token
    attrs: model, neurons (JSON [[layer, neuron], ...]), num_cls, num_trained_registers,
           grid, detect_layer, threshold, images_written, complete
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import h5py
import torch
from tqdm.auto import tqdm

from .. import measures
from ..data.batching import batches
from ..data.sources import count_hint, image_source, no_images_message
from ..errors import ImageSourceError, InvalidArgumentError
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
    handle = h5py.File(path, "w", libver="latest")
    try:
        _describe(handle, hook_manager, neurons)
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
                if written == 0:
                    _create_datasets(handle, num_layers, grid, layout.num_prefix, len(neurons), seq_len)
                _append(handle, written, batch.names, patch_maps.cpu().numpy(),
                        stacked[:, :, layout.prefix()].cpu().numpy(),
                        activations.cpu().numpy())
                written += len(batch.names)
                handle.attrs["images_written"] = written
                handle.flush()
                bar.update(len(batch.names))
        bar.close()
        handle.attrs["complete"] = True
    finally:
        handle.close()
        if written == 0:
            path.unlink(missing_ok=True)
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


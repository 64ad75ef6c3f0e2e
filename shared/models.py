"""A model by its spec, with its test-time registers already in: :func:`load_model`.

It sits above the registry (which loads models and neuron files) and the intervention (which
wraps them), so that neither needs the other.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from .edits import Edit
from .errors import IncompatibleNeuronsError, InvalidArgumentError
from .intervention import ModifiedModel
from .loading import LoadedModel
from .neurons import RegisterNeurons
from . import registry

log = logging.getLogger(__name__)


def load_model(spec: str, *, neurons: str | os.PathLike | RegisterNeurons | None = None, num_registers: int = 1,
               edit: Edit | None = None, scale: float | Sequence[float] = 1.0, force: bool = False,
               device: torch.device | str = "cpu", precision: str = "fp32", seed: int = 0,
               **options: Any) -> LoadedModel:
    """Load the model a spec names; with ``neurons``, already wrapped with its test-time registers.

    ``load_model("openclip:ViT-B-16/laion2b_s34b_b88k", neurons="hf-hub:ORG/REPO")`` returns
    ``(modified, preprocess, hook_manager)``: ``modified`` is a :class:`ModifiedModel` (call it, or
    its ``encode_image``/``forward_features``/... as the bare model's), and ``hook_manager`` is its
    view, so every analysis function sees the registers. Without ``neurons`` it returns the bare
    model, as :func:`test_time_registers.registry.load_model` does.

    Args:
        spec: a model spec (``openclip:``, ``dinov2:``, ``timm:``, ``hf:``, ``demo``, ...).
        neurons: a neuron file, ``preset:NAME``, ``hf-hub:ORG/REPO[/FILE]``, or
            :class:`RegisterNeurons`. ``"planted"`` takes a synthetic model's own planted neurons.
        num_registers: test-time registers to append (``ModifiedModel``'s).
        edit, scale: as :class:`ModifiedModel` takes them.
        force: apply neurons recorded for another model (their indices must still fit).
        device, precision, seed, options: as the registry's ``load_model``.

    Raises:
        IncompatibleNeuronsError: the neurons were found on another model (without ``force``), or
            name layers or neurons the model lacks.
        NeuronFileError, ModelLoadError: as the registry's loaders raise them.
    """
    loaded = registry.load_model(spec, device=device, precision=precision, seed=seed, **options)
    if neurons is None:
        return loaded
    found = _neurons(neurons, loaded)
    mismatch = found.model_mismatch(loaded.hook_manager)
    if mismatch and not force:
        raise IncompatibleNeuronsError(f"{mismatch}; pass force=True to apply them anyway (their indices are "
                                       "checked either way)")
    found.check_fits(loaded.hook_manager)   # with force: one warning
    modified = ModifiedModel(loaded.model, loaded.hook_manager, found, num_registers=num_registers, edit=edit,
                             scale=scale)
    log.info("%s with %d test-time register(s) for %d register neurons", loaded.hook_manager.name, num_registers,
             len(found))
    return replace(loaded, model=modified, hook_manager=modified.hook_manager)


def _neurons(neurons, loaded: LoadedModel) -> RegisterNeurons:
    if isinstance(neurons, RegisterNeurons):
        return neurons
    if neurons == "planted":
        if not loaded.planted:
            raise InvalidArgumentError(f"neurons='planted' takes a synthetic model's planted neurons, but "
                                       f"{loaded.hook_manager.name} has none; pass a neuron file")
        return RegisterNeurons.coerce(loaded.planted)
    return registry.load_neurons(neurons)

"""Loading DINOv2 through transformers' ``from_pretrained``."""

from __future__ import annotations

import os

import torch

from test_time_registers.errors import ModelLoadError
from test_time_registers.hf import read_model
from test_time_registers.loading import LoadedModel
from test_time_registers.precision import Precision, cast_model, get_precision
from test_time_registers.registry import Preset, register_architecture

from .hook_manager import Dinov2HookManager

DINOV2_CLASSES = ("Dinov2Model", "Dinov2WithRegistersModel")

#: The published DINOv2 ViT-L/14 register neurons (the paper's settings), as a JSON neuron file.
DINOV2_VITL14 = Preset("dinov2-vitl14", "test_time_registers.dinov2.presets", "dinov2_vitl14.json",
                       model="dinov2:facebook/dinov2-large",
                       description="DINOv2 ViT-L/14 (LVD-142M): 45 neurons in blocks 12-17, from the reference "
                                   "implementation; detect layer 22, threshold 150, top layer 17")


def load_dinov2(id_or_dir: str | os.PathLike, *, device: torch.device | str = "cpu",
                precision: str | Precision = "fp32", seed: int = 0) -> LoadedModel:
    """Load a DINOv2 model (with or without registers) with ``AutoModel.from_pretrained``.

    Args:
        id_or_dir: a Hugging Face model id (``"facebook/dinov2-large"``,
            ``"facebook/dinov2-with-registers-base"``) or a local directory saved with
            ``save_pretrained`` (safetensors). A folder with only a ``config.json`` builds that
            architecture with random weights, seeded by ``seed``.
        device: where the model goes.
        precision: a name in :data:`~test_time_registers.precision.PRECISIONS`; transformers has
            no mixed mode, so ``bf16`` casts every weight, as ``pure_bf16`` does.

    The image processor saved with the model is used; without one, DINOv2's standard
    evaluation transform at 224 px. A hub id is read from the local cache when the hub cannot
    be reached or ``HF_HUB_OFFLINE`` is set.

    Raises:
        ModelLoadError: missing directory, unreachable and uncached id, corrupt weights, or not a
            DINOv2 model.
    """
    precision = get_precision(precision)
    source = os.fspath(id_or_dir)
    model, preprocess = read_model(source, seed=seed, what="DINOv2 model", prefix="dinov2")
    if type(model).__name__ not in DINOV2_CLASSES:
        raise ModelLoadError(f"{source!r} is a {type(model).__name__}, not a DINOv2 model")
    model = cast_model(model, precision, device).eval()
    hook_manager = Dinov2HookManager(model, name=f"dinov2:{source}", autocast_dtype=precision.autocast)
    return LoadedModel(model, preprocess, hook_manager)


@register_architecture("dinov2", spec="dinov2:HF_ID_OR_DIR",
                       description="DINOv2 with or without registers, through transformers' AutoModel.from_pretrained",
                       examples=("dinov2:facebook/dinov2-large", "dinov2:/models/dinov2-large"),
                       presets=(DINOV2_VITL14,))
def load_dinov2_spec(reference: str, *, device="cpu", precision="fp32", seed: int = 0) -> LoadedModel:
    if not reference:
        raise ModelLoadError("dinov2: needs a Hugging Face id or a local directory, e.g. dinov2:facebook/dinov2-large")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()   # stderr stays for our progress bars and errors
    return load_dinov2(reference, device=device, precision=precision, seed=seed)

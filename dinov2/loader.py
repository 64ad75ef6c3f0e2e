"""Loading DINOv2 through transformers' ``from_pretrained``."""

from __future__ import annotations

import os

import torch
from PIL import Image

from shared.errors import ModelLoadError
from shared.images import IMAGENET_MEAN, IMAGENET_STD
from shared.loading import LoadedModel, first_line

from .hook_manager import Dinov2HookManager



class ProcessorTransform:
    """A transformers image processor as a PIL image -> tensor [3, H, W] transform."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"ProcessorTransform({type(self.processor).__name__})"


def default_transform(size: int = 224):
    """DINOv2's evaluation transform: resize to 256/224 of ``size``, centre crop, ImageNet normalisation."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(round(size * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def load_dinov2(id_or_dir: str | os.PathLike, *, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a DINOv2 model (with or without registers) with ``AutoModel.from_pretrained``.

    Args:
        id_or_dir: a Hugging Face model id (``"facebook/dinov2-large"``,
            ``"facebook/dinov2-with-registers-base"``) or a local directory saved with
            ``save_pretrained`` (safetensors).
        device, dtype: where and in what precision the model goes.

    The image processor saved with the model is used; without one, DINOv2's standard
    evaluation transform at 224 px.

    Raises:
        ModelLoadError: missing directory, unreachable id, corrupt weights, or not a DINOv2 model.
    """
    from transformers import AutoImageProcessor, AutoModel

    source = os.fspath(id_or_dir)
    looks_local = source.startswith(("/", ".", "~")) or source.count("/") > 1 or os.path.exists(source)
    if looks_local and not os.path.isdir(source):   # hub ids are "org/name"
        raise ModelLoadError(f"model directory not found: {source}")
    try:
        model = AutoModel.from_pretrained(source)
    except Exception as error:  # OSError (missing, offline), ValueError, safetensors errors
        raise ModelLoadError(f"could not load DINOv2 model {source!r}: {first_line(error)}") from error
    if type(model).__name__ not in ("Dinov2Model", "Dinov2WithRegistersModel"):
        raise ModelLoadError(f"{source!r} is a {type(model).__name__}, not a DINOv2 model")
    try:
        preprocess = ProcessorTransform(AutoImageProcessor.from_pretrained(source))
    except Exception:  # no preprocessor_config.json: use DINOv2's standard transform
        preprocess = default_transform()
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, preprocess, Dinov2HookManager(model, name=f"dinov2:{source}"))

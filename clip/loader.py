"""Loading OpenCLIP models through open_clip's own factory."""

from __future__ import annotations

import logging
import os

import open_clip
import torch

from shared.errors import ModelLoadError
from shared.loading import LoadedModel, first_line

from .hook_manager import ClipHookManager

log = logging.getLogger(__name__)


def load_openclip(name: str, pretrained: str | os.PathLike | None = None, *,
                  device: torch.device | str = "cpu", precision: str = "fp32") -> LoadedModel:
    """Build an open_clip model with ``open_clip.create_model_and_transforms``.

    Args:
        name: an open_clip model name (``"ViT-B-16"``) or ``"hf-hub:ORG/REPO"``.
        pretrained: a pretrained tag (``"laion2b_s34b_b88k"``, downloaded by open_clip) or the
            path of a local checkpoint (``.safetensors``, or ``.pt``/``.bin`` read with
            ``weights_only=True``). ``None`` gives random weights.
        device: where the model goes.
        precision: open_clip precision (``"fp32"``, ``"bf16"``, ``"fp16"``, ...).

    Raises:
        ModelLoadError: unknown name, missing or corrupt checkpoint, or weights that cannot be
            downloaded.
    """
    pretrained = os.fspath(pretrained) if pretrained is not None else None
    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        raise ModelLoadError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    looks_like_path = pretrained is not None and (os.sep in pretrained or pretrained.endswith(
        (".pt", ".pth", ".bin", ".safetensors")))
    if looks_like_path and not os.path.isfile(pretrained):
        raise ModelLoadError(f"checkpoint not found: {pretrained}")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, precision=precision)
    except Exception as error:  # open_clip raises RuntimeError, OSError, pickle and key errors alike
        what = f"{name} with {pretrained!r}" if pretrained else name
        raise ModelLoadError(f"could not load open_clip model {what}: {first_line(error)}") from error
    model.eval()
    spec = f"openclip:{name}" + (f":{pretrained}" if pretrained else "")
    return LoadedModel(model, preprocess, ClipHookManager(model, name=spec))

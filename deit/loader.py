"""Loading timm Vision Transformers through ``timm.create_model``."""

from __future__ import annotations

import os

import timm
import torch

from shared.errors import ModelLoadError
from shared.loading import LoadedModel, first_line

from .hook_manager import DeitHookManager


def load_timm(name: str, checkpoint: str | os.PathLike | None = None, *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, **model_kwargs) -> LoadedModel:
    """Build a timm ViT with ``timm.create_model`` and its evaluation transform.

    Args:
        name: a timm model name, e.g. ``"deit3_base_patch16_224.fb_in22k_ft_in1k"``.
        checkpoint: a local checkpoint (``.safetensors``, or ``.pth``/``.bin`` read by timm with
            ``weights_only=True``). Without one, timm's pretrained weights are downloaded.
        device, dtype: where and in what precision the model goes.
        model_kwargs: passed to ``timm.create_model`` (e.g. ``img_size``).

    Raises:
        ModelLoadError: unknown name, missing or corrupt checkpoint, or weights that cannot be
            downloaded.
    """
    if not timm.is_model(name):
        raise ModelLoadError(f"unknown timm model {name!r}; see timm.list_models()")
    try:
        if checkpoint is not None:
            if not os.path.isfile(checkpoint):
                raise ModelLoadError(f"checkpoint not found: {checkpoint}")
            model = timm.create_model(name, pretrained=False, checkpoint_path=os.fspath(checkpoint), **model_kwargs)
        else:
            model = timm.create_model(name, pretrained=True, **model_kwargs)
    except ModelLoadError:
        raise
    except Exception as error:  # RuntimeError, OSError, unpickling and hub errors alike
        what = f"{name} from {checkpoint}" if checkpoint is not None else f"pretrained {name}"
        raise ModelLoadError(f"could not load timm model {what}: {first_line(error)}") from error
    config = timm.data.resolve_data_config({}, model=model)
    preprocess = timm.data.create_transform(**config)
    model = model.to(device=device, dtype=dtype).eval()
    spec = f"deit:{name}" + (f":{checkpoint}" if checkpoint is not None else "")
    return LoadedModel(model, preprocess, DeitHookManager(model, name=spec))

"""Loading timm Vision Transformers through ``timm.create_model``, and the ``timm:`` spec (alias ``deit:``)."""

from __future__ import annotations

import os

import timm
import torch

from test_time_registers.errors import ModelLoadError
from test_time_registers.hub import load_pretrained
from test_time_registers.errors import first_line
from test_time_registers.loading import LoadedModel
from test_time_registers.precision import Precision, cast_model, get_precision
from test_time_registers.registry import hook_manager_for, register_architecture

from . import hook_manager  # noqa: F401 - registers the timm classes

RANDOM = "random"


def load_timm(name: str, checkpoint: str | os.PathLike | None = None, *, pretrained: bool = True,
              device: torch.device | str = "cpu", precision: str | Precision = "fp32", **model_kwargs) -> LoadedModel:
    """Build a timm ViT with ``timm.create_model`` and its evaluation transform.

    Args:
        name: a timm model name, e.g. ``"deit3_base_patch16_224.fb_in22k_ft_in1k"``.
        checkpoint: a local checkpoint (``.safetensors``, or ``.pth``/``.bin`` read by timm with
            ``weights_only=True``). Without one, timm's pretrained weights are downloaded, or read
            from the local cache when the hub cannot be reached.
        pretrained: ``False`` for random weights (no checkpoint, no download).
        device: where the model goes.
        precision: a name in :data:`~test_time_registers.precision.PRECISIONS`; timm has no mixed
            mode, so ``bf16`` casts every weight, as ``pure_bf16`` does.
        model_kwargs: passed to ``timm.create_model`` (e.g. ``img_size``).

    Raises:
        ModelLoadError: unknown name, missing or corrupt checkpoint, or pretrained weights that
            cannot be downloaded and are not cached.
    """
    precision = get_precision(precision)
    if not timm.is_model(name):
        raise ModelLoadError(f"unknown timm model {name!r}; see timm.list_models()")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise ModelLoadError(f"checkpoint not found: {checkpoint}")
    try:
        if checkpoint is not None:
            model = timm.create_model(name, pretrained=False, checkpoint_path=os.fspath(checkpoint), **model_kwargs)
        elif not pretrained:
            model = timm.create_model(name, pretrained=False, **model_kwargs)
        else:
            config = timm.models.get_pretrained_cfg(name)
            url = None if config is None or config.hf_hub_id else config.url
            model = load_pretrained(lambda: timm.create_model(name, pretrained=True, **model_kwargs),
                                    f"pretrained timm {name}",
                                    f"Pass a local checkpoint instead: timm:{name}:/path/to/model.safetensors.", url=url)
    except ModelLoadError:
        raise
    except Exception as error:  # RuntimeError, OSError, unpickling and hub errors alike
        what = f"{name} from {checkpoint}" if checkpoint is not None else f"pretrained {name}"
        raise ModelLoadError(f"could not load timm model {what}: {first_line(error)}") from error
    # The pretrained config's input size, unless the model was built for another one (img_size=...).
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) if "img_size" in model_kwargs else None
    config = timm.data.resolve_data_config({"input_size": (3, *size)} if size else {}, model=model)
    preprocess = timm.data.create_transform(**config)
    model = cast_model(model, precision, device).eval()
    weights = os.fspath(checkpoint) if checkpoint is not None else (None if pretrained else RANDOM)
    spec = f"timm:{name}" + (f":{weights}" if weights else "")
    return LoadedModel(model, preprocess, hook_manager_for(model, name=spec, autocast_dtype=precision.autocast))


@register_architecture("timm", spec="timm:NAME[:CHECKPOINT|:random]",
                       description="DeiT-III or any timm VisionTransformer, through timm.create_model",
                       examples=("timm:deit3_base_patch16_224.fb_in22k_ft_in1k", "timm:vit_base_patch16_224:/ckpt/model.safetensors",
                                 "timm:deit3_small_patch16_224:random"),
                       aliases=("deit",))
def load_timm_spec(reference: str, *, device="cpu", precision="fp32", seed: int = 0, **model_kwargs) -> LoadedModel:
    """``model_kwargs`` go to ``timm.create_model`` (e.g. ``reg_tokens=4`` for a model built from scratch)."""
    name, _, weights = reference.partition(":")
    if not name:
        raise ModelLoadError("timm: needs a model name, e.g. timm:deit3_base_patch16_224.fb_in22k_ft_in1k")
    if weights == RANDOM:
        return load_timm(name, pretrained=False, device=device, precision=precision, **model_kwargs)
    return load_timm(name, weights or None, device=device, precision=precision, **model_kwargs)

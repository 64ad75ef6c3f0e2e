"""Loading OpenCLIP models through open_clip's own factory, and the ``openclip:`` and ``demo`` specs."""

from __future__ import annotations

import logging
import os

import open_clip
import torch
from torch import nn

from test_time_registers.errors import ModelLoadError
from test_time_registers.hub import load_pretrained
from test_time_registers.errors import first_line
from test_time_registers.loading import LoadedModel
from test_time_registers.precision import Precision, get_precision
from test_time_registers.registry import hook_manager_for, register_architecture


log = logging.getLogger(__name__)

RANDOM = "random"
SCHEMES = ("hf-hub:", "local-dir:")   # open_clip names that carry their own weights
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def load_openclip(name: str, pretrained: str | os.PathLike | None = None, *, device: torch.device | str = "cpu",
                  precision: str | Precision = "fp32") -> LoadedModel:
    """Build an open_clip model with ``open_clip.create_model_and_transforms``.

    Args:
        name: an open_clip model name (``"ViT-B-16"``), or ``"hf-hub:ORG/REPO"`` or
            ``"local-dir:PATH"``, which carry their own weights.
        pretrained: for a plain name, required: a pretrained tag (``"laion2b_s34b_b88k"``,
            downloaded by open_clip), the path of a local checkpoint (``.safetensors``, or
            ``.pt``/``.bin`` read with ``weights_only=True``), or ``"random"`` for random weights.
        device: where the model goes.
        precision: ``fp32``, ``bf16``/``fp16`` (open_clip's mixed precision: norms and embeddings
            stay float32), ``pure_bf16``/``pure_fp16`` or ``amp_bf16``; see :mod:`~test_time_registers.precision`.

    Raises:
        ModelLoadError: unknown name or tag, no weights named, missing or corrupt checkpoint, or
            pretrained weights that cannot be downloaded and are not cached.
    """
    precision = get_precision(precision)
    pretrained = os.fspath(pretrained) if pretrained is not None else None
    has_scheme = name.startswith(SCHEMES)
    if not has_scheme and name not in open_clip.list_models():
        raise ModelLoadError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    if not has_scheme and not pretrained:
        raise ModelLoadError(f"no weights named for open_clip {name}: give a pretrained tag "
                             f"({_tags(name)}), a local checkpoint path, or 'random' for random weights")
    is_path = pretrained is not None and (os.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES))
    if is_path and not os.path.isfile(pretrained):
        raise ModelLoadError(f"checkpoint not found: {pretrained}")
    weights = None if pretrained == RANDOM else pretrained

    def create():
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=weights, device=device, precision=precision.name)
        return model, preprocess

    what = f"open_clip {name}" + (f" ({weights})" if weights else "")
    try:
        if has_scheme and name.startswith("hf-hub:"):
            model, preprocess = load_pretrained(
                create, what, f"Pass a local folder instead: openclip:local-dir:DIR (a download of {name[7:]}).")
        elif weights is not None and not is_path:
            model, preprocess = _load_tag(create, name, weights, what)
        else:
            model, preprocess = create()
    except ModelLoadError:
        raise
    except Exception as error:  # open_clip raises RuntimeError, OSError, pickle and key errors alike
        raise ModelLoadError(f"could not load {what}: {first_line(error)}") from error
    model.eval()
    spec = f"openclip:{name}" + (f":{pretrained}" if pretrained else "")
    hook_manager = hook_manager_for(model, name=spec, autocast_dtype=precision.autocast)
    tokenizer = (lambda: open_clip.get_tokenizer(name)) if hasattr(model, "encode_text") else None
    return LoadedModel(model, preprocess, hook_manager, tokenizer=tokenizer)


def _load_tag(create, name: str, tag: str, what: str):
    config = open_clip.get_pretrained_cfg(name, tag)
    if not config:
        raise ModelLoadError(f"unknown pretrained tag {tag!r} for open_clip {name}; known: {_tags(name)}")
    source = (f"https://huggingface.co/{config['hf_hub'].rstrip('/')}" if config.get("hf_hub")
              else config.get("url") or "its download address")
    hint = (f"Pass a local checkpoint instead: openclip:{name}:/path/to/checkpoint.safetensors "
            f"(downloaded elsewhere from {source}).")
    return load_pretrained(create, what, hint, url=None if config.get("hf_hub") else config.get("url"))


def _tags(name: str) -> str:
    return ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none are known"


def set_precision(model: nn.Module, precision: str | Precision, device: torch.device | str = "cpu") -> nn.Module:
    """Put an open_clip model built by hand in a precision the way open_clip's factory does."""
    precision = get_precision(precision)
    model.to(device=device)
    if precision.mixed:
        open_clip.model.convert_weights_to_lp(model, dtype=precision.weights)
    else:
        model.to(dtype=precision.weights)
    return model


@register_architecture("openclip", spec="openclip:NAME:TAG|CHECKPOINT|random",
                       description="an open_clip ViT, through open_clip.create_model_and_transforms",
                       examples=("openclip:ViT-B-16:laion2b_s34b_b88k", "openclip:ViT-B-16:/ckpt/model.safetensors",
                                 "openclip:ViT-B-16:random", "openclip:hf-hub:ORG/REPO"))
def load_openclip_spec(reference: str, *, device="cpu", precision="fp32", seed: int = 0) -> LoadedModel:
    scheme = next((s for s in SCHEMES if reference.startswith(s)), "")
    name, _, pretrained = reference[len(scheme):].partition(":")
    if not name:
        raise ModelLoadError("openclip: needs a model name, e.g. openclip:ViT-B-16:laion2b_s34b_b88k")
    if not scheme and not pretrained and name in open_clip.list_models():
        raise ModelLoadError(f"openclip:{name} names no weights; write openclip:{name}:TAG with a pretrained tag "
                             f"({_tags(name)}), openclip:{name}:/path/to/checkpoint.safetensors, or "
                             f"openclip:{name}:random for random weights")
    return load_openclip(scheme + name, pretrained or None, device=device, precision=precision)


@register_architecture("demo", spec="demo",
                       description="SYNTHETIC: a small random open_clip ViT with planted register neurons, offline")
def load_demo_spec(reference: str, *, device="cpu", precision="fp32", seed: int = 0) -> LoadedModel:
    from .demo import build_demo_model, iter_demo_images

    if reference:
        raise ModelLoadError(f"the demo takes no reference, got demo:{reference}; write demo")
    precision = get_precision(precision)
    model, preprocess, planted = build_demo_model(seed=seed)
    model = set_precision(model, precision, device)
    hook_manager = hook_manager_for(model, name="demo", autocast_dtype=precision.autocast)
    return LoadedModel(model, preprocess, hook_manager, synthetic=True, planted=planted,
                       generate_images=lambda count, image_seed: iter_demo_images(count, seed=image_seed),
                       tokenizer=open_clip.tokenizer.SimpleTokenizer)   # its text tower reads CLIP's own tokens

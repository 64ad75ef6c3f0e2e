"""Helpers for models from Hugging Face transformers, for any architecture package that wraps one."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .data.sources import default_transform
from .errors import ModelLoadError, UnsupportedModelError, first_line
from .hub import load_pretrained
from .loading import LoadedModel
from .precision import Precision, cast_model, get_precision
from .registry import hook_manager_for, register_architecture

log = logging.getLogger(__name__)


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def is_local_folder(source: str) -> bool:
    """True for a local folder, False for a hub id ("org/name").

    Raises:
        ModelLoadError: ``source`` names a local path that is not a folder.
    """
    folder = Path(source).expanduser()
    local = folder.exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1
    if local and not folder.is_dir():
        raise ModelLoadError(f"model directory not found: {source}")
    return local


def auto_model(source: str, *, local: bool, seed: int = 0) -> tuple[nn.Module, Callable]:
    """``(model, preprocess)`` from a hub id or a local folder, with transformers' ``AutoModel``.

    A local folder with a ``config.json`` and no weights builds that architecture with random weights,
    seeded by ``seed``, and logs a warning saying so. The image processor is read in the same call, so
    that offline it comes from the cache like the weights.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(source)
    vlm = is_vision_language(config)
    auto = AutoModelForImageTextToText if vlm else AutoModel
    if local and not _has_weights(Path(source).expanduser()):
        log.warning("%s has a config but no weights: building it with random weights (seed %d)", source, seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = auto.from_config(config)
    else:
        model = auto.from_pretrained(source)
    return model, (tower_transform(source, config.vision_config) if vlm else image_processor(source))


def is_vision_language(config) -> bool:
    """Whether a transformers config is a vision-language model's: it has a vision and a text config and
    transformers maps it to an image-text-to-text class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return (getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None
            and config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def tower_transform(source: str, vision_config):
    """A vision-language model's tower at its native square size (``vision_config.image_size``), with its
    processor's normalisation: PIL image -> [3, size, size]. The processor's own tiling (anyres, tiles plus
    a global view) is for the language model; discovery and ``forward_images`` run the tower alone."""
    from torchvision import transforms

    size = vision_config.image_size
    size = size if isinstance(size, int) else size[0]
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(source)
        mean, std = processor.image_mean, processor.image_std
    except Exception:  # noqa: BLE001 - no processor saved: the CLIP normalisation most towers were trained with
        log.warning("%s has no image processor: the tower gets CLIP's normalisation", source)
        mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    return transforms.Compose([transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


def vision_tower_path(vlm: nn.Module) -> str:
    """Where a vision-language model keeps its image tower: the outermost submodule whose config is the
    model's ``vision_config`` (attribute names change between transformers releases; this does not).

    Raises:
        UnsupportedModelError: no submodule carries that config.
    """
    vision_config = getattr(getattr(vlm, "config", None), "vision_config", None)
    for path, module in vlm.named_modules():
        if path and vision_config is not None and getattr(module, "config", None) is vision_config:
            return path
    raise UnsupportedModelError(f"{type(vlm).__name__} has no submodule whose config is its vision_config")


def language_model_reads(vlm: nn.Module, num_layers: int) -> tuple[int, ...]:
    """The tower blocks whose outputs a vision-language model's language model reads.

    ``vision_feature_layer`` (LLaVA and its kin; an int or a list) or ``vision_feature_layers``
    (ViP-LLaVA) index the tower's hidden states, whose entry 0 is the embeddings (no block: left out) and entry
    k the output of block k - 1; without either, the model reads ``last_hidden_state``, the last block
    (PaliGemma, Gemma 3).

    Raises:
        UnsupportedModelError: a read layer lies outside the tower.
    """
    config = vlm.config
    layers = getattr(config, "vision_feature_layers", None)
    if layers is None:
        layers = getattr(config, "vision_feature_layer", None)
    if layers is None:
        return (num_layers - 1,)
    blocks = []
    for layer in ([layers] if isinstance(layers, int) else list(layers)):
        entry = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= entry <= num_layers:
            raise UnsupportedModelError(f"{type(vlm).__name__} reads hidden state {layer}, but its tower has "
                                        f"{num_layers} blocks ({num_layers + 1} hidden states)")
        if entry:   # entry 0, the embeddings, is no block's output
            blocks.append(entry - 1)
    return tuple(blocks)


def read_model(source: str, *, seed: int, what: str, prefix: str):
    """``(model, preprocess)`` from a Hugging Face id or a local folder, through :func:`auto_model`.

    A hub id goes through :func:`~test_time_registers.hub.load_pretrained` (the cache only, when
    offline); every failure is a :class:`ModelLoadError` naming ``what`` (``"DINOv2 model"``) and,
    for an id that cannot be fetched, the ``prefix:DIR`` spec to pass instead.
    """
    local = is_local_folder(source)

    def load():
        return auto_model(source, local=local, seed=seed)

    try:
        if local:
            return load()
        return load_pretrained(load, f"{what} {source}", f"Download it where the hub can be reached "
                               f"(hf download {source} --local-dir DIR), then pass {prefix}:DIR.")
    except ModelLoadError:
        raise
    except Exception as error:  # OSError (missing, offline), ValueError, safetensors errors
        raise ModelLoadError(f"could not load {what} {source!r}: {first_line(error)}") from error


def load_transformers(id_or_dir: str | os.PathLike, *, device: torch.device | str = "cpu",
                      precision: str | Precision = "fp32", seed: int = 0) -> LoadedModel:
    """Load any supported transformers vision model with ``AutoModel``; the hook manager follows its class.

    Args:
        id_or_dir: a Hugging Face id, a folder saved with ``save_pretrained``, or a folder with only
            a ``config.json``: that builds the architecture with random weights (seeded by ``seed``).
        device, precision: as for every loader.

    Raises:
        ModelLoadError: missing folder, unreachable and uncached id, corrupt weights.
        UnsupportedModelError: a class no hook manager describes.
    """
    precision = get_precision(precision)
    source = os.fspath(id_or_dir)
    model, preprocess = read_model(source, seed=seed, what="transformers model", prefix="hf")
    model = cast_model(model, precision, device).eval()
    return LoadedModel(model, preprocess, hook_manager_for(model, name=f"hf:{source}", autocast_dtype=precision.autocast))


class ProcessorTransform:
    """A transformers image processor as a PIL image -> tensor [3, H, W] transform."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"ProcessorTransform({type(self.processor).__name__})"


def square_patch_grid_transform(processor):
    """For a NaFlex processor (SigLIP 2), which resizes each image to its own patch grid and returns the
    patches: images of one size instead, the largest square grid within its ``max_num_patches``, with
    its normalisation. PIL image -> tensor [3, side, side]; the hook manager patchifies them."""
    from torchvision import transforms

    side = math.isqrt(processor.max_num_patches) * processor.patch_size
    return transforms.Compose([
        transforms.Resize((side, side), interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.ToTensor(),
        transforms.Normalize(processor.image_mean, processor.image_std),
    ])


def image_processor(source: str):
    """The image processor saved with a model as a transform, or, without one, :func:`default_transform`."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except Exception:  # no preprocessor_config.json: the ImageNet-normalised default
        return default_transform()
    if getattr(processor, "max_num_patches", None):
        return square_patch_grid_transform(processor)
    return ProcessorTransform(processor)


@register_architecture("hf", spec="hf:HF_ID_OR_DIR",
                       description="a transformers vision model, through AutoModel; the hook manager follows its class",
                       examples=("hf:openai/clip-vit-base-patch16", "hf:google/siglip-base-patch16-224",
                                 "hf:/models/vit-config-only"))
def load_transformers_spec(reference: str, *, device="cpu", precision="fp32", seed: int = 0) -> LoadedModel:
    if not reference:
        raise ModelLoadError("hf: needs a Hugging Face id or a local directory, e.g. hf:openai/clip-vit-base-patch16")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()   # stderr stays for our progress bars and errors
    return load_transformers(reference, device=device, precision=precision, seed=seed)


@register_architecture("hf-tower", spec="hf-tower:HF_ID_OR_DIR",
                       description="the image tower of a transformers vision-language model, loaded alone: its config "
                                   "and only its weights (discovery without the language model)",
                       examples=("hf-tower:llava-hf/llava-1.5-7b-hf",))
def load_vlm_tower_spec(reference: str, *, device="cpu", precision="fp32", seed: int = 0) -> LoadedModel:
    if not reference:
        raise ModelLoadError("hf-tower: needs a vision-language model's Hugging Face id or local directory, e.g. "
                             "hf-tower:llava-hf/llava-1.5-7b-hf")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    return load_vlm_tower(reference, device=device, precision=precision, seed=seed)


def load_vlm_tower(id_or_dir: str | os.PathLike, *, device: torch.device | str = "cpu",
                   precision: str | Precision = "fp32", seed: int = 0) -> LoadedModel:
    """A vision-language model's image tower alone, from the model's checkpoint: its ``vision_config`` and only the
    tower's weights, renamed by transformers' own loading (``key_mapping`` strips the tower's prefix; the rest of
    the checkpoint, the language model, is never read into memory). The hook manager carries the model's read
    layers and its spec's name ``hf:ID_OR_DIR``, so neurons found here apply to the whole model without ``--force``.

    Raises:
        ModelLoadError: not a vision-language model, or its weights cannot be read.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
    from transformers.utils import logging as transformers_logging

    precision = get_precision(precision)
    source = os.fspath(id_or_dir)
    local = is_local_folder(source)

    def load():
        config = AutoConfig.from_pretrained(source)
        if not is_vision_language(config):
            raise ModelLoadError(f"{source} is not a vision-language model ({config.model_type}): use hf:{source}")
        with torch.device("meta"):                    # the whole model's layout, without memory
            layout = AutoModelForImageTextToText.from_config(config)
        path = vision_tower_path(layout)
        name = re.escape(path.rsplit(".", 1)[-1])
        if local and not _has_weights(Path(source).expanduser()):
            log.warning("%s has a config but no weights: building its tower with random weights (seed %d)", source, seed)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                tower = AutoModel.from_config(config.vision_config)
        else:
            verbosity = transformers_logging.get_verbosity()
            transformers_logging.set_verbosity_error()     # every language-model weight is "unexpected" here
            try:
                tower = AutoModel.from_pretrained(source, config=config.vision_config,
                                                  key_mapping={rf"^(?:model\.)?{name}\.": ""})
            finally:
                transformers_logging.set_verbosity(verbosity)
        return tower, tower_transform(source, config.vision_config), layout

    try:
        tower, preprocess, layout = load() if local else load_pretrained(
            load, f"vision-language model {source}", f"Download it where the hub can be reached "
            f"(hf download {source} --local-dir DIR), then pass hf-tower:DIR.")
    except (ModelLoadError, UnsupportedModelError):
        raise
    except Exception as error:  # noqa: BLE001 - OSError (missing, offline), ValueError, safetensors errors
        raise ModelLoadError(f"could not load the tower of {source!r}: {first_line(error)}") from error
    tower = cast_model(tower, precision, device).eval()
    hook_manager = hook_manager_for(tower, name=f"hf:{source}", autocast_dtype=precision.autocast)
    hook_manager.read_layers = language_model_reads(layout, hook_manager.num_layers)
    return LoadedModel(tower, preprocess, hook_manager)

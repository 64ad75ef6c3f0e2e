"""Where a vision-language model's answer looks: the language model's attention from the answer token(s) to
the image tokens, before and after test-time registers (the overlay of the paper's Fig. 6 and §5.4).

:func:`answer_attention` runs a VLM (or a :class:`~test_time_registers.ModifiedModel` around one) through
``generate`` and keeps, per layer, only the rows it needs: the query row that predicts each answer token,
at the image tokens' columns, averaged over the heads. Only the language model switches to eager
attention while it runs (sdpa returns no probabilities), and everything is restored afterwards.
:func:`read_layer_norms` gives the tower's patch norms at the block the language model reads,
:func:`compare_answer_attention` does both for a few images and a prompt, with the model's own
processor, and :func:`draw_answer_attention` draws them.

Supported today: one square patch grid per image whose tokens reach the language model one to one,
in order, as in LLaVA-1.5 and its kin (the ``"default"`` and ``"full"`` select strategies, CLS dropped
under ``"full"``) and PaliGemma. Other packings raise :class:`InvalidArgumentError` naming what is not
supported yet: LLaVA-NeXT and OneVision anyres tiles (base view, tiles, newline tokens), pixel shuffle
(InternVL, Idefics3, SmolVLM, Aya Vision) and Gemma 3's 4x4 pooling.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import measures
from ..data.sources import named_images, no_images_message
from ..edits import Edit
from ..errors import (ImageSourceError, InvalidArgumentError, ModelLoadError, UnsupportedModelError, check_int,
                      first_line)
from ..hf import ProcessorTransform, is_local_folder, vision_tower_path
from ..hooks import HookManager
from ..hub import load_pretrained
from ..intervention import ModifiedModel
from .figures import COLOUR_MAP, new_figure
from .visualize import AFTER, BEFORE, WHEN, _suptitle, display_pixels

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..loading import LoadedModel

log = logging.getLogger(__name__)

#: Config attributes that hold the id of the image placeholder token, newest name first.
IMAGE_TOKEN_ATTRIBUTES = ("image_token_id", "image_token_index")
PANEL = 1.6           # inches per panel of the figure


# ---- computing ------------------------------------------------------------------------------
@dataclass
class AnswerAttention:
    """The language model's attention from the answer token(s) to the image tokens, for B prompts.

    T is the number of image tokens per row (the same in every row); the first ``leading`` of them
    are not patches (CLS under the ``"full"`` strategy) and the other ``rows * cols`` are the patches
    of ``grid``, row-major. Each answer token's query row is the one that predicts it: the last
    prompt row for the first answer token, then each generated token's row. CPU tensors.
    """

    per_layer: torch.Tensor            # [layers, B, T] mean over heads and answer tokens
    positions: torch.Tensor            # [B, T] long: where the image tokens are in each row of input_ids
    grid: tuple[int, int]
    leading: int
    answer_ids: list[list[int]]        # per row, the generated token ids up to and including the first EOS

    @property
    def image_tokens(self) -> torch.Tensor:
        """[B, T]: the attention to each image token, averaged over layers, heads and answer tokens."""
        return self.per_layer.mean(dim=0)

    @property
    def on_image(self) -> torch.Tensor:
        """[B]: the share of the answer's attention that goes to the image tokens (CLS included), 0..1."""
        return self.image_tokens.sum(dim=-1)

    @property
    def maps(self) -> torch.Tensor:
        """[B, rows, cols]: the attention to each patch (:attr:`image_tokens` without the leading tokens)."""
        return self.image_tokens[:, self.leading:].unflatten(-1, self.grid)

    @property
    def layer_maps(self) -> torch.Tensor:
        """[layers, B, rows, cols]: :attr:`maps` per layer."""
        return self.per_layer[..., self.leading:].unflatten(-1, self.grid)

    @property
    def patch_shares(self) -> torch.Tensor:
        """[B, rows, cols]: :attr:`maps` renormalised over the patches (each map sums to 1), the map that
        compares across runs whose answers put different shares of their attention on the image."""
        maps = self.maps.double()
        return (maps / maps.sum(dim=(1, 2), keepdim=True).clamp_min(1e-30)).float()

    @property
    def num_images(self) -> int:
        return self.per_layer.shape[1]

    @staticmethod
    def cat(parts: Sequence["AnswerAttention"]) -> "AnswerAttention":
        """Batches joined along the image axis; they must share the grid and the leading tokens."""
        first = parts[0]
        if any(part.grid != first.grid or part.leading != first.leading for part in parts):
            raise InvalidArgumentError("answer attentions of different patch grids cannot be joined")
        return AnswerAttention(torch.cat([part.per_layer for part in parts], dim=1),
                               torch.cat([part.positions for part in parts]), first.grid, first.leading,
                               [ids for part in parts for ids in part.answer_ids])


def config_image_token(config) -> int:
    """The id of the image placeholder token in a VLM's ``config`` (``image_token_id`` or ``image_token_index``).

    Raises:
        UnsupportedModelError: the config names none.
    """
    for name in IMAGE_TOKEN_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise UnsupportedModelError(f"{type(config).__name__} names no image token ({' or '.join(IMAGE_TOKEN_ATTRIBUTES)});"
                                " pass image_token_id")


def image_positions(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """[B, S] ids -> [B, T] long: the positions of the image tokens in each row, in order (left padding
    and text before the image shift them per row).

    Raises:
        InvalidArgumentError: no image token, or rows with different numbers of them.
    """
    if input_ids.ndim != 2:
        raise InvalidArgumentError(f"input_ids must be [B, S], got shape {list(input_ids.shape)}")
    is_image = input_ids == token_id
    counts = is_image.sum(dim=1)
    if int(counts.max()) == 0:
        raise InvalidArgumentError(f"input_ids hold no image token (id {token_id}): build them with the model's "
                                   "processor, which expands the image placeholder into one token per image feature")
    if int(counts.min()) != int(counts.max()):
        raise InvalidArgumentError(f"every row must hold the same number of image tokens (id {token_id}); got "
                                   f"{counts.tolist()}: one image of one size per prompt")
    return is_image.nonzero()[:, 1].view(len(input_ids), -1)


def patch_grid(config, pixel_values: torch.Tensor, patch_tokens: int) -> tuple[int, int]:
    """The tower's patch grid ``(rows, cols)`` for ``pixel_values`` [B, 3, H, W], checked against the number of
    image tokens that are patches (after any leading CLS).

    Raises:
        InvalidArgumentError: the tokens are not the grid's patches one to one (tiles, pixel shuffle, pooling),
            which is not supported yet.
    """
    name = type(config).__name__.removesuffix("Config")
    if pixel_values.ndim != 4:
        raise InvalidArgumentError(f"{name}: pixel values of shape {list(pixel_values.shape)} (anyres tiles of "
                                   "LLaVA-NeXT/OneVision are [B, crops, 3, H, W]) are not supported yet: the "
                                   "answer-attention map needs one square-grid view per image, as in LLaVA-1.5")
    patch = getattr(getattr(config, "vision_config", None), "patch_size", None)
    patch = patch if isinstance(patch, int) or patch is None else patch[0]
    if patch is None:
        raise UnsupportedModelError(f"{name}: its vision_config names no patch_size")
    rows, cols = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    if rows * cols != patch_tokens:
        raise InvalidArgumentError(
            f"{name}: {patch_tokens} image tokens per prompt are not the tower's {rows}x{cols} = {rows * cols} "
            "patches one to one; packings between the tower and the language model (LLaVA-NeXT/OneVision tiles "
            "and newlines, pixel shuffle, Gemma 3's pooling) are not supported yet")
    return rows, cols


def leading_image_tokens(config) -> int:
    """How many image tokens come before the patches: 1 (CLS) under the ``"full"`` select strategy, else 0."""
    return int(getattr(config, "vision_feature_select_strategy", None) == "full")


def _language_model(vlm: nn.Module) -> nn.Module:
    """The outermost submodule whose config is the VLM's ``text_config``: the decoder the answer comes from."""
    text_config = getattr(vlm.config, "text_config", None)
    for path, module in vlm.named_modules():
        if path and text_config is not None and getattr(module, "config", None) is text_config:
            return module
    raise UnsupportedModelError(f"{type(vlm).__name__} has no submodule whose config is its text_config")


def _attention_modules(language_model: nn.Module) -> list[tuple[nn.Module, int]]:
    """``(module, index)`` of each attention layer of a transformers decoder, in order: the modules its
    ``_can_record_outputs["attentions"]`` names, and where in their output tuple the probabilities are."""
    from transformers.utils.output_capturing import OutputRecorder

    declared = (getattr(language_model, "_can_record_outputs", None) or {}).get("attentions")
    declared = declared if isinstance(declared, (list, tuple)) else [declared] if declared is not None else []
    found = []
    for path, module in language_model.named_modules():
        for spec in declared:
            recorder = spec if isinstance(spec, OutputRecorder) else OutputRecorder(
                target_class=None if isinstance(spec, str) else spec, index=1,
                class_name=spec if isinstance(spec, str) else None)
            matches = ((recorder.target_class is not None and isinstance(module, recorder.target_class))
                       or (recorder.class_name is not None and path.endswith(recorder.class_name)))
            if matches and (recorder.layer_name is None or f".{recorder.layer_name.strip('.')}." in f".{path}."):
                found.append((module, recorder.index))
                break
    if not found:
        raise UnsupportedModelError(f"{type(language_model).__name__} declares no attention layers "
                                    "(_can_record_outputs['attentions']), so its answer attention cannot be read")
    return found


@contextlib.contextmanager
def eager_language_model(vlm: nn.Module):
    """Inside: the VLM's language model (only) uses eager attention, which returns its probabilities; on exit,
    also on an exception, its previous implementation comes back. The tower keeps its own."""
    text_config = vlm.config.text_config
    previous = text_config._attn_implementation
    if previous == "eager":
        yield
        return
    vlm.set_attn_implementation({"text_config": "eager"})
    try:
        yield
    finally:
        vlm.set_attn_implementation({"text_config": previous})


def _eos_ids(vlm: nn.Module) -> set[int]:
    eos = getattr(getattr(vlm, "generation_config", None), "eos_token_id", None)
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def answer_attention(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor, *,
                     attention_mask: torch.Tensor | None = None, image_token_id: int | None = None,
                     max_new_tokens: int = 1, **model_kwargs) -> AnswerAttention:
    """The language model's attention from the answer token(s) to the image tokens, per prompt.

    Runs ``model.generate`` greedily for ``max_new_tokens``. In every decoder layer a forward hook keeps
    the query row that predicts the next token (row -1: at prefill the last prompt row, which predicts
    the first answer token, then each generated token's row), at the image tokens' columns, averaged over
    the heads; nothing larger than [B, heads, T] is kept. Rows are then averaged over the answer tokens,
    each prompt's up to its first end-of-sequence token.

    Args:
        model: a vision-language model with ``generate`` (LLaVA and its kin, PaliGemma), or a
            :class:`ModifiedModel` around one, which runs it with test-time registers.
        input_ids: [B, S] from the model's processor, the image placeholder expanded into one token per
            image feature; left padding is fine.
        pixel_values: [B, 3, H, W], one image per prompt.
        attention_mask: [B, S], 0 at padding.
        image_token_id: the image token (default: the config's ``image_token_id`` / ``image_token_index``).
        max_new_tokens: answer tokens to generate and average over.
        model_kwargs: passed on to ``generate`` (e.g. ``image_sizes``).

    Returns:
        :class:`AnswerAttention`: ``per_layer`` [layers, B, T], ``maps`` [B, rows, cols].

    Raises:
        InvalidArgumentError: no image tokens, unequal counts per row, a packing other than one token per
            patch (not supported yet), beam search.
        UnsupportedModelError: no ``generate``, or a language model that returns no attention probabilities.
    """
    check_int("max_new_tokens", max_new_tokens)
    vlm = model.model if isinstance(model, ModifiedModel) else model
    if not callable(getattr(model, "generate", None)):
        raise UnsupportedModelError(f"{type(vlm).__name__} has no generate(); pass the ...ForConditionalGeneration "
                                    "model, whose language-model head predicts the answer")
    config = vlm.config
    token = config_image_token(config) if image_token_id is None else image_token_id
    if pixel_values.ndim == 4 and len(pixel_values) != len(input_ids):
        raise InvalidArgumentError(f"{len(pixel_values)} images for {len(input_ids)} prompts: the map takes one "
                                   "image per prompt")
    positions = image_positions(input_ids, token)
    leading = leading_image_tokens(config)
    grid = patch_grid(config, pixel_values, positions.shape[1] - leading)
    layers = _attention_modules(_language_model(vlm))

    device = vlm.get_input_embeddings().weight.device
    tower_weight = next(vlm.get_submodule(vision_tower_path(vlm)).parameters())
    inputs = {"input_ids": input_ids.to(device), "pixel_values": pixel_values.to(tower_weight.device,
                                                                                  dtype=tower_weight.dtype)}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask.to(device)
    rows: list[list[torch.Tensor]] = [[] for _ in layers]   # per layer, per forward call: [B, T]
    batch = len(input_ids)

    def keep_answer_rows(layer: int, index: int):
        def hook(module, args, output):
            weights = output[index] if isinstance(output, (tuple, list)) and len(output) > index else None
            if not isinstance(weights, torch.Tensor) or weights.ndim != 4:
                raise UnsupportedModelError(f"{type(module).__name__} returned no attention probabilities under "
                                            "eager attention, so the answer attention cannot be read")
            if weights.shape[0] != batch:
                raise InvalidArgumentError(f"the attention has {weights.shape[0]} rows for {batch} prompts; beam "
                                           "search and several sequences per prompt are not supported")
            last = weights[:, :, -1, :]                                            # [B, heads, keys]
            columns = positions.to(last.device)[:, None, :].expand(-1, last.shape[1], -1)
            rows[layer].append(last.gather(-1, columns).float().mean(dim=1).to(device))   # [B, T]

        return hook

    with contextlib.ExitStack() as stack:
        stack.enter_context(eager_language_model(vlm))
        for layer, (module, index) in enumerate(layers):
            stack.callback(module.register_forward_hook(keep_answer_rows(layer, index)).remove)
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens,
                                       **{"do_sample": False, **model_kwargs})
    steps = {len(layer_rows) for layer_rows in rows}
    if len(steps) != 1 or not steps.pop():
        raise UnsupportedModelError(f"the decoder layers of {type(vlm).__name__} ran unequal or zero times "
                                    f"({[len(layer_rows) for layer_rows in rows]}) during generate")
    attention = torch.stack([torch.stack(layer_rows) for layer_rows in rows], dim=1)   # [steps, layers, B, T]
    answers, valid = _answers(generated[:, input_ids.shape[1]:].cpu(), attention.shape[0], _eos_ids(vlm))
    valid = valid.to(attention.device)[:, None, :, None]                               # [steps, 1, B, 1]
    per_layer = (attention * valid).sum(dim=0) / valid.sum(dim=0)
    log.debug("answer attention: %d layers, %d answer step(s), %d image tokens on a %dx%d grid",
              len(layers), attention.shape[0], positions.shape[1], *grid)
    return AnswerAttention(per_layer.cpu(), positions.cpu(), grid, leading, answers)


def _answers(new_ids: torch.Tensor, steps: int, eos: set[int]) -> tuple[list[list[int]], torch.Tensor]:
    """Each row's answer ids up to and including its first EOS, and which steps count: [steps, B] float, 1
    for the step that predicted an answer token of that row (steps after its EOS only pad)."""
    answers, valid = [], torch.zeros(steps, len(new_ids))
    for row, ids in enumerate(new_ids.tolist()):
        end = next((position + 1 for position, token in enumerate(ids) if token in eos), len(ids))
        answers.append(ids[:end])
        valid[:max(1, min(end, steps)), row] = 1
    return answers, valid


def read_layer_norms(hook_manager: HookManager, pixel_values: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """The tower's patch norms at block ``layer`` (default: the deepest block its language model reads,
    ``hook_manager.default_detect_layer``): [B, 3, H, W] -> [B, rows, cols], on the CPU. Pass a
    :class:`ModifiedModel`'s ``hook_manager`` for the norms with test-time registers."""
    layer = hook_manager.default_detect_layer if layer is None else hook_manager.check_layer(layer)
    with torch.no_grad(), hook_manager.capture(residual=[layer]) as captured:
        hook_manager.forward_images(pixel_values)
    norms = measures.patch_norms(captured.residual[layer], captured.layout)
    return norms.unflatten(1, hook_manager.grid_shape(pixel_values)).float().cpu()


# ---- numbers beside the maps ----------------------------------------------------------------
def default_top_k(patches: int) -> int:
    """How many highest-norm patches the attention mass is measured on: 1% of them, at least one (6 of 576)."""
    return max(1, round(patches / 100))


def top_norm_mass(shares: torch.Tensor, norms: torch.Tensor, k: int) -> torch.Tensor:
    """[B]: the share of each map that falls on the ``k`` patches with the largest ``norms``.

    ``shares`` and ``norms`` are [B, rows, cols] (or [B, P]); ``shares`` sums to 1 per image. Pass the
    norms *before* test-time registers for both runs: they mark where the outliers were.
    """
    flat_shares, flat_norms = shares.flatten(1), norms.flatten(1)
    top = flat_norms.topk(min(k, flat_norms.shape[1]), dim=1).indices
    return flat_shares.gather(1, top).sum(dim=1)


def normalised_entropy(shares: torch.Tensor) -> torch.Tensor:
    """[B]: the entropy of each map [B, rows, cols] (summing to 1) over that of a uniform map: 1 for
    attention spread evenly over the patches, near 0 for attention on one patch."""
    flat = shares.flatten(1).double().clamp_min(0)
    entropy = -(flat * flat.clamp_min(1e-30).log()).sum(dim=1)
    return (entropy / math.log(flat.shape[1])).float() if flat.shape[1] > 1 else torch.zeros(len(flat))


@dataclass
class ImageNumbers:
    """One image's numbers, before and after: see :func:`image_numbers`."""

    top_k: int
    top_norm_mass: dict[str, float]      # share of the image attention on the top-k-norm patches (before's norms)
    on_image: dict[str, float]           # share of the answer's attention on the image tokens
    entropy: dict[str, float]            # normalised entropy of the image-attention map
    max_over_median: dict[str, float]    # largest patch norm over the median one, at the read layer


def image_numbers(before: AnswerAttention, after: AnswerAttention, norms_before: torch.Tensor,
                  norms_after: torch.Tensor, top_k: int | None = None) -> list[ImageNumbers]:
    """Per image, the numbers printed beside the maps. ``norms_*`` are [N, rows, cols]; the top-k patches
    are those with the largest norms before, where the outliers were."""
    patches = before.grid[0] * before.grid[1]
    k = default_top_k(patches) if top_k is None else min(check_int("top_k", top_k), patches)
    attention = {BEFORE: before, AFTER: after}
    norms = {BEFORE: norms_before.float(), AFTER: norms_after.float()}
    mass = {when: top_norm_mass(attention[when].patch_shares, norms_before, k) for when in WHEN}
    entropy = {when: normalised_entropy(attention[when].patch_shares) for when in WHEN}
    ratio = {when: measures.max_over_median(norms[when].flatten(1)) for when in WHEN}
    return [ImageNumbers(k, {when: float(mass[when][i]) for when in WHEN},
                         {when: float(attention[when].on_image[i]) for when in WHEN},
                         {when: float(entropy[when][i]) for when in WHEN},
                         {when: float(ratio[when][i]) for when in WHEN}) for i in range(before.num_images)]


# ---- the whole thing, for a command line ------------------------------------------------------
@dataclass
class AnswerAttentionViews:
    """What :func:`draw_views` draws, for N images and one prompt; CPU tensors. ``"before"`` is the unmodified
    model, ``"after"`` the :class:`ModifiedModel`."""

    model: str
    prompt: str                              # the text given to the processor, image placeholder included
    names: list[str]                         # [N]
    pixels: torch.Tensor                     # [N, H, W, 3] what the tower saw, RGB in 0..1
    read_layer: int
    norms: dict[str, torch.Tensor]           # {when: [N, rows, cols]} patch norms at read_layer
    attention: dict[str, AnswerAttention]    # {when: ...}
    answers: dict[str, list[str]] = field(default_factory=dict)   # {when: [N] decoded answers}
    num_registers: int = 1

    @property
    def num_images(self) -> int:
        return len(self.names)

    def numbers(self, top_k: int | None = None) -> list[ImageNumbers]:
        return image_numbers(self.attention[BEFORE], self.attention[AFTER], self.norms[BEFORE], self.norms[AFTER],
                             top_k)


def load_processor(source: str):
    """The processor saved with a vision-language model (a hub id, from the cache when offline, or a folder).

    Raises:
        ModelLoadError: none can be loaded, or it has no tokenizer and image processor.
    """
    from transformers import AutoProcessor

    def load():
        return AutoProcessor.from_pretrained(source)

    try:
        processor = load() if is_local_folder(source) else load_pretrained(
            load, f"the processor of {source}", f"Download it with the model (hf download {source} --local-dir DIR), "
                                                "then pass hf:DIR.")
    except ModelLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - missing files, unknown types: each library raises its own
        raise ModelLoadError(f"could not load the processor of {source} (the tokenizer and image processor saved "
                             f"with the model, processor.save_pretrained(DIR)): {first_line(error)}") from error
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(f"the processor of {source} ({type(processor).__name__}) is not a vision-language "
                             "processor with a tokenizer and an image processor")
    return processor


def prompt_text(processor, prompt: str) -> str:
    """The text for the processor: ``prompt`` as it is when it holds the image placeholder; else the
    processor's chat template around one user turn (the image, then ``prompt``) when it has one; else
    the placeholder, a newline and ``prompt``."""
    placeholder = getattr(processor, "image_token", None) or "<image>"
    if placeholder in prompt:
        return prompt
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{placeholder}\n{prompt}"


def check_answer_attention(vlm: nn.Module, processor, prompt: str) -> tuple[int, int]:
    """Before any work: the processor's inputs for ``prompt`` and one blank image fit what
    :func:`answer_attention` supports for ``vlm``. Returns the patch grid ``(rows, cols)``.

    Raises:
        InvalidArgumentError: an empty prompt, no image tokens, or a packing not supported yet.
        UnsupportedModelError: the model names no image token or patch size.
    """
    from PIL import Image

    if not prompt.strip():
        raise InvalidArgumentError("the prompt is empty")
    side = getattr(getattr(vlm.config, "vision_config", None), "image_size", 224)
    side = side if isinstance(side, int) else side[0]
    inputs = processor(images=[Image.new("RGB", (side, side))], text=[prompt_text(processor, prompt)],
                       return_tensors="pt")
    positions = image_positions(inputs["input_ids"], config_image_token(vlm.config))
    return patch_grid(vlm.config, inputs["pixel_values"], positions.shape[1] - leading_image_tokens(vlm.config))


def compare_answer_attention(loaded: "LoadedModel", neurons, images, prompt: str, processor, *, num_images: int = 4,
                             num_registers: int = 1, max_new_tokens: int = 1, batch_size: int = 4,
                             edit: Edit | None = None, seed: int = 0, progress: bool = True) -> AnswerAttentionViews:
    """The answer attention and the read layer's patch norms of the first ``num_images`` images, before and
    after test-time registers, for one prompt.

    Args:
        loaded: a vision-language model from ``load_model("hf:DIR")`` (``.model``, ``.hook_manager``).
        neurons: register neurons of its tower.
        images: a folder, an :class:`~test_time_registers.ImageFolder` or PIL images.
        prompt: the question; see :func:`prompt_text` for where the image goes.
        processor: the model's processor (:func:`load_processor`), which resizes the images and expands
            the image placeholder into the image tokens.
        max_new_tokens: answer tokens averaged over.

    Raises:
        InvalidArgumentError: the model is not a vision-language model, or one whose packing is not supported.
        ImageSourceError: no readable image.
    """
    check_int("num_images", num_images)
    check_int("batch_size", batch_size)
    hook_manager = loaded.hook_manager
    if hook_manager.read_layers is None:
        raise InvalidArgumentError(f"{hook_manager.name} is not a vision-language model: no language model reads "
                                   "its tower")
    if not prompt.strip():
        raise InvalidArgumentError("the prompt is empty")
    named = list(itertools.islice(named_images(images), num_images))
    if not named:
        raise ImageSourceError(no_images_message(images))
    modified = ModifiedModel(loaded.model, hook_manager, neurons, num_registers=num_registers, edit=edit, seed=seed)
    runs = {BEFORE: (loaded.model, hook_manager), AFTER: (modified, modified.hook_manager)}
    text = prompt_text(processor, prompt)
    read_layer = hook_manager.default_detect_layer
    parts: dict[str, dict[str, list]] = {key: {when: [] for when in WHEN} for key in ("attention", "norms", "answers")}
    pixels = []
    for start in tqdm(range(0, len(named), batch_size), desc="answer attention", unit="batch", disable=not progress):
        chosen = [image for _, image in named[start:start + batch_size]]
        inputs = processor(images=chosen, text=[text] * len(chosen), return_tensors="pt", padding=True,
                           padding_side="left")
        pixel_values, input_ids = inputs.pop("pixel_values"), inputs.pop("input_ids")
        pixels.append(display_pixels(pixel_values, ProcessorTransform(processor.image_processor)).cpu())
        for when, (model, run_hook_manager) in runs.items():   # the rest of inputs: attention_mask, token_type_ids
            attention = answer_attention(model, input_ids, pixel_values, max_new_tokens=max_new_tokens, **inputs)
            parts["attention"][when].append(attention)
            parts["norms"][when].append(read_layer_norms(run_hook_manager, pixel_values, read_layer))
            parts["answers"][when] += processor.batch_decode(attention.answer_ids, skip_special_tokens=True)
    return AnswerAttentionViews(
        model=hook_manager.name, prompt=text, names=[name for name, _ in named], pixels=torch.cat(pixels),
        read_layer=read_layer, norms={when: torch.cat(parts["norms"][when]) for when in WHEN},
        attention={when: AnswerAttention.cat(parts["attention"][when]) for when in WHEN},
        answers={when: [answer.strip() for answer in parts["answers"][when]] for when in WHEN},
        num_registers=num_registers)


# ---- drawing --------------------------------------------------------------------------------
def draw_answer_attention(before: AnswerAttention, after: AnswerAttention, images: torch.Tensor,
                          norms_before: torch.Tensor, norms_after: torch.Tensor, *, read_layer: int | None = None,
                          names: Sequence[str] | None = None, answers: dict[str, Sequence[str]] | None = None,
                          prompt: str | None = None, model: str = "", top_k: int | None = None,
                          num_registers: int = 1) -> "Figure":
    """One row per image: the input, the tower's patch norms at the read layer before and after, the
    answer's attention over the patch grid before and after, and the same upsampled over the input.

    The attention maps are renormalised over the patches (each sums to 1), so that before and after
    compare even when the answers put different shares of their attention on the image; that share is
    printed under them, with the share on the top-k-norm patches (k highest norms before, where the
    outliers were) and the map's entropy over a uniform map's. Norms share one colour scale per row,
    from 0, and so do the attention maps and overlays. Every axes is labelled, e.g.
    ``"attention variant=after image=0"``; the kinds are ``input``, ``norms``, ``attention`` and ``overlay``.

    Args:
        before, after: the answer attention of the unmodified model and of the :class:`ModifiedModel`.
        images: [N, H, W, 3] RGB in 0..1, what the tower saw (:func:`~.visualize.display_pixels`).
        norms_before, norms_after: [N, rows, cols] patch norms at the read layer (:func:`read_layer_norms`).
        answers: ``{"before": [N], "after": [N]}`` decoded answers, shown under the inputs.
    """
    count = before.num_images
    if after.num_images != count or len(images) < count or len(norms_before) < count or len(norms_after) < count:
        raise InvalidArgumentError(f"before has {count} images, after {after.num_images}, images {len(images)}, "
                                   f"norms {len(norms_before)} and {len(norms_after)}: give one of each per image")
    if before.grid != after.grid or tuple(norms_before.shape[1:]) != before.grid:
        raise InvalidArgumentError(f"the maps must share one patch grid: attention {before.grid} and {after.grid}, "
                                   f"norms {tuple(norms_before.shape[1:])}")
    numbers = image_numbers(before, after, norms_before, norms_after, top_k)
    shares = {BEFORE: before.patch_shares, AFTER: after.patch_shares}
    norms = {BEFORE: norms_before.float().cpu(), AFTER: norms_after.float().cpu()}
    height, width = images.shape[1:3]
    figure = new_figure(7 * PANEL + 1.2, count * (PANEL + 0.75) + 1.0)
    grid = figure.add_gridspec(count, 9, width_ratios=[1, 1, 1, 0.07, 1, 1, 0.07, 1, 1])
    layer_text = f"block {read_layer}" if read_layer is not None else "the read layer"
    for image in range(count):
        picture = images[image].float().cpu().numpy()
        ax = figure.add_subplot(grid[image, 0])
        ax.imshow(picture, interpolation="bilinear")
        _plain(ax, f"input image={image}")
        name = names[image] if names is not None else f"image {image}"
        ax.set_title(name if len(name) <= 28 else "..." + name[-25:], fontsize=8)
        if answers:
            ax.set_xlabel("\n".join(f"{when}: {_quoted(answers[when][image])}" for when in WHEN), fontsize=7)

        high = max(float(norms[when][image].max()) for when in WHEN)
        for column, when in enumerate(WHEN, start=1):
            ax = figure.add_subplot(grid[image, column])
            artist = ax.imshow(norms[when][image].numpy(), cmap=COLOUR_MAP, vmin=0.0, vmax=high,
                               interpolation="nearest")
            _plain(ax, f"norms variant={when} image={image}")
            ax.set_title(f"norms, {layer_text}\n{when}", fontsize=8)
            ax.set_xlabel(f"largest/median {numbers[image].max_over_median[when]:.3g}", fontsize=7)
        _colour_bar(figure, artist, grid[image, 3], f"colour bar norms image={image}", "patch norm")

        patches = before.grid[0] * before.grid[1]
        top = max(max(float(shares[when][image].max()) for when in WHEN), 1.0 / patches)
        for column, when in enumerate(WHEN, start=4):
            ax = figure.add_subplot(grid[image, column])
            artist = ax.imshow(shares[when][image].numpy(), cmap=COLOUR_MAP, vmin=0.0, vmax=top,
                               interpolation="nearest")
            _plain(ax, f"attention variant={when} image={image}")
            ax.set_title(f"answer attention\n{when}", fontsize=8)
            item = numbers[image]
            ax.set_xlabel(f"top-{item.top_k} norm patches {item.top_norm_mass[when]:.0%}\n"
                          f"on image tokens {item.on_image[when]:.0%}\nentropy {item.entropy[when]:.2f} of max",
                          fontsize=7)
        _colour_bar(figure, artist, grid[image, 6], f"colour bar attention image={image}", "share of image attention")

        for column, when in enumerate(WHEN, start=7):
            ax = figure.add_subplot(grid[image, column])
            upsampled = torch.nn.functional.interpolate(shares[when][image][None, None], size=(height, width),
                                                        mode="bilinear", align_corners=False)[0, 0]
            ax.imshow(picture, interpolation="bilinear")
            ax.imshow(upsampled.numpy(), cmap=COLOUR_MAP, vmin=0.0, vmax=top, alpha=0.6, interpolation="bilinear")
            _plain(ax, f"overlay variant={when} image={image}")
            ax.set_title(f"over the input\n{when}", fontsize=8)
    registers = f"{num_registers} test-time register" + ("" if num_registers == 1 else "s")
    shown_prompt = "" if prompt is None else f"; prompt {_quoted(prompt, 60)}"
    _suptitle(figure, f"Answer-token attention to the image, before and after {registers}\n"
                      f"{model + '; ' if model else ''}attention: mean over {before.per_layer.shape[0]} layers and "
                      f"all heads, renormalised over the patches{shown_prompt}", fontsize=9)
    return figure


def draw_views(views: AnswerAttentionViews, top_k: int | None = None) -> "Figure":
    """:func:`draw_answer_attention` of everything :func:`compare_answer_attention` gathered."""
    return draw_answer_attention(views.attention[BEFORE], views.attention[AFTER], views.pixels, views.norms[BEFORE],
                                 views.norms[AFTER], read_layer=views.read_layer, names=views.names,
                                 answers=views.answers, prompt=views.prompt, model=views.model, top_k=top_k,
                                 num_registers=views.num_registers)


def _plain(ax, label: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_label(label)


def _colour_bar(figure: "Figure", artist, cell, label: str, title: str) -> None:
    bar = figure.colorbar(artist, cax=figure.add_subplot(cell))
    bar.ax.tick_params(labelsize=6)
    bar.ax.set_label(label)
    bar.set_label(title, fontsize=7)


def _quoted(text: str, limit: int = 24) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit - 3] + "...")

"""CLIP, SigLIP and SigLIP 2 image towers from transformers (``CLIPVisionModel``, ``SiglipVisionModel``,
``Siglip2VisionModel`` and the full ``CLIPModel``/``SiglipModel``/``Siglip2Model``), for ``hf:`` specs.
No model code is copied."""

from __future__ import annotations

from dataclasses import replace

import torch

from test_time_registers.hooks import HookManager, Hooks, add_hook
from test_time_registers.layout import TokenLayout, extend_pairwise
from test_time_registers.registry import register_model
from test_time_registers.sites import At, EagerAttention, SeparateProjections, Sites


_TOWER = Sites(
    blocks="encoder.layers",
    neurons="mlp.fc2",
    mlp_inputs=(("mlp.fc1", 0),),
    patch_embedding="embeddings.patch_embedding",
    insert=At("embeddings", "output"),
    remove=At("post_layernorm", "input"),
    attention=EagerAttention("self_attn"),
    attention_input="layer_norm1",
    projections=SeparateProjections(),
)


class ClipVisionHookManager(HookManager):
    """transformers' CLIP image tower: [CLS][patches]; ``pre_layrnorm``, the encoder, then the pooled CLS's
    ``post_layernorm``.

    Test-time registers go in at the input of ``pre_layrnorm`` (after the positional embedding)
    and come out at the encoder's output, so ``last_hidden_state`` and the pooled CLS never see them.
    """

    sites = replace(_TOWER, insert=At("pre_layrnorm", "input"), remove=At("encoder", "output"),
                    layout=TokenLayout(num_cls=1))
    pixel_keyword = "pixel_values"

    def default_name(self) -> str:
        return f"hf:{getattr(self.model.config, '_name_or_path', '') or type(self.model).__name__}"


class SiglipVisionHookManager(ClipVisionHookManager):
    """transformers' SigLIP image tower: patches only (no CLS), then ``post_layernorm`` and attention pooling.

    Test-time registers go in at the embeddings' output (after the positional embedding) and come
    out at the input of ``post_layernorm``, so neither the pooling head nor ``last_hidden_state``
    sees them.
    """

    sites = replace(_TOWER, layout=TokenLayout(num_cls=0))


class Siglip2VisionHookManager(SiglipVisionHookManager):
    """transformers' SigLIP 2 image tower (NaFlex): patches only, taken as patchified pixels with a mask.

    The model takes ``pixel_values`` [B, N, p * p * 3] (each patch's pixels row by row, channels
    last), ``pixel_attention_mask`` [B, N] (1 for a real patch) and ``spatial_shapes`` [B, 2] (the
    patch grid, to which it resizes its positional embedding). :meth:`model_inputs` builds them from
    images [B, 3, H, W]: a full grid of H // p by W // p patches, every one real.

    Test-time registers are appended to the encoder's input (after the positional embedding) and
    come out at the input of ``post_layernorm``, before the attention-pooling head. While they are
    in, the attention mask the model built for the encoder is extended: a register attends to every
    real patch and is attended by all, like a real patch. Padded patches (from the model's own
    processor) stay masked; registers come after them. The layout still counts padded patches as
    patches, so discovery and the edit's maximum see them too: :meth:`forward_images` never pads.
    """

    def model_inputs(self, pixel_values: torch.Tensor) -> tuple[tuple, dict]:
        _, inputs = super().model_inputs(pixel_values)
        pixels = inputs["pixel_values"]                                   # [B, C, H, W]
        (patch, _), (batch, channels) = self.patch_size, pixels.shape[:2]
        rows, cols = self.grid_shape(pixels)
        patches = (pixels[:, :, :rows * patch, :cols * patch]
                   .reshape(batch, channels, rows, patch, cols, patch)
                   .permute(0, 2, 4, 3, 5, 1)                             # [B, rows, cols, p, p, C]
                   .reshape(batch, rows * cols, patch * patch * channels))
        return (), {"pixel_values": patches,
                    "pixel_attention_mask": torch.ones(batch, rows * cols, dtype=torch.long, device=pixels.device),
                    "spatial_shapes": torch.tensor([[rows, cols]] * batch, device=pixels.device)}

    sites = replace(_TOWER, insert=At("encoder", "input", keyword="inputs_embeds"), layout=TokenLayout(num_cls=0))

    @property
    def patch_size(self) -> tuple[int, int]:
        size = self.root.config.patch_size
        return size, size

    def prepare_for_registers(self, num_registers: int, hooks: Hooks) -> None:
        def extend_mask(module, args, kwargs):
            mask = kwargs.get("attention_mask")   # [B, 1, N, N], [B, N] for flash attention, or None: no padding
            if mask is None:
                return None
            if mask.dim() == 2:
                mask = torch.cat([mask, mask[:, :1].expand(-1, num_registers)], dim=1)
            else:
                mask = extend_pairwise(mask, num_registers)   # patch 0 is always real
            return args, {**kwargs, "attention_mask": mask}

        hooks.keep(add_hook(self.root.encoder, extend_mask, before=True, with_kwargs=True))


register_model("CLIPVisionModel", hook_manager=ClipVisionHookManager)
register_model("SiglipVisionModel", hook_manager=SiglipVisionHookManager)
register_model("Siglip2VisionModel", hook_manager=Siglip2VisionHookManager)
# Two-tower models run their image tower (and name the method that projects its features);
# classifiers run whole, so that forward_images gives their logits.
register_model("CLIPModel", "CLIPVisionModelWithProjection", "SiglipModel", "Siglip2Model", inside="vision_model",
               run_inside=True, forward_methods=("get_image_features",))
register_model("CLIPForImageClassification", "SiglipForImageClassification", "Siglip2ForImageClassification",
               inside="vision_model")

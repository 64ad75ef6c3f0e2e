"""Image towers that transformers builds only for their vision-language models: InternVL's ``InternVLVisionModel``
and the SigLIP-like towers of Idefics3 and SmolVLM, declared here with their vision-language models as wrappers.

Each vision-language model is registered as :mod:`.vlm` registers LLaVA: the tower is found by its config, the
blocks the language model reads come from ``vision_feature_layer`` (InternVL) or are the last block (Idefics3 and
SmolVLM read ``last_hidden_state``), and ``generate`` and ``get_image_features`` run under the intervention.
Test-time registers come out at the tower's output and from every hidden state it returns, so the pixel shuffle
that both families apply before their projector sees the unmodified square grid. Tiles and thumbnails (or global
images) are batch elements of the tower: each gets its own register. No model code is copied.
"""

from __future__ import annotations

import torch

from test_time_registers.errors import UnsupportedModelError
from test_time_registers.hf import language_model_reads, vision_tower_path
from test_time_registers.hooks import HookManager, Hooks, add_hook
from test_time_registers.layout import TokenLayout, extend_pairwise
from test_time_registers.registry import register_model
from test_time_registers.sites import At, EagerAttention, SeparateProjections, Sites


def _hf_name(hook_manager: HookManager) -> str:
    return f"hf:{getattr(hook_manager.model.config, '_name_or_path', '') or type(hook_manager.model).__name__}"


class InternVLVisionHookManager(HookManager):
    """transformers' InternVL image tower (``InternVLVisionModel``, InternViT): [CLS][patches], pre-norm blocks with
    layer scale (``lambda_1``, ``lambda_2``), optional QK-norm and RMSNorm, an ``fc1``/``fc2`` MLP, then ``layernorm``
    (an ``Identity`` when the model mean-pools).

    Test-time registers are appended to the embeddings' output (after CLS and the positional embedding) and come
    out at the input of ``layernorm``, so ``last_hidden_state`` never holds them; every hidden state the tower
    returns is stripped too. InternVL's ``get_image_features`` reads ``last_hidden_state`` for
    ``vision_feature_layer=-1`` and ``hidden_states[k]`` otherwise, drops CLS, reshapes the patches to a square
    and pixel-shuffles them before its projector: a leaked register would make that reshape wrong, so it never
    gets one. Queries, keys and values are read as projected, before the QK-norm.
    """

    sites = Sites(
        blocks="encoder.layer",
        neurons="mlp.fc2",
        mlp_inputs=(("mlp.fc1", 0),),
        patch_embedding="embeddings.patch_embeddings.projection",
        insert=At("embeddings", "output"),
        remove=At("layernorm", "input"),
        attention=EagerAttention("attention"),
        attention_input="layernorm_before",
        projections=SeparateProjections(),
        layout=TokenLayout(num_cls=1),
    )
    pixel_keyword = "pixel_values"

    def default_name(self) -> str:
        return _hf_name(self)


class Idefics3VisionHookManager(HookManager):
    """The SigLIP-like image tower of Idefics3 and SmolVLM (``Idefics3VisionTransformer``,
    ``SmolVLMVisionTransformer``): patches only (no CLS), the encoder, then ``post_layernorm``; the language
    model reads ``last_hidden_state`` through a connector that pixel-shuffles it.

    The tower takes ``pixel_values`` [B, 3, H, W] and a ``patch_attention_mask`` [B, H / p, W / p] (the model makes
    it from the processor's ``pixel_attention_mask``: images smaller than the batch's largest are padded at the
    bottom and right), which it turns into an attention mask for the encoder. Tiles and the global image are batch
    elements. Without a mask the tower takes every patch as real, so :meth:`forward_images` passes the pixels alone.

    Test-time registers are appended to the encoder's input (after the positional embedding) and come out at the
    input of ``post_layernorm``. While they are in, the encoder's attention mask is extended: a register attends
    to every real patch and is attended by all, like a real patch, and padded patches stay masked. The layout
    counts padded patches as patches, so discovery and the edit's maximum see them too: :meth:`forward_images`
    never pads.
    """

    sites = Sites(
        blocks="encoder.layers",
        neurons="mlp.fc2",
        mlp_inputs=(("mlp.fc1", 0),),
        patch_embedding="embeddings.patch_embedding",
        insert=At("encoder", "input", keyword="inputs_embeds"),
        remove=At("post_layernorm", "input"),
        attention=EagerAttention("self_attn"),
        attention_input="layer_norm1",
        projections=SeparateProjections(),
        layout=TokenLayout(num_cls=0),
    )
    pixel_keyword = "pixel_values"

    def default_name(self) -> str:
        return _hf_name(self)

    def prepare_for_registers(self, num_registers: int, hooks: Hooks) -> None:
        def extend_mask(module, args, kwargs):
            mask = kwargs.get("attention_mask")   # [B, 1, N, N], [B, N] for flash attention, or None: no padding
            if mask is None:
                return None
            if not isinstance(mask, torch.Tensor):
                raise UnsupportedModelError(f"{type(self.root).__name__} built a {type(mask).__name__} attention mask "
                                            "(flex attention), which test-time registers cannot extend: switch the "
                                            "tower to sdpa or eager attention")
            if mask.dim() == 2:
                mask = torch.cat([mask, mask[:, :1].expand(-1, num_registers)], dim=1)
            else:
                mask = extend_pairwise(mask, num_registers)   # patch 0 is always real: padding is bottom and right
            return args, {**kwargs, "attention_mask": mask}

        hooks.keep(add_hook(self.root.encoder, extend_mask, before=True, with_kwargs=True))


register_model("InternVLVisionModel", hook_manager=InternVLVisionHookManager)
register_model("Idefics3VisionTransformer", "SmolVLMVisionTransformer", hook_manager=Idefics3VisionHookManager)
register_model("InternVLForConditionalGeneration", "InternVLModel",
               "Idefics3ForConditionalGeneration", "Idefics3Model",
               "SmolVLMForConditionalGeneration", "SmolVLMModel",
               inside=vision_tower_path, run_inside=True, forward_methods=("generate", "get_image_features"),
               reads=language_model_reads)

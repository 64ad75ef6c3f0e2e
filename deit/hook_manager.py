"""timm Vision Transformers (the ``deit3_*`` family and any other timm ViT), described for the core."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from test_time_registers.errors import UnsupportedModelError
from test_time_registers.hooks import HookManager, Hooks, HookSite
from test_time_registers.layout import TokenLayout


class DeitHookManager(HookManager):
    """Sites of an unmodified timm ``VisionTransformer``.

    The prefix tokens are read from the model: its class token (and distillation token, for
    distilled DeiT), then its ``reg_tokens``, which count as trained registers. Test-time
    registers are appended to the input of ``norm_pre`` (after the positional embedding,
    which they do not get, also with ``no_embed_class``) and taken off the input of ``norm``,
    before pooling and the head. Attention probabilities are the output of each block's
    ``attn.attn_drop``; fused attention is switched off only while a capture is open, by setting the
    block's ``fused_attn`` (timm has no public switch for a built model), which is not thread-safe.
    """

    def __init__(self, model: nn.Module, name: str | None = None, **options):
        if not isinstance(model, VisionTransformer):
            raise UnsupportedModelError(f"DeitHookManager needs a timm VisionTransformer, got {type(model).__name__}")
        for block in model.blocks:
            attention = getattr(block, "attn", None)
            if not (hasattr(block, "mlp") and hasattr(block.mlp, "fc2") and hasattr(attention, "attn_drop")
                    and hasattr(attention, "fused_attn")):
                raise UnsupportedModelError(
                    f"DeitHookManager does not support the block type {type(block).__name__} with "
                    f"{type(getattr(block, 'mlp', None)).__name__} (hybrid or gated ViTs such as ViTamin are not "
                    "supported yet)")
        super().__init__(model, name, **options)

    def default_name(self) -> str:
        config = getattr(self.model, "pretrained_cfg", None) or {}
        architecture = config.get("architecture") or type(self.model).__name__
        return f"timm:{architecture}" + (f".{config['tag']}" if config.get("tag") else "")

    @property
    def layout(self) -> TokenLayout:
        registers = self.model.num_reg_tokens
        return TokenLayout(num_cls=self.model.num_prefix_tokens - registers, num_trained_registers=registers)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    def mlp_output_projection(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp.fc2

    def mlp_input_projection(self, layer: int) -> nn.Module:
        fc1 = self.blocks[layer].mlp.fc1
        if fc1.weight.shape[0] != self.num_neurons(layer):
            raise NotImplementedError("a gated MLP has no single input projection per neuron")
        return fc1

    def register_insertion_site(self) -> HookSite:
        return HookSite(self.model.norm_pre, "input")

    def register_removal_site(self) -> HookSite:
        return HookSite(self.model.norm, "input")

    @property
    def patch_embedding(self) -> nn.Module:
        return self.model.patch_embed.proj

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.patch_size)

    def attach_attention_probe(self, layer: int, fn: Callable[[torch.Tensor], None], hooks: Hooks) -> None:
        attention = self.blocks[layer].attn
        if attention.fused_attn:
            attention.fused_attn = False   # the fused kernel returns no probabilities
            hooks.on_exit(lambda: setattr(attention, "fused_attn", True))

        def read_probabilities(module, args, output):
            fn(output)  # [B, heads, L, L]

        hooks.keep(attention.attn_drop.register_forward_hook(read_probabilities))

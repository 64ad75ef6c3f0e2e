"""OpenCLIP's VisionTransformer, described for the shared core. No open_clip code is copied."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from test_time_registers.errors import UnsupportedModelError
from test_time_registers.hooks import HookManager, Hooks, HookSite
from test_time_registers.layout import TokenLayout


class ClipHookManager(HookManager):
    """Sites of an unmodified open_clip image tower.

    Accepts a ``CLIP``/``CustomTextCLIP`` model (anything with a ``.visual``) or the
    ``VisionTransformer`` itself. Test-time registers are appended to the input of
    ``ln_pre`` (after the positional embedding, which they do not get) and taken off the
    output of ``transformer``, before ``ln_post`` and pooling.
    """

    def __init__(self, model: nn.Module, name: str | None = None, **options):
        visual = getattr(model, "visual", model)
        if not isinstance(visual, VisionTransformer):
            raise UnsupportedModelError(
                f"ClipHookManager needs an open_clip VisionTransformer image tower, got {type(visual).__name__}")
        if not getattr(visual.transformer, "batch_first", True):
            raise UnsupportedModelError("ClipHookManager needs a batch-first open_clip transformer")
        unsupported = {type(b).__name__ for b in visual.transformer.resblocks if not isinstance(b, ResidualAttentionBlock)}
        if unsupported:
            raise UnsupportedModelError(f"ClipHookManager supports ResidualAttentionBlock only, found {unsupported}")
        self.visual = visual
        super().__init__(model, name, **options)
        self.forward_methods = ("encode_image",) if hasattr(model, "encode_image") else ()

    def default_name(self) -> str:
        visual = self.visual
        return (f"openclip:ViT(width={visual.conv1.out_channels}, layers={len(visual.transformer.resblocks)}, "
                f"patch={visual.patch_size[0]}, image={visual.image_size[0]})")

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(num_cls=1)

    @property
    def patch_embedding(self) -> nn.Module:
        return self.visual.conv1

    @property
    def image_model(self) -> nn.Module:
        return self.visual

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.visual.transformer.resblocks

    def mlp_output_projection(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp.c_proj

    def mlp_input_projection(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp.c_fc

    def register_insertion_site(self) -> HookSite:
        return HookSite(self.visual.ln_pre, "input")

    def register_removal_site(self) -> HookSite:
        return HookSite(self.visual.transformer, "output")

    def attach_attention_probe(self, layer: int, fn: Callable[[torch.Tensor], None], hooks: Hooks) -> None:
        attention = self.blocks[layer].attn  # nn.MultiheadAttention, called with need_weights=False

        def ask_for_weights(module, args, kwargs):
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

        def read_weights(module, args, output):
            fn(output[1])  # [B, heads, L, L]

        hooks.keep(attention.register_forward_pre_hook(ask_for_weights, with_kwargs=True))
        hooks.keep(attention.register_forward_hook(read_weights))

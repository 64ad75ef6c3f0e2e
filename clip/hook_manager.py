"""OpenCLIP's VisionTransformer, described for the shared core. No open_clip code is copied."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from shared.errors import UnsupportedModelError
from shared.hooks import HookManager, Hooks, HookSite
from shared.layout import TokenLayout


class ClipHookManager(HookManager):
    """Sites of an unmodified open_clip image tower.

    Accepts a ``CLIP``/``CustomTextCLIP`` model (anything with a ``.visual``) or the
    ``VisionTransformer`` itself. Test-time registers are appended to the input of
    ``ln_pre`` (after the positional embedding, which they do not get) and taken off the
    output of ``transformer``, before ``ln_post`` and pooling.
    """

    def __init__(self, model: nn.Module, name: str | None = None):
        visual = getattr(model, "visual", model)
        if not isinstance(visual, VisionTransformer):
            raise UnsupportedModelError(
                f"ClipHookManager needs an open_clip VisionTransformer image tower, got {type(visual).__name__}")
        if not getattr(visual.transformer, "batch_first", True):
            raise UnsupportedModelError("ClipHookManager needs a batch-first open_clip transformer")
        unsupported = {type(b).__name__ for b in visual.transformer.resblocks if not isinstance(b, ResidualAttentionBlock)}
        if unsupported:
            raise UnsupportedModelError(f"ClipHookManager supports ResidualAttentionBlock only, found {unsupported}")
        super().__init__(model, name or f"openclip:{type(model).__name__}")
        self.visual = visual
        self.forward_methods = ("encode_image",) if hasattr(model, "encode_image") else ()

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(num_cls=1)

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

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.visual.patch_size)

    def forward_images(self, pixel_values: torch.Tensor):
        return self.visual(pixel_values)

    def attach_attention_probe(self, layer: int, fn: Callable[[torch.Tensor], None], hooks: Hooks) -> None:
        attention = self.blocks[layer].attn  # nn.MultiheadAttention, called with need_weights=False

        def ask_for_weights(module, args, kwargs):
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

        def read_weights(module, args, output):
            fn(output[1])  # [B, heads, L, L]

        hooks.keep(attention.register_forward_pre_hook(ask_for_weights, with_kwargs=True))
        hooks.keep(attention.register_forward_hook(read_weights))

"""OpenCLIP's image towers, described for the shared core: its own VisionTransformer, and towers
with a timm trunk (SigLIP, SigLIP 2 and the other ``TimmModel`` towers). No open_clip code is copied."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from test_time_registers.deit.hook_manager import timm_hook_manager
from test_time_registers.errors import UnsupportedModelError
from test_time_registers.hooks import HookManager, Hooks, HookSite
from test_time_registers.layout import TokenLayout


#: Why towers that are not plain ViTs cannot take a test-time register (yet).
_WHY_NOT = {
    "ModifiedResNet": ": a convolutional ResNet has no token sequence to append a register to",
    "ConvNeXt": ": a convolutional network has no token sequence to append a register to",
    "FastVit": ": FastViT mixes tokens by convolution over the patch grid, which has no slot for an extra token",
    "SwinTransformer": ": Swin attends within windows of the patch grid, which have no slot for an extra token",
}


class ClipHookManager(HookManager):
    """Sites of an unmodified open_clip image tower.

    Accepts a ``CLIP``/``CustomTextCLIP`` model (anything with a ``.visual``) or the
    ``VisionTransformer`` itself. Test-time registers are appended to the input of
    ``ln_pre`` (after the positional embedding, which they do not get) and taken off the
    output of ``transformer``, before ``ln_post`` and pooling.

    A tower with a timm trunk (``TimmModel``) gets a :class:`ClipTimmHookManager` instead.
    """

    attention_input = "ln_1"

    def __new__(cls, model: nn.Module, *args, **kwargs):
        if cls is ClipHookManager and isinstance(getattr(model, "visual", model), TimmModel):
            cls = ClipTimmHookManager
        return super().__new__(cls)

    def __init__(self, model: nn.Module, name: str | None = None, **options):
        visual = getattr(model, "visual", model)
        if not isinstance(visual, VisionTransformer):
            raise UnsupportedModelError(
                f"ClipHookManager needs an open_clip VisionTransformer image tower, got {type(visual).__name__}"
                f"{_WHY_NOT.get(type(visual).__name__, '')}")
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


class ClipTimmHookManager(ClipHookManager):
    """An open_clip tower whose trunk is a timm ViT (``TimmModel``: SigLIP, SigLIP 2, ...).

    Every site is the trunk's, as :func:`~test_time_registers.deit.timm_hook_manager` declares them
    (a timm ViT, with a hybrid stem and GeGLU MLPs for ViTamin; Eva; a relative-position ViT);
    prefix tokens are read from the trunk, so SigLIP and ViTamin have none. ``forward_images`` and
    ``encode_image`` run the whole tower, so open_clip's pooling and projection follow. Other
    trunks raise :class:`UnsupportedModelError` with the reason.
    """

    attention_input = "norm1"   # the trunk's blocks

    def __init__(self, model: nn.Module, name: str | None = None, **options):
        visual = getattr(model, "visual", model)
        if not isinstance(visual, TimmModel):
            raise UnsupportedModelError(f"ClipTimmHookManager needs an open_clip TimmModel tower, got "
                                        f"{type(visual).__name__}")
        self.visual = visual
        trunk = type(visual.trunk).__name__
        if trunk in _WHY_NOT:
            raise UnsupportedModelError(f"open_clip tower with a timm {trunk} trunk{_WHY_NOT[trunk]}")
        self.trunk = timm_hook_manager(visual.trunk)   # raises for trunks it does not describe
        HookManager.__init__(self, model, name, **options)
        self.forward_methods = ("encode_image",) if hasattr(model, "encode_image") else ()

    def default_name(self) -> str:
        return f"openclip:{self.trunk.default_name().removeprefix('timm:')}"

    @property
    def layout(self) -> TokenLayout:
        return self.trunk.layout

    @property
    def patch_embedding(self) -> nn.Module:
        return self.trunk.patch_embedding

    @property
    def patch_size(self) -> tuple[int, int]:
        return self.trunk.patch_size

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.trunk.blocks

    def mlp_output_projection(self, layer: int) -> nn.Module:
        return self.trunk.mlp_output_projection(layer)

    def mlp_input_projection(self, layer: int) -> nn.Module:
        return self.trunk.mlp_input_projection(layer)

    def mlp_input_rows(self, layer: int) -> tuple[tuple[nn.Module, int], ...]:
        return self.trunk.mlp_input_rows(layer)

    def register_insertion_site(self) -> HookSite:
        return self.trunk.register_insertion_site()

    def register_removal_site(self) -> HookSite:
        return self.trunk.register_removal_site()

    def attach_attention_probe(self, layer: int, fn: Callable[[torch.Tensor], None], hooks: Hooks) -> None:
        self.trunk.attach_attention_probe(layer, fn, hooks)

    def prepare_for_registers(self, num_registers: int, hooks: Hooks) -> None:
        self.trunk.prepare_for_registers(num_registers, hooks)


"""OpenCLIP's image towers, declared for the shared core: its own ``VisionTransformer``, and towers
with a timm trunk (``TimmModel``: SigLIP, SigLIP 2, EVA02, ViTamin, ...), which are described by the
trunk's timm declaration. No open_clip code is copied."""

from __future__ import annotations

from open_clip.model import CLIP, CustomTextCLIP
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer

from test_time_registers import deit   # noqa: F401 - registers the timm trunks' declarations
from test_time_registers.hooks import HookManager
from test_time_registers.layout import TokenLayout
from test_time_registers.registry import register_model
from test_time_registers.sites import At, FusedProjections, NeedWeights, Sites


class ClipHookManager(HookManager):
    """Sites of an unmodified open_clip ``VisionTransformer``, alone or as a ``CLIP``'s ``.visual``.

    Test-time registers are appended to the input of ``ln_pre`` (after the positional embedding,
    which they do not get) and taken off the output of ``transformer``, before ``ln_post`` and
    pooling. Attention probabilities come from each block's ``nn.MultiheadAttention``, asked for
    per-head weights while a capture is open. A tower with a timm trunk (``TimmModel``) is
    described by the trunk's timm hook manager instead (:func:`~test_time_registers.hook_manager_for`).
    """

    sites = Sites(
        blocks="transformer.resblocks",
        neurons="mlp.c_proj",
        mlp_inputs=(("mlp.c_fc", 0),),
        patch_embedding="conv1",
        insert=At("ln_pre", "input"),
        remove=At("transformer", "output"),
        attention=NeedWeights("attn"),
        attention_input="ln_1",
        projections=FusedProjections("in_proj_weight", "in_proj_bias"),
        layout=TokenLayout(num_cls=1),
    )
    intermediate_methods = {"forward_intermediates": ("x", "image")}

    def default_name(self) -> str:
        visual = self.root
        return (f"openclip:ViT(width={visual.conv1.out_channels}, layers={len(self.blocks)}, "
                f"patch={visual.patch_size[0]}, image={visual.image_size[0]})")


register_model(VisionTransformer, hook_manager=ClipHookManager)
register_model(CLIP, CustomTextCLIP, inside="visual", run_inside=True, forward_methods=("encode_image",))
# The tower runs whole (the trunk, then open_clip's pooling and projection); the trunk is described.
register_model(TimmModel, inside="trunk")
register_model("ModifiedResNet", unsupported="a convolutional ResNet has no token sequence to append a register to")

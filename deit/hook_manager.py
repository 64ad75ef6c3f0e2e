"""timm Vision Transformers (the ``deit3_*`` family and any other timm ViT, Eva, BEiT, the
relative-position ViT), declared for the core."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from timm.layers import to_2tuple
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from torch import nn

from test_time_registers.errors import UnsupportedModelError
from test_time_registers.hooks import HookManager, Hooks, add_hook
from test_time_registers.layout import TokenLayout, extend_pairwise
from test_time_registers.registry import register_model
from test_time_registers.sites import (At, FirstPresent, FusedProjections, MlpInputs, SeparateProjections, Sites,
                                       Unfused)


@dataclass(frozen=True)
class MlpSites:
    """Where a timm MLP class keeps its neurons.

    ``output`` names the output projection (its input is the neurons); ``inputs`` names each
    input projection that feeds them, with which block of ``num_neurons`` rows it is (a gated MLP
    that holds gate and value in one layer has two blocks, 0 and 1).
    """

    output: str
    inputs: MlpInputs


#: timm's MLP classes (and their subclasses) -> their sites.
TIMM_MLPS = {
    "Mlp": MlpSites("fc2", (("fc1", 0),)),
    "SwiGLU": MlpSites("fc2", (("fc1_g", 0), ("fc1_x", 0))),     # Eva, BEiT: separate gate and value layers
    "GluMlp": MlpSites("fc2", (("fc1", 0), ("fc1", 1))),         # one layer, two halves
    "GeGluMlp": MlpSites("w2", (("w0", 0), ("w1", 0))),          # ViTamin: act(w0 x) * w1 x
}


def mlp_sites(mlp: nn.Module | None) -> MlpSites:
    """The sites of a timm MLP, looked up by its class or a base class."""
    found = next((TIMM_MLPS[cls.__name__] for cls in type(mlp).__mro__ if cls.__name__ in TIMM_MLPS), None)
    if found is None:
        raise UnsupportedModelError(f"unknown timm MLP {type(mlp).__name__} (known: {', '.join(TIMM_MLPS)})")
    return found


def _mlp_inputs(block: nn.Module) -> MlpInputs:
    return tuple((f"mlp.{path}", half) for path, half in mlp_sites(block.mlp).inputs)


def _prefix_layout(model: nn.Module) -> TokenLayout:
    """[class token, distillation token][reg_tokens]: timm's prefix tokens, the registers counted as trained."""
    registers = getattr(model, "num_reg_tokens", 0)
    return TokenLayout(num_cls=model.num_prefix_tokens - registers, num_trained_registers=registers)


def _extend_bias(module: nn.Module, method: str, pad: Callable[[torch.Tensor], torch.Tensor], hooks: Hooks) -> None:
    """Make ``module.method()`` return ``pad`` of what it returned, while ``hooks`` is open."""
    original = getattr(module, method)
    hooks.shadow(module, method, lambda: pad(original()))


class DeitHookManager(HookManager):
    """Sites of an unmodified timm ``VisionTransformer``.

    The prefix tokens are read from the model: its class token (and distillation token, for
    distilled DeiT), then its ``reg_tokens``, which count as trained registers. Test-time
    registers are appended to the input of ``norm_pre`` (after the positional embedding,
    which they do not get, also with ``no_embed_class``) and taken off the input of ``norm``,
    before pooling and the head. Attention probabilities are the output of each block's
    ``attn.attn_drop``; fused attention is switched off only while a capture is open, by setting the
    block's ``fused_attn`` (timm has no public switch for a built model), which is not thread-safe.

    The MLP sites follow the MLP's class (:data:`TIMM_MLPS`). A hybrid patch embedding (a
    convolutional stem, as in ViTamin) takes the pixels at its first convolution, and a patch is
    the stem's whole stride.
    """

    sites = Sites(
        blocks="blocks",
        neurons=("mlp.fc2", "mlp.w2"),
        mlp_inputs=_mlp_inputs,
        patch_embedding="patch_embed",          # its first convolution takes the pixels (a hybrid stem's too)
        insert=At("norm_pre", "input"),
        remove=At("norm", "input"),
        attention=Unfused("attn", probabilities="attn_drop", switch="fused_attn"),
        attention_input="norm1",
        projections=FusedProjections("qkv.weight", "qkv.bias"),
        layout=_prefix_layout,
    )
    forward_methods = ("forward_features",)
    intermediate_methods = {"forward_intermediates": ("x", "image"), "get_intermediate_layers": ("x",)}

    def default_name(self) -> str:
        config = getattr(self.root, "pretrained_cfg", None) or {}
        architecture = config.get("architecture") or type(self.root).__name__
        return f"timm:{architecture}" + (f".{config['tag']}" if config.get("tag") else "")

    @property
    def patch_size(self) -> tuple[int, int]:
        """Pixels per patch: the patch embedding's total stride (a hybrid stem's included)."""
        return tuple(to_2tuple(self.root.patch_embed.feat_ratio(as_scalar=False)))


#: Eva and BEiT call ``F.linear`` on ``qkv.weight`` with their own ``q_bias``/``k_bias``/``v_bias``; Eva built with
#: ``qkv_fused=False`` has three linear layers instead.
_EVA_PROJECTIONS = FirstPresent((FusedProjections("qkv.weight", ("q_bias", "k_bias", "v_bias")), SeparateProjections()))


class EvaHookManager(DeitHookManager):
    """Sites of an unmodified timm ``Eva`` (EVA02, EVA-CLIP): rotary positions, gated MLPs.

    Eva applies its rotary embedding to every token after the prefix (``num_prefix_tokens``).
    Test-time registers therefore go right after the prefix and before the patches
    (``registers_after_prefix``), and while they are in, each block's attention counts them as
    prefix tokens: they get no rotary position, and every patch keeps its own. The other sites
    are those of a timm ViT.
    """

    sites = replace(DeitHookManager.sites, projections=_EVA_PROJECTIONS, layout=lambda model: replace(
        TokenLayout(num_cls=model.num_prefix_tokens - _eva_registers(model), num_trained_registers=_eva_registers(model)),
        registers_after_prefix=True))

    def prepare_for_registers(self, num_registers: int, hooks: Hooks) -> None:
        for block in self.blocks:
            attention = block.attn
            attention.num_prefix_tokens += num_registers
            hooks.on_exit(lambda attention=attention: setattr(attention, "num_prefix_tokens",
                                                              attention.num_prefix_tokens - num_registers))


def _eva_registers(model: nn.Module) -> int:
    return model.reg_token.shape[1] if getattr(model, "reg_token", None) is not None else 0


class BeitHookManager(DeitHookManager):
    """Sites of an unmodified timm ``Beit`` (BEiT, BEiT v2): a relative position bias in attention.

    The bias is sized for [CLS][patches]. Test-time registers are appended after the patches
    (at the input of the first block), and while they are in, every bias the model computes is
    extended for them: a register gets the CLS token's entries, i.e. the bias of attending to and
    from CLS (BEiT gives CLS one learned entry per direction, and another for itself). They come
    out at the input of ``norm``, before pooling.
    """

    sites = replace(DeitHookManager.sites, insert=At("blocks.0", "input"), projections=_EVA_PROJECTIONS,
                    layout=TokenLayout(num_cls=1))

    def prepare_for_registers(self, num_registers: int, hooks: Hooks) -> None:
        pad = lambda bias: extend_pairwise(bias, num_registers)  # noqa: E731
        for block in self.blocks:
            if getattr(block.attn, "relative_position_bias_table", None) is not None:
                _extend_bias(block.attn, "_get_rel_pos_bias", pad, hooks)
        if self.root.rel_pos_bias is not None:      # one bias shared by every block
            hooks.keep(add_hook(self.root.rel_pos_bias, lambda module, args, output: pad(output), before=False))


class RelPosHookManager(DeitHookManager):
    """Sites of an unmodified timm ``VisionTransformerRelPos``: a relative position bias, no absolute positions.

    The bias (an MLP over log-spaced relative coordinates, or a table; per block as
    ``attn.rel_pos``, or one shared) is sized for [CLS][patches] or, without a class token,
    [patches]. Test-time registers are appended after the patches (at the input of the first
    block) and come out at the input of ``norm``. While they are in, every bias is extended for
    them: with a class token, a register gets the CLS token's entries (zero for the MLP bias, which
    gives prefix tokens none; CLS's learned entries for the table); without one, zero.
    """

    sites = replace(DeitHookManager.sites, insert=At("blocks.0", "input"),
                    layout=lambda model: TokenLayout(num_cls=model.num_prefix_tokens))

    def prepare_for_registers(self, num_registers: int, hooks: Hooks) -> None:
        if self.root.num_prefix_tokens:
            pad = lambda bias: extend_pairwise(bias, num_registers)  # noqa: E731
        else:
            pad = lambda bias: torch.nn.functional.pad(bias, (0, num_registers, 0, num_registers))  # noqa: E731
        for relative_position in (self.root.shared_rel_pos, *(block.attn.rel_pos for block in self.blocks)):
            if relative_position is not None:
                _extend_bias(relative_position, "get_bias", pad, hooks)


register_model(VisionTransformer, hook_manager=DeitHookManager)
register_model(Eva, hook_manager=EvaHookManager)
register_model(Beit, hook_manager=BeitHookManager)
register_model(VisionTransformerRelPos, hook_manager=RelPosHookManager)
register_model("ConvNeXt", unsupported="a convolutional network has no token sequence to append a register to")
register_model("FastVit", unsupported="FastViT mixes tokens by convolution over the patch grid, which has no slot "
                                      "for an extra token")
register_model("SwinTransformer", unsupported="Swin attends within windows of the patch grid, which have no slot for "
                                              "an extra token")

"""timm Vision Transformers (the ``deit3_*`` family and any other timm ViT), described for the core."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from timm.layers import to_2tuple
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from torch import nn

from test_time_registers.errors import UnsupportedModelError
from test_time_registers.hooks import HookManager, Hooks, HookSite
from test_time_registers.layout import TokenLayout, extend_pairwise


@dataclass(frozen=True)
class MlpSites:
    """Where a timm MLP class keeps its neurons.

    ``output`` names the output projection (its input is the neurons); ``inputs`` names each
    input projection that feeds them, with which block of ``num_neurons`` rows it is (a gated MLP
    that holds gate and value in one layer has two blocks, 0 and 1).
    """

    output: str
    inputs: tuple[tuple[str, int], ...]


#: timm's MLP classes (and their subclasses) -> their sites.
TIMM_MLPS = {
    "Mlp": MlpSites("fc2", (("fc1", 0),)),
    "SwiGLU": MlpSites("fc2", (("fc1_g", 0), ("fc1_x", 0))),     # Eva, BEiT: separate gate and value layers
    "GluMlp": MlpSites("fc2", (("fc1", 0), ("fc1", 1))),         # one layer, two halves
    "GeGluMlp": MlpSites("w2", (("w0", 0), ("w1", 0))),          # ViTamin: act(w0 x) * w1 x
}


def mlp_sites(mlp: nn.Module | None) -> MlpSites | None:
    """The sites of a timm MLP, looked up by its class or a base class; None for an unknown one."""
    return next((TIMM_MLPS[cls.__name__] for cls in type(mlp).__mro__ if cls.__name__ in TIMM_MLPS), None)


def _extend_bias(module: nn.Module, method: str, pad: Callable[[torch.Tensor], torch.Tensor], hooks: Hooks) -> None:
    """Make ``module.method()`` return ``pad`` of what it returned, while ``hooks`` is open.

    An instance attribute shadows the method; on exit the attribute the instance had before (if any)
    comes back, so nested interventions unwind in order.
    """
    had, previous, original = method in vars(module), vars(module).get(method), getattr(module, method)
    setattr(module, method, lambda: pad(original()))
    hooks.on_exit(lambda: setattr(module, method, previous) if had else delattr(module, method))


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

    #: The timm model class this hook manager describes.
    model_class: type = VisionTransformer
    attention_input = "norm1"

    def __init__(self, model: nn.Module, name: str | None = None, **options):
        if not isinstance(model, self.model_class):
            raise UnsupportedModelError(f"{type(self).__name__} needs a timm {self.model_class.__name__}, "
                                        f"got {type(model).__name__}")
        for block in model.blocks:
            attention = getattr(block, "attn", None)
            if mlp_sites(getattr(block, "mlp", None)) is None or not (
                    hasattr(attention, "attn_drop") and hasattr(attention, "fused_attn")):
                raise UnsupportedModelError(
                    f"{type(self).__name__} does not support the block type {type(block).__name__} with "
                    f"{type(getattr(block, 'mlp', None)).__name__} (known MLPs: {', '.join(TIMM_MLPS)})")
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
        mlp = self.blocks[layer].mlp
        return getattr(mlp, mlp_sites(mlp).output)

    def mlp_input_projection(self, layer: int) -> nn.Module:
        rows = self.mlp_input_rows(layer)
        if len(rows) > 1:
            raise NotImplementedError("a gated MLP has no single input projection per neuron")
        return rows[0][0]

    def mlp_input_rows(self, layer: int) -> tuple[tuple[nn.Module, int], ...]:
        mlp, width = self.blocks[layer].mlp, self.num_neurons(layer)
        return tuple((getattr(mlp, name), half * width) for name, half in mlp_sites(mlp).inputs)

    def register_insertion_site(self) -> HookSite:
        return HookSite(self.model.norm_pre, "input")

    def register_removal_site(self) -> HookSite:
        return HookSite(self.model.norm, "input")

    @property
    def patch_embedding(self) -> nn.Module:
        """The first convolution of the patch embedding: its projection, or a hybrid stem's first layer."""
        first = next((module for module in self.model.patch_embed.modules() if isinstance(module, nn.Conv2d)), None)
        if first is None:
            raise UnsupportedModelError(f"no convolution takes the pixels in {type(self.model.patch_embed).__name__}")
        return first

    @property
    def patch_size(self) -> tuple[int, int]:
        """Pixels per patch: the patch embedding's total stride (a hybrid stem's included)."""
        return tuple(to_2tuple(self.model.patch_embed.feat_ratio(as_scalar=False)))

    def attach_attention_probe(self, layer: int, fn: Callable[[torch.Tensor], None], hooks: Hooks) -> None:
        attention = self.blocks[layer].attn
        if attention.fused_attn:
            attention.fused_attn = False   # the fused kernel returns no probabilities
            hooks.on_exit(lambda: setattr(attention, "fused_attn", True))

        def read_probabilities(module, args, output):
            fn(output)  # [B, heads, L, L]

        hooks.keep(attention.attn_drop.register_forward_hook(read_probabilities))


class EvaHookManager(DeitHookManager):
    """Sites of an unmodified timm ``Eva`` (EVA02, EVA-CLIP): rotary positions, gated MLPs.

    Eva applies its rotary embedding to every token after the prefix (``num_prefix_tokens``).
    Test-time registers therefore go right after the prefix and before the patches
    (``registers_after_prefix``), and while they are in, each block's attention counts them as
    prefix tokens: they get no rotary position, and every patch keeps its own. The other sites
    are those of a timm ViT (``norm_pre``, ``norm``, ``mlp.fc2``, ``attn.attn_drop``).
    """

    model_class = Eva

    @property
    def layout(self) -> TokenLayout:
        registers = self.model.reg_token.shape[1] if getattr(self.model, "reg_token", None) is not None else 0
        return TokenLayout(num_cls=self.model.num_prefix_tokens - registers, num_trained_registers=registers,
                           registers_after_prefix=True)

    def prepare_for_registers(self, num_registers: int, hooks: Hooks) -> None:
        for block in self.blocks:
            attention = block.attn
            attention.num_prefix_tokens += num_registers
            hooks.on_exit(lambda attention=attention: setattr(attention, "num_prefix_tokens",
                                                              attention.num_prefix_tokens - num_registers))


class BeitHookManager(DeitHookManager):
    """Sites of an unmodified timm ``Beit`` (BEiT, BEiT v2): a relative position bias in attention.

    The bias is sized for [CLS][patches]. Test-time registers are appended after the patches
    (at the input of the first block), and while they are in, every bias the model computes is
    extended for them: a register gets the CLS token's entries, i.e. the bias of attending to and
    from CLS (BEiT gives CLS one learned entry per direction, and another for itself). They come
    out at the input of ``norm``, before pooling.
    """

    model_class = Beit

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(num_cls=1)

    def register_insertion_site(self) -> HookSite:
        return HookSite(self.blocks[0], "input")

    def prepare_for_registers(self, num_registers: int, hooks: Hooks) -> None:
        pad = lambda bias: extend_pairwise(bias, num_registers)  # noqa: E731
        for block in self.blocks:
            if getattr(block.attn, "relative_position_bias_table", None) is not None:
                _extend_bias(block.attn, "_get_rel_pos_bias", pad, hooks)
        if self.model.rel_pos_bias is not None:      # one bias shared by every block
            hooks.keep(self.model.rel_pos_bias.register_forward_hook(lambda module, args, output: pad(output)))


class RelPosHookManager(BeitHookManager):
    """Sites of an unmodified timm ``VisionTransformerRelPos``: a relative position bias, no absolute positions.

    The bias (an MLP over log-spaced relative coordinates, or a table; per block as
    ``attn.rel_pos``, or one shared) is sized for [CLS][patches] or, without a class token,
    [patches]. Test-time registers are appended after the patches (at the input of the first
    block) and come out at the input of ``norm``. While they are in, every bias is extended for
    them: with a class token, a register gets the CLS token's entries (zero for the MLP bias, which
    gives prefix tokens none; CLS's learned entries for the table); without one, zero.
    """

    model_class = VisionTransformerRelPos

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(num_cls=self.model.num_prefix_tokens)

    def prepare_for_registers(self, num_registers: int, hooks: Hooks) -> None:
        if self.model.num_prefix_tokens:
            pad = lambda bias: extend_pairwise(bias, num_registers)  # noqa: E731
        else:
            pad = lambda bias: torch.nn.functional.pad(bias, (0, num_registers, 0, num_registers))  # noqa: E731
        for relative_position in (self.model.shared_rel_pos, *(block.attn.rel_pos for block in self.blocks)):
            if relative_position is not None:
                _extend_bias(relative_position, "get_bias", pad, hooks)


#: timm model classes whose hook manager is not :class:`DeitHookManager`.
TIMM_HOOK_MANAGERS: dict[type, type[DeitHookManager]] = {
    Eva: EvaHookManager, Beit: BeitHookManager, VisionTransformerRelPos: RelPosHookManager}


def timm_hook_manager(model: nn.Module, name: str | None = None, **options) -> DeitHookManager:
    """The hook manager of a timm model: the one :data:`TIMM_HOOK_MANAGERS` names for its class, else
    :class:`DeitHookManager`."""
    manager = next((manager for cls, manager in TIMM_HOOK_MANAGERS.items() if isinstance(model, cls)),
                   DeitHookManager)
    return manager(model, name, **options)

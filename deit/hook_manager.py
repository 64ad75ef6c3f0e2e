"""timm Vision Transformers (the ``deit3_*`` family and any other timm ViT), described for the core."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from timm.models.beit import Beit
from timm.models.eva import Eva
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

    #: The timm model class this hook manager describes.
    model_class: type = VisionTransformer
    attention_input = "norm1"

    def __init__(self, model: nn.Module, name: str | None = None, **options):
        if not isinstance(model, self.model_class):
            raise UnsupportedModelError(f"{type(self).__name__} needs a timm {self.model_class.__name__}, "
                                        f"got {type(model).__name__}")
        for block in model.blocks:
            attention = getattr(block, "attn", None)
            if not (hasattr(block, "mlp") and hasattr(block.mlp, "fc2") and hasattr(attention, "attn_drop")
                    and hasattr(attention, "fused_attn")):
                raise UnsupportedModelError(
                    f"{type(self).__name__} does not support the block type {type(block).__name__} with "
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

    def mlp_input_rows(self, layer: int) -> tuple[tuple[nn.Module, int], ...]:
        mlp = self.blocks[layer].mlp
        if hasattr(mlp, "fc1_g"):                   # timm SwiGLU: separate gate and value layers
            return ((mlp.fc1_g, 0), (mlp.fc1_x, 0))
        width = self.num_neurons(layer)
        if mlp.fc1.weight.shape[0] == 2 * width:    # timm GluMlp: one layer, two halves
            return ((mlp.fc1, 0), (mlp.fc1, width))
        return ((mlp.fc1, 0),)

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


def _pad_bias(bias: torch.Tensor, extra: int) -> torch.Tensor:
    """A relative position bias [..., L, L] for ``extra`` tokens appended after position L - 1: each
    gets the CLS token's row, column and diagonal entry (CLS is position 0)."""
    rows = torch.cat([bias, bias[..., :1, :].expand(*bias.shape[:-2], extra, bias.shape[-1])], dim=-2)
    columns = rows[..., :, :1].clone()
    columns[..., -extra:, :] = bias[..., :1, :1]
    return torch.cat([rows, columns.expand(*rows.shape[:-1], extra)], dim=-1)


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
        for block in self.blocks:
            attention = block.attn
            if getattr(attention, "relative_position_bias_table", None) is None:
                continue
            original = attention._get_rel_pos_bias   # a bound method; the instance attribute shadows it
            attention._get_rel_pos_bias = lambda original=original: _pad_bias(original(), num_registers)
            hooks.on_exit(lambda attention=attention: delattr(attention, "_get_rel_pos_bias"))
        if self.model.rel_pos_bias is not None:      # one bias shared by every block
            hooks.keep(self.model.rel_pos_bias.register_forward_hook(
                lambda module, args, output: _pad_bias(output, num_registers)))


def timm_hook_manager(model: nn.Module, name: str | None = None, **options) -> DeitHookManager:
    """The hook manager of a timm model: :class:`EvaHookManager` for ``Eva``, :class:`BeitHookManager`
    for ``Beit``, else :class:`DeitHookManager`."""
    manager = EvaHookManager if isinstance(model, Eva) else BeitHookManager if isinstance(model, Beit) \
        else DeitHookManager
    return manager(model, name, **options)


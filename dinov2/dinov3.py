"""DINOv3 from transformers (``DINOv3ViTModel``), for ``hf:`` specs: rotary positions and 4 trained registers."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from test_time_registers.errors import UnsupportedModelError
from test_time_registers.hf import probe_eager_attention, register_transformers_model
from test_time_registers.hooks import HookManager, HookSite
from test_time_registers.layout import TokenLayout


class Dinov3HookManager(HookManager):
    """Sites of an unmodified transformers ``DINOv3ViTModel``: [CLS][registers][patches], rotary positions.

    DINOv3 applies its rotary embedding to the last ``num_patches`` tokens of the sequence and
    none to the tokens before them. Test-time registers therefore go *after the trained
    registers and before the patches* (``registers_after_prefix``): like CLS and the trained
    registers they get no rotary position, and every patch keeps its own. They are inserted at
    the embeddings' output and taken off the input of the final ``norm``, so ``last_hidden_state``
    and ``pooler_output`` never contain them.
    """

    pixel_keyword = "pixel_values"
    attention_input = "norm1"

    def __init__(self, model: nn.Module, name: str | None = None, **options):
        if not all(hasattr(model, part) for part in ("embeddings", "rope_embeddings", "model", "norm")):
            raise UnsupportedModelError(f"Dinov3HookManager needs a transformers DINOv3ViTModel, got {type(model).__name__}")
        super().__init__(model, name, **options)

    def default_name(self) -> str:
        return f"hf:{getattr(self.model.config, '_name_or_path', '') or type(self.model).__name__}"

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(num_cls=1, num_trained_registers=self.model.config.num_register_tokens,
                           registers_after_prefix=True)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.model.model.layer

    @property
    def patch_embedding(self) -> nn.Module:
        return self.model.embeddings.patch_embeddings

    def mlp_output_projection(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp.down_proj

    def mlp_input_projection(self, layer: int) -> nn.Module:
        mlp = self.blocks[layer].mlp
        if hasattr(mlp, "gate_proj"):
            raise NotImplementedError("a gated MLP has no single input projection per neuron")
        return mlp.up_proj

    def mlp_input_rows(self, layer: int) -> tuple[tuple[nn.Module, int], ...]:
        mlp = self.blocks[layer].mlp
        if hasattr(mlp, "gate_proj"):   # the gated MLP of the larger DINOv3 models: act(gate) * up
            return ((mlp.gate_proj, 0), (mlp.up_proj, 0))
        return ((mlp.up_proj, 0),)

    def register_insertion_site(self) -> HookSite:
        return HookSite(self.model.embeddings, "output")

    def register_removal_site(self) -> HookSite:
        return HookSite(self.model.norm, "input")

    def attach_attention_probe(self, layer, fn, hooks) -> None:
        probe_eager_attention(self.model, self.blocks[layer].attention, fn, hooks)


register_transformers_model("DINOv3ViTModel", hook_manager=Dinov3HookManager)

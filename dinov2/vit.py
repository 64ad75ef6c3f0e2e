"""Hugging Face ``ViTModel`` (the original ViT, and checkpoints such as google/vit-base-patch16-224), for ``hf:`` specs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from test_time_registers.errors import UnsupportedModelError
from test_time_registers.hf import probe_eager_attention, register_transformers_model
from test_time_registers.hooks import HookManager, HookSite
from test_time_registers.layout import TokenLayout


class ViTHookManager(HookManager):
    """Sites of an unmodified transformers ``ViTModel``: [CLS][patches], pre-norm blocks, a final layernorm.

    Test-time registers are appended to the embeddings' output (after the positional embedding)
    and taken off the input of ``layernorm``, before the pooler. Attention is read from the eager
    path, switched on only while a capture is open.
    """

    pixel_keyword = "pixel_values"
    attention_input = "layernorm_before"

    def __init__(self, model: nn.Module, name: str | None = None, **options):
        self.vit = getattr(model, "vit", model)   # ViTForImageClassification wraps a ViTModel
        if not all(hasattr(self.vit, part) for part in ("embeddings", "layers", "layernorm")):
            raise UnsupportedModelError(f"ViTHookManager needs a transformers ViTModel, got {type(model).__name__}")
        super().__init__(model, name, **options)

    def default_name(self) -> str:
        return f"hf:{getattr(self.vit.config, '_name_or_path', '') or type(self.model).__name__}"

    layout = TokenLayout(num_cls=1)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.vit.layers

    @property
    def patch_embedding(self) -> nn.Module:
        return self.vit.embeddings.patch_embeddings.projection

    def mlp_output_projection(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp.fc2

    def mlp_input_projection(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp.fc1

    def register_insertion_site(self) -> HookSite:
        return HookSite(self.vit.embeddings, "output")

    def register_removal_site(self) -> HookSite:
        return HookSite(self.vit.layernorm, "input")

    def attach_attention_probe(self, layer, fn, hooks) -> None:
        probe_eager_attention(self.vit, self.blocks[layer].attention, fn, hooks)


register_transformers_model("ViTModel", "ViTForImageClassification", hook_manager=ViTHookManager)

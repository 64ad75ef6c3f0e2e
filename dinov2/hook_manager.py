"""DINOv2 from transformers (``Dinov2Model``, ``Dinov2WithRegistersModel``), described for the core."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from test_time_registers.errors import UnsupportedModelError
from test_time_registers.hf import probe_eager_attention
from test_time_registers.hooks import HookManager, Hooks, HookSite
from test_time_registers.layout import TokenLayout


#: The MLP output projection: fc2 (plain MLP), down_proj (SwiGLU, transformers 5) or weights_out
#: (SwiGLU, earlier transformers). Its input is the neuron activations in every case.
_OUTPUT_PROJECTIONS = ("fc2", "down_proj", "weights_out")


class Dinov2HookManager(HookManager):
    """Sites of an unmodified transformers DINOv2 model.

    Accepts ``Dinov2Model``, ``Dinov2WithRegistersModel`` and their ``...ForImageClassification``
    wrappers. Trained registers sit right after CLS and count as prefix tokens. Test-time
    registers are appended at the end of the embeddings' output (after the positional
    embedding, as in the reference implementation) and taken off the input of the final
    ``layernorm``, so ``last_hidden_state`` and ``pooler_output`` never contain them.
    Attention probabilities are read from the eager attention path, which is switched on only
    while a capture is open; otherwise the model keeps its fast attention.
    """

    pixel_keyword = "pixel_values"
    attention_input = "norm1"

    def __init__(self, model: nn.Module, name: str | None = None, **options):
        self.backbone = _backbone(model)
        super().__init__(model, name, **options)
        mlp = self.backbone.encoder.layer[0].mlp
        if not any(hasattr(mlp, name) for name in _OUTPUT_PROJECTIONS):
            raise UnsupportedModelError(f"unknown DINOv2 MLP {type(mlp).__name__}")

    def default_name(self) -> str:
        return f"dinov2:{getattr(self.model.config, '_name_or_path', '') or type(self.model).__name__}"

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(num_cls=1, num_trained_registers=getattr(self.backbone.config, "num_register_tokens", 0))

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.backbone.encoder.layer

    def mlp_output_projection(self, layer: int) -> nn.Module:
        mlp = self.blocks[layer].mlp
        return next(getattr(mlp, name) for name in _OUTPUT_PROJECTIONS if hasattr(mlp, name))

    def mlp_input_projection(self, layer: int) -> nn.Module:
        mlp = self.blocks[layer].mlp
        if not hasattr(mlp, "fc1"):
            raise NotImplementedError("a SwiGLU MLP has no single input projection per neuron")
        return mlp.fc1

    def register_insertion_site(self) -> HookSite:
        return HookSite(self.backbone.embeddings, "output")

    def register_removal_site(self) -> HookSite:
        return HookSite(self.backbone.layernorm, "input")

    @property
    def patch_embedding(self) -> nn.Module:
        return self.backbone.embeddings.patch_embeddings.projection

    def attach_attention_probe(self, layer: int, fn: Callable[[torch.Tensor], None], hooks: Hooks) -> None:
        probe_eager_attention(self.backbone, self.blocks[layer].attention, fn, hooks)


def _backbone(model: nn.Module) -> nn.Module:
    candidate = getattr(model, "dinov2", model)
    for name in ("embeddings", "encoder", "layernorm"):
        if not hasattr(candidate, name):
            raise UnsupportedModelError(
                f"Dinov2HookManager needs a transformers Dinov2Model or Dinov2WithRegistersModel, "
                f"got {type(model).__name__}")
    if not type(candidate).__name__.startswith("Dinov2"):
        raise UnsupportedModelError(f"Dinov2HookManager does not support {type(candidate).__name__}")
    return candidate

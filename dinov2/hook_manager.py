"""DINOv2 from transformers (``Dinov2Model``, ``Dinov2WithRegistersModel``), described for the core."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from shared.errors import UnsupportedModelError
from shared.hooks import HookManager, Hooks, HookSite
from shared.layout import TokenLayout


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

    def __init__(self, model: nn.Module, name: str | None = None):
        backbone = _backbone(model)
        super().__init__(model, name or f"dinov2:{getattr(model.config, '_name_or_path', '') or type(model).__name__}")
        self.backbone = backbone
        mlp = backbone.encoder.layer[0].mlp
        if not any(hasattr(mlp, name) for name in _OUTPUT_PROJECTIONS):
            raise UnsupportedModelError(f"unknown DINOv2 MLP {type(mlp).__name__}")

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
    def patch_size(self) -> tuple[int, int]:
        size = self.backbone.config.patch_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def forward_images(self, pixel_values: torch.Tensor):
        return self.model(pixel_values=pixel_values)

    def attach_attention_probe(self, layer: int, fn: Callable[[torch.Tensor], None], hooks: Hooks) -> None:
        probe_eager_attention(self.backbone.config, self.blocks[layer].attention, fn, hooks)


def probe_eager_attention(config, attention: nn.Module, fn: Callable[[torch.Tensor], None], hooks: Hooks) -> None:
    """Read attention probabilities from a transformers attention module returning ``(output, weights)``.

    Only the eager path computes the weights, so ``config._attn_implementation`` is set to
    ``"eager"`` while ``hooks`` is open and restored when it closes. Serves any transformers
    ViT built like DINOv2 (``ViTModel`` included).
    """
    previous = config._attn_implementation
    if previous != "eager":
        config._attn_implementation = "eager"   # the fast kernels return no probabilities
        hooks.on_exit(lambda: setattr(config, "_attn_implementation", previous))

    def read_weights(module, args, output):
        fn(output[1])  # [B, heads, L, L]

    hooks.keep(attention.register_forward_hook(read_weights))


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

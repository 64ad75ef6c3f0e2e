"""CLIP and SigLIP image towers from transformers (``CLIPVisionModel``, ``SiglipVisionModel`` and the
full ``CLIPModel``/``SiglipModel``), for ``hf:`` specs. No model code is copied."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from test_time_registers.errors import UnsupportedModelError
from test_time_registers.hf import probe_eager_attention, register_transformers_model
from test_time_registers.hooks import HookManager, HookSite
from test_time_registers.layout import TokenLayout


class _TransformersTower(HookManager):
    """What the transformers CLIP and SigLIP towers share: encoder layers with ``self_attn`` and ``mlp.fc1/fc2``."""

    pixel_keyword = "pixel_values"
    attention_input = "layer_norm1"

    def __init__(self, model: nn.Module, name: str | None = None, **options):
        self.tower = getattr(model, "vision_model", model)   # the full CLIPModel/SiglipModel hold the tower here
        if not all(hasattr(self.tower, part) for part in ("embeddings", "encoder", "post_layernorm")):
            raise UnsupportedModelError(f"{type(self).__name__} needs a transformers vision tower, "
                                        f"got {type(model).__name__}")
        super().__init__(model, name, **options)
        self.forward_methods = ("get_image_features",) if hasattr(model, "get_image_features") else ()

    def default_name(self) -> str:
        return f"hf:{getattr(self.model.config, '_name_or_path', '') or type(self.model).__name__}"

    @property
    def image_model(self) -> nn.Module:
        return self.tower

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.tower.encoder.layers

    @property
    def patch_embedding(self) -> nn.Module:
        return self.tower.embeddings.patch_embedding

    def mlp_output_projection(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp.fc2

    def mlp_input_projection(self, layer: int) -> nn.Module:
        return self.blocks[layer].mlp.fc1

    def attach_attention_probe(self, layer, fn, hooks) -> None:
        probe_eager_attention(self.model, self.blocks[layer].self_attn, fn, hooks)


class ClipVisionHookManager(_TransformersTower):
    """transformers' CLIP image tower: [CLS][patches]; ``pre_layrnorm``, the encoder, then the pooled CLS's
    ``post_layernorm``.

    Test-time registers go in at the input of ``pre_layrnorm`` (after the positional embedding)
    and come out at the encoder's output, so ``last_hidden_state`` and the pooled CLS never see them.
    """

    layout = TokenLayout(num_cls=1)

    def register_insertion_site(self) -> HookSite:
        return HookSite(self.tower.pre_layrnorm, "input")

    def register_removal_site(self) -> HookSite:
        return HookSite(self.tower.encoder, "output")


class SiglipVisionHookManager(_TransformersTower):
    """transformers' SigLIP image tower: patches only (no CLS), then ``post_layernorm`` and attention pooling.

    Test-time registers go in at the embeddings' output (after the positional embedding) and come
    out at the input of ``post_layernorm``, so neither the pooling head nor ``last_hidden_state``
    sees them.
    """

    layout = TokenLayout(num_cls=0)

    def register_insertion_site(self) -> HookSite:
        return HookSite(self.tower.embeddings, "output")

    def register_removal_site(self) -> HookSite:
        return HookSite(self.tower.post_layernorm, "input")


register_transformers_model("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel",
                            hook_manager=ClipVisionHookManager)
register_transformers_model("SiglipVisionModel", "SiglipModel", hook_manager=SiglipVisionHookManager)

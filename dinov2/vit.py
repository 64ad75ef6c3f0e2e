"""Hugging Face ``ViTModel`` (the original ViT, and checkpoints such as google/vit-base-patch16-224), for ``hf:`` specs."""

from __future__ import annotations

from dataclasses import replace

from test_time_registers.hooks import HookManager
from test_time_registers.layout import TokenLayout
from test_time_registers.registry import register_model

from .hook_manager import Dinov2HookManager


class ViTHookManager(HookManager):
    """Sites of an unmodified transformers ``ViTModel``: [CLS][patches], pre-norm blocks, a final layernorm.

    Test-time registers are appended to the embeddings' output (after the positional embedding)
    and taken off the input of ``layernorm``, before the pooler. Attention is read from the eager
    path, switched on only while a capture is open.
    """

    # DINOv2's sites, but for the blocks' names and the fixed [CLS][patches] layout.
    sites = replace(Dinov2HookManager.sites, blocks="layers", neurons="mlp.fc2", attention_input="layernorm_before",
                    layout=TokenLayout(num_cls=1))
    pixel_keyword = "pixel_values"

    def default_name(self) -> str:
        return f"hf:{getattr(self.root.config, '_name_or_path', '') or type(self.model).__name__}"


register_model("ViTModel", hook_manager=ViTHookManager)
register_model("ViTForImageClassification", inside="vit")

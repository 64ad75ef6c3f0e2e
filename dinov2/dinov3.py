"""DINOv3 from transformers (``DINOv3ViTModel``), for ``hf:`` specs: rotary positions and 4 trained registers."""

from __future__ import annotations

from test_time_registers.hooks import HookManager
from test_time_registers.layout import TokenLayout
from test_time_registers.registry import register_model
from test_time_registers.sites import At, EagerAttention, SeparateProjections, Sites

from .hook_manager import _gated_or_plain


class Dinov3HookManager(HookManager):
    """Sites of an unmodified transformers ``DINOv3ViTModel``: [CLS][registers][patches], rotary positions.

    DINOv3 applies its rotary embedding to the last ``num_patches`` tokens of the sequence and
    none to the tokens before them. Test-time registers therefore go *after the trained
    registers and before the patches* (``registers_after_prefix``): like CLS and the trained
    registers they get no rotary position, and every patch keeps its own. They are inserted at
    the embeddings' output and taken off the input of the final ``norm``, so ``last_hidden_state``
    and ``pooler_output`` never contain them. The larger models' MLP is gated (``gate_proj``).
    """

    sites = Sites(
        blocks="model.layer",
        neurons="mlp.down_proj",
        mlp_inputs=_gated_or_plain,
        patch_embedding="embeddings.patch_embeddings",
        insert=At("embeddings", "output"),
        remove=At("norm", "input"),
        attention=EagerAttention("attention"),
        attention_input="norm1",
        projections=SeparateProjections(),
        layout=lambda model: TokenLayout(num_cls=1, num_trained_registers=model.config.num_register_tokens,
                                         registers_after_prefix=True),
    )
    pixel_keyword = "pixel_values"

    def default_name(self) -> str:
        return f"hf:{getattr(self.root.config, '_name_or_path', '') or type(self.model).__name__}"


register_model("DINOv3ViTModel", hook_manager=Dinov3HookManager)

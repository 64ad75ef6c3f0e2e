"""DINOv2 from transformers (``Dinov2Model``, ``Dinov2WithRegistersModel`` and their classifiers), declared for the core."""

from __future__ import annotations

from torch import nn

from test_time_registers.hooks import HookManager
from test_time_registers.layout import TokenLayout
from test_time_registers.registry import register_model
from test_time_registers.sites import At, EagerAttention, SeparateProjections, Sites


class Dinov2HookManager(HookManager):
    """Sites of an unmodified transformers DINOv2 model.

    Accepts ``Dinov2Model``, ``Dinov2WithRegistersModel`` and their ``...ForImageClassification``
    wrappers. Trained registers sit right after CLS and count as prefix tokens. Test-time
    registers are appended at the end of the embeddings' output (after the positional
    embedding, as in the reference implementation) and taken off the input of the final
    ``layernorm``, so ``last_hidden_state`` and ``pooler_output`` never contain them.
    Attention probabilities are read from the eager attention path, which is switched on only
    while a capture is open; otherwise the model keeps its fast attention.

    The MLP output projection is ``fc2`` (plain MLP), ``down_proj`` (SwiGLU, transformers 5) or
    ``weights_out`` (SwiGLU, earlier transformers); its input is the neuron activations in every case.
    """

    sites = Sites(
        blocks="encoder.layer",
        neurons=("mlp.fc2", "mlp.down_proj", "mlp.weights_out"),
        mlp_inputs=(("mlp.fc1", 0),),
        patch_embedding="embeddings.patch_embeddings.projection",
        insert=At("embeddings", "output"),
        remove=At("layernorm", "input"),
        attention=EagerAttention("attention"),
        attention_input="norm1",
        projections=SeparateProjections(),
        layout=lambda model: TokenLayout(num_cls=1,
                                         num_trained_registers=getattr(model.config, "num_register_tokens", 0)),
    )
    pixel_keyword = "pixel_values"

    def default_name(self) -> str:
        return f"dinov2:{getattr(self.root.config, '_name_or_path', '') or type(self.model).__name__}"


def _gated_or_plain(block: nn.Module) -> tuple[tuple[str, int], ...]:
    """A gated MLP, act(gate) * up, feeds its neurons from two rows; a plain one from ``up_proj``."""
    return (("mlp.gate_proj", 0), ("mlp.up_proj", 0)) if hasattr(block.mlp, "gate_proj") else (("mlp.up_proj", 0),)


register_model("Dinov2Model", "Dinov2WithRegistersModel", hook_manager=Dinov2HookManager)
register_model("Dinov2ForImageClassification", inside="dinov2")
register_model("Dinov2WithRegistersForImageClassification", inside="dinov2_with_registers")

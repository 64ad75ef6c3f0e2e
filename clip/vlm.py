"""Vision-language models from transformers whose image tower is a CLIP or SigLIP tower: declared as wrappers.

A vision-language model is described by its tower's own declaration (blocks, MLP sites,
attention: :mod:`.hf_towers`); the wrapper adds what the language model reads. The tower is found
by its config (the outermost submodule whose config is the model's ``vision_config``), the blocks
the language model reads come from ``vision_feature_layer(s)`` (or the last block, for models that
read ``last_hidden_state``), and ``generate`` and ``get_image_features`` run under the intervention.
Test-time registers come out at the tower's output and from every hidden state it returns, before
any projector, pooling, pixel shuffle or tile packing; crops and tiles are batch elements of the
tower, so each gets its own register.

Families whose towers pack every image of a call into one sequence, or put CLS last, are refused
with the reason.
"""

from __future__ import annotations

from test_time_registers.hf import language_model_reads, vision_tower_path
from test_time_registers.registry import register_model

#: Vision-language models (and their head-less ``...Model``) whose tower the library describes.
WRAPPED = (
    "LlavaForConditionalGeneration", "LlavaModel",                        # LLaVA 1.5, xtuner LLaVA-Llama-3
    "VipLlavaForConditionalGeneration", "VipLlavaModel",                  # several read layers, concatenated
    "LlavaNextForConditionalGeneration", "LlavaNextModel",                # anyres tiles: crops in the tower batch
    "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel",      # SigLIP, anyres_max_9, video frames
    "PaliGemmaForConditionalGeneration", "PaliGemmaModel",                # SigLIP's last_hidden_state
    "Gemma3ForConditionalGeneration", "Gemma3Model",                      # SigLIP, then 4x4 average pooling
    "AyaVisionForConditionalGeneration", "AyaVisionModel",                # SigLIP, then pixel shuffle
)

register_model(*WRAPPED, inside=vision_tower_path, run_inside=True,
               forward_methods=("generate", "get_image_features"), reads=language_model_reads)

_PACKED = ("its tower packs every image and frame of a call into one sequence (cu_seqlens, windows, a patch "
           "merger over 2x2 groups), which has no place for a per-image register")
for family, reason in {
    ("Qwen2VLForConditionalGeneration", "Qwen2VLModel", "Qwen2VisionTransformerPretrainedModel"): _PACKED,
    ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel", "Qwen2_5_VisionTransformerPretrainedModel"):
        _PACKED + ", and attends within windows",
    ("Qwen3VLForConditionalGeneration", "Qwen3VLModel", "Qwen3VLVisionModel"):
        _PACKED + ", and feeds intermediate blocks to the language model through their own mergers (deepstack)",
    ("Mistral3ForConditionalGeneration", "Mistral3Model", "PixtralVisionModel"):
        "Pixtral puts all images of a call in one sequence with a block-diagonal mask, which has no place for a "
        "per-image register",
    ("Llama4ForConditionalGeneration", "Llama4VisionModel"):
        "its tower appends CLS last and drops the last token, which would drop a register appended after the patches",
    ("MllamaForConditionalGeneration", "MllamaModel", "MllamaVisionModel"):
        "its tower pads each tile's sequence to a multiple of 8 and adds a gated global encoder over tiles",
    ("Gemma4ForConditionalGeneration", "Gemma4Model"):
        "its vision model (patch positions, 2-D rotary embedding, a position-aware pooler) is not a plain ViT",
}.items():
    register_model(*family, unsupported=reason)

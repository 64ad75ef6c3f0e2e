"""Tiny vision-language models built from configs (random weights, offline), with CLIP or SigLIP towers."""

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaNextConfig, LlavaNextForConditionalGeneration, PaliGemmaConfig,
                          PaliGemmaForConditionalGeneration, SiglipVisionConfig, VipLlavaConfig,
                          VipLlavaForConditionalGeneration)

IMAGE, PATCH, LAYERS = 32, 8, 4
GRID = (IMAGE // PATCH) ** 2           # 16 patches
IMAGE_TOKEN = 99


def clip_tower() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
                            image_size=IMAGE, patch_size=PATCH, projection_dim=32)


def siglip_tower() -> SiglipVisionConfig:
    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
                              image_size=IMAGE, patch_size=PATCH, vision_use_head=False)


def text() -> LlamaConfig:
    return LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=100)


def image_tokens(strategy: str = "default") -> int:
    return GRID + (strategy == "full")


def llava(layer=-2, strategy="default", seed=0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=clip_tower(), text_config=text(), image_token_index=IMAGE_TOKEN,
                         image_seq_length=image_tokens(strategy), vision_feature_layer=layer,
                         vision_feature_select_strategy=strategy)
    return LlavaForConditionalGeneration(config).eval()


def vip_llava(seed=0) -> VipLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = VipLlavaConfig(vision_config=clip_tower(), text_config=text(), image_token_index=IMAGE_TOKEN,
                            image_seq_length=GRID, vision_feature_layers=[-2, -3, 1])
    return VipLlavaForConditionalGeneration(config).eval()


def llava_next(seed=0) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaNextConfig(vision_config=clip_tower(), text_config=text(), image_token_index=IMAGE_TOKEN,
                             image_grid_pinpoints=[[IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE]], vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    return LlavaNextForConditionalGeneration(config).eval()


def paligemma(seed=0) -> PaliGemmaForConditionalGeneration:
    from transformers import GemmaConfig

    torch.manual_seed(seed)
    config = PaliGemmaConfig(vision_config=siglip_tower(),
                             text_config=GemmaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                     num_attention_heads=2, num_key_value_heads=1, head_dim=24,
                                                     vocab_size=100),
                             image_token_index=IMAGE_TOKEN, projection_dim=48)
    config.vision_config.projection_dim = 48
    return PaliGemmaForConditionalGeneration(config).eval()


def prompt(tokens: int, batch: int = 1, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``: ``pad`` left-padding tokens, 2 text tokens, the image tokens, 2 more."""
    row = [0] * pad + [1, 2] + [IMAGE_TOKEN] * tokens + [3, 4]
    ids = torch.tensor([row] * batch)
    mask = torch.tensor([[0] * pad + [1] * (len(row) - pad)] * batch)
    return ids, mask

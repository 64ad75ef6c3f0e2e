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


def onevision(seed=0):
    """LLaVA-OneVision: a SigLIP tower read at -1 (pre-norm) with the 'full' strategy; one tile plus the base view."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(vision_config=siglip_tower(), text_config=text(), image_token_index=IMAGE_TOKEN,
                                  image_grid_pinpoints=[[IMAGE, IMAGE]], vision_feature_layer=-1,
                                  vision_feature_select_strategy="full")
    return LlavaOnevisionForConditionalGeneration(config).eval()


def gemma3(seed=0):
    """Gemma 3: SigLIP's last_hidden_state, average-pooled to mm_tokens_per_image (4 here) before the projector."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig

    torch.manual_seed(seed)
    language = Gemma3TextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=24, vocab_size=100)
    config = Gemma3Config(vision_config=siglip_tower(), text_config=language, image_token_index=IMAGE_TOKEN,
                          mm_tokens_per_image=4)
    return Gemma3ForConditionalGeneration(config).eval()


def aya_vision(seed=0):
    """Aya Vision: a SigLIP tower read at -1 (pre-norm), then a 2x2 pixel shuffle before the projector."""
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, CohereConfig

    torch.manual_seed(seed)
    language = CohereConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = AyaVisionConfig(vision_config=siglip_tower(), text_config=language, image_token_index=IMAGE_TOKEN,
                             downsample_factor=2, vision_feature_layer=-1)
    return AyaVisionForConditionalGeneration(config).eval()


def planted(model, layer=1):
    """The model's hook manager, with 3 register neurons planted in block ``layer`` of its tower."""
    from test_time_registers import hook_manager_for
    from test_time_registers.planting import marker_images, plant_register_neurons

    hook_manager = hook_manager_for(model)
    return hook_manager, plant_register_neurons(hook_manager, marker_images(24, IMAGE, PATCH, seed=0), layer=layer,
                                                count=3)


def generate_seeing_the_projector(modified, model, ids, mask, pixels, new_tokens=3):
    """``modified.generate`` greedily, and the shapes of what the model's projector received."""
    seen = []
    handle = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    try:
        generated = modified.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                      max_new_tokens=new_tokens, do_sample=False)
    finally:
        handle.remove()
    return generated, seen


def marker_files(folder, count, seed):
    """marker_images as PNG files in ``folder`` (undoing their ImageNet normalisation)."""
    import numpy as np
    from PIL import Image

    from test_time_registers.data.sources import IMAGENET_MEAN, IMAGENET_STD
    from test_time_registers.planting import marker_images

    folder.mkdir()
    pixels = marker_images(count, IMAGE, PATCH, seed=seed).pixel_values
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for index, image in enumerate(pixels):
        array = ((image * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(array)).save(folder / f"marked_{index:02d}.png")
    return folder

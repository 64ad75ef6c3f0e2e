"""Tiny, real models of every supported architecture, for tests.

Each uses its library's own classes with a small config. Like trained ViTs, and unlike
freshly initialised ones, their tokens carry a positional embedding about twice as strong as the patch content. That
keeps patch norms within a factor of about 1.5 of each other, so planted outliers are the only
outliers, while content still decides which patches are markers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import open_clip
import timm
import torch
from transformers import (CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                          Dinov2WithRegistersModel, DINOv3ViTConfig, DINOv3ViTModel, Siglip2VisionConfig,
                          Siglip2VisionModel, SiglipVisionConfig, SiglipVisionModel, ViTConfig, ViTModel)

from test_time_registers.clip import (ClipHookManager, ClipVisionHookManager, Siglip2VisionHookManager,
                                      SiglipVisionHookManager)
from test_time_registers.deit import BeitHookManager, DeitHookManager, EvaHookManager
from test_time_registers.dinov2 import Dinov2HookManager, Dinov3HookManager, ViTHookManager
from test_time_registers.hooks import HookManager
from test_time_registers.registry import hook_manager_for

IMAGE_SIZE = 64
WIDTH = 64
LAYERS = 4
DINOV2 = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=2, mlp_ratio=4, patch_size=8,
              image_size=IMAGE_SIZE)
TIMM = dict(pretrained=False, img_size=IMAGE_SIZE, patch_size=8, embed_dim=WIDTH, depth=LAYERS, num_heads=2)
CLIP_VISION = dict(image_size=IMAGE_SIZE, patch_size=16, width=WIDTH, layers=LAYERS, head_width=32, mlp_ratio=4)
CLIP_TEXT = dict(context_length=8, vocab_size=100, width=32, heads=1, layers=1)


@dataclass
class Architecture:
    name: str
    build: Callable[[], torch.nn.Module]
    hook_manager: Callable[[torch.nn.Module], HookManager]
    num_cls: int
    num_trained_registers: int


def _dominant_positions(position_embedding: torch.Tensor, patch_projection: torch.nn.Conv2d,
                        generator: torch.Generator) -> None:
    """Positional embeddings of norm ~4 per token, and patch content of norm ~2 for unit-variance pixels."""
    weight = patch_projection.weight
    fan_in, width = weight[0].numel(), weight.shape[0]
    with torch.no_grad():
        position_embedding.copy_(0.5 * torch.randn(position_embedding.shape, generator=generator))
        weight.copy_(2 / (fan_in * width) ** 0.5 * torch.randn(weight.shape, generator=generator))


def clip_config(layers: int = LAYERS) -> dict:
    """An open_clip model config (as in open_clip's JSON files) for a tiny CLIP."""
    return {"embed_dim": 32, "vision_cfg": {**CLIP_VISION, "layers": layers}, "text_cfg": CLIP_TEXT}


def clip_model(seed: int = 0, layers: int = LAYERS) -> open_clip.CLIP:
    """A real open_clip CLIP; its image tower has ``layers`` blocks and 16 patches at 64 px."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return open_clip.CLIP(**clip_config(layers)).eval()


def hook_count(model: torch.nn.Module) -> int:
    """Forward and forward-pre hooks on all of a model's modules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def dinov2_model(seed: int = 0, registers: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if registers:
            model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **DINOV2))
        else:
            model = Dinov2Model(Dinov2Config(**DINOV2))
    embeddings = model.embeddings
    _dominant_positions(embeddings.position_embeddings, embeddings.patch_embeddings.projection,
                        torch.Generator().manual_seed(seed))
    if registers:
        with torch.no_grad():
            embeddings.register_tokens.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return model.eval()


def timm_model(name: str = "deit3_small_patch16_224", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny timm model with dominant positions: its positional embedding, or without one (BEiT and
    the relative-position ViTs) the bias of the last convolution before the tokens."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = timm.create_model(name, **{**TIMM, **overrides})
    projection = [module for module in model.patch_embed.modules() if isinstance(module, torch.nn.Conv2d)][-1]
    positions = model.pos_embed if getattr(model, "pos_embed", None) is not None else projection.bias
    _dominant_positions(positions, projection, torch.Generator().manual_seed(seed))
    return model.eval()


def vitamin_overrides() -> dict:
    """A tiny ViTamin: a two-stage convolutional stem of stride 16 (no patch projection) and GeGLU MLPs."""
    from timm.models.vitamin import VitCfg, VitConvCfg

    stem = VitCfg(embed_dim=(16, 32, WIDTH), depths=(1, 1, 1), stem_width=16,
                  conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6), head_type="1d")
    return dict(patch_size=1, embed_cfg=stem)


HF_TOWER = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=2,
                image_size=IMAGE_SIZE, patch_size=8)


def hf_tower(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny transformers CLIP, SigLIP or SigLIP 2 image tower, or ViTModel, with dominant positions."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "clip":
            model = CLIPVisionModel(CLIPVisionConfig(**HF_TOWER))
        elif kind == "siglip":
            model = SiglipVisionModel(SiglipVisionConfig(**HF_TOWER))
        elif kind == "siglip2":   # positions for an 8 x 8 grid, resized by the model to each image's grid
            config = {key: value for key, value in HF_TOWER.items() if key != "image_size"}
            model = Siglip2VisionModel(Siglip2VisionConfig(**config, num_patches=(IMAGE_SIZE // 8) ** 2))
        else:
            model = ViTModel(ViTConfig(**HF_TOWER), add_pooling_layer=False)
    embeddings = model.embeddings
    if kind == "vit":
        positions, projection = embeddings.position_embeddings, embeddings.patch_embeddings.projection
    else:
        positions, projection = embeddings.position_embedding.weight, embeddings.patch_embedding
    _dominant_positions(positions, projection, torch.Generator().manual_seed(seed))
    return model.eval()


def dinov3_model(seed: int = 0, gated: bool = False) -> torch.nn.Module:
    """A tiny transformers DINOv3 (rotary positions, 4 trained registers; a gated MLP if asked)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DINOv3ViTModel(DINOv3ViTConfig(**HF_TOWER, num_register_tokens=4, use_gated_mlp=gated))
        with torch.no_grad():
            model.embeddings.register_tokens.normal_()
    # Rotary positions add nothing to the tokens: the patch embedding's bias plays the dominant part.
    projection = model.embeddings.patch_embeddings
    _dominant_positions(projection.bias, projection, torch.Generator().manual_seed(seed))
    return model.eval()


def clip_with_timm_trunk(trunk_name: str, seed: int = 0, **overrides) -> open_clip.CLIP:
    """A real open_clip CLIP whose image tower is a ``TimmModel`` around a tiny timm ViT trunk."""
    vision = {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
              "timm_proj": "linear", "image_size": IMAGE_SIZE}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=CLIP_TEXT)
        trunk = timm_model(trunk_name, seed=seed, **overrides)
        trunk.reset_classifier(0)                       # the tower's own projection follows
        model.visual.trunk = trunk
        model.visual.head.proj = torch.nn.Linear(trunk.num_features, 32, bias=False)
    return model.eval()


ARCHITECTURES = [
    Architecture("openclip", clip_model, ClipHookManager, 1, 0),
    Architecture("dinov2", dinov2_model, Dinov2HookManager, 1, 0),
    Architecture("dinov2-registers", lambda: dinov2_model(registers=4), Dinov2HookManager, 1, 4),
    Architecture("deit3", timm_model, DeitHookManager, 1, 0),
    Architecture("timm-reg4-no-embed-class",
                 lambda: timm_model("vit_small_patch16_224", reg_tokens=4, no_embed_class=True, global_pool="avg"),
                 DeitHookManager, 1, 4),
    Architecture("openclip-timm-trunk", lambda: clip_with_timm_trunk("vit_small_patch16_224"), hook_manager_for, 1, 0),
    Architecture("openclip-siglip-trunk", lambda: clip_with_timm_trunk("vit_base_patch16_siglip_224"), hook_manager_for, 0, 0),
    Architecture("openclip-eva-trunk", lambda: clip_with_timm_trunk("eva02_tiny_patch14_224"), hook_manager_for, 1, 0),
    Architecture("openclip-vitamin-trunk", lambda: clip_with_timm_trunk("vitamin_small_224", **vitamin_overrides()), hook_manager_for, 0, 0),
    Architecture("openclip-relpos-trunk",
                 lambda: clip_with_timm_trunk("vit_relpos_medium_patch16_cls_224", rel_pos_dim=32), hook_manager_for, 1, 0),
    Architecture("timm-eva02", lambda: timm_model("eva02_tiny_patch14_224"), EvaHookManager, 1, 0),
    Architecture("timm-beit", lambda: timm_model("beit_base_patch16_224"), BeitHookManager, 1, 0),
    Architecture("timm-beit-shared-bias", lambda: timm_model("beit_base_patch16_224", use_rel_pos_bias=False,
                                                             use_shared_rel_pos_bias=True), BeitHookManager, 1, 0),
    Architecture("hf-clip", lambda: hf_tower("clip"), ClipVisionHookManager, 1, 0),
    Architecture("hf-siglip", lambda: hf_tower("siglip"), SiglipVisionHookManager, 0, 0),
    Architecture("hf-siglip2", lambda: hf_tower("siglip2"), Siglip2VisionHookManager, 0, 0),
    Architecture("hf-vit", lambda: hf_tower("vit"), ViTHookManager, 1, 0),
    Architecture("hf-dinov3", dinov3_model, Dinov3HookManager, 1, 4),
    Architecture("hf-dinov3-gated-mlp", lambda: dinov3_model(gated=True), Dinov3HookManager, 1, 4),
]

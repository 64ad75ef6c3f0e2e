"""Helpers for models from Hugging Face transformers, for any architecture package that wraps one."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .hooks import Hooks


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

"""Helpers for models from Hugging Face transformers, for any architecture package that wraps one."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .hooks import Hooks


def probe_eager_attention(model: nn.Module, attention: nn.Module, fn: Callable[[torch.Tensor], None],
                          hooks: Hooks) -> None:
    """Read attention probabilities from a transformers attention module returning ``(output, weights)``.

    Only the eager path computes the weights, so the model is switched to it with transformers'
    public ``set_attn_implementation("eager")`` while ``hooks`` is open, and switched back when
    it closes. Serves any transformers ViT built like DINOv2 (``ViTModel`` included).

    The switch is model-wide: while a capture is open, other threads running the same model
    also run eager attention (same results, slower). Captures are not thread-safe: do not open
    two on one model from different threads.

    Args:
        model: the ``PreTrainedModel`` that holds ``attention``.
        attention: the attention module whose output is ``(output, weights [B, heads, L, L])``.
    """
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")   # the fast kernels return no probabilities
        hooks.on_exit(lambda: model.set_attn_implementation(previous))

    def read_weights(module, args, output):
        fn(output[1])  # [B, heads, L, L]

    hooks.keep(attention.register_forward_hook(read_weights))

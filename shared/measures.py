"""What the library measures on tokens and attention, written once: pure tensor functions.

Every function takes captured tensors and the :class:`~test_time_registers.layout.TokenLayout`
that says which positions are which, and returns a new tensor; none runs a model. Norms are
computed in float32 (whatever the model's dtype), so bf16 and fp16 runs measure alike.

Shapes: ``tokens`` is a block output [B, L, D]; ``attention`` is [B, heads, L, L] (rows attend to
columns); P is the number of patches and R the number of test-time registers.
"""

from __future__ import annotations

import torch

from .layout import TokenLayout


def token_norms(tokens: torch.Tensor) -> torch.Tensor:
    """The norm of every token, in float32: [B, L, D] -> [B, L]."""
    return torch.linalg.vector_norm(tokens.float(), dim=-1)


def patch_norms(tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The norms of the patch tokens: [B, L, D] -> [B, P]."""
    return token_norms(tokens[:, layout.patches(tokens.shape[1])])


def register_norms(tokens: torch.Tensor, layout: TokenLayout, *, trained: bool = False) -> torch.Tensor:
    """The norms of the test-time registers [B, L, D] -> [B, R] (with ``trained``, of the trained
    registers instead: [B, num_trained_registers]). Empty along the last axis when there are none."""
    positions = layout.trained_registers() if trained else layout.test_time_registers(tokens.shape[1])
    return token_norms(tokens[:, positions])


def cls_norms(tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The norm of the (first) CLS token: [B, L, D] -> [B]. The layout must have a CLS token."""
    return token_norms(tokens[:, layout.cls().start])


def max_over_median(norms: torch.Tensor) -> torch.Tensor:
    """Each image's largest patch norm over its median one: [B, P] -> [B] (far above 1: outliers)."""
    return norms.amax(dim=1) / norms.median(dim=1).values


def cls_row(attention: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Where the (first) CLS token looks: [B, heads, L, L] -> [B, heads, L], in the attention's dtype.

    Works on any leading axes: [..., L, L] -> [..., L]. The layout must have a CLS token.
    """
    return attention[..., layout.cls().start, :]


def cls_patch_attention(attention: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The CLS row over the patches alone: [B, heads, L, L] -> [B, heads, P] (any leading axes)."""
    return cls_row(attention, layout)[..., layout.patches(attention.shape[-1])]

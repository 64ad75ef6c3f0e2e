"""Precisions a model can run in, by the names open_clip uses, for every architecture."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import InvalidArgumentError


@dataclass(frozen=True)
class Precision:
    """How a model's weights are stored and how it runs.

    ``weights`` is the dtype of the matrix weights. ``mixed`` precisions keep what the model's
    library keeps in float32 (open_clip: norms, class and positional embeddings); libraries
    without such a mode cast everything. ``autocast`` runs the float32 model under
    ``torch.autocast`` in that dtype.
    """

    name: str
    weights: torch.dtype
    mixed: bool = False
    autocast: torch.dtype | None = None
    description: str = ""


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", torch.float32, description="float32 weights and activations"),
    Precision("bf16", torch.bfloat16, mixed=True,
              description="bfloat16 matrix weights (open_clip keeps norms and embeddings in float32)"),
    Precision("fp16", torch.float16, mixed=True,
              description="float16 matrix weights (open_clip keeps norms and embeddings in float32)"),
    Precision("pure_bf16", torch.bfloat16, description="every weight in bfloat16"),
    Precision("pure_fp16", torch.float16, description="every weight in float16"),
    Precision("amp_bf16", torch.float32, autocast=torch.bfloat16,
              description="float32 weights, run under torch.autocast in bfloat16"),
)}


def get_precision(precision: str | Precision) -> Precision:
    """The :class:`Precision` of a name in :data:`PRECISIONS`."""
    if isinstance(precision, Precision):
        return precision
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def cast_model(model: nn.Module, precision: str | Precision, device: torch.device | str = "cpu") -> nn.Module:
    """Move a model to ``device`` and cast its weights for ``precision``, for libraries with no
    mixed mode of their own (transformers, timm): ``bf16`` and ``pure_bf16`` both cast every weight."""
    return model.to(device=device, dtype=get_precision(precision).weights)

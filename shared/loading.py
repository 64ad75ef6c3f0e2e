"""What every architecture's loader returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .hooks import HookManager


@dataclass
class LoadedModel:
    """A model in eval mode, its image preprocessing, and its hook manager."""

    model: nn.Module
    preprocess: Callable
    hook_manager: HookManager

    def __iter__(self):
        return iter((self.model, self.preprocess, self.hook_manager))


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__

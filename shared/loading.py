"""What every architecture's loader returns."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image
from torch import nn

if TYPE_CHECKING:
    from .hooks import HookManager


@dataclass
class LoadedModel:
    """A model in eval mode, its image preprocessing, and its hook manager.

    Unpacks as ``model, preprocess, hook_manager``. A synthetic model (the offline demo) also
    says which neurons were planted in it and can generate images for itself.
    """

    model: nn.Module
    preprocess: Callable
    hook_manager: HookManager
    #: True for a model with planted, not learned, register neurons.
    synthetic: bool = False
    #: The planted (layer, neuron) pairs of a synthetic model.
    planted: list[tuple[int, int]] | None = None
    #: ``generate_images(count, seed)`` -> PIL images, made one at a time as they are iterated, for
    #: models that come with their own scenes.
    generate_images: Callable[[int, int], Iterable[Image.Image]] | None = None
    #: For models with a text tower (CLIP): ``tokenizer()`` makes the tokenizer their text tower
    #: reads (it may need files from the hub), for zero-shot classification.
    tokenizer: Callable[[], Callable] | None = None

    def __iter__(self):
        return iter((self.model, self.preprocess, self.hook_manager))

"""DINOv2 support, through the unmodified transformers package."""

from .hook_manager import Dinov2HookManager
from .loader import load_dinov2
from .presets import PRESETS, load_preset

__all__ = ["Dinov2HookManager", "load_dinov2", "PRESETS", "load_preset"]

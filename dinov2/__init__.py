"""DINOv2 support, through the unmodified transformers package."""

from .hook_manager import Dinov2HookManager
from .loader import DINOV2_VITL14, load_dinov2
from .dinov3 import Dinov3HookManager
from .vit import ViTHookManager

__all__ = ["DINOV2_VITL14", "Dinov2HookManager", "Dinov3HookManager", "ViTHookManager", "load_dinov2"]

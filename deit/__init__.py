"""DeiT-III and other timm Vision Transformers, through the unmodified timm package (specs ``timm:``, ``deit:``)."""

from .hook_manager import DeitHookManager
from .loader import load_timm

__all__ = ["DeitHookManager", "load_timm"]

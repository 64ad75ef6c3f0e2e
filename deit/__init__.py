"""DeiT-III and other timm Vision Transformers, through the unmodified timm package (specs ``timm:``, ``deit:``)."""

from .hook_manager import BeitHookManager, DeitHookManager, EvaHookManager, RelPosHookManager
from .loader import load_timm

__all__ = ["BeitHookManager", "DeitHookManager", "EvaHookManager", "RelPosHookManager", "load_timm"]

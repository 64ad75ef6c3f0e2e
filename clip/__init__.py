"""OpenCLIP support, through the unmodified open_clip package."""

from .hook_manager import ClipHookManager
from .loader import load_openclip

__all__ = ["ClipHookManager", "load_openclip"]

"""OpenCLIP support, through the unmodified open_clip package (specs ``openclip:`` and ``demo``)."""

from .hf_towers import ClipVisionHookManager, Siglip2VisionHookManager, SiglipVisionHookManager
from .hook_manager import ClipHookManager, ClipTimmHookManager
from .loader import load_openclip, set_precision

__all__ = ["ClipHookManager", "ClipTimmHookManager", "ClipVisionHookManager", "Siglip2VisionHookManager", "SiglipVisionHookManager", "load_openclip", "set_precision"]

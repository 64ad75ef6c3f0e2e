"""OpenCLIP support, through the unmodified open_clip package (specs ``openclip:`` and ``demo``), and the
CLIP, SigLIP and SigLIP 2 towers of transformers (``hf:``), alone or inside a vision-language model."""

from .hf_towers import ClipVisionHookManager, Siglip2VisionHookManager, SiglipVisionHookManager
from .hook_manager import ClipHookManager
from .loader import load_openclip, set_precision
from . import vlm  # noqa: F401 - registers the vision-language models whose towers are CLIP or SigLIP
from .vlm_towers import Idefics3VisionHookManager, InternVLVisionHookManager  # also registers their VLMs

__all__ = ["ClipHookManager", "ClipVisionHookManager", "Idefics3VisionHookManager", "InternVLVisionHookManager",
           "Siglip2VisionHookManager", "SiglipVisionHookManager", "load_openclip", "set_precision"]

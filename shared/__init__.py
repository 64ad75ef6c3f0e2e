"""Architecture-agnostic core of test-time-registers."""

from .discovery import auto_threshold, find_register_neurons
from .errors import (ImageSourceError, IncompatibleNeuronsError, ModelLoadError, NeuronFileError,
                     NonFiniteActivationsError, NoOutliersError, TestTimeRegistersError,
                     UnsupportedModelError)
from .hooks import Capture, HookManager, Hooks, HookSite, StopForward
from .images import ImageFolder
from .intervention import ModifiedModel, legacy_edit, paper_edit
from .layout import TokenLayout
from .loading import LoadedModel
from .neurons import RegisterNeuron, RegisterNeurons

__all__ = [
    "Capture", "HookManager", "HookSite", "Hooks", "ImageFolder", "ImageSourceError",
    "IncompatibleNeuronsError", "LoadedModel", "ModelLoadError", "ModifiedModel", "NeuronFileError",
    "NonFiniteActivationsError", "NoOutliersError", "RegisterNeuron", "RegisterNeurons", "StopForward", "TestTimeRegistersError",
    "TokenLayout", "UnsupportedModelError", "auto_threshold", "find_register_neurons", "legacy_edit",
    "paper_edit",
]

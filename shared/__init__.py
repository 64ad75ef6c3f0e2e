"""Architecture-agnostic core of test-time-registers."""

from .discovery import auto_threshold, check_discovery_arguments, find_register_neurons
from .errors import (ImageSourceError, IncompatibleNeuronsError, InvalidArgumentError, ModelLoadError, NeuronFileError,
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
    "IncompatibleNeuronsError", "InvalidArgumentError", "LoadedModel", "ModelLoadError", "ModifiedModel", "NeuronFileError",
    "NonFiniteActivationsError", "NoOutliersError", "RegisterNeuron", "RegisterNeurons", "StopForward", "TestTimeRegistersError",
    "TokenLayout", "UnsupportedModelError", "auto_threshold", "check_discovery_arguments", "find_register_neurons", "legacy_edit",
    "paper_edit",
]

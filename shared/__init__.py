"""test-time-registers: remove the high-norm outlier tokens of pretrained ViTs at inference time.

This package is the architecture-agnostic core; ``test_time_registers.clip``,
``test_time_registers.dinov2`` and ``test_time_registers.deit`` describe OpenCLIP, DINOv2 and
timm ViTs and register their model specs.
"""

__version__ = "0.2.0"

from .discovery import (DiscoveryStatistics, auto_threshold, check_discovery_arguments, find_register_neurons,  # noqa: E402
                        gather_statistics)
from .errors import (ImageSourceError, IncompatibleNeuronsError, InvalidArgumentError, ModelLoadError,  # noqa: E402
                     NeuronFileError, NonFiniteActivationsError, NoOutliersError, TestTimeRegistersError,
                     UnsupportedModelError)
from .hooks import Capture, HookManager, Hooks, HookSite, StopForward  # noqa: E402
from .images import ImageFolder  # noqa: E402
from .intervention import Edit, EditContext, LegacyEdit, ModifiedModel, PaperEdit, legacy_edit, paper_edit  # noqa: E402
from .layout import TokenLayout  # noqa: E402
from .loading import LoadedModel  # noqa: E402
from .neurons import RegisterNeuron, RegisterNeurons  # noqa: E402
from .precision import PRECISIONS, Precision  # noqa: E402
from .registry import (Architecture, Preset, architectures, load_model, load_neurons, load_preset,  # noqa: E402
                       register_architecture)
from .trained_registers import (LearnableRegisters, RegisteredModel, load_trained_registers,  # noqa: E402
                                save_trained_registers)

__all__ = [
    "PRECISIONS", "Architecture", "Capture", "DiscoveryStatistics", "Edit", "EditContext", "LegacyEdit", "PaperEdit", "HookManager", "HookSite", "Hooks", "ImageFolder", "ImageSourceError",
    "IncompatibleNeuronsError", "InvalidArgumentError", "LearnableRegisters", "LoadedModel", "ModelLoadError", "ModifiedModel",
    "NeuronFileError", "NonFiniteActivationsError", "NoOutliersError", "Precision", "Preset", "RegisterNeuron",
    "RegisterNeurons", "RegisteredModel", "StopForward", "TestTimeRegistersError", "TokenLayout", "UnsupportedModelError",
    "__version__", "architectures", "auto_threshold", "check_discovery_arguments", "find_register_neurons", "gather_statistics",
    "legacy_edit", "load_model", "load_neurons", "load_preset", "load_trained_registers", "paper_edit", "register_architecture",
    "save_trained_registers",
]

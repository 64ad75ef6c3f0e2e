"""test-time-registers: remove the high-norm outlier tokens of pretrained ViTs at inference time.

This package is the architecture-agnostic core, read in this order: the vocabulary (errors,
layout, sites, hooks), the registry and loading, Algorithm 1 (discovery), Algorithm 2 (edits,
intervention). The wings build on it: ``data`` (image sources, batching, labelled sets, scenes),
``analysis`` (measures, evaluation, figures, the activation log) and ``training`` (learned
registers). ``test_time_registers.clip``, ``.dinov2`` and ``.deit`` declare OpenCLIP, DINOv2,
transformers and timm ViTs and register their model classes and specs. Importing this package
imports none of open_clip, timm or transformers.
"""

__version__ = "0.3.0"

from .discovery import check_discovery_arguments, find_register_neurons, gather_statistics  # noqa: E402
from .statistics import DiscoverySettings, DiscoveryStatistics, auto_threshold  # noqa: E402
from .edits import Edit, EditContext, LegacyEdit, PaperEdit, legacy_edit, paper_edit  # noqa: E402
from .errors import (CheckpointError, ImageSourceError, IncompatibleNeuronsError, InvalidArgumentError,  # noqa: E402
                     MissingDependencyError, ModelLoadError, NeuronFileError, NonFiniteActivationsError,
                     NonFiniteLossError, NoOutliersError, RegisterLeakError, TestTimeRegistersError,
                     UnsupportedModelError)
from .hooks import Capture, Extension, HookManager, Hooks, HookSite, StopForward  # noqa: E402
from .data.sources import ImageFolder  # noqa: E402
from .intervention import ModifiedModel  # noqa: E402
from .layout import TokenLayout  # noqa: E402
from .loading import LoadedModel  # noqa: E402
from .neurons import RegisterNeuron, RegisterNeurons  # noqa: E402
from .precision import PRECISIONS, Precision  # noqa: E402
from .registry import (Architecture, Preset, architectures, hook_manager_for, load_model, load_neurons,  # noqa: E402
                       load_preset, register_architecture, register_model, supported_models)
from .sites import At, EagerAttention, NeedWeights, Sites, Unfused  # noqa: E402
from .training.registers import (LearnableRegisters, RegisteredModel, load_trained_registers,  # noqa: E402
                                save_trained_registers)

__all__ = [
    "CheckpointError", "DiscoverySettings", "MissingDependencyError", "NonFiniteLossError", "At", "EagerAttention", "Extension", "NeedWeights", "RegisterLeakError", "Sites", "Unfused", "hook_manager_for",
    "register_model", "supported_models",
    "PRECISIONS", "Architecture", "Capture", "DiscoveryStatistics", "Edit", "EditContext", "LegacyEdit", "PaperEdit", "HookManager", "HookSite", "Hooks", "ImageFolder", "ImageSourceError",
    "IncompatibleNeuronsError", "InvalidArgumentError", "LearnableRegisters", "LoadedModel", "ModelLoadError", "ModifiedModel",
    "NeuronFileError", "NonFiniteActivationsError", "NoOutliersError", "Precision", "Preset", "RegisterNeuron",
    "RegisterNeurons", "RegisteredModel", "StopForward", "TestTimeRegistersError", "TokenLayout", "UnsupportedModelError",
    "__version__", "architectures", "auto_threshold", "check_discovery_arguments", "find_register_neurons", "gather_statistics",
    "legacy_edit", "load_model", "load_neurons", "load_preset", "load_trained_registers", "paper_edit", "register_architecture",
    "save_trained_registers",
]

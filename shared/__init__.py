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

import importlib  # noqa: E402

#: Every public name, and the module that defines it; each module is imported when one of its names is first used.
_EXPORTS = {
    **dict.fromkeys(("ImageFolder",), "data.sources"),
    **dict.fromkeys(("check_discovery_arguments", "find_register_neurons", "gather_statistics"), "discovery"),
    **dict.fromkeys(("Edit", "EditContext", "LegacyEdit", "PaperEdit", "legacy_edit", "paper_edit"), "edits"),
    **dict.fromkeys(("CheckpointError", "ImageSourceError", "IncompatibleNeuronsError", "InvalidArgumentError",
                     "MissingDependencyError", "ModelLoadError", "NeuronFileError", "NoOutliersError",
                     "NonFiniteActivationsError", "NonFiniteLossError", "RegisterLeakError",
                     "TestTimeRegistersError", "UnsupportedModelError"), "errors"),
    **dict.fromkeys(("ExportError", "ExportMismatchError"), "errors"),
    **dict.fromkeys(("ExportReport", "export_image_model"), "export"),
    **dict.fromkeys(("Capture", "Extension", "HookManager", "HookSite", "Hooks", "StopForward"), "hooks"),
    **dict.fromkeys(("ModifiedModel",), "intervention"),
    **dict.fromkeys(("TokenLayout",), "layout"),
    **dict.fromkeys(("LoadedModel",), "loading"),
    **dict.fromkeys(("RegisterNeuron", "RegisterNeurons"), "neurons"),
    **dict.fromkeys(("PRECISIONS", "Precision"), "precision"),
    **dict.fromkeys(("load_model",), "models"),
    **dict.fromkeys(("Architecture", "Preset", "architectures", "hook_manager_for", "load_neurons",
                     "load_preset", "register_architecture", "register_model", "supported_models"), "registry"),
    **dict.fromkeys(("At", "EagerAttention", "FirstPresent", "FusedProjections", "NeedWeights", "SeparateProjections",
                     "Sites", "Unfused"), "sites"),
    **dict.fromkeys(("DiscoverySettings", "DiscoveryStatistics", "auto_threshold"), "statistics"),
    **dict.fromkeys(("LearnableRegisters", "RegisteredModel", "load_trained_registers", "save_trained_registers"), "training.registers"),
}


def __getattr__(name: str):
    """Import the module that defines ``name`` on first use (PEP 562), so that ``import test_time_registers``
    costs almost nothing and a command-line program can catch Ctrl-C from its first instant."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "Architecture", "At", "Capture", "CheckpointError", "DiscoverySettings", "DiscoveryStatistics", "EagerAttention",
    "Edit", "EditContext", "ExportError", "ExportMismatchError", "ExportReport", "Extension", "FirstPresent", "FusedProjections", "HookManager", "HookSite", "Hooks", "ImageFolder", "ImageSourceError",
    "IncompatibleNeuronsError", "InvalidArgumentError", "LearnableRegisters", "LegacyEdit", "LoadedModel",
    "MissingDependencyError", "ModelLoadError", "ModifiedModel", "NeedWeights", "NeuronFileError", "NoOutliersError",
    "NonFiniteActivationsError", "NonFiniteLossError", "PRECISIONS", "PaperEdit", "Precision", "Preset",
    "RegisterLeakError", "RegisterNeuron", "RegisterNeurons", "RegisteredModel", "SeparateProjections", "Sites", "StopForward",
    "TestTimeRegistersError", "TokenLayout", "Unfused", "UnsupportedModelError", "__version__", "architectures",
    "auto_threshold", "check_discovery_arguments", "export_image_model", "find_register_neurons", "gather_statistics", "hook_manager_for",
    "legacy_edit", "load_model", "load_neurons", "load_preset", "load_trained_registers", "paper_edit",
    "register_architecture", "register_model", "save_trained_registers", "supported_models",
]

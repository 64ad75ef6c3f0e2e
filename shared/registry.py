"""Architectures register themselves next to their hook manager; model specs name them.

A model spec is ``PREFIX:REFERENCE``, e.g. ``openclip:ViT-B-16:laion2b_s34b_b88k`` or
``dinov2:facebook/dinov2-large``. Each architecture package registers its prefix, its loader
and its presets when it is imported::

    @register_architecture("timm", hook_manager=DeitHookManager, spec="timm:NAME[:CHECKPOINT|:random]")
    def load_timm_spec(reference: str, *, device, precision, seed) -> LoadedModel: ...

The command line imports an architecture package when a spec names its prefix: installed
packages say which package serves which prefix under the entry-point group
``test_time_registers.architectures`` (see ``pyproject.toml``), so other packages can add
architectures without touching this one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata, resources

import torch

from .errors import ModelLoadError, NeuronFileError
from .hooks import HookManager
from .loading import LoadedModel
from .neurons import RegisterNeurons
from .precision import get_precision

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "test_time_registers.architectures"

#: ``load(reference, *, device, precision, seed) -> LoadedModel``
Loader = Callable[..., LoadedModel]


@dataclass(frozen=True)
class Preset:
    """A published register-neuron list shipped as a JSON neuron file inside a package."""

    name: str
    package: str       # the package holding the file
    file: str
    model: str         # the model spec it belongs to
    description: str = ""

    def load(self) -> RegisterNeurons:
        text = resources.files(self.package).joinpath(self.file).read_text()
        return RegisterNeurons.from_dict(json.loads(text), origin=f"preset {self.name}")


@dataclass(frozen=True)
class Architecture:
    """One family of models that specs ``PREFIX:...`` name.

    ``hook_manager`` is the class that describes the loaded models; it declares their input
    dtype and device (the patch embedding's weight).
    """

    prefix: str
    load: Loader
    hook_manager: type[HookManager]
    spec: str                        # the spec's form, shown in help and errors
    description: str = ""
    examples: tuple[str, ...] = ()
    presets: Mapping[str, Preset] = field(default_factory=dict)
    alias_of: str | None = None      # set for an alias prefix (``deit`` for ``timm``)

    def load_spec(self, reference: str, *, device: torch.device | str = "cpu", precision: str = "fp32",
                  seed: int = 0) -> LoadedModel:
        return self.load(reference, device=device, precision=get_precision(precision).name, seed=seed)


_ARCHITECTURES: dict[str, Architecture] = {}
_LOADED_ENTRY_POINTS: set[str] = set()


def register_architecture(prefix: str, *, hook_manager: type[HookManager], spec: str, description: str = "",
                          examples: tuple[str, ...] = (), presets: tuple[Preset, ...] = (),
                          aliases: tuple[str, ...] = ()) -> Callable[[Loader], Loader]:
    """Decorator: register ``load`` as the loader of specs ``PREFIX:REFERENCE`` (and of each alias).

    ``load(reference, *, device, precision, seed)`` gets the part after the first colon (empty
    for a bare ``PREFIX``) and returns a :class:`LoadedModel`; it raises
    :class:`~test_time_registers.ModelLoadError` for anything it cannot load.
    """
    def decorate(load: Loader) -> Loader:
        entry = Architecture(prefix, load, hook_manager, spec, description, tuple(examples),
                             {preset.name: preset for preset in presets})
        for name, architecture in ((prefix, entry), *((alias, _alias(entry, alias)) for alias in aliases)):
            existing = _ARCHITECTURES.get(name)
            if existing is not None and existing.load is not load:
                log.warning("model-spec prefix %r was registered twice; the later one wins", name)
            _ARCHITECTURES[name] = architecture
        return load

    return decorate


def _alias(entry: Architecture, alias: str) -> Architecture:
    return Architecture(alias, entry.load, entry.hook_manager, entry.spec.replace(f"{entry.prefix}:", f"{alias}:", 1),
                        entry.description, presets={}, alias_of=entry.prefix)


def _load_entry_points(name: str | None = None) -> None:
    """Import the packages that serve prefix ``name`` (or every prefix), once each."""
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if (name is not None and entry_point.name != name) or entry_point.value in _LOADED_ENTRY_POINTS:
            continue
        _LOADED_ENTRY_POINTS.add(entry_point.value)
        try:
            entry_point.load()
        except ImportError as error:   # a plug-in whose dependencies are missing must not break the rest
            log.warning("cannot import %s for model specs %r: %s", entry_point.value, entry_point.name, error)


def architectures() -> dict[str, Architecture]:
    """Every registered architecture by prefix, aliases included, after importing all installed ones."""
    _load_entry_points()
    return dict(sorted(_ARCHITECTURES.items()))


def find_architecture(prefix: str) -> Architecture:
    """The architecture registered for ``prefix``, importing only the package that serves it."""
    if prefix not in _ARCHITECTURES:
        _load_entry_points(prefix)
    if prefix not in _ARCHITECTURES:
        _load_entry_points()
    if prefix not in _ARCHITECTURES:
        raise ModelLoadError(f"unknown model spec prefix {prefix!r}; expected one of: {spec_forms()}")
    return _ARCHITECTURES[prefix]


def installed_prefixes() -> list[str]:
    """The prefixes registered so far and those installed packages serve, without importing any."""
    names = {entry_point.name for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names | set(_ARCHITECTURES))


def spec_forms() -> str:
    """The spec of every registered architecture, for help texts and errors."""
    return " | ".join(architecture.spec for architecture in architectures().values())


def load_model(spec: str, *, device: torch.device | str = "cpu", precision: str = "fp32", seed: int = 0) -> LoadedModel:
    """Load the model a spec names, e.g. ``load_model("timm:deit3_base_patch16_224.fb_in1k")``.

    Raises:
        ModelLoadError: unknown prefix, or anything the architecture's loader cannot load.
        InvalidArgumentError: an unknown precision.
    """
    prefix, _, reference = spec.partition(":")
    return find_architecture(prefix).load_spec(reference, device=device, precision=precision, seed=seed)


def presets() -> dict[str, Preset]:
    """Every registered preset by name."""
    return {name: preset for architecture in architectures().values() for name, preset in architecture.presets.items()}


def load_preset(name: str, hook_manager: HookManager | None = None) -> RegisterNeurons:
    """The register neurons of a preset, with their provenance in ``.source``.

    With ``hook_manager``, also check that they fit that model.
    """
    known = presets()
    if name not in known:
        raise NeuronFileError(f"unknown preset {name!r}; known: {', '.join(sorted(known)) or 'none'}")
    neurons = known[name].load()
    if hook_manager is not None:
        neurons.check_fits(hook_manager)
    return neurons


def load_neurons(spec: str, hook_manager: HookManager | None = None) -> RegisterNeurons:
    """A neuron file path, or ``preset:NAME`` for a shipped list; checked against ``hook_manager``."""
    if spec.startswith("preset:"):
        return load_preset(spec.removeprefix("preset:"), hook_manager)
    return RegisterNeurons.load(spec, hook_manager)
